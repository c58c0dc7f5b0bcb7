//! Raw values → the typed [`Config`]: one validator per section, each
//! naming the key at fault; [`validate`] calls them in file order.

use super::*;

pub(super) fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            key,
            format!("expected an address like 127.0.0.1:8080, got {s:?}"),
        )
    })
}

pub(super) fn positive(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(v)
    }
}

pub(super) fn validate(
    raw: RawConfig,
    env: &dyn Env,
    opts: LoadOptions,
) -> Result<Config, ConfigError> {
    let listen = parse_addr("listen", &raw.listen)?;
    let internal_listen = parse_addr("internal_listen", &raw.internal_listen)?;
    if listen == internal_listen && listen.port() != 0 {
        return Err(invalid("internal_listen", "must differ from listen"));
    }
    let server = server(&raw.server)?;
    let tls = listener_tls(
        "server.tls",
        &raw.server.tls.cert_file,
        &raw.server.tls.key_file,
        "",
    )?;
    let internal_tls = listener_tls(
        "internal_tls",
        &raw.internal_tls.cert_file,
        &raw.internal_tls.key_file,
        &raw.internal_tls.client_ca_file,
    )?;
    let kafka = kafka(&raw.kafka, server.max_body_bytes, env)?;
    let ingress = ingress(&raw.ingress, server.max_body_bytes)?;
    let ids_retention = kafka.topic(TopicId::InboundIds).retention_ms;
    if ingress.dedupe_shared
        && ids_retention != -1
        && (ids_retention as u128) < ingress.dedupe_window.as_millis()
    {
        return Err(invalid(
            "ingress.dedupe_window_secs",
            format!(
                "longer than the retention of inbound.ids ({ids_retention} ms): the ids would be gone before their window ends; raise kafka.topics.inbound_ids.retention_ms"
            ),
        ));
    }
    let log = log(&raw.log)?;
    let egress = egress(&raw.egress, env)?;
    let apps = apps(&raw.apps, env, opts)?;
    let tenants = tenants(&raw.tenants, env, opts)?;
    let graph = graph(&raw.graph, env, opts)?;
    let contacts = contacts_config(&raw.contacts)?;
    let numbers = numbers(&raw.numbers)?;
    let public_url = public_url(&raw.server.public_url)?;
    let media = super::media::media(&raw.media)?;
    let ServerConfig {
        max_body_bytes,
        header_read_timeout,
        body_read_timeout,
        max_connections,
        shutdown_timeout,
        shutdown_grace,
        max_connections_per_peer,
        h2_max_concurrent_streams,
        min_body_bytes_per_sec,
    } = server;
    Ok(Config {
        listen,
        internal_listen,
        max_body_bytes,
        header_read_timeout,
        body_read_timeout,
        max_connections,
        shutdown_timeout,
        shutdown_grace,
        max_connections_per_peer,
        h2_max_concurrent_streams,
        min_body_bytes_per_sec,
        tls,
        internal_tls,
        kafka,
        ingress,
        egress,
        graph,
        contacts,
        log,
        numbers,
        public_url,
        templates: TemplatesConfig {
            refresh: Duration::from_secs(positive(
                "templates.refresh_secs",
                raw.templates.refresh_secs,
            )?),
        },
        apps,
        tenants,
        media,
    })
}

/// `[numbers]`.
fn numbers(n: &RawNumbers) -> Result<NumbersConfig, ConfigError> {
    Ok(NumbersConfig {
        refresh: (n.refresh_secs > 0).then(|| Duration::from_secs(n.refresh_secs.max(10))),
        high_throughput: positive("numbers.high_throughput", n.high_throughput)?
            .min(u32::MAX as u64) as u32,
    })
}

