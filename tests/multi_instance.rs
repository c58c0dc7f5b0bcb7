//! Three `wagate` processes on one broker, one egress consumer group, behind
//! webhook load fed in turn to two of them (issue 5, item 4). Mid-run the
//! third is killed with SIGKILL and the other two take its partition over.
//!
//! Checked afterwards:
//! - ingress (guarantees 1–2): every event of every webhook answered 200 is
//!   on `inbound.messages` exactly once, and no event is there twice;
//! - egress (guarantees 4–6): every send request has exactly one result,
//!   `accepted` (sent exactly once) or `unknown` (attempted by the killed
//!   instance, sent at most once), as in `egress_crash.rs`; no request was
//!   sent twice;
//! - from the Graph API sandbox's log: no business number was sent by two
//!   instances at overlapping times (each instance calls the sandbox under its
//!   own API version, as in the two-instance test in `egress_broker.rs`), and
//!   the killed instance's numbers were sent by a survivor after the kill.
//!
//! The broker is librdkafka's mock cluster, as in `egress_crash.rs`: Tansu
//! 0.6's group coordinator does not hand a dead member's partitions over
//! (see the ignored variant at `WAGATE_TEST_BROKERS`, for Kafka or Redpanda).
//!
//! The load comes from this test (a bounded concurrent loop of signed
//! webhooks alternating between the two ingress ports), not from
//! `wagate-loadgen`: that is another package's binary, and its report only
//! counts responses, while this test needs to know which events were
//! acknowledged.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use wagate::sandbox::{ErrorInjection, SandboxConfig};

const PARTITIONS: i32 = 3;
/// Business numbers per partition of `outbound.requests`.
const NUMBERS_PER_PARTITION: usize = 8;
/// Send requests per number, produced in `WAVES` waves.
const WAVES: usize = 5;
const PER_WAVE: usize = 12;
/// Messages/s per number: slow enough that every instance still holds work
/// when the group rebalances after the kill.
const THROUGHPUT: &str = "3";
/// Webhooks: `FEEDERS` concurrent senders, `PER_FEEDER` POSTs each, two
/// events per POST.
const FEEDERS: usize = 12;
const PER_FEEDER: usize = 250;

/// One spawned gateway process.
struct Instance {
    name: &'static str,
    /// The API version segment it calls the sandbox with.
    version: &'static str,
    public: SocketAddr,
    internal: SocketAddr,
    /// Killed when dropped (also on a panic).
    child: Option<process::Running>,
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn spawn_instance(
    name: &'static str,
    version: &'static str,
    brokers: &str,
    prefix: &str,
    graph: &str,
) -> Instance {
    let (public, internal) = (free_addr(), free_addr());
    let child = gateway_process(brokers, prefix)
        .env("WAGATE_LISTEN", public)
        .env("WAGATE_INTERNAL_LISTEN", internal)
        .env("WAGATE_GRAPH_BASE_URL", format!("{graph}/{version}"))
        .env("WAGATE_DEFAULT_THROUGHPUT", THROUGHPUT)
        .log(&format!("multi_instance_{name}.log"))
        .spawn();
    Instance {
        name,
        version,
        public,
        internal,
        child: Some(child),
    }
}

/// Kafka's murmur2 partitioner (librdkafka `murmur2_random` for non-null
/// keys): which partition a key lands on.
fn partition_of(key: &[u8], partitions: i32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions as u32) as i32
}

/// `NUMBERS_PER_PARTITION` business numbers for each partition, so that
/// every member of the group owns some.
fn numbers() -> Vec<String> {
    let mut per: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for i in 0..10_000u32 {
        let n = format!("5{:014}", 10_000_000 + i);
        let p = partition_of(n.as_bytes(), PARTITIONS);
        let v = per.entry(p).or_default();
        if v.len() < NUMBERS_PER_PARTITION {
            v.push(n);
        }
        if per.len() == PARTITIONS as usize
            && per.values().all(|v| v.len() == NUMBERS_PER_PARTITION)
        {
            break;
        }
    }
    per.into_values().flatten().collect()
}

