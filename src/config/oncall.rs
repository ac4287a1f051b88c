//! Validation of the on-call sections: `[[rotation]]`, a rule's `when` and `escalate`,
//! `[[heartbeat]]`, and `call` lists that may name rotations. Every problem is
//! reported at its position like the rest of the file's.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Span;
use jiff::tz::TimeZone;
use toml::Spanned;

use super::problems::Problemset;
use super::raw::{RawEscalation, RawHeartbeat, RawRotation, RawWhen};
use super::{Callee, Defaults, Escalation, Heartbeat, is_e164, prompt_set};
use crate::oncall::{Rotation, When, parse_start, when};
use crate::speech::Prompts;

/// The placeholders a heartbeat's `message` may use.
pub const HEARTBEAT_PLACEHOLDERS: [&str; 2] = ["name", "last_seen"];

/// `[[rotation]]`s: members must be contacts, the list not empty, names unique and
/// apart from contacts' and groups' (a `call` entry must name one thing), the shift
/// a positive span, the start a time, the time zone a real one.
pub(super) fn rotations(
    p: &mut Problemset,
    raw: &[RawRotation],
    contacts: &BTreeMap<String, String>,
    groups: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, Rotation> {
    let mut rotations = BTreeMap::new();
    for r in raw {
        let name = r.name.get_ref().clone();
        if rotations.contains_key(&name) {
            p.push(
                r.name.span(),
                format!("duplicate rotation `{name}`: two rotations by one name would overlap; rename one"),
            );
        }
        if contacts.contains_key(&name) || groups.contains_key(&name) {
            p.push(
                r.name.span(),
                format!("rotation `{name}` has the name of a contact or group; `call` could not tell them apart, so rename it"),
            );
        }
        if r.members.get_ref().is_empty() {
            p.push(
                r.members.span(),
                format!("rotation `{name}` has no members; list contacts, e.g. members = [\"alice\", \"bob\"]"),
            );
        }
        let mut members = Vec::new();
        for m in r.members.get_ref() {
            if contacts.contains_key(m.get_ref()) {
                members.push(m.get_ref().clone());
            } else {
                p.push(
                    m.span(),
                    format!("rotation `{name}` lists `{}`, which is not a contact; add it under [contacts]", m.get_ref()),
                );
            }
        }
        let shift = match r.shift.get_ref().parse::<Span>() {
            // At least a second: shorter shifts could not be told apart (and would never
            // resolve to anyone).
            Ok(s)
                if s.is_positive()
                    && s.get_months() == 0
                    && s.get_years() == 0
                    && s.total((
                        jiff::Unit::Second,
                        jiff::SpanRelativeTo::days_are_24_hours(),
                    ))
                    .is_ok_and(|secs| secs >= 1.0) =>
            {
                Some(s)
            }
            _ => {
                p.push(
                    r.shift.span(),
                    format!(
                        "invalid `shift` `{}`; write a length of at least a second, in weeks, days or hours, e.g. \"1w\", \"1d\" or \"12h\"",
                        r.shift.get_ref()
                    ),
                );
                None
            }
        };
        let tz = r.timezone.as_ref().and_then(|t| timezone(p, t));
        let start = match parse_start(r.start.get_ref(), tz.as_ref()) {
            Ok(s) => Some(s),
            Err(e) => {
                p.push(r.start.span(), format!("invalid `start`: {e}"));
                None
            }
        };
        if let (Some(shift), Some(start)) = (shift, start) {
            rotations.entry(name.clone()).or_insert(Rotation {
                name,
                members,
                shift,
                start,
            });
        }
    }
    rotations
}

/// An IANA time zone name; `None` (and a problem) if the database has no such zone.
fn timezone(p: &mut Problemset, value: &Spanned<String>) -> Option<TimeZone> {
    match TimeZone::get(value.get_ref()) {
        Ok(tz) => Some(tz),
        Err(_) => {
            p.push(
                value.span(),
                format!(
                    "unknown time zone `{}`; write an IANA name such as \"Asia/Tokyo\" or \"America/New_York\"",
                    value.get_ref()
                ),
            );
            None
        }
    }
}

/// A rule's `when`.
pub(super) fn when(p: &mut Problemset, raw: &Spanned<RawWhen>) -> Option<When> {
    let w = raw.get_ref();
    let mut days = [w.days.is_none(); 7];
    for d in w.days.iter().flatten() {
        match when::parse_day(d.get_ref()) {
            Some(i) => days[i] = true,
            None => p.push(
                d.span(),
                format!(
                    "unknown day `{}`; use {}",
                    d.get_ref(),
                    when::DAY_NAMES.join(", ")
                ),
            ),
        }
    }
    if w.days.as_ref().is_some_and(Vec::is_empty) {
        p.push(raw.span(), "`days` is empty: the rule would never apply; list days, e.g. days = [\"mon\", \"tue\"]");
    }
    let hours = w
        .hours
        .as_ref()
        .and_then(|h| match when::parse_hours(h.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                p.push(h.span(), format!("invalid `hours` `{}`: {e}", h.get_ref()));
                None
            }
        });
    let holidays_jp = match &w.holidays {
        None => false,
        Some(h) if h.get_ref() == "jp" => true,
        Some(h) => {
            p.push(
                h.span(),
                format!("unknown `holidays` `{}`; the only table is \"jp\" (Japanese national holidays)", h.get_ref()),
            );
            false
        }
    };
    let Some(tz) = &w.timezone else {
        p.push(
            raw.span(),
            "`when` needs a `timezone`, e.g. timezone = \"Asia/Tokyo\"",
        );
        return None;
    };
    let timezone = timezone(p, tz)?;
    Some(When {
        days,
        hours,
        timezone,
        holidays_jp,
    })
}

