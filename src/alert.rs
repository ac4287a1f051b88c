//! The [`Alert`] model: what routing needs from a mail, decoded once.
//!
//! mail-parser does the MIME work (multipart, quoted-printable, base64, RFC 2047 words,
//! and with `full_encoding` the Japanese charsets ISO-2022-JP, Shift_JIS and EUC-JP).
//! This module only decides *which* fields routing sees. It does no I/O and never
//! fails: a mail that cannot be parsed is still an alert, routed on whatever is readable,
//! because an unreadable alert at 3 a.m. is still an alert.

use mail_parser::MessageParser;

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

impl Alert {
    /// Decodes a raw RFC 5322 message received with `envelope`.
    pub fn from_mime(raw: &[u8], envelope: &Envelope) -> Alert {
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
        alert.body = message
            .body_text(0)
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
}
