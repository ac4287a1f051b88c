//! The configuration's unit tests: defaults, every kind of problem and its position.

use super::*;

const MINIMAL: &str = "[twilio]\nfrom = \"+15005550006\"\n";

fn problems(text: &str) -> Vec<String> {
    match Config::parse(Path::new("rules.toml"), text) {
        Ok(_) => vec![],
        Err(ConfigError::Invalid(p)) => p.to_string().lines().map(String::from).collect(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn languages_and_voices() {
    for ok in ["en-US", "ja-JP", "cmn-CN", "en", "zh-Hant-TW"] {
        assert!(is_language(ok), "{ok}");
    }
    for bad in ["", "e", "english", "en_US", "en-US\"", "ja-JP ", "\u{fffe}"] {
        assert!(!is_language(bad), "{bad:?}");
    }
    for ok in [
        "alice",
        "Polly.Joanna",
        "Polly.Mizuki-Neural",
        "Google.en-US-Standard-C",
    ] {
        assert!(is_voice(ok), "{ok}");
    }
    for bad in ["", ".x", "Polly Joanna", "a\"b", &"x".repeat(65)] {
        assert!(!is_voice(bad), "{bad:?}");
    }
    let got = problems(&format!(
        "{MINIMAL}[defaults]\nvoice = \"Polly Joanna\"\nlanguage = \"english\"\n"
    ));
    assert_eq!(got.len(), 2, "{got:?}");
}

#[test]
fn e164() {
    for ok in ["+15005550006", "+81312345678", "+44"] {
        assert!(is_e164(ok), "{ok}");
    }
    for bad in [
        "15005550006",
        "+0123",
        "+1",
        "+1 500 555",
        "+1234567890123456",
        "",
        "+",
    ] {
        assert!(!is_e164(bad), "{bad}");
    }
}

#[test]
fn minimal_config_has_sane_defaults() {
    let c = Config::parse(Path::new("/etc/mailcall/rules.toml"), MINIMAL).unwrap();
    assert_eq!(c.smtp.listen.to_string(), "127.0.0.1:2525");
    assert_eq!(c.smtp.max_message_bytes, 10 * 1024 * 1024);
    assert_eq!(c.twilio.api_base, "https://api.twilio.com");
    assert_eq!(c.twilio.ring_seconds, 30);
    assert_eq!(c.defaults.cooldown, Duration::from_secs(900));
    assert_eq!(c.limits.max_calls_per_hour, 60);
    assert_eq!(c.state.path, Path::new("/etc/mailcall/mailcall.db"));
    assert_eq!(c.smtp.max_connections_per_ip, 100);
    assert_eq!(c.smtp.bare_newline, BareNewline::Normalize);
}

#[test]
fn bare_newline_is_normalize_or_reject() {
    let c = Config::parse(
        Path::new("rules.toml"),
        &format!("{MINIMAL}[smtp]\nbare_newline = \"reject\"\n"),
    )
    .unwrap();
    assert_eq!(c.smtp.bare_newline, BareNewline::Reject);
    let got = problems(&format!("{MINIMAL}[smtp]\nbare_newline = \"yes\"\n"));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("rules.toml:4:") && got[0].contains("`yes`"),
        "{got:?}"
    );
}

#[test]
fn groups_and_calls_resolve_to_unique_numbers() {
    let c = Config::parse(
        Path::new("r.toml"),
        &format!(
            "{MINIMAL}[contacts]\nalice = \"+15005550001\"\nbob = \"+15005550002\"\n\
             [groups]\noncall = [\"alice\", \"bob\", \"+15005550003\"]\n\
             [[rule]]\nname = \"all\"\ncall = [\"bob\", \"oncall\", \"+15005550009\", \"+15005550001\"]\n"
        ),
    )
    .unwrap();
    assert_eq!(
        c.rules[0].action,
        RuleAction::Call(
            [
                "+15005550002",
                "+15005550001",
                "+15005550003",
                "+15005550009"
            ]
            .map(|n| Callee::Number(n.into()))
            .to_vec()
        )
    );
}

#[test]
fn reports_every_problem_with_position() {
    let text = format!(
        "{MINIMAL}[contacts]\nalice = \"5550001\"\n\
         [[rule]]\nname = \"a\"\nsubject = '(unclosed'\ncall = [\"bobb\"]\nmessage = \"{{host}} down\"\n\
         [[rule]]\nname = \"b\"\n"
    );
    let got = problems(&text);
    // The broken regex names no captures, so `{host}` is not reported on top of it.
    assert_eq!(got.len(), 4, "{got:#?}");
    assert!(
        got[0].starts_with("rules.toml:4:9: contact `alice` has number `5550001`"),
        "{}",
        got[0]
    );
    assert!(
        got[1].starts_with("rules.toml:7:12: invalid regex for `subject`"),
        "{}",
        got[1]
    );
    assert!(
        got[2].starts_with("rules.toml:8:9: `bobb` in rule `a` is neither"),
        "{}",
        got[2]
    );
    assert!(
        got[3].starts_with("rules.toml:11:8: rule `b` has neither `call` nor `drop = true`"),
        "{}",
        got[3]
    );
}

#[test]
fn defect_7_regex_errors_point_into_the_pattern_and_suppress_follow_on_errors() {
    // Literal, basic (with escapes) and multi-line strings: the column is that of the
    // offending character inside the pattern.
    for (pattern, line, column) in [
        ("'(?P<host>\\w+) is [DOWN'", 5, 29),
        ("\"\\u00e9(?P<host>\\\\w+) (?z)\"", 5, 35),
        ("\'\'\'\n^x+ (?P<h>\\S+\'\'\'", 6, 5),
    ] {
        let text = format!(
            "{MINIMAL}[[rule]]\nname = \"r\"\nsubject = {pattern}\ncall = [\"+15005550001\"]\nmessage = \"{{host}} {{h}} down\"\n"
        );
        let got = problems(&text);
        assert_eq!(got.len(), 1, "{pattern}: {got:#?}");
        let at = format!("rules.toml:{line}:{column}: invalid regex for `subject`");
        assert!(got[0].starts_with(&at), "{pattern}: {} (want {at})", got[0]);
    }
}

#[test]
fn prompts_per_language_are_overridden_and_checked() {
    let c = Config::parse(
        Path::new("r.toml"),
        &format!(
            "{MINIMAL}[prompts.\"ja-JP\"]\ngoodbye = \"さようなら。\"\njoined = \"{{who}} 参加\"\n\
             [[rule]]\nname = \"up\"\nsubject = 'UP'\nresolve = true\nlanguage = \"ja-JP\"\n"
        ),
    )
    .unwrap();
    let ja = c.prompts("ja-JP");
    assert_eq!(ja.goodbye, "さようなら。");
    assert_eq!(ja.joined("bob"), "bob 参加");
    assert_eq!(ja.press_one, Prompts::builtin("ja-JP").press_one);
    assert_eq!(c.prompts("en-US"), Prompts::builtin("en-US"));
    assert_eq!(c.rules[0].message.to_string(), "復旧しました。 {subject}");
    let got = problems(&format!(
        "{MINIMAL}[prompts.\"ja-JP\"]\ngoodby = \"x\"\njoined = \"{{whom}}\"\ngoodbye = \"{{who}}\"\n[prompts.japanese]\ngoodbye = \"x\"\n"
    ));
    assert_eq!(got.len(), 4, "{got:#?}");
    assert!(got[0].contains("unknown prompt `goodby`"), "{got:?}");
    assert!(
        got[1].contains("placeholder `{whom}` in `prompts.joined` names nothing; use one of {who}")
            && !got[1].contains("regex"),
        "{got:?}"
    );
    assert!(
        got[2].contains("`prompts.goodbye` names nothing; this prompt takes no placeholders"),
        "{got:?}"
    );
    assert!(got[3].contains("is not a language tag"), "{got:?}");
}

#[test]
fn default_messages_speak_the_rules_language() {
    // No [defaults] message: each rule's built-in opening is in its own language, and
    // so are the heartbeat's and the canary's messages.
    let c = Config::parse(
        Path::new("r.toml"),
        &format!(
            "{MINIMAL}[defaults]\nlanguage = \"ja-JP\"\nvoice = \"Polly.Mizuki\"\n\
             [canary]\nevery = \"24h\"\ncall = [\"+15005550001\"]\n\
             [[rule]]\nname = \"ja\"\ncall = [\"+15005550001\"]\n\
             [[rule]]\nname = \"en\"\ncall = [\"+15005550001\"]\nlanguage = \"en-US\"\nvoice = \"Polly.Joanna\"\n\
             [[heartbeat]]\nname = \"backup\"\nevery = \"1d\"\ncall = [\"+15005550001\"]\n"
        ),
    )
    .unwrap();
    assert_eq!(c.rules[0].message.to_string(), "アラート。 {subject}");
    assert_eq!(c.rules[1].message.to_string(), "Alert. {subject}");
    assert!(
        c.heartbeats[0]
            .message
            .to_string()
            .starts_with("ハートビート {name}")
    );
    assert!(
        c.canary
            .unwrap()
            .message
            .starts_with("メールコールのテスト電話")
    );
}

#[test]
fn unknown_keys_and_syntax_errors_point_at_the_spot() {
    let got = problems(&format!(
        "{MINIMAL}[smtp]\nlisten = \"127.0.0.1:25\"\nlisen = 1\n"
    ));
    assert_eq!(got.len(), 1);
    assert!(
        got[0].starts_with("rules.toml:5:1: unknown field `lisen`"),
        "{}",
        got[0]
    );
    let got = problems("[twilio\n");
    assert!(got[0].starts_with("rules.toml:1:"), "{}", got[0]);
}

#[test]
fn captures_are_placeholders_and_bad_templates_are_reported() {
    let ok = format!(
        "{MINIMAL}[[rule]]\nname = \"h\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"+15005550001\"]\n\
         message = \"{{host}} down: {{subject}} {{rule}}\"\ndedup_key = \"{{host}}\"\n"
    );
    assert!(problems(&ok).is_empty(), "{:?}", problems(&ok));
    let bad = format!("{MINIMAL}[[rule]]\nname = \"h\"\ndrop = true\ndedup_key = \"{{host\"\n");
    let got = problems(&bad);
    assert!(got[0].contains("unclosed placeholder"), "{got:?}");
}

#[test]
fn a_rule_calls_drops_or_resolves() {
    let ok = format!("{MINIMAL}[[rule]]\nname = \"up\"\nsubject = 'UP'\nresolve = true\n");
    let c = Config::parse(Path::new("r.toml"), &ok).unwrap();
    assert_eq!(c.rules[0].action, RuleAction::Resolve);
    assert_eq!(c.rules[0].message.to_string(), "Resolved. {subject}");
    let got = problems(&format!(
        "{MINIMAL}[[rule]]\nname = \"x\"\ncall = [\"+15005550001\"]\nresolve = true\n"
    ));
    assert!(got[0].contains("a rule does one of them"), "{got:?}");
    let got = problems(&format!("{MINIMAL}[defaults]\nrounds = 0\n"));
    assert!(
        got[0].contains("`rounds` = 0 must be between 1 and 10"),
        "{got:?}"
    );
}

#[test]
fn rule_names_of_rule_less_alerts_are_reserved() {
    let got = problems(&format!(
        "{MINIMAL}[[rule]]\nname = \"canary\"\ndrop = true\n"
    ));
    assert!(got[0].contains("rule name `canary` is reserved"), "{got:?}");
}

#[test]
fn call_and_drop_together_is_an_error() {
    let got = problems(&format!(
        "{MINIMAL}[[rule]]\nname = \"x\"\ncall = [\"+15005550001\"]\ndrop = true\n"
    ));
    assert!(
        got[0].contains("mixes `call`, `drop = true` and `resolve = true`"),
        "{got:?}"
    );
}

#[test]
fn bad_durations_and_globs() {
    let got = problems(&format!(
        "{MINIMAL}[defaults]\ncooldown = \"15 minutes please\"\n[smtp]\nrecipients = [\"a@[b\"]\n"
    ));
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].contains("invalid duration"), "{got:?}");
    assert!(got[1].contains("invalid recipient pattern"), "{got:?}");
}