/// `server.public_url`: empty, or an http(s) URL without query.
fn public_url(u: &str) -> Result<Option<String>, ConfigError> {
    if u.is_empty() {
        return Ok(None);
    }
    if !(u.starts_with("https://") || u.starts_with("http://")) || u.contains(['?', '#', ' ']) {
        return Err(invalid(
            "server.public_url",
            format!("expected an http(s) URL such as https://wa.example.com, got {u:?}"),
        ));
    }
    Ok(Some(u.trim_end_matches('/').to_string()))
}

/// `[server]`, typed (flattened into [`Config`]).
struct ServerConfig {
    max_body_bytes: usize,
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    max_connections: usize,
    shutdown_timeout: Duration,
    shutdown_grace: Duration,
    max_connections_per_peer: usize,
    h2_max_concurrent_streams: u32,
    min_body_bytes_per_sec: u64,
}

fn server(s: &RawServer) -> Result<ServerConfig, ConfigError> {
    let max_body_bytes = positive("server.max_body_bytes", s.max_body_bytes)?;
    if max_body_bytes > 64 * 1024 * 1024 {
        return Err(invalid("server.max_body_bytes", "at most 64 MiB"));
    }
    let ms = |key: &str, v: u64| positive(key, v).map(Duration::from_millis);
    let shutdown_timeout = ms("server.shutdown_timeout_ms", s.shutdown_timeout_ms)?;
    if s.shutdown_grace_ms >= s.shutdown_timeout_ms {
        return Err(invalid(
            "server.shutdown_grace_ms",
            "must be shorter than server.shutdown_timeout_ms",
        ));
    }
    let streams = positive(
        "server.h2_max_concurrent_streams",
        s.h2_max_concurrent_streams,
    )?;
    if streams > 1024 {
        return Err(invalid("server.h2_max_concurrent_streams", "at most 1024"));
    }
    Ok(ServerConfig {
        max_body_bytes: max_body_bytes as usize,
        header_read_timeout: ms("server.header_read_timeout_ms", s.header_read_timeout_ms)?,
        body_read_timeout: ms("server.body_read_timeout_ms", s.body_read_timeout_ms)?,
        max_connections: positive("server.max_connections", s.max_connections)? as usize,
        shutdown_timeout,
        shutdown_grace: Duration::from_millis(s.shutdown_grace_ms),
        max_connections_per_peer: s.max_connections_per_peer.min(u32::MAX as u64) as usize,
        h2_max_concurrent_streams: streams as u32,
        min_body_bytes_per_sec: s.min_body_bytes_per_sec,
    })
}

/// A listener's TLS section: nothing set → plain HTTP; a certificate needs
/// its key (and the reverse); the files are read and checked now (readable,
/// PEM, the key matching the leaf, the client CAs), so a bad one stops the
/// start naming its key.
fn listener_tls(
    section: &'static str,
    cert_file: &str,
    key_file: &str,
    client_ca_file: &str,
) -> Result<Option<crate::tls::TlsFiles>, ConfigError> {
    let (cert, key, ca) = (cert_file.trim(), key_file.trim(), client_ca_file.trim());
    if cert.is_empty() && key.is_empty() {
        if !ca.is_empty() {
            return Err(invalid(
                format!("{section}.client_ca_file"),
                format!("needs {section}.cert_file and {section}.key_file (client certificates are asked for in a TLS handshake)"),
            ));
        }
        return Ok(None);
    }
    if cert.is_empty() {
        return Err(invalid(
            format!("{section}.cert_file"),
            format!("required when {section}.key_file is set"),
        ));
    }
    if key.is_empty() {
        return Err(invalid(
            format!("{section}.key_file"),
            format!("required when {section}.cert_file is set"),
        ));
    }
    let files = crate::tls::TlsFiles {
        section,
        cert_file: PathBuf::from(cert),
        key_file: PathBuf::from(key),
        client_ca_file: (!ca.is_empty()).then(|| PathBuf::from(ca)),
    };
    files.check().map_err(|e| invalid(e.key, e.message))?;
    Ok(Some(files))
}

