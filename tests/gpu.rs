//! GPU checks (run on a CUDA machine: `scripts/gpu_test.sh`; ignored in CI, which has none).
//!
//! Each kernel is checked against the CPU reference on fresh random data with poisoned
//! outputs; whole models against the CPU within bf16 tolerance; greedy decoding teacher-forced
//! against the CPU with margin-aware agreement; graph replay bit-identical to eager launches.

mod common;

use std::path::PathBuf;

use zmoe::backend::Row;
use zmoe::checkpoint::synth::SynthQuant;
use zmoe::cpu::CpuBackend;
use zmoe::cuda::ops::{self, gpt_oss, linear, moe, norm, rd, sample, wr};
use zmoe::cuda::{CudaBackend, Device};
use zmoe::plan::Plan;
use zmoe::rng::Rng;
use zmoe::{Backend, Model};

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn to_bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_bits(x)).collect()
}

fn from_bf16(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect()
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// matvec of `m` tokens of `x` (bf16 bits) over `w` (`n` rows of `k`), f32 out.
fn run_matvec(dev: &mut Device, w: ops::QMat, x: &[u16], n: usize, k: usize, m: usize) -> Vec<f32> {
    let px = dev.upload(x).unwrap();
    let py = dev.alloc(m * n * 4).unwrap();
    dev.fill(py, 0xFF, m * n * 4).unwrap(); // poison: NaN
    let a =
        linear::MatvecArgs { w, x: rd(px), y: wr(py), bias: rd(0), n: n as i32, k: k as i32, m: m as i32, out_f32: 1 };
    linear::matvec(dev, &a).unwrap();
    let mut got = vec![0f32; m * n];
    dev.read(py, &mut got).unwrap();
    got
}

/// matvec for bf16 / affine4 / affine8 weights and M = 1, 3, 8, 13 token rows, on a short
/// matrix (one row a warp for one token) and a tall one with an odd row count (two rows a
/// warp, the last warp's second row past the end); one token's rows are bit-identical to
/// the multi-token kernel's.
#[test]
#[ignore]
fn kernel_matvec_matches_cpu() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0xC0FFEE);
    let k = 512usize;
    for n in [200usize, linear::TWO_ROWS_FROM + 3] {
        for (fmt, bits) in [(0, 16u32), (1, 4), (1, 8)] {
            let (wq, s, b, wf) = random_qmat(&mut rng, n, k, fmt, bits, 64);
            let w = upload_qmat(&mut dev, (&wq, &s, &b), fmt, bits, 64);
            for m in [1usize, 3, 8, 13] {
                let x: Vec<f32> = (0..m * k).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
                let want: Vec<f32> =
                    (0..m * n).map(|i| (0..k).map(|j| x[(i / n) * k + j] * wf[(i % n) * k + j]).sum()).collect();
                let xb = to_bf16(&x);
                let got = run_matvec(&mut dev, w, &xb, n, k, m);
                let what = format!("n {n} fmt {fmt} bits {bits} m {m}");
                assert!(got.iter().all(|v| v.is_finite()), "{what}: unwritten output");
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "{what}: rel err {e}");
                if m > 1 {
                    let one = run_matvec(&mut dev, w, &xb[..k], n, k, 1);
                    let same = one.iter().zip(&got[..n]).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: the one-token kernel differs from the multi-token kernel's token 0");
                }
            }
        }
    }
}

/// qkv_proj of one token (one row a warp below TWO_ROWS_FROM rows in all, two from there,
/// each matrix's last warp partly past its end) is bit-identical to the three mat-vecs of
/// the multi-token kernel, for affine 4-bit and bf16 weights, with biases.
#[test]
#[ignore]
fn kernel_qkv_one_token_equals_matvecs() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0x9E37);
    let k = 256usize;
    for (nq, nk, nv) in [(96usize, 33usize, 33usize), (linear::TWO_ROWS_FROM - 63, 65, 65)] {
        for (fmt, bits) in [(1, 4u32), (0, 16)] {
            let x: Vec<u16> = to_bf16(&(0..3 * k).map(|_| rng.normal()).collect::<Vec<f32>>());
            let px = dev.upload(&x).unwrap();
            let mut mats = Vec::new();
            for n in [nq, nk, nv] {
                let (wq, s, b, _) = random_qmat(&mut rng, n, k, fmt, bits, 64);
                let w = upload_qmat(&mut dev, (&wq, &s, &b), fmt, bits, 64);
                let bias: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
                let pb = dev.upload(&bias).unwrap();
                let py = dev.alloc(n * 2).unwrap();
                dev.fill(py, 0xFF, n * 2).unwrap(); // poison: NaN
                mats.push((w, pb, py, n));
            }
            let a = linear::QkvArgs {
                wq: mats[0].0,
                wk: mats[1].0,
                wv: mats[2].0,
                qbias: rd(mats[0].1),
                kbias: rd(mats[1].1),
                vbias: rd(mats[2].1),
                x: rd(px),
                q: wr(mats[0].2),
                k: wr(mats[1].2),
                v: wr(mats[2].2),
                nq: nq as i32,
                nk: nk as i32,
                nv: nv as i32,
                kdim: k as i32,
                m: 1,
            };
            linear::qkv(&dev, &a).unwrap();
            for (w, pb, py, n) in mats {
                let mut got = vec![0u16; n];
                dev.read(py, &mut got).unwrap();
                // The reference: the multi-token matvec over 3 tokens, token 0.
                let pr = dev.alloc(3 * n * 2).unwrap();
                let r = linear::MatvecArgs {
                    w,
                    x: rd(px),
                    y: wr(pr),
                    bias: rd(pb),
                    n: n as i32,
                    k: k as i32,
                    m: 3,
                    out_f32: 0,
                };
                linear::matvec(&dev, &r).unwrap();
                let mut want = vec![0u16; 3 * n];
                dev.read(pr, &mut want).unwrap();
                let what = format!("rows {nq}+{nk}+{nv} fmt {fmt}: matrix of {n} rows");
                assert!(from_bf16(&got).iter().all(|v| v.is_finite()), "{what}: unwritten output");
                assert_eq!(got, want[..n], "{what}: qkv differs from matvec");
            }
        }
    }
}

/// The GPU, which must have tensor cores (`mma.sync`: sm_80 and newer).
fn tc_device() -> Device {
    let dev = Device::open().unwrap();
    assert!(dev.arch()[3..].parse::<u32>().unwrap() >= 80, "{}: mma.sync needs sm_80+", dev.name);
    dev
}

/// The f64 reference of one query's attention: softmax of its scaled scores `sc` (one per key)
/// weighting the value rows, `value(key, dim)`, into `out` (one value per dim).
fn softmax_attend_f64(sc: &[f64], value: impl Fn(usize, usize) -> f32, out: &mut [f32]) {
    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
    let den: f64 = p.iter().sum();
    for (i, o) in out.iter_mut().enumerate() {
        let num: f64 = p.iter().enumerate().map(|(j, pj)| pj * value(j, i) as f64).sum();
        *o = (num / den) as f32;
    }
}

/// The split-attention scratch for `rows` (token, head) rows of `width` outputs over `splits`
/// key splits: unnormalised partials, (max, sum) pairs, zeroed tickets.
fn split_scratch(dev: &mut Device, rows: usize, width: usize, splits: usize) -> (u64, u64, u64) {
    let part_o = dev.alloc(rows * splits * width * 4).unwrap();
    let part_ml = dev.alloc(rows * splits * 2 * 4).unwrap();
    (part_o, part_ml, dev.upload(&vec![0i32; rows]).unwrap())
}

/// Reads `want.len()` bf16 values at `ptr` (a poisoned buffer: each must have been written)
/// and checks them against `want` within relative error `tol`; prints the error.
fn check_bf16_out(dev: &Device, ptr: u64, want: &[f32], tol: f64, what: &str) {
    let mut got = vec![0u16; want.len()];
    dev.read(ptr, &mut got).unwrap();
    let got = from_bf16(&got);
    assert!(got.iter().all(|v| v.is_finite()), "{what}: unwritten output");
    let e = rel_err(&got, want);
    assert!(e < tol, "{what}: rel err {e}");
    println!("{what}: rel err {e:.1e}");
}

/// A random `[n, k]` matrix in format `fmt` (0 bf16, 1 MLX affine of `bits`, `group`): its
/// device storage (packed weights, scales, biases) and its dequantized values.
fn random_qmat(
    rng: &mut Rng,
    n: usize,
    k: usize,
    fmt: i32,
    bits: u32,
    group: usize,
) -> (Vec<u8>, Vec<u16>, Vec<u16>, Vec<f32>) {
    if fmt == 0 {
        let w: Vec<f32> = (0..n * k).map(|_| half::bf16::from_f32(rng.normal() * 0.05).to_f32()).collect();
        return (w.iter().flat_map(|&v| bf16_bits(v).to_le_bytes()).collect(), vec![], vec![], w);
    }
    let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
    let q = zmoe::checkpoint::quant::affine_quantize(&w, k, bits, group);
    let bytes: Vec<u8> = q.packed.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut deq = vec![0f32; n * k];
    let (g, rb) = (k / group, k * bits as usize / 8);
    for r in 0..n {
        zmoe::checkpoint::quant::affine_dequant_row(
            &bytes[r * rb..][..rb],
            bits,
            group,
            &q.scales[r * g..][..g],
            &q.biases[r * g..][..g],
            &mut deq[r * k..][..k],
        );
    }
    // The kernels read bf16 scales and biases: dequantize with those.
    let (s, b) = (to_bf16(&q.scales), to_bf16(&q.biases));
    let (sf, bf) = (from_bf16(&s), from_bf16(&b));
    for r in 0..n {
        for j in 0..k {
            let gi = r * g + j / group;
            let code = ((deq[r * k + j] - q.biases[gi]) / q.scales[gi]).round();
            deq[r * k + j] = sf[gi] * code + bf[gi];
        }
    }
    (bytes, s, b, deq)
}

/// A matrix's storage on the device as a `QMat`: packed weights, bf16 scales and biases
/// (none for bf16 weights).
fn upload_qmat(dev: &mut Device, (wq, s, b): (&[u8], &[u16], &[u16]), fmt: i32, bits: u32, group: usize) -> ops::QMat {
    let pw = dev.upload(wq).unwrap();
    let ps = if s.is_empty() { 0 } else { dev.upload(s).unwrap() };
    let pb = if b.is_empty() { 0 } else { dev.upload(b).unwrap() };
    ops::QMat { w: rd(pw), s: rd(ps), b: rd(pb), fmt, bits: bits as i32, group: group as i32 }
}

/// `head_matvec` / `head_gemm_tc` arguments: `m` tokens of `nh` heads, x rows `x_ld` apart
/// at `px`, y `[m·nh, n]` at `py`, k of each row used; 32 lanes a row (the launcher picks).
fn head_args(
    w: ops::Stacked,
    (px, x_ld): (u64, usize),
    nh: usize,
    py: u64,
    (n, k): (usize, usize),
    m: usize,
) -> zmoe::cuda::ops::mla::HeadMatvecArgs {
    zmoe::cuda::ops::mla::HeadMatvecArgs {
        w,
        x: rd(px),
        x_ld: x_ld as i64,
        nh: nh as i32,
        y: wr(py),
        n: n as i32,
        k: k as i32,
        m: m as i32,
        lanes: 32,
    }
}

/// `count` random `[n, k]` matrices of one format (group 64) stacked like experts on the
/// device, and each one's dequantized values.
fn random_stacked(
    dev: &mut Device,
    rng: &mut Rng,
    count: usize,
    (n, k): (usize, usize),
    fmt: i32,
    bits: u32,
) -> (ops::Stacked, Vec<Vec<f32>>) {
    let mats: Vec<_> = (0..count).map(|_| random_qmat(rng, n, k, fmt, bits, 64)).collect();
    let wq: Vec<u8> = mats.iter().flat_map(|m| m.0.clone()).collect();
    let s: Vec<u16> = mats.iter().flat_map(|m| m.1.clone()).collect();
    let b: Vec<u16> = mats.iter().flat_map(|m| m.2.clone()).collect();
    let w = upload_qmat(dev, (&wq, &s, &b), fmt, bits, 64);
    let w_stride = if fmt == 0 { (n * k) as i64 } else { (n * k * bits as usize / 32) as i64 };
    let sb_stride = if fmt == 0 { 0 } else { (n * k / 64) as i64 };
    (ops::Stacked { w, w_stride, sb_stride }, mats.into_iter().map(|m| m.3).collect())
}

/// `count` random MXFP4 matrices `[n, k]` stacked like GPT-OSS's experts (random E2M1
/// codes, E8M0 scales 2^-9 ..= 2^-5) and their dequantized values.
fn random_mxfp4_stacked(
    dev: &mut Device,
    rng: &mut Rng,
    count: usize,
    (n, k): (usize, usize),
) -> (ops::Stacked, Vec<Vec<f32>>) {
    let codes: Vec<u8> = (0..count * n * k / 2).map(|_| rng.next_u64() as u8).collect();
    let scales: Vec<u8> = (0..count * n * k / 32).map(|_| 118 + (rng.next_u64() % 5) as u8).collect();
    let mats = (0..count)
        .map(|e| {
            let mut m = vec![0f32; n * k];
            for (r, out) in m.chunks_mut(k).enumerate() {
                let at = e * n + r;
                zmoe::checkpoint::quant::mxfp4_dequant_row(
                    &codes[at * k / 2..][..k / 2],
                    &scales[at * k / 32..][..k / 32],
                    out,
                );
            }
            m
        })
        .collect();
    let w = ops::QMat {
        w: rd(dev.upload(&codes).unwrap()),
        s: rd(dev.upload(&scales).unwrap()),
        b: rd(0),
        fmt: gpt_oss::FMT_MXFP4,
        bits: 4,
        group: 32,
    };
    (ops::Stacked { w, w_stride: (n * k / 8) as i64, sb_stride: (n * k / 32) as i64 }, mats)
}

/// Device `pos` and `base` of a prompt chunk: `m` consecutive positions from `p0` of one
/// sequence whose cache rows start at `base`.
fn chunk_rows(dev: &mut Device, m: usize, p0: usize, base: usize) -> (u64, u64) {
    let pos: Vec<i32> = (0..m).map(|r| (p0 + r) as i32).collect();
    (dev.upload(&pos).unwrap(), dev.upload(&vec![base as i32; m]).unwrap())
}

/// Each format case twice: with the tensor-core kernels' default twins (weights dequantised
/// as staged: affine to fp16) and on integer codes (`ZMOE_TC_CODES`): `(codes, case…)`.
fn tc_variants<T: Copy>(cases: &[T]) -> Vec<(bool, T)> {
    [false, true].iter().flat_map(|&d| cases.iter().map(move |&c| (d, c))).collect()
}

