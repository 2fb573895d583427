//! The engine: one thread owns the backend and runs the continuous-batching loop.
//!
//! Why one thread: a backend is a single mutable device state (CUDA contexts are not even
//! `Send`), and a batched forward is the unit of work, so one owner stepping in a loop is
//! both the simplest and the fastest arrangement. HTTP handlers talk to it over channels: a
//! bounded queue of [`Job`]s in (its bound is the server's admission limit: a full queue is a
//! 429), one unbounded stream of [`Event`]s out per job.
//!
//! Each step the engine admits queued jobs into free slots, drops jobs whose client went away
//! (their event receiver is gone: the slot is freed before the next step), and runs one
//! [`Backend::forward_rows`] over one decode row per decoding sequence plus at most
//! `prefill_chunk` prompt rows of the sequences still prefilling, oldest first — so a long
//! prompt never stalls the running streams for more than one chunk. Because a row's
//! arithmetic does not depend on the other rows, each request's tokens are those it would get
//! alone (batch invariance); the sampler of each request counts its own draws, so seeded
//! sampling is invariant too.
//!
//! Text is produced here, not in the handlers, because stop strings end generation: tokens
//! pass through a hold-back for stop token sequences, then the incremental detokenizer, then a
//! hold-back for stop strings; only text that can no longer become part of a stop is sent.

use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::backend::{Backend, Row};
use crate::generate::FinishReason;
use crate::sample::{Sampler, SamplingParams, softmax};
use crate::tokenizer::StreamDecoder;

use super::metrics::Metrics;

/// What a request asks the engine to generate.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Most tokens to generate (the end of the context stops earlier).
    pub max_tokens: usize,
    /// Sampling settings (seeded).
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first occurrence, which is not sent.
    pub stop_strings: Vec<String>,
    /// Stop token sequences: generation ends when the output ends with one (not sent).
    pub stop_tokens: Vec<Vec<u32>>,
    /// Log-probabilities: `None` none; `Some(n)` the chosen token's and the `n` most likely.
    pub logprobs: Option<usize>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// A request for the engine.
#[derive(Debug)]
pub struct Job {
    /// Request id (for the log).
    pub id: String,
    /// Prompt token ids (non-empty, shorter than the context: checked by the handler).
    pub prompt: Vec<u32>,
    /// What to generate.
    pub params: GenParams,
    /// Where the engine sends what it generates; dropping the receiver cancels the job.
    pub events: mpsc::UnboundedSender<Event>,
}

/// One candidate token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    /// The token's text (its bytes read as UTF-8, lossily where it is part of a character).
    pub token: String,
    /// The token's raw bytes ([`crate::tokenizer::token_bytes`]).
    pub bytes: Vec<u8>,
    /// Natural-log probability under the model's distribution (before temperature).
    pub logprob: f32,
}

/// The log-probability of a generated token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The generated token.
    pub chosen: TopLogprob,
    /// The `n` most likely tokens, most likely first.
    pub top: Vec<TopLogprob>,
}

/// What the engine sends back for a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text, and the log-probabilities of the tokens it came from (if asked).
    Delta {
        /// Text that became final.
        text: String,
        /// One entry per token released with this text.
        logprobs: Vec<TokenLogprob>,
    },
    /// Generation ended.
    Done {
        /// `stop` (EOS, a stop string or stop tokens) or `length`.
        finish: FinishReason,
        /// Prompt length.
        prompt_tokens: usize,
        /// Tokens generated (stop tokens included).
        completion_tokens: usize,
    },
    /// The forward failed (non-finite logits, ...): the job is over.
    Error(String),
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Sequence slots (`--parallel`).
    pub slots: usize,
    /// Most prompt rows per step (`--prefill-chunk`).
    pub prefill_chunk: usize,
}

/// A running sequence.
struct Seq {
    job: Job,
    slot: usize,
    /// Prompt rows already run.
    fed: usize,
    sampler: Sampler,
    /// The token to feed next (decode phase).
    next: Option<u32>,
    /// Generated ids.
    generated: Vec<u32>,
    /// Generated ids not yet released to the detokenizer (a possible stop token sequence),
    /// with their log-probabilities.
    held: Vec<(u32, Option<TokenLogprob>)>,
    decoder: StreamDecoder,
    /// Detokenized text not yet sent (a possible stop string).
    text: String,
    /// Log-probabilities of released tokens not yet sent.
    lps: Vec<TokenLogprob>,
    started: Instant,
}

