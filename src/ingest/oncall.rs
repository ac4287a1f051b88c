//! On-call endpoints behind the webhook token: silences (`POST /silences`,
//! `GET /silences`, `DELETE /silences/ID`) and heartbeats (`POST /heartbeat/<name>`).
//! Like `/alert`, the token is checked from the headers or the query before a byte of
//! the body is read, and bodies are read under `[http] max_body_bytes`. A beat is
//! stored as an alert (`2xx` means on disk) that the router records as the beat.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use jiff::Timestamp;
use tracing::{error, info, warn};

use super::http::{HttpContext, HttpError, Peer, check_token, read_body};
use crate::alert::DirectAlert;
use crate::oncall::silence;
use crate::store::{NewAlert, now_ms};

/// The routes, mounted when `[webhook]` is configured.
pub fn routes() -> Router<Arc<HttpContext>> {
    Router::new()
        .route("/silences", post(add_silence).get(list_silences))
        .route("/silences/{id}", delete(expire_silence))
        .route("/heartbeat/{name}", post(beat))
}

/// `POST /silences`' body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    #[serde(default)]
    matchers: Vec<String>,
    #[serde(rename = "for")]
    duration: Option<String>,
    until: Option<String>,
    #[serde(default)]
    comment: String,
}

/// The settings in force, once the request's token is checked (from the headers and
/// the query: before any of the body is read).
fn authorized(
    ctx: &HttpContext,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    what: &str,
    peer: Option<&str>,
) -> Result<Arc<crate::settings::Settings>, HttpError> {
    let settings = ctx.live.load_full();
    check_token(ctx, &settings, headers, params, what, peer)?;
    Ok(settings)
}

fn bad_request(reason: impl Into<String>) -> HttpError {
    HttpError::new(StatusCode::BAD_REQUEST, reason)
}

fn store_failed(what: &str, e: &crate::store::StoreError) -> HttpError {
    error!(error = %e, "{what}: the store failed; answered 503");
    HttpError::unavailable()
}

/// `POST /silences` with `{"matchers": [...], "for": "2h" | "until": "<RFC 3339>",
/// "comment": "…"}` → `201 {"id": …}`.
async fn add_silence(
    State(ctx): State<Arc<HttpContext>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, HttpError> {
    let settings = authorized(&ctx, &headers, &params, "/silences", peer.as_deref())?;
    let limit = settings
        .config
        .http
        .as_ref()
        .map_or(1024 * 1024, |h| h.max_body_bytes);
    let (body, _) = read_body(body, &headers, limit, None)
        .await
        .map_err(|e| e.answer("/silences", peer.as_deref(), limit))?;
    let new: NewSilence = serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "the body is not a silence ({e}); send {{\"matchers\": [\"rule=host down\"], \"for\": \"2h\", \"comment\": \"why\"}}"
        ))
    })?;
    let matchers = silence::parse_matchers(
        new.matchers.iter().map(String::as_str),
        &settings.config.silence_names(),
    )
    .map_err(bad_request)?;
    if new.comment.trim().is_empty() {
        return Err(bad_request(
            "missing `comment`: say why, e.g. \"kernel upgrade\"",
        ));
    }
    let now = Timestamp::now();
    let end =
        silence::end(new.duration.as_deref(), new.until.as_deref(), now).map_err(bad_request)?;
    let texts: Vec<String> = matchers.iter().map(ToString::to_string).collect();
    let id = ctx
        .store
        .add_silence(
            texts.clone(),
            now.as_millisecond(),
            end.as_millisecond(),
            new.comment.clone(),
            format!("http {}", peer.as_deref().unwrap_or("-")),
        )
        .await
        .map_err(|e| store_failed("/silences", &e))?;
    info!(silence = id, peer = ?peer, matchers = ?texts, until = %end, comment = %new.comment, "silence added");
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({"id": id})),
    )
        .into_response())
}

/// `GET /silences`: the silences in force, as a JSON list.
async fn list_silences(
    State(ctx): State<Arc<HttpContext>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    authorized(&ctx, &headers, &params, "/silences", peer.as_deref())?;
    let list = ctx
        .store
        .silences(now_ms())
        .await
        .map_err(|e| store_failed("/silences", &e))?;
    // Each with the names that make it ignored (none: it is in force).
    let known = ctx.live.load().config.silence_names();
    let list: Vec<serde_json::Value> = list.iter().map(|s| s.listed(&known)).collect();
    Ok(axum::Json(list).into_response())
}

/// `DELETE /silences/ID`: ends the silence now.
async fn expire_silence(
    State(ctx): State<Arc<HttpContext>>,
    Peer(peer): Peer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    authorized(&ctx, &headers, &params, "/silences", peer.as_deref())?;
    let id: i64 = id
        .parse()
        .map_err(|_| bad_request(format!("`{id}` is not a silence id")))?;
    let expired = ctx
        .store
        .expire_silence(id, now_ms())
        .await
        .map_err(|e| store_failed("/silences", &e))?;
    if !expired {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("no silence {id} in force; see GET /silences"),
        ));
    }
    info!(silence = id, peer = ?peer, "silence expired");
    Ok(axum::Json(serde_json::json!({"id": id, "expired": true})).into_response())
}

/// `POST /heartbeat/<name>`: a beat of that heartbeat (the body is not read).
async fn beat(
    State(ctx): State<Arc<HttpContext>>,
    Peer(peer): Peer,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    let settings = authorized(&ctx, &headers, &params, "/heartbeat", peer.as_deref())?;
    if !settings.config.heartbeats.iter().any(|h| h.name == name) {
        warn!(peer = ?peer, heartbeat = %name, "/heartbeat: no such heartbeat; answered 404");
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("no [[heartbeat]] named `{name}` in the configuration"),
        ));
    }
    let stored = ctx
        .store
        .insert_alert(NewAlert {
            source: "heartbeat",
            peer: peer.clone(),
            direct: Some(DirectAlert {
                message: format!("beat of {name}"),
                heartbeat: Some(name.clone()),
                beat: true,
                ..DirectAlert::default()
            }),
            ..NewAlert::default()
        })
        .await
        .map_err(|e| store_failed("/heartbeat", &e))?;
    ctx.wake.notify_one();
    info!(alert = stored.id, peer = ?peer, heartbeat = %name, "heartbeat beat received");
    Ok(axum::Json(serde_json::json!({"heartbeat": name, "alert": stored.id})).into_response())
}
