//! The Kafka client settings a user gives: `--bootstrap-servers`, a
//! `--client-config` file and `-X KEY=VALUE` properties, resolved into one
//! [`ClientSettings`] that every client of every command is built from
//! (`kafka::client_config`).
//!
//! It owns four rules:
//! - precedence: built-in defaults (and `KAFKA_BOOTSTRAP_SERVERS`) < the
//!   file < `-X` < explicit flags;
//! - the file may be a Java client's `client.properties` (Confluent Cloud's,
//!   or what Kafka's CLI tools take with `--command-config`): `sasl.jaas.config`
//!   becomes librdkafka's user and password, and Java-only keys are ignored
//!   with one line each;
//! - the settings exactly-once depends on cannot be overridden
//!   ([`protected`]), and every key and value is checked by librdkafka
//!   itself before anything is touched;
//! - secret values never show: not in an error, a log line or a `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use thiserror::Error;

/// librdkafka's name of the broker list.
const BOOTSTRAP_KEY: &str = "bootstrap.servers";

/// A setting the user gave that cannot be used; a usage error (exit 2).
#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("cannot read --client-config {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {line:?} is not KEY=VALUE")]
    Malformed { origin: String, line: String },
    #[error("{origin}: {key} cannot be set: {reason}")]
    Protected {
        origin: String,
        key: String,
        reason: &'static str,
    },
    #[error("{origin}: {key}: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}

/// Where a setting came from, for messages.
#[derive(Debug, Clone)]
enum Origin {
    File(PathBuf),
    Property,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "--client-config {}", path.display()),
            Origin::Property => f.write_str("-X"),
        }
    }
}

/// The resolved client settings; see the module comment.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSettings {
    bootstrap_servers: String,
    /// librdkafka properties from the file and `-X` (later sources won),
    /// checked, without the keys that flags own.
    properties: BTreeMap<String, String>,
}

impl ClientSettings {
    /// Plain settings: only the broker list (the tests, the embedded demo).
    pub fn plaintext(bootstrap_servers: impl Into<String>) -> Self {
        ClientSettings {
            bootstrap_servers: bootstrap_servers.into(),
            properties: BTreeMap::new(),
        }
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The user's librdkafka properties, to lay over a client's defaults.
    pub(crate) fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }

    /// The user's value of `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// Sets `key` from the flag that owns it (`--compression`): flags come
    /// last in the precedence.
    pub fn set_owned(&mut self, key: &str, value: impl Into<String>) {
        self.properties.insert(key.to_string(), value.into());
    }

    /// Takes `key` out of the properties: for a key whose flag decides
    /// (`--group-id`, `--compression`, `--fetch-wait-ms`), the caller
    /// resolves flag over property and sets the result itself.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.properties.remove(key)
    }

    /// The security protocol in effect, for messages.
    pub(crate) fn security_protocol(&self) -> &str {
        self.get("security.protocol").unwrap_or("plaintext")
    }
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(key, value)| {
                let value = if is_secret(key) { "[redacted]" } else { value };
                (key.as_str(), value)
            })
            .collect();
        f.debug_struct("ClientSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &shown)
            .finish()
    }
}

/// What the user gave, before resolution.
#[derive(Debug, Default, Clone)]
pub struct SettingsSources {
    /// `--bootstrap-servers`, when given on the command line.
    pub bootstrap_flag: Option<String>,
    /// `KAFKA_BOOTSTRAP_SERVERS`: a default, below the file and `-X`.
    pub bootstrap_env: Option<String>,
    pub client_config: Option<PathBuf>,
    /// `-X KEY=VALUE`, in command-line order.
    pub properties: Vec<String>,
}

/// The resolution of [`SettingsSources`]: the settings, or None for the
/// broker list when nothing named one (the demo then embeds a broker).
#[derive(Debug)]
pub struct Resolved {
    pub bootstrap_servers: Option<String>,
    pub properties: BTreeMap<String, String>,
    /// One line per Java-only key the file held, to log.
    pub ignored: Vec<String>,
}

impl Resolved {
    /// The settings with `default_bootstrap` where nothing named a broker.
    pub fn or_bootstrap(self, default_bootstrap: &str) -> ClientSettings {
        ClientSettings {
            bootstrap_servers: self
                .bootstrap_servers
                .unwrap_or_else(|| default_bootstrap.to_string()),
            properties: self.properties,
        }
    }

    /// The settings, if they name a broker at all (the demo embeds one
    /// where none is named).
    pub fn named_broker(self) -> Option<ClientSettings> {
        let bootstrap_servers = self.bootstrap_servers?;
        Some(ClientSettings {
            bootstrap_servers,
            properties: self.properties,
        })
    }