/// The egress and consumer lines of an instance's `/metrics`.
async fn egress_metrics(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    internal: SocketAddr,
) -> String {
    let get = async {
        let r = client
            .get(format!("http://{internal}/metrics").parse().unwrap())
            .await
            .ok()?;
        let body = r.into_body().collect().await.ok()?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                (l.starts_with("wagate_egress") || l.starts_with("wagate_consumer"))
                    && !l.contains("_bucket")
            })
            .collect();
        Some(if lines.is_empty() {
            format!("(no egress lines in {} bytes)", text.len())
        } else {
            lines.join("\n")
        })
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "(no answer)".into())
}

/// Reads every result so far, by request id.
async fn results(brokers: &str, prefix: &str) -> HashMap<String, Vec<(i32, Value)>> {
    results_by_id(brokers, prefix, Duration::from_millis(800))
        .await
        .into_iter()
        .map(|(id, recs)| {
            (
                id,
                recs.into_iter().map(|r| (r.partition, r.value)).collect(),
            )
        })
        .collect()
}

/// On librdkafka's mock cluster (as `egress_crash.rs`): it runs Kafka's group
/// protocol, so the survivors are told to rebalance when the killed member's
/// session times out. Tansu 0.6 does not (see the ignored test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_one_group_kill_9_one_nothing_lost_no_number_sent_twice_at_once() {
    let p = unique_prefix("multi");
    let mock = wagate::kafka::mock::start(&p, PARTITIONS).unwrap();
    scenario(&mock.bootstrap_servers(), &p).await;
}

/// The same against `WAGATE_TEST_BROKERS`. Ignored because Tansu 0.6's group
/// coordinator fails it: the survivor whose heartbeat finds the dead
/// member's session expired is told to rebalance, but the group keeps its
/// generation, so that survivor rejoins alone (as leader it assigns every
/// partition among the members it knows) while the other survivors' heartbeats
/// keep succeeding: they never rejoin, never fetch their new assignment and
/// keep their old partitions. The dead member's partition is then consumed
/// by nobody (or a partition by two members) until a new member joins. Run
/// it with `--ignored` against Apache Kafka or Redpanda.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Tansu 0.6 never tells every survivor to rebalance after a member's session expires"]
async fn three_processes_one_group_kill_9_on_test_brokers() {
    let b = brokers();
    let p = unique_prefix("multi");
    create_topics(&config(&b, &p, &[]).kafka).await;
    scenario(&b, &p).await;
}

