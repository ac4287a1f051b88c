//! `rules.toml` → a validated [`Config`].
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` types that keep
//! `toml::Spanned` positions (`raw.rs`), then `validate` (`validate.rs`) turns them into
//! the types the rest of the program uses (compiled regexes, resolved phone numbers,
//! parsed templates, durations), defined here. Validation collects *every* problem with
//! its position (`problems.rs`), so `mailcall check` can print them all as
//! `PATH:LINE:COLUMN: message` in one go. Nothing after this module needs to handle an
//! invalid configuration.

mod oncall;
mod problems;
mod raw;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::GlobSet;
use regex::Regex;

use crate::oncall::{OnCall, Override, Policy, Rotation, When};
use crate::speech::Prompts;
use crate::template::Template;

pub use problems::{ConfigError, Problem, Problems};

/// What stands where a rule name would for alerts that skip the rules (`/alert`,
/// `mailcall call`, the canary, a heartbeat); a rule of the same name would be mistaken for them.
pub const RESERVED_RULE_NAMES: [&str; 4] = ["webhook", "cli", "canary", "heartbeat"];

/// The placeholders every template may use, whatever its rule captures.
pub const BUILTIN_PLACEHOLDERS: [&str; 5] = ["subject", "from", "to", "body", "rule"];

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration was read from; relative paths inside it are relative to it.
    pub path: PathBuf,
    pub smtp: Smtp,
    pub twilio: Twilio,
    pub defaults: Defaults,
    /// Contact name → E.164 number.
    pub contacts: BTreeMap<String, String>,
    /// Group name → E.164 numbers, already resolved.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Evaluated in order; the first match wins.
    pub rules: Vec<Rule>,
    pub state: State,
    pub limits: Limits,
    /// The HTTP server; `None`: no HTTP server.
    pub http: Option<Http>,
    /// SendGrid Inbound Parse; `None`: not served.
    pub sendgrid: Option<Sendgrid>,
    /// The `/alert` webhook; `None`: not served.
    pub webhook: Option<Webhook>,
    /// The scheduled test call; `None`: none.
    pub canary: Option<Canary>,
    /// Dial-in: the PIN callers not listed in `[contacts]` must enter.
    pub bridge_pin: Option<String>,
    /// `[prompts."<language>"]`: the fixed phrases per language (lower-case tag), the
    /// built-in ones with the file's overrides applied. See [`Config::prompts`].
    pub prompts: BTreeMap<String, Prompts>,
    /// `[[rotation]]`s by name; their names stand in `call` lists like groups.
    pub rotations: BTreeMap<String, Rotation>,
    /// `[[heartbeat]]` monitors, in file order.
    pub heartbeats: Vec<Heartbeat>,
}

/// One entry of a `call` list: numbers known at load time, or a rotation, resolved to
/// whoever is on call when the alert is routed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Callee {
    /// An E.164 number (contacts and groups are resolved to these at load).
    Number(String),
    Rotation(String),
}

/// One step of a rule's `escalate`: if nobody is in the bridge `after` the incident
/// opened, `call` is rung too and joins the incident's rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    pub after: Duration,
    pub call: Vec<Callee>,
}

/// A `[[heartbeat]]` (dead man's switch): a beat is a mail matching its fields or a
/// `POST /heartbeat/<name>`; no beat within `every + grace` opens an incident.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub name: String,
    pub from: Option<Regex>,
    pub to: Option<Regex>,
    pub subject: Option<Regex>,
    pub body: Option<Regex>,
    pub every: Duration,
    pub grace: Duration,
    pub call: Vec<Callee>,
    /// May use `{name}` and `{last_seen}`.
    pub message: Template,
    pub language: String,
    pub voice: String,
}

impl Heartbeat {
    /// Can a mail be a beat (does it have a match field)? Without one, only
    /// `POST /heartbeat/<name>` beats.
    pub fn matches_mail(&self) -> bool {
        self.from.is_some() || self.to.is_some() || self.subject.is_some() || self.body.is_some()
    }
}

/// A scheduled end-to-end test call through the whole pipeline.
#[derive(Debug, Clone)]
pub struct Canary {
    pub every: Duration,
    pub numbers: Vec<String>,
    pub message: String,
}

/// The HTTP server (SendGrid, `/alert`, health).
#[derive(Debug, Clone)]
pub struct Http {
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    /// Body limit of every endpoint but SendGrid's.
    pub max_body_bytes: usize,
    /// Concurrent connections; more are answered `503` and closed.
    pub max_connections: usize,
    /// Concurrent connections from one client address; more are answered `429`.
    pub max_connections_per_ip: usize,
    /// How long a client may take to send a request's headers, and how long a kept-alive
    /// connection may wait for its next request.
    pub header_timeout: Duration,
}

/// SendGrid Inbound Parse.
#[derive(Debug, Clone)]
pub struct Sendgrid {
    pub path: String,
    /// HTTP Basic auth: the user name and the environment variable holding the password.
    pub basic: Option<(String, String)>,
    /// SendGrid's signed-webhook verification key.
    pub public_key: Option<p256::ecdsa::VerifyingKey>,
    /// Signatures older (or newer) than this are refused.
    pub max_age: Duration,
    pub require_spf: bool,
    pub require_dkim: bool,
    pub max_body_bytes: usize,
}

/// The `/alert` webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The environment variable holding the bearer token.
    pub token_env: String,
    /// Which numbers `/alert` may ring.
    pub numbers: WebhookNumbers,
}

/// Which numbers `/alert` may ring: a leaked token should not reach every phone on earth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookNumbers {
    /// Only numbers of `[contacts]` and `[groups]` (by name or by number).
    Contacts,
    /// Any E.164 number as well.
    Any,
}

/// The embedded SMTP listener.
#[derive(Debug, Clone)]
pub struct Smtp {
    pub listen: SocketAddr,
    pub hostname: String,
    /// Envelope recipients that are accepted; `None` accepts any.
    pub recipients: Option<AddressPatterns>,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    /// Sessions from one client address that may carry mail at once; up to as many
    /// again are greeted but have their transactions deferred with `451`.
    pub max_connections_per_ip: usize,
    /// What a line ending in a bare `<LF>` means (`DATA` ends only at `<CRLF>.<CRLF>`
    /// either way).
    pub bare_newline: BareNewline,
    /// How long a client may stay silent before it is disconnected.
    pub timeout: Duration,
    /// How long one connection may last in all, however busy.
    pub session_timeout: Duration,
    /// STARTTLS certificate chain and key (PEM), already resolved against the config
    /// file's directory.
    pub tls: Option<TlsFiles>,
    /// Refuse mail until the client has started TLS.
    pub require_tls: bool,
    /// AUTH users → the environment variable holding each one's password.
    pub users: BTreeMap<String, String>,
    /// Refuse mail from clients that have not authenticated.
    pub require_auth: bool,
    /// `MAIL FROM` addresses accepted; `None` accepts any.
    pub senders: Option<AddressPatterns>,
    /// Failed AUTH attempts one address may make per 15 minutes before it is shut out.
    pub max_auth_failures: u32,
}

/// `[smtp] bare_newline`: Postfix's `smtpd_forbid_bare_newline`, the answer to SMTP
/// smuggling (CVE-2023-51764).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BareNewline {
    /// A bare `<LF>` ends a line like `<CRLF>` (and is stored as `<CRLF>`), but a `.`
    /// line ended by one never ends `DATA`.
    #[default]
    Normalize,
    /// A line ending in a bare `<LF>` gets `550 5.5.2` and the connection is closed.
    Reject,
}

/// Where the STARTTLS certificate and key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Outbound calls through Twilio.
#[derive(Debug, Clone)]
pub struct Twilio {
    pub from: String,
    pub api_base: String,
    pub ring_seconds: u32,
    /// How long a retryable failure is retried before the call is given up.
    pub retry_for: Duration,
    /// The timeout of one HTTP request to Twilio.
    pub request_timeout: Duration,
    /// The first retry delay; later ones double up to `retry_max_delay`.
    pub retry_initial_delay: Duration,
    pub retry_max_delay: Duration,
    /// Pace call requests on our side (accounts with a low calls-per-second limit).
    pub calls_per_second: Option<f64>,
    /// Where Twilio reaches our HTTP server (callbacks, press-1, dial-in); without it
    /// mailcall works by polling.
    pub public_url: Option<String>,
    /// How long after a request's window Twilio's call list may still lack the call it
    /// created; only then is a request whose answer was lost sent again.
    pub reconcile_grace: Duration,
}

/// Values a rule inherits when it does not set its own.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub language: String,
    pub voice: String,
    pub message: Template,
    pub cooldown: Duration,
    /// Also send each called number an SMS with the subject and the incident id.
    pub sms: bool,
    /// How long a round of calls has to get someone into the bridge before the next.
    pub round_interval: Duration,
    /// Rounds of calls at most (the first one included).
    pub rounds: u32,
}

/// One `[[rule]]`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub from: Option<Regex>,
    pub to: Option<Regex>,
    pub subject: Option<Regex>,
    pub body: Option<Regex>,
    pub action: RuleAction,
    pub message: Template,
    pub language: String,
    pub voice: String,
    /// `None`: the rule name plus the normalised subject.
    pub dedup_key: Option<Template>,
    /// Zero turns deduplication off for this rule.
    pub cooldown: Duration,
    /// Also send each called number an SMS summary.
    pub sms: bool,
    pub round_interval: Duration,
    pub rounds: u32,
    /// The rule applies only inside this (else the next rule is tried).
    pub when: Option<When>,
    /// Who else is called while nobody is in the bridge, and when.
    pub escalate: Vec<Escalation>,
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// Call these (contacts and groups resolved to E.164 numbers, de-duplicated;
    /// rotations resolved when an alert is routed).
    Call(Vec<Callee>),
    /// Call nobody.
    Drop,
    /// Close the open incident with the same dedup key (a recovery): no further rounds,
    /// and the message is spoken to whoever is in the bridge.
    Resolve,
}

/// The durable store.
#[derive(Debug, Clone)]
pub struct State {
    /// The SQLite file, already resolved against the config file's directory.
    pub path: PathBuf,
    /// An upper bound on the store's data: the oldest closed incidents are pruned first,
    /// and new mail is refused only while open data alone fills it.
    pub max_bytes: Option<u64>,
    /// How long closed incidents (with their alerts, raw mail and calls) are kept.
    pub retain: Duration,
}

/// Global safety limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_calls_per_hour: u32,
}

/// Case-insensitive address globs such as `*@pager.example.com`.
#[derive(Debug, Clone)]
pub struct AddressPatterns {
    set: GlobSet,
}

impl AddressPatterns {
    /// Does `address` match any of the patterns?
    pub fn matches(&self, address: &str) -> bool {
        self.set.is_match(address)
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates configuration text that was read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |problems: Vec<(Range<usize>, String)>| {
            let mut problems: Vec<Problem> = problems
                .into_iter()
                .map(|(span, message)| {
                    let (line, column) = problems::line_column(text, span.start);
                    Problem {
                        line,
                        column,
                        message,
                    }
                })
                .collect();
            problems.sort_by_key(|p| (p.line, p.column));
            ConfigError::Invalid(Problems {
                path: path.to_path_buf(),
                problems,
            })
        };
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            invalid(vec![(e.span().unwrap_or(0..0), message)])
        })?;
        validate::validate(path, text, raw).map_err(invalid)
    }

    /// The fixed phrases of a call in `language`: the `[prompts]` table of that tag, else
    /// of its primary language (`ja` for `ja-JP`), else the built-in ones.
    pub fn prompts(&self, language: &str) -> Prompts {
        prompt_set(&self.prompts, language)
    }

    /// What is allowed but probably unintended: logged at start and printed by `check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        // A big mail leaves a tenth of the cap (at most 1 MiB) free, and the empty store
        // takes a few hundred kB: a mail near the size limit could never be stored.
        if let Some(max) = self.state.max_bytes {
            let biggest = self.smtp.max_message_bytes as u64;
            let needed = biggest + (max / 10).min(1024 * 1024) + 512 * 1024;
            if needed > max {
                warnings.push(format!(
                    "[state] max_bytes ({max}) leaves no room for a mail of smtp.max_message_bytes ({biggest}): such mail is refused for good (552); raise max_bytes to at least {needed}, or lower max_message_bytes"
                ));
            }
        }
        if let Some(sg) = &self.sendgrid
            && sg.basic.is_none()
            && sg.public_key.is_none()
        {
            warnings.push(format!(
                "[sendgrid] has neither `username` (Basic auth) nor `public_key` (signatures): anyone who finds {} can ring your phones; set `username` and `password_env`, or `public_key`",
                sg.path
            ));
        }
        warnings
    }

    /// Is `number` one of the numbers of `[contacts]` or `[groups]`?
    pub fn is_known_number(&self, number: &str) -> bool {
        self.contacts.values().any(|n| n == number)
            || self.groups.values().flatten().any(|n| n == number)
    }

    /// The numbers `callees` name at `policy.now` (a rotation rings whoever is on call:
    /// an override's person or the member whose turn it is), each once, in order; and
    /// who each rotation rang.
    pub fn resolve(&self, callees: &[Callee], policy: &Policy) -> (Vec<String>, Vec<OnCall>) {
        let mut numbers = Vec::new();
        let mut on_call = Vec::new();
        for callee in callees {
            match callee {
                Callee::Number(n) => numbers.push(n.clone()),
                Callee::Rotation(name) => {
                    let Some(rotation) = self.rotations.get(name) else {
                        continue;
                    };
                    // An override naming someone no longer in [contacts] (the file
                    // changed since) falls back to the turn.
                    let overrides: Vec<Override> = policy
                        .overrides
                        .iter()
                        .filter(|o| self.contacts.contains_key(&o.who))
                        .cloned()
                        .collect();
                    let Some(seg) = rotation.on_call(&overrides, policy.now) else {
                        continue;
                    };
                    numbers.extend(self.contacts.get(&seg.who).cloned());
                    on_call.push(OnCall {
                        rotation: name.clone(),
                        who: seg.who,
                        until: seg.until,
                        override_id: seg.override_id,
                    });
                }
            }
        }
        dedup_in_order(&mut numbers);
        (numbers, on_call)
    }

    /// The names silence matchers may use: the alert fields and every rule's captures.
    pub fn silence_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = crate::oncall::silence::FIELDS
            .iter()
            .map(|f| f.to_string())
            .collect();
        for rule in &self.rules {
            for re in [&rule.from, &rule.to, &rule.subject, &rule.body]
                .into_iter()
                .flatten()
            {
                names.extend(re.capture_names().flatten().map(str::to_string));
            }
        }
        names
    }

    /// Looks up the E.164 numbers a `call` entry names: a contact, a group or a number.
    pub fn resolve_callee(&self, entry: &str) -> Option<Vec<String>> {
        if let Some(number) = self.contacts.get(entry) {
            Some(vec![number.clone()])
        } else if let Some(numbers) = self.groups.get(entry) {
            Some(numbers.clone())
        } else if is_e164(entry) {
            Some(vec![entry.to_string()])
        } else {
            None
        }
    }
}

