//! `zmoe matrix catalog`: what `zmoe matrix run` can measure — every synthetic preset
//! [`synth`] knows, plus model folders given with `--model` — with parameter counts, weight
//! formats and the family's pattern policy.
//!
//! The preset list is [`synth::PRESETS`] itself, so a preset added there (one more family's
//! real shapes) appears here and in `matrix run --all` without a change to this module.
//!
//! ## How parameters are counted ([`param_counts`])
//!
//! From config.json's shapes alone (no weights are read), in weight elements regardless of
//! how they are stored (a 4-bit weight counts as one parameter; quantization scales and
//! biases are not parameters):
//!
//! - **total**: embedding `V·H`; per layer the q/k/v/o projections (plus their biases when
//!   `attention_bias`), the four norms (input, post-attention, q-head, k-head), and either
//!   the router `E·H` plus all `E` experts `3·H·I_moe` (MoE layers) or the dense MLP
//!   `3·H·I` (dense layers); the final norm `H`; the head `V·H` unless tied to the
//!   embedding (then it is counted once).
//! - **active per token**: what decoding one token reads — attention, norms, router, the
//!   `top_k` selected experts, dense MLPs, **one row** of the embedding (`H`; none extra
//!   when tied, the row is part of the head) and the whole head `V·H`. This matches
//!   [`Weights::bytes_per_token`](crate::model::Weights::bytes_per_token).
//!
//! Model cards often count the whole embedding table as active (Qwen3-30B-A3B's "3.3B
//! activated" is our 3.04B plus the other `V−1` embedding rows, 0.31B); we count what a
//! token actually touches.

use std::path::{Path, PathBuf};

use super::report::{Table, one_line};
use crate::bench::ModelSummary;
use crate::checkpoint::synth::{self, SynthQuant};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::plan::patterns::{FamilyPolicy, policy};
use crate::runtime::Model;

/// `(total, active per token)` parameters of a model with config `cfg` (see the module docs
/// for what is counted).
pub fn param_counts(cfg: &ModelConfig) -> (u64, u64) {
    let n = |x: usize| x as u64;
    let (v, h, d, nh) = (n(cfg.vocab_size), n(cfg.hidden_size), n(cfg.head_dim), n(cfg.num_heads));
    let o_in = nh * n(cfg.v_head_dim);
    let bias = |x: u64| if cfg.attention_bias { x } else { 0 };
    let (attention, norms) = match &cfg.mla {
        None => {
            let kv_out = n(cfg.num_kv_heads) * d;
            let q_out = nh * d;
            let attention = h * q_out + 2 * h * kv_out + o_in * h + bias(q_out + 2 * kv_out + h);
            (attention, 2 * h + 2 * d)
        }
        Some(m) => {
            // q_a (+ its norm) and q_b, or q_proj; kv_a; kv_b (= embed_q + unembed_out); o.
            let (lat, rope, nope, vd) =
                (n(m.kv_lora_rank), n(m.qk_rope_head_dim), n(m.qk_nope_head_dim), n(m.v_head_dim));
            let q = match m.q_lora_rank.map(n) {
                Some(r) => h * r + r * nh * d + bias(r),
                None => h * nh * d,
            };
            let attention = q + h * (lat + rope) + lat * nh * (nope + vd) + o_in * h + bias(lat + rope + h);
            (attention, 2 * h + lat + m.q_lora_rank.map_or(0, n))
        }
    };
    let expert = 3 * h * n(cfg.moe_intermediate_size);
    // Shared experts run on every token; sigmoid routers carry a correction bias.
    let shared = 3 * h * n(cfg.shared_intermediate_size());
    let router_bias = match cfg.router {
        crate::config::RouterKind::Softmax | crate::config::RouterKind::SigmoidBias { expert_bias: false, .. } => 0,
        _ => n(cfg.num_experts),
    };
    // LFM2 short conv in place of attention: in_proj [3H, H], kernel [H, L], out_proj
    // (biases on all three with conv_bias), the layer's two norms.
    let conv = cfg.conv.as_ref().map_or(0, |c| {
        let l = n(c.kernel);
        4 * h * h + h * l + if c.bias { 3 * h + h + h } else { 0 }
    });
    let (mut total, mut active) = (0u64, 0u64);
    for l in 0..cfg.num_layers {
        let (all_mlp, used_mlp) = if cfg.is_moe_layer(l) {
            let router = n(cfg.num_experts) * h + router_bias + shared;
            (router + n(cfg.num_experts) * expert, router + n(cfg.top_k) * expert)
        } else {
            let dense = 3 * h * n(cfg.intermediate_size);
            (dense, dense)
        };
        let (mixer, norms) = if cfg.is_conv_layer(l) { (conv, 2 * h) } else { (attention, norms) };
        total += mixer + norms + all_mlp;
        active += mixer + norms + used_mlp;
    }
    let (embed, head) = (v * h, v * h);
    total += h + embed + if cfg.tie_word_embeddings { 0 } else { head };
    active += h + head + if cfg.tie_word_embeddings { 0 } else { h };
    (total, active)
}

