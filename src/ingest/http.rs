//! The HTTP server: SendGrid Inbound Parse, the `/alert` webhook (and, behind its
//! token, silences and heartbeats: `ingest/oncall.rs`) and `/healthz`.
//!
//! Like SMTP, every way in here only authenticates, stores and wakes the dispatcher; the
//! `2xx` is sent after the alert is committed, and a store failure is a `503` so that the
//! sender (SendGrid retries for three days) tries again. Error answers are a status and a
//! short plain-text reason; causes go to the log, never to the client.
//!
//! The server is exposed to the internet (SendGrid and Twilio must reach it), so it is
//! bounded whatever clients do. Connections are served by hyper's HTTP/1 connection
//! (not `axum::serve`) because hyper's settings are the limits: `header_read_timeout`
//! closes clients that trickle their headers (slowloris) and kept-alive connections that
//! sit idle, `max_buf_size` bounds what one connection buffers. Around it: a total and a
//! per-address connection cap (`503`, `429`), a write timeout on the socket, and a `408`
//! for a client that never completed its request. Credentials in headers are checked
//! before a body is read, and bodies are read under their limit, SendGrid's also under a
//! byte budget shared by all requests and counted as bytes arrive, so unauthenticated
//! posts cost no memory and a stalled post holds only what it sent.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use base64::Engine;
use futures_util::StreamExt;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower_http::timeout::TimeoutLayer;
use tracing::{debug, error, info, warn};

use crate::alert::DirectAlert;
use crate::config::{Config, Http, Sendgrid, WebhookNumbers, is_language, is_voice};
use crate::health::Health;
use crate::ingest::Secrets;
use crate::ingest::sendgrid::{self, Inbound};
use crate::metrics::Metrics;
use crate::route;
use crate::settings::Live;
use crate::store::{Inserted, NewAlert, Store, StoreError, now_ms};

/// What every request handler shares.
#[derive(Debug)]
pub struct HttpContext {
    /// The settings in force; each request takes the version current when it arrives.
    pub live: Live,
    pub store: Store,
    pub wake: Arc<Notify>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// For conference announcements (`None` in a dry run).
    pub twilio: Option<crate::twilio::Client>,
}

/// The routes this configuration enables, and the settings in force, from which
/// [`serve`] takes each connection's limits (so they follow a reload).
#[derive(Debug, Clone)]
pub struct App {
    router: Router,
    live: Live,
}

impl App {
    /// The routes alone, e.g. to call them without a socket (`oneshot`).
    pub fn router(&self) -> Router {
        self.router.clone()
    }
}

/// SendGrid body bytes held in memory at once, across all requests: 24 parallel 40 MiB
/// posts must not mean a gigabyte. Bytes are counted as they arrive; when they would
/// pass the budget one body waits for room (up to [`BUDGET_WAIT`]), others get `503`,
/// and SendGrid retries.
const SENDGRID_BODY_BUDGET: usize = 64 * 1024 * 1024;

/// How long a body waits for room in the budget before it is answered `503`.
const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// The largest read buffer of one connection (hyper's default is ~400 KiB); request
/// headers must fit in it. Bodies are not limited by it: they stream through.
const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

/// Connections waiting for a slot or being refused (`429`, `503`) at once; beyond this a
/// connection that cannot be served is just closed, so that a flood of them costs nothing.
const MAX_WAITING: usize = 256;

/// How long a connection over `max_connections` waits for a slot before its `503`: a
/// burst is served a moment later rather than refused, a full server still answers.
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// The routes this configuration enables.
pub fn app(ctx: Arc<HttpContext>) -> App {
    let live = Arc::clone(&ctx.live);
    let settings = ctx.live.load_full();
    for warning in settings.config.warnings() {
        warn!("{warning}");
    }
    let http = settings.config.http.as_ref();
    let max_body = http.map_or(1024 * 1024, |h| h.max_body_bytes);
    let timeout = http.map_or(Duration::from_secs(30), |h| h.request_timeout);
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics));
    if let Some(sg) = &settings.config.sendgrid {
        // The handler reads its body itself, after authentication, under its own limit.
        router = router.route(
            &sg.path,
            axum::routing::post(sendgrid_inbound).layer(Extension(BodyBudget::new(
                SENDGRID_BODY_BUDGET.max(sg.max_body_bytes),
            ))),
        );
    }
    if settings.config.twilio.public_url.is_some() {
        router = router.merge(crate::ingest::callbacks::routes());
    }
    if settings.config.webhook.is_some() {
        router = router
            .route("/alert", get(webhook).post(webhook))
            .merge(crate::ingest::oncall::routes());
    }
    let router = router
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(ctx);
    App { router, live }
}

