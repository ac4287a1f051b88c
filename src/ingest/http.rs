//! The HTTP server: SendGrid Inbound Parse, the `/alert` webhook and `/healthz`.
//!
//! Like SMTP, every way in here only authenticates, stores and wakes the dispatcher; the
//! `2xx` is sent after the alert is committed, and a store failure is a `503` so that the
//! sender (SendGrid retries for three days) tries again. Error answers are a status and a
//! short plain-text reason; causes go to the log, never to the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};
use base64::Engine;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use subtle::ConstantTimeEq;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tracing::{error, info, warn};

use crate::alert::DirectAlert;
use crate::config::{Config, Sendgrid, is_language, is_voice};
use crate::health::Health;
use crate::ingest::Secrets;
use crate::ingest::sendgrid::{self, Inbound};
use crate::metrics::Metrics;
use crate::route;
use crate::settings::Live;
use crate::store::{Inserted, NewAlert, Store, now_ms};

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

/// The routes this configuration enables.
pub fn app(ctx: Arc<HttpContext>) -> Router {
    let settings = ctx.live.load_full();
    let http = settings.config.http.as_ref();
    let max_body = http.map_or(1024 * 1024, |h| h.max_body_bytes);
    let timeout = http.map_or(Duration::from_secs(30), |h| h.request_timeout);
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics));
    if let Some(sg) = &settings.config.sendgrid {
        router = router.route(
            &sg.path,
            axum::routing::post(sendgrid_inbound).layer(DefaultBodyLimit::max(sg.max_body_bytes)),
        );
    }
    if settings.config.twilio.public_url.is_some() {
        router = router.merge(crate::ingest::callbacks::routes());
    }
    if settings.config.webhook.is_some() {
        router = router.route("/alert", get(webhook).post(webhook));
    }
    router
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(ctx)
}

/// Serves `app` until `shutdown`, then finishes the requests under way. At most
/// `max_connections` are served at once; more wait in the listen backlog.
pub async fn serve(
    listener: TcpListener,
    max_connections: usize,
    app: Router,
    shutdown: CancellationToken,
) {
    let listener = LimitedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(max_connections)),
    };
    let service = app.into_make_service_with_connect_info::<PeerAddr>();
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        error!(error = %e, "the HTTP server stopped");
    }
}

/// An error answer: a status and a short reason for the client.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    reason: String,
    challenge: Option<&'static str>,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, reason: impl Into<String>) -> HttpError {
        HttpError {
            status,
            reason: reason.into(),
            challenge: None,
        }
    }

    fn unauthorized(reason: &str, challenge: &'static str) -> HttpError {
        HttpError {
            status: StatusCode::UNAUTHORIZED,
            reason: reason.into(),
            challenge: Some(challenge),
        }
    }

    fn unavailable() -> HttpError {
        HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot store the alert right now; try again later",
        )
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
        response
    }
}

/// A TCP listener that holds at most `slots` connections open.
struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

/// A connection and its slot, given back when the connection is dropped.
struct LimitedIo {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = match Arc::clone(&self.slots).acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let _ = io.set_nodelay(true);
                    return (LimitedIo { io, _slot: slot }, addr);
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The client's address, as axum's connect info for [`LimitedListener`].
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

impl Connected<IncomingStream<'_, LimitedListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, LimitedListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// The client's address, when the server knows it.
struct Peer(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<PeerAddr>>()
                .map(|c| c.0.0.to_string()),
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
        "dispatcher": report.dispatcher,
        "smtp": report.smtp,
        "workers": report.workers,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(ctx): State<Arc<HttpContext>>) -> Response {
    // Rendering reads the store's size from the file system: off the async workers.
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
    body: Bytes,
) -> Result<Response, HttpError> {
    if method == Method::POST && !body.is_empty() {
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).map_err(|_| {
            HttpError::new(
                StatusCode::BAD_REQUEST,
                "the body is not a form (application/x-www-form-urlencoded)",
            )
        })?;
        params.extend(form);
    }
    let settings = ctx.live.load_full();
    let expected = settings
        .secrets
        .webhook_token
        .as_deref()
        .unwrap_or_default();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.or(params.get("token").map(String::as_str));
    if !given.is_some_and(|t| !expected.is_empty() && same_secret(t, expected)) {
        ctx.metrics.reject("webhook", "token");
        warn!(peer = ?peer, "/alert: missing or wrong token; refused with 401");
        return Err(HttpError::unauthorized("missing or wrong token", "Bearer"));
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
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let settings = ctx.live.load_full();
    let Some(sg) = settings.config.sendgrid.as_ref() else {
        return Err(HttpError::new(StatusCode::NOT_FOUND, "not found"));
    };
    authenticate_sendgrid(sg, &settings.secrets, &headers, &body).inspect_err(|e| {
        ctx.metrics.reject("sendgrid", if e.status == StatusCode::UNAUTHORIZED { "auth" } else { "signature" });
        warn!(peer = ?peer, status = e.status.as_u16(), reason = %e.reason, "SendGrid request refused");
    })?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| HttpError::new(StatusCode::BAD_REQUEST, "expected multipart/form-data"))?;
    let fields = read_fields(body, boundary).await.map_err(|e| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed multipart body: {e}"),
        )
    })?;
    let inbound = sendgrid::from_fields(&fields)
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
        Err(e) => {
            ctx.metrics.reject("sendgrid", "store");
            error!(peer = ?peer, error = %e, "cannot store a SendGrid mail; answered 503 so SendGrid retries");
            return Err(HttpError::unavailable());
        }
    }
    Ok((StatusCode::OK, "ok\n").into_response())
}

/// Basic auth and/or the signature, whichever are configured, before any parsing.
fn authenticate_sendgrid(
    sg: &Sendgrid,
    secrets: &Secrets,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), HttpError> {
    if let Some((user, _)) = &sg.basic {
        let password = secrets.sendgrid_password.as_deref().unwrap_or_default();
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
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
    if let Some(key) = &sg.public_key {
        let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        sendgrid::verify_signature(
            key,
            header_str("x-twilio-email-event-webhook-signature"),
            header_str("x-twilio-email-event-webhook-timestamp"),
            body,
            now_ms() / 1000,
            sg.max_age,
        )
        .map_err(|e| {
            HttpError::new(
                StatusCode::FORBIDDEN,
                format!("signature check failed: {e}"),
            )
        })?;
    }
    Ok(())
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
    if sg.require_dkim && !sendgrid::dkim_passed(inbound.dkim.as_deref()) {
        return Some(Refused {
            kind: "dkim",
            reason: format!(
                "DKIM {} (require_dkim = true)",
                inbound.dkim.as_deref().unwrap_or("missing")
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
    let stream =
        futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut fields = HashMap::new();
    while let Some(field) = multipart.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        let is_file = field.file_name().is_some();
        let data = field.bytes().await?;
        if !is_file {
            fields.insert(name, data.to_vec());
        }
    }
    Ok(fields)
}
