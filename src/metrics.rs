//! Every metric name wagate exports, in one place (DESIGN §8), and the
//! Prometheus recorder.
//!
//! Labels take values from closed sets (outcomes, kinds, codes), never phone
//! numbers, user ids, message ids or raw paths. Histograms have explicit
//! buckets.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const WEBHOOK_REQUESTS: &str = "wagate_webhook_requests_total";
pub const WEBHOOK_EVENTS: &str = "wagate_webhook_events_total";
pub const WEBHOOK_DUPLICATES: &str = "wagate_webhook_duplicates_total";
pub const WEBHOOK_UNPARSEABLE: &str = "wagate_webhook_unparseable_total";
pub const WEBHOOK_OVER_LIMIT: &str = "wagate_webhook_over_limit_total";
pub const HTTP_ERRORS: &str = "wagate_http_errors_total";
pub const WEBHOOK_ACK_SECONDS: &str = "wagate_webhook_ack_seconds";
pub const WEBHOOK_IN_FLIGHT: &str = "wagate_webhook_in_flight";
pub const KAFKA_PRODUCE_SECONDS: &str = "wagate_kafka_produce_seconds";
pub const INGRESS_ROUNDS: &str = "wagate_ingress_produce_rounds_total";
pub const KAFKA_PRODUCER_QUEUE_DEPTH: &str = "wagate_kafka_producer_queue_depth";
pub const KAFKA_PRODUCE_ERRORS: &str = "wagate_kafka_produce_errors_total";
pub const DEDUPE_ENTRIES: &str = "wagate_dedupe_entries";
pub const DEDUPE_MEMORY_BYTES: &str = "wagate_dedupe_memory_bytes";
pub const DEDUPE_EVICTED_EARLY: &str = "wagate_dedupe_evicted_early_total";
pub const DEDUPE_LEARNED_ENTRIES: &str = "wagate_dedupe_learned_entries";
pub const DEDUPE_SHARED_HITS: &str = "wagate_dedupe_shared_hits_total";
pub const DEDUPE_SHARED_RECORDS: &str = "wagate_dedupe_shared_records_total";
pub const DEDUPE_SHARED_IDS: &str = "wagate_dedupe_shared_ids_total";
pub const DEDUPE_SHARE_FAILURES: &str = "wagate_dedupe_share_failures_total";
pub const DEDUPE_LEARNED: &str = "wagate_dedupe_learned_total";
pub const DEDUPE_LATE_DUPLICATES: &str = "wagate_dedupe_late_duplicates_total";
pub const DEDUPE_PROPAGATION_SECONDS: &str = "wagate_dedupe_propagation_seconds";
pub const DEDUPE_BOOTSTRAP_REMAINING: &str = "wagate_dedupe_bootstrap_remaining";
pub const DEDUPE_BOOTSTRAP_SECONDS: &str = "wagate_dedupe_bootstrap_seconds";
pub const HTTP_CONNECTIONS: &str = "wagate_http_connections";
pub const HTTP_CONNECTIONS_REJECTED: &str = "wagate_http_connections_rejected_total";
pub const READY: &str = "wagate_ready";
pub const TLS_HANDSHAKE_FAILURES: &str = "wagate_tls_handshake_failures_total";
pub const TLS_CERT_RELOADS: &str = "wagate_tls_cert_reloads_total";
pub const EGRESS_REQUESTS: &str = "wagate_egress_requests_total";
pub const EGRESS_BACKLOG: &str = "wagate_egress_backlog";
pub const EGRESS_OLDEST_AGE_SECONDS: &str = "wagate_egress_oldest_age_seconds";
pub const EGRESS_THROTTLED: &str = "wagate_egress_throttled_total";
pub const META_API_SECONDS: &str = "wagate_meta_api_seconds";
pub const META_ERRORS: &str = "wagate_meta_errors_total";
pub const CIRCUIT_OPEN: &str = "wagate_circuit_open";
pub const CONSENT_BLOCKED: &str = "wagate_consent_blocked_total";
pub const EGRESS_BLOCKED: &str = "wagate_egress_blocked_total";
pub const CONTACTS_ENTRIES: &str = "wagate_contacts_entries";
pub const CONTACTS_APPLIED: &str = "wagate_contacts_records_applied_total";
pub const CONTACTS_BOOTSTRAP_REMAINING: &str = "wagate_contacts_bootstrap_remaining_records";
pub const CONTACTS_BOOTSTRAP_SECONDS: &str = "wagate_contacts_bootstrap_seconds";
pub const CONSUMER_LAG: &str = "wagate_consumer_lag";
pub const BUILD_INFO: &str = "wagate_build_info";
pub const NUMBERS: &str = "wagate_numbers";
pub const NUMBERS_RESTRICTED: &str = "wagate_numbers_restricted";
pub const EGRESS_RESTRICTED_HELD: &str = "wagate_egress_restricted_held";
/// The template registry (DESIGN §14).
pub const TEMPLATES: &str = "wagate_templates";
pub const TEMPLATES_USED_NOT_APPROVED: &str = "wagate_templates_used_not_approved";
pub const TEMPLATES_REFRESH: &str = "wagate_templates_refresh_total";
pub const TEMPLATES_BOOTSTRAP_SECONDS: &str = "wagate_templates_bootstrap_seconds";
pub const TEMPLATES_BOOTSTRAP_REMAINING: &str = "wagate_templates_bootstrap_remaining_partitions";
pub const EGRESS_TEMPLATE_BLOCKED: &str = "wagate_egress_template_blocked_total";
pub const TEMPLATE_CORRECTED: &str = "wagate_egress_template_category_corrections_total";
// Inbound media (src/media/; described and zeroed there).
pub const MEDIA_FETCHES: &str = "wagate_media_fetches_total";
pub const MEDIA_BYTES: &str = "wagate_media_bytes_total";
pub const MEDIA_FETCH_SECONDS: &str = "wagate_media_fetch_seconds";
pub const MEDIA_RETRIES: &str = "wagate_media_retries_total";
pub const MEDIA_PENDING: &str = "wagate_media_pending";
pub const MEDIA_OLDEST_PENDING_SECONDS: &str = "wagate_media_oldest_pending_seconds";
pub const MEDIA_SKIPPED: &str = "wagate_media_skipped_total";
pub const MEDIA_REUSED: &str = "wagate_media_reused_total";
pub const MEDIA_DELETED: &str = "wagate_media_deleted_total";

