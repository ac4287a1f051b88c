//! Alert text → text worth speaking to a half-awake person, and the fixed phrases a call
//! says around it.
//!
//! Text-to-speech reads everything literally: a 60-character URL or a request id takes
//! half a minute to spell out and hides the one sentence that matters, while the things
//! that identify the problem — host names, IP addresses, ports, alert and service names —
//! come out garbled when read as prose (`9100` as "nine thousand one hundred", a dotted
//! host name as one long word). This module keeps the identifiers and says them the way
//! people read them over a phone (dots and colons spoken, digits one by one), drops what a
//! voice cannot use (URLs become "link"; hex ids, UUIDs, base64 and quoted mail history go),
//! and cuts the text to what Twilio accepts. XML escaping is not done here but in
//! `twilio::twiml`, the only place that writes XML.
//!
//! The words it inserts ("dot", "link", …) and the fixed phrases of a call ([`Prompts`])
//! depend on the call's language: English and Japanese are built in.

use std::borrow::Cow;

use crate::template::Template;

/// Cleans `text` for text-to-speech in `language` (a `<Say language>` tag such as
/// `en-US` or `ja-JP`): quoted mail history is cut, URLs become "link", opaque ids are
/// dropped, identifiers are spelled for the ear, and whitespace collapses to single spaces.
pub fn speakable(text: &str, language: &str) -> String {
    let words = Words::of(language);
    let mut out = Speech::default();
    for line in unquoted_lines(text) {
        for token in line.split(|c: char| c.is_whitespace() || c.is_control()) {
            speak_token(token, words, &mut out);
        }
    }
    out.text
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

// ---- Prompts -------------------------------------------------------------------------

/// Every fixed phrase a call says besides the alert itself, in one language.
///
/// `rules.toml` can override each of them under `[prompts."<language>"]` with the same
/// key names; [`Prompts::builtin`] gives the English and Japanese defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompts {
    /// After the alert on a press-1 call.
    pub press_one: String,
    /// The last words before mailcall hangs up.
    pub goodbye: String,
    /// A press-1 call ended without a key pressed.
    pub nobody_joined: String,
    /// Opens the default message of a `resolve = true` rule.
    pub resolved: String,
    /// Dial-in from an unknown number: the `[bridge] pin` prompt.
    pub enter_pin: String,
    /// Dial-in: the PIN was wrong.
    pub wrong_pin: String,
    /// Pressed 1: on the way into the bridge.
    pub joining: String,
    /// Pressed 9.
    pub declined: String,
    /// Announced in the bridge when someone joins; `{who}` is the contact's name.
    pub joined: String,
    /// `{who}` for a caller who is not in `[contacts]`.
    pub responder: String,
    /// Dial-in: into the newest open incident's bridge; `{incident}` is its number.
    pub dial_in: String,
    /// Dial-in with no open incident.
    pub no_incident: String,
    /// Dial-in from an unknown number when there is no `[bridge] pin`.
    pub not_taken: String,
    /// Opens the message left on an answering machine.
    pub voicemail: String,
    /// Opens the default message of a call rule (`Alert.` + the subject).
    pub alert: String,
    /// The default message of a `[[heartbeat]]` that missed its beat.
    pub heartbeat_missed: String,
    /// The default message of the `[canary]` test call.
    pub canary: String,
}

/// The prompt keys of `[prompts."<language>"]` and the placeholders each one may use.
pub const PROMPT_KEYS: [(&str, &[&str]); 17] = [
    ("press_one", &[]),
    ("goodbye", &[]),
    ("nobody_joined", &[]),
    ("resolved", &[]),
    ("enter_pin", &[]),
    ("wrong_pin", &[]),
    ("joining", &[]),
    ("declined", &[]),
    ("joined", &["who"]),
    ("responder", &[]),
    ("dial_in", &["incident"]),
    ("no_incident", &[]),
    ("not_taken", &[]),
    ("voicemail", &[]),
    ("alert", &[]),
    ("heartbeat_missed", &["name", "last_seen"]),
    ("canary", &[]),
];

