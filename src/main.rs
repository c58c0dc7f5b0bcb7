//! The `wagate` binary: parses the command line and hands over to the library.
//! Configuration errors exit non-zero (2) before any port is bound.

mod cli;

/// mimalloc: the hot path allocates per request (bodies, records, futures);
/// glibc malloc showed up at ~16 % of CPU under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, DlqCommand, TopicsCommand};
use wagate::config::{self, LoadOptions, ProcessEnv};

fn main() -> ExitCode {
    let args = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match args.command {
        Command::Serve { config, dev } => return rt.block_on(serve(config, dev)),
        Command::CheckConfig { config } => cli::check_config(config.as_ref()),
        Command::Doctor(a) => return rt.block_on(cli::doctor(a)),
        Command::Topics {
            command: TopicsCommand::Create { config },
        } => rt.block_on(cli::topics_create(config.as_ref())),
        Command::Topics {
            command: TopicsCommand::Check { config },
        } => rt.block_on(cli::topics_check(config.as_ref())),
        Command::Sign { secret_env } => cli::sign(&secret_env),
        Command::Dlq {
            command:
                DlqCommand::Redrive {
                    code,
                    min_age_secs,
                    ready,
                    max,
                    dry_run,
                    config,
                },
        } => rt.block_on(cli::dlq_redrive(
            wagate::egress::redrive::Filter {
                code,
                min_age: min_age_secs.map(std::time::Duration::from_secs),
                ready_only: ready,
                max,
            },
            dry_run,
            config.as_ref(),
        )),
        Command::Replay {
            from_ms,
            to_ms,
            app,
            target_prefix,
            dry_run,
            contacts,
            metrics_file,
            config,
        } => rt.block_on(cli::replay(
            wagate::replay::ReplayOptions {
                from_ms,
                to_ms,
                app,
                target_prefix,
                dry_run,
                contacts,
            },
            metrics_file.as_ref(),
            config.as_ref(),
        )),
        Command::Tail {
            topic,
            from_beginning,
            max,
            idle_exit_secs,
            brokers,
            config,
        } => cli::tail(
            &topic,
            from_beginning,
            max,
            idle_exit_secs,
            brokers.as_deref(),
            config.as_ref(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WAGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn serve(path: Option<std::path::PathBuf>, dev: bool) -> ExitCode {
    let mut cfg = match config::load(path.as_deref(), &ProcessEnv, LoadOptions { dev }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log.json, &cfg.log.level);
    if dev && cfg.listen.ip().is_unspecified() && std::env::var_os("WAGATE_LISTEN").is_none() {
        // --dev is for one machine: do not listen on every interface by default.
        cfg.listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    // The mock cluster must outlive the gateway; it stays on this stack.
    let _mock = if dev {
        match wagate::kafka::mock::start(&cfg.kafka.topic_prefix, 3) {
            Ok(m) => {
                // The mock cluster speaks plaintext: the security
                // settings and the passthrough are not used with --dev.
                cfg.kafka.connection = wagate::kafka::Connection::plaintext(m.bootstrap_servers());
                // The mock cluster does not answer DescribeConfigs.
                cfg.kafka.check_record_limit = false;
                Some(m)
            }
            Err(e) => {
                eprintln!("error: --dev: cannot start the in-process Kafka: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    // --dev: a Graph API sandbox in-process; it posts signed status webhooks back.
    let _sandbox = if dev {
        let url = format!("http://{}/webhook", cfg.listen);
        let secret = cfg
            .app("default")
            .map(|a| a.secrets[0].expose().to_string())
            .unwrap_or_default();
        let mut sb_cfg = wagate::sandbox::sandbox_config_for_dev(url, secret);
        // Users the sandbox treats as username users (phone withheld in its
        // status webhooks): WAGATE_DEV_USERNAME_USERS=5511987650001,…
        sb_cfg.username_users = std::env::var("WAGATE_DEV_USERNAME_USERS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        match wagate::sandbox::Sandbox::start(sb_cfg).await {
            Ok(sb) => {
                cfg.graph.base_url = sb.base_url();
                wagate::media::dev::seed(&sb);
                Some(sb)
            }
            Err(e) => {
                eprintln!("error: --dev: cannot start the Graph API sandbox: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    if dev && std::env::var_os("WAGATE_MEDIA_STORE").is_none() {
        // --dev: media into a local folder, printed below.
        cfg.media.store = wagate::config::MediaStore::File(wagate::media::dev::folder());
    }
    let gw = match wagate::app::Gateway::start(cfg.clone()).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if dev {
        println!("wagate --dev");
        println!(
            "  kafka (in-process mock cluster): {}",
            cfg.kafka.connection.brokers()
        );
        println!("  webhooks:  http://{}/webhook", gw.public_addr);
        println!("  metrics:   http://{}/metrics", gw.internal_addr);
        println!("  sends:     POST http://{}/v1/messages (Authorization: Bearer $WAGATE_API_TOKEN, else the dev token)", gw.internal_addr);
        println!("  graph api: {} (sandbox)", cfg.graph.base_url);
        println!(
            "  check the setup: wagate doctor --dev --graph-url {} --brokers {}",
            cfg.graph.base_url,
            cfg.kafka.connection.brokers()
        );
        println!(
            "  read records: wagate tail inbound.messages --from-beginning --brokers {}",
            cfg.kafka.connection.brokers()
        );
        if cfg.media.enabled {
            println!(
                "  media:     {} (records: wagate tail inbound.media --from-beginning --brokers {})",
                gw.media.as_ref().map(|m| m.store().describe()).unwrap_or_default(),
                cfg.kafka.connection.brokers()
            );
        }
        println!("  secrets: $WAGATE_APP_SECRET / $WAGATE_VERIFY_TOKEN if set, else the development values in the README (never use --dev in production)");
    }
    wait_for_signal().await;
    tracing::info!("shutdown signal received");
    if gw.shutdown().await {
        ExitCode::SUCCESS
    } else {
        tracing::warn!("shutdown deadline passed before everything drained");
        ExitCode::from(1)
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
