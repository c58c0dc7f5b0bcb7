//! The file's shape: serde structs with `deny_unknown_fields` and the
//! defaults of every key.

use super::*;

/// The config file as written. Every section has defaults, so an empty file is
/// a valid (if secret-less) config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Public listener for Meta (`WAGATE_LISTEN`).
    pub listen: String,
    /// Internal listener for metrics, health and the API (`WAGATE_INTERNAL_LISTEN`).
    pub internal_listen: String,
    pub server: RawServer,
    /// TLS of the internal listener (none: plain HTTP).
    pub internal_tls: RawInternalTls,
    pub kafka: RawKafka,
    pub ingress: RawIngress,
    pub egress: RawEgress,
    pub graph: RawGraph,
    pub contacts: RawContacts,
    pub log: RawLog,
    /// What wagate learns about each business number (`wa.numbers`).
    pub numbers: RawNumbers,
    /// The template registry (DESIGN §14).
    pub templates: RawTemplates,
    /// Meta apps by name; the bare `/webhook` route uses `default`.
    pub apps: BTreeMap<String, RawApp>,
    /// API tenants by name.
    pub tenants: BTreeMap<String, RawTenant>,
    pub media: RawMedia,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub max_body_bytes: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub max_connections: u64,
    pub shutdown_timeout_ms: u64,
    /// After SIGTERM: how long `/readyz` answers 503 while the listeners
    /// still serve, so a load balancer stops routing here first.
    pub shutdown_grace_ms: u64,
    /// Open connections one peer address may hold (0: no per-peer cap; set
    /// it when the listener faces the internet without a load balancer).
    pub max_connections_per_peer: u64,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u64,
    /// After a one-second grace, a body must arrive at least this fast.
    pub min_body_bytes_per_sec: u64,
    /// TLS of the public listener (none: plain HTTP).
    pub tls: RawServerTls,
    /// The URL Meta calls (e.g. `https://wa.example.com`), for `wagate doctor`.
    pub public_url: String,
}

/// `[server.tls]`: both files set → the public listener speaks HTTPS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServerTls {
    /// PEM certificate chain, leaf first; re-read when it changes.
    pub cert_file: String,
    /// PEM private key of the leaf; re-read when it changes.
    pub key_file: String,
}