/// Buckets for latency histograms, in seconds (0.5 ms … 10 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Outcomes of a webhook request (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// 200: every record acknowledged (or all were duplicates).
    Ok,
    /// 200: signed but unparseable, kept on the raw topic.
    Unparseable,
    /// 401.
    SignatureMissing,
    SignatureMalformed,
    SignatureMismatch,
    /// 404: unknown app.
    UnknownApp,
    /// 413.
    TooLarge,
    /// 408: body not received in time.
    BodyTimeout,
    /// 400: body could not be read.
    BadRequest,
    /// 503: Kafka did not acknowledge in time, queue full, or overloaded.
    Unavailable,
    /// GET handshake answered 200 / 403.
    HandshakeOk,
    HandshakeForbidden,
    /// 200: signed, but past a per-POST limit (events, record bytes); kept
    /// on the raw topic.
    OverLimit,
    /// 405: a method other than GET or POST on a webhook route.
    MethodNotAllowed,
}

impl WebhookOutcome {
    pub const COUNT: usize = WebhookOutcome::MethodNotAllowed as usize + 1;

    pub const ALL: [WebhookOutcome; WebhookOutcome::COUNT] = [
        WebhookOutcome::Ok,
        WebhookOutcome::Unparseable,
        WebhookOutcome::SignatureMissing,
        WebhookOutcome::SignatureMalformed,
        WebhookOutcome::SignatureMismatch,
        WebhookOutcome::UnknownApp,
        WebhookOutcome::TooLarge,
        WebhookOutcome::BodyTimeout,
        WebhookOutcome::BadRequest,
        WebhookOutcome::Unavailable,
        WebhookOutcome::HandshakeOk,
        WebhookOutcome::HandshakeForbidden,
        WebhookOutcome::OverLimit,
        WebhookOutcome::MethodNotAllowed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            WebhookOutcome::Ok => "ok",
            WebhookOutcome::Unparseable => "unparseable",
            WebhookOutcome::SignatureMissing => "signature_missing",
            WebhookOutcome::SignatureMalformed => "signature_malformed",
            WebhookOutcome::SignatureMismatch => "signature_mismatch",
            WebhookOutcome::UnknownApp => "unknown_app",
            WebhookOutcome::TooLarge => "too_large",
            WebhookOutcome::BodyTimeout => "body_timeout",
            WebhookOutcome::BadRequest => "bad_request",
            WebhookOutcome::Unavailable => "unavailable",
            WebhookOutcome::HandshakeOk => "handshake_ok",
            WebhookOutcome::HandshakeForbidden => "handshake_forbidden",
            WebhookOutcome::OverLimit => "over_limit",
            WebhookOutcome::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// Requests and connections a listener refused before (or instead of) a
/// handler's answer: the `reason` of `wagate_http_errors_total{listener,
/// reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// 404: no such route.
    NotFound,
    /// 405 outside the webhook routes.
    MethodNotAllowed,
    /// hyper answered 400: the request head did not parse.
    BadRequest,
    /// hyper answered 431.
    HeadersTooLarge,
    /// hyper answered 414.
    UriTooLong,
    /// No complete request head within `server.header_read_timeout_ms`
    /// (from accept, or between keep-alive requests).
    HeaderTimeout,
    /// The HTTP/2 connection ended with an error (GOAWAY for a protocol
    /// error, a flood of resets or CONTINUATION frames, …).
    H2Error,
    /// Closed because the peer already holds `server.max_connections_per_peer`.
    PeerLimit,
}

impl HttpError {
    pub const ALL: [HttpError; 8] = [
        HttpError::NotFound,
        HttpError::MethodNotAllowed,
        HttpError::BadRequest,
        HttpError::HeadersTooLarge,
        HttpError::UriTooLong,
        HttpError::HeaderTimeout,
        HttpError::H2Error,
        HttpError::PeerLimit,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HttpError::NotFound => "not_found",
            HttpError::MethodNotAllowed => "method_not_allowed",
            HttpError::BadRequest => "bad_request",
            HttpError::HeadersTooLarge => "headers_too_large",
            HttpError::UriTooLong => "uri_too_long",
            HttpError::HeaderTimeout => "header_timeout",
            HttpError::H2Error => "h2_error",
            HttpError::PeerLimit => "peer_limit",
        }
    }
}

