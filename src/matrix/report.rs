//! Plain-text views of a ledger: the report table, history, diff and CSV.
//!
//! Tables are built as data ([`Table`]: headers, alignment, cells) and rendered separately,
//! so the HTML page and `matrix run`'s summary reuse exactly the cells of `matrix report`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Entry, latest};

/// A table: headers, which columns are numeric (right-aligned), and rows of cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Column headers.
    pub headers: Vec<&'static str>,
    /// `true` for right-aligned (numeric) columns.
    pub right: Vec<bool>,
    /// Rows of cells, one per header.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Renders with columns padded to their widest cell, separated by two spaces, a dashed
    /// rule under the header and no trailing spaces.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(c));
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let mut s = String::new();
            for (i, c) in cells.enumerate() {
                let pad = widths[i].saturating_sub(width(c));
                if i > 0 {
                    s += "  ";
                }
                if self.right[i] {
                    s.extend(std::iter::repeat_n(' ', pad));
                    s += c;
                } else {
                    s += c;
                    s.extend(std::iter::repeat_n(' ', pad));
                }
            }
            s.truncate(s.trim_end().len());
            s.push('\n');
            s
        };
        let mut out = line(&mut self.headers.iter().copied());
        out += &line(&mut widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().iter().map(String::as_str));
        for row in &self.rows {
            out += &line(&mut row.iter().map(String::as_str));
        }
        out
    }
}

/// tok/s with one decimal; `-` when unknown.
pub fn fmt_tps(x: f64) -> String {
    if x.is_finite() { format!("{x:.1}") } else { "-".into() }
}

/// `1.123x`; `-` when unknown.
pub fn fmt_speedup(x: f64) -> String {
    if x.is_finite() { format!("{x:.3}x") } else { "-".into() }
}

/// `45.1%`; `-` when unknown.
pub fn fmt_pct(x: f64) -> String {
    if x.is_finite() { format!("{x:.1}%") } else { "-".into() }
}

/// Text on one line: control characters (newlines, tabs, escapes) shown as `\n`, `\t`,
/// `\u{1b}`, so a note cannot break a table row or drive the terminal.
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// The columns of `matrix report` (and the HTML page's table).
pub const REPORT_HEADERS: [&str; 10] =
    ["model", "family", "GPU", "fidelity", "ref tok/s", "patched tok/s", "speedup", "roofline", "date", "commit"];

/// The cells of one entry under [`REPORT_HEADERS`]: decode tok/s medians, decode speedup,
/// and % of roofline of the patched plan.
pub fn report_cells(e: &Entry) -> Vec<String> {
    vec![
        one_line(&e.model.id),
        one_line(&e.model.family),
        one_line(&e.hardware.name),
        e.fidelity.short(),
        fmt_tps(e.reference.decode_median),
        fmt_tps(e.patched.decode_median),
        fmt_speedup(e.speedup.decode),
        fmt_pct(e.patched.roofline_pct),
        one_line(e.date()),
        one_line(&e.software.commit_label()),
    ]
}

/// `entries` as a report table, in the order given.
pub fn report_table(entries: &[&Entry]) -> Table {
    Table {
        headers: REPORT_HEADERS.to_vec(),
        right: vec![false, false, false, false, true, true, true, true, false, false],
        rows: entries.iter().map(|e| report_cells(e)).collect(),
    }
}

/// `matrix report`: the latest entry per (model, GPU), sorted by model then GPU.
pub fn report(entries: &[Entry]) -> String {
    report_table(&latest(entries)).render()
}

/// Entries whose model id contains `needle` (case-insensitive), oldest first: by timestamp,
/// ties (and equal clocks) in ledger order.
pub fn history_entries<'a>(entries: &'a [Entry], needle: &str) -> Vec<&'a Entry> {
    let needle = needle.to_lowercase();
    let mut v: Vec<&Entry> = entries.iter().filter(|e| e.model.id.to_lowercase().contains(&needle)).collect();
    v.sort_by(|a, b| a.timestamp_utc.cmp(&b.timestamp_utc));
    v
}

