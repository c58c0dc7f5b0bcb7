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
pub mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, Response, StatusCode};
use rdkafka::error::KafkaError;
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, Semaphore};

use crate::config::{AppConfig, Config};
use crate::contacts::keywords::Keywords;
use crate::contacts::records::ContactRecord;
use crate::contacts::Contacts;
use crate::http::{self, Body};
use crate::kafka::{
    headers, KafkaProducer, Kind, RecordAck, RecordHeaders, RecordTag, SendError, TopicId, Topics,
};
use crate::meta::signature;
use crate::meta::webhook::{self, Class, Event};
use crate::metrics::{self as m, WebhookOutcome};
use dedupe::{Batch, Claim, Dedupe, IdHash};
use shared::IdShare;

/// Ingress's producers: a POST's records go to `quiet` (a short batching
/// window) while fewer than `busy_in_flight` POSTs are in flight, else to
/// `busy` (a long window: fewer, fuller produce requests under load). Both
/// are idempotent with `acks=all`; records of one POST share one producer.
#[derive(Clone)]
pub struct IngressProducers {
    pub busy: KafkaProducer,
    pub quiet: Option<KafkaProducer>,
    pub busy_in_flight: usize,
}

impl IngressProducers {
    /// One producer for everything (tests, benches).
    pub fn one(p: KafkaProducer) -> IngressProducers {
        IngressProducers {
            busy: p,
            quiet: None,
            busy_in_flight: 0,
        }
    }

    /// The producer for a POST that finds `in_flight` POSTs in flight
    /// (itself included), and whether it is the busy one.
    fn pick(&self, in_flight: usize) -> (&KafkaProducer, bool) {
        match &self.quiet {
            Some(q) if in_flight < self.busy_in_flight => (q, false),
            _ => (&self.busy, true),
        }
    }
}

/// The ingress plane: shared by every connection of the public listener.
pub struct Ingress {
    apps: HashMap<String, (AppConfig, m::RequestCounters)>,
    producers: IngressProducers,
    max_in_flight: usize,
    topics: Topics,
    dedupe: Arc<Dedupe>,
    /// The fleet's dedupe: stored ids go to `inbound.ids` before the 200.
    share: Option<Arc<IdShare>>,
    raw_enabled: bool,
    ack_timeout: Duration,
    retry_after_secs: u64,
    body_limits: http::BodyLimits,
    in_flight: Semaphore,
    /// Bytes of signed bodies being processed (a permit per byte).
    in_flight_bytes: Semaphore,
    max_in_flight_bytes: usize,
    limits: webhook::Limits,
    contacts: Option<Arc<dyn Contacts>>,
    keywords: Keywords,
    hot: std::sync::OnceLock<Arc<Hot>>,
    /// The template registry: learns numbers' WABAs and template changes.
    templates: Option<Arc<crate::templates::Registry>>,
}

/// Metric handles of the hot path, made on first use (after the recorder is
/// installed): updating them is an atomic op, not a registry lookup.
struct Hot {
    events: m::EventCounters,
    duplicates: metrics::Counter,
    shared_hits: metrics::Counter,
    in_flight: metrics::Gauge,
    ack_seconds: metrics::Histogram,
    produce_seconds: metrics::Histogram,
    /// Rounds of records given to the quiet [0] and the busy [1] producer.
    rounds: [metrics::Counter; 2],
}

/// The topic of an event of the fan-out.
fn topic_of(c: Class) -> TopicId {
    match c {
        Class::Message => TopicId::InboundMessages,
        Class::Status => TopicId::InboundStatuses,
        Class::Other => TopicId::InboundEvents,
    }
}

/// A record a POST produces: an event of the fan-out, or a contacts record
/// one of them caused. (Unboxed: one lives for a moment on the stack per
/// record, and a box would be an allocation per event on the hot path.)
#[allow(clippy::large_enum_variant)]
enum Outgoing {
    Event(Event),
    Contact(ContactRecord),
}

impl Outgoing {
    fn event_id(&self) -> &str {
        match self {
            Outgoing::Event(e) => &e.event_id,
            Outgoing::Contact(r) => &r.event_id,
        }
    }
}

/// The outcome of one request: status, label, response.
type Outcome = (WebhookOutcome, Response<Body>);

