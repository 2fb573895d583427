//! NCCL availability, through cudarc's NCCL bindings loaded at run time (like the driver).
//!
//! Why a probe: cudarc's dynamic loading panics on the first NCCL call when `libnccl` is
//! missing, so every multi-GPU path asks [`probe`] first and turns absence into
//! [`Error::Unavailable`]. Only the probe exists so far: expert parallelism across GPUs
//! (issue 21) is built on the CPU only ([`crate::parallel`], `--ranks N`).

use crate::error::{Error, Result};

/// A loaded NCCL library's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclVersion {
    /// Major version (2).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

impl std::fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl NcclVersion {
    /// Decodes `ncclGetVersion`'s code: `X·1000 + Y·100 + Z` up to 2.8, `X·10000 + Y·100 + Z`
    /// from 2.9 on (NCCL's `NCCL_VERSION` macro).
    pub fn from_code(code: u32) -> NcclVersion {
        let (major, rest) = if code >= 10000 { (code / 10000, code % 10000) } else { (code / 1000, code % 1000) };
        NcclVersion { major, minor: rest / 100, patch: rest % 100 }
    }
}

/// The NCCL library this process would use, or [`Error::Unavailable`] when `libnccl` cannot
/// be loaded (never a panic).
pub fn probe() -> Result<NcclVersion> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(Error::Unavailable(
            "NCCL: libnccl.so.2 could not be loaded (install NCCL 2.x or put it on LD_LIBRARY_PATH); \
             expert parallelism across GPUs needs it"
                .into(),
        ));
    }
    let code = cudarc::nccl::result::get_nccl_version()
        .map_err(|e| Error::Unavailable(format!("NCCL: ncclGetVersion failed: {e:?}")))?;
    Ok(NcclVersion::from_code(code.max(0) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_both_schemes() {
        assert_eq!(NcclVersion::from_code(2708).to_string(), "2.7.8");
        assert_eq!(NcclVersion::from_code(21805).to_string(), "2.18.5");
        assert_eq!(NcclVersion::from_code(22703).to_string(), "2.27.3");
    }

    /// Present or absent, the probe answers without panicking; absent is `Unavailable`.
    #[test]
    fn probe_is_a_version_or_unavailable() {
        match probe() {
            Ok(v) => assert_eq!(v.major, 2, "NCCL {v}"),
            Err(Error::Unavailable(why)) => assert!(why.contains("libnccl"), "{why}"),
            Err(e) => panic!("NCCL probe: unexpected error {e}"),
        }
    }
}
