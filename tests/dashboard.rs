//! `dashboard` over HTTP and in a real browser: status codes and content
//! types, `/api/state` equal to the files, paths outside the folder
//! refused, a garbage file reported, and headless Chromium (driven through
//! chromedriver's WebDriver API) showing the files' values and then a newly
//! published value without reloading the page, over HTTPS (the dashboard
//! with `--web-config-file`, the browser trusting the test's CA).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::NaiveDate;
use common::*;
use serde_json::{json, Value};
use weatherstream::aggregate::{Aggregates, MonthStats, MonthYear};
use weatherstream::kafka::ClientSettings;
use weatherstream::published::partition_json;
use weatherstream::{Counters, Snapshot};

fn stats(month: u32, year: i32, count: u64, sum: f64) -> (MonthYear, MonthStats) {
    let start = NaiveDate::from_ymd_opt(year, month, 1).unwrap();
    (
        MonthYear { month, year },
        MonthStats {
            count,
            sum,
            start,
            end: start + chrono::Days::new(count - 1),
        },
    )
}

/// Replaces a file the way the exporter does: whole, by rename.
fn publish(files: &Path, name: &str, text: &str) {
    let tmp = files.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, files.join(name)).unwrap();
}

/// A files folder: partitions 0 and 2, a garbage partition-3.json and a chart.
fn files_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p0: Aggregates = [stats(1, 1990, 31, 599.0), stats(1, 1991, 31, 178.0)].into();
    let p2: Aggregates = [stats(3, 1990, 31, 1240.0)].into();
    publish(
        dir.path(),
        "partition-0.json",
        &partition_json(0, 62, &p0).unwrap(),
    );
    publish(
        dir.path(),
        "partition-2.json",
        &partition_json(2, 31, &p2).unwrap(),
    );
    publish(dir.path(), "partition-3.json", "{\"partition\": 3, \"offs");
    publish(
        dir.path(),
        "month.svg",
        "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
    );
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/secret"), "state").unwrap();
    dir
}

struct Dashboard {
    /// Kept for its drop, which stops the server.
    _process: Running,
    address: String,
}

fn dashboard_on(files: &Path, web_config: Option<&Path>) -> Dashboard {
    let (process, address) = start_dashboard(files, web_config);
    Dashboard {
        _process: process,
        address,
    }
}

/// Names, sizes and times of everything in a folder, to show nothing changed.
fn listing(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            out.extend(listing(&entry.path()));
        } else {
            out.insert(
                entry.path().display().to_string(),
                (meta.len(), meta.modified().unwrap()),
            );
        }
    }
    out
}

