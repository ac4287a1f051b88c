//! TwiML for the calls mailcall places, built as strings with every value XML-escaped.
//!
//! Twilio accepts an inline `Twiml` parameter of at most 4,000 characters, and Amazon
//! Polly voices read at most 3,000 bytes of `<Say>` text. [`fit`] cuts the spoken text so
//! the finished document always satisfies both; [`call`] then cannot exceed them.
//!
//! Every fixed phrase (press 1, goodbye, the PIN prompt, …) comes from a
//! [`speech::Prompts`] in the call's language, so a Japanese call never reads English
//! text in a Japanese voice.

use std::borrow::Cow;

use crate::speech::{self, Prompts};

/// Twilio's limit on the `Twiml` parameter of `Calls.json`, in characters.
pub const MAX_TWIML_CHARS: usize = 4000;
/// The limit on `<Say>` text for Polly voices, in UTF-8 bytes.
pub const MAX_SAY_BYTES: usize = 3000;
/// Conference rooms are named `mailcall-` and 16 hex digits; see [`room_name`].
const ROOM_NAME_LEN: usize = "mailcall-".len() + 16;

/// The conference room of an incident. It is opaque on purpose: Twilio asks that
/// friendly names carry no phone numbers, addresses or other personal data.
pub fn room_name(incident_public_id: &str) -> String {
    format!("mailcall-{incident_public_id}")
}

/// The TwiML of an alert call: the message said twice, then the incident's conference.
pub fn call(text: &str, language: &str, voice: &str, room: &str) -> String {
    say_then_join(text, language, voice, room, 2)
}

/// TwiML for someone already in the bridge: the message once, then back into the room.
pub fn announce(text: &str, language: &str, voice: &str, room: &str) -> String {
    say_then_join(fit(text, language, voice), language, voice, room, 1)
}

fn say_then_join(text: &str, language: &str, voice: &str, room: &str, times: u8) -> String {
    format!(
        "<Response><Say language=\"{}\" voice=\"{}\" loop=\"{times}\">{}</Say>\
         <Dial><Conference beep=\"true\" startConferenceOnEnter=\"true\" endConferenceOnExit=\"false\">{}</Conference></Dial></Response>",
        escape(language),
        escape(voice),
        escape(text),
        escape(room)
    )
}

/// With a public URL: the alert and the press-1 prompt inside `<Gather numDigits="1">`
/// posting to `action` (press 1 to join, 9 to decline), asked twice; no key means the
/// `nobody_joined` phrase and goodbye.
pub fn gather_call(
    prompts: &Prompts,
    text: &str,
    language: &str,
    voice: &str,
    action: &str,
) -> String {
    let render = |t: &str| {
        let say = format!(
            "<Say language=\"{}\" voice=\"{}\">{}</Say><Say language=\"{}\" voice=\"{}\">{}</Say>",
            escape(language),
            escape(voice),
            escape(t),
            escape(language),
            escape(voice),
            escape(&prompts.press_one)
        );
        let gather = format!(
            "<Gather numDigits=\"1\" timeout=\"8\" action=\"{}\" method=\"POST\">{say}</Gather>",
            escape(action)
        );
        format!(
            "<Response>{gather}{gather}<Say language=\"{}\" voice=\"{}\">{}</Say><Hangup/></Response>",
            escape(language),
            escape(voice),
            escape(&Prompts::then(&prompts.nobody_joined, &prompts.goodbye))
        )
    };
    // The text appears twice: each copy gets half of what is left.
    let overhead = render("").chars().count();
    let budget = MAX_TWIML_CHARS.saturating_sub(overhead) / 2;
    render(speech::cap(text, MAX_SAY_BYTES, budget))
}

/// Into the conference, with join and leave reported to `status_callback`.
pub fn join(
    greeting: &str,
    language: &str,
    voice: &str,
    room: &str,
    status_callback: &str,
) -> String {
    format!(
        "<Response><Say language=\"{}\" voice=\"{}\">{}</Say><Dial><Conference beep=\"true\" startConferenceOnEnter=\"true\" \
         endConferenceOnExit=\"false\" statusCallback=\"{}\" statusCallbackEvent=\"join leave\">{}</Conference></Dial></Response>",
        escape(language),
        escape(voice),
        escape(greeting),
        escape(status_callback),
        escape(room)
    )
}

