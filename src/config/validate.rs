//! Validation: the file as written → the [`Config`] the rest of the program uses, every
//! problem collected with its position.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::oncall;
use super::problems::{Problemset, positive};
use super::raw::RawConfig;
use super::*;
use crate::speech::{PROMPT_KEYS, Prompts};
use crate::template::Template;

pub(super) fn validate(
    path: &Path,
    text: &str,
    raw: RawConfig,
) -> Result<Config, Vec<(Range<usize>, String)>> {
    let mut p = Problemset::default();

    // [smtp]
    let listen = match &raw.smtp.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 2525)),
        Some(l) => l.get_ref().parse().unwrap_or_else(|_| {
            p.push(
                l.span(),
                format!(
                    "invalid listen address `{}`; write an IP and port such as \"127.0.0.1:2525\" or \"0.0.0.0:25\"",
                    l.get_ref()
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 2525))
        }),
    };
    let recipients = raw
        .smtp
        .recipients
        .as_ref()
        .map(|list| p.globs(list, "recipient"));
    let senders = raw
        .smtp
        .senders
        .as_ref()
        .map(|list| p.globs(list, "sender"));
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |file: &str| {
        let file = PathBuf::from(file);
        if file.is_absolute() {
            file
        } else {
            base.join(file)
        }
    };
    let tls = match (&raw.smtp.tls_cert, &raw.smtp.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: resolve(cert.get_ref()),
            key: resolve(key.get_ref()),
        }),
        (None, None) => None,
        (Some(only), None) | (None, Some(only)) => {
            p.push(
                only.span(),
                "STARTTLS needs both `tls_cert` and `tls_key` (PEM files)",
            );
            None
        }
    };
    let require_tls = raw.smtp.require_tls.as_ref().is_some_and(|r| {
        if *r.get_ref() && tls.is_none() {
            p.push(
                r.span(),
                "`require_tls = true` needs `tls_cert` and `tls_key`",
            );
        }
        *r.get_ref()
    });
    let users = raw.smtp.users.as_ref().map_or_else(BTreeMap::new, |u| {
        if tls.is_none() && !u.get_ref().is_empty() {
            p.push(u.span(), "[smtp.users] needs STARTTLS: AUTH is only offered over TLS; set `tls_cert` and `tls_key`");
        }
        u.get_ref().clone()
    });
    let require_auth = raw.smtp.require_auth.as_ref().is_some_and(|r| {
        if *r.get_ref() && users.is_empty() {
            p.push(r.span(), "`require_auth = true` needs [smtp.users], e.g. monitor = \"MAILCALL_SMTP_PASSWORD_MONITOR\"");
        }
        *r.get_ref()
    });
    let max_message_bytes = positive(
        &mut p,
        raw.smtp.max_message_bytes.as_ref(),
        "max_message_bytes",
        10 * 1024 * 1024,
    );
    let max_connections = positive(
        &mut p,
        raw.smtp.max_connections.as_ref(),
        "max_connections",
        200,
    );
    let smtp = Smtp {
        listen,
        hostname: raw
            .smtp
            .hostname
            .clone()
            .unwrap_or_else(|| "mailcall".to_string()),
        recipients,
        max_message_bytes: usize::try_from(max_message_bytes).unwrap_or(usize::MAX),
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        max_connections_per_ip: usize::try_from(positive(
            &mut p,
            raw.smtp.max_connections_per_ip.as_ref(),
            "max_connections_per_ip",
            100,
        ))
        .unwrap_or(usize::MAX),
        bare_newline: match raw.smtp.bare_newline.as_ref() {
            None => BareNewline::default(),
            Some(b) => match b.get_ref().as_str() {
                "normalize" => BareNewline::Normalize,
                "reject" => BareNewline::Reject,
                other => {
                    p.push(
                        b.span(),
                        format!(
                            "invalid `bare_newline` value `{other}`; write \"normalize\" (bare-LF lines are accepted, only <CRLF>.<CRLF> ends DATA) or \"reject\" (550 and disconnect)"
                        ),
                    );
                    BareNewline::default()
                }
            },
        },
        timeout: p.duration(
            raw.smtp.timeout.as_ref(),
            "timeout",
            Duration::from_secs(300),
        ),
        session_timeout: p.duration(
            raw.smtp.session_timeout.as_ref(),
            "session_timeout",
            Duration::from_secs(1800),
        ),
        tls,
        require_tls,
        users,
        require_auth,
        senders,
        max_auth_failures: raw
            .smtp
            .max_auth_failures
            .as_ref()
            .map_or(5, |m| *m.get_ref()),
    };

    // [twilio]
    let rt = raw.twilio.get_ref();
    if !is_e164(rt.from.get_ref()) {
        p.push(
            rt.from.span(),
            format!(
                "caller ID `{}` is not an E.164 number; write it as + and country code, e.g. \"+15005550006\"",
                rt.from.get_ref()
            ),
        );
    }
    let api_base = match &rt.api_base {
        None => "https://api.twilio.com".to_string(),
        Some(b) => {
            let s = b.get_ref().trim_end_matches('/');
            if !(s.starts_with("https://") || s.starts_with("http://")) {
                p.push(
                    b.span(),
                    format!("`api_base` must be an http(s) URL, not `{}`", b.get_ref()),
                );
            }
            s.to_string()
        }
    };
    let ring_seconds = rt.ring_seconds.as_ref().map_or(30, |r| {
        let v = *r.get_ref();
        if !(5..=600).contains(&v) {
            p.push(
                r.span(),
                format!("`ring_seconds` = {v} is outside Twilio's range; use 5 to 600"),
            );
        }
        v
    });
    let twilio = Twilio {
        from: rt.from.get_ref().clone(),
        api_base,
        ring_seconds,
        retry_for: p.duration(rt.retry_for.as_ref(), "retry_for", Duration::from_secs(600)),
        request_timeout: p.duration(
            rt.request_timeout.as_ref(),
            "request_timeout",
            Duration::from_secs(15),
        ),
        retry_initial_delay: p.duration(
            rt.retry_initial_delay.as_ref(),
            "retry_initial_delay",
            Duration::from_secs(1),
        ),
        retry_max_delay: p.duration(
            rt.retry_max_delay.as_ref(),
            "retry_max_delay",
            Duration::from_secs(60),
        ),
        reconcile_grace: p.duration(
            rt.reconcile_grace.as_ref(),
            "reconcile_grace",
            Duration::from_secs(30),
        ),
        public_url: rt.public_url.as_ref().map(|u| {
            let url = u.get_ref().trim_end_matches('/');
            if !(url.starts_with("https://") || url.starts_with("http://")) || url.contains('?') {
                p.push(u.span(), format!("`public_url` must be the http(s) URL Twilio reaches mailcall at, such as \"https://alerts.example.com\", not `{}`", u.get_ref()));
            }
            url.to_string()
        }),
        calls_per_second: rt.calls_per_second.as_ref().map(|c| {
            let v = *c.get_ref();
            if !(v > 0.0 && v <= 1000.0) {
                p.push(
                    c.span(),
                    format!("`calls_per_second` = {v} must be above 0 and at most 1000"),
                );
            }
            v
        }),
    };

    // [defaults]
    let builtins: BTreeSet<&str> = BUILTIN_PLACEHOLDERS.into_iter().collect();
    let default_message = Spanned::new(0..0, "Alert. {subject}".to_string());
    let defaults = Defaults {
        language: p
            .language(raw.defaults.language.as_ref())
            .unwrap_or_else(|| "en-US".to_string()),
        voice: p
            .voice(raw.defaults.voice.as_ref())
            .unwrap_or_else(|| "Polly.Joanna".to_string()),
        message: p
            .template(
                raw.defaults.message.as_ref().unwrap_or(&default_message),
                "defaults.message",
                Some(&builtins),
            )
            .unwrap_or_else(|| Template::parse("Alert. {subject}").unwrap()),
        cooldown: p.duration(
            raw.defaults.cooldown.as_ref(),
            "cooldown",
            Duration::from_secs(15 * 60),
        ),
        sms: raw.defaults.sms.unwrap_or(false),
        round_interval: p.duration(
            raw.defaults.round_interval.as_ref(),
            "round_interval",
            Duration::from_secs(180),
        ),
        rounds: p.rounds(raw.defaults.rounds.as_ref()).unwrap_or(3),
    };

    // [contacts] and [groups]
    let mut contacts = BTreeMap::new();
    for (name, number) in &raw.contacts {
        if !is_e164(number.get_ref()) {
            p.push(
                number.span(),
                format!(
                    "contact `{name}` has number `{}`, which is not E.164; write it as + and country code, e.g. \"+81312345678\"",
                    number.get_ref()
                ),
            );
        }
        contacts.insert(name.clone(), number.get_ref().clone());
    }
    let mut groups = BTreeMap::new();
    for (name, members) in &raw.groups {
        let mut numbers = Vec::new();
        for member in members {
            let m = member.get_ref();
            if let Some(number) = contacts.get(m) {
                numbers.push(number.clone());
            } else if is_e164(m) {
                numbers.push(m.clone());
            } else {
                p.push(
                    member.span(),
                    format!(
                        "group `{name}` lists `{m}`, which is neither a contact nor an E.164 number"
                    ),
                );
            }
        }
        if contacts.contains_key(name) {
            p.push(
                members.first().map_or(0..0, |m| m.span()),
                format!("`{name}` is both a contact and a group; rename one of them"),
            );
        }
        dedup_in_order(&mut numbers);
        groups.insert(name.clone(), numbers);
    }

    // [prompts."<language>"]: before the rules, whose resolve messages use them.
    let mut prompts = BTreeMap::new();
    for (language, table) in &raw.prompts {
        if !is_language(language) {
            p.push(
                table.span(),
                format!(
                    "[prompts.\"{language}\"] is not a language tag; write e.g. [prompts.\"ja-JP\"]"
                ),
            );
            continue;
        }
        let mut set = Prompts::builtin(language);
        for (key, value) in table.get_ref() {
            let Some((_, allowed)) = PROMPT_KEYS.iter().find(|(k, _)| k == key) else {
                let keys: Vec<&str> = PROMPT_KEYS.iter().map(|(k, _)| *k).collect();
                p.push(
                    value.span(),
                    format!(
                        "unknown prompt `{key}` in [prompts.\"{language}\"]; use one of {}",
                        keys.join(", ")
                    ),
                );
                continue;
            };
            let names: BTreeSet<&str> = allowed.iter().copied().collect();
            if p.template(value, &format!("prompts.{key}"), Some(&names))
                .is_some()
                && let Some(slot) = set.get_mut(key)
            {
                *slot = value.get_ref().clone();
            }
        }
        prompts.insert(language.to_ascii_lowercase(), set);
    }

    // [[rotation]]: before the rules and heartbeats, whose `call` lists may name them.
    let rotations = oncall::rotations(&mut p, &raw.rotations, &contacts, &groups);
    let known = oncall::Known {
        contacts: &contacts,
        groups: &groups,
        rotations: &rotations,
    };

    // [[rule]]
    let mut rules = Vec::new();
    let mut names = BTreeSet::new();
    for r in &raw.rules {
        let name = r.name.get_ref().clone();
        if RESERVED_RULE_NAMES.contains(&name.as_str()) {
            p.push(
                r.name.span(),
                format!("rule name `{name}` is reserved for alerts that come without a rule (webhook, cli, canary, heartbeat); rename the rule"),
            );
        }
        if !names.insert(name.clone()) {
            p.push(
                r.name.span(),
                format!("duplicate rule name `{name}`; rule names must be unique"),
            );
        }
        let from = p.regex(r.from.as_ref(), "from", text);
        let to = p.regex(r.to.as_ref(), "to", text);
        let subject = p.regex(r.subject.as_ref(), "subject", text);
        let body = p.regex(r.body.as_ref(), "body", text);
        // A broken regex names no captures; its templates are checked once it is fixed.
        let regexes_ok = [&from, &to, &subject, &body].iter().all(|r| r.is_ok());
        let [from, to, subject, body] = [from, to, subject, body].map(|r| r.ok().flatten());
        let mut placeholders = builtins.clone();
        for re in [&from, &to, &subject, &body].into_iter().flatten() {
            placeholders.extend(re.capture_names().flatten());
        }
        let drop = r.drop.as_ref().filter(|d| *d.get_ref());
        let resolve = r.resolve.as_ref().filter(|d| *d.get_ref());
        let action = match (&r.call, drop, resolve) {
            (Some(_), Some(flag), _)
            | (Some(_), None, Some(flag))
            | (None, Some(_), Some(flag)) => {
                p.push(
                    flag.span(),
                    format!("rule `{name}` mixes `call`, `drop = true` and `resolve = true`; a rule does one of them"),
                );
                RuleAction::Drop
            }
            (None, Some(_), None) => RuleAction::Drop,
            (None, None, Some(_)) => RuleAction::Resolve,
            (None, None, None) => {
                p.push(
                    r.name.span(),
                    format!("rule `{name}` has neither `call` nor `drop = true`; say whom to call, e.g. call = [\"oncall\"]"),
                );
                RuleAction::Drop
            }
            (Some(call), None, None) => {
                if call.get_ref().is_empty() {
                    p.push(call.span(), format!("rule `{name}` has an empty `call` list; name a contact, group or number, or use drop = true"));
                }
                RuleAction::Call(oncall::call_list(
                    &mut p,
                    call.get_ref(),
                    &known,
                    &format!("rule `{name}`"),
                ))
            }
        };
        // Without a `message`: the opening prompt in the rule's language ("Resolved." for
        // a recovery, "Alert." unless [defaults] says otherwise), then the subject.
        let language = r
            .language
            .as_ref()
            .map_or(defaults.language.as_str(), |l| l.get_ref().as_str());
        let opening = |prompt: fn(Prompts) -> String| {
            let text = prompt(prompt_set(&prompts, language));
            Template::parse(&format!("{} {{subject}}", literal(&text))).ok()
        };
        let message = match &r.message {
            Some(m) => p.template(m, "message", regexes_ok.then_some(&placeholders)),
            None if action == RuleAction::Resolve => opening(|p| p.resolved),
            None if raw.defaults.message.is_none() => opening(|p| p.alert),
            None => Some(defaults.message.clone()),
        };
        let dedup_key = r
            .dedup_key
            .as_ref()
            .and_then(|k| p.template(k, "dedup_key", regexes_ok.then_some(&placeholders)));
        let round_interval = p.duration(
            r.round_interval.as_ref(),
            "round_interval",
            defaults.round_interval,
        );
        let rounds = p.rounds(r.rounds.as_ref()).unwrap_or(defaults.rounds);
        let when = r.when.as_ref().and_then(|w| oncall::when(&mut p, w));
        let escalate = r.escalate.as_ref().map_or_else(Vec::new, |steps| {
            if !matches!(action, RuleAction::Call(_)) && !steps.is_empty() {
                p.push(
                    steps[0].span(),
                    format!("rule `{name}` escalates but calls nobody; `escalate` needs `call`"),
                );
            }
            oncall::escalations(&mut p, steps, &known, &name, rounds, round_interval)
        });
        rules.push(Rule {
            name,
            from,
            to,
            subject,
            body,
            action,
            message: message.unwrap_or_else(|| defaults.message.clone()),
            language: p
                .language(r.language.as_ref())
                .unwrap_or_else(|| defaults.language.clone()),
            voice: p
                .voice(r.voice.as_ref())
                .unwrap_or_else(|| defaults.voice.clone()),
            dedup_key,
            cooldown: p.duration(r.cooldown.as_ref(), "cooldown", defaults.cooldown),
            sms: r.sms.unwrap_or(defaults.sms),
            round_interval,
            rounds,
            when,
            escalate,
        });
    }
    let heartbeats = oncall::heartbeats(&mut p, &raw.heartbeats, text, &known, &defaults, &prompts);

    // [state] and [limits]
    let state_path = PathBuf::from(raw.state.path.as_deref().unwrap_or("mailcall.db"));
    let state = State {
        path: if state_path.is_absolute() {
            state_path
        } else {
            base.join(state_path)
        },
        max_bytes: raw.state.max_bytes.as_ref().map(|m| {
            if *m.get_ref() < MIN_MAX_BYTES {
                p.push(
                    m.span(),
                    format!(
                        "`max_bytes` = {} is too small: an empty store takes about 200 kB and every mail needs room besides; set at least {MIN_MAX_BYTES} (1 MiB)",
                        m.get_ref()
                    ),
                );
            }
            *m.get_ref()
        }),
        retain: p.duration(
            raw.state.retain.as_ref(),
            "retain",
            Duration::from_secs(30 * 24 * 3600),
        ),
    };
    let limits = Limits {
        max_calls_per_hour: raw
            .limits
            .max_calls_per_hour
            .as_ref()
            .map_or(60, |m| *m.get_ref()),
    };

    // [http], [sendgrid], [webhook]
    let http = raw.http.as_ref().map(|h| Http {
        listen: h.listen.get_ref().parse().unwrap_or_else(|_| {
            p.push(
                h.listen.span(),
                format!(
                    "invalid listen address `{}`; write an IP and port such as \"127.0.0.1:8025\"",
                    h.listen.get_ref()
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 8025))
        }),
        request_timeout: p.duration(
            h.request_timeout.as_ref(),
            "request_timeout",
            Duration::from_secs(30),
        ),
        max_body_bytes: usize::try_from(positive(
            &mut p,
            h.max_body_bytes.as_ref(),
            "max_body_bytes",
            1024 * 1024,
        ))
        .unwrap_or(usize::MAX),
        max_connections: usize::try_from(positive(
            &mut p,
            h.max_connections.as_ref(),
            "max_connections",
            512,
        ))
        .unwrap_or(usize::MAX),
        max_connections_per_ip: usize::try_from(positive(
            &mut p,
            h.max_connections_per_ip.as_ref(),
            "max_connections_per_ip",
            20,
        ))
        .unwrap_or(usize::MAX),
        header_timeout: {
            let t = p.duration(
                h.header_timeout.as_ref(),
                "header_timeout",
                Duration::from_secs(10),
            );
            if let Some(v) = h.header_timeout.as_ref().filter(|_| t.is_zero()) {
                p.push(
                    v.span(),
                    "`header_timeout` must be greater than 0; write e.g. \"10s\"",
                );
            }
            t
        },
    });
    let sendgrid = raw.sendgrid.as_ref().map(|sg| {
        if http.is_none() {
            p.push(sg.span(), "[sendgrid] needs an HTTP server; add [http] with listen = \"127.0.0.1:8025\"");
        }
        let sg = sg.get_ref();
        let path = sg.path.as_ref().map_or("/sendgrid/inbound".to_string(), |path| {
            if !path.get_ref().starts_with('/') {
                p.push(path.span(), format!("`path` must start with `/`, not `{}`", path.get_ref()));
            }
            path.get_ref().clone()
        });
        let basic = match (&sg.username, &sg.password_env) {
            (Some(user), Some(env)) => Some((user.clone(), env.get_ref().clone())),
            (None, None) => None,
            (_, Some(env)) => {
                p.push(env.span(), "`password_env` needs `username` too");
                None
            }
            (Some(_), None) => {
                p.push(sg.path.as_ref().map_or(0..0, Spanned::span), "`username` needs `password_env`: the name of the environment variable holding the password");
                None
            }
        };
        let public_key = sg.public_key.as_ref().and_then(|k| match parse_public_key(k.get_ref()) {
            Ok(key) => Some(key),
            Err(e) => {
                p.push(k.span(), format!("invalid `public_key`: {e}; paste the verification key SendGrid shows (base64 DER)"));
                None
            }
        });
        Sendgrid {
            path,
            basic,
            public_key,
            max_age: p.duration(sg.max_age.as_ref(), "max_age", Duration::from_secs(600)),
            require_spf: sg.require_spf.unwrap_or(false),
            require_dkim: sg.require_dkim.unwrap_or(false),
            max_body_bytes: 40 * 1024 * 1024,
        }
    });
    let webhook = raw.webhook.as_ref().map(|w| {
        if http.is_none() {
            p.push(
                w.token_env.span(),
                "[webhook] needs an HTTP server; add [http] with listen = \"127.0.0.1:8025\"",
            );
        }
        let numbers = match w.numbers.as_ref() {
            None => WebhookNumbers::Contacts,
            Some(n) if n.get_ref() == "contacts" => WebhookNumbers::Contacts,
            Some(n) if n.get_ref() == "any" => WebhookNumbers::Any,
            Some(n) => {
                p.push(n.span(), format!("`numbers` must be \"contacts\" (only numbers of [contacts] and [groups]) or \"any\", not `{}`", n.get_ref()));
                WebhookNumbers::Contacts
            }
        };
        Webhook {
            token_env: w.token_env.get_ref().clone(),
            numbers,
        }
    });

    let bridge_pin = raw.bridge.as_ref().and_then(|b| b.pin.as_ref()).map(|pin| {
        if !(4..=12).contains(&pin.get_ref().len())
            || !pin.get_ref().bytes().all(|b| b.is_ascii_digit())
        {
            p.push(pin.span(), "`pin` must be 4 to 12 digits");
        }
        pin.get_ref().clone()
    });
    if let Some(url) = &raw.twilio.get_ref().public_url
        && http.is_none()
    {
        p.push(url.span(), "`public_url` needs the HTTP server that Twilio calls back; add [http] listen = \"127.0.0.1:8025\"");
    }
    let canary = raw.canary.as_ref().map(|c| {
        let every = p.duration(Some(&c.every), "every", Duration::from_secs(86_400));
        if every < Duration::from_secs(60) {
            p.push(
                c.every.span(),
                "`every` must be at least \"1m\"; a canary is a daily or hourly check",
            );
        }
        if c.call.get_ref().is_empty() {
            p.push(
                c.call.span(),
                "[canary] `call` is empty; name who should get the test call",
            );
        }
        Canary {
            every,
            numbers: p.callees(c.call.get_ref(), &contacts, &groups, "[canary]"),
            message: c
                .message
                .clone()
                .unwrap_or_else(|| prompt_set(&prompts, &defaults.language).canary),
        }
    });

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        path: path.to_path_buf(),
        smtp,
        twilio,
        defaults,
        contacts,
        groups,
        rules,
        state,
        limits,
        http,
        sendgrid,
        webhook,
        canary,
        bridge_pin,
        prompts,
        rotations,
        heartbeats,
    })
}

/// `text` as a template that says it literally (braces escaped).
fn literal(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

/// The smallest `[state] max_bytes`: the empty schema's pages and room for mail.
const MIN_MAX_BYTES: u64 = 1024 * 1024;
