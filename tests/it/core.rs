//! The core promise over real sockets: an alert mail rings every chosen number at once,
//! into one conference per incident.

use std::collections::HashSet;
use std::time::Duration;

use crate::fake_twilio::FakeTwilio;
use crate::harness::{Daemon, config, mail, workdir};

const HOST_DOWN: &str = r#"
[[rule]]
name = "recoveries"
subject = '(?i)\b(recovered|resolved|ok)\b'
drop = true

[[rule]]
name = "host down"
from = '@monitoring\.example\.com$'
subject = '(?P<host>[\w.-]+) is DOWN'
call = ["oncall", "+15005550009", "alice"]
message = "{host} is down. {subject}"
dedup_key = "{host}"
"#;

#[test]
fn an_alert_rings_every_number_at_once_into_one_conference() {
    let twilio = FakeTwilio::start();
    // Each answer takes 400 ms: calls placed one after another would arrive far apart.
    twilio.set_delay(Duration::from_millis(400));
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), HOST_DOWN), false);

    let mut smtp = daemon.smtp();
    assert_eq!(smtp.greeting.0, 220);
    assert!(
        smtp.greeting.1.starts_with("mx.test"),
        "{:?}",
        smtp.greeting
    );
    assert_eq!(smtp.cmd("EHLO client.test").0, 250);
    let (code, text) = smtp.send(
        "nagios@monitoring.example.com",
        &["alerts@example.com"],
        &mail(
            "db1.example.com is DOWN",
            "see https://nagios.example.com/x?y=1",
        ),
    );
    assert_eq!(code, 250, "{text}");
    assert_eq!(smtp.cmd("QUIT").0, 221);
    assert!(smtp.closed());

    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 3);
    let numbers: HashSet<&str> = calls.iter().map(|c| c.to.as_str()).collect();
    assert_eq!(
        numbers,
        HashSet::from(["+15005550001", "+15005550002", "+15005550009"])
    );
    let first = calls.iter().map(|c| c.at).min().unwrap();
    let last = calls.iter().map(|c| c.at).max().unwrap();
    assert!(
        last - first < Duration::from_millis(350),
        "calls were not placed at once: {:?}",
        last - first
    );

    let rooms: HashSet<String> = calls.iter().map(|c| c.room()).collect();
    assert_eq!(rooms.len(), 1, "one conference per incident: {rooms:?}");
    let room = rooms.into_iter().next().unwrap();
    // Opaque: a fixed prefix and 16 random hex digits, nothing from the mail or the numbers.
    let id = room.strip_prefix("mailcall-").unwrap_or_default();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{room}"
    );
    for call in &calls {
        assert_eq!(call.status, 201);
        assert_eq!(call.from, "+15005550006");
        assert_eq!(call.timeout, "25");
        assert!(
            call.twiml.contains(
                ">db1 dot example dot com is down. db1 dot example dot com is DOWN</Say>"
            ),
            "{}",
            call.twiml
        );
        assert!(
            call.twiml.contains("loop=\"2\""),
            "said twice: {}",
            call.twiml
        );
    }

    // The log names the mail, the rule, the numbers and every call SID.
    daemon.wait_for_log("call placed", Duration::from_secs(5));
    for call in &calls {
        daemon.wait_for_log(call.sid.as_deref().unwrap(), Duration::from_secs(5));
    }
    let logs = daemon.logs();
    assert!(
        logs.contains("message_id=") && logs.contains("rule=\"host down\""),
        "{logs}"
    );
}

