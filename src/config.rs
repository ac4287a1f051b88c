//! `rules.toml` → a validated [`Config`].
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` types that keep
//! `toml::Spanned` positions, then [`validate`] turns them into the types the rest of the
//! program uses (compiled regexes, resolved phone numbers, parsed templates, durations).
//! Validation collects *every* problem with its position, so `mailcall check` can print
//! them all as `PATH:LINE:COLUMN: message` in one go. Nothing after this module needs to
//! handle an invalid configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::speech::{PROMPT_KEYS, Prompts};
use crate::template::Template;

/// What stands where a rule name would for alerts that skip the rules (`/alert`,
/// `mailcall call`, the canary); a rule of the same name would be mistaken for them.
pub const RESERVED_RULE_NAMES: [&str; 3] = ["webhook", "cli", "canary"];

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
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// Call these E.164 numbers (resolved from contacts and groups, de-duplicated).
    Call(Vec<String>),
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

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source}; pass another with --config or $MAILCALL_CONFIG"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0)]
    Invalid(Problems),
}

/// Every problem found in one configuration file.
#[derive(Debug)]
pub struct Problems {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem, positioned in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                p.line,
                p.column,
                p.message
            )?;
        }
        Ok(())
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
                    let (line, column) = line_column(text, span.start);
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            invalid(vec![(e.span().unwrap_or(0..0), message)])
        })?;
        validate(path, text, raw).map_err(invalid)
    }

    /// The fixed phrases of a call in `language`: the `[prompts]` table of that tag, else
    /// of its primary language (`ja` for `ja-JP`), else the built-in ones.
    pub fn prompts(&self, language: &str) -> Prompts {
        prompt_set(&self.prompts, language)
    }

    /// What is allowed but probably unintended: logged at start and printed by `check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
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

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