/// The tensor-core product (issue 19) against the CPU in f64: bf16 / affine 4 / affine 8
/// weights, groups 32, 64 and 128, token counts that leave partial tiles, output rows that
/// are not a multiple of the 128-row tile, a bias, f32 and bf16 outputs, poisoned outputs.
#[test]
#[ignore]
fn kernel_gemm_tc_matches_cpu() {
    use zmoe::cuda::ops::gemm;
    let mut dev = tc_device();
    let mut rng = Rng::new(0x7C0DE);
    let (n, k) = (300usize, 512usize);
    for (codes, (fmt, bits, group)) in
        tc_variants(&[(0, 16u32, 0usize), (1, 4, 32), (1, 4, 64), (1, 4, 128), (1, 8, 64), (1, 8, 128)])
    {
        dev.set_tc_codes(codes);
        for m in [17usize, 40, 100] {
            let x: Vec<f32> = (0..m * k).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
            let (wq, s, b, wf) = random_qmat(&mut rng, n, k, fmt, bits, group.max(32));
            let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (t, r) = (i / n, i % n);
                    bias[r] as f64 + (0..k).map(|j| x[t * k + j] as f64 * wf[r * k + j] as f64).sum::<f64>()
                })
                .collect();
            let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let w = upload_qmat(&mut dev, (&wq, &s, &b), fmt, bits, group);
            let px = dev.upload(&to_bf16(&x)).unwrap();
            let pbias = dev.upload(&bias).unwrap();
            assert!(gemm::supports(&w, k));
            for out_f32 in [1, 0] {
                let py = dev.alloc(m * n * 4).unwrap();
                dev.fill(py, 0xFF, m * n * 4).unwrap(); // poison: NaN
                let a = linear::MatvecArgs {
                    w,
                    x: rd(px),
                    y: wr(py),
                    bias: rd(pbias),
                    n: n as i32,
                    k: k as i32,
                    m: m as i32,
                    out_f32,
                };
                gemm::gemm(&dev, &a).unwrap();
                let got: Vec<f32> = if out_f32 == 1 {
                    let mut g = vec![0f32; m * n];
                    dev.read(py, &mut g).unwrap();
                    g
                } else {
                    let mut g = vec![0u16; m * n];
                    dev.read(py, &mut g).unwrap();
                    from_bf16(&g)
                };
                let what = format!("fmt {fmt} bits {bits} group {group} m {m} out_f32 {out_f32} codes {codes}");
                assert!(got.iter().all(|v| v.is_finite()), "{what}: unwritten output");
                let e = rel_err(&got, &want32);
                // f32 accumulation (1e-5 like the mat-vecs); affine weights dequantised to
                // fp16 add their rounding (4–8e-6 measured on the H100); a bf16 output rounds
                // at 2^-9 rms (≈ 1.7e-3 measured).
                let tol = match (out_f32 == 1, fmt != 0 && !codes) {
                    (true, false) => 1e-5,
                    (true, true) => 3e-5,
                    (false, _) => 4e-3,
                };
                assert!(e < tol, "{what}: rel err {e}");
                println!("gemm_tc {what}: rel err {e:.1e}");
            }
        }
    }
}

/// Runs `moe_group` on the routed rows' experts `idx` over `e` experts, into poisoned
/// buffers: (off `[e + 1]`, rows `[idx.len()]`, the tile table), all i32.
fn group_on_device(dev: &mut Device, idx: &[i32], e: usize) -> (u64, u64, u64) {
    use zmoe::cuda::ops::gemm;
    let r = idx.len();
    let pidx = dev.upload(idx).unwrap();
    let ntile = 1 + 2 * gemm::max_tiles(r, e);
    let (poff, prows, ptiles) =
        (dev.alloc((e + 1) * 4).unwrap(), dev.alloc(r.max(1) * 4).unwrap(), dev.alloc(ntile * 4).unwrap());
    for (ptr, n) in [(poff, e + 1), (prows, r), (ptiles, ntile)] {
        dev.fill(ptr, 0xFF, n * 4).unwrap();
    }
    let g = moe::MoeGroupArgs {
        idx: rd(pidx),
        r: r as i32,
        e: e as i32,
        off: wr(poff),
        rows: wr(prows),
        tiles: wr(ptiles),
    };
    moe::moe_group(dev, &g).unwrap();
    (poff, prows, ptiles)
}

/// `moe_group` against the host: per-expert offsets, each expert's rows in ascending order
/// and the tensor-core tile table, for skewed random routing (empty experts, experts past
/// one tile) over 8 to 384 experts and row counts below, at and past one staged segment of
/// 4,096 rows; outputs poisoned first.
#[test]
#[ignore]
fn kernel_moe_group_matches_host() {
    use zmoe::cuda::ops::gemm;
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0x6A0F);
    for (r, e) in [(1usize, 8usize), (300, 8), (4096, 128), (4097, 128), (10_000, 384), (12_288, 1024)] {
        let idx: Vec<i32> = (0..r).map(|_| ((rng.uniform() * rng.uniform()) * e as f32) as i32 % e as i32).collect();
        let mut off = vec![0i32; e + 1];
        for &i in &idx {
            off[i as usize + 1] += 1;
        }
        for i in 0..e {
            off[i + 1] += off[i];
        }
        let mut rows = Vec::with_capacity(r);
        for ex in 0..e as i32 {
            rows.extend((0..r as i32).filter(|&q| idx[q as usize] == ex));
        }
        let mut tiles = vec![0i32];
        for ex in 0..e {
            for j in (off[ex]..off[ex + 1]).step_by(gemm::TC_BM) {
                tiles.extend([ex as i32, j]);
            }
        }
        tiles[0] = ((tiles.len() - 1) / 2) as i32;
        let (poff, prows, ptiles) = group_on_device(&mut dev, &idx, e);
        let ntile = 1 + 2 * gemm::max_tiles(r, e);
        let (mut goff, mut grows, mut gtiles) = (vec![0i32; e + 1], vec![0i32; r], vec![0i32; ntile]);
        dev.read(poff, &mut goff).unwrap();
        dev.read(prows, &mut grows).unwrap();
        dev.read(ptiles, &mut gtiles).unwrap();
        assert_eq!(goff, off, "r {r} e {e}: offsets");
        assert_eq!(grows, rows, "r {r} e {e}: rows");
        assert_eq!(gtiles[..tiles.len()], tiles[..], "r {r} e {e}: tile table");
        println!("moe_group r {r} e {e}: {} tiles, same as the host", tiles[0]);
    }
}

/// qkv_proj's arguments over `mats` (matrix, f32 bias) of `ns` rows each, `k` wide, `m`
/// tokens of x into `out`; `ns[2]` = 0 is MLA's two matrices (v repeats k's with no rows).
fn qkv_args(mats: &[(ops::QMat, u64)], x: u64, out: &[u64], ns: [usize; 3], k: usize, m: usize) -> linear::QkvArgs {
    let v = if ns[2] > 0 { 2 } else { 1 };
    linear::QkvArgs {
        wq: mats[0].0,
        wk: mats[1].0,
        wv: mats[v].0,
        qbias: rd(mats[0].1),
        kbias: rd(mats[1].1),
        vbias: rd(if ns[2] > 0 { mats[2].1 } else { 0 }),
        x: rd(x),
        q: wr(out[0]),
        k: wr(out[1]),
        v: wr(if ns[2] > 0 { out[2] } else { 0 }),
        nq: ns[0] as i32,
        nk: ns[1] as i32,
        nv: ns[2] as i32,
        kdim: k as i32,
        m: m as i32,
    }
}

/// qkv_proj's one-launch prompt product (`gemm_qkv`, issue 19) bit for bit against the three
/// separate `gemm` launches the reference plan makes: q, k, v of other heights (k and v under
/// one 128-row tile) with biases, and MLA's two matrices (`nv` = 0); affine 4-bit and bf16,
/// both twins (fp16 dequantisation and integer codes), token counts that leave partial tiles.
#[test]
#[ignore]
fn kernel_gemm_qkv_equals_separate_gemms() {
    use zmoe::cuda::ops::gemm;
    let mut dev = tc_device();
    let mut rng = Rng::new(0x9C7);
    let k = 256usize;
    for (codes, (fmt, bits)) in tc_variants(&[(1, 4u32), (0, 16)]) {
        dev.set_tc_codes(codes);
        for ns in [[300usize, 100, 100], [200, 96, 0]] {
            for m in [17usize, 70] {
                let x: Vec<f32> = (0..m * k).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
                let px = dev.upload(&to_bf16(&x)).unwrap();
                let mut mats = Vec::new();
                for &n in &ns {
                    let n = n.max(1);
                    let (wq, s, b, _) = random_qmat(&mut rng, n, k, fmt, bits, 64);
                    let w = upload_qmat(&mut dev, (&wq, &s, &b), fmt, bits, 64);
                    let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                    mats.push((w, dev.upload(&bias).unwrap()));
                }
                let out = |dev: &mut Device, n: usize| {
                    let p = dev.alloc((m * n).max(1) * 2).unwrap();
                    dev.fill(p, 0xFF, (m * n).max(1) * 2).unwrap();
                    p
                };
                let (py, ys): (Vec<u64>, Vec<u64>) = ns.iter().map(|&n| (out(&mut dev, n), out(&mut dev, n))).unzip();
                let a = qkv_args(&mats, px, &py, ns, k, m);
                gemm::gemm_qkv(&dev, &a).unwrap();
                for (i, &n) in ns.iter().enumerate().filter(|(_, n)| **n > 0) {
                    let s = linear::MatvecArgs {
                        w: mats[i].0,
                        x: rd(px),
                        y: wr(ys[i]),
                        bias: rd(mats[i].1),
                        n: n as i32,
                        k: k as i32,
                        m: m as i32,
                        out_f32: 0,
                    };
                    gemm::gemm(&dev, &s).unwrap();
                    let (mut one, mut sep) = (vec![0u16; m * n], vec![0u16; m * n]);
                    dev.read(py[i], &mut one).unwrap();
                    dev.read(ys[i], &mut sep).unwrap();
                    let what = format!("fmt {fmt} codes {codes} heights {ns:?} m {m} matrix {i}");
                    assert!(from_bf16(&one).iter().all(|v| v.is_finite()), "{what}: unwritten output");
                    assert_eq!(one, sep, "{what}: one launch differs from the separate product");
                }
                println!("gemm_qkv fmt {fmt} codes {codes} heights {ns:?} m {m}: bit-identical");
            }
        }
    }
}

/// `norm_qkv` (decode) bit for bit against what it fuses: H against the `rmsnorm` kernel (256
/// threads) and q, k, v against `qkv_proj1` over that H — hidden sizes below, at and past the
/// 256 played threads, not a multiple of them (2,880) and past 2,048; bf16 and affine 4-bit;
/// few rows and enough for the two-rows-a-warp kernel; outputs poisoned first.
#[test]
#[ignore]
fn kernel_norm_qkv_equals_norm_then_qkv() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0x40C7);
    for (fmt, bits) in [(1, 4u32), (0, 16)] {
        for h in [64usize, 256, 2880, 4096] {
            for ns in [[300usize, 100, 100], [4096, 512, 512]] {
                let x: Vec<f32> = (0..h).map(|_| half::bf16::from_f32(3.0 * rng.normal()).to_f32()).collect();
                let nw: Vec<f32> = (0..h).map(|_| 0.5 + rng.uniform()).collect();
                let (px, pnw) = (dev.upload(&to_bf16(&x)).unwrap(), dev.upload(&nw).unwrap());
                let mut mats = Vec::new();
                for &n in &ns {
                    let (wq, s, b, _) = random_qmat(&mut rng, n, h, fmt, bits, 64);
                    let w = upload_qmat(&mut dev, (&wq, &s, &b), fmt, bits, 64);
                    mats.push((w, dev.upload(&(0..n).map(|_| rng.normal()).collect::<Vec<f32>>()).unwrap()));
                }
                let poisoned = |dev: &mut Device, n: usize| {
                    let p = dev.alloc(n * 2).unwrap();
                    dev.fill(p, 0xFF, n * 2).unwrap();
                    p
                };
                // The parts: rmsnorm into h1, then qkv_proj1 over h1.
                let h1 = poisoned(&mut dev, h);
                let na = norm::RmsnormArgs { x: rd(px), w: rd(pnw), y: wr(h1), n: h as i32, ld: h as i32, eps: 1e-6 };
                norm::rmsnorm(&dev, &na, 1, norm::NORM_THREADS).unwrap();
                let outs = |dev: &mut Device| -> Vec<u64> { ns.iter().map(|&n| poisoned(dev, n)).collect() };
                let qkv = |hx: u64, o: &[u64]| qkv_args(&mats, hx, o, ns, h, 1);
                let o1 = outs(&mut dev);
                linear::qkv(&dev, &qkv(h1, &o1)).unwrap();
                // The fused kernel.
                let (h2, o2) = (poisoned(&mut dev, h), outs(&mut dev));
                let a = linear::NormQkvArgs { p: qkv(h2, &o2), xin: rd(px), nw: rd(pnw), h: wr(h2), eps: 1e-6 };
                linear::norm_qkv(&dev, &a).unwrap();
                let what = format!("fmt {fmt} hidden {h} rows {ns:?}");
                let read = |dev: &Device, p: u64, n: usize| {
                    let mut v = vec![0u16; n];
                    dev.read(p, &mut v).unwrap();
                    v
                };
                let (g1, g2) = (read(&dev, h1, h), read(&dev, h2, h));
                assert!(from_bf16(&g1).iter().all(|v| v.is_finite()), "{what}: unwritten H");
                assert_eq!(g2, g1, "{what}: H differs from the rmsnorm kernel's");
                for (i, &n) in ns.iter().enumerate() {
                    let (r1, r2) = (read(&dev, o1[i], n), read(&dev, o2[i], n));
                    assert!(from_bf16(&r1).iter().all(|v| v.is_finite()), "{what}: unwritten output {i}");
                    assert_eq!(r2, r1, "{what}: projection {i} differs from qkv_proj1's");
                }
                println!("norm_qkv {what}: bit-identical");
            }
        }
    }
}

