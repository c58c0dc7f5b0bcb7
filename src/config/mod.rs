//! Configuration: one TOML file, `WAGATE_…` environment overrides, secrets only
//! by reference (an environment variable or a file named in the config).
//!
//! Flow: file text → [`RawConfig`] (serde, `deny_unknown_fields`, so a typo is
//! an error naming the key and line) → environment overrides applied leaf by
//! leaf → [`Config`] (validated, typed: `Duration`, `SocketAddr`, secrets
//! resolved). Every error names the key (or variable) and what is wrong, and
//! happens before any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kafka::TopicId;

/// A configuration problem, always naming the key or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

mod env;
mod kafka_security;
mod media;
mod raw;
mod secret;
#[cfg(test)]
mod tests;
mod validate;

pub use env::{apply_env, env_name_for};
pub use media::{parse_store, MediaConfig, MediaStore, RawMedia, DEFAULT_MEDIA_DIR};
pub use raw::*;
pub use secret::Secret;
use secret::{required_secret, secret};
use validate::validate;

/// One Meta app: its signing secret(s) and its handshake token.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    /// One or two secrets (current first); a body signed by either verifies.
    pub secrets: Vec<Secret>,
    pub verify_token: Secret,
    /// Meta's id of the app (`apps.NAME.app_id`), if configured.
    pub app_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub name: String,
    pub token: Secret,
    /// `None` = every number.
    pub numbers: Option<Vec<String>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub internal_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    pub shutdown_grace: Duration,
    /// 0: no per-peer cap.
    pub max_connections_per_peer: usize,
    pub h2_max_concurrent_streams: u32,
    pub min_body_bytes_per_sec: u64,
    /// `[server.tls]`: the public listener speaks HTTPS (None: plain HTTP).
    pub tls: Option<crate::tls::TlsFiles>,
    /// `[internal_tls]`: the internal listener speaks HTTPS.
    pub internal_tls: Option<crate::tls::TlsFiles>,
    pub kafka: KafkaConfig,
    pub ingress: IngressConfig,
    pub egress: EgressConfig,
    pub graph: GraphConfig,
    pub contacts: ContactsConfig,
    pub log: LogConfig,
    pub numbers: NumbersConfig,
    /// `server.public_url` without a trailing `/`, if set.
    pub public_url: Option<String>,
    pub templates: TemplatesConfig,
    pub apps: Vec<AppConfig>,
    pub tenants: Vec<TenantConfig>,
    pub media: MediaConfig,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Brokers, client id, TLS / SASL and the `[kafka.librdkafka]`
    /// passthrough: every client of the process is made from it.
    pub connection: crate::kafka::Connection,
    pub topic_prefix: String,
    pub linger_ms: u64,
    pub queue_max_messages: u64,
    pub message_timeout: Duration,
    pub compression: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub client_id: String,
    /// librdkafka's `message.max.bytes` and the `max.message.bytes` that
    /// `topics create` sets: `server.max_body_bytes` + 64 KiB, so that every
    /// body under the limit (and every record made of it) can be stored.
    pub message_max_bytes: usize,
    /// Ask the brokers at start whether the inbound topics take records of
    /// `message_max_bytes` and whether every compacted topic is compacted
    /// (off for `--dev`: the mock cluster cannot say).
    pub check_record_limit: bool,
    /// What `topics create` sets per topic, in [`TopicId::ALL`] order.
    pub topics: [TopicSettings; TopicId::COUNT],
}

impl KafkaConfig {
    /// The settings of one topic (`[kafka.topics.NAME]` over the defaults).
    pub fn topic(&self, t: TopicId) -> &TopicSettings {
        &self.topics[t as usize]
    }
}

/// One topic as `topics create` makes it and `topics check` expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    pub partitions: i32,
    pub replication_factor: i32,
    /// `retention.ms` of a delete topic (-1: forever); -1 for compacted ones.
    pub retention_ms: i64,
    /// `min.insync.replicas`, or the broker's default.
    pub min_insync_replicas: Option<i32>,
}

/// The config key of a topic's table: `inbound.messages` → `inbound_messages`.
pub fn topic_key(t: TopicId) -> String {
    t.name().replace('.', "_")
}

