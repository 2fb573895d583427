//! Token sampling: greedy, temperature, top-k, top-p, with a seeded counter-based RNG.
//!
//! The draw for step n depends only on (seed, n) — [`crate::rng::mix64`] — so a run is
//! repeatable with `--seed`, and the GPU sampler (`sample_token`) draws the same u: its greedy
//! pick is exactly the host's; its sampled picks follow the same steps but may differ by one
//! rank where float rounding moves a cumulative boundary.

use crate::error::{Error, Result};
use crate::rng::mix64;

/// In-place max-subtracted softmax in f32. Defined here, below both backends, because the
/// sampler needs it; the CPU reference's attention and routers import the same function.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// ≤ 0 means greedy (argmax, lowest id on ties).
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks the settings (messages name the `zmoe generate` flags): temperature finite and
    /// ≥ 0, top_p in (0, 1].
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Arg(format!(
                "--temperature must be a finite number ≥ 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Arg(format!("--top-p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Hint for a non-finite result found where the layer cannot be told (the GPU).
pub const NON_FINITE_HINT: &str = "; run it with --backend cpu to find the layer that produced it";

/// Checks rows of logits (`[rows, vocab]`, the last row at sequence position `end - 1`): an
/// [`Error::NonFinite`] naming the first row with a NaN or infinite logit.
pub fn check_finite(logits: &[f32], vocab: usize, end: usize, origin: &str) -> Result<()> {
    match logits.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let rows = logits.len() / vocab.max(1);
            Err(Error::NonFinite { position: (end + i / vocab.max(1)).saturating_sub(rows), origin: origin.into() })
        }
    }
}

/// A sampler with its step counter.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// Settings.
    pub params: SamplingParams,
    step: u64,
}

/// Index of the largest value; the lowest index among equal maxima.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    /// A sampler at step 0.
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler { params, step: 0 }
    }

    /// Draws made so far: the counter a device sampler must use for the next draw.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Counts a draw made elsewhere (on the device) with [`Sampler::step`].
    pub fn advance(&mut self) {
        self.step += 1;
    }

    /// Uniform draw in [0, 1) for the current step.
    fn uniform(&self) -> f32 {
        (mix64(self.params.seed ^ mix64(self.step.wrapping_add(1))) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        let out = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            // Candidates sorted by logit descending, lowest id first among ties.
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            if p.top_k > 0 {
                idx.truncate(p.top_k);
            }
            let mut probs: Vec<f32> = idx.iter().map(|&i| logits[i] / p.temperature).collect();
            softmax(&mut probs);
            if p.top_p < 1.0 {
                let mut cum = 0.0;
                let keep = probs.iter().position(|&q| {
                    cum += q;
                    cum >= p.top_p
                });
                let n = keep.map_or(probs.len(), |k| k + 1);
                probs.truncate(n);
                let s: f32 = probs.iter().sum();
                probs.iter_mut().for_each(|q| *q /= s);
            }
            let u = self.uniform();
            let mut cum = 0.0;
            let pick = probs.iter().position(|&q| {
                cum += q;
                u < cum
            });
            idx[pick.unwrap_or(probs.len() - 1)]
        };
        self.step += 1;
        out as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_repeatable_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 3, seed: 42 };
        let run = || {
            let mut s = Sampler::new(params);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        let mut top: Vec<usize> = (0..50).collect();
        top.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]).then(x.cmp(&y)));
        let allowed = &top[..3];
        assert!(a.iter().all(|t| allowed.contains(&(*t as usize))));
        // All three candidates show up over 200 draws, and a different seed gives another stream.
        assert!(allowed.iter().all(|c| a.contains(&(*c as u32))));
        let mut s2 = Sampler::new(SamplingParams { seed: 43, ..params });
        assert_ne!(a, (0..200).map(|_| s2.sample(&logits)).collect::<Vec<_>>());
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One dominant token with p ≈ 0.97: top_p 0.9 must always pick it.
        let logits = [10.0, 6.0, 5.0, 4.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 0, seed: 7 });
        assert!((0..100).all(|_| s.sample(&logits) == 0));
    }
}