/// The grouped tensor-core expert product (issue 19) against the CPU: `moe_group` builds the
/// tile table from random routing (some experts empty, some over one tile), `expert_gemm_tc`
/// computes every routed row (gate/up reading the token's row, down the slot's own row); bf16,
/// affine 4 / 8-bit and MXFP4 experts (GPT-OSS), the quantized ones with per-expert bias rows.
#[test]
#[ignore]
fn kernel_expert_gemm_tc_matches_cpu() {
    use zmoe::cuda::ops::gemm;
    let mut dev = tc_device();
    let mut rng = Rng::new(0xE7C0);
    let (e, top, n, k) = (8usize, 2usize, 200usize, 256usize);
    // The experts' bias rows (GPT-OSS), used with the quantized formats; bf16 runs without.
    let bias: Vec<f32> = (0..e * n).map(|_| 0.1 * rng.normal()).collect();
    let pbias = dev.upload(&bias).unwrap();
    for (codes, (fmt, bits)) in tc_variants(&[(0, 16u32), (1, 4), (1, 8), (gpt_oss::FMT_MXFP4, 4)]) {
        dev.set_tc_codes(codes);
        let with_bias = fmt != 0;
        for (m, per) in [(40usize, top), (150, top), (70, 1)] {
            let r = m * top;
            let xrows = r / per;
            let x: Vec<f32> = (0..xrows * k).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
            // Routing skewed to experts 0..5 (6 and 7 stay empty): experts 0 and 1 exceed a tile.
            let idx: Vec<i32> = (0..r).map(|_| ((rng.uniform() * rng.uniform()) * 6.0) as i32 % e as i32).collect();
            let (w, mats) = if fmt == gpt_oss::FMT_MXFP4 {
                random_mxfp4_stacked(&mut dev, &mut rng, e, (n, k))
            } else {
                random_stacked(&mut dev, &mut rng, e, (n, k), fmt, bits)
            };
            let want: Vec<f32> = (0..r * n)
                .map(|i| {
                    let (q, row) = (i / n, i % n);
                    let wf = &mats[idx[q] as usize];
                    let b = if with_bias { bias[idx[q] as usize * n + row] as f64 } else { 0.0 };
                    ((0..k).map(|j| x[(q / per) * k + j] as f64 * wf[row * k + j] as f64).sum::<f64>() + b) as f32
                })
                .collect();
            let px = dev.upload(&to_bf16(&x)).unwrap();
            let (poff, prows, ptiles) = group_on_device(&mut dev, &idx, e);
            let py = dev.alloc(r * n * 2).unwrap();
            dev.fill(py, 0xFF, r * n * 2).unwrap();
            let a = gemm::ExpertGemmArgs {
                w,
                tiles: rd(ptiles),
                off: rd(poff),
                rows: rd(prows),
                per: per as i32,
                x: rd(px),
                bias: rd(if with_bias { pbias } else { 0 }),
                y: wr(py),
                n: n as i32,
                k: k as i32,
            };
            gemm::expert_gemm(&dev, &a, r, e).unwrap();
            let mut tiles = vec![0i32; 1];
            dev.read(ptiles, &mut tiles).unwrap();
            let what =
                format!("expert_gemm_tc fmt {fmt} bits {bits} m {m} per {per} codes {codes}, {} tiles", tiles[0]);
            check_bf16_out(&dev, py, &want, 4e-3, &what);
        }
    }
}

/// Per-head products in f64: row (q, r) = mats[q mod heads][r] · the first k of x's row q
/// (`x_ld` wide), for `rows` (token, head) rows of `n` outputs.
fn per_head_reference(x: &[f32], x_ld: usize, mats: &[Vec<f32>], rows: usize, n: usize, k: usize) -> Vec<f32> {
    (0..rows * n)
        .map(|i| {
            let (q, row) = (i / n, i % n);
            let wf = &mats[q % mats.len()];
            (0..k).map(|j| x[q * x_ld + j] as f64 * wf[row * k + j] as f64).sum::<f64>() as f32
        })
        .collect()
}

/// MLA's per-head mat-vec against the CPU, and one token (head_matvec1: rows of a few
/// chunks share a warp) bit-identical to the multi-token kernel's token 0: affine 4-bit
/// rows of 6 and 16 chunks (8 and 16 lanes a row), 8-bit of 4 (4 lanes), bf16 of 8 and 24
/// (8 lanes; a whole warp); a row count that leaves a warp's last group past the end.
#[test]
#[ignore]
fn kernel_head_matvec_one_token_equals_multi() {
    use zmoe::cuda::ops::mla;
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0x4EA1);
    let (nh, n, m) = (3usize, 37usize, 3usize);
    for (fmt, bits, k) in [(1, 4u32, 192usize), (1, 4, 512), (1, 8, 64), (0, 16, 64), (0, 16, 192)] {
        let x_ld = k + 64;
        let x: Vec<f32> = (0..m * nh * x_ld).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
        let (w, mats) = random_stacked(&mut dev, &mut rng, nh, (n, k), fmt, bits);
        let want = per_head_reference(&x, x_ld, &mats, m * nh, n, k);
        let px = dev.upload(&to_bf16(&x)).unwrap();
        let run = |dev: &mut Device, m: usize| -> Vec<u16> {
            let py = dev.alloc(m * nh * n * 2).unwrap();
            dev.fill(py, 0xFF, m * nh * n * 2).unwrap(); // poison: NaN
            let a = head_args(w, (px, x_ld), nh, py, (n, k), m);
            mla::head_matvec(dev, &a).unwrap();
            let mut got = vec![0u16; m * nh * n];
            dev.read(py, &mut got).unwrap();
            got
        };
        let many = run(&mut dev, m);
        let what = format!("head_matvec fmt {fmt} bits {bits} k {k} ({} lanes a row)", mla::head_lanes(&w.w, k));
        let e = rel_err(&from_bf16(&many), &want);
        assert!(e < 8e-3, "{what}: rel err {e}");
        let one = run(&mut dev, 1);
        assert!(from_bf16(&one).iter().all(|v| v.is_finite()), "{what}: unwritten output");
        assert_eq!(one, many[..nh * n], "{what}: one token differs from the multi-token kernel");
    }
}

/// MLA's per-head tensor-core product (issue 19) against the CPU: row (token, head) of y =
/// W[head] · the first k elements of that head's wider source row (q_nope of a query head),
/// heads stacked like experts; bf16 and affine 4/8-bit, token counts that leave partial tiles.
#[test]
#[ignore]
fn kernel_head_gemm_tc_matches_cpu() {
    use zmoe::cuda::ops::gemm;
    let mut dev = tc_device();
    let mut rng = Rng::new(0x4EAD);
    let (nh, n, k, x_ld) = (5usize, 160usize, 192usize, 256usize);
    for (codes, (fmt, bits)) in tc_variants(&[(0, 16u32), (1, 4), (1, 8)]) {
        dev.set_tc_codes(codes);
        for m in [40usize, 17] {
            let x: Vec<f32> = (0..m * nh * x_ld).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
            let (w, mats) = random_stacked(&mut dev, &mut rng, nh, (n, k), fmt, bits);
            let want = per_head_reference(&x, x_ld, &mats, m * nh, n, k);
            let px = dev.upload(&to_bf16(&x)).unwrap();
            let py = dev.alloc(m * nh * n * 2).unwrap();
            dev.fill(py, 0xFF, m * nh * n * 2).unwrap();
            let a = head_args(w, (px, x_ld), nh, py, (n, k), m);
            gemm::head_gemm(&dev, &a).unwrap();
            check_bf16_out(&dev, py, &want, 4e-3, &format!("head_gemm_tc fmt {fmt} bits {bits} m {m} codes {codes}"));
        }
    }
}