/// Counts one [`HttpError`] of `listener` (`public` or `internal`).
pub fn http_error(listener: &'static str, e: HttpError) {
    metrics::counter!(HTTP_ERRORS, "listener" => listener, "reason" => e.label()).increment(1);
}

/// Counts a TLS handshake of `listener` that failed or timed out.
pub fn tls_handshake_failure(listener: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES, "listener" => listener).increment(1);
}

/// Counts a certificate reload of `listener` (`ok`: in use; `error`: the
/// previous certificate stays).
pub fn tls_cert_reload(listener: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(TLS_CERT_RELOADS, "listener" => listener, "result" => result).increment(1);
}

/// Publishes the TLS counters of a listener that serves TLS at 0.
pub fn zero_tls(listener: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES, "listener" => listener).absolute(0);
    for result in ["ok", "error"] {
        metrics::counter!(TLS_CERT_RELOADS, "listener" => listener, "result" => result).absolute(0);
    }
}

/// Webhook fields Meta documents; any other field is counted as `other` so a
/// sender cannot grow the label set.
pub fn event_kind_label(kind: &str) -> &'static str {
    EVENT_KINDS
        .get(event_kind_index(kind))
        .copied()
        .unwrap_or("other")
}

/// The position of `kind` in the label set (`EVENT_KINDS.len()` = `other`).
pub fn event_kind_index(kind: &str) -> usize {
    EVENT_KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(EVENT_KINDS.len())
}

/// Handles of `wagate_webhook_events_total{kind}`, one per label, made on
/// first use (after the recorder is installed): counting an event is then an
/// atomic add, not a registry lookup.
#[derive(Default)]
pub struct EventCounters([OnceLock<metrics::Counter>; EVENT_KINDS.len() + 1]);

