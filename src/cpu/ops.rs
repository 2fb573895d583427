//! f32 reference ops on plain slices. Each is the textbook formula of model-spec §1–2 with
//! a fixed reduction order; shapes are in the doc comments.

use rayon::prelude::*;

use crate::checkpoint::Mat;
use crate::checkpoint::mat::dot;
use crate::config::ModelConfig;
use crate::model::Linear;
use crate::sample::softmax;

/// Row-wise RMSNorm: `out = x · rsqrt(mean(x²) + eps) ⊙ w`; rows of width `w.len()`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let inv = 1.0 / (dot(xr, xr) / n as f32 + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = wv * (xv * inv);
        }
    }
}

/// RMSNorm of the first `w.len()` columns of each row of `x` (rows of width `stride`):
/// `out` rows have width `stride` when `out.len() == x.len()` (the rest of each row is copied
/// through), else width `w.len()`.
pub fn rms_norm_prefix(x: &[f32], stride: usize, w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    let ostride = if out.len() == x.len() { stride } else { n };
    for (xr, or) in x.chunks_exact(stride).zip(out.chunks_exact_mut(ostride)) {
        rms_norm(&xr[..n], w, eps, &mut or[..n]);
    }
}

/// `out[t] = W x[t] (+ b)`: x `[T, in]`, out `[T, out]`.
pub fn linear(l: &Linear, x: &[f32], t: usize, out: &mut [f32]) {
    l.w.matmul(x, t, out);
    if let Some(b) = &l.b {
        for row in out.chunks_exact_mut(b.len()) {
            for (o, bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
}

/// SiLU in f32.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rotary embedding: the config's frequency table and pairing (model-spec §1.3).
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[d_rot/2]` (default: `1 / θ^(2i/d_rot)`; YaRN-blended when scaled).
    inv_freq: Vec<f32>,
    /// Pairs `(x[2i], x[2i+1])` instead of `(x[i], x[i + d_rot/2])`.
    interleaved: bool,
    /// cos/sin multiplier (YaRN attention factor).
    scaling: f32,
}

impl Rope {
    /// Frequencies from the config.
    pub fn new(cfg: &ModelConfig) -> Rope {
        Rope {
            inv_freq: cfg.rope.inv_freq.clone(),
            interleaved: cfg.rope.interleaved,
            scaling: cfg.rope.attention_scaling,
        }
    }

    /// `(cos, sin)` of every frequency at position `p`, times the attention scaling.
    fn angles(&self, p: usize) -> Vec<(f32, f32)> {
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = p as f32 * f;
                (a.cos() * self.scaling, a.sin() * self.scaling)
            })
            .collect()
    }

    /// Rotates the `d_rot` dims at offset `off` of each of the `heads` chunks (width
    /// `stride`) of every row of `x` (`[T, heads·stride]`), row `t` at position `pos[t]`,
    /// with the configured pairing. Interleaved pairs are rotated in place (`x[2i]`,
    /// `x[2i+1]` stay where they are: an output permutation shared by q and k leaves
    /// attention unchanged, model-spec §1.3).
    pub fn apply(&self, x: &mut [f32], heads: usize, stride: usize, off: usize, pos: &[usize]) {
        for (row, &p) in x.chunks_exact_mut(heads * stride).zip(pos) {
            let cs = self.angles(p);
            for chunk in row.chunks_exact_mut(stride) {
                let v = &mut chunk[off..off + 2 * cs.len()];
                let half = cs.len();
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (ia, ib) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (a, b) = (v[ia], v[ib]);
                    v[ia] = a * c - b * s;
                    v[ib] = b * c + a * s;
                }
            }
        }
    }
}

/// Causal GQA attention for `T` queries, query `t` at position `pos[t]` over its own
/// sequence's cache `kc[t]`/`vc[t]` (`[S, nKV·D]`, already holding keys `0..=pos[t]`):
/// q `[T, nH·D]`, out `[T, nH·D]`. Query head h uses KV head h / (nH / nKV); scale D^-1/2;
/// f32 softmax. Each row's result depends only on its own query and cache.
pub fn attention(q: &[f32], kc: &[&[f32]], vc: &[&[f32]], pos: &[usize], c: &ModelConfig, out: &mut [f32]) {
    attention_with(q, kc, vc, pos, c, None, None, out)
}

/// [`attention`] with GPT-OSS's two additions (model-spec §5.5): a sliding `window` (query
/// at position t sees keys `t − W < s ≤ t`, W keys including itself) and per-head `sinks`
/// `[nH]`: one extra logit per head in the softmax denominator whose probability is
/// dropped, `p_s = exp(z_s) / (exp(sink_h) + Σ exp(z_s'))`.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    q: &[f32],
    kc: &[&[f32]],
    vc: &[&[f32]],
    pos: &[usize],
    c: &ModelConfig,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let rep = nh / nkv;
    let scale = c.attn_scale();
    out.par_chunks_mut(d).enumerate().for_each(|(th, o)| {
        let (t, h) = (th / nh, th % nh);
        let qh = &q[th * d..(th + 1) * d];
        let kvh = h / rep;
        let (kc, vc) = (kc[t], vc[t]);
        let n_keys = pos[t] + 1; // causal: keys 0..=pos
        let first = window.map_or(0, |w| n_keys.saturating_sub(w));
        let key = |s: usize| &kc[(s * nkv + kvh) * d..][..d];
        let mut scores: Vec<f32> = (first..n_keys).map(|s| dot(qh, key(s)) * scale).collect();
        match sinks {
            Some(sk) => softmax_with_sink(&mut scores, sk[h]),
            None => softmax(&mut scores),
        }
        o.fill(0.0);
        for (s, &p) in (first..n_keys).zip(&scores) {
            for (ov, &vv) in o.iter_mut().zip(&vc[(s * nkv + kvh) * d..][..d]) {
                *ov += p * vv;
            }
        }
    });
}

/// Softmax over `x` plus one extra logit `sink` whose probability is dropped (the result
/// sums to less than one).
pub fn softmax_with_sink(x: &mut [f32], sink: f32) {
    let m = x.iter().copied().fold(sink, f32::max);
    let mut sum = (sink - m).exp();
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Causal MLA attention in the absorbed form (model-spec §3.4) for `T` queries, query `t` at
/// position `pos[t]` over its own sequence's latent cache `caches[t]` (already holding it).
/// qlat `[T, nH·L]` (`W_UKᵀ q_nope` per head), q `[T, nH·Dqk]` (its rope slice is read),
/// cache `[S, L + R]` (latent `c_s` | roped `k_pe_s`), out `[T, nH·L]` = `Σ_s p_s c_s`.
/// Score = `(qlat·c_s + q_pe·k_pe_s) · scale`, f32 softmax.
pub fn mla_attention(qlat: &[f32], q: &[f32], caches: &[&[f32]], pos: &[usize], c: &ModelConfig, out: &mut [f32]) {
    let m = c.mla.as_ref().expect("MLA config");
    let (nh, d, l, r) = (c.num_heads, c.head_dim, m.kv_lora_rank, m.qk_rope_head_dim);
    let row = l + r;
    let scale = c.attn_scale();
    out.par_chunks_mut(l).enumerate().for_each(|(th, o)| {
        let t = th / nh;
        let ql = &qlat[th * l..][..l];
        let qpe = &q[th * d + m.qk_nope_head_dim..][..r];
        let cache = caches[t];
        let n_keys = pos[t] + 1;
        let mut scores: Vec<f32> = (0..n_keys)
            .map(|s| {
                let kv = &cache[s * row..][..row];
                (dot(ql, &kv[..l]) + dot(qpe, &kv[l..])) * scale
            })
            .collect();
        softmax(&mut scores);
        o.fill(0.0);
        for (s, &p) in scores.iter().enumerate() {
            for (ov, &cv) in o.iter_mut().zip(&cache[s * row..][..l]) {
                *ov += p * cv;
            }
        }
    });
}

/// Causal MLA attention as transformers computes it: every cached latent is expanded to
/// per-head `k_nope = W_UK c_s` and `v = W_UV c_s` (`W_UK[h] = embed_q[h]ᵀ`), keys are
/// `[k_nope | k_pe]`. q `[T, nH·Dqk]`, query `t` at position `pos[t]` over its own
/// sequence's cache `caches[t]` (`[S, L + R]`), out `[T, nH·Dv]`.
pub fn mla_attention_expanded(
    q: &[f32],
    caches: &[&[f32]],
    pos: &[usize],
    w: &crate::model::MlaWeights,
    c: &ModelConfig,
    out: &mut [f32],
) {
    let m = c.mla.as_ref().expect("MLA config");
    let (nh, d, dv, l, nope) = (c.num_heads, c.head_dim, c.v_head_dim, m.kv_lora_rank, m.qk_nope_head_dim);
    let row = l + m.qk_rope_head_dim;
    let scale = c.attn_scale();
    // Per head: W_UK [nope, L] (row-major) and W_UV [Dv, L].
    let wuk: Vec<Vec<f32>> = w.embed_q.iter().map(|e| e.transposed_f32().to_f32()).collect();
    let wuv: Vec<Vec<f32>> = w.unembed_out.iter().map(|u| u.to_f32()).collect();
    out.par_chunks_mut(dv).enumerate().for_each(|(th, o)| {
        let (t, h) = (th / nh, th % nh);
        let qh = &q[th * d..][..d];
        let cache = caches[t];
        let n_keys = (pos[t] + 1).min(cache.len() / row);
        let mut v_all = vec![0.0; n_keys * dv];
        let mut scores = Vec::with_capacity(n_keys);
        for s in 0..n_keys {
            let (lat, kpe) = cache[s * row..][..row].split_at(l);
            let k_nope: Vec<f32> = wuk[h].chunks_exact(l).map(|r| dot(r, lat)).collect();
            for (vv, r) in v_all[s * dv..][..dv].iter_mut().zip(wuv[h].chunks_exact(l)) {
                *vv = dot(r, lat);
            }
            scores.push((dot(&qh[..nope], &k_nope) + dot(&qh[nope..], kpe)) * scale);
        }
        softmax(&mut scores);
        o.fill(0.0);
        for (s, &p) in scores.iter().enumerate() {
            for (ov, &vv) in o.iter_mut().zip(&v_all[s * dv..][..dv]) {
                *ov += p * vv;
            }
        }
    });
}

/// Indices of the `k` largest values, largest first; among equal values the lowest index
/// wins (CUDA `torch.topk` set membership, model-spec §1.7).
pub fn topk(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Qwen3-MoE router (model-spec §2.5): softmax over all E experts in f32, top-k, optional
/// renormalisation. logits `[T, E]` → (indices `[T, K]`, weights `[T, K]`).
pub fn softmax_topk(logits: &[f32], e: usize, k: usize, norm: bool) -> (Vec<usize>, Vec<f32>) {
    let (mut idx, mut w) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(e) {
        let mut p = row.to_vec();
        softmax(&mut p);
        let sel = topk(&p, k);
        let mut vals: Vec<f32> = sel.iter().map(|&i| p[i]).collect();
        if norm {
            let s: f32 = vals.iter().sum();
            vals.iter_mut().for_each(|v| *v /= s);
        }
        idx.extend(sel);
        w.extend(vals);
    }
    (idx, w)
}

/// GPT-OSS router (model-spec §5.5 step 7): top-k on the logits `[T, E]` (lowest index
/// wins ties), then softmax over the k selected logits. Returns (indices, weights) `[T, K]`.
pub fn topk_softmax(logits: &[f32], e: usize, k: usize) -> (Vec<usize>, Vec<f32>) {
    let (mut idx, mut w) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(e) {
        let sel = topk(row, k);
        let mut vals: Vec<f32> = sel.iter().map(|&i| row[i]).collect();
        softmax(&mut vals);
        idx.extend(sel);
        w.extend(vals);
    }
    (idx, w)
}

/// GPT-OSS's clamped SwiGLU of one element (model-spec §5.5 step 8):
/// `(clamp(u, −L, L) + 1) · g · σ(α·g)` with `g = min(g, L)`.
pub fn clamp_swiglu(g: f32, u: f32, limit: f32, alpha: f32) -> f32 {
    let g = g.min(limit);
    let u = u.clamp(-limit, limit);
    (u + 1.0) * (g / (1.0 + (-alpha * g).exp()))
}

/// Adds expert `choice[r]`'s bias row (`bias [E, width]`) to row `r` of `out` `[rows, width]`.
pub fn add_expert_bias(choice: &[usize], bias: &[f32], out: &mut [f32]) {
    if choice.is_empty() {
        return;
    }
    let width = out.len() / choice.len();
    for (row, &e) in out.chunks_exact_mut(width).zip(choice) {
        for (o, b) in row.iter_mut().zip(&bias[e * width..][..width]) {
            *o += b;
        }
    }
}

/// GLM / DeepSeek router (model-spec §3.6) on f32 logits `[T, E]`: `s = sigmoid(logits)`;
/// selection on `s + bias`, restricted to the `topk_group` groups with the largest sum of
/// their two best biased scores (lowest group index wins ties), top-k with the lowest index
/// winning ties; weights = the unbiased `s` of the chosen experts, divided by their sum
/// (+1e-20) when `norm`, times `routed_scaling_factor`. Returns (indices, weights) `[T, K]`.
pub fn sigmoid_topk(
    logits: &[f32],
    bias: &[f32],
    k: usize,
    norm: bool,
    kind: crate::config::RouterKind,
) -> (Vec<usize>, Vec<f32>) {
    let crate::config::RouterKind::SigmoidGrouped { n_group, topk_group, routed_scaling_factor } = kind else {
        panic!("sigmoid_topk needs a sigmoid router config")
    };
    let e = bias.len();
    let per = e / n_group;
    let (mut idx, mut w) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(e) {
        let s: Vec<f32> = row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
        let mut choice: Vec<f32> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
        if n_group > 1 {
            let group_score: Vec<f32> = choice
                .chunks_exact(per)
                .map(|g| {
                    let best = topk(g, 2);
                    g[best[0]] + g[best[1]]
                })
                .collect();
            let keep = topk(&group_score, topk_group);
            for (g, chunk) in choice.chunks_exact_mut(per).enumerate() {
                if !keep.contains(&g) {
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        let sel = topk(&choice, k);
        let mut vals: Vec<f32> = sel.iter().map(|&i| s[i]).collect();
        if norm {
            let sum: f32 = vals.iter().sum::<f32>() + 1e-20;
            vals.iter_mut().for_each(|v| *v /= sum);
        }
        vals.iter_mut().for_each(|v| *v *= routed_scaling_factor);
        idx.extend(sel);
        w.extend(vals);
    }
    (idx, w)
}

/// Per-row experts: row `r` of `out` (one per entry of `choice`) is
/// `mats[choice[r]] · x[r / per]`, where `per` = rows of `out` per row of `x` (`K` for
/// gate/up reading H, `1` for down reading Act). Rows are grouped by expert so each
/// expert's weights are dequantized once per call (prefill reads each expert once, not per
/// token); results do not depend on the grouping.
pub fn grouped_experts(choice: &[usize], per: usize, x: &[f32], mats: &[Mat], out: &mut [f32]) {
    let (cols, rows) = (mats[0].cols, mats[0].rows);
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); mats.len()];
    for (r, &e) in choice.iter().enumerate() {
        by_expert[e].push(r);
    }
    let results: Vec<(Vec<usize>, Vec<f32>)> = by_expert
        .into_par_iter()
        .enumerate()
        .filter(|(_, rs)| !rs.is_empty())
        .map(|(e, rs)| {
            let xs: Vec<f32> = rs.iter().flat_map(|&r| x[(r / per) * cols..][..cols].iter().copied()).collect();
            let mut y = vec![0.0; rs.len() * rows];
            mats[e].matmul(&xs, rs.len(), &mut y);
            (rs, y)
        })
        .collect();
    for (rs, y) in results {
        for (i, r) in rs.into_iter().enumerate() {
            out[r * rows..(r + 1) * rows].copy_from_slice(&y[i * rows..(i + 1) * rows]);
        }
    }
}

/// Weighted combine: `out[t] = Σ_j w[t,j] · y[t·K+j]` accumulated in f32 in slot order.
/// y `[T·K, H]`, w `[T, K]`, out `[T, H]`.
pub fn combine(y: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let h = out.len() / (w.len() / k);
    for (t, o) in out.chunks_exact_mut(h).enumerate() {
        o.fill(0.0);
        for j in 0..k {
            let wj = w[t * k + j];
            for (ov, &yv) in o.iter_mut().zip(&y[(t * k + j) * h..][..h]) {
                *ov += wj * yv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_lowest_index_wins_ties() {
        let x = [0.1, 0.5, 0.3, 0.5, 0.3, 0.5];
        assert_eq!(topk(&x, 2), vec![1, 3]);
        assert_eq!(topk(&x, 4), vec![1, 3, 5, 2]);
    }

    #[test]
    fn gpt_oss_router_and_activation() {
        // Top-k on logits, softmax over the k: ties go to the lowest index.
        let (i, w) = topk_softmax(&[0.5, 2.0, -1.0, 2.0, 1.0], 5, 3);
        assert_eq!(i, vec![1, 3, 4]);
        let z = 1.0 + 1.0 + (-1f32).exp();
        assert!((w[0] - 1.0 / z).abs() < 1e-6 && (w[2] - (-1f32).exp() / z).abs() < 1e-6);
        // Gate clamped from above only, up to ±limit, +1 on the linear branch.
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((clamp_swiglu(9.0, 0.3, 7.0, 1.702) - 1.3 * 7.0 * sig(1.702 * 7.0)).abs() < 1e-5);
        assert!((clamp_swiglu(-9.0, -8.0, 7.0, 1.702) - (-6.0) * (-9.0) * sig(-1.702 * 9.0)).abs() < 1e-6);
    }

    #[test]
    fn sink_softmax_is_the_closed_form() {
        let mut x = [0.3f32, -1.2, 2.5];
        let sink = 1.7f32;
        softmax_with_sink(&mut x, sink);
        let denom = sink.exp() + 0.3f32.exp() + (-1.2f32).exp() + 2.5f32.exp();
        for (p, z) in x.iter().zip([0.3f32, -1.2, 2.5]) {
            assert!((p - z.exp() / denom).abs() < 1e-6);
        }
        assert!(x.iter().sum::<f32>() < 1.0);
    }

    #[test]
    fn router_renormalises() {
        let logits = [1.0, 2.0, 3.0, 0.5];
        let (i, w) = softmax_topk(&logits, 4, 2, true);
        assert_eq!(i, vec![2, 1]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        let (_, w2) = softmax_topk(&logits, 4, 2, false);
        assert!(w2[0] + w2[1] < 1.0 && w2[0] > w2[1]);
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let cfg = crate::config::ModelConfig::parse(
            r#"{"model_type":"qwen3_moe","vocab_size":8,"hidden_size":8,"num_hidden_layers":1,
               "num_attention_heads":2,"head_dim":8,"intermediate_size":8}"#,
            std::path::Path::new("c"),
        )
        .unwrap();
        let rope = Rope::new(&cfg);
        let x0: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = x0.clone();
        rope.apply(&mut x, 2, 8, 0, &[0, 1]);
        assert_eq!(&x[..16], &x0[..16]); // position 0: no rotation
        for (a, b) in x.chunks(8).zip(x0.chunks(8)) {
            let (na, nb) = (dot(a, a), dot(b, b));
            assert!((na - nb).abs() < 1e-4);
        }
    }
}