/// What a record may add to the largest body: headers, key, envelope.
pub const RECORD_OVERHEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub ack_timeout: Duration,
    pub retry_after_secs: u64,
    pub raw_enabled: bool,
    pub dedupe_window: Duration,
    pub dedupe_max_entries: usize,
    /// Ids shared through `inbound.ids` (DESIGN §12).
    pub dedupe_shared: bool,
    pub dedupe_propagation: Duration,
    pub max_in_flight: usize,
    /// The ingress producer's batching window when busy (its own producer
    /// when it differs from `kafka.linger_ms`).
    pub linger_ms: u64,
    /// The window while fewer than `busy_in_flight` POSTs are in flight.
    pub quiet_linger_ms: u64,
    /// POSTs in flight from which ingress batches with `linger_ms` (0: always).
    pub busy_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub limits: crate::meta::webhook::Limits,
}

#[derive(Debug, Clone)]
pub struct EgressConfig {
    pub enabled: bool,
    pub default_throughput: u32,
    pub group_id: String,
    pub instance_id: Option<String>,
    pub max_buffered: usize,
    pub lane_max_in_flight: usize,
    pub send_timeout: Duration,
    pub max_attempts: u32,
    pub circuit_hold_max: Duration,
    pub history_window: Duration,
    pub marketing_requires_opt_in: bool,
    /// `None`: strict (completion-bounded) throughput windows.
    pub arrival_margin: Option<Duration>,
    pub numbers: BTreeMap<String, NumberConfig>,
    pub portfolios: Vec<PortfolioConfig>,
}

/// A business portfolio's messaging tier.
#[derive(Debug, Clone)]
pub struct PortfolioConfig {
    pub name: String,
    pub limit: usize,
    pub numbers: Vec<String>,
}

/// Per-number egress settings.
#[derive(Debug, Clone, Default)]
pub struct NumberConfig {
    pub throughput: Option<u32>,
    pub access_token: Option<Secret>,
    pub waba_id: Option<String>,
}

/// `[numbers]`, validated.
#[derive(Debug, Clone)]
pub struct NumbersConfig {
    /// `None`: the Graph API is not polled.
    pub refresh: Option<Duration>,
    pub high_throughput: u32,
}

#[derive(Debug, Clone)]
pub struct TemplatesConfig {
    /// `templates.refresh_secs`.
    pub refresh: Duration,
}

#[derive(Debug, Clone)]
pub struct GraphConfig {
    pub base_url: String,
    pub access_token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct ContactsConfig {
    pub opt_out_keywords: Vec<String>,
    pub opt_in_keywords: Vec<String>,
    pub opt_out_payloads: Vec<String>,
    pub opt_in_payloads: Vec<String>,
}

impl ContactsConfig {
    /// The detector ingress uses.
    pub fn keywords(&self) -> crate::contacts::keywords::Keywords {
        fn words(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        crate::contacts::keywords::Keywords::new(
            &words(&self.opt_out_keywords),
            &words(&self.opt_in_keywords),
        )
        .with_payloads(&self.opt_out_payloads, &self.opt_in_payloads)
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub json: bool,
    pub level: String,
}

/// Where secrets and overrides come from: the process environment in
/// production, a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Options that change how a config is loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// `--dev`: missing secrets fall back to the documented development values.
    pub dev: bool,
}

/// Development secrets used by `--dev` when the variables are unset. They are
/// documented in the README; `--dev` must never face the internet.
pub const DEV_APP_SECRET: &str = "wagate-dev-secret";
pub const DEV_VERIFY_TOKEN: &str = "wagate-dev-verify";
pub const DEV_API_TOKEN: &str = "wagate-dev-token";
pub const DEV_ACCESS_TOKEN: &str = "wagate-dev-access";

/// The embedded default config: `config/example.toml`.
pub const EXAMPLE_TOML: &str = include_str!("../../config/example.toml");

/// Loads, overrides and validates a config. `path = None` uses the embedded
/// `config/example.toml`.
pub fn load(path: Option<&Path>, env: &dyn Env, opts: LoadOptions) -> Result<Config, ConfigError> {
    let (text, name) = match path {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            p.display().to_string(),
        ),
        None => (
            EXAMPLE_TOML.to_string(),
            "config/example.toml (embedded)".to_string(),
        ),
    };
    load_str(&text, &name, env, opts)
}

/// As [`load`], from text.
pub fn load_str(
    text: &str,
    name: &str,
    env: &dyn Env,
    opts: LoadOptions,
) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: name.to_string(),
        message: e.to_string().trim().replace('\n', " "),
    })?;
    let raw = apply_env(raw, env)?;
    validate(raw, env, opts)
}

impl Config {
    /// The app with this name, if configured.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }
}