/// A `call` list: contacts, groups, rotations and E.164 numbers; numbers de-duplicated.
pub(super) fn call_list(
    p: &mut Problemset,
    entries: &[Spanned<String>],
    known: &Known<'_>,
    owner: &str,
) -> Vec<Callee> {
    let Known {
        contacts,
        groups,
        rotations,
    } = known;
    let mut out = Vec::new();
    for entry in entries {
        let e = entry.get_ref();
        if let Some(n) = contacts.get(e) {
            out.push(Callee::Number(n.clone()));
        } else if let Some(ns) = groups.get(e) {
            out.extend(ns.iter().cloned().map(Callee::Number));
        } else if is_e164(e) {
            out.push(Callee::Number(e.clone()));
        } else if rotations.contains_key(e) {
            out.push(Callee::Rotation(e.clone()));
        } else {
            p.push(
                entry.span(),
                format!(
                    "`{e}` in {owner} is neither a contact, a group, a rotation nor an E.164 number; add it under [contacts] or write the number as \"+15005550001\""
                ),
            );
        }
    }
    let mut seen = BTreeSet::new();
    out.retain(|c| seen.insert(c.clone()));
    out
}

/// What `escalate` and `heartbeat` need from the rest of the file.
pub(super) struct Known<'a> {
    pub contacts: &'a BTreeMap<String, String>,
    pub groups: &'a BTreeMap<String, Vec<String>>,
    pub rotations: &'a BTreeMap<String, Rotation>,
}