/// Serves `app` until `shutdown`, then finishes the requests under way. At most
/// `max_connections` are served at once (more wait up to [`SLOT_WAIT`] for a slot, then
/// get `503`) and `[http] max_connections_per_ip` from one client (more get `429`).
pub async fn serve(
    listener: TcpListener,
    max_connections: usize,
    app: App,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let waiting = Arc::new(Semaphore::new(MAX_WAITING));
    let clients = Arc::new(Clients::default());
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let limits = Limits::of(app.live.load().config.http.as_ref());
        let (router, shutdown) = (app.router.clone(), shutdown.clone());
        let Some(ticket) = clients.admit(peer.ip(), limits.max_per_ip) else {
            warn!(%peer, limit = limits.max_per_ip, "too many HTTP connections from one address; answered 429");
            let answer = Canned::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address; try again later",
            )
            .retry_after(1);
            if let Ok(place) = Arc::clone(&waiting).try_acquire_owned() {
                connections.spawn(async move {
                    refuse(stream, answer).await;
                    drop(place);
                });
            }
            continue;
        };
        if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
            connections.spawn(async move {
                connection(stream, peer, router, limits, shutdown).await;
                drop((slot, ticket));
            });
            continue;
        }
        let Ok(place) = Arc::clone(&waiting).try_acquire_owned() else {
            warn!(%peer, limit = max_connections, "too many HTTP connections, and too many waiting; closed");
            continue;
        };
        let slots = Arc::clone(&slots);
        connections.spawn(async move {
            let slot = tokio::select! {
                slot = tokio::time::timeout(SLOT_WAIT, slots.acquire_owned()) => slot.ok().and_then(Result::ok),
                () = shutdown.cancelled() => None,
            };
            match slot {
                Some(slot) => {
                    drop(place);
                    connection(stream, peer, router, limits, shutdown).await;
                    drop((slot, ticket));
                }
                None => {
                    warn!(%peer, limit = max_connections, "too many HTTP connections; answered 503");
                    let answer = Canned::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many connections; try again later",
                    )
                    .retry_after(5);
                    refuse(stream, answer).await;
                    drop(place);
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// One connection's limits, from `[http]` as it was when the connection came in.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_per_ip: usize,
    header_timeout: Duration,
    write_timeout: Duration,
}

impl Limits {
    fn of(http: Option<&Http>) -> Limits {
        Limits {
            max_per_ip: http.map_or(20, |h| h.max_connections_per_ip),
            header_timeout: http.map_or(Duration::from_secs(10), |h| h.header_timeout),
            write_timeout: http.map_or(Duration::from_secs(30), |h| h.request_timeout),
        }
    }
}

/// Serves one connection with hyper until it closes, the client misbehaves or shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    // Hyper has no write timeout: a client that never reads would hold its slot.
    let mut io = TimeoutStream::new(stream);
    io.set_write_timeout(Some(limits.write_timeout));
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let requested = Arc::clone(&requested);
        hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
            requested.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo(peer));
            let (method, path) = (request.method().clone(), request.uri().path().to_string());
            let router = router.clone();
            let response: Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>> =
                Box::pin(async move {
                    let response = router.oneshot(request).await?;
                    if response.status() == StatusCode::REQUEST_TIMEOUT {
                        warn!(%peer, %method, path, "request not completed within request_timeout; answered 408");
                    }
                    Ok(response)
                });
            response
        })
    };
    let mut conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER)
        .serve_connection(TokioIo::new(Box::pin(io)), service);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut closing = false;
    // Polled by hand rather than awaited so that the connection (and its socket) is
    // still ours when hyper gives up on a slow client: it gets a 408, not a bare close.
    let result = std::future::poll_fn(|cx| {
        if !closing && cancelled.as_mut().poll(cx).is_ready() {
            closing = true;
            // Finishes the request under way, then closes; an idle connection closes now.
            Pin::new(&mut conn).graceful_shutdown();
        }
        conn.poll_without_shutdown(cx)
    })
    .await;
    match result {
        // Hyper is done (the client closed, or the connection cannot be kept alive, e.g.
        // a body was refused unread) but leaves closing to us.
        Ok(()) => linger(conn.into_parts().io.into_inner(), None).await,
        Err(e) if e.is_timeout() => {
            let parts = conn.into_parts();
            if parts.read_buf.is_empty() && requested.load(Ordering::Relaxed) {
                debug!(%peer, "idle kept-alive HTTP connection closed");
                return;
            }
            warn!(%peer, timeout = ?limits.header_timeout, "no complete request headers within header_timeout; answered 408");
            let answer = Canned::new(
                StatusCode::REQUEST_TIMEOUT,
                "request headers not received in time",
            );
            linger(parts.io.into_inner(), Some(answer)).await;
        }
        Err(e) if timed_out(&e) => {
            warn!(%peer, "HTTP client stopped reading its response; closed");
        }
        Err(e) => debug!(%peer, error = %e, "HTTP connection ended with an error"),
    }
}

