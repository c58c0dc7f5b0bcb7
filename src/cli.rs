//! Command line: `serve`, `check-config`, `topics create|check`, `sign`, `dlq`, `replay`, `tail`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use wagate::config::{self, Config, LoadOptions, ProcessEnv};
use wagate::kafka;

#[derive(Parser, Debug)]
#[command(
    name = "wagate",
    version,
    about = "Gateway between Meta's WhatsApp Cloud API and Kafka"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (default: the embedded config/example.toml).
        #[arg(long, env = "WAGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Zero-setup mode: in-process Kafka (librdkafka's mock cluster) and
        /// documented development secrets. Never expose it to the internet.
        #[arg(long)]
        dev: bool,
    },
    /// Validate a config (and the environment it needs) and exit.
    CheckConfig {
        #[arg(long, env = "WAGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Print the X-Hub-Signature-256 value for the body on standard input.
    Sign {
        /// Name of the environment variable holding the app secret.
        #[arg(long, default_value = "WAGATE_APP_SECRET")]
        secret_env: String,
    },
    /// Dead-letter queue administration.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Re-derive events from the bodies kept on inbound.raw (received in
    /// [from, to)) with today's fan-out, into the configured prefix (the
    /// fleet's dedupe drops what is stored) or --target-prefix. Records keep
    /// their received_at_ms and carry wagate-replay: 1. Exits non-zero if
    /// any record was not acknowledged.
    Replay {
        /// Bodies received at or after this time (ms since the epoch).
        #[arg(long)]
        from_ms: Option<u64>,
        /// Bodies received before this time (ms since the epoch).
        #[arg(long)]
        to_ms: Option<u64>,
        /// Only bodies of this Meta app.
        #[arg(long)]
        app: Option<String>,
        /// Write into the topics of this prefix (created if missing)
        /// instead of the configured one.
        #[arg(long)]
        target_prefix: Option<String>,
        /// Count what would be produced, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also derive the contacts records (consent, windows, links),
        /// against the target's contacts state.
        #[arg(long)]
        contacts: bool,
        /// Also write the summary as Prometheus text to this file (for a
        /// node exporter's textfile collector).
        #[arg(long)]
        metrics_file: Option<PathBuf>,
        #[arg(long, env = "WAGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check what silently breaks webhooks and sends (token, subscribed_apps,
    /// callback overrides, numbers, an end-to-end self-test); exit 0 only
    /// without a `fail`.
    Doctor(DoctorArgs),
    /// Print a topic's records as JSON lines (key, headers, value).
    Tail {
        /// Topic: a full name, or a short one such as `inbound.messages`
        /// (the configured prefix is added).
        topic: String,
        /// Start at the oldest record instead of the newest.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Stop after this many seconds without a record.
        #[arg(long)]
        idle_exit_secs: Option<u64>,
        /// Bootstrap servers (default: kafka.brokers of the config).
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long, env = "WAGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// `wagate doctor`'s flags.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    #[arg(long, env = "WAGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Subscribe the app to every WABA it is not subscribed to, and say so.
    #[arg(long)]
    pub fix: bool,
    /// Use the development secrets of `serve --dev` (with the URLs it prints).
    #[arg(long)]
    pub dev: bool,
    /// The Graph API to check (default: graph.base_url), e.g. the sandbox of `serve --dev`.
    #[arg(long)]
    pub graph_url: Option<String>,
    /// Bootstrap servers (default: kafka.brokers).
    #[arg(long)]
    pub brokers: Option<String>,
    /// The URL Meta calls (default: server.public_url).
    #[arg(long)]
    pub public_url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Re-publish DLQ records to the requests topic (each at most once).
    Redrive {
        /// Only records with this error code (e.g. 131049).
        #[arg(long)]
        code: Option<String>,
        /// Only records deferred at least this many seconds ago.
        #[arg(long)]
        min_age_secs: Option<u64>,
        /// Only records whose retry_after_ms has passed.
        #[arg(long)]
        ready: bool,
        /// At most this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Count what would be redriven, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, env = "WAGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TopicsCommand {
    /// Create every topic wagate uses, with its cleanup policy.
    Create {
        #[arg(long, env = "WAGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Compare the live topics with the expected ones: exits non-zero
    /// naming every missing topic and wrong cleanup policy; partitions and
    /// retention that differ from the config are warnings.
    Check {
        #[arg(long, env = "WAGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// What the Kafka clients reported while a command failed (a TLS or SASL
/// problem names the setting to check), for its error message.
fn kafka_hint(conn: &kafka::Connection) -> String {
    match conn.diagnostics().recent(Duration::from_secs(120)) {
        Some(p) => format!(" ({})", p.hint()),
        None => String::new(),
    }
}

/// Loads a config for a tool command: secrets are not needed, so missing
/// ones fall back to placeholders that are never used.
fn tool_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(config::load(
        path.map(|p| p.as_path()),
        &ProcessEnv,
        LoadOptions { dev: true },
    )?)
}

pub fn check_config(path: Option<&PathBuf>) -> anyhow::Result<()> {
    let cfg = config::load(
        path.map(|p| p.as_path()),
        &ProcessEnv,
        LoadOptions::default(),
    )?;
    println!(
        "config OK: listen {} internal {} kafka {} ({}) prefix {:?} apps [{}] tenants [{}]",
        cfg.listen,
        cfg.internal_listen,
        cfg.kafka.connection.brokers(),
        cfg.kafka.connection.security_protocol(),
        cfg.kafka.topic_prefix,
        cfg.apps
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.tenants
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    Ok(())
}

pub async fn topics_create(path: Option<&PathBuf>) -> anyhow::Result<()> {
    let cfg = tool_config(path)?;
    let conn = &cfg.kafka.connection;
    let res = tokio::time::timeout(Duration::from_secs(30), kafka::create_topics(&cfg.kafka))
        .await
        .with_context(|| {
            format!(
                "kafka.brokers: no answer from {} within 30s{}",
                conn.brokers(),
                kafka_hint(conn)
            )
        })?
        .with_context(|| format!("creating topics on {}{}", conn.brokers(), kafka_hint(conn)))?;
    for (name, created) in res {
        println!("{name}\t{}", if created { "created" } else { "exists" });
    }
    Ok(())
}

pub async fn topics_check(path: Option<&PathBuf>) -> anyhow::Result<()> {
    let cfg = tool_config(path)?;
    let conn = &cfg.kafka.connection;
    let problems = kafka::check_topics(&cfg.kafka, Duration::from_secs(10))
        .await
        .with_context(|| {
            format!(
                "kafka.brokers: could not describe the topics on {} within 10s{}",
                conn.brokers(),
                kafka_hint(conn)
            )
        })?;
    let errors = problems
        .iter()
        .filter(|p| p.severity() == kafka::Severity::Error)
        .count();
    for p in &problems {
        let what = match p.severity() {
            kafka::Severity::Error => "error",
            kafka::Severity::Warning => "warning",
        };
        println!("{what}: {p}");
    }
    println!(
        "{} topics checked: {errors} errors, {} warnings",
        kafka::TopicId::ALL.len(),
        problems.len() - errors
    );
    if errors > 0 {
        anyhow::bail!("{errors} topic problems (see above)");
    }
    Ok(())
}

pub fn sign(secret_env: &str) -> anyhow::Result<()> {
    let secret = std::env::var(secret_env)
        .ok()
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!("--secret-env: the environment variable {secret_env} is not set")
        })?;
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .context("reading the body from standard input")?;
    println!(
        "{}",
        wagate::meta::signature::sign(secret.as_bytes(), &body)
    );
    Ok(())
}

pub fn tail(
    topic: &str,
    from_beginning: bool,
    max: Option<usize>,
    idle_exit_secs: Option<u64>,
    brokers: Option<&str>,
    path: Option<&PathBuf>,
) -> anyhow::Result<()> {
    let cfg = tool_config(path)?;
    let conn = match brokers {
        Some(b) => cfg.kafka.connection.with_brokers(b),
        None => cfg.kafka.connection.clone(),
    };
    let full = match kafka::TopicId::from_name(topic) {
        Some(t) => kafka::Topics::new(&cfg.kafka.topic_prefix)
            .name(t)
            .to_string(),
        None => topic.to_string(),
    };
    if max == Some(0) {
        bail!("--max must be at least 1");
    }
    let opts = kafka::ReadOptions {
        from_beginning,
        max,
        idle_timeout: idle_exit_secs.map(Duration::from_secs),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    kafka::read_topic(&conn, &full, &opts, |rec| {
        if write_err.is_none() {
            let line = serde_json::to_string(&rec).unwrap_or_default();
            if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        }
    })
    .with_context(|| {
        format!(
            "reading {full} from {}{}",
            conn.brokers(),
            kafka_hint(&conn)
        )
    })?;
    match write_err {
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub async fn dlq_redrive(
    filter: wagate::egress::redrive::Filter,
    dry_run: bool,
    path: Option<&PathBuf>,
) -> anyhow::Result<()> {
    let cfg = tool_config(path)?;
    let producer = kafka::KafkaProducer::new(&cfg.kafka)?;
    let r = wagate::egress::redrive::redrive(
        &cfg.kafka.connection,
        &cfg.kafka.topic_prefix,
        &producer,
        &filter,
        dry_run,
    )
    .await
    .with_context(|| {
        format!(
            "dlq redrive on {}{}",
            cfg.kafka.connection.brokers(),
            kafka_hint(&cfg.kafka.connection)
        )
    })?;
    println!(
        "scanned {} matched {} redriven {}{}",
        r.scanned,
        r.matched,
        r.redriven,
        if dry_run { " (dry run)" } else { "" }
    );
    Ok(())
}

pub async fn replay(
    opts: wagate::replay::ReplayOptions,
    metrics_file: Option<&PathBuf>,
    path: Option<&PathBuf>,
) -> anyhow::Result<()> {
    let cfg = tool_config(path)?;
    let conn = cfg.kafka.connection.clone();
    let target = opts
        .target_prefix
        .clone()
        .unwrap_or_else(|| cfg.kafka.topic_prefix.clone());
    eprintln!(
        "replay: {}inbound.raw → prefix {target:?}{}{}{}",
        cfg.kafka.topic_prefix,
        opts.app
            .as_deref()
            .map(|a| format!(", app {a}"))
            .unwrap_or_default(),
        if opts.contacts { ", with contacts" } else { "" },
        if opts.dry_run { " (dry run)" } else { "" },
    );
    let summary = wagate::replay::run(&cfg, &opts, |s| eprintln!("replay: {}", s.line()))
        .await
        .with_context(|| format!("replay on {}{}", conn.brokers(), kafka_hint(&conn)))?;
    println!(
        "{}{}",
        summary.line(),
        if opts.dry_run { " (dry run)" } else { "" }
    );
    if let Some(f) = metrics_file {
        std::fs::write(f, summary.prometheus())
            .with_context(|| format!("--metrics-file {}", f.display()))?;
    }
    if summary.failed() > 0 {
        bail!(
            "{} records were not acknowledged: run the same replay again (dedupe drops what was stored)",
            summary.failed()
        );
    }
    Ok(())
}

/// `wagate doctor`: prints one line per check; exit 0 without a `fail`,
/// 1 with one, 2 on a config error.
pub async fn doctor(a: DoctorArgs) -> std::process::ExitCode {
    let mut cfg = match config::load(a.config.as_deref(), &ProcessEnv, LoadOptions { dev: a.dev }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(u) = a.graph_url {
        cfg.graph.base_url = u.trim_end_matches('/').to_string();
    }
    if let Some(b) = a.brokers {
        cfg.kafka.connection = cfg.kafka.connection.with_brokers(b);
    }
    if let Some(u) = a.public_url {
        cfg.public_url = Some(u.trim_end_matches('/').to_string());
    }
    let mut extra_wabas = Vec::new();
    if a.dev {
        // `serve --dev`'s sandbox: its app, its WABA, its public listener.
        use wagate::sandbox::account;
        for app in cfg.apps.iter_mut().filter(|a| a.app_id.is_none()) {
            app.app_id = Some(account::APP_ID.to_string());
        }
        if cfg.public_url.is_none() {
            let mut l = cfg.listen;
            if l.ip().is_unspecified() {
                l.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            cfg.public_url = Some(format!("http://{l}"));
        }
        if cfg.egress.numbers.values().all(|n| n.waba_id.is_none()) {
            extra_wabas.push(account::WABA_ID.to_string());
        }
    }
    let opts = wagate::doctor::Options {
        fix: a.fix,
        no_kafka: false,
        extra_wabas,
    };
    let checks = wagate::doctor::run(&cfg, &opts, &mut |c| println!("{c}")).await;
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    use wagate::doctor::Status;
    let fails = count(Status::Fail);
    println!(
        "{} checks: {} ok, {} warn, {fails} fail, {} skipped",
        checks.len(),
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Skip)
    );
    if fails > 0 {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
