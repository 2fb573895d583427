//! Reading a campaign back: per-template success and latency, pairwise wins on matched
//! cases with sign tests, winners per token bucket, best knobs, and a latency-vs-tokens SVG.
//!
//! Why everything is computed on *matched cases*: the latency of a kernel varies 1000×
//! across shapes, so pooled medians say little about which template is faster. Within one
//! case every template ran on identical work; only those comparisons (b/a ratios and win
//! counts) are used to decide anything. Pooled medians and IQRs are printed as context.
//!
//! [`Analysis`] is data (the tests and `promote` use it); [`render_report`] and
//! [`render_compare`] turn it into text, [`svg`] into a plot.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::attempts::{Attempt, Status};
use super::knobs::{self, Knobs};
use super::stats::{iqr, median, percentile, sign_test};
use super::{Bucket, Numerics};
use crate::matrix::html::escape;

/// Per-template summary.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateStats {
    /// Template name.
    pub name: String,
    /// `preserving`, `changing`, or `mixed` (depends on knobs).
    pub numerics: String,
    /// Attempts.
    pub attempts: usize,
    /// Built.
    pub built: usize,
    /// Built and correct.
    pub correct: usize,
    /// Built, correct and timed.
    pub ok: usize,
    /// Median of p50 over ok attempts (µs).
    pub median_p50: f64,
    /// IQR of p50 over ok attempts (µs).
    pub iqr_p50: f64,
    /// Median achieved GB/s.
    pub median_gb_s: f64,
}

/// Template `a` against template `b` on the cases where both were ok.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// First template.
    pub a: String,
    /// Second template.
    pub b: String,
    /// Matched cases (ties included).
    pub n: usize,
    /// Cases where `a` was strictly faster.
    pub a_wins: usize,
    /// Cases where `b` was strictly faster.
    pub b_wins: usize,
    /// Median of p50(b) / p50(a) (< 1: b faster).
    pub median_ratio: f64,
    /// 10th percentile of the ratio.
    pub p10_ratio: f64,
    /// 90th percentile of the ratio.
    pub p90_ratio: f64,
    /// Exact two-sided sign test.
    pub p: f64,
}

/// A template that beat every other template of its bucket, each at p < alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct Winner {
    /// Template.
    pub template: String,
    /// Its comparison with each other template (`a` = the winner).
    pub against: Vec<Pair>,
}

/// One token bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketStats {
    /// The bucket.
    pub bucket: Bucket,
    /// Cases with at least two ok templates.
    pub cases: usize,
    /// Per template: cases where it was the fastest.
    pub wins: BTreeMap<String, usize>,
    /// Pairwise comparisons within the bucket.
    pub pairs: Vec<Pair>,
    /// The significant winner, or why there is none.
    pub winner: std::result::Result<Winner, String>,
}

/// One knob setting of a template in a bucket: how it did against the best other template
/// of the same case.
#[derive(Debug, Clone, PartialEq)]
pub struct KnobStats {
    /// Template.
    pub template: String,
    /// Knobs.
    pub knobs: Knobs,
    /// Source hash of these attempts.
    pub source_hash: String,
    /// Numerics class.
    pub numerics: Numerics,
    /// Ok cases in the bucket with at least one other ok template.
    pub cases: usize,
    /// Cases where it was the fastest of all.
    pub wins: usize,
    /// Median of p50 / (best p50 of the other templates in the case) (< 1: faster).
    pub median_ratio: f64,
    /// Median p50 (µs).
    pub median_p50: f64,
    /// Attempts with this source that were incorrect, in any bucket.
    pub incorrect_anywhere: usize,
}

/// Everything the report says about one op on one architecture.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Op name.
    pub op: String,
    /// Architecture.
    pub arch: String,
    /// GPU name(s).
    pub gpu: String,
    /// Backend(s).
    pub backend: String,
    /// Attempts analysed.
    pub attempts: usize,
    /// Distinct cases.
    pub cases: usize,
    /// Distinct campaigns.
    pub campaigns: usize,
    /// Per template, in name order.
    pub templates: Vec<TemplateStats>,
    /// All pairs over all buckets.
    pub pairs: Vec<Pair>,
    /// Per bucket (only buckets with cases).
    pub buckets: Vec<BucketStats>,
    /// Per (bucket, template, source): knob settings, best first within a template.
    pub knobs: BTreeMap<Bucket, Vec<KnobStats>>,
}

