//! The Twilio REST client: the only code that sends requests to Twilio.
//!
//! Every answer is classified into an [`Outcome`] right here, so the dispatcher decides
//! on types (`Placed`, `Retry`, `Permanent`) rather than on status codes and strings.

use std::time::Duration;

use serde::Deserialize;

/// Twilio credentials, from the environment.
#[derive(Clone)]
pub struct Credentials {
    pub account_sid: String,
    /// The account SID, or an API key SID.
    username: String,
    /// The auth token, or the API key secret. Never logged.
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("account_sid", &self.account_sid)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Missing or half-given credentials.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error(
        "no Twilio credentials: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (or TWILIO_ACCOUNT_SID, TWILIO_API_KEY and TWILIO_API_SECRET), or run with --dry-run"
    )]
    Missing,
    #[error("{0} is set but {1} is not; set both (or neither and run with --dry-run)")]
    Partial(&'static str, &'static str),
}

impl Credentials {
    /// Reads `TWILIO_ACCOUNT_SID` with `TWILIO_AUTH_TOKEN`, or with `TWILIO_API_KEY` and
    /// `TWILIO_API_SECRET` (API key auth, which wins when both are given).
    pub fn from_env() -> Result<Credentials, CredentialError> {
        Credentials::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Credentials, CredentialError> {
        let sid = get("TWILIO_ACCOUNT_SID");
        let token = get("TWILIO_AUTH_TOKEN");
        let key = get("TWILIO_API_KEY");
        let secret = get("TWILIO_API_SECRET");
        let Some(account_sid) = sid else {
            return match (&token, &key) {
                (Some(_), _) => Err(CredentialError::Partial(
                    "TWILIO_AUTH_TOKEN",
                    "TWILIO_ACCOUNT_SID",
                )),
                (None, Some(_)) => Err(CredentialError::Partial(
                    "TWILIO_API_KEY",
                    "TWILIO_ACCOUNT_SID",
                )),
                (None, None) => Err(CredentialError::Missing),
            };
        };
        match (key, secret, token) {
            (Some(key), Some(secret), _) => Ok(Credentials {
                account_sid,
                username: key,
                password: secret,
            }),
            (Some(_), None, _) => Err(CredentialError::Partial(
                "TWILIO_API_KEY",
                "TWILIO_API_SECRET",
            )),
            (None, Some(_), _) => Err(CredentialError::Partial(
                "TWILIO_API_SECRET",
                "TWILIO_API_KEY",
            )),
            (None, None, Some(token)) => Ok(Credentials {
                username: account_sid.clone(),
                account_sid,
                password: token,
            }),
            (None, None, None) => Err(CredentialError::Partial(
                "TWILIO_ACCOUNT_SID",
                "TWILIO_AUTH_TOKEN",
            )),
        }
    }
}

/// One outbound call to create.
#[derive(Debug, Clone)]
pub struct CallRequest<'a> {
    pub to: &'a str,
    pub from: &'a str,
    pub twiml: &'a str,
    pub timeout_secs: u32,
    /// Ask Twilio to tell a machine from a human (`MachineDetection=Enable`).
    pub machine_detection: bool,
    /// Where Twilio reports the call's progress (`StatusCallback`), with a public URL;
    /// it carries the attempt's id, so the first callback settles a request whose
    /// answer was lost.
    pub status_callback: Option<&'a str>,
}

/// The progress events a status callback reports.
pub const STATUS_EVENTS: &str = "initiated ringing answered completed";

/// What polling learns about a call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CallInfo {
    pub status: String,
    /// `human`, `machine_start`, `machine_end_beep`, `fax`, `unknown`…; absent until known.
    pub answered_by: Option<String>,
    /// `outbound-api` for calls made through the REST API (ours), `inbound` for calls
    /// to our number (a dial-in).
    #[serde(default)]
    pub direction: Option<String>,
}