/// Did the socket's write timeout end the connection?
fn timed_out(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// A whole HTTP/1.1 answer written straight to a socket, for connections hyper does not
/// (or no longer) serve. Always closes the connection.
#[derive(Debug)]
struct Canned {
    status: StatusCode,
    reason: &'static str,
    retry_after: Option<u32>,
}

impl Canned {
    fn new(status: StatusCode, reason: &'static str) -> Canned {
        Canned {
            status,
            reason,
            retry_after: None,
        }
    }

    fn retry_after(self, seconds: u32) -> Canned {
        Canned {
            retry_after: Some(seconds),
            ..self
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let retry = self
            .retry_after
            .map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
        format!(
            "HTTP/1.1 {}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n{retry}Content-Length: {}\r\n\r\n{}\n",
            self.status,
            self.reason.len() + 1,
            self.reason
        )
        .into_bytes()
    }
}

/// Answers a connection that is not served, then closes it ([`linger`]).
async fn refuse(stream: TcpStream, answer: Canned) {
    linger(stream, Some(answer)).await;
}

/// How long a closing connection's unread input is drained.
const LINGER: Duration = Duration::from_secs(2);

/// Closes a connection so that the client reads its answer rather than a reset: closing a
/// socket with unread input (the rest of a body refused before it was read, say) makes
/// the kernel send RST, which can destroy the answer in flight. So: write the `answer`
/// (if any), half-close, and read and discard what still comes for at most [`LINGER`],
/// as Apache's lingering close does.
async fn linger<S>(mut stream: S, answer: Option<Canned>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(LINGER, async {
        if let Some(answer) = answer {
            stream.write_all(&answer.bytes()).await?;
        }
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Open connections per client, so that one client cannot take every slot.
#[derive(Debug, Default)]
struct Clients {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A client's connection; gives its place back when dropped.
#[derive(Debug)]
struct Ticket {
    clients: Arc<Clients>,
    key: IpAddr,
}

impl Clients {
    /// A ticket for one more connection from `ip`, unless it has `max` open already.
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Ticket> {
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        (*count < max).then(|| {
            *count += 1;
            Ticket {
                clients: Arc::clone(self),
                key,
            }
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Whom a connection is counted against: the IPv4 address, or the IPv6 /64, since one
/// IPv6 host usually has a whole /64 to pick addresses from.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// An error answer: a status and a short reason for the client.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    reason: String,
    challenge: Option<&'static str>,
    /// Seconds, for `503`: when to try again.
    retry_after: Option<u32>,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, reason: impl Into<String>) -> HttpError {
        HttpError {
            status,
            reason: reason.into(),
            challenge: None,
            retry_after: None,
        }
    }

    fn unauthorized(reason: &str, challenge: &'static str) -> HttpError {
        HttpError {
            status: StatusCode::UNAUTHORIZED,
            reason: reason.into(),
            challenge: Some(challenge),
            retry_after: None,
        }
    }

    pub(super) fn unavailable() -> HttpError {
        HttpError {
            retry_after: Some(60),
            ..HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot store the alert right now; try again later",
            )
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut response = (self.status, format!("{}\n", self.reason)).into_response();
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The client's address, when the server knows it.
pub(super) struct Peer(pub(super) Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string()),
        ))
    }
}

async fn healthz(State(ctx): State<Arc<HttpContext>>) -> Response {
    let report = ctx.health.check(&ctx.store).await;
    let status = if report.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if report.healthy() { "ok" } else { "unhealthy" },
        "store": report.store,
        "store_full": report.store_full,
        "dispatcher": report.dispatcher,
        "smtp": report.smtp,
        "workers": report.workers,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(ctx): State<Arc<HttpContext>>) -> Response {
    // Rendering reads the store's size from the file system: off the async workers.
    ctx.metrics.store_full.set(i64::from(ctx.store.is_full()));
    let metrics = Arc::clone(&ctx.metrics);
    let Ok(text) = tokio::task::spawn_blocking(move || metrics.render()).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Checks the webhook token (`Authorization: Bearer` or `?token=`) of a request to
/// `what`, from its headers and query alone: before any of its body is read.
pub(super) fn check_token(
    ctx: &HttpContext,
    settings: &crate::settings::Settings,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    what: &str,
    peer: Option<&str>,
) -> Result<(), HttpError> {
    let expected = settings
        .secrets
        .webhook_token
        .as_deref()
        .unwrap_or_default();
    let bearer = credentials(headers, "Bearer");
    let given = bearer.or(params.get("token").map(String::as_str));
    if !given.is_some_and(|t| !expected.is_empty() && same_secret(t, expected)) {
        ctx.metrics.reject("webhook", "token");
        warn!(peer = ?peer, "{what}: missing or wrong token; refused with 401");
        return Err(HttpError::unauthorized(
            "missing or wrong token; send it as `Authorization: Bearer TOKEN` or `?token=TOKEN`",
            "Bearer",
        ));
    }
    Ok(())
}

/// Compares secrets in constant time.
fn same_secret(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// `GET /alert?tels=…&message=…` or `POST /alert` with a form: the original webhook.
async fn webhook(
    State(ctx): State<Arc<HttpContext>>,
    Peer(peer): Peer,
    method: Method,
    headers: HeaderMap,
    Query(mut params): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, HttpError> {
    let settings = ctx.live.load_full();
    // The token comes in a header or the query, never the body: it is checked before a
    // byte of the body is read.
    check_token(
        &ctx,
        &settings,
        &headers,
        &params,
        "/alert",
        peer.as_deref(),
    )?;
    if method == Method::POST {
        let limit = settings
            .config
            .http
            .as_ref()
            .map_or(1024 * 1024, |h| h.max_body_bytes);
        let (body, _) = read_body(body, &headers, limit, None)
            .await
            .map_err(|e| e.answer("/alert", peer.as_deref(), limit))?;
        if !body.is_empty() {
            let form: Vec<(String, String)> =
                serde_urlencoded::from_bytes(&body).map_err(|_| {
                    HttpError::new(
                        StatusCode::BAD_REQUEST,
                        "the body is not a form (application/x-www-form-urlencoded)",
                    )
                })?;
            params.extend(form);
        }
    }
    let tels = params.get("tels").map(String::as_str).unwrap_or_default();
    let numbers = route::resolve_numbers(&settings.config, tels).map_err(|unknown| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "not E.164 numbers, contacts or groups: {}; write numbers as +81312345678",
                unknown.join(", ")
            ),
        )
    })?;
    let webhook_numbers = settings
        .config
        .webhook
        .as_ref()
        .map_or(WebhookNumbers::Contacts, |w| w.numbers);
    if webhook_numbers == WebhookNumbers::Contacts {
        let strangers: Vec<&str> = numbers
            .iter()
            .filter(|n| !settings.config.is_known_number(n))
            .map(String::as_str)
            .collect();
        if !strangers.is_empty() {
            ctx.metrics.reject("webhook", "number");
            warn!(peer = ?peer, numbers = ?strangers, "/alert: numbers outside [contacts] and [groups]; refused with 403");
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "not numbers of [contacts] or [groups]: {}; add them there, or set [webhook] numbers = \"any\"",
                    strangers.join(", ")
                ),
            ));
        }
    }
    if numbers.is_empty() {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "missing `tels`: comma-separated E.164 numbers, contacts or groups",
        ));
    }
    let message = params
        .get("message")
        .map(|m| m.trim().to_string())
        .unwrap_or_default();
    if message.is_empty() {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "missing `message`: the text to speak",
        ));
    }
    let non_empty = |key: &str| {
        params
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if let Some(language) = non_empty("language").filter(|l| !is_language(l)) {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid `language` {language:?}; write e.g. en-US or ja-JP"),
        ));
    }
    if let Some(voice) = non_empty("voice").filter(|v| !is_voice(v)) {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid `voice` {voice:?}; write e.g. Polly.Joanna or alice"),
        ));
    }
    let direct = DirectAlert {
        numbers: numbers.clone(),
        message,
        language: non_empty("language"),
        voice: non_empty("voice"),
        dedup_key: non_empty("dedup_key"),
        ..DirectAlert::default()
    };
    let stored = ctx
        .store
        .insert_alert(NewAlert {
            source: "webhook",
            peer: peer.clone(),
            direct: Some(direct),
            ..NewAlert::default()
        })
        .await;
    match stored {
        Ok(Inserted { id, .. }) => {
            ctx.wake.notify_one();
            ctx.metrics.receive("webhook");
            info!(alert = id, peer = ?peer, numbers = ?numbers, "/alert accepted and stored");
            Ok(
                axum::Json(
                    serde_json::json!({"alert": id, "status": "queued", "numbers": numbers}),
                )
                .into_response(),
            )
        }
        Err(e) => {
            ctx.metrics.reject("webhook", "store");
            error!(peer = ?peer, error = %e, "/alert: cannot store the alert; answered 503");
            Err(HttpError::unavailable())
        }
    }
}