/// GQA attention against the CPU in f64, both kernels on the same inputs: the split decode
/// kernel (`attention`: a block per KV head's query heads and key split, keys through shared
/// memory) and the prompt-chunk kernel on tensor cores (`attention_tc`, issue 19; head dims
/// 64 and 128 only). One sequence's consecutive rows after a cached prefix (causal within the
/// chunk), GQA groups of 1–32 heads (12, 16, 32: three to eight head chunks per KV head),
/// head dims 40–256, chunk sizes that leave partial 64-query blocks and 32-key tiles, a
/// context whose splits span several 32-key tiles, poisoned outputs.
#[test]
#[ignore]
fn kernel_attention_matches_cpu() {
    use zmoe::cuda::ops::attention as attn;
    let mut dev = tc_device();
    let mut rng = Rng::new(0xFA11);
    for (d, nh, nkv, m, p0, base) in [
        (128usize, 8usize, 2usize, 50usize, 37usize, 0usize),
        (64, 4, 4, 130, 0, 5),
        (128, 4, 1, 17, 300, 3),
        (256, 32, 2, 3, 700, 2),
        (40, 6, 3, 5, 90, 1),
        (64, 24, 2, 3, 100, 1),
        (64, 32, 1, 2, 60, 0),
    ] {
        let s_len = base + p0 + m;
        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let q: Vec<f32> = (0..m * nh * d).map(|_| bf(rng.normal())).collect();
        let kc: Vec<f32> = (0..s_len * nkv * d).map(|_| bf(rng.normal())).collect();
        let vc: Vec<f32> = (0..s_len * nkv * d).map(|_| bf(rng.normal())).collect();
        let scale = (d as f32).powf(-0.5);
        let mut want = vec![0f32; m * nh * d];
        for r in 0..m {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let n = p0 + r + 1;
                let sc: Vec<f64> = (0..n)
                    .map(|j| {
                        let kr = &kc[((base + j) * nkv + kvh) * d..][..d];
                        (0..d).map(|i| q[(r * nh + h) * d + i] as f64 * kr[i] as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let v = |j: usize, i: usize| vc[((base + j) * nkv + kvh) * d + i];
                softmax_attend_f64(&sc, v, &mut want[(r * nh + h) * d..][..d]);
            }
        }
        let (pq, pk, pv) =
            (dev.upload(&to_bf16(&q)).unwrap(), dev.upload(&to_bf16(&kc)).unwrap(), dev.upload(&to_bf16(&vc)).unwrap());
        let (ppos, pbase) = chunk_rows(&mut dev, m, p0, base);
        let pout = dev.alloc(m * nh * d * 2).unwrap();
        dev.fill(pout, 0xFF, m * nh * d * 2).unwrap();
        let what = format!("d {d} nh {nh} nkv {nkv} m {m} p0 {p0}");
        if attn::tc_supports(d) {
            let a = attn::FlashArgs {
                q: rd(pq),
                kc: rd(pk),
                vc: rd(pv),
                pos: rd(ppos),
                base: rd(pbase),
                slot: rd(pbase),
                sinks: rd(0),
                out: wr(pout),
                nh: nh as i32,
                nkv: nkv as i32,
                d: d as i32,
                scale,
                m: m as i32,
                window: 0,
                ring: 0,
            };
            attn::attention_tc(&dev, &a).unwrap();
            // P enters the P·V product as bf16 (2^-9), the output is bf16.
            check_bf16_out(&dev, pout, &want, 8e-3, &format!("attention_tc {what}"));
        }
        // The split kernel: P stays f32, only the output is bf16 (2^-8 relative).
        for splits in [attn::ATTN_SPLITS, 7] {
            let (part_o, part_ml, tickets) = split_scratch(&mut dev, m * nh, d, splits);
            dev.fill(pout, 0xFF, m * nh * d * 2).unwrap();
            let a = attn::AttentionArgs {
                q: rd(pq),
                kc: rd(pk),
                vc: rd(pv),
                pos: rd(ppos),
                base: rd(pbase),
                slot: rd(pbase),
                sinks: rd(0),
                part_o: wr(part_o),
                part_ml: wr(part_ml),
                tickets: wr(tickets),
                out: wr(pout),
                nh: nh as i32,
                nkv: nkv as i32,
                d: d as i32,
                scale,
                nsplit: splits as i32,
                window: 0,
                ring: 0,
            };
            attn::attention(&dev, &a, m).unwrap();
            check_bf16_out(&dev, pout, &want, 6e-3, &format!("attention {what} splits {splits}"));
        }
    }
}

/// GPT-OSS's attention arguments against the CPU in f64: a sink logit per head in the
/// softmax denominator, a sliding window, and a ring cache (key j of a slot at row
/// slot·ring + j mod ring). The split kernel on decode rows of different slots at positions
/// before, at and far past the window and the ring's length (the ring wrapped several times),
/// full-context rows with sinks only; the tensor-core kernel on prompt chunks of one slot
/// (positions crossing the window and the ring's end, partial 64-query blocks, head dims 64
/// and 128); GQA groups of 8 (GPT-OSS) and 3, 32 and 7 splits, poisoned outputs.
#[test]
#[ignore]
fn kernel_attention_sinks_window_ring_matches_cpu() {
    use zmoe::cuda::ops::attention as attn;
    let mut dev = tc_device();
    let mut rng = Rng::new(0x5117);
    /// (d, nh, nkv, window, ring, slot_rows, rows as (slot, pos), one chunk of one slot)
    type Case = (usize, usize, usize, usize, usize, usize, Vec<(usize, usize)>, bool);
    let chunk = |slot: usize, p0: usize, m: usize| (0..m).map(|i| (slot, p0 + i)).collect::<Vec<_>>();
    let cases: Vec<Case> = vec![
        (64, 16, 2, 128, 128, 128, vec![(0, 5), (1, 127), (2, 128), (1, 300), (0, 700)], false),
        (64, 16, 2, 0, 0, 800, vec![(0, 0), (1, 64), (0, 511), (2, 799)], false),
        (40, 6, 2, 20, 24, 24, vec![(3, 19), (0, 20), (2, 95), (2, 100)], false),
        (64, 8, 1, 7, 0, 60, vec![(1, 3), (0, 59)], false),
        // Chunks: ring = window + chunk − 1 (as the backend sizes it), then the full context.
        (64, 16, 2, 128, 128 + 100 - 1, 227, chunk(1, 300, 100), true),
        (64, 16, 2, 128, 128 + 130 - 1, 257, chunk(0, 0, 130), true),
        (128, 6, 2, 40, 40 + 70 - 1, 109, chunk(2, 95, 70), true),
        (64, 16, 2, 0, 0, 400, chunk(1, 250, 90), true),
    ];
    for (d, nh, nkv, window, ring, slot_rows, rows, is_chunk) in cases {
        let m = rows.len();
        let slots = rows.iter().map(|r| r.0).max().unwrap() + 1;
        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let q: Vec<f32> = (0..m * nh * d).map(|_| bf(rng.normal())).collect();
        let kc: Vec<f32> = (0..slots * slot_rows * nkv * d).map(|_| bf(rng.normal())).collect();
        let vc: Vec<f32> = (0..slots * slot_rows * nkv * d).map(|_| bf(rng.normal())).collect();
        let sinks: Vec<f32> = (0..nh).map(|_| 2.0 * rng.normal()).collect();
        let scale = (d as f32).powf(-0.5);
        let row_of = |slot: usize, j: usize| slot * slot_rows + if ring > 0 { j % ring } else { j };
        let mut want = vec![0f32; m * nh * d];
        for (r, &(slot, pos)) in rows.iter().enumerate() {
            let first = if window > 0 { (pos + 1).saturating_sub(window) } else { 0 };
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let at = |c: &[f32], j: usize, i: usize| c[(row_of(slot, j) * nkv + kvh) * d + i] as f64;
                let sc: Vec<f64> = (first..=pos)
                    .map(|j| (0..d).map(|i| q[(r * nh + h) * d + i] as f64 * at(&kc, j, i)).sum::<f64>() * scale as f64)
                    .collect();
                // The sink is one more softmax column whose probability is dropped.
                let mx = sc.iter().cloned().fold(sinks[h] as f64, f64::max);
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let den = p.iter().sum::<f64>() + (sinks[h] as f64 - mx).exp();
                for i in 0..d {
                    let num: f64 = p.iter().enumerate().map(|(jj, pj)| pj * at(&vc, first + jj, i)).sum();
                    want[(r * nh + h) * d + i] = (num / den) as f32;
                }
            }
        }
        let (pq, pk, pv) =
            (dev.upload(&to_bf16(&q)).unwrap(), dev.upload(&to_bf16(&kc)).unwrap(), dev.upload(&to_bf16(&vc)).unwrap());
        let pos: Vec<i32> = rows.iter().map(|r| r.1 as i32).collect();
        let slot: Vec<i32> = rows.iter().map(|r| r.0 as i32).collect();
        let base: Vec<i32> = rows.iter().map(|r| (r.0 * slot_rows) as i32).collect();
        let (ppos, pslot, pbase, psinks) = (
            dev.upload(&pos).unwrap(),
            dev.upload(&slot).unwrap(),
            dev.upload(&base).unwrap(),
            dev.upload(&sinks).unwrap(),
        );
        let pout = dev.alloc(m * nh * d * 2).unwrap();
        let what = format!("sink attention d {d} nh {nh} nkv {nkv} window {window} ring {ring} rows {m}");
        if is_chunk && attn::tc_supports(d) {
            dev.fill(pout, 0xFF, m * nh * d * 2).unwrap();
            let a = attn::FlashArgs {
                q: rd(pq),
                kc: rd(pk),
                vc: rd(pv),
                pos: rd(ppos),
                base: rd(pbase),
                slot: rd(pslot),
                sinks: rd(psinks),
                out: wr(pout),
                nh: nh as i32,
                nkv: nkv as i32,
                d: d as i32,
                scale,
                m: m as i32,
                window: window as i32,
                ring: ring as i32,
            };
            attn::attention_tc(&dev, &a).unwrap();
            // P enters the P·V product as bf16 (2^-9), the output is bf16.
            check_bf16_out(&dev, pout, &want, 8e-3, &format!("{what} (tensor cores)"));
        }
        for splits in [attn::ATTN_SPLITS, 7] {
            let (part_o, part_ml, tickets) = split_scratch(&mut dev, m * nh, d, splits);
            dev.fill(pout, 0xFF, m * nh * d * 2).unwrap();
            let a = attn::AttentionArgs {
                q: rd(pq),
                kc: rd(pk),
                vc: rd(pv),
                pos: rd(ppos),
                base: rd(pbase),
                slot: rd(pslot),
                sinks: rd(psinks),
                part_o: wr(part_o),
                part_ml: wr(part_ml),
                tickets: wr(tickets),
                out: wr(pout),
                nh: nh as i32,
                nkv: nkv as i32,
                d: d as i32,
                scale,
                nsplit: splits as i32,
                window: window as i32,
                ring: ring as i32,
            };
            attn::attention(&dev, &a, m).unwrap();
            check_bf16_out(&dev, pout, &want, 6e-3, &format!("{what} splits {splits}"));
        }
    }
}

/// MLA attention against the CPU in f64, both kernels on the same inputs: the split decode
/// kernel (`mla_attention`: a block per head group and key split, keys through shared memory)
/// and the prompt-chunk kernel on tensor cores (`mla_attention_tc`, issue 19). The absorbed
/// form — query rows (token, head) of [qlat (512) | q_pe (64)] over latent cache rows
/// [c (512) | k_pe (64)], values c — one sequence's consecutive rows after a cached prefix,
/// GLM's 20 heads and others (6: a partial head group), row counts that leave partial 32-row
/// blocks and 16-key tiles, a context whose splits span several 32-key tiles, poisoned outputs.
#[test]
#[ignore]
fn kernel_mla_attention_matches_cpu() {
    use zmoe::cuda::ops::mla;
    let mut dev = tc_device();
    let mut rng = Rng::new(0x3A7C);
    let (l, r) = (512usize, 64usize);
    let row = l + r;
    for (nh, nope, m, p0, base) in [
        (20usize, 192usize, 23usize, 41usize, 0usize),
        (4, 64, 70, 0, 7),
        (16, 128, 9, 250, 2),
        (4, 128, 3, 5, 1),
        (6, 128, 2, 700, 3),
    ] {
        let dqk = nope + r;
        let s_len = base + p0 + m;
        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let qlat: Vec<f32> = (0..m * nh * l).map(|_| bf(0.2 * rng.normal())).collect();
        let q: Vec<f32> = (0..m * nh * dqk).map(|_| bf(rng.normal())).collect();
        let cache: Vec<f32> = (0..s_len * row).map(|_| bf(rng.normal())).collect();
        let scale = (dqk as f32).powf(-0.5);
        let mut want = vec![0f32; m * nh * l];
        for t in 0..m {
            for h in 0..nh {
                let qr = t * nh + h;
                let n = p0 + t + 1;
                let sc: Vec<f64> = (0..n)
                    .map(|j| {
                        let c = &cache[(base + j) * row..][..row];
                        let lat: f64 = (0..l).map(|i| qlat[qr * l + i] as f64 * c[i] as f64).sum();
                        let pe: f64 = (0..r).map(|i| q[qr * dqk + nope + i] as f64 * c[l + i] as f64).sum();
                        (lat + pe) * scale as f64
                    })
                    .collect();
                softmax_attend_f64(&sc, |j, i| cache[(base + j) * row + i], &mut want[qr * l..][..l]);
            }
        }
        let (pl, pq, pc) = (
            dev.upload(&to_bf16(&qlat)).unwrap(),
            dev.upload(&to_bf16(&q)).unwrap(),
            dev.upload(&to_bf16(&cache)).unwrap(),
        );
        let (ppos, pbase) = chunk_rows(&mut dev, m, p0, base);
        let pout = dev.alloc(m * nh * l * 2).unwrap();
        dev.fill(pout, 0xFF, m * nh * l * 2).unwrap();
        let a = mla::MlaFlashArgs {
            qlat: rd(pl),
            q: rd(pq),
            cache: rd(pc),
            pos: rd(ppos),
            base: rd(pbase),
            out: wr(pout),
            nh: nh as i32,
            dqk: dqk as i32,
            nope: nope as i32,
            scale,
            m: m as i32,
        };
        mla::mla_attention_tc(&dev, &a).unwrap();
        // P enters the P·V product as bf16 (2^-9), the output is bf16.
        check_bf16_out(&dev, pout, &want, 8e-3, &format!("mla_attention_tc nh {nh} nope {nope} m {m} p0 {p0}"));
        // The split kernel: P stays f32, only the output is bf16 (2^-8 relative).
        for splits in [mla::MLA_SPLITS, 7] {
            let (part_o, part_ml, tickets) = split_scratch(&mut dev, m * nh, l, splits);
            dev.fill(pout, 0xFF, m * nh * l * 2).unwrap();
            let a = mla::MlaAttentionArgs {
                qlat: rd(pl),
                q: rd(pq),
                cache: rd(pc),
                pos: rd(ppos),
                base: rd(pbase),
                part_o: wr(part_o),
                part_ml: wr(part_ml),
                tickets: wr(tickets),
                out: wr(pout),
                nh: nh as i32,
                dqk: dqk as i32,
                nope: nope as i32,
                l: l as i32,
                r: r as i32,
                scale,
                nsplit: splits as i32,
            };
            mla::mla_attention(&dev, &a, m).unwrap();
            check_bf16_out(
                &dev,
                pout,
                &want,
                6e-3,
                &format!("mla_attention nh {nh} nope {nope} m {m} p0 {p0} splits {splits}"),
            );
        }
    }
}

/// Router softmax-top-k on the device equals the CPU's choice (indices and weights).
#[test]
#[ignore]
fn kernel_router_topk_matches_cpu() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(77);
    for (e, k) in [(8usize, 2usize), (128, 8), (60, 4), (200, 8), (400, 8)] {
        let m = 5;
        let mut logits: Vec<f32> = (0..m * e).map(|_| rng.normal()).collect();
        logits[3] = logits[5]; // an exact tie
        let pl = dev.upload(&logits).unwrap();
        let (pi, pw) = (dev.alloc(m * k * 4).unwrap(), dev.alloc(m * k * 4).unwrap());
        dev.fill(pi, 0xFF, m * k * 4).unwrap();
        let a = moe::RouterTopkArgs { logits: rd(pl), e: e as i32, k: k as i32, norm: 1, idx: wr(pi), wout: wr(pw) };
        moe::router_topk(&dev, &a, m).unwrap();
        let (mut gi, mut gw) = (vec![0i32; m * k], vec![0f32; m * k]);
        dev.read(pi, &mut gi).unwrap();
        dev.read(pw, &mut gw).unwrap();
        let (wi, ww) = zmoe::cpu::ops::softmax_topk(&logits, e, k, true);
        assert_eq!(gi.iter().map(|&i| i as usize).collect::<Vec<_>>(), wi, "e {e} k {k}");
        assert!(rel_err(&gw, &ww) < 1e-5);
    }
    // Sigmoid + correction bias + group limiting (GLM / DeepSeek / Kimi shapes; every lane
    // width of with_lanes: 1, 2, 4, 8 and 32 experts a lane).
    for (e, k, ng, tg, norm) in [
        (64usize, 4usize, 1usize, 1usize, 1),
        (256, 8, 8, 4, 1),
        (48, 8, 1, 1, 0),
        (16, 3, 2, 1, 1),
        (100, 6, 1, 1, 1),
        (384, 8, 1, 1, 1),
    ] {
        let m = 6;
        let logits: Vec<f32> = (0..m * e).map(|_| rng.normal()).collect();
        let bias: Vec<f32> = (0..e).map(|_| 0.1 * rng.normal()).collect();
        let (pl, pb) = (dev.upload(&logits).unwrap(), dev.upload(&bias).unwrap());
        let (pi, pw) = (dev.alloc(m * k * 4).unwrap(), dev.alloc(m * k * 4).unwrap());
        dev.fill(pi, 0xFF, m * k * 4).unwrap();
        dev.fill(pw, 0xFF, m * k * 4).unwrap();
        let kind = zmoe::config::RouterKind::SigmoidGrouped { n_group: ng, topk_group: tg, routed_scaling_factor: 2.5 };
        let a = moe::RouterSigmoidArgs {
            logits: rd(pl),
            bias: rd(pb),
            e: e as i32,
            k: k as i32,
            n_group: ng as i32,
            topk_group: tg as i32,
            norm,
            scale: 2.5,
            idx: wr(pi),
            wout: wr(pw),
        };
        moe::router_sigmoid(&dev, &a, m).unwrap();
        let (mut gi, mut gw) = (vec![0i32; m * k], vec![0f32; m * k]);
        dev.read(pi, &mut gi).unwrap();
        dev.read(pw, &mut gw).unwrap();
        let (wi, ww) = zmoe::cpu::ops::sigmoid_topk(&logits, &bias, k, norm == 1, kind);
        assert_eq!(gi.iter().map(|&i| i as usize).collect::<Vec<_>>(), wi, "sigmoid e {e} k {k} groups {ng}/{tg}");
        assert!(rel_err(&gw, &ww) < 1e-5, "sigmoid weights {}", rel_err(&gw, &ww));
    }
}

