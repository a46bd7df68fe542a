//! The operator's files in monitoring/: the Prometheus alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`,
//! monitoring/alerts.test.yml: each alert fires for what should fire it,
//! after its `for`, and not for its neighbours); every runbook link names a
//! row of docs/operations.md's troubleshooting table; and every query of
//! the Grafana dashboard is valid PromQL. That each metric the dashboard
//! queries exists on `/metrics` of a real run is checked in tests/group.rs
//! (a member that has taken partitions over shows every series).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("monitoring")
        .join(file)
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running promtool (scripts/install-monitoring-tools.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let dir = monitoring("");
    let checked = promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_has_a_runbook_row_in_the_troubleshooting_table() {
    let rules: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(monitoring("alerts.yml")).unwrap())
            .unwrap();
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    let troubleshooting = docs
        .split_once("## Troubleshooting")
        .expect("docs/operations.md has its troubleshooting section")
        .1;
    let alerts = rules["groups"][0]["rules"].as_array().unwrap();
    assert_eq!(alerts.len(), 6);
    for alert in alerts {
        let name = alert["alert"].as_str().unwrap();
        let link = alert["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = link
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| panic!("{name}: {link} is not a link into docs/operations.md"));
        let row = troubleshooting
            .lines()
            .find(|line| line.contains(&format!("<a id=\"{anchor}\"></a>")))
            .unwrap_or_else(|| panic!("{name}: no row with anchor {anchor}"));
        assert!(row.starts_with('|') && row.contains(name), "{name}: {row}");
    }
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let queries = common::dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    // Grafana's variables as Prometheus would see them after substitution.
    let rules: String = queries
        .iter()
        .enumerate()
        .map(|(i, query)| {
            let query = query
                .replace("$__rate_interval", "5m")
                .replace("$job", ".*")
                .replace("$instance", ".*");
            format!(
                "      - record: dashboard_query_{i}\n        expr: {}\n",
                serde_json::to_string(&query).unwrap()
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("queries.yml"),
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    let checked = promtool(&["check", "rules", "queries.yml"], dir.path());
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
}
