//! Counting results per connection, merging them, and printing the report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to 10 minutes.
const MAX_LATENCY_US: u64 = 600_000_000;

/// What one connection (or the whole run, once merged) saw.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latency of measured responses, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Measured responses by HTTP status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Measured requests that got a response.
    pub requests: u64,
    /// Events in measured requests that got a response.
    pub events_sent: u64,
    /// Events in measured requests answered 2xx.
    pub events_ok: u64,
    /// Requests during the warm-up (not in the numbers above).
    pub warmup_requests: u64,
    /// 2xx responses during the warm-up.
    pub warmup_ok: u64,
    /// Transport errors, whole run (warm-up included).
    pub errors: Errors,
    /// Connections opened, whole run.
    pub connects: u64,
    /// Time spent building and signing bodies, whole run.
    pub gen_nanos: u64,
    /// Bodies built, whole run.
    pub bodies: u64,
}

/// Transport errors by kind.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Errors {
    /// TCP connect or HTTP handshake failed.
    pub connect: u64,
    /// The connection broke while sending or receiving.
    pub io: u64,
    /// No (complete) response within the request timeout.
    pub timeout: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect + self.io + self.timeout
    }
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("valid histogram bounds"),
            statuses: BTreeMap::new(),
            requests: 0,
            events_sent: 0,
            events_ok: 0,
            warmup_requests: 0,
            warmup_ok: 0,
            errors: Errors::default(),
            connects: 0,
            gen_nanos: 0,
            bodies: 0,
        }
    }
}

impl Tally {
    /// Counts one measured response.
    pub fn record(&mut self, status: u16, events: u32, latency_us: u64) {
        self.requests += 1;
        *self.statuses.entry(status).or_default() += 1;
        self.events_sent += events as u64;
        if (200..300).contains(&status) {
            self.events_ok += events as u64;
        }
        self.latency_us.saturating_record(latency_us.max(1));
    }

    /// Adds another tally into this one.
    pub fn merge(&mut self, o: &Tally) {
        self.latency_us
            .add(&o.latency_us)
            .expect("histograms with the same bounds");
        for (k, v) in &o.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        self.requests += o.requests;
        self.events_sent += o.events_sent;
        self.events_ok += o.events_ok;
        self.warmup_requests += o.warmup_requests;
        self.warmup_ok += o.warmup_ok;
        self.errors.connect += o.errors.connect;
        self.errors.io += o.errors.io;
        self.errors.timeout += o.errors.timeout;
        self.connects += o.connects;
        self.gen_nanos += o.gen_nanos;
        self.bodies += o.bodies;
    }

    /// 2xx responses, measured and warm-up.
    pub fn successes(&self) -> u64 {
        self.warmup_ok
            + self
                .statuses
                .iter()
                .filter(|(k, _)| (200..300).contains(*k))
                .map(|(_, v)| v)
                .sum::<u64>()
    }
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

/// The final report; printed as text or as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub connections: usize,
    /// `closed` (as fast as responses come back) or `open` (fixed rate).
    pub mode: &'static str,
    /// Requests/s asked for in open loop; 0 in closed loop.
    pub target_rate: u64,
    pub mix: String,
    pub batch_events: u32,
    pub numbers: u64,
    pub warmup_secs: u64,
    /// Why the run stopped: `duration` or `max_requests`.
    pub stopped_by: &'static str,
    /// Seconds measured (after the warm-up).
    pub duration_secs: f64,
    /// Measured requests that got an HTTP response.
    pub requests: u64,
    pub requests_per_sec: f64,
    /// Measured responses by status code.
    pub responses: BTreeMap<String, u64>,
    pub non_200: u64,
    /// Transport errors over the whole run (warm-up included).
    pub transport_errors: u64,
    pub transport_error_kinds: Errors,
    /// Events in measured requests that got a response.
    pub events: u64,
    pub events_per_sec: f64,
    /// Events in measured requests answered 2xx.
    pub events_2xx: u64,
    pub events_2xx_per_sec: f64,
    pub latency_ms: Latency,
    pub warmup_requests: u64,
    /// Every request whose body was built, warm-up and errors included.
    pub total_requests_sent: u64,
    pub connections_opened: u64,
    /// Microseconds per request spent building and signing the body.
    pub generator_us_per_request: f64,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What the run was asked to do, for the report.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub url: String,
    pub connections: usize,
    pub rate: u64,
    pub mix: String,
    pub batch_events: u32,
    pub numbers: u64,
    pub warmup_secs: u64,
    pub stopped_by_max_requests: bool,
}