/// Each fused router (logits and top-k in one kernel: on sm_90 a thread-block cluster a
/// token, before sm_90 a ticket) equals its parts bit for bit: the mat-vec's f32 logits (with
/// the router bias), then that router's own top-k kernel on them — logits, experts and
/// weights, for E from 8 to 1,000 (one to sixteen rows a warp), 1 and 3 tokens, affine8 and
/// bf16 rows, two experts with equal rows (a tie the lower index wins), launched twice (the
/// second launch after the first reset its ticket).
#[test]
#[ignore]
fn kernel_fused_routers_equal_their_parts() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0x2_0C1A);
    let h = 512usize;
    for (e, k, groups) in
        [(8usize, 2usize, (1, 1)), (60, 4, (1, 1)), (128, 8, (1, 1)), (256, 8, (8, 4)), (1000, 8, (1, 1))]
    {
        for (fmt, bits) in [(0, 16u32), (1, 8)] {
            let (mut wq, mut s, mut b, _) = random_qmat(&mut rng, e, h, fmt, bits, 64);
            // Expert e - 1's row is expert 1's (and its bias, below): a tie the lower index wins.
            let (rb, g) = (h * bits as usize / 8, h / 64);
            wq.copy_within(rb..2 * rb, (e - 1) * rb);
            if fmt != 0 {
                s.copy_within(g..2 * g, (e - 1) * g);
                b.copy_within(g..2 * g, (e - 1) * g);
            }
            let w = upload_qmat(&mut dev, (&wq, &s, &b), fmt, bits, 64);
            for m in [1usize, 3] {
                let what = format!("e {e} k {k} fmt {fmt} bits {bits} m {m}");
                let x: Vec<u16> = (0..m * h).map(|_| bf16_bits(rng.normal())).collect();
                let mut bias: Vec<f32> = (0..e).map(|_| 0.1 * rng.normal()).collect();
                // Experts 1 and e - 1 (equal rows) share a large bias: equal logits (softmax
                // routers) or keys (sigmoid routers) inside the top K, for every token.
                (bias[1], bias[e - 1]) = (10.0, 10.0);
                let (px, pb) = (dev.upload(&x).unwrap(), dev.upload(&bias).unwrap());
                let tickets = dev.upload(&vec![0i32; m]).unwrap();
                let (n_logits, n_sel) = (m * e * 4, m * k * 4);
                let bufs: Vec<u64> =
                    (0..6).map(|i| dev.alloc(if i % 3 == 0 { n_logits } else { n_sel }).unwrap()).collect();
                let poison = |dev: &Device| {
                    for (i, &p) in bufs.iter().enumerate() {
                        dev.fill(p, 0xFF, if i % 3 == 0 { n_logits } else { n_sel }).unwrap();
                    }
                };
                // (logits, idx, weights) of the parts [0..3] and of the fused kernel [3..6].
                let read = |dev: &Device, at: usize| {
                    let (mut l, mut i, mut wt) = (vec![0f32; m * e], vec![0i32; m * k], vec![0f32; m * k]);
                    dev.read(bufs[at], &mut l).unwrap();
                    dev.read(bufs[at + 1], &mut i).unwrap();
                    dev.read(bufs[at + 2], &mut wt).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    (bits(&l), i, bits(&wt))
                };
                let (e32, h32, k32, m32) = (e as i32, h as i32, k as i32, m as i32);
                let (ng, tg) = groups;
                let norm = (e != 60) as i32; // one case without renormalisation
                for kind in ["softmax", "sigmoid", "sigmoid_bias", "topk_softmax"] {
                    let with_bias = matches!(kind, "softmax" | "topk_softmax");
                    poison(&dev);
                    let mv = linear::MatvecArgs {
                        w,
                        x: rd(px),
                        y: wr(bufs[0]),
                        bias: rd(if with_bias { pb } else { 0 }),
                        n: e32,
                        k: h32,
                        m: m32,
                        out_f32: 1,
                    };
                    linear::matvec(&dev, &mv).unwrap();
                    let (l, idx, wout) = (rd(bufs[0]), wr(bufs[1]), wr(bufs[2]));
                    match kind {
                        "softmax" => {
                            let a = moe::RouterTopkArgs { logits: l, e: e32, k: k32, norm, idx, wout };
                            moe::router_topk(&dev, &a, m).unwrap()
                        }
                        "sigmoid" => {
                            let a = moe::RouterSigmoidArgs {
                                logits: l,
                                bias: rd(pb),
                                e: e32,
                                k: k32,
                                n_group: ng,
                                topk_group: tg,
                                norm,
                                scale: 2.5,
                                idx,
                                wout,
                            };
                            moe::router_sigmoid(&dev, &a, m).unwrap()
                        }
                        "sigmoid_bias" => {
                            let a = moe::RouterSigmoidBiasArgs {
                                logits: l,
                                bias: rd(pb),
                                e: e32,
                                k: k32,
                                norm,
                                scale: 1.0,
                                idx,
                                wout,
                            };
                            moe::router_sigmoid_bias(&dev, &a, m).unwrap()
                        }
                        _ => {
                            let a = gpt_oss::TopkSoftmaxArgs { logits: l, e: e32, k: k32, idx, wout };
                            gpt_oss::router_topk_softmax(&dev, &a, m).unwrap()
                        }
                    }
                    let want = read(&dev, 0);
                    assert!(
                        want.1.iter().all(|&i| (0..e32).contains(&i)),
                        "{what} {kind}: parts left experts unwritten"
                    );
                    for launch in 0..2 {
                        for (i, &p) in bufs[3..].iter().enumerate() {
                            dev.fill(p, 0xFF, if i == 0 { n_logits } else { n_sel }).unwrap();
                        }
                        let (x, logits, tk, idx, wout) = (rd(px), wr(bufs[3]), wr(tickets), wr(bufs[4]), wr(bufs[5]));
                        match kind {
                            "softmax" => {
                                let bias = rd(pb);
                                let a = moe::MoeRouterArgs {
                                    w,
                                    x,
                                    logits,
                                    bias,
                                    e: e32,
                                    h: h32,
                                    k: k32,
                                    norm,
                                    tickets: tk,
                                    idx,
                                    wout,
                                };
                                moe::moe_router(&dev, &a, m).unwrap()
                            }
                            "sigmoid" => {
                                let a = moe::MoeRouterSigmoidArgs {
                                    w,
                                    x,
                                    logits,
                                    ebias: rd(pb),
                                    e: e32,
                                    h: h32,
                                    k: k32,
                                    n_group: ng,
                                    topk_group: tg,
                                    norm,
                                    scale: 2.5,
                                    tickets: tk,
                                    idx,
                                    wout,
                                };
                                moe::moe_router_sigmoid(&dev, &a, m).unwrap()
                            }
                            "sigmoid_bias" => {
                                let a = moe::MoeRouterSigmoidBiasArgs {
                                    w,
                                    x,
                                    logits,
                                    ebias: rd(pb),
                                    e: e32,
                                    h: h32,
                                    k: k32,
                                    norm,
                                    scale: 1.0,
                                    tickets: tk,
                                    idx,
                                    wout,
                                };
                                moe::moe_router_sigmoid_bias(&dev, &a, m).unwrap()
                            }
                            _ => {
                                let bias = rd(pb);
                                let a = gpt_oss::MoeRouterTopkSoftmaxArgs {
                                    w,
                                    x,
                                    logits,
                                    bias,
                                    e: e32,
                                    h: h32,
                                    k: k32,
                                    tickets: tk,
                                    idx,
                                    wout,
                                };
                                gpt_oss::moe_router_topk_softmax(&dev, &a, m).unwrap()
                            }
                        }
                        let got = read(&dev, 3);
                        assert!(got.0 == want.0, "{what} {kind} launch {launch}: logits differ from the mat-vec's");
                        assert_eq!(got.1, want.1, "{what} {kind} launch {launch}: experts");
                        assert!(got.2 == want.2, "{what} {kind} launch {launch}: weights differ");
                    }
                }
            }
        }
    }
}

/// GPT-OSS kernels vs the CPU on fresh random data: the MXFP4 expert mat-vec with biases
/// (dequantisation in registers) for decode and prefill row counts, the top-k-then-softmax
/// router (with a tie), the clamped SwiGLU (values beyond the limit).
#[test]
#[ignore]
fn kernel_gpt_oss_match_cpu() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0x6F55);
    let (e, n, k) = (6usize, 72usize, 320usize);
    // E experts [n, k] MXFP4: random codes, scales around 2^-6 (no 255: NaN is refused at load).
    let codes: Vec<u8> = (0..e * n * k / 2).map(|_| rng.next_u64() as u8).collect();
    let scales: Vec<u8> = (0..e * n * k / 32).map(|_| 118 + (rng.next_u64() % 5) as u8).collect();
    let bias: Vec<f32> = (0..e * n).map(|_| 0.1 * rng.normal()).collect();
    let w = ops::QMat {
        w: rd(dev.upload(&codes).unwrap()),
        s: rd(dev.upload(&scales).unwrap()),
        b: rd(0),
        fmt: gpt_oss::FMT_MXFP4,
        bits: 4,
        group: 32,
    };
    let stacked = ops::Stacked { w, w_stride: (n * k / 8) as i64, sb_stride: (n * k / 32) as i64 };
    let pbias = dev.upload(&bias).unwrap();
    for (tokens, top) in [(1usize, 4usize), (13, 2)] {
        let rows = tokens * top;
        let idx: Vec<i32> = (0..rows).map(|_| (rng.next_u64() % e as u64) as i32).collect();
        let x: Vec<f32> = (0..tokens * k).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
        let (px, pi) = (dev.upload(&to_bf16(&x)).unwrap(), dev.upload(&idx).unwrap());
        let py = dev.alloc(rows * n * 2).unwrap();
        dev.fill(py, 0xFF, rows * n * 2).unwrap();
        let a = gpt_oss::ExpertBiasMatvecArgs {
            w: stacked,
            idx: rd(pi),
            per: top as i32,
            x: rd(px),
            bias: rd(pbias),
            y: wr(py),
            n: n as i32,
            k: k as i32,
        };
        gpt_oss::expert_bias_matvec(&dev, &a, rows).unwrap();
        let mut got = vec![0u16; rows * n];
        dev.read(py, &mut got).unwrap();
        let got = from_bf16(&got);
        let mut want = vec![0f32; rows * n];
        let mut row = vec![0f32; k];
        for q in 0..rows {
            let ex = idx[q] as usize;
            for r in 0..n {
                let at = ex * n + r;
                zmoe::checkpoint::quant::mxfp4_dequant_row(
                    &codes[at * k / 2..][..k / 2],
                    &scales[at * k / 32..][..k / 32],
                    &mut row,
                );
                let xr = &x[(q / top) * k..][..k];
                want[q * n + r] = row.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() + bias[at];
            }
        }
        assert!(got.iter().all(|v| v.is_finite()), "rows {rows}: unwritten output");
        let err = rel_err(&got, &want);
        assert!(err < 8e-3, "MXFP4 expert mat-vec, rows {rows}: rel err {err}");
    }

    // Router: top-k on logits, softmax over the k; an exact tie at the boundary.
    for (ne, kk) in [(32usize, 4usize), (128, 4), (8, 2)] {
        let m = 5;
        let mut logits: Vec<f32> = (0..m * ne).map(|_| rng.normal()).collect();
        logits[3] = logits[5];
        let pl = dev.upload(&logits).unwrap();
        let (pi, pw) = (dev.alloc(m * kk * 4).unwrap(), dev.alloc(m * kk * 4).unwrap());
        dev.fill(pi, 0xFF, m * kk * 4).unwrap();
        let a = gpt_oss::TopkSoftmaxArgs { logits: rd(pl), e: ne as i32, k: kk as i32, idx: wr(pi), wout: wr(pw) };
        gpt_oss::router_topk_softmax(&dev, &a, m).unwrap();
        let (mut gi, mut gw) = (vec![0i32; m * kk], vec![0f32; m * kk]);
        dev.read(pi, &mut gi).unwrap();
        dev.read(pw, &mut gw).unwrap();
        let (wi, ww) = zmoe::cpu::ops::topk_softmax(&logits, ne, kk);
        assert_eq!(gi.iter().map(|&i| i as usize).collect::<Vec<_>>(), wi, "e {ne} k {kk}");
        assert!(rel_err(&gw, &ww) < 1e-5);
    }

    // Clamped SwiGLU: gate and up spread well past ±7.
    let len = 5000;
    let g: Vec<f32> = (0..len).map(|_| half::bf16::from_f32(6.0 * rng.normal()).to_f32()).collect();
    let u: Vec<f32> = (0..len).map(|_| half::bf16::from_f32(6.0 * rng.normal()).to_f32()).collect();
    assert!(g.iter().any(|&v| v > 7.0) && u.iter().any(|&v| v < -7.0));
    let (pg, pu, pa) =
        (dev.upload(&to_bf16(&g)).unwrap(), dev.upload(&to_bf16(&u)).unwrap(), dev.alloc(len * 2).unwrap());
    let a = gpt_oss::ClampSwigluArgs { g: rd(pg), u: rd(pu), act: wr(pa), n: len as i64, limit: 7.0, alpha: 1.702 };
    gpt_oss::clamp_swiglu(&dev, &a).unwrap();
    let mut got = vec![0u16; len];
    dev.read(pa, &mut got).unwrap();
    let want: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| zmoe::cpu::ops::clamp_swiglu(a, b, 7.0, 1.702)).collect();
    assert!(rel_err(&from_bf16(&got), &want) < 8e-3);
}

/// RMSNorm, SwiGLU and combine on fresh random data vs f32 formulas.
#[test]
#[ignore]
fn kernel_elementwise_match_cpu() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(5);
    let (rows, n) = (7usize, 2048usize);
    let x: Vec<f32> = (0..rows * n).map(|_| half::bf16::from_f32(rng.normal() * 3.0).to_f32()).collect();
    let w: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect();
    let px = dev.upload(&to_bf16(&x)).unwrap();
    let pw = dev.upload(&w).unwrap();
    let py = dev.alloc(rows * n * 2).unwrap();
    dev.fill(py, 0xFF, rows * n * 2).unwrap();
    let a = norm::RmsnormArgs { x: rd(px), w: rd(pw), y: wr(py), n: n as i32, ld: n as i32, eps: 1e-6 };
    norm::rmsnorm(&dev, &a, rows, norm::NORM_THREADS).unwrap();
    let mut got = vec![0u16; rows * n];
    dev.read(py, &mut got).unwrap();
    let mut want = vec![0f32; rows * n];
    zmoe::cpu::ops::rms_norm(&x, &w, 1e-6, &mut want);
    let got = from_bf16(&got);
    assert!(got.iter().all(|v| v.is_finite()));
    assert!(rel_err(&got, &want) < 8e-3, "rmsnorm {}", rel_err(&got, &want));

    // In place over the first 1536 columns of 2048-wide rows (MLA's latent inside Kva):
    // the tail of each row is left as it was.
    let nl = 1536;
    let a = norm::RmsnormArgs { x: rd(px), w: rd(pw), y: wr(px), n: nl, ld: n as i32, eps: 1e-5 };
    norm::rmsnorm(&dev, &a, rows, norm::NORM_THREADS).unwrap();
    let mut got = vec![0u16; rows * n];
    dev.read(px, &mut got).unwrap();
    let mut want = x.clone();
    zmoe::cpu::ops::rms_norm_prefix(&x, n, &w[..nl as usize], 1e-5, &mut want);
    let got = from_bf16(&got);
    assert!(rel_err(&got, &want) < 8e-3, "strided rmsnorm {}", rel_err(&got, &want));
    for r in 0..rows {
        assert_eq!(&got[r * n + nl as usize..(r + 1) * n], &x[r * n + nl as usize..(r + 1) * n], "row tail");
    }

    let len = 5000usize;
    let g: Vec<f32> = (0..len).map(|_| half::bf16::from_f32(rng.normal() * 2.0).to_f32()).collect();
    let u: Vec<f32> = (0..len).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect();
    let (pg, pu) = (dev.upload(&to_bf16(&g)).unwrap(), dev.upload(&to_bf16(&u)).unwrap());
    let pa = dev.alloc(len * 2).unwrap();
    dev.fill(pa, 0xFF, len * 2).unwrap();
    moe::swiglu(&dev, &moe::SwigluArgs { g: rd(pg), u: rd(pu), act: wr(pa), n: len as i64 }).unwrap();
    let mut got = vec![0u16; len];
    dev.read(pa, &mut got).unwrap();
    let want: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| zmoe::cpu::ops::silu(a) * b).collect();
    assert!(rel_err(&from_bf16(&got), &want) < 8e-3);
}