/// `matrix history`: one line per entry (see [`history_entries`]).
pub fn history(entries: &[&Entry]) -> String {
    let rows = entries
        .iter()
        .map(|e| {
            vec![
                one_line(&e.timestamp_utc),
                one_line(&e.model.id),
                one_line(&e.hardware.name),
                e.fidelity.short(),
                fmt_tps(e.reference.decode_median),
                fmt_tps(e.patched.decode_median),
                fmt_speedup(e.speedup.decode),
                fmt_pct(e.patched.roofline_pct),
                one_line(&e.patterns_applied.join(",")),
                one_line(&e.software.commit_label()),
                one_line(&e.notes),
            ]
        })
        .collect();
    Table {
        headers: vec![
            "time (UTC)",
            "model",
            "GPU",
            "fidelity",
            "ref tok/s",
            "patched tok/s",
            "speedup",
            "roofline",
            "patterns",
            "commit",
            "notes",
        ],
        right: vec![false, false, false, false, true, true, true, true, false, false, false],
        rows,
    }
    .render()
}

/// `+6.4%` change from `a` to `b`; empty when either is unknown.
fn change(a: f64, b: f64) -> String {
    let r = (b / a - 1.0) * 100.0;
    if r.is_finite() { format!("{r:+.1}%") } else { String::new() }
}

/// `matrix diff`: the latest entries of two ledgers matched by (model, GPU), side by side,
/// then the keys found in only one of them. `name_a`/`name_b` label the two sides.
pub fn diff(a: &[Entry], b: &[Entry], name_a: &str, name_b: &str) -> String {
    let index = |es: &[Entry]| -> BTreeMap<(String, String), Entry> {
        latest(es).into_iter().map(|e| ((e.model.id.clone(), e.hardware.name.clone()), e.clone())).collect()
    };
    let (ia, ib) = (index(a), index(b));
    let arrow = |x: String, y: String| if x == y { x } else { format!("{x} → {y}") };
    let mut rows = Vec::new();
    for (key, ea) in &ia {
        let Some(eb) = ib.get(key) else { continue };
        rows.push(vec![
            one_line(&key.0),
            one_line(&key.1),
            arrow(ea.fidelity.short(), eb.fidelity.short()),
            arrow(fmt_tps(ea.reference.decode_median), fmt_tps(eb.reference.decode_median)),
            arrow(fmt_tps(ea.patched.decode_median), fmt_tps(eb.patched.decode_median)),
            change(ea.patched.decode_median, eb.patched.decode_median),
            arrow(fmt_speedup(ea.speedup.decode), fmt_speedup(eb.speedup.decode)),
            arrow(fmt_pct(ea.patched.roofline_pct), fmt_pct(eb.patched.roofline_pct)),
        ]);
    }
    let mut out = format!("A = {}\nB = {}\n\n", one_line(name_a), one_line(name_b));
    if rows.is_empty() {
        out += "no model × GPU is in both ledgers\n";
    } else {
        out += &Table {
            headers: vec![
                "model",
                "GPU",
                "fidelity A → B",
                "ref tok/s A → B",
                "patched tok/s A → B",
                "patched Δ",
                "speedup A → B",
                "roofline A → B",
            ],
            right: vec![false, false, false, true, true, true, true, true],
            rows,
        }
        .render();
    }
    for (label, mine, other) in [("A", &ia, &ib), ("B", &ib, &ia)] {
        let only: Vec<_> = mine.keys().filter(|k| !other.contains_key(*k)).collect();
        if !only.is_empty() {
            let _ = writeln!(out, "\nonly in {label}:");
            for (m, g) in only {
                let e = &mine[&(m.clone(), g.clone())];
                let _ = writeln!(
                    out,
                    "  {} on {}: {}, {} → {} tok/s ({})",
                    one_line(m),
                    one_line(g),
                    e.fidelity.short(),
                    fmt_tps(e.reference.decode_median),
                    fmt_tps(e.patched.decode_median),
                    fmt_speedup(e.speedup.decode)
                );
            }
        }
    }
    out
}

/// A CSV field: quoted (with `"` doubled) when it contains a comma, quote, CR or LF, or
/// starts or ends with a space.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A number for CSV: shortest exact form, empty when unknown.
fn csv_num(x: f64) -> String {
    if x.is_finite() { format!("{x}") } else { String::new() }
}

fn csv_nums(xs: &[f64]) -> String {
    xs.iter().map(|&x| csv_num(x)).collect::<Vec<_>>().join(";")
}

fn csv_opt<T: ToString>(x: &Option<T>) -> String {
    x.as_ref().map_or(String::new(), T::to_string)
}