impl Report {
    /// Builds the report from the merged tally and the measured seconds.
    pub fn new(info: &RunInfo, t: &Tally, measured_secs: f64) -> Report {
        let secs = measured_secs.max(0.001);
        let h = &t.latency_us;
        let ms = |us: u64| us as f64 / 1000.0;
        let latency_ms = if h.is_empty() {
            Latency {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p99_9: 0.0,
                max: 0.0,
                mean: 0.0,
            }
        } else {
            Latency {
                p50: ms(h.value_at_quantile(0.5)),
                p90: ms(h.value_at_quantile(0.9)),
                p99: ms(h.value_at_quantile(0.99)),
                p99_9: ms(h.value_at_quantile(0.999)),
                max: ms(h.max()),
                mean: round3(h.mean() / 1000.0),
            }
        };
        Report {
            url: info.url.clone(),
            connections: info.connections,
            mode: if info.rate > 0 { "open" } else { "closed" },
            target_rate: info.rate,
            mix: info.mix.clone(),
            batch_events: info.batch_events,
            numbers: info.numbers,
            warmup_secs: info.warmup_secs,
            stopped_by: if info.stopped_by_max_requests {
                "max_requests"
            } else {
                "duration"
            },
            duration_secs: round3(secs),
            requests: t.requests,
            requests_per_sec: round3(t.requests as f64 / secs),
            responses: t
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            non_200: t
                .statuses
                .iter()
                .filter(|(k, _)| **k != 200)
                .map(|(_, v)| *v)
                .sum(),
            transport_errors: t.errors.total(),
            transport_error_kinds: t.errors,
            events: t.events_sent,
            events_per_sec: round3(t.events_sent as f64 / secs),
            events_2xx: t.events_ok,
            events_2xx_per_sec: round3(t.events_ok as f64 / secs),
            latency_ms,
            warmup_requests: t.warmup_requests,
            total_requests_sent: t.bodies,
            connections_opened: t.connects,
            generator_us_per_request: if t.bodies == 0 {
                0.0
            } else {
                round3(t.gen_nanos as f64 / t.bodies as f64 / 1000.0)
            },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the report serialises")
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mode = if self.target_rate > 0 {
            format!("open loop at {} req/s", self.target_rate)
        } else {
            "closed loop".to_string()
        };
        let responses = if self.responses.is_empty() {
            "none".to_string()
        } else {
            self.responses
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let e = &self.transport_error_kinds;
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "target        {} ({} connections, {mode}, mix {}, batch {} events, {} numbers)",
            self.url, self.connections, self.mix, self.batch_events, self.numbers
        );
        let _ = writeln!(
            s,
            "measured      {:.3} s after {} s warm-up ({} warm-up requests not counted); stopped by {}",
            self.duration_secs, self.warmup_secs, self.warmup_requests, self.stopped_by
        );
        let _ = writeln!(
            s,
            "requests      {} ({:.1}/s)",
            self.requests, self.requests_per_sec
        );
        let _ = writeln!(s, "responses     {responses} (non-200: {})", self.non_200);
        let _ = writeln!(
            s,
            "transport err {} (connect {}, io {}, timeout {}; {} connections opened)",
            self.transport_errors, e.connect, e.io, e.timeout, self.connections_opened
        );
        let _ = writeln!(
            s,
            "events        {} ({:.1}/s); in 2xx responses {} ({:.1}/s)",
            self.events, self.events_per_sec, self.events_2xx, self.events_2xx_per_sec
        );
        let _ = writeln!(
            s,
            "latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})",
            l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
        );
        let _ = write!(
            s,
            "generator     {:.2} us/request to build and sign ({} requests sent in all)",
            self.generator_us_per_request, self.total_requests_sent
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            url: "http://127.0.0.1:1/webhook".into(),
            connections: 2,
            rate: 0,
            mix: "messages=100".into(),
            batch_events: 20,
            numbers: 50,
            warmup_secs: 1,
            stopped_by_max_requests: false,
        }
    }

    #[test]
    fn merges_and_reports() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        for i in 1..=1000u64 {
            a.record(200, 1, i);
        }
        b.record(503, 20, 5_000);
        b.errors.io = 2;
        b.errors.timeout = 1;
        b.warmup_requests = 7;
        b.bodies = 1011;
        b.gen_nanos = 2_022_000;
        a.merge(&b);
        let r = Report::new(&info(), &a, 2.0);
        assert_eq!(r.requests, 1001);
        assert_eq!(r.responses["200"], 1000);
        assert_eq!(r.responses["503"], 1);
        assert_eq!(r.non_200, 1);
        assert_eq!(r.transport_errors, 3);
        assert_eq!(r.events, 1020);
        assert_eq!(r.events_2xx, 1000);
        assert_eq!(r.requests_per_sec, 500.5);
        assert!((r.latency_ms.p50 - 0.5).abs() < 0.002, "{:?}", r.latency_ms);
        assert!((r.latency_ms.max - 5.0).abs() < 0.01, "{:?}", r.latency_ms);
        assert_eq!(r.generator_us_per_request, 2.0);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["responses"]["503"], 1);
        assert_eq!(v["transport_error_kinds"]["io"], 2);
        let text = r.to_text();
        assert!(text.contains("200: 1000, 503: 1"), "{text}");
        assert!(text.contains("p99.9"), "{text}");
        assert_eq!(a.successes(), 1000);
    }

    #[test]
    fn an_empty_run_reports_zeros() {
        let r = Report::new(&info(), &Tally::default(), 0.0);
        assert_eq!(r.requests, 0);
        assert_eq!(r.latency_ms.max, 0.0);
        assert!(r.to_text().contains("responses     none"));
    }
}