impl EventCounters {
    /// The counter of the kind at `index` (from [`event_kind_index`]).
    pub fn get(&self, index: usize) -> &metrics::Counter {
        let index = index.min(EVENT_KINDS.len());
        self.0[index].get_or_init(|| {
            let label = EVENT_KINDS.get(index).copied().unwrap_or("other");
            metrics::counter!(WEBHOOK_EVENTS, "kind" => label)
        })
    }
}

/// Handles of `wagate_webhook_requests_total{app, outcome}` for one app,
/// one per outcome, each made on its first use; [`RequestCounters::zero`]
/// publishes every outcome of a configured app at 0 from the start.
#[derive(Default)]
pub struct RequestCounters([OnceLock<metrics::Counter>; WebhookOutcome::COUNT]);

impl RequestCounters {
    /// Publishes every outcome of `app` at 0 (after the recorder is installed).
    pub fn zero(&self, app: &str) {
        for o in WebhookOutcome::ALL {
            self.get(app, o).absolute(0);
        }
    }

    pub fn get(&self, app: &str, outcome: WebhookOutcome) -> &metrics::Counter {
        self.0[outcome as usize].get_or_init(|| {
            metrics::counter!(WEBHOOK_REQUESTS, "app" => app.to_string(), "outcome" => outcome.label())
        })
    }
}

