//! A fake Twilio REST API on 127.0.0.1 that checks what real Twilio checks: HTTP Basic
//! auth, form encoding, E.164 `To`/`From`, and a well-formed `Twiml` of at most 4,000
//! characters. Calls have a lifecycle (ringing, then answered or `no-answer`), and the
//! fake can have Twilio's bad days: answer late, drop the connection after creating the
//! call, answer 429/503, hang or lag in its call list, report AMD `unknown`, and let
//! participants come and go. Tests script failures per number and read back every
//! request.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use rand::Rng;
use tokio::sync::Notify;

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
    /// The HTTP status the fake answered (201 also when it then dropped the connection).
    pub status: u16,
    pub sid: Option<String>,
    pub created: SystemTime,
    /// Every form parameter, e.g. `StatusCallback`, `MachineDetection`.
    pub form: HashMap<String, String>,
    /// The connection was closed without an answer after the call was created.
    pub dropped: bool,
}

impl CallRecord {
    /// The conference room the TwiML dials into, or (press-1 calls) the one its
    /// `<Gather action>` names.
    pub fn room(&self) -> String {
        room_of(&self.twiml)
    }
}

fn room_of(twiml: &str) -> String {
    if let Some(start) = twiml.find("<Conference") {
        let open = start + twiml[start..].find('>').unwrap() + 1;
        let close = open + twiml[open..].find("</Conference>").unwrap();
        return twiml[open..close].to_string();
    }
    twiml
        .split("room=")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(|id| format!("mailcall-{id}"))
        .unwrap_or_default()
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    Created,
    /// Create the call, then close the connection without answering.
    CreatedThenDrop,
    /// Create the call, then answer only after this long (longer than the client's
    /// timeout: Twilio accepting late).
    CreatedLate(Duration),
    /// Read the request, and create the call (then answer 201) only this long after:
    /// Twilio processing a request late, so the call's `date_created` is late too.
    CreatedAfter(Duration),
    /// Read the request, create nothing, and close the connection without answering
    /// (a request lost inside Twilio's edge).
    LostThenDrop,
    /// Create the call, then answer this 5xx status (a gateway that gave up waiting
    /// for the backend that created it, e.g. 504).
    CreatedThenError(u16),
    Error {
        status: u16,
        code: i64,
        message: String,
        retry_after: Option<u64>,
    },
}

impl Reply {
    /// `503` with `Retry-After`: Twilio overloaded (nothing was created).
    pub fn unavailable(retry_after: u64) -> Reply {
        Reply::Error {
            status: 503,
            code: 20503,
            message: "Service Unavailable".into(),
            retry_after: Some(retry_after),
        }
    }

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
    /// Twilio's `answered_by`: `human`, `machine_start`, `unknown`, …
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
    created: Instant,
    /// Set once the call is over: `completed`, `no-answer`.
    ended: Option<&'static str>,
}

impl LiveCall {
    /// The call's status as Twilio reports it.
    fn status(&self, ring_time: Duration) -> &'static str {
        match (self.ended, self.answered_by) {
            (Some(end), _) => end,
            (None, Some(_)) => "in-progress",
            (None, None) if self.created.elapsed() < ring_time => "ringing",
            (None, None) => "no-answer",
        }
    }
}

/// A `POST Calls/{sid}.json` the fake received.
#[derive(Debug, Clone)]
pub struct CallUpdate {
    pub sid: String,
    pub twiml: String,
}

/// Where the fake delivers status callbacks: a daemon's HTTP listener, reached for
/// URLs under its public URL.
#[derive(Debug, Clone)]
struct Callbacks {
    public_url: String,
    local: SocketAddr,
}

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
    /// Each `Calls.json` answer comes after a random delay in this range (the call
    /// exists from the moment the request was read).
    latency: (Duration, Duration),
    /// The share of created calls whose connection is dropped without an answer.
    drop_rate: f64,
    /// The call list shows a call only this long after it was created.
    list_lag: Duration,
    /// The call list never answers.
    list_hangs: bool,
    /// The call list answers this late (what it shows is read when it answers).
    list_delay: Duration,
    list_requests: usize,
    /// How long an unanswered call rings before it ends `no-answer`.
    ring_time: Duration,
    /// Reads of conferences and their participants answer this late.
    conference_delay: Duration,
    callbacks: Option<Callbacks>,
    /// Status callbacks are delivered this long after the call was created.
    callback_delay: Duration,
    next_sid: u64,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            calls: Vec::new(),
            messages: Vec::new(),
            answers: HashMap::new(),
            live: HashMap::new(),
            updates: Vec::new(),
            announcements: Vec::new(),
            script: HashMap::new(),
            global: VecDeque::new(),
            latency: (Duration::ZERO, Duration::ZERO),
            drop_rate: 0.0,
            list_lag: Duration::ZERO,
            list_hangs: false,
            list_delay: Duration::ZERO,
            list_requests: 0,
            ring_time: Duration::from_millis(400),
            conference_delay: Duration::ZERO,
            callbacks: None,
            callback_delay: Duration::ZERO,
            next_sid: 0,
        }
    }
}

