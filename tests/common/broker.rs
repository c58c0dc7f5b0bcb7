//! The broker under test and topic prefixes no other run uses.
//! Self-contained, so benches include it with `#[path]`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The broker under test. Panics (fails the test) if none is configured:
/// a broker test that silently skips would prove nothing.
pub fn brokers() -> String {
    std::env::var("WAGATE_TEST_BROKERS").unwrap_or_else(|_| {
        panic!("WAGATE_TEST_BROKERS is not set: run the README's test command (make test), which starts a Tansu broker (or start one with `scripts/tansu.sh start target/bench-env`, which prints host:port)")
    })
}

/// A topic prefix no other test or bench uses.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!("t{}{}{}-{tag}.", std::process::id(), t % 1_000_000_000, n)
}
