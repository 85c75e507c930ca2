//! What a run writes: a JSON file with every figure, a Markdown report, and SVG charts
//! (upstream requests over time against client requests; latency CDF per run).
//!
//! The SVG is written by hand: the charting crates need system fonts to lay out text,
//! which a fresh machine does not have, and two line charts are little code.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::stats::Percentiles;

/// One run of a scenario: protection on or off.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// What this run is, when it is not told by its protection alone (the phases of
    /// `fleet-scale`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    pub protection: bool,
    pub instances: usize,
    pub keys: usize,
    pub concurrency: usize,
    pub upstream_delay_ms: u64,
    pub client_requests: u64,
    pub failed_requests: u64,
    pub upstream_requests: u64,
    pub upstream_per_key_mean: f64,
    pub upstream_per_key_max: u64,
    /// Client requests per upstream request.
    pub herd_reduction: f64,
    pub latency: Percentiles,
    /// How much later than their key's leader the waiters' responses completed.
    pub waiter_added: Percentiles,
    /// Per 50 ms: requests sent by clients, and requests that reached the upstream.
    pub client_per_interval: Vec<u64>,
    pub upstream_per_interval: Vec<u64>,
    /// What this scenario kind measures beyond the common figures.
    pub figures: Vec<(String, f64)>,
    #[serde(skip)]
    pub cdf: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub command: String,
    pub machine: String,
    pub runs: Vec<RunReport>,
    /// The findings in sentences, under the table (`fleet-scale`: each figure against
    /// its target).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub summary: Vec<String>,
}

impl RunReport {
    /// The run's name in the table and the charts: its phase, or its protection.
    fn label(&self) -> String {
        match &self.phase {
            Some(phase) => phase.clone(),
            None if self.protection => "protection on".into(),
            None => "protection off".into(),
        }
    }
}

pub const INTERVAL_MS: u64 = 50;

impl Report {
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("upstream-over-time.svg"), self.timeline_chart())?;
        std::fs::write(dir.join("latency-cdf.svg"), self.cdf_chart())?;
        Ok(())
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let extra: Vec<&str> = self.runs.first().map_or(Vec::new(), |r| {
            r.figures.iter().map(|(k, _)| k.as_str()).collect()
        });
        let phases = self.runs.iter().any(|r| r.phase.is_some());
        out.push_str(if phases { "| phase" } else { "| protection" });
        out.push_str(" | instances | client requests | upstream requests | per key (mean / max) | herd reduction | p50 | p99 | max | waiters added p50 / p99 | failed |");
        for name in &extra {
            let _ = write!(out, " {name} |");
        }
        out.push_str("\n|---|---|---|---|---|---|---|---|---|---|---|");
        out.push_str(&"---|".repeat(extra.len()));
        out.push('\n');
        for r in &self.runs {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.2} / {} | {:.1}x | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} / {:.2} ms | {} |{}",
                match &r.phase {
                    Some(phase) => phase.as_str(),
                    None if r.protection => "on",
                    None => "off",
                },
                r.instances,
                r.client_requests,
                r.upstream_requests,
                r.upstream_per_key_mean,
                r.upstream_per_key_max,
                r.herd_reduction,
                r.latency.p50_ms,
                r.latency.p99_ms,
                r.latency.max_ms,
                r.waiter_added.p50_ms,
                r.waiter_added.p99_ms,
                r.failed_requests,
                r.figures.iter().map(|(_, v)| format!(" {} |", figure(*v))).collect::<String>()
            );
        }
        for line in &self.summary {
            let _ = write!(out, "\n{line}\n");
        }
        out
    }

    fn markdown(&self) -> String {
        format!(
            "# {}\n\nCommand: `{}`\n\nMachine: {}\n\n{}\n![upstream requests over time](upstream-over-time.svg)\n\n![latency CDF](latency-cdf.svg)\n",
            self.scenario,
            self.command,
            self.machine,
            self.table()
        )
    }

    fn timeline_chart(&self) -> String {
        let mut series = Vec::new();
        for r in &self.runs {
            let label = r.label();
            let points = |counts: &[u64]| {
                counts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (i as f64 * INTERVAL_MS as f64, *c as f64))
                    .collect::<Vec<_>>()
            };
            series.push((
                format!("client requests ({label})"),
                points(&r.client_per_interval),
                true,
            ));
            series.push((
                format!("upstream requests ({label})"),
                points(&r.upstream_per_interval),
                false,
            ));
        }
        line_chart(
            &format!("{}: requests per {INTERVAL_MS} ms", self.scenario),
            "time since start (ms)",
            "requests",
            &series,
            false,
        )
    }

    fn cdf_chart(&self) -> String {
        let series: Vec<_> = self
            .runs
            .iter()
            .map(|r| (r.label(), r.cdf.clone(), r.protection && r.phase.is_none()))
            .collect();
        line_chart(
            &format!("{}: client latency CDF", self.scenario),
            "latency (ms)",
            "fraction of requests",
            &series,
            true,
        )
    }
}

