//! Client configuration and topic administration shared by every command:
//! how a client is configured from the user's [`ClientSettings`], how a
//! start-up connection failure is told (refused credentials, a failed TLS
//! handshake, a listener of another protocol), how topics are listed (always by listing all
//! topics, because some brokers auto-create a topic that a metadata request
//! names), and how the producer deletes and re-creates its topic with polled
//! deadlines instead of fixed sleeps.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::time::{Duration, Instant};

use futures_executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer as _, ProducerContext};
use rdkafka::TopicPartitionList;
use thiserror::Error;

pub(crate) mod link;
pub(crate) mod preflight;
mod settings;
pub(crate) mod tail;

pub use settings::{ClientSettings, Resolved, SettingsError, SettingsSources};

/// Kafka partition number, as librdkafka numbers them.
pub type PartitionId = i32;
/// Kafka record offset; `next_offset` is the offset of the next record to read.
pub type Offset = i64;

/// Environment variable that supplies `--bootstrap-servers`.
pub const BOOTSTRAP_ENV: &str = "KAFKA_BOOTSTRAP_SERVERS";
/// Environment variable naming librdkafka debug contexts to enable.
pub(crate) const RDKAFKA_DEBUG_ENV: &str = "RDKAFKA_DEBUG";
/// Default broker address, as in the assignment.
pub(crate) const DEFAULT_BOOTSTRAP: &str = "localhost:9092";
/// Default consumer group: where the consumer commits its offsets for
/// Kafka's tools, and the group id of every partition client.
pub const DEFAULT_GROUP_ID: &str = "weatherstream";
/// Default topic.
pub(crate) const DEFAULT_TOPIC: &str = "temperatures";

