//! HTTP plumbing shared by both listeners: the accept loop with a connection
//! limit (global and per peer), a deadline on every connection's first
//! request and on idle keep-alive, graceful shutdown, body reading with a
//! size limit, a deadline and a minimum rate, and small response helpers.
//! No web framework: hyper 1.x with hyper-util.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self as m, HttpError};

pub type Body = Full<Bytes>;

/// A request's body, as every handler gets it: hyper's, remembering whether
/// it was read to its end. A response to an HTTP/1 request whose body was
/// left unread (a 404 before the body, a 413, a 408) carries `Connection:
/// close`: hyper closes such a connection after the response, and a client
/// that is not told would send its next request on it (the keep-alive race
/// that tests saw as `IncompleteMessage` on a busy machine).
pub struct RequestBody {
    inner: Incoming,
    /// Set once the end was read (`None`: nothing to track).
    done: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl RequestBody {
    fn mark(&self) {
        if let Some(d) = &self.done {
            d.store(true, Ordering::Release);
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(None) => self.mark(),
            std::task::Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.mark(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The request every handler takes.
pub type Req = Request<RequestBody>;

/// Wraps hyper's request; returns the flag to look at after the handler
/// (`None` when there is no body to leave unread, or on HTTP/2, where a
/// stream's unread body does not close the connection).
fn track(req: Request<Incoming>) -> (Req, Option<Arc<std::sync::atomic::AtomicBool>>) {
    use hyper::body::Body as _;
    let h1 = req.version() <= hyper::Version::HTTP_11;
    let done = (h1 && !req.body().is_end_stream())
        .then(|| Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let flag = done.clone();
    (req.map(|inner| RequestBody { inner, done }), flag)
}

/// Limits applied to every connection of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Open connections per peer address (0: no cap).
    pub max_connections_per_peer: usize,
    /// A connection must complete a request head this soon after accept, and
    /// again this soon after it last went idle; else it is closed.
    pub header_read_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// How long open connections get to finish after shutdown begins.
    pub shutdown_timeout: Duration,
}

/// Serves `handler` on `listener` until `shutdown` is cancelled, then stops
/// accepting and lets open connections finish (up to `shutdown_timeout`).
/// With `tls`, every connection first completes a TLS handshake within
/// `header_read_timeout` (a failure is counted and closes that connection
/// only).
/// Returns whether every connection finished in time.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    handler: H,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> bool
where
    H: Fn(Req) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let conns = Arc::new(Semaphore::new(max));
    let peers = Arc::new(PeerCount::default());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let gauge = metrics::gauge!(m::HTTP_CONNECTIONS, "listener" => name);

    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            // Over the connection limit: close at once rather than queue.
            metrics::counter!(m::HTTP_CONNECTIONS_REJECTED, "listener" => name).increment(1);
            drop(stream);
            continue;
        };
        let Some(peer_slot) = peers
            .clone()
            .enter(peer.ip(), limits.max_connections_per_peer)
        else {
            m::http_error(name, HttpError::PeerLimit);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gauge = gauge.clone();
        gauge.increment(1.0);
        let stop = shutdown.clone();
        let handler = handler.clone();
        let builder = builder.clone();
        let acceptor = tls.clone();
        tokio::spawn(async move {
            match acceptor {
                None => run(name, &builder, stream, handler, limits, stop).await,
                Some(acceptor) => {
                    // The handshake runs here, in the connection's own task
                    // and under its permits, so a slow or broken one holds
                    // one connection slot, never the accept loop.
                    let hs = tokio::select! {
                        _ = stop.cancelled() => None,
                        r = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)) => Some(r),
                    };
                    match hs {
                        Some(Ok(Ok(tls_stream))) => {
                            run(name, &builder, tls_stream, handler, limits, stop).await
                        }
                        Some(Ok(Err(e))) => {
                            m::tls_handshake_failure(name);
                            tracing::debug!(listener = name, %peer, error = %e, "tls handshake failed");
                        }
                        Some(Err(_)) => {
                            m::tls_handshake_failure(name);
                            tracing::debug!(listener = name, %peer, "tls handshake timed out");
                        }
                        None => {}
                    }
                }
            }
            gauge.decrement(1.0);
            drop(peer_slot);
            drop(permit);
        });
    }
    drop(listener);
    // Every connection task holds a permit: all of them back = all finished.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    tokio::select! {
        _ = conns.acquire_many(all) => true,
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!(listener = name, "connections still open at the shutdown deadline");
            false
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 (whatever the peer speaks: with TLS, what ALPN
/// chose) on one accepted (and, with TLS, handshaken) connection.
async fn run<I, H, F>(
    name: &'static str,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    handler: H,
    limits: Limits,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Req) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let busy = act.begin();
        let (req, body_read) = track(req);
        let fut = handler(req);
        async move {
            let mut resp = fut.await;
            if body_read.is_some_and(|d| !d.load(Ordering::Acquire)) {
                resp.headers_mut()
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            }
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    drive(name, conn, activity, limits.header_read_timeout, stop).await;
}

/// Runs one connection: closes it gracefully when it has had no request in
/// flight and started none for `idle` (from accept: hyper-util's protocol
/// detection has no deadline of its own, and HTTP/2 has no idle timeout), or
/// at shutdown; counts how it ended.
async fn drive<C, E>(
    name: &'static str,
    conn: C,
    activity: Arc<Activity>,
    idle: Duration,
    stop: CancellationToken,
) where
    C: Future<Output = Result<(), E>> + GracefulConn,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let mut seen = activity.started();
    let mut check = tokio::time::Instant::now() + idle;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = stop.cancelled(), if !closing => {
                conn.as_mut().close_gracefully();
                closing = true;
            }
            _ = tokio::time::sleep_until(check), if !closing => {
                let started = activity.started();
                if started == seen && activity.active() == 0 {
                    if started == 0 {
                        // Not one request since accept (silent socket, a
                        // lone byte, half an HTTP/2 preface).
                        m::http_error(name, HttpError::HeaderTimeout);
                    }
                    conn.as_mut().close_gracefully();
                    closing = true;
                }
                seen = started;
                check = tokio::time::Instant::now() + idle;
            }
        }
    };
    if let Err(e) = result {
        let e = e.into();
        match classify(e.as_ref()) {
            Some(kind) => m::http_error(name, kind),
            None => tracing::debug!(listener = name, error = %e, "connection ended with an error"),
        }
    }
}

