//! Property tests standing in for a fuzzer (cargo-fuzz needs a nightly toolchain, which
//! this project's machines do not have): arbitrary bytes and hostile text through MIME
//! parsing → routing → speech → TwiML must never panic, and the TwiML must always be
//! well-formed XML within Twilio's limits.
//!
//! `PROPTEST_CASES=200000 cargo test --release --test it fuzz` runs it for a while.
//! Inputs that once broke it are pinned as plain regression tests at the bottom.

use std::path::Path;
use std::sync::LazyLock;

use proptest::prelude::*;

use mailcall::alert::{Alert, DirectAlert, Envelope};
use mailcall::config::Config;
use mailcall::route::{self, Action};
use mailcall::twilio::twiml;

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    Config::parse(
        Path::new("fuzz.toml"),
        r#"
[twilio]
from = "+15005550006"
[contacts]
alice = "+15005550001"
[[rule]]
name = "drop"
subject = '(?i)resolved'
drop = true
[[rule]]
name = "captures"
subject = '(?P<host>\S+) (?P<state>DOWN|UP)'
call = ["alice"]
message = "{host} is {state}: {body} {from} {to}"
dedup_key = "{host}"
[[rule]]
name = "catch-all"
call = ["+15005550009"]
message = "{subject} {body}"
"#,
    )
    .unwrap()
});

/// Every character allowed in an XML 1.0 document.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// What Twilio needs of every TwiML mailcall sends.
fn check_twiml(twiml: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        twiml.chars().count() <= twiml::MAX_TWIML_CHARS,
        "{} chars",
        twiml.chars().count()
    );
    if let Some(bad) = twiml.chars().find(|c| !xml_char(*c)) {
        return Err(TestCaseError::fail(format!(
            "character {bad:?} is not allowed in XML: {twiml:?}"
        )));
    }
    crate::fake_twilio::well_formed(twiml).map_err(TestCaseError::fail)?;
    let open = twiml.find("<Say").expect("no <Say>");
    let start = open + twiml[open..].find('>').unwrap() + 1;
    let said = &twiml[start..twiml.find("</Say>").expect("no </Say>")];
    // The escaped text; unescaped it is at most MAX_SAY_BYTES.
    let unescaped = said
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    prop_assert!(
        unescaped.len() <= twiml::MAX_SAY_BYTES,
        "{} bytes spoken",
        unescaped.len()
    );
    Ok(())
}

fn pipeline(raw: &[u8], envelope: &Envelope) -> Result<(), TestCaseError> {
    let alert = Alert::from_mime(raw, envelope);
    let decision = route::route(&CONFIG, &alert, &mailcall::oncall::Policy::now());
    prop_assert!(decision.message.len() <= twiml::MAX_SAY_BYTES);
    if decision.action == Action::Call {
        check_twiml(&twiml::call(
            &decision.message,
            &decision.language,
            &decision.voice,
            &twiml::room_name("0123456789abcdef"),
        ))?;
    }
    Ok(())
}

/// Text that likes to break things: XML specials, controls, non-characters, RTL marks,
/// encoded-word syntax, long runs.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[<>&\"'\\x00-\\x1f\\u{7f}\\u{fffe}\\u{ffff}\\u{200f}a-z =?!]{0,200}",
        "=\\?(utf-8|iso-2022-jp|shift_jis|x-bogus)\\?[BbQq]\\?[A-Za-z0-9+/=_%]{0,40}\\?=.{0,20}",
        ".{0,3}".prop_map(|s| s.repeat(3000)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_break_the_pipeline(raw in proptest::collection::vec(any::<u8>(), 0..4096)) {
        pipeline(&raw, &Envelope { mail_from: Some("a@b".into()), rcpt_to: vec!["c@d".into()] })?;
    }

    #[test]
    fn hostile_headers_and_bodies_make_valid_twiml(
        subject in hostile_text(),
        from in hostile_text(),
        body in hostile_text(),
        charset in prop_oneof![Just("utf-8"), Just("iso-2022-jp"), Just("shift_jis"), Just("euc-jp"), Just("x-unknown")],
        encoding in prop_oneof![Just("8bit"), Just("base64"), Just("quoted-printable"), Just("7bit")],
    ) {
        let raw = format!(
            "From: {from}\r\nTo: alerts@example.com\r\nSubject: {subject}\r\nContent-Type: text/plain; charset={charset}\r\n\
             Content-Transfer-Encoding: {encoding}\r\n\r\n{body}\r\n"
        );
        pipeline(raw.as_bytes(), &Envelope::default())?;
    }

    #[test]
    fn direct_alerts_with_hostile_fields_make_valid_twiml(
        message in hostile_text(),
        language in hostile_text(),
        voice in hostile_text(),
    ) {
        let alert = DirectAlert { numbers: vec!["+15005550001".into()], message, language: Some(language), voice: Some(voice), dedup_key: None, ..DirectAlert::default() };
        let d = route::direct(&CONFIG, "webhook", &alert, &mailcall::oncall::Policy::now());
        check_twiml(&twiml::call(&d.message, &d.language, &d.voice, &twiml::room_name("0123456789abcdef")))?;
    }
}

// Inputs the property tests found, kept as plain regression tests.

#[test]
fn regression_a_non_character_in_the_subject_is_not_sent_to_twilio() {
    pipeline("Subject: \u{fffe}\r\n\r\n".as_bytes(), &Envelope::default()).unwrap();
}

#[test]
fn regression_hostile_language_and_voice_fall_back_to_the_defaults() {
    for (language, voice) in [
        ("", "\u{fffe}"),
        (&*" ".repeat(3000), &*"¡".repeat(3000)),
        ("ja-JP\"><Hangup/>", "x"),
    ] {
        let alert = DirectAlert {
            numbers: vec!["+15005550001".into()],
            message: "db down".into(),
            language: Some(language.to_string()),
            voice: Some(voice.to_string()),
            dedup_key: None,
            ..DirectAlert::default()
        };
        let d = route::direct(&CONFIG, "webhook", &alert, &mailcall::oncall::Policy::now());
        assert_eq!(d.language, "en-US");
        check_twiml(&twiml::call(
            &d.message,
            &d.language,
            &d.voice,
            &twiml::room_name("0123456789abcdef"),
        ))
        .unwrap();
    }
}
