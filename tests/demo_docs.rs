//! The one-command demo (embedded broker) and the promises the Dockerfile
//! and the documents (README.md, CHANGELOG.md, docs/) make about
//! binaries, flags, paths and links, and the README's size.
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

/// README.md, CHANGELOG.md and docs/*.md, with their paths.
fn documents() -> Vec<(std::path::PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = vec![root.join("README.md"), root.join("CHANGELOG.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            paths.push(path);
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            out.insert(anchor_of(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn the_readme_stays_short() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let size = std::fs::metadata(root.join("README.md")).unwrap().len();
    assert!(size <= 12_000, "README.md is {size} bytes, over 12 KB");
}

#[test]
fn every_relative_link_in_the_documents_resolves() {
    let mut checked = 0;
    for (path, text) in documents() {
        let dir = path.parent().unwrap();
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')').unwrap()];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let linked = if file.is_empty() {
                path.clone()
            } else {
                dir.join(file)
            };
            assert!(
                linked.exists(),
                "{}: link to {target}: no such file",
                path.display()
            );
            if !anchor.is_empty() {
                let text = std::fs::read_to_string(&linked).unwrap();
                assert!(
                    anchors(&text).contains(anchor),
                    "{}: link to {target}: no such heading",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} links found");
}

/// Every `--flag` the binary's help (and its subcommands' helps) names.
fn flags_of(binary: &str) -> BTreeSet<String> {
    let mut helps = vec![vec!["--help"]];
    if binary == "consumer" {
        for sub in ["verify", "export", "inspect-state"] {
            helps.push(vec![sub, "--help"]);
        }
    }
    let mut flags = BTreeSet::new();
    for args in helps {
        let out = bin(binary).args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        flags.extend(
            named_after(&text, "--")
                .into_iter()
                .map(|f| format!("--{f}")),
        );
    }
    flags.extend(["--help".to_string(), "--version".to_string()]);
    flags
}

/// The subcommands a binary's help lists under "Commands:".
fn subcommands(binary: &str) -> BTreeSet<String> {
    let out = bin(binary).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Code spans and code-block lines of a document.
fn code_of(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            out.push(line.to_string());
        } else {
            out.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
        }
    }
    out
}

#[test]
fn every_command_flag_and_path_the_documents_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binaries = built_binaries();
    let flags: std::collections::BTreeMap<String, BTreeSet<String>> =
        binaries.iter().map(|b| (b.clone(), flags_of(b))).collect();
    let all_flags: BTreeSet<String> = flags.values().flatten().cloned().collect();
    // Flags of other programs that the documents quote on their own.
    let foreign = [
        "--cert",
        "--key",
        "--authentication",
        "--command-config",
        "--release",
        "--bin",
        "--test",
        "--bench",
        "--timings",
        "--unpatched",
        "--locked",
        "--no-run",
        "--describe",
        "--group",
        "--lib",
        "--nocapture",
        "--all-targets",
    ];
    let (mut flags_checked, mut paths_checked) = (0, 0);
    for (path, text) in documents() {
        for code in code_of(&text) {
            // Which of our commands the span runs, if any, and what follows.
            let words: Vec<&str> = code.split_whitespace().collect();
            let command = words.iter().position(|w| {
                let name = w.rsplit('/').next().unwrap_or(w);
                binaries.contains(name) && (w.starts_with("target/release/") || !w.contains('/'))
            });
            let named: Vec<&str> = match command {
                Some(i) if i == 0 || words[i - 1] == "p7" || words[i - 1].ends_with('=') => {
                    words[i + 1..].to_vec()
                }
                _ if words.first().is_some_and(|w| w.starts_with("--")) => words.clone(),
                _ => Vec::new(),
            };
            let allowed = match command {
                Some(i) if !named.is_empty() => &flags[words[i].rsplit('/').next().unwrap()],
                _ => &all_flags,
            };
            // A subcommand: a lower-case word right after the command.
            if let (Some(i), Some(next)) = (command, named.first()) {
                let name = words[i].rsplit('/').next().unwrap();
                if next.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    && !next.starts_with('-')
                {
                    assert!(
                        subcommands(name).contains(*next),
                        "{}: `{code}` names {name} {next}, which is no subcommand",
                        path.display()
                    );
                    flags_checked += 1;
                }
            }
            for word in named.iter().filter(|w| w.starts_with("--") && w.len() > 2) {
                let flag: String = word
                    .split(['=', ',', ')', '`', ';', '.'])
                    .next()
                    .unwrap()
                    .to_string();
                if foreign.contains(&flag.as_str()) && command.is_none() {
                    continue;
                }
                assert!(
                    allowed.contains(&flag),
                    "{}: `{code}` names {flag}, which no such command takes",
                    path.display()
                );
                flags_checked += 1;
            }
            // Paths of the repository.
            for word in code.split_whitespace() {
                let word = word.trim_end_matches([',', ';', ':', ')', '.']);
                let ours = [
                    "src/", "tests/", "benches/", "scripts/", "docs/", "proto/", "vendor/", ".ci/",
                ]
                .iter()
                .any(|p| word.starts_with(p));
                if ours && !word.contains(['*', '<', '{', '$']) {
                    assert!(
                        root.join(word).exists(),
                        "{}: `{code}` names {word}, which does not exist",
                        path.display()
                    );
                    paths_checked += 1;
                }
            }
        }
    }
    assert!(flags_checked >= 30, "only {flags_checked} flags found");
    assert!(paths_checked >= 30, "only {paths_checked} paths found");
}

#[test]
fn every_binary_says_its_version_and_the_librdkafka_inside() {
    for binary in built_binaries() {
        let out = bin(&binary).arg("--version").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{binary}: {text}");
        assert!(
            text.starts_with(&format!("weatherstream {}\n", env!("CARGO_PKG_VERSION"))),
            "{binary}: {text}"
        );
        let features = text
            .split_once("builtin.features: ")
            .map(|(_, f)| f.trim_end().trim_end_matches(')'))
            .unwrap_or_else(|| panic!("{binary}: no librdkafka features in {text}"));
        assert!(text.contains("librdkafka 2."), "{binary}: {text}");
        for feature in ["ssl", "sasl_scram", "gzip", "zstd", "lz4", "snappy"] {
            assert!(
                features.split(',').any(|f| f == feature),
                "{binary}: no {feature} in {features}"
            );
        }
    }
}