/// `POST {sendgrid.path}`: SendGrid Inbound Parse, raw or default mode.
async fn sendgrid_inbound(
    State(ctx): State<Arc<HttpContext>>,
    Peer(peer): Peer,
    Extension(budget): Extension<BodyBudget>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let settings = ctx.live.load_full();
    let Some(sg) = settings.config.sendgrid.as_ref() else {
        return Err(HttpError::new(StatusCode::NOT_FOUND, "not found"));
    };
    let refused = |e: HttpError| {
        ctx.metrics.reject(
            "sendgrid",
            if e.status == StatusCode::UNAUTHORIZED {
                "auth"
            } else {
                "signature"
            },
        );
        warn!(peer = ?peer, status = e.status.as_u16(), reason = %e.reason, "SendGrid request refused");
        e
    };
    // Everything that the headers alone can decide, before the body is read.
    let signature = authenticate_sendgrid(sg, &settings.secrets, &headers).map_err(refused)?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| HttpError::new(StatusCode::BAD_REQUEST, "expected multipart/form-data"))?;
    let (body, _held) = read_body(body, &headers, sg.max_body_bytes, Some(&budget))
        .await
        .map_err(|e| {
            ctx.metrics.reject("sendgrid", e.kind());
            e.answer("SendGrid", peer.as_deref(), sg.max_body_bytes)
        })?;
    // Hashing 40 MiB and parsing the mail are CPU work: off the async workers, which
    // must keep serving SMTP, callbacks and `/healthz` meanwhile.
    let body = Bytes::from(body);
    if let Some(signature) = signature {
        let timestamp = header_str(&headers, TIMESTAMP_HEADER)
            .unwrap_or_default()
            .to_string();
        let (signature, signed, settings) =
            (signature.to_string(), body.clone(), Arc::clone(&settings));
        let checked = blocking(move || {
            let sg = settings.config.sendgrid.as_ref()?;
            let key = sg.public_key.as_ref()?;
            sendgrid::verify_signature(
                key,
                Some(&signature),
                Some(&timestamp),
                &[&signed],
                now_ms() / 1000,
                sg.max_age,
            )
            .err()
        })
        .await?;
        if let Some(e) = checked {
            return Err(refused(HttpError::new(
                StatusCode::FORBIDDEN,
                format!("signature check failed: {e}"),
            )));
        }
    }
    let fields = read_fields(body, boundary).await.map_err(|e| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed multipart body: {e}"),
        )
    })?;
    let inbound = blocking(move || sendgrid::from_fields(fields))
        .await?
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let rejected = refusal(&settings.config, sg, &inbound);
    let message_id = inbound.message_id.clone();
    let envelope = inbound.envelope.clone();
    let stored = ctx
        .store
        .insert_alert(NewAlert {
            source: "sendgrid",
            peer: peer.clone(),
            envelope: inbound.envelope,
            raw: inbound.raw,
            dedup_id: inbound.message_id,
            rejected: rejected.as_ref().map(|r| r.reason.clone()),
            ..NewAlert::default()
        })
        .await;
    match stored {
        Ok(Inserted {
            id,
            duplicate: true,
        }) => {
            ctx.metrics.reject("sendgrid", "duplicate");
            info!(alert = id, peer = ?peer, message_id = ?message_id, "SendGrid delivered this Message-ID before; stored once");
        }
        Ok(Inserted { id, .. }) => match &rejected {
            Some(reason) => {
                ctx.metrics.reject("sendgrid", reason.kind);
                warn!(
                alert = id, peer = ?peer, from = ?envelope.mail_from, rcpt = ?envelope.rcpt_to, reason = %reason.reason,
                "SendGrid mail recorded as rejected; nobody is called"
                )
            }
            None => {
                ctx.wake.notify_one();
                ctx.metrics.receive("sendgrid");
                info!(alert = id, peer = ?peer, from = ?envelope.mail_from, rcpt = ?envelope.rcpt_to, message_id = ?message_id, "SendGrid mail accepted and stored");
            }
        },
        Err(e @ StoreError::TooBig { .. }) => {
            ctx.metrics.reject("sendgrid", "size");
            error!(peer = ?peer, error = %e, "a SendGrid mail can never be stored; answered 413");
            return Err(HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message too big for this server's store",
            ));
        }
        Err(e) => {
            ctx.metrics.reject("sendgrid", "store");
            error!(peer = ?peer, error = %e, "cannot store a SendGrid mail; answered 503 so SendGrid retries");
            return Err(HttpError::unavailable());
        }
    }
    Ok((StatusCode::OK, "ok\n").into_response())
}

