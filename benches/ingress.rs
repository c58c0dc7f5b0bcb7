//! Ingress CPU costs: signature verification by body size, parse + fan-out of
//! a 1-event and a 50-event body, ingress's whole body path (scan, parse,
//! plan, fan-out), the scan and the plan alone, record encoding alone, and
//! the dedupe set.
//!
//! Run: `cargo bench --bench ingress`

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wagate::config::Secret;
use wagate::ingress::dedupe::{Batch, Claim, Dedupe};
use wagate::meta::{signature, webhook};

fn body_with(n: usize) -> Vec<u8> {
    let mut msgs = Vec::new();
    for i in 0..n {
        msgs.push(format!(
            r#"{{"from":"5511987654321","id":"wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNFQjBDQUZFMDAwMDAwMDAw{i:08}AA==","timestamp":"1781600900","type":"text","text":{{"body":"caf\u00e9 \ud83d\ude00 https:\/\/example.com order #{i}"}}}}"#
        ));
    }
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102345678901234","changes":[{{"value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550199999","phone_number_id":"109876543210987"}},"contacts":[{{"profile":{{"name":"Jo\u00e3o Pereira"}},"wa_id":"5511987654321"}}],"messages":[{}]}},"field":"messages"}}]}}]}}"#,
        msgs.join(",")
    )
    .into_bytes()
}

fn bench_signature(c: &mut Criterion) {
    let secrets = [Secret::new("example_app_secret_0123456789abcdef")];
    let mut g = c.benchmark_group("verify_signature");
    for size in [512usize, 4 * 1024, 64 * 1024, 3 * 1024 * 1024] {
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let header = signature::sign(secrets[0].expose().as_bytes(), &body);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| {
                signature::verify(Some(header.as_bytes()), black_box(body), &secrets).unwrap()
            })
        });
    }
    g.finish();
}

fn bench_fan_out(c: &mut Criterion) {
    let ctx = webhook::Context {
        app: "default",
        received_at_ms: 1_781_600_999_000,
    };
    let mut g = c.benchmark_group("parse_fan_out");
    for n in [1usize, 50] {
        let body = body_with(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("events", n), &body, |b, body| {
            b.iter(|| {
                // Includes the copy ingress makes before simd-json rewrites it.
                let mut copy = body.clone();
                let evs = webhook::fan_out(black_box(&mut copy), ctx).unwrap();
                assert_eq!(evs.len(), n);
                evs
            })
        });
    }
    g.finish();

    // What ingress does per signed body since the hostile-input limits:
    // the pre-scan, the parse, the plan (envelope, ids, count, size
    // estimate) and the fan-out one event at a time.
    let mut g = c.benchmark_group("ingress_path");
    let limits = webhook::Limits::DEFAULT;
    for n in [1usize, 50] {
        let body = body_with(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("events", n), &body, |b, body| {
            b.iter(|| {
                let mut copy = body.clone();
                let root = webhook::parse(black_box(&mut copy), limits.max_depth).unwrap();
                let planned = webhook::plan(&root, ctx, body.len(), &limits).unwrap();
                assert_eq!(planned, Ok(n));
                let mut bytes = 0;
                webhook::for_each_event(&root, ctx, &mut |e| {
                    bytes += e.value.len();
                    true
                })
                .unwrap();
                bytes
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("scan_plan");
    for n in [1usize, 50] {
        let body = body_with(n);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("scan", n), &body, |b, body| {
            b.iter(|| wagate::meta::scan::scan(black_box(body), 64).unwrap())
        });
        let mut copy = body.clone();
        let root = simd_json::to_borrowed_value(&mut copy).unwrap();
        g.bench_with_input(BenchmarkId::new("plan", n), &root, |b, root| {
            b.iter(|| webhook::plan(black_box(root), ctx, body.len(), &limits).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("encode_records");
    for n in [1usize, 50] {
        let mut body = body_with(n);
        let parsed = simd_json::to_borrowed_value(&mut body).unwrap();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("events", n), &parsed, |b, v| {
            b.iter(|| webhook::fan_out_value(black_box(v), ctx).unwrap())
        });
    }
    g.finish();
}

fn bench_dedupe(c: &mut Criterion) {
    let d = Arc::new(Dedupe::new(Duration::from_secs(3600), 4_000_000));
    // Pre-fill with 1M committed ids.
    let b = Batch::new();
    for i in 0..1_000_000u64 {
        if let Claim::New(h) = d.claim(&format!("wamid.pre{i}"), &b) {
            d.commit(&[h]);
        }
    }
    let mut i = 0u64;
    c.bench_function("dedupe_claim_commit_new_id", |bch| {
        bch.iter(|| {
            i += 1;
            let id = format!("wamid.new{i}");
            if let Claim::New(h) = d.claim(&id, &b) {
                d.commit(&[h]);
            }
        })
    });
    c.bench_function("dedupe_claim_duplicate", |bch| {
        bch.iter(|| {
            matches!(
                d.claim(black_box("wamid.pre4242"), &b),
                Claim::Duplicate { .. }
            )
        })
    });
}

criterion_group!(benches, bench_signature, bench_fan_out, bench_dedupe);
criterion_main!(benches);
