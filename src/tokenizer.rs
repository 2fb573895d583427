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
///
/// O(1) per token (the prefix-offset / read-offset scheme of HF's `DecodeStream` and TGI):
/// each push decodes only a short window — the last printed token(s) as context, then the
/// ids not yet printed — and prints what the new ids add to the context's text. The context
/// keeps decoders that look at neighbours (SentencePiece's leading-space strip, byte
/// fallback) right. Output is held back while the tail is an incomplete UTF-8 sequence
/// (U+FFFD), but never for more than [`StreamDecoder::MAX_PENDING`] ids.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    /// The window: context ids, then ids not printed yet.
    ids: Vec<u32>,
    /// `ids[..read]` are printed (the context of the next decode).
    read: usize,
}

impl StreamDecoder {
    /// Unprinted ids after which the text is printed even if it ends in U+FFFD (no UTF-8
    /// character needs more than 4 byte tokens, so only invalid bytes get here).
    pub const MAX_PENDING: usize = 16;

    /// Adds `id` and returns the text that became complete.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let context = decode(&self.ids[..self.read]);
        let text = decode(&self.ids);
        let pending = self.ids.len() - self.read;
        let held = text.ends_with('\u{FFFD}') && pending < Self::MAX_PENDING;
        let new = match text.get(context.len()..) {
            Some(new) if !new.is_empty() && !held && text.starts_with(&context) => new.to_string(),
            _ if pending < Self::MAX_PENDING => return String::new(),
            // The context no longer decodes to a prefix (should not happen): restart the window.
            _ => text.chars().skip(context.chars().count()).collect(),
        };
        // The ids just printed become the context of the next decode.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        new
    }

    /// The end of the stream: the text of the ids still held back (an incomplete UTF-8 tail
    /// decodes to U+FFFD, as the full decode has it), so that everything pushed and then
    /// finished equals the decode of all the ids. The decoder is empty afterwards.
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let (context, text) = (decode(&self.ids[..self.read]), decode(&self.ids));
        let rest = match text.strip_prefix(context.as_str()) {
            Some(rest) => rest.to_string(),
            None => text.chars().skip(context.chars().count()).collect(),
        };
        *self = StreamDecoder::default();
        rest
    }
}

/// The raw bytes of token `id` (OpenAI's logprob `bytes`): its decoded text when that is
/// whole UTF-8, else the bytes its vocabulary entry stands for — a byte-level BPE piece
/// (GPT-2's byte ↔ printable-character map) or a byte-fallback piece `<0xAB>`. A token that
/// is part of a multi-byte character decodes to nothing alone; these bytes are what it adds.
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    let text = tok.decode(&[id], false).unwrap_or_default();
    if !text.is_empty() && !text.contains('\u{FFFD}') {
        return text.into_bytes();
    }
    let Some(piece) = tok.id_to_token(id) else { return text.into_bytes() };
    if let Some(b) =
        piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok())
    {
        return vec![b];
    }
    piece.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>().unwrap_or_else(|| text.into_bytes())
}

/// The byte a byte-level BPE character stands for (the inverse of GPT-2's map: printable
/// Latin-1 characters are themselves, the n-th other byte is character 256 + n).
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    match c as u32 {
        c if c < 256 => printable(c).then_some(c as u8),
        c => (0u32..256).filter(|&b| !printable(b)).nth((c - 256) as usize).map(|b| b as u8),
    }
}

/// Builds a byte-level BPE tokenizer with exactly `vocab_size` ids: 256 byte tokens,
/// trained merges, deterministic filler merges, then [`SPECIALS`] as the last ids.
pub fn synthetic(vocab_size: usize, seed: u64) -> Result<Tokenizer> {
    synthetic_with(vocab_size, seed, &SPECIALS)
}

