//! Serde for an `f64` that may be NaN or infinite (a poisoned output's error, a failed
//! timing): written as `null`, read back as NaN. JSON has no NaN, and without this one odd
//! number would make a whole ledger line unreadable.

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    if x.is_finite() { s.serialize_f64(*x) } else { s.serialize_none() }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}