/// Runs CPU-heavy request work on the blocking pool; only a panic in it fails (`500`).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        error!(error = %e, "request work panicked; answered 500");
        HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })
}

/// The header SendGrid signs with, and the one with the signed timestamp.
const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";

/// Basic auth and/or the signature headers, whichever are configured, before the body is
/// read. Returns the signature header to verify against the body once it is read.
fn authenticate_sendgrid<'h>(
    sg: &Sendgrid,
    secrets: &Secrets,
    headers: &'h HeaderMap,
) -> Result<Option<&'h str>, HttpError> {
    if let Some((user, _)) = &sg.basic {
        let password = secrets.sendgrid_password.as_deref().unwrap_or_default();
        let given = credentials(headers, "Basic")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        let ok = given
            .as_deref()
            .and_then(|g| g.split_once(':'))
            .is_some_and(|(u, p)| {
                // Evaluate both comparisons: no early exit that times the user name.
                let user_ok = same_secret(u, user);
                let password_ok = !password.is_empty() && same_secret(p, password);
                user_ok & password_ok
            });
        if !ok {
            return Err(HttpError::unauthorized(
                "missing or wrong credentials",
                "Basic realm=\"mailcall\"",
            ));
        }
    }
    if sg.public_key.is_none() {
        return Ok(None);
    }
    let signature = header_str(headers, SIGNATURE_HEADER);
    sendgrid::precheck_signature(
        signature,
        header_str(headers, TIMESTAMP_HEADER),
        now_ms() / 1000,
        sg.max_age,
    )
    .map_err(|e| {
        HttpError::new(
            StatusCode::FORBIDDEN,
            format!("signature check failed: {e}"),
        )
    })?;
    Ok(signature)
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The credentials of an `Authorization` header with `scheme`, which is matched without
/// regard to case (RFC 9110 11.1: `bearer x` is `Bearer x`).
fn credentials<'h>(headers: &'h HeaderMap, scheme: &str) -> Option<&'h str> {
    let value = header_str(headers, header::AUTHORIZATION.as_str())?.trim();
    let (given, rest) = value.split_once([' ', '\t'])?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| rest.trim())
        .filter(|c| !c.is_empty())
}

