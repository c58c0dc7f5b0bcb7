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
    pub kafka: RawKafka,
    pub ingress: RawIngress,
    pub egress: RawEgress,
    pub graph: RawGraph,
    pub contacts: RawContacts,
    pub log: RawLog,
    /// Meta apps by name; the bare `/webhook` route uses `default`.
    pub apps: BTreeMap<String, RawApp>,
    /// API tenants by name.
    pub tenants: BTreeMap<String, RawTenant>,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIngress {
    pub ack_timeout_ms: u64,
    pub retry_after_secs: u64,
    pub raw_enabled: bool,
    pub dedupe_window_secs: u64,
    pub dedupe_max_entries: u64,
    pub max_in_flight: u64,
    pub linger_ms: u64,
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
            kafka: RawKafka::default(),
            ingress: RawIngress::default(),
            egress: RawEgress::default(),
            graph: RawGraph::default(),
            contacts: RawContacts::default(),
            log: RawLog::default(),
            apps: BTreeMap::new(),
            tenants: BTreeMap::new(),
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
            dedupe_max_entries: 2_000_000,
            max_in_flight: 4_096,
            linger_ms: 20,
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

/// Environment variables of the contract (DESIGN §7) whose names do not follow
/// the generic `WAGATE_{SECTION}_{KEY}` rule.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("WAGATE_TOPIC_PREFIX", "kafka.topic_prefix"),
    ("WAGATE_DEFAULT_THROUGHPUT", "egress.default_throughput"),
];

/// The env variable that overrides the leaf at `path` (`kafka.brokers` →
/// `WAGATE_KAFKA_BROKERS`, `listen` → `WAGATE_LISTEN`).
pub fn env_name_for(path: &str) -> String {
    format!("WAGATE_{}", path.replace('.', "_").to_ascii_uppercase())
}

/// A secret, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One Meta app: its signing secret(s) and its handshake token.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    /// One or two secrets (current first); a body signed by either verifies.
    pub secrets: Vec<Secret>,
    pub verify_token: Secret,
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
    pub kafka: KafkaConfig,
    pub ingress: IngressConfig,
    pub egress: EgressConfig,
    pub graph: GraphConfig,
    pub contacts: ContactsConfig,
    pub log: LogConfig,
    pub apps: Vec<AppConfig>,
    pub tenants: Vec<TenantConfig>,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
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
    /// `message_max_bytes` (off for `--dev`: the mock cluster cannot say).
    pub check_record_limit: bool,
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
    pub max_in_flight: usize,
    /// The ingress producer's batching window (its own producer when it
    /// differs from `kafka.linger_ms`).
    pub linger_ms: u64,
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

