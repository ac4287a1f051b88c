//! Twilio's callbacks, served when `[twilio] public_url` is set: the answers of the
//! press-1 prompt, call progress, conference joins and leaves, announcements, and
//! dial-in to the bridge.
//!
//! Every request must carry a valid `X-Twilio-Signature` for the public URL it was sent
//! to (keyed with the auth token); anything else gets 403 and changes nothing, since
//! these endpoints decide who is in an incident bridge.
//!
//! Every phrase is said in the incident's language (the rule's `language`), from
//! `Config::prompts`: built-in English or Japanese, or the `[prompts]` of rules.toml.
//! Answers that belong to no incident yet (the PIN prompt) use `[defaults]`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::ingest::http::{HttpContext, HttpError};
use crate::settings::Settings;
use crate::speech::Prompts;
use crate::store::{AttemptState, TwilioStatus};
use crate::twilio::{signature, twiml};

/// The callback routes (under `/twilio/`).
pub fn routes() -> Router<Arc<HttpContext>> {
    Router::new()
        .route("/twilio/gather", post(gather))
        .route("/twilio/status", post(status))
        .route("/twilio/conference", post(conference))
        .route("/twilio/announce", post(announce))
        .route("/twilio/voice", post(voice))
        .route("/twilio/pin", post(pin))
}

/// A verified callback: the settings it was checked with and its POST parameters.
struct Callback {
    settings: Arc<Settings>,
    /// The public URL its signature was made for: where further callbacks of the same
    /// call go.
    base: String,
    /// The POST parameters.
    params: HashMap<String, String>,
    /// The query parameters of the callback URL (e.g. `room`).
    query: HashMap<String, String>,
}

impl Callback {
    fn param(&self, name: &str) -> &str {
        self.params.get(name).map_or("", String::as_str)
    }

    fn query(&self, name: &str) -> &str {
        self.query.get(name).map_or("", String::as_str)
    }

    fn base(&self) -> &str {
        &self.base
    }

    /// The defaults' language, voice and phrases.
    fn speaker(&self) -> Speaker {
        let d = &self.settings.config.defaults;
        Speaker {
            prompts: self.settings.config.prompts(&d.language),
            language: d.language.clone(),
            voice: d.voice.clone(),
        }
    }

    /// The language and voice of the incident whose room is `public_id` (its rule's),
    /// else the defaults'.
    async fn incident_speaker(&self, ctx: &HttpContext, public_id: &str) -> Speaker {
        let found = logged(ctx.store.incident_voice(public_id).await).flatten();
        match found {
            Some((language, voice)) => Speaker {
                prompts: self.settings.config.prompts(&language),
                language,
                voice,
            },
            None => self.speaker(),
        }
    }

    /// Says `text`, then hangs up.
    fn say_and_hang_up(&self, speaker: &Speaker, text: &str) -> Response {
        xml(twiml::say_and_hang_up(
            text,
            &speaker.language,
            &speaker.voice,
        ))
    }

    /// Into the incident's bridge, with joins and leaves reported back.
    fn join(&self, speaker: &Speaker, greeting: &str, public_id: &str) -> Response {
        let callback = format!("{}/twilio/conference?room={public_id}", self.base());
        xml(twiml::join(
            greeting,
            &speaker.language,
            &speaker.voice,
            &twiml::room_name(public_id),
            &callback,
        ))
    }
}

/// Who speaks an answer: language, voice and the fixed phrases in that language.
struct Speaker {
    language: String,
    voice: String,
    prompts: Prompts,
}

/// A callback is only extracted once its signature over the public URL of this request
/// and its form body checks out; otherwise the handler never runs.
impl FromRequest<Arc<HttpContext>> for Callback {
    type Rejection = HttpError;