/// LFM2's short convolution on the device vs the CPU reference for two sequences in two
/// slots, launched in chunks of 1..20 rows that mix both slots' rows (interleaved runs, so
/// the kernel stores one slot's window and loads the other's mid-launch; the states carried
/// on the device between launches; poisoned states read as zeros at position 0), kernel
/// widths 2..4, with and without a bias: bf16 tolerance (the GPU rounds u, y and the output).
#[test]
#[ignore]
fn kernel_short_conv_matches_cpu() {
    use zmoe::cuda::ops::conv;
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0x5C0);
    let h = 300usize;
    // Each launch: runs of (slot, rows); each slot gets 29 rows in all.
    let launches: [&[(usize, usize)]; 6] = [
        &[(0, 1)],
        &[(0, 5), (1, 3)],
        &[(1, 1), (0, 13), (1, 4)],
        &[(0, 1), (1, 1)],
        &[(1, 8), (0, 1)],
        &[(0, 8), (1, 12)],
    ];
    for (l, with_bias) in [(3usize, false), (2, true), (4, true)] {
        let total = 29usize;
        // bcx of slot s: [total, 3h].
        let bcx: Vec<Vec<f32>> =
            (0..2).map(|_| (0..total * 3 * h).map(|_| half::bf16::from_f32(rng.normal()).to_f32()).collect()).collect();
        let kernel: Vec<f32> = (0..h * l).map(|_| half::bf16::from_f32(0.5 * rng.normal()).to_f32()).collect();
        let bias: Vec<f32> = (0..h).map(|_| 0.1 * rng.normal()).collect();
        let (pk, pb) = (dev.upload(&kernel).unwrap(), if with_bias { dev.upload(&bias).unwrap() } else { 0 });
        let per = (l - 1).max(1) * h * 2;
        let state = dev.alloc(2 * per).unwrap();
        dev.fill(state, 0xFF, 2 * per).unwrap(); // poison: read as zeros at position 0
        let (pos, slot) = (dev.alloc(64 * 4).unwrap(), dev.alloc(64 * 4).unwrap());
        let mut cpu_state = vec![vec![0f32; (l - 1) * h]; 2];
        let (mut at, mut got, mut want) = ([0usize; 2], vec![Vec::new(); 2], vec![Vec::new(); 2]);
        for runs in launches {
            let (mut rows_in, mut rows_pos, mut rows_slot) = (Vec::new(), Vec::new(), Vec::new());
            for &(sl, n) in runs {
                rows_in.extend_from_slice(&bcx[sl][at[sl] * 3 * h..(at[sl] + n) * 3 * h]);
                rows_pos.extend((at[sl]..at[sl] + n).map(|p| p as i32));
                rows_slot.extend(std::iter::repeat_n(sl as i32, n));
                at[sl] += n;
            }
            let n = rows_pos.len();
            let pin = dev.upload(&to_bf16(&rows_in)).unwrap();
            let pout = dev.alloc(n * h * 2).unwrap();
            dev.fill(pout, 0xFF, n * h * 2).unwrap();
            dev.write(pos, &rows_pos).unwrap();
            dev.write(slot, &rows_slot).unwrap();
            let a = conv::ShortConvArgs {
                bcx: rd(pin),
                w: rd(pk),
                bias: rd(pb),
                state: wr(state),
                pos: rd(pos),
                slot: rd(slot),
                out: wr(pout),
                h: h as i32,
                l: l as i32,
                m: n as i32,
            };
            conv::short_conv(&dev, &a).unwrap();
            let mut out = vec![0u16; n * h];
            dev.read(pout, &mut out).unwrap();
            let out = from_bf16(&out);
            let mut r = 0;
            for &(sl, n) in runs {
                got[sl].extend_from_slice(&out[r * h..(r + n) * h]);
                let chunk = &rows_in[r * 3 * h..(r + n) * 3 * h];
                let mut o = vec![0f32; n * h];
                let b = with_bias.then_some(&bias[..]);
                zmoe::cpu::conv::short_conv(chunk, h, &kernel, b, &mut cpu_state[sl], &mut o);
                want[sl].extend(o);
                r += n;
            }
        }
        assert_eq!(at, [total; 2]);
        for sl in 0..2 {
            assert!(got[sl].iter().all(|x| x.is_finite()), "L {l} slot {sl}: unwritten output");
            let e = rel_err(&got[sl], &want[sl]);
            assert!(e < 1.5e-2, "L {l} bias {with_bias} slot {sl}: rel err {e}");
        }
    }
}

/// `conv_mixer` (in_proj + short conv of one token, one launch) equals `matvec1` then
/// `short_conv` bit for bit — outputs and the conv state — for a bf16 and an affine-4
/// in_proj, with biases, over decode steps from position 0 in slot 1 (the states start
/// poisoned).
#[test]
#[ignore]
fn kernel_conv_mixer_equals_its_parts() {
    use zmoe::cuda::ops::conv;
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0xC0C0);
    let (h, l) = (256usize, 3usize);
    for (fmt, bits) in [(0, 16u32), (1, 4)] {
        let w: Vec<f32> = (0..3 * h * h).map(|_| rng.normal() * 0.05).collect();
        let (wq, sc, bi): (Vec<u8>, Vec<u16>, Vec<u16>) = if fmt == 0 {
            (w.iter().flat_map(|&v| bf16_bits(v).to_le_bytes()).collect(), vec![], vec![])
        } else {
            let q = zmoe::checkpoint::quant::affine_quantize(&w, h, bits, 64);
            (q.packed.iter().flat_map(|w| w.to_le_bytes()).collect(), to_bf16(&q.scales), to_bf16(&q.biases))
        };
        let in_proj = upload_qmat(&mut dev, (&wq, &sc, &bi), fmt, bits, 64);
        let in_bias: Vec<f32> = (0..3 * h).map(|_| 0.1 * rng.normal()).collect();
        let kernel: Vec<f32> = (0..h * l).map(|_| half::bf16::from_f32(0.5 * rng.normal()).to_f32()).collect();
        let cbias: Vec<f32> = (0..h).map(|_| 0.1 * rng.normal()).collect();
        let (pib, pk, pcb) = (dev.upload(&in_bias).unwrap(), dev.upload(&kernel).unwrap(), dev.upload(&cbias).unwrap());
        // Two slots' states [2, L-1, H]; the steps run in slot 1.
        let sbytes = (l - 1) * h * 2;
        let (sa, sb) = (dev.alloc(2 * sbytes).unwrap(), dev.alloc(2 * sbytes).unwrap());
        dev.fill(sa, 0xFF, 2 * sbytes).unwrap();
        dev.fill(sb, 0x7F, 2 * sbytes).unwrap();
        let (bcx, oa, ob, pos, slot) = (
            dev.alloc(3 * h * 2).unwrap(),
            dev.alloc(h * 2).unwrap(),
            dev.alloc(h * 2).unwrap(),
            dev.alloc(4).unwrap(),
            dev.alloc(4).unwrap(),
        );
        dev.write(slot, &[1i32]).unwrap();
        for step in 0..6 {
            let x: Vec<f32> = (0..h).map(|_| rng.normal()).collect();
            let px = dev.upload(&to_bf16(&x)).unwrap();
            dev.write(pos, &[step]).unwrap();
            let m = linear::MatvecArgs {
                w: in_proj,
                x: rd(px),
                y: wr(bcx),
                bias: rd(pib),
                n: 3 * h as i32,
                k: h as i32,
                m: 1,
                out_f32: 0,
            };
            linear::matvec(&dev, &m).unwrap();
            let a = conv::ShortConvArgs {
                bcx: rd(bcx),
                w: rd(pk),
                bias: rd(pcb),
                state: wr(sa),
                pos: rd(pos),
                slot: rd(slot),
                out: wr(oa),
                h: h as i32,
                l: l as i32,
                m: 1,
            };
            conv::short_conv(&dev, &a).unwrap();
            let f = conv::ConvMixerArgs {
                in_proj,
                in_bias: rd(pib),
                x: rd(px),
                w: rd(pk),
                bias: rd(pcb),
                state: wr(sb),
                pos: rd(pos),
                slot: rd(slot),
                out: wr(ob),
                h: h as i32,
                l: l as i32,
            };
            conv::conv_mixer(&dev, &f).unwrap();
            let (mut ga, mut gb) = (vec![0u16; h], vec![0u16; h]);
            dev.read(oa, &mut ga).unwrap();
            dev.read(ob, &mut gb).unwrap();
            assert_eq!(ga, gb, "fmt {fmt} step {step}: conv_mixer output differs from its parts");
            let (mut ta, mut tb) = (vec![0u16; 2 * (l - 1) * h], vec![0u16; 2 * (l - 1) * h]);
            dev.read(sa, &mut ta).unwrap();
            dev.read(sb, &mut tb).unwrap();
            assert_eq!(ta[(l - 1) * h..], tb[(l - 1) * h..], "fmt {fmt} step {step}: slot 1's conv states differ");
            assert!(ta[..(l - 1) * h].iter().all(|&v| v == 0xFFFF), "fmt {fmt} step {step}: slot 0 written");
            assert!(from_bf16(&ga).iter().all(|v| v.is_finite()), "fmt {fmt} step {step}: poisoned state read");
        }
    }
    println!("conv_mixer bit-exact vs matvec1 + short_conv (bf16, affine4; 6 decode steps)");
}

/// LFM2's router on the device equals a host emulation of transformers' bf16 rounding: the
/// same experts, weights equal up to one bf16 step (device `expf` vs host `exp` before the
/// rounding), with and without the expert bias and renormalisation.
#[test]
#[ignore]
fn kernel_router_sigmoid_bias_matches_bf16_emulation() {
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(0xB1A5);
    let r = |x: f32| half::bf16::from_f32(x).to_f32();
    for (e, k, norm, with_bias, scale) in [
        (32usize, 4usize, 1, true, 1.0f32),
        (64, 4, 1, true, 1.0),
        (48, 6, 0, false, 2.5),
        (100, 8, 1, true, 1.0),
        (200, 8, 1, true, 1.0),
        (300, 8, 1, true, 1.0),
    ] {
        let m = 9;
        let logits: Vec<f32> = (0..m * e).map(|_| rng.normal() * 2.0).collect();
        let bias: Vec<f32> = (0..e).map(|_| 0.05 * rng.normal()).collect();
        let (pl, pb) = (dev.upload(&logits).unwrap(), if with_bias { dev.upload(&bias).unwrap() } else { 0 });
        let (pi, pw) = (dev.alloc(m * k * 4).unwrap(), dev.alloc(m * k * 4).unwrap());
        dev.fill(pi, 0xFF, m * k * 4).unwrap();
        dev.fill(pw, 0xFF, m * k * 4).unwrap();
        let a = moe::RouterSigmoidBiasArgs {
            logits: rd(pl),
            bias: rd(pb),
            e: e as i32,
            k: k as i32,
            norm,
            scale,
            idx: wr(pi),
            wout: wr(pw),
        };
        moe::router_sigmoid_bias(&dev, &a, m).unwrap();
        let (mut gi, mut gw) = (vec![0i32; m * k], vec![0f32; m * k]);
        dev.read(pi, &mut gi).unwrap();
        dev.read(pw, &mut gw).unwrap();
        for t in 0..m {
            let s: Vec<f32> = logits[t * e..(t + 1) * e].iter().map(|&x| r(1.0 / (1.0 + (-r(x)).exp()))).collect();
            let c: Vec<f32> = s.iter().zip(&bias).map(|(s, b)| if with_bias { s + b } else { *s }).collect();
            let sel = zmoe::cpu::ops::topk(&c, k);
            let tot: f32 = sel.iter().map(|&i| s[i]).sum();
            let den = r(r(tot) + 1e-6);
            let w: Vec<f32> = sel.iter().map(|&i| r(if norm == 1 { r(s[i] / den) } else { s[i] } * scale)).collect();
            let got: Vec<usize> = gi[t * k..(t + 1) * k].iter().map(|&i| i as usize).collect();
            assert_eq!(got, sel, "e {e} k {k} token {t}");
            // expf on the device and exp on the host may differ by an ulp before the bf16
            // rounding: equal, or one bf16 step apart.
            for (g, w) in gw[t * k..(t + 1) * k].iter().zip(&w) {
                assert!((g - w).abs() <= w.abs() / 128.0, "e {e} token {t}: weight {g} vs {w}");
            }
        }
    }
}