impl Prompts {
    /// The built-in phrases for `language`: Japanese for `ja…`, English otherwise.
    pub fn builtin(language: &str) -> Prompts {
        let ja = is_japanese(language);
        let pick = |en: &str, jp: &str| if ja { jp } else { en }.to_string();
        Prompts {
            press_one: pick(
                "Press 1 to join the incident bridge. Press 9 to decline.",
                "ブリッジに参加するには 1 を、辞退するには 9 を押してください。",
            ),
            goodbye: pick("Goodbye.", "失礼します。"),
            nobody_joined: pick(
                "No key was pressed; you are not in the bridge.",
                "キーが押されなかったため、ブリッジには参加していません。",
            ),
            resolved: pick("Resolved.", "復旧しました。"),
            enter_pin: pick(
                "Enter the bridge PIN.",
                "ブリッジの暗証番号を入力してください。",
            ),
            wrong_pin: pick("Wrong PIN.", "暗証番号が違います。"),
            joining: pick(
                "Joining the incident bridge.",
                "インシデントのブリッジに参加します。",
            ),
            declined: pick(
                "Declined. You will not be called again for this incident.",
                "辞退しました。このインシデントでは、もう電話しません。",
            ),
            joined: pick("{who} joined.", "{who} が参加しました。"),
            responder: pick("A responder", "対応者"),
            dial_in: pick(
                "Joining the bridge of incident {incident}.",
                "インシデント {incident} のブリッジに参加します。",
            ),
            no_incident: pick(
                "There is no open incident.",
                "対応中のインシデントはありません。",
            ),
            not_taken: pick(
                "This number does not take calls.",
                "この番号では電話をお受けしていません。",
            ),
            voicemail: pick("This is mailcall.", "メールコールからのお知らせです。"),
            alert: pick("Alert.", "アラート。"),
            heartbeat_missed: pick(
                "Heartbeat {name} missed: nothing since {last_seen}.",
                "ハートビート {name} が途絶えました。最後の受信は {last_seen} です。",
            ),
            canary: pick(
                "This is the mailcall test call. The alert path works. No action is needed.",
                "メールコールのテスト電話です。通知の経路は正常です。対応は不要です。",
            ),
        }
    }

    /// The phrase under `key` (one of [`PROMPT_KEYS`]), for overriding it.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut String> {
        Some(match key {
            "press_one" => &mut self.press_one,
            "goodbye" => &mut self.goodbye,
            "nobody_joined" => &mut self.nobody_joined,
            "resolved" => &mut self.resolved,
            "enter_pin" => &mut self.enter_pin,
            "wrong_pin" => &mut self.wrong_pin,
            "joining" => &mut self.joining,
            "declined" => &mut self.declined,
            "joined" => &mut self.joined,
            "responder" => &mut self.responder,
            "dial_in" => &mut self.dial_in,
            "no_incident" => &mut self.no_incident,
            "not_taken" => &mut self.not_taken,
            "voicemail" => &mut self.voicemail,
            "alert" => &mut self.alert,
            "heartbeat_missed" => &mut self.heartbeat_missed,
            "canary" => &mut self.canary,
            _ => return None,
        })
    }

    /// "alice joined." — the join announcement for `who`.
    pub fn joined(&self, who: &str) -> String {
        fill(&self.joined, "who", who)
    }

    /// The dial-in greeting for incident `id`.
    pub fn dial_in(&self, id: i64) -> String {
        fill(&self.dial_in, "incident", &id.to_string())
    }

    /// Two phrases said one after the other.
    pub fn then(first: &str, second: &str) -> String {
        match (first.is_empty(), second.is_empty()) {
            (true, _) => second.to_string(),
            (_, true) => first.to_string(),
            _ => format!("{first} {second}"),
        }
    }
}

/// Renders a prompt's one placeholder. Prompts are validated when the config loads, so
/// a malformed one only comes from code; it is then said as written.
fn fill(template: &str, name: &str, value: &str) -> String {
    match Template::parse(template) {
        Ok(t) => t.render(|n| (n == name).then_some(value)),
        Err(_) => template.to_string(),
    }
}

/// Does `language` (a BCP 47 tag) speak Japanese?
pub fn is_japanese(language: &str) -> bool {
    language
        .split('-')
        .next()
        .is_some_and(|p| p.eq_ignore_ascii_case("ja"))
}

// ---- Speaking identifiers -------------------------------------------------------------

/// The words a language says for the punctuation inside identifiers.
#[derive(Debug)]
struct Words {
    dot: &'static str,
    colon: &'static str,
    /// Between two groups of digits (`ip-10-0-1-23`), so the groups stay apart.
    dash: &'static str,
    slash: &'static str,
    at: &'static str,
    link: &'static str,
    to: &'static str,
    /// A comparison between two values (`97.2 > 90`); empty where the word order of the
    /// language makes a bare word misleading.
    above: &'static str,
    below: &'static str,
}

const ENGLISH: Words = Words {
    dot: "dot",
    colon: "colon",
    dash: "dash",
    slash: "slash",
    at: "at",
    link: "link",
    to: "to",
    above: "above",
    below: "below",
};

const JAPANESE: Words = Words {
    dot: "ドット",
    colon: "コロン",
    dash: "ダッシュ",
    slash: "スラッシュ",
    at: "アット",
    link: "リンク",
    to: "から",
    above: "",
    below: "",
};

impl Words {
    fn of(language: &str) -> &'static Words {
        if is_japanese(language) {
            &JAPANESE
        } else {
            &ENGLISH
        }
    }
}

/// The spoken text being built: words separated by single spaces, repeated "link"s
/// collapsed (a mail footer of five URLs is one "link").
#[derive(Default)]
struct Speech {
    text: String,
    last_was_link: bool,
}