/// Per (template, source hash): (ratio to the best other template, fastest?, p50, attempt index).
type KnobGroups = BTreeMap<(String, String), Vec<(f64, bool, f64, usize)>>;

/// A titled subset of attempts.
type Section = (String, Box<dyn Fn(&Attempt) -> bool>);

/// The ok latency of each template per case: case key → template → (p50, attempt index).
type CaseMap = BTreeMap<(String, usize), BTreeMap<String, (f64, usize)>>;

fn case_map(atts: &[&Attempt], filter: impl Fn(&Attempt) -> bool) -> CaseMap {
    let mut m: CaseMap = BTreeMap::new();
    for (i, a) in atts.iter().enumerate() {
        if let Some(p) = a.p50().filter(|_| filter(a)) {
            m.entry(a.case_key()).or_default().insert(a.template.clone(), (p, i));
        }
    }
    m
}

fn pair(cases: &CaseMap, a: &str, b: &str) -> Pair {
    let (mut aw, mut bw, mut ratios) = (0, 0, Vec::new());
    for t in cases.values() {
        if let (Some(&(pa, _)), Some(&(pb, _))) = (t.get(a), t.get(b)) {
            ratios.push(pb / pa);
            if pa < pb {
                aw += 1;
            } else if pb < pa {
                bw += 1;
            }
        }
    }
    Pair {
        a: a.into(),
        b: b.into(),
        n: ratios.len(),
        a_wins: aw,
        b_wins: bw,
        median_ratio: median(&ratios),
        p10_ratio: percentile(&ratios, 0.1),
        p90_ratio: percentile(&ratios, 0.9),
        p: sign_test(aw, bw),
    }
}

fn all_pairs(cases: &CaseMap, names: &[String]) -> Vec<Pair> {
    let mut v = Vec::new();
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            let p = pair(cases, a, b);
            if p.n > 0 {
                v.push(p);
            }
        }
    }
    v
}

/// The template that beats every other template with ok attempts in `cases`, each with more
/// wins than losses and sign-test p < alpha; or why none does.
fn significant_winner(cases: &CaseMap, alpha: f64) -> std::result::Result<Winner, String> {
    let present: BTreeSet<String> = cases.values().flat_map(|t| t.keys().cloned()).collect();
    if present.len() < 2 {
        return Err("fewer than two templates ran ok in this bucket".into());
    }
    // The candidate: most case wins.
    let mut wins: BTreeMap<&str, usize> = BTreeMap::new();
    for t in cases.values().filter(|t| t.len() >= 2) {
        if let Some((name, _)) = t.iter().min_by(|x, y| x.1.0.total_cmp(&y.1.0)) {
            *wins.entry(name.as_str()).or_default() += 1;
        }
    }
    let Some((&best, _)) = wins.iter().max_by_key(|(n, w)| (**w, std::cmp::Reverse(*n))) else {
        return Err("no case with two ok templates".into());
    };
    let mut against = Vec::new();
    let mut weakest: Option<Pair> = None;
    for other in present.iter().filter(|o| o.as_str() != best) {
        let p = pair(cases, best, other);
        let beaten = p.a_wins > p.b_wins && p.p < alpha;
        if !beaten && weakest.as_ref().is_none_or(|w| p.p > w.p || p.a_wins <= p.b_wins) {
            weakest = Some(p.clone());
        }
        against.push(p);
    }
    match weakest {
        None => Ok(Winner { template: best.to_string(), against }),
        Some(w) => Err(format!(
            "{} vs {}: {}–{} in {} matched cases, p = {} (needs more wins and p < {alpha})",
            w.a,
            w.b,
            w.a_wins,
            w.b_wins,
            w.n,
            fmt_p(w.p)
        )),
    }
}