/// Runs the engine until every job sender is gone. `backend` must hold `opts.slots` slots.
pub fn run(
    backend: &mut dyn Backend,
    tok: &Tokenizer,
    opts: EngineOptions,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let cfg = backend.config().clone();
    let (v, ctx) = (cfg.vocab_size, backend.max_context());
    let mut running: Vec<Seq> = Vec::new();
    let mut free: Vec<usize> = (0..opts.slots).rev().collect();
    loop {
        // Admit: block when idle, else take what is queued, while slots are free.
        metrics.set_load(running.len(), jobs.len());
        while let Some(&slot) = free.last() {
            let job = if running.is_empty() {
                match jobs.blocking_recv() {
                    Some(j) => j,
                    None => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            if job.events.is_closed() {
                metrics.cancelled();
                continue;
            }
            free.pop();
            backend.reset_slot(slot);
            let sampler = Sampler::new(job.params.sampling);
            running.push(Seq {
                job,
                slot,
                fed: 0,
                sampler,
                next: None,
                generated: Vec::new(),
                held: Vec::new(),
                decoder: StreamDecoder::default(),
                text: String::new(),
                lps: Vec::new(),
                started: Instant::now(),
            });
        }
        // Drop the jobs whose client went away.
        running.retain(|s| {
            let gone = s.job.events.is_closed();
            if gone {
                metrics.cancelled();
                free.push(s.slot);
            }
            !gone
        });
        metrics.set_load(running.len(), jobs.len());
        if running.is_empty() {
            continue;
        }
        // One decode row per decoding sequence, then prompt chunks oldest first.
        let mut rows = Vec::new();
        for s in running.iter().filter(|s| s.next.is_some()) {
            let pos = s.job.prompt.len() + s.generated.len() - 1;
            rows.push(Row { slot: s.slot, pos, token: s.next.unwrap(), logits: true, long_prompt: false });
        }
        let decode_rows = rows.len();
        let mut budget = opts.prefill_chunk;
        for s in running.iter().filter(|s| s.fed < s.job.prompt.len()) {
            if budget == 0 {
                break;
            }
            let end = s.job.prompt.len().min(s.fed + budget);
            // A long prompt's rows may take the tensor cores whatever its chunks (Row::long_prompt).
            rows.extend(Row::of_tokens(s.slot, s.fed, &s.job.prompt[s.fed..end], s.job.prompt.len(), false));
            budget -= end - s.fed;
        }
        let t0 = Instant::now();
        let result = backend.forward_rows(&rows);
        metrics.step(rows.len() - decode_rows, decode_rows, t0.elapsed().as_secs_f64());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The failed forward may have written some rows (slot positions are restored);
                // end every job in it, and their slots are reset before they are reused.
                let msg = e.to_string();
                eprintln!("zmoe serve: forward failed: {msg}");
                for s in running.drain(..) {
                    let _ = s.job.events.send(Event::Error(msg.clone()));
                    free.push(s.slot);
                }
                continue;
            }
        };
        // Hand each logits row to its sequence.
        let mut l = logits.chunks_exact(v);
        let mut done = Vec::new();
        for r in rows.iter().filter(|r| r.logits) {
            let row = l.next().expect("one logits row per row that asked");
            let i = running.iter().position(|s| s.slot == r.slot).expect("a row of a running sequence");
            let s = &mut running[i];
            if s.fed < s.job.prompt.len() {
                s.fed = r.pos + 1;
                if s.fed < s.job.prompt.len() {
                    continue; // a chunk in the middle of the prompt: its logits are not used
                }
                metrics.prompt_done(s.job.prompt.len());
            }
            if let Some(finish) = s.accept(row, tok, &cfg.eos_token_ids, ctx) {
                done.push((i, finish));
            }
        }
        // Highest index first, keeping the others in arrival order (prefill is oldest first).
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, finish) in done {
            let mut s = running.remove(i);
            s.finish(tok, finish);
            metrics.finished(s.generated.len());
            free.push(s.slot);
        }
    }
}