impl Speech {
    fn word(&mut self, word: &str) {
        if word.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            self.text.push(' ');
        }
        self.text.push_str(word);
        self.last_was_link = false;
    }

    fn link(&mut self, words: &Words) {
        if !self.last_was_link {
            self.word(words.link);
            self.last_was_link = true;
        }
    }

    /// Sentence punctuation stays on the word before it: it makes the voice pause.
    fn punctuation(&mut self, p: &str) {
        if !self.text.is_empty() && !p.is_empty() {
            self.text.push_str(p);
        }
    }
}

/// A mail body without what is not the alert: quoted history (`> …`), everything from
/// a signature separator, an "On … wrote:" line or a reply's history marker onwards,
/// and the marker and header block of a forward (the forwarded mail is the alert).
/// Routing gives this to `{body}`, so the template's own words before it do not hide a
/// marker that opens the body.
pub fn unquoted(text: &str) -> String {
    unquoted_lines(text).join("\n")
}

/// The lines of [`unquoted`]. A forward — Gmail's "Forwarded message" marker, Apple
/// Mail's "Begin forwarded message:", or a reply marker (Outlook's "Original
/// Message", Outlook 365's line of underscores over a `From:` block) with nothing of
/// the mail's own above it — is read on past its marker and its header block (up to
/// its first blank line: long `To:` lines wrap); so is a header block that opens the
/// body (Outlook's HTML forward, as text). Under text of the mail's own, a reply
/// marker cuts what follows: that is history.
fn unquoted_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if kept.is_empty()
            && let Some(end) = bare_header_block(&lines, i)
        {
            i = end;
            continue;
        }
        if let Some(marker) = marker(line) {
            // The marker's header block, if it has one, starts at the next line with
            // anything on it.
            let next = (i + 1..lines.len())
                .find(|&j| !lines[j].trim().is_empty())
                .unwrap_or(lines.len());
            let block = opens_header_block(&lines, next);
            let past = if block {
                past_block(&lines, next)
            } else {
                next
            };
            match marker {
                Marker::Forward => {
                    i = past;
                    continue;
                }
                Marker::Reply | Marker::Rule
                    if kept.is_empty() && (block || marker == Marker::Reply) =>
                {
                    i = past;
                    continue;
                }
                Marker::Reply => break,
                Marker::Rule if block => break,
                Marker::Rule => {}
            }
        }
        let lower = line.trim().to_lowercase();
        // The signature separator is `-- ` (RFC 3676); a bare `--` is often an alert
        // template's own divider, with the alert after it.
        if line == "-- " || (lower.starts_with("on ") && lower.ends_with("wrote:")) {
            break;
        }
        if !lower.is_empty() && !line.trim_start().starts_with('>') {
            kept.push(line);
        }
        i += 1;
    }
    kept
}

/// A line that opens a forwarded or quoted mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// A forward, whatever is above it.
    Forward,
    /// A reply's history, or a forward when nothing is above it.
    Reply,
    /// A line of underscores: Outlook 365's marker when a `From:` block is under it,
    /// else an alert's own divider.
    Rule,
}

fn marker(line: &str) -> Option<Marker> {
    let lower = line.trim().to_lowercase();
    let dashed = lower.starts_with("-----");
    if (dashed && (lower.contains("forwarded message") || lower.contains("転送されたメッセージ")))
        || lower == "begin forwarded message:"
    {
        Some(Marker::Forward)
    } else if dashed && (lower.contains("original message") || lower.contains("元のメッセージ"))
    {
        Some(Marker::Reply)
    } else if lower.len() >= 10 && lower.chars().all(|c| c == '_') {
        Some(Marker::Rule)
    } else {
        None
    }
}

/// Does a forward's header block start at line `i`, under a forward marker: a `From:`
/// line, and another of its fields (`Sent:`, `Date:`, `To:`, `Subject:`, or their
/// Japanese labels) before the block's end? (Its other lines may be wrapped fields.)
fn opens_header_block(lines: &[&str], i: usize) -> bool {
    let Some(first) = lines.get(i) else {
        return false;
    };
    header_field(first).is_some_and(|f| f == "from")
        && lines[i + 1..]
            .iter()
            .take(MAX_HEADER_LINES)
            .take_while(|l| !l.trim().is_empty())
            .any(|l| header_field(l).is_some_and(|f| f != "from"))
}

/// Where the forward's header block that opens a body at line `i`, with no marker
/// above it, ends (Outlook's HTML forward, as text: its fields, then the forwarded
/// mail, perhaps with no blank line between). Only a run of fields that has `From:`
/// first and `Sent:`/`Date:` and `Subject:` among them is one: an alert's own output
/// may well start `From: /var/lib…` / `To: backup1:…`, and must be kept.
fn bare_header_block(lines: &[&str], i: usize) -> Option<usize> {
    let fields: Vec<&str> = lines[i.min(lines.len())..]
        .iter()
        .take(MAX_HEADER_LINES)
        .map_while(|l| header_field(l))
        .collect();
    (fields.first() == Some(&"from")
        && fields.iter().any(|f| matches!(*f, "sent" | "date"))
        && fields.contains(&"subject"))
    .then_some(i + fields.len())
}

