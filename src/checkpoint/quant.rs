//! MLX weight formats (model-spec §6): affine k-bit and MXFP4, bit for bit.
//!
//! These functions are the single definition of what a stored weight *means*. The CPU
//! reference dequantizes through them and the GPU kernels are checked against them. The
//! quantizers exist to produce test data and synthetic checkpoints; MLX's exact rounding
//! of the quantizer is reproduced, but nothing depends on it.

use half::bf16;

/// Number of `u32` words that hold one row of `cols` elements at `bits` bits.
pub fn packed_words(cols: usize, bits: u32) -> usize {
    cols * bits as usize / 32
}

/// Packs unsigned codes (`< 2^bits`) into MLX's little-endian, LSB-first bit stream.
/// `codes.len() * bits` must be a multiple of 32.
pub fn pack_bits(codes: &[u8], bits: u32) -> Vec<u32> {
    let mut out = vec![0u32; packed_words(codes.len(), bits)];
    for (j, &c) in codes.iter().enumerate() {
        let off = j * bits as usize;
        let (w, s) = (off / 32, off % 32);
        out[w] |= (c as u32) << s;
        if s + bits as usize > 32 {
            out[w + 1] |= (c as u32) >> (32 - s);
        }
    }
    out
}

/// Reads code `j` from a packed row given as little-endian bytes.
#[inline]
pub fn unpack_code(row: &[u8], j: usize, bits: u32) -> u32 {
    let off = j * bits as usize;
    let (byte, s) = (off / 8, off % 8);
    // A code spans at most 2 bytes for bits ≤ 8 plus the shift: read up to 2 bytes.
    let lo = row[byte] as u32;
    let hi = if s + bits as usize > 8 { row[byte + 1] as u32 } else { 0 };
    ((lo | (hi << 8)) >> s) & ((1u32 << bits) - 1)
}

/// Dequantizes one affine row: `w[j] = scale[g] · q[j] + bias[g]` with g = j / group.
/// `row` is the packed row as bytes; `scales`/`biases` are this row's groups.
pub fn affine_dequant_row(row: &[u8], bits: u32, group: usize, scales: &[f32], biases: &[f32], out: &mut [f32]) {
    match bits {
        4 => {
            for (j, pair) in out.chunks_exact_mut(2).enumerate() {
                let b = row[j];
                let g = 2 * j / group;
                pair[0] = scales[g] * (b & 0xF) as f32 + biases[g];
                pair[1] = scales[g] * (b >> 4) as f32 + biases[g];
            }
        }
        8 => {
            for (j, o) in out.iter_mut().enumerate() {
                let g = j / group;
                *o = scales[g] * row[j] as f32 + biases[g];
            }
        }
        _ => {
            for (j, o) in out.iter_mut().enumerate() {
                let g = j / group;
                *o = scales[g] * unpack_code(row, j, bits) as f32 + biases[g];
            }
        }
    }
}

/// The result of [`affine_quantize`]: packed rows plus per-group scales and biases (already
/// rounded to bf16, as MLX stores them for a bf16 model).
#[derive(Debug, Clone)]
pub struct AffineQuantized {
    /// `[rows, cols·bits/32]` packed codes.
    pub packed: Vec<u32>,
    /// `[rows, cols/group]` bf16-representable scales (may be negative).
    pub scales: Vec<f32>,
    /// `[rows, cols/group]` bf16-representable biases.
    pub biases: Vec<f32>,
}

/// MLX's affine quantizer (`mx.quantize(w, group, bits, mode="affine")`) for a row-major
/// `[rows, cols]` matrix; model-spec §6.1 "Quantiser facts". One deliberate difference:
/// codes are rounded against the *stored* (bf16) scale and bias, so dequantization is within
/// half a step of the input even at 8 bits.
pub fn affine_quantize(w: &[f32], cols: usize, bits: u32, group: usize) -> AffineQuantized {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let groups = w.len() / group;
    let mut scales = Vec::with_capacity(groups);
    let mut biases = Vec::with_capacity(groups);
    let mut codes = vec![0u8; w.len()];
    for (g, chunk) in w.chunks_exact(group).enumerate() {
        let max = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = chunk.iter().copied().fold(f32::INFINITY, f32::min);
        let mask = min.abs() > max.abs();
        let mut scale = ((max - min) / n_bins).max(1e-7);
        if !mask {
            scale = -scale;
        }
        let edge = if mask { min } else { max };
        let q0 = (edge / scale).round_ties_even();
        if q0 != 0.0 {
            scale = edge / q0;
        }
        let bias = if q0 == 0.0 { 0.0 } else { edge };
        let (s16, b16) = (round_bf16(scale), round_bf16(bias));
        for (j, &x) in chunk.iter().enumerate() {
            codes[g * group + j] = ((x - b16) / s16).round_ties_even().clamp(0.0, n_bins) as u8;
        }
        scales.push(s16);
        biases.push(b16);
    }
    let packed = codes.chunks_exact(cols).flat_map(|row| pack_bits(row, bits)).collect();
    AffineQuantized { packed, scales, biases }
}