/// The shared byte budget for SendGrid bodies in memory ([`SENDGRID_BODY_BUDGET`]).
#[derive(Debug, Clone)]
pub(super) struct BodyBudget {
    /// One permit per byte.
    bytes: Arc<Semaphore>,
    /// The one body that may wait for room. Bodies hold what they read while they wait,
    /// so if every body could wait, bodies could all be waiting on each other; a second
    /// body that finds no room is answered `503` at once and gives its bytes back.
    waiter: Arc<Semaphore>,
}

impl BodyBudget {
    fn new(bytes: usize) -> Self {
        BodyBudget {
            bytes: Arc::new(Semaphore::new(bytes)),
            waiter: Arc::new(Semaphore::new(1)),
        }
    }

    /// Permits for `n` bytes: at once when there is room, else after waiting, as long
    /// as no other body is waiting and this body's waits add up to less than
    /// [`BUDGET_WAIT`].
    async fn take(
        &self,
        n: usize,
        waited: &mut Duration,
    ) -> Result<OwnedSemaphorePermit, BodyError> {
        let n = u32::try_from(n).map_err(|_| BodyError::TooLarge)?;
        if let Ok(permit) = Arc::clone(&self.bytes).try_acquire_many_owned(n) {
            return Ok(permit);
        }
        let Ok(_waiting) = self.waiter.try_acquire() else {
            return Err(BodyError::Busy);
        };
        let started = tokio::time::Instant::now();
        let left = BUDGET_WAIT.saturating_sub(*waited);
        let taken = tokio::time::timeout(left, Arc::clone(&self.bytes).acquire_many_owned(n)).await;
        *waited += started.elapsed();
        match taken {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(BodyError::Busy),
        }
    }
}