/// Analyses the attempts of one op on one architecture (callers group them first).
pub fn analyse(atts: &[&Attempt], alpha: f64) -> Analysis {
    let first = atts.first();
    let uniq = |f: &dyn Fn(&Attempt) -> String| {
        let s: BTreeSet<String> = atts.iter().map(|a| f(a)).collect();
        s.into_iter().collect::<Vec<_>>().join(", ")
    };
    let names: Vec<String> = atts.iter().map(|a| a.template.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let templates = names
        .iter()
        .map(|n| {
            let mine: Vec<&&Attempt> = atts.iter().filter(|a| &a.template == n).collect();
            let p50s: Vec<f64> = mine.iter().filter_map(|a| a.p50()).collect();
            let gbs: Vec<f64> = mine
                .iter()
                .filter(|a| a.status() == Status::Ok)
                .filter_map(|a| a.bench.as_ref().map(|b| b.gb_s))
                .collect();
            let classes: BTreeSet<Numerics> = mine.iter().map(|a| a.numerics).collect();
            TemplateStats {
                name: n.clone(),
                numerics: match classes.len() {
                    1 => classes.iter().next().expect("one").name().into(),
                    _ => "mixed".into(),
                },
                attempts: mine.len(),
                built: mine.iter().filter(|a| a.build.ok).count(),
                correct: mine.iter().filter(|a| a.status() >= Status::BenchError).count(),
                ok: p50s.len(),
                median_p50: median(&p50s),
                iqr_p50: iqr(&p50s),
                median_gb_s: median(&gbs),
            }
        })
        .collect();
    let all = case_map(atts, |_| true);
    let mut buckets = Vec::new();
    let mut knob_stats = BTreeMap::new();
    let incorrect: BTreeMap<String, usize> =
        atts.iter().filter(|a| a.status() == Status::Incorrect).fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.source_hash.clone()).or_default() += 1;
            m
        });
    for b in Bucket::ALL {
        let cases = case_map(atts, |a| a.bucket() == b);
        let n = cases.values().filter(|t| t.len() >= 2).count();
        if cases.is_empty() {
            continue;
        }
        let mut wins = BTreeMap::new();
        for t in cases.values().filter(|t| t.len() >= 2) {
            if let Some((name, _)) = t.iter().min_by(|x, y| x.1.0.total_cmp(&y.1.0)) {
                *wins.entry(name.clone()).or_default() += 1;
            }
        }
        // Knob settings: per (template, source), ratio to the best other template per case.
        let mut groups: KnobGroups = BTreeMap::new();
        for t in cases.values().filter(|t| t.len() >= 2) {
            for (name, &(p, i)) in t {
                let best_other = t.iter().filter(|(o, _)| *o != name).map(|(_, v)| v.0).fold(f64::INFINITY, f64::min);
                groups.entry((name.clone(), atts[i].source_hash.clone())).or_default().push((
                    p / best_other,
                    p < best_other,
                    p,
                    i,
                ));
            }
        }
        let mut ks: Vec<KnobStats> = groups
            .into_iter()
            .map(|((template, hash), v)| {
                let a = atts[v[0].3];
                let ratios: Vec<f64> = v.iter().map(|x| x.0).collect();
                let p50s: Vec<f64> = v.iter().map(|x| x.2).collect();
                KnobStats {
                    template,
                    knobs: a.knobs.clone(),
                    numerics: a.numerics,
                    cases: v.len(),
                    wins: v.iter().filter(|x| x.1).count(),
                    median_ratio: median(&ratios),
                    median_p50: median(&p50s),
                    incorrect_anywhere: incorrect.get(&hash).copied().unwrap_or(0),
                    source_hash: hash,
                }
            })
            .collect();
        ks.sort_by(|x, y| x.template.cmp(&y.template).then(x.median_ratio.total_cmp(&y.median_ratio)));
        knob_stats.insert(b, ks);
        buckets.push(BucketStats {
            bucket: b,
            cases: n,
            wins,
            pairs: all_pairs(&cases, &names),
            winner: significant_winner(&cases, alpha),
        });
    }
    Analysis {
        op: first.map(|a| a.op.clone()).unwrap_or_default(),
        arch: first.map(|a| a.arch.clone()).unwrap_or_default(),
        gpu: uniq(&|a| a.gpu.clone()),
        backend: uniq(&|a| a.backend.clone()),
        attempts: atts.len(),
        cases: atts.iter().map(|a| a.case_key()).collect::<BTreeSet<_>>().len(),
        campaigns: atts.iter().map(|a| a.campaign.id.clone()).collect::<BTreeSet<_>>().len(),
        templates,
        pairs: all_pairs(&all, &names),
        buckets,
        knobs: knob_stats,
    }
}

