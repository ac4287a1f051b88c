//! Validation problems: every one found in a file, each with its line and column, and
//! the `Problemset` validation collects them in (with the checks several sections share:
//! durations, callees, regexes with the position of the error inside the pattern,
//! templates, globs).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use regex::Regex;
use toml::Spanned;

use super::{AddressPatterns, dedup_in_order, is_e164, is_language, is_voice};
use crate::template::Template;

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

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Collects problems while validation goes on, so all of them are reported at once.
#[derive(Default)]
pub(super) struct Problemset(pub(super) Vec<(Range<usize>, String)>);

impl Problemset {
    pub(super) fn push(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.0.push((span, message.into()));
    }

    pub(super) fn duration(
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
    pub(super) fn callees(
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

    pub(super) fn rounds(&mut self, value: Option<&Spanned<u32>>) -> Option<u32> {
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

    pub(super) fn language(&mut self, value: Option<&Spanned<String>>) -> Option<String> {
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

    pub(super) fn voice(&mut self, value: Option<&Spanned<String>>) -> Option<String> {
        let value = value?;
        if !is_voice(value.get_ref()) {
            self.push(value.span(), format!("invalid `voice` {:?}; write a Twilio voice such as \"Polly.Joanna\" or \"alice\"", value.get_ref()));
        }
        Some(value.get_ref().clone())
    }

    pub(super) fn globs(&mut self, list: &[Spanned<String>], what: &str) -> AddressPatterns {
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
    pub(super) fn regex(
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
    pub(super) fn template(
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
                    // Prompts take fixed placeholders (often none); rules' templates also
                    // take their regexes' named captures.
                    let hint = match (known.is_empty(), key.starts_with("prompts.")) {
                        (true, true) => "this prompt takes no placeholders; write it as plain text (`{{` for a brace)".to_string(),
                        (false, true) => format!("use one of {}", known.join(", ")),
                        (_, false) => format!(
                            "use one of {} (named regex captures become placeholders)",
                            known.join(", ")
                        ),
                    };
                    self.push(
                        value.span(),
                        format!("placeholder `{{{p}}}` in `{key}` names nothing; {hint}"),
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
    let body = &raw[at..];
    // A line-ending backslash (multi-line strings) decodes to nothing and takes the
    // whitespace and newlines after it along.
    let continuation_end = |i: usize| -> Option<usize> {
        if delimiter != 3 || !body[i..].starts_with('\\') {
            return None;
        }
        let after = &body[i + 1..];
        let line_end = after.find('\n')?;
        if !after[..line_end]
            .trim_end_matches('\r')
            .chars()
            .all(|c| c == ' ' || c == '\t')
        {
            return None;
        }
        let rest = &after[line_end..];
        let skipped = rest.len() - rest.trim_start_matches([' ', '\t', '\r', '\n']).len();
        Some(i + 1 + line_end + skipped)
    };
    let mut decoded = 0;
    let mut i = 0;
    loop {
        if let Some(end) = continuation_end(i) {
            i = end;
            continue;
        }
        let Some(c) = body[i..].chars().next() else {
            break;
        };
        if decoded >= offset {
            break;
        }
        if c == '\\' {
            let mut escape = body[i + 1..].chars();
            let letter = escape.next();
            let width = match letter {
                Some('u') => 4,
                Some('U') => 8,
                _ => 0,
            };
            let hex: String = escape.take(width).collect();
            decoded += u32::from_str_radix(&hex, 16)
                .ok()
                .and_then(char::from_u32)
                .map_or(1, char::len_utf8);
            // The backslash, the escape letter and its hex digits.
            i += 1 + letter.map_or(0, char::len_utf8) + hex.len();
        } else {
            decoded += c.len_utf8();
            i += c.len_utf8();
        }
    }
    at + i
}

pub(super) fn positive(
    p: &mut Problemset,
    value: Option<&Spanned<u64>>,
    key: &str,
    default: u64,
) -> u64 {
    match value {
        None => default,
        Some(v) if *v.get_ref() == 0 => {
            p.push(v.span(), format!("`{key}` must be greater than 0"));
            default
        }
        Some(v) => *v.get_ref(),
    }
}
