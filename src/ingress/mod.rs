//! Ingress: Meta's webhooks into Kafka.
//!
//! A POST goes through these phases, each of which can end it:
//! 1. route: `/webhook` (app `default`) or `/webhook/{app}` → 404 unknown app;
//! 2. admission: in-flight limit → 503; `Content-Length` over the limit → 413;
//! 3. body: a limited read under a deadline → 413 / 408;
//! 4. signature: HMAC-SHA256 over the raw bytes, constant-time → 401;
//! 5. fan-out: parse a *copy* with simd-json into one record per event
//!    (unparseable: keep the raw body, 200);
//! 6. dedupe: claim each event id; ids already stored are dropped;
//! 7. produce every new record (and the raw body) and wait for Kafka's
//!    acknowledgements up to `ack_timeout` → 200 `OK`, else 503 + Retry-After.
//!
//! Architecture invariant: 200 is sent only after every record derived from
//! the POST is acknowledged by Kafka (or was acknowledged by an earlier
//! delivery of the same event). Ingress never imports egress.

pub mod dedupe;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rdkafka::error::KafkaError;
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, Semaphore};

use crate::config::{AppConfig, Config};
use crate::contacts::keywords::{Keyword, Keywords};
use crate::contacts::{Consent, Contacts, Marketing};
use crate::http::{self, Body};
use crate::kafka::{KafkaProducer, RecordAck, SendError, TopicNames};
use crate::meta::signature;
use crate::meta::webhook::{self, Event, Topic};
use crate::metrics::{self as m, WebhookOutcome};
use dedupe::{Batch, Claim, Dedupe, IdHash};

/// The ingress plane: shared by every connection of the public listener.
pub struct Ingress {
    apps: HashMap<String, (AppConfig, m::RequestCounters)>,
    producer: KafkaProducer,
    topics: IngressTopics,
    dedupe: Arc<Dedupe>,
    raw_enabled: bool,
    ack_timeout: Duration,
    retry_after_secs: u64,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    in_flight: Semaphore,
    contacts: Option<Arc<dyn Contacts>>,
    keywords: Keywords,
    hot: std::sync::OnceLock<Arc<Hot>>,
}

/// Metric handles of the hot path, made on first use (after the recorder is
/// installed): updating them is an atomic op, not a registry lookup.
struct Hot {
    events: m::EventCounters,
    in_flight: metrics::Gauge,
    ack_seconds: metrics::Histogram,
    produce_seconds: metrics::Histogram,
}

struct IngressTopics {
    messages: String,
    statuses: String,
    events: String,
    consent: String,
    windows: String,
    raw: String,
}

impl IngressTopics {
    fn of(&self, t: Topic) -> &str {
        match t {
            Topic::Messages => &self.messages,
            Topic::Statuses => &self.statuses,
            Topic::Events => &self.events,
            Topic::Consent => &self.consent,
            Topic::Windows => &self.windows,
        }
    }
}

/// A pair's window is written to `wa.windows` at most this often.
const WINDOW_WRITE_EVERY_MS: u64 = 5 * 60 * 1000;

/// The outcome of one request: status, label, response.
type Outcome = (WebhookOutcome, Response<Body>);

impl Ingress {
    pub fn new(
        cfg: &Config,
        producer: KafkaProducer,
        dedupe: Arc<Dedupe>,
        contacts: Option<Arc<dyn Contacts>>,
    ) -> Ingress {
        let names = TopicNames::new(&cfg.kafka.topic_prefix);
        Ingress {
            apps: cfg
                .apps
                .iter()
                .map(|a| (a.name.clone(), (a.clone(), Default::default())))
                .collect(),
            producer,
            topics: IngressTopics {
                messages: names.full(Topic::Messages.name()),
                statuses: names.full(Topic::Statuses.name()),
                events: names.full(Topic::Events.name()),
                consent: names.full(Topic::Consent.name()),
                windows: names.full(Topic::Windows.name()),
                raw: names.full("inbound.raw"),
            },
            dedupe,
            raw_enabled: cfg.ingress.raw_enabled,
            ack_timeout: cfg.ingress.ack_timeout,
            retry_after_secs: cfg.ingress.retry_after_secs,
            max_body_bytes: cfg.max_body_bytes,
            body_read_timeout: cfg.body_read_timeout,
            in_flight: Semaphore::new(cfg.ingress.max_in_flight),
            contacts,
            keywords: cfg.contacts.keywords(),
            hot: Default::default(),
        }
    }

