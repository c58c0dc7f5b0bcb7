//! The template registry's costs, in process (no broker):
//!
//! (a) what `templates::webhook::learn` adds to a webhook POST: simd-json
//!     parse of `tests/fixtures/inbound_batched_multi_entry.json` alone, and
//!     parse + learn (the walk ingress makes on every verified body);
//! (b) `templates::check::check_send` per template send, against a
//!     registry of 10,000 templates;
//! (c) a paged listing of 1,000 templates (100 per page, 10 GETs) from the
//!     Graph API sandbox over loopback.
//!
//!   cargo bench --bench templates
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it uses a
//! smoke size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wagate::egress::request::SendRequest;
use wagate::sandbox::{Sandbox, SandboxConfig, SandboxTemplate};
use wagate::templates::{check, graph::TemplatesClient, Registry, Template};

fn per_op(label: &str, n: u64, f: impl FnMut()) {
    let mut f = f;
    // Warm up.
    for _ in 0..(n / 10).max(1) {
        f();
    }
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    println!("{label:<58} {best:>10.0} ns/op (best of 3 × {n})");
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = if full { 200_000 } else { 2_000 };
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/inbound_batched_multi_entry.json"
    ))
    .unwrap();
    let reg = Registry::default();

    // (a)
    let mut buf = body.clone();
    per_op("(a) parse the batched multi-entry webhook", n, || {
        buf.copy_from_slice(&body);
        let v = simd_json::to_borrowed_value(&mut buf).unwrap();
        std::hint::black_box(&v);
    });
    per_op("(a) parse + templates::webhook::learn", n, || {
        buf.copy_from_slice(&body);
        let v = simd_json::to_borrowed_value(&mut buf).unwrap();
        wagate::templates::webhook::learn(&reg, &v, 1, &mut |r| {
            std::hint::black_box(r);
        });
    });

    // (b)
    let reg = Registry::new([("109876543210987", "102345678901234")]);
    for i in 0..10_000 {
        let o = json!({"id": i.to_string(), "name": format!("t{i}"), "language": "en_US",
            "status": "APPROVED", "category": "UTILITY",
            "components": [{"type": "BODY", "text": "Hi {{1}}, order {{2}}"}]});
        let serde_json::Value::Object(o) = o else {
            unreachable!()
        };
        reg.insert(Arc::new(Template::listed("102345678901234", o, 1).unwrap()));
    }
    let req = SendRequest::parse(
        &serde_json::to_vec(
            &json!({"v":1,"request_id":"r","phone_number_id":"109876543210987",
            "to":"+14155550123","category":"utility","message":{"type":"template","template":{
            "name":"t5000","language":{"code":"en_US"},"components":[{"type":"body","parameters":[
            {"type":"text","text":"Ana"},{"type":"text","text":"4471"}]}]}}}),
        )
        .unwrap(),
    )
    .unwrap();
    per_op("(b) check_send, registry of 10,000 templates", n, || {
        let mut r = req.clone();
        let c = check::check_send(Some(&reg), &mut r, 1).unwrap();
        std::hint::black_box(c);
    });

    // (c)
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let lib: Vec<SandboxTemplate> = (0..1000)
            .map(|i| SandboxTemplate::approved(&format!("t{i}"), "en_US", "UTILITY", "Hi {{1}}"))
            .collect();
        let sb = Sandbox::start(SandboxConfig {
            templates: Some(lib),
            ..SandboxConfig::default()
        })
        .await
        .unwrap();
        let client = TemplatesClient::new(&sb.base_url(), Duration::from_secs(10));
        let runs = if full { 20 } else { 2 };
        let mut best = f64::MAX;
        for _ in 0..runs {
            let t = Instant::now();
            let l = client.list("102345678901234", "token").await.unwrap();
            assert_eq!(l.len(), 1000);
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("(c) list 1,000 templates, 10 pages, sandbox on loopback     {best:>10.1} ms (best of {runs})");
        sb.shutdown().await;
    });
}
