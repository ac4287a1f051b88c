//! Silences (maintenance windows): matchers over an alert's fields, each `NAME=VALUE`,
//! `NAME!=VALUE`, `NAME=~REGEX` or `NAME!~REGEX`, as in Alertmanager. Names are `rule`,
//! `from`, `to`, `subject` and the named captures of the rules; a capture the matching
//! rule does not have is the empty string. A silence naming a capture no rule defines
//! any more (the config changed since it was added) is ignored, not guessed at. Regexes are anchored at both ends
//! (`host=~db[12]` is `^(?:db[12])$`). Every matcher of a silence must match; `to`
//! matches when any recipient does (and `!=`/`!~` when none does).

use std::collections::BTreeSet;
use std::fmt;

use jiff::Timestamp;
use regex::Regex;

/// The fields every alert has, besides its rule's captures.
pub const FIELDS: [&str; 4] = ["rule", "from", "to", "subject"];

/// How a matcher compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Equal => "=",
            Op::NotEqual => "!=",
            Op::Regex => "=~",
            Op::NotRegex => "!~",
        }
    }
}

/// One `NAME OP VALUE`.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: Op,
    pub value: String,
    regex: Option<Regex>,
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Matcher) -> bool {
        (&self.name, self.op, &self.value) == (&other.name, other.op, &other.value)
    }
}

impl Eq for Matcher {}

impl Matcher {
    /// Parses `host=~db[12]`, `rule=host down` or `rule="host down"`.
    pub fn parse(text: &str) -> Result<Matcher, String> {
        let text = text.trim();
        let name_len = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(text.len());
        let (name, rest) = text.split_at(name_len);
        let op = [Op::NotRegex, Op::Regex, Op::NotEqual, Op::Equal]
            .into_iter()
            .find(|op| rest.starts_with(op.as_str()));
        let (Some(op), false) = (op, name.is_empty()) else {
            return Err(format!(
                "`{text}` is not a matcher; write NAME=VALUE, NAME!=VALUE, NAME=~REGEX or NAME!~REGEX, e.g. rule=host\\ down or 'host=~db[12]'"
            ));
        };
        let raw = &rest[op.as_str().len()..];
        let value = raw
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(raw)
            .to_string();
        let regex = match op {
            Op::Regex | Op::NotRegex => {
                Some(Regex::new(&format!("^(?:{value})$")).map_err(|e| {
                    format!("invalid regex in `{text}`: {}", one_line(&e.to_string()))
                })?)
            }
            Op::Equal | Op::NotEqual => None,
        };
        Ok(Matcher {
            name: name.to_string(),
            op,
            value,
            regex,
        })
    }

    /// Does the matcher hold for these values of its field (several for `to`)?
    pub fn matches(&self, values: &[&str]) -> bool {
        let hit = |v: &str| match &self.regex {
            Some(re) => re.is_match(v),
            None => v == self.value,
        };
        let values: &[&str] = if values.is_empty() { &[""] } else { values };
        match self.op {
            Op::Equal | Op::Regex => values.iter().any(|v| hit(v)),
            Op::NotEqual | Op::NotRegex => !values.iter().any(|v| hit(v)),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.name, self.op.as_str(), self.value)
    }
}

/// A silence from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Silence {
    pub id: i64,
    pub matchers: Vec<Matcher>,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    pub comment: String,
}

impl Silence {
    /// The names its matchers use that are neither an alert field nor a capture in
    /// `known` (a reload removed the capture since the silence was added). Such a
    /// silence is ignored: `host!=db1` would otherwise mute every alert once nothing
    /// captures `host`, and `host=db1` would mute nothing while looking in force.
    pub fn unknown_names<'a>(&'a self, known: &BTreeSet<String>) -> Vec<&'a str> {
        unknown_names(&self.matchers, known)
    }

    /// Is it in force at `at`, and does every matcher hold? `field` gives an alert's
    /// values of a field.
    pub fn silences(&self, at: Timestamp, field: &dyn Fn(&str) -> Vec<String>) -> bool {
        self.starts_at <= at
            && at < self.ends_at
            && !self.matchers.is_empty()
            && self.matchers.iter().all(|m| {
                let values = field(&m.name);
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                m.matches(&refs)
            })
    }
}

