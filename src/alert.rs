//! The [`Alert`] model: what routing needs from a mail, decoded once.
//!
//! mail-parser does the MIME work (multipart, quoted-printable, base64, RFC 2047 words,
//! and with `full_encoding` the Japanese charsets ISO-2022-JP, Shift_JIS and EUC-JP).
//! This module only decides *which* fields routing sees. It does no I/O and never
//! fails: a mail that cannot be parsed is still an alert, routed on whatever is readable,
//! because an unreadable alert at 3 a.m. is still an alert.
//!
//! Mail that has only an HTML part (Alertmanager's default, most SaaS monitors) is turned
//! into text by a real HTML parser (html2text, built on html5ever): block elements, `<br>`
//! and table cells end up as separate lines, so `instance = db1:9100<br>job = node` never
//! becomes `db1:9100job`; scripts, styles and comments are dropped.

use mail_parser::{Message, MessageParser, PartType};

/// The SMTP envelope (or its equivalent from another way in).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// `MAIL FROM`; `None` for the null reverse path `<>`.
    pub mail_from: Option<String>,
    /// `RCPT TO`, in order.
    pub rcpt_to: Vec<String>,
}

/// An alert that names its numbers and words itself (the `/alert` webhook, `mailcall
/// call`): no rule is consulted, but it is stored, deduplicated, budgeted and called like
/// any other.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectAlert {
    /// E.164 numbers, already resolved from contacts and groups.
    pub numbers: Vec<String>,
    pub message: String,
    pub language: Option<String>,
    pub voice: Option<String>,
    pub dedup_key: Option<String>,
    /// A `[[heartbeat]]`'s alert: its missed beat (whom to call is looked up in the
    /// heartbeat's `call` when routed), or with `beat` its beat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
    /// A beat of `heartbeat` (`POST /heartbeat/<name>`), not an alert.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub beat: bool,
}

/// A decoded alert mail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alert {
    pub message_id: Option<String>,
    /// The sender address: the `From:` header, or the envelope sender when it has none.
    pub from: String,
    /// Envelope recipients first, then `To:` and `Cc:` addresses, without repeats.
    pub to: Vec<String>,
    pub subject: String,
    /// The text body; converted from the HTML part when there is no text part.
    pub body: String,
}

/// Bodies longer than this are cut before routing: regexes over megabytes of attached
/// logs would only slow routing down, and nobody listens to them on the phone.
pub const MAX_BODY_CHARS: usize = 64 * 1024;

/// Routing and speech read the headers and the first text part, which alert mail puts
/// first; parsing the rest (attached logs, or a million empty MIME parts, which cost
/// mail-parser twenty times their size) would only spend memory. The stored mail stays
/// whole.
pub const MAX_PARSE_BYTES: usize = 1024 * 1024;

impl Alert {
    /// Decodes a raw RFC 5322 message received with `envelope`. Only the first
    /// [`MAX_PARSE_BYTES`] are looked at.
    pub fn from_mime(raw: &[u8], envelope: &Envelope) -> Alert {
        let raw = &raw[..raw.len().min(MAX_PARSE_BYTES)];
        let mut alert = Alert {
            to: envelope.rcpt_to.clone(),
            from: envelope.mail_from.clone().unwrap_or_default(),
            ..Alert::default()
        };
        let Some(message) = MessageParser::default().parse(raw) else {
            // Not even headers: route on the bytes as text.
            alert.body = truncate_chars(&String::from_utf8_lossy(raw), MAX_BODY_CHARS);
            return alert;
        };
        alert.message_id = message.message_id().map(str::to_string);
        if let Some(from) = message
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
        {
            alert.from = from.to_string();
        }
        for list in [message.to(), message.cc()].into_iter().flatten() {
            alert
                .to
                .extend(list.iter().filter_map(|a| a.address()).map(str::to_string));
        }
        dedup_addresses(&mut alert.to);
        alert.subject = message
            .subject()
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        alert.body = body_text(&message)
            .map(|b| truncate_chars(b.trim(), MAX_BODY_CHARS))
            .unwrap_or_default();
        if alert.body.is_empty() {
            alert.body = raw_body_text(raw);
        }
        alert
    }

