//! The loss curve as an SVG image: training and validation loss against the step. Written by
//! hand (a few dozen lines of SVG) rather than with a plotting crate: nothing to build, nothing
//! to render but text.

use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Three significant digits, for tick labels.
fn label(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(0, 6) as usize;
    format!("{value:.decimals$}")
}

/// An SVG document plotting `train` and `validation` as `(step, loss)` points.
pub fn loss_curve_svg(title: &str, train: &[(usize, f64)], validation: &[(usize, f64)]) -> String {
    let points = train.iter().chain(validation).filter(|(_, loss)| loss.is_finite());
    let (mut low, mut high, mut last_step) = (f64::INFINITY, f64::NEG_INFINITY, 1usize);
    for &(step, loss) in points {
        low = low.min(loss);
        high = high.max(loss);
        last_step = last_step.max(step);
    }
    if !low.is_finite() {
        (low, high) = (0.0, 1.0);
    }
    if high - low < 1e-9 {
        high = low + 1.0;
    }
    let margin = (high - low) * 0.05;
    let (low, high) = ((low - margin).max(0.0), high + margin);
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let x = |step: usize| LEFT + plot_width * step as f64 / last_step as f64;
    let y = |loss: f64| TOP + plot_height * (1.0 - (loss - low) / (high - low));
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let escaped = title.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let _ = writeln!(svg, r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{escaped}</text>"#, WIDTH / 2.0);
    // Axes, grid and ticks.
    for tick in 0..=5 {
        let value = low + (high - low) * tick as f64 / 5.0;
        let position = y(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{position:.1}" x2="{:.1}" y2="{position:.1}" stroke="#ddd"/>"##,
            WIDTH - RIGHT
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            position + 4.0,
            label(value)
        );
        let step = last_step * tick / 5;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{step}</text>"#,
            x(step),
            HEIGHT - BOTTOM + 16.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<polyline points="{LEFT},{TOP} {LEFT},{bottom} {right},{bottom}" fill="none" stroke="black"/>"#,
        bottom = HEIGHT - BOTTOM,
        right = WIDTH - RIGHT
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#,
        LEFT + plot_width / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">loss</text>"#,
        TOP + plot_height / 2.0,
        TOP + plot_height / 2.0
    );
    for (series, color, name, index) in [(train, "#1f77b4", "train", 0), (validation, "#d62728", "validation", 1)] {
        let finite: Vec<&(usize, f64)> = series.iter().filter(|(_, loss)| loss.is_finite()).collect();
        if finite.is_empty() {
            continue;
        }
        let coordinates: Vec<String> =
            finite.iter().map(|&&(step, loss)| format!("{:.1},{:.1}", x(step), y(loss))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"#,
            coordinates.join(" ")
        );
        if finite.len() <= 60 {
            for &&(step, loss) in &finite {
                let _ = writeln!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#, x(step), y(loss));
            }
        }
        let legend_y = TOP + 14.0 + 18.0 * index as f64;
        let legend_x = WIDTH - RIGHT - 130.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{color}" stroke-width="2"/>"#,
            legend_x + 24.0
        );
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{name}</text>"#, legend_x + 30.0, legend_y + 4.0);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_has_both_series_and_survives_odd_input() {
        let svg = loss_curve_svg("run <1>", &[(1, 3.0), (2, 2.5), (3, f64::NAN)], &[(0, 3.1), (3, 2.4)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
        assert!(svg.contains("run &lt;1&gt;") && svg.contains(">validation<"));
        assert!(!svg.contains("NaN"));
        let empty = loss_curve_svg("empty", &[], &[]);
        assert!(empty.contains("</svg>") && !empty.contains("NaN"));
    }
}
