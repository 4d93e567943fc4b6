//! The self-contained HTML report: tables, latency-percentile plots per section, and the
//! timeline of sessions, sandbox states and sandbox CPU, all inline SVG (no external assets).

use std::fmt::Write;

use crate::report::{COLUMNS, Report};

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const W: f64 = 760.0;
const H: f64 = 300.0;
const PAD_L: f64 = 70.0;
const PAD_R: f64 = 150.0;
const PAD_T: f64 = 30.0;
const PAD_B: f64 = 45.0;

/// One line of a chart.
struct Series {
    name: String,
    color: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// A linear or log10 axis with labelled ticks.
struct Axis {
    label: String,
    min: f64,
    max: f64,
    log: bool,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    fn pos(&self, v: f64, len: f64) -> f64 {
        let (v, lo, hi) = if self.log {
            (v.max(self.min).log10(), self.min.log10(), self.max.log10())
        } else {
            (v, self.min, self.max)
        };
        if hi > lo {
            (v - lo) / (hi - lo) * len
        } else {
            0.0
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn chart(title: &str, series: &[Series], x: &Axis, y: &Axis) -> String {
    let (pw, ph) = (W - PAD_L - PAD_R, H - PAD_T - PAD_B);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11"><text x="{PAD_L}" y="18" font-size="13" font-weight="bold">{}</text><rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##,
        esc(title)
    );
    for (v, label) in &x.ticks {
        let px = PAD_L + x.pos(*v, pw);
        let _ = write!(
            s,
            r##"<line x1="{px:.1}" y1="{PAD_T}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            PAD_T + ph,
            PAD_T + ph + 14.0,
            esc(label)
        );
    }
    for (v, label) in &y.ticks {
        let py = PAD_T + ph - y.pos(*v, ph);
        let _ = write!(
            s,
            r##"<line x1="{PAD_L}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            PAD_L + pw,
            PAD_L - 5.0,
            py + 4.0,
            esc(label)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"#,
        PAD_L + pw / 2.0,
        H - 8.0,
        esc(&x.label),
        PAD_T + ph / 2.0,
        PAD_T + ph / 2.0,
        esc(&y.label)
    );
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|(a, b)| {
                format!(
                    "{:.1},{:.1}",
                    PAD_L + x.pos(*a, pw),
                    PAD_T + ph - y.pos(*b, ph)
                )
            })
            .collect();
        let dash = if ser.dashed {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.8"{dash} points="{}"/>"#,
            ser.color,
            pts.join(" ")
        );
        let ly = PAD_T + 12.0 + 16.0 * i as f64;
        let lx = PAD_L + pw + 10.0;
        let _ = write!(
            s,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            ser.color,
            lx + 22.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Percentile -> "nines" (p90 = 1, p99 = 2, ...), the x position of percentile plots.
fn nines(pct: f64) -> f64 {
    let rest = (100.0 - pct) / 100.0;
    if rest <= 1e-6 { 6.0 } else { -rest.log10() }
}

/// Decade ticks (0.01, 0.1, 1, 10 ...) covering [lo, hi].
fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<(f64, String)>) {
    let lo = 10f64.powf(lo.max(1e-3).log10().floor());
    let hi = 10f64.powf(hi.max(lo * 10.0).log10().ceil());
    let mut ticks = Vec::new();
    let mut v = lo;
    while v <= hi * 1.001 {
        ticks.push((v, format!("{v}")));
        v *= 10.0;
    }
    (lo, hi, ticks)
}

fn linear_ticks(max: f64, n: usize) -> Vec<(f64, String)> {
    (0..=n)
        .map(|i| {
            let v = max * i as f64 / n as f64;
            (
                v,
                if max >= 10.0 || v.fract() == 0.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                },
            )
        })
        .collect()
}

fn percentile_plot(report: &Report, section: &str) -> Option<String> {
    let mut series = Vec::new();
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    let mut max_nines = 1f64;
    for (i, t) in report.targets.iter().enumerate() {
        let Some(s) = t.section(section) else {
            continue;
        };
        if s.curve.is_empty() {
            continue;
        }
        let count = s.latency.count.max(1) as f64;
        // Beyond 1/count the curve is just the max: stop there.
        let limit = count.log10().max(1.0);
        let points: Vec<(f64, f64)> = s
            .curve
            .iter()
            .map(|(p, us)| (nines(*p).min(limit), *us as f64 / 1000.0))
            .collect();
        for (x, y) in &points {
            lo = lo.min(*y);
            hi = hi.max(*y);
            max_nines = max_nines.max(*x);
        }
        series.push(Series {
            name: t.name.clone(),
            color: COLORS[i % COLORS.len()],
            dashed: false,
            points,
        });
    }
    if series.is_empty() {
        return None;
    }
    let (ymin, ymax, yticks) = log_ticks(lo, hi);
    let labels = ["p0", "p90", "p99", "p99.9", "p99.99", "p99.999", "max"];
    let top = max_nines.ceil().min(6.0);
    let x = Axis {
        label: "percentile".into(),
        min: 0.0,
        max: top,
        log: false,
        ticks: (0..=top as usize)
            .map(|n| (n as f64, labels[n].to_string()))
            .collect(),
    };
    let y = Axis {
        label: "latency (ms, log)".into(),
        min: ymin,
        max: ymax,
        log: true,
        ticks: yticks,
    };
    Some(chart(
        &format!("{} latency by percentile", section),
        &series,
        &x,
        &y,
    ))
}

fn timeline_plots(report: &Report) -> String {
    let tl = &report.timeline;
    if tl.is_empty() {
        return String::new();
    }
    let t_max = tl.last().map_or(1.0, |s| s.t).max(1.0);
    let xt = Axis {
        label: "seconds".into(),
        min: 0.0,
        max: t_max,
        log: false,
        ticks: linear_ticks(t_max, 6),
    };
    let mut states: Vec<String> = tl
        .iter()
        .flat_map(|s| s.sandboxes.keys().cloned())
        .collect();
    states.sort();
    states.dedup();
    let mut counts = Vec::new();
    for (i, st) in states.iter().enumerate() {
        counts.push(Series {
            name: format!("sandboxes {st}"),
            color: COLORS[i % COLORS.len()],
            dashed: false,
            points: tl
                .iter()
                .map(|s| (s.t, f64::from(*s.sandboxes.get(st).unwrap_or(&0))))
                .collect(),
        });
    }
    for (i, (name, get)) in [
        (
            "sessions active",
            (|s: &crate::monitor::Sample| s.sessions_active) as fn(&_) -> i64,
        ),
        ("sessions thinking", |s| s.sessions_thinking),
        ("sessions idle", |s| s.sessions_idle),
    ]
    .into_iter()
    .enumerate()
    {
        counts.push(Series {
            name: name.into(),
            color: COLORS[(states.len() + i) % COLORS.len()],
            dashed: true,
            points: tl.iter().map(|s| (s.t, get(s) as f64)).collect(),
        });
    }
    let y_max = counts
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    // A multiple of 5, so the 5 ticks fall on whole counts.
    let y_max = (y_max / 5.0).ceil() * 5.0;
    let yc = Axis {
        label: "count".into(),
        min: 0.0,
        max: y_max,
        log: false,
        ticks: linear_ticks(y_max, 5),
    };
    let mut out = chart("Sessions and sandbox states", &counts, &xt, &yc);

    let mut cpu = Vec::new();
    for (i, st) in states.iter().enumerate() {
        cpu.push(Series {
            name: format!("cpu {st}"),
            color: COLORS[i % COLORS.len()],
            dashed: false,
            points: tl
                .iter()
                .map(|s| (s.t, *s.sandbox_cpu.get(st).unwrap_or(&0.0)))
                .collect(),
        });
    }
    if tl.iter().any(|s| s.activator_cpu.is_some()) {
        cpu.push(Series {
            name: "activator".into(),
            color: "#000000",
            dashed: true,
            points: tl
                .iter()
                .map(|s| (s.t, s.activator_cpu.unwrap_or(0.0)))
                .collect(),
        });
    }
    if !cpu.is_empty() {
        let c_max = cpu
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.05, f64::max);
        let yc = Axis {
            label: "CPU (cores)".into(),
            min: 0.0,
            max: c_max,
            log: false,
            ticks: linear_ticks(c_max, 5),
        };
        out.push_str(&chart("CPU by sandbox state", &cpu, &xt, &yc));
    }
    out
}

/// Renders the whole report as one HTML page.
pub fn render(report: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>activator-loadtest {}</title>\
         <style>body{{font-family:sans-serif;margin:20px;max-width:1100px}}table{{border-collapse:collapse;font-size:12px}}\
         td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}th{{background:#f3f3f3}}\
         .fail{{color:#b00;font-weight:bold}}.ok{{color:#070;font-weight:bold}}pre{{background:#f7f7f7;padding:8px}}</style></head><body>",
        esc(&report.mode)
    );
    let _ = write!(
        h,
        "<h1>activator-loadtest: {}</h1><p>{} cores, {}, kernel {}, load average {} at the start. Started at Unix time {}.</p>",
        esc(&report.mode),
        report.machine.cores,
        esc(&report.machine.cpu_model),
        esc(&report.machine.kernel),
        esc(&report.machine.load_average),
        report.started_unix
    );
    if report.passed {
        h.push_str("<p class=\"ok\">All checks passed.</p>");
    } else {
        h.push_str("<ul>");
        for f in &report.failures {
            let _ = write!(h, "<li class=\"fail\">{}</li>", esc(f));
        }
        h.push_str("</ul>");
    }
    h.push_str("<h2>Results</h2><table><tr>");
    for c in COLUMNS {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>");
    for row in report.rows() {
        h.push_str("<tr>");
        for c in row {
            let _ = write!(h, "<td>{}</td>", esc(&c));
        }
        h.push_str("</tr>");
    }
    let mut sections: Vec<String> = Vec::new();
    for s in report.targets.iter().flat_map(|t| t.sections.iter()) {
        if !sections.contains(&s.name) {
            sections.push(s.name.clone());
        }
    }
    h.push_str("</table>");
    let counts: Vec<String> = report
        .targets
        .iter()
        .flat_map(|t| {
            t.sections
                .iter()
                .filter(|s| !s.counts.is_empty())
                .map(move |s| format!("{} {}: {:?}", t.name, s.name, s.counts))
        })
        .collect();
    if !counts.is_empty() {
        let _ = write!(h, "<h3>Counts</h3><pre>{}</pre>", esc(&counts.join("\n")));
    }
    h.push_str("<h2>Latency percentiles</h2>");
    for name in &sections {
        if let Some(svg) = percentile_plot(report, name) {
            h.push_str(&svg);
        }
    }
    if !report.timeline.is_empty() {
        h.push_str("<h2>Timeline</h2><p>Sandbox states from the activator's admin API; CPU per state from /proc (paused sandboxes should use none).</p>");
        h.push_str(&timeline_plots(report));
    }
    if let Some(mb) = report.activator_peak_rss_mb {
        let _ = write!(h, "<p>Activator peak resident memory: {mb:.1} MB.</p>");
    }
    if let Some(e) = &report.admin_error {
        let _ = write!(h, "<p class=\"fail\">admin API: {}</p>", esc(e));
    }
    let _ = write!(
        h,
        "<h2>Scenario</h2><pre>{}</pre></body></html>",
        esc(&serde_yaml_ng::to_string(&report.scenario).unwrap_or_default())
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_and_ticks() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), 6.0);
        let (lo, hi, ticks) = log_ticks(0.05, 3.0);
        assert_eq!((lo, hi), (0.01, 10.0));
        assert_eq!(ticks.len(), 4);
        assert_eq!(esc("<a&b>"), "&lt;a&amp;b&gt;");
    }
}
