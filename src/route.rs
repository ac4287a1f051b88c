//! Routing: `(Config, Alert) → Decision`. Pure: no I/O, no clock, no randomness.
//!
//! `mailcall route` and the daemon call the same [`route`], so what `route` prints is
//! exactly what `serve` does with the same mail.

use std::time::Duration;

use regex::Regex;

use crate::alert::{Alert, DirectAlert};
use crate::config::{Config, Rule, RuleAction, is_language, is_voice};
use crate::oncall::{OnCall, Policy};
use crate::speech;
use crate::twilio::twiml;

/// What to do with one alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The first rule that matched, if any.
    pub rule: Option<String>,
    pub action: Action,
    /// E.164 numbers to call at once (empty unless `action` is `Call`).
    pub numbers: Vec<String>,
    /// The spoken text, cleaned and cut to what Twilio accepts.
    pub message: String,
    pub language: String,
    pub voice: String,
    /// Alerts with the same key within `cooldown` belong to one incident.
    pub dedup_key: String,
    pub cooldown: Duration,
    /// Also text each called number (`sms = true`).
    pub sms: bool,
    /// The alert's subject (a direct alert's message), for the SMS summary.
    pub subject: String,
    /// Rounds of calls until someone is in the bridge, and the time each one gets.
    pub rounds: u32,
    pub round_interval: Duration,
    /// The silence that mutes this alert: it is recorded as silenced and rings nobody.
    pub silenced_by: Option<i64>,
    /// Who is rung too if nobody is in the bridge after each step's time.
    pub escalations: Vec<EscalationStep>,
    /// How the decision came about, for `mailcall route`.
    pub trace: Trace,
}

/// One `escalate` step, its rotations resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscalationStep {
    pub after: Duration,
    pub numbers: Vec<String>,
}

/// What `mailcall route` shows besides the decision: the time, rules that matched but
/// were outside their `when`, the matching rule's `when`, and who was on call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    /// `(rule, why it did not apply)`.
    pub skipped: Vec<(String, String)>,
    /// The applying rule's time condition, as written.
    pub when: Option<String>,
    /// Each rotation named by the call list or the escalations, and who it rang.
    pub on_call: Vec<OnCall>,
}

/// The dedup key of a heartbeat's incident.
pub fn heartbeat_key(name: &str) -> String {
    format!("heartbeat: {name}")
}

/// The outcomes of routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Call,
    Drop,
    /// Closes the open incident with the same dedup key.
    Resolve,
    /// No rule matched: nobody is called and the mail is logged as unrouted.
    None,
    /// A heartbeat's beat: recorded, and its missed-beat incident resolved.
    Beat,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Call => "call",
            Action::Drop => "drop",
            Action::Resolve => "resolve",
            Action::None => "none",
            Action::Beat => "beat",
        }
    }
}

/// Finds the first matching rule that applies at `policy.now` and renders its message
/// and dedup key; a mail matching a `[[heartbeat]]` is that heartbeat's beat.
pub fn route(config: &Config, alert: &Alert, policy: &Policy) -> Decision {
    for hb in config.heartbeats.iter().filter(|h| h.matches_mail()) {
        if matches([&hb.from, &hb.to, &hb.subject, &hb.body], alert).is_some() {
            return beat(config, &hb.name, alert.subject.clone());
        }
    }
    let mut skipped = Vec::new();
    for rule in &config.rules {
        let Some(captures) = matches([&rule.from, &rule.to, &rule.subject, &rule.body], alert)
        else {
            continue;
        };
        if let Some(when) = &rule.when
            && let Err(why) = when.check(policy.now)
        {
            skipped.push((rule.name.clone(), why));
            continue;
        }
        let mut d = decide(config, rule, alert, &captures, policy);
        d.trace.skipped = skipped;
        return d;
    }
    Decision {
        rule: None,
        action: Action::None,
        numbers: Vec::new(),
        message: String::new(),
        language: config.defaults.language.clone(),
        voice: config.defaults.voice.clone(),
        dedup_key: String::new(),
        cooldown: config.defaults.cooldown,
        sms: false,
        subject: alert.subject.clone(),
        rounds: config.defaults.rounds,
        round_interval: config.defaults.round_interval,
        silenced_by: None,
        escalations: Vec::new(),
        trace: Trace {
            skipped,
            ..Trace::default()
        },
    }
}

