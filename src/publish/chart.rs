//! month.svg: a bar chart of the average max temperature of the latest
//! recorded year of January, February and March, gathered from every
//! partition-*.json in the files folder (whichever partition holds them);
//! the exporter supplies its own partitions from memory. Rendered with
//! plotters' SVG backend; labels are SVG `<text>`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::kafka::PartitionId;
use crate::model::aggregate::{Aggregates, MonthYear};
use crate::model::report::month_name;
use crate::store::atomic_file;
use crate::store::folders;
use crate::store::published::parse_partition_json;

/// The months the chart shows.
pub(crate) const CHART_MONTHS: [u32; 3] = [1, 2, 3];

/// One bar: `January-2010` and its average.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub avg: f64,
}

/// `January-2010 19.32`: how the commands list a bar.
impl std::fmt::Display for Bar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.label, Degrees(self.avg))
    }
}

/// A value as the chart and the commands show it: two decimals, or
/// scientific notation where two decimals would be 300 digits long or show
/// nothing (`1.000e308`, `4.941e-324`); `n/a` for what is not a number
/// (no statistic of ours, but the renderer takes any input).
pub(crate) struct Degrees(pub(crate) f64);

impl std::fmt::Display for Degrees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let magnitude = self.0.abs();
        if !magnitude.is_finite() {
            f.write_str("n/a")
        } else if magnitude != 0.0 && !(0.01..1e7).contains(&magnitude) {
            write!(f, "{:.3e}", self.0)
        } else {
            write!(f, "{:.2}", self.0)
        }
    }
}

/// Powers of ten the y axis is drawn in: plotters computes its key points
/// in f64 and never finishes on ranges near `f64::MAX` or among
/// subnormals, so values outside this band are drawn scaled, and the axis
/// says by how much.
const PLAIN_AXIS_EXPONENTS: std::ops::RangeInclusive<i32> = -3..=6;

/// The y axis of a set of bars: the scale its values are divided by (a
/// power of ten, named in the axis title), and the range in scaled units.
/// Only finite values count; zero is always on the axis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct YAxis {
    /// 0: values as they are; k: values are drawn divided by 10^k.
    pub(crate) exponent: i32,
    pub(crate) range: std::ops::Range<f64>,
}

impl YAxis {
    pub(crate) fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let (mut low, mut high) = (0.0_f64, 0.0_f64);
        for value in values.into_iter().filter(|v| v.is_finite()) {
            low = low.min(value);
            high = high.max(value);
        }
        let magnitude = low.abs().max(high.abs());
        let exponent = if magnitude == 0.0 {
            0
        } else {
            // Within one of the truth for every finite magnitude (subnormals
            // included): enough to pick a scale.
            magnitude.log10().floor() as i32
        };
        let exponent = if PLAIN_AXIS_EXPONENTS.contains(&exponent) {
            0
        } else {
            exponent
        };
        let axis = YAxis {
            exponent,
            range: 0.0..1.0,
        };
        let (low, high) = (axis.scaled(low), axis.scaled(high));
        let margin = (high - low).max(1.0) * 0.1;
        YAxis {
            range: if low < 0.0 { low - margin } else { 0.0 }..high + margin,
            ..axis
        }
    }

    /// `value` in the axis' units: divided by 10^exponent in two steps, as
    /// 10^-324 is not a finite f64 but its halves are.
    pub(crate) fn scaled(&self, value: f64) -> f64 {
        if self.exponent == 0 {
            return value;
        }
        let half = self.exponent / 2;
        value / 10f64.powi(half) / 10f64.powi(self.exponent - half)
    }

    fn description(&self) -> String {
        match self.exponent {
            0 => "Avg. Max Temperature".to_string(),
            k => format!("Avg. Max Temperature (×1e{k})"),
        }
    }
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

/// What the chart needs of one partition: the latest year of each chart
/// month and its average, in [`CHART_MONTHS`] order.
pub(crate) type ChartInput = [Option<(i32, f64)>; 3];

