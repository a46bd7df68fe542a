//! month.svg, `plot`, `consumer export` and `consumer inspect-state`.
mod common;

use std::path::Path;
use std::time::Duration;

use chrono::NaiveDate;
use common::*;
use weatherstream::aggregate::{Aggregates, MonthStats, MonthYear};
use weatherstream::published::partition_json;

fn stats(year: i32, month: u32, avg: f64) -> (MonthYear, MonthStats) {
    let start = NaiveDate::from_ymd_opt(year, month, 1).unwrap();
    let end = NaiveDate::from_ymd_opt(year, month, 10).unwrap();
    (
        MonthYear { month, year },
        MonthStats {
            count: 10,
            sum: avg * 10.0,
            start,
            end,
        },
    )
}

fn write_partition(files: &Path, partition: i32, entries: &[(MonthYear, MonthStats)]) {
    let aggregates: Aggregates = entries.iter().copied().collect();
    let text = partition_json(partition, 42, &aggregates).unwrap();
    std::fs::write(files.join(format!("partition-{partition}.json")), text).unwrap();
}

/// The chart as read back: bar labels (x axis texts) and blue bar heights.
struct Chart {
    texts: Vec<String>,
    bar_heights: Vec<f64>,
}

fn read_chart(files: &Path) -> Chart {
    let svg = std::fs::read_to_string(files.join("month.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("month.svg is XML");
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect();
    let bar_heights = doc
        .descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some("#0000FF"))
        .map(|n| n.attribute("height").unwrap().parse().unwrap())
        .collect();
    Chart { texts, bar_heights }
}

fn plot(files: &Path) -> std::process::Output {
    bin("plot").arg("--files").arg(files).output().unwrap()
}

#[test]
fn chart_shows_the_latest_year_of_each_month_with_proportional_bars() {
    let files = tempfile::tempdir().unwrap();
    write_partition(
        files.path(),
        0,
        &[
            stats(2009, 3, 47.48),
            stats(2008, 3, 10.0),
            stats(2010, 4, 60.0),
        ],
    );
    write_partition(
        files.path(),
        2,
        &[stats(2010, 1, 37.26), stats(2009, 1, 90.0)],
    );
    write_partition(files.path(), 3, &[stats(2010, 2, 34.99)]);
    let out = plot(files.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chart = read_chart(files.path());
    for label in [
        "January-2010",
        "February-2010",
        "March-2009",
        "Avg. Max Temperature",
    ] {
        assert!(
            chart.texts.iter().any(|t| t == label),
            "{label} not in {:?}",
            chart.texts
        );
    }
    assert!(!chart
        .texts
        .iter()
        .any(|t| t.contains("2008") || t.contains("April")));
    let h = &chart.bar_heights;
    assert_eq!(h.len(), 3, "{h:?}");
    // January, February, March, in that order; heights proportional to avg.
    let avgs = [37.26, 34.99, 47.48];
    for i in 0..3 {
        let ratio = (h[i] / h[2]) / (avgs[i] / avgs[2]);
        assert!((ratio - 1.0).abs() < 0.02, "bar {i}: {h:?}");
    }
}

#[test]
fn plot_copes_with_missing_and_corrupt_partition_files() {
    let files = tempfile::tempdir().unwrap();
    // Nothing at all: still a valid SVG that says so.
    let out = plot(files.path());
    assert!(out.status.success());
    assert!(read_chart(files.path())
        .texts
        .iter()
        .any(|t| t == "no data yet"));

    write_partition(
        files.path(),
        1,
        &[stats(1995, 1, 20.0), stats(1995, 3, 40.0)],
    );
    std::fs::write(files.path().join("partition-3.json"), "{ not json").unwrap();
    let out = plot(files.path());
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("partition-3.json"))
            .count(),
        1,
        "{stderr}"
    );
    let chart = read_chart(files.path());
    assert!(
        chart.texts.iter().any(|t| t == "January-1995")
            && chart.texts.iter().any(|t| t == "March-1995")
    );
    assert_eq!(chart.bar_heights.len(), 2);
}

fn january_year(files: &Path) -> Option<i32> {
    read_chart(files)
        .texts
        .iter()
        .find_map(|t| t.strip_prefix("January-").and_then(|y| y.parse().ok()))
}

#[test]
fn plot_follows_a_running_pipeline() {
    let broker = Broker::start();
    let topic = unique_topic("plot");
    let files = tempfile::tempdir().unwrap();
    let mut producer = start_paced_producer(&broker, &topic, 20_000, 1, "0.002");
    let mut consumer = start_consumer(&broker, &topic, files.path(), &[0, 1, 2, 3]);
    let mut first = None;
    wait_until("a first January", Duration::from_secs(60), || {
        assert!(plot(files.path()).status.success());
        first = january_year(files.path());
        first.is_some()
    });
    wait_until("a later January", Duration::from_secs(90), || {
        assert!(plot(files.path()).status.success());
        january_year(files.path()) > first
    });
    assert!(producer.terminate().success());
    assert!(consumer.terminate().success());
}