#[test]
fn recipient_globs_are_case_insensitive() {
    let c = Config::parse(
        Path::new("r.toml"),
        &format!(
            "{MINIMAL}[smtp]\nrecipients = [\"alerts@example.com\", \"*@pager.example.com\"]\n"
        ),
    )
    .unwrap();
    let r = c.smtp.recipients.unwrap();
    assert!(r.matches("Alerts@Example.com"));
    assert!(r.matches("ops.team@pager.example.com"));
    assert!(!r.matches("someone@example.com"));
    assert!(!r.matches("x@pager.example.com.evil.org"));
}

#[test]
fn http_limits_webhook_numbers_and_the_unauthenticated_sendgrid_warning() {
    let http = "[http]\nlisten = \"127.0.0.1:8025\"\n";
    let c = Config::parse(
        Path::new("r.toml"),
        &format!("{MINIMAL}{http}[webhook]\ntoken_env = \"T\"\n[sendgrid]\n"),
    )
    .unwrap();
    let h = c.http.as_ref().unwrap();
    assert_eq!(h.header_timeout, Duration::from_secs(10));
    assert_eq!(h.max_connections_per_ip, 20);
    assert_eq!(h.max_connections, 512);
    assert_eq!(
        c.webhook.as_ref().unwrap().numbers,
        WebhookNumbers::Contacts
    );
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("anyone who finds /sendgrid/inbound"));

    let c = Config::parse(
        Path::new("r.toml"),
        &format!("{MINIMAL}{http}header_timeout = \"3s\"\nmax_connections_per_ip = 2\n[webhook]\ntoken_env = \"T\"\nnumbers = \"any\"\n[sendgrid]\nusername = \"u\"\npassword_env = \"P\"\n"),
    )
    .unwrap();
    assert_eq!(
        c.http.as_ref().unwrap().header_timeout,
        Duration::from_secs(3)
    );
    assert_eq!(c.http.as_ref().unwrap().max_connections_per_ip, 2);
    assert_eq!(c.webhook.as_ref().unwrap().numbers, WebhookNumbers::Any);
    assert!(c.warnings().is_empty());

    let got = problems(&format!(
        "{MINIMAL}{http}header_timeout = \"0s\"\nmax_connections_per_ip = 0\n[webhook]\ntoken_env = \"T\"\nnumbers = \"all\"\n"
    ));
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got[0].starts_with("rules.toml:5:18: `header_timeout` must be greater than 0"),
        "{got:?}"
    );
    assert!(
        got[1].contains("`max_connections_per_ip` must be"),
        "{got:?}"
    );
    assert!(got[2].contains("`numbers` must be \"contacts\""), "{got:?}");
}