/// A forward's header block is a few lines, even wrapped: one that runs on longer has
/// no blank line under it, and ends with its last field.
const MAX_HEADER_LINES: usize = 16;

/// The first line after the header block that starts at `i`: its first blank line
/// (long `To:` lines wrap onto lines of their own), or, when none comes soon, the
/// first line that is not a field.
fn past_block(lines: &[&str], i: usize) -> usize {
    let end = lines.len().min(i + MAX_HEADER_LINES);
    (i..end)
        .find(|&j| lines[j].trim().is_empty())
        .unwrap_or_else(|| {
            (i..lines.len())
                .find(|&j| header_field(lines[j]).is_none())
                .unwrap_or(lines.len())
        })
}

/// The field a forward's header line names, as an English name: mail clients write
/// `From:`, `Sent:`, … and, in Japanese, `差出人:`, `送信日時:`, … (with either colon).
fn header_field(line: &str) -> Option<&'static str> {
    const FIELDS: [(&str, &str); 13] = [
        ("from", "from"),
        ("sent", "sent"),
        ("date", "date"),
        ("to", "to"),
        ("cc", "cc"),
        ("subject", "subject"),
        ("reply-to", "reply-to"),
        ("差出人", "from"),
        ("送信者", "from"),
        ("送信日時", "sent"),
        ("日付", "date"),
        ("宛先", "to"),
        ("件名", "subject"),
    ];
    let t = line.trim_start();
    let (label, _) = t.split_once([':', '：'])?;
    let label = label.trim().to_lowercase();
    FIELDS
        .iter()
        .find(|(name, _)| *name == label)
        .map(|(_, field)| *field)
}

/// Japanese and other wide scripts are spoken as they are; identifiers embedded in them
/// (`web03停止`) are split off and spoken like any other.
fn is_wide(c: char) -> bool {
    matches!(c, '\u{3000}'..='\u{9FFF}' | '\u{AC00}'..='\u{D7AF}' | '\u{F900}'..='\u{FAFF}' | '\u{FF00}'..='\u{FFEF}' | '\u{20000}'..='\u{3FFFF}')
}

fn speak_token(token: &str, words: &Words, out: &mut Speech) {
    let mut rest = token;
    while !rest.is_empty() {
        let wide = rest.starts_with(is_wide);
        let len = rest
            .find(|c: char| is_wide(c) != wide)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(len);
        if wide {
            out.word(run);
        } else {
            speak_narrow(run, words, out);
        }
        rest = tail;
    }
}

/// One whitespace-separated run of narrow characters: a word, a number, an identifier, a
/// URL, or punctuation.
fn speak_narrow(token: &str, words: &Words, out: &mut Speech) {
    if is_url(token) {
        out.link(words);
        return;
    }
    match token {
        "->" | "=>" | "-->" => return out.word(words.to),
        ">" | ">=" => return out.word(words.above),
        "<" | "<=" => return out.word(words.below),
        "." | "," | ":" | ";" | "!" | "?" => return out.punctuation(token),
        _ => {}
    }
    // `alert(s)` is a plural, not a group.
    let plural;
    let token = if token.contains("(s)") {
        plural = token.replace("(s)", "s");
        plural.as_str()
    } else {
        token
    };
    let Some(start) = token.find(char::is_alphanumeric) else {
        // Pure punctuation (`*****`, `|`, `=`, bullets, emoji) has nothing to say.
        return;
    };
    // An IPv6 address may begin with `::` (`::1`, Node's `ECONNREFUSED ::1:3000`), or
    // be bracketed before its port (`[2001:db8::1]:9100`).
    let start = if token[..start].ends_with('[') && bracketed_ipv6(&token[start - 1..]).is_some() {
        start - 1
    } else {
        ipv6_start(token, start)
    };
    let end = token
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_alphanumeric())
        .map_or(token.len(), |(i, c)| i + c.len_utf8());
    speak_core(&token[start..end], words, out);
    let tail = &token[end..];
    if tail.starts_with('%') {
        out.punctuation("%");
    }
    if let Some(p) = tail
        .chars()
        .rev()
        .find(|c| matches!(c, '.' | ',' | ';' | ':' | '!' | '?'))
    {
        out.punctuation(p.encode_utf8(&mut [0; 4]));
    }
}

/// Where an identifier that starts at byte `start` of `token` really starts: before a
/// `::` that opens an IPv6 address.
fn ipv6_start(token: &str, start: usize) -> usize {
    let opens_v6 = token[..start].ends_with("::")
        && token[start..]
            .split(|c: char| !(c.is_ascii_hexdigit() || c == ':'))
            .next()
            .is_some_and(|a| !a.is_empty());
    if opens_v6 { start - 2 } else { start }
}

