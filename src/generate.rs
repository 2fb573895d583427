//! The generation loop: prefill the prompt, then decode one token at a time until
//! `max_tokens`, an end-of-sequence token or the end of the context, timing both phases.

use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
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

/// Why a generation stopped (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinishReason {
    /// It produced an end-of-sequence token.
    Stop,
    /// It generated `max_tokens`, or the context is full ([`GenerateStats::context_full`]).
    #[default]
    Length,
}

impl FinishReason {
    /// `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What happened during a generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    /// Prompt tokens prefilled (the prompt length; 0 when nothing ran, `max_tokens` 0).
    pub prompt_tokens: usize,
    /// Generated ids (including a final EOS if one was produced).
    pub tokens: Vec<u32>,
    /// Seconds spent in prefill (prompt forward + first sample).
    pub prefill_secs: f64,
    /// Seconds spent decoding tokens 2..n.
    pub decode_secs: f64,
    /// Whether generation stopped at EOS.
    pub hit_eos: bool,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Whether it stopped because prompt + generated tokens filled the context
    /// ([`Backend::max_context`]).
    pub context_full: bool,
}

impl GenerateStats {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        // No prefill ran (`max_tokens` 0): no rate, rather than tokens over a nanosecond.
        if self.prefill_secs == 0.0 { 0.0 } else { self.prompt_tokens as f64 / self.prefill_secs.max(1e-9) }
    }

    /// Decoded tokens per second (tokens after the first, which prefill produced).
    pub fn decode_tps(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Checks up front that `prompt_len + max_tokens` tokens fit in the backend's context (for
/// runs that must generate exactly `max_tokens`, like bench and validate).
pub fn check_context(backend: &dyn Backend, prompt_len: usize, max_tokens: usize) -> Result<()> {
    let (ctx, total) = (backend.max_context(), prompt_len.saturating_add(max_tokens));
    if total > ctx {
        return Err(Error::Arg(format!(
            "prompt {prompt_len} + {max_tokens} generated = {total} tokens exceeds the context of {ctx} tokens \
             (--ctx, at most the model's max_position_embeddings {})",
            backend.config().max_position_embeddings
        )));
    }
    Ok(())
}

/// Generates from `prompt` on `backend` (whose cache is reset first), calling `on_token`
/// with each new id as soon as it is chosen. Stops at an EOS token (unless ignored), after
/// `max_tokens`, or when prompt + generated tokens fill the backend's context
/// ([`Backend::max_context`]) — then with [`FinishReason::Length`] and everything generated
/// so far, not an error. A prompt that leaves no room is an error.
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
    if opts.max_tokens == 0 {
        // Nothing runs, not even the prefill: the summary says 0 prompt tokens, not the
        // prompt's length at a rate of 0.
        return Ok(GenerateStats::default());
    }
    let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
    let ctx = backend.max_context();
    if prompt.len() >= ctx {
        return Err(Error::Arg(format!(
            "the prompt ({} tokens) leaves no room to generate in the context of {ctx} tokens \
             (--ctx, at most the model's max_position_embeddings {})",
            prompt.len(),
            backend.config().max_position_embeddings
        )));
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
            stats.finish_reason = FinishReason::Stop;
            break;
        }
        if stats.tokens.len() >= opts.max_tokens {
            break;
        }
        if prompt.len() + stats.tokens.len() >= ctx {
            stats.context_full = true;
            break;
        }
        next = backend.forward_sample(&[next], &mut sampler)?;
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::GenerateStats;

    /// A run that generated nothing (`--max-tokens 0`) reports no rates, not a prompt over a
    /// nanosecond.
    #[test]
    fn rates_of_an_empty_run_are_zero() {
        let s = GenerateStats { prompt_tokens: 5, ..Default::default() };
        assert_eq!((s.prefill_tps(), s.decode_tps()), (0.0, 0.0));
        let s = GenerateStats { prompt_tokens: 4, prefill_secs: 0.5, ..Default::default() };
        assert_eq!(s.prefill_tps(), 8.0);
    }
}
