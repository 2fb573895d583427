//! Knobs: named integer parameters of a template, rendering a template with them, and the
//! source hash that pins a measurement to the exact code it measured.
//!
//! Why integers baked into the source (`constexpr int TPB = {{TPB}};`) and not kernel
//! arguments: the knobs a search cares about (block size, vector width, unroll, tile) only
//! pay off when the compiler sees them as constants. Each distinct rendering is its own
//! NVRTC compile, cached on disk by `cuda::compile`.
//!
//! Why FNV-1a 64 for the hash: it must be identical across runs, platforms and Rust
//! versions (std's `DefaultHasher` is not), and it is ten lines. It is not a security
//! boundary: a pack is trusted data; the hash only detects that the code changed.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Knob values by name (ordered, so their JSON and display are canonical).
pub type Knobs = BTreeMap<String, i64>;

/// A template's knob space: each knob's name and allowed values.
pub type KnobSpace = &'static [(&'static str, &'static [i64])];

/// Builds a [`Knobs`] from pairs.
pub fn knobs(pairs: &[(&str, i64)]) -> Knobs {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// `TPB=256,VEC=8` (empty for no knobs).
pub fn display(k: &Knobs) -> String {
    k.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(",")
}

/// Parses `TPB=256,VEC=8` (spaces allowed around items).
pub fn parse(s: &str) -> Result<Knobs> {
    let mut out = Knobs::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (n, v) = item.split_once('=').ok_or_else(|| Error::Arg(format!("knob `{item}`: expected NAME=VALUE")))?;
        let v: i64 = v.trim().parse().map_err(|_| Error::Arg(format!("knob `{item}`: the value is not an integer")))?;
        out.insert(n.trim().to_string(), v);
    }
    Ok(out)
}

/// Every combination of a knob space, in a fixed order (the first knob varies slowest).
pub fn enumerate(space: KnobSpace) -> Vec<Knobs> {
    let mut all = vec![Knobs::new()];
    for (name, values) in space {
        let mut next = Vec::with_capacity(all.len() * values.len());
        for k in &all {
            for v in values.iter() {
                let mut k2 = k.clone();
                k2.insert(name.to_string(), *v);
                next.push(k2);
            }
        }
        all = next;
    }
    all
}

/// Checks that `k` sets exactly the knobs of `space` to allowed values.
pub fn check(space: KnobSpace, k: &Knobs) -> std::result::Result<(), String> {
    for (name, values) in space {
        match k.get(*name) {
            None => return Err(format!("knob {name} is missing")),
            Some(v) if !values.contains(v) => return Err(format!("knob {name}={v} is not one of {values:?}")),
            _ => {}
        }
    }
    if let Some(extra) = k.keys().find(|n| !space.iter().any(|(s, _)| s == n)) {
        return Err(format!("unknown knob {extra}"));
    }
    Ok(())
}

/// Replaces every `{{NAME}}` in `template` by the knob's value. Fails on a placeholder
/// without a knob and on a knob that appears nowhere (a typo in either).
pub fn render(template: &str, k: &Knobs) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut used = std::collections::BTreeSet::new();
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| "unclosed `{{` in the template".to_string())?;
        let name = after[..end].trim();
        let v = k.get(name).ok_or_else(|| format!("placeholder {{{{{name}}}}} has no knob"))?;
        out.push_str(&v.to_string());
        used.insert(name.to_string());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if let Some(unused) = k.keys().find(|n| !used.contains(*n)) {
        return Err(format!("knob {unused} appears nowhere in the template"));
    }
    Ok(out)
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

/// The hash that identifies a compiled source: `fnv1a64:` + 16 hex digits.
pub fn source_hash(source: &str) -> String {
    format!("fnv1a64:{:016x}", fnv1a64(source.as_bytes()))
}

/// The 16 hex digits of a [`source_hash`] (what `zmoe` prints next to a kernel).
pub fn short_hash(hash: &str) -> &str {
    hash.strip_prefix("fnv1a64:").unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_the_reference_function() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        assert_eq!(source_hash("a"), "fnv1a64:af63dc4c8601ec8c");
    }

    #[test]
    fn render_enumerate_parse() {
        let space: KnobSpace = &[("A", &[1, 2]), ("B", &[7, 8, 9])];
        let all = enumerate(space);
        assert_eq!(all.len(), 6);
        assert_eq!(display(&all[1]), "A=1,B=8");
        assert!(all.iter().all(|k| check(space, k).is_ok()));
        assert!(check(space, &knobs(&[("A", 3), ("B", 7)])).unwrap_err().contains("A=3"));
        assert!(check(space, &knobs(&[("A", 1)])).unwrap_err().contains("B is missing"));
        assert_eq!(render("x{{A}}y{{ B }}z{{A}}", &all[5]).unwrap(), "x2y9z2");
        assert!(render("{{C}}", &all[0]).unwrap_err().contains("{{C}}"));
        assert!(render("{{A}}", &all[0]).unwrap_err().contains("B appears nowhere"));
        assert_eq!(parse(" A=2, B=9 ").unwrap(), all[5]);
        assert!(parse("A").is_err() && parse("A=x").is_err());
        assert_eq!(parse("").unwrap(), Knobs::new());
    }
}