type Shared = Arc<Mutex<Inner>>;

/// Lets a handler close its connection without answering.
#[derive(Clone)]
struct Kill(Arc<Notify>);

pub struct FakeTwilio {
    pub addr: SocketAddr,
    inner: Shared,
    _runtime: tokio::runtime::Runtime,
}

impl FakeTwilio {
    pub fn start() -> FakeTwilio {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let inner: Shared = Arc::new(Mutex::new(Inner::default()));
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
        runtime.spawn(serve(listener, app));
        FakeTwilio {
            addr,
            inner,
            _runtime: runtime,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers for `to`, in order, before the fake starts answering 201.
    pub fn script(&self, to: &str, replies: Vec<Reply>) {
        self.lock().script.insert(to.into(), replies.into());
    }

    /// Answers for any number, in order (e.g. an outage), before the per-number script.
    pub fn script_all(&self, replies: Vec<Reply>) {
        self.lock().global = replies.into();
    }

    /// Every `Calls.json` answer comes `delay` late.
    pub fn set_delay(&self, delay: Duration) {
        self.set_latency(delay, delay);
    }

    /// Every `Calls.json` answer comes after a random delay between `min` and `max`.
    pub fn set_latency(&self, min: Duration, max: Duration) {
        self.lock().latency = (min, max);
    }

    /// This share of created calls get their connection dropped instead of an answer.
    pub fn set_drop_rate(&self, rate: f64) {
        self.lock().drop_rate = rate;
    }

    /// The call list shows calls only `lag` after they were created.
    pub fn set_list_lag(&self, lag: Duration) {
        self.lock().list_lag = lag;
    }

    /// The call list hangs (never answers) while `hangs`.
    pub fn set_list_hangs(&self, hangs: bool) {
        self.lock().list_hangs = hangs;
    }

    /// Unanswered calls ring this long before they end `no-answer` (default 400 ms).
    pub fn set_ring_time(&self, ring: Duration) {
        self.lock().ring_time = ring;
    }

    /// Reads of conferences and their participants answer this late.
    pub fn set_conference_delay(&self, delay: Duration) {
        self.lock().conference_delay = delay;
    }

    /// The call list answers `delay` late, showing the calls Twilio has by then (a slow
    /// list endpoint).
    pub fn set_list_delay(&self, delay: Duration) {
        self.lock().list_delay = delay;
    }

    /// How many times the call list was asked for.
    pub fn list_requests(&self) -> usize {
        self.lock().list_requests
    }

    /// Status callbacks are delivered (signed) to the daemon listening on `local`,
    /// whose public URL is `public_url`.
    pub fn deliver_callbacks(&self, public_url: &str, local: SocketAddr) {
        self.lock().callbacks = Some(Callbacks {
            public_url: public_url.into(),
            local,
        });
    }

    /// Status callbacks are delivered `delay` after their call was created (Twilio's
    /// callbacks lagging behind, e.g. after the client gave up on the request).
    pub fn set_callback_delay(&self, delay: Duration) {
        self.lock().callback_delay = delay;
    }

    /// A call Twilio already has (created `created`, e.g. by an earlier process whose
    /// request timed out); it shows in the call list like any other. Returns its SID.
    pub fn seed_call(&self, to: &str, from: &str, twiml: &str, created: SystemTime) -> String {
        let mut inner = self.lock();
        inner.next_sid += 1;
        let sid = format!("CA{:032x}", inner.next_sid);
        inner.live.insert(
            sid.clone(),
            LiveCall {
                answered_by: None,
                room: room_of(twiml),
                in_room: false,
                created: Instant::now(),
                ended: Some("completed"),
            },
        );
        inner.calls.push(CallRecord {
            to: to.into(),
            from: from.into(),
            twiml: twiml.into(),
            timeout: "25".into(),
            at: Instant::now(),
            status: 201,
            sid: Some(sid.clone()),
            created,
            form: HashMap::new(),
            dropped: false,
        });
        sid
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    /// How calls to `to` are answered from now on (default: nobody answers).
    pub fn answer(&self, to: &str, answer: Answer) {
        self.lock().answers.insert(to.into(), answer);
    }

    /// The person on call `sid` hangs up: the call is over and leaves its conference.
    pub fn hang_up(&self, sid: &str) {
        if let Some(call) = self.lock().live.get_mut(sid) {
            call.in_room = false;
            call.ended = Some("completed");
        }
    }

    /// Every `POST Calls/{sid}.json` (live call updates).
    pub fn updates(&self) -> Vec<CallUpdate> {
        self.lock().updates.clone()
    }

    /// Every conference announcement: `(conference sid, AnnounceUrl)`.
    pub fn announcements(&self) -> Vec<(String, String)> {
        self.lock().announcements.clone()
    }

    /// Every SMS accepted.
    pub fn messages(&self) -> Vec<MessageRecord> {
        self.lock().messages.clone()
    }

    /// How many SMS went to `number`.
    pub fn texts_to(&self, number: &str) -> usize {
        self.messages().iter().filter(|m| m.to == number).count()
    }

    /// Calls Twilio created (answered 201, or created and then dropped).
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

/// Serves `app` one hyper connection per socket, so that a handler can close its
/// connection without answering (Twilio dropping the connection after creating a call).
async fn serve(listener: tokio::net::TcpListener, app: Router) {
    use tower::ServiceExt;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let kill = Kill(Arc::new(Notify::new()));
            let handle = kill.clone();
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(handle.clone());
                    app.clone().oneshot(request.map(axum::body::Body::new))
                },
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                // Dropping the connection closes the socket with nothing written.
                () = kill.0.notified() => {}
            }
        });
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

/// `POST Calls.json`: like Twilio, the call exists as soon as the request is read, even
/// if the answer comes late or never.
async fn create_call(
    State(inner): State<Shared>,
    Path(account): Path<String>,
    axum::Extension(kill): axum::Extension<Kill>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    // Twilio processing the request late, or losing it: decided before anything is
    // created.
    let early = {
        let to = serde_urlencoded_pairs(&body)
            .get("To")
            .cloned()
            .unwrap_or_default();
        let mut inner = inner.lock().unwrap();
        let queue = inner.script.get_mut(&to);
        match queue.as_ref().and_then(|q| q.front()) {
            Some(Reply::CreatedAfter(_) | Reply::LostThenDrop | Reply::CreatedThenError(_)) => {
                queue.and_then(VecDeque::pop_front)
            }
            _ => None,
        }
    };
    let gateway_error = match early {
        Some(Reply::CreatedThenError(status)) => Some(status),
        _ => None,
    };
    let forced = match early {
        Some(Reply::CreatedThenError(_)) => Some(Reply::Created),
        Some(Reply::CreatedAfter(after)) => {
            // In a task of its own: the client hanging up (its timeout) must not stop
            // Twilio from creating the call.
            let inner = Arc::clone(&inner);
            let task = tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let (response, _, callback) =
                    record_call(&inner, &account, &headers, &body, at, Some(Reply::Created));
                if let Some(delivery) = callback {
                    let delay = inner.lock().unwrap().callback_delay;
                    tokio::time::sleep(delay).await;
                    deliver_callback(delivery).await;
                }
                response
            });
            return task.await.unwrap();
        }
        Some(Reply::LostThenDrop) => {
            let form = serde_urlencoded_pairs(&body);
            inner.lock().unwrap().calls.push(CallRecord {
                to: form.get("To").cloned().unwrap_or_default(),
                from: form.get("From").cloned().unwrap_or_default(),
                twiml: form.get("Twiml").cloned().unwrap_or_default(),
                timeout: form.get("Timeout").cloned().unwrap_or_default(),
                at,
                status: 0,
                sid: None,
                created: SystemTime::now(),
                form,
                dropped: true,
            });
            kill.0.notify_one();
            std::future::pending::<()>().await;
            unreachable!()
        }
        _ => None,
    };
    let (response, reply, callback) = record_call(&inner, &account, &headers, &body, at, forced);
    if let Some(delivery) = callback {
        let delay = inner.lock().unwrap().callback_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            deliver_callback(delivery).await;
        });
    }
    let delay = {
        let inner = inner.lock().unwrap();
        let (min, max) = inner.latency;
        if max > min {
            rand::rng().random_range(min..=max)
        } else {
            min
        }
    };
    match reply {
        _ if gateway_error.is_some() => {
            let status = gateway_error.unwrap_or(504);
            return twilio_error(status, 20504, "Gateway Timeout", None);
        }
        Some(Reply::CreatedThenDrop) => {
            tokio::time::sleep(delay).await;
            kill.0.notify_one();
            std::future::pending::<()>().await;
            unreachable!()
        }
        Some(Reply::CreatedLate(late)) => tokio::time::sleep(late).await,
        _ => tokio::time::sleep(delay).await,
    }
    response
}