/// Checks the opt-out / opt-in lists: no empty entry, keywords short enough
/// to be a whole message, nothing in both lists.
fn contacts_config(c: &RawContacts) -> Result<ContactsConfig, ConfigError> {
    use crate::contacts::keywords::normalize;
    let keywords = |key: &str, v: &[String]| -> Result<Vec<String>, ConfigError> {
        for k in v {
            let n = normalize(k);
            if n.is_empty() || k.len() > 64 {
                return Err(invalid(
                    key,
                    format!("{k:?}: a keyword has a letter or digit and at most 64 bytes"),
                ));
            }
        }
        Ok(v.to_vec())
    };
    let payloads = |key: &str, v: &[String]| -> Result<Vec<String>, ConfigError> {
        if let Some(p) = v.iter().find(|p| p.is_empty() || p.len() > 256) {
            return Err(invalid(key, format!("{p:?}: a payload has 1 to 256 bytes")));
        }
        Ok(v.to_vec())
    };
    let cfg = ContactsConfig {
        opt_out_keywords: keywords("contacts.opt_out_keywords", &c.opt_out_keywords)?,
        opt_in_keywords: keywords("contacts.opt_in_keywords", &c.opt_in_keywords)?,
        opt_out_payloads: payloads("contacts.opt_out_payloads", &c.opt_out_payloads)?,
        opt_in_payloads: payloads("contacts.opt_in_payloads", &c.opt_in_payloads)?,
    };
    let out: std::collections::HashSet<String> =
        cfg.opt_out_keywords.iter().map(|k| normalize(k)).collect();
    if let Some(k) = cfg
        .opt_in_keywords
        .iter()
        .find(|k| out.contains(&normalize(k)))
    {
        return Err(invalid(
            "contacts.opt_in_keywords",
            format!("{k:?} is also an opt-out keyword"),
        ));
    }
    if let Some(p) = cfg
        .opt_in_payloads
        .iter()
        .find(|p| cfg.opt_out_payloads.contains(p))
    {
        return Err(invalid(
            "contacts.opt_in_payloads",
            format!("{p:?} is also an opt-out payload"),
        ));
    }
    Ok(cfg)
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
pub const EXAMPLE_TOML: &str = include_str!("../config/example.toml");

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

/// Applies `WAGATE_…` overrides to every scalar leaf of the config (maps of
/// apps and tenants are not overridable leaf by leaf; their secrets already
/// come from the environment).
pub fn apply_env(raw: RawConfig, env: &dyn Env) -> Result<RawConfig, ConfigError> {
    let mut value = toml::Value::try_from(&raw).map_err(|e| invalid("config", e.to_string()))?;
    let mut overrides: Vec<(String, String)> = Vec::new();
    collect_leaves(&value, "", &mut overrides);
    let mut changed = false;
    for (path, var) in overrides.into_iter().chain(
        ENV_ALIASES
            .iter()
            .map(|(v, p)| (p.to_string(), v.to_string())),
    ) {
        let Some(text) = env.var(&var) else { continue };
        set_leaf(&mut value, &path, &text).map_err(|m| invalid(var.clone(), m))?;
        changed = true;
    }
    if !changed {
        return Ok(raw);
    }
    value
        .try_into()
        .map_err(|e: toml::de::Error| invalid("environment", e.to_string()))
}

fn collect_leaves(v: &toml::Value, prefix: &str, out: &mut Vec<(String, String)>) {
    if let toml::Value::Table(t) = v {
        for (k, child) in t {
            if prefix.is_empty() && (k == "apps" || k == "tenants") {
                continue;
            }
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match child {
                toml::Value::Table(_) => collect_leaves(child, &path, out),
                _ => {
                    let var = env_name_for(&path);
                    out.push((path, var));
                }
            }
        }
    }
}

fn set_leaf(root: &mut toml::Value, path: &str, text: &str) -> Result<(), String> {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur.get_mut(*p).ok_or_else(|| format!("no section {p}"))?;
    }
    let last = parts[parts.len() - 1];
    let table = cur.as_table_mut().ok_or("not a table")?;
    let old = table.get(last).ok_or("no such key")?;
    let new = match old {
        toml::Value::Integer(_) => toml::Value::Integer(
            text.trim()
                .parse::<i64>()
                .map_err(|_| format!("expected a whole number, got {text:?}"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match text.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("expected true or false, got {text:?}")),
        }),
        toml::Value::Float(_) => toml::Value::Float(
            text.trim()
                .parse::<f64>()
                .map_err(|_| format!("expected a number, got {text:?}"))?,
        ),
        toml::Value::Array(_) => toml::Value::Array(
            text.split(',')
                .map(|s| toml::Value::String(s.trim().to_string()))
                .filter(|v| v.as_str() != Some(""))
                .collect(),
        ),
        _ => toml::Value::String(text.to_string()),
    };
    table.insert(last.to_string(), new);
    Ok(())
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            key,
            format!("expected an address like 127.0.0.1:8080, got {s:?}"),
        )
    })
}

fn positive(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(v)
    }
}

/// Reads a secret named by `{field}_env` or `{field}_file`.
fn secret(
    key: &str,
    env_name: &str,
    file: &str,
    env: &dyn Env,
) -> Result<Option<Secret>, ConfigError> {
    if !env_name.is_empty() && !file.is_empty() {
        return Err(invalid(
            key,
            "set either the _env or the _file form, not both",
        ));
    }
    if !file.is_empty() {
        let text = std::fs::read_to_string(file)
            .map_err(|e| invalid(format!("{key}_file"), format!("cannot read {file}: {e}")))?;
        let t = text.trim_end_matches(['\n', '\r']).to_string();
        if t.is_empty() {
            return Err(invalid(format!("{key}_file"), format!("{file} is empty")));
        }
        return Ok(Some(Secret(t)));
    }
    if !env_name.is_empty() {
        return Ok(env.var(env_name).filter(|v| !v.is_empty()).map(Secret));
    }
    Ok(None)
}

