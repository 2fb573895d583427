//! The generation loop: prefill the prompt, then decode one token at a time until
//! `max_tokens` or an end-of-sequence token, timing both phases.

use std::time::Instant;

use crate::backend::Backend;
use crate::error::Result;
use crate::sample::{Sampler, SamplingParams};

/// Generation settings.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Keep going past EOS (for fidelity comparisons of fixed length).
    pub ignore_eos: bool,
}

/// What happened during a generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Generated ids (including a final EOS if one was produced).
    pub tokens: Vec<u32>,
    /// Seconds spent in prefill (prompt forward + first sample).
    pub prefill_secs: f64,
    /// Seconds spent decoding tokens 2..n.
    pub decode_secs: f64,
    /// Whether generation stopped at EOS.
    pub hit_eos: bool,
}

impl GenerateStats {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Decoded tokens per second (tokens after the first, which prefill produced).
    pub fn decode_tps(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates from `prompt` on `backend` (whose cache is reset first), calling `on_token`
/// with each new id as soon as it is chosen.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateStats> {
    opts.sampling.check()?;
    backend.reset();
    let eos = backend.config().eos_token_ids.clone();
    let mut sampler = Sampler::new(opts.sampling);
    let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
    if opts.max_tokens == 0 {
        return Ok(stats);
    }
    let t0 = Instant::now();
    let mut next = backend.forward_sample(prompt, &mut sampler)?;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        stats.tokens.push(next);
        on_token(next);
        if !opts.ignore_eos && eos.contains(&next) {
            stats.hit_eos = true;
            break;
        }
        if stats.tokens.len() >= opts.max_tokens {
            break;
        }
        next = backend.forward_sample(&[next], &mut sampler)?;
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    Ok(stats)
}
