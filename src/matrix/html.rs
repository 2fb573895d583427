//! `matrix html`: a self-contained page — the report table and an inline SVG bar chart of
//! decode speedup and % of roofline per model × GPU.
//!
//! No scripts, fonts, images or style sheets are fetched: the page is one file that opens
//! offline, in a CI artifact or an e-mail. Every piece of ledger text is escaped with
//! [`escape`] (model ids and notes come from the command line of whoever ran the bench).

use std::fmt::Write as _;

use super::report::{REPORT_HEADERS, fmt_pct, fmt_speedup, report_cells};
use super::{Entry, Verdict, latest};

/// Escapes `& < > " '` for HTML text and attribute values (also valid in inline SVG).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out += "&amp;",
            '<' => out += "&lt;",
            '>' => out += "&gt;",
            '"' => out += "&quot;",
            '\'' => out += "&#39;",
            c => out.push(c),
        }
    }
    out
}

/// What the page says about where it came from.
#[derive(Debug, Clone)]
pub struct PageInfo<'a> {
    /// The ledger's name as shown (its path as given).
    pub ledger: &'a str,
    /// Lines of the ledger that were skipped as corrupt.
    pub skipped: usize,
    /// When the page was generated (RFC 3339 UTC).
    pub generated_utc: &'a str,
}

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px 32px;color:#1b1f24;background:#fff}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:16px;margin:28px 0 8px}
p.meta,p.caption{color:#57606a;font-size:13px;margin:4px 0}
table{border-collapse:collapse;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #d0d7de;text-align:left;vertical-align:top}
td{white-space:nowrap}
td.wrap{white-space:normal;min-width:7.5em}
td.model{white-space:normal;overflow-wrap:anywhere;min-width:9em;max-width:22em}
th{background:#f6f8fa;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.notes{min-width:180px;max-width:420px;white-space:pre-wrap;overflow-wrap:anywhere;color:#57606a}
td.pass{color:#1a7f37;font-weight:600}
td.fail{color:#cf222e;font-weight:600}
svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:12px;fill:#1b1f24}
svg text.title{font-size:13px;font-weight:600}
svg text.tick{fill:#57606a;font-size:11px}
svg text.sub{fill:#57606a;font-size:11px}
svg text.value{font-size:11px;paint-order:stroke;stroke:#fff;stroke-width:4px;stroke-linejoin:round}
svg text.inside{fill:#fff;font-size:11px;font-weight:600}
svg line.grid{stroke:#eaeef2}
svg line.axis{stroke:#8c959f}
svg line.ref{stroke:#1b1f24;stroke-width:1.5;stroke-dasharray:4 3}
svg rect.speedup.up{fill:#2da44e}
svg rect.speedup.down{fill:#e16f24}
svg rect.speedup.fail{fill:#cf222e}
svg rect.roofline{fill:#218bff}
";

/// The whole page for the entries of a ledger (in ledger order): chart and table of the
/// latest entry per model × GPU, with notes.
pub fn page(entries: &[Entry], info: &PageInfo) -> String {
    let shown = latest(entries);
    let mut h = String::new();
    h += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
    h += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
    h += "<title>zmoe benchmark matrix</title>\n<style>\n";
    h += STYLE;
    h += "</style>\n</head>\n<body>\n<h1>zmoe benchmark matrix</h1>\n";
    let _ = writeln!(
        h,
        "<p class=\"meta\">{} entr{} in <code>{}</code>{}; latest per model × GPU shown. Generated {} by zmoe {}.</p>",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        escape(info.ledger),
        match info.skipped {
            0 => String::new(),
            1 => " (1 corrupt line skipped)".into(),
            n => format!(" ({n} corrupt lines skipped)"),
        },
        escape(info.generated_utc),
        escape(env!("CARGO_PKG_VERSION")),
    );
    h += "<h2>Decode speedup and % of roofline</h2>\n";
    h += &chart(&shown);
    h += "<p class=\"caption\">Speedup: median patched ÷ median reference decode tok/s (dashed line: 1.0×). \
          Red: fidelity FAIL — the patched plan changed tokens, so its speed does not count. \
          Roofline: patched achieved GB/s (weight bytes per token × tok/s) ÷ copy bandwidth measured in the same run.</p>\n";
    h += "<h2>Latest entry per model × GPU</h2>\n";
    h += &table(&shown);
    h += "</body>\n</html>\n";
    h
}

/// The report table plus a notes column.
fn table(entries: &[&Entry]) -> String {
    let numeric = ["ref tok/s", "patched tok/s", "speedup", "roofline"];
    let mut t = String::from("<table>\n<thead><tr>");
    for head in REPORT_HEADERS.iter().chain(&["notes"]) {
        let _ = write!(t, "<th>{}</th>", escape(head));
    }
    t += "</tr></thead>\n<tbody>\n";
    for e in entries {
        t += "<tr>";
        for (head, cell) in REPORT_HEADERS.iter().zip(report_cells(e)) {
            let class = if *head == "fidelity" {
                match e.fidelity.verdict {
                    Verdict::Pass => " class=\"pass\"",
                    Verdict::Fail => " class=\"fail\"",
                }
            } else if numeric.contains(head) {
                " class=\"num\""
            } else if *head == "GPU" {
                " class=\"wrap\""
            } else if *head == "model" {
                " class=\"model\""
            } else {
                ""
            };
            let title = if *head == "fidelity" {
                format!(" title=\"{}\"", escape(&e.fidelity.detail()))
            } else {
                String::new()
            };
            let _ = write!(t, "<td{class}{title}>{}</td>", escape(&cell));
        }
        let _ = write!(t, "<td class=\"notes\">{}</td>", escape(&e.notes));
        t += "</tr>\n";
    }
    t += "</tbody>\n</table>\n";
    t
}

/// Shortens `s` to `max` characters with an ellipsis.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { s.chars().take(max - 1).collect::<String>() + "…" }
}

/// A tick step that gives at most `max_ticks` ticks up to `top`.
fn tick_step(top: f64, max_ticks: f64) -> f64 {
    [0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]
        .into_iter()
        .find(|s| top / s <= max_ticks)
        .unwrap_or(top / max_ticks)
}

/// One panel of the chart: its left edge, width and axis maximum.
struct Panel {
    x: f64,
    w: f64,
    max: f64,
}

impl Panel {
    fn at(&self, v: f64) -> f64 {
        self.x + self.w * (v / self.max).clamp(0.0, 1.0)
    }
}

/// The SVG: per entry a row with its label, a decode-speedup bar (with a 1.0× reference
/// line) and a %-of-roofline bar. One `<rect>` per finite value, nothing else is a rect.
/// Drawn in layers: grid, bars, reference line, then text (with a white halo) on top.
fn chart(entries: &[&Entry]) -> String {
    const LABEL_W: f64 = 250.0;
    const WIDTH: f64 = 1000.0;
    const TOP: f64 = 52.0;
    const ROW: f64 = 38.0;
    const BAR: f64 = 18.0;
    let speed_max = entries.iter().map(|e| e.speedup.decode).filter(|x| x.is_finite()).fold(1.0f64, f64::max);
    let speed_step = tick_step(speed_max * 1.15, 8.0);
    let speed = Panel { x: LABEL_W + 20.0, w: 320.0, max: ((speed_max * 1.15) / speed_step).ceil() * speed_step };
    let roof_max = entries.iter().map(|e| e.patched.roofline_pct).filter(|x| x.is_finite()).fold(100.0f64, f64::max);
    let roof_step = tick_step(roof_max, 4.0);
    let roof = Panel { x: speed.x + speed.w + 50.0, w: 320.0, max: (roof_max / roof_step).ceil() * roof_step };
    let bottom = TOP + ROW * entries.len() as f64;
    let height = bottom + 12.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" \
         role=\"img\" aria-label=\"Decode speedup and percent of roofline per model and GPU\">"
    );
    let _ = writeln!(s, "<text class=\"title\" x=\"{}\" y=\"16\">decode speedup (patched ÷ reference)</text>", speed.x);
    let _ = writeln!(s, "<text class=\"title\" x=\"{}\" y=\"16\">% of roofline (patched)</text>", roof.x);
    let speed_tick = |v: f64| format!("{v}×");
    let roof_tick = |v: f64| format!("{v}%");
    for (panel, step, fmt) in
        [(&speed, speed_step, &speed_tick as &dyn Fn(f64) -> String), (&roof, roof_step, &roof_tick)]
    {
        let ticks = (panel.max / step).round() as usize;
        for i in 0..=ticks {
            let v = step * i as f64;
            let x = panel.at(v);
            let class = if i == 0 { "axis" } else { "grid" };
            let _ = writeln!(
                s,
                "<line class=\"{class}\" x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{bottom}\"/>",
                TOP - 6.0
            );
            let label = fmt((v * 1000.0).round() / 1000.0);
            let _ = writeln!(
                s,
                "<text class=\"tick\" x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
                TOP - 12.0
            );
        }
    }
    let mut text = String::new();
    for (i, e) in entries.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let bar_y = y + (ROW - BAR) / 2.0;
        let label = format!("{} on {}", e.model.id, e.hardware.name);
        let _ = writeln!(
            text,
            "<text x=\"0\" y=\"{:.1}\"><title>{}</title>{}</text>",
            y + 16.0,
            escape(&label),
            escape(&clip(&e.model.id, 36))
        );
        let _ = writeln!(
            text,
            "<text class=\"sub\" x=\"0\" y=\"{:.1}\">{} · {}</text>",
            y + 30.0,
            escape(&clip(&e.hardware.name, 26)),
            escape(&e.fidelity.short())
        );
        let fail = e.fidelity.verdict == Verdict::Fail;
        let d = e.speedup.decode;
        let value = format!("{}{}", fmt_speedup(d), if fail { " FAIL" } else { "" });
        let class = match (fail, d >= 1.0) {
            (true, _) => "speedup fail",
            (false, true) => "speedup up",
            (false, false) => "speedup down",
        };
        let row = Row { y: bar_y, h: BAR };
        row.bar(&mut s, &mut text, &speed, d, class, &value, &format!("{label}: decode {value}"));
        let r = e.patched.roofline_pct;
        row.bar(&mut s, &mut text, &roof, r, "roofline", &fmt_pct(r), &format!("{label}: {} of roofline", fmt_pct(r)));
    }
    // The 1.0× reference line: over the bars, under the text.
    let x1 = speed.at(1.0);
    let _ =
        writeln!(s, "<line class=\"ref\" x1=\"{x1:.1}\" y1=\"{}\" x2=\"{x1:.1}\" y2=\"{}\"/>", TOP - 4.0, bottom + 4.0);
    s += &text;
    s += "</svg>\n";
    s
}

/// The vertical place of one row's bars.
struct Row {
    y: f64,
    h: f64,
}

impl Row {
    /// One bar into `shapes` and its value label into `text` (after the bar's end, or inside
    /// it when the bar is nearly full); for an unknown value no bar, only `n/a`.
    #[allow(clippy::too_many_arguments)]
    fn bar(&self, shapes: &mut String, text: &mut String, p: &Panel, v: f64, class: &str, value: &str, tip: &str) {
        let (y, h) = (self.y, self.h);
        let text_y = y + h / 2.0 + 4.0;
        if !v.is_finite() {
            let _ = writeln!(text, "<text class=\"value\" x=\"{:.1}\" y=\"{text_y:.1}\">n/a</text>", p.x + 4.0);
            return;
        }
        let end = p.at(v);
        let _ = writeln!(
            shapes,
            "<rect class=\"{class}\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h}\"><title>{}</title></rect>",
            p.x,
            end - p.x,
            escape(tip)
        );
        let room = p.x + p.w - end;
        let approx_w = 7.0 * value.chars().count() as f64;
        if room >= approx_w + 6.0 {
            let _ = writeln!(
                text,
                "<text class=\"value\" x=\"{:.1}\" y=\"{text_y:.1}\">{}</text>",
                end + 4.0,
                escape(value)
            );
        } else {
            let _ = writeln!(
                text,
                "<text class=\"inside\" x=\"{:.1}\" y=\"{text_y:.1}\" text-anchor=\"end\">{}</text>",
                end - 4.0,
                escape(value)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape("<b>\"Tom\" & 'Jerry'</b>"), "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }

    #[test]
    fn ticks() {
        assert_eq!(tick_step(1.3, 6.0), 0.25);
        assert_eq!(tick_step(100.0, 4.0), 25.0);
        assert_eq!(tick_step(180.0, 4.0), 50.0);
        assert_eq!(tick_step(3.0, 6.0), 0.5);
    }
}