fn kafka(k: &RawKafka, max_body_bytes: usize, env: &dyn Env) -> Result<KafkaConfig, ConfigError> {
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
    let partitions = positive("kafka.partitions", k.partitions)?.min(10_000) as i32;
    let replication_factor =
        positive("kafka.replication_factor", k.replication_factor)?.min(100) as i32;
    let topics = topic_settings(&k.topics, partitions, replication_factor)?;
    let connection = kafka_security::connection(k, env)?;
    Ok(KafkaConfig {
        connection,
        topic_prefix: k.topic_prefix.clone(),
        linger_ms: k.linger_ms,
        queue_max_messages: positive("kafka.queue_max_messages", k.queue_max_messages)?,
        message_timeout: Duration::from_millis(positive(
            "kafka.message_timeout_ms",
            k.message_timeout_ms,
        )?),
        compression: k.compression.clone(),
        partitions,
        replication_factor,
        client_id: k.client_id.clone(),
        message_max_bytes: max_body_bytes + RECORD_OVERHEAD_BYTES,
        check_record_limit: true,
        topics,
    })
}

/// `[kafka.topics.NAME]` over the defaults; an unknown NAME, retention on a
/// compacted topic, or more in-sync replicas than replicas is an error.
fn topic_settings(
    raw: &BTreeMap<String, RawTopic>,
    partitions: i32,
    replication_factor: i32,
) -> Result<[TopicSettings; TopicId::COUNT], ConfigError> {
    if let Some(name) = raw
        .keys()
        .find(|n| !TopicId::ALL.iter().any(|t| topic_key(*t) == **n))
    {
        let known: Vec<String> = TopicId::ALL.iter().map(|t| topic_key(*t)).collect();
        return Err(invalid(
            format!("kafka.topics.{name}"),
            format!("no such topic; expected one of {}", known.join(", ")),
        ));
    }
    let mut out = [TopicSettings {
        partitions,
        replication_factor,
        retention_ms: -1,
        min_insync_replicas: None,
    }; TopicId::COUNT];
    for (t, slot) in TopicId::ALL.iter().zip(out.iter_mut()) {
        let spec = t.spec();
        slot.retention_ms = spec.retention_ms;
        let name = topic_key(*t);
        let Some(r) = raw.get(&name) else { continue };
        let key = |k: &str| format!("kafka.topics.{name}.{k}");
        if let Some(p) = r.partitions {
            slot.partitions = positive(&key("partitions"), p)?.min(10_000) as i32;
        }
        if let Some(f) = r.replication_factor {
            slot.replication_factor = positive(&key("replication_factor"), f)?.min(100) as i32;
        }
        if let Some(ms) = r.retention_ms {
            if spec.compact {
                return Err(invalid(
                    key("retention_ms"),
                    format!(
                        "{} is compacted (a record stays until a newer one replaces it): retention does not apply",
                        t.name()
                    ),
                ));
            }
            if ms != -1 && ms < 3_600_000 {
                return Err(invalid(
                    key("retention_ms"),
                    "must be -1 (forever) or at least 3600000 (one hour)",
                ));
            }
            slot.retention_ms = ms;
        }
        if let Some(m) = r.min_insync_replicas {
            let m = positive(&key("min_insync_replicas"), m)?;
            if m > slot.replication_factor as u64 {
                return Err(invalid(
                    key("min_insync_replicas"),
                    format!(
                        "must be at most the replication factor ({}): with more, no write could succeed",
                        slot.replication_factor
                    ),
                ));
            }
            slot.min_insync_replicas = Some(m as i32);
        }
    }
    Ok(out)
}