/// Splits an identifier at the characters that only group its parts (`alertname=HostDown`,
/// `{host:ip-10-0-1-23}`, `[FIRING:2]`) and speaks each part. A bracketed IPv6 address
/// with its port (`[2001:db8::1]:9100`) stays one.
fn speak_core(core: &str, words: &Words, out: &mut Speech) {
    if is_noise(core) {
        return;
    }
    let mut rest = core;
    while !rest.is_empty() {
        if let Some((address, port, after)) = bracketed_ipv6(rest) {
            speak_segment(address, words, out);
            if let Some(port) = port {
                out.word(words.colon);
                out.word(&spell(port));
            }
            rest = after;
            continue;
        }
        let end = rest
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == '[')
            .map_or(rest.len(), |(i, _)| i);
        let (chunk, after) = rest.split_at(end);
        rest = after;
        for piece in chunk.split(|c: char| {
            matches!(
                c,
                '=' | '{' | '}' | '[' | ']' | '(' | ')' | '"' | ',' | '|' | ';' | '<' | '>' | '`'
            )
        }) {
            let start = piece.find(char::is_alphanumeric).unwrap_or(piece.len());
            let piece =
                piece[ipv6_start(piece, start)..].trim_end_matches(|c: char| !c.is_alphanumeric());
            if piece.is_empty() {
                continue;
            }
            if is_url(piece) {
                out.link(words);
            } else if !is_noise(piece) {
                speak_piece(piece, words, out);
            }
        }
    }
}

/// `[2001:db8::1]:9100` at the start of `s`: the address, the port if any, and what
/// follows.
fn bracketed_ipv6(s: &str) -> Option<(&str, Option<&str>, &str)> {
    let inner = s.strip_prefix('[')?;
    let close = inner.find(']')?;
    let address = &inner[..close];
    let is_v6 = address.matches(':').count() >= 2
        && address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
    if !is_v6 {
        return None;
    }
    let after = &inner[close + 1..];
    if let Some(tail) = after.strip_prefix(':') {
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if is_port(&tail[..digits]) {
            return Some((address, Some(&tail[..digits]), &tail[digits..]));
        }
    }
    Some((address, None, after))
}

/// An identifier without grouping characters: mail addresses, paths, `host:port`,
/// IPv4 and IPv6 addresses, dotted names. Loops, never recursing on what the input
/// holds: a hostile `a@a@a@…` of any length cannot grow the stack.
fn speak_piece(piece: &str, words: &Words, out: &mut Speech) {
    for (i, part) in piece.split('@').enumerate() {
        if i > 0 {
            out.word(words.at);
        }
        speak_path(part, words, out);
    }
}

/// A piece without `@`: a path's segments, each spoken on its own.
fn speak_path(piece: &str, words: &Words, out: &mut Speech) {
    if !piece.contains('/') {
        return speak_segment(piece, words, out);
    }
    if piece
        .split('/')
        .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
    {
        // A date (`03/03/25`) or a ratio (`2/1`).
        return out.word(piece);
    }
    let mut first = true;
    for segment in piece.split('/').filter(|s| !s.is_empty()) {
        if !first {
            out.word(words.slash);
        }
        first = false;
        speak_segment(segment, words, out);
    }
}

/// A piece without `@` or `/`: `host:port`, IPv4 and IPv6 addresses, dotted names.
fn speak_segment(piece: &str, words: &Words, out: &mut Speech) {
    if piece.is_empty() {
        return;
    }
    if !piece.contains(':') {
        speak_dotted(piece, words, out);
        return;
    }
    let parts: Vec<&str> = piece.split(':').collect();
    if parts
        .iter()
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        // A time of day (`03:14:07`): the voice reads it well as it is.
        out.word(piece);
        return;
    }
    if parts.len() >= 3
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        // An IPv6 address.
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                out.word(words.colon);
            }
            if !part.is_empty() {
                out.word(&spell(part));
            }
        }
        return;
    }
    let mut previous = "";
    for part in parts.iter().filter(|p| !p.is_empty()) {
        if is_port(part) && is_host(previous) {
            out.word(words.colon);
            out.word(&spell(part));
        } else {
            // `key:value`, `FIRING:2`: the colon only separates.
            speak_dotted(part, words, out);
        }
        previous = part;
    }
}

