//! A fake Twilio REST API on 127.0.0.1 that checks what real Twilio checks: HTTP Basic
//! auth, form encoding, E.164 `To`/`From`, and a well-formed `Twiml` of at most 4,000
//! characters. Tests script failures per number and read back every request.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;

pub const ACCOUNT_SID: &str = "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub const AUTH_TOKEN: &str = "test-auth-token-123";

/// One accepted (or rejected) `Calls.json` request.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub to: String,
    pub from: String,
    pub twiml: String,
    pub timeout: String,
    pub at: Instant,
    /// The HTTP status the fake answered.
    pub status: u16,
    pub sid: Option<String>,
    pub created: std::time::SystemTime,
}

impl CallRecord {
    /// The conference room the TwiML dials into.
    pub fn room(&self) -> String {
        let start = self
            .twiml
            .find("<Conference")
            .expect("no <Conference> in TwiML");
        let open = start + self.twiml[start..].find('>').unwrap() + 1;
        let close = open + self.twiml[open..].find("</Conference>").unwrap();
        self.twiml[open..close].to_string()
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    Created,
    Error {
        status: u16,
        code: i64,
        message: String,
        retry_after: Option<u64>,
    },
}

impl Reply {
    pub fn error(status: u16, code: i64, message: &str) -> Reply {
        Reply::Error {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// One accepted `Messages.json` request.
#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub to: String,
    pub from: String,
    pub body: String,
}

/// How a scripted number answers its calls.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Twilio's `answered_by`: `human`, `machine_start`, …
    pub answered_by: &'static str,
    /// Whether the call ends up in the conference room its TwiML dials.
    pub joins: bool,
}

/// A call the fake keeps state for.
#[derive(Debug, Clone)]
struct LiveCall {
    answered_by: Option<&'static str>,
    room: String,
    in_room: bool,
}

/// A `POST Calls/{sid}.json` the fake received.
#[derive(Debug, Clone)]
pub struct CallUpdate {
    pub sid: String,
    pub twiml: String,
}

#[derive(Default)]
struct Inner {
    calls: Vec<CallRecord>,
    messages: Vec<MessageRecord>,
    answers: HashMap<String, Answer>,
    live: HashMap<String, LiveCall>,
    updates: Vec<CallUpdate>,
    announcements: Vec<(String, String)>,
    /// Answers to give, per `To` number, before answering 201.
    script: HashMap<String, VecDeque<Reply>>,
    /// Answers for every number, while non-empty (Twilio being down).
    global: VecDeque<Reply>,
    /// A delay before answering, to observe concurrency.
    delay: Duration,
    next_sid: u64,
}

pub struct FakeTwilio {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeTwilio {
    pub fn start() -> FakeTwilio {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Calls.json",
                post(create_call).get(list_calls),
            )
            .route(
                "/2010-04-01/Accounts/{account}/Messages.json",
                post(create_message),
            )
            .route(
                "/2010-04-01/Accounts/{account}/Calls/{sid}",
                axum::routing::get(get_call).post(update_call),
            )
            .route(
                "/2010-04-01/Accounts/{account}/Conferences.json",
                axum::routing::get(list_conferences),
            )
            .route(
                "/2010-04-01/Accounts/{account}/Conferences/{sid}",
                post(update_conference),
            )
            .route(
                "/2010-04-01/Accounts/{account}/Conferences/{sid}/Participants.json",
                axum::routing::get(list_participants),
            )
            .with_state(Arc::clone(&inner));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeTwilio {
            addr,
            inner,
            _runtime: runtime,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers for `to`, in order, before the fake starts answering 201.
    pub fn script(&self, to: &str, replies: Vec<Reply>) {
        self.inner
            .lock()
            .unwrap()
            .script
            .insert(to.into(), replies.into());
    }

    /// Answers for any number, in order (e.g. an outage), before the per-number script.
    pub fn script_all(&self, replies: Vec<Reply>) {
        self.inner.lock().unwrap().global = replies.into();
    }

    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().unwrap().delay = delay;
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// How calls to `to` are answered from now on (default: nobody answers).
    pub fn answer(&self, to: &str, answer: Answer) {
        self.inner.lock().unwrap().answers.insert(to.into(), answer);
    }

    /// Every `POST Calls/{sid}.json` (live call updates).
    pub fn updates(&self) -> Vec<CallUpdate> {
        self.inner.lock().unwrap().updates.clone()
    }

    /// Every conference announcement: `(conference sid, AnnounceUrl)`.
    pub fn announcements(&self) -> Vec<(String, String)> {
        self.inner.lock().unwrap().announcements.clone()
    }

    /// Every SMS accepted.
    pub fn messages(&self) -> Vec<MessageRecord> {
        self.inner.lock().unwrap().messages.clone()
    }

    /// Requests answered 201.
    pub fn created(&self) -> Vec<CallRecord> {
        self.calls()
            .into_iter()
            .filter(|c| c.status == 201)
            .collect()
    }

    /// Waits (bounded) until `pred` holds for the recorded requests.
    pub fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[CallRecord]) -> bool,
    ) -> Vec<CallRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let calls = self.calls();
            if pred(&calls) {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "fake Twilio: condition not met within {timeout:?}; requests so far: {calls:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is_e164(s: &str) -> bool {
    s.strip_prefix('+').is_some_and(|d| {
        (2..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    })
}

fn twilio_error(status: u16, code: i64, message: &str, retry_after: Option<u64>) -> Response {
    let body = serde_json::json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    });
    let mut response = (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
    }
    response
}

/// HTTP Basic auth with the account's SID and token, and the account in the path.
#[allow(clippy::result_large_err)] // a test fake: clarity over a boxed error
fn authenticate(account: &str, headers: &HeaderMap) -> Result<(), Response> {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"))
    );
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        return Err(twilio_error(401, 20003, "Authenticate", None));
    }
    if account != ACCOUNT_SID {
        return Err(twilio_error(
            404,
            20404,
            "The requested resource was not found",
            None,
        ));
    }
    Ok(())
}