#[test]
fn smtp_answers_550_552_and_221_and_stays_usable() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let cfg = config(Some(&twilio), "[[rule]]\nname = \"all\"\ncall = [\"carol\"]\n").replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\nrecipients = [\"alerts@example.com\", \"*@pager.example.com\"]\nmax_message_bytes = 2000\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let mut smtp = daemon.smtp();

    let (code, ehlo) = smtp.cmd("EHLO client.test");
    assert_eq!(code, 250);
    assert!(ehlo.lines().any(|l| l == "SIZE 2000"), "{ehlo}");

    assert_eq!(smtp.cmd("MAIL FROM:<monitor@example.com>").0, 250);
    assert_eq!(smtp.cmd("RCPT TO:<someone@elsewhere.example>").0, 550);
    assert_eq!(smtp.cmd("RCPT TO:<ops@PAGER.example.com>").0, 250);
    assert_eq!(smtp.cmd("DATA").0, 354);
    let mut big = mail("too big", &"x".repeat(70)).to_vec();
    for _ in 0..60 {
        big.extend_from_slice(format!("{}\r\n", "y".repeat(70)).as_bytes());
    }
    big.extend_from_slice(b".\r\n");
    smtp.send_raw(&big);
    assert_eq!(smtp.read_reply().0, 552);

    // Declared too big up front.
    assert_eq!(
        smtp.cmd("MAIL FROM:<monitor@example.com> SIZE=999999").0,
        552
    );
    // The session is still usable, and the null sender is accepted.
    let (code, text) = smtp.send("", &["alerts@example.com"], &mail("small enough", "ok"));
    assert_eq!(code, 250, "{text}");
    // Out of order.
    assert_eq!(smtp.cmd("DATA").0, 503);
    assert_eq!(smtp.cmd("QUIT").0, 221);
    assert!(smtp.closed());

    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        twilio.calls().len(),
        1,
        "only the accepted mail rings: {calls:#?}"
    );
    assert!(calls[0].twiml.contains("small enough"));
}

#[test]
fn dropped_and_unrouted_mail_rings_nobody() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), HOST_DOWN), false);
    let mut smtp = daemon.smtp();
    let from = "nagios@monitoring.example.com";
    assert_eq!(
        smtp.send(from, &["a@b.example"], &mail("db1 is DOWN: RECOVERED", ""))
            .0,
        250
    );
    assert_eq!(
        smtp.send(from, &["a@b.example"], &mail("weekly report", ""))
            .0,
        250
    );
    assert_eq!(
        smtp.send(from, &["a@b.example"], &mail("web2 is DOWN", ""))
            .0,
        250
    );
    // Alerts are routed in the order they were stored: once the third rings, the first
    // two have been decided.
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() >= 3);
    assert!(
        calls.iter().all(|c| c.twiml.contains("web2 is down")),
        "{calls:#?}"
    );
    daemon.wait_for_log("dropped by rule", Duration::from_secs(5));
    daemon.wait_for_log("unrouted: no rule matches", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(twilio.calls().len(), 3);
}

#[test]
fn dry_run_logs_each_call_and_sends_nothing() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    std::fs::write(
        dir.path().join("rules.toml"),
        config(Some(&twilio), HOST_DOWN),
    )
    .unwrap();
    // No credentials at all: --dry-run must not need them.
    let daemon = Daemon::launch(dir.path(), true, false);
    let mut smtp = daemon.smtp();
    assert_eq!(
        smtp.send(
            "n@monitoring.example.com",
            &["a@b.example"],
            &mail("db9 is DOWN", "")
        )
        .0,
        250
    );
    daemon.wait_for_log("dry-run: would place this call", Duration::from_secs(10));
    daemon.wait_for_log("number=+15005550009", Duration::from_secs(5));
    let logs = daemon.logs();
    assert!(
        logs.contains("rule=host down") && logs.contains("<Conference"),
        "{logs}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(twilio.calls().is_empty(), "dry run sent requests to Twilio");
    let incidents = daemon.incidents();
    assert_eq!(incidents.len(), 1);
    assert!(
        incidents[0]["calls"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "dry-run")
    );
}