/// `30.53B`, `3.04B`, `6.31M`, `950.0K`, `12`.
pub fn fmt_params(n: u64) -> String {
    let x = n as f64;
    match n {
        1_000_000_000.. => format!("{:.2}B", x / 1e9),
        1_000_000.. => format!("{:.2}M", x / 1e6),
        1_000.. => format!("{:.1}K", x / 1e3),
        _ => n.to_string(),
    }
}

/// One row of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogRow {
    /// `family/preset` for a preset, the folder's name for a model folder.
    pub name: String,
    /// `model_type`, e.g. `qwen3_moe`.
    pub family: String,
    /// Total parameters ([`param_counts`]).
    pub params: u64,
    /// Active parameters per token ([`param_counts`]).
    pub active: u64,
    /// Weight format: for a preset the formats `synth` can write (`bf16|affine4|affine8`),
    /// for a folder the loaded checkpoint's (`affine4g64 (router affine8g64)`).
    pub quant: String,
    /// The family's default patterns.
    pub default_patterns: Vec<String>,
    /// Patterns the family leaves out by default, with the reason.
    pub excluded_patterns: Vec<(String, String)>,
    /// The preset's description, or the folder's path.
    pub about: String,
}

impl CatalogRow {
    fn new(name: String, cfg: &ModelConfig, quant: String, about: String) -> CatalogRow {
        let (params, active) = param_counts(cfg);
        let FamilyPolicy { defaults, excluded } = policy(cfg.family);
        CatalogRow {
            name,
            family: cfg.family.model_type().into(),
            params,
            active,
            quant,
            default_patterns: defaults.iter().map(|p| p.name().into()).collect(),
            excluded_patterns: excluded.iter().map(|(p, why)| (p.name().into(), (*why).into())).collect(),
            about,
        }
    }
}

/// The catalog row of every preset in [`synth::PRESETS`], in that order.
pub fn preset_rows() -> Result<Vec<CatalogRow>> {
    synth::PRESETS
        .iter()
        .map(|(family, preset, about)| {
            let formats: Vec<&str> =
                SynthQuant::ALL.into_iter().filter(|q| q.fits(family)).map(SynthQuant::name).collect();
            let formats = formats.join("|");
            let json = synth::preset_config(family, preset)?;
            let cfg = ModelConfig::parse(&json.to_string(), Path::new(&format!("<preset {family}/{preset}>")))?;
            Ok(CatalogRow::new(format!("{family}/{preset}"), &cfg, formats, (*about).into()))
        })
        .collect()
}

/// The catalog row of the model folder `dir` (loads it, so a broken folder is an error that
/// names it).
pub fn folder_row(dir: &Path) -> Result<CatalogRow> {
    let model =
        Model::load(dir).map_err(|e| Error::Arg(format!("--model {}: cannot load the model: {e}", dir.display())))?;
    let summary = ModelSummary::of(&model);
    Ok(CatalogRow::new(folder_id(dir), model.config(), quant_summary(&summary), dir.display().to_string()))
}

/// A model folder's id: its file name (of the canonical path, so `.` and `dir/` work).
pub fn folder_id(dir: &Path) -> String {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| PathBuf::from(dir));
    canonical.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// The main format ([`super::quant_word`]) and the roles stored differently, e.g.