/// How long a start-up may wait for the broker to answer at all.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of topic administration and broker reachability.
#[derive(Debug, Error)]
pub enum AdminError {
    /// `reason`: librdkafka's last report, or the request's own error.
    #[error("cannot reach a Kafka broker at {servers} within {}s: {reason}", timeout.as_secs())]
    Unreachable {
        servers: String,
        timeout: Duration,
        reason: String,
    },
    #[error("authentication refused by {servers}: {reason}")]
    AuthenticationRefused { servers: String, reason: String },
    #[error("TLS handshake with {servers} failed: {reason}")]
    TlsHandshake { servers: String, reason: String },
    /// `reason` starts with the security.protocol in use.
    #[error("{servers} closed the connection before answering: its listener may expect another security.protocol (TLS, or SASL) than {reason}")]
    ProtocolMismatch { servers: String, reason: String },
    #[error("Kafka client error")]
    Kafka(#[from] KafkaError),
    #[error("{action} topic {topic:?} failed: {code}")]
    TopicOperation {
        action: &'static str,
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {topic:?}: {what} did not happen within {}s", timeout.as_secs())]
    Timeout {
        topic: String,
        what: &'static str,
        timeout: Duration,
    },
}

/// How often `recreate_topic` tries before giving up.
const RECREATE_ATTEMPTS: u32 = 6;
/// Attempt N of a re-creation waits N times this first: a broker still
/// finishing a delete needs a moment more each time, up to 1 s in all.
const RECREATE_BACKOFF_STEP: Duration = Duration::from_millis(200);
/// How often a topic listing is polled while waiting for a create or delete
/// to become visible: admin operations take tens of milliseconds.
const TOPIC_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Deadline of a create or delete request, and of its becoming visible.
const ADMIN_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
const TOPIC_VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Create-topic errors that no retry can fix.
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// Setting a client's own default: a value the user's settings (already
/// laid over the config by [`client_config`]) did not give. Settings that
/// exactly-once depends on use `set`: the user cannot give them
/// (`client_settings::protected`).
pub(crate) trait SetDefault {
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self;
}

impl SetDefault for ClientConfig {
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

/// A client configuration from the user's settings over the defaults every
/// client of ours shares. Callers add their own defaults with
/// [`SetDefault::set_default`], so the user's settings win over those too.
pub fn client_config(settings: &ClientSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("client.id", "weatherstream")
        // A broker that is down must surface as an error, not a silent hang.
        .set("socket.connection.setup.timeout.ms", "5000");
    for (key, value) in settings.properties() {
        config.set(key, value);
    }
    config.set("bootstrap.servers", settings.bootstrap_servers());
    // librdkafka prints some clients' logs (the admin client's) straight to
    // stderr; when its log target is off, so is that.
    if !log::log_enabled!(target: "librdkafka", log::Level::Error) {
        config
            .set("log_level", "0")
            .set_log_level(RDKafkaLogLevel::Emerg);
    }
    // librdkafka's own debug contexts (e.g. "metadata,fetch"), for diagnosis.
    if let Ok(contexts) = std::env::var(RDKAFKA_DEBUG_ENV) {
        config.set("debug", contexts);
    }
    config
}

/// A consumer configuration for reading partitions by manual assignment
/// from offsets we keep ourselves (the partition workers, their verifiers,
/// `consumer verify`): no group membership, no committed offsets, no
/// automatic topic creation, and an offset outside the log reported as an
/// error instead of silently reset.
pub(crate) fn manual_assign_config(settings: &ClientSettings, group: &str) -> ClientConfig {
    let mut config = client_config(settings);
    config
        // Needed by librdkafka; assign() joins no group and commits nothing.
        // The caller's one resolved group (`--group-id` for the consumer).
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // An offset outside the log is a question for us (re-created
        // topic?), never something to jump over.
        .set("auto.offset.reset", "error")
        .set("allow.auto.create.topics", "false");
    config
}

/// A member of consumer group `group` (`consumer --group`): it only takes
/// part in the group's assignment, with cooperative-sticky rebalancing (a
/// member keeps its partitions while others join or leave); the
/// partitions' own clients read the records. It commits nothing by itself.
pub(crate) fn member_config(settings: &ClientSettings, group: &str) -> ClientConfig {
    let mut config = client_config(settings);
    config
        .set("group.id", group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Its assigned partitions are paused at once; what it fetched
        // before is dropped, so fetch little and from the end.
        .set("auto.offset.reset", "latest")
        .set_default("queued.max.messages.kbytes", "64")
        .set("allow.auto.create.topics", "false");
    config
}

/// Longest fetch wait of a client that reads records known to be there: a
/// partition's own client while it catches up or reads again, `consumer
/// verify`. Apache Kafka answers such a fetch at once, so there the wait
/// never applies (and the partition moves to the shared client when it
/// runs dry). This cap exists for tansu 0.6, which holds every fetch for
/// the whole wait, records or not: a longer wait would slow every read of
/// a backlog there (catch-up 22% slower at 15 ms than at 5 ms).
pub(crate) const BACKLOG_FETCH_WAIT_MS: u64 = 5;

/// [`manual_assign_config`] for reading a partition through at full speed
/// (the partition workers, `consumer verify`); `fetch_wait_ms` is the
/// longest the broker may hold a fetch that finds nothing new.
pub(crate) fn reading_config(
    settings: &ClientSettings,
    group: &str,
    fetch_wait_ms: u64,
) -> ClientConfig {
    let mut config = manual_assign_config(settings, group);
    config
        // See consumer::DEFAULT_FETCH_WAIT_MS: the idle poll period on
        // Apache Kafka, the delay every report sees on brokers that hold
        // empty fetches. `--fetch-wait-ms` owns it.
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        // The rest is right for any broker. librdkafka prefetches up to
        // 100,000 messages per partition by default, and fetches again
        // whenever fewer than this are queued; a response (fetch.max.bytes
        // below, ~14,000 reports) comes on top, so 3,000 keeps a worker fed
        // (catch-up as fast as with 10,000) with a third of the queue:
        // peak RSS of a 1M-report catch-up 55-60 MiB instead of 60-70.
        .set_default("queued.min.messages", "3000")
        .set_default("queued.max.messages.kbytes", "2048")
        // When the prefetch queue is over those limits librdkafka waits
        // this long before fetching again (default 1 s): a reader empties
        // its queue in milliseconds, so the default idled catch-up 2/3 of
        // the time.
        .set_default("fetch.queue.backoff.ms", "10")
        // librdkafka allocates a ~280-byte structure per message of a fetch
        // response at once, so a response's size is memory. Apache Kafka
        // honours max.partition.fetch.bytes (1 MiB); tansu ignores it and
        // answers with megabytes. This total caps a response for both, so
        // one client's queue stays a few MiB. A larger record batch still
        // comes whole (Kafka since 0.10.1). message.max.bytes must not
        // exceed it; a consumer does not otherwise use it.
        .set_default("fetch.max.bytes", "524288")
        .set_default("message.max.bytes", "524288");
    config
}

/// Points `consumer` at one partition of `topic`, from `offset`.
pub(crate) fn assign<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: PartitionId,
    offset: Offset,
) -> KafkaResult<()> {
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    consumer.assign(&list)
}

/// The high watermark librdkafka cached from its last fetch response for a
/// partition this consumer fetches. Sends no request: ListOffsets against a
/// topic that is being deleted can take down some brokers (tansu 0.6's
/// sqlite engine panics), and a cached value is all a lag line needs.
pub(crate) fn cached_high_watermark<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: PartitionId,
) -> Option<Offset> {
    let topic = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the topic
    // is a NUL-terminated string that outlives the call; low and high are
    // valid out-pointers. The function only reads librdkafka's cache.
    #[allow(unsafe_code)] // rdkafka has no safe wrapper for it.
    let code = unsafe {
        rdkafka_sys::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (code == rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Topic administration over one admin connection.
pub struct TopicAdmin {
    admin: AdminClient<DefaultClientContext>,
    servers: String,
}

/// What a start-up connection probe heard from librdkafka: the failure
/// that no retry fixes, or the last reason of one that may pass.
#[derive(Default)]
struct ConnectWatch {
    heard: std::sync::Mutex<ConnectProblems>,
}

#[derive(Default)]
struct ConnectProblems {
    fatal: Option<ConnectFailure>,
    last_reason: Option<String>,
}

enum ConnectFailure {
    Authentication(String),
    Tls(String),
    Mismatch(String),
}

impl ConnectFailure {
    /// The failures a start-up does not wait out, from librdkafka's error
    /// code and reason (its reasons name the cause: "SASL authentication
    /// error", "SSL handshake failed", "incorrect security.protocol").
    fn classify(error: &KafkaError, reason: &str) -> Option<Self> {
        let reason = reason.to_string();
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                Some(ConnectFailure::Authentication(reason))
            }
            // A TLS listener resets a plaintext client's first request
            // (ApiVersion); librdkafka's hint says the same.
            _ if reason.contains("PLAINTEXT broker listener")
                || reason.contains("incorrect security.protocol")
                || (reason.contains("Disconnected") && reason.contains("state APIVERSION_QUERY"))
                // ... and a plaintext listener never answers a TLS hello.
                || reason.contains("timed out in state SSL_HANDSHAKE") =>
            {
                Some(ConnectFailure::Mismatch(reason))
            }
            Some(RDKafkaErrorCode::SSL) => Some(ConnectFailure::Tls(reason)),
            // A TLS alert (a client certificate required or refused).
            _ if reason.contains("SSL handshake failed") || reason.contains("SSL routines") => {
                Some(ConnectFailure::Tls(reason))
            }
            _ if reason.contains("SASL authentication error")
                || reason.contains("Authentication failed") =>
            {
                Some(ConnectFailure::Authentication(reason))
            }
            _ => None,
        }
    }
}

impl ConnectWatch {
    fn heard(&self, error: &KafkaError, reason: &str) {
        let mut heard = self
            .heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if heard.fatal.is_none() {
            heard.fatal = ConnectFailure::classify(error, reason);
        }
        heard.last_reason = Some(reason.to_string());
    }
}

impl ClientContext for ConnectWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        // "all brokers down" says less than the failure that caused it.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            self.heard(&error, reason);
        }
    }