    fn hot(&self) -> &Arc<Hot> {
        self.hot.get_or_init(|| {
            Arc::new(Hot {
                events: Default::default(),
                in_flight: metrics::gauge!(m::WEBHOOK_IN_FLIGHT),
                ack_seconds: metrics::histogram!(m::WEBHOOK_ACK_SECONDS),
                produce_seconds: metrics::histogram!(m::KAFKA_PRODUCE_SECONDS),
            })
        })
    }

    /// The dedupe set (for metrics).
    pub fn dedupe(&self) -> &Arc<Dedupe> {
        &self.dedupe
    }

    /// Handles one request of the public listener.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let path = req.uri().path();
        let app_name = match path.strip_prefix("/webhook") {
            Some("") | Some("/") => "default",
            Some(rest) if rest.starts_with('/') && !rest[1..].contains('/') => &rest[1..],
            _ => return http::json_error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        };
        let Some((app, app_counters)) = self.apps.get(app_name) else {
            // Unknown app names are not used as metric labels.
            metrics::counter!(m::WEBHOOK_REQUESTS, "app" => "unknown", "outcome" => WebhookOutcome::UnknownApp.label()).increment(1);
            return http::json_error(
                StatusCode::NOT_FOUND,
                "unknown_app",
                "no Meta app of that name is configured",
            );
        };
        let is_post = req.method() == Method::POST;
        let (outcome, resp) = match *req.method() {
            Method::GET => self.handshake(app, &req),
            Method::POST => self.post(app, req, start).await,
            _ => {
                let mut r = http::json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "use GET (handshake) or POST (events)",
                );
                r.headers_mut().insert(
                    hyper::header::ALLOW,
                    hyper::header::HeaderValue::from_static("GET, POST"),
                );
                return r;
            }
        };
        app_counters.get(&app.name, outcome).increment(1);
        if is_post {
            self.hot().ack_seconds.record(start.elapsed().as_secs_f64());
        }
        resp
    }

    /// Meta's GET handshake: `hub.mode=subscribe` and the app's verify token
    /// (constant-time) → 200 with the challenge as text/plain; else 403.
    fn handshake(&self, app: &AppConfig, req: &Request<Incoming>) -> Outcome {
        let q = req.uri().query().unwrap_or("");
        let (mut mode, mut token, mut challenge) = (None, None, None);
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "hub.mode" => mode = Some(v.into_owned()),
                "hub.verify_token" => token = Some(v.into_owned()),
                "hub.challenge" => challenge = Some(v.into_owned()),
                _ => {}
            }
        }
        let token_ok = token
            .as_deref()
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(app.verify_token.expose().as_bytes())));
        match (mode.as_deref(), token_ok, challenge) {
            (Some("subscribe"), true, Some(c)) => {
                (WebhookOutcome::HandshakeOk, http::text(StatusCode::OK, c))
            }
            _ => (
                WebhookOutcome::HandshakeForbidden,
                http::text(StatusCode::FORBIDDEN, "verification failed"),
            ),
        }
    }

    async fn post(&self, app: &AppConfig, req: Request<Incoming>, start: Instant) -> Outcome {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return (
                WebhookOutcome::Unavailable,
                http::unavailable(self.retry_after_secs, "too many webhooks in flight"),
            );
        };
        let _gauge = InFlightGauge::new(&self.hot().in_flight);
        let signature = req
            .headers()
            .get("x-hub-signature-256")
            .map(|v| v.as_bytes().to_vec());
        let body = match http::read_body(req, self.max_body_bytes, self.body_read_timeout).await {
            Ok(b) => b,
            Err(e) => {
                let outcome = match e {
                    http::BodyError::TooLarge => WebhookOutcome::TooLarge,
                    http::BodyError::Timeout => WebhookOutcome::BodyTimeout,
                    http::BodyError::Broken => WebhookOutcome::BadRequest,
                };
                return (outcome, e.response(self.max_body_bytes));
            }
        };
        if let Err(e) = signature::verify(signature.as_deref(), &body, &app.secrets) {
            let outcome = match e {
                signature::SignatureError::Missing => WebhookOutcome::SignatureMissing,
                signature::SignatureError::Malformed => WebhookOutcome::SignatureMalformed,
                signature::SignatureError::Mismatch => WebhookOutcome::SignatureMismatch,
            };
            tracing::debug!(app = %app.name, reason = e.label(), "webhook rejected");
            return (
                outcome,
                http::json_error(StatusCode::UNAUTHORIZED, e.label(), &e.to_string()),
            );
        }
        let received_at_ms = crate::clock::now_ms();
        let deadline = start + self.ack_timeout;
        let raw = RawBody {
            body: &body,
            signature: signature.as_deref().unwrap_or_default(),
            received_at_ms,
        };

        // simd-json rewrites its input: parse a copy, never the verified bytes.
        let mut copy = body.to_vec();
        let ctx = webhook::Context {
            app: &app.name,
            received_at_ms,
        };
        let events = match webhook::fan_out(&mut copy, ctx) {
            Ok(evs) => evs,
            Err(e) => {
                metrics::counter!(m::WEBHOOK_UNPARSEABLE).increment(1);
                tracing::warn!(app = %app.name, bytes = body.len(), error = %e, "signed body did not parse; keeping it on the raw topic");
                // Kept even if the raw topic is switched off: nothing accepted is lost.
                return match self.produce(&app.name, &[], Some(raw), deadline).await {
                    Ok(()) => (
                        WebhookOutcome::Unparseable,
                        http::text(StatusCode::OK, "OK"),
                    ),
                    Err(msg) => (
                        WebhookOutcome::Unavailable,
                        http::unavailable(self.retry_after_secs, msg),
                    ),
                };
            }
        };
        // Contacts, before the 200 (guarantee 7): an inbound message opens the
        // user's 24-hour window; STOP/START keywords and user_preferences
        // changes take effect for every later send. The cache is updated at
        // once, and the records for the compacted topics go out with this
        // POST's own records, so the 200 also means they are durable.
        let mut events = events;
        if let Some(c) = &self.contacts {
            let mut extra = Vec::new();
            for ev in &events {
                let mut changed: Option<(&str, &'static str)> = None;
                if let Some((wa_id, ts)) = &ev.inbound {
                    let ms = ((*ts).max(0) as u64 * 1000).min(received_at_ms);
                    let before = c.get(&ev.key, wa_id).last_inbound_ms;
                    c.record_inbound(&ev.key, wa_id, ms);
                    if before.is_none_or(|b| ms >= b + WINDOW_WRITE_EVERY_MS) {
                        extra.push(crate::contacts::sync::window_event(
                            &ev.key,
                            wa_id,
                            ms,
                            &ev.event_id,
                        ));
                    }
                    let said = ev
                        .payload
                        .as_deref()
                        .and_then(|p| self.keywords.detect_payload(p))
                        .map(|k| (k, "quick_reply"))
                        .or_else(|| {
                            ev.text
                                .as_deref()
                                .and_then(|t| self.keywords.detect(t))
                                .map(|k| (k, "keyword"))
                        });
                    match said {
                        Some((Keyword::OptOut, source)) => {
                            c.set_consent(&ev.key, wa_id, Consent::OptedOut);
                            changed = Some((wa_id, source));
                        }
                        Some((Keyword::OptIn, source)) => {
                            c.set_consent(&ev.key, wa_id, Consent::OptedIn);
                            changed = Some((wa_id, source));
                        }
                        None => {}
                    }
                }
                if let Some((wa_id, source)) = changed {
                    let st = c.get(&ev.key, wa_id);
                    extra.push(crate::contacts::sync::consent_event(
                        &ev.key,
                        wa_id,
                        &st,
                        source,
                        received_at_ms,
                        &ev.event_id,
                    ));
                }
                for (wa_id, stop) in &ev.preferences {
                    let m = if *stop {
                        Marketing::Stopped
                    } else {
                        Marketing::Allowed
                    };
                    c.set_marketing(&ev.key, wa_id, m);
                    let st = c.get(&ev.key, wa_id);
                    let id = format!("{}:{wa_id}", ev.event_id);
                    extra.push(crate::contacts::sync::consent_event(
                        &ev.key,
                        wa_id,
                        &st,
                        "user_preferences",
                        received_at_ms,
                        &id,
                    ));
                }
            }
            events.extend(extra);
        }
        let raw = self.raw_enabled.then_some(raw);
        match self.produce(&app.name, &events, raw, deadline).await {
            Ok(()) => (WebhookOutcome::Ok, http::text(StatusCode::OK, "OK")),
            Err(msg) => {
                tracing::warn!(app = %app.name, events = events.len(), reason = msg, "webhook not acknowledged; answering 503");
                (
                    WebhookOutcome::Unavailable,
                    http::unavailable(self.retry_after_secs, msg),
                )
            }
        }
    }

    /// Dedupes and produces `events` (plus the raw body), waiting for every
    /// acknowledgement until `deadline`. Events that another POST is producing
    /// right now are waited for, then re-claimed if that POST failed.
    async fn produce(
        &self,
        app: &str,
        events: &[Event],
        mut raw: Option<RawBody<'_>>,
        deadline: Instant,
    ) -> Result<(), &'static str> {
        let mut todo: Vec<&Event> = events.iter().collect();
        let mut acks: Vec<oneshot::Receiver<bool>> = Vec::new();
        for _round in 0..3 {
            let batch = Batch::new();
            let mut fresh: Vec<(&Event, IdHash)> = Vec::with_capacity(todo.len());
            let mut waits = Vec::new();
            for ev in todo.drain(..) {
                match self.dedupe.claim(&ev.event_id, &batch) {
                    Claim::New(h) => fresh.push((ev, h)),
                    Claim::Duplicate => metrics::counter!(m::WEBHOOK_DUPLICATES).increment(1),
                    Claim::InFlight(rx) => waits.push((ev, rx)),
                }
            }
            if !fresh.is_empty() || raw.is_some() {
                acks.push(self.enqueue(app, fresh, raw.take(), batch)?);
            }
            if waits.is_empty() {
                break;
            }
            for (ev, rx) in waits {
                let waited = tokio::time::timeout_at(deadline.into(), rx.wait()).await;
                if waited.is_err() {
                    return Err("kafka did not acknowledge in time");
                }
                // Acknowledged elsewhere → the re-claim finds it stored; failed
                // elsewhere → the re-claim produces it here.
                todo.push(ev);
            }
        }
        if !todo.is_empty() {
            return Err("events are still being produced by another delivery");
        }
        for rx in acks {
            match tokio::time::timeout_at(deadline.into(), rx).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) | Ok(Err(_)) => return Err("kafka did not acknowledge every record"),
                Err(_) => return Err("kafka did not acknowledge in time"),
            }
        }
        Ok(())
    }

    /// Enqueues the records of one round. Each record's delivery report goes
    /// to the round's [`PostAck`], which commits or releases its id at once
    /// and, after the last report, finishes the batch and wakes the handler.
    /// Reports that arrive after the handler gave up (deadline) still commit,
    /// so a retry by Meta is then deduplicated instead of producing twice.
    fn enqueue(
        &self,
        app: &str,
        fresh: Vec<(&Event, IdHash)>,
        raw: Option<RawBody<'_>>,
        batch: Arc<Batch>,
    ) -> Result<oneshot::Receiver<bool>, &'static str> {
        let (tx, rx) = oneshot::channel();
        let planned = fresh.len() + usize::from(raw.is_some());
        // One extra count, released below, so the ack cannot finish while
        // records are still being enqueued.
        let ack = Arc::new(PostAck {
            remaining: AtomicUsize::new(planned + 1),
            all_ok: AtomicBool::new(true),
            dedupe: self.dedupe.clone(),
            batch,
            tx: Mutex::new(Some(tx)),
            enqueued: Instant::now(),
            records: fresh
                .iter()
                .map(|(ev, h)| (*h, m::event_kind_index(&ev.kind)))
                .collect(),
            hot: self.hot().clone(),
        });
        let shared: Arc<dyn RecordAck> = ack.clone();
        let mut failed = false;
        if let Some(r) = raw {
            // The signature is an HMAC of the body: a free, unique id for it.
            let id = std::str::from_utf8(r.signature)
                .ok()
                .and_then(|s| s.trim().strip_prefix("sha256="))
                .unwrap_or("");
            let mut ts = itoa::Buffer::new();
            let ts = ts.format(r.received_at_ms).as_bytes();
            let headers: [(&str, &[u8]); 5] = [
                ("wagate-event-id", id.as_bytes()),
                ("wagate-kind", b"raw"),
                ("wagate-app", app.as_bytes()),
                ("wagate-signature", r.signature),
                ("wagate-received-at-ms", ts),
            ];
            if let Err(e) = self.producer.send_tagged(
                &self.topics.raw,
                app.as_bytes(),
                r.body,
                &headers,
                shared.clone(),
                RAW_TAG,
            ) {
                note_send_error(&e);
                failed = true;
                ack.report(RAW_TAG, Err(&KafkaError::Canceled));
            }
        }
        for (i, (ev, _)) in fresh.iter().enumerate() {
            let tag = i as u32;
            if failed {
                ack.report(tag, Err(&KafkaError::Canceled));
                continue;
            }
            let headers: [(&str, &[u8]); 3] = [
                ("wagate-event-id", ev.event_id.as_bytes()),
                ("wagate-kind", ev.kind.as_bytes()),
                ("wagate-app", app.as_bytes()),
            ];
            if let Err(e) = self.producer.send_tagged(
                self.topics.of(ev.topic),
                ev.key.as_bytes(),
                &ev.value,
                &headers,
                shared.clone(),
                tag,
            ) {
                note_send_error(&e);
                failed = true;
                ack.report(tag, Err(&KafkaError::Canceled));
            }
        }
        ack.report(GUARD_TAG, Ok(()));
        if failed {
            Err("kafka producer queue is full")
        } else {
            Ok(rx)
        }
    }
}