/// A heartbeat's beat (a matching mail or `POST /heartbeat/<name>`): the heartbeat's
/// name stands where a rule's would; the message is what a resolution announces.
fn beat(config: &Config, name: &str, subject: String) -> Decision {
    let hb = config.heartbeats.iter().find(|h| h.name == name);
    let language = hb.map_or(config.defaults.language.clone(), |h| h.language.clone());
    let voice = hb.map_or(config.defaults.voice.clone(), |h| h.voice.clone());
    let text = format!("{} {name}", config.prompts(&language).resolved);
    let message = twiml::fit(&speech::speakable(&text, &language), &language, &voice).to_string();
    Decision {
        rule: Some(name.to_string()),
        action: Action::Beat,
        numbers: Vec::new(),
        message,
        language,
        voice,
        dedup_key: heartbeat_key(name),
        cooldown: config.defaults.cooldown,
        sms: false,
        subject,
        rounds: config.defaults.rounds,
        round_interval: config.defaults.round_interval,
        silenced_by: None,
        escalations: Vec::new(),
        trace: Trace::default(),
    }
}

/// The first silence in force at `policy.now` that mutes an alert whose fields `field`
/// gives; silences naming a capture `config` no longer has are ignored.
fn silenced(config: &Config, policy: &Policy, field: &dyn Fn(&str) -> Vec<String>) -> Option<i64> {
    if policy.silences.is_empty() {
        return None;
    }
    let known = config.silence_names();
    policy
        .silences
        .iter()
        .filter(|s| s.unknown_names(&known).is_empty())
        .find(|s| s.silences(policy.now, field))
        .map(|s| s.id)
}

/// The decision for a [`DirectAlert`]: its own numbers and words, the defaults for the
/// rest. `source` (`webhook`, `cli`) stands where a rule name would.
pub fn direct(config: &Config, source: &str, alert: &DirectAlert, policy: &Policy) -> Decision {
    let heartbeat = alert
        .heartbeat
        .as_deref()
        .and_then(|name| config.heartbeats.iter().find(|h| h.name == name));
    if alert.beat {
        let name = alert.heartbeat.as_deref().unwrap_or_default();
        return beat(config, name, alert.message.clone());
    }
    // Ingest validates these; anything invalid that got this far falls back to the
    // defaults rather than making TwiML Twilio refuses.
    let language = alert
        .language
        .clone()
        .filter(|l| is_language(l))
        .or_else(|| heartbeat.map(|h| h.language.clone()))
        .unwrap_or_else(|| config.defaults.language.clone());
    let voice = alert
        .voice
        .clone()
        .filter(|v| is_voice(v))
        .or_else(|| heartbeat.map(|h| h.voice.clone()))
        .unwrap_or_else(|| config.defaults.voice.clone());
    // A missed heartbeat rings whoever its `call` names now (its rotations resolved
    // when it is routed, like a rule's).
    let (numbers, on_call) = match heartbeat {
        Some(h) => config.resolve(&h.call, policy),
        None => (alert.numbers.clone(), Vec::new()),
    };
    let silenced_by = silenced(config, policy, &|name| match name {
        "rule" => vec![source.to_string()],
        "subject" => vec![alert.message.clone()],
        _ => Vec::new(),
    });
    let spoken = speech::speakable(&alert.message, &language);
    let message = twiml::fit(&spoken, &language, &voice).to_string();
    let dedup_key = match (&alert.dedup_key, &alert.heartbeat) {
        (Some(key), _) => key.clone(),
        (None, Some(name)) => heartbeat_key(name),
        (None, None) => format!("{source}: {}", normalise_subject(&alert.message)),
    };
    Decision {
        rule: Some(source.to_string()),
        action: Action::Call,
        numbers,
        message,
        language,
        voice,
        dedup_key,
        cooldown: config.defaults.cooldown,
        sms: config.defaults.sms,
        subject: alert.message.clone(),
        rounds: config.defaults.rounds,
        round_interval: config.defaults.round_interval,
        silenced_by,
        escalations: Vec::new(),
        trace: Trace {
            on_call,
            ..Trace::default()
        },
    }
}

/// Resolves a comma-separated list of contacts, groups and E.164 numbers; `Err` names
/// every entry that is none of them.
pub fn resolve_numbers(config: &Config, list: &str) -> Result<Vec<String>, Vec<String>> {
    let mut numbers = Vec::new();
    let mut unknown = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match config.resolve_callee(entry) {
            Some(found) => numbers.extend(found),
            None => unknown.push(entry.to_string()),
        }
    }
    if !unknown.is_empty() {
        return Err(unknown);
    }
    crate::config::dedup_in_order(&mut numbers);
    Ok(numbers)
}

