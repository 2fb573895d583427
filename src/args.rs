//! clap value parsers for numeric flags: a message that says what is accepted (clap alone
//! reads `--seed -1` as an unknown flag `-1`). Use them with `allow_negative_numbers = true`
//! so that a negative value reaches the parser.

/// A count or seed: `0..=usize::MAX`.
pub fn count(s: &str) -> Result<usize, String> {
    s.trim().parse().map_err(|_| format!("expected a non-negative integer 0..={}, got {s}", usize::MAX))
}

/// A 64-bit seed: `0..=2^64-1`.
pub fn seed(s: &str) -> Result<u64, String> {
    s.trim().parse().map_err(|_| format!("expected a non-negative integer 0..=2^64-1, got {s}"))
}

/// A finite number `≥ 0` (e.g. `--temperature`).
pub fn non_negative(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("expected a finite number ≥ 0, got {s}")),
    }
}

/// Any number; range checks come later with a message of their own (e.g. `--top-p`).
pub fn number(s: &str) -> Result<f32, String> {
    s.trim().parse().map_err(|_| format!("expected a number, got {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_is_accepted() {
        assert_eq!(count("7"), Ok(7));
        assert_eq!(seed("18446744073709551615"), Ok(u64::MAX));
        let e = seed("-1").unwrap_err();
        assert!(e.contains("non-negative integer 0..=2^64-1") && e.ends_with("got -1"), "{e}");
        assert!(count("1.5").unwrap_err().contains("non-negative integer"));
        assert!(non_negative("NaN").is_err() && non_negative("-1").is_err() && non_negative("inf").is_err());
        assert_eq!(non_negative("0.7"), Ok(0.7));
        assert_eq!(number("-0.5"), Ok(-0.5));
    }
}