/// Why a body was not read whole.
#[derive(Debug)]
pub(super) enum BodyError {
    /// Over the limit, by `Content-Length` or by what arrived.
    TooLarge,
    /// The shared budget is spent by other requests.
    Busy,
    /// The client went away or sent a broken chunked encoding.
    Read(axum::Error),
}

impl BodyError {
    /// The metric label.
    fn kind(&self) -> &'static str {
        match self {
            BodyError::TooLarge => "size",
            BodyError::Busy => "busy",
            BodyError::Read(_) => "body",
        }
    }

    /// The answer, logged with the client.
    pub(super) fn answer(self, what: &str, peer: Option<&str>, limit: usize) -> HttpError {
        match self {
            BodyError::TooLarge => {
                warn!(peer = ?peer, limit, "{what}: body over the limit; refused with 413");
                HttpError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is larger than {limit} bytes"),
                )
            }
            BodyError::Busy => {
                warn!(peer = ?peer, "{what}: too many large bodies at once; answered 503");
                HttpError {
                    retry_after: Some(10),
                    ..HttpError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many large requests at once; try again later",
                    )
                }
            }
            BodyError::Read(e) => {
                debug!(peer = ?peer, error = %e, "{what}: cannot read the body");
                HttpError::new(StatusCode::BAD_REQUEST, "cannot read the body")
            }
        }
    }
}

