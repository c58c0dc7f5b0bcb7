//! Contacts against a real Kafka-protocol broker (Tansu):
//!
//! (a) bootstrap rate: records/s read from the compacted topics `wa.consent`
//!     and `wa.windows` and applied to the cache by `contacts::sync::run`,
//!     from its start until every record is applied (and when it reports
//!     caught up); then every pair in the cache is checked. For comparison:
//!     a bare consumer with the same settings, and `sync::apply` alone;
//! (b) STOP propagation: the time from a STOP webhook's 200 on instance A to
//!     the moment instance B, which learns it only through `wa.consent`,
//!     answers `consent = opted_out` on `GET /v1/contacts/{pnid}/{wa_id}`
//!     (and that A answers it right after its 200). For comparison: a bare
//!     consumer tailing `wa.consent`.
//!
//! `WAGATE_BENCH_BOOTSTRAP_RUNS=N` repeats (a)'s timed bootstrap N times
//! over the same records (default 3; 1 at smoke size), and
//! `WAGATE_BENCH_ONLY=bootstrap` skips (b). `WAGATE_BENCH_RECORDS=N` sets
//! the records of (a) with `--bench` (default 1,000,000: 500,000 pairs;
//! 20,000,000 for the 10 million pairs).
//!
//! `WAGATE_BENCH_CONSUMER_CONFIG=k=v,k=v` adds librdkafka properties to the
//! two bare consumers (not to sync::run), to try settings without changing
//! src/, e.g. `fetch.wait.max.ms=10,fetch.queue.backoff.ms=10`.
//!
//! Needs a broker at `WAGATE_TEST_BROKERS`:
//!   WAGATE_TEST_BROKERS=$(scripts/tansu.sh start target/bench-env) \
//!     cargo bench --bench contacts_broker
//!   scripts/tansu.sh stop target/bench-env
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it uses a smoke
//! size: 20,000 records and 20 STOPs.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use wagate::app::Gateway;
use wagate::config::{self, LoadOptions};
use wagate::contacts::sync;
use wagate::contacts::{Consent, ContactState, Contacts, Marketing, MemoryContacts};
use wagate::kafka::{self, KafkaProducer, RecordAck, SendError, TopicId, Topics};

// The allocator the `wagate` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "bench-app-secret";
const API_TOKEN: &str = "bench-api-token";
/// Business numbers the bootstrap records are spread over.
const NUMBERS: u64 = 1_000;

struct Sizes {
    records: u64,
    stops: usize,
}

fn sizes() -> Sizes {
    if std::env::args().any(|a| a == "--bench") {
        Sizes {
            records: std::env::var("WAGATE_BENCH_RECORDS").map_or(1_000_000, |v| {
                v.parse()
                    .expect("WAGATE_BENCH_RECORDS is a number of records")
            }),
            stops: 300,
        }
    } else {
        Sizes {
            records: 20_000,
            stops: 20,
        }
    }
}

#[path = "../tests/common/broker.rs"]
mod broker;
use broker::{brokers, unique_prefix};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[path = "../tests/common/measure.rs"]
mod measure;
use measure::rss_bytes;

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// utime + stime of `/proc/{what}/stat` (a process or a thread), in ticks.
fn cpu_ticks(what: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{what}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum()
}

