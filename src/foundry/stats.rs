//! The few statistics the foundry needs: percentiles and an exact sign test.
//!
//! Why a sign test: kernel timings are skewed, heavy-tailed and differ in scale across
//! shapes by 1000×, so any test that assumes a distribution (or pools raw microseconds) is
//! wrong somewhere. On matched cases the only question is "which of the two was faster", and
//! under "no difference" each case is a fair coin: an exact binomial test with no
//! assumptions. Ties carry no information and are dropped (the conventional treatment).

/// Percentile `q` ∈ [0, 1] of `v` by linear interpolation between order statistics
/// (NumPy's default); `NaN` for an empty slice.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// The median.
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// Interquartile range: p75 − p25.
pub fn iqr(v: &[f64]) -> f64 {
    percentile(v, 0.75) - percentile(v, 0.25)
}

/// p10, p50 and p90.
pub fn p10_50_90(v: &[f64]) -> (f64, f64, f64) {
    (percentile(v, 0.1), percentile(v, 0.5), percentile(v, 0.9))
}

/// ln(n!) for every n ≤ `max` (exact summation; fine for the thousands of cases a campaign has).
fn ln_factorials(max: usize) -> Vec<f64> {
    let mut t = Vec::with_capacity(max + 1);
    t.push(0.0);
    for n in 1..=max {
        t.push(t[n - 1] + (n as f64).ln());
    }
    t
}

/// Exact two-sided sign test: the probability, if each of `wins + losses` matched cases were
/// a fair coin, of a split at least as lopsided as this one
/// (`min(1, 2 · P[X ≤ min(wins, losses)])`, X ~ Binomial(n, ½)). 1 when n = 0.
pub fn sign_test(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    if n == 0 {
        return 1.0;
    }
    let k = wins.min(losses);
    let lf = ln_factorials(n);
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    // Σ_{i ≤ k} C(n, i) / 2^n, summed in log space from the largest term down (stable).
    let terms: Vec<f64> = (0..=k).map(|i| lf[n] - lf[i] - lf[n - i] - ln_half_n).collect();
    let top = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let tail = top.exp() * terms.iter().map(|t| (t - top).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn sign_test_matches_exact_binomial_values() {
        // 2·C(10,0)/2^10, 2·(1+10+45)/2^10.
        assert!(close(sign_test(10, 0), 2.0 / 1024.0, 1e-12));
        assert!(close(sign_test(2, 8), 2.0 * 56.0 / 1024.0, 1e-12));
        assert!(close(sign_test(8, 2), 0.109375, 1e-12));
        // n = 8 all one way: 2/256 = 0.0078 < 0.01, the smallest n that can reach p < 0.01.
        assert!(close(sign_test(8, 0), 0.0078125, 1e-12));
        assert!(sign_test(7, 0) > 0.01);
        // Balanced: p = 1.
        assert_eq!(sign_test(5, 5), 1.0);
        assert_eq!(sign_test(0, 0), 1.0);
        // Python: 2*sum(math.comb(144,i) for i in range(41))/2**144 (the seeds' t2 vs t0, 104:40: the lab notebook reports 9.45e-08).
        assert!(close(sign_test(104, 40), 9.454907617706649e-8, 1e-9), "{}", sign_test(104, 40));
        // Large n stays finite and tiny: 2·2^-1000.
        let p = sign_test(1000, 0);
        assert!(p > 0.0 && p < 1e-300);
        assert!(close(sign_test(60, 40), 0.05688793364098078, 1e-9), "{}", sign_test(60, 40));
    }

    #[test]
    fn percentiles_interpolate() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&v), 3.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 5.0);
        assert_eq!(percentile(&v, 0.1), 1.4);
        assert_eq!(iqr(&v), 2.0);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
        assert!(median(&[]).is_nan());
    }
}