/// `affine4g64 (router affine8g64)`.
pub fn quant_summary(m: &ModelSummary) -> String {
    let Some(main) = super::quant_word(m) else {
        return m.quant_line();
    };
    let others: Vec<String> = ["attention", "experts", "router", "dense_mlp", "embed", "lm_head"]
        .iter()
        .filter_map(|role| m.quant.get(*role).filter(|f| **f != main).map(|f| format!("{role} {f}")))
        .collect();
    if others.is_empty() { main } else { format!("{main} ({})", others.join(", ")) }
}

/// The catalog as text: a table (presets, then `models` in order), each row's description,
/// and how parameters are counted.
pub fn catalog(models: &[PathBuf]) -> Result<String> {
    let mut rows = preset_rows()?;
    for dir in models {
        rows.push(folder_row(dir)?);
    }
    Ok(render(&rows))
}

/// Renders catalog rows (see [`catalog`]).
pub fn render(rows: &[CatalogRow]) -> String {
    let table = Table {
        headers: vec!["model", "family", "params", "active/token", "quant", "default patterns", "excluded patterns"],
        right: vec![false, false, true, true, false, false, false],
        rows: rows
            .iter()
            .map(|r| {
                let excluded: Vec<String> = r.excluded_patterns.iter().map(|(p, why)| format!("{p} ({why})")).collect();
                vec![
                    one_line(&r.name),
                    one_line(&r.family),
                    fmt_params(r.params),
                    fmt_params(r.active),
                    one_line(&r.quant),
                    if r.default_patterns.is_empty() { "-".into() } else { r.default_patterns.join(",") },
                    if excluded.is_empty() { "-".into() } else { one_line(&excluded.join("; ")) },
                ]
            })
            .collect(),
    };
    let mut out = table.render();
    out.push('\n');
    for r in rows {
        out += &format!("{}: {}\n", one_line(&r.name), one_line(&r.about));
    }
    out += "\nparams: every weight element of the config's shapes (quantized weights count once each, \
            scales not); active/token: attention, norms, router, the top-k experts, dense MLPs, \
            one embedding row and the head.\n\
            run a preset with `zmoe matrix run --preset NAME` (or --all), a folder with --model DIR.\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> ModelConfig {
        let json = synth::preset_config("qwen3_moe", name).unwrap();
        ModelConfig::parse(&json.to_string(), Path::new("config.json")).unwrap()
    }

    /// MLA presets: the total equals the element count of a synthesised bf16 checkpoint
    /// (an independent count: the tensors actually written).
    #[test]
    fn mla_totals_equal_checkpoint_elements() {
        use crate::checkpoint::synth::{SynthSpec, write};
        let tmp = tempfile::tempdir().unwrap();
        for (family, preset) in
            [("glm4_moe_lite", "glm-tiny"), ("deepseek_v3", "deepseek-tiny"), ("lfm2_moe", "lfm2-tiny")]
        {
            let out = tmp.path().join(preset);
            let spec = SynthSpec {
                family: family.into(),
                preset: preset.into(),
                quant: SynthQuant::Bf16,
                group_size: 64,
                seed: 1,
                max_shard_bytes: synth::SHARD_BYTES,
            };
            write(&spec, &out, false).unwrap();
            let ck = crate::checkpoint::Checkpoint::open(&out).unwrap();
            let elems: u64 = ck.names().map(|n| ck.tensor(n).unwrap().shape.iter().product::<usize>() as u64).sum();
            assert_eq!(param_counts(&ck.config).0, elems, "{family}/{preset}");
        }
        let json = synth::preset_config("glm4_moe_lite", "glm-4.7-flash").unwrap();
        let (total, active) = param_counts(&ModelConfig::parse(&json.to_string(), Path::new("c")).unwrap());
        assert!((29.5e9..30.5e9).contains(&(total as f64)) && (3.0e9..4.0e9).contains(&(active as f64)));
        // LFM2-8B-A1B: 8.3B total, 1.5B active (Liquid AI's model card).
        let json = synth::preset_config("lfm2_moe", "lfm2-8b-a1b").unwrap();
        let (total, active) = param_counts(&ModelConfig::parse(&json.to_string(), Path::new("c")).unwrap());
        assert!(
            (8.2e9..8.5e9).contains(&(total as f64)) && (1.4e9..1.6e9).contains(&(active as f64)),
            "{total} {active}"
        );
        // LFM2-24B-A2B: 24B total, 2.3B active (model card; our assumed dense width and layout).
        let json = synth::preset_config("lfm2_moe", "lfm2-24b-a2b").unwrap();
        let (total, active) = param_counts(&ModelConfig::parse(&json.to_string(), Path::new("c")).unwrap());
        assert!(
            (23.0e9..25.0e9).contains(&(total as f64)) && (2.1e9..2.5e9).contains(&(active as f64)),
            "{total} {active}"
        );
    }

    #[test]
    fn tiny_counts_by_hand() {
        // V 1024, H 256, 4 layers (layer 0 dense), 8 q heads / 2 kv heads of 32,
        // 16 experts top-4 of width 128, dense width 512, untied head.
        let attention = 256 * 256 + 2 * 256 * 64 + 256 * 256; // 163_840
        let norms = 2 * 256 + 2 * 32; // 576
        let router = 16 * 256; // 4_096
        let expert = 3 * 256 * 128; // 98_304
        let dense = 3 * 256 * 512; // 393_216
        let table = 1024 * 256; // 262_144
        let total = 4 * (attention + norms) + 3 * (router + 16 * expert) + dense + 2 * table + 256;
        let active = 4 * (attention + norms) + 3 * (router + 4 * expert) + dense + 256 + table + 256;
        assert_eq!((total, active), (6_306_304, 2_505_472));
        assert_eq!(param_counts(&preset("tiny")), (total, active));
    }

    #[test]
    fn qwen3_30b_a3b_counts() {
        let (total, active) = param_counts(&preset("qwen3-30b-a3b"));
        // 48 layers × (attention 18_874_368 + norms 4_352 + router 262_144 + 128 experts of
        // 4_718_592) + embedding and head 151_936 × 2048 each + final norm.
        assert_eq!(total, 48 * (18_874_368 + 4_352 + 262_144 + 128 * 4_718_592) + 2 * 311_164_928 + 2048);
        assert_eq!(total, 30_532_122_624, "Qwen3-30B-A3B: 30.5B total");
        // 8 experts active; one embedding row, the whole head.
        assert_eq!(active, 48 * (18_874_368 + 4_352 + 262_144 + 8 * 4_718_592) + 2048 + 311_164_928 + 2048);
        assert_eq!(active, 3_041_869_824);
        // The model card's 3.3B counts the whole embedding table.
        let card = active + 311_164_928 - 2048;
        assert!((3.3e9..3.4e9).contains(&(card as f64)), "{card}");
        assert_eq!((fmt_params(total), fmt_params(active)), ("30.53B".into(), "3.04B".into()));
    }

    #[test]
    fn tied_head_and_attention_bias() {
        let mut c = preset("tiny");
        let (t0, a0) = param_counts(&c);
        c.tie_word_embeddings = true;
        assert_eq!(param_counts(&c), (t0 - 262_144, a0 - 256));
        c.attention_bias = true;
        let bias = 4 * (256 + 2 * 64 + 256);
        assert_eq!(param_counts(&c), (t0 - 262_144 + bias, a0 - 256 + bias));
    }

    #[test]
    fn preset_rows_follow_the_synth_table() {
        let rows = preset_rows().unwrap();
        assert_eq!(rows.len(), synth::PRESETS.len());
        assert_eq!(rows[0].name, "qwen3_moe/tiny");
        assert_eq!(rows[0].quant, "bf16|affine4|affine8");
        assert!(rows[0].default_patterns.contains(&"moe_mlp".to_string()));
        let text = render(&rows);
        let row = text.lines().find(|l| l.starts_with("qwen3_moe/qwen3-30b-a3b")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[..4], ["qwen3_moe/qwen3-30b-a3b", "qwen3_moe", "30.53B", "3.04B"], "{text}");
        let glm = text.lines().find(|l| l.starts_with("glm4_moe_lite/glm-4.7-flash")).unwrap();
        assert!(glm.contains("shared_expert"), "{text}");
        assert_eq!(fmt_params(950), "950");
        assert_eq!(fmt_params(6_306_304), "6.31M");
    }
}
