//! Inbound media (DESIGN §13) against real components: Tansu
//! (`WAGATE_TEST_BROKERS`), the Graph API sandbox on loopback (lookups and
//! downloads over HTTP), a real directory as the object store.
//!
//! The kill -9 test uses librdkafka's mock cluster instead of Tansu, as
//! `egress_crash.rs` does: Tansu 0.6 does not expire a killed consumer's
//! group membership.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use wagate::sandbox::media::MediaFault;
use wagate::sandbox::Sandbox;

const NUMBER: &str = "109876543210987";

/// Deterministic pseudo-random bytes.
fn bytes_of(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ seed as u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Reads `wa.inbound.media` until `want` records or `timeout`.
async fn media_records(b: &str, p: &str, want: usize, timeout: Duration) -> Vec<Value> {
    let end = Instant::now() + timeout;
    loop {
        // A reader's first fetch can take over a second on a broker that
        // holds many topics: a shorter idle limit returns before it.
        let recs: Vec<Value> = read_all(b, p, "inbound.media", Duration::from_secs(3))
            .await
            .into_iter()
            .map(|r| r.value)
            .collect();
        if recs.len() >= want || Instant::now() > end {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn by_media_id(recs: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut m: HashMap<String, Vec<Value>> = HashMap::new();
    for r in recs {
        m.entry(r["media_id"].as_str().unwrap().to_string())
            .or_default()
            .push(r.clone());
    }
    m
}

/// The file behind a `file://` location.
fn file_of(location: &str) -> PathBuf {
    PathBuf::from(
        location
            .strip_prefix("file://")
            .expect("a file:// location"),
    )
}

fn store_dir(p: &str) -> PathBuf {
    file_of(&media_store_for(p))
}

async fn gateway_with_sandbox(
    b: &str,
    p: &str,
    sb: &Sandbox,
    extra: &[(&str, &str)],
) -> wagate::app::Gateway {
    let mut o = vec![
        ("WAGATE_MEDIA_PART_SIZE_BYTES", "1048576"),
        ("WAGATE_MEDIA_CONCURRENCY_PER_NUMBER", "8"),
    ];
    o.extend_from_slice(extra);
    let gw = start_on(b, p, sb, &o).await;
    wait_assigned(&gw).await;
    gw
}

/// Waits until the media worker has partitions (Tansu may place a new
/// group's start after records produced while it was joining).
async fn wait_assigned(gw: &wagate::app::Gateway) {
    let end = Instant::now() + Duration::from_secs(30);
    while !gw.media.as_ref().unwrap().assigned() {
        assert!(
            Instant::now() < end,
            "the media worker never got partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_stored_byte_for_byte_and_failures_recorded() {
    let b = brokers();
    let p = unique_prefix("media-kinds");
    let sb = sandbox(|_| {}).await;
    let gw = gateway_with_sandbox(&b, &p, &sb, &[]).await;

    let kinds = [
        ("image", "image/jpeg", 180_000usize),
        ("audio", "audio/ogg", 40_000),
        ("video", "video/mp4", 3_500_000), // above the 1 MiB part size: multipart
        ("document", "application/pdf", 700_000),
        ("sticker", "image/webp", 30_000),
    ];
    let mut expect = HashMap::new();
    for (i, (kind, mime, n)) in kinds.iter().enumerate() {
        let data = bytes_of(*n, i as u8);
        let wamid = format!("wamid.media-{kind}");
        let (body, id) =
            sb.inbound_media_body(NUMBER, "14155550123", &wamid, kind, data.clone(), mime);
        webhook_ok(gw.public_addr, &body).await;
        expect.insert(id, (kind.to_string(), mime.to_string(), data));
    }
    // 5xx on the lookup twice and on the download once, then success.
    let flaky = bytes_of(90_000, 9);
    let (body, flaky_id) = sb.inbound_media_body(
        NUMBER,
        "14155550124",
        "wamid.flaky",
        "image",
        flaky.clone(),
        "image/png",
    );
    sb.media().set_fault(
        &flaky_id,
        MediaFault {
            lookup_5xx: 2,
            download_5xx: 1,
            ..Default::default()
        },
    );
    webhook_ok(gw.public_addr, &body).await;
    // A wrong checksum in the lookup: failed, nothing stored.
    let (body, bad_sum) = sb.inbound_media_body(
        NUMBER,
        "14155550125",
        "wamid.badsum",
        "document",
        bytes_of(2_500_000, 3),
        "application/pdf",
    );
    sb.media().set_fault(
        &bad_sum,
        MediaFault {
            wrong_checksum: true,
            ..Default::default()
        },
    );
    webhook_ok(gw.public_addr, &body).await;
    // An id Meta no longer knows: failed with Meta's error.
    let (body, gone) = sb.inbound_media_body(
        NUMBER,
        "14155550126",
        "wamid.gone",
        "image",
        bytes_of(10, 1),
        "image/jpeg",
    );
    sb.media().set_fault(
        &gone,
        MediaFault {
            expired: true,
            ..Default::default()
        },
    );
    webhook_ok(gw.public_addr, &body).await;
    // A message older than 7 days: failed "expired" without a call.
    let old_ms = wagate::clock::now_ms() - 8 * 24 * 3600 * 1000;
    let old_id = sb.media().add("4242424242", bytes_of(100, 4), "image/jpeg");
    let old_body =
        wagate::sandbox::media::inbound_media_body(wagate::sandbox::media::InboundMedia {
            phone_number_id: NUMBER,
            wa_id: "14155550127",
            wamid: "wamid.old",
            kind: "image",
            media_id: &old_id,
            mime_type: "image/jpeg",
            sha256_hex: &sb.media().sha256_hex(&old_id).unwrap(),
            at_unix_ms: old_ms,
        });
    webhook_ok(gw.public_addr, &old_body).await;

    let recs = media_records(&b, &p, 9, Duration::from_secs(60)).await;
    let by = by_media_id(&recs);
    assert_eq!(recs.len(), 9, "one record per item: {recs:#?}");
    for (id, (kind, mime, data)) in &expect {
        let r = one(&by, id);
        assert_eq!(r["outcome"], "stored", "{r}");
        assert_eq!(r["type"], kind.as_str());
        assert_eq!(r["mime_type"], mime.as_str());
        assert_eq!(r["bytes"], data.len() as u64);
        assert_eq!(r["sha256"], hex::encode(Sha256::digest(data)));
        assert_eq!(r["phone_number_id"], NUMBER);
        assert_eq!(r["wa_id"], "14155550123");
        assert!(r["error"].is_null());
        let loc = r["location"].as_str().unwrap();
        assert!(
            loc.ends_with(&format!("/{NUMBER}/14155550123/{id}")),
            "{loc}"
        );
        assert_eq!(
            &std::fs::read(file_of(loc)).unwrap(),
            data,
            "{kind} byte for byte"
        );
    }
    let r = one(&by, &flaky_id);
    assert_eq!(r["outcome"], "stored", "{r}");
    assert_eq!(
        std::fs::read(file_of(r["location"].as_str().unwrap())).unwrap(),
        flaky
    );

    let r = one(&by, &bad_sum);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["error"]["code"], "checksum_mismatch");
    assert!(r["location"].is_null());
    let user_dir = store_dir(&p).join(NUMBER).join("14155550125");
    let left: Vec<_> = std::fs::read_dir(&user_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "nothing stored for a checksum mismatch: {left:?}"
    );

    let r = one(&by, &gone);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["error"]["source"], "meta");
    assert_eq!(r["error"]["code"], 100);

    let r = one(&by, &old_id);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["error"]["code"], "expired");
    let m = String::from_utf8(
        get(&format!("http://{}/metrics", gw.internal_addr))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        metric_in(&m, "wagate_media_fetches_total", &[("outcome", "stored")]) >= 6.0,
        "{m}"
    );
    assert!(metric_in(&m, "wagate_media_retries_total", &[("reason", "http_5xx")]) >= 3.0);
    assert!(
        metric_in(
            &m,
            "wagate_media_fetches_total",
            &[("outcome", "failed"), ("reason", "checksum_mismatch")]
        ) == 1.0
    );
    // No lookup for the old message: 5 + (2 failed + 1) + 1 (+1 per download 5xx retry) + 1.
    let looked = sb.media().lookups();
    assert_eq!(looked, 5 + 3 + 1 + 1 + 1, "lookups");
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_200_does_not_wait_for_a_slow_download() {
    let b = brokers();
    let p = unique_prefix("media-slow");
    let sb = sandbox(|_| {}).await;
    let gw = gateway_with_sandbox(&b, &p, &sb, &[]).await;
    let data = bytes_of(40 * 64 * 1024, 7);
    let (body, id) = sb.inbound_media_body(
        NUMBER,
        "14155550130",
        "wamid.slow",
        "video",
        data.clone(),
        "video/mp4",
    );
    sb.media().set_fault(
        &id,
        MediaFault {
            chunk_delay: Duration::from_millis(100),
            ..Default::default()
        },
    );
    webhook_ok(gw.public_addr, &body).await;
    // The 200 came back; the object is not there yet (40 chunks, 100 ms each).
    let obj = store_dir(&p).join(NUMBER).join("14155550130").join(&id);
    assert!(!obj.exists(), "the 200 waited for the download");
    let recs = media_records(&b, &p, 1, Duration::from_secs(60)).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["outcome"], "stored", "{}", recs[0]);
    assert_eq!(std::fs::read(&obj).unwrap(), data);
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_deletes_the_persons_media_under_every_linked_id() {
    let b = brokers();
    let p = unique_prefix("media-erase");
    let sb = sandbox(|_| {}).await;
    let gw = gateway_with_sandbox(&b, &p, &sb, &[]).await;
    let ana = "14155550140";
    let ana_bsuid = wagate::sandbox::bsuid_of(ana);
    let bob = "14155550141";
    let (b1, _) = sb.inbound_media_body(
        NUMBER,
        ana,
        "wamid.e1",
        "image",
        bytes_of(1000, 1),
        "image/jpeg",
    );
    let (b2, _) = sb.inbound_media_body(
        NUMBER,
        ana,
        "wamid.e2",
        "audio",
        bytes_of(2000, 2),
        "audio/ogg",
    );
    let (b3, _) = sb.inbound_media_body(
        NUMBER,
        bob,
        "wamid.e3",
        "image",
        bytes_of(3000, 3),
        "image/jpeg",
    );
    // Ana by BSUID only (a username user's message): stored under the BSUID.
    let (b4, _) = sb.inbound_media_body(
        NUMBER,
        ana,
        "wamid.e4",
        "sticker",
        bytes_of(500, 4),
        "image/webp",
    );
    let mut v4: Value = serde_json::from_slice(&b4).unwrap();
    let value = &mut v4["entry"][0]["changes"][0]["value"];
    value["contacts"][0]
        .as_object_mut()
        .unwrap()
        .remove("wa_id");
    let msg = value["messages"][0].as_object_mut().unwrap();
    msg.remove("from");
    msg.insert("from_user_id".into(), ana_bsuid.clone().into());
    let b4 = serde_json::to_vec(&v4).unwrap();
    for body in [&b1, &b2, &b3] {
        webhook_ok(gw.public_addr, body).await;
    }
    webhook_ok(gw.public_addr, &b4).await;
    let recs = media_records(&b, &p, 4, Duration::from_secs(60)).await;
    assert_eq!(recs.len(), 4, "{recs:#?}");
    assert!(recs.iter().all(|r| r["outcome"] == "stored"), "{recs:#?}");
    let dir = store_dir(&p).join(NUMBER);
    let count = |u: &str| {
        std::fs::read_dir(dir.join(u))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!((count(ana), count(&ana_bsuid), count(bob)), (2, 1, 1));
    let url = format!("http://{}/v1/contacts/{NUMBER}/{ana}", gw.internal_addr);
    // The link phone ↔ BSUID is known once the contacts cache read it.
    wait_for(&url, |r| {
        serde_json::from_slice::<Value>(&r.body)
            .map(|v| v["ids"]["user_id"] == ana_bsuid.as_str())
            .unwrap_or(false)
    })
    .await;
    let r = api("DELETE", &url, None).await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!((count(ana), count(&ana_bsuid), count(bob)), (0, 0, 1));
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_sweep_deletes_old_objects_and_nothing_else() {
    let b = brokers();
    let p = unique_prefix("media-sweep");
    let sb = sandbox(|_| {}).await;
    let gw = gateway_with_sandbox(&b, &p, &sb, &[("WAGATE_MEDIA_RETENTION_DAYS", "30")]).await;
    let mut ids = Vec::new();
    for (i, wamid) in ["wamid.s1", "wamid.s2", "wamid.s3"].iter().enumerate() {
        let (body, id) = sb.inbound_media_body(
            NUMBER,
            "14155550150",
            wamid,
            "image",
            bytes_of(1000 + i, i as u8),
            "image/jpeg",
        );
        webhook_ok(gw.public_addr, &body).await;
        ids.push(id);
    }
    let recs = media_records(&b, &p, 3, Duration::from_secs(60)).await;
    assert_eq!(recs.len(), 3);
    let dir = store_dir(&p).join(NUMBER).join("14155550150");
    // Two of them 31 and 45 days old.
    for (id, days) in [(&ids[0], 31u64), (&ids[1], 45)] {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(id))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(days * 86_400))
            .unwrap();
    }
    let media = gw.media.as_ref().unwrap();
    assert_eq!(media.sweep_once().await.unwrap(), 2);
    assert!(!dir.join(&ids[0]).exists());
    assert!(!dir.join(&ids[1]).exists());
    assert!(dir.join(&ids[2]).exists(), "a recent object is kept");
    assert_eq!(media.sweep_once().await.unwrap(), 0);
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_work_without_fetching_twice() {
    let b = brokers();
    let p = unique_prefix("media-two");
    let sb = sandbox(|_| {}).await;
    let gw1 = gateway_with_sandbox(&b, &p, &sb, &[]).await;
    // Instance 2 calls the sandbox under another API version: the sandbox
    // counts each instance's lookups.
    let v24 = format!("http://{}/v24.0", sb.addr());
    let gw2 = start(
        &b,
        &p,
        &[
            ("WAGATE_GRAPH_BASE_URL", v24.as_str()),
            ("WAGATE_MEDIA_PART_SIZE_BYTES", "1048576"),
        ],
    )
    .await;
    wait_assigned(&gw2).await;
    // Let the group settle (both members assigned) before the load.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut ids = Vec::new();
    for i in 0..24 {
        let number = format!("2000000000000{:02}", i % 6);
        let (body, id) = sb.inbound_media_body(
            &number,
            &format!("1415555{:04}", i),
            &format!("wamid.two-{i}"),
            "image",
            bytes_of(20_000 + i, i as u8),
            "image/jpeg",
        );
        let gw = if i % 2 == 0 { &gw1 } else { &gw2 };
        webhook_ok(gw.public_addr, &body).await;
        ids.push(id);
    }
    let recs = media_records(&b, &p, 24, Duration::from_secs(60)).await;
    let by = by_media_id(&recs);
    for id in &ids {
        assert_eq!(one(&by, id)["outcome"], "stored");
    }
    assert_eq!(recs.len(), 24);
    assert_eq!(sb.media().downloads(), 24, "no item downloaded twice");
    let by_version = sb.media().lookups_by_version();
    let (s1, s2) = (by_version["v23.0"], by_version["v24.0"]);
    assert_eq!(s1 + s2, 24, "no item looked up twice");
    assert!(s1 > 0 && s2 > 0, "both instances fetched: {s1} + {s2}");
    assert!(gw1.shutdown().await);
    assert!(gw2.shutdown().await);
}

/// kill -9 mid-download, then a restart: exactly one record per item, every
/// object complete. Also the two edges of a crash: an object stored whose
/// record was never written (reused, not downloaded again) and a record
/// acknowledged whose offset was never committed (not recorded twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_download_then_restart_one_record_each_objects_complete() {
    let p = unique_prefix("media-crash");
    let mock = wagate::kafka::mock::start(&p, 3).unwrap();
    let b = mock.bootstrap_servers();
    let sb = sandbox(|_| {}).await;
    let cfg = config(&b, &p, &[]);
    let spawn = |log: &str, internal: &str| {
        gateway_process(&b, &p)
            .env("WAGATE_INTERNAL_LISTEN", internal)
            .env("WAGATE_GRAPH_BASE_URL", sb.base_url())
            .env("WAGATE_MEDIA_PART_SIZE_BYTES", "1048576")
            .env("WAGATE_KAFKA_CHECK_RECORD_LIMIT", "false")
            .log(log)
            .spawn()
    };
    let producer = wagate::kafka::KafkaProducer::new(&cfg.kafka).unwrap();
    let topic = format!("{p}inbound.messages");
    let produce = |value: Value| {
        let payload = serde_json::to_vec(&value).unwrap();
        let d = producer
            .send(&topic, NUMBER.as_bytes(), &payload, &[])
            .unwrap();
        async move { d.await.unwrap() }
    };
    let record = |wamid: &str, user: &str, id: &str| {
        serde_json::json!({"v":1,"event_id":wamid,"kind":"message","app":"default","waba_id":"1","phone_number_id":NUMBER,
            "display_phone_number":"1","wa_id":user,"user_id":null,"profile_name":null,
            "timestamp": wagate::clock::now_ms() / 1000,"received_at_ms":wagate::clock::now_ms(),
            "message":{"from":user,"id":wamid,"type":"document","document":{"id":id,"mime_type":"application/pdf"}}})
    };
    // Slow, large items: several are mid-download when the gateway dies.
    let mut items = Vec::new();
    for i in 0..4 {
        let data = bytes_of(3 * 1024 * 1024 + i * 1000, i as u8 + 20);
        let id = sb
            .media()
            .add(&format!("777000{i}"), data.clone(), "application/pdf");
        sb.media().set_fault(
            &id,
            MediaFault {
                chunk_delay: Duration::from_millis(40),
                ..Default::default()
            },
        );
        produce(record(&format!("wamid.crash-{i}"), "14155550160", &id)).await;
        items.push((id, data));
    }
    // Edge 1: the object is already stored (a crash before its record).
    let pre = bytes_of(5000, 99);
    let pre_id = sb.media().add("7770100", pre.clone(), "application/pdf");
    let pre_path = store_dir(&p).join(NUMBER).join("14155550161").join(&pre_id);
    std::fs::create_dir_all(pre_path.parent().unwrap()).unwrap();
    std::fs::write(&pre_path, &pre).unwrap();
    produce(record("wamid.pre-stored", "14155550161", &pre_id)).await;
    // Edge 2: the record is on the topic already (a crash before the commit).
    let done_id = sb
        .media()
        .add("7770200", bytes_of(5000, 98), "application/pdf");
    produce(record("wamid.pre-recorded", "14155550162", &done_id)).await;
    let media_topic = format!("{p}inbound.media");
    let done_rec = serde_json::json!({"v":1,"event_id":"wamid.pre-recorded","media_id":done_id,"phone_number_id":NUMBER,"outcome":"stored"});
    producer
        .send(
            &media_topic,
            NUMBER.as_bytes(),
            &serde_json::to_vec(&done_rec).unwrap(),
            &[],
        )
        .unwrap()
        .await
        .unwrap();

    let mut gw = spawn("media-crash-1.log", "127.0.0.1:0");
    let end = Instant::now() + Duration::from_secs(30);
    while sb.media().downloads() < 2 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sb.media().downloads() >= 2,
        "downloads never started: {}",
        gw.log_tail(30)
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    gw.kill9();
    let before = read_all(&b, &p, "inbound.media", Duration::from_millis(500))
        .await
        .len();
    assert!(
        before < 1 + 6,
        "the kill came too late to test anything ({before} records)"
    );

    let internal = format!("127.0.0.1:{}", free_port());
    let gw = spawn("media-crash-2.log", &internal);
    let recs = media_records(&b, &p, 7, Duration::from_secs(90)).await;
    let by = by_media_id(&recs);
    for (id, data) in &items {
        let r = one(&by, id);
        assert_eq!(r["outcome"], "stored", "{r}");
        assert_eq!(
            &std::fs::read(file_of(r["location"].as_str().unwrap())).unwrap(),
            data,
            "object complete"
        );
    }
    let r = one(&by, &pre_id);
    assert_eq!(r["outcome"], "stored");
    one(&by, &done_id);
    assert_eq!(recs.len(), 6, "exactly one record per item: {recs:#?}");
    // Neither edge was downloaded by the second instance: the stored object
    // was reused (or, if the first instance reached it before the kill and
    // recorded it, the record was found), the recorded item skipped.
    let m = String::from_utf8(
        get(&format!("http://{internal}/metrics"))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    let reused = metric_in(&m, "wagate_media_reused_total", &[]);
    let skipped = metric_in(&m, "wagate_media_skipped_total", &[]);
    assert!(skipped >= 1.0, "{m}");
    assert_eq!(reused + skipped, 2.0, "{m}");
    drop(gw);
}

/// The sandbox's media endpoints as a client sees them: the lookup needs a
/// token, the download URL needs the bearer token too and expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_media_lookup_and_short_lived_download_url() {
    let sb = sandbox(|c| c.access_tokens = vec!["tok".into()]).await;
    let data = bytes_of(150_000, 5);
    let id = sb.media().add("5550001", data.clone(), "audio/ogg");
    let call = |url: String, token: Option<&'static str>| async move {
        let mut b = hyper::Request::get(url);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        request(
            b.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
    };
    let lookup = format!("{}/{id}", sb.base_url());
    assert_eq!(call(lookup.clone(), None).await.status, 401);
    assert_eq!(call(lookup.clone(), Some("wrong")).await.status, 401);
    let r = call(lookup.clone(), Some("tok")).await;
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["mime_type"], "audio/ogg");
    assert_eq!(v["file_size"], 150_000);
    assert_eq!(v["sha256"], hex::encode(Sha256::digest(&data)));
    let url = v["url"].as_str().unwrap().to_string();
    assert_eq!(
        call(url.clone(), None).await.status,
        401,
        "the download needs the token"
    );
    let got = call(url.clone(), Some("tok")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.as_ref(), data.as_slice());
    // A tampered URL and an expired one are 404 (fetch a fresh URL).
    assert_eq!(call(format!("{url}0"), Some("tok")).await.status, 404);
    sb.media().set_url_ttl(Duration::from_millis(1));
    let v: Value = serde_json::from_slice(&call(lookup.clone(), Some("tok")).await.body).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        call(v["url"].as_str().unwrap().to_string(), Some("tok"))
            .await
            .status,
        404
    );
    // Faults: 5xx once, then the lookup works; an expired id is Meta's #100.
    sb.media().set_url_ttl(Duration::from_secs(300));
    sb.media().set_fault(
        &id,
        MediaFault {
            lookup_5xx: 1,
            ..Default::default()
        },
    );
    assert_eq!(call(lookup.clone(), Some("tok")).await.status, 500);
    assert_eq!(call(lookup.clone(), Some("tok")).await.status, 200);
    sb.media().set_fault(
        &id,
        MediaFault {
            expired: true,
            ..Default::default()
        },
    );
    let r = call(lookup, Some("tok")).await;
    assert_eq!(r.status, 400);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], 100);
    assert_eq!(v["error"]["error_subcode"], 33);
}

