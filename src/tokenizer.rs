//! Tokenizer loading (HF `tokenizer.json` via the `tokenizers` crate), streaming decode,
//! and the byte-level BPE that synthetic checkpoints ship with.
//!
//! The synthetic tokenizer is a real byte-level BPE: its first merges are *trained* by the
//! `tokenizers` crate on a small embedded English text, and the rest of the vocabulary is
//! filled with deterministic extra merges so that it has exactly the model's `vocab_size`
//! (151,936 for the Qwen3 preset). Every id therefore decodes to text, and `--prompt`
//! round-trips through the same code path a real checkpoint uses.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Special tokens appended at the end of a synthetic vocabulary (Qwen-style names).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Text the synthetic BPE's first merges are trained on.
const CORPUS: &str = "zmoe makes mixture of experts decode fast with fused kernels while keeping \
the generated tokens identical to an unfused reference, and proves it with reproducible \
measurements. A model is a plan of steps. The reference plan runs one kernel per operation; \
a pattern rewrites a run of steps into one fused step. The router picks the top experts for \
every token, the experts compute their gated linear units, and the weighted outputs are \
combined and added to the residual stream. Attention reads the key value cache, which grows \
by one token at every decoding step. The quick brown fox jumps over the lazy dog. \
Measure first, then optimise, and write down what you found.";

/// Loads `tokenizer.json`, with an error naming the file.
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::format(
            path,
            "tokenizer.json not found (needed to encode --prompt / decode text; use --prompt-tokens and --json to run without one)",
        ));
    }
    let bytes = crate::input::read(path)?;
    Tokenizer::from_bytes(bytes).map_err(|e| Error::format(path, format!("cannot load tokenizer: {e}")))
}

/// Encodes text to ids (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok.encode(text, false).map_err(|e| Error::Arg(format!("cannot tokenize prompt: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Incremental detokenizer: feed ids one at a time, get back the newly printable text.
/// Holds back output while the tail is an incomplete UTF-8 sequence (shown as U+FFFD).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamDecoder {
    /// Adds `id` and returns the text that became complete.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true).unwrap_or_default();
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return String::new();
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        new
    }
}

/// Builds a byte-level BPE tokenizer with exactly `vocab_size` ids: 256 byte tokens,
/// trained merges, deterministic filler merges, then [`SPECIALS`] as the last ids.
pub fn synthetic(vocab_size: usize, seed: u64) -> Result<Tokenizer> {
    let regular = vocab_size.checked_sub(SPECIALS.len()).filter(|&r| r >= 256).ok_or_else(|| {
        Error::Arg(format!(
            "vocab_size {vocab_size} is too small for a byte-level tokenizer (need ≥ {})",
            256 + SPECIALS.len()
        ))
    })?;
    let mut trainer = BpeTrainer::builder()
        .vocab_size(regular.min(600))
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tk = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| Error::Arg(format!("tokenizer build: {e}")))?;
    tk.train(&mut trainer, CORPUS.split(". ")).map_err(|e| Error::Arg(format!("tokenizer training: {e}")))?;
    let mut json: Value = serde_json::from_str(&tk.to_string(false).map_err(|e| Error::Arg(e.to_string()))?)
        .map_err(|e| Error::Arg(e.to_string()))?;
    extend_vocab(&mut json["model"], regular, seed)?;
    let mut tok: Tokenizer = json.to_string().parse().map_err(|e| Error::Arg(format!("tokenizer rebuild: {e}")))?;
    let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect();
    tok.add_special_tokens(specials).map_err(|e| Error::Arg(format!("special tokens: {e}")))?;
    debug_assert_eq!(tok.get_vocab_size(true), vocab_size);
    Ok(tok)
}

/// Appends merges `a + b` (a random printable token, b a printable byte token) until the model
/// holds `target` tokens. Merge list format follows whatever the trainer wrote.
fn extend_vocab(model: &mut Value, target: usize, seed: u64) -> Result<()> {
    let bad = || Error::Arg("unexpected BPE json layout".into());
    let vocab = model["vocab"].as_object_mut().ok_or_else(bad)?;
    let mut by_id: Vec<String> = vec![String::new(); vocab.len()];
    for (t, id) in vocab.iter() {
        let id = id.as_u64().ok_or_else(bad)? as usize;
        if id >= by_id.len() {
            by_id.resize(id + 1, String::new());
        }
        by_id[id] = t.clone();
    }
    // Filler tokens are printable ASCII (byte-level maps space to 'Ġ' and printable ASCII
    // to itself), so text sampled from a random model is readable noise, not invalid UTF-8.
    let printable = |t: &str| t.chars().all(|c| c == 'Ġ' || c.is_ascii_graphic());
    let base: Vec<String> = ('!'..='~').chain(['Ġ']).map(String::from).collect();
    let mut stems: Vec<String> = by_id.iter().filter(|t| printable(t)).cloned().collect();
    let mut new_merges = Vec::new();
    let mut rng = Rng::new(seed);
    let mut guard = 0usize;
    while by_id.len() < target {
        let a = &stems[(rng.next_u64() % stems.len() as u64) as usize];
        let b = &base[(rng.next_u64() % base.len() as u64) as usize];
        let t = format!("{a}{b}");
        guard += 1;
        if t.chars().count() > 12 || vocab.contains_key(&t) {
            if guard > target * 50 {
                return Err(Error::Arg("could not fill the synthetic vocabulary".into()));
            }
            continue;
        }
        vocab.insert(t.clone(), Value::from(by_id.len()));
        new_merges.push((a.clone(), b.clone()));
        by_id.push(t.clone());
        stems.push(t);
    }
    let merges = model["merges"].as_array_mut().ok_or_else(bad)?;
    let as_pairs = merges.first().is_none_or(Value::is_array);
    for (a, b) in new_merges {
        merges.push(if as_pairs { Value::from(vec![a, b]) } else { Value::from(format!("{a} {b}")) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_tokenizer_has_exact_vocab_and_round_trips() {
        let tok = synthetic(700, 1).unwrap();
        assert_eq!(tok.get_vocab_size(true), 700);
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(699));
        let text = "Hello, experts! ünïcödé ✓";
        let ids = encode(&tok, text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // Every id decodes (no holes in the vocabulary).
        for id in 0..697 {
            assert!(tok.id_to_token(id).is_some(), "id {id}");
        }
        let mut sd = StreamDecoder::default();
        let streamed: String = ids.iter().map(|&i| sd.push(&tok, i)).collect();
        assert_eq!(streamed, text);
    }
}
