//! Egress under load: the real `wagate` binary (a child process) drains
//! `wa.outbound.requests` on a real broker (Tansu) into the Graph API
//! sandbox, which runs in this process on its own runtime thread, all on
//! loopback, with 1,000 business numbers.
//!
//! (1) ceiling: quotas far above what the machine can send (80/s each, 80,000/s
//!     in all); requests pre-produced; reported: sends/s from the first to the
//!     last arrival at the sandbox, and the gateway's CPU time (utime + stime
//!     from `/proc/<pid>/stat`) per send.
//! (2) utilisation: quotas of 1, 2 or 3 /s (≈ 2,000/s in all, below the
//!     ceiling), 25 s of work per number; from the sandbox's arrival times:
//!     limit violations (a send that makes some one-second window hold more
//!     than the number's quota; target 0) and utilisation (achieved ÷ allowed
//!     rate over each number's steady part, i.e. without its first and last
//!     second; target ≥ 0.95).
//!
//! The sandbox does not enforce throughput (`default_throughput = 0`, no pair
//! rate): the gateway is what is measured, and a 130429 would make it back
//! off. Violations are counted from the arrival log with the sandbox's own
//! rule (a send is over quota when the `quota` sends before it all arrived
//! less than one second earlier). Every request must get exactly one
//! `accepted` result and reach the sandbox exactly once (asserted).
//!
//! Requests are produced before the gateway starts, one record per batch
//! (see [`produce`]). A run ends when the gateway's consumer group has
//! committed every offset: it commits only past requests whose result Kafka
//! acknowledged. CPU times are sampled every 10 ms for the gateway, this
//! process (≈ the sandbox) and the broker (found by its port, if local).
//!
//! Needs a broker at `WAGATE_TEST_BROKERS`:
//!   WAGATE_TEST_BROKERS=$(scripts/tansu.sh start target/bench-env) \
//!     cargo bench --bench egress_load
//!   scripts/tansu.sh stop target/bench-env
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it uses a smoke
//! size: 1,000 requests for (1), 100 numbers × 5 s for (2).
//! Arguments that do not start with `--` select scenarios by name
//! (`cargo bench --bench egress_load -- ceiling`). `WAGATE_BENCH_GATEWAY_ENV`
//! (`K=V,K=V`) adds environment variables to the gateway's, e.g.
//! `WAGATE_EGRESS_ARRIVAL_MARGIN_MS=0` to try strict windows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use wagate::config::{self, LoadOptions};
use wagate::kafka;
use wagate::sandbox::{Sandbox, SandboxConfig};

// The allocator the `wagate` binary uses (here: the sandbox's).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "bench-app-secret";
const WINDOW: Duration = Duration::from_secs(1);
/// Business numbers in the ceiling run, and in the full utilisation run.
const NUMBERS: usize = 1_000;

struct Sizes {
    full: bool,
    /// (1): requests in all, spread evenly over [`NUMBERS`] numbers.
    ceiling_requests: usize,
    /// (2): numbers, and seconds of work for each.
    util_numbers: usize,
    util_secs: u32,
}

fn sizes() -> Sizes {
    if std::env::args().any(|a| a == "--bench") {
        Sizes {
            full: true,
            ceiling_requests: 30_000,
            util_numbers: NUMBERS,
            util_secs: 25,
        }
    } else {
        Sizes {
            full: false,
            ceiling_requests: 1_000,
            util_numbers: 100,
            util_secs: 5,
        }
    }
}

fn selected(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

#[path = "../tests/common/broker.rs"]
mod broker;
use broker::{brokers, unique_prefix};

// ---------------------------------------------------------------- CPU time

/// Clock ticks per second of `/proc/*/stat` times.
fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// (utime, stime) of a process in clock ticks; `pid` may be `self`.
fn proc_times(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3,
    // utime 14, stime 15.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// (busy, total) ticks of the whole machine, all cores.
fn machine_times() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

/// TCP connections this machine has opened (`ActiveOpens` of /proc/net/snmp).
fn tcp_active_opens() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "ActiveOpens")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The process listening on the broker's loopback port (Tansu), if it can
/// be found in this machine's `/proc`.
fn broker_pid(brokers: &str) -> Option<u32> {
    let port: u16 = brokers
        .split(',')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let suffix = format!(":{port:04X}");
    let mut sockets = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let c: Vec<&str> = line.split_whitespace().collect();
            if c.len() > 9 && c[3] == "0A" && c[1].ends_with(&suffix) {
                sockets.insert(format!("socket:[{}]", c[9]));
            }
        }
    }
    if sockets.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if sockets.contains(target.to_string_lossy().as_ref()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    at: Option<Instant>,
    gw_user: u64,
    gw_sys: u64,
    bench: u64,
    broker: u64,
    busy: u64,
    total: u64,
}

