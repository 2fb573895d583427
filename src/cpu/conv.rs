//! LFM2's gated short convolution (model-spec §4.4, §4.6) on plain slices.
//!
//! Why a state of `L − 1` gated inputs and not of hidden states: the convolution is
//! depthwise and causal over `u = B ⊙ X`, so the last `L − 1` values of `u` per channel are
//! all the next token needs. Prefill and decode run the same loop: the state is the left
//! context of the chunk (zeros on a fresh sequence) and is moved on by the chunk, so a prompt
//! split into chunks gives the same result as one prefill.

/// `out[t] = C_t ⊙ (Σ_k w[·,k] · u_{t−(L−1)+k} + bias)` with `u = B ⊙ X` for the `T` rows of
/// `bcx` (`[T, 3H]`: B | C | X), where `u` before the chunk comes from `state` (`[L−1, H]`,
/// oldest first). `kernel` is `[H, L]` (`w[c·L + k]`, `k = L − 1` the current token). Leaves
/// the last `L − 1` values of `u` (state, then this chunk) in `state`. out `[T, H]`.
pub fn short_conv(bcx: &[f32], h: usize, kernel: &[f32], bias: Option<&[f32]>, state: &mut [f32], out: &mut [f32]) {
    let l = kernel.len() / h;
    let s = l - 1;
    let t = bcx.len() / (3 * h);
    debug_assert_eq!(state.len(), s * h);
    // u over [state ; chunk]: [S + T, H].
    let mut u = Vec::with_capacity((s + t) * h);
    u.extend_from_slice(state);
    for row in bcx.chunks_exact(3 * h) {
        let (b, x) = (&row[..h], &row[2 * h..]);
        u.extend(b.iter().zip(x).map(|(b, x)| b * x));
    }
    for (i, (row, o)) in bcx.chunks_exact(3 * h).zip(out.chunks_exact_mut(h)).enumerate() {
        let c = &row[h..2 * h];
        for ch in 0..h {
            let w = &kernel[ch * l..(ch + 1) * l];
            let mut y = bias.map_or(0.0, |b| b[ch]);
            for (k, wk) in w.iter().enumerate() {
                y += wk * u[(i + k) * h + ch];
            }
            o[ch] = c[ch] * y;
        }
    }
    state.copy_from_slice(&u[t * h..]);
}

/// LFM2 router (model-spec §4.5) on f32 logits `[T, E]`: `s = sigmoid(logits)`; selection
/// on `s + bias` (or `s` without a bias), top-k with the lowest index winning ties; weights =
/// the unbiased `s` of the chosen experts, divided by their sum + 1e-6 when `norm`, times
/// `scale`. Returns (indices, weights) `[T, K]`.
pub fn sigmoid_bias_topk(
    logits: &[f32],
    e: usize,
    bias: Option<&[f32]>,
    k: usize,
    norm: bool,
    scale: f32,
) -> (Vec<usize>, Vec<f32>) {
    let (mut idx, mut w) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(e) {
        let s: Vec<f32> = row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
        let choice: Vec<f32> = match bias {
            Some(b) => s.iter().zip(b).map(|(a, b)| a + b).collect(),
            None => s.clone(),
        };
        let sel = super::ops::topk(&choice, k);
        let mut vals: Vec<f32> = sel.iter().map(|&i| s[i]).collect();
        if norm {
            let sum: f32 = vals.iter().sum::<f32>() + 1e-6;
            vals.iter_mut().for_each(|v| *v /= sum);
        }
        vals.iter_mut().for_each(|v| *v *= scale);
        idx.extend(sel);
        w.extend(vals);
    }
    (idx, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook formula, position by position over the whole sequence.
    fn direct(bcx: &[f32], h: usize, kernel: &[f32]) -> Vec<f32> {
        let l = kernel.len() / h;
        let t = bcx.len() / (3 * h);
        let u = |i: isize, c: usize| {
            if i < 0 { 0.0 } else { bcx[i as usize * 3 * h + c] * bcx[i as usize * 3 * h + 2 * h + c] }
        };
        let mut out = vec![0.0; t * h];
        for i in 0..t {
            for c in 0..h {
                let y: f32 = (0..l).map(|k| kernel[c * l + k] * u(i as isize - (l - 1 - k) as isize, c)).sum();
                out[i * h + c] = bcx[i * 3 * h + h + c] * y;
            }
        }
        out
    }

    #[test]
    fn chunked_equals_whole_and_the_formula() {
        let (h, t) = (5, 9);
        let mut r = crate::rng::Rng::for_stream(3, "conv");
        let bcx: Vec<f32> = (0..t * 3 * h).map(|_| r.normal()).collect();
        for l in [1, 2, 3, 4] {
            let kernel: Vec<f32> = (0..h * l).map(|_| r.normal()).collect();
            let want = direct(&bcx, h, &kernel);
            for chunks in [vec![9], vec![1; 9], vec![2, 1, 4, 2], vec![4, 5]] {
                let mut state = vec![0.0; (l - 1) * h];
                let mut got = Vec::new();
                let mut at = 0;
                for n in chunks {
                    let mut out = vec![0.0; n * h];
                    short_conv(&bcx[at * 3 * h..(at + n) * 3 * h], h, &kernel, None, &mut state, &mut out);
                    got.extend(out);
                    at += n;
                }
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-5, "L {l}: max |Δ| {worst}");
            }
        }
    }

    #[test]
    fn router_bias_selects_but_does_not_weight() {
        // Expert 2 has the lowest score but a bias that lifts it into the top 2.
        let logits = [1.0, 0.5, -1.0, 0.0];
        let bias = [0.0, 0.0, 0.9, 0.0];
        let (i, w) = sigmoid_bias_topk(&logits, 4, Some(&bias), 2, true, 1.0);
        assert_eq!(i, vec![2, 0]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let sum = s(-1.0) + s(1.0) + 1e-6;
        assert!((w[0] - s(-1.0) / sum).abs() < 1e-6 && (w[1] - s(1.0) / sum).abs() < 1e-6, "{w:?}");
        let (i, w) = sigmoid_bias_topk(&logits, 4, None, 2, false, 2.0);
        assert_eq!(i, vec![0, 1]);
        assert!((w[0] - 2.0 * s(1.0)).abs() < 1e-6);
    }
}
