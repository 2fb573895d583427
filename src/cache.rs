//! Where zmoe keeps what it can rebuild: the demo model, synthesised presets, compiled
//! kernels and kernel packs. A module of its own (not the crate root) so that every layer can
//! ask for it without importing the library's front door.

/// zmoe's cache folder: `$ZMOE_CACHE` if set, else `$XDG_CACHE_HOME/zmoe`, else
/// `~/.cache/zmoe` (the system temp folder if there is no home). It holds the demo model,
/// the synthesised `zmoe matrix` presets (`presets/`) and compiled kernels (`kernels/`).
pub fn cache_dir() -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    if let Some(d) = std::env::var_os("ZMOE_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    base.unwrap_or_else(std::env::temp_dir).join("zmoe")
}