/// The default dedup key ingredient: the subject without reply prefixes, case and
/// spacing differences, so a storm of the same alert lands on one incident.
pub fn normalise_subject(subject: &str) -> String {
    let mut s = subject.trim();
    loop {
        let lower = s.to_ascii_lowercase();
        let Some(prefix) = ["re:", "fwd:", "fw:", "aw:"]
            .iter()
            .find(|p| lower.starts_with(**p))
        else {
            break;
        };
        s = s[prefix.len()..].trim_start();
    }
    collapse_whitespace(&s.to_lowercase())
}

fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Named captures collected from every matcher of a rule.
type Captures = Vec<(String, String)>;

/// Do the match fields `[from, to, subject, body]` (a rule's or a heartbeat's) match
/// `alert`? Every given one must match; the named captures of all of them become
/// placeholders.
fn matches(fields: [&Option<Regex>; 4], alert: &Alert) -> Option<Captures> {
    let [from, to, subject, body] = fields;
    let mut captures = Vec::new();
    let mut check = |re: &Option<Regex>, candidates: &mut dyn Iterator<Item = &str>| -> bool {
        let Some(re) = re else { return true };
        for text in candidates {
            if let Some(c) = re.captures(text) {
                for name in re.capture_names().flatten() {
                    if let Some(m) = c.name(name) {
                        captures.push((name.to_string(), m.as_str().to_string()));
                    }
                }
                return true;
            }
        }
        false
    };
    let ok = check(from, &mut std::iter::once(alert.from.as_str()))
        && check(to, &mut alert.to.iter().map(String::as_str))
        && check(subject, &mut std::iter::once(alert.subject.as_str()))
        && check(body, &mut std::iter::once(alert.body.as_str()));
    ok.then_some(captures)
}

/// A template placeholder's value: the alert's fields (the body as it came), the rule's
/// name and its captures.
fn template_field<'a>(
    name: &str,
    alert: &'a Alert,
    to: &'a str,
    rule: &'a Rule,
    captures: &'a Captures,
) -> Option<&'a str> {
    match name {
        "subject" => Some(alert.subject.as_str()),
        "from" => Some(alert.from.as_str()),
        "to" => Some(to),
        "body" => Some(alert.body.as_str()),
        "rule" => Some(rule.name.as_str()),
        other => captures
            .iter()
            .find(|(n, _)| n == other)
            .map(|(_, v)| v.as_str()),
    }
}