/// Is `s` a plausible `<Say language>` (BCP 47 such as `en-US`, `ja-JP`, `cmn-CN`)?
pub fn is_language(s: &str) -> bool {
    let mut parts = s.split('-');
    let primary = parts.next().unwrap_or_default();
    s.len() <= 35
        && (2..=3).contains(&primary.len())
        && primary.bytes().all(|b| b.is_ascii_alphabetic())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Is `s` a plausible `<Say voice>` (`alice`, `Polly.Mizuki`, `Google.en-US-Standard-C`)?
pub fn is_voice(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
}

/// Is `s` an E.164 phone number (`+` and 2 to 15 digits, no leading zero)?
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// [`Config::prompts`] before there is a `Config`.
pub(crate) fn prompt_set(prompts: &BTreeMap<String, Prompts>, language: &str) -> Prompts {
    let tag = language.to_ascii_lowercase();
    let primary = tag.split('-').next().unwrap_or_default();
    prompts
        .get(&tag)
        .or_else(|| prompts.get(primary))
        .cloned()
        .unwrap_or_else(|| Prompts::builtin(language))
}

/// Decodes SendGrid's verification key: base64 of a DER SubjectPublicKeyInfo (P-256).
pub fn parse_public_key(text: &str) -> Result<p256::ecdsa::VerifyingKey, String> {
    use base64::Engine;
    use p256::pkcs8::DecodePublicKey;
    let compact: String = text.split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("not base64 ({e})"))?;
    p256::PublicKey::from_public_key_der(&der)
        .map(p256::ecdsa::VerifyingKey::from)
        .map_err(|e| format!("not a P-256 public key ({e})"))
}

/// Removes repeated entries, keeping the first occurrence and the order.
pub fn dedup_in_order(items: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    items.retain(|i| seen.insert(i.clone()));
}

#[cfg(test)]
mod tests;