/// Checks the request the way Twilio does; `Err` is the error answer.
#[allow(clippy::result_large_err)] // a test fake: clarity over a boxed error
fn validate(
    account: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<HashMap<String, String>, Response> {
    authenticate(account, headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return Err(twilio_error(
            400,
            20001,
            "expected a form-encoded body",
            None,
        ));
    }
    let form: HashMap<String, String> = serde_urlencoded_pairs(body);
    let to = form.get("To").map(String::as_str).unwrap_or("");
    let from = form.get("From").map(String::as_str).unwrap_or("");
    if !is_e164(to) {
        return Err(twilio_error(
            400,
            21211,
            &format!("Invalid 'To' Phone Number: {to}"),
            None,
        ));
    }
    if !is_e164(from) {
        return Err(twilio_error(
            400,
            21212,
            &format!("Invalid 'From' Phone Number: {from}"),
            None,
        ));
    }
    let twiml = form.get("Twiml").map(String::as_str).unwrap_or("");
    if twiml.chars().count() > 4000 {
        return Err(twilio_error(
            400,
            21232,
            "Twiml is longer than 4000 characters",
            None,
        ));
    }
    if let Err(e) = well_formed(twiml) {
        return Err(twilio_error(
            400,
            12100,
            &format!("Document parse failure: {e}"),
            None,
        ));
    }
    if form
        .get("Timeout")
        .is_some_and(|t| t.parse::<u32>().map_or(true, |t| t > 600))
    {
        return Err(twilio_error(
            400,
            21216,
            "Timeout must be an integer up to 600",
            None,
        ));
    }
    Ok(form)
}

/// Parses `application/x-www-form-urlencoded` (the fake must not trust the client's
/// encoding, so it decodes it independently).
fn serde_urlencoded_pairs(body: &[u8]) -> HashMap<String, String> {
    let decode = |s: &str| -> String {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).expect("bad percent escape"));
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).expect("form value is not UTF-8")
    };
    std::str::from_utf8(body)
        .expect("form body is not ASCII")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Checks that `xml` is one well-formed `<Response>` document.
pub fn well_formed(xml: &str) -> Result<(), String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut depth = 0i32;
    let mut root = None;
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            quick_xml::events::Event::Start(e) => {
                if depth == 0 {
                    root = Some(String::from_utf8_lossy(e.name().as_ref()).to_string());
                }
                depth += 1;
            }
            quick_xml::events::Event::End(_) => depth -= 1,
            quick_xml::events::Event::Text(t) => {
                t.decode().map_err(|e| e.to_string())?;
            }
            quick_xml::events::Event::Eof => break,
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced elements".into());
    }
    if root.as_deref() != Some("Response") {
        return Err(format!("root element is {root:?}, not Response"));
    }
    Ok(())
}

