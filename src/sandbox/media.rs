//! Media in the sandbox (CLOUD_API.md §8.1): `GET /{version}/{media_id}`
//! answers `{url, mime_type, sha256, file_size, id, messaging_product}` like
//! Meta, and the `url` is served by a download listener of its own (Meta's
//! are on another host too), which needs the same bearer token, expires
//! after [`MediaLibrary::set_url_ttl`] (5 minutes, as Meta's) and streams the
//! bytes in 64 KiB chunks.
//!
//! Faults per media id ([`MediaFault`]): lookups or downloads answered 500 a
//! number of times, a slow download (a pause between chunks), a wrong
//! `sha256` in the lookup, an expired id (Meta's #100, subcode 33).
//!
//! Bounded: at most [`MAX_ITEMS`] items and [`MAX_ITEM_BYTES`] per item;
//! the download listener holds at most 256 connections.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::body::Frame;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::error::GraphError;
use crate::http::{self, Body};

/// Media items kept.
pub const MAX_ITEMS: usize = 10_000;
/// Largest item (Meta's inbound limit is 100 MB).
pub const MAX_ITEM_BYTES: usize = 200 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// What goes wrong with one media item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaFault {
    /// The next N lookups are answered a bare HTTP 500.
    pub lookup_5xx: u32,
    /// The next N downloads are answered a bare HTTP 500.
    pub download_5xx: u32,
    /// A pause before each 64 KiB chunk of a download.
    pub chunk_delay: Duration,
    /// The lookup reports a `sha256` that is not the bytes'.
    pub wrong_checksum: bool,
    /// The id is past Meta's 7 days: lookups answer #100 (subcode 33).
    pub expired: bool,
}

struct Item {
    bytes: Bytes,
    mime_type: String,
    sha256_hex: String,
    fault: MediaFault,
}