    /// librdkafka tells some connection failures (a connection reset in
    /// the middle of the first request) only as a `FAIL` log line.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if facility == "FAIL" {
            // Without librdkafka's "[thrd:...]: " prefix.
            let message = message.split_once("]: ").map_or(message, |(_, rest)| rest);
            self.heard(
                &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
                message,
            );
        }
        if log::log_enabled!(target: "librdkafka", log::Level::Debug) {
            log::debug!(target: "librdkafka", "librdkafka: {facility} {message} ({level:?})");
        }
    }
}

impl ProducerContext for ConnectWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// How long one metadata request of the start-up probe may take before the
/// probe looks at what librdkafka reported meanwhile.
const CONNECT_PROBE_STEP: Duration = Duration::from_millis(500);

/// Checks that the brokers in `settings` answer, within [`CONNECT_TIMEOUT`].
/// A failure no retry fixes (credentials refused, a TLS handshake that
/// failed, a listener of another protocol) ends the wait at once with
/// librdkafka's reason; anything else is `Unreachable` at the deadline.
/// The probe is a producer because a producer needs no group to be
/// polled, and polling is what delivers librdkafka's error reports.
pub fn check_connection(settings: &ClientSettings) -> Result<(), AdminError> {
    let servers = settings.bootstrap_servers().to_string();
    let probe: BaseProducer<ConnectWatch> = client_config(settings)
        // The FAIL lines are what the probe listens for (see its log()).
        .set("log_level", "6")
        .set_log_level(RDKafkaLogLevel::Info)
        .create_with_context(ConnectWatch::default())?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let attempt = probe.client().fetch_metadata(None, CONNECT_PROBE_STEP);
        probe.poll(Duration::ZERO);
        let mut heard = probe
            .context()
            .heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(failure) = heard.fatal.take() {
            return Err(match failure {
                ConnectFailure::Authentication(reason) => {
                    AdminError::AuthenticationRefused { servers, reason }
                }
                ConnectFailure::Tls(reason) => AdminError::TlsHandshake { servers, reason },
                ConnectFailure::Mismatch(reason) => AdminError::ProtocolMismatch {
                    servers,
                    reason: format!("{}: {reason}", settings.security_protocol()),
                },
            });
        }
        match attempt {
            Ok(_) => return Ok(()),
            Err(source) if Instant::now() >= deadline => {
                return Err(AdminError::Unreachable {
                    servers,
                    timeout: CONNECT_TIMEOUT,
                    reason: heard
                        .last_reason
                        .take()
                        .unwrap_or_else(|| source.to_string()),
                })
            }
            Err(_) => {}
        }
    }
}