/// A chart line: label, (x, y) points, dashed.
pub type Series = (String, Vec<(f64, f64)>, bool);

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A line chart as SVG: `series` are (label, points, dashed).
/// The x axis starts at the smallest x when `tight_x`, else at 0.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    tight_x: bool,
) -> String {
    let frame = Frame::fitting(series, tight_x);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">"#,
        frame.w, frame.h
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        frame.w / 2.0,
        escape(title)
    );
    frame.axes(&mut svg, x_label, y_label);
    for (i, (label, pts, dashed)) in series.iter().enumerate() {
        frame.line(&mut svg, i, label, pts, *dashed);
    }
    svg.push_str("</svg>\n");
    svg
}

/// The chart's geometry: the SVG size, the margins around the plot, and the ranges of
/// the data that the plot shows.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    x_min: f64,
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn fitting(series: &[Series], tight_x: bool) -> Frame {
        let (w, h, left, right, top, bottom) = (760.0, 420.0, 70.0, 20.0, 40.0, 110.0);
        let points = series.iter().flat_map(|s| s.1.iter());
        let x_min = if tight_x {
            points
                .clone()
                .map(|p| p.0)
                .fold(f64::INFINITY, f64::min)
                .floor()
        } else {
            0.0
        };
        let x_min = if x_min.is_finite() { x_min } else { 0.0 };
        let x_max = points
            .clone()
            .map(|p| p.0)
            .fold(0.0, f64::max)
            .max(x_min + 1.0);
        let y_max = points.map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.05;
        Frame {
            w,
            h,
            left,
            right,
            top,
            bottom,
            x_min,
            x_max,
            y_max,
        }
    }

    fn x(&self, v: f64) -> f64 {
        self.left + (v - self.x_min) / (self.x_max - self.x_min) * (self.w - self.left - self.right)
    }

    fn y(&self, v: f64) -> f64 {
        self.h - self.bottom - v / self.y_max * (self.h - self.top - self.bottom)
    }

    /// Axes with five ticks each, grid lines and the axis labels.
    fn axes(&self, svg: &mut String, x_label: &str, y_label: &str) {
        let (w, h, left, right, top, bottom) =
            (self.w, self.h, self.left, self.right, self.top, self.bottom);
        let _ = writeln!(
            svg,
            r#"<path d="M{left} {top} V{} H{}" stroke="black" fill="none"/>"#,
            h - bottom,
            w - right
        );
        for i in 0..=5 {
            let (xv, yv) = (
                self.x_min + (self.x_max - self.x_min) * i as f64 / 5.0,
                self.y_max * i as f64 / 5.0,
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                self.x(xv),
                h - bottom + 16.0,
                tick(xv)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                self.y(yv) + 4.0,
                tick(yv)
            );
            let _ = writeln!(
                svg,
                r##"<path d="M{left} {:.1} H{}" stroke="#eee"/>"##,
                self.y(yv),
                w - right
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (w + left) / 2.0,
            h - bottom + 34.0,
            escape(x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (h - bottom + top) / 2.0,
            escape(y_label)
        );
    }

    /// Series number `i`: its polyline and its legend entry below the plot.
    fn line(&self, svg: &mut String, i: usize, label: &str, pts: &[(f64, f64)], dashed: bool) {
        let color = COLORS[i % COLORS.len()];
        let d: Vec<String> = pts
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", self.x(*px), self.y(*py)))
            .collect();
        let dash = if dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            d.join(" ")
        );
        let left = self.left;
        let ly = self.h - self.bottom + 52.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<path d="M{left} {ly} h24" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            left + 30.0,
            ly + 4.0,
            escape(label)
        );
    }
}

/// A figure in the table; "-" for one that does not apply to the run (NaN, which
/// the JSON file holds as `null`).
fn figure(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v == v.trunc() && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn tick(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_well_formed_svg_with_every_series() {
        let svg = line_chart(
            "t <1>",
            "x",
            "y",
            &[
                ("a".into(), vec![(0.0, 1.0), (10.0, 3.0)], false),
                ("b".into(), vec![(5.0, 2.0)], true),
            ],
            false,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
    }
}