/// The sandbox's media items and their download listener.
pub struct MediaLibrary {
    items: Mutex<HashMap<String, Item>>,
    download_base: String,
    key: [u8; 32],
    url_ttl_ms: std::sync::atomic::AtomicU64,
    access_tokens: Vec<String>,
    lookups: AtomicUsize,
    /// Lookups by the API version of their path (instances of a test each
    /// use their own version, so the sandbox tells them apart).
    lookups_by_version: Mutex<HashMap<String, usize>>,
    downloads: AtomicUsize,
    /// Bodies being streamed now, and the most at once.
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
    seq: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MediaLibrary {
    /// Binds the download listener on `ip`:0 and serves it until `stop`.
    pub async fn start(
        ip: std::net::IpAddr,
        access_tokens: Vec<String>,
        stop: CancellationToken,
    ) -> std::io::Result<Arc<MediaLibrary>> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let lib = Arc::new(MediaLibrary {
            items: Mutex::new(HashMap::new()),
            download_base: format!("http://{addr}"),
            key: rand::random(),
            url_ttl_ms: std::sync::atomic::AtomicU64::new(300_000),
            access_tokens,
            lookups: AtomicUsize::new(0),
            lookups_by_version: Mutex::new(HashMap::new()),
            downloads: AtomicUsize::new(0),
            active: Arc::new(AtomicUsize::new(0)),
            max_active: Arc::new(AtomicUsize::new(0)),
            seq: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(serve_downloads(
            listener,
            Arc::downgrade(&lib),
            stop.child_token(),
        ));
        Ok(lib)
    }

    /// Adds (or replaces) an item; returns its media id.
    pub fn add(&self, media_id: &str, bytes: impl Into<Bytes>, mime_type: &str) -> String {
        let bytes = bytes.into();
        assert!(
            bytes.len() <= MAX_ITEM_BYTES,
            "sandbox media item too large"
        );
        let sha256_hex = hex::encode(Sha256::digest(&bytes));
        let mut items = lock(&self.items);
        if items.len() >= MAX_ITEMS && !items.contains_key(media_id) {
            if let Some(k) = items.keys().next().cloned() {
                items.remove(&k);
            }
        }
        items.insert(
            media_id.to_string(),
            Item {
                bytes,
                mime_type: mime_type.to_string(),
                sha256_hex,
                fault: MediaFault::default(),
            },
        );
        media_id.to_string()
    }

    /// A fresh numeric media id (like Meta's).
    pub fn next_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("9{:015}", (rand::random::<u32>() as u64) * 1000 + n % 1000)
    }

    /// Sets the faults of an item (no-op for an unknown id).
    pub fn set_fault(&self, media_id: &str, fault: MediaFault) {
        if let Some(i) = lock(&self.items).get_mut(media_id) {
            i.fault = fault;
        }
    }

    /// How long a download URL stays valid.
    pub fn set_url_ttl(&self, ttl: Duration) {
        self.url_ttl_ms
            .store(ttl.as_millis() as u64, Ordering::Relaxed);
    }

    /// Lookups answered (any status).
    pub fn lookups(&self) -> usize {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Lookups answered, by the API version of their path.
    pub fn lookups_by_version(&self) -> HashMap<String, usize> {
        lock(&self.lookups_by_version).clone()
    }

    /// The most download bodies streamed at once so far.
    pub fn max_concurrent_downloads(&self) -> usize {
        self.max_active.load(Ordering::Relaxed)
    }

    /// Downloads started (any status).
    pub fn downloads(&self) -> usize {
        self.downloads.load(Ordering::Relaxed)
    }

    /// The hex SHA-256 of an item's bytes.
    pub fn sha256_hex(&self, media_id: &str) -> Option<String> {
        lock(&self.items)
            .get(media_id)
            .map(|i| i.sha256_hex.clone())
    }

    fn sign(&self, media_id: &str, exp_ms: u64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(media_id.as_bytes());
        mac.update(b":");
        mac.update(exp_ms.to_string().as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// `GET /{version}/{media_id}` (already authorized).
    pub(super) fn lookup(&self, version: &str, media_id: &str) -> Response<Body> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        {
            let mut by = lock(&self.lookups_by_version);
            if by.len() < 64 || by.contains_key(version) {
                *by.entry(version.to_string()).or_default() += 1;
            }
        }
        let mut items = lock(&self.items);
        let Some(item) = items.get_mut(media_id).filter(|i| !i.fault.expired) else {
            return unknown_object(media_id);
        };
        if item.fault.lookup_5xx > 0 {
            item.fault.lookup_5xx -= 1;
            return http::text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
        }
        let exp = super::unix_ms() + self.url_ttl_ms.load(Ordering::Relaxed);
        let sig = self.sign(media_id, exp);
        let sha = if item.fault.wrong_checksum {
            hex::encode(Sha256::digest(b"not these bytes"))
        } else {
            item.sha256_hex.clone()
        };
        let body = json!({
            "messaging_product": "whatsapp",
            "url": format!("{}/whatsapp_business/attachments/{media_id}/{exp}/{sig}", self.download_base),
            "mime_type": item.mime_type,
            "sha256": sha,
            "file_size": item.bytes.len(),
            "id": media_id,
        });
        http::json(
            StatusCode::OK,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }

    fn authorized(&self, req: &Request<hyper::body::Incoming>) -> bool {
        let Some(token) = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return false;
        };
        self.access_tokens.is_empty()
            || self.access_tokens.iter().fold(false, |ok, t| {
                ok | bool::from(t.as_bytes().ct_eq(token.as_bytes()))
            })
    }

    /// A download: `/whatsapp_business/attachments/{id}/{exp}/{sig}`.
    fn download(&self, req: &Request<hyper::body::Incoming>) -> Response<DownloadBody> {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        let plain = |status: StatusCode, text: &'static str| {
            let mut r = Response::new(DownloadBody::whole(Bytes::from_static(text.as_bytes())));
            *r.status_mut() = status;
            r
        };
        if !self.authorized(req) {
            return plain(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        }
        let parts: Vec<&str> = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .collect();
        let [_, "attachments", id, exp, sig] = parts.as_slice() else {
            return plain(StatusCode::NOT_FOUND, "no such URL");
        };
        let Ok(exp_ms) = exp.parse::<u64>() else {
            return plain(StatusCode::NOT_FOUND, "no such URL");
        };
        let good = self.sign(id, exp_ms);
        if !bool::from(good.as_bytes().ct_eq(sig.as_bytes())) {
            return plain(StatusCode::NOT_FOUND, "no such URL");
        }
        if super::unix_ms() > exp_ms {
            return plain(StatusCode::NOT_FOUND, "URL expired");
        }
        let mut items = lock(&self.items);
        let Some(item) = items.get_mut(*id).filter(|i| !i.fault.expired) else {
            return plain(StatusCode::NOT_FOUND, "no such media");
        };
        if item.fault.download_5xx > 0 {
            item.fault.download_5xx -= 1;
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
        }
        let now = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_active.fetch_max(now, Ordering::Relaxed);
        let mut r = Response::new(DownloadBody {
            data: item.bytes.clone(),
            pos: 0,
            delay: item.fault.chunk_delay,
            sleep: None,
            active: Some(self.active.clone()),
        });
        let h = r.headers_mut();
        h.insert(CONTENT_LENGTH, HeaderValue::from(item.bytes.len()));
        if let Ok(v) = HeaderValue::from_str(&item.mime_type) {
            h.insert(CONTENT_TYPE, v);
        }
        r
    }
}

/// Meta's answer for an id that does not exist or expired.
fn unknown_object(media_id: &str) -> Response<Body> {
    GraphError::new(100, "Object with this ID does not exist, cannot be loaded due to missing permissions, or does not support this operation.")
        .with_title(format!("Unsupported get request. Object with ID '{media_id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation"))
        .with_subcode(Some(33))
        .with_status(StatusCode::BAD_REQUEST)
        .response()
}

/// A body streamed in [`CHUNK`]s, each after an optional pause.
pub struct DownloadBody {
    data: Bytes,
    pos: usize,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counted while streamed (until sent or dropped).
    active: Option<Arc<AtomicUsize>>,
}

impl Drop for DownloadBody {
    fn drop(&mut self) {
        if let Some(a) = self.active.take() {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl DownloadBody {
    fn whole(data: Bytes) -> DownloadBody {
        DownloadBody {
            data,
            pos: 0,
            delay: Duration::ZERO,
            sleep: None,
            active: None,
        }
    }
}

impl hyper::body::Body for DownloadBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.pos >= self.data.len() {
            if let Some(a) = self.active.take() {
                a.fetch_sub(1, Ordering::Relaxed);
            }
            return Poll::Ready(None);
        }
        if !self.delay.is_zero() {
            let delay = self.delay;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let end = (self.pos + CHUNK).min(self.data.len());
        let chunk = self.data.slice(self.pos..end);
        self.pos = end;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact((self.data.len() - self.pos) as u64)
    }
}

async fn serve_downloads(
    listener: tokio::net::TcpListener,
    lib: std::sync::Weak<MediaLibrary>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(256));
    loop {
        let (sock, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        // As a real server would: no Nagle delay between body chunks.
        let _ = sock.set_nodelay(true);
        let lib = lib.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let lib = lib.clone();
                async move {
                    Ok::<_, Infallible>(match lib.upgrade() {
                        Some(l) => l.download(&req),
                        None => {
                            let mut r = Response::new(DownloadBody::whole(Bytes::new()));
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            r
                        }
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(sock), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// One inbound media message, for [`inbound_media_body`].
#[derive(Debug, Clone, Copy)]
pub struct InboundMedia<'a> {
    pub phone_number_id: &'a str,
    pub wa_id: &'a str,
    pub wamid: &'a str,
    /// image, audio, video, document, sticker.
    pub kind: &'a str,
    pub media_id: &'a str,
    pub mime_type: &'a str,
    pub sha256_hex: &'a str,
    pub at_unix_ms: u64,
}

/// The body of a Meta `messages` webhook with one inbound media message
/// from `wa_id`, with the media object as Meta sends it (`id`,
/// `mime_type`, `sha256` in base64, `url`, and a `filename` for documents).
pub fn inbound_media_body(m: InboundMedia<'_>) -> Vec<u8> {
    use base64_sha::encode as b64;
    let InboundMedia {
        phone_number_id,
        wa_id,
        wamid,
        kind,
        media_id,
        mime_type,
        sha256_hex,
        at_unix_ms,
    } = m;
    let mut media = json!({
        "id": media_id,
        "mime_type": mime_type,
        "sha256": b64(&hex::decode(sha256_hex).unwrap_or_default()),
        "url": format!("https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid={media_id}"),
    });
    if kind == "document" {
        media["filename"] = format!("{media_id}.bin").into();
    }
    if kind == "audio" {
        media["voice"] = true.into();
    }
    let mut message = json!({
        "from": wa_id,
        "id": wamid,
        "timestamp": (at_unix_ms / 1000).to_string(),
        "type": kind,
    });
    message[kind] = media;
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102345678901234",
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550199999", "phone_number_id": phone_number_id},
                    "contacts": [{"profile": {"name": "Sandbox User"}, "wa_id": wa_id, "user_id": super::bsuid_of(wa_id)}],
                    "messages": [message],
                }
            }]
        }]
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Standard base64 (the webhook's `sha256` encoding), without a crate.
mod base64_sha {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(b: &[u8]) -> String {
        let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