/// Could `s` be the host of a `host:port`? A dotted name, `localhost`, or a short host
/// name as Prometheus' `instance` labels have them (`db1:9100`): lower-case letters,
/// digits and hyphens. (`FIRING:2` and other upper-case keys are not.)
fn is_host(s: &str) -> bool {
    s.contains('.')
        || s.eq_ignore_ascii_case("localhost")
        || (s.bytes().any(|b| b.is_ascii_lowercase())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
}

/// Could `s` be the port of a `host:port`? Two to five digits, at most 65535.
fn is_port(s: &str) -> bool {
    (2..=5).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u32>().is_ok_and(|p| p <= 65535)
}

/// A name whose parts are separated by dots: host names and IPv4 addresses get "dot"
/// spoken; decimals and version numbers are read as they are.
fn speak_dotted(s: &str, words: &Words, out: &mut Speech) {
    let parts: Vec<&str> = s.split('.').filter(|p| !p.is_empty()).collect();
    if parts.len() <= 1 {
        speak_word(parts.first().copied().unwrap_or(s), words, out);
        return;
    }
    let numeric = |p: &&str| p.bytes().all(|b| b.is_ascii_digit());
    let starts_with_digit = |p: &str| p.starts_with(|c: char| c.is_ascii_digit());
    let version = parts[0].strip_prefix(['v', 'V']).unwrap_or(parts[0]);
    if (numeric(&version)
        && !version.is_empty()
        && parts[1..].iter().all(numeric)
        && version != parts[0])
        || (parts.len() == 2 && numeric(&parts[0]) && starts_with_digit(parts[1]))
    {
        // A version (`v11.5.2`) or a measurement (`3.41s`, `12.5GB`).
        return out.word(s);
    }
    if parts.iter().all(numeric) {
        if parts.len() == 4 && parts.iter().all(|p| p.len() <= 3) {
            for (i, octet) in parts.iter().enumerate() {
                if i > 0 {
                    out.word(words.dot);
                }
                out.word(&spell(octet));
            }
        } else {
            out.word(s);
        }
        return;
    }
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.word(words.dot);
        }
        speak_word(part, words, out);
    }
}

/// One label: `_` separates words, and so does `-` around numbers, which are read digit
/// by digit, with "dash" between two groups of digits so that they stay apart
/// (`ip-10-0-1-23` → "ip 1 0 dash 0 dash 1 dash 2 3", never the same as `ip-100-1-2-3`);
/// CamelCase is split (`HostDown` → "Host Down").
/// Dates (`2025-03-03`) and plain numbers are read as they are, and letter-digit words such
/// as `db1` are left to the voice, which reads them well.
fn speak_word(word: &str, words: &Words, out: &mut Speech) {
    let segments: Vec<&str> = word
        .split(['-', '_'])
        .filter(|s| !s.is_empty() && !is_hash_segment(s))
        .collect();
    let numeric = |s: &&str| s.bytes().all(|b| b.is_ascii_digit());
    if segments.is_empty() {
        return;
    }
    if segments.iter().all(numeric) {
        out.word(word);
        return;
    }
    if !segments.iter().any(numeric) && !word.contains('_') {
        // A hyphenated word (`api-gateway`, `all-good`) reads well as it is.
        out.word(&split_camel_case(&segments.join("-")));
        return;
    }
    let mut previous_numeric = false;
    for segment in segments {
        if numeric(&segment) {
            if previous_numeric {
                out.word(words.dash);
            }
            out.word(&spell(segment));
            previous_numeric = true;
        } else {
            out.word(&split_camel_case(segment));
            previous_numeric = false;
        }
    }
}

/// `9100` → `9 1 0 0`: each character its own word.
fn spell(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// `KubePodCrashLooping` → `Kube Pod Crash Looping`, `CPUUtilization` → `CPU Utilization`.
fn split_camel_case(word: &str) -> Cow<'_, str> {
    let chars: Vec<char> = word.chars().collect();
    // An upper-case letter starts a word after a lower-case one (`HostDown`), or after
    // an acronym when a real word follows (`CPUUtilization`, but not `IPv4`).
    let boundary = |i: usize| {
        let (prev, c) = (chars[i - 1], chars[i]);
        let word_follows = chars.get(i + 1).is_some_and(|n| n.is_lowercase())
            && chars.get(i + 2).is_some_and(|n| n.is_lowercase());
        c.is_uppercase() && (prev.is_lowercase() || (prev.is_uppercase() && word_follows))
    };
    if !(1..chars.len()).any(boundary) {
        return Cow::Borrowed(word);
    }
    let mut out = String::with_capacity(word.len() + 4);
    for (i, c) in chars.iter().enumerate() {
        if i > 0 && boundary(i) {
            out.push(' ');
        }
        out.push(*c);
    }
    Cow::Owned(out)
}

fn is_url(token: &str) -> bool {
    let lower = token.to_ascii_lowercase();
    let lower = lower.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    lower.contains("://") || lower.starts_with("www.") || lower.starts_with("mailto:")
}