/// Rounds an f32 to the nearest bf16 (ties to even) and back.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// E2M1 (FP4) code → value (model-spec §5.8).
pub const FP4_LUT: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// E8M0 scale byte → `2^(s − 127)`; 255 is NaN in the OCP MX spec.
pub fn e8m0_to_f32(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(1 << 22), // 2^-127 is subnormal in f32
        255 => f32::NAN,
        _ => f32::from_bits((s as u32) << 23),
    }
}

/// Dequantizes one MXFP4 row: byte k holds elements 2k (low nibble) and 2k+1 (high nibble);
/// one E8M0 scale per 32 elements.
pub fn mxfp4_dequant_row(row: &[u8], scales: &[u8], out: &mut [f32]) {
    for (k, pair) in out.chunks_exact_mut(2).enumerate() {
        let s = e8m0_to_f32(scales[2 * k / 32]);
        pair[0] = FP4_LUT[(row[k] & 0xF) as usize] * s;
        pair[1] = FP4_LUT[(row[k] >> 4) as usize] * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn to_bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Pack → dequantize must equal `scale·q + bias` for random codes, scales of both signs
    /// and every bit width / group size, on fresh random data.
    #[test]
    fn affine_pack_dequant_matches_formula() {
        let mut rng = Rng::new(0xA11CE);
        for bits in [2u32, 3, 4, 5, 6, 8] {
            for group in [32usize, 64, 128] {
                let cols = 256;
                let codes: Vec<u8> = (0..cols).map(|_| (rng.next_u64() % (1 << bits)) as u8).collect();
                let scales: Vec<f32> = (0..cols / group).map(|_| round_bf16(rng.normal() * 0.05)).collect();
                assert!(scales.iter().any(|&s| s < 0.0) || cols / group < 3);
                let biases: Vec<f32> = (0..cols / group).map(|_| round_bf16(rng.normal() * 0.1)).collect();
                let packed = to_bytes(&pack_bits(&codes, bits));
                assert_eq!(packed.len(), cols * bits as usize / 8);
                let mut out = vec![f32::NAN; cols];
                affine_dequant_row(&packed, bits, group, &scales, &biases, &mut out);
                for j in 0..cols {
                    let want = scales[j / group] * codes[j] as f32 + biases[j / group];
                    assert_eq!(out[j].to_bits(), want.to_bits(), "bits {bits} group {group} j {j}");
                }
            }
        }
    }

    /// The documented layout: 4-bit element k of a word at bits 4k; 8-bit element k = byte k.
    #[test]
    fn affine_layout_is_lsb_first() {
        let codes: Vec<u8> = (0..8).collect();
        assert_eq!(pack_bits(&codes, 4), vec![0x7654_3210]);
        assert_eq!(pack_bits(&[1, 2, 3, 4], 8), vec![0x0403_0201]);
    }

    /// Quantizing then dequantizing stays within half a step per group, and negative scales
    /// occur (groups whose max magnitude is the max).
    #[test]
    fn affine_quantize_round_trip() {
        let mut rng = Rng::new(7);
        let (rows, cols) = (8, 128);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.02).collect();
        for bits in [4u32, 8] {
            let q = affine_quantize(&w, cols, bits, 32);
            assert!(q.scales.iter().any(|&s| s < 0.0) && q.scales.iter().any(|&s| s > 0.0));
            let bytes = to_bytes(&q.packed);
            let row_bytes = cols * bits as usize / 8;
            for r in 0..rows {
                let mut out = vec![0.0; cols];
                let g = cols / 32;
                affine_dequant_row(
                    &bytes[r * row_bytes..][..row_bytes],
                    bits,
                    32,
                    &q.scales[r * g..][..g],
                    &q.biases[r * g..][..g],
                    &mut out,
                );
                for j in 0..cols {
                    let (sc, b) = (q.scales[r * g + j / 32], q.biases[r * g + j / 32]);
                    let top = b + sc * ((1u32 << bits) - 1) as f32;
                    let (lo, hi) = (b.min(top), b.max(top));
                    let x = w[r * cols + j];
                    // Inside the representable range: half a step. MLX snaps the scale so that
                    // zero is exact, which can clip the far end of a group by up to one step.
                    let tol = if (lo..=hi).contains(&x) { 0.5 } else { 1.5 } * sc.abs() + 1e-6;
                    assert!((out[j] - x).abs() <= tol, "bits {bits} r {r} j {j}: {} vs {x} scale {sc}", out[j]);
                }
            }
        }
    }

    #[test]
    fn mxfp4_dequant() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
        let mut rng = Rng::new(3);
        let row: Vec<u8> = (0..32).map(|_| rng.next_u64() as u8).collect();
        let scales = [120u8, 131];
        let mut out = vec![f32::NAN; 64];
        mxfp4_dequant_row(&row, &scales, &mut out);
        for j in 0..64 {
            let code = if j % 2 == 0 { row[j / 2] & 0xF } else { row[j / 2] >> 4 };
            let want = FP4_LUT[code as usize] * 2f32.powi(scales[j / 32] as i32 - 127);
            assert_eq!(out[j].to_bits(), want.to_bits());
        }
    }
}