#[test]
fn serve_without_credentials_and_without_dry_run_refuses_to_start() {
    let dir = workdir();
    std::fs::write(dir.path().join("rules.toml"), config(None, HOST_DOWN)).unwrap();
    let out = crate::harness::command(dir.path())
        .env_remove("TWILIO_ACCOUNT_SID")
        .env_remove("TWILIO_AUTH_TOKEN")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TWILIO_ACCOUNT_SID")
            && stderr.contains("TWILIO_AUTH_TOKEN")
            && stderr.contains("--dry-run"),
        "{stderr}"
    );
}

#[test]
fn japanese_mail_is_spoken_in_japanese_within_twilio_limits() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = r#"
[[rule]]
name = "jp"
subject = '(?P<host>[\w.-]+) 停止'
call = ["alice"]
message = "{host} が停止しました。{body}"
language = "ja-JP"
voice = "Polly.Mizuki"
"#;
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    // ISO-2022-JP subject (RFC 2047) and a long ISO-2022-JP body, as Japanese
    // monitoring tools send them.
    let body: Vec<u8> = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/iso2022jp-long.eml"
    ))
    .unwrap();
    let mut smtp = daemon.smtp();
    assert_eq!(
        smtp.send("zabbix@example.jp", &["alerts@example.com"], &body)
            .0,
        250
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    let call = &calls[0];
    assert_eq!(call.status, 201, "fake Twilio rejected the TwiML: {call:?}");
    assert!(
        call.twiml
            .contains("language=\"ja-JP\" voice=\"Polly.Mizuki\"")
    );
    assert!(
        call.twiml.contains("web01 が停止しました。"),
        "{}",
        call.twiml
    );
    assert!(call.twiml.chars().count() <= 4000);
}

#[test]
fn sms_summaries_go_to_every_called_number_when_asked_for() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[[rule]]\nname = \"texted\"\nsubject = 'db'\ncall = [\"oncall\"]\nsms = true\n\
                 [[rule]]\nname = \"quiet\"\ncall = [\"carol\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    smtp.alert("db1 is DOWN");
    smtp.alert("web1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 3);
    daemon.wait_for_log("SMS summary sent", Duration::from_secs(5));
    let list = crate::harness::wait_incidents(dir.path(), Duration::from_secs(5), |l| {
        l.iter()
            .flat_map(|i| i["calls"].as_array().unwrap())
            .flat_map(|c| c["events"].as_array().unwrap())
            .filter(|h| h["event"].as_str().unwrap().starts_with("sms SM"))
            .count()
            == 2
    });
    let texted = list.iter().find(|i| i["rule"] == "texted").unwrap();
    let mut messages = twilio.messages();
    messages.sort_by(|a, b| a.to.cmp(&b.to));
    assert_eq!(
        messages.len(),
        2,
        "only the sms = true rule texts: {messages:?}"
    );
    assert_eq!(
        (messages[0].to.as_str(), messages[1].to.as_str()),
        ("+15005550001", "+15005550002")
    );
    for m in &messages {
        assert_eq!(m.from, "+15005550006");
        assert_eq!(
            m.body,
            format!("mailcall incident #{}: db1 is DOWN", texted["id"])
        );
    }
}

#[test]
fn calls_per_second_paces_requests_in_the_order_the_rule_lists_them() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let cfg = config(
        Some(&twilio),
        "[[rule]]\nname = \"all\"\ncall = [\"carol\", \"+15005550009\", \"alice\", \"bob\"]\n",
    )
    .replace(
        "ring_seconds = 25\n",
        "ring_seconds = 25\ncalls_per_second = 5\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    daemon.smtp().alert("db1 is DOWN");
    let mut calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 4);
    calls.sort_by_key(|c| c.at);
    let order: Vec<&str> = calls.iter().map(|c| c.to.as_str()).collect();
    assert_eq!(
        order,
        [
            "+15005550003",
            "+15005550009",
            "+15005550001",
            "+15005550002"
        ]
    );
    for pair in calls.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(180),
            "requests {gap:?} apart at 5 calls per second"
        );
    }
}