/// The names `matchers` use that `known` (alert fields and the rules' captures) lacks.
pub fn unknown_names<'a>(matchers: &'a [Matcher], known: &BTreeSet<String>) -> Vec<&'a str> {
    let names: BTreeSet<&str> = matchers
        .iter()
        .map(|m| m.name.as_str())
        .filter(|n| !known.contains(*n))
        .collect();
    names.into_iter().collect()
}

/// The same for matchers as stored (text): what makes a stored silence ignored.
pub fn unknown_in_texts(texts: &[String], known: &BTreeSet<String>) -> Vec<String> {
    let parsed: Vec<Matcher> = texts
        .iter()
        .filter_map(|t| Matcher::parse(t).ok())
        .collect();
    unknown_names(&parsed, known)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Parses a silence's matchers: at least one (a silence without any would mute
/// everything), each naming a field or a capture in `known`.
pub fn parse_matchers<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    known: &BTreeSet<String>,
) -> Result<Vec<Matcher>, String> {
    let matchers = texts
        .into_iter()
        .map(Matcher::parse)
        .collect::<Result<Vec<_>, _>>()?;
    if matchers.is_empty() {
        return Err(
            "a silence needs at least one matcher (without any it would mute every alert); e.g. --match 'rule=host down'".into(),
        );
    }
    for m in &matchers {
        if !known.contains(&m.name) {
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            return Err(format!(
                "`{}` in `{m}` is neither an alert field nor a capture any rule defines; use one of {}",
                m.name,
                names.join(", ")
            ));
        }
    }
    Ok(matchers)
}

/// When a silence added at `now` ends: after `duration` (`"2h"`) or at `until`
/// (RFC 3339), exactly one of them, later than `now`.
pub fn end(
    duration: Option<&str>,
    until: Option<&str>,
    now: Timestamp,
) -> Result<Timestamp, String> {
    let end = match (duration, until) {
        (Some(d), None) => {
            let d = humantime::parse_duration(d)
                .map_err(|e| format!("invalid duration `{d}`: {e}; write e.g. 2h or 30m"))?;
            let d = jiff::SignedDuration::try_from(d)
                .map_err(|_| "the duration is too long".to_string())?;
            now.checked_add(d)
                .map_err(|_| "the duration is too long".to_string())?
        }
        (None, Some(u)) => super::parse_time(u)?,
        _ => {
            return Err(
                "give how long (for, e.g. 2h) or until when (until, RFC 3339): one of them".into(),
            );
        }
    };
    if end <= now {
        return Err("the silence would end before it starts; give a later end".into());
    }
    Ok(end)
}

fn one_line(s: &str) -> String {
    s.lines()
        .last()
        .unwrap_or_default()
        .trim()
        .trim_start_matches("error: ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_parse_and_match_like_alertmanager() {
        let m = Matcher::parse("rule=host down").unwrap();
        assert!(m.matches(&["host down"]) && !m.matches(&["host downs"]));
        let m = Matcher::parse("host=~db[12]").unwrap();
        assert!(m.matches(&["db1"]) && m.matches(&["db2"]) && !m.matches(&["db1.example.com"]));
        let m = Matcher::parse("host!~db[12]").unwrap();
        assert!(!m.matches(&["db1"]) && m.matches(&["web1"]) && m.matches(&[]));
        let m = Matcher::parse("to!=ops@example.com").unwrap();
        assert!(!m.matches(&["a@example.com", "ops@example.com"]));
        assert!(m.matches(&["a@example.com"]));
        let m = Matcher::parse("subject=\"disk full\"").unwrap();
        assert_eq!(m.value, "disk full");
        assert_eq!(m.to_string(), "subject=disk full");
        for bad in ["=x", "host", "host~x", "host=~(", ""] {
            assert!(Matcher::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_silence_needs_a_matcher_on_known_names() {
        let known = ["rule", "host"].iter().map(|s| s.to_string()).collect();
        assert!(
            parse_matchers([], &known)
                .unwrap_err()
                .contains("at least one matcher")
        );
        let err = parse_matchers(["hots=db1"], &known).unwrap_err();
        assert!(
            err.contains("`hots`") && err.contains("host, rule"),
            "{err}"
        );
        assert_eq!(parse_matchers(["host=db1"], &known).unwrap().len(), 1);
    }
}
