//! The SVG chart: each figure's median as a ratio to host-gw, a bar per backend.
use serde_json::Value;

use crate::report::Metric;

/// One color per backend, stable across runs.
fn backend_color(name: &str) -> &'static str {
    match name {
        "underlay" => "#7f7f7f",
        "host-gw" => "#1f77b4",
        "kernel-vxlan" => "#ff7f0e",
        "ebpf-vxlan" => "#2ca02c",
        "ebpf-udp" => "#17becf",
        "userspace-udp" => "#d62728",
        "ebpf-vxlan-xdp" => "#bcbd22",
        "ebpf-vxlan-generic" => "#9467bd",
        "host-gw-v6" => "#aec7e8",
        "kernel-vxlan-v6" => "#ffbb78",
        "ebpf-vxlan-v6" => "#98df8a",
        _ => "#8c564b",
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Grouped bars, one group per figure, one bar per backend: the median's ratio to host-gw on a
/// log scale (0.01x to 10x), so that 0.03x and 3x are both readable; host-gw is the 1x line.
pub fn chart_svg(report: &Value) -> String {
    // Backends without a figure (a known limitation, a failed setup) get no bar and no legend.
    let rows: Vec<&Value> = report["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["summary"].as_object().is_some_and(|m| !m.is_empty()))
        .collect();
    let (w, h) = (1000.0_f64, 520.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 70.0, 120.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let (lo, hi) = (0.01_f64.log10(), 10.0_f64.log10());
    let y = |ratio: f64| top + plot_h * (hi - ratio.clamp(0.01, 10.0).log10()) / (hi - lo);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="16" text-anchor="middle" font-weight="bold">overlay-bench: container to container, ratio to host-gw (median of {} round(s) of {} s)</text>
<text x="{}" y="44" text-anchor="middle" fill="#444">{}</text>
"##,
        w / 2.0,
        report["config"]["rounds"],
        report["config"]["duration_s"],
        w / 2.0,
        xml_escape(report["config"]["machine"].as_str().unwrap_or_default()),
    );
    for tick in [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0] {
        let ty = y(tick);
        let (stroke, dash) = if tick == 1.0 {
            ("#000", "")
        } else {
            ("#ddd", r#" stroke-dasharray="3,3""#)
        };
        svg += &format!(
            r#"<line x1="{left}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="{stroke}"{dash}/><text x="{}" y="{:.1}" text-anchor="end">{tick}x</text>
"#,
            w - right,
            left - 6.0,
            ty + 4.0
        );
    }
    svg += &format!(
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">ratio to host-gw (log scale; host-gw = 1x)</text>
"#,
        top + plot_h / 2.0
    );
    let group_w = plot_w / Metric::ALL.len() as f64;
    let bar_w = (group_w - 20.0) / rows.len().max(1) as f64;
    for (g, m) in Metric::ALL.iter().enumerate() {
        let gx = left + g as f64 * group_w + 10.0;
        for (i, r) in rows.iter().enumerate() {
            let name = r["backend"].as_str().unwrap_or("?");
            let Some(ratio) = r["summary"][m.key()]["ratio_to_host_gw"].as_f64() else {
                continue;
            };
            let x = gx + i as f64 * bar_w;
            let (y0, y1) = (y(ratio), y(0.01));
            svg += &format!(
                r#"<rect x="{x:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{name}: {ratio:.2}x</title></rect>
"#,
                (bar_w - 2.0).max(1.0),
                (y1 - y0).max(0.0),
                backend_color(name)
            );
            svg += &format!(
                r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>
"#,
                x + bar_w / 2.0 - 1.0,
                y0 - 3.0,
                if (0.995..10.0).contains(&ratio) {
                    format!("{ratio:.1}")
                } else {
                    format!("{ratio:.2}")
                }
            );
        }
        svg += &format!(
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>
"##,
            gx + (group_w - 20.0) / 2.0,
            top + plot_h + 18.0,
            m.label(),
            gx + (group_w - 20.0) / 2.0,
            top + plot_h + 33.0,
            if m.higher_is_better() {
                "higher is better"
            } else {
                "lower is better"
            }
        );
    }
    let legend_y = h - 40.0;
    let item_w = plot_w / rows.len().max(1) as f64;
    for (i, r) in rows.iter().enumerate() {
        let name = r["backend"].as_str().unwrap_or("?");
        let x = left + i as f64 * item_w;
        svg += &format!(
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{legend_y:.1}">{name}</text>
"#,
            legend_y - 10.0,
            backend_color(name),
            x + 16.0
        );
    }
    svg += "</svg>\n";
    svg
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn chart_has_a_bar_per_backend_and_figure() {
        let summary = |r: f64| json!({"ratio_to_host_gw": r});
        let backend = |name: &str, r: f64| {
            let mut s = serde_json::Map::new();
            for m in Metric::ALL {
                s.insert(m.key().into(), summary(r));
            }
            json!({"backend": name, "summary": s})
        };
        let report = json!({
            "config": {"rounds": 3, "duration_s": 5, "machine": "a <test> machine"},
            "backends": [backend("host-gw", 1.0), backend("userspace-udp", 0.03)],
        });
        let svg = chart_svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 2 * Metric::ALL.len());
        assert!(svg.contains("a &lt;test&gt; machine"));
    }
}