/// A status callback to deliver to the daemon.
struct Delivery {
    /// The daemon-local URL.
    url: String,
    params: Vec<(String, String)>,
    /// `X-Twilio-Signature` over the public URL.
    signature: String,
}

fn record_call(
    inner: &Mutex<Inner>,
    account: &str,
    headers: &HeaderMap,
    body: &[u8],
    at: Instant,
    forced: Option<Reply>,
) -> (Response, Option<Reply>, Option<Delivery>) {
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
                created: SystemTime::now(),
                form,
                dropped: false,
            });
            return (response, None, None);
        }
    };
    let mut inner = inner.lock().unwrap();
    let to = form["To"].clone();
    let answer = inner.answers.get(&to).cloned();
    let mut reply = forced
        .or_else(|| inner.global.pop_front())
        .or_else(|| inner.script.get_mut(&to).and_then(VecDeque::pop_front))
        .unwrap_or(Reply::Created);
    if matches!(reply, Reply::Created)
        && inner.drop_rate > 0.0
        && rand::rng().random_bool(inner.drop_rate.min(1.0))
    {
        reply = Reply::CreatedThenDrop;
    }
    let twiml = form.get("Twiml").cloned().unwrap_or_default();
    let (status, sid, response, callback) = match &reply {
        Reply::Created
        | Reply::CreatedThenDrop
        | Reply::CreatedLate(_)
        | Reply::CreatedAfter(_)
        | Reply::LostThenDrop
        | Reply::CreatedThenError(_) => {
            inner.next_sid += 1;
            let sid = format!("CA{:032x}", inner.next_sid);
            inner.live.insert(
                sid.clone(),
                LiveCall {
                    answered_by: answer.as_ref().map(|a| a.answered_by),
                    in_room: answer.as_ref().is_some_and(|a| a.joins),
                    room: room_of(&twiml),
                    created: Instant::now(),
                    ended: None,
                },
            );
            let body = serde_json::json!({
                "sid": sid, "account_sid": ACCOUNT_SID, "to": to, "from": form["From"],
                "status": "queued", "answered_by": null,
            });
            let callback = form.get("StatusCallback").and_then(|url| {
                let events = form.get("StatusCallbackEvent").cloned().unwrap_or_default();
                if !events.split(' ').any(|e| e == "initiated") {
                    return None;
                }
                let target = inner.callbacks.clone()?;
                let path = url.strip_prefix(&target.public_url)?.to_string();
                let params = vec![
                    ("AccountSid".to_string(), ACCOUNT_SID.to_string()),
                    ("CallSid".to_string(), sid.clone()),
                    ("CallStatus".to_string(), "initiated".to_string()),
                    ("To".to_string(), to.clone()),
                    ("From".to_string(), form["From"].clone()),
                ];
                let signature = mailcall::twilio::signature::sign(AUTH_TOKEN, url, &params);
                Some(Delivery {
                    url: format!("http://{}{path}", target.local),
                    params,
                    signature,
                })
            });
            (
                201,
                Some(sid),
                (StatusCode::CREATED, axum::Json(body)).into_response(),
                callback,
            )
        }
        Reply::Error {
            status,
            code,
            message,
            retry_after,
        } => (
            *status,
            None,
            twilio_error(*status, *code, message, *retry_after),
            None,
        ),
    };
    inner.calls.push(CallRecord {
        to,
        from: form["From"].clone(),
        twiml,
        timeout: form.get("Timeout").cloned().unwrap_or_default(),
        at,
        status,
        sid,
        created: SystemTime::now(),
        dropped: matches!(reply, Reply::CreatedThenDrop),
        form,
    });
    (response, Some(reply), callback)
}

