//! Connecting to Kafka as people run it: TLS (stunnel in front of tansu,
//! with the test's own CA), mutual TLS, SASL SCRAM-SHA-512 over TLS through
//! a Java-style client.properties, every compression codec, the settings
//! exactly-once depends on refused, and the offsets committed to the
//! consumer group for Kafka's tools. What each failure prints is checked:
//! one line, the right cause, and never a secret.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::tls::{Pki, Stunnel};
use common::*;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

const PASSWORD: &str = "right-horse-battery-42";
const WRONG_PASSWORD: &str = "wrong-staple-17";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A broker of the test's own behind stunnel, or None (with a note) when
/// the tests run against KAFKA_BOOTSTRAP_SERVERS, which this cannot wrap.
struct Secured {
    broker: Broker,
    stunnel: Stunnel,
    pki: Pki,
    dir: tempfile::TempDir,
}

fn secured(require_client_cert: bool, scram_user: bool) -> Option<Secured> {
    let mut broker = Broker::start();
    if !broker.is_ours() {
        eprintln!("skipped: needs a test broker of its own (KAFKA_BOOTSTRAP_SERVERS is set)");
        return None;
    }
    if scram_user {
        broker.create_scram_user("app", PASSWORD);
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let stunnel = Stunnel::start(&pki, broker.port(), require_client_cert);
    broker.restart_as(&stunnel.address(), scram_user);
    Some(Secured {
        broker,
        stunnel,
        pki,
        dir,
    })
}

impl Secured {
    /// librdkafka settings of a TLS client that trusts the test CA.
    fn tls(&self) -> Vec<(String, String)> {
        vec![
            ("security.protocol".into(), "ssl".into()),
            ("ssl.ca.location".into(), self.pki.path("ca.pem")),
            // stunnel listens on 127.0.0.1; "localhost" may resolve to ::1 first.
            ("broker.address.family".into(), "v4".into()),
        ]
    }

    fn client_cert(&self) -> Vec<(String, String)> {
        let mut settings = self.tls();
        settings.push((
            "ssl.certificate.location".into(),
            self.pki.path("client.pem"),
        ));
        settings.push(("ssl.key.location".into(), self.pki.path("client.key")));
        settings
    }

    /// A Confluent-Cloud-style Java client.properties for SCRAM over TLS.
    fn java_properties(&self, name: &str, password: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(format!("{name}.properties"));
        std::fs::write(
            &path,
            format!(
                "# as a Java client or kafka-console-consumer --command-config takes it\n\
                 bootstrap.servers={}\n\
                 security.protocol=SASL_SSL\n\
                 sasl.mechanism=SCRAM-SHA-512\n\
                 sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \\\n    username=\"app\" password=\"{password}\";\n\
                 ssl.endpoint.identification.algorithm=https\n\
                 ssl.ca.location={}\n\
                 broker.address.family=v4\n\
                 acks=all\n",
                self.stunnel.address(),
                self.pki.path("ca.pem"),
            ),
        )
        .unwrap();
        path
    }
}

/// `-X KEY=VALUE` arguments.
fn x_args(settings: &[(String, String)]) -> Vec<String> {
    settings
        .iter()
        .flat_map(|(key, value)| ["-X".to_string(), format!("{key}={value}")])
        .collect()
}

fn props(settings: &[(String, String)]) -> Vec<(&str, &str)> {
    settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// How a command reaches the broker: `--bootstrap-servers` plus `-X`, or a
/// `--client-config` file.
#[derive(Clone)]
enum Connect {
    Args(String, Vec<(String, String)>),
    File(std::path::PathBuf),
}

impl Connect {
    fn apply(&self, cmd: &mut Command) {
        match self {
            Connect::Args(bootstrap, settings) => {
                cmd.args(["--bootstrap-servers", bootstrap])
                    .args(x_args(settings));
            }
            Connect::File(path) => {
                cmd.arg("--client-config").arg(path);
            }
        }
    }
}

fn producer(connect: &Connect, topic: &str, days: u64, extra: &[&str]) -> Output {
    let mut cmd = bin("producer");
    connect.apply(&mut cmd);
    cmd.args(["--topic", topic, "--delay", "0", "--seed", "5"])
        .args(["--days", &days.to_string()])
        .args(extra);
    cmd.output().unwrap()
}

fn consumer(connect: &Connect, topic: &str, files: &Path, partitions: &[&str]) -> Running {
    let mut cmd = bin("consumer");
    connect.apply(&mut cmd);
    cmd.args(["--topic", topic, "--quiet", "--fetch-wait-ms"])
        .arg(tansu_fetch_wait_ms())
        .arg("--files")
        .arg(files)
        .args(partitions);
    Running::spawn(cmd)
}

fn verify(connect: &Connect, topic: &str, files: &Path) -> Output {
    let mut cmd = bin("consumer");
    cmd.arg("verify");
    connect.apply(&mut cmd);
    cmd.args(["--topic", topic]).arg("--files").arg(files);
    cmd.output().unwrap()
}

fn published(files: &Path) -> BTreeMap<i32, i64> {
    (0..4)
        .filter_map(|p| read_partition_file(files, p).map(|f| (p, f.offset)))
        .collect()
}

/// Runs the whole pipeline through `connect`: producer, `consumer 0 1` and
/// `consumer 2 3`, verify and debug; the statistics must match the test's
/// recomputation from the topic, and the group's offsets the published
/// ones. Returns everything the commands printed.
fn whole_pipeline(
    connect: &Connect,
    bootstrap: &str,
    reader: &[(&str, &str)],
    files: &Path,
) -> String {
    let topic = unique_topic("secure");
    let days = 400;
    let out = producer(connect, &topic, days, &[]);
    let mut printed = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "producer failed: {printed}");
    let records = read_topic_with(
        bootstrap,
        reader,
        &topic,
        4,
        reports_for(days, 5),
        Duration::from_secs(120),
    );
    let mut first = consumer(connect, &topic, files, &["0", "1"]);
    let mut second = consumer(connect, &topic, files, &["2", "3"]);
    wait_for_records(files, &records, Duration::from_secs(120));
    assert_files_match(files, &recompute(&records), 4);

    let out = verify(connect, &topic, files);
    printed += &(text(&out.stdout) + &text(&out.stderr));
    assert!(out.status.success(), "verify failed: {printed}");

    let mut debug_cmd = bin("debug");
    connect.apply(&mut debug_cmd);
    debug_cmd.args(["--topic", &topic, "--from-beginning"]);
    let mut debug = Running::spawn(debug_cmd);
    wait_until("debug to print reports", Duration::from_secs(60), || {
        debug.stdout_text().lines().count() >= 50
    });
    assert!(debug.stdout_text().starts_with("{'partition': "));
    debug.terminate();
    printed += &(debug.stdout_text() + &debug.stderr_text());

    assert!(first.terminate().success());
    assert!(second.terminate().success());
    printed += &(first.stderr_text() + &second.stderr_text());
    assert_eq!(
        group_offsets(bootstrap, reader, "weatherstream", &topic),
        published(files),
        "the group's committed offsets are the published ones: {printed}"
    );
    assert_eq!(published(files), end_offsets(&records));
    printed
}

/// The one line a failed start-up prints, and how long it took.
fn failed_start(out: &Output, started: Instant) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failed within the connect timeout, not after {:?}",
        started.elapsed()
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, no retry lines: {stderr}");
    lines[0].to_string()
}

