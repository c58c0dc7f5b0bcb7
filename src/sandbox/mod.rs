//! A Graph API sandbox that answers `POST /{version}/{phone_number_id}/messages`
//! like Meta's Cloud API (CLOUD_API.md §5, §6, §8.4). Used by the
//! integration tests, `wagate serve --dev` and the load tests.
//!
//! A POST goes through these phases, each of which can end it:
//! 1. route: `POST /vNN.N/{phone_number_id}/messages` → else 404;
//! 2. auth: `Authorization: Bearer <token>` → 401 (#190);
//! 3. body: at most 1 MiB, JSON, validated like Meta → 400 (#100, #131008,
//!    #131009); a mark-as-read body is answered `{"success":true}` here;
//! 4. an authentication template (`authentication_templates`) addressed by
//!    `recipient` → 400 (#131062);
//! 5. fixed errors (`fixed_errors`, changeable at runtime);
//! 6. injected errors: hold without answering, bare 500, #131000, slow;
//! 7. throughput per number → 400 (#130429): at most N accepted sends in
//!    any one-second window;
//! 8. pair rate per (number, user), GCRA → 400 (#131056);
//! 9. the 24-hour window for non-template sends → 400 (#131047);
//! 10. accepted: recorded, a wamid returned, status webhooks queued.
//!
//! Users: a send is addressed by `to` (a phone) or by `recipient` (a BSUID,
//! IDENTITY.md §4; `to` wins when both are given). Every phone has the BSUID
//! [`bsuid_of`]; a BSUID of a phone the sandbox has seen counts as that
//! phone for the window, the pair rate and the fixed errors (see
//! [`identity`]). Users listed in `username_users` hide their phone: status
//! webhooks of sends to their BSUID, and the inbound messages
//! [`Sandbox::inbound_body`] builds for them, carry their BSUID only.
//!
//! Every error body has Meta's shape (see [`error`]). Everything is bounded:
//! request bodies, tables of limiter state, the phones known behind BSUIDs,
//! the record of sends, and the status webhook queue.

pub mod account;
pub mod error;
pub mod identity;
pub mod limits;
pub mod media;
pub mod status;
pub mod templates;
pub mod validate;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_LENGTH};
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Body, Limits};
use error::GraphError;
use identity::{Directory, Resolved};
use limits::{PairDecision, PairGcra, Room, Throughput};
use validate::{digits, Parsed, SendFields};

pub use identity::{bsuid_of, is_bsuid};
pub use status::WebhookStats;
pub use templates::{dev_templates, SandboxTemplate};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Sends kept for [`Sandbox::sends`]; older ones are forgotten (they still
/// count in [`Sandbox::accepted`]).
pub const MAX_RECORDED_SENDS: usize = 200_000;
/// (number, user) pairs remembered by [`Sandbox::record_inbound`].
pub const MAX_INBOUND_PAIRS: usize = 200_000;
/// The customer service window.
pub const WINDOW_MS: u64 = 24 * 3600 * 1000;
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("status webhook URL {0:?} is not an http:// URL")]
    WebhookUrl(String),
    #[error(
        "status webhook URL {0:?} is not a loopback address; the sandbox only posts to loopback"
    )]
    NotLoopback(String),
    #[error("status webhook status {0:?} is not one of sent, delivered, read")]
    UnknownStatus(String),
    #[error("error_rates.{name} is {value}; probabilities must be within [0, 1]")]
    Probability { name: &'static str, value: f64 },
    #[error("api_version {0:?} is not of the form vNN.N")]
    ApiVersion(String),
}

/// Meta's pair rate (§6.2): one message per `per` to the same user, with
/// bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairRate {
    pub per: Duration,
    pub burst: u32,
}

impl Default for PairRate {
    /// Meta's: one per 6 s, bursts of 45.
    fn default() -> Self {
        PairRate {
            per: Duration::from_secs(6),
            burst: 45,
        }
    }
}

/// Random error injection; each probability is rolled independently per
/// send, in this order: `timeout`, `http_5xx`, `code_131000`, `slow`.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorInjection {
    /// Answer a Graph #131000 (HTTP 500).
    pub code_131000: f64,
    /// Answer a bare HTTP 500 without a Graph error body.
    pub http_5xx: f64,
    /// Do not answer: hold the request for `timeout_hold` (or until the
    /// sandbox shuts down), then answer a bare 504. Not accepted.
    pub timeout: f64,
    /// Accept the send but answer only after `slow_delay`.
    pub slow: f64,
    pub timeout_hold: Duration,
    pub slow_delay: Duration,
}