/// POSTs one signed status callback to the daemon (best effort, bounded).
async fn deliver_callback(delivery: Delivery) {
    let _ = reqwest::Client::new()
        .post(delivery.url)
        .header("X-Twilio-Signature", delivery.signature)
        .form(&delivery.params)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
}

/// `POST Messages.json`: an SMS, checked like a call (auth, form, E.164, length).
async fn create_message(
    State(inner): State<Shared>,
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
    State(inner): State<Shared>,
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
            "status": call.status(inner.ring_time),
            "answered_by": call.answered_by,
            "direction": "outbound-api",
        }))
        .into_response(),
        None => twilio_error(404, 20404, "The requested resource was not found", None),
    }
}

/// `POST Calls/{sid}.json` with `Twiml`: redirects the call; one that no longer dials
/// the conference leaves it, and one that hangs up is over.
async fn update_call(
    State(inner): State<Shared>,
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
    if twiml.contains("<Hangup/>") && !twiml.contains("<Conference") {
        call.ended = Some("completed");
    }
    inner.updates.push(CallUpdate {
        sid: sid.clone(),
        twiml,
    });
    axum::Json(serde_json::json!({"sid": sid, "status": "in-progress"})).into_response()
}

/// `GET Conferences.json?FriendlyName=&Status=in-progress`: a room is in progress
/// while someone is in it.
async fn list_conferences(
    State(inner): State<Shared>,
    Path(account): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    conference_delay(&inner).await;
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
    State(inner): State<Shared>,
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
    State(inner): State<Shared>,
    Path((account, conference)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    conference_delay(&inner).await;
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

/// `GET Calls.json?To=&From=&StartTime>=&PageSize=`: the calls created, newest first, as
/// Twilio lists them (lagging, or hanging, when told to).
async fn list_calls(
    State(inner): State<Shared>,
    Path(account): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authenticate(&account, &headers) {
        return response;
    }
    let (hangs, delay) = {
        let mut inner = inner.lock().unwrap();
        inner.list_requests += 1;
        (inner.list_hangs, inner.list_delay)
    };
    if hangs {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(date) = query.get("StartTime>")
        && !is_date(date)
    {
        return twilio_error(400, 20001, "StartTime> must be YYYY-MM-DD", None);
    }
    let page_size: usize = query
        .get("PageSize")
        .and_then(|p| p.parse().ok())
        .unwrap_or(50);
    let inner = inner.lock().unwrap();
    let now = SystemTime::now();
    let calls: Vec<serde_json::Value> = inner
        .calls
        .iter()
        .rev()
        .filter(|c| c.status == 201)
        .filter(|c| now.duration_since(c.created).unwrap_or_default() >= inner.list_lag)
        .filter(|c| query.get("To").is_none_or(|to| *to == c.to))
        .filter(|c| query.get("From").is_none_or(|from| *from == c.from))
        .filter(|c| {
            query
                .get("StartTime>")
                .is_none_or(|date| utc_date(c.created) >= *date)
        })
        .take(page_size)
        .map(|c| {
            let date = httpdate::fmt_http_date(c.created).replace("GMT", "+0000");
            let status = c
                .sid
                .as_deref()
                .and_then(|sid| inner.live.get(sid))
                .map_or("queued", |l| l.status(inner.ring_time));
            serde_json::json!({"sid": c.sid, "to": c.to, "from": c.from, "date_created": date, "status": status})
        })
        .collect();
    axum::Json(serde_json::json!({"calls": calls, "page": 0, "page_size": page_size, "next_page_uri": null}))
        .into_response()
}

/// Waits as long as conference reads are told to lag.
async fn conference_delay(inner: &Shared) {
    let delay = inner.lock().unwrap().conference_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn is_date(s: &str) -> bool {
    s.len() == 10
        && s.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

/// `YYYY-MM-DD` of a time, in UTC.
fn utc_date(t: SystemTime) -> String {
    let days = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
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

#[test]
fn the_fake_dates_are_utc_calendar_dates() {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_478_462);
    assert_eq!(utc_date(t), "2026-11-24");
    assert_eq!(utc_date(std::time::UNIX_EPOCH), "1970-01-01");
    assert!(is_date("2026-11-24") && !is_date("2026-1-24"));
}