/// Tags of the records of a [`PostAck`] that are not events.
const RAW_TAG: u32 = u32::MAX;
const GUARD_TAG: u32 = u32::MAX - 1;

/// The acknowledgements of one round of records.
struct PostAck {
    remaining: AtomicUsize,
    all_ok: AtomicBool,
    dedupe: Arc<Dedupe>,
    batch: Arc<Batch>,
    tx: Mutex<Option<oneshot::Sender<bool>>>,
    enqueued: Instant,
    /// Tag `i` is the `i`-th event record: its id and event-kind index.
    records: Vec<(IdHash, usize)>,
    hot: Arc<Hot>,
}

impl RecordAck for PostAck {
    fn done(&self, tag: u32, result: Result<(), &KafkaError>) {
        self.report(tag, result);
    }
}

impl PostAck {
    /// One record's verdict (or the enqueue guard's).
    fn report(&self, tag: u32, res: Result<(), &KafkaError>) {
        let record = self.records.get(tag as usize);
        match res {
            Ok(()) => {
                if let Some((h, kind)) = record {
                    self.dedupe.commit(&[*h]);
                    // Counted once acknowledged, so the counter means "stored".
                    self.hot.events.get(*kind).increment(1);
                }
            }
            Err(e) => {
                self.all_ok.store(false, Ordering::Relaxed);
                if !matches!(e, KafkaError::Canceled) {
                    metrics::counter!(m::KAFKA_PRODUCE_ERRORS, "reason" => kafka_error_label(e))
                        .increment(1);
                }
                if let Some((h, _)) = record {
                    self.dedupe.release(&[*h]);
                }
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ok = self.all_ok.load(Ordering::Relaxed);
            self.hot
                .produce_seconds
                .record(self.enqueued.elapsed().as_secs_f64());
            self.batch.finish(ok);
            if let Some(tx) = self.tx.lock().ok().and_then(|mut g| g.take()) {
                let _ = tx.send(ok);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct RawBody<'a> {
    body: &'a Bytes,
    signature: &'a [u8],
    received_at_ms: u64,
}

fn note_send_error(e: &SendError) {
    let reason = match e {
        SendError::QueueFull => "queue_full",
        SendError::Kafka(_) => "enqueue_failed",
    };
    metrics::counter!(m::KAFKA_PRODUCE_ERRORS, "reason" => reason).increment(1);
}

fn kafka_error_label(e: &rdkafka::error::KafkaError) -> &'static str {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
    match e.rdkafka_error_code() {
        Some(C::MessageTimedOut) => "timed_out",
        Some(C::MessageSizeTooLarge) => "too_large",
        Some(C::UnknownTopicOrPartition) | Some(C::UnknownTopic) => "unknown_topic",
        _ if matches!(e, KafkaError::Canceled) => "canceled",
        _ => "broker_error",
    }
}

/// Keeps `wagate_webhook_in_flight` right even when a request future is dropped.
struct InFlightGauge<'a>(&'a metrics::Gauge);

impl InFlightGauge<'_> {
    fn new(g: &metrics::Gauge) -> InFlightGauge<'_> {
        g.increment(1.0);
        InFlightGauge(g)
    }
}

impl Drop for InFlightGauge<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