/// What a connection's error says about the peer (None: an ordinary close).
fn classify(e: &(dyn std::error::Error + 'static)) -> Option<HttpError> {
    let h = e.downcast_ref::<hyper::Error>()?;
    if h.is_timeout() {
        return Some(HttpError::HeaderTimeout);
    }
    if h.is_parse_too_large() {
        // hyper answers 414 for a long URI and 431 for large headers.
        return Some(if h.to_string().contains("URI") {
            HttpError::UriTooLong
        } else {
            HttpError::HeadersTooLarge
        });
    }
    if h.is_parse() {
        return Some(HttpError::BadRequest);
    }
    // hyper's HTTP/2 errors (a GOAWAY sent or received for a protocol
    // error) display as "http2 error: …".
    if h.to_string().starts_with("http2 error") {
        return Some(HttpError::H2Error);
    }
    None
}

/// A connection that can be asked to finish its requests and close.
pub trait GracefulConn {
    fn close_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E, B> GracefulConn for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Requests of one connection: how many started, how many are in flight.
#[derive(Default)]
struct Activity {
    started: AtomicU64,
    active: AtomicUsize,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
    fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
    fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// One request in flight (also when its future is dropped).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Open connections per peer address.
#[derive(Default)]
struct PeerCount(Mutex<HashMap<IpAddr, usize>>);

impl PeerCount {
    /// A slot for one more connection of `ip`, unless it holds `cap` (0: no cap).
    fn enter(self: Arc<Self>, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        if cap == 0 {
            return Some(PeerSlot(None));
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        drop(map);
        Some(PeerSlot(Some((self, ip))))
    }
}

struct PeerSlot(Option<(Arc<PeerCount>, IpAddr)>);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Some((peers, ip)) = self.0.take() {
            let mut map = peers.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// Binds a listener, with a message naming the address on failure.
pub async fn bind(key: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{key}: cannot listen on {addr}: {e}"))
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Longest `message` an error body carries: messages that quote input (a
/// parser's error naming a bad value) never echo a large body back.
pub const MAX_ERROR_MESSAGE: usize = 300;

/// A JSON error body: `{"error": code, "message": message}` (the message cut
/// to [`MAX_ERROR_MESSAGE`] bytes).
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let message = truncate(message, MAX_ERROR_MESSAGE);
    let body = serde_json::json!({ "error": code, "message": message });
    json(status, serde_json::to_vec(&body).unwrap_or_default())
}

/// `s` cut to at most `max` bytes at a character boundary, with "…" when cut.
pub fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// 503 with `Retry-After`.
pub fn unavailable(retry_after_secs: u64, message: &str) -> Response<Body> {
    let mut r = json_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    r
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the limit (declared in `Content-Length`, or while streaming).
    TooLarge,
    /// Not received within the deadline, or slower than the minimum rate.
    Timeout,
    /// The connection failed while reading.
    Broken,
}

impl BodyError {
    /// The response for this error (`limit` names the limit in 413s).
    pub fn response(self, limit: usize) -> Response<Body> {
        match self {
            BodyError::TooLarge => json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("the body exceeds the limit of {limit} bytes"),
            ),
            BodyError::Timeout => json_error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body was not received in time",
            ),
            BodyError::Broken => json_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the body could not be read",
            ),
        }
    }
}

/// How a body is read: at most `max_bytes`, all of it within `timeout`, and
/// after a one-second grace at least `min_bytes_per_sec` on average (0: no
/// minimum), so a peer that sends headers and then trickles (or nothing)
/// gives its stream back soon.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
    pub min_bytes_per_sec: u64,
}

/// Time a body gets before the minimum rate applies.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(1);

impl BodyLimits {
    /// The server section's deadline and rate with a body limit of `max_bytes`.
    pub fn of(cfg: &crate::config::Config, max_bytes: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            timeout: cfg.body_read_timeout,
            min_bytes_per_sec: cfg.min_body_bytes_per_sec,
        }
    }

    /// By when the byte after the first `received` must have arrived.
    fn due(&self, start: Instant, received: usize) -> Instant {
        let hard = start + self.timeout;
        if self.min_bytes_per_sec == 0 {
            return hard;
        }
        let secs = (received as f64 + 1.0) / self.min_bytes_per_sec as f64;
        let by_rate = start + BODY_RATE_GRACE + Duration::from_secs_f64(secs.min(1e6));
        hard.min(by_rate)
    }
}

/// Reads a request body under `limits`: `Content-Length` checked first, then
/// frame by frame.
pub async fn read_body(req: Req, limits: &BodyLimits) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return Err(BodyError::TooLarge);
    }
    let start = Instant::now();
    let mut body = req.into_body();
    // One frame (the usual case) is kept as it came; more are joined.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut received = 0usize;
    loop {
        let due = limits.due(start, received);
        let frame = match tokio::time::timeout_at(due.into(), body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(BodyError::Broken),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received += data.len();
        if received > limits.max_bytes {
            return Err(BodyError::TooLarge);
        }
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (Some(f), None) => {
                let cap = declared.map_or(received, |d| d as usize).max(received);
                let mut b = BytesMut::with_capacity(cap.min(limits.max_bytes));
                b.extend_from_slice(f);
                b.extend_from_slice(&data);
                first = None;
                joined = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&data),
        }
    }
    Ok(match (first, joined) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(400);
        let cut = truncate(&long, 301);
        assert!(cut.len() <= 301 + "…".len(), "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_minimum_rate_moves_the_deadline_with_the_bytes() {
        let l = BodyLimits {
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(15),
            min_bytes_per_sec: 1000,
        };
        let t0 = Instant::now();
        // Nothing yet: the grace plus one byte's worth.
        let d0 = l.due(t0, 0) - t0;
        assert!(d0 > BODY_RATE_GRACE && d0 < BODY_RATE_GRACE + Duration::from_millis(5));
        // 5,000 bytes in: five more seconds.
        let d = l.due(t0, 5_000) - t0;
        assert!(d > Duration::from_secs(6) && d < Duration::from_millis(6_010));
        // Never past the hard deadline.
        assert_eq!(l.due(t0, 1 << 30) - t0, Duration::from_secs(15));
        let none = BodyLimits {
            min_bytes_per_sec: 0,
            ..l
        };
        assert_eq!(none.due(t0, 0) - t0, Duration::from_secs(15));
    }

    #[test]
    fn peer_slots_count_and_free() {
        let p = Arc::new(PeerCount::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = p.clone().enter(ip, 2).unwrap();
        let _b = p.clone().enter(ip, 2).unwrap();
        assert!(p.clone().enter(ip, 2).is_none());
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(p.clone().enter(other, 2).is_some());
        drop(a);
        assert!(p.clone().enter(ip, 2).is_some());
        assert!(p.clone().enter(ip, 0).is_some());
    }
}
