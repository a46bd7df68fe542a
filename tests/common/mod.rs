//! Test harness: a real Kafka-protocol broker (tansu, sqlite storage) on a
//! free loopback port per test, or the broker in KAFKA_BOOTSTRAP_SERVERS;
//! helpers to run the binaries and to read a topic back as ground truth.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chrono::{Datelike, NaiveDate};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, TopicPartitionList};
use weatherstream::published::parse_partition_json;
use weatherstream::report;

pub mod group;
pub mod powercut;
pub mod tls;
pub mod wire;

/// A broker for one test.
pub struct Broker {
    pub bootstrap: String,
    child: Option<Child>,
    storage: Storage,
    /// What tansu tells clients to connect to (a TLS front's port), when
    /// not its own listener.
    advertised: Option<String>,
    /// tansu's `--authentication` (SASL SCRAM required).
    authentication: bool,
    _dir: Option<tempfile::TempDir>,
}

/// `--fetch-wait-ms` for tansu: it holds every fetch for the whole wait
/// (Apache Kafka answers when a record arrives), so the consumer's default
/// of 500 ms would delay every report by up to that. 15 ms is the longest
/// wait that keeps freshness within its target (p99 <= 25 ms at the
/// assignment's pace; docs/performance.md). `TANSU_FETCH_WAIT_MS` in the environment
/// replaces it, to compare settings in the bench.
pub fn tansu_fetch_wait_ms() -> String {
    std::env::var("TANSU_FETCH_WAIT_MS").unwrap_or_else(|_| "15".into())
}

fn tansu_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return PathBuf::from(bin);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let default = PathBuf::from(home).join(".cache/weatherstream/tansu-0.6.0/bin/tansu");
    assert!(
        default.exists(),
        "no test broker: run scripts/install-tansu.sh (or scripts/test.sh), or set TANSU_BIN or KAFKA_BOOTSTRAP_SERVERS"
    );
    default
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// tansu's storage engine for a test.
#[derive(Clone, Copy, PartialEq)]
pub enum Storage {
    /// Correct watermarks and mid-batch fetches; but tansu 0.6 panics when a
    /// partition is fetched while its topic is deleted.
    Sqlite,
    /// Survives topic deletion under running consumers; under-reports high
    /// watermarks and serves only batches starting at or after the fetch offset.
    Memory,
}

impl Broker {
    pub fn start() -> Broker {
        Self::start_with(Storage::Sqlite)
    }

