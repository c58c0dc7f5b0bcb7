//! `wagate-loadgen run`: keep-alive HTTP/1.1 connections, each driven by its
//! own task, posting signed webhooks until the duration or the request
//! budget runs out.
//!
//! Bounds: the run stops at warm-up + duration or after `--max-requests`
//! requests, whichever comes first; every connect and every request has a
//! timeout and nothing waits past the end of the run plus one timeout;
//! each connection reconnects after errors at most [`MAX_RECONNECTS`] times.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::payload::{Generator, Mix, Signer};
use crate::report::{Report, RunInfo, Tally};
use crate::target::{loopback_target, Target};

/// Reconnects after an error, per connection, before it gives up.
pub const MAX_RECONNECTS: u64 = 1000;

/// Longest backoff between failed connects.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Where to post; the host must be loopback (127.0.0.0/8, localhost, [::1]).
    #[arg(long, default_value = "http://127.0.0.1:8080/webhook")]
    pub url: String,
    /// Name of the environment variable that holds the HMAC app secret.
    #[arg(long, default_value = "WAGATE_APP_SECRET")]
    pub secret_env: String,
    /// Keep-alive HTTP/1.1 connections, each driven by its own task.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: u64,
    /// Seconds measured after the warm-up (1..=600).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub duration_secs: u64,
    /// Stop after this many requests in all, warm-up included (1..=50,000,000).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=50_000_000))]
    pub max_requests: u64,
    /// Requests/s overall, spread over the connections (open loop); 0 = closed
    /// loop, as fast as responses come back.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub rate: u64,
    /// Seconds of warm-up before the measurement (0..=60); not counted.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub warmup_secs: u64,
    /// Percentages of request kinds, adding up to 100.
    #[arg(long, default_value = "messages=60,statuses=30,batch=10")]
    pub mix: String,
    /// Events per batch request (1..=1000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch_events: u32,
    /// Distinct business phone_number_ids to spread over (1..=100,000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub numbers: u64,
    /// Distinct users (customers) the events come from (1..=10,000,000):
    /// the default makes nearly every event's user new to the gateway;
    /// a few thousand is a steady state where users write again.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub customers: u64,
    /// Timeout for one connect or one request, in milliseconds (1..=60,000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,
    /// PEM CA certificate(s) to trust for an `https://` URL (required with
    /// one: the generator trusts nothing else). TLS 1.3/1.2, ALPN http/1.1.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Print the final report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Validates the arguments, runs, prints the report. Exit 2 on usage