#[test]
fn the_whole_pipeline_runs_over_tls_with_a_private_ca() {
    let Some(s) = secured(false, false) else {
        return;
    };
    let files = s.dir.path().join("files");
    let tls = s.tls();
    let connect = Connect::Args(s.stunnel.address(), tls.clone());
    whole_pipeline(&connect, &s.stunnel.address(), &props(&tls), &files);

    // The wrong CA: the certificate cannot be verified.
    let mut wrong_ca = tls.clone();
    wrong_ca[1].1 = s.pki.path("other-ca.pem");
    let started = Instant::now();
    let out = producer(&Connect::Args(s.stunnel.address(), wrong_ca), "t", 1, &[]);
    let line = failed_start(&out, started);
    assert!(line.contains("TLS handshake"), "{line}");
    assert!(line.contains("certificate verify failed"), "{line}");

    // A plaintext client at the TLS port.
    let started = Instant::now();
    let out = producer(
        &Connect::Args(
            s.stunnel.address(),
            vec![("broker.address.family".into(), "v4".into())],
        ),
        "t",
        1,
        &[],
    );
    let line = failed_start(&out, started);
    assert!(line.contains("security.protocol"), "{line}");

    // A TLS client at the plain port.
    let started = Instant::now();
    let out = producer(
        &Connect::Args(s.broker.bootstrap.clone(), tls.clone()),
        "t",
        1,
        &[],
    );
    let line = failed_start(&out, started);
    assert!(
        line.contains("TLS") || line.contains("security.protocol"),
        "{line}"
    );
}