#[test]
fn http_serves_the_files_as_they_are_and_nothing_else() {
    let files = files_folder();
    let before = listing(files.path());
    let dashboard = dashboard_on(files.path(), None);
    let get = |path: &str| http(&dashboard.address, "GET", path, None);

    let (status, headers, body) = get("/");
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(String::from_utf8_lossy(&body).contains("<title>weatherstream</title>"));

    let (status, headers, body) = get("/month.svg");
    assert_eq!(
        (status, headers["content-type"].as_str()),
        (200, "image/svg+xml")
    );
    assert_eq!(body, std::fs::read(files.path().join("month.svg")).unwrap());

    let (status, headers, body) = get("/partition-0.json");
    assert_eq!(
        (status, headers["content-type"].as_str()),
        (200, "application/json")
    );
    assert_eq!(
        body,
        std::fs::read(files.path().join("partition-0.json")).unwrap()
    );

    // /api/state: every file merged, the garbage one reported.
    let (status, headers, body) = get("/api/state");
    assert_eq!(
        (status, headers["content-type"].as_str()),
        (200, "application/json")
    );
    let state: Value = serde_json::from_slice(&body).unwrap();
    let partitions = state["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3, "{state}");
    for entry in partitions.iter().filter(|p| p["error"].is_null()) {
        let n = entry["partition"].as_i64().unwrap();
        let file: Value = serde_json::from_str(
            &std::fs::read_to_string(files.path().join(format!("partition-{n}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(entry["offset"], file["offset"]);
        let mut months = file.as_object().unwrap().clone();
        months.remove("partition");
        months.remove("offset");
        assert_eq!(entry["months"], Value::Object(months));
        assert!(entry["modified_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    }
    let broken = partitions
        .iter()
        .find(|p| p["partition"] == json!(3))
        .unwrap();
    assert!(
        broken["error"].as_str().unwrap().contains("not JSON"),
        "{broken}"
    );

    // Paths outside the folder, or other files in it, are not served.
    for path in [
        "/../state/secret",
        "/state/secret",
        "/%2e%2e/state/secret",
        "/..%2fstate%2fsecret",
        "/partition-0.json/../state/secret",
        "/partition-%30.json",
        "/.partition-0.json.tmp",
        "/api/state/../../state/secret",
    ] {
        let (status, _, body) = get(path);
        assert_eq!(status, 404, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains("state"), "{path}");
    }
    assert_eq!(
        http(&dashboard.address, "POST", "/api/state", Some("{}")).0,
        405
    );
    // Clients that send nothing hold nothing the others need.
    let _idle: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&dashboard.address).unwrap())
        .collect();
    assert_eq!(get("/api/state").0, 200);
    assert_eq!(
        listing(files.path()),
        before,
        "the dashboard wrote to the folder"
    );
    drop(dashboard);
}

/// A WebDriver session on headless Chromium through chromedriver.
struct Browser {
    driver: Running,
    address: String,
    session: String,
    _profile: tempfile::TempDir,
    _home: tempfile::TempDir,
}

impl Browser {
    /// `trusted_ca`: a CA certificate the browser trusts (put into the NSS
    /// store of a home folder of its own, where Chromium on Linux looks).
    fn start(trusted_ca: Option<&Path>) -> Browser {
        let driver_bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect(
                "no chromedriver: install Debian's chromium and chromium-driver \
                 (scripts/test.sh does, as root with apt)",
            );
        let home = tempfile::tempdir().unwrap();
        if let Some(ca) = trusted_ca {
            let nssdb = format!("sql:{}", home.path().join(".pki/nssdb").display());
            std::fs::create_dir_all(home.path().join(".pki/nssdb")).unwrap();
            for args in [
                vec!["-N", "-d", &nssdb, "--empty-password"],
                vec![
                    "-A",
                    "-d",
                    &nssdb,
                    "-t",
                    "C,,",
                    "-n",
                    "weatherstream test CA",
                    "-i",
                    ca.to_str().unwrap(),
                ],
            ] {
                let out = Command::new("certutil")
                    .args(&args)
                    .output()
                    .expect("running certutil (scripts/install-browser.sh installs it)");
                assert!(
                    out.status.success(),
                    "certutil {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let mut cmd = Command::new(driver_bin);
        cmd.arg("--port=0").env("HOME", home.path());
        let driver = Running::spawn(cmd);
        let address = driver.listening_address();
        wait_until("chromedriver to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&address).is_ok()
        });
        let profile = tempfile::tempdir().unwrap();
        let capabilities = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            // As root, without a GPU, and with no connection attempts of
            // its own: this machine's network is closed.
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1280,1100",
                     format!("--user-data-dir={}", profile.path().display())]
        }}}});
        let (status, _, body) = http(
            &address,
            "POST",
            "/session",
            Some(&capabilities.to_string()),
        );
        let reply: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 200, "{reply}");
        let session = reply["value"]["sessionId"].as_str().unwrap().to_string();
        Browser {
            driver,
            address,
            session,
            _profile: profile,
            _home: home,
        }
    }

    fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (!body.is_null()).then(|| body.to_string());
        let (status, _, reply) = http(&self.address, method, &path, body.as_deref());
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(status, 200, "{path}: {reply}");
        reply["value"].clone()
    }

    fn open(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url }));
    }

    fn script(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
    }

    /// The text of the first element matching `selector`, "" if none.
    fn text(&self, selector: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : '';",
            Value::from(selector)
        );
        self.script(&script)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_for_text(&self, selector: &str, expected: &str) {
        let mut seen = String::new();
        let found = wait_until_or_timeout(Duration::from_secs(20), || {
            seen = self.text(selector);
            seen == expected
        });
        assert!(
            found,
            "{selector}: wanted {expected:?}, the page shows {seen:?}"
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = http(&self.address, "DELETE", &path, None);
        self.driver.kill9();
    }
}