/// Groups attempts by (op, arch), in that order.
pub fn group(atts: &[Attempt]) -> BTreeMap<(String, String), Vec<&Attempt>> {
    let mut m: BTreeMap<(String, String), Vec<&Attempt>> = BTreeMap::new();
    for a in atts {
        m.entry((a.op.clone(), a.arch.clone())).or_default().push(a);
    }
    m
}

/// A p-value: `1`, `0.034`, `2.7e-14`.
pub fn fmt_p(p: f64) -> String {
    if p >= 0.9995 {
        "1".into()
    } else if p >= 0.001 {
        format!("{p:.3}")
    } else {
        format!("{p:.1e}")
    }
}

fn fmt_us(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_ratio(x: f64) -> String {
    if x.is_finite() { format!("{x:.3}") } else { "-".into() }
}

/// A plain-text table: headers, right-aligned columns, rows.
struct Table {
    headers: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str], right_from: usize) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            right: (0..headers.len()).map(|i| i >= right_from).collect(),
            rows: Vec::new(),
        }
    }

    fn render(&self) -> String {
        let w = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| w(h)).collect();
        for r in &self.rows {
            for (x, c) in widths.iter_mut().zip(r) {
                *x = (*x).max(w(c));
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = " ".repeat(widths[i].saturating_sub(w(c)));
                if i > 0 {
                    s += "  ";
                }
                if self.right[i] {
                    s += &pad;
                    s += c;
                } else {
                    s += c;
                    s += &pad;
                }
            }
            s.truncate(s.trim_end().len());
            s + "\n"
        };
        let mut out = line(&self.headers);
        out += &line(&widths.iter().map(|&n| "-".repeat(n)).collect::<Vec<_>>());
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

fn pair_table(pairs: &[Pair]) -> String {
    let mut t = Table::new(&["a", "b", "n", "a wins", "b wins", "median b/a", "p10 b/a", "p90 b/a", "p"], 2);
    for p in pairs {
        t.rows.push(vec![
            p.a.clone(),
            p.b.clone(),
            p.n.to_string(),
            p.a_wins.to_string(),
            p.b_wins.to_string(),
            fmt_ratio(p.median_ratio),
            fmt_ratio(p.p10_ratio),
            fmt_ratio(p.p90_ratio),
            fmt_p(p.p),
        ]);
    }
    t.render()
}

/// The header line of an analysis.
fn header(an: &Analysis) -> String {
    format!(
        "{} on {} [{}, {}] — {} attempts, {} cases, {} campaign{}\n",
        an.op,
        an.gpu,
        an.arch,
        an.backend,
        an.attempts,
        an.cases,
        an.campaigns,
        if an.campaigns == 1 { "" } else { "s" }
    )
}