    /// Logs the Java-only keys that were ignored, one line each.
    pub fn log_ignored(&self) {
        for line in &self.ignored {
            log::warn!("{line}");
        }
    }
}

impl SettingsSources {
    /// Reads the file, merges `-X`, checks everything; see the module
    /// comment for the rules.
    pub fn resolve(&self) -> Result<Resolved, SettingsError> {
        let mut properties = BTreeMap::new();
        let mut ignored = Vec::new();
        if let Some(path) = &self.client_config {
            let text =
                std::fs::read_to_string(path).map_err(|source| SettingsError::Unreadable {
                    path: path.clone(),
                    source,
                })?;
            let origin = Origin::File(path.clone());
            for (key, value) in parse_properties(&text) {
                match translate_java(&key, &value, &origin)? {
                    Translated::Keep(pairs) => {
                        for (key, value) in pairs {
                            check(&key, &value, &origin)?;
                            properties.insert(key, value);
                        }
                    }
                    Translated::Ignore(why) => {
                        ignored.push(format!("{origin}: ignoring {key}: {why}"))
                    }
                }
            }
        }
        for item in &self.properties {
            let origin = Origin::Property;
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| SettingsError::Malformed {
                    origin: origin.to_string(),
                    line: redact_line(item),
                })?;
            let (key, value) = (key.trim().to_string(), value.trim().to_string());
            if key.is_empty() {
                return Err(SettingsError::Malformed {
                    origin: origin.to_string(),
                    line: redact_line(item),
                });
            }
            check(&key, &value, &origin)?;
            properties.insert(key, value);
        }
        let from_properties = properties.remove(BOOTSTRAP_KEY);
        let bootstrap_servers = self
            .bootstrap_flag
            .clone()
            .or(from_properties)
            .or_else(|| self.bootstrap_env.clone())
            .filter(|servers| !servers.trim().is_empty());
        Ok(Resolved {
            bootstrap_servers,
            properties,
            ignored,
        })
    }
}

/// Whether a key's value is a secret: never shown anywhere.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "token",
        "jaas",
        "passphrase",
    ]
    .iter()
    .any(|word| key.contains(word))
        || key == "sasl.oauthbearer.config"
}

/// A `-X` argument as it may be shown: a secret's value replaced.
fn redact_line(item: &str) -> String {
    match item.split_once('=') {
        Some((key, _)) if is_secret(key) => format!("{key}=[redacted]"),
        _ => item.to_string(),
    }
}

/// The settings exactly-once depends on, with why; a protected key is
/// accepted only with the value weatherstream sets itself (`acks=all` in a
/// Java `client.properties`), so that a file made for other clients works.
pub fn protected(key: &str) -> Option<(&'static str, &'static [&'static str])> {
    const CONSUMER: &str =
        "the consumer keeps its offsets in its own state and reads from exactly where it committed";
    const PRODUCER_ACKS: &str =
        "the producer waits for every in-sync replica so that no report is lost";
    const IDEMPOTENCE: &str =
        "the producer's retries must never duplicate or reorder a report within a month";
    const PARTITIONER: &str =
        "every report of a month must go to that month's partition (murmur2, as the Java client)";
    const TRANSACTIONS: &str = "the producer is idempotent, not transactional";
    let rule: (&'static str, &'static [&'static str]) = match key {
        "enable.auto.commit"
        | "auto.commit.enable"
        | "enable.auto.offset.store"
        | "auto.commit.interval.ms"
        | "offset.store.method"
        | "auto.offset.reset"
        | "enable.partition.eof"
        | "allow.auto.create.topics" => (CONSUMER, &[]),
        "acks" | "request.required.acks" => (PRODUCER_ACKS, &["all", "-1"]),
        "enable.idempotence" => (IDEMPOTENCE, &["true"]),
        "message.send.max.retries" | "retries" => (IDEMPOTENCE, &[]),
        "max.in.flight.requests.per.connection" | "max.in.flight" => (IDEMPOTENCE, &[]),
        "enable.gapless.guarantee" => (IDEMPOTENCE, &[]),
        "partitioner" | "partitioner.class" => (PARTITIONER, &[]),
        "transactional.id" => (TRANSACTIONS, &[]),
        _ => return None,
    };
    Some(rule)
}

/// Refuses a protected key and anything librdkafka would refuse, naming
/// the key (and never a secret's value).
fn check(key: &str, value: &str, origin: &Origin) -> Result<(), SettingsError> {
    if let Some((reason, allowed)) = protected(key) {
        if !allowed.contains(&value.to_ascii_lowercase().as_str()) {
            return Err(SettingsError::Protected {
                origin: origin.to_string(),
                key: key.to_string(),
                reason,
            });
        }
        return Ok(());
    }
    let mut probe = ClientConfig::new();
    probe.set(key, value);
    match probe.create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(_, description, _, _)) => {
            let mut reason = if description.is_empty() {
                "not a librdkafka setting (see librdkafka's CONFIGURATION.md)".to_string()
            } else {
                description
            };
            if is_secret(key) && !value.is_empty() {
                reason = reason.replace(value, "[redacted]");
            }
            Err(SettingsError::Invalid {
                origin: origin.to_string(),
                key: key.to_string(),
                reason,
            })
        }
        Err(other) => Err(SettingsError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            reason: other.to_string(),
        }),
    }
}

