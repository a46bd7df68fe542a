//! month.svg: a bar chart of the average max temperature of the latest
//! recorded year of January, February and March, gathered from every
//! partition-*.json in the files folder (whichever partition holds them).
//! Rendered with plotters' SVG backend; labels are SVG `<text>`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::aggregate::Aggregates;
use crate::atomic_file;
use crate::export::parse_partition_json;
use crate::report::month_name;

/// The chart's file name in the files folder.
pub const CHART_FILE: &str = "month.svg";
/// The months the chart shows.
pub const CHART_MONTHS: [u32; 3] = [1, 2, 3];

/// One bar: `January-2010` and its average.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub avg: f64,
}

/// What one rendering read and wrote.
#[derive(Debug, Default)]
pub struct ChartReport {
    pub path: PathBuf,
    pub bars: Vec<Bar>,
    pub files_read: usize,
    /// Files that exist but did not parse, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The latest year of each chart month across all partitions' statistics.
pub fn latest_bars<'a>(partitions: impl IntoIterator<Item = &'a Aggregates>) -> Vec<Bar> {
    let mut latest: [Option<(i32, f64)>; 3] = [None; 3];
    for aggregates in partitions {
        for (key, stats) in aggregates {
            let Some(slot) = CHART_MONTHS.iter().position(|m| *m == key.month) else {
                continue;
            };
            if latest[slot].is_none_or(|(year, _)| key.year > year) {
                latest[slot] = Some((key.year, stats.avg()));
            }
        }
    }
    CHART_MONTHS
        .iter()
        .zip(latest)
        .filter_map(|(month, found)| {
            found.map(|(year, avg)| Bar {
                label: format!("{}-{year}", month_name(*month)),
                avg,
            })
        })
        .collect()
}

/// Renders the bars as an SVG document.
pub fn render_svg(bars: &[Bar]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = "Average max temperature, latest year";
        if bars.is_empty() {
            root.titled(title, ("sans-serif", 24))?;
            root.draw(&Text::new(
                "no data yet",
                (260, 230),
                ("sans-serif", 22).into_font().color(&BLACK),
            ))?;
        } else {
            let top = bars.iter().map(|b| b.avg).fold(0.0_f64, f64::max);
            let bottom = bars.iter().map(|b| b.avg).fold(0.0_f64, f64::min);
            let margin = (top - bottom).max(1.0) * 0.1;
            let y_range = if bottom < 0.0 { bottom - margin } else { 0.0 }..top + margin;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 24))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d((0..bars.len() - 1).into_segmented(), y_range)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(WHITE)
                .label_style(("sans-serif", 14))
                .y_desc("Avg. Max Temperature")
                .x_labels(bars.len())
                .x_label_formatter(&|x| match x {
                    SegmentValue::CenterOf(i) => {
                        bars.get(*i).map(|b| b.label.clone()).unwrap_or_default()
                    }
                    _ => String::new(),
                })
                .draw()?;
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                let mut rect = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), bar.avg),
                    ],
                    BLUE.mix(0.7).filled(),
                );
                rect.set_margin(0, 0, 12, 12);
                rect
            }))?;
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                Text::new(
                    format!("{:.2}", bar.avg),
                    (SegmentValue::CenterOf(i), bar.avg),
                    ("sans-serif", 16)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// Partition files in `files_dir` (partition-<number>.json), ascending.
pub fn partition_files(files_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<(i64, PathBuf)> = Vec::new();
    let entries = match fs::read_dir(files_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("partition-"))
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<i64>().ok());
        if let Some(number) = number {
            found.push((number, path));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Reads every partition file in `files_dir` and writes month.svg
/// atomically; unreadable files are skipped and reported.
pub fn render_files(files_dir: &Path) -> anyhow::Result<ChartReport> {
    let mut report = ChartReport {
        path: files_dir.join(CHART_FILE),
        ..ChartReport::default()
    };
    let mut all = Vec::new();
    let files =
        partition_files(files_dir).with_context(|| format!("listing {}", files_dir.display()))?;
    for path in files {
        let parsed = fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| parse_partition_json(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(partition) => {
                report.files_read += 1;
                all.push(partition.aggregates);
            }
            // Removed between listing and reading: a missing file is normal.
            Err(_) if !path.exists() => {}
            Err(reason) => report.skipped.push((path, reason)),
        }
    }
    report.bars = latest_bars(&all);
    let svg = render_svg(&report.bars)?;
    atomic_file::write(&report.path, svg.as_bytes())
        .with_context(|| format!("writing {}", report.path.display()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{MonthStats, MonthYear};
    use chrono::NaiveDate;

    fn stats(avg: f64) -> MonthStats {
        let d = NaiveDate::from_ymd_opt(2000, 1, 1).unwrap();
        MonthStats {
            count: 2,
            sum: avg * 2.0,
            start: d,
            end: d,
        }
    }

    #[test]
    fn latest_year_wins_across_partitions() {
        let mut p0 = Aggregates::new();
        p0.insert(
            MonthYear {
                month: 1,
                year: 2009,
            },
            stats(10.0),
        );
        p0.insert(
            MonthYear {
                month: 1,
                year: 2010,
            },
            stats(37.25),
        );
        p0.insert(
            MonthYear {
                month: 4,
                year: 2011,
            },
            stats(50.0),
        );
        let mut p1 = Aggregates::new();
        p1.insert(
            MonthYear {
                month: 3,
                year: 2009,
            },
            stats(47.5),
        );
        p1.insert(
            MonthYear {
                month: 2,
                year: 2010,
            },
            stats(35.0),
        );
        let bars = latest_bars([&p0, &p1]);
        let labels: Vec<_> = bars.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, ["January-2010", "February-2010", "March-2009"]);
        assert_eq!(bars[0].avg, 37.25);
    }

    #[test]
    fn svg_holds_labels_and_axis_title() {
        let bars = vec![
            Bar {
                label: "January-2010".into(),
                avg: 37.26,
            },
            Bar {
                label: "March-2009".into(),
                avg: 47.48,
            },
        ];
        let svg = render_svg(&bars).unwrap();
        for text in [
            "January-2010",
            "March-2009",
            "Avg. Max Temperature",
            "47.48",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(render_svg(&[]).unwrap().contains("no data yet"));
    }
}
