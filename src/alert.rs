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

use std::borrow::Cow;
use std::sync::LazyLock;

use mail_parser::{Message, MessageParser, PartType};
use regex::Regex;

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
        let raw = charset_aliases(raw);
        let raw = raw.as_ref();
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
        alert.subject = raw_japanese_subject(&message)
            .or_else(|| message.subject().map(str::to_string))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        alert.body = body_text(&message)
            .map(undeclared_iso_2022_jp)
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

/// Japanese charset names mail-parser does not know, as the ones it does: Windows'
/// `cp932` is Shift_JIS as `ms932` is, and the ISO-2022-JP extensions are ISO-2022-JP
/// for everything but a few rare kanji.
fn charset_aliases(raw: &[u8]) -> Cow<'_, [u8]> {
    static ALIAS: LazyLock<regex::bytes::Regex> = LazyLock::new(|| {
        regex::bytes::Regex::new(
            r#"(?i)(charset\s*=\s*"?|=\?)(cp932|iso-2022-jp-(?:2|3|ext|2004))\b"#,
        )
        .expect("a valid pattern")
    });
    ALIAS.replace_all(raw, |c: &regex::bytes::Captures<'_>| {
        let canonical: &[u8] = if c[2].eq_ignore_ascii_case(b"cp932") {
            b"shift_jis"
        } else {
            b"iso-2022-jp"
        };
        [&c[1], canonical].concat()
    })
}

/// A subject sent raw in a Japanese charset, without RFC 2047 encoding (old tools and
/// scripts do this): ISO-2022-JP when it has escape sequences, else Shift_JIS or EUC-JP
/// when its bytes are not UTF-8. `None` for anything else, which mail-parser decodes.
fn raw_japanese_subject(message: &Message<'_>) -> Option<String> {
    let header = message
        .headers()
        .iter()
        .find(|h| h.name == mail_parser::HeaderName::Subject)?;
    let raw = message
        .raw_message()
        .get(header.offset_start as usize..header.offset_end as usize)?;
    // Unfolded: a line break inside a header is not part of its value.
    let raw: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|b| !matches!(b, b'\r' | b'\n'))
        .collect();
    let strict = |encoding: &'static encoding_rs::Encoding| {
        encoding
            .decode_without_bom_handling_and_without_replacement(&raw)
            .map(|s| s.into_owned())
    };
    if raw.contains(&0x1b) {
        strict(encoding_rs::ISO_2022_JP)
    } else if std::str::from_utf8(&raw).is_err() {
        strict(encoding_rs::SHIFT_JIS).or_else(|| strict(encoding_rs::EUC_JP))
    } else {
        None
    }
}

/// A body in ISO-2022-JP whose part did not say so (it reads as ASCII with escape
/// sequences): decoded.
fn undeclared_iso_2022_jp(body: String) -> String {
    if !body.contains("\u{1b}$") {
        return body;
    }
    let decoded = encoding_rs::ISO_2022_JP
        .decode_without_bom_handling_and_without_replacement(body.as_bytes())
        .map(Cow::into_owned);
    decoded.unwrap_or(body)
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
    let html = blocks_as_divs(&html);
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

/// html2text lays out HTML5's sectioning elements, `<center>` and `<hr>` inline, which
/// glues the words on either side together (`CRITICAL` + `db1` → `CRITICALdb1`). They
/// are blocks in every browser; here they become `<div>`s (and `<hr>` a line break).
fn blocks_as_divs(html: &str) -> Cow<'_, str> {
    static BLOCK: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"(?i)<(/?)(?:address|article|aside|center|details|dialog|fieldset|figcaption|figure|footer|header|hgroup|legend|main|menu|nav|search|section|summary)\b",
        )
        .expect("a valid pattern")
    });
    static RULE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"(?i)<hr\b[^>]*>").expect("a valid pattern"));
    match BLOCK.replace_all(html, "<${1}div") {
        Cow::Borrowed(_) => RULE.replace_all(html, "<br>"),
        Cow::Owned(divs) => Cow::Owned(RULE.replace_all(&divs, "<br>").into_owned()),
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
        // HTML5's sections and `<hr>` separate words like any block.
        assert_eq!(
            html_to_text(
                "<center><header>CRITICAL</header><section>db1 is DOWN</section><hr>\
                 <SECTION>web1 is DOWN</SECTION><footer>Sent by monitor</footer></center>"
            ),
            "CRITICAL\ndb1 is DOWN\nweb1 is DOWN\nSent by monitor"
        );
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
    fn japanese_mail_decodes_whatever_its_charset_label_or_lack_of_one() {
        let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode("web01 停止");
        let (jis, _, _) = encoding_rs::ISO_2022_JP.encode("web01 停止");
        // Labelled `cp932` (Windows' Shift_JIS), in the body and in an encoded word.
        let mut raw = b"Subject: =?CP932?B?".to_vec();
        raw.extend(
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &sjis).bytes(),
        );
        raw.extend(b"?=\r\nContent-Type: text/plain; charset=cp932\r\n\r\n");
        raw.extend(sjis.iter());
        let a = Alert::from_mime(&raw, &env());
        assert_eq!(
            (a.subject.as_str(), a.body.as_str()),
            ("web01 停止", "web01 停止")
        );
        // Raw bytes in the Subject, no RFC 2047: ISO-2022-JP, Shift_JIS.
        for bytes in [&jis, &sjis] {
            let mut raw = b"Subject: ".to_vec();
            raw.extend(bytes.iter());
            raw.extend(b"\r\n\r\nbody\r\n");
            assert_eq!(Alert::from_mime(&raw, &env()).subject, "web01 停止");
        }
        // An ISO-2022-JP body whose part says nothing of its charset.
        let mut raw = b"Subject: x\r\n\r\n".to_vec();
        raw.extend(jis.iter());
        assert_eq!(Alert::from_mime(&raw, &env()).body, "web01 停止");
        // A UTF-8 subject is left as it is.
        let a = Alert::from_mime("Subject: web01 停止\r\n\r\nx".as_bytes(), &env());
        assert_eq!(a.subject, "web01 停止");
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