/// Java properties lines: `key=value`, `key: value` or `key value`, `#`
/// and `!` comments, and a trailing backslash continuing a line (a long
/// `sasl.jaas.config` is often split so).
fn parse_properties(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut logical = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if logical.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('!'))
        {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => logical.push_str(continued),
            None => {
                logical.push_str(line);
                pairs.push(split_pair(&std::mem::take(&mut logical)));
            }
        }
    }
    if !logical.is_empty() {
        pairs.push(split_pair(&logical));
    }
    pairs
}

/// A properties line split at its first `=`, `:` or white space (white
/// space around the separator allowed).
fn split_pair(logical: &str) -> (String, String) {
    let split = logical
        .find(|c: char| c == '=' || c == ':' || c.is_whitespace())
        .unwrap_or(logical.len());
    let (key, rest) = logical.split_at(split);
    let rest = rest.trim_start();
    let value = rest.strip_prefix(['=', ':']).unwrap_or(rest);
    (key.to_string(), value.trim().to_string())
}

/// What a file's key becomes in librdkafka's terms.
enum Translated {
    Keep(Vec<(String, String)>),
    Ignore(&'static str),
}

/// Java client keys with no librdkafka meaning, and why each is ignored.
fn java_only(key: &str) -> Option<&'static str> {
    const CLASSES: &str = "a Java class; librdkafka has no such hook";
    const KEYSTORE: &str = "a Java keystore setting; give PEM files with ssl.ca.location, ssl.certificate.location and ssl.key.location (or a PKCS#12 file with ssl.keystore.location)";
    let why = match key {
        "ssl.endpoint.identification.algorithm" => {
            "a Java client setting; librdkafka verifies the broker's hostname by default"
        }
        "key.serializer" | "value.serializer" | "key.deserializer" | "value.deserializer" => {
            "weatherstream encodes keys and values itself"
        }
        "ssl.truststore.location"
        | "ssl.truststore.password"
        | "ssl.truststore.type"
        | "ssl.truststore.certificates"
        | "ssl.keystore.type"
        | "ssl.keystore.key"
        | "ssl.keystore.certificate.chain"
        | "ssl.trustmanager.algorithm"
        | "ssl.keymanager.algorithm" => KEYSTORE,
        "ssl.protocol"
        | "ssl.enabled.protocols"
        | "ssl.provider"
        | "security.providers"
        | "ssl.secure.random.implementation" => {
            "a Java TLS setting; librdkafka negotiates with OpenSSL's defaults"
        }
        "buffer.memory"
        | "max.block.ms"
        | "max.request.size"
        | "default.api.timeout.ms"
        | "send.buffer.bytes"
        | "receive.buffer.bytes"
        | "auto.include.jmx.reporter"
        | "metrics.num.samples"
        | "metrics.recording.level"
        | "metrics.sample.window.ms" => "a Java client setting with no librdkafka equivalent",
        _ if key.ends_with(".class") || key.ends_with(".classes") => CLASSES,
        _ if key.starts_with("sasl.login.") => CLASSES,
        _ if key.starts_with("schema.registry.") || key.starts_with("basic.auth.") => {
            "a Schema Registry setting; weatherstream's values are protobuf without a registry"
        }
        _ => return None,
    };
    Some(why)
}

fn translate_java(key: &str, value: &str, origin: &Origin) -> Result<Translated, SettingsError> {
    match key {
        "sasl.jaas.config" => jaas(value, origin).map(Translated::Keep),
        "sasl.mechanism" => Ok(Translated::Keep(vec![(
            "sasl.mechanisms".into(),
            value.into(),
        )])),
        _ => match java_only(key) {
            Some(why) => Ok(Translated::Ignore(why)),
            None => Ok(Translated::Keep(vec![(key.into(), value.into())])),
        },
    }
}