impl Ingress {
    pub fn new(
        cfg: &Config,
        topics: Topics,
        producers: IngressProducers,
        dedupe: Arc<Dedupe>,
        contacts: Option<Arc<dyn Contacts>>,
    ) -> Ingress {
        let apps: HashMap<String, (AppConfig, m::RequestCounters)> = cfg
            .apps
            .iter()
            .map(|a| (a.name.clone(), (a.clone(), Default::default())))
            .collect();
        // Every known outcome of every configured app is published at 0.
        for (name, (_, counters)) in &apps {
            counters.zero(name);
        }
        metrics::counter!(m::WEBHOOK_REQUESTS, "app" => "unknown", "outcome" => WebhookOutcome::UnknownApp.label()).absolute(0);
        Ingress {
            apps,
            producers,
            max_in_flight: cfg.ingress.max_in_flight,
            topics,
            dedupe,
            share: None,
            raw_enabled: cfg.ingress.raw_enabled,
            ack_timeout: cfg.ingress.ack_timeout,
            retry_after_secs: cfg.ingress.retry_after_secs,
            body_limits: http::BodyLimits::of(cfg, cfg.max_body_bytes),
            in_flight: Semaphore::new(cfg.ingress.max_in_flight),
            in_flight_bytes: Semaphore::new(cfg.ingress.max_in_flight_bytes),
            max_in_flight_bytes: cfg.ingress.max_in_flight_bytes,
            limits: cfg.ingress.limits,
            contacts,
            keywords: cfg.contacts.keywords(),
            hot: Default::default(),
            templates: None,
        }
    }

    /// Shares stored ids with the fleet through `share` (`inbound.ids`).
    pub fn with_share(mut self, share: Arc<IdShare>) -> Ingress {
        self.share = Some(share);
        self
    }

    /// Teaches `reg` every webhook's numbers and template changes; the
    /// changed templates' records go out with the POST's own.
    pub fn with_templates(mut self, reg: Arc<crate::templates::Registry>) -> Ingress {
        self.templates = Some(reg);
        self
    }

    fn hot(&self) -> &Arc<Hot> {
        self.hot.get_or_init(|| {
            Arc::new(Hot {
                events: Default::default(),
                duplicates: metrics::counter!(m::WEBHOOK_DUPLICATES),
                shared_hits: metrics::counter!(m::DEDUPE_SHARED_HITS),
                in_flight: metrics::gauge!(m::WEBHOOK_IN_FLIGHT),
                ack_seconds: metrics::histogram!(m::WEBHOOK_ACK_SECONDS),
                produce_seconds: metrics::histogram!(m::KAFKA_PRODUCE_SECONDS),
                rounds: [
                    metrics::counter!(m::INGRESS_ROUNDS, "producer" => "quiet"),
                    metrics::counter!(m::INGRESS_ROUNDS, "producer" => "busy"),
                ],
            })
        })
    }

    /// The dedupe set (for metrics).
    pub fn dedupe(&self) -> &Arc<Dedupe> {
        &self.dedupe
    }