fn ingress(i: &RawIngress, max_body_bytes: usize) -> Result<IngressConfig, ConfigError> {
    if i.linger_ms.saturating_mul(2) > i.ack_timeout_ms {
        return Err(invalid(
            "ingress.linger_ms",
            "must be at most half of ingress.ack_timeout_ms",
        ));
    }
    if i.quiet_linger_ms > i.linger_ms {
        return Err(invalid(
            "ingress.quiet_linger_ms",
            "must be at most ingress.linger_ms (it is the window while ingress is not busy)",
        ));
    }
    let in_flight_bytes = positive("ingress.max_in_flight_bytes", i.max_in_flight_bytes)?;
    if in_flight_bytes < max_body_bytes as u64 {
        return Err(invalid(
            "ingress.max_in_flight_bytes",
            "must be at least server.max_body_bytes",
        ));
    }
    if !(8..=512).contains(&i.max_json_depth) {
        return Err(invalid("ingress.max_json_depth", "between 8 and 512"));
    }
    Ok(IngressConfig {
        ack_timeout: Duration::from_millis(positive("ingress.ack_timeout_ms", i.ack_timeout_ms)?),
        retry_after_secs: positive("ingress.retry_after_secs", i.retry_after_secs)?,
        raw_enabled: i.raw_enabled,
        dedupe_window: Duration::from_secs(positive(
            "ingress.dedupe_window_secs",
            i.dedupe_window_secs,
        )?),
        dedupe_max_entries: positive("ingress.dedupe_max_entries", i.dedupe_max_entries)? as usize,
        dedupe_shared: i.dedupe_shared,
        dedupe_propagation: {
            let ms = positive("ingress.dedupe_propagation_ms", i.dedupe_propagation_ms)?;
            if !(20..=60_000).contains(&ms) {
                return Err(invalid(
                    "ingress.dedupe_propagation_ms",
                    "between 20 and 60000 (milliseconds)",
                ));
            }
            Duration::from_millis(ms)
        },
        max_in_flight: positive("ingress.max_in_flight", i.max_in_flight)? as usize,
        linger_ms: i.linger_ms,
        quiet_linger_ms: i.quiet_linger_ms,
        busy_in_flight: i.busy_in_flight.min(i.max_in_flight) as usize,
        max_in_flight_bytes: in_flight_bytes.min(u32::MAX as u64) as usize,
        limits: crate::meta::webhook::Limits {
            max_depth: i.max_json_depth as usize,
            max_events: positive("ingress.max_events_per_post", i.max_events_per_post)?
                .min(1_000_000) as usize,
            record_bytes_factor: positive(
                "ingress.max_record_bytes_factor",
                i.max_record_bytes_factor,
            )?
            .min(64) as usize,
        },
    })
}

fn log(l: &RawLog) -> Result<LogConfig, ConfigError> {
    if !matches!(l.format.as_str(), "text" | "json") {
        return Err(invalid(
            "log.format",
            format!("expected text or json, got {:?}", l.format),
        ));
    }
    Ok(LogConfig {
        json: l.format == "json",
        level: l.level.clone(),
    })
}

fn egress(e: &RawEgress, env: &dyn Env) -> Result<EgressConfig, ConfigError> {
    let throughput = positive("egress.default_throughput", e.default_throughput)?;
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
                waba_id: graph_id(&format!("egress.numbers.{id}.waba_id"), &n.waba_id)?,
            },
        );
    }
    let ms = |key: &str, v: u64| positive(key, v).map(Duration::from_millis);
    Ok(EgressConfig {
        enabled: e.enabled,
        default_throughput: throughput.min(u32::MAX as u64) as u32,
        group_id: e.group_id.clone(),
        instance_id: (!e.instance_id.is_empty()).then(|| e.instance_id.clone()),
        max_buffered: positive("egress.max_buffered", e.max_buffered)? as usize,
        lane_max_in_flight: positive("egress.lane_max_in_flight", e.lane_max_in_flight)? as usize,
        send_timeout: ms("egress.send_timeout_ms", e.send_timeout_ms)?,
        max_attempts: positive("egress.max_attempts", e.max_attempts)?.min(100) as u32,
        circuit_hold_max: ms("egress.circuit_hold_max_ms", e.circuit_hold_max_ms)?,
        history_window: Duration::from_secs(positive(
            "egress.history_window_secs",
            e.history_window_secs,
        )?),
        marketing_requires_opt_in: e.marketing_requires_opt_in,
        arrival_margin: (e.arrival_margin_ms > 0)
            .then(|| Duration::from_millis(e.arrival_margin_ms.min(10_000))),
        numbers,
        portfolios: portfolios(&e.portfolios)?,
    })
}