impl CallInfo {
    /// Did an answering machine (or a fax) pick up?
    pub fn machine(&self) -> bool {
        self.answered_by
            .as_deref()
            .is_some_and(|a| a.starts_with("machine") || a == "fax")
    }

    /// Did answering-machine detection say a person picked up? (`unknown` is not one.)
    pub fn human(&self) -> bool {
        self.answered_by.as_deref() == Some("human")
    }

    /// Was the call made through the REST API (so, by mailcall), not dialled in?
    pub fn outbound(&self) -> bool {
        self.direction
            .as_deref()
            .is_some_and(|d| d.starts_with("outbound"))
    }
}

#[derive(Debug, Deserialize)]
struct ConferenceList {
    conferences: Vec<Sid>,
}

#[derive(Debug, Deserialize)]
struct ParticipantList {
    participants: Vec<Participant>,
}

#[derive(Debug, Deserialize)]
struct Sid {
    sid: String,
}

#[derive(Debug, Deserialize)]
struct Participant {
    call_sid: String,
}

/// What became of one request, classified for the retry loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Twilio accepted the call; it is queued and will ring.
    Placed { sid: String },
    /// No answer to rely on: the request may have reached Twilio (a timeout, the
    /// connection lost after sending, an unreadable `2xx`). Twilio has no idempotency
    /// key for calls, so this must be reconciled, never simply sent again.
    Unknown { reason: String },
    /// Twilio answered and created nothing, but trying again may work: 429, 503 and
    /// other 5xx that turn a request away, or the connection could not even be made.
    Retry {
        /// `Retry-After`, when Twilio sent one.
        after: Option<Duration>,
        /// The HTTP status and Twilio error code, when Twilio answered.
        status: Option<u16>,
        code: Option<i64>,
        reason: String,
    },
    /// Trying again would fail the same way (4xx): bad number, unverified trial
    /// number, geo permissions, bad credentials…
    Permanent {
        status: u16,
        code: Option<i64>,
        message: String,
    },
}

/// The error body Twilio sends with 4xx and 5xx answers.
#[derive(Debug, Deserialize)]
struct ApiError {
    code: Option<i64>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CallResource {
    sid: String,
    /// RFC 2822, e.g. `Tue, 24 Nov 2026 00:01:02 +0000`.
    #[serde(default)]
    date_created: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CallList {
    calls: Vec<CallResource>,
    /// The next (older) page, as a path from the API's root.
    #[serde(default)]
    next_page_uri: Option<String>,
}

/// How many pages of the call list reconciliation reads at most.
const MAX_LIST_PAGES: usize = 5;

/// A Twilio REST API client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    api_base: String,
    credentials: Credentials,
    timeout: Duration,
}

impl Client {
    /// `api_base` is `https://api.twilio.com` in production and a loopback fake in tests.
    pub fn new(
        api_base: &str,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("mailcall/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            api_base: api_base.trim_end_matches('/').to_string(),
            credentials,
            timeout,
        })
    }

    /// The timeout of every request (`request_timeout` when the client was made; a
    /// reload does not change it).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `POST /2010-04-01/Accounts/{AccountSid}/Calls.json` with inline TwiML.
    pub async fn create_call(&self, call: &CallRequest<'_>) -> Outcome {
        let url = self.url("Calls.json");
        let timeout = call.timeout_secs.to_string();
        let mut form = vec![
            ("To", call.to),
            ("From", call.from),
            ("Twiml", call.twiml),
            ("Timeout", timeout.as_str()),
        ];
        if call.machine_detection {
            form.push(("MachineDetection", "Enable"));
        }
        if let Some(url) = call.status_callback {
            form.extend([
                ("StatusCallback", url),
                ("StatusCallbackEvent", STATUS_EVENTS),
                ("StatusCallbackMethod", "POST"),
            ]);
        }
        self.post_outcome(&url, &form).await
    }

