//! Small inline-SVG charts (line and bar) for the HTML report.
//!
//! Written by hand because the report must be one self-contained file that draws with
//! no script and no network fetch; the charting crates either emit files with external
//! fonts and styles or pull in a rendering stack (`plotters`) far larger than the two
//! chart kinds needed here.

use std::fmt::Write as _;

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 44.0;

/// Colours of series, in order (Tableau 10).
pub const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// How the x axis is labelled.
#[derive(Clone, Copy)]
pub enum XAxis {
    /// Plain numbers.
    Linear,
    /// `x` is `log10(1 / (1 - quantile))`: ticks read 0%, 90%, 99%, 99.9%, …
    /// (HdrHistogram's percentile plot).
    Percentile,
}

/// Escapes text for HTML and SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `ticks` ticks over `range`.
fn tick_step(range: f64, ticks: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / ticks;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// Formats a tick value without trailing noise.
fn number(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6).replace(".0M", "M")
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || (v.fract() == 0.0) {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn percentile_label(x: f64) -> String {
    if x < 0.5 {
        return "0%".into();
    }
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.round() as usize).saturating_sub(2);
    format!("{p:.decimals$}%")
}

fn open(out: &mut String, title: &str, height: f64) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" aria-label="{t}"><title>{t}</title><text x="{LEFT}" y="18" class="title">{t}</text>"#,
        t = escape(title)
    );
}

fn legend(out: &mut String, labels: &[&str]) {
    let mut x = LEFT;
    for (i, label) in labels.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="26" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="35" class="legend">{}</text>"#,
            x + 14.0,
            escape(label)
        );
        x += 24.0 + 7.0 * label.chars().count() as f64;
    }
}

/// A line chart of `series` with axis titles; an empty chart says "no data".
pub fn line_chart(
    title: &str,
    x_title: &str,
    y_title: &str,
    series: &[Series],
    x_axis: XAxis,
) -> String {
    let mut out = String::new();
    open(&mut out, title, HEIGHT);
    let all = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    if all().next().is_none() {
        let _ = write!(
            out,
            r#"<text x="{:.0}" y="{:.0}" class="empty">no data</text></svg>"#,
            WIDTH / 2.0 - 24.0,
            HEIGHT / 2.0
        );
        return out;
    }
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let mut y1 = 0f64;
    for &(x, y) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if let XAxis::Percentile = x_axis {
        x0 = 0.0;
        x1 = x1.ceil().max(1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y_step = tick_step(y1, 5.0);
    let y1 = if y1 > 0.0 {
        (y1 / y_step).ceil() * y_step
    } else {
        1.0
    };
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * plot_w;
    let sy = |y: f64| TOP + plot_h - y / y1 * plot_h;
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= y1 + y_step / 2.0 {
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" x2="{:.1}" y1="{py:.1}" y2="{py:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 6.0,
            sy(y) + 4.0,
            number(y),
            py = sy(y)
        );
        y += y_step;
    }
    // X ticks.
    let ticks: Vec<(f64, String)> = match x_axis {
        XAxis::Percentile => (0..=x1 as usize)
            .map(|k| (k as f64, percentile_label(k as f64)))
            .collect(),
        XAxis::Linear => {
            let step = tick_step(x1 - x0, 6.0);
            let mut x = (x0 / step).ceil() * step;
            let mut ticks = Vec::new();
            while x <= x1 + step * 1e-9 {
                ticks.push((x, number(x)));
                x += step;
            }
            ticks
        }
    };
    for (x, label) in ticks {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
            sx(x),
            HEIGHT - BOTTOM + 16.0,
            escape(&label)
        );
    }
    let _ = write!(
        out,
        r#"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{:.1}" class="axis"/><line x1="{LEFT}" x2="{:.1}" y1="{b:.1}" y2="{b:.1}" class="axis"/><text x="{:.1}" y="{:.1}" class="axis-title" text-anchor="middle">{}</text><text x="14" y="{:.1}" class="axis-title" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"#,
        TOP + plot_h,
        WIDTH - RIGHT,
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        escape(x_title),
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_title),
        b = TOP + plot_h
    );
    for (i, s) in series.iter().enumerate() {
        let mut d = String::new();
        for (j, &(x, y)) in s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .enumerate()
        {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { " L" },
                sx(x),
                sy(y)
            );
        }
        let colour = PALETTE[i % PALETTE.len()];
        if !d.is_empty() {
            let _ = write!(
                out,
                r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="2" class="series"><title>{}</title></path>"#,
                escape(&s.label)
            );
        }
        // A few points (one round, say) would be an invisible line: mark each.
        if s.points.len() <= 40 {
            for &(x, y) in s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
            {
                let _ = write!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    sx(x),
                    sy(y)
                );
            }
        }
    }
    let labels: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
    legend(&mut out, &labels);
    out.push_str("</svg>");
    out
}

/// A bar chart, one bar per `(label, value)`, values written on the bars.
pub fn bar_chart(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let row = 32.0;
    let mut out = String::new();
    open(&mut out, title, TOP + row * bars.len() as f64 + 8.0);
    let max = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let max = if max > 0.0 { max } else { 1.0 };
    let label_w = 150.0;
    let plot_w = WIDTH - label_w - 90.0;
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = TOP + i as f64 * row;
        let w = if value.is_finite() {
            value / max * plot_w
        } else {
            0.0
        };
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text><path d="M{label_w:.1},{:.1} h{w:.1} v{:.1} h{:.1} Z" fill="{}" class="bar"><title>{}: {} {}</title></path><text x="{:.1}" y="{:.1}" class="tick">{} {}</text>"#,
            label_w - 6.0,
            y + row * 0.6,
            escape(label),
            y + 4.0,
            row - 8.0,
            -w,
            PALETTE[i % PALETTE.len()],
            escape(label),
            number(*value),
            escape(unit),
            label_w + w + 6.0,
            y + row * 0.6,
            number(*value),
            escape(unit)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(10.0, 5.0), 2.0);
        assert_eq!(tick_step(0.9, 5.0), 0.2);
        assert_eq!(tick_step(12_345.0, 6.0), 5000.0);
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(4.0), "99.99%");
        assert_eq!(number(19_000.0), "19k");
        assert_eq!(number(0.25), "0.250");
    }

    #[test]
    fn a_line_per_series_and_text_is_escaped() {
        let series = [
            Series {
                label: "a<b".into(),
                points: vec![(0.0, 1.0), (1.0, 2.0)],
            },
            Series {
                label: "c".into(),
                points: vec![(0.0, 3.0), (2.0, f64::NAN), (1.0, 0.5)],
            },
        ];
        let svg = line_chart("t&t", "x", "y", &series, XAxis::Linear);
        assert_eq!(svg.matches("class=\"series\"").count(), 2);
        assert!(svg.contains("a&lt;b") && svg.contains("t&amp;t"));
        assert!(!svg.contains("NaN"));
        let empty = line_chart("t", "x", "y", &[], XAxis::Percentile);
        assert!(empty.contains("no data"));
        let bars = bar_chart("b", "ms", &[("x".into(), 2.0), ("y".into(), 0.0)]);
        assert_eq!(bars.matches("class=\"bar\"").count(), 2);
    }
}