/// A part of a name that is a hash: a pod's replica-set suffix, the hex of an instance id.
fn is_hash_segment(s: &str) -> bool {
    s.len() >= 8
        && s.bytes().all(|b| b.is_ascii_hexdigit())
        && s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Is this identifier something nobody wants read aloud: a hash, UUID or hex id, an ARN,
/// a base64 blob or a random request id? Host names, IP addresses and words are kept.
fn is_noise(piece: &str) -> bool {
    let lower = piece.to_ascii_lowercase();
    if lower.starts_with("arn:") {
        return true;
    }
    let len = piece.len();
    if len < 12 || !piece.is_ascii() {
        return false;
    }
    let count = |f: fn(&u8) -> bool| piece.bytes().filter(f).count();
    let digits = count(u8::is_ascii_digit);
    let letters = count(u8::is_ascii_alphabetic);
    let hex = piece.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if hex && digits > 0 && letters > 0 {
        return true;
    }
    // Base64 and random ids: no dots or colons (those are names and addresses), mixed
    // case and digits, switching between them all the time.
    let base64 = piece
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-'));
    if !base64 || len < 16 {
        return false;
    }
    // A name people gave in parts (`prod-Web01-HighCPU-Api02`, an alarm's name) is
    // judged part by part: only a long part can be a blob.
    if piece.contains(['-', '_']) {
        return piece
            .split(['-', '_'])
            .any(|part| part.len() >= 16 && is_random(part));
    }
    is_random(piece)
}

/// Mixed case and digits, switching between them all the time: base64, a random id.
fn is_random(piece: &str) -> bool {
    let len = piece.len();
    let count = |f: fn(&u8) -> bool| piece.bytes().filter(f).count();
    let digits = count(u8::is_ascii_digit);
    let upper = count(u8::is_ascii_uppercase);
    let lower_count = count(u8::is_ascii_lowercase);
    let class = |b: u8| {
        if b.is_ascii_digit() {
            0
        } else if b.is_ascii_uppercase() {
            1
        } else {
            2
        }
    };
    let switches = piece
        .as_bytes()
        .windows(2)
        .filter(|w| class(w[0]) != class(w[1]))
        .count();
    let mixed = upper >= 2 && lower_count >= 2 && switches * 10 >= len * 3;
    (mixed && digits >= 3) || (mixed && digits >= 1 && piece.contains(['+', '/']))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn en(text: &str) -> String {
        speakable(text, "en-US")
    }

    #[test]
    fn drops_urls_and_ids_and_collapses_whitespace() {
        let text = "CRITICAL:  db1\n\tis DOWN  see https://grafana.example.com/d/abc?x=1 \
                    trace 3f2a9c0d8e7b6a5f4e3d2c1b req_AbC123dEf456GhI789jK \
                    uuid 123e4567-e89b-12d3-a456-426614174000 (www.example.com)";
        assert_eq!(en(text), "CRITICAL: db1 is DOWN see link trace uuid link");
    }

    #[test]
    fn host_names_addresses_and_ports_are_kept_and_spelled() {
        // Defect 1: these were dropped as "opaque ids".
        assert_eq!(
            en("HostDown db1.example.com:9100"),
            "Host Down db1 dot example dot com colon 9 1 0 0"
        );
        assert_eq!(
            en("ip-10-0-1-23.ap-northeast-1.compute.internal is down"),
            "ip 1 0 dash 0 dash 1 dash 2 3 dot ap northeast 1 dot compute dot internal is down"
        );
        // Groups of digits stay apart: these are three different hosts.
        assert_eq!(en("ip-10-0-12-3"), "ip 1 0 dash 0 dash 1 2 dash 3");
        assert_eq!(en("ip-100-1-2-3"), "ip 1 0 0 dash 1 dash 2 dash 3");
        // IPv6: a leading `::`, and a bracketed address with its port.
        assert_eq!(
            en("connect ECONNREFUSED ::1:3000"),
            "connect ECONNREFUSED colon colon 1 colon 3 0 0 0"
        );
        assert_eq!(
            en("instance = [2001:db8::1]:9100 down"),
            "instance 2 0 0 1 colon d b 8 colon colon 1 colon 9 1 0 0 down"
        );
        assert_eq!(en("[fe80::1] up"), "f e 8 0 colon colon 1 up");
        assert_eq!(
            en("instance = 10.0.1.23:9100, job = node_exporter"),
            "instance 1 0 dot 0 dot 1 dot 2 3 colon 9 1 0 0, job node exporter"
        );
        assert_eq!(
            en("[FIRING:2] KubePodCrashLooping {host:web-01}"),
            "FIRING 2 Kube Pod Crash Looping host web 0 1"
        );
        assert_eq!(
            speakable("db1.example.com:5432 停止", "ja-JP"),
            "db1 ドット example ドット com コロン 5 4 3 2 停止"
        );
    }

    #[test]
    fn keeps_ordinary_words_numbers_and_japanese() {
        assert_eq!(
            en("Disk usage 95% on fileserver-production-01 at 03:14:07, value 92.5 1234567890123"),
            "Disk usage 95% on fileserver production 0 1 at 03:14:07, value 92.5 1234567890123"
        );
        assert_eq!(
            speakable("web03停止。ホスト web03 が応答しません。", "ja-JP"),
            "web03 停止。ホスト web03 が応答しません。"
        );
        assert_eq!(
            en("Check_MK: web1/CPU load OK -> CRIT"),
            "Check MK: web1 slash CPU load OK to CRIT"
        );
    }

    #[test]
    fn quoted_history_signatures_and_opaque_ids_go() {
        let text = "Backup failed on db1\nsee below\n> old quoted line\nmore\n-- \nAlice\n555-1234";
        assert_eq!(en(text), "Backup failed on db1 see below more");
        let text = "Job done\n\nOn Mon, 3 Mar 2025, cron wrote:\n> earlier";
        assert_eq!(en(text), "Job done");
        let text = "Backup report\n--\ndb1 failed";
        assert_eq!(en(text), "Backup report db1 failed");
        // A reply's history goes; a bare forward is the alert it forwards.
        let text =
            "Looking into it\n-----Original Message-----\nFrom: nagios\nSubject: x\n\ndb1 is DOWN";
        assert_eq!(en(text), "Looking into it");
        let text = "\n-----Original Message-----\nFrom: nagios@example.com\nSent: Monday\nTo: ops\nSubject: PROBLEM\n\ndb1 is DOWN\n-- \nNagios";
        assert_eq!(en(text), "db1 is DOWN");
        let text = "FYI\n---------- Forwarded message ---------\nFrom: Zabbix <z@example.com>\nDate: Mon\nSubject: Problem\nTo: <ops@example.com>\n\n\nProblem: disk full on web3";
        assert_eq!(en(text), "FYI Problem: disk full on web3");
        let text = "Begin forwarded message:\n\nFrom: cron <root@db1>\nSubject: backup\nDate: Mon\nTo: ops\n\nbackup failed";
        assert_eq!(en(text), "backup failed");
        // Outlook 365's separator: a forward when nothing is above it, history under a
        // reply; a line of underscores with no `From:` block under it is a divider.
        let o365 = "________________________________\nFrom: Nagios\nSent: Monday\nTo: ops\nSubject: x\n\nHost db1 DOWN";
        assert_eq!(en(o365), "Host db1 DOWN");
        assert_eq!(en(&format!("On it\n{o365}")), "On it");
        assert_eq!(
            en("Disk report\n____________\ndb1 full"),
            "Disk report db1 full"
        );
        // A body that merely starts with a `From:` line is not a header block, nor is
        // output with `From:`, `To:` and lines of its own.
        assert_eq!(
            en("From: the backup job\ndb1 failed"),
            "From: the backup job db1 failed"
        );
        assert_eq!(
            en("From: OK\nTo: CRITICAL\nSubject: web\nload 9\n\nend"),
            "From: OK To: CRITICAL Subject: web load 9 end"
        );
        assert_eq!(
            en("From: Nagios\nSent: Monday\nTo: ops\nSubject: x\n\nHost db1 DOWN"),
            "Host db1 DOWN"
        );
        // Marker after marker, with no blank line anywhere: each header block is
        // looked at for a few lines only (no quadratic scan), and what is left is kept.
        let many = "________________________________\nFrom: a\nSubject: b\n".repeat(20_000);
        let many = format!("{many}end");
        let kept = unquoted_lines(&many);
        assert_eq!((kept.len(), kept.first()), (1, Some(&"end")));
        assert_eq!(
            en(
                "pod api-gateway-7d9f8b6c4-x2x9z instance i-0abc123def4567890 blob dGhpcyBpcyBhIHRlc3Q/Zm9v+YmFy=="
            ),
            "pod api-gateway-x2x9z instance i blob"
        );
        assert_eq!(
            en("arn:aws:sns:ap-northeast-1:123456789012:ops https://a/b https://c/d ok"),
            "link ok"
        );
        // Names people gave in parts are names, however mixed their case and digits.
        assert_eq!(
            en("prod-Web01-HighCPU-Api02 ECS-Service2-Memory85Percent ALB-Target5xx-Prod01"),
            "prod-Web01-High CPU-Api02 ECS-Service2-Memory85Percent ALB-Target5xx-Prod01"
        );
        // A long blob inside a dashed name still goes.
        assert_eq!(en("token-dGhpcyBpcyB5hIHRlc3QxZm9v ok"), "ok");
    }

    #[test]
    fn prompts_exist_in_english_and_japanese() {
        let en = Prompts::builtin("en-US");
        let ja = Prompts::builtin("ja-JP");
        assert_eq!(en.joined("alice"), "alice joined.");
        assert_eq!(ja.joined("alice"), "alice が参加しました。");
        assert_eq!(en.dial_in(7), "Joining the bridge of incident 7.");
        for (key, _) in PROMPT_KEYS {
            let (mut e, mut j) = (en.clone(), ja.clone());
            let (e, j) = (e.get_mut(key).unwrap(), j.get_mut(key).unwrap());
            assert!(!e.is_empty() && e.is_ascii(), "{key}");
            assert!(!j.is_ascii(), "{key} has no Japanese text: {j}");
        }
        assert_eq!(
            Prompts::then("Wrong PIN.", "Goodbye."),
            "Wrong PIN. Goodbye."
        );
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