    /// Handles one request of the public listener.
    pub async fn handle(self: Arc<Self>, req: http::Req) -> Response<Body> {
        let start = Instant::now();
        let path = req.uri().path();
        let app_name = match path.strip_prefix("/webhook") {
            Some("") | Some("/") => "default",
            Some(rest) if rest.starts_with('/') && !rest[1..].contains('/') => &rest[1..],
            _ => {
                m::http_error("public", m::HttpError::NotFound);
                return http::json_error(StatusCode::NOT_FOUND, "not_found", "no such route");
            }
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
                app_counters
                    .get(&app.name, WebhookOutcome::MethodNotAllowed)
                    .increment(1);
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
    fn handshake(&self, app: &AppConfig, req: &http::Req) -> Outcome {
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

    /// The body and its signature header, once the signature verified: a
    /// request that has not shown a valid signature holds nothing but its own
    /// connection and stream (bounded by the connection limits, the h2 stream
    /// limit, the body deadline and the minimum transfer rate), no permit.
    async fn read_signed(
        &self,
        app: &AppConfig,
        req: http::Req,
    ) -> Result<(Bytes, Option<Vec<u8>>), Outcome> {
        // Meta sends one signature header; with two, which one was checked
        // would be a matter of order, so neither is trusted.
        let mut sigs = req.headers().get_all("x-hub-signature-256").iter();
        let signature = sigs.next().map(|v| v.as_bytes().to_vec());
        if sigs.next().is_some() {
            return Err((
                WebhookOutcome::SignatureMalformed,
                http::json_error(
                    StatusCode::UNAUTHORIZED,
                    "signature_malformed",
                    "more than one X-Hub-Signature-256 header",
                ),
            ));
        }
        let body = match http::read_body(req, &self.body_limits).await {
            Ok(b) => b,
            Err(e) => {
                let outcome = match e {
                    http::BodyError::TooLarge => WebhookOutcome::TooLarge,
                    http::BodyError::Timeout => WebhookOutcome::BodyTimeout,
                    http::BodyError::Broken => WebhookOutcome::BadRequest,
                };
                return Err((outcome, e.response(self.body_limits.max_bytes)));
            }
        };
        if let Err(e) = signature::verify(signature.as_deref(), &body, &app.secrets) {
            let outcome = match e {
                signature::SignatureError::Missing => WebhookOutcome::SignatureMissing,
                signature::SignatureError::Malformed => WebhookOutcome::SignatureMalformed,
                signature::SignatureError::Mismatch => WebhookOutcome::SignatureMismatch,
            };
            tracing::debug!(app = %app.name, reason = e.label(), "webhook rejected");
            return Err((
                outcome,
                http::json_error(StatusCode::UNAUTHORIZED, e.label(), &e.to_string()),
            ));
        }
        Ok((body, signature))
    }

    async fn post(&self, app: &AppConfig, req: http::Req, start: Instant) -> Outcome {
        let (body, signature) = match self.read_signed(app, req).await {
            Ok(x) => x,
            Err(refused) => return refused,
        };
        // Admission, for signed bodies only: a count and a byte budget (the
        // parse tree and records of a POST are bounded by its body's size).
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return (
                WebhookOutcome::Unavailable,
                http::unavailable(self.retry_after_secs, "too many webhooks in flight"),
            );
        };
        let weight = body.len().clamp(1, self.max_in_flight_bytes) as u32;
        let Ok(_bytes) = self.in_flight_bytes.try_acquire_many(weight) else {
            return (
                WebhookOutcome::Unavailable,
                http::unavailable(self.retry_after_secs, "too many webhook bytes in flight"),
            );
        };
        let _gauge = InFlightGauge::new(&self.hot().in_flight);
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
        let root = match webhook::parse(&mut copy, self.limits.max_depth) {
            Ok(root) => root,
            Err(e) => {
                return self
                    .keep_raw(&app.name, raw, Kept::Unparseable(&e), deadline)
                    .await
            }
        };
        match webhook::plan(&root, ctx, body.len(), &self.limits) {
            Ok(Ok(_events)) => {}
            Ok(Err(over)) => {
                return self
                    .keep_raw(&app.name, raw, Kept::OverLimit(over), deadline)
                    .await
            }
            Err(e) => {
                return self
                    .keep_raw(&app.name, raw, Kept::Unparseable(&e), deadline)
                    .await
            }
        }
        let raw = self.raw_enabled.then_some(raw);
        match self.produce(&app.name, &root, ctx, raw, deadline).await {
            Ok(()) => (WebhookOutcome::Ok, http::text(StatusCode::OK, "OK")),
            Err(msg) => {
                tracing::warn!(app = %app.name, reason = msg, "webhook not acknowledged; answering 503");
                (
                    WebhookOutcome::Unavailable,
                    http::unavailable(self.retry_after_secs, msg),
                )
            }
        }
    }

    /// A signed body that is not exploded (unparseable, or past a limit):
    /// kept byte for byte on the raw topic (even when the raw topic is
    /// switched off: nothing accepted is lost), with a header saying why,
    /// and answered 200 once stored (a retry would not change it).
    async fn keep_raw(
        &self,
        app: &str,
        raw: RawBody<'_>,
        why: Kept<'_>,
        deadline: Instant,
    ) -> Outcome {
        let (outcome, header) = match why {
            Kept::Unparseable(e) => {
                metrics::counter!(m::WEBHOOK_UNPARSEABLE, "reason" => e.reason()).increment(1);
                // The error names a position, never the body's bytes.
                tracing::warn!(app, bytes = raw.body.len(), reason = e.reason(), error = %e, "signed body not exploded; keeping it on the raw topic");
                (
                    WebhookOutcome::Unparseable,
                    (headers::UNPARSEABLE, e.reason()),
                )
            }
            Kept::OverLimit(limit) => {
                metrics::counter!(m::WEBHOOK_OVER_LIMIT, "limit" => limit.label()).increment(1);
                tracing::warn!(
                    app,
                    bytes = raw.body.len(),
                    limit = limit.label(),
                    "signed body past a per-POST limit; keeping it on the raw topic"
                );
                (
                    WebhookOutcome::OverLimit,
                    (headers::OVER_LIMIT, limit.label()),
                )
            }
        };
        let mut round = Round::new(self, app);
        round.raw(raw, Some(header));
        let sealed = round.seal();
        let waited = match sealed {
            Ok((rx, _)) => wait_acks(vec![rx], deadline).await,
            Err(msg) => Err(msg),
        };
        match waited {
            Ok(()) => (outcome, http::text(StatusCode::OK, "OK")),
            Err(msg) => (
                WebhookOutcome::Unavailable,
                http::unavailable(self.retry_after_secs, msg),
            ),
        }
    }

    /// Produces the raw body and every event of `root` (each with the
    /// contacts records it causes), one record at a time as the fan-out
    /// makes them, deduplicated, and waits for every acknowledgement until
    /// `deadline`. Events that another POST is producing right now are
    /// waited for, then re-claimed if that POST failed.
    async fn produce(
        &self,
        app: &str,
        root: &simd_json::BorrowedValue<'_>,
        ctx: webhook::Context<'_>,
        raw: Option<RawBody<'_>>,
        deadline: Instant,
    ) -> Result<(), &'static str> {
        let mut round = Round::new(self, app);
        if let Some(r) = raw {
            round.raw(r, None);
        }
        if let Some(reg) = &self.templates {
            crate::templates::webhook::learn(reg, root, ctx.received_at_ms, &mut |rec| {
                round.offer(Outgoing::Contact(rec))
            });
        }
        let walked = webhook::for_each_event(root, ctx, &mut |ev| {
            if let Some(c) = &self.contacts {
                crate::contacts::inbound::signals(
                    c.as_ref(),
                    &self.keywords,
                    &ev,
                    ctx.received_at_ms,
                    &mut |rec| round.offer(Outgoing::Contact(rec)),
                );
            }
            round.offer(Outgoing::Event(ev));
            round.failed.is_none()
        });
        if walked.is_err() {
            // `plan` checked the same walk: unreachable, but never a 200.
            debug_assert!(false, "fan-out failed after plan: {walked:?}");
            let _ = round.seal();
            return Err("the body could not be exploded");
        }
        let (rx, mut todo) = round.seal()?;
        let mut acks = vec![rx];
        for _round in 1..3 {
            if todo.is_empty() {
                break;
            }
            let mut next = Round::new(self, app);
            for (ev, other) in todo {
                let waited = tokio::time::timeout_at(deadline.into(), other.wait()).await;
                if waited.is_err() {
                    let _ = next.seal();
                    return Err("kafka did not acknowledge in time");
                }
                // Acknowledged elsewhere → the re-claim finds it stored;
                // failed elsewhere → the re-claim produces it here.
                next.offer(ev);
            }
            let (rx, waits) = next.seal()?;
            acks.push(rx);
            todo = waits;
        }
        if !todo.is_empty() {
            return Err("events are still being produced by another delivery");
        }
        wait_acks(acks, deadline).await
    }
}

/// Why a signed body is kept raw instead of exploded.
enum Kept<'a> {
    Unparseable(&'a webhook::ParseError),
    OverLimit(webhook::OverLimit),
}

/// Waits for every round's acknowledgement until `deadline`.
async fn wait_acks(
    acks: Vec<oneshot::Receiver<bool>>,
    deadline: Instant,
) -> Result<(), &'static str> {
    for rx in acks {
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) | Ok(Err(_)) => return Err("kafka did not acknowledge every record"),
            Err(_) => return Err("kafka did not acknowledge in time"),
        }
    }
    Ok(())
}