/// [`synthetic`] with the given special tokens as the last ids, in order (a family's chat
/// template needs its own: `<|im_start|>` for Qwen, `<|user|>` for GLM, ...).
pub fn synthetic_with(vocab_size: usize, seed: u64, specials: &[&str]) -> Result<Tokenizer> {
    let regular = vocab_size.checked_sub(specials.len()).filter(|&r| r >= 256).ok_or_else(|| {
        Error::Arg(format!(
            "vocab_size {vocab_size} is too small for a byte-level tokenizer (need ≥ {})",
            256 + specials.len()
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
    let specials: Vec<AddedToken> = specials.iter().map(|s| AddedToken::from(*s, true)).collect();
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

    /// GPT-2's byte → printable-char map (what a byte-level BPE's single-byte tokens are).
    fn byte_token(b: u8) -> String {
        let printable = |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
        if printable(b as u32) {
            return char::from(b).to_string();
        }
        let n = (0..b as u32).filter(|&c| !printable(c)).count() as u32;
        char::from_u32(256 + n).unwrap().to_string()
    }

    #[test]
    fn token_bytes_of_partial_characters() {
        let tok = synthetic(700, 1).unwrap();
        // "é" is two bytes; whatever ids encode it, their bytes concatenate to its UTF-8.
        for text in ["é", "✓ ok", "plain"] {
            let ids = encode(&tok, text).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&i| token_bytes(&tok, i)).collect();
            assert_eq!(bytes, text.as_bytes(), "{text}: {ids:?}");
        }
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_token(0xC3).chars().next().and_then(byte_level_byte), Some(0xC3));
    }

    fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
        let mut sd = StreamDecoder::default();
        let mut out: String = ids.iter().map(|&i| sd.push(tok, i)).collect();
        out += &sd.finish(tok);
        out
    }

    #[test]
    fn a_stream_that_ends_inside_a_character_is_flushed_at_the_end() {
        let tok = synthetic(700, 1).unwrap();
        // The first byte of "日" alone: held back while streaming, U+FFFD at the end (what
        // the full decode gives), never silently dropped.
        let ids = encode(&tok, "ok 日").unwrap();
        for cut in 1..=ids.len() {
            let full = tok.decode(&ids[..cut], true).unwrap();
            assert_eq!(stream(&tok, &ids[..cut]), full, "cut {cut}");
        }
        let mut sd = StreamDecoder::default();
        let last = *ids.last().unwrap();
        let held: String = ids[..ids.len() - 1].iter().map(|&i| sd.push(&tok, i)).collect();
        assert!(tok.decode(&ids[..ids.len() - 1], true).unwrap().ends_with('\u{FFFD}'), "{ids:?}");
        assert!(!held.ends_with('\u{FFFD}'), "an incomplete character was printed: {held:?}");
        assert_eq!(held + &sd.push(&tok, last) + &sd.finish(&tok), "ok 日");
    }

    #[test]
    fn streamed_text_equals_the_full_decode_byte_level() {
        let tok = synthetic(700, 1).unwrap();
        // Multi-byte characters split into single-byte tokens: the tail is incomplete UTF-8
        // between them, and nothing may be printed until the character is whole.
        let text = "naïve ✓ 日本語 🎉 — ok";
        let ids: Vec<u32> =
            text.bytes().map(|b| tok.token_to_id(&byte_token(b)).unwrap_or_else(|| panic!("byte {b}"))).collect();
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert_eq!(stream(&tok, &ids), text);
        // Merged tokens mixed with bytes, repeated: the same text either way.
        let mut mixed = encode(&tok, "The router picks experts ").unwrap();
        mixed.extend(&ids);
        mixed.extend(encode(&tok, " and the cache grows").unwrap());
        let long: Vec<u32> = mixed.iter().copied().cycle().take(mixed.len() * 20).collect();
        assert_eq!(stream(&tok, &long), tok.decode(&long, true).unwrap());
    }

    #[test]
    fn streamed_text_equals_the_full_decode_byte_fallback() {
        // A SentencePiece-style tokenizer (Llama, Mistral): `▁` for spaces, <0xNN> byte-fallback
        // tokens, and a decoder that strips the leading space of the whole text.
        let mut vocab = serde_json::Map::new();
        vocab.insert("<unk>".into(), 0.into());
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), (1 + b).into());
        }
        for (i, t) in ["▁Hello", "▁world", "▁", "é", "▁naïve"].iter().enumerate() {
            vocab.insert(t.to_string(), (257 + i).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        });
        let tok: Tokenizer = json.to_string().parse().unwrap();
        let b = |x: u8| 1 + x as u32;
        // ▁Hello ▁world 日(3 bytes) ▁ 🎉(4 bytes) é ▁world ▁naïve, twice.
        let seq = [257, 258, b(0xE6), b(0x97), b(0xA5), 259, b(0xF0), b(0x9F), b(0x8E), b(0x89), 260, 258, 261];
        let ids: Vec<u32> = seq.iter().chain(&seq).copied().collect();
        let full = tok.decode(&ids, true).unwrap();
        assert_eq!(full, "Hello world日 🎉é world naïve Hello world日 🎉é world naïve");
        assert_eq!(stream(&tok, &ids), full);
    }

    #[test]
    fn stream_decoder_keeps_a_bounded_window() {
        // O(1) per token: only the last few ids are decoded again, however long the text.
        let tok = synthetic(700, 1).unwrap();
        let ids = encode(&tok, "the quick brown fox jumps over the lazy dog ").unwrap();
        let mut sd = StreamDecoder::default();
        let mut out = String::new();
        for &id in ids.iter().cycle().take(5000) {
            out += &sd.push(&tok, id);
            assert!(sd.ids.len() <= 8, "window of {} ids", sd.ids.len());
        }
        assert!(out.starts_with("the quick brown fox") && out.len() > 20_000, "{}", out.len());
        // A byte sequence that never becomes valid UTF-8 is printed (as U+FFFD) rather than
        // held back for ever.
        let bad = tok.token_to_id(&byte_token(0xE6)).unwrap();
        let mut sd = StreamDecoder::default();
        let out: String = (0..100).map(|_| sd.push(&tok, bad)).collect();
        assert!(out.contains('\u{FFFD}') && sd.ids.len() <= 32, "{} ids held", sd.ids.len());
    }
}
