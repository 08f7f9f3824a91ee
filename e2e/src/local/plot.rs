//! The demo's timeline as an SVG: offered load, client P99 against the
//! SLO, and replicas, on one time axis.

use std::path::Path;

use plotters::prelude::*;

use super::scenario::Sample;

/// Picks one plotted value out of a sample.
type Value = Box<dyn Fn(&Sample) -> Option<f64>>;

pub fn svg(samples: &[Sample], slo_ms: f64, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((3, 1));
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let series: [(&str, Value, RGBColor); 3] = [
        (
            "offered load (requests/s)",
            Box::new(|s| Some(s.offered_rps)),
            BLUE,
        ),
        (
            "client P99 (ms); dashed: SLO",
            Box::new(|s| s.client_p99_ms),
            RED,
        ),
        (
            "replicas (ready: green)",
            Box::new(|s| Some(f64::from(s.replicas))),
            BLACK,
        ),
    ];
    for (area, (title, value, colour)) in areas.iter().zip(series) {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|s| value(s).map(|v| (s.t, v)))
            .collect();
        let mut y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
        if title.starts_with("client") {
            y_max = y_max.max(slo_ms * 1.3);
        }
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc("seconds").draw()?;
        chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?;
        if title.starts_with("client") {
            chart.draw_series(DashedLineSeries::new(
                vec![(0.0, slo_ms), (t_max, slo_ms)],
                6,
                4,
                RED.mix(0.5).stroke_width(1),
            ))?;
        }
        if title.starts_with("replicas") {
            let ready: Vec<(f64, f64)> =
                samples.iter().map(|s| (s.t, f64::from(s.ready))).collect();
            chart.draw_series(LineSeries::new(ready, GREEN.stroke_width(1)))?;
        }
    }
    root.present()?;
    Ok(())
}