impl Default for ErrorInjection {
    /// Nothing injected.
    fn default() -> Self {
        ErrorInjection {
            code_131000: 0.0,
            http_5xx: 0.0,
            timeout: 0.0,
            slow: 0.0,
            timeout_hold: Duration::from_secs(30),
            slow_delay: Duration::from_secs(2),
        }
    }
}

/// Always answer Meta error `code` for sends matching both filters (a
/// `None` filter matches anything). `to` names a user: a phone, compared on
/// its digits, matches sends to that phone and to its BSUID once the
/// sandbox has seen the phone; a BSUID matches sends to it and, if it is
/// [`bsuid_of`] a phone, sends to that phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedError {
    pub phone_number_id: Option<String>,
    pub to: Option<String>,
    pub code: i64,
}

/// Where and how to post status webhooks for accepted sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusWebhookConfig {
    /// A loopback `http://` URL, e.g. `http://127.0.0.1:8080/webhook`.
    pub url: String,
    /// Signs each body (`X-Hub-Signature-256`).
    pub app_secret: String,
    /// Posted in this order, each its own POST: `sent`, `delivered`, `read`.
    pub statuses: Vec<String>,
    /// Wait before each status.
    pub delay: Duration,
}

/// The sandbox's behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    /// `127.0.0.1:0` in tests.
    pub listen: SocketAddr,
    /// Accepted bearer tokens; empty = any non-empty token.
    pub access_tokens: Vec<String>,
    /// Accepted sends per second per phone number → #130429 beyond
    /// (0 = unlimited).
    pub default_throughput: u32,
    /// Per phone_number_id quotas replacing `default_throughput`.
    pub throughput_overrides: HashMap<String, u32>,
    /// Per (number, recipient) → #131056 beyond; `None` = unlimited.
    pub pair_rate: Option<PairRate>,
    /// A non-template send to a user with no inbound message (see
    /// [`Sandbox::record_inbound`]) in the last 24 h → #131047.
    pub enforce_window: bool,
    pub error_rates: ErrorInjection,
    pub fixed_errors: Vec<FixedError>,
    pub status_webhook: Option<StatusWebhookConfig>,
    /// Used by [`Sandbox::base_url`]; requests under any `/vNN.N/` are accepted.
    pub api_version: String,
    /// Names of the authentication templates (one-tap, zero-tap,
    /// copy-code): sent by `recipient` they are answered #131062.
    pub authentication_templates: Vec<String>,
    /// Phones (any format; compared on digits) of the users who hide their
    /// number behind a username: status webhooks of sends to their BSUID
    /// carry `recipient_user_id` and no `recipient_id`, and
    /// [`Sandbox::inbound_body`] gives them no `from`/`wa_id`. Their BSUIDs
    /// always resolve to their phones.
    pub username_users: Vec<String>,
    /// Accepted sends per second of a number at Meta's `HIGH` throughput
    /// level (see [`account`]); `default_throughput` is the `STANDARD` one.
    pub high_throughput: u32,
    /// The sandbox app's id (`subscribed_apps`, `debug_token`).
    pub app_id: String,
    /// The template library served under every WABA (see [`templates`]);
    /// None: no templates, template sends not checked.
    pub templates: Option<Vec<SandboxTemplate>>,
    /// Largest page of a template listing (`limit` is capped to it).
    pub templates_page_max: usize,
}

impl Default for SandboxConfig {
    /// Meta's limits (80 mps, pair rate 1/6 s burst 45) on `127.0.0.1:0`,
    /// no window, no injected errors, no webhooks, `v23.0`, authentication
    /// templates `otp` and `auth_code`, no username users.
    fn default() -> Self {
        SandboxConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            access_tokens: Vec::new(),
            default_throughput: 80,
            throughput_overrides: HashMap::new(),
            pair_rate: Some(PairRate::default()),
            enforce_window: false,
            error_rates: ErrorInjection::default(),
            fixed_errors: Vec::new(),
            status_webhook: None,
            api_version: "v23.0".into(),
            authentication_templates: vec!["otp".into(), "auth_code".into()],
            username_users: Vec::new(),
            high_throughput: 1000,
            app_id: account::APP_ID.into(),
            templates: None,
            templates_page_max: 100,
        }
    }
}