    pub fn start_with(storage: Storage) -> Broker {
        if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            return Broker {
                bootstrap,
                child: None,
                storage,
                advertised: None,
                authentication: false,
                _dir: None,
            };
        }
        let dir = tempfile::tempdir().unwrap();
        for _attempt in 0..5 {
            let port = free_port();
            let mut broker = Broker {
                bootstrap: format!("127.0.0.1:{port}"),
                child: None,
                storage,
                advertised: None,
                authentication: false,
                _dir: None,
            };
            broker.child = Some(broker.spawn(dir.path(), port));
            if broker.wait_listening() {
                broker._dir = Some(dir);
                return broker;
            }
            eprintln!("tansu did not listen; retrying on another port");
            broker.kill();
        }
        panic!("tansu did not start");
    }

    /// Whether the started broker accepts connections within 20 s (false
    /// if it exited first).
    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("tansu exited early ({status})");
                return false;
            }
            if TcpStream::connect(&self.bootstrap).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The process id of a broker this test started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether this is a broker the test started (and so can stop).
    pub fn is_ours(&self) -> bool {
        self._dir.is_some()
    }

    /// Stops the broker with SIGKILL, keeping its data, for
    /// [`Broker::restart`].
    pub fn kill_keeping_data(&mut self) {
        assert!(self.is_ours(), "not a broker this test started");
        self.kill();
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is
    /// answered, as from an overloaded broker. [`Broker::resume`] ends it.
    pub fn freeze(&self) {
        signal_child(
            self.child.as_ref().expect("a broker this test started"),
            libc::SIGSTOP,
        );
    }

    pub fn resume(&self) {
        signal_child(
            self.child.as_ref().expect("a broker this test started"),
            libc::SIGCONT,
        );
    }

    /// Starts the killed broker again on the same address and data.
    pub fn restart(&mut self) {
        let dir = self._dir.as_ref().expect("a broker this test started");
        let port = self.port();
        self.child = Some(self.spawn(dir.path(), port));
        assert!(
            self.wait_listening(),
            "tansu did not restart on port {port}"
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` to `child`, which has not been waited for yet.
fn signal_child(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    // The pid is our own child's, not yet reaped (every wait on it happens
    // after the signal), so it cannot name another process.
    let status = unsafe { libc::kill(pid, signal) };
    assert_eq!(status, 0, "kill({pid}, {signal}) failed");
}

impl Broker {
    /// tansu listening on loopback `port`, its data (sqlite) and log in `dir`.
    fn spawn(&self, dir: &Path, port: u16) -> Child {
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = self
            .advertised
            .as_ref()
            .map_or_else(|| url.clone(), |address| format!("tcp://{address}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .unwrap();
        Command::new(tansu_bin())
            .current_dir(dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(match self.storage {
                Storage::Sqlite => &["--storage-engine", "sqlite://tansu.db"][..],
                Storage::Memory => &[],
            })
            .args(self.authentication.then_some("--authentication"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tansu")
    }

    /// The port tansu itself listens on (plain TCP).
    pub fn port(&self) -> u16 {
        self.bootstrap.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Restarts the broker (kept data) advertising `address` to clients,
    /// e.g. the TLS front of [`tls::Stunnel`], and with `--authentication`
    /// when `authentication` is set.
    pub fn restart_as(&mut self, advertised: &str, authentication: bool) {
        assert!(self.is_ours(), "not a broker this test started");
        self.kill();
        self.advertised = Some(advertised.to_string());
        self.authentication = authentication;
        self.restart();
    }

    /// Creates a SCRAM user through tansu's own admin command. tansu 0.6
    /// takes it only from a broker that does not require authentication yet
    /// (then restart it with [`Broker::restart_as`]).
    pub fn create_scram_user(&self, name: &str, password: &str) {
        let out = Command::new(tansu_bin())
            .args(["user", "create", "--mechanism", "scram512", "--broker"])
            .arg(format!("tcp://{}", self.bootstrap))
            .args([name, password])
            .output()
            .expect("running tansu user create");
        assert!(
            out.status.success(),
            "tansu user create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if let Some(dir) = &self._dir {
                let log = std::fs::read_to_string(dir.path().join("tansu.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- last lines of the test broker's log ---");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        chrono::Utc::now().timestamp_micros() % 1_000_000_000
    )
}

pub fn bin(name: &str) -> Command {
    let path = match name {
        "producer" => env!("CARGO_BIN_EXE_producer"),
        "consumer" => env!("CARGO_BIN_EXE_consumer"),
        "debug" => env!("CARGO_BIN_EXE_debug"),
        "plot" => env!("CARGO_BIN_EXE_plot"),
        "demo" => env!("CARGO_BIN_EXE_demo"),
        "dashboard" => env!("CARGO_BIN_EXE_dashboard"),
        other => panic!("no binary {other}"),
    };
    let mut cmd = Command::new(path);
    cmd.env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .env_remove("FILES_DIR");
    cmd
}

/// Starts a paced producer and returns once it has (re-)created the topic,
/// so that no consumer fetches while the topic is being deleted.
pub fn start_paced_producer(
    broker: &Broker,
    topic: &str,
    days: u64,
    seed: u64,
    delay: &str,
) -> Running {
    let mut cmd = bin("producer");
    cmd.args([
        "--bootstrap-servers",
        &broker.bootstrap,
        "--topic",
        topic,
        "--delay",
        delay,
    ])
    .args(["--days", &days.to_string(), "--seed", &seed.to_string()]);
    let producer = Running::spawn(cmd);
    wait_until(
        "the producer to create the topic",
        Duration::from_secs(60),
        || producer.stderr_text().contains("created topic"),
    );
    producer
}

/// Runs the producer to completion; panics with its output on failure.
pub fn produce(broker: &Broker, topic: &str, days: u64, seed: u64) -> Output {
    let out = bin("producer")
        .args([
            "--bootstrap-servers",
            &broker.bootstrap,
            "--topic",
            topic,
            "--delay",
            "0",
        ])
        .args(["--days", &days.to_string(), "--seed", &seed.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How many reports the producer sends for `days` with `seed`.
pub fn reports_for(days: u64, seed: u64) -> usize {
    let mut gen = weatherstream::generator::WeatherGenerator::new(Some(seed));
    let mut n = 0;
    while gen.days_generated() < days {
        gen.next();
        n += 1;
    }
    n
}

impl Broker {
    /// `consumer` connected to this broker and `topic`, with the fetch wait
    /// the broker needs (tansu's when the test started tansu; the consumer's
    /// default against a real Kafka from KAFKA_BOOTSTRAP_SERVERS).
    pub fn consumer_cmd(&self, topic: &str) -> Command {
        let mut cmd = bin("consumer");
        cmd.args(["--bootstrap-servers", &self.bootstrap, "--topic", topic])
            .args(self.fetch_wait_args());
        cmd
    }

    /// `consumer verify` of `topic` against this broker, on `files`.
    pub fn verify_cmd(&self, topic: &str, files: &Path) -> Command {
        let mut cmd = bin("consumer");
        cmd.args([
            "verify",
            "--bootstrap-servers",
            &self.bootstrap,
            "--topic",
            topic,
        ])
        .arg("--files")
        .arg(files);
        cmd
    }

    /// `--fetch-wait-ms` as this broker needs it (none for a real Kafka).
    pub fn fetch_wait_args(&self) -> Vec<String> {
        if self.is_ours() {
            vec!["--fetch-wait-ms".into(), tansu_fetch_wait_ms()]
        } else {
            Vec::new()
        }
    }
}

/// Starts `consumer PARTITIONS...` on `files` (state in files/state).
pub fn start_consumer(broker: &Broker, topic: &str, files: &Path, partitions: &[i32]) -> Running {
    let mut cmd = broker.consumer_cmd(topic);
    cmd.arg("--quiet")
        .arg("--files")
        .arg(files)
        .args(partitions.iter().map(|p| p.to_string()));
    Running::spawn(cmd)
}

/// Waits until the 4 partition files show the end offsets of `records`.
pub fn wait_for_records(files: &Path, records: &[Record], timeout: Duration) {
    wait_for_offsets(files, &end_offsets(records), 4, timeout);
}

/// Waits until every partition file shows its end offset.
pub fn wait_for_offsets(
    files: &Path,
    ends: &BTreeMap<i32, i64>,
    partitions: i32,
    timeout: Duration,
) {
    let found = || -> Vec<Option<i64>> {
        (0..partitions)
            .map(|p| read_partition_file(files, p).map(|f| f.offset))
            .collect()
    };
    let wanted: Vec<Option<i64>> = (0..partitions)
        .map(|p| Some(ends.get(&p).copied().unwrap_or(0)))
        .collect();
    let reached = wait_until_or_timeout(timeout, || found() == wanted);
    assert!(
        reached,
        "timed out waiting for partition files to reach the end of the topic: \
         want offsets {wanted:?}, the files show {:?}",
        found()
    );
}

/// The end offset of each of `topic`'s 4 partitions, asked through `client`.
pub fn high_watermarks_with(client: &BaseConsumer, topic: &str) -> Vec<i64> {
    (0..4)
        .map(|p| {
            client
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_or(0, |(_, high)| high)
        })
        .collect()
}

pub fn watcher(broker: &Broker) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap()
}

/// The end offset of each of `topic`'s 4 partitions, asked of the broker.
pub fn high_watermarks(broker: &Broker, topic: &str) -> Vec<i64> {
    high_watermarks_with(&watcher(broker), topic)
}

/// Reads every record of `topic`, whose partitions end at `ends`.
pub fn all_records(broker: &Broker, topic: &str) -> Vec<Record> {
    let total: i64 = high_watermarks(broker, topic).iter().sum();
    read_topic(
        &broker.bootstrap,
        topic,
        4,
        total as usize,
        Duration::from_secs(120),
    )
}

/// Runs the producer for `days` with `seed` and reads the topic back.
pub fn produce_and_read(broker: &Broker, topic: &str, days: u64, seed: u64) -> Vec<Record> {
    produce(broker, topic, days, seed);
    read_topic(
        &broker.bootstrap,
        topic,
        4,
        reports_for(days, seed),
        Duration::from_secs(120),
    )
}

/// One record as read back from the topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Reads every partition from offset 0 until `expected` records are read
/// (watermarks are not trusted: see docs/design.md), or panics after `timeout`.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    read_topic_with(bootstrap, &[], topic, partitions, expected, timeout)
}

/// [`read_topic`] with client properties of its own (TLS, SASL).
pub fn read_topic_with(
    bootstrap: &str,
    properties: &[(&str, &str)],
    topic: &str,
    partitions: i32,
    expected: usize,
    timeout: Duration,
) -> Vec<Record> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false");
    for (key, value) in properties {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    while records.len() < expected {
        assert!(
            Instant::now() < deadline,
            "read {} of {expected} records",
            records.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            records.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
            });
        }
    }
    // Anything beyond what was expected shows up within a short grace period.
    let grace = Instant::now() + Duration::from_millis(500);
    while Instant::now() < grace {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            panic!(
                "unexpected extra record at partition {} offset {}",
                m.partition(),
                m.offset()
            );
        }
    }
    records
}

/// Independently recomputed statistics: partition -> (month, year) -> (count, sum, start, end).
pub type Expected = BTreeMap<i32, BTreeMap<(u32, i32), (u64, f64, NaiveDate, NaiveDate)>>;

/// Recomputes what the consumer must publish, straight from the records:
/// in offset order per partition, first occurrence of each date counts,
/// unless it would make its month/year's sum infinite (then it is skipped,
/// and the next day is no duplicate).
pub fn recompute(records: &[Record]) -> Expected {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut out = Expected::new();
    for r in sorted {
        let Ok(valid) = report::validate(r.key.as_deref(), r.value.as_deref()) else {
            continue;
        };
        let month = out.entry(r.partition).or_default();
        let key = (valid.date.month(), valid.date.year());
        match month.get_mut(&key) {
            None => {
                month.insert(key, (1, valid.degrees, valid.date, valid.date));
            }
            Some(s) if valid.date > s.3 && (s.1 + valid.degrees).is_finite() => {
                s.0 += 1;
                s.1 += valid.degrees;
                s.3 = valid.date;
            }
            Some(_) => {}
        }
    }
    out
}

/// Offsets per partition after the last record.
pub fn end_offsets(records: &[Record]) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for r in records {
        let e = out.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    out
}

/// Reads partition-N.json; None if missing or (mid-write would be a bug) unparsable.
pub fn read_partition_file(
    files: &Path,
    partition: i32,
) -> Option<weatherstream::published::PublishedPartition> {
    let text = std::fs::read_to_string(files.join(format!("partition-{partition}.json"))).ok()?;
    Some(parse_partition_json(&text).expect("partition file parses"))
}

/// Asserts that the published files equal the recomputation exactly.
pub fn assert_files_match(files: &Path, expected: &Expected, partitions: i32) {
    assert_files_match_in(files, expected, partitions, |_| true);
}

/// [`assert_files_match`] for the years `compared` accepts only.
pub fn assert_files_match_in(
    files: &Path,
    expected: &Expected,
    partitions: i32,
    compared: impl Fn(i32) -> bool,
) {
    for p in 0..partitions {
        let published =
            read_partition_file(files, p).unwrap_or_else(|| panic!("partition-{p}.json missing"));
        let mut want = expected.get(&p).cloned().unwrap_or_default();
        want.retain(|(_, year), _| compared(*year));
        let got: Vec<_> = published
            .aggregates
            .iter()
            .filter(|(k, _)| compared(k.year))
            .map(|(k, s)| ((k.month, k.year), s))
            .collect();
        assert_eq!(got.len(), want.len(), "partition {p}: month/years differ");
        for ((key, stats), (wkey, w)) in got.iter().zip(want.iter()) {
            assert_eq!(key, wkey, "partition {p}");
            assert_eq!(
                (stats.count, stats.start, stats.end),
                (w.0, w.2, w.3),
                "partition {p} {key:?}"
            );
            let rel = ((stats.sum - w.1) / w.1.abs().max(1.0)).abs();
            assert!(
                rel < 1e-9,
                "partition {p} {key:?}: sum {} vs {}",
                stats.sum,
                w.1
            );
            assert!(
                stats.avg() < 1000.0,
                "partition {p} {key:?}: a duplicate was counted"
            );
            // Every day from the 1st to `end` is there.
            assert_eq!(
                stats.count,
                u64::from(stats.end.day()),
                "partition {p} {key:?}"
            );
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(
        wait_until_or_timeout(timeout, condition),
        "timed out waiting for {what}"
    );
}

/// Polls `condition` every 50 ms until it holds (true) or `timeout` passes
/// (false).
pub fn wait_until_or_timeout(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Lines of a child's output, collected in the background.
type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn collect_lines(pipe: impl std::io::Read + Send + 'static) -> Lines {
    let lines = Lines::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// A child process whose stdout and stderr lines are collected in the
/// background.
pub struct Running {
    pub child: Child,
    pub stderr: Lines,
    stdout: Lines,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = collect_lines(child.stderr.take().unwrap());
        let stdout = collect_lines(child.stdout.take().unwrap());
        Running {
            child,
            stderr,
            stdout,
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// The loopback `HOST:PORT` the child listens on, from the first line
    /// of its output that names one (`http://HOST:PORT/...`, or
    /// chromedriver's `on port PORT.`). Children are given port 0 and say
    /// which port they got, so parallel tests never race for a free port.
    pub fn listening_address(&self) -> String {
        let mut found = None;
        wait_until(
            "the child to say where it listens",
            Duration::from_secs(30),
            || {
                let lines = [self.stdout_text(), self.stderr_text()].join("\n");
                found = lines.lines().find_map(address_in);
                found.is_some()
            },
        );
        found.unwrap()
    }

    /// Sends `signal` to the child, which has not been waited for yet.
    pub fn signal(&self, signal: libc::c_int) {
        signal_child(&self.child, signal);
    }

    /// SIGTERM, then waits; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().unwrap()
    }

    /// SIGINT (Ctrl-C), then waits; returns the exit status.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGINT);
        self.child.wait().unwrap()
    }

    /// SIGKILL (kill -9), then reaps the child.
    pub fn kill9(&mut self) {
        // std's kill() is SIGKILL, and safe.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let lines = self.stderr.lock().unwrap();
            eprintln!("--- last stderr lines of child {} ---", self.child.id());
            for line in lines
                .iter()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("{line}");
            }
        }
    }
}