fn consumer_cmd(files: &Path, args: &[&str]) -> std::process::Output {
    bin("consumer")
        .args(args)
        .arg("--files")
        .arg(files)
        .output()
        .unwrap()
}

#[test]
fn export_and_inspect_state_agree_with_the_published_files() {
    let broker = Broker::start();
    let topic = unique_topic("export");
    let files = tempfile::tempdir().unwrap();
    let records = produce_and_read(&broker, &topic, 700, 4);
    let ends = end_offsets(&records);
    let mut consumer = start_consumer(&broker, &topic, files.path(), &[0, 1, 2, 3]);
    wait_for_offsets(files.path(), &ends, 4, Duration::from_secs(60));
    assert!(consumer.terminate().success());
    let published: Vec<Vec<u8>> = (0..4)
        .map(|p| std::fs::read(files.path().join(format!("partition-{p}.json"))).unwrap())
        .collect();
    for p in 0..4 {
        std::fs::remove_file(files.path().join(format!("partition-{p}.json"))).unwrap();
    }
    std::fs::remove_file(files.path().join("month.svg")).unwrap();

    let out = consumer_cmd(files.path(), &["export"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (p, bytes) in published.iter().enumerate() {
        let exported = std::fs::read(files.path().join(format!("partition-{p}.json"))).unwrap();
        assert!(
            exported == *bytes,
            "partition {p}: export differs from the consumer's file"
        );
    }
    assert!(read_chart(files.path())
        .texts
        .iter()
        .any(|t| t.starts_with("January-")));

    let out = consumer_cmd(files.path(), &["inspect-state", "--json"]);
    assert!(out.status.success());
    let states: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for s in states.as_array().unwrap() {
        let p = s["partition"].as_i64().unwrap() as i32;
        assert_eq!(s["next_offset"].as_i64(), Some(ends[&p]));
        assert_eq!(s["live"], false);
        assert!(s["months"].as_array().unwrap().len() > 3);
    }
    let table = consumer_cmd(files.path(), &["inspect-state", "2"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&format!("next offset      {}", ends[&2])) && text.contains("January"),
        "{text}"
    );

    // A running consumer holds 0 and 1: both commands refuse to open them.
    let mut holder = start_consumer(&broker, &topic, files.path(), &[0, 1]);
    wait_until("the holder's start", Duration::from_secs(30), || {
        weatherstream::state::holder(&files.path().join("state"), 1)
            .is_some_and(|h| h.contains(&holder.child.id().to_string()))
    });
    let out = consumer_cmd(files.path(), &["export", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("held by a running consumer")
            && stderr.contains(&holder.child.id().to_string()),
        "{stderr}"
    );
    let out = consumer_cmd(files.path(), &["export"]);
    assert!(out.status.success(), "exporting all skips held partitions");
    assert!(String::from_utf8_lossy(&out.stdout).contains("partition-3.json"));
    let out = consumer_cmd(files.path(), &["inspect-state", "0", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(live[0]["live"], true);
    assert_eq!(live[0]["next_offset"].as_i64(), Some(ends[&0]));
    assert!(holder.terminate().success());

    // No state for a partition: a clear error.
    for command in ["export", "inspect-state"] {
        let out = consumer_cmd(files.path(), &[command, "9"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("partition 9 has no state"));
    }
}

/// A partition file from another writer, with `sum` as given (serde_json
/// writes a non-finite f64 as `null`, Python's json as `NaN` or
/// `Infinity`).
fn foreign_file(sum: &str) -> String {
    format!(
        "{{\n  \"partition\": 0,\n  \"offset\": 3,\n  \"January\": {{\n    \"9001\": {{\n      \
         \"count\": 2,\n      \"sum\": {sum},\n      \"avg\": {sum},\n      \
         \"start\": \"9001-01-01\",\n      \"end\": \"9001-01-02\"\n    }}\n  }}\n}}\n"
    )
}

/// What each foreign value is refused as: the field, or the line holding it.
const FOREIGN_SUMS: [(&str, &str); 5] = [
    ("null", "\"January\".\"9001\".\"sum\" is null"),
    ("NaN", "`\"sum\": NaN,`"),
    ("Infinity", "`\"sum\": Infinity,`"),
    ("-Infinity", "`\"sum\": -Infinity,`"),
    ("1e400", "`\"sum\": 1e400,`"),
];

/// The largest finite numbers and a subnormal: valid, and drawn.
fn extreme_partition() -> Vec<(MonthYear, MonthStats)> {
    let day = |month| NaiveDate::from_ymd_opt(9001, month, 1).unwrap();
    [(2, f64::MAX), (3, -f64::MAX), (4, 5e-324)]
        .into_iter()
        .map(|(month, sum)| {
            (
                MonthYear { month, year: 9001 },
                MonthStats {
                    count: 1,
                    sum,
                    start: day(month),
                    end: day(month),
                },
            )
        })
        .collect()
}

fn lines_naming<'a>(stderr: &'a str, what: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.contains(what)).collect()
}

#[test]
fn plot_and_export_skip_a_foreign_non_finite_number_naming_file_and_field() {
    let files = tempfile::tempdir().unwrap();
    write_partition(files.path(), 1, &extreme_partition());
    // The state of partition 1, as a consumer would have committed it.
    let state_dir = files.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let mut state = weatherstream::state::PartitionState::open(&state_dir, 1).unwrap();
    state
        .initialize(3, extreme_partition().into_iter().collect(), 0)
        .unwrap();
    drop(state);
    for (sum, says) in FOREIGN_SUMS {
        std::fs::write(files.path().join("partition-0.json"), foreign_file(sum)).unwrap();
        let out = plot(files.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{sum}: {stderr}");
        let named = lines_naming(&stderr, "partition-0.json");
        assert_eq!(named.len(), 1, "{sum}: {stderr}");
        assert!(named[0].contains(says), "{sum}: {}", named[0]);
        let chart = read_chart(files.path());
        for text in ["February-9001", "1.798e308", "-1.798e308"] {
            assert!(
                chart.texts.iter().any(|t| t == text),
                "{sum}: {:?}",
                chart.texts
            );
        }

        let out = consumer_cmd(files.path(), &["export", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{sum}: {stderr}");
        let named = lines_naming(&stderr, "partition-0.json");
        assert_eq!(named.len(), 1, "{sum}: {stderr}");
        assert!(named[0].contains(says), "{sum}: {}", named[0]);
        let text = std::fs::read_to_string(files.path().join("partition-1.json")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["February"]["9001"]["sum"].as_f64(), Some(f64::MAX));
        assert_eq!(value["April"]["9001"]["avg"].as_f64(), Some(5e-324));
    }
    let out = consumer_cmd(files.path(), &["inspect-state", "1", "--json"]);
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown[0]["months"][0]["sum"].as_f64(), Some(f64::MAX));
}

#[test]
fn import_adoption_and_verify_refuse_a_foreign_non_finite_number_naming_file_and_field() {
    let broker = Broker::start();
    let topic = unique_topic("foreign");
    let admin = weatherstream::kafka::TopicAdmin::connect(
        &weatherstream::kafka::ClientSettings::plaintext(&broker.bootstrap),
    )
    .unwrap();
    admin.recreate_topic(&topic, 4, 1).unwrap();
    let files = tempfile::tempdir().unwrap();
    for (sum, says) in FOREIGN_SUMS {
        let path = files.path().join("partition-0.json");
        std::fs::write(&path, foreign_file(sum)).unwrap();
        let out = broker
            .verify_cmd(&topic, files.path())
            .arg("0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{sum}: {stdout}");
        let named = lines_naming(&stdout, "partition-0.json");
        assert_eq!(named.len(), 1, "{sum}: {stdout}");
        assert!(named[0].contains(says), "{sum}: {}", named[0]);

        // Import: no state, a file that does not parse: one line, exit 1,
        // the file left as it was.
        let mut cmd = broker.consumer_cmd(&topic);
        cmd.arg("--quiet").arg("--files").arg(files.path()).arg("0");
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sum}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{sum}: {stderr}");
        assert!(
            errors[0].contains("partition-0.json") && errors[0].contains(says),
            "{sum}: {}",
            errors[0]
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), foreign_file(sum));
    }

    // Adoption: a state, and a file that does not parse beside it: one
    // warning naming the file and the field, and the state republished.
    let state_dir = files.path().join("state");
    let mut state = weatherstream::state::PartitionState::open(&state_dir, 1).unwrap();
    state.initialize(0, Aggregates::new(), 0).unwrap();
    drop(state);
    let path = files.path().join("partition-1.json");
    std::fs::write(
        &path,
        foreign_file("NaN").replace("\"partition\": 0", "\"partition\": 1"),
    )
    .unwrap();
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.arg("--quiet").arg("--files").arg(files.path()).arg("1");
    let mut consumer = Running::spawn(cmd);
    wait_until("the state republished", Duration::from_secs(60), || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| weatherstream::published::parse_partition_json(&text).ok())
            .is_some_and(|p| p.offset == 0)
    });
    assert!(consumer.terminate().success());
    let stderr = consumer.stderr_text();
    let named = lines_naming(&stderr, "partition-1.json");
    assert_eq!(named.len(), 1, "{stderr}");
    assert!(named[0].contains("`\"sum\": NaN,`"), "{}", named[0]);
}