fn validate(raw: RawConfig, env: &dyn Env, opts: LoadOptions) -> Result<Config, ConfigError> {
    let listen = parse_addr("listen", &raw.listen)?;
    let internal_listen = parse_addr("internal_listen", &raw.internal_listen)?;
    if listen == internal_listen && listen.port() != 0 {
        return Err(invalid("internal_listen", "must differ from listen"));
    }
    let s = &raw.server;
    let max_body_bytes = positive("server.max_body_bytes", s.max_body_bytes)?;
    if max_body_bytes > 64 * 1024 * 1024 {
        return Err(invalid("server.max_body_bytes", "at most 64 MiB"));
    }
    let k = &raw.kafka;
    if k.brokers.trim().is_empty() {
        return Err(invalid(
            "kafka.brokers",
            "must name at least one broker (host:port)",
        ));
    }
    if !k
        .topic_prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            "kafka.topic_prefix",
            "may hold only ASCII letters, digits, '.', '_' and '-'",
        ));
    }
    if !matches!(
        k.compression.as_str(),
        "none" | "gzip" | "snappy" | "lz4" | "zstd"
    ) {
        return Err(invalid(
            "kafka.compression",
            format!(
                "expected none, gzip, snappy, lz4 or zstd, got {:?}",
                k.compression
            ),
        ));
    }
    let i = &raw.ingress;
    if !matches!(raw.log.format.as_str(), "text" | "json") {
        return Err(invalid(
            "log.format",
            format!("expected text or json, got {:?}", raw.log.format),
        ));
    }
    let throughput = positive("egress.default_throughput", raw.egress.default_throughput)?;
    let e = &raw.egress;
    let mut numbers = BTreeMap::new();
    for (id, n) in &e.numbers {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid(
                format!("egress.numbers.{id}"),
                "keys are phone_number_ids (digits)",
            ));
        }
        let key = format!("egress.numbers.{id}.access_token");
        numbers.insert(
            id.clone(),
            NumberConfig {
                throughput: (n.throughput > 0).then(|| n.throughput.min(u32::MAX as u64) as u32),
                access_token: secret(&key, &n.access_token_env, &n.access_token_file, env)?,
            },
        );
    }
    let mut portfolios = Vec::new();
    let mut portfolio_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, p) in &e.portfolios {
        let key = format!("egress.portfolios.{name}");
        if p.limit == 0 {
            return Err(invalid(
                format!("{key}.limit"),
                "the tier: distinct users per 24 h, e.g. 250, 2000, 10000, 100000",
            ));
        }
        if p.numbers.is_empty() {
            return Err(invalid(
                format!("{key}.numbers"),
                "list the portfolio's phone_number_ids",
            ));
        }
        for n in &p.numbers {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    format!("{key}.numbers"),
                    format!("{n:?} is not a phone_number_id"),
                ));
            }
            if let Some(other) = portfolio_of.insert(n, name) {
                return Err(invalid(
                    format!("{key}.numbers"),
                    format!("{n} is also in portfolio {other}"),
                ));
            }
        }
        portfolios.push(PortfolioConfig {
            name: name.clone(),
            limit: p.limit.min(usize::MAX as u64) as usize,
            numbers: p.numbers.clone(),
        });
    }

    let mut apps = Vec::new();
    if raw.apps.is_empty() {
        return Err(invalid(
            "apps",
            "configure at least one Meta app ([apps.default])",
        ));
    }
    for (name, a) in &raw.apps {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                format!("apps.{name}"),
                "app names may hold only ASCII letters, digits, '_' and '-'",
            ));
        }
        let key = format!("apps.{name}.secret");
        let current = match secret(&key, &a.secret_env, &a.secret_file, env)? {
            Some(s) => s,
            None if opts.dev => Secret::new(DEV_APP_SECRET),
            None => {
                return Err(invalid(
                    key,
                    format!(
                        "no app secret: set the environment variable {} (or secret_file)",
                        show_env(&a.secret_env)
                    ),
                ))
            }
        };
        let mut secrets = vec![current];
        if let Some(prev) = secret(
            &format!("apps.{name}.previous_secret"),
            &a.previous_secret_env,
            &a.previous_secret_file,
            env,
        )? {
            secrets.push(prev);
        }
        let key = format!("apps.{name}.verify_token");
        let verify_token = match secret(&key, &a.verify_token_env, &a.verify_token_file, env)? {
            Some(s) => s,
            None if opts.dev => Secret::new(DEV_VERIFY_TOKEN),
            None => {
                return Err(invalid(
                    key,
                    format!(
                        "no verify token: set the environment variable {} (or verify_token_file)",
                        show_env(&a.verify_token_env)
                    ),
                ))
            }
        };
        apps.push(AppConfig {
            name: name.clone(),
            secrets,
            verify_token,
        });
    }

    let mut tenants = Vec::new();
    for (name, t) in &raw.tenants {
        let key = format!("tenants.{name}.token");
        let token = match secret(&key, &t.token_env, &t.token_file, env)? {
            Some(s) => s,
            None if opts.dev => Secret::new(DEV_API_TOKEN),
            None => {
                return Err(invalid(
                    key,
                    format!(
                        "no API token: set the environment variable {} (or token_file)",
                        show_env(&t.token_env)
                    ),
                ))
            }
        };
        let numbers = if t.numbers.iter().any(|n| n == "*") {
            None
        } else {
            Some(t.numbers.clone())
        };
        tenants.push(TenantConfig {
            name: name.clone(),
            token,
            numbers,
        });
    }
    for (i, b) in tenants.iter().enumerate() {
        if let Some(a) = tenants[..i].iter().find(|a| a.token == b.token) {
            return Err(invalid(
                format!("tenants.{}.token", b.name),
                format!("tenant {} has the same token", a.name),
            ));
        }
    }

    let g = &raw.graph;
    if !(g.base_url.starts_with("http://") || g.base_url.starts_with("https://")) {
        return Err(invalid(
            "graph.base_url",
            format!("expected an http(s) URL, got {:?}", g.base_url),
        ));
    }
    // The token file, when set, replaces the default environment variable
    // (an explicitly named other variable plus a file is still ambiguous).
    let token_env = if !g.access_token_file.is_empty()
        && g.access_token_env == RawGraph::default().access_token_env
    {
        ""
    } else {
        g.access_token_env.as_str()
    };
    let access_token = match secret("graph.access_token", token_env, &g.access_token_file, env)? {
        Some(s) => Some(s),
        None if opts.dev => Some(Secret::new(DEV_ACCESS_TOKEN)),
        None => None,
    };

    Ok(Config {
        listen,
        internal_listen,
        max_body_bytes: max_body_bytes as usize,
        header_read_timeout: Duration::from_millis(positive(
            "server.header_read_timeout_ms",
            s.header_read_timeout_ms,
        )?),
        body_read_timeout: Duration::from_millis(positive(
            "server.body_read_timeout_ms",
            s.body_read_timeout_ms,
        )?),
        max_connections: positive("server.max_connections", s.max_connections)? as usize,
        shutdown_timeout: Duration::from_millis(positive(
            "server.shutdown_timeout_ms",
            s.shutdown_timeout_ms,
        )?),
        shutdown_grace: {
            if s.shutdown_grace_ms >= s.shutdown_timeout_ms {
                return Err(invalid(
                    "server.shutdown_grace_ms",
                    "must be shorter than server.shutdown_timeout_ms",
                ));
            }
            Duration::from_millis(s.shutdown_grace_ms)
        },
        max_connections_per_peer: s.max_connections_per_peer.min(u32::MAX as u64) as usize,
        h2_max_concurrent_streams: {
            let n = positive(
                "server.h2_max_concurrent_streams",
                s.h2_max_concurrent_streams,
            )?;
            if n > 1024 {
                return Err(invalid("server.h2_max_concurrent_streams", "at most 1024"));
            }
            n as u32
        },
        min_body_bytes_per_sec: s.min_body_bytes_per_sec,
        kafka: KafkaConfig {
            brokers: k.brokers.trim().to_string(),
            topic_prefix: k.topic_prefix.clone(),
            linger_ms: k.linger_ms,
            queue_max_messages: positive("kafka.queue_max_messages", k.queue_max_messages)?,
            message_timeout: Duration::from_millis(positive(
                "kafka.message_timeout_ms",
                k.message_timeout_ms,
            )?),
            compression: k.compression.clone(),
            partitions: positive("kafka.partitions", k.partitions)?.min(10_000) as i32,
            replication_factor: positive("kafka.replication_factor", k.replication_factor)?.min(100)
                as i32,
            client_id: k.client_id.clone(),
            message_max_bytes: max_body_bytes as usize + RECORD_OVERHEAD_BYTES,
            check_record_limit: true,
        },
        ingress: IngressConfig {
            ack_timeout: Duration::from_millis(positive(
                "ingress.ack_timeout_ms",
                i.ack_timeout_ms,
            )?),
            retry_after_secs: positive("ingress.retry_after_secs", i.retry_after_secs)?,
            raw_enabled: i.raw_enabled,
            dedupe_window: Duration::from_secs(positive(
                "ingress.dedupe_window_secs",
                i.dedupe_window_secs,
            )?),
            dedupe_max_entries: positive("ingress.dedupe_max_entries", i.dedupe_max_entries)?
                as usize,
            max_in_flight: positive("ingress.max_in_flight", i.max_in_flight)? as usize,
            linger_ms: {
                if i.linger_ms.saturating_mul(2) > i.ack_timeout_ms {
                    return Err(invalid(
                        "ingress.linger_ms",
                        "must be at most half of ingress.ack_timeout_ms",
                    ));
                }
                i.linger_ms
            },
            max_in_flight_bytes: {
                let n = positive("ingress.max_in_flight_bytes", i.max_in_flight_bytes)?;
                if n < max_body_bytes {
                    return Err(invalid(
                        "ingress.max_in_flight_bytes",
                        "must be at least server.max_body_bytes",
                    ));
                }
                n.min(u32::MAX as u64) as usize
            },
            limits: crate::meta::webhook::Limits {
                max_depth: {
                    if !(8..=512).contains(&i.max_json_depth) {
                        return Err(invalid("ingress.max_json_depth", "between 8 and 512"));
                    }
                    i.max_json_depth as usize
                },
                max_events: positive("ingress.max_events_per_post", i.max_events_per_post)?
                    .min(1_000_000) as usize,
                record_bytes_factor: positive(
                    "ingress.max_record_bytes_factor",
                    i.max_record_bytes_factor,
                )?
                .min(64) as usize,
            },
        },
        egress: EgressConfig {
            enabled: e.enabled,
            default_throughput: throughput.min(u32::MAX as u64) as u32,
            group_id: e.group_id.clone(),
            instance_id: (!e.instance_id.is_empty()).then(|| e.instance_id.clone()),
            max_buffered: positive("egress.max_buffered", e.max_buffered)? as usize,
            lane_max_in_flight: positive("egress.lane_max_in_flight", e.lane_max_in_flight)?
                as usize,
            send_timeout: Duration::from_millis(positive(
                "egress.send_timeout_ms",
                e.send_timeout_ms,
            )?),
            max_attempts: positive("egress.max_attempts", e.max_attempts)?.min(100) as u32,
            circuit_hold_max: Duration::from_millis(positive(
                "egress.circuit_hold_max_ms",
                e.circuit_hold_max_ms,
            )?),
            history_window: Duration::from_secs(positive(
                "egress.history_window_secs",
                e.history_window_secs,
            )?),
            marketing_requires_opt_in: e.marketing_requires_opt_in,
            arrival_margin: (e.arrival_margin_ms > 0)
                .then(|| Duration::from_millis(e.arrival_margin_ms.min(10_000))),
            numbers,
            portfolios,
        },
        graph: GraphConfig {
            base_url: g.base_url.trim_end_matches('/').to_string(),
            access_token,
        },
        contacts: contacts_config(&raw.contacts)?,
        log: LogConfig {
            json: raw.log.format == "json",
            level: raw.log.level.clone(),
        },
        apps,
        tenants,
    })
}