/// CPU ticks of this process's `contacts-sync-*` threads (sync::run's
/// readers).
fn readers_cpu_ticks() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("contacts-sync-"))
        })
        .map(|t| cpu_ticks(&format!("self/task/{}", t.file_name().to_string_lossy())))
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// A gateway config on free loopback ports, like the tests build it.
fn config(brokers: &str, prefix: &str, overrides: &[(&str, &str)]) -> config::Config {
    let mut e: BTreeMap<String, String> = [
        ("WAGATE_APP_SECRET", SECRET),
        ("WAGATE_VERIFY_TOKEN", "bench-verify-token"),
        ("WAGATE_API_TOKEN", API_TOKEN),
        ("WAGATE_ACCESS_TOKEN", "bench-access-token"),
        ("WAGATE_KAFKA_BROKERS", brokers),
        ("WAGATE_TOPIC_PREFIX", prefix),
        ("WAGATE_LISTEN", "127.0.0.1:0"),
        ("WAGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    e.insert("WAGATE_EGRESS_GROUP_ID".into(), format!("{prefix}egress"));
    for (k, v) in overrides {
        e.insert(k.to_string(), v.to_string());
    }
    config::load(None, &e, LoadOptions::default()).expect("bench config")
}

/// The pair of record `i` of the bootstrap data set.
fn pair(i: u64) -> (String, String) {
    (
        format!("10987654{:07}", i % NUMBERS),
        format!("55119{:08}", i / NUMBERS),
    )
}

/// What the data set says about pair `i` (checked after the bootstrap).
fn expected(i: u64) -> ContactState {
    let out = i % 3 == 0;
    ContactState {
        consent: if out {
            Consent::OptedOut
        } else {
            Consent::OptedIn
        },
        marketing: if out {
            Marketing::Stopped
        } else {
            Marketing::Allowed
        },
        last_inbound_ms: Some(1_781_000_000_000 + i * 1000),
    }
}

/// (a) Produces `records` records (a consent and a window record per pair,
/// interleaved), then times `sync::run` until every record is applied.
fn bootstrap(rt: &tokio::runtime::Runtime, brokers: &str, records: u64) {
    let prefix = unique_prefix("bootstrap");
    let cfg = config(brokers, &prefix, &[]);
    rt.block_on(kafka::create_topics(&cfg.kafka))
        .expect("create topics");
    let names = Topics::new(&prefix);
    let (consent_topic, windows_topic) = (
        names.name(TopicId::Consent).to_string(),
        names.name(TopicId::Windows).to_string(),
    );
    let pairs = records / 2;

    // Produce with the gateway's own producer (acks=all, idempotent, lz4).
    let producer = KafkaProducer::new(&cfg.kafka).expect("producer");
    let counts = Arc::new(Counts::default());
    let shared: Arc<dyn RecordAck> = counts.clone();
    let (acked, failed) = (&counts.acked, &counts.failed);
    let produce_deadline = Instant::now() + Duration::from_secs(600);
    let t0 = Instant::now();
    let mut sent = 0u64;
    for i in 0..pairs {
        let (pnid, user) = pair(i);
        let st = expected(i);
        let cause = format!("wamid.BENCH{i:012}");
        let evs = [
            sync::consent_event(&pnid, &user, &st, "import", now_ms(), &cause),
            sync::window_event(&pnid, &user, st.last_inbound_ms.unwrap(), &cause),
        ];
        for (ev, topic) in evs.iter().zip([&consent_topic, &windows_topic]) {
            let headers: [(&str, &[u8]); 3] = [
                ("wagate-event-id", ev.event_id.as_bytes()),
                ("wagate-kind", ev.kind.as_str().as_bytes()),
                ("wagate-app", b"default"),
            ];
            loop {
                match producer.send_tagged(
                    topic,
                    ev.key.as_bytes(),
                    &ev.value,
                    &headers,
                    shared.clone(),
                    wagate::kafka::RecordTag { id: 0, tag: 0 },
                ) {
                    Ok(()) => break,
                    Err(SendError::QueueFull) => {
                        assert!(
                            Instant::now() < produce_deadline,
                            "producing the data set took over 600 s"
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("produce: {e}"),
                }
            }
            sent += 1;
        }
    }
    while acked.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < sent {
        assert!(
            Instant::now() < produce_deadline,
            "records not acknowledged within 600 s: {} of {sent}",
            acked.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "records not stored");
    let produce_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "contacts_broker: produced {sent} records ({pairs} pairs over {NUMBERS} numbers, \
         {} partitions per topic) in {produce_s:.1} s = {:.0} records/s (acks=all)",
        cfg.kafka.partitions,
        sent as f64 / produce_s
    );
    drop(producer);

    // Bootstrap: sync::run on its own thread, timed from its start until
    // every record is applied, `WAGATE_BENCH_BOOTSTRAP_RUNS` times (default
    // 3) over the same records, each into a fresh cache.
    let metrics = wagate::metrics::install();
    let runs: usize = std::env::var("WAGATE_BENCH_BOOTSTRAP_RUNS")
        .ok()
        .map(|v| v.parse().expect("WAGATE_BENCH_BOOTSTRAP_RUNS is a number"))
        .unwrap_or(if sent > 100_000 { 3 } else { 1 });
    let mut rates: Vec<f64> = (0..runs)
        .map(|_| {
            timed_bootstrap(
                &metrics,
                brokers,
                &consent_topic,
                &windows_topic,
                sent,
                pairs,
            )
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    eprintln!(
        "contacts_broker: bootstrap over {runs} runs: median {:.0} records/s (min {:.0}, max {:.0})",
        rates[runs / 2],
        rates[0],
        rates[runs - 1]
    );

    // For comparison: the same records through a bare consumer with
    // sync::run's settings (broker + librdkafka, nothing applied) ...
    let t = Instant::now();
    let n = consume_only(brokers, &consent_topic, &windows_topic, sent);
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "contacts_broker: consumer alone (sync::run's settings{}, nothing applied): {n} \
         records in {secs:.2} s = {:.0} records/s",
        plus_extra(),
        n as f64 / secs
    );
    // ... and sync::apply alone on the same records, in memory (CPU only).
    let mut recs: Vec<(bool, String, Vec<u8>)> = Vec::with_capacity(sent as usize);
    for i in 0..pairs {
        let (pnid, user) = pair(i);
        let st = expected(i);
        let c = sync::consent_event(&pnid, &user, &st, "import", now_ms(), "x");
        let w = sync::window_event(&pnid, &user, st.last_inbound_ms.unwrap(), "x");
        recs.push((true, c.key, c.value));
        recs.push((false, w.key, w.value));
    }
    let cache = MemoryContacts::new();
    let t = Instant::now();
    for (consent, key, value) in &recs {
        sync::apply(&cache, *consent, key, Some(value));
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(cache.len() as u64, pairs);
    eprintln!(
        "contacts_broker: sync::apply alone (in memory, one thread): {sent} records in \
         {secs:.2} s = {:.0} records/s",
        sent as f64 / secs
    );
    // ... and as the bootstrap applies a batch: each record's pair
    // prefetched sync::PREFETCH_AHEAD records before it is applied.
    drop(cache);
    let cache = MemoryContacts::new();
    let t = Instant::now();
    for (i, (consent, key, value)) in recs.iter().enumerate() {
        if let Some((_, k, _)) = recs.get(i + sync::PREFETCH_AHEAD) {
            sync::prefetch(&cache, k.as_bytes());
        }
        sync::apply(&cache, *consent, key, Some(value));
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(cache.len() as u64, pairs);
    eprintln!(
        "contacts_broker: sync::apply alone, prefetched {} ahead: {sent} records in \
         {secs:.2} s = {:.0} records/s",
        sync::PREFETCH_AHEAD,
        sent as f64 / secs
    );
}

/// One bootstrap: sync::run on its own thread, timed from its start until
/// every record is applied (wagate_contacts_records_applied_total, which
/// sync::run increments after each apply) and until on_caught_up fires; then
/// every pair is checked. The gateway's recorder is installed, so those
/// per-record counters cost what they cost in the gateway. Returns
/// records/s.
fn timed_bootstrap(
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    brokers: &str,
    consent_topic: &str,
    windows_topic: &str,
    sent: u64,
    pairs: u64,
) -> f64 {
    let base = applied(metrics);
    let cache = Arc::new(MemoryContacts::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, u64)>();
    let rss_before = rss_bytes();
    let cpu_before = cpu_ticks("self");
    let started = Instant::now();
    let handle = {
        let (brokers, cache, stop) = (brokers.to_string(), cache.clone(), stop.clone());
        let (c, w) = (consent_topic.to_string(), windows_topic.to_string());
        // wa.users beside wa.windows (same prefix; empty in this bench).
        let u = format!(
            "{}users",
            w.strip_suffix("windows").expect("a windows topic")
        );
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("contacts-sync".into())
            .spawn(move || {
                let on_caught_up = Box::new(move || {
                    let _ = tx.send((Instant::now(), applied(&m) - base));
                });
                sync::run(
                    &wagate::kafka::Connection::plaintext(brokers),
                    &c,
                    &w,
                    &u,
                    cache,
                    on_caught_up,
                    stop,
                )
            })
            .unwrap()
    };
    let give_up = started + Duration::from_secs(600);
    let mut caught_up = None;
    let all_applied = loop {
        if let Ok(c) = rx.try_recv() {
            caught_up = Some(c);
        }
        // The cheap test first (a shard lock each), then the registry.
        if cache.len() as u64 >= pairs && applied(metrics) - base >= sent {
            break Instant::now();
        }
        if handle.is_finished() {
            panic!("sync::run ended early: {:?}", handle.join());
        }
        assert!(
            Instant::now() < give_up,
            "not every record applied within 600 s: {} of {sent}",
            applied(metrics) - base
        );
        // Rendering the registry costs CPU the sync thread could use: not
        // too often.
        std::thread::sleep(Duration::from_millis(10));
    };
    let rss_after = rss_bytes();
    let sync_cpu = readers_cpu_ticks();
    let process_cpu = cpu_ticks("self") - cpu_before;
    if caught_up.is_none() {
        caught_up = rx.recv_timeout(Duration::from_secs(10)).ok();
    }
    stop.cancel();
    handle
        .join()
        .expect("sync thread")
        .expect("sync::run returns Ok");
    let secs = all_applied.duration_since(started).as_secs_f64();

    // Correctness: every pair, with the data set's values.
    assert_eq!(cache.len() as u64, pairs, "pairs in the cache");
    for i in 0..pairs {
        let (pnid, user) = pair(i);
        assert_eq!(cache.get(&pnid, &user), expected(i), "pair {i}");
    }
    let us = |ticks: u64| ticks as f64 * 1e6 / TICKS_PER_S / sent as f64;
    eprintln!(
        "contacts_broker: bootstrap applied {sent} records ({pairs} pairs, all checked) in \
         {secs:.2} s = {:.0} records/s; CPU per record: contacts-sync-* reader threads {:.2} µs, whole \
         process {:.2} µs; resident memory {:.0} MiB before, {:.0} MiB after \
         (+{:.0} MiB: cache and consumer buffers)",
        sent as f64 / secs,
        us(sync_cpu),
        us(process_cpu),
        mib(rss_before),
        mib(rss_after),
        mib(rss_after.saturating_sub(rss_before)),
    );
    match caught_up {
        Some((at, n)) => eprintln!(
            "contacts_broker: on_caught_up fired after {:.3} s with {n} of {sent} records \
             applied{}",
            at.duration_since(started).as_secs_f64(),
            if n < sent {
                " (EARLY, before every record was applied: the high watermarks sync::run \
                 read at start were below the log end. Expected against Tansu 0.6, whose \
                 memory storage answers ListOffsets(latest) with the base offset of the \
                 last-written batch + 1; see BENCHMARKS.md)"
            } else {
                ""
            }
        ),
        None => eprintln!("contacts_broker: on_caught_up never fired"),
    }
    drop(cache);

    sent as f64 / secs
}

/// A bare consumer with sync::run's settings, plus the extra librdkafka
/// properties of `WAGATE_BENCH_CONSUMER_CONFIG` (`k=v,k=v`; to try settings
/// without changing src/), assigned to every partition of `topics` from the
/// beginning.
fn bare_consumer(brokers: &str, topics: &[&str]) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut cc = sync::consumer_config(&wagate::kafka::Connection::plaintext(brokers));
    // No statistics callback here (no context to receive them).
    cc.remove("statistics.interval.ms");
    for kv in extra_consumer_config().split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .expect("WAGATE_BENCH_CONSUMER_CONFIG is k=v,k=v");
        cc.set(k, v);
    }
    let consumer: BaseConsumer = cc.create().expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let parts = md.topics().first().map_or(0, |t| t.partitions().len());
        for p in 0..parts as i32 {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

fn extra_consumer_config() -> String {
    std::env::var("WAGATE_BENCH_CONSUMER_CONFIG").unwrap_or_default()
}

fn plus_extra() -> String {
    match extra_consumer_config() {
        e if e.is_empty() => String::new(),
        e => format!(" + {e}"),
    }
}

/// Reads both topics with [`bare_consumer`] until `expect` records arrived
/// (600 s at most); returns how many.
fn consume_only(brokers: &str, consent_topic: &str, windows_topic: &str, expect: u64) -> u64 {
    use rdkafka::message::Message;
    let consumer = bare_consumer(brokers, &[consent_topic, windows_topic]);
    let give_up = Instant::now() + Duration::from_secs(600);
    let (mut n, mut bytes) = (0u64, 0usize);
    while n < expect && Instant::now() < give_up {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            bytes += m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len);
            n += 1;
        }
    }
    assert_eq!(n, expect, "consumer alone: records read within 600 s");
    std::hint::black_box(bytes);
    n
}

/// Records sync::run has applied so far (both topics).
fn applied(metrics: &metrics_exporter_prometheus::PrometheusHandle) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(wagate::metrics::CONTACTS_APPLIED))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> (StatusCode, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("response within 30 s")
        .expect("request");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

/// `GET /v1/contacts/{pnid}/{wa_id}`: is the pair opted out?
async fn opted_out(client: &HttpClient, url: &str) -> bool {
    let req = Request::get(url)
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, body) = send(client, req).await;
    status == StatusCode::OK
        && serde_json::from_slice::<serde_json::Value>(&body).unwrap()["consent"] == "opted_out"
}

fn stop_webhook(pnid: &str, user: &str, wamid: &str) -> Vec<u8> {
    let ts = (now_ms() / 1000).to_string();
    serde_json::to_vec(&serde_json::json!({
        "object":"whatsapp_business_account",
        "entry":[{"id":"102345678901234","changes":[{"field":"messages","value":{
            "messaging_product":"whatsapp",
            "metadata":{"display_phone_number":"15550199999","phone_number_id":pnid},
            "contacts":[{"profile":{"name":"Ana"},"wa_id":user}],
            "messages":[{"from":user,"id":wamid,"timestamp":ts,"type":"text","text":{"body":"STOP"}}]}}]}]
    }))
    .unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// (b) STOPs posted to A, one at a time; after each 200, B is polled every
/// millisecond until it answers opted_out (10 s at most per STOP).
async fn stop_propagation(brokers: &str, stops: usize) {
    let prefix = unique_prefix("stops");
    let off = [("WAGATE_EGRESS_ENABLED", "false")];
    let cfg_a = config(brokers, &prefix, &off);
    kafka::create_topics(&cfg_a.kafka)
        .await
        .expect("create topics");
    let a = Gateway::start(cfg_a).await.expect("gateway A starts");
    let b = Gateway::start(config(brokers, &prefix, &off))
        .await
        .expect("gateway B starts");
    assert!(a.wait_ready(Duration::from_secs(30)).await, "A not ready");
    assert!(b.wait_ready(Duration::from_secs(30)).await, "B not ready");
    // For comparison: a bare consumer with sync::run's settings tailing
    // wa.consent in this process, noting when each key first arrives.
    let seen: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let tail_stop = Arc::new(AtomicBool::new(false));
    let tail = {
        let (brokers, topic) = (
            brokers.to_string(),
            Topics::new(&prefix).name(TopicId::Consent).to_string(),
        );
        let (seen, stop) = (seen.clone(), tail_stop.clone());
        std::thread::spawn(move || {
            use rdkafka::message::Message;
            let consumer = bare_consumer(&brokers, &[&topic]);
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    let at = Instant::now();
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    seen.lock().unwrap().entry(key).or_insert(at);
                }
            }
        })
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let pnid = "109876543210987";
    let run = now_ms() % 1_000_000_000;
    let mut acks = Vec::with_capacity(stops);
    let (mut to_200, mut to_b) = (Vec::with_capacity(stops), Vec::with_capacity(stops));
    let (mut known_on_a, mut failures, mut polls) = (0usize, 0usize, 0u64);
    for i in 0..stops {
        let user = format!("4477{:09}", i);
        let body = stop_webhook(pnid, &user, &format!("wamid.BSTOP{run}x{i:06}"));
        let sig = wagate::meta::signature::sign(SECRET.as_bytes(), &body);
        let req = Request::post(format!("http://{}/webhook", a.public_addr))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sig)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let posted = Instant::now();
        let (status, _) = send(&client, req).await;
        let acked = Instant::now();
        assert_eq!(status, StatusCode::OK, "STOP {i} on A");
        to_200.push(acked.duration_since(posted).as_secs_f64() * 1e3);
        acks.push((sync::key(pnid, &user), acked));
        let path = format!("/v1/contacts/{pnid}/{user}");
        if opted_out(&client, &url(a.internal_addr, &path)).await {
            known_on_a += 1;
        }
        let url_b = url(b.internal_addr, &path);
        let give_up = acked + Duration::from_secs(10);
        loop {
            polls += 1;
            if opted_out(&client, &url_b).await {
                to_b.push(acked.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() >= give_up {
                failures += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    // B has seen every STOP, so the tail has too, or will within 10 s.
    let give_up = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < stops && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tail_stop.store(true, Ordering::Relaxed);
    tail.join().expect("tail thread");
    let seen = seen.lock().unwrap();
    let mut to_tail: Vec<f64> = acks
        .iter()
        .filter_map(|(key, acked)| {
            let at = seen.get(key)?;
            // Negative when the record arrived before the client read the 200.
            Some(if at >= acked {
                at.duration_since(*acked).as_secs_f64() * 1e3
            } else {
                -(acked.duration_since(*at).as_secs_f64() * 1e3)
            })
        })
        .collect();
    assert_eq!(failures, 0, "STOPs not seen on B within 10 s");
    assert_eq!(to_tail.len(), stops, "STOPs seen by the bare tail");
    assert_eq!(known_on_a, stops, "A's cache is updated before its 200");
    to_200.sort_by(f64::total_cmp);
    to_b.sort_by(f64::total_cmp);
    eprintln!(
        "contacts_broker: {stops} STOPs: POST → 200 on A p50 {:.1} / p99 {:.1} / max {:.1} ms; \
         opted_out on A right after the 200: {known_on_a}/{stops}",
        percentile(&to_200, 50.0),
        percentile(&to_200, 99.0),
        to_200[to_200.len() - 1],
    );
    eprintln!(
        "contacts_broker: 200 on A → opted_out on B (via wa.consent): p50 {:.1} / p99 {:.1} / \
         max {:.1} ms (min {:.1}; {polls} GETs to B; {failures} over 10 s)",
        percentile(&to_b, 50.0),
        percentile(&to_b, 99.0),
        to_b[to_b.len() - 1],
        to_b[0],
    );
    to_tail.sort_by(f64::total_cmp);
    eprintln!(
        "contacts_broker: 200 on A → record read by a bare tail of wa.consent (sync::run's \
         settings{}): p50 {:.1} / p99 {:.1} / max {:.1} ms (min {:.1})",
        plus_extra(),
        percentile(&to_tail, 50.0),
        percentile(&to_tail, 99.0),
        to_tail[to_tail.len() - 1],
        to_tail[0],
    );
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

fn main() {
    let brokers = brokers();
    let s = sizes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    bootstrap(&rt, &brokers, s.records);
    // `WAGATE_BENCH_ONLY=bootstrap` skips (b).
    if std::env::var("WAGATE_BENCH_ONLY").as_deref() != Ok("bootstrap") {
        rt.block_on(stop_propagation(&brokers, s.stops));
    }
}

/// Counts the produced records' acknowledgements.
#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    failed: AtomicU64,
}

impl RecordAck for Counts {
    fn done(&self, _id: u64, _tag: u32, result: Result<(), &rdkafka::error::KafkaError>) {
        let counter = if result.is_ok() {
            &self.acked
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