    async fn from_request(
        request: Request,
        ctx: &Arc<HttpContext>,
    ) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let settings = ctx.live.load_full();
        let Some(token) = settings.secrets.twilio_auth_token.clone() else {
            return Err(HttpError::new(StatusCode::NOT_FOUND, "not found"));
        };
        let uri = parts.uri.clone();
        let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        let query: HashMap<String, String> =
            serde_urlencoded::from_str(uri.query().unwrap_or_default()).unwrap_or_default();
        let live_base = settings.config.twilio.public_url.clone();
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0);
        // The signature covers the body, so a request that has one is read first; a
        // request without one is refused before a byte of its body is read.
        let given = parts
            .headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let shown_url = format!(
            "{}{path_and_query}",
            live_base.as_deref().unwrap_or_default()
        );
        let Some(given) = given else {
            ctx.metrics.reject("twilio", "signature");
            warn!(url = %shown_url, peer = ?peer, "Twilio callback without X-Twilio-Signature; refused with 403");
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "signature check failed",
            ));
        };
        // Over the limit by its `Content-Length`: 413 before a byte is read.
        let limit = settings
            .config
            .http
            .as_ref()
            .map_or(1024 * 1024, |h| h.max_body_bytes);
        let (body, _) = super::http::read_body(body, &parts.headers, limit, None)
            .await
            .map_err(|e| {
                e.answer(
                    "Twilio callback",
                    peer.map(|p| p.to_string()).as_deref(),
                    limit,
                )
            })?;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
        let signed_for = |base: &str| {
            signature::verify(&token, &format!("{base}{path_and_query}"), &pairs, &given)
        };
        // Signed for today's public URL, or for the one the incident's calls were made
        // with: a reload that changes or removes `public_url` leaves the calls already
        // ringing able to press 1, report their progress and join.
        let base = match live_base.filter(|b| signed_for(b)) {
            Some(base) => Some(base),
            None => {
                let room = query.get("room").cloned();
                let attempt = query.get("attempt").and_then(|a| a.parse().ok());
                logged(ctx.store.callback_base(room, attempt).await)
                    .flatten()
                    .filter(|b| signed_for(b))
            }
        };
        let Some(base) = base else {
            if settings.config.twilio.public_url.is_none() {
                // No public URL, and no incident of this request has one.
                return Err(HttpError::new(StatusCode::NOT_FOUND, "not found"));
            }
            ctx.metrics.reject("twilio", "signature");
            warn!(url = %shown_url, peer = ?peer, "Twilio callback with a wrong X-Twilio-Signature; refused with 403");
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "signature check failed",
            ));
        };
        Ok(Callback {
            settings,
            base,
            params: pairs.into_iter().collect(),
            query,
        })
    }
}