/// The `foundry report` text of one analysis.
pub fn render_report(an: &Analysis) -> String {
    let mut s = header(an);
    s += "\nper template (ok = built, correct and timed; latency over ok attempts, all shapes pooled)\n";
    let mut t = Table::new(
        &["template", "numerics", "attempts", "built", "correct", "ok", "median p50 µs", "IQR µs", "median GB/s"],
        2,
    );
    for ts in &an.templates {
        t.rows.push(vec![
            ts.name.clone(),
            ts.numerics.clone(),
            ts.attempts.to_string(),
            ts.built.to_string(),
            ts.correct.to_string(),
            format!("{} ({:.0}%)", ts.ok, 100.0 * ts.ok as f64 / ts.attempts.max(1) as f64),
            fmt_us(ts.median_p50),
            fmt_us(ts.iqr_p50),
            if ts.median_gb_s.is_finite() { format!("{:.1}", ts.median_gb_s) } else { "-".into() },
        ]);
    }
    s += &t.render();
    s += "\npairwise on matched cases (both ok; b/a < 1 means b is faster; exact two-sided sign test)\n";
    s += &pair_table(&an.pairs);
    s += "\nwinners per token bucket (fastest template per case; significant = beats every other template at p < alpha)\n";
    let names: Vec<String> = an.templates.iter().map(|t| t.name.clone()).collect();
    let mut heads: Vec<&str> = vec!["bucket", "cases"];
    heads.extend(names.iter().map(String::as_str));
    heads.push("significant winner");
    let mut t = Table::new(&heads, 1);
    *t.right.last_mut().expect("has columns") = false;
    for b in &an.buckets {
        let mut row = vec![b.bucket.name().to_string(), b.cases.to_string()];
        row.extend(names.iter().map(|n| b.wins.get(n).copied().unwrap_or(0).to_string()));
        row.push(match &b.winner {
            Ok(w) => {
                let worst = w.against.iter().map(|p| p.p).fold(0.0, f64::max);
                format!("{} (p ≤ {} vs each)", w.template, fmt_p(worst))
            }
            Err(why) => format!("none: {why}"),
        });
        t.rows.push(row);
    }
    s += &t.render();
    s += "\nbest knobs per template and bucket (ratio = p50 / fastest other template in the same case)\n";
    let mut t =
        Table::new(&["bucket", "template", "knobs", "numerics", "cases", "wins", "median ratio", "median p50 µs"], 4);
    for (b, ks) in &an.knobs {
        let mut seen = BTreeSet::new();
        for k in ks.iter().filter(|k| k.cases >= 2 || ks.iter().filter(|o| o.template == k.template).count() == 1) {
            if !seen.insert(k.template.clone()) {
                continue;
            }
            t.rows.push(vec![
                b.name().into(),
                k.template.clone(),
                knobs::display(&k.knobs),
                k.numerics.name().into(),
                k.cases.to_string(),
                k.wins.to_string(),
                fmt_ratio(k.median_ratio),
                fmt_us(k.median_p50),
            ]);
        }
    }
    s += &t.render();
    s
}

/// The `foundry compare` text: `names` pairwise, overall, per bucket and per preset.
pub fn render_compare(an: &Analysis, atts: &[&Attempt], names: &[String]) -> String {
    let mut s = header(an);
    let known: BTreeSet<&str> = an.templates.iter().map(|t| t.name.as_str()).collect();
    for n in names {
        if !known.contains(n.as_str()) {
            let _ = writeln!(s, "note: template {n} has no attempts here");
        }
    }
    let sections: Vec<Section> = {
        let mut v: Vec<Section> = vec![("all cases".into(), Box::new(|_| true))];
        for b in Bucket::ALL {
            v.push((format!("tokens {}", b.name()), Box::new(move |a: &Attempt| a.bucket() == b)));
        }
        let presets: BTreeSet<String> = atts.iter().map(|a| a.shape.preset.clone()).collect();
        for p in presets {
            let q = p.clone();
            v.push((format!("preset {p}"), Box::new(move |a: &Attempt| a.shape.preset == q)));
        }
        v
    };
    for (title, f) in sections {
        let cases = case_map(atts, |a| f(a));
        let mut pairs = Vec::new();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                let p = pair(&cases, a, b);
                if p.n > 0 {
                    pairs.push(p);
                }
            }
        }
        if pairs.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n{title}");
        s += &pair_table(&pairs);
    }
    s
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