    /// The `{to}` placeholder: every recipient, comma-separated.
    pub fn to_joined(&self) -> String {
        self.to.join(", ")
    }
}

/// The first inline text part, converted from HTML when the mail has no plain text.
fn body_text(message: &Message<'_>) -> Option<String> {
    let part = message.text_part(0)?;
    match &part.body {
        PartType::Text(text) => Some(text.to_string()),
        PartType::Html(html) => Some(html_to_text(html)),
        _ => message.body_text(0).map(|b| b.into_owned()),
    }
}

/// Widest line html2text lays out: wide enough that it never wraps a sentence, since
/// the text is read aloud, not shown.
const HTML_TEXT_WIDTH: usize = 10_000;

/// HTML → plain text: one line per block, table cell and `<br>`; no link footnotes,
/// no table borders, no markdown-style decoration, nothing from `<script>`/`<style>`.
pub fn html_to_text(html: &str) -> String {
    // html2text works on the whole document in memory; the body cap keeps that bounded.
    let html = truncate_chars(html, MAX_HTML_CHARS);
    if nesting_depth(&html) > MAX_HTML_DEPTH {
        // html2text's layout costs time quadratic in nesting depth: 30,000 nested lists
        // take minutes. No real alert nests this deep; the tag-stripping conversion is
        // linear and still yields the words.
        return mail_parser::decoders::html::html_to_text(&html);
    }
    match html2text::config::plain_no_decorate()
        .link_footnotes(false)
        .raw_mode(true)
        .allow_width_overflow()
        .string_from_read(html.as_bytes(), HTML_TEXT_WIDTH)
    {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
        // Only a renderer bug gets here; the mail-parser conversion is still words.
        Err(_) => mail_parser::decoders::html::html_to_text(&html),
    }
}

/// Nesting deeper than this is converted by stripping tags instead of laying it out.
/// Alert mail nests tables a dozen deep; 256 levels lay out in milliseconds.
const MAX_HTML_DEPTH: usize = 256;

/// The deepest element nesting in `html`, approximately and in one pass: opening tags
/// count up, closing tags down; void elements, self-closing tags, comments and
/// declarations count nothing. Unclosed `<p>`s overestimate, which only means the
/// plainer conversion.
fn nesting_depth(html: &str) -> usize {
    const VOID: &[&str] = &[
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
        "source", "track", "wbr",
    ];
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..end];
        rest = &rest[end..];
        if let Some(_closing) = tag.strip_prefix('/') {
            depth = depth.saturating_sub(1);
            continue;
        }
        let name = tag
            .split(|c: char| c.is_ascii_whitespace() || c == '/')
            .next()
            .unwrap_or("");
        let is_element = name.starts_with(|c: char| c.is_ascii_alphabetic());
        if is_element && !tag.ends_with('/') && !VOID.iter().any(|v| name.eq_ignore_ascii_case(v)) {
            depth += 1;
            deepest = deepest.max(depth);
        }
    }
    deepest
}

/// HTML parts longer than this are cut before conversion (Alertmanager's inline styles
/// make a short alert 20 KiB of HTML; megabytes are an attack or an attached report).
const MAX_HTML_CHARS: usize = 1024 * 1024;

/// The text after the header block, for mail whose MIME structure yields no text part
/// (a wrong boundary, say): boundary lines are skipped, bytes decoded leniently.
fn raw_body_text(raw: &[u8]) -> String {
    let start = [&b"\r\n\r\n"[..], b"\n\n"]
        .iter()
        .filter_map(|sep| {
            raw.windows(sep.len())
                .position(|w| w == *sep)
                .map(|i| i + sep.len())
        })
        .min();
    let Some(start) = start else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&raw[start..]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.starts_with("--"))
        .collect();
    truncate_chars(lines.join("\n").trim(), MAX_BODY_CHARS)
}