fn xml(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// Logs a store failure; the caller still answers Twilio (a live call is waiting).
fn logged<T>(result: Result<T, crate::store::StoreError>) -> Option<T> {
    result
        .inspect_err(|e| warn!(error = %e, "cannot record a Twilio callback"))
        .ok()
}

/// The press-1 prompt's answer: 1 joins the bridge, 9 declines for this incident.
async fn gather(State(ctx): State<Arc<HttpContext>>, cb: Callback) -> Response {
    let room = cb.query("room").to_string();
    let speaker = cb.incident_speaker(&ctx, &room).await;
    let call = logged(ctx.store.call_by_sid(cb.param("CallSid")).await).flatten();
    match cb.param("Digits") {
        "1" => {
            if let Some((call_id, incident, number)) = &call {
                info!(incident, number = %number, "pressed 1: joining the bridge");
                logged(ctx.store.call_event(*call_id, "pressed 1".into()).await);
                // A person chose to join: no further rounds.
                if logged(ctx.store.mark_bridged(*incident).await).unwrap_or(false) {
                    info!(incident, "someone is in the bridge: no further rounds");
                }
            }
            cb.join(&speaker, &speaker.prompts.joining, &room)
        }
        "9" => {
            if let Some((call_id, incident, number)) = &call {
                info!(incident, number = %number, "pressed 9: declined; not called again for this incident");
                logged(ctx.store.decline(*call_id).await);
            }
            cb.say_and_hang_up(&speaker, &speaker.prompts.declined)
        }
        _ => {
            let p = &speaker.prompts;
            cb.say_and_hang_up(&speaker, &Prompts::then(&p.nobody_joined, &p.goodbye))
        }
    }
}

/// Call progress (`StatusCallback`): the URL carries the id of the request that
/// created the call, so the first callback settles a request whose answer was lost
/// (a timeout, a crash) with the call's SID; every callback records the call's status.
async fn status(State(ctx): State<Arc<HttpContext>>, cb: Callback) -> Response {
    let attempt = cb.query("attempt").parse::<i64>().ok();
    let sid = cb.param("CallSid").to_string();
    let status = cb.param("CallStatus").to_string();
    let known = status.parse::<TwilioStatus>().ok();
    let recorded = ctx
        .store
        .status_callback(attempt, sid.clone(), known, format!("status:{status}"))
        .await;
    match logged(recorded) {
        Some((Some((_, incident, number)), settled)) => {
            if let Some(settled) = settled {
                info!(incident, number = %number, attempt, sid = %sid,
                    "status callback: the request did reach Twilio; not calling again");
                // Its answer was lost (or it was given up), so the placer is not
                // waiting for it: count it here. (Its SMS is owed in the store; the
                // placer sends it.)
                if settled.was != AttemptState::Requesting {
                    crate::dispatch::count_placed(&ctx.metrics, &settled.call);
                }
            }
            info!(incident, number = %number, status = %status, "call progress");
        }
        Some((None, _)) => {
            warn!(attempt, sid = %sid, "status callback for a call mailcall does not know")
        }
        None => {}
    }
    xml("<Response/>".into())
}

/// Conference joins and leaves: a join means a person is in the bridge (they pressed 1
/// or dialled in), so the incident is reached and everyone hears who joined.
async fn conference(State(ctx): State<Arc<HttpContext>>, cb: Callback) -> Response {
    let room = cb.query("room").to_string();
    let Some((incident, _)) = logged(ctx.store.incident_by_public_id(&room).await).flatten() else {
        return xml("<Response/>".into());
    };
    let call = logged(ctx.store.call_by_sid(cb.param("CallSid")).await).flatten();
    let number = call
        .as_ref()
        .map_or_else(|| cb.param("From").to_string(), |(_, _, n)| n.clone());
    let speaker = cb.incident_speaker(&ctx, &room).await;
    let who = cb
        .settings
        .config
        .contacts
        .iter()
        .find(|(_, n)| **n == number)
        .map_or_else(
            || speaker.prompts.responder.clone(),
            |(name, _)| name.clone(),
        );
    match cb.param("StatusCallbackEvent") {
        "participant-join" => {
            if logged(ctx.store.mark_bridged(incident).await).unwrap_or(false) {
                info!(incident, "someone joined the bridge: no further rounds");
            }
            info!(incident, who = %who, "joined the bridge");
            if let Some((call_id, _, _)) = call {
                logged(
                    ctx.store
                        .call_event(call_id, "joined the bridge".into())
                        .await,
                );
            }
            if let Some(client) = ctx.twilio.clone() {
                let conference_sid = cb.param("ConferenceSid").to_string();
                let text = speaker.prompts.joined(&who);
                let url = format!(
                    "{}/twilio/announce?{}",
                    cb.base(),
                    serde_urlencoded::to_string([("text", &text), ("room", &room)])
                        .unwrap_or_default()
                );
                tokio::spawn(async move {
                    if let Err(e) = client.announce(&conference_sid, &url).await {
                        warn!(incident, error = %e, "cannot announce who joined");
                    }
                });
            }
        }
        "participant-leave" => {
            info!(incident, who = %who, "left the bridge");
            if let Some((call_id, _, _)) = call {
                logged(
                    ctx.store
                        .call_event(call_id, "left the bridge".into())
                        .await,
                );
            }
        }
        _ => {}
    }
    xml("<Response/>".into())
}

/// The TwiML Twilio plays into the conference for an announcement: in the incident's
/// language when the URL names its `room`, else the defaults'.
async fn announce(State(ctx): State<Arc<HttpContext>>, cb: Callback) -> Response {
    let speaker = match cb.query("room") {
        "" => cb.speaker(),
        room => cb.incident_speaker(&ctx, room).await,
    };
    xml(twiml::say(
        cb.query("text"),
        &speaker.language,
        &speaker.voice,
    ))
}

/// Dial-in: a call to the `from` number. Contacts join the newest open incident's
/// bridge; anyone else needs the `[bridge] pin`, or is turned away.
async fn voice(State(ctx): State<Arc<HttpContext>>, cb: Callback) -> Response {
    let from = cb.param("From").to_string();
    if cb.settings.config.contacts.values().any(|n| *n == from) {
        info!(from = %from, "dial-in from a contact");
        return join_newest(&ctx, &cb).await;
    }
    match &cb.settings.config.bridge_pin {
        Some(pin) => {
            info!(from = %from, "dial-in from an unknown number: asking for the PIN");
            let s = cb.speaker();
            xml(twiml::gather_pin(
                &s.prompts,
                pin.len(),
                &format!("{}/twilio/pin", cb.base()),
                &s.language,
                &s.voice,
            ))
        }
        None => {
            warn!(from = %from, "dial-in from an unknown number: refused");
            let s = cb.speaker();
            cb.say_and_hang_up(&s, &s.prompts.not_taken)
        }
    }
}

/// The PIN an unknown dial-in caller entered.
async fn pin(State(ctx): State<Arc<HttpContext>>, cb: Callback) -> Response {
    let expected = cb.settings.config.bridge_pin.clone().unwrap_or_default();
    let right = !expected.is_empty()
        && bool::from(cb.param("Digits").as_bytes().ct_eq(expected.as_bytes()));
    if right {
        info!(from = %cb.param("From"), "dial-in with the right PIN");
        return join_newest(&ctx, &cb).await;
    }
    warn!(from = %cb.param("From"), "dial-in with a wrong PIN: refused");
    let s = cb.speaker();
    cb.say_and_hang_up(&s, &Prompts::then(&s.prompts.wrong_pin, &s.prompts.goodbye))
}

async fn join_newest(ctx: &HttpContext, cb: &Callback) -> Response {
    match logged(ctx.store.newest_open_incident().await).flatten() {
        Some((id, public_id)) => {
            let s = cb.incident_speaker(ctx, &public_id).await;
            cb.join(&s, &s.prompts.dial_in(id), &public_id)
        }
        None => {
            let s = cb.speaker();
            cb.say_and_hang_up(
                &s,
                &Prompts::then(&s.prompts.no_incident, &s.prompts.goodbye),
            )
        }
    }
}