/// `[internal_tls]`: as `[server.tls]`, and client certificates signed by
/// `client_ca_file` may be required.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawInternalTls {
    pub cert_file: String,
    pub key_file: String,
    /// PEM CA certificates; set → every client must present a certificate
    /// they signed.
    pub client_ca_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKafka {
    pub brokers: String,
    pub topic_prefix: String,
    pub linger_ms: u64,
    pub queue_max_messages: u64,
    pub message_timeout_ms: u64,
    pub compression: String,
    pub partitions: u64,
    pub replication_factor: u64,
    pub client_id: String,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// PEM CA bundle that signed the brokers' certificates (empty: the
    /// system's CA store).
    pub ssl_ca_file: String,
    /// PEM client certificate and key for mutual TLS.
    pub ssl_certificate_file: String,
    pub ssl_key_file: String,
    pub ssl_key_password_env: String,
    pub ssl_key_password_file: String,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER`.
    pub sasl_mechanism: String,
    pub sasl_username_env: String,
    pub sasl_username_file: String,
    pub sasl_password_env: String,
    pub sasl_password_file: String,
    /// OAUTHBEARER with OIDC client credentials (librdkafka fetches and
    /// refreshes the token).
    pub sasl_oauthbearer_token_endpoint_url: String,
    pub sasl_oauthbearer_client_id: String,
    pub sasl_oauthbearer_client_secret_env: String,
    pub sasl_oauthbearer_client_secret_file: String,
    pub sasl_oauthbearer_scope: String,
    /// `[kafka.librdkafka]`: any other librdkafka property, passed to every
    /// client (not overridable from the environment leaf by leaf).
    pub librdkafka: BTreeMap<String, String>,
    /// `[kafka.topics.NAME]`, NAME the short name with `_` for `.`
    /// (`inbound_messages`): what `topics create` sets for that topic.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub topics: BTreeMap<String, RawTopic>,
}

/// One topic's settings for `topics create`; an unset key keeps the default
/// (`kafka.partitions`, `kafka.replication_factor`, the retention of DESIGN §4,
/// the broker's `min.insync.replicas`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTopic {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u64>,
    /// `retention.ms` of a delete topic; -1 keeps records forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_insync_replicas: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIngress {
    pub ack_timeout_ms: u64,
    pub retry_after_secs: u64,
    pub raw_enabled: bool,
    pub dedupe_window_secs: u64,
    pub dedupe_max_entries: u64,
    /// Share stored event ids with the other instances through Kafka
    /// (`inbound.ids`), so guarantee 2 holds across the fleet and restarts.
    pub dedupe_shared: bool,
    /// The documented bound on how long an id takes to reach the other
    /// instances; sets how often they fetch (DESIGN §12).
    pub dedupe_propagation_ms: u64,
    pub max_in_flight: u64,
    pub linger_ms: u64,
    /// The batching window while fewer than `busy_in_flight` POSTs are in
    /// flight (a second, low-latency producer).
    pub quiet_linger_ms: u64,
    /// POSTs in flight from which ingress batches with `linger_ms`; 0: always.
    pub busy_in_flight: u64,
    /// Signed bodies' bytes being processed at once; beyond: 503.
    pub max_in_flight_bytes: u64,
    /// Deepest JSON nesting of a body that is exploded (deeper: kept raw).
    pub max_json_depth: u64,
    /// Most events one POST is exploded into (more: kept raw).
    pub max_events_per_post: u64,
    /// A POST's records may total this many bytes per body byte, plus 1 MiB.
    pub max_record_bytes_factor: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEgress {
    pub enabled: bool,
    pub default_throughput: u64,
    pub group_id: String,
    /// Static group membership (`group.instance.id`): a restarted instance
    /// takes its partitions back at once. Empty: dynamic membership.
    pub instance_id: String,
    pub max_buffered: u64,
    pub lane_max_in_flight: u64,
    pub send_timeout_ms: u64,
    pub max_attempts: u64,
    pub circuit_hold_max_ms: u64,
    pub history_window_secs: u64,
    pub marketing_requires_opt_in: bool,
    pub arrival_margin_ms: u64,
    /// Per business number: throughput override, own access token.
    pub numbers: BTreeMap<String, RawNumber>,
    /// Business portfolios and their messaging tier.
    pub portfolios: BTreeMap<String, RawPortfolio>,
}

/// A business portfolio: numbers sharing one messaging tier.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPortfolio {
    /// Distinct users per moving 24 h reached by business-initiated
    /// messages outside their window (Meta's tier: 250, 2000, 10000, 100000).
    pub limit: u64,
    /// The portfolio's phone_number_ids.
    pub numbers: Vec<String>,
}

/// Opt-out / opt-in detection in inbound messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawContacts {
    /// Whole-message keywords (case, accents and surrounding punctuation
    /// ignored) that opt a user out.
    pub opt_out_keywords: Vec<String>,
    /// Whole-message keywords that opt a user back in.
    pub opt_in_keywords: Vec<String>,
    /// Quick-reply / interactive reply payloads (exact) that opt out.
    pub opt_out_payloads: Vec<String>,
    /// Quick-reply / interactive reply payloads (exact) that opt in.
    pub opt_in_payloads: Vec<String>,
}

impl Default for RawContacts {
    fn default() -> Self {
        use crate::contacts::keywords::{DEFAULT_OPT_IN, DEFAULT_OPT_OUT};
        RawContacts {
            opt_out_keywords: DEFAULT_OPT_OUT.iter().map(|s| s.to_string()).collect(),
            opt_in_keywords: DEFAULT_OPT_IN.iter().map(|s| s.to_string()).collect(),
            opt_out_payloads: Vec::new(),
            opt_in_payloads: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNumber {
    /// Messages/s for this number (0: egress.default_throughput).
    pub throughput: u64,
    pub access_token_env: String,
    pub access_token_file: String,
    /// The number's WhatsApp Business Account id.
    pub waba_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGraph {
    pub base_url: String,
    pub access_token_env: String,
    pub access_token_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `wagate=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApp {
    pub secret_env: String,
    pub secret_file: String,
    /// The previous secret during a rotation (both verify).
    pub previous_secret_env: String,
    pub previous_secret_file: String,
    pub verify_token_env: String,
    pub verify_token_file: String,
    /// The app's id (for `wagate doctor`: `subscribed_apps`, `debug_token`).
    pub app_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTenant {
    pub token_env: String,
    pub token_file: String,
    /// phone_number_ids this tenant may use; `["*"]` means all.
    pub numbers: Vec<String>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: "0.0.0.0:8080".into(),
            internal_listen: "127.0.0.1:9090".into(),
            server: RawServer::default(),
            internal_tls: RawInternalTls::default(),
            kafka: RawKafka::default(),
            ingress: RawIngress::default(),
            egress: RawEgress::default(),
            graph: RawGraph::default(),
            contacts: RawContacts::default(),
            log: RawLog::default(),
            numbers: RawNumbers::default(),
            templates: RawTemplates::default(),
            apps: BTreeMap::new(),
            tenants: BTreeMap::new(),
            media: RawMedia::default(),
        }
    }
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            max_body_bytes: 3 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 15_000,
            max_connections: 10_000,
            shutdown_timeout_ms: 30_000,
            shutdown_grace_ms: 0,
            max_connections_per_peer: 0,
            h2_max_concurrent_streams: 32,
            min_body_bytes_per_sec: 4096,
            tls: RawServerTls::default(),
            public_url: String::new(),
        }
    }
}