fn decide(
    config: &Config,
    rule: &Rule,
    alert: &Alert,
    captures: &Captures,
    policy: &Policy,
) -> Decision {
    let to = alert.to_joined();
    // What the call says gets the body without quoted history or a forward's header
    // block, cleaned before the template puts words of its own in front of it (only
    // if it uses the body: a body may be megabytes). The dedup key gets the body as
    // it came: keys stay what they were, and cleaning must never merge two problems.
    let spoken_body = if rule.message.placeholders().any(|p| p == "body") {
        speech::unquoted(&alert.body)
    } else {
        String::new()
    };
    let field = |name: &str| template_field(name, alert, &to, rule, captures);
    let spoken_lookup = |name: &str| match name {
        "body" => Some(spoken_body.as_str()),
        other => field(other),
    };
    let spoken = speech::speakable(&rule.message.render(spoken_lookup), &rule.language);
    let message = twiml::fit(&spoken, &rule.language, &rule.voice).to_string();
    let dedup_key = match &rule.dedup_key {
        Some(t) => t.render(field),
        None => format!("{}: {}", rule.name, normalise_subject(&alert.subject)),
    };
    let mut on_call = Vec::new();
    let (action, numbers) = match &rule.action {
        RuleAction::Call(callees) => {
            let (numbers, who) = config.resolve(callees, policy);
            on_call.extend(who);
            (Action::Call, numbers)
        }
        RuleAction::Drop => (Action::Drop, Vec::new()),
        RuleAction::Resolve => (Action::Resolve, Vec::new()),
    };
    let escalations = if action == Action::Call {
        rule.escalate
            .iter()
            .map(|step| {
                let (numbers, who) = config.resolve(&step.call, policy);
                on_call.extend(who);
                EscalationStep {
                    after: step.after,
                    numbers,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let silenced_by = (action == Action::Call)
        .then(|| {
            silenced(config, policy, &|name| match name {
                "to" => alert.to.clone(),
                "body" => Vec::new(),
                other => field(other).map(str::to_string).into_iter().collect(),
            })
        })
        .flatten();
    Decision {
        rule: Some(rule.name.clone()),
        action,
        numbers,
        message,
        language: rule.language.clone(),
        voice: rule.voice.clone(),
        dedup_key,
        cooldown: rule.cooldown,
        sms: rule.sms,
        subject: alert.subject.clone(),
        rounds: rule.rounds,
        round_interval: rule.round_interval,
        silenced_by,
        escalations,
        trace: Trace {
            skipped: Vec::new(),
            when: rule.when.as_ref().map(ToString::to_string),
            on_call,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A Tuesday afternoon in Tokyo.
    const NOW: &str = "2026-11-24T06:00:00Z";

    fn config(rules: &str) -> Config {
        let text = format!(
            "[twilio]\nfrom = \"+15005550006\"\n[contacts]\nalice = \"+15005550001\"\nbob = \"+15005550002\"\n\
             [groups]\noncall = [\"alice\", \"bob\"]\n{rules}"
        );
        Config::parse(Path::new("r.toml"), &text).unwrap()
    }

    fn alert(from: &str, subject: &str, body: &str) -> Alert {
        Alert {
            from: from.into(),
            to: vec!["alerts@example.com".into()],
            subject: subject.into(),
            body: body.into(),
            ..Alert::default()
        }
    }

    #[test]
    fn first_match_wins_and_captures_fill_templates() {
        let c = config(
            "[[rule]]\nname = \"recoveries\"\nsubject = '(?i)\\b(recovered|resolved|ok)\\b'\ndrop = true\n\
             [[rule]]\nname = \"host down\"\nfrom = '@monitoring\\.example\\.com$'\n\
             subject = '(?P<host>[\\w.-]+) is DOWN'\ncall = [\"oncall\", \"+15005550009\"]\n\
             message = \"{host} is down. {subject}\"\nlanguage = \"ja-JP\"\nvoice = \"Polly.Mizuki\"\n\
             dedup_key = \"{host}\"\n",
        );
        let d = route(
            &c,
            &alert(
                "nagios@monitoring.example.com",
                "db1.example.com is DOWN",
                "",
            ),
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!(d.rule.as_deref(), Some("host down"));
        assert_eq!(d.action, Action::Call);
        assert_eq!(d.numbers, ["+15005550001", "+15005550002", "+15005550009"]);
        assert_eq!(
            d.message,
            "db1 ドット example ドット com is down. db1 ドット example ドット com is DOWN"
        );
        assert_eq!(d.dedup_key, "db1.example.com");
        assert_eq!(
            (d.language.as_str(), d.voice.as_str()),
            ("ja-JP", "Polly.Mizuki")
        );

        let d = route(
            &c,
            &alert("nagios@monitoring.example.com", "db1 is DOWN: RESOLVED", ""),
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!(
            (d.rule.as_deref(), d.action),
            (Some("recoveries"), Action::Drop)
        );

        let d = route(
            &c,
            &alert("someone@else.example.org", "db1 is DOWN", ""),
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!((d.rule, d.action), (None, Action::None));
        assert!(d.numbers.is_empty());
    }

    #[test]
    fn default_dedup_key_is_rule_and_normalised_subject() {
        let c = config("[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n");
        let a = route(
            &c,
            &alert("x@y", "Re:  FWD: Disk  FULL on web1", ""),
            &Policy::at(NOW.parse().unwrap()),
        );
        let b = route(
            &c,
            &alert("x@y", "disk full on WEB1", ""),
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!(a.dedup_key, "all: disk full on web1");
        assert_eq!(a.dedup_key, b.dedup_key);
        assert_eq!(a.message, "Alert. Re: FWD: Disk FULL on web1");
    }

    #[test]
    fn every_given_matcher_must_match() {
        let c = config(
            "[[rule]]\nname = \"body\"\nto = '^alerts@'\nbody = 'severity: (?P<sev>\\w+)'\n\
             call = [\"bob\"]\nmessage = \"{sev} {rule} for {to}\"\n",
        );
        let d = route(
            &c,
            &alert("a@b", "x", "host: web\nseverity: critical\n"),
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!(d.message, "critical body for alerts at example dot com");
        let d = route(
            &c,
            &alert("a@b", "x", "no severity here"),
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!(d.action, Action::None);
    }

    #[test]
    fn direct_alerts_use_their_own_numbers_and_the_defaults() {
        let c = config("");
        let d = direct(
            &c,
            "webhook",
            &DirectAlert {
                numbers: vec!["+15005550009".into()],
                message: "DB is down https://x/y".into(),
                ..Default::default()
            },
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!(
            (d.rule.as_deref(), d.action),
            (Some("webhook"), Action::Call)
        );
        assert_eq!(d.message, "DB is down link");
        assert_eq!(d.dedup_key, "webhook: db is down https://x/y");
        assert_eq!(d.voice, "Polly.Joanna");
    }

    #[test]
    fn numbers_resolve_from_contacts_groups_and_e164() {
        let c = config("");
        assert_eq!(
            resolve_numbers(&c, "oncall, +15005550009,alice").unwrap(),
            ["+15005550001", "+15005550002", "+15005550009"]
        );
        assert_eq!(
            resolve_numbers(&c, "bob,0901234,eve").unwrap_err(),
            ["0901234", "eve"]
        );
    }

    #[test]
    fn spoken_message_is_cleaned() {
        let c = config("[[rule]]\nname = \"all\"\ncall = [\"alice\"]\nmessage = \"{body}\"\n");
        let d = route(
            &c,
            &alert(
                "a@b",
                "x",
                "db down\n\nhttps://grafana/d/1   id 0123456789abcdef01",
            ),
            &Policy::at(NOW.parse().unwrap()),
        );
        assert_eq!(d.message, "db down link id");
    }

    #[test]
    fn silences_match_captures_and_a_heartbeat_mail_is_a_beat() {
        let c = config(
            "[[heartbeat]]\nname = \"backup\"\nsubject = '^backup ok$'\nevery = \"1d\"\ncall = [\"bob\"]\n\
             [[rule]]\nname = \"host down\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\"]\n\
             escalate = [{ after = \"5m\", call = [\"bob\"] }]\n",
        );
        let now: jiff::Timestamp = NOW.parse().unwrap();
        let silence = |id, matchers: &[&str], ends: jiff::Timestamp| crate::oncall::Silence {
            id,
            matchers: matchers
                .iter()
                .map(|m| crate::oncall::Matcher::parse(m).unwrap())
                .collect(),
            starts_at: now,
            ends_at: ends,
            comment: "kernel upgrade".into(),
        };
        let later = now
            .checked_add(jiff::SignedDuration::from_hours(2))
            .unwrap();
        let policy = Policy {
            now,
            overrides: Vec::new(),
            silences: vec![
                silence(1, &["rule=host down", "host=~db[12]"], later),
                silence(2, &["host=web1"], now),
            ],
        };
        let d = route(&c, &alert("a@b", "db2 is DOWN", ""), &policy);
        assert_eq!((d.action, d.silenced_by), (Action::Call, Some(1)));
        assert_eq!(d.escalations[0].numbers, ["+15005550002"]);
        // Ended silences and matchers that do not hold mute nothing.
        for subject in ["db3 is DOWN", "web1 is DOWN"] {
            assert_eq!(
                route(&c, &alert("a@b", subject, ""), &policy).silenced_by,
                None
            );
        }
        // A silence naming a capture the config no longer has is ignored, whichever
        // way it compares: `host!=web9` would otherwise mute every alert.
        let removed = config(
            "[[rule]]\nname = \"host down\"\nsubject = '\\S+ is DOWN'\ncall = [\"alice\"]\n",
        );
        let stale = Policy {
            now,
            overrides: Vec::new(),
            silences: vec![silence(3, &["host!=web9"], later)],
        };
        assert_eq!(
            stale.silences[0].unknown_names(&removed.silence_names()),
            ["host"]
        );
        assert_eq!(
            route(&removed, &alert("a@b", "db2 is DOWN", ""), &stale).silenced_by,
            None
        );
        assert_eq!(
            route(&c, &alert("a@b", "db2 is DOWN", ""), &stale).silenced_by,
            Some(3),
            "while `host` is captured, the silence holds"
        );
        let d = route(&c, &alert("a@b", "backup ok", ""), &policy);
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Beat, Some("backup"))
        );
        assert_eq!(d.dedup_key, "heartbeat: backup");
    }
}
