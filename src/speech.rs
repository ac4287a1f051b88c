//! Alert text → text worth speaking to a half-awake person.
//!
//! Text-to-speech reads everything literally: a 60-character URL or a request id takes
//! half a minute to spell out and hides the one sentence that matters. This module drops
//! such tokens, collapses whitespace and cuts the text to what Twilio accepts. XML escaping
//! is not done here but in `twilio::twiml`, the only place that writes XML.

/// Cleans `text` for text-to-speech: URLs, long hex strings and opaque ids are dropped,
/// control characters removed and whitespace collapsed to single spaces.
pub fn speakable(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(4096));
    for token in text.split(|c: char| c.is_whitespace() || c.is_control()) {
        if token.is_empty() || is_noise(token) {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(token);
    }
    out
}

/// The longest prefix of `text` that is at most `max_bytes` UTF-8 bytes and whose XML
/// escaped form is at most `max_escaped_chars` characters, cut at a word boundary when
/// one is near the end.
pub fn cap(text: &str, max_bytes: usize, max_escaped_chars: usize) -> &str {
    let mut escaped = 0;
    let mut end = text.len();
    for (i, c) in text.char_indices() {
        escaped += escaped_len(c);
        if i + c.len_utf8() > max_bytes || escaped > max_escaped_chars {
            end = i;
            break;
        }
    }
    if end == text.len() {
        return text;
    }
    let cut = &text[..end];
    // Prefer ending on a whole word, unless that would throw away much of the text (e.g.
    // Japanese, which has no spaces).
    match cut.rfind(' ') {
        Some(space) if space >= end.saturating_sub(80) => cut[..space].trim_end(),
        _ => cut,
    }
}

/// Is `c` allowed in an XML 1.0 document at all?
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// How many characters `c` takes once XML-escaped (none if XML forbids it).
pub fn escaped_len(c: char) -> usize {
    match c {
        c if !is_xml_char(c) => 0,
        '&' => 5,
        '<' | '>' => 4,
        '"' | '\'' => 6,
        _ => 1,
    }
}

/// Is this whitespace-separated token something nobody wants read aloud?
fn is_noise(token: &str) -> bool {
    let lower = token.to_ascii_lowercase();
    let lower = lower.trim_start_matches(['(', '<', '[', '"', '\'']);
    if lower.contains("://") || lower.starts_with("www.") || lower.starts_with("mailto:") {
        return true;
    }
    let core = token.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let len = core.len();
    if len < 12 || !core.is_ascii() {
        return false;
    }
    let digits = core.bytes().filter(u8::is_ascii_digit).count();
    let hex = core.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    let letters = core.bytes().filter(u8::is_ascii_alphabetic).count();
    let id_chars = core
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    // A hash, UUID or hex id; or a long token mixing letters and digits (request ids,
    // base64 tokens). Long plain words and long numbers are kept.
    (hex && digits > 0 && letters > 0) || (id_chars && len >= 20 && digits >= 3 && letters >= 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_urls_and_ids_and_collapses_whitespace() {
        let text = "CRITICAL:  db1\n\tis DOWN  see https://grafana.example.com/d/abc?x=1 \
                    trace 3f2a9c0d8e7b6a5f4e3d2c1b req_AbC123dEf456GhI789jK \
                    uuid 123e4567-e89b-12d3-a456-426614174000 (www.example.com)";
        assert_eq!(speakable(text), "CRITICAL: db1 is DOWN see trace uuid");
    }

    #[test]
    fn keeps_ordinary_words_numbers_and_japanese() {
        let text = "Disk usage 95% on fileserver-production-01 サーバー停止 1234567890123";
        assert_eq!(speakable(text), text);
    }

    #[test]
    fn cap_respects_bytes_escaping_and_word_boundaries() {
        assert_eq!(cap("short", 3000, 4000), "short");
        assert_eq!(cap("hello world again", 13, 100), "hello world");
        // Three bytes a character in Japanese: 10 bytes hold three characters.
        assert_eq!(cap("停止停止停止", 10, 100), "停止停");
        // `&` becomes `&amp;`: five characters once escaped.
        assert_eq!(cap("a&b&c", 100, 7), "a&b");
    }

    #[test]
    fn cap_never_splits_a_character() {
        let s = "é".repeat(100);
        for max in 0..20 {
            let c = cap(&s, max, 1000);
            assert!(c.len() <= max);
        }
    }
}