/// Sends the reports of `seed`'s stream for days `from..to` with a client
/// of the test's own (the producer re-creates its topic).
fn append_reports(
    bootstrap: &str,
    settings: &[(&str, &str)],
    topic: &str,
    seed: u64,
    days: std::ops::Range<u64>,
) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (key, value) in settings {
        config.set(*key, *value);
    }
    let client: BaseProducer = config.create().unwrap();
    let mut generator = weatherstream::generator::WeatherGenerator::new(Some(seed));
    while generator.days_generated() < days.start {
        generator.next();
    }
    while generator.days_generated() < days.end {
        let obs = generator.next().unwrap();
        let value = weatherstream::report::encode(obs.date, obs.degrees);
        let key = weatherstream::report::key_for(obs.date);
        while client
            .send(BaseRecord::to(topic).key(key).payload(&value))
            .is_err()
        {
            client.poll(Duration::from_millis(10));
        }
    }
    client.flush(Duration::from_secs(60)).unwrap();
}

/// After start-up, the broker turns untrusted (its certificate is now of
/// another CA, as after a botched renewal; for a client, the same failure
/// as revoked credentials): one warning, then the consumer waits and
/// retries like in an outage, and when the broker is trusted again it
/// counts what came meanwhile, exactly.
#[test]
fn a_tls_failure_after_start_up_is_one_warning_then_waited_out_with_nothing_lost() {
    let Some(mut s) = secured(false, false) else {
        return;
    };
    let files = s.dir.path().join("files");
    let tls = s.tls();
    let connect = Connect::Args(s.stunnel.address(), tls.clone());
    let topic = unique_topic("untrusted");
    let out = producer(&connect, &topic, 200, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut consumer = consumer(&connect, &topic, &files, &["0", "1", "2", "3"]);
    let first = read_topic_with(
        &s.stunnel.address(),
        &props(&tls),
        &topic,
        4,
        reports_for(200, 5),
        Duration::from_secs(60),
    );
    wait_for_records(&files, &first, Duration::from_secs(60));

    let port = s.stunnel.port;
    s.stunnel.stop();
    let impostor = Stunnel::start_at(port, &s.pki, "impostor", s.broker.port(), false);
    wait_until("the warning", Duration::from_secs(60), || {
        consumer.stderr_text().contains("broker unreachable")
    });
    // Reconnect attempts go on, each refused: still one warning.
    wait_until("more refused handshakes", Duration::from_secs(60), || {
        impostor.log(&s.pki).matches("SSL_accept").count() >= 5
    });
    drop(impostor);
    s.stunnel = Stunnel::start_at(port, &s.pki, "server", s.broker.port(), false);
    append_reports(&s.stunnel.address(), &props(&tls), &topic, 5, 200..400);
    let all = read_topic_with(
        &s.stunnel.address(),
        &props(&tls),
        &topic,
        4,
        reports_for(400, 5),
        Duration::from_secs(60),
    );
    wait_for_records(&files, &all, Duration::from_secs(120));
    assert_files_match(&files, &recompute(&all), 4);
    assert!(consumer.terminate().success());
    let log = consumer.stderr_text();
    let warning: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("broker unreachable"))
        .collect();
    assert_eq!(warning.len(), 1, "{log}");
    // The refusal is named: in the warning, or, when the dropped
    // connections were seen first, in one line of its own.
    let refusal: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refuses this client"))
        .collect();
    assert!(refusal.len() <= 1, "{log}");
    assert!(
        warning[0].contains("SSL") || refusal.first().is_some_and(|l| l.contains("SSL")),
        "{log}"
    );
    assert_eq!(log.matches("broker reachable again").count(), 1, "{log}");
}

