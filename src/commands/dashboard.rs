//! `dashboard`: the live web page the files were made for. It owns a small
//! read-only HTTP server over the files folder: `/` (the page: HTML, CSS and
//! JS embedded in the binary, no framework, no external requests),
//! `/api/state` (every partition file merged, with file times and parse
//! errors, built from whole files: they are replaced atomically),
//! `/month.svg` and `/partition-N.json` as they are. Nothing else is served:
//! any other path, `/../` and its encodings included, is 404, and the server
//! never writes.
//!
//! With `--from-kafka` the same paths are served from the snapshot topic
//! instead of a folder ([`view`]): each partition's newest snapshot, its
//! file rendered as the consumer renders it, and the chart drawn from them.
//!
//! It is served by [`crate::web`], the server `/metrics` runs on too: bounded
//! connections and deadlines, and TLS and basic auth when `--web-config-file`
//! asks for them. `/healthz` and `/readyz` answer there too (readiness
//! turns 503 at a stop).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::{json, Map, Value};

use crate::commands::export::FromKafka;
use crate::kafka::PartitionId;
use crate::publish::chart;
use crate::publish::health::{Health, Ownership, DEFAULT_WEDGED_AFTER};
use crate::shutdown::Shutdown;
use crate::store::folders::{self, partition_files};
use crate::store::published::{self, parse_partition_json};
use crate::web::{Page, WebConfig, WebServer};

mod view;

use view::SnapshotView;

/// The page, embedded: it works offline and from a container.
const PAGE: &str = include_str!("dashboard/index.html");
/// What `dashboard` is asked to do.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    pub source: DashboardSource,
    pub listen: String,
    /// TLS and basic auth (`--web-config-file`); plain HTTP without.
    pub web: Option<Arc<WebConfig>>,
}

/// Where the statistics come from.
#[derive(Debug, Clone)]
pub enum DashboardSource {
    /// A files folder, as the consumer publishes it.
    Files(PathBuf),
    /// The snapshot topic, followed (`--from-kafka`).
    Kafka(FromKafka),
}

/// Serves until shutdown.
/// `/healthz` and `/readyz` answer beside the pages: ready until a stop.
pub fn run(config: &DashboardConfig, shutdown: &Shutdown) -> anyhow::Result<()> {
    let health = Health::new(Ownership::None, DEFAULT_WEDGED_AFTER, shutdown);
    let (route, shown): (Route, String) = match &config.source {
        DashboardSource::Files(files_dir) => {
            let files_dir = files_dir.clone();
            let shown = format!("files in {}", files_dir.display());
            (Arc::new(move |path| route(path, &files_dir)), shown)
        }
        DashboardSource::Kafka(from) => {
            let view = SnapshotView::start(from.clone(), shutdown)
                .context("starting the snapshot reader")?;
            (
                Arc::new(move |path: &str| route_view(path, &view)),
                format!("snapshots in {:?}", from.snapshot_topic),
            )
        }
    };
    let route: Route = Arc::new(move |path: &str| match path {
        "/healthz" => health.liveness_page(),
        "/readyz" => health.readiness_page(),
        _ => route(path),
    });
    let server = serve(&config.listen, config.web.clone(), route)?;
    println!("dashboard: {}/ ({shown}); Ctrl-C stops it", server.url());
    while !shutdown.wait(Duration::from_secs(1)) {}
    Ok(())
}

/// Binds `listen` (an error names the address) and serves the files
/// folder until the returned server is dropped.
pub fn start(
    files_dir: &Path,
    listen: &str,
    web: Option<Arc<WebConfig>>,
) -> anyhow::Result<WebServer> {
    let files_dir = files_dir.to_path_buf();
    serve(listen, web, Arc::new(move |path| route(path, &files_dir)))
}

type Route = Arc<dyn Fn(&str) -> Page + Send + Sync>;

/// Serves `route` on `listen` until the returned server is dropped.
fn serve(listen: &str, web: Option<Arc<WebConfig>>, route: Route) -> anyhow::Result<WebServer> {
    WebServer::start("dashboard-http", listen, web, route)
        .with_context(|| format!("cannot listen on {listen}"))
}

/// Maps a request path to a page. Only these exact paths exist, so
/// nothing outside the files folder (and nothing but these files in it)
/// can be named, however a path is encoded.
fn route(path: &str, files_dir: &Path) -> Page {
    match path {
        "/" | "/index.html" => Page::ok("text/html; charset=utf-8", PAGE),
        "/api/state" => Page::ok(
            "application/json",
            serde_json::to_vec(&state_json(files_dir)).unwrap_or_default(),
        ),
        "/month.svg" => file(folders::chart_file(files_dir), "image/svg+xml"),
        _ => match partition_number(path) {
            Some(n) => file(folders::partition_file(files_dir, n), "application/json"),
            None => Page::not_found(),
        },
    }
}

