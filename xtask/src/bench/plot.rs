//! PNG plots with plotters' bitmap backend. Text is drawn with `ab_glyph`
//! from the `DejaVu` Sans font of the Debian package `fonts-dejavu-core`,
//! read at run time: plotters has no built-in font, and a missing font
//! only costs the plots (the report says so), never the results.

use std::path::Path;

use anyhow::{Context as _, bail};
use plotters::{element::DashedPathElement, prelude::*, style::register_font};

use super::{
    FilterKind, TrafficKind,
    report::{Row, column, filter_name},
    testrun::ScalingPoint,
};

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const SIZE: (u32, u32) = (1200, 600);
/// Three panels side by side, each as wide as half of [`SIZE`].
const SCALING_SIZE: (u32, u32) = (1800, 600);

/// Registers the font every plot uses, once.
///
/// # Errors
/// When no font file is found (install `fonts-dejavu-core`).
pub fn font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONTS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or("no DejaVu Sans font: install fonts-dejavu-core")?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps registered fonts for the life of the process.
        register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("{path} is not a font plotters can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn color(f: FilterKind) -> RGBColor {
    match f {
        FilterKind::None => RGBColor(150, 150, 150),
        FilterKind::Nft => RGBColor(230, 159, 0),
        FilterKind::NftCt => RGBColor(213, 94, 0),
        FilterKind::XdpFilter => RGBColor(86, 180, 233),
        FilterKind::Ztxdp => RGBColor(0, 158, 115),
        FilterKind::XdpDrop => RGBColor(40, 40, 40),
    }
}

/// Grouped bars: one group per traffic mix, one bar per filter (median),
/// with a line from min to max.
pub fn mpps_bars(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut traffics: Vec<TrafficKind> = rows.iter().map(|r| r.traffic).collect();
    traffics.sort();
    traffics.dedup();
    let mut filters: Vec<FilterKind> = rows.iter().map(|r| r.filter).collect();
    filters.sort();
    filters.dedup();
    if traffics.is_empty() || filters.is_empty() {
        bail!("nothing to plot");
    }
    // Headroom above the tallest bar for the legend.
    let top = rows.iter().map(|r| r.mpps.2).fold(0.0, f64::max) * 1.45;
    let groups = count(traffics.len());
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Packet rate at the DUT (Mpps, median; line: min–max)",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..groups, 0.0..top.max(0.1))
        .map_err(draw)?;
    let names: Vec<String> = traffics
        .iter()
        .map(|t| column(*t, 0).replace(", 0 CIDRs", ""))
        .collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Ticks every quarter; only group centres (x.5) get a name.
        .x_labels(traffics.len() * 4 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor();
            if (x - i - 0.5).abs() < 1e-6 {
                names.get(index(i)).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("Mpps")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw)?;
    let width = 0.8 / count(filters.len());
    for (fi, &f) in filters.iter().enumerate() {
        let c = color(f);
        let bars: Vec<(f64, &Row)> = traffics
            .iter()
            .enumerate()
            .filter_map(|(ti, t)| {
                let r = rows.iter().find(|r| r.filter == f && r.traffic == *t)?;
                Some((count(ti) + 0.1 + count(fi) * width, r))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|(x, r)| {
                Rectangle::new([(*x, 0.0), (*x + width * 0.9, r.mpps.0)], c.filled())
            }))
            .map_err(draw)?
            .label(filter_name(f).replace('`', ""))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], c.filled()));
        chart
            .draw_series(bars.iter().map(|(x, r)| {
                let mid = *x + width * 0.45;
                PathElement::new(
                    vec![(mid, r.mpps.1), (mid, r.mpps.2)],
                    BLACK.stroke_width(2),
                )
            }))
            .map_err(draw)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

/// Three panels: ns per packet against the IPv4 and the IPv6 SSH
/// allow-list size and against the number of tunnel peers, log x. The
/// `baseline` run's curves are drawn dashed and lighter behind this run's.
pub fn scaling(
    path: &Path,
    points: &[ScalingPoint],
    baseline: &[ScalingPoint],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, SCALING_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let panels = root.split_evenly((1, 3));
    for (area, (curve, title, unit)) in panels.iter().zip([
        (
            "ssh_allow",
            "Edge: IPv4 SSH allow-list",
            "CIDRs in the allow-list",
        ),
        (
            "ssh_allow_v6",
            "Edge: IPv6 SSH allow-list",
            "prefixes in the allow-list (half /128, half /64)",
        ),
        ("tunnel_peers", "Tunnel: number of peers", "peers"),
    ]) {
        let of = |all: &[ScalingPoint]| -> Vec<ScalingPoint> {
            all.iter().filter(|p| p.curve == curve).cloned().collect()
        };
        let (now, before) = (of(points), of(baseline));
        if now.is_empty() {
            continue;
        }
        let both = || now.iter().chain(&before);
        let xmax = both().map(|p| f64::from(p.size)).fold(10.0, f64::max) * 2.0;
        let ymax = both().map(|p| p.pass_ns.max(p.deny_ns)).fold(1.0, f64::max) * 1.25;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{title} (test_run ns/packet)"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d((5.0..xmax).log_scale(), 0.0..ymax)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc(unit)
            .y_desc("ns per packet")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(draw)?;
        for (label, c, get) in [
            (
                "pass",
                RGBColor(0, 158, 115),
                (|p: &ScalingPoint| p.pass_ns) as fn(&ScalingPoint) -> f64,
            ),
            ("deny", RGBColor(213, 94, 0), |p: &ScalingPoint| p.deny_ns),
        ] {
            let series = |pts: &[ScalingPoint]| -> Vec<(f64, f64)> {
                pts.iter().map(|p| (f64::from(p.size), get(p))).collect()
            };
            // Drawn first, so this run's lines cover it where they coincide.
            let old = series(&before);
            if !old.is_empty() {
                let style = c.mix(0.5).stroke_width(2);
                chart
                    .draw_series(DashedLineSeries::new(old.clone(), 10, 6, style))
                    .map_err(draw)?
                    .label(format!("{label} (before)"))
                    .legend(move |(x, y)| {
                        DashedPathElement::new(vec![(x, y), (x + 20, y)], 6, 3, style)
                    });
                chart
                    .draw_series(old.iter().map(|&(x, y)| Circle::new((x, y), 3, style)))
                    .map_err(draw)?;
            }
            let new = series(&now);
            chart
                .draw_series(LineSeries::new(new.clone(), c.stroke_width(3)))
                .map_err(draw)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
            chart
                .draw_series(new.iter().map(|&(x, y)| Circle::new((x, y), 4, c.filled())))
                .map_err(draw)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(draw)?;
    }
    root.present()
        .map_err(draw)
        .with_context(|| format!("could not write {}", path.display()))?;
    Ok(())
}

#[expect(clippy::cast_precision_loss, reason = "a handful of bars")]
fn count(n: usize) -> f64 {
    n as f64
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a small non-negative group index"
)]
fn index(x: f64) -> usize {
    x.max(0.0) as usize
}

#[expect(clippy::needless_pass_by_value, reason = "used as map_err(draw)")]
fn draw<E: std::error::Error + Send + Sync + 'static>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {e}")
}