// ---- The file as written -------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    smtp: RawSmtp,
    twilio: Spanned<RawTwilio>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    contacts: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<Spanned<String>>>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    limits: RawLimits,
    http: Option<RawHttp>,
    sendgrid: Option<Spanned<RawSendgrid>>,
    webhook: Option<RawWebhook>,
    canary: Option<RawCanary>,
    bridge: Option<RawBridge>,
    #[serde(default)]
    prompts: BTreeMap<String, Spanned<BTreeMap<String, Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBridge {
    pin: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanary {
    every: Spanned<String>,
    call: Spanned<Vec<Spanned<String>>>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Spanned<String>,
    request_timeout: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    header_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSendgrid {
    path: Option<Spanned<String>>,
    username: Option<String>,
    password_env: Option<Spanned<String>>,
    public_key: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    require_spf: Option<bool>,
    require_dkim: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    token_env: Spanned<String>,
    numbers: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    listen: Option<Spanned<String>>,
    hostname: Option<String>,
    recipients: Option<Vec<Spanned<String>>>,
    max_message_bytes: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    bare_newline: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    session_timeout: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    require_tls: Option<Spanned<bool>>,
    users: Option<Spanned<BTreeMap<String, String>>>,
    require_auth: Option<Spanned<bool>>,
    senders: Option<Vec<Spanned<String>>>,
    max_auth_failures: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTwilio {
    from: Spanned<String>,
    api_base: Option<Spanned<String>>,
    ring_seconds: Option<Spanned<u32>>,
    retry_for: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    retry_initial_delay: Option<Spanned<String>>,
    retry_max_delay: Option<Spanned<String>>,
    calls_per_second: Option<Spanned<f64>>,
    public_url: Option<Spanned<String>>,
    reconcile_grace: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    language: Option<Spanned<String>>,
    voice: Option<Spanned<String>>,
    message: Option<Spanned<String>>,
    cooldown: Option<Spanned<String>>,
    sms: Option<bool>,
    round_interval: Option<Spanned<String>>,
    rounds: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    subject: Option<Spanned<String>>,
    body: Option<Spanned<String>>,
    call: Option<Spanned<Vec<Spanned<String>>>>,
    drop: Option<Spanned<bool>>,
    resolve: Option<Spanned<bool>>,
    message: Option<Spanned<String>>,
    language: Option<Spanned<String>>,
    voice: Option<Spanned<String>>,
    dedup_key: Option<Spanned<String>>,
    cooldown: Option<Spanned<String>>,
    sms: Option<bool>,
    round_interval: Option<Spanned<String>>,
    rounds: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    path: Option<String>,
    max_bytes: Option<Spanned<u64>>,
    retain: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_calls_per_hour: Option<Spanned<u32>>,
}

// ---- Validation ----------------------------------------------------------------------

/// Collects problems while validation goes on, so all of them are reported at once.
#[derive(Default)]
struct Problemset(Vec<(Range<usize>, String)>);

impl Problemset {
    fn push(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.0.push((span, message.into()));
    }

    fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.push(
                    value.span(),
                    format!(
                        "invalid duration `{}` for `{key}`: {e}; write e.g. \"30s\", \"15m\" or \"1h\"",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// Resolves `call` entries (contacts, groups, E.164 numbers) to unique numbers.
    fn callees(
        &mut self,
        entries: &[Spanned<String>],
        contacts: &BTreeMap<String, String>,
        groups: &BTreeMap<String, Vec<String>>,
        owner: &str,
    ) -> Vec<String> {
        let mut numbers = Vec::new();
        for entry in entries {
            let e = entry.get_ref();
            if let Some(n) = contacts.get(e) {
                numbers.push(n.clone());
            } else if let Some(ns) = groups.get(e) {
                numbers.extend(ns.iter().cloned());
            } else if is_e164(e) {
                numbers.push(e.clone());
            } else {
                self.push(
                    entry.span(),
                    format!(
                        "`{e}` in {owner} is neither a contact, a group nor an E.164 number; add it under [contacts] or write the number as \"+15005550001\""
                    ),
                );
            }
        }
        dedup_in_order(&mut numbers);
        numbers
    }

    fn rounds(&mut self, value: Option<&Spanned<u32>>) -> Option<u32> {
        let value = value?;
        let n = *value.get_ref();
        if !(1..=10).contains(&n) {
            self.push(
                value.span(),
                format!("`rounds` = {n} must be between 1 and 10"),
            );
        }
        Some(n.clamp(1, 10))
    }

    fn language(&mut self, value: Option<&Spanned<String>>) -> Option<String> {
        let value = value?;
        if !is_language(value.get_ref()) {
            self.push(
                value.span(),
                format!(
                    "invalid `language` {:?}; write a language tag such as \"en-US\" or \"ja-JP\"",
                    value.get_ref()
                ),
            );
        }
        Some(value.get_ref().clone())
    }

    fn voice(&mut self, value: Option<&Spanned<String>>) -> Option<String> {
        let value = value?;
        if !is_voice(value.get_ref()) {
            self.push(value.span(), format!("invalid `voice` {:?}; write a Twilio voice such as \"Polly.Joanna\" or \"alice\"", value.get_ref()));
        }
        Some(value.get_ref().clone())
    }

    fn globs(&mut self, list: &[Spanned<String>], what: &str) -> AddressPatterns {
        let mut builder = GlobSetBuilder::new();
        for pattern in list {
            match GlobBuilder::new(pattern.get_ref())
                .case_insensitive(true)
                .literal_separator(false)
                .build()
            {
                Ok(glob) => {
                    builder.add(glob);
                }
                Err(e) => self.push(
                    pattern.span(),
                    format!(
                        "invalid {what} pattern `{}`: {}",
                        pattern.get_ref(),
                        e.kind()
                    ),
                ),
            }
        }
        AddressPatterns {
            set: builder.build().unwrap_or_else(|_| GlobSet::empty()),
        }
    }

    /// Compiles a regex; a syntax error is reported at its position inside the pattern
    /// (`text` is the whole file, to find it), not just at the start of the string.
    /// `Err(())` means the regex is unusable and the problem is recorded.
    fn regex(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        text: &str,
    ) -> Result<Option<Regex>, ()> {
        let Some(value) = value else { return Ok(None) };
        match Regex::new(value.get_ref()) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                // The regex crate's message is multi-line with a caret; keep it on one line.
                let detail = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .trim_start_matches("error: ")
                    .to_string();
                let at = regex_syntax::Parser::new()
                    .parse(value.get_ref())
                    .err()
                    .and_then(|e| match e {
                        regex_syntax::Error::Parse(e) => Some(e.span().start.offset),
                        regex_syntax::Error::Translate(e) => Some(e.span().start.offset),
                        _ => None,
                    })
                    .map_or(value.span().start, |offset| {
                        value.span().start + raw_offset(text, value.span().start, offset)
                    });
                self.push(at..at, format!("invalid regex for `{key}`: {detail}"));
                Err(())
            }
        }
    }

    /// Parses a template; with `names`, every placeholder must be one of them (`None`:
    /// the names are unknown because a regex of the rule failed, and reporting them would
    /// only repeat that error).
    fn template(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        names: Option<&BTreeSet<&str>>,
    ) -> Option<Template> {
        match Template::parse(value.get_ref()) {
            Ok(t) => {
                let Some(names) = names else { return Some(t) };
                for p in t.placeholders().filter(|p| !names.contains(p)) {
                    let known: Vec<String> = names.iter().map(|n| format!("{{{n}}}")).collect();
                    self.push(
                        value.span(),
                        format!(
                            "placeholder `{{{p}}}` in `{key}` names nothing; use one of {} (named regex captures become placeholders)",
                            known.join(", ")
                        ),
                    );
                }
                Some(t)
            }
            Err(e) => {
                self.push(value.span(), format!("invalid template for `{key}`: {e}"));
                None
            }
        }
    }
}

/// The byte offset in the file, from the opening quote of a TOML string at `start`, of
/// byte `offset` of the string's value: literal strings map one to one, basic strings
/// are walked escape by escape.
fn raw_offset(text: &str, start: usize, offset: usize) -> usize {
    let Some(raw) = text.get(start..) else {
        return 0;
    };
    let (delimiter, literal) = if raw.starts_with("\'\'\'") {
        (3, true)
    } else if raw.starts_with('\'') {
        (1, true)
    } else if raw.starts_with("\"\"\"") {
        (3, false)
    } else {
        (1, false)
    };
    let mut at = delimiter;
    // A newline right after a multi-line opening delimiter is not part of the value.
    if delimiter == 3 {
        if raw[at..].starts_with("\r\n") {
            at += 2;
        } else if raw[at..].starts_with('\n') {
            at += 1;
        }
    }
    if literal {
        return at + offset;
    }
    let mut decoded = 0;
    let mut chars = raw[at..].char_indices();
    while decoded < offset {
        let Some((_, c)) = chars.next() else { break };
        if c == '\\' {
            let width = match chars.next().map(|(_, e)| e) {
                Some('u') => 4,
                Some('U') => 8,
                _ => 0,
            };
            let hex: String = (0..width)
                .filter_map(|_| chars.next().map(|(_, h)| h))
                .collect();
            decoded += u32::from_str_radix(&hex, 16)
                .ok()
                .and_then(char::from_u32)
                .map_or(1, char::len_utf8);
        } else {
            decoded += c.len_utf8();
        }
    }
    at + chars.next().map_or(raw.len() - at, |(i, _)| i)
}

fn validate(
    path: &Path,
    text: &str,
    raw: RawConfig,
) -> Result<Config, Vec<(Range<usize>, String)>> {
    let mut p = Problemset::default();

    // [smtp]
    let listen = match &raw.smtp.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 2525)),
        Some(l) => l.get_ref().parse().unwrap_or_else(|_| {
            p.push(
                l.span(),
                format!(
                    "invalid listen address `{}`; write an IP and port such as \"127.0.0.1:2525\" or \"0.0.0.0:25\"",
                    l.get_ref()
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 2525))
        }),
    };
    let recipients = raw
        .smtp
        .recipients
        .as_ref()
        .map(|list| p.globs(list, "recipient"));
    let senders = raw
        .smtp
        .senders
        .as_ref()
        .map(|list| p.globs(list, "sender"));
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |file: &str| {
        let file = PathBuf::from(file);
        if file.is_absolute() {
            file
        } else {
            base.join(file)
        }
    };
    let tls = match (&raw.smtp.tls_cert, &raw.smtp.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: resolve(cert.get_ref()),
            key: resolve(key.get_ref()),
        }),
        (None, None) => None,
        (Some(only), None) | (None, Some(only)) => {
            p.push(
                only.span(),
                "STARTTLS needs both `tls_cert` and `tls_key` (PEM files)",
            );
            None
        }
    };
    let require_tls = raw.smtp.require_tls.as_ref().is_some_and(|r| {
        if *r.get_ref() && tls.is_none() {
            p.push(
                r.span(),
                "`require_tls = true` needs `tls_cert` and `tls_key`",
            );
        }
        *r.get_ref()
    });
    let users = raw.smtp.users.as_ref().map_or_else(BTreeMap::new, |u| {
        if tls.is_none() && !u.get_ref().is_empty() {
            p.push(u.span(), "[smtp.users] needs STARTTLS: AUTH is only offered over TLS; set `tls_cert` and `tls_key`");
        }
        u.get_ref().clone()
    });
    let require_auth = raw.smtp.require_auth.as_ref().is_some_and(|r| {
        if *r.get_ref() && users.is_empty() {
            p.push(r.span(), "`require_auth = true` needs [smtp.users], e.g. monitor = \"MAILCALL_SMTP_PASSWORD_MONITOR\"");
        }
        *r.get_ref()
    });
    let max_message_bytes = positive(
        &mut p,
        raw.smtp.max_message_bytes.as_ref(),
        "max_message_bytes",
        10 * 1024 * 1024,
    );
    let max_connections = positive(
        &mut p,
        raw.smtp.max_connections.as_ref(),
        "max_connections",
        200,
    );
    let smtp = Smtp {
        listen,
        hostname: raw
            .smtp
            .hostname
            .clone()
            .unwrap_or_else(|| "mailcall".to_string()),
        recipients,
        max_message_bytes: usize::try_from(max_message_bytes).unwrap_or(usize::MAX),
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        max_connections_per_ip: usize::try_from(positive(
            &mut p,
            raw.smtp.max_connections_per_ip.as_ref(),
            "max_connections_per_ip",
            100,
        ))
        .unwrap_or(usize::MAX),
        bare_newline: match raw.smtp.bare_newline.as_ref() {
            None => BareNewline::default(),
            Some(b) => match b.get_ref().as_str() {
                "normalize" => BareNewline::Normalize,
                "reject" => BareNewline::Reject,
                other => {
                    p.push(
                        b.span(),
                        format!(
                            "invalid `bare_newline` value `{other}`; write \"normalize\" (bare-LF lines are accepted, only <CRLF>.<CRLF> ends DATA) or \"reject\" (550 and disconnect)"
                        ),
                    );
                    BareNewline::default()
                }
            },
        },
        timeout: p.duration(
            raw.smtp.timeout.as_ref(),
            "timeout",
            Duration::from_secs(300),
        ),
        session_timeout: p.duration(
            raw.smtp.session_timeout.as_ref(),
            "session_timeout",
            Duration::from_secs(1800),
        ),
        tls,
        require_tls,
        users,
        require_auth,
        senders,
        max_auth_failures: raw
            .smtp
            .max_auth_failures
            .as_ref()
            .map_or(5, |m| *m.get_ref()),
    };

    // [twilio]
    let rt = raw.twilio.get_ref();
    if !is_e164(rt.from.get_ref()) {
        p.push(
            rt.from.span(),
            format!(
                "caller ID `{}` is not an E.164 number; write it as + and country code, e.g. \"+15005550006\"",
                rt.from.get_ref()
            ),
        );
    }
    let api_base = match &rt.api_base {
        None => "https://api.twilio.com".to_string(),
        Some(b) => {
            let s = b.get_ref().trim_end_matches('/');
            if !(s.starts_with("https://") || s.starts_with("http://")) {
                p.push(
                    b.span(),
                    format!("`api_base` must be an http(s) URL, not `{}`", b.get_ref()),
                );
            }
            s.to_string()
        }
    };
    let ring_seconds = rt.ring_seconds.as_ref().map_or(30, |r| {
        let v = *r.get_ref();
        if !(5..=600).contains(&v) {
            p.push(
                r.span(),
                format!("`ring_seconds` = {v} is outside Twilio's range; use 5 to 600"),
            );
        }
        v
    });
    let twilio = Twilio {
        from: rt.from.get_ref().clone(),
        api_base,
        ring_seconds,
        retry_for: p.duration(rt.retry_for.as_ref(), "retry_for", Duration::from_secs(600)),
        request_timeout: p.duration(
            rt.request_timeout.as_ref(),
            "request_timeout",
            Duration::from_secs(15),
        ),
        retry_initial_delay: p.duration(
            rt.retry_initial_delay.as_ref(),
            "retry_initial_delay",
            Duration::from_secs(1),
        ),
        retry_max_delay: p.duration(
            rt.retry_max_delay.as_ref(),
            "retry_max_delay",
            Duration::from_secs(60),
        ),
        reconcile_grace: p.duration(
            rt.reconcile_grace.as_ref(),
            "reconcile_grace",
            Duration::from_secs(30),
        ),
        public_url: rt.public_url.as_ref().map(|u| {
            let url = u.get_ref().trim_end_matches('/');
            if !(url.starts_with("https://") || url.starts_with("http://")) || url.contains('?') {
                p.push(u.span(), format!("`public_url` must be the http(s) URL Twilio reaches mailcall at, such as \"https://alerts.example.com\", not `{}`", u.get_ref()));
            }
            url.to_string()
        }),
        calls_per_second: rt.calls_per_second.as_ref().map(|c| {
            let v = *c.get_ref();
            if !(v > 0.0 && v <= 1000.0) {
                p.push(
                    c.span(),
                    format!("`calls_per_second` = {v} must be above 0 and at most 1000"),
                );
            }
            v
        }),
    };

    // [defaults]
    let builtins: BTreeSet<&str> = BUILTIN_PLACEHOLDERS.into_iter().collect();
    let default_message = Spanned::new(0..0, "Alert. {subject}".to_string());
    let defaults = Defaults {
        language: p
            .language(raw.defaults.language.as_ref())
            .unwrap_or_else(|| "en-US".to_string()),
        voice: p
            .voice(raw.defaults.voice.as_ref())
            .unwrap_or_else(|| "Polly.Joanna".to_string()),
        message: p
            .template(
                raw.defaults.message.as_ref().unwrap_or(&default_message),
                "defaults.message",
                Some(&builtins),
            )
            .unwrap_or_else(|| Template::parse("Alert. {subject}").unwrap()),
        cooldown: p.duration(
            raw.defaults.cooldown.as_ref(),
            "cooldown",
            Duration::from_secs(15 * 60),
        ),
        sms: raw.defaults.sms.unwrap_or(false),
        round_interval: p.duration(
            raw.defaults.round_interval.as_ref(),
            "round_interval",
            Duration::from_secs(180),
        ),
        rounds: p.rounds(raw.defaults.rounds.as_ref()).unwrap_or(3),
    };

    // [contacts] and [groups]
    let mut contacts = BTreeMap::new();
    for (name, number) in &raw.contacts {
        if !is_e164(number.get_ref()) {
            p.push(
                number.span(),
                format!(
                    "contact `{name}` has number `{}`, which is not E.164; write it as + and country code, e.g. \"+81312345678\"",
                    number.get_ref()
                ),
            );
        }
        contacts.insert(name.clone(), number.get_ref().clone());
    }
    let mut groups = BTreeMap::new();
    for (name, members) in &raw.groups {
        let mut numbers = Vec::new();
        for member in members {
            let m = member.get_ref();
            if let Some(number) = contacts.get(m) {
                numbers.push(number.clone());
            } else if is_e164(m) {
                numbers.push(m.clone());
            } else {
                p.push(
                    member.span(),
                    format!(
                        "group `{name}` lists `{m}`, which is neither a contact nor an E.164 number"
                    ),
                );
            }
        }
        if contacts.contains_key(name) {
            p.push(
                members.first().map_or(0..0, |m| m.span()),
                format!("`{name}` is both a contact and a group; rename one of them"),
            );
        }
        dedup_in_order(&mut numbers);
        groups.insert(name.clone(), numbers);
    }

    // [prompts."<language>"]: before the rules, whose resolve messages use them.
    let mut prompts = BTreeMap::new();
    for (language, table) in &raw.prompts {
        if !is_language(language) {
            p.push(
                table.span(),
                format!(
                    "[prompts.\"{language}\"] is not a language tag; write e.g. [prompts.\"ja-JP\"]"
                ),
            );
            continue;
        }
        let mut set = Prompts::builtin(language);
        for (key, value) in table.get_ref() {
            let Some((_, allowed)) = PROMPT_KEYS.iter().find(|(k, _)| k == key) else {
                let keys: Vec<&str> = PROMPT_KEYS.iter().map(|(k, _)| *k).collect();
                p.push(
                    value.span(),
                    format!(
                        "unknown prompt `{key}` in [prompts.\"{language}\"]; use one of {}",
                        keys.join(", ")
                    ),
                );
                continue;
            };
            let names: BTreeSet<&str> = allowed.iter().copied().collect();
            if p.template(value, &format!("prompts.{key}"), Some(&names))
                .is_some()
                && let Some(slot) = set.get_mut(key)
            {
                *slot = value.get_ref().clone();
            }
        }
        prompts.insert(language.to_ascii_lowercase(), set);
    }

    // [[rule]]
    let mut rules = Vec::new();
    let mut names = BTreeSet::new();
    for r in &raw.rules {
        let name = r.name.get_ref().clone();
        if RESERVED_RULE_NAMES.contains(&name.as_str()) {
            p.push(
                r.name.span(),
                format!("rule name `{name}` is reserved for alerts that come without a rule (webhook, cli, canary); rename the rule"),
            );
        }
        if !names.insert(name.clone()) {
            p.push(
                r.name.span(),
                format!("duplicate rule name `{name}`; rule names must be unique"),
            );
        }
        let from = p.regex(r.from.as_ref(), "from", text);
        let to = p.regex(r.to.as_ref(), "to", text);
        let subject = p.regex(r.subject.as_ref(), "subject", text);
        let body = p.regex(r.body.as_ref(), "body", text);
        // A broken regex names no captures; its templates are checked once it is fixed.
        let regexes_ok = [&from, &to, &subject, &body].iter().all(|r| r.is_ok());
        let [from, to, subject, body] = [from, to, subject, body].map(|r| r.ok().flatten());
        let mut placeholders = builtins.clone();
        for re in [&from, &to, &subject, &body].into_iter().flatten() {
            placeholders.extend(re.capture_names().flatten());
        }
        let drop = r.drop.as_ref().filter(|d| *d.get_ref());
        let resolve = r.resolve.as_ref().filter(|d| *d.get_ref());
        let action = match (&r.call, drop, resolve) {
            (Some(_), Some(flag), _)
            | (Some(_), None, Some(flag))
            | (None, Some(_), Some(flag)) => {
                p.push(
                    flag.span(),
                    format!("rule `{name}` mixes `call`, `drop = true` and `resolve = true`; a rule does one of them"),
                );
                RuleAction::Drop
            }
            (None, Some(_), None) => RuleAction::Drop,
            (None, None, Some(_)) => RuleAction::Resolve,
            (None, None, None) => {
                p.push(
                    r.name.span(),
                    format!("rule `{name}` has neither `call` nor `drop = true`; say whom to call, e.g. call = [\"oncall\"]"),
                );
                RuleAction::Drop
            }
            (Some(call), None, None) => {
                if call.get_ref().is_empty() {
                    p.push(call.span(), format!("rule `{name}` has an empty `call` list; name a contact, group or number, or use drop = true"));
                }
                RuleAction::Call(p.callees(
                    call.get_ref(),
                    &contacts,
                    &groups,
                    &format!("rule `{name}`"),
                ))
            }
        };
        let message = match &r.message {
            Some(m) => p.template(m, "message", regexes_ok.then_some(&placeholders)),
            None if action == RuleAction::Resolve => {
                // "Resolved." in the rule's language, then the subject.
                let language = r
                    .language
                    .as_ref()
                    .map_or(defaults.language.as_str(), |l| l.get_ref().as_str());
                let resolved = prompt_set(&prompts, language).resolved;
                let literal = resolved.replace('{', "{{").replace('}', "}}");
                Template::parse(&format!("{literal} {{subject}}")).ok()
            }
            None => Some(defaults.message.clone()),
        };
        let dedup_key = r
            .dedup_key
            .as_ref()
            .and_then(|k| p.template(k, "dedup_key", regexes_ok.then_some(&placeholders)));
        rules.push(Rule {
            name,
            from,
            to,
            subject,
            body,
            action,
            message: message.unwrap_or_else(|| defaults.message.clone()),
            language: p
                .language(r.language.as_ref())
                .unwrap_or_else(|| defaults.language.clone()),
            voice: p
                .voice(r.voice.as_ref())
                .unwrap_or_else(|| defaults.voice.clone()),
            dedup_key,
            cooldown: p.duration(r.cooldown.as_ref(), "cooldown", defaults.cooldown),
            sms: r.sms.unwrap_or(defaults.sms),
            round_interval: p.duration(
                r.round_interval.as_ref(),
                "round_interval",
                defaults.round_interval,
            ),
            rounds: p.rounds(r.rounds.as_ref()).unwrap_or(defaults.rounds),
        });
    }

    // [state] and [limits]
    let state_path = PathBuf::from(raw.state.path.as_deref().unwrap_or("mailcall.db"));
    let state = State {
        path: if state_path.is_absolute() {
            state_path
        } else {
            base.join(state_path)
        },
        max_bytes: raw.state.max_bytes.as_ref().map(|m| *m.get_ref()),
        retain: p.duration(
            raw.state.retain.as_ref(),
            "retain",
            Duration::from_secs(30 * 24 * 3600),
        ),
    };
    let limits = Limits {
        max_calls_per_hour: raw
            .limits
            .max_calls_per_hour
            .as_ref()
            .map_or(60, |m| *m.get_ref()),
    };

    // [http], [sendgrid], [webhook]
    let http = raw.http.as_ref().map(|h| Http {
        listen: h.listen.get_ref().parse().unwrap_or_else(|_| {
            p.push(
                h.listen.span(),
                format!(
                    "invalid listen address `{}`; write an IP and port such as \"127.0.0.1:8025\"",
                    h.listen.get_ref()
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 8025))
        }),
        request_timeout: p.duration(
            h.request_timeout.as_ref(),
            "request_timeout",
            Duration::from_secs(30),
        ),
        max_body_bytes: usize::try_from(positive(
            &mut p,
            h.max_body_bytes.as_ref(),
            "max_body_bytes",
            1024 * 1024,
        ))
        .unwrap_or(usize::MAX),
        max_connections: usize::try_from(positive(
            &mut p,
            h.max_connections.as_ref(),
            "max_connections",
            512,
        ))
        .unwrap_or(usize::MAX),
        max_connections_per_ip: usize::try_from(positive(
            &mut p,
            h.max_connections_per_ip.as_ref(),
            "max_connections_per_ip",
            20,
        ))
        .unwrap_or(usize::MAX),
        header_timeout: {
            let t = p.duration(
                h.header_timeout.as_ref(),
                "header_timeout",
                Duration::from_secs(10),
            );
            if let Some(v) = h.header_timeout.as_ref().filter(|_| t.is_zero()) {
                p.push(
                    v.span(),
                    "`header_timeout` must be greater than 0; write e.g. \"10s\"",
                );
            }
            t
        },
    });
    let sendgrid = raw.sendgrid.as_ref().map(|sg| {
        if http.is_none() {
            p.push(sg.span(), "[sendgrid] needs an HTTP server; add [http] with listen = \"127.0.0.1:8025\"");
        }
        let sg = sg.get_ref();
        let path = sg.path.as_ref().map_or("/sendgrid/inbound".to_string(), |path| {
            if !path.get_ref().starts_with('/') {
                p.push(path.span(), format!("`path` must start with `/`, not `{}`", path.get_ref()));
            }
            path.get_ref().clone()
        });
        let basic = match (&sg.username, &sg.password_env) {
            (Some(user), Some(env)) => Some((user.clone(), env.get_ref().clone())),
            (None, None) => None,
            (_, Some(env)) => {
                p.push(env.span(), "`password_env` needs `username` too");
                None
            }
            (Some(_), None) => {
                p.push(sg.path.as_ref().map_or(0..0, Spanned::span), "`username` needs `password_env`: the name of the environment variable holding the password");
                None
            }
        };
        let public_key = sg.public_key.as_ref().and_then(|k| match parse_public_key(k.get_ref()) {
            Ok(key) => Some(key),
            Err(e) => {
                p.push(k.span(), format!("invalid `public_key`: {e}; paste the verification key SendGrid shows (base64 DER)"));
                None
            }
        });
        Sendgrid {
            path,
            basic,
            public_key,
            max_age: p.duration(sg.max_age.as_ref(), "max_age", Duration::from_secs(600)),
            require_spf: sg.require_spf.unwrap_or(false),
            require_dkim: sg.require_dkim.unwrap_or(false),
            max_body_bytes: 40 * 1024 * 1024,
        }
    });
    let webhook = raw.webhook.as_ref().map(|w| {
        if http.is_none() {
            p.push(
                w.token_env.span(),
                "[webhook] needs an HTTP server; add [http] with listen = \"127.0.0.1:8025\"",
            );
        }
        let numbers = match w.numbers.as_ref() {
            None => WebhookNumbers::Contacts,
            Some(n) if n.get_ref() == "contacts" => WebhookNumbers::Contacts,
            Some(n) if n.get_ref() == "any" => WebhookNumbers::Any,
            Some(n) => {
                p.push(n.span(), format!("`numbers` must be \"contacts\" (only numbers of [contacts] and [groups]) or \"any\", not `{}`", n.get_ref()));
                WebhookNumbers::Contacts
            }
        };
        Webhook {
            token_env: w.token_env.get_ref().clone(),
            numbers,
        }
    });

    let bridge_pin = raw.bridge.as_ref().and_then(|b| b.pin.as_ref()).map(|pin| {
        if !(4..=12).contains(&pin.get_ref().len())
            || !pin.get_ref().bytes().all(|b| b.is_ascii_digit())
        {
            p.push(pin.span(), "`pin` must be 4 to 12 digits");
        }
        pin.get_ref().clone()
    });
    if let Some(url) = &raw.twilio.get_ref().public_url
        && http.is_none()
    {
        p.push(url.span(), "`public_url` needs the HTTP server that Twilio calls back; add [http] listen = \"127.0.0.1:8025\"");
    }
    let canary = raw.canary.as_ref().map(|c| {
        let every = p.duration(Some(&c.every), "every", Duration::from_secs(86_400));
        if every < Duration::from_secs(60) {
            p.push(
                c.every.span(),
                "`every` must be at least \"1m\"; a canary is a daily or hourly check",
            );
        }
        if c.call.get_ref().is_empty() {
            p.push(
                c.call.span(),
                "[canary] `call` is empty; name who should get the test call",
            );
        }
        Canary {
            every,
            numbers: p.callees(c.call.get_ref(), &contacts, &groups, "[canary]"),
            message: c.message.clone().unwrap_or_else(|| {
                "This is the mailcall test call. The alert path works. No action is needed.".into()
            }),
        }
    });

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        path: path.to_path_buf(),
        smtp,
        twilio,
        defaults,
        contacts,
        groups,
        rules,
        state,
        limits,
        http,
        sendgrid,
        webhook,
        canary,
        bridge_pin,
        prompts,
    })
}