#[test]
fn a_real_browser_shows_the_files_and_a_new_publish_without_reloading_over_https() {
    let files = files_folder();
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = common::tls::Pki::create(pki_dir.path());
    let dashboard = dashboard_on(files.path(), Some(&pki.web_config("")));
    let port = dashboard.address.rsplit(':').next().unwrap();
    let browser = Browser::start(Some(&pki_dir.path().join("ca.pem")));
    browser.open(&format!("https://localhost:{port}/"));

    // The values of the files: avg of January 1990 (599 / 31), offsets,
    // months no file holds, the garbage file reported.
    browser.wait_for_text("[data-cell='January-1990']", "19.32");
    browser.wait_for_text("[data-cell='March-1990']", "40.00");
    browser.wait_for_text("[data-offset='0']", "62");
    browser.wait_for_text("[data-months='2']", "March");
    assert!(browser.text("#months thead").contains("February (no data)"));
    assert!(browser
        .text("#partitions")
        .contains("partition-3.json does not parse"));
    let title = browser.script(
        "return document.querySelector(\"[data-cell='January-1991']\").getAttribute('title');",
    );
    assert_eq!(title, json!("count 31, 1991-01-01 to 1991-01-31"));
    assert!(browser.text("#lines").contains("January"));

    // A new publish appears without a reload: a mark set on the page now
    // is still there when the new value shows.
    browser.script("window.__sameLoad = 'yes'; return null;");
    let p0: Aggregates = [
        stats(1, 1990, 31, 620.0),
        stats(1, 1991, 31, 178.0),
        stats(2, 1991, 28, 560.0),
    ]
    .into();
    publish(
        files.path(),
        "partition-0.json",
        &partition_json(0, 90, &p0).unwrap(),
    );
    browser.wait_for_text("[data-cell='January-1990']", "20.00");
    browser.wait_for_text("[data-offset='0']", "90");
    browser.wait_for_text("[data-cell='February-1991']", "20.00");
    browser.wait_for_text("[data-months='0']", "January, February");
    assert_eq!(
        browser.script("return window.__sameLoad || 'reloaded';"),
        json!("yes")
    );

    // Numbers at the edges of f64, from another writer that left `avg`
    // null: shown, never as NaN, and the page goes on updating.
    publish(
        files.path(),
        "partition-1.json",
        r#"{"partition": 1, "offset": 5, "February": {"9001": {"count": 1, "sum": 1.7976931348623157e308, "avg": null, "start": "9001-02-01", "end": "9001-02-01"}}, "March": {"9001": {"count": 1, "sum": -1.7976931348623157e308, "avg": null, "start": "9001-03-01", "end": "9001-03-01"}, "9002": {"count": 1, "sum": 5e-324, "avg": null, "start": "9002-03-01", "end": "9002-03-01"}}}"#,
    );
    browser.wait_for_text("[data-cell='February-9001']", "1.798e+308");
    browser.wait_for_text("[data-cell='March-9001']", "-1.798e+308");
    browser.wait_for_text("[data-cell='March-9002']", "4.941e-324");
    let page = browser.script(
        "return document.body.innerText + document.getElementById('lines').innerHTML \
         + [...document.querySelectorAll('[data-cell]')].map(e => e.getAttribute('style')).join();",
    );
    let page = page.as_str().unwrap();
    assert!(
        !page.contains("NaN") && !page.contains("Infinity"),
        "{page}"
    );
    publish(
        files.path(),
        "partition-0.json",
        &partition_json(0, 91, &p0).unwrap(),
    );
    browser.wait_for_text("[data-offset='0']", "91");

    // The README's screenshot (docs/dashboard.png), when asked for.
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        use base64::Engine as _;
        let png = browser.command("GET", "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    drop(browser);
    drop(dashboard);
}

/// Creates a compacted topic of `partitions` on the broker.
fn create_compacted_topic(broker: &Broker, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    let results =
        futures_executor::block_on(admin.create_topics(&[new_topic], &AdminOptions::new()));
    for result in results.unwrap() {
        result.unwrap();
    }
}

fn snapshot_of(partition: i32, next_offset: i64, aggregates: Aggregates) -> Snapshot {
    Snapshot {
        partition,
        epoch: 0,
        next_offset,
        aggregates,
        counters: Counters::default(),
        last_record: None,
        anchor: None,
        last_commit_unix_ms: None,
    }
}

#[test]
fn the_dashboard_shows_the_snapshot_topic_without_a_files_folder_and_follows_it() {
    let broker = Broker::start();
    let topic = unique_topic("dashkafka");
    let snapshot_topic = format!("{topic}-snapshots");
    create_compacted_topic(&broker, &snapshot_topic, 4);
    let client = ClientSettings::plaintext(&broker.bootstrap);
    let write = |snapshot: &Snapshot, at_ms: i64| {
        weatherstream::write_snapshot(&client, &snapshot_topic, &topic, snapshot, at_ms).unwrap();
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let p0: Aggregates = [stats(1, 1990, 31, 599.0), stats(1, 1991, 31, 178.0)].into();
    let p2: Aggregates = [stats(3, 1990, 31, 1240.0)].into();
    write(&snapshot_of(0, 62, p0.clone()), now_ms);
    write(&snapshot_of(2, 31, p2), now_ms);

    // No files folder anywhere: the dashboard runs in an empty folder, and
    // `--files` names one that does not exist.
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = bin("dashboard");
    cmd.current_dir(cwd.path())
        .args(["--from-kafka", "--bootstrap-servers", &broker.bootstrap])
        .args(["--topic", &topic, "--listen", "127.0.0.1:0"])
        .arg("--files")
        .arg(cwd.path().join("nowhere"));
    let dashboard = Running::spawn(cmd);
    let address = dashboard.listening_address();
    let get = |path: &str| http(&address, "GET", path, None);

    // The files a consumer would have published from these snapshots.
    wait_until(
        "partition 2 from the topic",
        Duration::from_secs(30),
        || get("/partition-2.json").0 == 200,
    );
    let (status, headers, body) = get("/partition-0.json");
    assert_eq!(
        (status, headers["content-type"].as_str()),
        (200, "application/json")
    );
    assert_eq!(
        String::from_utf8(body).unwrap(),
        partition_json(0, 62, &p0).unwrap()
    );
    assert_eq!(get("/partition-1.json").0, 404);
    let (status, _, body) = get("/month.svg");
    assert_eq!(status, 200);
    let svg = String::from_utf8(body).unwrap();
    assert!(
        // Each month's latest year, as month.svg draws it.
        svg.contains("January-1991") && svg.contains("March-1990") && !svg.contains("January-1990"),
        "{svg}"
    );
    let state: Value = serde_json::from_slice(&get("/api/state").2).unwrap();
    assert_eq!(state["partitions"][0]["offset"], json!(62));
    assert!(state["partitions"][0]["writer"]
        .as_str()
        .is_some_and(|w| w.contains('/')));
    assert!(state["source"].as_str().unwrap().contains(&snapshot_topic));

    let browser = Browser::start(None);
    browser.open(&format!("http://{address}/"));
    browser.wait_for_text("[data-cell='January-1990']", "19.32");
    browser.wait_for_text("[data-cell='March-1990']", "40.00");
    browser.wait_for_text("[data-offset='0']", "62");
    // Which member owns each partition: the writer of its newest snapshot.
    let owner = state["partitions"][0]["writer"]
        .as_str()
        .unwrap()
        .to_string();
    browser.wait_for_text("[data-owner='0']", &owner);

    // A new snapshot shows without a reload.
    browser.script("window.__sameLoad = 'yes'; return null;");
    let p0_later: Aggregates = [
        stats(1, 1990, 31, 620.0),
        stats(1, 1991, 31, 178.0),
        stats(2, 1991, 28, 560.0),
    ]
    .into();
    write(&snapshot_of(0, 90, p0_later.clone()), now_ms + 1_000);
    browser.wait_for_text("[data-offset='0']", "90");
    browser.wait_for_text("[data-cell='January-1990']", "20.00");
    browser.wait_for_text("[data-cell='February-1991']", "20.00");
    assert_eq!(
        browser.script("return window.__sameLoad || 'reloaded';"),
        json!("yes")
    );

    // A zombie's older snapshot written after it, then garbage: the
    // garbage's warning shows both were read, and the page kept the newer.
    write(&snapshot_of(0, 70, p0), now_ms + 2_000);
    let raw: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    raw.send(
        rdkafka::producer::BaseRecord::to(&snapshot_topic)
            .partition(0)
            .key("0")
            .payload("not a snapshot"),
    )
    .unwrap();
    rdkafka::producer::Producer::flush(&raw, Duration::from_secs(10)).unwrap();
    wait_until("the garbage to be skipped", Duration::from_secs(20), || {
        dashboard
            .stderr_text()
            .contains("partition 0: skipped the record at offset")
    });
    let (_, _, body) = get("/partition-0.json");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        partition_json(0, 90, &p0_later).unwrap()
    );
    browser.wait_for_text("[data-offset='0']", "90");

    drop(browser);
    drop(dashboard);
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "the dashboard wrote into its folder"
    );
}