impl SandboxConfig {
    /// Checks probabilities, the API version and the webhook target.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let r = &self.error_rates;
        for (name, value) in [
            ("code_131000", r.code_131000),
            ("http_5xx", r.http_5xx),
            ("timeout", r.timeout),
            ("slow", r.slow),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(SandboxError::Probability { name, value });
            }
        }
        if !is_version(&self.api_version) {
            return Err(SandboxError::ApiVersion(self.api_version.clone()));
        }
        if let Some(w) = &self.status_webhook {
            status::check_config(w)?;
        }
        Ok(())
    }
}

/// The sandbox `wagate serve --dev` runs: Meta's limits (80 mps, pair rate
/// on), no window, no injected errors, and signed `sent`, `delivered` and
/// `read` webhooks to `webhook_url`, ~50 ms apart.
pub fn sandbox_config_for_dev(
    webhook_url: impl Into<String>,
    app_secret: impl Into<String>,
) -> SandboxConfig {
    SandboxConfig {
        status_webhook: Some(StatusWebhookConfig {
            url: webhook_url.into(),
            app_secret: app_secret.into(),
            statuses: vec!["sent".into(), "delivered".into(), "read".into()],
            delay: Duration::from_millis(50),
        }),
        templates: Some(dev_templates()),
        ..SandboxConfig::default()
    }
}

/// One accepted send.
#[derive(Debug, Clone)]
pub struct RecordedSend {
    pub phone_number_id: String,
    /// `to` as sent; `""` for a send addressed by `recipient`.
    pub to: String,
    /// The phone digits of the user: `to`, digits only, for a send by
    /// phone; for a send by `recipient`, the phone its BSUID resolved to,
    /// or `""` when the sandbox does not know it.
    pub wa_id: String,
    /// `recipient` as sent (a BSUID or parent BSUID) for a send addressed
    /// by it; `None` for a send by phone (also when a `recipient` was
    /// ignored next to a `to`).
    pub recipient: Option<String>,
    pub wamid: String,
    /// The message `type`.
    pub type_: String,
    pub biz_opaque_callback_data: Option<String>,
    /// When the send passed the rate limits (what the throughput limit
    /// counted).
    pub arrived_at: Instant,
    pub arrived_unix_ms: u64,
    /// The version segment of the request path, e.g. `v23.0`.
    pub api_version: String,
    /// The request body as parsed.
    pub body: Value,
}

/// Limiter state and the record of sends, under one lock so that the
/// arrival times the limits saw are the ones recorded, in order.
struct Gate {
    throughput: Throughput,
    pair: Option<PairGcra>,
    sends: VecDeque<RecordedSend>,
}

#[derive(Default)]
struct Inbound {
    last: HashMap<String, u64>,
    last_prune_ms: u64,
}

struct State {
    cfg: SandboxConfig,
    fixed: Mutex<Vec<FixedError>>,
    gate: Mutex<Gate>,
    inbound: Mutex<Inbound>,
    directory: Mutex<Directory>,
    attempts: AtomicUsize,
    accepted: AtomicU64,
    wamid_seq: AtomicU64,
    wamid_salt: u32,
    webhooks: Option<mpsc::Sender<status::Queued>>,
    webhook_counters: Arc<status::Counters>,
    stop: CancellationToken,
    accounts: Mutex<account::Accounts>,
    templates: Mutex<templates::Store>,
    /// Media items: `GET /{version}/{media_id}` and their download listener.
    media: Arc<media::MediaLibrary>,
}

/// A running sandbox. Dropping it stops the server too; [`Sandbox::shutdown`]
/// also waits for it.
pub struct Sandbox {
    addr: SocketAddr,
    version: String,
    state: Arc<State>,
    stop: CancellationToken,
    server: Option<JoinHandle<bool>>,
    webhooks: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    crate::clock::now_ms()
}