impl Seq {
    /// Samples the next token from `logits` and sends the text it completes; the finish
    /// reason if the sequence is done.
    fn accept(&mut self, logits: &[f32], tok: &Tokenizer, eos: &[u32], ctx: usize) -> Option<FinishReason> {
        let id = self.sampler.sample(logits);
        self.generated.push(id);
        let lp = self.job.params.logprobs.map(|n| logprob_entry(logits, id, n, tok));
        if !self.job.params.ignore_eos && eos.contains(&id) {
            if let Some(lp) = lp {
                self.lps.push(lp);
            }
            return Some(FinishReason::Stop);
        }
        self.held.push((id, lp));
        // A stop token sequence just completed: its tokens are not sent.
        let stops = &self.job.params.stop_tokens;
        if let Some(n) = stops.iter().filter(|st| self.generated.ends_with(st)).map(Vec::len).max() {
            self.held.truncate(self.held.len().saturating_sub(n));
            return Some(FinishReason::Stop);
        }
        // Release the tokens that can no longer start a stop token sequence.
        let hold = (0..self.held.len())
            .find(|&k| {
                let tail: Vec<u32> = self.held[k..].iter().map(|h| h.0).collect();
                stops.iter().any(|st| st.len() > tail.len() && st.starts_with(&tail))
            })
            .unwrap_or(self.held.len());
        self.release(hold, tok);
        if self.stop_string_hit() {
            // What comes after the stop string is not output: neither held tokens nor bytes
            // the detokenizer still holds back.
            self.held.clear();
            self.decoder = StreamDecoder::default();
            return Some(FinishReason::Stop);
        }
        self.send_text(false);
        if self.generated.len() >= self.job.params.max_tokens || self.job.prompt.len() + self.generated.len() >= ctx {
            return Some(FinishReason::Length);
        }
        self.next = Some(id);
        None
    }

    /// Passes the first `n` held tokens through the detokenizer.
    fn release(&mut self, n: usize, tok: &Tokenizer) {
        for (id, lp) in self.held.drain(..n) {
            self.text.push_str(&self.decoder.push(tok, id));
            self.lps.extend(lp);
        }
    }

    /// Whether the unsent text holds a stop string; if so it is cut there and what comes
    /// before it is sent.
    fn stop_string_hit(&mut self) -> bool {
        let first = self.job.params.stop_strings.iter().filter_map(|s| self.text.find(s.as_str())).min();
        match first {
            Some(at) => {
                self.text.truncate(at);
                self.send_text(true);
                true
            }
            None => false,
        }
    }

    /// Sends the unsent text — all of it if `all`, else all but the longest tail that could
    /// still begin a stop string — with the pending log-probabilities.
    fn send_text(&mut self, all: bool) {
        let keep_from = if all {
            self.text.len()
        } else {
            (0..self.text.len())
                .filter(|&i| self.text.is_char_boundary(i))
                .find(|&i| self.job.params.stop_strings.iter().any(|s| s.starts_with(&self.text[i..])))
                .unwrap_or(self.text.len())
        };
        let text: String = self.text.drain(..keep_from).collect();
        if !text.is_empty() || !self.lps.is_empty() {
            let logprobs = std::mem::take(&mut self.lps);
            let _ = self.job.events.send(Event::Delta { text, logprobs });
        }
    }

    /// Sends what is left (held tokens and text were only a possible stop: they are output
    /// after all, up to a stop string they complete) and the end of the job.
    fn finish(&mut self, tok: &Tokenizer, finish: FinishReason) {
        self.release(self.held.len(), tok);
        // An incomplete UTF-8 tail is output as U+FFFD (as the full decode has it), not dropped.
        self.text.push_str(&self.decoder.finish(tok));
        if !self.stop_string_hit() {
            self.send_text(true);
        }
        let secs = self.started.elapsed().as_secs_f64();
        eprintln!(
            "zmoe serve: {}: prompt {} tokens, generated {} in {secs:.2} s, finish {}",
            self.job.id,
            self.job.prompt.len(),
            self.generated.len(),
            finish.as_str()
        );
        let _ = self.job.events.send(Event::Done {
            finish,
            prompt_tokens: self.job.prompt.len(),
            completion_tokens: self.generated.len(),
        });
    }
}

/// The log-probability entry of token `id` and the `n` most likely tokens, from raw logits
/// (log-softmax in f32; OpenAI reports the model's distribution, not the sampled one).
fn logprob_entry(logits: &[f32], id: u32, n: usize, tok: &Tokenizer) -> TokenLogprob {
    let mut p = logits.to_vec();
    softmax(&mut p);
    let lp = |i: usize| p[i].max(f32::MIN_POSITIVE).ln();
    let entry = |i: usize| {
        let bytes = crate::tokenizer::token_bytes(tok, i as u32);
        TopLogprob { token: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob: lp(i) }
    };
    let top = crate::cpu::ops::topk(&p, n).into_iter().map(entry).collect();
    TokenLogprob { chosen: entry(id as usize), top }
}