    /// A POST that creates something (a call, an SMS), classified: an error before
    /// the connection was made sent nothing; any later loss leaves the outcome unknown.
    async fn post_outcome(&self, url: &str, form: &[(&str, &str)]) -> Outcome {
        let response = self
            .http
            .post(url)
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .form(form)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return Outcome::Retry {
                    after: None,
                    status: None,
                    code: None,
                    reason: describe_transport_error(&e),
                };
            }
            Err(e) => {
                return Outcome::Unknown {
                    reason: describe_transport_error(&e),
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        match response.bytes().await {
            Ok(body) => classify(status, retry_after, &body),
            // The status alone says whether something was created.
            Err(e) if (200..300).contains(&status) => Outcome::Unknown {
                reason: format!(
                    "Twilio answered {status} but its answer was cut off: {}",
                    describe_transport_error(&e)
                ),
            },
            Err(_) => classify(status, retry_after, b""),
        }
    }

    /// The calls Twilio created to `to` from `from` at or after `since_ms` (Unix
    /// milliseconds; Twilio's timestamps are whole seconds, so the caller leaves a
    /// second of slack), as `(sid, created at in Unix milliseconds)`. Reconciliation
    /// matches these to requests whose answer was lost.
    ///
    /// `StartTime>` filters on when a call started, which a call still queued at
    /// Twilio (an account's calls beyond its calls per second wait there) does not have
    /// yet: the queued ones are asked for apart (`Status=queued`).
    pub async fn calls_to(
        &self,
        to: &str,
        from: &str,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, String> {
        let day = crate::store::rfc3339(since_ms);
        let mut calls = self
            .list_calls(
                &[
                    ("To", to),
                    ("From", from),
                    ("StartTime>", &day[..10]),
                    ("PageSize", "100"),
                ],
                since_ms,
            )
            .await?;
        let queued = self
            .list_calls(
                &[
                    ("To", to),
                    ("From", from),
                    ("Status", "queued"),
                    ("PageSize", "100"),
                ],
                since_ms,
            )
            .await?;
        for call in queued {
            if !calls.iter().any(|(sid, _)| *sid == call.0) {
                calls.push(call);
            }
        }
        Ok(calls)
    }

    /// One filtered call list, newest first: up to [`MAX_LIST_PAGES`] pages, stopping at
    /// the first page that reaches back past `since_ms`.
    async fn list_calls(
        &self,
        query: &[(&str, &str)],
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, String> {
        let mut list: CallList = self.get_json("Calls.json", query).await?;
        let mut calls = Vec::new();
        for page in 1.. {
            let mut reached_back = list.calls.is_empty();
            for call in list.calls {
                let Some(created) = call.date_created.as_deref().and_then(parse_rfc2822) else {
                    continue;
                };
                let created_ms = created.saturating_mul(1000);
                if created_ms < since_ms {
                    reached_back = true;
                    continue;
                }
                calls.push((call.sid, created_ms));
            }
            match list.next_page_uri {
                Some(next) if !reached_back && page < MAX_LIST_PAGES => {
                    list = self.get_uri(&next).await?;
                }
                _ => break,
            }
        }
        Ok(calls)
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/{path}",
            self.api_base, self.credentials.account_sid
        )
    }

    /// A GET of a JSON resource; any failure is a message for the log.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, String> {
        self.get(self.http.get(self.url(path)).query(query), path)
            .await
    }

    /// A GET of a URI Twilio handed out (a `next_page_uri`), relative to the API base.
    async fn get_uri<T: serde::de::DeserializeOwned>(&self, uri: &str) -> Result<T, String> {
        if !uri.starts_with('/') {
            return Err(format!("unexpected page URI from Twilio: {uri}"));
        }
        let url = format!("{}{uri}", self.api_base);
        self.get(self.http.get(url), uri).await
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<T, String> {
        let response = request
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .send()
            .await
            .map_err(|e| describe_transport_error(&e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| describe_transport_error(&e))?;
        if !status.is_success() {
            return Err(format!(
                "HTTP {status} from {path}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("unreadable answer from {path}: {e}"))
    }

    /// `GET Calls/{sid}.json`: the call's status and who answered.
    pub async fn get_call(&self, sid: &str) -> Result<CallInfo, String> {
        self.get_json(&format!("Calls/{sid}.json"), &[]).await
    }

    /// A form POST whose answer only matters as success or failure.
    async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Result<(), String> {
        let response = self
            .http
            .post(self.url(path))
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .form(form)
            .send()
            .await
            .map_err(|e| describe_transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(format!(
            "HTTP {status} from {path}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    }

    /// `POST Calls/{sid}.json` with new inline TwiML: redirects a live call.
    pub async fn update_call(&self, sid: &str, twiml: &str) -> Result<(), String> {
        self.post_form(&format!("Calls/{sid}.json"), &[("Twiml", twiml)])
            .await
    }

    /// `POST Conferences/{sid}.json` with `AnnounceUrl`: Twilio fetches TwiML from the
    /// URL and plays it to everyone in the conference.
    pub async fn announce(&self, conference_sid: &str, announce_url: &str) -> Result<(), String> {
        self.post_form(
            &format!("Conferences/{conference_sid}.json"),
            &[("AnnounceUrl", announce_url), ("AnnounceMethod", "POST")],
        )
        .await
    }

    /// The conference SIDs of room `room` while it is in progress.
    pub async fn conferences(&self, room: &str) -> Result<Vec<String>, String> {
        let list: ConferenceList = self
            .get_json(
                "Conferences.json",
                &[("FriendlyName", room), ("Status", "in-progress")],
            )
            .await?;
        Ok(list.conferences.into_iter().map(|c| c.sid).collect())
    }

    /// The calls in the conference room `room` while it is in progress (none if it
    /// is not).
    pub async fn conference_calls(&self, room: &str) -> Result<Vec<String>, String> {
        let mut calls = Vec::new();
        for sid in self.conferences(room).await? {
            let conference = Sid { sid };
            let participants: ParticipantList = self
                .get_json(
                    &format!("Conferences/{}/Participants.json", conference.sid),
                    &[],
                )
                .await?;
            calls.extend(participants.participants.into_iter().map(|p| p.call_sid));
        }
        Ok(calls)
    }

    /// `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`: one SMS.
    pub async fn send_sms(&self, to: &str, from: &str, body: &str) -> Outcome {
        self.post_outcome(
            &self.url("Messages.json"),
            &[("To", to), ("From", from), ("Body", body)],
        )
        .await
    }
}

/// Parses Twilio's RFC 2822 timestamps (`Tue, 24 Nov 2026 00:01:02 +0000`, always UTC)
/// to Unix seconds.
fn parse_rfc2822(s: &str) -> Option<i64> {
    let gmt = s.trim().strip_suffix("+0000")?.trim_end();
    let t = httpdate::parse_http_date(&format!("{gmt} GMT")).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

/// Twilio error codes that come with a 4xx status but are worth retrying.
const RETRYABLE_CODE_10004: i64 = 10004;
const RETRYABLE_CODE_22005: i64 = 22005;

/// Turns a Twilio HTTP answer into an [`Outcome`].
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<CallResource>(body) {
            Ok(call) => Outcome::Placed { sid: call.sid },
            // Accepted, but which call is it? Reconciliation finds out; sending it
            // again would ring twice.
            Err(e) => Outcome::Unknown {
                reason: format!("Twilio answered {status} with an unreadable body: {e}"),
            },
        };
    }
    let error = serde_json::from_slice::<ApiError>(body).ok();
    let code = error.as_ref().and_then(|e| e.code);
    let message = error.and_then(|e| e.message).unwrap_or_else(|| {
        String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_string()
    });
    // A 500, or a gateway's 502/504 in front of Twilio, says nothing about whether the
    // request was processed before it failed: a call may exist. Only 429 and 503 say
    // it was turned away.
    if matches!(status, 500 | 502 | 504) {
        return Outcome::Unknown {
            reason: format!("HTTP {status}: {message}"),
        };
    }
    // 10004 (the account's concurrent-call limit) and 22005 are 4xx answers that clear
    // by themselves: retry them like a 429.
    if status == 429
        || status >= 500
        || matches!(code, Some(RETRYABLE_CODE_10004 | RETRYABLE_CODE_22005))
    {
        let reason = match code {
            Some(code) => format!("HTTP {status}, Twilio error {code}: {message}"),
            None => format!("HTTP {status}: {message}"),
        };
        Outcome::Retry {
            after: retry_after,
            status: Some(status),
            code,
            reason,
        }
    } else {
        Outcome::Permanent {
            status,
            code,
            message,
        }
    }
}

fn describe_transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out waiting for Twilio".to_string()
    } else if e.is_connect() {
        "cannot connect to Twilio".to_string()
    } else {
        // reqwest's Display omits the cause; walk the chain once for the log.
        let mut s = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            s.push_str(": ");
            s.push_str(&cause.to_string());
            source = cause.source();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn credentials_from_token_or_api_key() {
        let c = Credentials::from_lookup(env(&[
            ("TWILIO_ACCOUNT_SID", "AC1"),
            ("TWILIO_AUTH_TOKEN", "tok"),
        ]))
        .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("AC1", "tok"));
        let c = Credentials::from_lookup(env(&[
            ("TWILIO_ACCOUNT_SID", "AC1"),
            ("TWILIO_API_KEY", "SK1"),
            ("TWILIO_API_SECRET", "sec"),
        ]))
        .unwrap();
        assert_eq!(
            (
                c.account_sid.as_str(),
                c.username.as_str(),
                c.password.as_str()
            ),
            ("AC1", "SK1", "sec")
        );
        assert_eq!(
            Credentials::from_lookup(env(&[])).unwrap_err(),
            CredentialError::Missing
        );
        assert!(matches!(
            Credentials::from_lookup(env(&[
                ("TWILIO_ACCOUNT_SID", "AC1"),
                ("TWILIO_API_KEY", "SK1")
            ])),
            Err(CredentialError::Partial(
                "TWILIO_API_KEY",
                "TWILIO_API_SECRET"
            ))
        ));
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("sec"),
            "secrets must not be printed: {debug}"
        );
    }

    #[test]
    fn twilio_dates() {
        assert_eq!(parse_rfc2822("Thu, 01 Jan 1970 00:01:40 +0000"), Some(100));
        assert_eq!(
            parse_rfc2822("Tue, 24 Nov 2026 00:01:02 +0000"),
            Some(1_795_478_462)
        );
        assert_eq!(parse_rfc2822("yesterday"), None);
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(201, None, br#"{"sid":"CA123","status":"queued"}"#),
            Outcome::Placed {
                sid: "CA123".into()
            }
        );
        assert_eq!(
            classify(
                400,
                None,
                br#"{"code":21211,"message":"Invalid 'To' Phone Number","status":400}"#
            ),
            Outcome::Permanent {
                status: 400,
                code: Some(21211),
                message: "Invalid 'To' Phone Number".into()
            }
        );
        assert!(matches!(
            classify(429, Some(Duration::from_secs(3)), br#"{"code":20429,"message":"Too Many Requests"}"#),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        assert!(matches!(
            classify(503, None, b"<html>down</html>"),
            Outcome::Retry { after: None, .. }
        ));
        for status in [500, 502, 504] {
            assert!(
                matches!(
                    classify(status, None, b"<html>gateway</html>"),
                    Outcome::Unknown { .. }
                ),
                "{status} may have created the call"
            );
        }
        for code in [10004, 22005] {
            let body = format!(r#"{{"code":{code},"message":"limit reached"}}"#);
            assert!(
                matches!(classify(400, None, body.as_bytes()), Outcome::Retry { ref reason, .. } if reason.contains(&code.to_string())),
                "{code} must be retried"
            );
        }
        assert!(matches!(
            classify(401, None, b""),
            Outcome::Permanent {
                status: 401,
                code: None,
                ..
            }
        ));
    }
}
