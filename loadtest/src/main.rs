//! `wagate-loadgen`: a bounded load generator that posts signed Meta-shaped
//! webhooks, and a bare hyper server to compare against.
//!
//! Every loop is bounded by a request count and a duration, and only loopback
//! targets are accepted.

mod payload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(
    name = "wagate-loadgen",
    about = "Bounded load generator for wagate (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Post signed webhooks and report throughput and latency.
    Run(RunArgs),
    /// A bare hyper server that reads the body and answers 200 (the ceiling).
    Baseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 600)]
        max_secs: u64,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    #[arg(long, default_value = "http://127.0.0.1:8080/webhook")]
    url: String,
    /// Environment variable holding the app secret.
    #[arg(long, default_value = "WAGATE_APP_SECRET")]
    secret_env: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Hard cap 600.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Hard cap 50,000,000.
    #[arg(long, default_value_t = 1_000_000)]
    max_requests: u64,
    /// Requests/s overall (0 = closed loop).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Requests in the warm-up are not counted.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Percentages of request kinds.
    #[arg(long, default_value = "messages=60,statuses=30,batch=10")]
    mix: String,
    /// Events per batch request.
    #[arg(long, default_value_t = 20)]
    batch_events: usize,
    /// Distinct business numbers.
    #[arg(long, default_value_t = 50)]
    numbers: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match cli.cmd {
        Cmd::Baseline { listen, max_secs } => {
            rt.block_on(baseline(listen, max_secs.min(24 * 3600)))
        }
        Cmd::Run(args) => rt.block_on(run(args)),
    }
}

/// Accepts only loopback targets: 127.0.0.0/8, localhost, [::1].
pub fn loopback_target(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs on loopback are accepted")?;
    let hostport = rest.split('/').next().unwrap_or("");
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| format!("bad port in {url}"))?,
        ),
        None => (hostport, 80),
    };
    let ip: std::net::IpAddr = match host {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{host}: not a loopback address"))?,
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{ip}: load is only ever sent to loopback addresses"
        ));
    }
    Ok(SocketAddr::new(ip, port))
}

async fn baseline(listen: SocketAddr, max_secs: u64) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return ExitCode::from(2);
        }
    };
    println!("listening on {}", listener.local_addr().unwrap());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let serve = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"OK"),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = tokio::time::sleep(Duration::from_secs(max_secs)) => {}
    }
    ExitCode::SUCCESS
}

struct Shared {
    gen: payload::Generator,
    sent: AtomicU64,
    max: u64,
    secret: Vec<u8>,
    path: String,
    host: String,
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    requests: u64,
    events: u64,
}

async fn run(a: RunArgs) -> ExitCode {
    let addr = match loopback_target(&a.url) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: --url: {e}");
            return ExitCode::from(2);
        }
    };
    let Ok(secret) = std::env::var(&a.secret_env) else {
        eprintln!("error: --secret-env: {} is not set", a.secret_env);
        return ExitCode::from(2);
    };
    let mix = match payload::Mix::parse(&a.mix) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: --mix: {e}");
            return ExitCode::from(2);
        }
    };
    let duration = Duration::from_secs(a.duration_secs.clamp(1, 600));
    let warmup = Duration::from_secs(a.warmup_secs.min(60));
    let path = format!(
        "/{}",
        a.url
            .trim_start_matches("http://")
            .split_once('/')
            .map(|x| x.1)
            .unwrap_or("")
    );
    let shared = Arc::new(Shared {
        gen: payload::Generator::new(
            mix,
            a.batch_events.clamp(1, 1000),
            a.numbers.clamp(1, 100_000),
        ),
        sent: AtomicU64::new(0),
        max: a.max_requests.min(50_000_000),
        secret: secret.into_bytes(),
        path,
        host: addr.to_string(),
    });
    let conns = a.connections.clamp(1, 10_000);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let per_conn_interval =
        (a.rate > 0).then(|| Duration::from_secs_f64(conns as f64 / a.rate as f64));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let s = shared.clone();
        tasks.push(tokio::spawn(conn_loop(
            s,
            addr,
            measure_from,
            end,
            per_conn_interval,
        )));
    }
    let mut total = Tally {
        hist: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        ..Default::default()
    };
    for t in tasks {
        if let Ok(t) = t.await {
            if let (Some(h), Some(th)) = (total.hist.as_mut(), t.hist.as_ref()) {
                let _ = h.add(th);
            }
            for (k, v) in t.statuses {
                *total.statuses.entry(k).or_default() += v;
            }
            total.transport_errors += t.transport_errors;
            total.requests += t.requests;
            total.events += t.events;
        }
    }
    let secs = (Instant::now().min(end) - measure_from)
        .as_secs_f64()
        .max(0.001);
    report(&a, &total, secs);
    if total.statuses.get(&200).copied().unwrap_or(0) == 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