fn golden_dirs() -> Vec<PathBuf> {
    // The binary may run on another machine (scripts/gpu_test.sh sets ZMOE_REPO there).
    let repo =
        std::env::var_os("ZMOE_REPO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    common::golden_dirs(&repo)
}

/// A copy of a model folder with every f32 tensor rounded to bf16 — the GPU stores float
/// weights in bf16, so the CPU reference must see the same weights for a fair comparison.
fn as_bf16_weights(dir: &std::path::Path) -> tempfile::TempDir {
    common::copy_with_tensors(dir, |list| {
        for (_, dtype, _, data) in list.iter_mut().filter(|t| t.1 == safetensors::Dtype::F32) {
            let f: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            *data = to_bf16(&f).iter().flat_map(|b| b.to_le_bytes()).collect();
            *dtype = safetensors::Dtype::BF16;
        }
    })
}

fn backends(model: &Model, graph: bool) -> (CpuBackend, CudaBackend) {
    let plan = Plan::reference(model.config());
    let cpu = CpuBackend::new(model.config().clone(), model.weights.clone(), plan.clone()).unwrap();
    let gpu = CudaBackend::new(model.config().clone(), &model.weights, plan, graph).unwrap();
    (cpu, gpu)
}

/// Whole-model prefill logits on the GPU vs the CPU reference: bf16 tolerance.
#[test]
#[ignore]
fn model_logits_match_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    // The GPT-OSS goldens (HF init 0.2, no q/k norm: near one-hot attention) are too
    // ill-conditioned for an f32-vs-bf16 comparison: transformers' own bf16 model is further
    // from f32 on them (median 3.8e-2–1.9e-1) than this GPU, and a numpy forward that rounds
    // at the GPU's storage points reproduces the GPU's errors and spike counts exactly
    // (bench/RESULTS.md, session 7). teacher_forced_greedy_agrees checks them margin-aware;
    // here the synthetic GPT-OSS models stand for the family.
    let family_dir = |d: &PathBuf| d.parent().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
    let mut dirs: Vec<_> = golden_dirs().into_iter().filter(|d| family_dir(d).as_deref() != Some("gpt_oss")).collect();
    dirs.push(common::synth_tiny(tmp.path(), "tiny4", SynthQuant::Affine4, 21));
    dirs.push(common::synth_tiny(tmp.path(), "tiny8", SynthQuant::Affine8, 22));
    dirs.push(common::synth_tiny(tmp.path(), "tinybf", SynthQuant::Bf16, 23));
    dirs.push(common::synth_preset(tmp.path(), "glm4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 24));
    dirs.push(common::synth_preset(tmp.path(), "dsbf", "deepseek_v3/deepseek-tiny", SynthQuant::Bf16, 25));
    dirs.push(common::synth_preset(tmp.path(), "kimi8", "deepseek_v3/kimi-k2-tiny", SynthQuant::Affine8, 26));
    dirs.push(common::synth_preset(tmp.path(), "lfm4", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4, 27));
    dirs.push(common::synth_preset(tmp.path(), "lfmbf", "lfm2_moe/lfm2-tiny", SynthQuant::Bf16, 28));
    dirs.push(common::synth_preset(tmp.path(), "goss4", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 37));
    dirs.push(common::synth_preset(tmp.path(), "gossbf", "gpt_oss/gpt-oss-tiny", SynthQuant::Bf16, 38));
    dirs.push(common::synth_preset(tmp.path(), "goss8", "gpt_oss/gpt-oss-tiny", SynthQuant::Affine8, 39));
    let mut failures = Vec::new();
    for dir in dirs {
        let bf = as_bf16_weights(&dir);
        let model = Model::load(bf.path()).unwrap();
        let v = model.config().vocab_size;
        let tokens: Vec<u32> = (0..100).map(|i| (i * 7919 + 13) % v as u32).collect();
        let (mut cpu, mut gpu) = backends(&model, false);
        let want = cpu.forward(&tokens, true).unwrap();
        let got = gpu.forward(&tokens, true).unwrap();
        // Per position: bf16 activations give ~1e-2; a router choice that flips under bf16
        // (near-tie gates) gives an isolated spike. Require the typical position to be within
        // bf16 tolerance and spikes to be rare.
        let mut per_pos: Vec<f64> =
            (0..tokens.len()).map(|p| rel_err(&got[p * v..(p + 1) * v], &want[p * v..(p + 1) * v])).collect();
        let spikes = per_pos.iter().filter(|&&e| e > 5e-2).count();
        per_pos.sort_by(f64::total_cmp);
        let (median, worst) = (per_pos[per_pos.len() / 2], per_pos[per_pos.len() - 1]);
        println!(
            "{}: logits rel err median {median:.1e}, worst {worst:.1e}, spikes >5e-2: {spikes}/100",
            dir.display()
        );
        // Sigmoid routers are looser: scores near 0.5 plus the correction bias put many
        // experts within bf16 noise of the k-th, and a flipped group (n_group > 1) swaps
        // several experts at once, so the golden fixtures (init std 0.2) see more spikes.
        // teacher_forced_greedy_agrees is the margin-aware check for them. LFM2's router rounds
        // logits and scores to bf16 on the GPU (as transformers' bf16 model does) and the
        // CPU oracle does not: the same looseness.
        // Measured on an H100 (2026-12-07): LFM2 medians 1.6–3.4e-2 with 7–27 spikes per 100
        // positions (its bf16 router flips experts most often), synthetic GPT-OSS 5–7e-3 with
        // 2–12 (top-k then softmax: a flip moves the whole weight), MLA ≤ 6.4e-3 with ≤ 7
        // spikes, Qwen3 ≤ 1.3e-2 with ≤ 2 spikes.
        let family = model.config().family;
        let (max_median, max_spikes) = if family == zmoe::config::Family::Lfm2Moe {
            (5e-2, 35)
        } else if family.is_mla() || family == zmoe::config::Family::GptOss {
            (3e-2, 20)
        } else {
            (2e-2, 10)
        };
        if median > max_median || spikes > max_spikes || !got.iter().all(|x| x.is_finite()) {
            failures.push(format!("{}: median {median}, spikes {spikes}", dir.display()));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Teacher-forced greedy: feed the CPU's greedy sequence to both; the GPU's argmax must equal
/// the CPU's wherever the CPU's top-1/top-2 margin exceeds the measured bf16 error bound.
#[test]
#[ignore]
fn teacher_forced_greedy_agrees() {
    let mut failures = Vec::new();
    for dir in golden_dirs() {
        let bf = as_bf16_weights(&dir);
        let model = Model::load(bf.path()).unwrap();
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        let prompt: Vec<u32> =
            g["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let (mut cpu, mut gpu) = backends(&model, true);
        // The CPU's greedy continuation of 64 tokens.
        let mut seq = prompt.clone();
        let mut l = cpu.forward(&prompt, false).unwrap();
        for _ in 0..64 {
            let t = zmoe::sample::argmax(&l) as u32;
            seq.push(t);
            l = cpu.forward(&[t], false).unwrap();
        }
        cpu.reset();
        let want = cpu.forward(&seq, true).unwrap();
        let got = gpu.forward(&seq, true).unwrap();
        let vsz = model.config().vocab_size;
        // The bf16 error bound, measured once over the whole run (not at the position being
        // judged, which would be circular): the 99.9th percentile of |Δlogit|, doubled
        // (two logits must move to swap top-1 and top-2).
        let mut errs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        errs.sort_by(f32::total_cmp);
        let bound = 2.0 * errs[errs.len() * 999 / 1000];
        let mut disagreements = Vec::new();
        for p in prompt.len() - 1..seq.len() {
            let (w, gg) = (&want[p * vsz..(p + 1) * vsz], &got[p * vsz..(p + 1) * vsz]);
            let (a, b) = (zmoe::sample::argmax(w), zmoe::sample::argmax(gg));
            let mut sorted = w.to_vec();
            sorted.sort_by(|x, y| y.total_cmp(x));
            let margin = sorted[0] - sorted[1];
            if a != b {
                disagreements.push(format!("pos {p}: cpu {a} gpu {b} margin {margin:.4}"));
                if margin > bound {
                    failures
                        .push(format!("{}: pos {p} cpu {a} gpu {b}, margin {margin} > bound {bound}", dir.display()));
                }
            }
        }
        println!("{}: 65 positions, error bound {bound:.4}, disagreements {:?}", dir.display(), disagreements);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Decode through the captured graphs gives bit-identical logits to eager launches: single
/// decode steps, and batches of several slots' decode rows (a graph per batch size).
#[test]
#[ignore]
fn graph_replay_equals_eager() {
    let tmp = tempfile::tempdir().unwrap();
    // LFM2: the conv states move on inside the graph; a second sequence after reset() reads
    // them as zeros again (position 0), with no reset launch. GPT-OSS: 40 decode steps cross
    // its 6-key window (ring cache) many times.
    for (name, preset, quant) in [
        ("tiny", "qwen3_moe/tiny", SynthQuant::Affine4),
        ("lfm2", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4),
        ("goss", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4),
        ("mla512", "glm4_moe_lite/glm-tiny-l512", SynthQuant::Affine4),
    ] {
        let dir = common::synth_preset(tmp.path(), name, preset, quant, 31);
        let model = Model::load(&dir).unwrap();
        let plan = Plan::reference(model.config());
        let mut eager = CudaBackend::new(model.config().clone(), &model.weights, plan.clone(), false).unwrap();
        let mut graph = CudaBackend::new(model.config().clone(), &model.weights, plan, true).unwrap();
        for (round, prompt) in [[5u32, 9, 100, 7], [11, 3, 250, 64]].iter().enumerate() {
            eager.reset();
            graph.reset();
            let (mut a, mut b) = (eager.forward(prompt, false).unwrap(), graph.forward(prompt, false).unwrap());
            assert_eq!(a, b);
            for step in 0..40 {
                let t = zmoe::sample::argmax(&a) as u32;
                a = eager.forward(&[t], false).unwrap();
                b = graph.forward(&[t], false).unwrap();
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{preset} round {round} step {step}: graph differs from eager"
                );
            }
        }
        assert_eq!(graph.captured_graphs(), [1], "{preset}: one-row decode graph captured");
        // Batches: 4 slots prefilled together with 2..5 tokens (a mixed batch, eager in
        // both; the slots end at different positions), then decode batches of 4 and of 3 rows
        // (replayed from the per-size graphs in `graph`). `set_slots` drops the graphs (they
        // hold slot sizes), so only the batch sizes are captured afterwards.
        eager.set_slots(4).unwrap();
        graph.set_slots(4).unwrap();
        let mut rows: Vec<Row> = (0..4)
            .flat_map(|s| {
                (0..2 + s).map(move |p| Row {
                    slot: s,
                    pos: p,
                    token: (7 + 13 * s + p) as u32,
                    logits: p == 1 + s,
                    long_prompt: false,
                })
            })
            .collect();
        for step in 0..24 {
            let (a, b) = (eager.forward_rows(&rows).unwrap(), graph.forward_rows(&rows).unwrap());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{preset} batch step {step} ({} rows): graph differs from eager",
                rows.len()
            );
            let v = model.config().vocab_size;
            let slots: Vec<usize> = rows.iter().filter(|r| r.logits).map(|r| r.slot).collect();
            // Slot 3 leaves after 12 steps: batches of 3 from then on.
            rows = (slots.iter().zip(a.chunks_exact(v)))
                .filter(|&(&s, _)| s != 3 || step < 12)
                .map(|(&s, l)| Row {
                    slot: s,
                    pos: graph.slot_position(s),
                    token: zmoe::sample::argmax(l) as u32,
                    logits: true,
                    long_prompt: false,
                })
                .collect();
        }
        let sizes = graph.captured_graphs();
        assert_eq!(sizes, [3, 4], "{preset}: graphs captured for {sizes:?} rows");
        println!("{preset}: graph == eager over 2 × 40 decode steps and 23 batched steps (4 and 3 rows)");
    }
}

/// The device sampler: greedy equals the host's argmax (ties to the lowest id); temperature /
/// top-k / top-p draws follow the host Sampler's, differing only where float rounding moves a
/// cumulative-probability boundary (then by one rank). When the answer may lie beyond the
/// device's candidates it says so (the backend then samples on the host): never with top-k,
/// rarely otherwise, always on a flat row.
#[test]
#[ignore]
fn kernel_sample_token_matches_host() {
    use zmoe::sample::{Sampler, SamplingParams};
    let mut dev = Device::open().unwrap();
    let mut rng = Rng::new(99);
    let out = dev.alloc(8).unwrap();
    let run = |dev: &mut Device, logits: &[f32], p: SamplingParams, step: u64| -> (i32, i32) {
        let pl = dev.upload(logits).unwrap();
        dev.fill(out, 0xFF, 8).unwrap();
        let a = sample::SampleArgs {
            logits: rd(pl),
            v: logits.len() as i32,
            temp: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k as i32,
            seed: p.seed,
            step,
            out: wr(out),
        };
        sample::sample(dev, &a).unwrap();
        let mut o = [0i32; 2];
        dev.read(out, &mut o).unwrap();
        (o[0], o[1])
    };
    for v in [1000usize, 151_936] {
        let mut logits: Vec<f32> = (0..v).map(|_| rng.normal() * 10.0).collect();
        let top = zmoe::sample::argmax(&logits);
        logits[v - 7] = logits[top]; // a tie at the maximum: the lower id must win
        let (t, flag) = run(&mut dev, &logits, SamplingParams::default(), 0);
        assert_eq!((t as usize, flag), (top.min(v - 7), 0), "greedy v {v}");
        for p in [
            SamplingParams { temperature: 0.8, top_p: 1.0, top_k: 50, seed: 3 },
            SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 0, seed: 4 },
            SamplingParams { temperature: 0.6, top_p: 0.95, top_k: 20, seed: 5 },
            SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 6 },
            SamplingParams { temperature: 1.5, top_p: 0.98, top_k: 0, seed: 7 },
        ] {
            let mut host = Sampler::new(p);
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let rank = |t: usize| order.iter().position(|&o| o == t).unwrap() as i64;
            let (mut differ, mut fallbacks, draws) = (Vec::new(), 0, 300u64);
            for step in 0..draws {
                let want = host.sample(&logits) as usize;
                let (got, flag) = run(&mut dev, &logits, p, step);
                if flag != 0 {
                    assert_eq!(p.top_k, 0, "v {v} {p:?}: a top-k draw must never need the host");
                    fallbacks += 1;
                } else if got as usize != want {
                    differ.push((step, want, got));
                    assert_eq!((rank(got as usize) - rank(want)).abs(), 1, "v {v} {p:?} step {step}");
                }
            }
            println!(
                "sample v {v} {p:?}: {} of {draws} draws differ from the host {differ:?}, {fallbacks} left to the host",
                differ.len()
            );
            assert!(differ.len() <= 3, "v {v} {p:?}: {differ:?}");
            assert!(fallbacks <= draws / 20, "v {v} {p:?}: {fallbacks} host fallbacks");
        }
    }
    // A flat distribution has more candidates than the device sort holds: host fallback.
    let flat = vec![0.5f32; 151_936];
    let p = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 1 };
    assert_eq!(run(&mut dev, &flat, p, 0).1, 1);
}

/// A prefill of n tokens equals n decode steps bit for bit on the GPU: the prefill path
/// groups (token, slot) rows by expert and tiles tokens by 8, the decode path does neither,
/// and both must run the same per-row arithmetic. 150 tokens: 3 chunks of 64, or 10 forwards
/// of 16 tokens (short prompts stay off the tensor cores), or one chunk with them off.
#[test]
#[ignore]
fn prefill_equals_decode_bitexact() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, preset, q, seed) in [
        ("t4", "qwen3_moe/tiny", SynthQuant::Affine4, 41),
        ("t8", "qwen3_moe/tiny", SynthQuant::Affine8, 42),
        ("tb", "qwen3_moe/tiny", SynthQuant::Bf16, 43),
        ("g4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 44),
        ("db", "deepseek_v3/deepseek-tiny", SynthQuant::Bf16, 45),
        // MLA at GLM-4.7-Flash's latent widths (512 + 64).
        ("gw", "glm4_moe_lite/glm-tiny-l512", SynthQuant::Affine4, 40),
        // LFM2: the conv state crosses the 16-token prefill chunks and feeds decode.
        ("l4", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4, 46),
        ("lb", "lfm2_moe/lfm2-tiny", SynthQuant::Bf16, 47),
        // GPT-OSS: 150 tokens cross the 6-key window and the 16-token prefill chunks (ring).
        ("o4", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 48),
        ("ob", "gpt_oss/gpt-oss-tiny", SynthQuant::Bf16, 49),
    ] {
        let dir = common::synth_preset(tmp.path(), name, preset, q, seed);
        let model = Model::load(&dir).unwrap();
        let v = model.config().vocab_size;
        let plan = Plan::reference(model.config());
        let mut dec = CudaBackend::new(model.config().clone(), &model.weights, plan.clone(), true).unwrap();
        let tokens: Vec<u32> = (0..150).map(|i| (i * 104_729 + 17) % v as u32).collect();
        let want: Vec<Vec<f32>> = tokens.iter().map(|&t| dec.forward(&[t], false).unwrap()).collect();
        // The row-per-token kernels: forwards of BATCH_ROWS tokens with the tensor cores on
        // (short prompts, e.g. draft tokens to verify), and whole-prompt forwards in chunks
        // of CHUNK and of 64 with them off (the batch plan at up to CHUNK rows). A long prompt
        // on tensor cores: prefill_tensor_cores_close_to_decode.
        for (chunk, tc) in [(zmoe::plan::lower::BATCH_ROWS, true), (zmoe::cuda::CHUNK, false), (64, false)] {
            let mut pre = CudaBackend::new(model.config().clone(), &model.weights, plan.clone(), false).unwrap();
            pre.set_tensor_cores(tc);
            let all: Vec<f32> = if tc {
                tokens.chunks(chunk).flat_map(|c| pre.forward(c, true).unwrap()).collect()
            } else {
                pre.set_prefill_chunk(chunk).unwrap();
                pre.forward(&tokens, true).unwrap()
            };
            for (p, one) in want.iter().enumerate() {
                let row = &all[p * v..(p + 1) * v];
                assert!(
                    row.iter().zip(one).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} chunk {chunk}: position {p}: prefill logits differ from decode"
                );
            }
            println!("{name} chunk {chunk}: prefill == decode bit-exact over 150 positions");
        }
    }
}

/// Prompt chunks on tensor cores (issue 19) against decode: the logits of a 150-token
/// prompt prefilled in one chunk and in chunks of 64 (conv states and GPT-OSS rings cross
/// the edges) stay within bf16 tolerance of one-token decode at every position; the measured
/// error is printed. The chunking changes no bit: one chunk, chunks of 64 and chunks of 16
/// give the same logits (each row is computed alone, so a long prompt's tokens do not depend
/// on how a server splits it). (Forwards of at most BATCH_ROWS tokens are bit-exact with
/// decode: prefill_equals_decode_bitexact.)
/// glm-tiny-l512 takes MLA's tensor-core attention (512 + 64-wide latent rows); the other MLA
/// presets' narrower latents keep the split kernel.
#[test]
#[ignore]
fn prefill_tensor_cores_close_to_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, preset, q, seed) in [
        ("t4", "qwen3_moe/tiny", SynthQuant::Affine4, 51),
        ("t8", "qwen3_moe/tiny", SynthQuant::Affine8, 52),
        ("tb", "qwen3_moe/tiny", SynthQuant::Bf16, 53),
        ("g4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 54),
        ("db", "deepseek_v3/deepseek-tiny", SynthQuant::Bf16, 55),
        ("gw", "glm4_moe_lite/glm-tiny-l512", SynthQuant::Affine4, 59),
        ("l4", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4, 56),
        ("o4", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 57),
        ("ob", "gpt_oss/gpt-oss-tiny", SynthQuant::Bf16, 58),
    ] {
        let dir = common::synth_preset(tmp.path(), name, preset, q, seed);
        let model = Model::load(&dir).unwrap();
        let v = model.config().vocab_size;
        let plan = Plan::reference(model.config());
        let tokens: Vec<u32> = (0..150).map(|i| (i * 104_729 + 17) % v as u32).collect();
        let mut dec = CudaBackend::new(model.config().clone(), &model.weights, plan.clone(), true).unwrap();
        let want: Vec<f32> = tokens.iter().flat_map(|&t| dec.forward(&[t], false).unwrap()).collect();
        let mut first: Option<Vec<f32>> = None;
        // 149: a one-row last chunk (the prefill plan on tensor cores even for one row).
        for chunk in [zmoe::cuda::CHUNK, 64, 16, 149] {
            let mut pre = CudaBackend::new(model.config().clone(), &model.weights, plan.clone(), false).unwrap();
            assert!(pre.name().contains(", tc"), "{}: tensor cores off (ZMOE_TC=0 or before sm_80)", pre.name());
            pre.set_prefill_chunk(chunk).unwrap();
            let got = pre.forward(&tokens, true).unwrap();
            match &first {
                None => first = Some(got.clone()),
                Some(one) => {
                    let same = got.iter().zip(one).all(|(a, b)| a.to_bits() == b.to_bits());
                    if !same {
                        failures.push(format!("{name} chunk {chunk}: logits differ from one chunk's"));
                    }
                }
            }
            let mut per_pos: Vec<f64> =
                (0..tokens.len()).map(|p| rel_err(&got[p * v..(p + 1) * v], &want[p * v..(p + 1) * v])).collect();
            let spikes = per_pos.iter().filter(|&&e| e > 5e-2).count();
            let exact = (0..tokens.len()).filter(|&p| got[p * v..(p + 1) * v] == want[p * v..(p + 1) * v]).count();
            per_pos.sort_by(f64::total_cmp);
            let (median, worst) = (per_pos[per_pos.len() / 2], per_pos[per_pos.len() - 1]);
            println!(
                "{name} chunk {chunk}: logits vs decode rel err median {median:.1e}, worst {worst:.1e}, \
                 spikes >5e-2 {spikes}/150, bit-exact positions {exact}/150"
            );
            // The tensor cores only reorder f32 sums; the rest is bf16 rounding noise, as for
            // GPU vs CPU (model_logits_match_cpu, whose looser bounds for sigmoid routers —
            // MLA families and LFM2 — apply for the same reason), router flips as rare spikes.
            let cfg = model.config();
            let sigmoid = cfg.family.is_mla() || cfg.family == zmoe::config::Family::Lfm2Moe;
            let (max_median, max_spikes) = if sigmoid { (3e-2, 20) } else { (2e-2, 10) };
            if median > max_median || spikes > max_spikes || !got.iter().all(|x| x.is_finite()) {
                failures.push(format!("{name} chunk {chunk}: median {median}, spikes {spikes}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// The decode profile times every step of the plan, and greedy generation through the
/// device sampler picks the argmax of the logits the backend computes.
#[test]
#[ignore]
fn profile_and_device_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    for preset in ["qwen3_moe/tiny", "glm4_moe_lite/glm-tiny", "lfm2_moe/lfm2-tiny"] {
        let dir = common::synth_preset(tmp.path(), preset.split('/').nth(1).unwrap(), preset, SynthQuant::Affine4, 51);
        let model = Model::load(&dir).unwrap();
        let plan = Plan::reference(model.config());
        let mut gpu = CudaBackend::new(model.config().clone(), &model.weights, plan.clone(), true).unwrap();
        let mut check = CudaBackend::new(model.config().clone(), &model.weights, plan.clone(), true).unwrap();
        let mut sampler = zmoe::sample::Sampler::new(Default::default());
        let mut next = gpu.forward_sample(&[3, 4, 5], &mut sampler).unwrap();
        let mut want = zmoe::sample::argmax(&check.forward(&[3, 4, 5], false).unwrap()) as u32;
        for step in 0..30 {
            assert_eq!(next, want, "step {step}");
            next = gpu.forward_sample(&[next], &mut sampler).unwrap();
            want = zmoe::sample::argmax(&check.forward(&[want], false).unwrap()) as u32;
        }
        let prof = gpu.profile_decode(3).unwrap();
        assert_eq!(prof.len(), plan.steps.len());
        assert!(prof.iter().all(|s| s.us.is_finite() && s.us > 0.0), "{prof:?}");
        // Profiling leaves the sequence as it was (LFM2: the conv states are restored).
        assert_eq!(gpu.forward(&[next], false).unwrap(), check.forward(&[want], false).unwrap(), "{preset}");
        let total: f64 = prof.iter().map(|s| s.us).sum();
        println!("{preset} profile: {} steps, {total:.1} µs per decode step", prof.len());
    }
}

/// Patched plans (each pattern alone, and all) give bit-identical logits to the reference
/// plan on the GPU: a prefill of every position (fused MoE steps run their grouped
/// components there) and 40 graph-replayed decode steps (the fused decode kernels).
#[test]
#[ignore]
fn patched_plan_bitexact_on_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = golden_dirs();
    dirs.push(common::synth_tiny(tmp.path(), "p4", SynthQuant::Affine4, 61));
    dirs.push(common::synth_tiny(tmp.path(), "p8", SynthQuant::Affine8, 62));
    dirs.push(common::synth_tiny(tmp.path(), "pb", SynthQuant::Bf16, 63));
    dirs.push(common::synth_preset(tmp.path(), "g4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 64));
    dirs.push(common::synth_preset(tmp.path(), "gb", "glm4_moe_lite/glm-tiny", SynthQuant::Bf16, 65));
    dirs.push(common::synth_preset(tmp.path(), "k4", "deepseek_v3/kimi-k2-tiny", SynthQuant::Affine4, 66));
    dirs.push(common::synth_preset(tmp.path(), "l4", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4, 67));
    dirs.push(common::synth_preset(tmp.path(), "lb", "lfm2_moe/lfm2-tiny", SynthQuant::Bf16, 68));
    dirs.push(common::synth_preset(tmp.path(), "o4", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 69));
    // The GPU reads f32 checkpoints as bf16: convert first, so the reference is the same model.
    let bf: Vec<tempfile::TempDir> = dirs.iter().map(|d| as_bf16_weights(d)).collect();
    let dirs: Vec<PathBuf> = bf.iter().map(|t| t.path().to_path_buf()).collect();
    common::assert_patterns_bitexact(zmoe::BackendKind::Cuda, &dirs, 40, 40);
}

/// Issue 14 on the GPU: a NaN logit stops decoding with an error (sample_token flags it on the
/// device; greedy and sampled, graph and eager), forward checks its copied logits, and
/// `--ctx` sizes the KV cache (generation stops at its end; a cache that cannot fit in device
/// memory is a clear error).
#[test]
#[ignore]
fn non_finite_logits_and_context_on_gpu() {
    use zmoe::generate::{GenerateOptions, generate};
    use zmoe::sample::SamplingParams;
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_tiny(tmp.path(), "tiny", SynthQuant::Bf16, 1);
    let nan = common::copy_with_tensors(&dir, |l| {
        let t = l.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.3.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&0x7FC0u16.to_le_bytes()));
    });
    let opts = |temperature: f32, max_tokens: usize| GenerateOptions {
        max_tokens,
        sampling: SamplingParams { temperature, top_p: 1.0, top_k: 0, seed: 1 },
        ignore_eos: true,
    };
    let model = Model::load(nan.path()).unwrap();
    for graph in [true, false] {
        let cfg = model.config().clone();
        let mut be = CudaBackend::new(cfg.clone(), &model.weights, Plan::reference(&cfg), graph).unwrap();
        for temperature in [0.0, 0.9] {
            let e = generate(&mut be, &[1, 2, 3], &opts(temperature, 4), |_| {}).unwrap_err();
            assert!(matches!(e, zmoe::Error::NonFinite { position: 2, .. }), "graph {graph}, t {temperature}: {e}");
        }
        be.reset();
        let e = be.forward(&[1, 2, 3], true).unwrap_err();
        assert!(matches!(e, zmoe::Error::NonFinite { position: 0, .. }), "{e}");
    }

    let model = Model::load(&dir).unwrap();
    let cfg = model.config().clone();
    let mut be = CudaBackend::with_context(cfg.clone(), &model.weights, Plan::reference(&cfg), true, Some(8)).unwrap();
    assert_eq!(be.max_context(), 8);
    let stats = generate(&mut be, &[1, 2, 3], &opts(0.0, 20), |_| {}).unwrap();
    assert_eq!((stats.tokens.len(), stats.context_full), (5, true));
    let default = CudaBackend::new(cfg.clone(), &model.weights, Plan::reference(&cfg), true).unwrap();
    assert_eq!(default.max_context(), 8192, "the default: 8192 (max_position_embeddings is 40960)");
    drop(default);
    let e = CudaBackend::with_context(cfg.clone(), &model.weights, Plan::reference(&cfg), true, Some(1 << 28))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--ctx 268435456") && e.contains("free"), "{e}");
}

/// Batch invariance on the GPU (issue 20): the shared body of tests/batch.rs — 20 greedy
/// sequences (every fifth a long prompt, on tensor cores) through 16 CUDA slots (GPT-OSS 8)
/// with continuous batching and chunked prefill (batches of decode rows replay the per-size
/// graphs, mixed batches run eagerly, of any slot) equal each sequence alone, bit for bit;
/// GQA and MLA caches, LFM2's conv states (per slot, read as zeros at a slot's position 0,
/// rows of several slots in one short_conv launch), GPT-OSS's per-slot rings (window 6; 520
/// decode steps make sequences of up to 556 tokens, past the ring's window + CHUNK − 1 = 517
/// rows, so every slot's ring wraps), patched plans.
#[test]
#[ignore]
fn batch_invariant_on_gpu() {
    assert!(Device::open().unwrap().tensor_cores(), "tensor cores off: the long prompts would not take them");
    let tmp = tempfile::tempdir().unwrap();
    // GPT-OSS on 8 slots: 1,024 tokens each (the default 8,192-token cache split 8 ways), room
    // for a 36-token prompt and 520 decode steps.
    for (name, preset, quant, seed, slots, decode) in [
        ("q4", "qwen3_moe/tiny", SynthQuant::Affine4, 81, 16, 6),
        ("qb", "qwen3_moe/tiny", SynthQuant::Bf16, 83, 16, 6),
        ("g4", "glm4_moe_lite/glm-tiny", SynthQuant::Affine4, 82, 16, 6),
        ("gw", "glm4_moe_lite/glm-tiny-l512", SynthQuant::Affine4, 89, 16, 6),
        ("k4", "deepseek_v3/kimi-k2-tiny", SynthQuant::Affine4, 84, 16, 6),
        ("l4", "lfm2_moe/lfm2-tiny", SynthQuant::Affine4, 85, 16, 6),
        ("lb", "lfm2_moe/lfm2-tiny", SynthQuant::Bf16, 86, 16, 6),
        ("o4", "gpt_oss/gpt-oss-tiny", SynthQuant::Mxfp4, 87, 8, 520),
        ("ob", "gpt_oss/gpt-oss-tiny", SynthQuant::Bf16, 88, 8, 520),
    ] {
        let dir = common::synth_preset(tmp.path(), name, preset, quant, seed);
        let ok = common::assert_batch_invariant(zmoe::BackendKind::Cuda, &dir, slots, 20, decode);
        assert!(ok, "{name}: CUDA slots");
    }
}

/// NCCL with one rank ≡ no NCCL (issue 21): a one-rank communicator on GPU 0 all-gathers a
/// buffer of random f32 rows back unchanged, bit for bit. Needs libnccl; without it the probe
/// must say `Unavailable`, and the test fails to say so plainly.
#[test]
#[ignore]
fn nccl_one_rank_all_gather_is_identity() {
    use cudarc::driver::CudaContext;
    use cudarc::nccl::{Comm, Id};
    let version = zmoe::cuda::nccl::probe().unwrap_or_else(|e| panic!("{e}"));
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let mut rng = Rng::new(0x21);
    // One token's K = 8 expert rows of hidden 7168 (DeepSeek-V3's shape).
    let x: Vec<f32> = (0..8 * 7168).map(|_| rng.normal()).collect();
    let send = stream.clone_htod(&x).unwrap();
    let mut recv = stream.alloc_zeros::<f32>(x.len()).unwrap();
    let comm = Comm::from_rank(stream.clone(), 0, 1, Id::new().unwrap()).unwrap();
    comm.all_gather(&send, &mut recv).unwrap();
    let back = stream.clone_dtoh(&recv).unwrap();
    assert!(
        back.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()),
        "NCCL {version}: one-rank all-gather changed the rows"
    );
}

/// An upload is ordered with the kernels' stream (session 13): a buffer uploaded from
/// pageable memory and at once copied on the stream must arrive whole. With the legacy
/// synchronous copy the upload could still be in flight when the stream's copy read it (the
/// NULL stream does not order a non-blocking stream), which made foundry cases fail only
/// when several test processes shared the GPU. 64 MiB a round, fresh allocations and a new
/// pattern each time; the last differing word is reported (a staged copy's tail lands last).
/// It catches the old race only when the timing exposes it.
#[test]
#[ignore]
fn uploads_are_ordered_with_the_stream() {
    let mut dev = Device::open().unwrap();
    let n = 16 << 20; // u32 words: 64 MiB
    for round in 0..8u32 {
        let mut rng = Rng::new(0x5eed + round as u64);
        let data: Vec<u32> = (0..n).map(|_| rng.next_u64() as u32 | 1).collect();
        let mark = dev.mark();
        let src = dev.upload(&data).unwrap();
        let dst = dev.alloc(n * 4).unwrap();
        dev.fill(dst, 0, n * 4).unwrap();
        dev.copy(dst, src, n * 4).unwrap();
        let mut back = vec![0u32; n];
        dev.read(dst, &mut back).unwrap();
        let bad = back.iter().zip(&data).rposition(|(a, b)| a != b);
        assert!(bad.is_none(), "round {round}: word {} of {n} differs after upload + stream copy", bad.unwrap_or(0));
        dev.release_to(mark).unwrap();
    }
}