impl TopicAdmin {
    /// Connects and checks that the broker answers within [`CONNECT_TIMEOUT`]
    /// ([`check_connection`]).
    pub fn connect(settings: &ClientSettings) -> Result<Self, AdminError> {
        check_connection(settings)?;
        let admin: AdminClient<DefaultClientContext> = client_config(settings).create()?;
        Ok(TopicAdmin {
            admin,
            servers: settings.bootstrap_servers().to_string(),
        })
    }

    /// The broker's metadata of every topic.
    fn metadata(&self) -> Result<rdkafka::metadata::Metadata, AdminError> {
        self.admin
            .inner()
            .fetch_metadata(None, CONNECT_TIMEOUT)
            .map_err(|source| AdminError::Unreachable {
                servers: self.servers.clone(),
                timeout: CONNECT_TIMEOUT,
                reason: source.to_string(),
            })
    }

    /// Every topic the broker lists, with its partition count.
    pub(crate) fn topics(&self) -> Result<BTreeMap<String, usize>, AdminError> {
        Ok(self
            .metadata()?
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| (t.name().to_string(), t.partitions().len()))
            .collect())
    }

    /// The replicas of `topic`'s first partition, or None when the broker
    /// does not list it.
    pub(crate) fn replica_count(&self, topic: &str) -> Result<Option<usize>, AdminError> {
        Ok(self
            .metadata()?
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .and_then(|t| t.partitions().first().map(|p| p.replicas().len())))
    }

    /// The partition count of `topic`, or None when the broker does not list it.
    pub fn partition_count(&self, topic: &str) -> Result<Option<usize>, AdminError> {
        Ok(self.topics()?.get(topic).copied())
    }

    /// Deletes `topic`; returns false when it did not exist.
    pub(crate) fn delete_topic(&self, topic: &str) -> Result<bool, AdminError> {
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_OPERATION_TIMEOUT));
        let results = block_on(self.admin.delete_topics(&[topic], &options))?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => return Ok(false),
                Err((_, code)) => {
                    return Err(AdminError::TopicOperation {
                        action: "deleting",
                        topic: topic.into(),
                        code,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Creates `topic`; returns false when it already existed.
    pub(crate) fn create_topic(
        &self,
        topic: &str,
        partitions: i32,
        replication_factor: i32,
    ) -> Result<bool, AdminError> {
        self.create_topic_with(topic, partitions, replication_factor, &[])
    }

    /// [`TopicAdmin::create_topic`] with topic configs (`cleanup.policy`...).
    pub(crate) fn create_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        replication_factor: i32,
        configs: &[(&str, &str)],
    ) -> Result<bool, AdminError> {
        // The request's own timeout too: a broker that never answers
        // CreateTopics (librdkafka's mock cluster) must not hold a start.
        let options = AdminOptions::new()
            .operation_timeout(Some(ADMIN_OPERATION_TIMEOUT))
            .request_timeout(Some(ADMIN_OPERATION_TIMEOUT + ADMIN_OPERATION_TIMEOUT));
        let mut new_topic = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(replication_factor),
        );
        for (key, value) in configs {
            new_topic = new_topic.set(key, value);
        }
        let results = block_on(self.admin.create_topics(&[new_topic], &options))?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(false),
                Err((_, code)) => {
                    return Err(AdminError::TopicOperation {
                        action: "creating",
                        topic: topic.into(),
                        code,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Polls the topic list until `done` holds for `topic`'s partition count.
    pub(crate) fn wait_for(
        &self,
        topic: &str,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(Option<usize>) -> bool,
    ) -> Result<(), AdminError> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self.partition_count(topic)?) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(AdminError::Timeout {
                    topic: topic.into(),
                    what,
                    timeout,
                });
            }
            std::thread::sleep(TOPIC_POLL_INTERVAL);
        }
    }

    /// Deletes `topic` if it exists, waits until the deletion is visible,
    /// creates it afresh and waits until it is listed with `partitions`.
    pub fn recreate_topic(
        &self,
        topic: &str,
        partitions: i32,
        replication_factor: i32,
    ) -> Result<(), AdminError> {
        let timeout = TOPIC_VISIBLE_TIMEOUT;
        let wanted = usize::try_from(partitions).unwrap_or(0);
        // A client that asks for the topic between our delete and create can
        // make an auto-creating broker create it with its defaults, and a
        // broker still finishing the delete may refuse the create: retry.
        let mut last_error = None;
        for attempt in 0..RECREATE_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(RECREATE_BACKOFF_STEP * attempt);
            }
            if self.delete_topic(topic)? {
                log::info!("deleted topic {topic:?}");
            } else {
                log::info!("topic {topic:?} did not exist");
            }
            self.wait_for(topic, "deletion", timeout, |count| count.is_none())?;
            match self.create_topic(topic, partitions, replication_factor) {
                Ok(true) => {
                    self.wait_for(topic, "creation", timeout, |count| count == Some(wanted))?;
                    log::info!(
                        "created topic {topic:?} with {partitions} partitions, replication factor {replication_factor}"
                    );
                    return Ok(());
                }
                Ok(false) => {
                    log::warn!(
                        "topic {topic:?} re-appeared before it could be created; deleting again"
                    )
                }
                Err(AdminError::TopicOperation { code, .. }) if is_permanent(code) => {
                    return Err(AdminError::TopicOperation {
                        action: "creating",
                        topic: topic.into(),
                        code,
                    })
                }
                Err(error) => {
                    log::warn!("creating topic {topic:?} failed ({error}); trying again");
                    last_error = Some(error);
                }
            }
        }
        if let Some(error) = last_error {
            return Err(error);
        }
        Err(AdminError::Timeout {
            topic: topic.into(),
            what: "re-creation",
            timeout,
        })
    }
}