/// One CSV column: header and how to get the cell from an entry.
type CsvColumn = (&'static str, fn(&Entry) -> String);

/// Every CSV column. Lists are joined with `;`; unknown values are empty.
const CSV_COLUMNS: &[CsvColumn] = &[
    ("timestamp_utc", |e| e.timestamp_utc.clone()),
    ("model_id", |e| e.model.id.clone()),
    ("family", |e| e.model.family.clone()),
    ("quant", |e| csv_opt(&e.model.quant)),
    ("gpu", |e| e.hardware.name.clone()),
    ("gpu_memory_bytes", |e| csv_opt(&e.hardware.memory_bytes)),
    ("driver", |e| csv_opt(&e.software.driver)),
    ("cuda", |e| csv_opt(&e.software.cuda)),
    ("zmoe_version", |e| e.software.zmoe_version.clone()),
    ("git_commit", |e| e.software.git_commit.clone()),
    ("git_dirty", |e| csv_opt(&e.software.git_dirty)),
    ("backend", |e| e.settings.backend.clone()),
    ("runs", |e| e.settings.runs.to_string()),
    ("warmup", |e| csv_opt(&e.settings.warmup)),
    ("max_tokens", |e| e.settings.max_tokens.to_string()),
    ("prompt_tokens", |e| e.settings.prompt_tokens.to_string()),
    ("patterns_requested", |e| e.settings.patterns_requested.as_ref().map_or("default".into(), |p| p.join(";"))),
    ("patterns_applied", |e| e.patterns_applied.join(";")),
    ("steps_patched", |e| e.steps_patched.to_string()),
    ("fidelity", |e| e.fidelity.verdict.to_string()),
    ("tokens_identical", |e| e.fidelity.identical.to_string()),
    ("tokens_total", |e| e.fidelity.total.to_string()),
    ("first_divergence", |e| csv_opt(&e.fidelity.first_divergence.as_ref().map(|d| d.position))),
    ("fidelity_detail", |e| e.fidelity.detail()),
    ("ref_decode_tps", |e| csv_num(e.reference.decode_median)),
    ("patched_decode_tps", |e| csv_num(e.patched.decode_median)),
    ("decode_speedup", |e| csv_num(e.speedup.decode)),
    ("ref_prefill_tps", |e| csv_num(e.reference.prefill_median)),
    ("patched_prefill_tps", |e| csv_num(e.patched.prefill_median)),
    ("prefill_speedup", |e| csv_num(e.speedup.prefill)),
    ("ref_decode_runs", |e| csv_nums(&e.reference.decode_tps)),
    ("patched_decode_runs", |e| csv_nums(&e.patched.decode_tps)),
    ("ref_prefill_runs", |e| csv_nums(&e.reference.prefill_tps)),
    ("patched_prefill_runs", |e| csv_nums(&e.patched.prefill_tps)),
    ("ref_peak_memory_bytes", |e| csv_opt(&e.reference.peak_memory_bytes)),
    ("patched_peak_memory_bytes", |e| csv_opt(&e.patched.peak_memory_bytes)),
    ("ref_achieved_gbps", |e| csv_num(e.reference.achieved_gbps)),
    ("patched_achieved_gbps", |e| csv_num(e.patched.achieved_gbps)),
    ("copy_gbps", |e| csv_num(e.patched.copy_gbps)),
    ("ref_roofline_pct", |e| csv_num(e.reference.roofline_pct)),
    ("patched_roofline_pct", |e| csv_num(e.patched.roofline_pct)),
    ("notes", |e| e.notes.clone()),
];

/// `matrix csv`: a header row, then one row per entry in ledger order (RFC 4180 quoting,
/// `\n` line ends).
pub fn csv(entries: &[Entry]) -> String {
    let mut out = CSV_COLUMNS.iter().map(|(h, _)| *h).collect::<Vec<_>>().join(",");
    out.push('\n');
    for e in entries {
        out += &CSV_COLUMNS.iter().map(|(_, f)| csv_field(&f(e))).collect::<Vec<_>>().join(",");
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_alignment() {
        let t = Table {
            headers: vec!["name", "tok/s"],
            right: vec![false, true],
            rows: vec![vec!["a".into(), "1.5".into()], vec!["longer".into(), "100.0".into()]],
        };
        assert_eq!(t.render(), "name    tok/s\n------  -----\na         1.5\nlonger  100.0\n");
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field(" padded"), "\" padded\"");
        assert_eq!(csv_field(""), "");
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_tps(82.25), "82.2");
        assert_eq!(fmt_tps(f64::NAN), "-");
        assert_eq!(fmt_speedup(1.0904), "1.090x");
        assert_eq!(fmt_pct(45.06), "45.1%");
        assert_eq!(one_line("a\nb\tc\u{1b}[31m"), "a\\nb\\tc\\u{1b}[31m");
        assert_eq!(change(100.0, 106.4), "+6.4%");
        assert_eq!(change(0.0, 1.0), "");
    }
}
