//! What benches measure of their own process. Self-contained, so benches
//! include it by `#[path]` like `process.rs` and `broker.rs`.
#![allow(dead_code)]

/// Resident memory of this process, from `/proc/self/statm` (0 where
/// there is none).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