impl Sample {
    fn take(gw: &str, broker: Option<&str>) -> Sample {
        let (gw_user, gw_sys) = proc_times(gw).unwrap_or_default();
        let bench = proc_times("self").map_or(0, |(u, s)| u + s);
        let broker = broker.and_then(proc_times).map_or(0, |(u, s)| u + s);
        let (busy, total) = machine_times().unwrap_or_default();
        Sample {
            at: Some(Instant::now()),
            gw_user,
            gw_sys,
            bench,
            broker,
            busy,
            total,
        }
    }
}

/// Samples CPU times every 10 ms until stopped (or `max` has passed).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Samples>,
}

impl Sampler {
    fn start(gw_pid: u32, broker: Option<u32>, max: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cpu-sampler".into())
            .spawn(move || {
                let (gw, broker) = (gw_pid.to_string(), broker.map(|p| p.to_string()));
                let end = Instant::now() + max;
                let mut out = Vec::with_capacity(4096);
                let mut peak_fds = 0;
                while !s.load(Ordering::Relaxed) && Instant::now() < end && out.len() < 200_000 {
                    out.push(Sample::take(&gw, broker.as_deref()));
                    if out.len() % 10 == 0 {
                        let fds =
                            std::fs::read_dir(format!("/proc/{gw}/fd")).map_or(0, |d| d.count());
                        peak_fds = peak_fds.max(fds);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                out.push(Sample::take(&gw, broker.as_deref()));
                Samples {
                    samples: out,
                    peak_fds,
                }
            })
            .unwrap();
        Sampler { stop, thread }
    }

    fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

struct Samples {
    samples: Vec<Sample>,
    /// Most file descriptors the gateway held (sampled every 100 ms): its
    /// sockets, mostly connections to the sandbox.
    peak_fds: usize,
}

impl Samples {
    /// The last sample taken at or before `t` (else the first).
    fn at(&self, t: Instant) -> Sample {
        let i = self
            .samples
            .partition_point(|s| s.at.is_some_and(|a| a <= t));
        self.samples[i.saturating_sub(1)]
    }
}

/// CPU used between two samples, in µs (per consumer) and machine shares.
struct Usage {
    gw_us: f64,
    gw_user_us: f64,
    gw_sys_us: f64,
    bench_us: f64,
    broker_us: f64,
    /// Busy share of all cores, 0..1.
    machine_busy: f64,
    /// Wall time between the samples.
    wall_us: f64,
}

fn usage(a: Sample, b: Sample, tck: u64) -> Usage {
    let us = |ticks: u64| ticks as f64 * 1e6 / tck as f64;
    let gw_user_us = us(b.gw_user.saturating_sub(a.gw_user));
    let gw_sys_us = us(b.gw_sys.saturating_sub(a.gw_sys));
    let total = b.total.saturating_sub(a.total);
    Usage {
        gw_us: gw_user_us + gw_sys_us,
        gw_user_us,
        gw_sys_us,
        bench_us: us(b.bench.saturating_sub(a.bench)),
        broker_us: us(b.broker.saturating_sub(a.broker)),
        machine_busy: if total > 0 {
            b.busy.saturating_sub(a.busy) as f64 / total as f64
        } else {
            0.0
        },
        wall_us: match (a.at, b.at) {
            (Some(x), Some(y)) => y.saturating_duration_since(x).as_secs_f64() * 1e6,
            _ => 0.0,
        },
    }
}

fn print_usage(tag: &str, what: &str, u: &Usage, sends: usize, broker_known: bool) {
    let cores = |x: f64| {
        if u.wall_us > 0.0 {
            x / u.wall_us
        } else {
            0.0
        }
    };
    eprintln!(
        "egress_load[{tag}]: {what}: gateway CPU {:.2} s ({:.0} % user, {:.0} % system) = \
         {:.1} µs per send, {:.2} cores; sandbox (bench process) {:.2} cores; broker {}; \
         machine busy {:.0} % of {} cores",
        u.gw_us / 1e6,
        100.0 * u.gw_user_us / u.gw_us.max(1.0),
        100.0 * u.gw_sys_us / u.gw_us.max(1.0),
        u.gw_us / sends.max(1) as f64,
        cores(u.gw_us),
        cores(u.bench_us),
        if broker_known {
            format!("{:.2} cores", cores(u.broker_us))
        } else {
            "not found".into()
        },
        100.0 * u.machine_busy,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
}

// ---------------------------------------------------------------- sandbox

/// The sandbox on its own runtime and thread, like another server.
struct SandboxThread {
    sb: Option<Sandbox>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SandboxThread {
    fn start() -> SandboxThread {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sandbox".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("sandbox-rt")
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let cfg = SandboxConfig {
                        listen: "127.0.0.1:0".parse().unwrap(),
                        default_throughput: 0,
                        pair_rate: None,
                        ..Default::default()
                    };
                    let _ = tx.send(Sandbox::start(cfg).await.expect("sandbox starts"));
                    let _ = stop_rx.await;
                });
            })
            .unwrap();
        let sb = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("sandbox started");
        SandboxThread {
            sb: Some(sb),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn get(&self) -> &Sandbox {
        self.sb.as_ref().expect("running")
    }
}

impl Drop for SandboxThread {
    fn drop(&mut self) {
        drop(self.sb.take());
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- gateway

/// The gateway's environment (secrets, broker, prefix, sandbox), shared by
/// the child and this process's own view of the same config.
fn gateway_env(brokers: &str, prefix: &str, graph: &str) -> BTreeMap<String, String> {
    let mut e: BTreeMap<String, String> = [
        ("WAGATE_APP_SECRET", SECRET),
        ("WAGATE_VERIFY_TOKEN", "bench-verify-token"),
        ("WAGATE_API_TOKEN", "bench-api-token"),
        ("WAGATE_ACCESS_TOKEN", "bench-access-token"),
        ("WAGATE_KAFKA_BROKERS", brokers),
        ("WAGATE_TOPIC_PREFIX", prefix),
        ("WAGATE_LISTEN", "127.0.0.1:0"),
        ("WAGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
        ("WAGATE_GRAPH_BASE_URL", graph),
        ("WAGATE_SERVER_SHUTDOWN_TIMEOUT_MS", "5000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // A consumer group per run.
    e.insert("WAGATE_EGRESS_GROUP_ID".into(), format!("{prefix}egress"));
    if let Ok(extra) = std::env::var("WAGATE_BENCH_GATEWAY_ENV") {
        for kv in extra.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .expect("WAGATE_BENCH_GATEWAY_ENV: K=V,K=V");
            e.insert(k.trim().into(), v.trim().into());
        }
    }
    e
}

/// The example config plus one `[egress.numbers."…"]` table per number.
fn write_config(dir: &Path, quotas: &[(String, u32)]) -> PathBuf {
    let mut toml = config::EXAMPLE_TOML.to_string();
    for (n, q) in quotas {
        toml.push_str(&format!("\n[egress.numbers.\"{n}\"]\nthroughput = {q}\n"));
    }
    let file = dir.join("wagate.toml");
    std::fs::write(&file, toml).expect("write config");
    file
}

/// `wagate serve --config FILE` as a child process (the tests' process kit).
#[path = "../tests/common/process.rs"]
mod process;

struct Gateway(process::Running);

impl Gateway {
    fn spawn(file: &Path, env: &BTreeMap<String, String>, log: PathBuf) -> Gateway {
        Gateway(
            process::GatewayProcess::new()
                .arg("--config")
                .arg(file.display())
                .env("WAGATE_LOG", "warn")
                .envs(env)
                .log_to(log)
                .spawn(),
        )
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    fn log_tail(&self) -> String {
        self.0.log_tail(40)
    }

    /// Panics (with its log) if the gateway has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.0.try_wait() {
            panic!(
                "the gateway exited early ({status}); its log:\n{}",
                self.log_tail()
            );
        }
    }

    /// SIGTERM, then up to 20 s for it to exit (SIGKILL after that).
    fn stop(mut self) {
        self.0.sigterm();
        match self.0.wait_for_exit(Duration::from_secs(20)) {
            Some(status) if !status.success() => eprintln!(
                "egress_load: the gateway exited with {status}; its log:\n{}",
                self.log_tail()
            ),
            Some(_) => {}
            None => eprintln!(
                "egress_load: the gateway did not stop within 20 s of SIGTERM; killing it"
            ),
        }
    }
}

// ---------------------------------------------------------------- Kafka

fn template(id: &str, number: &str, k: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "v": 1,
        "request_id": id,
        "phone_number_id": number,
        // A recipient per request: the pair rate never applies.
        "to": format!("+55{k:011}"),
        "category": "utility",
        "message": {"type": "template", "template": {"name": "order_shipped", "language": {"code": "en_US"}}},
    }))
    .unwrap()
}

/// Counts delivery reports.
#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
}

struct CountAcks(Arc<Acks>);

impl ClientContext for CountAcks {}

impl ProducerContext for CountAcks {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        let c = if r.is_ok() {
            &self.0.ok
        } else {
            &self.0.failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Produces (key = phone_number_id, value) records as the gateway's producer
/// would place them (murmur2 partitioner, acks=all, idempotent) and waits
/// for every ack. One record per batch: the gateway pauses its partitions
/// when `egress.max_buffered` requests are held, and librdkafka resumes
/// fetching at the next offset; Tansu 0.6 answers a fetch from an offset
/// inside a record batch with nothing, so with batched records the drain
/// stalls at the first resume (Kafka returns the whole batch).
fn produce(brokers: &str, topic: &str, records: &[(String, Vec<u8>)]) -> f64 {
    let acks = Arc::new(Acks::default());
    let producer: ThreadedProducer<CountAcks> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(CountAcks(acks.clone()))
        .expect("producer");
    let deadline = Instant::now() + Duration::from_secs(300);
    let t0 = Instant::now();
    for (key, value) in records {
        let mut rec = BaseRecord::to(topic).key(key.as_str()).payload(value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    assert!(Instant::now() < deadline, "producing took over 300 s");
                    std::thread::sleep(Duration::from_millis(1));
                    rec = r;
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    let n = records.len() as u64;
    while acks.ok.load(Ordering::Relaxed) + acks.failed.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "requests not acknowledged within 300 s: {} of {n}",
            acks.ok.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        acks.failed.load(Ordering::Relaxed),
        0,
        "requests not stored"
    );
    t0.elapsed().as_secs_f64()
}

/// Reads the gateway group's committed offsets of the requests topic.
struct Committed {
    consumer: BaseConsumer,
    tpl: TopicPartitionList,
}

impl Committed {
    fn new(brokers: &str, group: &str, topic: &str, partitions: i32) -> Committed {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("offset reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        Committed { consumer, tpl }
    }

    /// Sum of committed offsets: on a fresh topic, the requests whose result
    /// Kafka has acknowledged (the gateway commits no further).
    fn total(&self) -> i64 {
        match self
            .consumer
            .committed_offsets(self.tpl.clone(), Duration::from_secs(5))
        {
            Ok(t) => t
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                })
                .sum(),
            Err(_) => 0,
        }
    }
}

/// Reads the results topic; asserts exactly one `accepted` result per id
/// (after printing what else was found, if anything).
fn check_results(tag: &str, brokers: &str, topic: &str, ids: &HashSet<String>) {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    let opts = kafka::ReadOptions {
        from_beginning: true,
        max: Some(ids.len() + 1_000),
        idle_timeout: Some(Duration::from_secs(3)),
    };
    let end = Instant::now() + Duration::from_secs(120);
    let mut read = 0usize;
    while by.len() < ids.len() && Instant::now() < end {
        by.clear();
        read = kafka::read_topic(&kafka::Connection::plaintext(brokers), topic, &opts, |r| {
            let v = &r.value;
            let what = match v["outcome"].as_str().unwrap_or("") {
                "accepted" => "accepted".to_string(),
                other => format!("{other} ({})", v["error"]["code"]),
            };
            by.entry(v["request_id"].as_str().unwrap_or("").to_string())
                .or_default()
                .push(what);
        })
        .expect("read results");
    }
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for o in by.values().flatten() {
        *outcomes.entry(o.as_str()).or_default() += 1;
    }
    if outcomes.len() != 1 || by.len() != ids.len() || read != ids.len() {
        eprintln!(
            "egress_load[{tag}]: results: {read} records for {} request ids (of {}): {outcomes:?}",
            by.len(),
            ids.len()
        );
        if outcomes.keys().any(|o| o.starts_with("unknown")) {
            eprintln!(
                "egress_load[{tag}]: `unknown` results are sends whose connection was lost \
                 (see the gateway log); the sandbox closes connections beyond 4,096 at once"
            );
        }
    }
    assert_eq!(
        by.len(),
        ids.len(),
        "request ids with a result ({read} records read)"
    );
    for (id, outcomes) in &by {
        assert!(ids.contains(id), "result for an unknown request {id}");
        assert_eq!(
            outcomes,
            &vec!["accepted".to_string()],
            "{id}: one accepted result"
        );
    }
}

/// The partition each key's records are in.
fn partition_of_keys(brokers: &str, topic: &str, n: usize) -> HashMap<String, i32> {
    let mut out = HashMap::new();
    let opts = kafka::ReadOptions {
        from_beginning: true,
        max: Some(n),
        idle_timeout: Some(Duration::from_secs(3)),
    };
    kafka::read_topic(&kafka::Connection::plaintext(brokers), topic, &opts, |r| {
        if let Some(k) = r.key {
            out.insert(k, r.partition);
        }
    })
    .expect("read topic");
    out
}

/// Per partition of `topic`: (records, last offset + 1).
fn partition_counts(brokers: &str, topic: &str) -> BTreeMap<i32, (usize, i64)> {
    let mut out: BTreeMap<i32, (usize, i64)> = BTreeMap::new();
    let opts = kafka::ReadOptions {
        from_beginning: true,
        max: None,
        idle_timeout: Some(Duration::from_secs(3)),
    };
    kafka::read_topic(&kafka::Connection::plaintext(brokers), topic, &opts, |r| {
        let e = out.entry(r.partition).or_default();
        e.0 += 1;
        e.1 = e.1.max(r.offset + 1);
    })
    .expect("read topic");
    out
}

// ---------------------------------------------------------------- a run

struct Run {
    tag: &'static str,
    numbers: Vec<(String, u32)>,
    /// In production order: (key = phone_number_id, value).
    requests: Vec<(String, Vec<u8>)>,
    ids: HashSet<String>,
}

struct Outcome {
    /// Per number: arrival times at the sandbox, in order.
    arrivals: HashMap<String, Vec<Instant>>,
    first: Instant,
    last: Instant,
    spawned: Instant,
    done: Instant,
    samples: Samples,
    requests_topic: String,
}

/// Pre-produces the requests, starts the gateway and waits until every
/// request has an acknowledged result (offsets committed), then checks the
/// results and the sandbox's record.
fn drain(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    broker: Option<u32>,
    run: &Run,
    within: Duration,
) -> Outcome {
    let tag = run.tag;
    let prefix = unique_prefix(tag);
    // Config and gateway log stay for a look after the run.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("egress_load")
        .join(prefix.trim_end_matches('.'));
    std::fs::create_dir_all(&dir).expect("run directory");
    let sandbox = SandboxThread::start();
    let sb = sandbox.get();
    let file = write_config(&dir, &run.numbers);
    let env = gateway_env(brokers, &prefix, &sb.base_url());
    let cfg = config::load(Some(&file), &env, LoadOptions::default()).expect("bench config");
    assert_eq!(cfg.egress.numbers.len(), run.numbers.len());
    let created = rt
        .block_on(kafka::create_topics(&cfg.kafka))
        .expect("create topics");
    assert_eq!(created.len(), kafka::TOPICS.len());
    let names = kafka::Topics::new(&prefix);
    let requests_topic = names.name(kafka::TopicId::OutboundRequests).to_string();
    let n = run.requests.len();
    let secs = produce(brokers, &requests_topic, &run.requests);
    eprintln!(
        "egress_load[{tag}]: pre-produced {n} requests for {} numbers in {secs:.1} s \
         ({} partitions, key = phone_number_id); config and gateway log in {}",
        run.numbers.len(),
        cfg.kafka.partitions,
        dir.display()
    );

    let committed = Committed::new(
        brokers,
        &cfg.egress.group_id,
        &requests_topic,
        cfg.kafka.partitions,
    );
    let opens_before = tcp_active_opens();
    let spawned = Instant::now();
    let mut gw = Gateway::spawn(&file, &env, dir.join("wagate.log"));
    let sampler = Sampler::start(gw.pid(), broker, within + Duration::from_secs(60));
    let end = spawned + within;
    let mut next_report = spawned + Duration::from_secs(10);
    let done = loop {
        gw.assert_running();
        if committed.total() >= n as i64 {
            break Instant::now();
        }
        let now = Instant::now();
        assert!(
            now < end,
            "[{tag}] not every request completed within {within:?}: {} sent, {} committed; \
             gateway log:\n{}",
            sb.accepted(),
            committed.total(),
            gw.log_tail()
        );
        if now >= next_report {
            eprintln!(
                "egress_load[{tag}]: … {:.0} s: {} of {n} sent",
                (now - spawned).as_secs_f64(),
                sb.accepted()
            );
            next_report = now + Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let samples = sampler.finish();
    let opens = tcp_active_opens()
        .zip(opens_before)
        .map(|(b, a)| b.saturating_sub(a));
    gw.assert_running();

    // Every request reached the sandbox exactly once and has one accepted result.
    if sb.attempts() != n {
        eprintln!(
            "egress_load[{tag}]: the group committed {} offsets but the sandbox received {} \
             POSTs of {n}; requests topic per partition (records, last offset + 1): {:?}",
            committed.total(),
            sb.attempts(),
            partition_counts(brokers, &requests_topic)
        );
    }
    check_results(
        tag,
        brokers,
        names.name(kafka::TopicId::OutboundResults),
        &run.ids,
    );
    let sends = sb.sends();
    assert_eq!(sb.attempts(), n, "POSTs the sandbox received");
    assert_eq!(sends.len(), n, "sends the sandbox accepted");
    let mut seen = HashSet::with_capacity(n);
    let mut arrivals: HashMap<String, Vec<Instant>> = HashMap::new();
    for s in &sends {
        let id = s.biz_opaque_callback_data.clone().unwrap_or_default();
        assert!(run.ids.contains(&id), "unknown send {id}");
        assert!(seen.insert(id.clone()), "{id} sent twice");
        arrivals
            .entry(s.phone_number_id.clone())
            .or_default()
            .push(s.arrived_at);
    }
    eprintln!(
        "egress_load[{tag}]: all {n} requests sent once, each has one `accepted` result; \
         the gateway held at most {} file descriptors; TCP connections opened on this \
         machine during the run: {}",
        samples.peak_fds,
        opens.map_or("unknown".into(), |o| o.to_string()),
    );
    gw.stop();
    drop(sandbox);
    Outcome {
        first: sends.first().expect("sends").arrived_at,
        last: sends.last().expect("sends").arrived_at,
        arrivals,
        spawned,
        done,
        samples,
        requests_topic,
    }
}

/// Sends in each second of the run, from the first arrival.
fn print_per_second(tag: &str, out: &Outcome) {
    let span = (out.last - out.first).as_secs_f64();
    let mut per_sec = vec![0usize; span.ceil() as usize + 1];
    for t in out.arrivals.values().flatten() {
        per_sec[(*t - out.first).as_secs() as usize] += 1;
    }
    if per_sec.last() == Some(&0) {
        per_sec.pop();
    }
    eprintln!("egress_load[{tag}]: sends in each second from the first arrival: {per_sec:?}");
}

// ---------------------------------------------------------------- (1) ceiling

fn ceiling(rt: &tokio::runtime::Runtime, brokers: &str, broker: Option<u32>, total: usize) {
    let tag = "ceiling";
    let quota = 80u32;
    let numbers: Vec<(String, u32)> = (0..NUMBERS)
        .map(|i| (format!("21{i:013}"), quota))
        .collect();
    let per_number = total.div_ceil(NUMBERS);
    let run_id = unique_prefix("");
    let mut requests = Vec::with_capacity(per_number * NUMBERS);
    let mut ids = HashSet::new();
    // Round-robin over the numbers: every lane has work from the start.
    for k in 0..per_number {
        for (n, _) in &numbers {
            let id = format!("{run_id}{n}-{k}");
            requests.push((n.clone(), template(&id, n, k)));
            ids.insert(id);
        }
    }
    let n = requests.len();
    eprintln!(
        "egress_load[{tag}]: {NUMBERS} numbers × {quota}/s (quotas sum to {}/s), \
         {per_number} requests each",
        NUMBERS as u32 * quota
    );
    let run = Run {
        tag,
        numbers,
        requests,
        ids,
    };
    let out = drain(rt, brokers, broker, &run, Duration::from_secs(600));
    let tck = clk_tck();
    let span = (out.last - out.first).as_secs_f64();
    eprintln!(
        "egress_load[{tag}]: SENDS/S: {n} sends in {span:.2} s from the first to the last \
         arrival = {:.0} sends/s (first arrival {:.2} s after the gateway was spawned; \
         every result acknowledged {:.2} s after the last arrival)",
        (n - 1) as f64 / span,
        (out.first - out.spawned).as_secs_f64(),
        (out.done - out.last).as_secs_f64(),
    );
    print_per_second(tag, &out);
    let known = broker.is_some();
    let s = &out.samples;
    let u = usage(s.at(out.first), s.at(out.last), tck);
    print_usage(
        tag,
        "CPU µs PER SEND (first → last arrival)",
        &u,
        n - 1,
        known,
    );
    let u = usage(s.at(out.spawned), s.at(out.done), tck);
    print_usage(
        tag,
        "whole run (spawn → every result acknowledged; includes start-up)",
        &u,
        n,
        known,
    );
    let startup = usage(s.at(out.spawned), s.at(out.first), tck);
    eprintln!(
        "egress_load[{tag}]: gateway CPU before the first arrival (start-up, group join, \
         first fetch): {:.0} ms",
        startup.gw_us / 1e3
    );
}

// ---------------------------------------------------------------- (2) utilisation

struct NumberStats {
    number: String,
    quota: u32,
    sends: usize,
    /// Most sends in any one-second window.
    max_window: usize,
    /// Sends over quota (the `quota` sends before arrived < 1 s earlier).
    violations: usize,
    /// Achieved ÷ allowed over the steady part.
    util: Option<f64>,
    /// Longest time between a send and the one `quota` places later
    /// (steady part), and when it began.
    longest_span: Duration,
    longest_at: Option<Instant>,
    /// The first send over quota, and how soon after the send `quota`
    /// places before it arrived.
    first_violation: Option<(Instant, Duration)>,
    /// When each send over quota arrived.
    violation_times: Vec<Instant>,
}

fn analyse(number: &str, quota: u32, t: &[Instant]) -> NumberStats {
    let q = quota as usize;
    let mut violations = 0;
    let mut max_window = 0;
    let mut first_violation = None;
    let mut violation_times = Vec::new();
    let mut j = 0;
    for i in 0..t.len() {
        while t[i] - t[j] >= WINDOW {
            j += 1;
        }
        max_window = max_window.max(i - j + 1);
        if i >= q && t[i] - t[i - q] < WINDOW {
            violations += 1;
            first_violation = first_violation.or(Some((t[i], t[i] - t[i - q])));
            violation_times.push(t[i]);
        }
    }
    // Steady part: without the number's first and last second. Each send
    // and the one `quota` places later span what `quota` sends take; at
    // full use that is exactly one second.
    let (mut sum, mut count, mut longest) = (Duration::ZERO, 0u32, Duration::ZERO);
    let mut longest_at = None;
    if let (Some(first), Some(last)) = (t.first(), t.last()) {
        let (from, to) = (*first + WINDOW, last.checked_sub(WINDOW).unwrap_or(*first));
        for i in 0..t.len().saturating_sub(q) {
            if t[i] >= from && t[i + q] <= to {
                let span = t[i + q] - t[i];
                sum += span;
                count += 1;
                if span > longest {
                    longest = span;
                    longest_at = Some(t[i]);
                }
            }
        }
    }
    NumberStats {
        number: number.to_string(),
        quota,
        sends: t.len(),
        max_window,
        violations,
        util: (count > 0).then(|| WINDOW.as_secs_f64() / (sum / count).as_secs_f64()),
        longest_span: longest,
        longest_at,
        first_violation,
        violation_times,
    }
}

fn utilisation(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    broker: Option<u32>,
    count: usize,
    secs: u32,
) {
    let tag = "utilisation";
    let numbers: Vec<(String, u32)> = (0..count)
        .map(|i| (format!("31{i:013}"), 1 + (i % 3) as u32))
        .collect();
    let allowed: u32 = numbers.iter().map(|(_, q)| q).sum();
    let run_id = unique_prefix("");
    // In the order the lanes can send them (request k of a number with
    // quota q is due at k/q s): the gateway holds at most
    // egress.max_buffered requests, so an even spread over the numbers
    // would starve the faster ones.
    let mut order: Vec<(u32, usize, usize)> = Vec::new();
    for (i, (_, q)) in numbers.iter().enumerate() {
        for k in 0..(q * secs) as usize {
            order.push((k as u32 * (6 / q), i, k));
        }
    }
    order.sort_unstable();
    let mut requests = Vec::with_capacity(order.len());
    let mut ids = HashSet::new();
    for (_, i, k) in order {
        let n = &numbers[i].0;
        let id = format!("{run_id}{n}-{k}");
        requests.push((n.clone(), template(&id, n, k)));
        ids.insert(id);
    }
    let n = requests.len();
    eprintln!(
        "egress_load[{tag}]: {count} numbers × 1, 2 or 3 /s (quotas sum to {allowed}/s), \
         {secs} s of work each: {n} requests"
    );
    let run = Run {
        tag,
        numbers: numbers.clone(),
        requests,
        ids,
    };
    let out = drain(
        rt,
        brokers,
        broker,
        &run,
        Duration::from_secs(u64::from(secs) * 4 + 300),
    );
    let mut stats: Vec<NumberStats> = numbers
        .iter()
        .map(|(num, q)| {
            let t = out.arrivals.get(num).map(Vec::as_slice).unwrap_or(&[]);
            assert_eq!(t.len(), (q * secs) as usize, "sends of {num}");
            analyse(num, *q, t)
        })
        .collect();

    let violations: usize = stats.iter().map(|s| s.violations).sum();
    let bad_numbers = stats.iter().filter(|s| s.violations > 0).count();
    eprintln!(
        "egress_load[{tag}]: LIMIT VIOLATIONS: {violations} sends over quota, on \
         {bad_numbers} of {count} numbers (target 0)"
    );
    if violations > 0 {
        let mut by_second: BTreeMap<u64, usize> = BTreeMap::new();
        for t in stats.iter().flat_map(|s| &s.violation_times) {
            *by_second.entry((*t - out.first).as_secs()).or_default() += 1;
        }
        eprintln!(
            "egress_load[{tag}]:   sends over quota by second of the run (from the first \
             arrival): {by_second:?}"
        );
    }
    stats.sort_by(|a, b| {
        (b.max_window as f64 / b.quota as f64).total_cmp(&(a.max_window as f64 / a.quota as f64))
    });
    for s in stats.iter().filter(|s| s.violations > 0).take(5) {
        eprintln!(
            "egress_load[{tag}]:   e.g. number {} (quota {}/s): {} sends in one second, \
             {} sends over quota; the first {:.2} s after the run's first arrival, {} sends \
             within {} ms",
            s.number,
            s.quota,
            s.max_window,
            s.violations,
            s.first_violation
                .map_or(0.0, |(t, _)| (t - out.first).as_secs_f64()),
            s.quota + 1,
            s.first_violation.map_or(0, |(_, d)| d.as_millis()),
        );
    }

    let mut utils: Vec<f64> = stats.iter().filter_map(|s| s.util).collect();
    utils.sort_by(f64::total_cmp);
    if utils.is_empty() {
        eprintln!("egress_load[{tag}]: UTILISATION: no steady part (the run is too short)");
    } else {
        let pct = |p: f64| utils[((p * utils.len() as f64) as usize).min(utils.len() - 1)];
        let achieved: f64 = stats
            .iter()
            .filter_map(|s| s.util.map(|u| u * s.quota as f64))
            .sum();
        let allowed_steady: f64 = stats
            .iter()
            .filter(|s| s.util.is_some())
            .map(|s| s.quota as f64)
            .sum();
        eprintln!(
            "egress_load[{tag}]: UTILISATION (achieved ÷ allowed, steady part of each \
             number; target ≥ 0.95): median {:.3}, min {:.3}, p5 {:.3}, max {:.3}; overall \
             {:.3} ({achieved:.0} of {allowed_steady:.0} sends/s); {} of {} numbers below 0.95",
            pct(0.5),
            utils[0],
            pct(0.05),
            utils[utils.len() - 1],
            achieved / allowed_steady,
            utils.iter().filter(|u| **u < 0.95).count(),
            utils.len(),
        );
        for q in 1..=3 {
            let mut u: Vec<f64> = stats
                .iter()
                .filter(|s| s.quota == q)
                .filter_map(|s| s.util)
                .collect();
            u.sort_by(f64::total_cmp);
            if !u.is_empty() {
                eprintln!(
                    "egress_load[{tag}]:   quota {q}/s: {} numbers, median {:.3}, min {:.3}",
                    u.len(),
                    u[u.len() / 2],
                    u[0]
                );
            }
        }
        stats.sort_by(|a, b| {
            a.util
                .unwrap_or(f64::MAX)
                .total_cmp(&b.util.unwrap_or(f64::MAX))
        });
        for s in stats.iter().take(3) {
            eprintln!(
                "egress_load[{tag}]:   lowest: number {} (quota {}/s, {} sends): {:.3}, \
                 longest {}-send span {} ms, from {:.2} s after the run's first arrival",
                s.number,
                s.quota,
                s.sends,
                s.util.unwrap_or(0.0),
                s.quota,
                s.longest_span.as_millis(),
                s.longest_at.map_or(0.0, |t| (t - out.first).as_secs_f64()),
            );
        }
    }
    // Per partition of the requests topic: when its numbers' sends began
    // and ended.
    let part = partition_of_keys(brokers, &out.requests_topic, n);
    let mut parts: BTreeMap<i32, (usize, u32, Instant, Instant)> = BTreeMap::new();
    for (num, q) in &numbers {
        let t = &out.arrivals[num];
        let p = part.get(num).copied().unwrap_or(-1);
        let e = parts.entry(p).or_insert((0, 0, t[0], t[0]));
        e.0 += 1;
        e.1 += q;
        e.2 = e.2.min(t[0]);
        e.3 = e.3.max(t[t.len() - 1]);
    }
    for (p, (nums, q, a, b)) in &parts {
        eprintln!(
            "egress_load[{tag}]:   partition {p}: {nums} numbers, {q} sends/s allowed, sends \
             from {:.1} s to {:.1} s after the run's first arrival",
            (*a - out.first).as_secs_f64(),
            (*b - out.first).as_secs_f64()
        );
    }
    let span = (out.last - out.first).as_secs_f64();
    print_per_second(tag, &out);
    let mut starts: Vec<f64> = out
        .arrivals
        .values()
        .map(|t| (t[0] - out.first).as_secs_f64())
        .collect();
    starts.sort_by(f64::total_cmp);
    eprintln!(
        "egress_load[{tag}]: whole run: {n} sends in {span:.1} s from the first to the last \
         arrival ({secs} s of work per number); sends ÷ (allowed/s × (that + 1 s)) = {:.3}; a \
         number's first send came {:.1} s (median) / {:.1} s (max) after the run's first",
        n as f64 / ((span + 1.0) * f64::from(allowed)),
        starts[starts.len() / 2],
        starts[starts.len() - 1],
    );
    let u = usage(
        out.samples.at(out.first),
        out.samples.at(out.last),
        clk_tck(),
    );
    print_usage(tag, "first → last arrival", &u, n - 1, broker.is_some());
}

fn main() {
    let brokers = brokers();
    let s = sizes();
    let broker = broker_pid(&brokers);
    eprintln!(
        "egress_load: {} run, {} build, {} cores, broker {brokers} (pid {}), gateway {}",
        if s.full { "full" } else { "smoke" },
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        broker.map_or("not found".into(), |p| p.to_string()),
        env!("CARGO_BIN_EXE_wagate"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if selected("ceiling") {
        ceiling(&rt, &brokers, broker, s.ceiling_requests);
    }
    if selected("utilisation") {
        utilisation(&rt, &brokers, broker, s.util_numbers, s.util_secs);
    }
}