/// One round of records of a POST: each event is claimed in the dedupe set
/// and enqueued as it is offered, its delivery report going to the round's
/// [`PostAck`], which commits or releases its id at once and, after the
/// last report, finishes the batch and wakes the handler. Reports that
/// arrive after the handler gave up (deadline) still commit, so a retry by
/// Meta is then deduplicated instead of producing twice.
struct Round<'a> {
    ingress: &'a Ingress,
    producer: &'a KafkaProducer,
    app: &'a str,
    batch: Arc<Batch>,
    ack: Arc<PostAck>,
    rx: oneshot::Receiver<bool>,
    /// Why an enqueue failed: nothing more is offered, the POST gets 503.
    failed: Option<&'static str>,
    /// Records another POST is producing: (record, that POST's batch).
    waits: Vec<(Outgoing, Arc<Batch>)>,
}

impl<'a> Round<'a> {
    fn new(ingress: &'a Ingress, app: &'a str) -> Round<'a> {
        let (tx, rx) = oneshot::channel();
        let batch = Batch::new();
        let ack = Arc::new(PostAck {
            // The guard's count, released by `seal`, so the round cannot
            // finish while records are still being enqueued.
            remaining: AtomicUsize::new(1),
            all_ok: AtomicBool::new(true),
            dedupe: ingress.dedupe.clone(),
            share: ingress.share.clone(),
            stored: Mutex::new(Vec::new()),
            batch: batch.clone(),
            tx: Mutex::new(Some(tx)),
            enqueued: Instant::now(),
            hot: ingress.hot().clone(),
        });
        let in_flight = ingress.max_in_flight - ingress.in_flight.available_permits();
        let (producer, busy) = ingress.producers.pick(in_flight);
        ingress.hot().rounds[busy as usize].increment(1);
        Round {
            ingress,
            producer,
            app,
            batch,
            ack,
            rx,
            failed: None,
            waits: Vec::new(),
        }
    }

    /// The raw body, with an extra header when it is kept instead of exploded.
    fn raw(&mut self, r: RawBody<'_>, why: Option<(&str, &str)>) {
        // The signature is an HMAC of the body: a free, unique id for it.
        let id = std::str::from_utf8(r.signature)
            .ok()
            .and_then(|s| s.trim().strip_prefix("sha256="))
            .unwrap_or("");
        let mut ts = itoa::Buffer::new();
        let ts = ts.format(r.received_at_ms).as_bytes();
        let mut extra: [(&str, &[u8]); 3] = [
            (headers::SIGNATURE, r.signature),
            (headers::RECEIVED_AT_MS, ts),
            ("", b""),
        ];
        let n = match why {
            Some((k, v)) => {
                extra[2] = (k, v.as_bytes());
                3
            }
            None => 2,
        };
        let h = RecordHeaders {
            extra: &extra[..n],
            ..RecordHeaders::new(id, Kind::Raw, self.app)
        };
        let topic = self.ingress.topics.name(TopicId::InboundRaw);
        h.with(|h| self.send(topic, self.app.as_bytes(), r.body, h, 0, RAW_TAG));
    }

    /// Claims a record and enqueues it if it is new.
    fn offer(&mut self, out: Outgoing) {
        if self.failed.is_some() {
            return;
        }
        match self.ingress.dedupe.claim(out.event_id(), &self.batch) {
            Claim::New(h) => match &out {
                Outgoing::Event(ev) => {
                    let headers =
                        RecordHeaders::new(&ev.event_id, Kind::Webhook(&ev.kind), self.app);
                    let tag = m::event_kind_index(&ev.kind) as u32;
                    let topic = self.ingress.topics.name(topic_of(ev.class));
                    headers.with(|hs| self.send(topic, ev.key.as_bytes(), &ev.value, hs, h.0, tag));
                }
                Outgoing::Contact(rec) => {
                    let tag = m::event_kind_index(rec.kind.as_str()) as u32;
                    let topic = self.ingress.topics.name(rec.topic);
                    rec.headers(self.app)
                        .with(|hs| self.send(topic, rec.key.as_bytes(), &rec.value, hs, h.0, tag));
                }
            },
            Claim::Duplicate { learned } => {
                let hot = self.ingress.hot();
                hot.duplicates.increment(1);
                if learned {
                    hot.shared_hits.increment(1);
                }
            }
            Claim::InFlight(other) => self.waits.push((out, other)),
        }
    }

    fn send(
        &mut self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(&str, &[u8])],
        id: u64,
        tag: u32,
    ) {
        self.ack.remaining.fetch_add(1, Ordering::AcqRel);
        let shared: Arc<dyn RecordAck> = self.ack.clone();
        let sent =
            self.producer
                .send_tagged(topic, key, value, headers, shared, RecordTag { id, tag });
        if let Err(e) = sent {
            note_send_error(&e);
            self.failed = Some(match e {
                SendError::QueueFull => "kafka producer queue is full",
                SendError::TooLarge => {
                    tracing::error!(topic, bytes = value.len(), "record larger than kafka's message.max.bytes; raise the topic's max.message.bytes or lower server.max_body_bytes");
                    "a record is larger than kafka accepts"
                }
                SendError::Kafka(_) => "kafka producer refused the record",
            });
            self.ack.report(id, tag, Err(&KafkaError::Canceled));
        }
    }

    /// Ends the round: its acknowledgement, and the events to wait for.
    #[allow(clippy::type_complexity)]
    fn seal(self) -> Result<(oneshot::Receiver<bool>, Vec<(Outgoing, Arc<Batch>)>), &'static str> {
        self.ack.report(0, GUARD_TAG, Ok(()));
        match self.failed {
            Some(msg) => Err(msg),
            None => Ok((self.rx, self.waits)),
        }
    }
}