/// Posts `per_number` video webhooks (768 KiB each, served in slow chunks
/// so downloads overlap) for each of `numbers`; returns how many.
async fn post_slow_videos(
    sb: &Sandbox,
    gw: &wagate::app::Gateway,
    numbers: &[&str],
    per_number: usize,
) -> usize {
    let mut n = 0;
    for number in numbers {
        for i in 0..per_number {
            let (body, id) = sb.inbound_media_body(
                number,
                &format!("141555502{i}0"),
                &format!("wamid.conc-{number}-{i}"),
                "video",
                bytes_of(12 * 64 * 1024, i as u8),
                "video/mp4",
            );
            sb.media().set_fault(
                &id,
                MediaFault {
                    chunk_delay: Duration::from_millis(40),
                    ..Default::default()
                },
            );
            webhook_ok(gw.public_addr, &body).await;
            n += 1;
        }
    }
    n
}

/// `media.concurrency_per_number` bounds one number's downloads; other
/// numbers are not held behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_number_concurrency_bounds_downloads() {
    let b = brokers();
    let p = unique_prefix("media-conc");
    let sb = sandbox(|_| {}).await;
    let gw =
        gateway_with_sandbox(&b, &p, &sb, &[("WAGATE_MEDIA_CONCURRENCY_PER_NUMBER", "1")]).await;
    let n = post_slow_videos(&sb, &gw, &["300000000000001", "300000000000002"], 3).await;
    let recs = media_records(&b, &p, n, Duration::from_secs(60)).await;
    assert_eq!(recs.len(), n);
    assert!(recs.iter().all(|r| r["outcome"] == "stored"), "{recs:#?}");
    let max = sb.media().max_concurrent_downloads();
    assert!(max <= 2, "one download per number at most: {max} at once");
    assert_eq!(max, 2, "the two numbers were fetched side by side");
    assert!(gw.shutdown().await);
}

/// `media.concurrency` bounds the process's downloads across numbers, and
/// is reached: three numbers with room for four each, two at once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_concurrency_bounds_downloads_across_numbers() {
    let b = brokers();
    let p = unique_prefix("media-gconc");
    let sb = sandbox(|_| {}).await;
    let gw = gateway_with_sandbox(
        &b,
        &p,
        &sb,
        &[
            ("WAGATE_MEDIA_CONCURRENCY", "2"),
            ("WAGATE_MEDIA_CONCURRENCY_PER_NUMBER", "4"),
        ],
    )
    .await;
    let numbers = ["300000000000011", "300000000000012", "300000000000013"];
    let n = post_slow_videos(&sb, &gw, &numbers, 2).await;
    let recs = media_records(&b, &p, n, Duration::from_secs(60)).await;
    assert_eq!(recs.len(), n);
    assert!(recs.iter().all(|r| r["outcome"] == "stored"), "{recs:#?}");
    let max = sb.media().max_concurrent_downloads();
    assert!(
        max <= 2,
        "two downloads in the process at most: {max} at once"
    );
    assert_eq!(max, 2, "the limit was reached");
    assert!(gw.shutdown().await);
}