impl Default for RawKafka {
    fn default() -> Self {
        RawKafka {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "wa.".into(),
            linger_ms: 5,
            queue_max_messages: 200_000,
            message_timeout_ms: 60_000,
            compression: "lz4".into(),
            partitions: 6,
            replication_factor: 1,
            client_id: "wagate".into(),
            topics: BTreeMap::new(),
            security_protocol: "plaintext".into(),
            ssl_ca_file: String::new(),
            ssl_certificate_file: String::new(),
            ssl_key_file: String::new(),
            ssl_key_password_env: "WAGATE_KAFKA_SSL_KEY_PASSWORD".into(),
            ssl_key_password_file: String::new(),
            sasl_mechanism: String::new(),
            sasl_username_env: "WAGATE_KAFKA_SASL_USERNAME".into(),
            sasl_username_file: String::new(),
            sasl_password_env: "WAGATE_KAFKA_SASL_PASSWORD".into(),
            sasl_password_file: String::new(),
            sasl_oauthbearer_token_endpoint_url: String::new(),
            sasl_oauthbearer_client_id: String::new(),
            sasl_oauthbearer_client_secret_env: "WAGATE_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"
                .into(),
            sasl_oauthbearer_client_secret_file: String::new(),
            sasl_oauthbearer_scope: String::new(),
            librdkafka: BTreeMap::new(),
        }
    }
}

impl Default for RawIngress {
    fn default() -> Self {
        RawIngress {
            ack_timeout_ms: 5_000,
            retry_after_secs: 5,
            raw_enabled: true,
            dedupe_window_secs: 24 * 3600,
            dedupe_max_entries: 10_000_000,
            dedupe_shared: true,
            dedupe_propagation_ms: 250,
            max_in_flight: 4_096,
            linger_ms: 20,
            quiet_linger_ms: 1,
            busy_in_flight: 256,
            max_in_flight_bytes: 256 * 1024 * 1024,
            max_json_depth: crate::meta::webhook::Limits::DEFAULT.max_depth as u64,
            max_events_per_post: crate::meta::webhook::Limits::DEFAULT.max_events as u64,
            max_record_bytes_factor: crate::meta::webhook::Limits::DEFAULT.record_bytes_factor
                as u64,
        }
    }
}

impl Default for RawEgress {
    fn default() -> Self {
        RawEgress {
            enabled: true,
            default_throughput: 80,
            group_id: "wagate-egress".into(),
            instance_id: String::new(),
            max_buffered: 10_000,
            lane_max_in_flight: 16,
            send_timeout_ms: 15_000,
            max_attempts: 5,
            circuit_hold_max_ms: 600_000,
            history_window_secs: 86_400,
            marketing_requires_opt_in: true,
            arrival_margin_ms: 0,
            numbers: BTreeMap::new(),
            portfolios: BTreeMap::new(),
        }
    }
}

impl Default for RawGraph {
    fn default() -> Self {
        RawGraph {
            base_url: "https://graph.facebook.com/v23.0".into(),
            access_token_env: "WAGATE_ACCESS_TOKEN".into(),
            access_token_file: String::new(),
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// `[numbers]`: number state learnt from the Graph API and webhooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNumbers {
    /// Read each number's fields from the Graph API at start and this often (0: never).
    pub refresh_secs: u64,
    /// Messages/s of a number at Meta's `HIGH` throughput level (at
    /// `STANDARD`: `egress.default_throughput`).
    pub high_throughput: u64,
}

impl Default for RawNumbers {
    fn default() -> Self {
        RawNumbers {
            refresh_secs: 900,
            high_throughput: 1000,
        }
    }
}

/// `[templates]`: the template registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTemplates {
    /// Every WABA's templates are listed from the Graph API this often.
    pub refresh_secs: u64,
}

impl Default for RawTemplates {
    fn default() -> Self {
        RawTemplates { refresh_secs: 300 }
    }
}