/// Tags of the records of a [`PostAck`] that are not events (event records
/// are tagged with their kind's metric index).
const RAW_TAG: u32 = u32::MAX;
const GUARD_TAG: u32 = u32::MAX - 1;

/// The acknowledgements of one round of records.
struct PostAck {
    remaining: AtomicUsize,
    all_ok: AtomicBool,
    dedupe: Arc<Dedupe>,
    /// With the fleet's dedupe: the ids acknowledged so far, shared once
    /// the round is complete; the handler is answered when they are.
    share: Option<Arc<IdShare>>,
    stored: Mutex<Vec<u64>>,
    batch: Arc<Batch>,
    tx: Mutex<Option<oneshot::Sender<bool>>>,
    enqueued: Instant,
    hot: Arc<Hot>,
}

impl RecordAck for PostAck {
    fn done(&self, id: u64, tag: u32, result: Result<(), &KafkaError>) {
        self.report(id, tag, result);
    }
}

impl PostAck {
    /// One record's verdict (or the enqueue guard's): `id` is an event's
    /// dedupe hash, `tag` its kind's index.
    fn report(&self, id: u64, tag: u32, res: Result<(), &KafkaError>) {
        let event = tag < GUARD_TAG;
        match res {
            Ok(()) => {
                if event {
                    self.dedupe.commit(&[IdHash(id)]);
                    if self.share.is_some() {
                        self.stored
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(id);
                    }
                    // Counted once acknowledged, so the counter means "stored".
                    self.hot.events.get(tag as usize).increment(1);
                }
            }
            Err(e) => {
                self.all_ok.store(false, Ordering::Relaxed);
                if !matches!(e, KafkaError::Canceled) {
                    metrics::counter!(m::KAFKA_PRODUCE_ERRORS, "reason" => kafka_error_label(e))
                        .increment(1);
                }
                if event {
                    self.dedupe.release(&[IdHash(id)]);
                }
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ok = self.all_ok.load(Ordering::Relaxed);
            self.hot
                .produce_seconds
                .record(self.enqueued.elapsed().as_secs_f64());
            self.batch.finish(ok);
            let tx = self.tx.lock().ok().and_then(|mut g| g.take());
            let stored = match &self.share {
                Some(_) => {
                    std::mem::take(&mut *self.stored.lock().unwrap_or_else(|e| e.into_inner()))
                }
                None => Vec::new(),
            };
            match (&self.share, stored.is_empty()) {
                // Every record stored: the handler is answered once their ids
                // are on inbound.ids (a 200 then means the fleet knows them).
                (Some(share), false) if ok => share.submit(&stored, tx),
                (share, _) => {
                    // Some record failed (503): what was stored is shared
                    // still, so Meta's retry is deduplicated anywhere.
                    if let (Some(share), false) = (share, stored.is_empty()) {
                        share.submit(&stored, None);
                    }
                    if let Some(tx) = tx {
                        let _ = tx.send(ok);
                    }
                }
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
        SendError::TooLarge => "too_large",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn producer(linger_ms: u64) -> KafkaProducer {
        let env = std::collections::BTreeMap::<String, String>::new();
        let mut k = crate::config::load(None, &env, crate::config::LoadOptions { dev: true })
            .unwrap()
            .kafka;
        k.connection = k.connection.with_brokers("127.0.0.1:1");
        k.linger_ms = linger_ms;
        KafkaProducer::new(&k).unwrap()
    }

    #[test]
    fn few_posts_in_flight_go_to_the_quiet_producer_many_to_the_busy_one() {
        let p = IngressProducers {
            busy: producer(20),
            quiet: Some(producer(1)),
            busy_in_flight: 256,
        };
        for (in_flight, busy) in [(1, false), (255, false), (256, true), (4096, true)] {
            assert_eq!(p.pick(in_flight).1, busy, "{in_flight} in flight");
        }
        // 0, or no quiet producer: always the busy one.
        let always = IngressProducers {
            busy_in_flight: 0,
            ..p.clone()
        };
        assert!(always.pick(1).1);
        assert!(IngressProducers::one(producer(20)).pick(1).1);
    }
}