/// `sasl.jaas.config`: `<LoginModule class> required key="value" ...;`.
fn jaas(value: &str, origin: &Origin) -> Result<Vec<(String, String)>, SettingsError> {
    let invalid = |reason: String| SettingsError::Invalid {
        origin: origin.to_string(),
        key: "sasl.jaas.config".into(),
        reason,
    };
    let text = value.trim().trim_end_matches(';').trim();
    let (module, rest) = text
        .split_once(char::is_whitespace)
        .ok_or_else(|| invalid("expected `<LoginModule> required key=\"value\" ...;`".into()))?;
    let options = jaas_options(rest)
        .ok_or_else(|| invalid("cannot read its key=\"value\" options".into()))?;
    let option = |name: &str| {
        options
            .get(name)
            .cloned()
            .ok_or_else(|| invalid(format!("{module} needs option {name}")))
    };
    let short = module.rsplit('.').next().unwrap_or(module);
    match short {
        "PlainLoginModule" | "ScramLoginModule" => Ok(vec![
            ("sasl.username".into(), option("username")?),
            ("sasl.password".into(), option("password")?),
        ]),
        "OAuthBearerLoginModule" => {
            let mut pairs = vec![("sasl.oauthbearer.method".to_string(), "oidc".to_string())];
            pairs.push(("sasl.oauthbearer.client.id".into(), option("clientId")?));
            pairs.push((
                "sasl.oauthbearer.client.secret".into(),
                option("clientSecret")?,
            ));
            if let Some(scope) = options.get("scope") {
                pairs.push(("sasl.oauthbearer.scope".into(), scope.clone()));
            }
            Ok(pairs)
        }
        "Krb5LoginModule" => Err(invalid(
            "Kerberos (GSSAPI) is not supported: this build of librdkafka has no GSSAPI".into(),
        )),
        "IAMLoginModule" => Err(invalid(
            "AWS MSK IAM is not supported: librdkafka has no native MSK IAM token flow; use SCRAM or mutual TLS".into(),
        )),
        other => Err(invalid(format!(
            "login module {other} is not supported (PlainLoginModule, ScramLoginModule and OAuthBearerLoginModule are)"
        ))),
    }
}

/// `required key="value" key2='value2' key3=value3`: the flag word first,
/// then options; quoted values may hold spaces.
fn jaas_options(text: &str) -> Option<BTreeMap<String, String>> {
    let mut options = BTreeMap::new();
    let mut rest = text.trim();
    // The control flag (required, requisite, sufficient, optional).
    if let Some((first, after)) = rest.split_once(char::is_whitespace) {
        if !first.contains('=') {
            rest = after.trim();
        }
    } else if !rest.contains('=') {
        return Some(options);
    }
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remaining) = match after.chars().next()? {
            quote @ ('"' | '\'') => {
                let end = after[1..].find(quote)? + 1;
                (&after[1..end], &after[end + 1..])
            }
            _ => match after.find(char::is_whitespace) {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            },
        };
        options.insert(name.trim().to_string(), value.to_string());
        rest = remaining.trim();
    }
    Some(options)
}

