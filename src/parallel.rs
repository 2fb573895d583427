//! Expert parallelism: which rank owns which routed experts, which of a batch's expert slots
//! each rank computes, and how the ranks' partial results are put back together.
//!
//! Why its own module: the sharding rule and the combine order are the contract that makes
//! N ranks bit-identical to one, and both backends must follow the same contract (the CPU
//! backend simulates the ranks today, `--ranks N`; a multi-GPU CUDA backend is issue 21's
//! other half, not built). The logic here is pure: slot lists and row copies, no arithmetic.
//!
//! The scheme (batch 1 or a few rows, no all-to-all): every rank holds every row's hidden
//! state and the router's choice `[T, K]`; rank r computes the routed experts of the slots
//! whose expert it owns ([`ShardMap::local_slots`]) and hands back one row per such slot;
//! [`gather_slots`] puts the rows back in slot order `t·K + j` and the combine adds them in
//! that fixed order, exactly as one rank does. A sum of per-rank sums would regroup the
//! additions (f32 addition is not associative) and is never used.
//!
//! What a rank hands back depends on the backend's combine: the CPU oracle's combine rounds
//! `w·y` to f32 before adding it (Rust never contracts to an FMA), so its ranks ship the
//! weighted rows `w·y`; a combine written as `fma(w, y, acc)` (the CUDA `combine_step`)
//! must instead ship the unweighted rows `y` and let the gathering rank run the fma chain.

use std::ops::Range;

use crate::error::{Error, Result};

/// How the routed experts of a MoE layer are split over `ranks` ranks: contiguous blocks,
/// the first `experts % ranks` ranks one expert larger than the rest.
///
/// Contiguous blocks because the stacked expert tensors (`[E, rows, cols]`) then split into
/// one contiguous sub-range per rank (one upload, local index = global − first), and the
/// owner of an expert is a division, not a table. Every MoE layer uses the same map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMap {
    experts: usize,
    ranks: usize,
}