#[test]
fn escalations_must_come_in_order_and_before_the_last_round_ends() {
    let got = problems(&format!(
        "{MINIMAL}[contacts]\nalice = \"+15005550001\"\n[[rule]]\nname = \"r\"\ncall = [\"alice\"]\n\
         rounds = 2\nround_interval = \"5m\"\n\
         escalate = [{{ after = \"5m\", call = [\"alice\"] }}, {{ after = \"2m\", call = [\"alice\"] }}, {{ after = \"10m\", call = [] }}]\n"
    ));
    assert_eq!(got.len(), 3, "{got:#?}");
    assert!(
        got[0].contains("escalation steps must come in order"),
        "{got:?}"
    );
    assert!(
        got[1].contains("escalates after 10m but its calls end after 10m"),
        "{got:?}"
    );
    assert!(got[2].contains("empty `call` list"), "{got:?}");
    let c = Config::parse(
        Path::new("r.toml"),
        &format!(
            "{MINIMAL}[contacts]\nalice = \"+15005550001\"\n\
             [[rotation]]\nname = \"primary\"\nmembers = [\"alice\"]\nshift = \"1d\"\nstart = \"2026-01-05T10:00:00+09:00\"\n\
             [[rule]]\nname = \"r\"\ncall = [\"primary\", \"alice\", \"+15005550001\"]\n\
             escalate = [{{ after = \"1m\", call = [\"primary\"] }}]\n"
        ),
    )
    .unwrap();
    assert_eq!(
        c.rules[0].action,
        RuleAction::Call(vec![
            Callee::Rotation("primary".into()),
            Callee::Number("+15005550001".into())
        ])
    );
    assert_eq!(c.rules[0].escalate[0].after, Duration::from_secs(60));
}

#[test]
fn a_max_bytes_nothing_fits_under_is_refused_and_one_too_small_for_big_mail_warned() {
    let got = problems(&format!("{MINIMAL}[state]\nmax_bytes = 100000\n"));
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].contains("`max_bytes` = 100000 is too small"),
        "{got:?}"
    );
    let c = Config::parse(
        Path::new("r.toml"),
        &format!("{MINIMAL}[state]\nmax_bytes = 4194304\n"),
    )
    .unwrap();
    let warnings = c.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("leaves no room for a mail of smtp.max_message_bytes (10485760)")),
        "{warnings:?}"
    );
    let c = Config::parse(
        Path::new("r.toml"),
        &format!("{MINIMAL}[smtp]\nmax_message_bytes = 1048576\n[state]\nmax_bytes = 4194304\n"),
    )
    .unwrap();
    assert!(c.warnings().iter().all(|w| !w.contains("max_bytes")));
}