#[test]
fn the_system_ca_store_is_found_without_ssl_ca_location() {
    let Some(s) = secured(false, false) else {
        return;
    };
    // OpenSSL's own variable for the system store, as a user's machine
    // would have the CA installed there.
    let topic = unique_topic("system-ca");
    let mut cmd = bin("producer");
    cmd.env("SSL_CERT_FILE", s.pki.path("ca.pem"))
        .args(["--bootstrap-servers", &s.stunnel.address()])
        .args([
            "-X",
            "security.protocol=ssl",
            "-X",
            "broker.address.family=v4",
        ])
        .args(["--topic", &topic, "--days", "10", "--delay", "0"]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the CA from SSL_CERT_FILE: {}",
        text(&out.stderr)
    );
}

#[test]
fn mutual_tls_admits_only_a_client_with_a_certificate() {
    let Some(s) = secured(true, false) else {
        return;
    };
    let started = Instant::now();
    let out = producer(&Connect::Args(s.stunnel.address(), s.tls()), "t", 1, &[]);
    let line = failed_start(&out, started);
    assert!(
        line.contains("TLS") || line.contains("security.protocol"),
        "{line}"
    );

    let with_cert = s.client_cert();
    let connect = Connect::Args(s.stunnel.address(), with_cert.clone());
    let topic = unique_topic("mtls");
    let out = producer(&connect, &topic, 100, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records = read_topic_with(
        &s.stunnel.address(),
        &props(&with_cert),
        &topic,
        4,
        reports_for(100, 5),
        Duration::from_secs(60),
    );
    let files = s.dir.path().join("files");
    let mut all = consumer(&connect, &topic, &files, &["0", "1", "2", "3"]);
    wait_for_records(&files, &records, Duration::from_secs(60));
    assert_files_match(&files, &recompute(&records), 4);
    assert!(all.terminate().success());
}

#[test]
fn scram_over_tls_from_a_java_client_properties_file() {
    let Some(s) = secured(false, true) else {
        return;
    };
    let files = s.dir.path().join("files");
    let good = s.java_properties("good", PASSWORD);
    let reader = [
        ("security.protocol", "sasl_ssl"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", "app"),
        ("sasl.password", PASSWORD),
        ("broker.address.family", "v4"),
    ];
    let ca = s.pki.path("ca.pem");
    let mut reader = reader.to_vec();
    reader.push(("ssl.ca.location", &ca));
    let mut printed = whole_pipeline(&Connect::File(good), &s.stunnel.address(), &reader, &files);
    assert!(
        printed.contains("ignoring ssl.endpoint.identification.algorithm"),
        "a Java-only key is named once: {printed}"
    );

    // The wrong password: refused, told in one line, shown nowhere.
    let bad = Connect::File(s.java_properties("bad", WRONG_PASSWORD));
    let started = Instant::now();
    let out = producer(&bad, "t", 1, &[]);
    printed += &(text(&out.stdout) + &text(&out.stderr));
    let lines = text(&out.stderr);
    let refusal = lines
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(out.status.code(), Some(1), "{lines}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(refusal.contains("authentication refused"), "{lines}");
    let mut consumer_cmd = bin("consumer");
    bad.apply(&mut consumer_cmd);
    let out = consumer_cmd
        .arg("--files")
        .arg(&files)
        .args(["--topic", "t", "0"])
        .output()
        .unwrap();
    printed += &(text(&out.stdout) + &text(&out.stderr));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("authentication refused"));

    // Everything any run printed, the published files and the state tool.
    let inspect = bin("consumer")
        .args(["inspect-state", "--json", "--files"])
        .arg(&files)
        .output()
        .unwrap();
    printed += &(text(&inspect.stdout) + &text(&inspect.stderr));
    for p in 0..4 {
        printed += &std::fs::read_to_string(files.join(format!("partition-{p}.json"))).unwrap();
    }
    for secret in [PASSWORD, WRONG_PASSWORD] {
        let shown: Vec<&str> = printed.lines().filter(|l| l.contains(secret)).collect();
        assert!(shown.is_empty(), "a password showed: {shown:?}");
    }
}

#[test]
fn every_codec_is_produced_and_read_exactly() {
    // tansu 0.6's sqlite engine cannot serve snappy batches (it answers a
    // fetch of one by closing the connection: "UnexpectedType(Snappy)");
    // its in-memory engine serves all five.
    let broker = Broker::start_with(Storage::Memory);
    let dir = tempfile::tempdir().unwrap();
    let plain = Connect::Args(broker.bootstrap.clone(), Vec::new());
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = unique_topic(codec);
        let out = producer(&plain, &topic, 200, &["--compression", codec]);
        assert!(out.status.success(), "{codec}: {}", text(&out.stderr));
        let records = read_topic(
            &broker.bootstrap,
            &topic,
            4,
            reports_for(200, 5),
            Duration::from_secs(60),
        );
        let files = dir.path().join(codec);
        let mut all = consumer(&plain, &topic, &files, &["0", "1", "2", "3"]);
        wait_for_records(&files, &records, Duration::from_secs(60));
        assert_files_match(&files, &recompute(&records), 4);
        assert!(all.terminate().success(), "{codec}");
        assert!(
            !all.stderr_text().contains("error"),
            "{codec}: {}",
            all.stderr_text()
        );
        assert_eq!(
            group_offsets(&broker.bootstrap, &[], "weatherstream", &topic),
            published(&files),
            "{codec}: the group's offsets"
        );
    }
}

/// The consumer group every client of the consumer uses, where its offsets
/// land: `-X group.id` over the default, `--group-id` over `-X`.
#[test]
fn the_group_is_the_flag_over_the_property_over_the_default() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let x = Connect::Args(
        broker.bootstrap.clone(),
        vec![("group.id".into(), "from-x".into())],
    );
    for (extra, group) in [(None, "from-x"), (Some("from-flag"), "from-flag")] {
        let topic = unique_topic(group);
        let out = producer(&x, &topic, 100, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let records = read_topic(
            &broker.bootstrap,
            &topic,
            4,
            reports_for(100, 5),
            Duration::from_secs(60),
        );
        let files = dir.path().join(group);
        let mut args = vec!["0", "1", "2", "3"];
        if let Some(flag) = extra {
            args.splice(0..0, ["--group-id", flag]);
        }
        let mut consumer = consumer(&x, &topic, &files, &args);
        wait_for_records(&files, &records, Duration::from_secs(60));
        assert!(consumer.terminate().success());
        assert_eq!(
            group_offsets(&broker.bootstrap, &[], group, &topic),
            published(&files),
            "{group}"
        );
        for other in ["weatherstream", "from-x"]
            .into_iter()
            .filter(|g| *g != group)
        {
            assert!(
                group_offsets(&broker.bootstrap, &[], other, &topic).is_empty(),
                "{group}: offsets committed to {other} too"
            );
        }
    }
}

/// A topic written by another client (not our producer) with gzip and
/// zstd batches: the shape of what a Java producer with compression.type,
/// or a broker recompressing, hands the consumer.
#[test]
fn a_topic_compressed_by_another_client_is_read_exactly() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    for codec in ["gzip", "zstd"] {
        let topic = unique_topic(&format!("foreign-{codec}"));
        weatherstream::kafka::TopicAdmin::connect(
            &weatherstream::kafka::ClientSettings::plaintext(&broker.bootstrap),
        )
        .unwrap()
        .recreate_topic(&topic, 4, 1)
        .unwrap();
        let client: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .set("compression.type", codec)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "50")
            .create()
            .unwrap();
        let mut generator = weatherstream::generator::WeatherGenerator::new(Some(11));
        let mut sent = 0;
        for _ in 0..1500 {
            let obs = generator.next().unwrap();
            let value = weatherstream::report::encode(obs.date, obs.degrees);
            let key = weatherstream::report::key_for(obs.date);
            while client
                .send(BaseRecord::to(&topic).key(key).payload(&value))
                .is_err()
            {
                client.poll(Duration::from_millis(10));
            }
            sent += 1;
        }
        client.flush(Duration::from_secs(30)).unwrap();
        let records = read_topic(&broker.bootstrap, &topic, 4, sent, Duration::from_secs(60));
        let files = dir.path().join(codec);
        let plain = Connect::Args(broker.bootstrap.clone(), Vec::new());
        let mut all = consumer(&plain, &topic, &files, &["0", "1", "2", "3"]);
        wait_for_records(&files, &records, Duration::from_secs(60));
        assert_files_match(&files, &recompute(&records), 4);
        assert!(all.terminate().success());
    }
}