async fn scenario(b: &str, p: &str) {
    let t0 = Instant::now();
    let (b, p) = (b.to_string(), p.to_string());
    // Slow answers keep sends in flight when an instance dies.
    let sb = sandbox_on_own_runtime(SandboxConfig {
        default_throughput: 0,
        pair_rate: None,
        error_rates: ErrorInjection {
            slow: 1.0,
            slow_delay: Duration::from_millis(100),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let graph = format!("http://{}", sb.addr());

    // 1. Three processes, each calling the sandbox under its own version.
    let mut procs = vec![
        spawn_instance("A", "v23.0", &b, &p, &graph),
        spawn_instance("B", "v22.0", &b, &p, &graph),
        spawn_instance("C", "v21.0", &b, &p, &graph),
    ];
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let end = Instant::now() + Duration::from_secs(30);
    for i in &mut procs {
        loop {
            if let Some(st) = i.child.as_mut().unwrap().try_wait() {
                panic!(
                    "instance {} exited with {st} (log: target/tmp/multi_instance_{}.log)",
                    i.name, i.name
                );
            }
            let ready = tokio::time::timeout(
                Duration::from_secs(2),
                client.get(format!("http://{}/readyz", i.internal).parse().unwrap()),
            )
            .await;
            if matches!(ready, Ok(Ok(ref r)) if r.status() == StatusCode::OK) {
                break;
            }
            assert!(
                Instant::now() < end,
                "instance {} never became ready",
                i.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("[{:?}] all three ready", t0.elapsed());
    let names: HashMap<String, &'static str> = procs
        .iter()
        .map(|i| (i.version.to_string(), i.name))
        .collect();
    let c_version = procs[2].version;
    let name = |v: &str| names.get(v).copied().unwrap_or("?");

    let numbers = numbers();
    let producer = wagate::kafka::KafkaProducer::new(&config(&b, &p, &[]).kafka).unwrap();
    let topic = format!("{p}outbound.requests");
    let mut ids: Vec<String> = Vec::new();
    let produce = async |ids: &mut Vec<String>, tag: &str, per_number: usize| {
        let mut futs = Vec::new();
        for n in &numbers {
            for k in 0..per_number {
                let i = ids.len();
                let id = format!("{n}-{tag}-{k}");
                let body = serde_json::to_vec(&template(&id, n, &format!("+1415{i:07}"))).unwrap();
                futs.push(producer.send(&topic, n.as_bytes(), &body, &[]).unwrap());
                ids.push(id);
            }
        }
        for f in futs {
            f.await.unwrap();
        }
    };
    // Work arrives once the three members share the partitions: one probe
    // request per number each second until all three instances have sent
    // (the members join one after the other; each join is a rebalance, and
    // on a loaded two-core host three of them took over 30 s once).
    let end = Instant::now() + Duration::from_secs(60);
    for w in 0.. {
        produce(&mut ids, &format!("probe{w}"), 1).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let senders: HashSet<String> = sb.sends().into_iter().map(|s| s.api_version).collect();
        if senders.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the three instances never all owned a partition: senders {senders:?}"
        );
    }
    eprintln!(
        "[{:?}] all three instances are sending ({} probes)",
        t0.elapsed(),
        ids.len()
    );

    // 2. Webhook load, alternately on A's and B's public ports.
    let (pa, pb) = (procs[0].public, procs[1].public);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let attempted: Arc<Mutex<Vec<String>>> = Arc::default();
    let statuses: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let feed_end = Instant::now() + Duration::from_secs(25);
    let mut feeders = Vec::new();
    for t in 0..FEEDERS {
        let (acked, attempted, statuses) = (acked.clone(), attempted.clone(), statuses.clone());
        let client = client.clone();
        feeders.push(tokio::spawn(async move {
            for i in 0..PER_FEEDER {
                if Instant::now() > feed_end {
                    break;
                }
                let addr = if (t + i) % 2 == 0 { pa } else { pb };
                let ids = [format!("wamid.MI{t}x{i}a"), format!("wamid.MI{t}x{i}b")];
                let number = format!("10987654321{:04}", (t * PER_FEEDER + i) % 7);
                let body = text_webhook(&number, &[&ids[0], &ids[1]]);
                let req = hyper::Request::post(format!("http://{addr}/webhook"))
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", sign(&body))
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                attempted.lock().unwrap().extend(ids.iter().cloned());
                let status = match tokio::time::timeout(Duration::from_secs(15), async {
                    let r = client.request(req).await.ok()?;
                    let s = r.status();
                    r.into_body().collect().await.ok()?;
                    Some(s)
                })
                .await
                {
                    Ok(Some(s)) => s.as_u16().to_string(),
                    Ok(None) => "io error".to_string(),
                    Err(_) => "timeout".to_string(),
                };
                if status == "200" {
                    acked.lock().unwrap().extend(ids);
                }
                *statuses.lock().unwrap().entry(status).or_default() += 1;
            }
        }));
    }

    // Send requests in waves while the webhooks flow; C is killed mid-run.
    let mut kill_at = None;
    let c_sent = |sb: &wagate::sandbox::Sandbox| {
        sb.sends()
            .iter()
            .filter(|s| s.api_version == c_version)
            .count()
    };
    let c_before = c_sent(&sb);
    for w in 0..WAVES {
        produce(&mut ids, &format!("w{w}"), PER_WAVE).await;
        eprintln!("[{:?}] wave {w} produced", t0.elapsed());
        if w == 1 {
            // 3. Kill C in the middle of its work (its sends in flight are
            // left without a result).
            let end = Instant::now() + Duration::from_secs(20);
            while c_sent(&sb) < c_before + 5 {
                assert!(Instant::now() < end, "C never sent anything");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let c = &mut procs[2];
            c.child.take().unwrap().kill9();
            kill_at = Some(Instant::now());
            eprintln!(
                "[{:?}] C killed after {} of its sends",
                t0.elapsed(),
                c_sent(&sb)
            );
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let kill_at = kill_at.unwrap();
    for f in feeders {
        f.await.unwrap();
    }
    eprintln!(
        "[{:?}] webhooks done: {:?}",
        t0.elapsed(),
        statuses.lock().unwrap()
    );
    // Every request gets a result once the survivors hold C's partition.
    let end = Instant::now() + Duration::from_secs(60);
    let by = loop {
        let by = results(&b, &p).await;
        if by.len() >= ids.len() || Instant::now() > end {
            break by;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "[{:?}] {} of {} requests have a result",
        t0.elapsed(),
        by.len(),
        ids.len()
    );
    // A little longer: a late second result or send would show up too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let by = results(&b, &p).await;
    for i in procs.iter().filter(|i| i.child.is_some()) {
        eprintln!(
            "--- {}'s egress metrics:\n{}",
            i.name,
            egress_metrics(&client, i.internal).await
        );
    }
    for i in &mut procs {
        drop(i.child.take()); // killed
    }
    let sends = sb.sends();

    // Who sent what, when (seconds since the test started), per partition.
    for part in 0..PARTITIONS {
        let mut line = format!("partition {part}:");
        for (v, who) in &names {
            let t: Vec<f64> = sends
                .iter()
                .filter(|s| {
                    &s.api_version == v
                        && partition_of(s.phone_number_id.as_bytes(), PARTITIONS) == part
                })
                .map(|s| s.arrived_at.saturating_duration_since(t0).as_secs_f64())
                .collect();
            if let (Some(a), Some(z)) = (
                t.iter().copied().reduce(f64::min),
                t.iter().copied().reduce(f64::max),
            ) {
                line.push_str(&format!(" {who}: {} sends {a:.1}–{z:.1}s;", t.len()));
            }
        }
        // The longest pause in the partition's sends, as a sign of a stall.
        let mut all: Vec<f64> = sends
            .iter()
            .filter(|s| partition_of(s.phone_number_id.as_bytes(), PARTITIONS) == part)
            .map(|s| s.arrived_at.saturating_duration_since(t0).as_secs_f64())
            .collect();
        all.sort_by(f64::total_cmp);
        if let Some((a, z)) = all
            .windows(2)
            .map(|w| (w[0], w[1]))
            .max_by(|x, y| (x.1 - x.0).total_cmp(&(y.1 - y.0)))
        {
            line.push_str(&format!(" longest pause {a:.1}–{z:.1}s;"));
        }
        eprintln!(
            "{line} (kill at {:.1}s)",
            kill_at.saturating_duration_since(t0).as_secs_f64()
        );
    }

    // 4a. Ingress: acknowledged ⇒ stored exactly once; nothing stored twice.
    let acked = acked.lock().unwrap().clone();
    let attempted: HashSet<String> = attempted.lock().unwrap().iter().cloned().collect();
    assert!(
        acked.len() >= FEEDERS * PER_FEEDER,
        "too few webhooks acknowledged to prove anything: {} events, {:?}",
        acked.len(),
        statuses.lock().unwrap()
    );
    let recs = read_all(&b, &p, "inbound.messages", Duration::from_millis(1500)).await;
    let mut stored: HashMap<String, usize> = HashMap::new();
    for id in event_ids(&recs) {
        *stored.entry(id).or_default() += 1;
    }
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events are not on inbound.messages, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    let twice: Vec<(&String, &usize)> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} events stored more than once, e.g. {:?}",
        twice.len(),
        twice.first()
    );
    assert!(
        stored.keys().all(|id| attempted.contains(id)),
        "an event nobody posted is on the topic"
    );

    // 4b. Egress: one result each; accepted ⇒ sent once; unknown ⇒ sent ≤ once.
    let mut sent: HashMap<String, usize> = HashMap::new();
    for s in &sends {
        *sent
            .entry(s.biz_opaque_callback_data.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let (mut unknown, mut unknown_unsent) = (0, 0);
    let mut unknown_per_part: BTreeMap<i32, usize> = BTreeMap::new();
    let mut missing = Vec::new();
    for id in &ids {
        let Some(rs) = by.get(id) else {
            missing.push(id.clone());
            continue;
        };
        assert_eq!(rs.len(), 1, "{id}: {} results: {rs:?}", rs.len());
        let n = sent.get(id).copied().unwrap_or(0);
        assert!(n <= 1, "{id} was sent {n} times");
        let (part, r) = &rs[0];
        let number = r["phone_number_id"].as_str().unwrap();
        assert_eq!(
            *part,
            partition_of(number.as_bytes(), PARTITIONS),
            "{id}: result not on its number's murmur2 partition"
        );
        match r["outcome"].as_str().unwrap() {
            "accepted" => assert_eq!(n, 1, "{id}: accepted but not in the sandbox's log"),
            "unknown" => {
                unknown += 1;
                unknown_unsent += usize::from(n == 0);
                *unknown_per_part.entry(*part).or_default() += 1;
            }
            other => panic!("{id}: unexpected outcome {other}: {r}"),
        }
    }
    assert!(
        missing.is_empty(),
        "{} requests have no result (the killed instance's partition was not taken over?), e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(sends.len() <= ids.len());

    // 4c. One sender per number at a time: in arrival order, each instance's
    // sends of a number form one block (their intervals never overlap).
    let mut taken_over = 0;
    for n in &numbers {
        let mut mine: Vec<&wagate::sandbox::RecordedSend> =
            sends.iter().filter(|s| &s.phone_number_id == n).collect();
        mine.sort_by_key(|s| s.arrived_at);
        let mut blocks: Vec<(&str, Instant, Instant)> = Vec::new();
        for s in &mine {
            match blocks.last_mut() {
                Some((v, _, last)) if *v == s.api_version => *last = s.arrived_at,
                _ => blocks.push((&s.api_version, s.arrived_at, s.arrived_at)),
            }
        }
        let order: Vec<&str> = blocks.iter().map(|(v, _, _)| name(v)).collect();
        let distinct: HashSet<&str> = order.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            order.len(),
            "number {n} (partition {}) was sent by two instances at overlapping times: \
             senders in arrival order {order:?}, blocks {:?}",
            partition_of(n.as_bytes(), PARTITIONS),
            blocks
                .iter()
                .map(|(v, a, z)| (
                    name(v),
                    a.saturating_duration_since(t0),
                    z.saturating_duration_since(t0)
                ))
                .collect::<Vec<_>>()
        );
        assert!(
            mine.iter()
                .all(|s| s.api_version != c_version || s.arrived_at <= kill_at),
            "C sent after it was killed"
        );
        if mine.iter().any(|s| s.api_version == c_version)
            && mine
                .iter()
                .any(|s| s.api_version != c_version && s.arrived_at > kill_at)
        {
            taken_over += 1;
        }
    }
    assert!(
        taken_over >= 1,
        "no number C was sending was taken over by A or B after the kill"
    );
    eprintln!(
        "[{:?}] ok: {} events acknowledged, {} requests ({unknown} unknown: {unknown_unsent} of them never \
         reached the sandbox; per partition {unknown_per_part:?}), {} sends, {taken_over} of C's numbers taken over",
        t0.elapsed(),
        acked.len(),
        ids.len(),
        sends.len(),
    );
    drop(procs);
    sb.shutdown().await;
}