/// The chart's input from one partition's statistics. Statistics are keyed
/// month first, so each month's latest year is one range lookup.
pub(crate) fn chart_input(aggregates: &Aggregates) -> ChartInput {
    CHART_MONTHS.map(|month| {
        aggregates
            .range(
                MonthYear {
                    month,
                    year: i32::MIN,
                }..=MonthYear {
                    month,
                    year: i32::MAX,
                },
            )
            .next_back()
            .map(|(key, stats)| (key.year, stats.avg()))
    })
}

/// The latest year of each chart month across all partitions.
pub(crate) fn bars_of<'a>(inputs: impl IntoIterator<Item = &'a ChartInput>) -> Vec<Bar> {
    let mut latest: ChartInput = [None; 3];
    for input in inputs {
        for (slot, found) in latest.iter_mut().zip(input) {
            if let Some((year, avg)) = *found {
                if slot.is_none_or(|(y, _)| year > y) {
                    *slot = Some((year, avg));
                }
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
pub(crate) fn render_svg(bars: &[Bar]) -> anyhow::Result<String> {
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
            let axis = YAxis::of(bars.iter().map(|b| b.avg));
            // A bar whose value is not finite (no statistic of ours is, but
            // a renderer must finish on anything) is drawn at zero, with
            // its value as text.
            let height = |bar: &Bar| {
                if bar.avg.is_finite() {
                    axis.scaled(bar.avg)
                } else {
                    0.0
                }
            };
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 24))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d((0..bars.len() - 1).into_segmented(), axis.range.clone())?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(WHITE)
                .label_style(("sans-serif", 14))
                .y_desc(axis.description())
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
                        (SegmentValue::Exact(i + 1), height(bar)),
                    ],
                    BLUE.mix(0.7).filled(),
                );
                rect.set_margin(0, 0, 12, 12);
                rect
            }))?;
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                Text::new(
                    Degrees(bar.avg).to_string(),
                    (SegmentValue::CenterOf(i), height(bar)),
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

/// Reads every partition file in `files_dir` and writes month.svg
/// atomically; unreadable files are skipped and reported.
pub fn render_files(files_dir: &Path) -> anyhow::Result<ChartReport> {
    ChartRenderer::new(files_dir.to_path_buf()).render(&BTreeMap::new())
}

/// Identifies one version of a file: partition files are replaced by
/// rename, so a new version has a new inode as well as a new mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    inode: u64,
    modified: Option<SystemTime>,
    len: u64,
}