async fn create_call(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let delay = inner.lock().unwrap().delay;
    // Like Twilio, the call exists as soon as the request is read, even if the client
    // goes away before the (delayed) answer.
    let response = record_call(&inner, &account, &headers, &body, at);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

fn record_call(
    inner: &Mutex<Inner>,
    account: &str,
    headers: &HeaderMap,
    body: &[u8],
    at: Instant,
) -> Response {
    let form = match validate(account, headers, body) {
        Ok(f) => f,
        Err(response) => {
            let form = serde_urlencoded_pairs(body);
            inner.lock().unwrap().calls.push(CallRecord {
                to: form.get("To").cloned().unwrap_or_default(),
                from: form.get("From").cloned().unwrap_or_default(),
                twiml: form.get("Twiml").cloned().unwrap_or_default(),
                timeout: form.get("Timeout").cloned().unwrap_or_default(),
                at,
                status: response.status().as_u16(),
                sid: None,
                created: std::time::SystemTime::now(),
            });
            return response;
        }
    };
    let mut inner = inner.lock().unwrap();
    let to = form["To"].clone();
    let answer = inner.answers.get(&to).cloned();
    let reply = inner
        .global
        .pop_front()
        .or_else(|| inner.script.get_mut(&to).and_then(VecDeque::pop_front))
        .unwrap_or(Reply::Created);
    let (status, sid, response) = match reply {
        Reply::Created => {
            inner.next_sid += 1;
            let sid = format!("CA{:032x}", inner.next_sid);
            let twiml = form.get("Twiml").cloned().unwrap_or_default();
            // Press-1 calls reach the room named in their <Gather action>: a scripted
            // `joins` stands for pressing 1.
            let room = if twiml.contains("<Conference") {
                CallRecord {
                    to: String::new(),
                    from: String::new(),
                    twiml,
                    timeout: String::new(),
                    at,
                    status: 0,
                    sid: None,
                    created: std::time::SystemTime::now(),
                }
                .room()
            } else {
                twiml
                    .split("room=")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(|id| format!("mailcall-{id}"))
                    .unwrap_or_default()
            };
            inner.live.insert(
                sid.clone(),
                LiveCall {
                    answered_by: answer.as_ref().map(|a| a.answered_by),
                    in_room: answer.as_ref().is_some_and(|a| a.joins),
                    room,
                },
            );
            let body = serde_json::json!({
                "sid": sid, "account_sid": ACCOUNT_SID, "to": to, "from": form["From"],
                "status": "queued", "answered_by": null,
            });
            (
                201,
                Some(sid),
                (StatusCode::CREATED, axum::Json(body)).into_response(),
            )
        }
        Reply::Error {
            status,
            code,
            message,
            retry_after,
        } => (
            status,
            None,
            twilio_error(status, code, &message, retry_after),
        ),
    };
    inner.calls.push(CallRecord {
        to,
        from: form["From"].clone(),
        twiml: form.get("Twiml").cloned().unwrap_or_default(),
        timeout: form.get("Timeout").cloned().unwrap_or_default(),
        at,
        status,
        sid,
        created: std::time::SystemTime::now(),
    });
    response
}

/// `POST Messages.json`: an SMS, checked like a call (auth, form, E.164, length).
async fn create_message(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let form = serde_urlencoded_pairs(&body);
    let (to, from) = (
        form.get("To").cloned().unwrap_or_default(),
        form.get("From").cloned().unwrap_or_default(),
    );
    if !is_e164(&to) || !is_e164(&from) {
        return twilio_error(400, 21211, "Invalid 'To' or 'From' Phone Number", None);
    }
    let text = form.get("Body").cloned().unwrap_or_default();
    if text.is_empty() || text.chars().count() > 1600 {
        return twilio_error(
            400,
            21617,
            "The concatenated message body exceeds the 1600 character limit",
            None,
        );
    }
    let mut inner = inner.lock().unwrap();
    inner.next_sid += 1;
    let sid = format!("SM{:032x}", inner.next_sid);
    inner.messages.push(MessageRecord {
        to,
        from,
        body: text,
    });
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({"sid": sid, "status": "queued"})),
    )
        .into_response()
}