#[test]
fn protected_unknown_and_invalid_settings_are_usage_errors_before_anything_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("never-made");
    // No broker at all: a usage error comes before any connection.
    let cases: [(&str, &[&str], &str); 7] = [
        (
            "consumer",
            &["-X", "enable.auto.commit=true", "0"],
            "enable.auto.commit",
        ),
        (
            "consumer",
            &["-X", "auto.offset.reset=earliest", "0"],
            "auto.offset.reset",
        ),
        ("producer", &["-X", "acks=1"], "acks"),
        (
            "producer",
            &["-X", "enable.idempotence=false"],
            "enable.idempotence",
        ),
        (
            "producer",
            &["-X", "max.in.flight.requests.per.connection=20"],
            "max.in.flight",
        ),
        ("debug", &["-X", "no.such.setting=1"], "no.such.setting"),
        (
            "producer",
            &[
                "-X",
                "sasl.password=hunter2",
                "-X",
                "security.protocol=pigeon",
            ],
            "security.protocol",
        ),
    ];
    for (program, args, key) in cases {
        let mut cmd = bin(program);
        cmd.args(["--bootstrap-servers", "127.0.0.1:1"]);
        if program == "consumer" {
            cmd.arg("--files").arg(&files);
        }
        let out = cmd.args(args).output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program} {args:?}: {stderr}");
        assert!(stderr.contains(key), "{program} {args:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert!(
            !files.exists(),
            "{program} {args:?} touched the files folder"
        );
    }
    // The value weatherstream sets itself is no override (a Java file's acks=all).
    let file = dir.path().join("java.properties");
    std::fs::write(
        &file,
        "acks=all\nkey.serializer=org.apache.kafka.common.serialization.StringSerializer\n",
    )
    .unwrap();
    let out = bin("producer")
        .args(["--bootstrap-servers", "127.0.0.1:1", "--client-config"])
        .arg(&file)
        .args(["--days", "1"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a connection error now: {stderr}"
    );
    assert!(stderr.contains("ignoring key.serializer"), "{stderr}");
}