const EVENT_KINDS: &[&str] = &[
    "message",
    "status",
    "error",
    "messages",
    "message_template_status_update",
    "message_template_quality_update",
    "message_template_components_update",
    "template_category_update",
    "phone_number_quality_update",
    "phone_number_name_update",
    "business_capability_update",
    "account_alerts",
    "account_update",
    "account_review_update",
    "user_preferences",
    "security",
    "history",
    "smb_message_echoes",
    "smb_app_state_sync",
    "partner_solutions",
    "payment_configuration_update",
    "automatic_events",
    "calls",
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder (once per process) and returns the
/// handle that renders the exposition.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("buckets are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed by an embedding program; then
            // ours simply renders nothing of theirs.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            zero();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Publishes every series whose label values are known in advance at 0, so
/// rates and alerts see a series from the first scrape rather than only
/// after the first event (Prometheus' "initialise your metrics").
fn zero() {
    for name in [WEBHOOK_DUPLICATES, DEDUPE_EVICTED_EARLY] {
        metrics::counter!(name).absolute(0);
    }
    for reason in crate::meta::webhook::ParseError::REASONS {
        metrics::counter!(WEBHOOK_UNPARSEABLE, "reason" => *reason).absolute(0);
    }
    for limit in crate::meta::webhook::OverLimit::ALL {
        metrics::counter!(WEBHOOK_OVER_LIMIT, "limit" => limit.label()).absolute(0);
    }
    for listener in ["public", "internal"] {
        for e in HttpError::ALL {
            metrics::counter!(HTTP_ERRORS, "listener" => listener, "reason" => e.label())
                .absolute(0);
        }
    }
    for reason in [
        "timed_out",
        "too_large",
        "unknown_topic",
        "canceled",
        "broker_error",
        "queue_full",
        "enqueue_failed",
    ] {
        metrics::counter!(KAFKA_PRODUCE_ERRORS, "reason" => reason).absolute(0);
    }
    for listener in ["public", "internal"] {
        metrics::counter!(HTTP_CONNECTIONS_REJECTED, "listener" => listener).absolute(0);
    }
    for limit in [
        "throughput",
        "pair",
        "meta_throughput",
        "meta_pair",
        "meta_hold",
    ] {
        metrics::counter!(EGRESS_THROTTLED, "limit" => limit).absolute(0);
    }
    for scope in crate::meta::errors::Scope::ALL {
        metrics::gauge!(CIRCUIT_OPEN, "scope" => scope.label()).set(0.0);
    }
    for topic in ["consent", "windows"] {
        metrics::counter!(CONTACTS_APPLIED, "topic" => topic).absolute(0);
    }
    for block in crate::egress::policy::Block::ALL {
        let name = if block.is_consent() {
            CONSENT_BLOCKED
        } else {
            EGRESS_BLOCKED
        };
        metrics::counter!(name, "reason" => block.code()).absolute(0);
    }
    metrics::counter!(EGRESS_BLOCKED, "reason" => "tier_limit").absolute(0);
    metrics::counter!(EGRESS_BLOCKED, "reason" => "number_restricted").absolute(0);
    metrics::gauge!(NUMBERS_RESTRICTED).set(0.0);
    metrics::gauge!(EGRESS_RESTRICTED_HELD).set(0.0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        WEBHOOK_REQUESTS,
        "Webhook HTTP requests by app and outcome."
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Events produced to Kafka from webhooks, by kind."
    );
    describe_counter!(
        WEBHOOK_DUPLICATES,
        "Redelivered events dropped by the dedupe set."
    );
    describe_counter!(
        WEBHOOK_UNPARSEABLE,
        "Signed bodies not exploded (by reason: json, shape, too_deep, lone_surrogate, bad_id), kept on the raw topic."
    );
    describe_counter!(
        WEBHOOK_OVER_LIMIT,
        "Signed bodies past a per-POST limit (events, record bytes), kept on the raw topic."
    );
    describe_counter!(
        HTTP_ERRORS,
        "Requests and connections refused by a listener before a handler answered, by reason."
    );
    describe_histogram!(
        WEBHOOK_ACK_SECONDS,
        Unit::Seconds,
        "Webhook receipt to response (200 only once Kafka acknowledged)."
    );
    describe_gauge!(WEBHOOK_IN_FLIGHT, "Webhook POSTs being processed.");
    describe_histogram!(
        KAFKA_PRODUCE_SECONDS,
        Unit::Seconds,
        "Enqueue to Kafka acknowledgement, per POST's records."
    );
    describe_counter!(
        INGRESS_ROUNDS,
        "Rounds of a POST's records given to ingress's quiet (short linger) or busy (long linger) producer, by `producer`."
    );
    describe_gauge!(
        KAFKA_PRODUCER_QUEUE_DEPTH,
        "Records enqueued in the producer and not yet acknowledged."
    );
    describe_counter!(
        KAFKA_PRODUCE_ERRORS,
        "Records Kafka did not acknowledge, by reason."
    );
    describe_gauge!(DEDUPE_ENTRIES, "Event ids held by the dedupe set.");
    describe_gauge!(
        DEDUPE_MEMORY_BYTES,
        Unit::Bytes,
        "Approximate memory held by the dedupe set."
    );
    describe_counter!(
        DEDUPE_EVICTED_EARLY,
        "Event ids evicted before their window ended (dedupe_max_entries reached)."
    );
    describe_gauge!(
        DEDUPE_LEARNED_ENTRIES,
        "Of the dedupe set's ids, those learned from other instances (inbound.ids)."
    );
    describe_counter!(
        DEDUPE_SHARED_HITS,
        "Redelivered events dropped because another instance (or an earlier process) stored them."
    );
    describe_counter!(
        DEDUPE_SHARED_RECORDS,
        "Id records written to inbound.ids (one per group commit)."
    );
    describe_counter!(DEDUPE_SHARED_IDS, "Event ids written to inbound.ids.");
    describe_counter!(
        DEDUPE_SHARE_FAILURES,
        "Id records Kafka did not acknowledge (their ids are known to this instance only)."
    );
    describe_counter!(
        DEDUPE_LEARNED,
        "Event ids learned from other instances' records on inbound.ids."
    );
    describe_counter!(
        DEDUPE_LATE_DUPLICATES,
        "Events this instance stored that another instance stored too (deliveries closer together than the propagation delay), seen after the bootstrap."
    );
    describe_histogram!(
        DEDUPE_PROPAGATION_SECONDS,
        Unit::Seconds,
        "From an id record's timestamp to its reading here, for other instances' records."
    );
    describe_gauge!(
        DEDUPE_BOOTSTRAP_REMAINING,
        "inbound.ids records still to read before the dedupe window is back (0 once caught up)."
    );
    describe_gauge!(
        DEDUPE_BOOTSTRAP_SECONDS,
        Unit::Seconds,
        "How long reading the dedupe window back took at start."
    );
    describe_gauge!(HTTP_CONNECTIONS, "Open HTTP connections by listener.");
    describe_counter!(
        HTTP_CONNECTIONS_REJECTED,
        "Connections refused because the connection limit was reached."
    );
    describe_gauge!(READY, "1 when /readyz answers 200.");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed or timed out, by listener (listeners serving TLS only)."
    );
    describe_counter!(
        TLS_CERT_RELOADS,
        "Certificate and key reloads after the files changed, by listener and result (ok, error: the previous certificate stays)."
    );
    describe_counter!(
        EGRESS_REQUESTS,
        "Send requests completed, by outcome and code (Meta's or the gateway's)."
    );
    describe_gauge!(EGRESS_BACKLOG, "Send requests held in memory by egress.");
    describe_gauge!(
        EGRESS_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest send request held by egress."
    );
    describe_counter!(
        EGRESS_THROTTLED,
        "Sends delayed by a limit: throughput, pair, meta_throughput, meta_pair, meta_hold."
    );
    describe_histogram!(
        META_API_SECONDS,
        Unit::Seconds,
        "Graph API send latency (attempt record + HTTP call)."
    );
    describe_histogram!(
        MEDIA_FETCH_SECONDS,
        Unit::Seconds,
        "Permits, lookup, download and store of one media item."
    );
    describe_counter!(META_ERRORS, "Graph API errors by Meta error code.");
    describe_gauge!(
        CIRCUIT_OPEN,
        "Business numbers whose circuit is open, by scope."
    );
    describe_counter!(
        CONSENT_BLOCKED,
        "Sends blocked by the user's consent or window: opted_out, marketing_stopped, no_opt_in, outside_window."
    );
    describe_counter!(
        EGRESS_BLOCKED,
        "Sends ended by another gateway rule before Meta: expired, tier_limit, number_restricted."
    );
    describe_gauge!(
        CONTACTS_ENTRIES,
        "(number, user) pairs in the contacts cache."
    );
    describe_counter!(
        CONTACTS_APPLIED,
        "Records of wa.consent / wa.windows applied to the contacts cache, by topic kind."
    );
    describe_gauge!(
        CONTACTS_BOOTSTRAP_REMAINING,
        "Records still to read before the contacts cache is caught up (0 once ready)."
    );
    describe_gauge!(
        CONTACTS_BOOTSTRAP_SECONDS,
        Unit::Seconds,
        "Time the contacts bootstrap took (set once caught up)."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records behind the high watermark on the partitions this instance consumes, by topic."
    );
    describe_gauge!(BUILD_INFO, "Build information.");
    describe_gauge!(
        NUMBERS,
        "Business numbers known (wa.numbers), by Meta's quality rating and throughput level."
    );
    describe_gauge!(
        NUMBERS_RESTRICTED,
        "Business numbers Meta restricted (account_update, or a Graph status such as BANNED): their lanes hold."
    );
    describe_gauge!(
        EGRESS_RESTRICTED_HELD,
        "Send requests held in the lanes of restricted numbers."
    );
    describe_gauge!(
        TEMPLATES,
        "Templates in the registry (every WABA), by status."
    );
    describe_gauge!(
        TEMPLATES_USED_NOT_APPROVED,
        "Templates a send was checked against in the last hour whose status is not APPROVED now."
    );
    describe_counter!(
        TEMPLATES_REFRESH,
        "Template listings of a WABA from the Graph API, by result."
    );
    describe_gauge!(
        TEMPLATES_BOOTSTRAP_SECONDS,
        Unit::Seconds,
        "Time reading wa.templates took at start (set once caught up)."
    );
    describe_gauge!(
        TEMPLATES_BOOTSTRAP_REMAINING,
        "Partitions of wa.templates not yet read to their start-time end (0 once caught up)."
    );
    describe_counter!(
        EGRESS_TEMPLATE_BLOCKED,
        "Template sends blocked by the template registry's checks, by reason."
    );
    describe_counter!(
        TEMPLATE_CORRECTED,
        "Template sends whose category was replaced by the registry's."
    );
}