/// Says `text`, then hangs up.
pub fn say_and_hang_up(text: &str, language: &str, voice: &str) -> String {
    format!(
        "<Response><Say language=\"{}\" voice=\"{}\">{}</Say><Hangup/></Response>",
        escape(language),
        escape(voice),
        escape(text)
    )
}

/// Asks a caller for the bridge PIN, posting the digits to `action`.
pub fn gather_pin(
    prompts: &Prompts,
    digits: usize,
    action: &str,
    language: &str,
    voice: &str,
) -> String {
    format!(
        "<Response><Gather numDigits=\"{digits}\" timeout=\"10\" action=\"{}\" method=\"POST\"><Say language=\"{}\" voice=\"{}\">\
         {}</Say></Gather><Say language=\"{}\" voice=\"{}\">{}</Say><Hangup/></Response>",
        escape(action),
        escape(language),
        escape(voice),
        escape(&prompts.enter_pin),
        escape(language),
        escape(voice),
        escape(&prompts.goodbye)
    )
}

/// An announcement into a conference (`AnnounceUrl`): `text`, once.
pub fn say(text: &str, language: &str, voice: &str) -> String {
    format!(
        "<Response><Say language=\"{}\" voice=\"{}\">{}</Say></Response>",
        escape(language),
        escape(voice),
        escape(text)
    )
}

/// What an answering machine hears before mailcall hangs up: the `voicemail` phrase and
/// the alert, once.
pub fn voicemail(prompts: &Prompts, text: &str, language: &str, voice: &str) -> String {
    // The phrase is at most a sentence; the alert gives up the room it needs.
    let intro = speech::cap(&prompts.voicemail, 300, 300);
    let render = |t: &str| {
        format!(
            "<Response><Say language=\"{}\" voice=\"{}\">{}</Say><Hangup/></Response>",
            escape(language),
            escape(voice),
            escape(&Prompts::then(intro, t))
        )
    };
    let overhead = render("").chars().count() + 1;
    let text = speech::cap(
        fit(text, language, voice),
        MAX_SAY_BYTES.saturating_sub(intro.len() + 1),
        MAX_TWIML_CHARS.saturating_sub(overhead),
    );
    render(text)
}

/// The longest prefix of `text` that [`call`] can speak within Twilio's limits.
pub fn fit<'a>(text: &'a str, language: &str, voice: &str) -> &'a str {
    let overhead = call("", language, voice, &"x".repeat(ROOM_NAME_LEN))
        .chars()
        .count();
    speech::cap(
        text,
        MAX_SAY_BYTES,
        MAX_TWIML_CHARS.saturating_sub(overhead),
    )
}