/// A Graph object id (WABA, app): empty (unknown) or digits.
fn graph_id(key: &str, v: &str) -> Result<Option<String>, ConfigError> {
    if v.is_empty() {
        return Ok(None);
    }
    if v.len() > 32 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(key, format!("{v:?} is not a Graph id (digits)")));
    }
    Ok(Some(v.to_string()))
}

fn portfolios(raw: &BTreeMap<String, RawPortfolio>) -> Result<Vec<PortfolioConfig>, ConfigError> {
    let mut portfolios = Vec::new();
    let mut portfolio_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, p) in raw {
        let key = format!("egress.portfolios.{name}");
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
    Ok(portfolios)
}

fn apps(
    raw: &BTreeMap<String, RawApp>,
    env: &dyn Env,
    opts: LoadOptions,
) -> Result<Vec<AppConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "apps",
            "configure at least one Meta app ([apps.default])",
        ));
    }
    let mut apps = Vec::new();
    for (name, a) in raw {
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
        let current = required_secret(
            &format!("apps.{name}.secret"),
            (&a.secret_env, &a.secret_file),
            env,
            opts.dev.then_some(DEV_APP_SECRET),
            "no app secret",
            "secret_file",
        )?;
        let mut secrets = vec![current];
        if let Some(prev) = secret(
            &format!("apps.{name}.previous_secret"),
            &a.previous_secret_env,
            &a.previous_secret_file,
            env,
        )? {
            secrets.push(prev);
        }
        let verify_token = required_secret(
            &format!("apps.{name}.verify_token"),
            (&a.verify_token_env, &a.verify_token_file),
            env,
            opts.dev.then_some(DEV_VERIFY_TOKEN),
            "no verify token",
            "verify_token_file",
        )?;
        apps.push(AppConfig {
            name: name.clone(),
            secrets,
            verify_token,
            app_id: graph_id(&format!("apps.{name}.app_id"), &a.app_id)?,
        });
    }
    Ok(apps)
}

fn tenants(
    raw: &BTreeMap<String, RawTenant>,
    env: &dyn Env,
    opts: LoadOptions,
) -> Result<Vec<TenantConfig>, ConfigError> {
    let mut tenants: Vec<TenantConfig> = Vec::new();
    for (name, t) in raw {
        let token = required_secret(
            &format!("tenants.{name}.token"),
            (&t.token_env, &t.token_file),
            env,
            opts.dev.then_some(DEV_API_TOKEN),
            "no API token",
            "token_file",
        )?;
        if let Some(a) = tenants.iter().find(|a| a.token == token) {
            return Err(invalid(
                format!("tenants.{name}.token"),
                format!("tenant {} has the same token", a.name),
            ));
        }
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
    Ok(tenants)
}

fn graph(g: &RawGraph, env: &dyn Env, opts: LoadOptions) -> Result<GraphConfig, ConfigError> {
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
    // Optional: without it, sends of numbers without their own token are
    // blocked (`unknown_number`), not a config error.
    let access_token = match secret("graph.access_token", token_env, &g.access_token_file, env)? {
        Some(s) => Some(s),
        None if opts.dev => Some(Secret::new(DEV_ACCESS_TOKEN)),
        None => None,
    };
    Ok(GraphConfig {
        base_url: g.base_url.trim_end_matches('/').to_string(),
        access_token,
    })
}

/// Checks the opt-out / opt-in lists: no empty entry, keywords short enough
/// to be a whole message, nothing in both lists.
pub(super) fn contacts_config(c: &RawContacts) -> Result<ContactsConfig, ConfigError> {
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
