//! The wall clock every time-based rule reads (the 24-hour window, request
//! expiry, the messaging tier's rolling day, `received_at_ms`).
//!
//! One process-wide offset can move it forward: tests use it as a fake
//! clock to cross the 24-hour window without waiting a day. Nothing in the
//! configuration or the HTTP API can set it; only code linked into the
//! process (a test) can.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static OFFSET_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the Unix epoch, plus the offset (0 outside tests).
pub fn now_ms() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    real.saturating_add(OFFSET_MS.load(Ordering::Relaxed))
}

/// Moves this process's clock forward by `by` (a fake clock for tests; the
/// clock never goes back).
pub fn advance(by: Duration) {
    OFFSET_MS.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
}

/// How far [`advance`] has moved the clock.
pub fn offset() -> Duration {
    Duration::from_millis(OFFSET_MS.load(Ordering::Relaxed))
}