/// Escapes the five XML special characters and drops the characters XML 1.0 does not
/// allow at all, escaped or not (most controls, U+FFFE, U+FFFF): one of them in a mail
/// would make Twilio refuse the whole call.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) && s.chars().all(speech::is_xml_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars().filter(|c| speech::is_xml_char(*c)) {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_matches_escaped_len() {
        let s = "a&b<c>d\"e'f";
        assert_eq!(escape(s), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
        assert_eq!(
            escape(s).chars().count(),
            s.chars().map(speech::escaped_len).sum::<usize>()
        );
    }

    #[test]
    fn characters_xml_forbids_are_dropped() {
        // Found by the property tests in tests/it/fuzz.rs.
        assert_eq!(escape("a\u{fffe}b\u{1}c\u{ffff}d\te"), "abcd\te");
        assert_eq!(
            escape("\u{fffe}").chars().count(),
            speech::escaped_len('\u{fffe}')
        );
    }

    #[test]
    fn call_twiml_shape() {
        let t = call(
            "db <1> & db2 down",
            "en-US",
            "Polly.Joanna",
            "mailcall-0123456789abcdef",
        );
        assert_eq!(
            t,
            "<Response><Say language=\"en-US\" voice=\"Polly.Joanna\" loop=\"2\">db &lt;1&gt; &amp; db2 down</Say>\
             <Dial><Conference beep=\"true\" startConferenceOnEnter=\"true\" endConferenceOnExit=\"false\">\
             mailcall-0123456789abcdef</Conference></Dial></Response>"
        );
    }

    #[test]
    fn gather_calls_ask_twice_and_always_fit() {
        let t = gather_call(
            &Prompts::builtin("en-US"),
            "db & down",
            "en-US",
            "Polly.Joanna",
            "https://x/twilio/gather?room=r&a=1",
        );
        assert_eq!(t.matches("<Gather numDigits=\"1\"").count(), 2);
        assert!(t.contains("action=\"https://x/twilio/gather?room=r&amp;a=1\""));
        assert!(t.ends_with("<Hangup/></Response>"));
        for text in ["&".repeat(5000), "停".repeat(5000)] {
            assert!(
                gather_call(
                    &Prompts::builtin("ja-JP"),
                    &text,
                    "ja-JP",
                    "Polly.Mizuki",
                    "https://alerts.example.com/twilio/gather?room=0123456789abcdef"
                )
                .chars()
                .count()
                    <= MAX_TWIML_CHARS
            );
        }
    }

    /// Every TwiML document with a fixed phrase, in one language, for the snapshots.
    fn prompt_twiml(language: &str, voice: &str) -> String {
        let prompts = Prompts::builtin(language);
        let action = "https://alerts.example.com/twilio/gather?room=0123456789abcdef";
        [
            gather_call(
                &prompts,
                "db1 dot example dot com is down",
                language,
                voice,
                action,
            ),
            gather_pin(
                &prompts,
                4,
                "https://alerts.example.com/twilio/pin",
                language,
                voice,
            ),
            voicemail(&prompts, "db1 is down", language, voice),
            say_and_hang_up(
                &Prompts::then(&prompts.wrong_pin, &prompts.goodbye),
                language,
                voice,
            ),
            say_and_hang_up(&prompts.declined, language, voice),
            say_and_hang_up(&prompts.not_taken, language, voice),
            join(
                &prompts.joining,
                language,
                voice,
                "mailcall-0123456789abcdef",
                "https://alerts.example.com/twilio/conference?room=0123456789abcdef",
            ),
            join(
                &prompts.dial_in(7),
                language,
                voice,
                "mailcall-0123456789abcdef",
                "https://alerts.example.com/twilio/conference?room=0123456789abcdef",
            ),
            say(&prompts.joined("alice"), language, voice),
            say(&prompts.joined(&prompts.responder), language, voice),
            say_and_hang_up(
                &Prompts::then(&prompts.no_incident, &prompts.goodbye),
                language,
                voice,
            ),
        ]
        .join("\n")
    }

    #[test]
    fn english_prompts_snapshot() {
        insta::assert_snapshot!(prompt_twiml("en-US", "Polly.Joanna"));
    }

    #[test]
    fn japanese_prompts_snapshot() {
        let twiml = prompt_twiml("ja-JP", "Polly.Mizuki");
        // Defect 4: no English phrase in a Japanese call.
        for english in [
            "Press 1",
            "Goodbye",
            "PIN",
            "joined",
            "This is mailcall",
            "incident",
        ] {
            assert!(!twiml.contains(english), "{english:?} in {twiml}");
        }
        insta::assert_snapshot!(twiml);
    }

    #[test]
    fn built_in_wrappers_speak_the_call_language() {
        let (ja, en) = (Prompts::builtin("ja-JP"), Prompts::builtin("en-US"));
        assert!(gather_call(&ja, "x", "ja-JP", "Polly.Mizuki", "https://a/b").contains("1 を"));
        assert!(voicemail(&ja, "x", "ja-JP", "Polly.Mizuki").contains("メールコール"));
        assert!(gather_call(&en, "x", "en-US", "Polly.Joanna", "https://a/b").contains("Press 1"));
    }

    #[test]
    fn voicemail_fits_whatever_the_phrase() {
        let mut prompts = Prompts::builtin("ja-JP");
        prompts.voicemail = "&".repeat(1000);
        for text in ["&".repeat(5000), "停".repeat(5000)] {
            let t = voicemail(&prompts, &text, "ja-JP", "Polly.Mizuki");
            assert!(
                t.chars().count() <= MAX_TWIML_CHARS,
                "{}",
                t.chars().count()
            );
        }
    }

    #[test]
    fn fitted_text_always_fits() {
        let room = room_name("0123456789abcdef");
        for text in ["&".repeat(5000), "停".repeat(5000), "word ".repeat(2000)] {
            let said = fit(&text, "ja-JP", "Polly.Mizuki");
            assert!(said.len() <= MAX_SAY_BYTES);
            let twiml = call(said, "ja-JP", "Polly.Mizuki", &room);
            assert!(
                twiml.chars().count() <= MAX_TWIML_CHARS,
                "{}",
                twiml.chars().count()
            );
            assert!(said.len() > 500, "cut far too much: {}", said.len());
        }
    }
}