impl FileVersion {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = fs::metadata(path)?;
        Ok(FileVersion {
            inode: inode(&meta),
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

#[cfg(unix)]
fn inode(meta: &fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_: &fs::Metadata) -> u64 {
    0
}

/// Renders month.svg again and again (the exporter): partitions whose
/// statistics the caller holds are taken from memory, and other processes'
/// partition files are parsed only when they changed. Parsing every file
/// on every rendering cost more than everything else the exporter did.
pub(crate) struct ChartRenderer {
    files_dir: PathBuf,
    parsed: BTreeMap<PathBuf, (FileVersion, ChartInput)>,
    /// [`render_svg`]; tests put a renderer that never returns here.
    draw: fn(&[Bar]) -> anyhow::Result<String>,
}

impl ChartRenderer {
    pub(crate) fn new(files_dir: PathBuf) -> Self {
        ChartRenderer {
            files_dir,
            parsed: BTreeMap::new(),
            draw: render_svg,
        }
    }

    #[cfg(test)]
    pub(crate) fn drawing_with(mut self, draw: fn(&[Bar]) -> anyhow::Result<String>) -> Self {
        self.draw = draw;
        self
    }

    /// Writes month.svg from `own` (partition -> input, for partitions this
    /// process publishes) and every other partition file in the folder.
    pub(crate) fn render(
        &mut self,
        own: &BTreeMap<PartitionId, ChartInput>,
    ) -> anyhow::Result<ChartReport> {
        let mut report = ChartReport {
            path: folders::chart_file(&self.files_dir),
            ..ChartReport::default()
        };
        let mut inputs: Vec<ChartInput> = own.values().copied().collect();
        report.files_read = inputs.len();
        let files = folders::partition_files(&self.files_dir)
            .with_context(|| format!("listing {}", self.files_dir.display()))?;
        let mut seen = BTreeMap::new();
        for (partition, path) in files {
            if own.contains_key(&partition) {
                continue;
            }
            match self.read(&path) {
                Ok(input) => {
                    report.files_read += 1;
                    inputs.push(input);
                    seen.insert(path, ());
                }
                // Removed between listing and reading: a missing file is normal.
                Err(_) if !path.exists() => {}
                Err(reason) => report.skipped.push((path, reason)),
            }
        }
        self.parsed.retain(|path, _| seen.contains_key(path));
        report.bars = bars_of(&inputs);
        let svg = (self.draw)(&report.bars)?;
        atomic_file::write(&report.path, svg.as_bytes())
            .with_context(|| format!("writing {}", report.path.display()))?;
        Ok(report)
    }

    /// One file's chart input, from the cache when the file is unchanged.
    fn read(&mut self, path: &Path) -> Result<ChartInput, String> {
        let version = FileVersion::of(path).map_err(|e| e.to_string())?;
        if let Some((cached, input)) = self.parsed.get(path) {
            if *cached == version {
                return Ok(*input);
            }
        }
        let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
        let partition = parse_partition_json(&text).map_err(|e| e.to_string())?;
        let input = chart_input(&partition.aggregates);
        // The version read before the text: a change in between is seen
        // as a change next time, never missed.
        self.parsed.insert(path.to_path_buf(), (version, input));
        Ok(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::{MonthStats, MonthYear};
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
        let bars = bars_of(&[chart_input(&p0), chart_input(&p1)]);
        let labels: Vec<_> = bars.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, ["January-2010", "February-2010", "March-2009"]);
        assert_eq!(bars[0].avg, 37.25);
    }

    fn january(year: i32, avg: f64) -> Aggregates {
        let mut agg = Aggregates::new();
        agg.insert(MonthYear { month: 1, year }, stats(avg));
        agg
    }

    fn write_partition(dir: &Path, partition: PartitionId, aggregates: &Aggregates) {
        let text = crate::store::published::partition_json(partition, 1, aggregates).unwrap();
        atomic_file::write(&folders::partition_file(dir, partition), text.as_bytes()).unwrap();
    }

    #[test]
    fn renderer_takes_own_partitions_from_memory_and_rereads_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut renderer = ChartRenderer::new(dir.path().to_path_buf());
        // Partition 0 is ours, and memory wins over its file (after a reset
        // the file may still show what was counted before).
        write_partition(dir.path(), 0, &january(2001, 1.0));
        let own = BTreeMap::from([(0, chart_input(&january(2000, 0.5)))]);
        let report = renderer.render(&own).unwrap();
        assert_eq!(report.files_read, 1);
        assert_eq!(report.bars[0].label, "January-2000");
        // Partition 1 belongs to another process: read, and read again
        // whenever it changes.
        write_partition(dir.path(), 1, &january(2002, 2.0));
        let report = renderer.render(&own).unwrap();
        assert_eq!(report.files_read, 2);
        assert_eq!(report.bars[0].label, "January-2002");
        write_partition(dir.path(), 1, &january(2004, 4.0));
        let report = renderer.render(&own).unwrap();
        assert_eq!(
            (report.bars[0].label.as_str(), report.bars[0].avg),
            ("January-2004", 4.0)
        );
        let svg = std::fs::read_to_string(folders::chart_file(dir.path())).unwrap();
        assert!(svg.contains("January-2004"));
        // A file that stops parsing is reported, and the chart goes on.
        std::fs::write(dir.path().join("partition-1.json"), "{").unwrap();
        let report = renderer.render(&own).unwrap();
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.bars[0].label, "January-2000");
    }

    #[test]
    fn chart_input_is_the_latest_year_of_each_chart_month() {
        let mut agg = january(1999, 1.0);
        agg.extend(january(2005, 5.0));
        agg.insert(
            MonthYear {
                month: 2,
                year: 1990,
            },
            stats(2.0),
        );
        agg.insert(
            MonthYear {
                month: 4,
                year: 2020,
            },
            stats(9.0),
        );
        assert_eq!(
            chart_input(&agg),
            [Some((2005, 5.0)), Some((1990, 2.0)), None]
        );
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

    /// Renders on a thread of its own: a rendering that never ends fails
    /// the test instead of hanging it (plotters' key points looped forever
    /// on an infinite range).
    fn render_within_limit(values: &[f64]) -> String {
        let bars: Vec<Bar> = values
            .iter()
            .enumerate()
            .map(|(i, avg)| Bar {
                label: format!("{}-9001", month_name(i as u32 + 1)),
                avg: *avg,
            })
            .collect();
        let svg = crate::shutdown::within(
            &format!("rendering {values:?}"),
            std::time::Duration::from_secs(20),
            move || render_svg(&bars).map_err(|e| e.to_string()),
        )
        .unwrap();
        roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{values:?}: {e}"));
        svg
    }

    #[test]
    fn every_range_renders_one_bar_equal_bars_the_edges_of_f64_and_subnormals() {
        let tiny = 5e-324;
        for values in [
            vec![0.0],
            vec![37.5],
            vec![-12.0],
            vec![20.0, 20.0, 20.0],
            vec![0.0, 0.0, 0.0],
            vec![f64::MAX],
            vec![-f64::MAX],
            vec![f64::MAX, -f64::MAX, f64::MAX],
            vec![1e308, f64::MAX, -1e308],
            vec![tiny],
            vec![tiny, -tiny, f64::MIN_POSITIVE],
            vec![1e-300, 1e300],
            vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY],
            vec![f64::NAN, 20.0, f64::INFINITY],
            vec![1e6, 1e7, 9.99e6],
        ] {
            let svg = render_within_limit(&values);
            assert!(!svg.contains("NaN"), "{values:?}");
        }
        let svg = render_within_limit(&[f64::MAX, -f64::MAX, 1e308]);
        assert!(svg.contains("1.798e308") && svg.contains("-1.798e308"));
        assert!(svg.contains("1.000e308"));
        assert!(svg.contains("×1e308"), "the axis says its scale");
        let svg = render_within_limit(&[tiny]);
        assert!(svg.contains("4.941e-324"));
    }

    #[test]
    fn the_axis_is_plain_for_temperatures_and_scaled_at_the_edges() {
        let axis = YAxis::of([37.26, 47.48]);
        assert_eq!(axis.exponent, 0);
        assert_eq!(axis.range.start, 0.0);
        assert!((axis.range.end - (47.48 + 4.748)).abs() < 1e-9);
        let axis = YAxis::of([f64::MAX, -f64::MAX]);
        assert_eq!(axis.exponent, 308);
        assert!(axis.range.start.is_finite() && axis.range.end.is_finite());
        assert!(axis.range.start < -1.7 && axis.range.end > 1.7);
        let axis = YAxis::of([5e-324]);
        assert_eq!(axis.exponent, -324);
        assert!((axis.scaled(5e-324) - 4.94).abs() < 0.01);
        // Only finite values count.
        assert_eq!(YAxis::of([f64::NAN, f64::INFINITY]), YAxis::of([]));
        assert_eq!(YAxis::of([]).range, 0.0..0.1);
    }

    #[test]
    fn values_are_shown_in_two_decimals_or_scientifically_at_the_edges() {
        assert_eq!(Degrees(37.256).to_string(), "37.26");
        assert_eq!(Degrees(0.0).to_string(), "0.00");
        assert_eq!(Degrees(-0.5).to_string(), "-0.50");
        assert_eq!(Degrees(f64::MAX).to_string(), "1.798e308");
        assert_eq!(Degrees(5e-324).to_string(), "4.941e-324");
        assert_eq!(Degrees(f64::NAN).to_string(), "n/a");
        assert_eq!(Degrees(f64::INFINITY).to_string(), "n/a");
    }
}
