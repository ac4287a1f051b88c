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
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tracing::{error, info, warn};

use crate::alert::DirectAlert;
use crate::config::{Config, Sendgrid};
use crate::health::Health;
use crate::ingest::sendgrid::{self, Inbound};
use crate::route;
use crate::store::{Inserted, NewAlert, Store, now_ms};

/// Secrets the HTTP endpoints check against, read from the environment at start.
#[derive(Clone, Default)]
pub struct Secrets {
    pub sendgrid_password: Option<String>,
    pub webhook_token: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

/// A secret the configuration names but the environment lacks.
#[derive(Debug, thiserror::Error)]
#[error(
    "{section} names the environment variable {var}, which is not set (or empty); set it, e.g. in /etc/mailcall/mailcall.env"
)]
pub struct MissingSecret {
    section: &'static str,
    var: String,
}

impl Secrets {
    /// Reads every secret the configuration names; a missing one stops the start.
    pub fn from_env(config: &Config) -> Result<Secrets, MissingSecret> {
        let read = |section: &'static str, var: &str| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| MissingSecret {
                    section,
                    var: var.to_string(),
                })
        };
        Ok(Secrets {
            sendgrid_password: match config.sendgrid.as_ref().and_then(|s| s.basic.as_ref()) {
                Some((_, var)) => Some(read("[sendgrid] password_env", var)?),
                None => None,
            },
            webhook_token: match &config.webhook {
                Some(w) => Some(read("[webhook] token_env", &w.token_env)?),
                None => None,
            },
        })
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct Context {
    pub config: Arc<Config>,
    pub store: Store,
    pub wake: Arc<Notify>,
    pub health: Arc<Health>,
    pub secrets: Secrets,
}

/// The routes this configuration enables.
pub fn app(ctx: Arc<Context>) -> Router {
    let http = ctx.config.http.as_ref();
    let max_body = http.map_or(1024 * 1024, |h| h.max_body_bytes);
    let timeout = http.map_or(std::time::Duration::from_secs(30), |h| h.request_timeout);
    let mut router = Router::new().route("/healthz", get(healthz));
    if let Some(sg) = &ctx.config.sendgrid {
        router = router.route(
            &sg.path,
            axum::routing::post(sendgrid_inbound).layer(DefaultBodyLimit::max(sg.max_body_bytes)),
        );
    }
    if ctx.config.webhook.is_some() {
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

/// Serves `app` until `shutdown`, then finishes the requests under way.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
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
    fn new(status: StatusCode, reason: impl Into<String>) -> HttpError {
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

/// The client's address, when the server knows it (not in router-only tests).
struct Peer(Option<String>);

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

async fn healthz(State(ctx): State<Arc<Context>>) -> Response {
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
    });
    (status, axum::Json(body)).into_response()
}

/// Compares secrets in constant time.
fn same_secret(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// `GET /alert?tels=…&message=…` or `POST /alert` with a form: the original webhook.
async fn webhook(
    State(ctx): State<Arc<Context>>,
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
    let expected = ctx.secrets.webhook_token.as_deref().unwrap_or_default();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.or(params.get("token").map(String::as_str));
    if !given.is_some_and(|t| !expected.is_empty() && same_secret(t, expected)) {
        warn!(peer = ?peer, "/alert: missing or wrong token; refused with 401");
        return Err(HttpError::unauthorized("missing or wrong token", "Bearer"));
    }
    let tels = params.get("tels").map(String::as_str).unwrap_or_default();
    let numbers = route::resolve_numbers(&ctx.config, tels).map_err(|unknown| {
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
            info!(alert = id, peer = ?peer, numbers = ?numbers, "/alert accepted and stored");
            Ok(
                axum::Json(
                    serde_json::json!({"alert": id, "status": "queued", "numbers": numbers}),
                )
                .into_response(),
            )
        }
        Err(e) => {
            error!(peer = ?peer, error = %e, "/alert: cannot store the alert; answered 503");
            Err(HttpError::unavailable())
        }
    }
}

/// `POST {sendgrid.path}`: SendGrid Inbound Parse, raw or default mode.
async fn sendgrid_inbound(
    State(ctx): State<Arc<Context>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let Some(sg) = ctx.config.sendgrid.as_ref() else {
        return Err(HttpError::new(StatusCode::NOT_FOUND, "not found"));
    };
    authenticate_sendgrid(sg, &ctx.secrets, &headers, &body).inspect_err(|e| {
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
    let rejected = refusal(&ctx.config, sg, &inbound);
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
            rejected: rejected.clone(),
            ..NewAlert::default()
        })
        .await;
    match stored {
        Ok(Inserted {
            id,
            duplicate: true,
        }) => {
            info!(alert = id, peer = ?peer, message_id = ?message_id, "SendGrid delivered this Message-ID before; stored once");
        }
        Ok(Inserted { id, .. }) => match &rejected {
            Some(reason) => warn!(
                alert = id, peer = ?peer, from = ?envelope.mail_from, rcpt = ?envelope.rcpt_to, reason = %reason,
                "SendGrid mail recorded as rejected; nobody is called"
            ),
            None => {
                ctx.wake.notify_one();
                info!(alert = id, peer = ?peer, from = ?envelope.mail_from, rcpt = ?envelope.rcpt_to, message_id = ?message_id, "SendGrid mail accepted and stored");
            }
        },
        Err(e) => {
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

/// Why a SendGrid mail must not ring anyone, if it must not.
fn refusal(config: &Config, sg: &Sendgrid, inbound: &Inbound) -> Option<String> {
    if let Some(allowed) = &config.smtp.recipients
        && !inbound.envelope.rcpt_to.iter().any(|r| allowed.matches(r))
    {
        return Some("no envelope recipient is allowed by [smtp] recipients".into());
    }
    if sg.require_spf
        && !inbound
            .spf
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("pass"))
    {
        return Some(format!(
            "SPF {} (require_spf = true)",
            inbound.spf.as_deref().unwrap_or("missing")
        ));
    }
    if sg.require_dkim && !sendgrid::dkim_passed(inbound.dkim.as_deref()) {
        return Some(format!(
            "DKIM {} (require_dkim = true)",
            inbound.dkim.as_deref().unwrap_or("missing")
        ));
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