/// A rule's `escalate`: each step after a positive time, in order, before the rule's
/// last round ends (after that the incident is over and nobody would be rung).
pub(super) fn escalations(
    p: &mut Problemset,
    raw: &[Spanned<RawEscalation>],
    known: &Known<'_>,
    rule: &str,
    rounds: u32,
    round_interval: Duration,
) -> Vec<Escalation> {
    let mut steps: Vec<Escalation> = Vec::new();
    let last_round_ends = round_interval.saturating_mul(rounds);
    for step in raw {
        let s = step.get_ref();
        let after = p.duration(Some(&s.after), "after", Duration::ZERO);
        if after.is_zero() && humantime::parse_duration(s.after.get_ref()).is_ok() {
            p.push(
                s.after.span(),
                "`after` must be greater than 0; write e.g. \"5m\"",
            );
        } else if after >= last_round_ends {
            p.push(
                s.after.span(),
                format!(
                    "rule `{rule}` escalates after {} but its calls end after {} ({rounds} rounds of {}); raise `rounds` or `round_interval`, or escalate sooner",
                    humantime::format_duration(after),
                    humantime::format_duration(last_round_ends),
                    humantime::format_duration(round_interval)
                ),
            );
        }
        if steps.last().is_some_and(|prev| prev.after >= after) {
            p.push(
                s.after.span(),
                "escalation steps must come in order of `after`",
            );
        }
        if s.call.get_ref().is_empty() {
            p.push(
                s.call.span(),
                format!("an escalation step of rule `{rule}` has an empty `call` list"),
            );
        }
        let call = call_list(
            p,
            s.call.get_ref(),
            known,
            &format!("rule `{rule}` escalate"),
        );
        steps.push(Escalation { after, call });
    }
    steps
}

/// `[[heartbeat]]`s: unique names, match fields like a rule's, `every` of at least a
/// second, someone to call, a message with `{name}` and `{last_seen}`.
pub(super) fn heartbeats(
    p: &mut Problemset,
    raw: &[RawHeartbeat],
    text: &str,
    known: &Known<'_>,
    defaults: &Defaults,
    prompts: &BTreeMap<String, Prompts>,
) -> Vec<Heartbeat> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    let placeholders: BTreeSet<&str> = HEARTBEAT_PLACEHOLDERS.into_iter().collect();
    for h in raw {
        let name = h.name.get_ref().clone();
        if name.trim().is_empty() || name.contains('/') {
            p.push(h.name.span(), "a heartbeat's `name` must not be empty nor contain `/` (it is the last part of POST /heartbeat/<name>)");
        }
        if !names.insert(name.clone()) {
            p.push(
                h.name.span(),
                format!("duplicate heartbeat `{name}`; names must be unique"),
            );
        }
        let [from, to, subject, body] = [
            (&h.from, "from"),
            (&h.to, "to"),
            (&h.subject, "subject"),
            (&h.body, "body"),
        ]
        .map(|(v, key)| p.regex(v.as_ref(), key, text).ok().flatten());
        let every = p.duration(Some(&h.every), "every", Duration::from_secs(86_400));
        if every < Duration::from_secs(1) {
            p.push(h.every.span(), "`every` must be at least \"1s\"");
        }
        let grace = p.duration(h.grace.as_ref(), "grace", Duration::ZERO);
        if h.call.get_ref().is_empty() {
            p.push(h.call.span(), format!("heartbeat `{name}` has an empty `call` list; name whom to call when it misses a beat"));
        }
        let call = call_list(p, h.call.get_ref(), known, &format!("heartbeat `{name}`"));
        // The built-in message is in the heartbeat's language.
        let language = h
            .language
            .as_ref()
            .map_or(defaults.language.as_str(), |l| l.get_ref().as_str());
        let default_message = Spanned::new(0..0, prompt_set(prompts, language).heartbeat_missed);
        let message = p
            .template(
                h.message.as_ref().unwrap_or(&default_message),
                "message",
                Some(&placeholders),
            )
            .unwrap_or_else(|| defaults.message.clone());
        out.push(Heartbeat {
            name,
            from,
            to,
            subject,
            body,
            every,
            grace,
            call,
            message,
            language: p
                .language(h.language.as_ref())
                .unwrap_or_else(|| defaults.language.clone()),
            voice: p
                .voice(h.voice.as_ref())
                .unwrap_or_else(|| defaults.voice.clone()),
        });
    }
    out
}