async fn conn_loop(
    s: Arc<Shared>,
    addr: SocketAddr,
    measure_from: Instant,
    end: Instant,
    interval: Option<Duration>,
) -> Tally {
    let mut t = Tally {
        hist: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        ..Default::default()
    };
    let mut sender = None;
    let mut reconnects = 0u32;
    let mut next = Instant::now();
    while Instant::now() < end {
        if s.sent.fetch_add(1, Ordering::Relaxed) >= s.max {
            break;
        }
        if let Some(iv) = interval {
            next += iv;
            tokio::time::sleep_until(next.into()).await;
        }
        if sender.is_none() {
            if reconnects > 1000 {
                break;
            }
            reconnects += 1;
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    match hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(
                        stream,
                    ))
                    .await
                    {
                        Ok((snd, conn)) => {
                            tokio::spawn(conn);
                            sender = Some(snd);
                        }
                        Err(_) => {
                            t.transport_errors += 1;
                            continue;
                        }
                    }
                }
                Err(_) => {
                    t.transport_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let (body, events) = s.gen.next_body();
        let sig = payload::sign(&s.secret, &body);
        let req = Request::post(&s.path)
            .header("host", &s.host)
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sig)
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let t0 = Instant::now();
        let snd = sender.as_mut().expect("connected");
        if snd.ready().await.is_err() {
            sender = None;
            t.transport_errors += 1;
            continue;
        }
        match snd.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let ok = resp.into_body().collect().await.is_ok();
                let took = t0.elapsed();
                if t0 >= measure_from && Instant::now() <= end {
                    t.requests += 1;
                    *t.statuses.entry(status).or_default() += 1;
                    if status == 200 {
                        t.events += events as u64;
                    }
                    let _ = t
                        .hist
                        .as_mut()
                        .unwrap()
                        .record(took.as_micros().max(1) as u64);
                }
                if !ok {
                    sender = None;
                }
            }
            Err(_) => {
                sender = None;
                t.transport_errors += 1;
            }
        }
    }
    t
}

fn report(a: &RunArgs, t: &Tally, secs: f64) {
    let h = t.hist.as_ref().unwrap();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let statuses: BTreeMap<String, u64> = t
        .statuses
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let non200: u64 = t
        .statuses
        .iter()
        .filter(|(k, _)| **k != 200)
        .map(|(_, v)| *v)
        .sum();
    if a.json {
        let v = serde_json::json!({
            "url": a.url, "connections": a.connections, "seconds": secs,
            "requests": t.requests, "events": t.events, "requests_per_sec": t.requests as f64 / secs,
            "events_per_sec": t.events as f64 / secs, "statuses": statuses, "non_200": non200,
            "transport_errors": t.transport_errors,
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0},
        });
        println!("{v}");
    } else {
        println!(
            "{:.1} s, {} requests ({:.0}/s), {} events ({:.0}/s), non-200 {}, transport errors {}, statuses {:?}, latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            secs,
            t.requests,
            t.requests as f64 / secs,
            t.events,
            t.events as f64 / secs,
            non200,
            t.transport_errors,
            statuses,
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(loopback_target("http://127.0.0.1:8080/webhook").is_ok());
        assert!(loopback_target("http://127.1.2.3:8080/webhook").is_ok());
        assert!(loopback_target("http://localhost:1/").is_ok());
        assert!(loopback_target("http://[::1]:8080/webhook").is_ok());
        assert!(loopback_target("http://10.0.0.1/webhook").is_err());
        assert!(loopback_target("http://192.168.1.1:80/").is_err());
        assert!(loopback_target("http://example.com/").is_err());
        assert!(loopback_target("https://127.0.0.1/").is_err());
    }
}