impl Sandbox {
    /// Binds `cfg.listen` and serves in the background.
    pub async fn start(cfg: SandboxConfig) -> anyhow::Result<Sandbox> {
        cfg.validate()?;
        let webhook_uri = match &cfg.status_webhook {
            Some(w) => Some(status::check_config(w)?),
            None => None,
        };
        let listener = http::bind("sandbox.listen", cfg.listen).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let stop_rx = stop.clone();
        let counters = Arc::new(status::Counters::default());
        let (webhooks, webhook_task) = match (&cfg.status_webhook, webhook_uri) {
            (Some(w), Some(uri)) => {
                let (tx, rx) = mpsc::channel(status::QUEUE);
                let task = tokio::spawn(status::run(
                    w.clone(),
                    uri,
                    rx,
                    counters.clone(),
                    stop_rx.clone(),
                ));
                (Some(tx), Some(task))
            }
            _ => (None, None),
        };
        let media_lib =
            media::MediaLibrary::start(addr.ip(), cfg.access_tokens.clone(), stop_rx.clone())
                .await?;
        let state = Arc::new(State {
            media: media_lib,
            fixed: Mutex::new(cfg.fixed_errors.clone()),
            gate: Mutex::new(Gate {
                throughput: Throughput::default(),
                pair: cfg.pair_rate.map(|p| PairGcra::new(p.per, p.burst)),
                sends: VecDeque::new(),
            }),
            inbound: Mutex::new(Inbound::default()),
            directory: Mutex::new(Directory::new(&cfg.username_users)),
            attempts: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            wamid_seq: AtomicU64::new(0),
            wamid_salt: rand::random(),
            webhooks,
            webhook_counters: counters,
            stop: stop_rx.clone(),
            accounts: Mutex::new(account::Accounts::default()),
            templates: Mutex::new(templates::Store {
                list: cfg.templates.clone(),
                ..Default::default()
            }),
            cfg,
        });
        let limits = Limits {
            max_connections: 4096,
            max_connections_per_peer: 0,
            h2_max_concurrent_streams: 256,
            header_read_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(2),
        };
        let st = state.clone();
        let server = tokio::spawn(http::serve(
            "sandbox",
            listener,
            limits,
            move |req| handle(st.clone(), req),
            None,
            stop_rx,
        ));
        tracing::info!(%addr, "graph api sandbox listening");
        Ok(Sandbox {
            addr,
            version: state.cfg.api_version.clone(),
            state,
            stop,
            server: Some(server),
            webhooks: webhook_task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v23.0`: the Graph base URL to send to.
    pub fn base_url(&self) -> String {
        format!("http://{}/{}", self.addr, self.version)
    }

    /// Accepted sends in arrival order (the last [`MAX_RECORDED_SENDS`]).
    pub fn sends(&self) -> Vec<RecordedSend> {
        lock(&self.state.gate).sends.iter().cloned().collect()
    }

    /// Every POST received, accepted or not.
    pub fn attempts(&self) -> usize {
        self.state.attempts.load(Ordering::Relaxed)
    }

    /// Every accepted send, including those no longer kept by `sends`.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Status webhook delivery so far.
    pub fn webhook_stats(&self) -> WebhookStats {
        self.state.webhook_counters.snapshot()
    }

    /// Records an inbound message from `user` to `phone_number_id` at
    /// `at_unix_ms`, opening the 24-hour window (`enforce_window`). `user`
    /// is a phone (any format; the sandbox then knows its BSUID) or a BSUID
    /// (counted as its phone when the sandbox knows it).
    pub fn record_inbound(&self, phone_number_id: &str, user: &str, at_unix_ms: u64) {
        let key = {
            let mut dir = lock(&self.state.directory);
            if !is_bsuid(user) {
                dir.learn(&digits(user), at_unix_ms);
            }
            Resolved::of(user, &dir).key
        };
        self.open_window(phone_number_id, &key, at_unix_ms);
    }

    /// The body of a Meta `messages` webhook with one inbound text message
    /// from the user with phone `wa_id` to `phone_number_id`, compact JSON,
    /// not signed (the caller signs it). A username user (`username_users`)
    /// appears by BSUID only (`from_user_id`, `contacts[].user_id`,
    /// `profile.username`, no `from`/`wa_id`, as
    /// `payloads/identity_inbound_username_only.json`); any other user by
    /// both (as `payloads/identity_inbound_phone_and_bsuid.json`). Also
    /// records the message ([`Sandbox::record_inbound`]), opening the window
    /// under the phone and under the BSUID.
    pub fn inbound_body(
        &self,
        phone_number_id: &str,
        wa_id: &str,
        wamid: &str,
        text: &str,
    ) -> Vec<u8> {
        let now = unix_ms();
        let phone = digits(wa_id);
        self.record_inbound(phone_number_id, &phone, now);
        self.open_window(phone_number_id, &bsuid_of(&phone), now);
        let username_user = lock(&self.state.directory).is_username_user(&phone);
        status::inbound_text_body(phone_number_id, &phone, username_user, wamid, text, now)
    }

    fn open_window(&self, phone_number_id: &str, user_key: &str, at_unix_ms: u64) {
        let key = pair_key(phone_number_id, user_key);
        let now = unix_ms();
        let mut inbound = lock(&self.state.inbound);
        if !inbound.last.contains_key(&key) && inbound.last.len() >= MAX_INBOUND_PAIRS {
            if now.saturating_sub(inbound.last_prune_ms) >= 1000 {
                inbound.last_prune_ms = now;
                inbound
                    .last
                    .retain(|_, at| at.saturating_add(WINDOW_MS) > now);
            }
            if inbound.last.len() >= MAX_INBOUND_PAIRS {
                tracing::warn!("sandbox inbound table full; window not opened");
                return;
            }
        }
        let at = inbound.last.entry(key).or_insert(at_unix_ms);
        *at = (*at).max(at_unix_ms);
    }

    /// The media items the sandbox serves (add them, set their faults).
    pub fn media(&self) -> &Arc<media::MediaLibrary> {
        &self.state.media
    }

    /// Adds `bytes` as a new media item and returns the body of a
    /// `messages` webhook carrying it as a `kind` message (image, audio,
    /// video, document, sticker) from `wa_id`, sent now, and its media id.
    pub fn inbound_media_body(
        &self,
        phone_number_id: &str,
        wa_id: &str,
        wamid: &str,
        kind: &str,
        bytes: impl Into<bytes::Bytes>,
        mime_type: &str,
    ) -> (Vec<u8>, String) {
        let now = unix_ms();
        let id = self.state.media.next_id();
        self.state.media.add(&id, bytes, mime_type);
        let sha = self.state.media.sha256_hex(&id).unwrap_or_default();
        self.record_inbound(phone_number_id, &digits(wa_id), now);
        let body = media::inbound_media_body(media::InboundMedia {
            phone_number_id,
            wa_id: &digits(wa_id),
            wamid,
            kind,
            media_id: &id,
            mime_type,
            sha256_hex: &sha,
            at_unix_ms: now,
        });
        (body, id)
    }

    /// Replaces the fixed errors.
    pub fn set_fixed_errors(&self, v: Vec<FixedError>) {
        *lock(&self.state.fixed) = v;
    }

    /// Stops accepting, lets open requests finish (up to 2 s) and abandons
    /// pending status webhooks.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.server.take() {
            let _ = t.await;
        }
        if let Some(t) = self.webhooks.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn pair_key(number: &str, wa_id: &str) -> String {
    format!("{number}:{wa_id}")
}

/// `vNN.N`.
fn is_version(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('v') else {
        return false;
    };
    let Some((major, minor)) = rest.split_once('.') else {
        return false;
    };
    let num = |p: &str| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
    num(major) && num(minor)
}

/// `/{version}/{phone_number_id}/messages` → (version, phone_number_id).
fn route(path: &str) -> Option<(&str, &str)> {
    let mut parts = path.strip_prefix('/')?.split('/');
    let (version, number, leaf) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && leaf == "messages" && is_version(version) && !number.is_empty())
        .then_some((version, number))
}

/// `/{version}/{media_id}` (digits) → (version, media_id).
fn media_route(path: &str) -> Option<(&str, &str)> {
    let (version, id) = path.strip_prefix('/')?.split_once('/')?;
    (is_version(version)
        && !id.is_empty()
        && id.len() <= 32
        && id.bytes().all(|b| b.is_ascii_digit()))
    .then_some((version, id))
}

fn roll(p: f64) -> bool {
    p > 0.0 && rand::random::<f64>() < p
}

async fn handle(st: Arc<State>, req: http::Req) -> Response<Body> {
    // `GET /{version}/{id}` is a media item's lookup when the id is one of
    // the library's, or when no `fields` are asked for (Meta's media
    // lookup takes none; a number's or the doctor's always name them).
    if req.method() == Method::GET {
        let path = req.uri().path();
        if let Some((version, media_id)) = media_route(path) {
            let asks_fields = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("fields=")));
            if st.media.sha256_hex(media_id).is_some() || !asks_fields {
                if let Err(e) = st.authorize(req.headers(), req.uri().query()) {
                    return e.response();
                }
                return st.media.lookup(version, media_id);
            }
        }
    }
    let req = match account::handle(&st, req).await {
        Ok(answer) => return answer,
        Err(req) => req,
    };
    let req = match templates::control(&st, req).await {
        Ok(answer) => return answer,
        Err(req) => req,
    };
    if req.method() == Method::POST {
        st.attempts.fetch_add(1, Ordering::Relaxed);
    }
    let path = req.uri().path().to_string();
    if let Some((version, waba)) = templates::route(&path).filter(|_| req.method() == Method::GET) {
        if let Err(e) = st.authorize(req.headers(), req.uri().query()) {
            return e.response();
        }
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        return templates::serve(&st, version, waba, req.uri().query(), host);
    }
    let Some((version, number)) = route(&path).filter(|_| req.method() == Method::POST) else {
        return GraphError::new(
            2500,
            format!(
                "Unsupported {} request to {path}: the sandbox serves POST /{{version}}/{{phone_number_id}}/messages.",
                req.method()
            ),
        )
        .with_title("Unknown path components")
        .with_status(StatusCode::NOT_FOUND)
        .response();
    };
    if let Err(e) = st.authorize(req.headers(), req.uri().query()) {
        return e.response();
    }
    if number.len() > 32 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return GraphError::new(100, "Object with this ID does not exist, cannot be loaded due to missing permissions, or does not support this operation.")
            .with_title(format!("Unsupported post request. Object with ID '{number}' does not exist, cannot be loaded due to missing permissions, or does not support this operation"))
            .with_subcode(Some(33))
            .response();
    }
    let (version, number) = (version.to_string(), number.to_string());
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return GraphError::new(100, format!("The request body is not valid JSON: {e}."))
                .response()
        }
    };
    let fields = match validate::parse(&value) {
        Ok(Parsed::MarkRead) => return http::json(StatusCode::OK, &b"{\"success\":true}"[..]),
        Ok(Parsed::Send(f)) => f,
        Err(e) => {
            tracing::debug!(number, code = e.code, details = %e.details, "sandbox: invalid send");
            return e.response();
        }
    };
    if fields.recipient.is_some()
        && fields
            .template_name
            .as_ref()
            .is_some_and(|t| st.cfg.authentication_templates.contains(t))
    {
        tracing::debug!(number, "sandbox: authentication template by recipient");
        return GraphError::of(131062).response();
    }
    if let Some(code) = templates::send_error(&st, &value) {
        tracing::debug!(number, code, "sandbox: template not sendable");
        return GraphError::of(code).response();
    }
    let user = st.resolve(&fields);
    if let Some(code) = st.fixed_error(&number, &user) {
        return GraphError::of(code).response();
    }
    if st.restricted(&number) {
        return GraphError::of(131031).response();
    }
    let inj = &st.cfg.error_rates;
    if roll(inj.timeout) {
        let stop = st.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(inj.timeout_hold) => {}
            _ = stop.cancelled() => {}
        }
        return http::text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
    }
    if roll(inj.http_5xx) {
        return http::text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
    }
    if roll(inj.code_131000) {
        return GraphError::of(131000).response();
    }
    let slow = roll(inj.slow);
    let template = fields.type_ == "template";
    let send = match st.admit(version, number, fields, user, value) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(code = e.code, "sandbox: send refused");
            return e.response();
        }
    };
    let answer = answer(&send, template);
    st.queue_status_webhook(send);
    if slow {
        let stop = st.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(inj.slow_delay) => {}
            _ = stop.cancelled() => {}
        }
    }
    http::json(
        StatusCode::OK,
        serde_json::to_vec(&answer).unwrap_or_default(),
    )
}

/// Meta's answer to an accepted send.
fn answer(send: &RecordedSend, template: bool) -> Value {
    let mut message = json!({ "id": send.wamid });
    if template {
        message["message_status"] = "accepted".into();
    }
    let contact = match &send.recipient {
        Some(r) => json!({ "input": r, "user_id": r }),
        None => json!({ "input": send.to, "wa_id": send.wa_id }),
    };
    json!({
        "messaging_product": "whatsapp",
        "contacts": [contact],
        "messages": [message],
    })
}

/// Reads at most [`MAX_BODY_BYTES`] within [`BODY_READ_TIMEOUT`].
async fn read_body(req: http::Req) -> Result<bytes::Bytes, GraphError> {
    let too_large = || {
        GraphError::new(
            100,
            format!("The request body exceeds {MAX_BODY_BYTES} bytes."),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let read = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(_)) => Err(GraphError::new(100, "The request body could not be read.")),
        Err(_) => Err(
            GraphError::new(100, "The request body was not received in time.")
                .with_status(StatusCode::REQUEST_TIMEOUT),
        ),
    }
}

impl State {
    /// Bearer token (or `access_token` query parameter, as Graph allows).
    fn authorize(&self, headers: &HeaderMap, query: Option<&str>) -> Result<(), GraphError> {
        let from_header = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("oauth"))
                    .then(|| token.trim().to_string())
            });
        let token = from_header.or_else(|| {
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
        });
        let token = token.unwrap_or_default();
        if token.is_empty() {
            return Err(GraphError::new(
                190,
                "An active access token must be used to query information about the current user.",
            )
            .with_title("An active access token must be used")
            .with_subcode(Some(467)));
        }
        if !self.token_known(&token) {
            return Err(GraphError::new(190, "Invalid OAuth access token.")
                .with_title("Invalid OAuth access token - Cannot parse access token")
                .with_subcode(Some(467)));
        }
        Ok(())
    }

    /// Whether the sandbox accepts `token` (constant-time per token).
    fn token_known(&self, token: &str) -> bool {
        self.cfg.access_tokens.is_empty()
            || self.cfg.access_tokens.iter().fold(false, |ok, t| {
                ok | bool::from(t.as_bytes().ct_eq(token.as_bytes()))
            })
    }

    /// The user a send addresses; a send by phone teaches the sandbox that
    /// phone (and so its BSUID).
    fn resolve(&self, f: &SendFields) -> Resolved {
        let mut dir = lock(&self.directory);
        match &f.recipient {
            Some(r) => Resolved::of(r, &dir),
            None => {
                dir.learn(&f.wa_id, unix_ms());
                Resolved::phone(&f.wa_id)
            }
        }
    }

    fn fixed_error(&self, number: &str, user: &Resolved) -> Option<i64> {
        lock(&self.fixed)
            .iter()
            .find(|f| {
                f.phone_number_id.as_deref().is_none_or(|n| n == number)
                    && f.to.as_deref().is_none_or(|t| user.matches(t))
            })
            .map(|f| f.code)
    }

    fn window_open(&self, number: &str, user_key: &str, now_ms: u64) -> bool {
        lock(&self.inbound)
            .last
            .get(&pair_key(number, user_key))
            .is_some_and(|at| now_ms < at.saturating_add(WINDOW_MS))
    }

    /// Throughput, pair rate and window, checked then committed under the
    /// gate lock; records and returns the accepted send.
    /// Queues the status webhooks of an accepted send (dropped, and counted,
    /// when the queue is full).
    fn queue_status_webhook(&self, send: RecordedSend) {
        if let Some(tx) = &self.webhooks {
            let username_user = lock(&self.directory).is_username_user(&send.wa_id);
            if tx
                .try_send(status::Queued {
                    send,
                    username_user,
                })
                .is_err()
            {
                let n = self
                    .webhook_counters
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
                if n == 0 {
                    tracing::warn!("sandbox status webhook queue full; dropping webhooks");
                }
            }
        }
    }

    fn admit(
        &self,
        api_version: String,
        number: String,
        f: SendFields,
        user: Resolved,
        body: Value,
    ) -> Result<RecordedSend, GraphError> {
        let quota = self.quota_of(&number);
        let mut gate = lock(&self.gate);
        // Taken under the lock: arrival times are monotonic across sends.
        let now = Instant::now();
        let now_ms = unix_ms();
        let track_throughput = quota > 0
            && match gate.throughput.has_room(&number, quota, now) {
                Room::Yes => true,
                Room::No => return Err(GraphError::of(130429)),
                Room::Untracked => false,
            };
        let pair_tat = match gate.pair.as_mut() {
            None => None,
            Some(p) => match p.check(&number, &user.key, now) {
                PairDecision::Allow(tat) => Some(tat),
                PairDecision::Deny => return Err(GraphError::of(131056)),
                PairDecision::Untracked => None,
            },
        };
        if self.cfg.enforce_window
            && f.type_ != "template"
            && !self.window_open(&number, &user.key, now_ms)
        {
            return Err(GraphError::of(131047));
        }
        if track_throughput {
            gate.throughput.commit(&number, quota, now);
        }
        if let (Some(p), Some(tat)) = (gate.pair.as_mut(), pair_tat) {
            p.commit(&number, &user.key, tat);
        }
        let seq = self.wamid_seq.fetch_add(1, Ordering::Relaxed);
        let send = RecordedSend {
            wamid: wamid(f.user(), seq, self.wamid_salt),
            phone_number_id: number,
            to: f.to,
            wa_id: user.phone.unwrap_or_default(),
            recipient: f.recipient,
            type_: f.type_,
            biz_opaque_callback_data: f.biz_opaque_callback_data,
            arrived_at: now,
            arrived_unix_ms: now_ms,
            api_version,
            body,
        };
        if gate.sends.len() >= MAX_RECORDED_SENDS {
            gate.sends.pop_front();
        }
        gate.sends.push_back(send.clone());
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(send)
    }
}

/// A wamid in Meta's format: base64 of `1c 18 <len> <wa_id> 15 02 00 11 18 12
/// <18 hex chars> 00`, the hex chars unique per send of this sandbox
/// (`wa_id` is the BSUID for a send by `recipient`).
fn wamid(wa_id: &str, seq: u64, salt: u32) -> String {
    let id = format!("{:010X}{salt:08X}", seq & 0xFF_FFFF_FFFF);
    let mut raw = Vec::with_capacity(wa_id.len() + 30);
    raw.extend_from_slice(&[0x1c, 0x18, wa_id.len().min(255) as u8]);
    raw.extend_from_slice(wa_id.as_bytes());
    raw.extend_from_slice(&[0x15, 0x02, 0x00, 0x11, 0x18, 0x12]);
    raw.extend_from_slice(id.as_bytes());
    raw.push(0);
    format!("wamid.{}", base64(&raw))
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wamids_look_like_metas() {
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
        let w = wamid("14155550123", 7, 0xDEADBEEF);
        assert!(w.starts_with("wamid.HBgLMTQxNTU1NTAxMjMVAgAR"), "{w}");
        assert_ne!(w, wamid("14155550123", 8, 0xDEADBEEF));
    }

    #[test]
    fn routes_and_versions() {
        assert_eq!(
            route("/v23.0/109876543210987/messages"),
            Some(("v23.0", "109876543210987"))
        );
        assert_eq!(route("/v9.1/1/messages"), Some(("v9.1", "1")));
        for bad in [
            "/v23.0/1/messages/x",
            "/v23/1/messages",
            "/23.0/1/messages",
            "/v23.0//messages",
            "/v23.0/1/media",
            "/",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_validation() {
        assert!(SandboxConfig::default().validate().is_ok());
        let mut c = SandboxConfig::default();
        c.error_rates.slow = 1.5;
        assert!(matches!(
            c.validate(),
            Err(SandboxError::Probability { name: "slow", .. })
        ));
        let mut c = SandboxConfig::default();
        c.error_rates.timeout = f64::NAN;
        assert!(c.validate().is_err());
        let c = sandbox_config_for_dev("http://10.1.2.3/webhook", "s");
        assert!(matches!(c.validate(), Err(SandboxError::NotLoopback(_))));
        let c = sandbox_config_for_dev("http://127.0.0.1:9/webhook", "s");
        assert!(c.validate().is_ok());
        assert_eq!(c.default_throughput, 80);
        assert!(c.pair_rate.is_some() && !c.enforce_window);
        assert_eq!(c.authentication_templates, ["otp", "auth_code"]);
        assert!(c.username_users.is_empty());
    }

    #[test]
    fn wamids_of_bsuid_sends_embed_the_bsuid() {
        let w = wamid("BR.8821736450019923", 1, 0);
        assert!(w.starts_with("wamid.HBgTQlIu"), "{w}");
    }
}