/// `HOST:PORT` in a line that says where a server listens.
fn address_in(line: &str) -> Option<String> {
    let url = line
        .split_once("https://")
        .or_else(|| line.split_once("http://"));
    if let Some((_, rest)) = url {
        let address: String = rest
            .chars()
            .take_while(|c| *c != '/' && !c.is_whitespace())
            .collect();
        // Only HOST:PORT: chromedriver's banner links a web page.
        let port = address
            .rsplit_once(':')
            .map(|(_, port)| port.parse::<u16>());
        if matches!(port, Some(Ok(_))) {
            return Some(address);
        }
    }
    let (_, rest) = line.split_once("started successfully on port ")?;
    let port: u16 = rest.trim_end_matches('.').trim().parse().ok()?;
    Some(format!("127.0.0.1:{port}"))
}

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`):
/// status, headers (lower-case names), body. Enough for our servers and
/// chromedriver; chunked bodies are decoded.
pub fn http(
    address: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, BTreeMap<String, String>, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then the body by its length: some servers
    // (chromedriver) keep the connection open despite `Connection: close`.
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let split = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "{method} {path}: connection closed before a response head"
        );
        raw.extend_from_slice(&buf[..n]);
    };
    let length = String::from_utf8_lossy(&raw[..split])
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        });
    match length {
        Some(length) => {
            while raw.len() < split + 4 + length {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "connection closed inside a response body");
                raw.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            stream.read_to_end(&mut raw).unwrap();
        }
    }
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut content = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        let mut decoded = Vec::new();
        let mut rest = &content[..];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16)
                .unwrap_or(0);
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest = &rest[end + 2 + size + 2..];
        }
        content = decoded;
    }
    (status, headers, content)
}

/// `dashboard` on `files` at a port of its own, with `--web-config-file`
/// if given: the process and the address it listens on.
pub fn start_dashboard(files: &Path, web_config: Option<&Path>) -> (Running, String) {
    let mut cmd = bin("dashboard");
    cmd.arg("--files")
        .arg(files)
        .args(["--listen", "127.0.0.1:0"]);
    if let Some(path) = web_config {
        cmd.arg("--web-config-file").arg(path);
    }
    let running = Running::spawn(cmd);
    let address = running.listening_address();
    (running, address)
}

/// `consumer export --from-kafka` of `topic`'s snapshots into `files`.
pub fn export_from_kafka(broker: &Broker, topic: &str, files: &Path) -> Output {
    bin("consumer")
        .args([
            "export",
            "--from-kafka",
            "--bootstrap-servers",
            &broker.bootstrap,
        ])
        .args(["--topic", topic, "--files"])
        .arg(files)
        .output()
        .unwrap()
}

/// Published offsets of partitions 0..4 (None where no file yet).
pub fn published_offsets(files: &Path) -> Vec<Option<i64>> {
    (0..4)
        .map(|p| read_partition_file(files, p).map(|f| f.offset))
        .collect()
}

/// Runs `consumer PARTITIONS 0..4` until every partition file is at
/// offset `min` or beyond, then stops it; returns the published offsets.
pub fn run_to_offsets(broker: &Broker, topic: &str, files: &Path, min: i64) -> Vec<Option<i64>> {
    let mut consumer = start_consumer(broker, topic, files, &[0, 1, 2, 3]);
    wait_until("a first stretch", Duration::from_secs(60), || {
        published_offsets(files)
            .iter()
            .all(|o| o.is_some_and(|o| o >= min))
    });
    assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
    published_offsets(files)
}

/// Stops a [`sample_offsets`] sampler and asserts that no published offset
/// went back while it ran.
pub fn assert_never_went_back(
    stop: &std::sync::atomic::AtomicBool,
    sampler: std::thread::JoinHandle<Vec<String>>,
) {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let went_back = sampler.join().unwrap();
    assert!(
        went_back.is_empty(),
        "published offsets went back: {went_back:?}"
    );
}

/// Samples the published offsets every 50 ms, from `start`, until `stop`
/// is set; returns every time one went back.
pub fn sample_offsets(
    files: PathBuf,
    start: Vec<Option<i64>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut last = start;
        let mut went_back = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let now = published_offsets(&files);
            for (p, (before, after)) in last.iter().zip(&now).enumerate() {
                if after < before {
                    went_back.push(format!("partition {p}: {before:?} -> {after:?}"));
                }
            }
            last = now;
            std::thread::sleep(Duration::from_millis(50));
        }
        went_back
    })
}

/// Starts a consumer of every partition on `files` while the published
/// offsets are sampled every 50 ms from `newest`, lets the paced producer
/// finish, checks that no sampled offset went back, and stops the
/// consumer cleanly: the records of the whole topic and the consumer's
/// stderr.
#[allow(clippy::too_many_arguments)]
pub fn consume_to_end_sampled(
    broker: &Broker,
    topic: &str,
    producer: &mut Running,
    files: &Path,
    days: u64,
    seed: u64,
    newest: Vec<Option<i64>>,
) -> (Vec<Record>, String) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_offsets(files.to_path_buf(), newest, stop.clone());
    let mut consumer = start_consumer(broker, topic, files, &[0, 1, 2, 3]);
    let records = finish_and_read(broker, topic, producer, files, days, seed);
    assert_never_went_back(&stop, sampler);
    assert!(consumer.terminate().success());
    let stderr = consumer.stderr_text();
    (records, stderr)
}

/// Waits for a paced producer of `days` with `seed` to finish, reads the
/// whole topic back, and waits until the files show its end; returns it.
pub fn finish_and_read(
    broker: &Broker,
    topic: &str,
    producer: &mut Running,
    files: &Path,
    days: u64,
    seed: u64,
) -> Vec<Record> {
    assert!(producer.child.wait().unwrap().success());
    let records = read_topic(
        &broker.bootstrap,
        topic,
        4,
        reports_for(days, seed),
        Duration::from_secs(60),
    );
    wait_for_records(files, &records, Duration::from_secs(60));
    records
}

/// The committed offsets of `group`, read by a client of the test's own.
pub fn group_offsets(
    bootstrap: &str,
    settings: &[(&str, &str)],
    group: &str,
    topic: &str,
) -> BTreeMap<i32, i64> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    let client: BaseConsumer = config.create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..4 {
        list.add_partition(topic, p);
    }
    let committed = client
        .committed_offsets(list, Duration::from_secs(10))
        .expect("reading the group's committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(offset) => Some((e.partition(), offset)),
            _ => None,
        })
        .collect()
}

/// Every PromQL query of monitoring/grafana-dashboard.json.
pub fn dashboard_queries() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that every metric the Grafana dashboard queries is a series of
/// `exposition` (a `/metrics` body).
pub fn assert_dashboard_metrics_exist(exposition: &str) {
    let exposed: std::collections::BTreeSet<&str> = exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let mut queried = std::collections::BTreeSet::new();
    for query in dashboard_queries() {
        let mut rest = query.as_str();
        while let Some(at) = ["weatherstream_", "process_"]
            .iter()
            .filter_map(|prefix| rest.find(prefix))
            .min()
        {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            queried.insert(name);
        }
    }
    assert!(queried.len() >= 20, "{queried:?}");
    let missing: Vec<_> = queried
        .iter()
        .filter(|name| !exposed.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not have: {missing:?}"
    );
}
