//! Routing: `(Config, Alert) → Decision`. Pure: no I/O, no clock, no randomness.
//!
//! `mailcall route` and the daemon call the same [`route`], so what `route` prints is
//! exactly what `serve` does with the same mail.

use std::time::Duration;

use regex::Regex;

use crate::alert::{Alert, DirectAlert};
use crate::config::{Config, Rule, RuleAction, is_language, is_voice};
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
}

/// The three outcomes of routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Call,
    Drop,
    /// Closes the open incident with the same dedup key.
    Resolve,
    /// No rule matched: nobody is called and the mail is logged as unrouted.
    None,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Call => "call",
            Action::Drop => "drop",
            Action::Resolve => "resolve",
            Action::None => "none",
        }
    }
}

/// Finds the first matching rule and renders its message and dedup key.
pub fn route(config: &Config, alert: &Alert) -> Decision {
    for rule in &config.rules {
        if let Some(captures) = matches(rule, alert) {
            return decide(rule, alert, &captures);
        }
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
    }
}

/// The decision for a [`DirectAlert`]: its own numbers and words, the defaults for the
/// rest. `source` (`webhook`, `cli`) stands where a rule name would.
pub fn direct(config: &Config, source: &str, alert: &DirectAlert) -> Decision {
    // Ingest validates these; anything invalid that got this far falls back to the
    // defaults rather than making TwiML Twilio refuses.
    let language = alert
        .language
        .clone()
        .filter(|l| is_language(l))
        .unwrap_or_else(|| config.defaults.language.clone());
    let voice = alert
        .voice
        .clone()
        .filter(|v| is_voice(v))
        .unwrap_or_else(|| config.defaults.voice.clone());
    let spoken = speech::speakable(&alert.message, &language);
    let message = twiml::fit(&spoken, &language, &voice).to_string();
    let dedup_key = alert
        .dedup_key
        .clone()
        .unwrap_or_else(|| format!("{source}: {}", normalise_subject(&alert.message)));
    Decision {
        rule: Some(source.to_string()),
        action: Action::Call,
        numbers: alert.numbers.clone(),
        message,
        language,
        voice,
        dedup_key,
        cooldown: config.defaults.cooldown,
        sms: config.defaults.sms,
        subject: alert.message.clone(),
        rounds: config.defaults.rounds,
        round_interval: config.defaults.round_interval,
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

/// Does `rule` match `alert`? Every given matcher must match; the named captures of
/// all of them become placeholders.
fn matches(rule: &Rule, alert: &Alert) -> Option<Captures> {
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
    let ok = check(&rule.from, &mut std::iter::once(alert.from.as_str()))
        && check(&rule.to, &mut alert.to.iter().map(String::as_str))
        && check(&rule.subject, &mut std::iter::once(alert.subject.as_str()))
        && check(&rule.body, &mut std::iter::once(alert.body.as_str()));
    ok.then_some(captures)
}

fn decide(rule: &Rule, alert: &Alert, captures: &Captures) -> Decision {
    let to = alert.to_joined();
    let lookup = |name: &str| -> Option<&str> {
        match name {
            "subject" => Some(alert.subject.as_str()),
            "from" => Some(alert.from.as_str()),
            "to" => Some(to.as_str()),
            "body" => Some(alert.body.as_str()),
            "rule" => Some(rule.name.as_str()),
            other => captures
                .iter()
                .find(|(n, _)| n == other)
                .map(|(_, v)| v.as_str()),
        }
    };
    let spoken = speech::speakable(&rule.message.render(lookup), &rule.language);
    let message = twiml::fit(&spoken, &rule.language, &rule.voice).to_string();
    let dedup_key = match &rule.dedup_key {
        Some(t) => t.render(lookup),
        None => format!("{}: {}", rule.name, normalise_subject(&alert.subject)),
    };
    let (action, numbers) = match &rule.action {
        RuleAction::Call(numbers) => (Action::Call, numbers.clone()),
        RuleAction::Drop => (Action::Drop, Vec::new()),
        RuleAction::Resolve => (Action::Resolve, Vec::new()),
    };
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
        );
        assert_eq!(
            (d.rule.as_deref(), d.action),
            (Some("recoveries"), Action::Drop)
        );

        let d = route(&c, &alert("someone@else.example.org", "db1 is DOWN", ""));
        assert_eq!((d.rule, d.action), (None, Action::None));
        assert!(d.numbers.is_empty());
    }

    #[test]
    fn default_dedup_key_is_rule_and_normalised_subject() {
        let c = config("[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n");
        let a = route(&c, &alert("x@y", "Re:  FWD: Disk  FULL on web1", ""));
        let b = route(&c, &alert("x@y", "disk full on WEB1", ""));
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
        let d = route(&c, &alert("a@b", "x", "host: web\nseverity: critical\n"));
        assert_eq!(d.message, "critical body for alerts at example dot com");
        let d = route(&c, &alert("a@b", "x", "no severity here"));
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
        );
        assert_eq!(d.message, "db down link id");
    }
}