/// errors, 1 if not a single request got a 2xx, 0 otherwise.
pub async fn main(a: RunArgs) -> ExitCode {
    let target = match loopback_target(&a.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wagate-loadgen: refusing --url: {e}");
            return ExitCode::from(2);
        }
    };
    let secret = match std::env::var(&a.secret_env) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => {
            eprintln!("wagate-loadgen: --secret-env: ${} is empty", a.secret_env);
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!(
                "wagate-loadgen: --secret-env: ${} is not set (it must hold the app secret)",
                a.secret_env
            );
            return ExitCode::from(2);
        }
    };
    let mix = match Mix::parse(&a.mix) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("wagate-loadgen: --mix: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match (target.tls, &a.tls_ca) {
        (false, None) => None,
        (false, Some(_)) => {
            eprintln!("wagate-loadgen: --tls-ca is for an https:// --url");
            return ExitCode::from(2);
        }
        (true, None) => {
            eprintln!("wagate-loadgen: an https:// --url needs --tls-ca FILE (the CA to trust)");
            return ExitCode::from(2);
        }
        (true, Some(ca)) => match tls_connector(ca, &target.server_name) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("wagate-loadgen: --tls-ca: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let generator = Generator::new(mix, a.batch_events, a.numbers).with_customers(a.customers);
    eprintln!(
        "wagate-loadgen: {} connections to {} for {} s warm-up + {} s, at most {} requests, {}; event ids wamid.LT{}...",
        a.connections,
        a.url,
        a.warmup_secs,
        a.duration_secs,
        a.max_requests,
        if a.rate > 0 {
            format!("open loop at {} req/s", a.rate)
        } else {
            "closed loop".into()
        },
        generator.prefix()
    );
    let cfg = RunConfig {
        target,
        signer: Signer::new(secret.as_bytes()),
        generator,
        connections: a.connections as usize,
        warmup: Duration::from_secs(a.warmup_secs),
        duration: Duration::from_secs(a.duration_secs),
        max_requests: a.max_requests,
        rate: a.rate,
        timeout: Duration::from_millis(a.timeout_ms),
        tls,
    };
    let out = run(cfg).await;
    let info = RunInfo {
        url: a.url.clone(),
        connections: a.connections as usize,
        rate: a.rate,
        mix: format!(
            "messages={},statuses={},batch={}",
            mix.messages, mix.statuses, mix.batch
        ),
        batch_events: a.batch_events,
        numbers: a.numbers,
        warmup_secs: a.warmup_secs,
        stopped_by_max_requests: out.stopped_by_max_requests,
    };
    let report = Report::new(&info, &out.tally, out.measured_secs);
    if a.json {
        println!("{}", report.to_json());
    } else {
        println!("{}", report.to_text());
    }
    if out.tally.successes() == 0 {
        eprintln!("wagate-loadgen: not a single request got a 2xx response");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// Everything a run needs, validated.
pub struct RunConfig {
    pub target: Target,
    pub signer: Signer,
    pub generator: Generator,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_requests: u64,
    /// Requests/s overall; 0 = closed loop.
    pub rate: u64,
    pub timeout: Duration,
    /// `https://`: the connector (trusting `--tls-ca`) and the server name.
    pub tls: Option<Tls>,
}

/// A TLS client for the target: its connector and the name it checks.
#[derive(Clone)]
pub struct Tls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// A TLS client trusting the PEM CA(s) in `ca`, for `server_name`.
pub fn tls_connector(ca: &std::path::Path, server_name: &str) -> Result<Tls, String> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CERTIFICATE", ca.display()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("{server_name}: {e}"))?;
    Ok(Tls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// What a run produced.
pub struct RunOutcome {
    pub tally: Tally,
    pub measured_secs: f64,
    pub stopped_by_max_requests: bool,
}

struct Shared {
    cfg: RunConfig,
    uri: Uri,
    host: HeaderValue,
    issued: AtomicU64,
    budget_exhausted: AtomicBool,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Nothing waits past this: the end plus one timeout.
    hard_end: Instant,
    /// Time between two requests of one connection, in open loop.
    interval: Option<Duration>,
}

/// Runs the load and merges what every connection saw.
pub async fn run(cfg: RunConfig) -> RunOutcome {
    let uri: Uri = cfg
        .target
        .path_and_query
        .parse()
        .expect("a path taken from a parsed URI");
    let host = HeaderValue::from_str(&cfg.target.host_header).expect("a parsed authority");
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let interval =
        (cfg.rate > 0).then(|| Duration::from_secs_f64(cfg.connections as f64 / cfg.rate as f64));
    let shared = Arc::new(Shared {
        uri,
        host,
        issued: AtomicU64::new(0),
        budget_exhausted: AtomicBool::new(false),
        start,
        measure_from,
        end,
        hard_end: end + cfg.timeout,
        interval,
        cfg,
    });
    let mut tasks = JoinSet::new();
    for i in 0..shared.cfg.connections {
        tasks.spawn(connection(shared.clone(), i));
    }
    let mut tally = Tally::default();
    let give_up_at = shared.hard_end + Duration::from_secs(2);
    loop {
        match timeout_at(give_up_at, tasks.join_next()).await {
            Ok(Some(Ok(t))) => tally.merge(&t),
            Ok(Some(Err(e))) => eprintln!("wagate-loadgen: a connection task failed: {e}"),
            Ok(None) => break,
            Err(_) => {
                eprintln!(
                    "wagate-loadgen: {} connection tasks still running past the end; aborted",
                    tasks.len()
                );
                tasks.abort_all();
                break;
            }
        }
    }
    let finished = Instant::now().min(shared.end);
    let measured_secs = finished
        .saturating_duration_since(shared.measure_from)
        .as_secs_f64();
    RunOutcome {
        tally,
        measured_secs,
        stopped_by_max_requests: shared.budget_exhausted.load(Ordering::Relaxed),
    }
}

/// Opens one keep-alive HTTP/1.1 connection (over TLS with `tls`), within
/// `deadline`.
async fn connect(
    target: &Target,
    tls: Option<&Tls>,
    deadline: Instant,
) -> Result<SendRequest<Full<Bytes>>, &'static str> {
    async fn http1<I>(io: I) -> Result<SendRequest<Full<Bytes>>, &'static str>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(io))
                .await
                .map_err(|_| "handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
    let open = async {
        let stream = tokio::net::TcpStream::connect(target.addr)
            .await
            .map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        match tls {
            None => http1(stream).await,
            Some(t) => {
                let s = t
                    .connector
                    .connect(t.server_name.clone(), stream)
                    .await
                    .map_err(|_| "tls handshake")?;
                http1(s).await
            }
        }
    };
    timeout_at(deadline, open).await.map_err(|_| "timeout")?
}

enum Outcome {
    Response { status: u16, close: bool },
    Io,
    Timeout,
}

/// Sends one request and reads the whole response, within `deadline`.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    deadline: Instant,
) -> Outcome {
    let go = async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let close = resp
            .headers()
            .get(CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        resp.into_body().collect().await?;
        Ok::<_, hyper::Error>((status, close))
    };
    match timeout_at(deadline, go).await {
        Ok(Ok((status, close))) => Outcome::Response { status, close },
        Ok(Err(_)) => Outcome::Io,
        Err(_) => Outcome::Timeout,
    }
}

/// One connection's loop; returns what it saw.
async fn connection(s: Arc<Shared>, index: usize) -> Tally {
    let cfg = &s.cfg;
    let signature = HeaderName::from_static("x-hub-signature-256");
    let json = HeaderValue::from_static("application/json");
    let mut t = Tally::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut reconnects_after_error = 0u64;
    let mut failed_connects_in_a_row = 0u32;
    // In open loop, spread the connections' first requests over one interval.
    let mut next = s
        .interval
        .map(|iv| s.start + iv.mul_f64(index as f64 / cfg.connections as f64));
    loop {
        // The intended start of this request (open loop), or none.
        let scheduled = match (next.as_mut(), s.interval) {
            (Some(at), Some(iv)) => {
                let this = *at;
                *at += iv;
                if this >= s.end {
                    break;
                }
                sleep_until(this).await;
                Some(this)
            }
            _ => None,
        };
        if Instant::now() >= s.end {
            break;
        }
        if sender.as_ref().is_some_and(|snd| snd.is_closed()) {
            sender = None;
        }
        if sender.is_none() {
            let deadline = (Instant::now() + cfg.timeout).min(s.hard_end);
            t.connects += 1;
            match connect(&cfg.target, cfg.tls.as_ref(), deadline).await {
                Ok(snd) => {
                    failed_connects_in_a_row = 0;
                    sender = Some(snd);
                }
                Err(_) => {
                    t.errors.connect += 1;
                    reconnects_after_error += 1;
                    if reconnects_after_error > MAX_RECONNECTS {
                        break;
                    }
                    failed_connects_in_a_row = failed_connects_in_a_row.saturating_add(1);
                    let backoff = Duration::from_millis(10)
                        .saturating_mul(1 << failed_connects_in_a_row.min(6))
                        .min(MAX_BACKOFF);
                    sleep_until((Instant::now() + backoff).min(s.end)).await;
                    continue;
                }
            }
        }
        let Some(snd) = sender.as_mut() else {
            continue;
        };
        if s.issued.fetch_add(1, Ordering::Relaxed) >= cfg.max_requests {
            s.budget_exhausted.store(true, Ordering::Relaxed);
            break;
        }

        let g0 = std::time::Instant::now();
        let body = cfg.generator.next_body();
        let sig = cfg.signer.sign(&body.bytes);
        let events = body.events;
        let mut req = Request::new(Full::new(Bytes::from(body.bytes)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = s.uri.clone();
        let h = req.headers_mut();
        h.insert(HOST, s.host.clone());
        h.insert(CONTENT_TYPE, json.clone());
        h.insert(
            signature.clone(),
            HeaderValue::from_bytes(&sig).expect("ASCII signature"),
        );
        t.gen_nanos += g0.elapsed().as_nanos() as u64;
        t.bodies += 1;

        let sent_at = Instant::now();
        let deadline = (sent_at + cfg.timeout).min(s.hard_end);
        let outcome = exchange(snd, req, deadline).await;
        let done = Instant::now();
        match outcome {
            Outcome::Response { status, close } => {
                // Open loop measures from the intended start, so a server
                // that falls behind shows it (no coordinated omission).
                let started = scheduled.unwrap_or(sent_at).min(sent_at);
                if sent_at >= s.measure_from {
                    let us = done.saturating_duration_since(started).as_micros() as u64;
                    t.record(status, events, us);
                } else {
                    t.warmup_requests += 1;
                    if (200..300).contains(&status) {
                        t.warmup_ok += 1;
                    }
                }
                if close {
                    sender = None;
                }
            }
            Outcome::Io | Outcome::Timeout => {
                if matches!(outcome, Outcome::Io) {
                    t.errors.io += 1;
                } else {
                    t.errors.timeout += 1;
                }
                sender = None;
                reconnects_after_error += 1;
                if reconnects_after_error > MAX_RECONNECTS {
                    break;
                }
            }
        }
    }
    t
}