/// Removes repeated addresses (compared case-insensitively), keeping order.
fn dedup_addresses(addresses: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    addresses.retain(|a| seen.insert(a.to_ascii_lowercase()));
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            mail_from: Some("bounce@monitoring.example.com".into()),
            rcpt_to: vec!["alerts@example.com".into()],
        }
    }

    #[test]
    fn nesting_depth_counts_elements_not_void_or_closed_tags() {
        assert_eq!(nesting_depth("<p>a</p><p>b</p>"), 1);
        assert_eq!(
            nesting_depth("<table><tr><td><br><img src=x/><b>x</b></td></tr></table>"),
            4
        );
        assert_eq!(nesting_depth("<!-- <div> --><!DOCTYPE html><div/>"), 0);
        assert_eq!(nesting_depth(&"<ul><li>".repeat(1000)), 2000);
    }

    #[test]
    fn deeply_nested_html_is_stripped_instead_of_laid_out() {
        let html = format!(
            "{}db1 is DOWN{}",
            "<div>".repeat(30_000),
            "</div>".repeat(30_000)
        );
        assert_eq!(html_to_text(&html).trim(), "db1 is DOWN");
        // Ordinary nesting keeps the layout conversion: one line per cell.
        assert_eq!(
            html_to_text("<table><tr><td>host</td><td>db1</td></tr></table>"),
            "host\ndb1"
        );
    }

    #[test]
    fn header_from_wins_over_envelope_and_recipients_merge() {
        let raw = b"From: Nagios <nagios@monitoring.example.com>\r\n\
                    To: ALERTS@example.com, ops@example.com\r\nCc: boss@example.com\r\n\
                    Subject: =?UTF-8?B?5L6L?= test\r\nMessage-ID: <abc@x>\r\n\r\nbody\r\n";
        let a = Alert::from_mime(raw, &env());
        assert_eq!(a.from, "nagios@monitoring.example.com");
        assert_eq!(
            a.to,
            ["alerts@example.com", "ops@example.com", "boss@example.com"]
        );
        assert_eq!(a.subject, "例 test");
        assert_eq!(a.message_id.as_deref(), Some("abc@x"));
        assert_eq!(a.body, "body");
    }

    #[test]
    fn garbage_is_still_an_alert() {
        let a = Alert::from_mime(b"\xff\xfe\x00garbage", &env());
        assert_eq!(a.from, "bounce@monitoring.example.com");
        assert_eq!(a.to, ["alerts@example.com"]);
    }

    #[test]
    fn broken_multipart_is_routed_on_its_raw_text() {
        let raw = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"a\"\r\n\r\n--b\r\nDisk full\r\n--b--\r\n";
        assert_eq!(Alert::from_mime(raw, &env()).body, "Disk full");
    }

    #[test]
    fn huge_bodies_are_cut() {
        let mut raw = b"Subject: big\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'x', MAX_BODY_CHARS * 2));
        assert_eq!(Alert::from_mime(&raw, &env()).body.len(), MAX_BODY_CHARS);
    }

    #[test]
    fn only_the_first_mebibyte_is_parsed() {
        let mut raw = b"Subject: db1 report\r\nMIME-Version: 1.0\r\n\
                        Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
                        --b\r\nContent-Type: text/plain\r\n\r\ndisk full on db1\r\n"
            .to_vec();
        while raw.len() < 2 * MAX_PARSE_BYTES {
            raw.extend_from_slice(b"--b\r\n\r\nx\r\n");
        }
        raw.extend_from_slice(b"--b\r\nContent-Type: text/plain\r\n\r\nMARKER\r\n--b--\r\n");
        let a = Alert::from_mime(&raw, &env());
        assert_eq!(
            (a.subject.as_str(), a.body.as_str()),
            ("db1 report", "disk full on db1")
        );
        // A text part beyond the first MiB is never reached, even by the raw fallback.
        let mut late = b"Subject: late\r\n\r\n".to_vec();
        late.extend(std::iter::repeat_n(b' ', MAX_PARSE_BYTES));
        late.extend_from_slice(b"MARKER");
        assert!(!Alert::from_mime(&late, &env()).body.contains("MARKER"));
    }
}