fn show_env(name: &str) -> &str {
    if name.is_empty() {
        "(none configured)"
    } else {
        name
    }
}

impl Config {
    /// The app with this name, if configured.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn required() -> BTreeMap<String, String> {
        env(&[
            ("WAGATE_APP_SECRET", "s3cret"),
            ("WAGATE_VERIFY_TOKEN", "vt"),
            ("WAGATE_API_TOKEN", "api"),
            ("WAGATE_ACCESS_TOKEN", "acc"),
        ])
    }

    #[test]
    fn example_config_with_contract_env_is_complete() {
        let c = load(None, &required(), LoadOptions::default()).unwrap();
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.topic_prefix, "wa.");
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.internal_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.app("default").unwrap().secrets[0].expose(), "s3cret");
        assert_eq!(c.app("default").unwrap().verify_token.expose(), "vt");
        assert_eq!(c.tenants[0].token.expose(), "api");
        assert!(c.tenants[0].numbers.is_none());
        assert_eq!(c.graph.access_token.as_ref().unwrap().expose(), "acc");
        assert_eq!(c.graph.base_url, "https://graph.facebook.com/v23.0");
        assert_eq!(c.egress.default_throughput, 80);
        assert_eq!(c.max_body_bytes, 3 * 1024 * 1024);
    }

    #[test]
    fn graph_token_file_replaces_the_default_env_var() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "from-file\n").unwrap();
        let mut e = required();
        e.insert(
            "WAGATE_GRAPH_ACCESS_TOKEN_FILE".into(),
            f.to_str().unwrap().into(),
        );
        let c = load(None, &e, LoadOptions::default()).unwrap();
        assert_eq!(c.graph.access_token.as_ref().unwrap().expose(), "from-file");
        // Another variable named explicitly and a file: ambiguous, refused.
        e.insert("WAGATE_GRAPH_ACCESS_TOKEN_ENV".into(), "OTHER_TOKEN".into());
        let err = load(None, &e, LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("graph.access_token"), "{err}");
    }

    #[test]
    fn contract_env_overrides() {
        let mut e = required();
        for (k, v) in [
            ("WAGATE_KAFKA_BROKERS", "10.1.1.1:9092,10.1.1.2:9092"),
            ("WAGATE_TOPIC_PREFIX", "acme."),
            ("WAGATE_LISTEN", "127.0.0.1:18080"),
            ("WAGATE_INTERNAL_LISTEN", "127.0.0.1:19090"),
            ("WAGATE_GRAPH_BASE_URL", "http://127.0.0.1:7000/v23.0/"),
            ("WAGATE_DEFAULT_THROUGHPUT", "20"),
            ("WAGATE_INGRESS_RAW_ENABLED", "false"),
        ] {
            e.insert(k.into(), v.into());
        }
        let c = load(None, &e, LoadOptions::default()).unwrap();
        assert_eq!(c.kafka.brokers, "10.1.1.1:9092,10.1.1.2:9092");
        assert_eq!(c.kafka.topic_prefix, "acme.");
        assert_eq!(c.listen.port(), 18080);
        assert_eq!(c.internal_listen.port(), 19090);
        assert_eq!(c.graph.base_url, "http://127.0.0.1:7000/v23.0");
        assert_eq!(c.egress.default_throughput, 20);
        assert!(!c.ingress.raw_enabled);
    }

    #[test]
    fn opt_out_lists_are_configurable_and_checked() {
        let c = load(None, &required(), LoadOptions::default()).unwrap();
        assert!(c.contacts.opt_out_keywords.iter().any(|k| k == "stop"));
        let mut e = required();
        e.insert(
            "WAGATE_CONTACTS_OPT_OUT_KEYWORDS".into(),
            "halt, désabonner".into(),
        );
        e.insert("WAGATE_CONTACTS_OPT_OUT_PAYLOADS".into(), "OPT_OUT".into());
        let c = load(None, &e, LoadOptions::default()).unwrap();
        assert_eq!(c.contacts.opt_out_keywords, ["halt", "désabonner"]);
        let k = c.contacts.keywords();
        assert!(k.detect("DESABONNER").is_some() && k.detect("stop").is_none());
        assert!(k.detect_payload("OPT_OUT").is_some());
        for (key, value) in [
            ("WAGATE_CONTACTS_OPT_IN_KEYWORDS", "Stop!"),
            ("WAGATE_CONTACTS_OPT_OUT_KEYWORDS", "stop,!!"),
            ("WAGATE_CONTACTS_OPT_IN_PAYLOADS", "OPT_OUT"),
        ] {
            let mut e = required();
            e.insert("WAGATE_CONTACTS_OPT_OUT_PAYLOADS".into(), "OPT_OUT".into());
            e.insert(key.into(), value.into());
            let err = load(None, &e, LoadOptions::default()).unwrap_err();
            let named = key.trim_start_matches("WAGATE_").to_ascii_lowercase();
            let named = named.replacen('_', ".", 1);
            assert!(err.to_string().contains(&named), "{key}: {err}");
        }
    }

    #[test]
    fn tenants_never_share_a_token() {
        // a and default share a token, with b between them in key order.
        let text = format!(
            "{EXAMPLE_TOML}\n[tenants.a]\ntoken_env = \"WAGATE_API_TOKEN\"\nnumbers = [\"1\"]\n\
             [tenants.b]\ntoken_env = \"TB\"\nnumbers = [\"2\"]\n"
        );
        let mut e = required();
        e.insert("TB".into(), "token-b".into());
        let err = load_str(&text, "x.toml", &e, LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("tenants.default.token"), "{err}");
    }

    #[test]
    fn ingress_linger_defaults_to_20_ms_and_must_leave_room_for_the_ack() {
        let c = load(None, &required(), LoadOptions::default()).unwrap();
        assert_eq!(c.ingress.linger_ms, 20);
        assert_eq!(c.kafka.linger_ms, 5);
        let mut e = required();
        e.insert("WAGATE_INGRESS_LINGER_MS".into(), "5".into());
        let c = load(None, &e, LoadOptions::default()).unwrap();
        assert_eq!(c.ingress.linger_ms, 5);
        e.insert("WAGATE_INGRESS_ACK_TIMEOUT_MS".into(), "9".into());
        let err = load(None, &e, LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("ingress.linger_ms"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{EXAMPLE_TOML}\n[kafka2]\nbrokerz = 1\n");
        let err = load_str(&text, "x.toml", &required(), LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("kafka2"), "{err}");
        let text = EXAMPLE_TOML.replace("[kafka]", "[kafka]\nbrokerz = \"a\"");
        let err = load_str(&text, "x.toml", &required(), LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let mut e = required();
        e.insert("WAGATE_DEFAULT_THROUGHPUT".into(), "fast".into());
        let err = load(None, &e, LoadOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("WAGATE_DEFAULT_THROUGHPUT"),
            "{err}"
        );
        let mut e = required();
        e.insert("WAGATE_LISTEN".into(), "nowhere".into());
        let err = load(None, &e, LoadOptions::default()).unwrap_err();
        assert!(err.to_string().starts_with("listen:"), "{err}");
    }

    #[test]
    fn missing_secret_is_an_error_naming_the_variable_except_in_dev() {
        let err = load(None, &env(&[]), LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("WAGATE_APP_SECRET"), "{err}");
        let c = load(None, &env(&[]), LoadOptions { dev: true }).unwrap();
        assert_eq!(
            c.app("default").unwrap().secrets[0].expose(),
            DEV_APP_SECRET
        );
    }

    #[test]
    fn rotation_and_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("prev");
        std::fs::write(&f, "old-secret\n").unwrap();
        let text = EXAMPLE_TOML.replace(
            "secret_env = \"WAGATE_APP_SECRET\"",
            &format!(
                "secret_env = \"WAGATE_APP_SECRET\"\nprevious_secret_file = {:?}",
                f.display().to_string()
            ),
        );
        let c = load_str(&text, "x", &required(), LoadOptions::default()).unwrap();
        let app = c.app("default").unwrap();
        assert_eq!(app.secrets.len(), 2);
        assert_eq!(app.secrets[1].expose(), "old-secret");
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let c = load(None, &required(), LoadOptions::default()).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret"));
        assert!(dbg.contains("***"));
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name_for("kafka.brokers"), "WAGATE_KAFKA_BROKERS");
        assert_eq!(env_name_for("graph.base_url"), "WAGATE_GRAPH_BASE_URL");
        assert_eq!(env_name_for("internal_listen"), "WAGATE_INTERNAL_LISTEN");
    }
}