/// Reads the sources of a file path's settings for [`Path`]s in tests.
#[cfg(test)]
fn resolve_file(path: &std::path::Path, properties: &[&str]) -> Result<Resolved, SettingsError> {
    SettingsSources {
        client_config: Some(path.to_path_buf()),
        properties: properties.iter().map(|p| p.to_string()).collect(),
        ..SettingsSources::default()
    }
    .resolve()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn a_confluent_cloud_java_file_becomes_librdkafka_settings() {
        let file = write(
            "# Required connection configs for Kafka producer, consumer, and admin\n\
             bootstrap.servers=pkc-123.europe-west1.gcp.confluent.cloud:9092\n\
             security.protocol=SASL_SSL\n\
             sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username='KEY' password='s3cr3t pass';\n\
             sasl.mechanism=PLAIN\n\
             client.dns.lookup=use_all_dns_ips\n\
             session.timeout.ms=45000\n\
             acks=all\n\
             ssl.endpoint.identification.algorithm=https\n",
        );
        let resolved = resolve_file(file.path(), &[]).unwrap();
        assert_eq!(
            resolved.bootstrap_servers.as_deref(),
            Some("pkc-123.europe-west1.gcp.confluent.cloud:9092")
        );
        let p = &resolved.properties;
        assert_eq!(p["sasl.username"], "KEY");
        assert_eq!(p["sasl.password"], "s3cr3t pass");
        assert_eq!(p["sasl.mechanisms"], "PLAIN");
        assert_eq!(p["security.protocol"], "SASL_SSL");
        assert_eq!(p["acks"], "all", "the value we set ourselves is accepted");
        assert!(!p.contains_key("ssl.endpoint.identification.algorithm"));
        assert!(!p.contains_key("sasl.jaas.config"));
        assert_eq!(resolved.ignored.len(), 1);
        assert!(resolved.ignored[0].contains("ssl.endpoint.identification.algorithm"));
    }

    #[test]
    fn scram_jaas_with_double_quotes_split_over_lines() {
        let file = write(
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule \\\n  required username=\"app\" \\\n  password=\"pw=with;chars\";\n",
        );
        let p = resolve_file(file.path(), &[]).unwrap().properties;
        assert_eq!(p["sasl.username"], "app");
        assert_eq!(p["sasl.password"], "pw=with;chars");
    }

    #[test]
    fn unsupported_login_modules_say_why() {
        for (module, word) in [
            ("com.sun.security.auth.module.Krb5LoginModule", "GSSAPI"),
            ("software.amazon.msk.auth.iam.IAMLoginModule", "IAM"),
        ] {
            let file = write(&format!("sasl.jaas.config={module} required;\n"));
            let error = resolve_file(file.path(), &[]).unwrap_err().to_string();
            assert!(error.contains(word), "{error}");
        }
    }

    #[test]
    fn precedence_is_defaults_then_file_then_x_then_flags() {
        let file = write("bootstrap.servers=file:9092\nclient.id=from-file\nlinger.ms=7\n");
        let mut sources = SettingsSources {
            bootstrap_env: Some("env:9092".into()),
            client_config: Some(file.path().to_path_buf()),
            properties: vec!["client.id=from-x".into()],
            ..SettingsSources::default()
        };
        let resolved = sources.resolve().unwrap();
        assert_eq!(resolved.bootstrap_servers.as_deref(), Some("file:9092"));
        assert_eq!(resolved.properties["client.id"], "from-x");
        assert_eq!(resolved.properties["linger.ms"], "7");
        sources.properties.push("bootstrap.servers=x:9092".into());
        assert_eq!(
            sources.resolve().unwrap().bootstrap_servers.as_deref(),
            Some("x:9092")
        );
        sources.bootstrap_flag = Some("flag:9092".into());
        assert_eq!(
            sources.resolve().unwrap().bootstrap_servers.as_deref(),
            Some("flag:9092")
        );
        let env_only = SettingsSources {
            bootstrap_env: Some("env:9092".into()),
            ..SettingsSources::default()
        };
        assert_eq!(
            env_only.resolve().unwrap().bootstrap_servers.as_deref(),
            Some("env:9092")
        );
    }

    #[test]
    fn protected_unknown_and_invalid_keys_are_refused_by_name() {
        let x = |item: &str| {
            SettingsSources {
                properties: vec![item.to_string()],
                ..SettingsSources::default()
            }
            .resolve()
        };
        for key in [
            "enable.auto.commit=true",
            "auto.offset.reset=earliest",
            "acks=1",
            "enable.idempotence=false",
            "max.in.flight.requests.per.connection=5",
            "retries=0",
        ] {
            let error = x(key).unwrap_err();
            assert!(matches!(error, SettingsError::Protected { .. }), "{key}");
            assert!(error.to_string().contains(key.split('=').next().unwrap()));
        }
        assert!(x("acks=all").is_ok());
        let unknown = x("no.such.setting=1").unwrap_err().to_string();
        assert!(unknown.contains("no.such.setting"), "{unknown}");
        let invalid = x("security.protocol=carrier-pigeon")
            .unwrap_err()
            .to_string();
        assert!(invalid.contains("security.protocol"), "{invalid}");
        assert!(x("linger.ms").is_err(), "no =");
    }

    #[test]
    fn secrets_never_show() {
        let settings = ClientSettings {
            bootstrap_servers: "b:9092".into(),
            properties: BTreeMap::from([
                ("sasl.password".to_string(), "hunter2".to_string()),
                ("ssl.key.password".to_string(), "hunter3".to_string()),
                ("sasl.username".to_string(), "alice".to_string()),
            ]),
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("alice"));
        assert_eq!(
            redact_line("sasl.password=hunter2"),
            "sasl.password=[redacted]"
        );
        let file = write("sasl.password hunter2\nssl.key.password : hunter3\n");
        let p = resolve_file(file.path(), &[]).unwrap().properties;
        assert_eq!(
            p["sasl.password"], "hunter2",
            "Java's white-space separator"
        );
        assert_eq!(p["ssl.key.password"], "hunter3");
        let error = resolve_file(
            write("sasl.password=x\nno.such.secret.setting=hunter4\n").path(),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("hunter4"), "{error}");
    }
}