impl ShardMap {
    /// The map of `experts` routed experts over `ranks` ranks. Refuses zero ranks and more
    /// ranks than experts (a rank without an expert would only ever send nothing).
    pub fn new(experts: usize, ranks: usize) -> Result<ShardMap> {
        if ranks == 0 {
            return Err(Error::Arg("expert parallelism needs at least one rank".into()));
        }
        if ranks > experts {
            return Err(Error::Arg(format!(
                "{ranks} ranks for {experts} routed experts: each rank must own at least one expert \
                 (use at most {experts} ranks)"
            )));
        }
        Ok(ShardMap { experts, ranks })
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Number of routed experts per layer.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// The experts rank `rank` owns (`rank < ranks`).
    pub fn range(&self, rank: usize) -> Range<usize> {
        let (base, extra) = (self.experts / self.ranks, self.experts % self.ranks);
        let start = rank * base + rank.min(extra);
        start..start + base + usize::from(rank < extra)
    }

    /// The rank that owns expert `e` (`e < experts`).
    pub fn owner(&self, e: usize) -> usize {
        let (base, extra) = (self.experts / self.ranks, self.experts % self.ranks);
        let big = extra * (base + 1);
        if e < big { e / (base + 1) } else { extra + (e - big) / base }
    }

    /// The slots of `choice` (the router's expert per slot, `[T·K]`) whose expert `rank`
    /// owns, ascending: the rows that rank computes.
    pub fn local_slots(&self, rank: usize, choice: &[usize]) -> Vec<usize> {
        let own = self.range(rank);
        (choice.iter().enumerate()).filter(|(_, e)| own.contains(e)).map(|(s, _)| s).collect()
    }

    /// One line per rank: `rank r: experts a..b (n)`.
    pub fn describe(&self) -> String {
        (0..self.ranks)
            .map(|r| {
                let e = self.range(r);
                format!("rank {r}: experts {}..{} ({})", e.start, e.end, e.len())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One rank's result: the slots it computed (ascending) and one row of `width` per slot
/// (`rows`: `[slots.len(), width]`).
#[derive(Debug, Clone, Default)]
pub struct Partial {
    /// Slot indices `t·K + j`.
    pub slots: Vec<usize>,
    /// Their rows, `[slots.len(), width]`.
    pub rows: Vec<f32>,
}

/// Puts every rank's rows back in slot order: `[n_slots, width]`. Each slot must come from
/// exactly one rank (an [`Error::Shape`] otherwise: a slot computed twice or by nobody).
pub fn gather_slots(parts: &[Partial], n_slots: usize, width: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0; n_slots * width];
    let mut seen = vec![false; n_slots];
    for p in parts {
        if p.rows.len() != p.slots.len() * width {
            return Err(Error::Shape {
                op: "gather_slots".into(),
                expected: format!("{} rows of {width}", p.slots.len()),
                got: format!("{} values", p.rows.len()),
            });
        }
        for (&s, row) in p.slots.iter().zip(p.rows.chunks_exact(width.max(1))) {
            if s >= n_slots || std::mem::replace(&mut seen[s], true) {
                return Err(Error::Shape {
                    op: "gather_slots".into(),
                    expected: format!("each of {n_slots} slots from exactly one rank"),
                    got: format!("slot {s} twice or out of range"),
                });
            }
            out[s * width..][..width].copy_from_slice(row);
        }
    }
    if let Some(s) = seen.iter().position(|&x| !x) {
        return Err(Error::Shape {
            op: "gather_slots".into(),
            expected: format!("each of {n_slots} slots from exactly one rank"),
            got: format!("slot {s} from none"),
        });
    }
    Ok(out)
}

/// The fixed-order sum of already weighted slot rows: `out[t] = Σ_j p[t·K + j]`, from 0.0,
/// adding slot 0, then 1, … (the order of the reference combine). p `[T·K, h]`, out `[T, h]`.
pub fn sum_slots(p: &[f32], k: usize, h: usize) -> Vec<f32> {
    let mut out = vec![0.0; p.len() / k];
    for (o, rows) in out.chunks_exact_mut(h).zip(p.chunks_exact(k * h)) {
        for row in rows.chunks_exact(h) {
            for (ov, &pv) in o.iter_mut().zip(row) {
                *ov += pv;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_contiguous_balanced_and_cover_every_expert() {
        for (e, n) in [(8, 1), (8, 2), (8, 3), (10, 4), (7, 7), (128, 3), (256, 8), (384, 5)] {
            let m = ShardMap::new(e, n).unwrap();
            let mut next = 0;
            for r in 0..n {
                let rg = m.range(r);
                assert_eq!(rg.start, next, "E={e} N={n} rank {r} starts where the previous ended");
                assert!(rg.len() == e / n || rg.len() == e / n + 1, "E={e} N={n} rank {r}: {rg:?}");
                // The larger blocks come first.
                assert_eq!(rg.len() == e / n + 1, r < e % n, "E={e} N={n} rank {r}");
                for x in rg.clone() {
                    assert_eq!(m.owner(x), r, "E={e} N={n} expert {x}");
                }
                next = rg.end;
            }
            assert_eq!(next, e);
        }
        // Uneven split, spelled out: 10 experts over 4 ranks.
        let m = ShardMap::new(10, 4).unwrap();
        assert_eq!((0..4).map(|r| m.range(r)).collect::<Vec<_>>(), vec![0..3, 3..6, 6..8, 8..10]);
        assert!(m.describe().contains("rank 3: experts 8..10 (2)"));
    }

    #[test]
    fn too_many_or_zero_ranks_are_refused() {
        let e = ShardMap::new(8, 9).unwrap_err().to_string();
        assert!(e.contains("9 ranks for 8 routed experts") && e.contains("at most 8"), "{e}");
        let e = ShardMap::new(8, 0).unwrap_err().to_string();
        assert!(e.contains("at least one rank"), "{e}");
    }

    #[test]
    fn ranks_split_the_slots_and_the_gather_restores_slot_order() {
        let mut rng = crate::rng::Rng::new(21);
        let (e, k, t, h) = (10, 3, 5, 4);
        let choice: Vec<usize> = (0..t * k).map(|_| (rng.next_u64() % e as u64) as usize).collect();
        let rows: Vec<f32> = (0..t * k * h).map(|_| rng.normal()).collect();
        for n in 1..=4 {
            let m = ShardMap::new(e, n).unwrap();
            let parts: Vec<Partial> = (0..n)
                .map(|r| {
                    let slots = m.local_slots(r, &choice);
                    assert!(slots.iter().all(|&s| m.owner(choice[s]) == r));
                    let rows = slots.iter().flat_map(|&s| rows[s * h..][..h].iter().copied()).collect();
                    Partial { slots, rows }
                })
                .collect();
            assert_eq!(parts.iter().map(|p| p.slots.len()).sum::<usize>(), t * k);
            // Any order of arrival gives the same gathered rows.
            let mut rev = parts.clone();
            rev.reverse();
            assert_eq!(gather_slots(&parts, t * k, h).unwrap(), rows);
            assert_eq!(gather_slots(&rev, t * k, h).unwrap(), rows);
        }
    }

    #[test]
    fn gather_refuses_missing_or_doubled_slots() {
        let row = |s: usize| Partial { slots: vec![s], rows: vec![1.5, -2.0] };
        let e = gather_slots(&[row(0)], 2, 2).unwrap_err().to_string();
        assert!(e.contains("slot 1 from none"), "{e}");
        let e = gather_slots(&[row(0), row(0), row(1)], 2, 2).unwrap_err().to_string();
        assert!(e.contains("slot 0 twice"), "{e}");
        let short = Partial { slots: vec![0, 1], rows: vec![1.0; 3] };
        assert!(gather_slots(&[short], 2, 2).is_err());
    }

    #[test]
    fn slot_sum_is_the_reference_combine_of_weighted_rows() {
        let mut rng = crate::rng::Rng::new(7);
        let (k, t, h) = (4, 3, 6);
        let y: Vec<f32> = (0..t * k * h).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..t * k).map(|_| rng.normal().abs() + 0.1).collect();
        let weighted: Vec<f32> =
            y.chunks_exact(h).zip(&w).flat_map(|(r, &wj)| r.iter().map(move |&v| wj * v)).collect();
        let mut reference = vec![0.0; t * h];
        crate::cpu::ops::combine(&y, &w, k, &mut reference);
        let ours = sum_slots(&weighted, k, h);
        assert!(ours.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