/// `GET Calls/{sid}.json`: status and who answered.
async fn get_call(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path((account, sid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let sid = sid.trim_end_matches(".json");
    let inner = inner.lock().unwrap();
    match inner.live.get(sid) {
        Some(call) => axum::Json(serde_json::json!({
            "sid": sid,
            "status": if call.answered_by.is_some() { "in-progress" } else { "ringing" },
            "answered_by": call.answered_by,
        }))
        .into_response(),
        None => twilio_error(404, 20404, "The requested resource was not found", None),
    }
}

/// `POST Calls/{sid}.json` with `Twiml`: redirects the call; one that no longer dials
/// the conference leaves it.
async fn update_call(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path((account, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let sid = sid.trim_end_matches(".json").to_string();
    let twiml = serde_urlencoded_pairs(&body)
        .get("Twiml")
        .cloned()
        .unwrap_or_default();
    if let Err(e) = well_formed(&twiml) {
        return twilio_error(400, 12100, &format!("Document parse failure: {e}"), None);
    }
    let mut inner = inner.lock().unwrap();
    let Some(call) = inner.live.get_mut(&sid) else {
        return twilio_error(404, 20404, "The requested resource was not found", None);
    };
    call.in_room = call.in_room && twiml.contains("<Conference");
    inner.updates.push(CallUpdate {
        sid: sid.clone(),
        twiml,
    });
    axum::Json(serde_json::json!({"sid": sid, "status": "in-progress"})).into_response()
}

/// `GET Conferences.json?FriendlyName=&Status=in-progress`: a room is in progress
/// while someone is in it.
async fn list_conferences(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(account): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let inner = inner.lock().unwrap();
    let name = query.get("FriendlyName").cloned().unwrap_or_default();
    let live = inner.live.values().any(|c| c.in_room && c.room == name);
    let conferences: Vec<serde_json::Value> = if live
        && query.get("Status").is_none_or(|s| s == "in-progress")
    {
        vec![
            serde_json::json!({"sid": format!("CF{name}"), "friendly_name": name, "status": "in-progress"}),
        ]
    } else {
        vec![]
    };
    axum::Json(serde_json::json!({"conferences": conferences})).into_response()
}

/// `POST Conferences/{sid}.json` with `AnnounceUrl`.
async fn update_conference(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path((account, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let form = serde_urlencoded_pairs(&body);
    let Some(url) = form
        .get("AnnounceUrl")
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
    else {
        return twilio_error(400, 21205, "AnnounceUrl must be an absolute URL", None);
    };
    let sid = sid.trim_end_matches(".json").to_string();
    inner
        .lock()
        .unwrap()
        .announcements
        .push((sid.clone(), url.clone()));
    axum::Json(serde_json::json!({"sid": sid, "status": "in-progress"})).into_response()
}

/// `GET Conferences/{sid}/Participants.json`.
async fn list_participants(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path((account, conference)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let room = conference.trim_start_matches("CF");
    let inner = inner.lock().unwrap();
    let participants: Vec<serde_json::Value> = inner
        .live
        .iter()
        .filter(|(_, c)| c.in_room && c.room == room)
        .map(|(sid, _)| serde_json::json!({"call_sid": sid, "conference_sid": conference}))
        .collect();
    axum::Json(serde_json::json!({"participants": participants})).into_response()
}

/// `GET Calls.json?To=&From=`: the calls created, newest first, as Twilio lists them.
async fn list_calls(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(account): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let inner = inner.lock().unwrap();
    let calls: Vec<serde_json::Value> = inner
        .calls
        .iter()
        .rev()
        .filter(|c| c.status == 201)
        .filter(|c| query.get("To").is_none_or(|to| *to == c.to))
        .filter(|c| query.get("From").is_none_or(|from| *from == c.from))
        .map(|c| {
            let date = httpdate::fmt_http_date(c.created).replace("GMT", "+0000");
            serde_json::json!({"sid": c.sid, "to": c.to, "from": c.from, "date_created": date, "status": "queued"})
        })
        .collect();
    axum::Json(serde_json::json!({"calls": calls, "page": 0, "page_size": 20})).into_response()
}

#[test]
fn the_fake_itself_rejects_what_twilio_rejects() {
    assert!(well_formed("<Response><Say>a &amp; b</Say></Response>").is_ok());
    assert!(well_formed("<Response><Say>a & b</Say></Response>").is_err());
    assert!(well_formed("<Response><Say>x</Response>").is_err());
    assert!(!is_e164("15005550001"));
    let pairs =
        serde_urlencoded_pairs(b"To=%2B15005550001&Twiml=%3CResponse%3E+x%3C%2FResponse%3E");
    assert_eq!(pairs["To"], "+15005550001");
    assert_eq!(pairs["Twiml"], "<Response> x</Response>");
}