/// [`Config::prompts`] before there is a `Config`.
fn prompt_set(prompts: &BTreeMap<String, Prompts>, language: &str) -> Prompts {
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

fn positive(p: &mut Problemset, value: Option<&Spanned<u64>>, key: &str, default: u64) -> u64 {
    match value {
        None => default,
        Some(v) if *v.get_ref() == 0 => {
            p.push(v.span(), format!("`{key}` must be greater than 0"));
            default
        }
        Some(v) => *v.get_ref(),
    }
}

/// Removes repeated entries, keeping the first occurrence and the order.
pub fn dedup_in_order(items: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    items.retain(|i| seen.insert(i.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[twilio]\nfrom = \"+15005550006\"\n";

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(Path::new("rules.toml"), text) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid(p)) => p.to_string().lines().map(String::from).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn languages_and_voices() {
        for ok in ["en-US", "ja-JP", "cmn-CN", "en", "zh-Hant-TW"] {
            assert!(is_language(ok), "{ok}");
        }
        for bad in ["", "e", "english", "en_US", "en-US\"", "ja-JP ", "\u{fffe}"] {
            assert!(!is_language(bad), "{bad:?}");
        }
        for ok in [
            "alice",
            "Polly.Joanna",
            "Polly.Mizuki-Neural",
            "Google.en-US-Standard-C",
        ] {
            assert!(is_voice(ok), "{ok}");
        }
        for bad in ["", ".x", "Polly Joanna", "a\"b", &"x".repeat(65)] {
            assert!(!is_voice(bad), "{bad:?}");
        }
        let got = problems(&format!(
            "{MINIMAL}[defaults]\nvoice = \"Polly Joanna\"\nlanguage = \"english\"\n"
        ));
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn e164() {
        for ok in ["+15005550006", "+81312345678", "+44"] {
            assert!(is_e164(ok), "{ok}");
        }
        for bad in [
            "15005550006",
            "+0123",
            "+1",
            "+1 500 555",
            "+1234567890123456",
            "",
            "+",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }

    #[test]
    fn minimal_config_has_sane_defaults() {
        let c = Config::parse(Path::new("/etc/mailcall/rules.toml"), MINIMAL).unwrap();
        assert_eq!(c.smtp.listen.to_string(), "127.0.0.1:2525");
        assert_eq!(c.smtp.max_message_bytes, 10 * 1024 * 1024);
        assert_eq!(c.twilio.api_base, "https://api.twilio.com");
        assert_eq!(c.twilio.ring_seconds, 30);
        assert_eq!(c.defaults.cooldown, Duration::from_secs(900));
        assert_eq!(c.limits.max_calls_per_hour, 60);
        assert_eq!(c.state.path, Path::new("/etc/mailcall/mailcall.db"));
        assert_eq!(c.smtp.max_connections_per_ip, 100);
        assert_eq!(c.smtp.bare_newline, BareNewline::Normalize);
    }

    #[test]
    fn bare_newline_is_normalize_or_reject() {
        let c = Config::parse(
            Path::new("rules.toml"),
            &format!("{MINIMAL}[smtp]\nbare_newline = \"reject\"\n"),
        )
        .unwrap();
        assert_eq!(c.smtp.bare_newline, BareNewline::Reject);
        let got = problems(&format!("{MINIMAL}[smtp]\nbare_newline = \"yes\"\n"));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("rules.toml:4:") && got[0].contains("`yes`"),
            "{got:?}"
        );
    }

    #[test]
    fn groups_and_calls_resolve_to_unique_numbers() {
        let c = Config::parse(
            Path::new("r.toml"),
            &format!(
                "{MINIMAL}[contacts]\nalice = \"+15005550001\"\nbob = \"+15005550002\"\n\
                 [groups]\noncall = [\"alice\", \"bob\", \"+15005550003\"]\n\
                 [[rule]]\nname = \"all\"\ncall = [\"bob\", \"oncall\", \"+15005550009\", \"+15005550001\"]\n"
            ),
        )
        .unwrap();
        assert_eq!(
            c.rules[0].action,
            RuleAction::Call(vec![
                "+15005550002".into(),
                "+15005550001".into(),
                "+15005550003".into(),
                "+15005550009".into()
            ])
        );
    }

    #[test]
    fn reports_every_problem_with_position() {
        let text = format!(
            "{MINIMAL}[contacts]\nalice = \"5550001\"\n\
             [[rule]]\nname = \"a\"\nsubject = '(unclosed'\ncall = [\"bobb\"]\nmessage = \"{{host}} down\"\n\
             [[rule]]\nname = \"b\"\n"
        );
        let got = problems(&text);
        // The broken regex names no captures, so `{host}` is not reported on top of it.
        assert_eq!(got.len(), 4, "{got:#?}");
        assert!(
            got[0].starts_with("rules.toml:4:9: contact `alice` has number `5550001`"),
            "{}",
            got[0]
        );
        assert!(
            got[1].starts_with("rules.toml:7:12: invalid regex for `subject`"),
            "{}",
            got[1]
        );
        assert!(
            got[2].starts_with("rules.toml:8:9: `bobb` in rule `a` is neither"),
            "{}",
            got[2]
        );
        assert!(
            got[3].starts_with("rules.toml:11:8: rule `b` has neither `call` nor `drop = true`"),
            "{}",
            got[3]
        );
    }

    #[test]
    fn defect_7_regex_errors_point_into_the_pattern_and_suppress_follow_on_errors() {
        // Literal, basic (with escapes) and multi-line strings: the column is that of the
        // offending character inside the pattern.
        for (pattern, line, column) in [
            ("'(?P<host>\\w+) is [DOWN'", 5, 29),
            ("\"\\u00e9(?P<host>\\\\w+) (?z)\"", 5, 35),
            ("\'\'\'\n^x+ (?P<h>\\S+\'\'\'", 6, 5),
        ] {
            let text = format!(
                "{MINIMAL}[[rule]]\nname = \"r\"\nsubject = {pattern}\ncall = [\"+15005550001\"]\nmessage = \"{{host}} {{h}} down\"\n"
            );
            let got = problems(&text);
            assert_eq!(got.len(), 1, "{pattern}: {got:#?}");
            let at = format!("rules.toml:{line}:{column}: invalid regex for `subject`");
            assert!(got[0].starts_with(&at), "{pattern}: {} (want {at})", got[0]);
        }
    }

    #[test]
    fn prompts_per_language_are_overridden_and_checked() {
        let c = Config::parse(
            Path::new("r.toml"),
            &format!(
                "{MINIMAL}[prompts.\"ja-JP\"]\ngoodbye = \"さようなら。\"\njoined = \"{{who}} 参加\"\n\
                 [[rule]]\nname = \"up\"\nsubject = 'UP'\nresolve = true\nlanguage = \"ja-JP\"\n"
            ),
        )
        .unwrap();
        let ja = c.prompts("ja-JP");
        assert_eq!(ja.goodbye, "さようなら。");
        assert_eq!(ja.joined("bob"), "bob 参加");
        assert_eq!(ja.press_one, Prompts::builtin("ja-JP").press_one);
        assert_eq!(c.prompts("en-US"), Prompts::builtin("en-US"));
        assert_eq!(c.rules[0].message.to_string(), "復旧しました。 {subject}");
        let got = problems(&format!(
            "{MINIMAL}[prompts.\"ja-JP\"]\ngoodby = \"x\"\njoined = \"{{whom}}\"\n[prompts.japanese]\ngoodbye = \"x\"\n"
        ));
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got[0].contains("unknown prompt `goodby`"), "{got:?}");
        assert!(
            got[1].contains("placeholder `{whom}` in `prompts.joined`"),
            "{got:?}"
        );
        assert!(got[2].contains("is not a language tag"), "{got:?}");
    }

    #[test]
    fn unknown_keys_and_syntax_errors_point_at_the_spot() {
        let got = problems(&format!(
            "{MINIMAL}[smtp]\nlisten = \"127.0.0.1:25\"\nlisen = 1\n"
        ));
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("rules.toml:5:1: unknown field `lisen`"),
            "{}",
            got[0]
        );
        let got = problems("[twilio\n");
        assert!(got[0].starts_with("rules.toml:1:"), "{}", got[0]);
    }

    #[test]
    fn captures_are_placeholders_and_bad_templates_are_reported() {
        let ok = format!(
            "{MINIMAL}[[rule]]\nname = \"h\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"+15005550001\"]\n\
             message = \"{{host}} down: {{subject}} {{rule}}\"\ndedup_key = \"{{host}}\"\n"
        );
        assert!(problems(&ok).is_empty(), "{:?}", problems(&ok));
        let bad = format!("{MINIMAL}[[rule]]\nname = \"h\"\ndrop = true\ndedup_key = \"{{host\"\n");
        let got = problems(&bad);
        assert!(got[0].contains("unclosed placeholder"), "{got:?}");
    }

    #[test]
    fn a_rule_calls_drops_or_resolves() {
        let ok = format!("{MINIMAL}[[rule]]\nname = \"up\"\nsubject = 'UP'\nresolve = true\n");
        let c = Config::parse(Path::new("r.toml"), &ok).unwrap();
        assert_eq!(c.rules[0].action, RuleAction::Resolve);
        assert_eq!(c.rules[0].message.to_string(), "Resolved. {subject}");
        let got = problems(&format!(
            "{MINIMAL}[[rule]]\nname = \"x\"\ncall = [\"+15005550001\"]\nresolve = true\n"
        ));
        assert!(got[0].contains("a rule does one of them"), "{got:?}");
        let got = problems(&format!("{MINIMAL}[defaults]\nrounds = 0\n"));
        assert!(
            got[0].contains("`rounds` = 0 must be between 1 and 10"),
            "{got:?}"
        );
    }

    #[test]
    fn rule_names_of_rule_less_alerts_are_reserved() {
        let got = problems(&format!(
            "{MINIMAL}[[rule]]\nname = \"canary\"\ndrop = true\n"
        ));
        assert!(got[0].contains("rule name `canary` is reserved"), "{got:?}");
    }

    #[test]
    fn call_and_drop_together_is_an_error() {
        let got = problems(&format!(
            "{MINIMAL}[[rule]]\nname = \"x\"\ncall = [\"+15005550001\"]\ndrop = true\n"
        ));
        assert!(
            got[0].contains("mixes `call`, `drop = true` and `resolve = true`"),
            "{got:?}"
        );
    }

    #[test]
    fn bad_durations_and_globs() {
        let got = problems(&format!(
            "{MINIMAL}[defaults]\ncooldown = \"15 minutes please\"\n[smtp]\nrecipients = [\"a@[b\"]\n"
        ));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains("invalid duration"), "{got:?}");
        assert!(got[1].contains("invalid recipient pattern"), "{got:?}");
    }

    #[test]
    fn recipient_globs_are_case_insensitive() {
        let c = Config::parse(
            Path::new("r.toml"),
            &format!(
                "{MINIMAL}[smtp]\nrecipients = [\"alerts@example.com\", \"*@pager.example.com\"]\n"
            ),
        )
        .unwrap();
        let r = c.smtp.recipients.unwrap();
        assert!(r.matches("Alerts@Example.com"));
        assert!(r.matches("ops.team@pager.example.com"));
        assert!(!r.matches("someone@example.com"));
        assert!(!r.matches("x@pager.example.com.evil.org"));
    }

    #[test]
    fn http_limits_webhook_numbers_and_the_unauthenticated_sendgrid_warning() {
        let http = "[http]\nlisten = \"127.0.0.1:8025\"\n";
        let c = Config::parse(
            Path::new("r.toml"),
            &format!("{MINIMAL}{http}[webhook]\ntoken_env = \"T\"\n[sendgrid]\n"),
        )
        .unwrap();
        let h = c.http.as_ref().unwrap();
        assert_eq!(h.header_timeout, Duration::from_secs(10));
        assert_eq!(h.max_connections_per_ip, 20);
        assert_eq!(h.max_connections, 512);
        assert_eq!(
            c.webhook.as_ref().unwrap().numbers,
            WebhookNumbers::Contacts
        );
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("anyone who finds /sendgrid/inbound"));

        let c = Config::parse(
            Path::new("r.toml"),
            &format!("{MINIMAL}{http}header_timeout = \"3s\"\nmax_connections_per_ip = 2\n[webhook]\ntoken_env = \"T\"\nnumbers = \"any\"\n[sendgrid]\nusername = \"u\"\npassword_env = \"P\"\n"),
        )
        .unwrap();
        assert_eq!(
            c.http.as_ref().unwrap().header_timeout,
            Duration::from_secs(3)
        );
        assert_eq!(c.http.as_ref().unwrap().max_connections_per_ip, 2);
        assert_eq!(c.webhook.as_ref().unwrap().numbers, WebhookNumbers::Any);
        assert!(c.warnings().is_empty());

        let got = problems(&format!(
            "{MINIMAL}{http}header_timeout = \"0s\"\nmax_connections_per_ip = 0\n[webhook]\ntoken_env = \"T\"\nnumbers = \"all\"\n"
        ));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got[0].starts_with("rules.toml:5:18: `header_timeout` must be greater than 0"),
            "{got:?}"
        );
        assert!(
            got[1].contains("`max_connections_per_ip` must be"),
            "{got:?}"
        );
        assert!(got[2].contains("`numbers` must be \"contacts\""), "{got:?}");
    }
}
