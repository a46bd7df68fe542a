//! The one-command demo (embedded broker) and the promises the Dockerfile
//! and README make about binaries.
mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

fn days_in_files(files: &Path) -> u64 {
    (0..4)
        .filter_map(|p| read_partition_file(files, p))
        .map(|f| f.aggregates.values().map(|s| s.count).sum::<u64>())
        .sum()
}

fn demo(files: &Path, args: &[&str]) -> String {
    let out = bin("demo")
        .arg("--files")
        .arg(files)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("embedded in-memory Kafka broker"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("%5|") && !stderr.contains("%3|"),
        "raw librdkafka logs: {stderr}"
    );
    stdout
}

#[test]
fn demo_runs_the_whole_pipeline_and_continues_where_it_stopped() {
    let files = tempfile::tempdir().unwrap();
    let stdout = demo(files.path(), &["--days", "800"]);
    assert!(
        stdout.contains("partition-2.json") && stdout.contains("month.svg"),
        "{stdout}"
    );
    assert_eq!(
        days_in_files(files.path()),
        800,
        "each day counted exactly once"
    );
    assert!(std::fs::read_to_string(files.path().join("month.svg"))
        .unwrap()
        .contains("January-1992"));

    let stdout = demo(files.path(), &["--days", "400"]);
    assert!(stdout.contains("continuing after 800 days"), "{stdout}");
    assert_eq!(days_in_files(files.path()), 1200);

    demo(files.path(), &["--fresh", "--days", "50"]);
    assert_eq!(days_in_files(files.path()), 50);
}

fn built_binaries() -> BTreeSet<String> {
    std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Words that follow `prefix` in `text`, e.g. `docker exec -it p7 X`.
fn named_after(text: &str, prefix: &str) -> Vec<String> {
    text.match_indices(prefix)
        .filter_map(|(i, _)| {
            text[i + prefix.len()..]
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .next()
                .filter(|w| !w.is_empty())
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn every_binary_the_dockerfile_and_readme_name_is_built() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bins = built_binaries();
    for expected in ["producer", "consumer", "debug", "plot", "demo"] {
        assert!(bins.contains(expected), "{expected} is not a binary");
    }
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut named = Vec::new();
    for text in [&dockerfile, &readme] {
        named.extend(named_after(text, "docker exec -it p7 "));
        named.extend(named_after(text, "target/release/"));
        named.extend(named_after(text, "--bin "));
    }
    assert!(named.len() >= 10, "{named:?}");
    for name in &named {
        assert!(
            bins.contains(name),
            "{name} is named but not built (bins: {bins:?})"
        );
    }
    // The image runs the very build script developers use.
    assert!(dockerfile.contains("RUN scripts/build-release.sh"));
}

#[test]
fn demo_dashboard_serves_while_running_and_after_until_ctrl_c() {
    let files = tempfile::tempdir().unwrap();
    let mut cmd = bin("demo");
    cmd.arg("--files")
        .arg(files.path())
        .args(["--days", "200", "--dashboard", "127.0.0.1:0"]);
    let mut demo = Running::spawn(cmd);
    let address = demo.listening_address();
    wait_until(
        "the demo's days to be done",
        std::time::Duration::from_secs(60),
        || demo.stderr_text().contains("keeps serving"),
    );
    assert_eq!(days_in_files(files.path()), 200);
    assert!(demo.child.try_wait().unwrap().is_none(), "the demo exited");
    let (status, _, body) = http(&address, "GET", "/api/state", None);
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(state["partitions"].as_array().unwrap().len(), 4, "{state}");
    assert_eq!(http(&address, "GET", "/", None).0, 200);
    assert!(demo.interrupt().success());
}