/// `N` of `/partition-N.json`, digits only.
/// Nine digits at most: always a valid partition number.
fn partition_number(path: &str) -> Option<PartitionId> {
    let digits = path.strip_prefix("/partition-")?.strip_suffix(".json")?;
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn file(path: PathBuf, content_type: &'static str) -> Page {
    match std::fs::read(&path) {
        Ok(body) => Page::ok(content_type, body),
        Err(_) => Page::not_found(),
    }
}

fn modified_unix_ms(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every partition file, merged: for each, its number, file time, offset
/// and months as the file has them, or the reason it does not parse.
pub(crate) fn state_json(files_dir: &Path) -> Value {
    let mut partitions = Vec::new();
    for (partition, path) in partition_files(files_dir).unwrap_or_default() {
        let modified = modified_unix_ms(&path);
        let entry = match std::fs::read_to_string(&path) {
            Err(_) => continue, // replaced or removed between listing and reading
            // The months as this program writes them, whoever wrote the
            // file: `avg` recomputed, never null, every number finite.
            Ok(text) => match parse_partition_json(&text).and_then(|parsed| {
                let value = published::partition_value(
                    parsed.partition,
                    parsed.offset,
                    &parsed.aggregates,
                )?;
                Ok((parsed, value))
            }) {
                Ok((parsed, Value::Object(top))) => {
                    // Filtered, not removed: removal would reorder the
                    // months (serde_json's preserve_order swaps on remove).
                    let months: Map<String, Value> = top
                        .into_iter()
                        .filter(|(key, _)| key != "partition" && key != "offset")
                        .collect();
                    json!({
                        "partition": partition,
                        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                        "modified_unix_ms": modified,
                        "offset": parsed.offset,
                        "months": Value::Object(months),
                    })
                }
                Err(error) => json!({
                    "partition": partition,
                    "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "modified_unix_ms": modified,
                    "error": error.to_string(),
                }),
                Ok(_) => continue,
            },
        };
        partitions.push(entry);
    }
    let mut top = Map::new();
    top.insert("now_unix_ms".into(), now_unix_ms().into());
    top.insert("partitions".into(), Value::Array(partitions));
    top.insert(
        "chart_modified_unix_ms".into(),
        modified_unix_ms(&folders::chart_file(files_dir)).map_or(Value::Null, Value::from),
    );
    Value::Object(top)
}

/// The paths of [`route`], from the snapshot topic: the same bodies a
/// folder published from these snapshots would give.
fn route_view(path: &str, view: &SnapshotView) -> Page {
    match path {
        "/" | "/index.html" => Page::ok("text/html; charset=utf-8", PAGE),
        "/api/state" => Page::ok(
            "application/json",
            serde_json::to_vec(&view_json(view)).unwrap_or_default(),
        ),
        "/month.svg" => {
            let newest = view.newest();
            let inputs: Vec<_> = newest
                .values()
                .map(|record| chart::chart_input(&record.snapshot.aggregates))
                .collect();
            match chart::render_svg(&chart::bars_of(&inputs)) {
                Ok(svg) => Page::ok("image/svg+xml", svg),
                Err(_) => Page::not_found(),
            }
        }
        _ => match partition_number(path).and_then(|n| view.newest().remove(&n)) {
            Some(record) => {
                let snapshot = &record.snapshot;
                match published::partition_json(
                    snapshot.partition,
                    snapshot.next_offset,
                    &snapshot.aggregates,
                ) {
                    Ok(text) => Page::ok("application/json", text),
                    Err(_) => Page::not_found(),
                }
            }
            None => Page::not_found(),
        },
    }
}

/// [`state_json`] of the snapshot topic: a partition's time is when its
/// snapshot was written, and `writer` says by whom.
fn view_json(view: &SnapshotView) -> Value {
    let newest = view.newest();
    let mut partitions = Vec::new();
    for (partition, record) in &newest {
        let snapshot = &record.snapshot;
        let Ok(Value::Object(top)) =
            published::partition_value(*partition, snapshot.next_offset, &snapshot.aggregates)
        else {
            continue;
        };
        let months: Map<String, Value> = top
            .into_iter()
            .filter(|(key, _)| key != "partition" && key != "offset")
            .collect();
        partitions.push(json!({
            "partition": partition,
            "file": format!("partition-{partition}.json"),
            "modified_unix_ms": record.written_unix_ms,
            "offset": snapshot.next_offset,
            "writer": record.writer,
            "months": Value::Object(months),
        }));
    }
    json!({
        "now_unix_ms": now_unix_ms(),
        "source": format!("the snapshot topic {:?}", view.snapshot_topic),
        "partitions": partitions,
        "chart_modified_unix_ms": newest.values().map(|r| r.written_unix_ms).max(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_known_paths_are_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("partition-2.json"), "{}").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "no").unwrap();
        assert_eq!(route("/partition-2.json", dir.path()).status, 200);
        for target in [
            "/secret.txt",
            "/partition-3.json",
            "/../secret.txt",
            "/partition-../secret.json",
            "/partition-2.json/../../etc/passwd",
            "/%2e%2e/secret.txt",
            "/partition-%32.json",
            "/partition-+2.json",
            "/state/partition-0/db",
            "",
        ] {
            assert_eq!(route(target, dir.path()).status, 404, "{target}");
        }
        assert_eq!(
            route("/", dir.path()).content_type,
            "text/html; charset=utf-8"
        );
    }
}