/// Reads a body as it streams in, refusing it as soon as it is known to exceed `limit`
/// (by `Content-Length`, before reading anything, or by what arrived). With a `budget`,
/// every byte held also holds a permit, returned when the caller drops it. Permits are
/// taken as bytes arrive, never for what is only announced: a client that declares
/// 40 MiB and stalls holds what it sent, not the budget every other post needs. A chunk
/// that finds the budget spent may wait for room ([`BodyBudget::take`]), else `503`.
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    budget: Option<&BodyBudget>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), BodyError> {
    let declared = header_str(headers, header::CONTENT_LENGTH.as_str())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut held: Option<OwnedSemaphorePermit> = None;
    let mut waited = Duration::ZERO;
    // One buffer, sized by `Content-Length` (address space, not memory: pages are only
    // touched as bytes arrive). Keeping hyper's chunks instead would keep each chunk's
    // whole read buffer alive, several times the body.
    let mut out = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        if let Some(budget) = budget {
            let permit = budget.take(chunk.len(), &mut waited).await?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, held))
}

/// Why a SendGrid mail must not ring anyone.
#[derive(Debug, Clone)]
struct Refused {
    /// The metric label.
    kind: &'static str,
    reason: String,
}

/// Why a SendGrid mail must not ring anyone, if it must not.
fn refusal(config: &Config, sg: &Sendgrid, inbound: &Inbound) -> Option<Refused> {
    if let Some(allowed) = &config.smtp.recipients
        && !inbound.envelope.rcpt_to.iter().any(|r| allowed.matches(r))
    {
        return Some(Refused {
            kind: "recipient",
            reason: "no envelope recipient is allowed by [smtp] recipients".into(),
        });
    }
    // As for SMTP's `MAIL FROM`: the null sender is the empty address.
    let sender = inbound.envelope.mail_from.as_deref().unwrap_or_default();
    if let Some(allowed) = &config.smtp.senders
        && !allowed.matches(sender)
    {
        return Some(Refused {
            kind: "sender",
            reason: format!("envelope sender <{sender}> is not allowed by [smtp] senders"),
        });
    }
    if sg.require_spf
        && !inbound
            .spf
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("pass"))
    {
        return Some(Refused {
            kind: "spf",
            reason: format!(
                "SPF {} (require_spf = true)",
                inbound.spf.as_deref().unwrap_or("missing")
            ),
        });
    }
    if sg.require_dkim && !sendgrid::dkim_aligned(inbound.dkim.as_deref(), &inbound.header_from) {
        return Some(Refused {
            kind: "dkim",
            reason: format!(
                "DKIM {} for From: {} (require_dkim = true: a passing signature of the From: domain)",
                inbound.dkim.as_deref().unwrap_or("missing"),
                if inbound.header_from.is_empty() {
                    "(none)"
                } else {
                    &inbound.header_from
                },
            ),
        });
    }
    None
}

/// The form fields of a multipart body (file parts, i.e. attachments, left out).
async fn read_fields(
    body: Bytes,
    boundary: String,
) -> Result<HashMap<String, Vec<u8>>, multer::Error> {
    // Fed in slices of the one buffer (no copies): the parser copies what it is given
    // into its own buffer, so one 40 MiB piece would be held twice.
    const SLICE: usize = 64 * 1024;
    let slices = (0..body.len())
        .step_by(SLICE)
        .map(move |at| Ok::<Bytes, Infallible>(body.slice(at..(at + SLICE).min(body.len()))));
    let stream = futures_util::stream::iter(slices);
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut fields = HashMap::new();
    while let Some(mut field) = multipart.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        if field.file_name().is_some() {
            // An attachment: passed over, never held whole.
            while field.chunk().await?.is_some() {}
            continue;
        }
        fields.insert(name, Vec::from(field.bytes().await?));
    }
    Ok(fields)
}