/// A self-contained SVG: one panel per preset, p50 latency (log scale) against tokens (log2
/// scale), one colour per template — a dot per ok attempt and a line through the median at
/// each token count. The first line is a marker comment (`report` only replaces files that
/// carry it).
pub fn svg(an: &Analysis, atts: &[&Attempt]) -> String {
    const PW: f64 = 360.0;
    const PH: f64 = 260.0;
    const ML: f64 = 58.0;
    const MT: f64 = 48.0;
    const GAP: f64 = 40.0;
    let presets: Vec<String> =
        atts.iter().map(|a| a.shape.preset.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let names: Vec<String> = an.templates.iter().map(|t| t.name.clone()).collect();
    let width = ML + presets.len().max(1) as f64 * (PW + GAP) + 150.0;
    let height = MT + PH + 60.0;
    let mut s = String::new();
    s += "<!-- zmoe foundry report: generated from attempts.ndjson; regenerated by `zmoe foundry report` -->\n";
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"system-ui,sans-serif\" font-size=\"12\" role=\"img\" aria-label=\"{} latency vs tokens\">",
        escape(&an.op)
    );
    let _ = writeln!(s, "<rect width=\"{width}\" height=\"{height}\" fill=\"#fff\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{ML}\" y=\"20\" font-size=\"14\" font-weight=\"600\">{} — p50 latency vs tokens ({}, {})</text>",
        escape(&an.op),
        escape(&an.gpu),
        escape(&an.arch)
    );
    for (pi, preset) in presets.iter().enumerate() {
        let x0 = ML + pi as f64 * (PW + GAP);
        let mine: Vec<&&Attempt> = atts.iter().filter(|a| &a.shape.preset == preset && a.p50().is_some()).collect();
        let lat: Vec<f64> = mine.iter().filter_map(|a| a.p50()).collect();
        let (lo, hi) = (lat.iter().cloned().fold(f64::INFINITY, f64::min), lat.iter().cloned().fold(0.0, f64::max));
        let (ylo, yhi) = if lat.is_empty() {
            (0.0, 1.0)
        } else {
            (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0))
        };
        let x_of = |t: usize| x0 + PW * ((t.max(1) as f64).log2() / 8.0);
        let y_of = |us: f64| MT + PH * (1.0 - (us.log10() - ylo) / (yhi - ylo));
        let _ = writeln!(s, "<text x=\"{x0}\" y=\"{}\" font-weight=\"600\">{}</text>", MT - 10.0, escape(preset));
        let _ = writeln!(
            s,
            "<rect x=\"{x0}\" y=\"{MT}\" width=\"{PW}\" height=\"{PH}\" fill=\"none\" stroke=\"#8c959f\"/>"
        );
        for e in 0..=8 {
            let t = 1usize << e;
            let x = x_of(t);
            let _ =
                writeln!(s, "<line x1=\"{x:.1}\" y1=\"{MT}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#eaeef2\"/>", MT + PH);
            let _ = writeln!(
                s,
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#57606a\">{t}</text>",
                MT + PH + 16.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#57606a\">tokens</text>",
            x0 + PW / 2.0,
            MT + PH + 34.0
        );
        for d in (ylo as i32)..=(yhi as i32) {
            let y = y_of(10f64.powi(d));
            let _ =
                writeln!(s, "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eaeef2\"/>", x0 + PW);
            let label = if d >= 0 { format!("{} µs", 10f64.powi(d)) } else { format!("{:.3} µs", 10f64.powi(d)) };
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#57606a\">{label}</text>",
                x0 - 4.0,
                y + 4.0
            );
        }
        for (ti, name) in names.iter().enumerate() {
            let c = COLORS[ti % COLORS.len()];
            let mut by_t: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            for a in mine.iter().filter(|a| &a.template == name) {
                let p = a.p50().expect("filtered");
                by_t.entry(a.shape.tokens).or_default().push(p);
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{c}\" fill-opacity=\"0.35\"><title>{} {} M={}: {} µs</title></circle>",
                    x_of(a.shape.tokens),
                    y_of(p),
                    escape(name),
                    escape(&knobs::display(&a.knobs)),
                    a.shape.tokens,
                    fmt_us(p)
                );
            }
            let pts: Vec<String> =
                by_t.iter().map(|(t, v)| format!("{:.1},{:.1}", x_of(*t), y_of(median(v)))).collect();
            if pts.len() > 1 {
                let _ = writeln!(
                    s,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.8\"/>",
                    pts.join(" ")
                );
            }
        }
    }
    let lx = ML + presets.len().max(1) as f64 * (PW + GAP);
    for (ti, name) in names.iter().enumerate() {
        let y = MT + 10.0 + 18.0 * ti as f64;
        let c = COLORS[ti % COLORS.len()];
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{c}\" stroke-width=\"3\"/>",
            lx + 18.0
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{}</text>", lx + 24.0, y + 4.0, escape(name));
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foundry::attempts::{Attempt, BenchInfo, BuildInfo, CampaignInfo, CorrectnessInfo, SCHEMA_VERSION};
    use crate::foundry::ops::{CheckResult, PRESETS};

    fn att(case: usize, tokens: usize, template: &str, p50: f64) -> Attempt {
        Attempt {
            schema_version: SCHEMA_VERSION,
            id: String::new(),
            ts: String::new(),
            campaign: CampaignInfo {
                id: "c".into(),
                seed: 0,
                mode: "random".into(),
                case,
                case_mode: "random".into(),
                order_pos: 0,
                order: vec![],
            },
            op: "moe_combine".into(),
            template: template.into(),
            knobs: knobs::knobs(&[("TPB", 128)]),
            numerics: Numerics::Preserving,
            shape: PRESETS[0].shape(tokens),
            dtype: "bf16".into(),
            source_hash: format!("fnv1a64:{template}"),
            launch: None,
            backend: "mock".into(),
            gpu: "g".into(),
            arch: "mock".into(),
            driver: None,
            build: BuildInfo { ok: true, ms: 0.0, error: None },
            correctness: Some(CorrectnessInfo {
                ok: true,
                check: CheckResult { ok: true, ..Default::default() },
                bitexact_vs_baseline: None,
            }),
            bench: Some(BenchInfo {
                ok: true,
                warmup: 0,
                repeats: 1,
                p10_us: p50,
                p50_us: p50,
                p90_us: p50,
                min_us: p50,
                mean_us: p50,
                gb_s: 1.0,
                gflop_s: 1.0,
                error: None,
            }),
            bytes: 1.0,
            flops: 1.0,
            zmoe_version: String::new(),
            git_commit: String::new(),
        }
    }

    #[test]
    fn matched_pairs_and_bucket_winners() {
        let mut v = Vec::new();
        // 10 small cases: b always faster; 10 large cases: alternating (noise).
        for c in 0..10 {
            v.push(att(c, 4, "a", 10.0));
            v.push(att(c, 4, "b", 9.0));
        }
        for c in 10..20 {
            v.push(att(c, 64, "a", 10.0));
            v.push(att(c, 64, "b", if c % 2 == 0 { 9.0 } else { 11.0 }));
        }
        // An unmatched attempt changes nothing.
        v.push(att(99, 4, "a", 1.0));
        let refs: Vec<&Attempt> = v.iter().collect();
        let an = analyse(&refs, 0.01);
        assert_eq!(an.pairs.len(), 1);
        let p = &an.pairs[0];
        assert_eq!((p.n, p.a_wins, p.b_wins), (20, 5, 15));
        let small = an.buckets.iter().find(|b| b.bucket == Bucket::Small).unwrap();
        let w = small.winner.as_ref().unwrap();
        assert_eq!(w.template, "b");
        assert!((w.against[0].p - 2.0 / 1024.0).abs() < 1e-12);
        let large = an.buckets.iter().find(|b| b.bucket == Bucket::Large).unwrap();
        assert!(large.winner.as_ref().unwrap_err().contains("5–5"), "{:?}", large.winner);
        let text = render_report(&an);
        assert!(text.contains("b (p ≤ 0.002 vs each)"), "{text}");
        let svg = svg(&an, &refs);
        assert!(svg.starts_with("<!-- zmoe foundry report") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }
}
