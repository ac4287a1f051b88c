//! Issue 15, on-call policy, against the real executable: rotations across a DST change
//! and a Japanese holiday (`oncall --at`, `route --at`), overrides, silences over the
//! CLI and HTTP and their expiry, escalation timing, and a heartbeat that misses, rings
//! and is resolved by the next beat — the timed ones against the real daemon over
//! sockets, with second-scale durations.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_twilio::{Answer, FakeTwilio};
use crate::harness::{Daemon, TEST_TOKEN, command, config, incidents, wait_incidents, workdir};

const ALICE: &str = "+15005550001";
const BOB: &str = "+15005550002";
const CAROL: &str = "+15005550003";

const HTTP: &str =
    "[http]\nlisten = \"127.0.0.1:0\"\n[webhook]\ntoken_env = \"MAILCALL_TEST_TOKEN\"\n";

/// A weekly rotation in Tokyo and a daily one in New York.
const ROTATIONS: &str = "[[rotation]]\nname = \"primary\"\nmembers = [\"alice\", \"bob\", \"carol\"]\n\
    shift = \"1w\"\nstart = \"2026-01-05T10:00:00+09:00\"\n\
    [[rotation]]\nname = \"us\"\nmembers = [\"alice\", \"bob\"]\nshift = \"1d\"\n\
    start = \"2026-03-06T09:00:00\"\ntimezone = \"America/New_York\"\n";

/// `mailcall ARGS` on the test's config.
fn mailcall(dir: &Path, args: &[&str]) -> Output {
    command(dir).args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An HTTP request from a real client: status and body.
fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut request = client
            .request(method.parse().unwrap(), url)
            .timeout(Duration::from_secs(10));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    })
}

fn mail_file(dir: &Path, subject: &str) -> String {
    let path = dir.join("alert.eml");
    std::fs::write(&path, crate::harness::mail(subject, "x")).unwrap();
    path.display().to_string()
}

#[test]
fn rotations_hand_over_at_local_time_across_dst_and_skip_a_japanese_holiday() {
    let dir = workdir();
    let rules = format!(
        "{ROTATIONS}[[rule]]\nname = \"business hours\"\nsubject = 'DOWN'\ncall = [\"primary\"]\n\
         when = {{ days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"], hours = \"09:00-18:00\", timezone = \"Asia/Tokyo\", holidays = \"jp\" }}\n\
         [[rule]]\nname = \"after hours\"\nsubject = 'DOWN'\ncall = [\"us\"]\n"
    );
    std::fs::write(dir.path().join("rules.toml"), config(None, &rules)).unwrap();

    // New York springs forward on Sunday 2026-03-08: the daily handoff stays at 09:00
    // local, so Saturday's shift ends at 09:00 EDT, 23 hours after it began.
    let out = stdout(&mailcall(
        dir.path(),
        &["oncall", "--at", "2026-03-07T12:00:00-05:00", "--json"],
    ));
    let lines = json_lines(&out);
    let us = lines.iter().find(|l| l["rotation"] == "us").unwrap();
    assert_eq!(us["on_call"], "bob", "{out}");
    assert_eq!(us["until"], "2026-03-08T09:00:00-04:00", "{out}");
    assert_eq!(us["next"][0]["on_call"], "alice");
    assert_eq!(us["next"][0]["until"], "2026-03-09T09:00:00-04:00");
    let out = stdout(&mailcall(
        dir.path(),
        &["oncall", "--at", "2026-03-07T12:00:00-05:00"],
    ));
    assert!(
        out.contains("us: bob until 2026-03-08T09:00:00-04:00\n"),
        "{out}"
    );
    assert!(
        out.contains("primary: carol until 2026-03-09T10:00:00+09:00\n"),
        "{out}"
    );

    // 2026-11-23 (勤労感謝の日) is a Monday: business hours do not apply, the next rule
    // does. The next day they do, and call whoever's week it is (bob's).
    let eml = mail_file(dir.path(), "db1 is DOWN");
    let holiday = stdout(&mailcall(
        dir.path(),
        &["route", "--at", "2026-11-23T10:00:00+09:00", &eml],
    ));
    assert!(holiday.contains("rule \"after hours\""), "{holiday}");
    assert!(holiday.contains("勤労感謝の日"), "{holiday}");
    let json = json_lines(&stdout(&mailcall(
        dir.path(),
        &["route", "--json", "--at", "2026-11-24T10:00:00+09:00", &eml],
    )))
    .remove(0);
    assert_eq!(json["rule"], "business hours", "{json}");
    assert_eq!(json["numbers"], serde_json::json!([BOB]), "{json}");
    assert_eq!(json["policy"]["on_call"][0]["who"], "bob", "{json}");
    let evening = json_lines(&stdout(&mailcall(
        dir.path(),
        &["route", "--json", "--at", "2026-11-24T18:00:00+09:00", &eml],
    )))
    .remove(0);
    assert_eq!(evening["rule"], "after hours", "{evening}");
}

#[test]
fn an_override_puts_someone_else_on_call_and_rings_them() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = format!(
        "{ROTATIONS}[defaults]\nround_interval = \"1h\"\nrounds = 1\ncooldown = \"0s\"\n\
         [[rule]]\nname = \"page\"\nsubject = 'DOWN'\ncall = [\"primary\"]\n"
    );
    std::fs::write(dir.path().join("rules.toml"), config(Some(&twilio), &rules)).unwrap();
    let now = jiff::Timestamp::now();
    let on_call = |dir: &Path| {
        let out = stdout(&mailcall(dir, &["oncall", "--json"]));
        json_lines(&out)
            .into_iter()
            .find(|l| l["rotation"] == "primary")
            .unwrap()
    };
    let turn = on_call(dir.path())["on_call"].as_str().unwrap().to_string();
    // Someone whose turn it is not.
    let (who, number) = if turn == "carol" {
        ("alice", ALICE)
    } else {
        ("carol", CAROL)
    };
    let until = now
        .checked_add(jiff::SignedDuration::from_hours(1))
        .unwrap()
        .to_string();
    let out = stdout(&mailcall(
        dir.path(),
        &[
            "override",
            "add",
            "--rotation",
            "primary",
            "--who",
            who,
            "--until",
            &until,
        ],
    ));
    let id = out.lines().next().unwrap().trim().to_string();
    assert!(id.parse::<i64>().is_ok(), "the id comes first: {out}");
    let list = stdout(&mailcall(dir.path(), &["override", "list"]));
    assert!(list.contains(&format!("{id} primary: {who}")), "{list}");
    let now_on = on_call(dir.path());
    assert_eq!(now_on["on_call"], who);
    assert_eq!(now_on["override"].as_i64(), id.parse().ok());
    // Refused: someone who is not a contact, a rotation that does not exist.
    let bad = mailcall(
        dir.path(),
        &[
            "override",
            "add",
            "--rotation",
            "primary",
            "--who",
            "mallory",
            "--until",
            &until,
        ],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`mallory` is not a contact"));
    let bad = mailcall(
        dir.path(),
        &[
            "override",
            "add",
            "--rotation",
            "secondary",
            "--who",
            who,
            "--until",
            &until,
        ],
    );
    assert!(!bad.status.success());

    // The daemon rings the override's person, not the turn's.
    let daemon = Daemon::start_existing(dir.path(), false);
    daemon.smtp().alert("db1 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    assert_eq!(calls[0].to, number);
    // Removed, the turn rings again.
    stdout(&mailcall(dir.path(), &["override", "remove", &id]));
    assert!(stdout(&mailcall(dir.path(), &["override", "list"])).contains("no overrides"));
    daemon.smtp().alert("db2 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let turn_number = match turn.as_str() {
        "alice" => ALICE,
        "bob" => BOB,
        _ => CAROL,
    };
    assert_eq!(calls[1].to, turn_number);
}

const SILENCE_RULES: &str = "[defaults]\nround_interval = \"1h\"\nrounds = 1\n\
    [[rule]]\nname = \"host down\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\"]\ndedup_key = \"{host}\"\n";

#[test]
fn silences_over_the_cli_mute_until_they_expire_and_never_call_afterwards() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(Some(&twilio), &format!("{HTTP}{SILENCE_RULES}")),
        false,
    );
    // No matcher, or a matcher on a capture no rule has: refused.
    let out = mailcall(
        dir.path(),
        &["silence", "add", "--for", "2h", "--comment", "x"],
    );
    assert!(
        !out.status.success(),
        "a silence without a matcher mutes everything"
    );
    let out = mailcall(
        dir.path(),
        &[
            "silence",
            "add",
            "--match",
            "hots=db1",
            "--for",
            "2h",
            "--comment",
            "x",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`hots`"));

    let out = stdout(&mailcall(
        dir.path(),
        &[
            "silence",
            "add",
            "--match",
            "rule=host down",
            "--match",
            "host=~db[12]",
            "--for",
            "3s",
            "--comment",
            "kernel upgrade",
        ],
    ));
    let id = out.lines().next().unwrap().trim().to_string();
    assert!(id.parse::<i64>().is_ok(), "the id comes first: {out}");
    let list = json_lines(&stdout(&mailcall(
        dir.path(),
        &["silence", "list", "--json"],
    )));
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0]["matchers"],
        serde_json::json!(["rule=host down", "host=~db[12]"])
    );
    let expired_at = Instant::now() + Duration::from_secs(3);

    // db1 is muted (twice: the second joins the silenced incident); web1 is not.
    let mut smtp = daemon.smtp();
    smtp.alert("db1 is DOWN");
    smtp.alert("db1 is DOWN");
    smtp.alert("web1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.iter()
            .any(|i| i["status"] == "silenced" && i["alert_count"] == 2)
    });
    let silenced = list.iter().find(|i| i["status"] == "silenced").unwrap();
    assert_eq!(silenced["silence_id"].as_i64(), id.parse().ok());
    assert_eq!(silenced["calls"], serde_json::json!([]));
    assert_eq!(twilio.calls()[0].to, ALICE);

    // The silence ends: nothing is called for what it muted, only new mail rings.
    std::thread::sleep(
        expired_at.saturating_duration_since(Instant::now()) + Duration::from_millis(1500),
    );
    assert_eq!(
        twilio.calls().len(),
        1,
        "a silence ending never calls retroactively"
    );
    assert!(stdout(&mailcall(dir.path(), &["silence", "list"])).contains("no silences in force"));
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);

    // `silence expire` ends one early.
    let out = stdout(&mailcall(
        dir.path(),
        &[
            "silence",
            "add",
            "--match",
            "host=db2",
            "--for",
            "1h",
            "--comment",
            "maintenance",
        ],
    ));
    let id = out.lines().next().unwrap().trim().to_string();
    smtp.alert("db2 is DOWN");
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.iter().filter(|i| i["status"] == "silenced").count() == 2
    });
    stdout(&mailcall(dir.path(), &["silence", "expire", &id]));
    assert!(
        !mailcall(dir.path(), &["silence", "expire", &id])
            .status
            .success()
    );
    smtp.alert("db2 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 3);
}

/// A silence names what the rules capture when it is added; a later config may no
/// longer capture it. `host!=web9` would then mute every alert (the missing capture
/// is the empty string), so such a silence is ignored, and the daemon (at reload) and
/// `silence list` say so.
#[test]
fn a_silence_naming_a_capture_a_reload_removed_is_ignored_and_reported() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), SILENCE_RULES), false);
    let out = mailcall(
        dir.path(),
        &[
            "silence",
            "add",
            "--match",
            "host!=web9",
            "--for",
            "2h",
            "--comment",
            "all but web9",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout(&out).lines().next().unwrap().trim().to_string();
    // The rule no longer captures `host`.
    let uncaptured = SILENCE_RULES
        .replace("(?P<host>\\S+)", "\\S+")
        .replace("dedup_key = \"{host}\"\n", "");
    assert_ne!(uncaptured, SILENCE_RULES);
    std::fs::write(
        dir.path().join("rules.toml"),
        config(Some(&twilio), &uncaptured),
    )
    .unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(10));
    daemon.wait_for_log("silence ignored", Duration::from_secs(5));
    daemon.smtp().alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| l.len() == 1);
    assert_eq!(list[0]["status"], "open", "{:#}", list[0]);
    let listed = stdout(&mailcall(dir.path(), &["silence", "list"]));
    assert!(
        listed.contains("warning: ignored: no rule captures `host`")
            && listed.contains(&format!("silence expire {id}")),
        "{listed}"
    );
    let listed = json_lines(&stdout(&mailcall(
        dir.path(),
        &["silence", "list", "--json"],
    )));
    assert_eq!(listed[0]["unknown_names"], serde_json::json!(["host"]));
}

#[test]
fn silences_over_http_need_the_token_and_a_matcher_and_expire_on_delete() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(Some(&twilio), &format!("{HTTP}{SILENCE_RULES}")),
        false,
    );
    let base = format!("http://{}", daemon.http.unwrap());
    let body = r#"{"matchers": ["rule=host down", "host=~db[12]"], "for": "1h", "comment": "kernel upgrade"}"#;
    assert_eq!(
        http("POST", &format!("{base}/silences"), None, Some(body)).0,
        401
    );
    assert_eq!(
        http("GET", &format!("{base}/silences"), Some("wrong"), None).0,
        401
    );
    let (status, text) = http(
        "POST",
        &format!("{base}/silences"),
        Some(TEST_TOKEN),
        Some(r#"{"matchers": [], "for": "1h", "comment": "everything"}"#),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at least one matcher"), "{text}");
    let (status, text) = http(
        "POST",
        &format!("{base}/silences"),
        Some(TEST_TOKEN),
        Some(r#"{"matchers": ["host=db1"], "comment": "no end"}"#),
    );
    assert_eq!(status, 400, "{text}");

    let (status, text) = http(
        "POST",
        &format!("{base}/silences"),
        Some(TEST_TOKEN),
        Some(body),
    );
    assert_eq!(status, 201, "{text}");
    let id = serde_json::from_str::<Value>(&text).unwrap()["id"]
        .as_i64()
        .unwrap();
    let until = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(2))
        .unwrap();
    let (status, text) = http(
        "POST",
        &format!("{base}/silences?token={TEST_TOKEN}"),
        None,
        Some(&format!(
            r#"{{"matchers": ["subject=~.*web9.*"], "until": "{until}", "comment": "decommissioned"}}"#
        )),
    );
    assert_eq!(status, 201, "{text}");
    let (status, text) = http("GET", &format!("{base}/silences"), Some(TEST_TOKEN), None);
    assert_eq!(status, 200);
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(list.len(), 2, "{text}");
    assert_eq!(list[0]["id"].as_i64(), Some(id));
    assert_eq!(list[0]["comment"], "kernel upgrade");
    assert_eq!(list[0]["unknown_names"], serde_json::json!([]), "in force");

    daemon.smtp().alert("db2 is DOWN");
    daemon.smtp().alert("web9 is DOWN");
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.len() == 2 && l.iter().all(|i| i["status"] == "silenced")
    });
    assert!(twilio.calls().is_empty());

    let (status, text) = http(
        "DELETE",
        &format!("{base}/silences/{id}"),
        Some(TEST_TOKEN),
        None,
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        http(
            "DELETE",
            &format!("{base}/silences/{id}"),
            Some(TEST_TOKEN),
            None
        )
        .0,
        404
    );
    let (_, text) = http("GET", &format!("{base}/silences"), Some(TEST_TOKEN), None);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&text).unwrap().len(), 1);
    daemon.smtp().alert("db2 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    assert_eq!(calls[0].to, ALICE);
    let out = stdout(&mailcall(dir.path(), &["silence", "list"]));
    assert!(
        out.contains("decommissioned") && !out.contains("kernel upgrade"),
        "{out}"
    );
}

#[test]
fn escalation_rings_the_next_people_after_its_time_and_they_join_the_rounds() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    // The rounds worker looks every second: steps two seconds apart fire in order.
    let rules = "[[rule]]\nname = \"page\"\nsubject = 'DOWN'\ncall = [\"alice\"]\nround_interval = \"6s\"\nrounds = 2\n\
        escalate = [{ after = \"1s\", call = [\"carol\"] }, { after = \"3s\", call = [\"alice\", \"bob\"] }]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    daemon.smtp().alert("db1 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 3);
    let (alice, carol, bob) = (&calls[0], &calls[1], &calls[2]);
    assert_eq!(
        (alice.to.as_str(), carol.to.as_str(), bob.to.as_str()),
        (ALICE, CAROL, BOB)
    );
    // Never before its time: the step is due a second after the incident opened, which
    // was before alice's request left.
    let waited = carol.at.duration_since(alice.at);
    assert!(
        waited >= Duration::from_millis(900),
        "carol rung after {waited:?}"
    );
    // Alice, already rung this round, is not rung twice by the second step.
    assert!(bob.at.duration_since(alice.at) >= Duration::from_millis(2900));
    // Round 2 calls everyone of the incident again, the escalated ones included.
    let calls = twilio.wait_until(Duration::from_secs(15), |c| c.len() == 6);
    let mut round2: Vec<&str> = calls[3..].iter().map(|c| c.to.as_str()).collect();
    round2.sort_unstable();
    assert_eq!(round2, [ALICE, BOB, CAROL]);
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l.first().is_some_and(|i| i["status"] == "unanswered")
    });
    let rounds: Vec<i64> = list[0]["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["round"].as_i64().unwrap())
        .collect();
    assert_eq!(rounds, [1, 1, 1, 2, 2, 2]);
}

#[test]
fn escalation_is_not_needed_once_someone_is_in_the_bridge() {
    let twilio = FakeTwilio::start();
    twilio.answer(
        ALICE,
        Answer {
            answered_by: "human",
            joins: true,
        },
    );
    let dir = workdir();
    let rules = "[[rule]]\nname = \"page\"\nsubject = 'DOWN'\ncall = [\"alice\"]\nround_interval = \"30s\"\nrounds = 2\n\
        escalate = [{ after = \"4s\", call = [\"carol\"] }]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let sent = Instant::now();
    daemon.smtp().alert("db1 is DOWN");
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.first().is_some_and(|i| i["status"] == "bridged")
    });
    daemon.wait_for_log("escalation not needed", Duration::from_secs(15));
    assert!(sent.elapsed() >= Duration::from_secs(4));
    assert!(
        twilio.calls().iter().all(|c| c.to == ALICE),
        "carol must not be rung"
    );
}

#[test]
fn a_missed_heartbeat_rings_once_survives_a_restart_and_the_next_beat_resolves_it() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = format!(
        "{HTTP}[defaults]\nround_interval = \"1h\"\nrounds = 1\n\
         [[heartbeat]]\nname = \"nightly backup\"\nsubject = 'backup (ok|finished)'\nevery = \"2s\"\ngrace = \"1s\"\n\
         call = [\"alice\"]\nmessage = \"No backup report since {{last_seen}}.\"\n\
         [[rule]]\nname = \"everything\"\ncall = [\"bob\"]\n"
    );
    let mut daemon = Daemon::start(dir.path(), &config(Some(&twilio), &rules), false);
    // A matching mail is a beat, not an alert: nobody is called for it.
    let beat = Instant::now();
    daemon.smtp().alert("backup ok");
    let calls = twilio.wait_until(Duration::from_secs(15), |c| !c.is_empty());
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].to, ALICE,
        "the heartbeat's call list, not the catch-all rule"
    );
    assert!(
        calls[0].twiml.contains("No backup report since"),
        "{}",
        calls[0].twiml
    );
    let waited = calls[0].at.duration_since(beat);
    assert!(
        waited >= Duration::from_secs(3),
        "rang {waited:?} after the beat: before every + grace"
    );
    let list = incidents(dir.path());
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["dedup_key"], "heartbeat: nightly backup");
    assert_eq!(list[0]["status"], "open");

    // Missed is remembered: a restart does not ring again for the same miss.
    daemon.terminate(Duration::from_secs(10));
    let daemon = Daemon::start_existing(dir.path(), false);
    // `status` reads the address from the config: point it at the port the daemon got.
    let fixed = config(Some(&twilio), &rules).replace(
        "[http]\nlisten = \"127.0.0.1:0\"",
        &format!("[http]\nlisten = \"{}\"", daemon.http.unwrap()),
    );
    std::fs::write(dir.path().join("status.toml"), fixed).unwrap();
    let status_toml = dir.path().join("status.toml").display().to_string();
    let status = || {
        stdout(
            &std::process::Command::new(crate::harness::BIN)
                .args(["--config", &status_toml, "status"])
                .output()
                .unwrap(),
        )
    };
    let status_text = status();
    assert!(
        status_text.contains("nightly backup") && status_text.contains("missed"),
        "{status_text}"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(twilio.calls().len(), 1, "one miss, one call");

    // The next beat (over HTTP, with the token) resolves it.
    let base = format!("http://{}", daemon.http.unwrap());
    let url = format!("{base}/heartbeat/nightly%20backup");
    assert_eq!(http("POST", &url, None, None).0, 401);
    assert_eq!(
        http(
            "POST",
            &format!("{base}/heartbeat/nope"),
            Some(TEST_TOKEN),
            None
        )
        .0,
        404
    );
    let (code, text) = http("POST", &url, Some(TEST_TOKEN), None);
    assert_eq!(code, 200, "{text}");
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.first().is_some_and(|i| i["status"] == "resolved")
    });
    let status_text = status();
    assert!(
        status_text.contains("nightly backup") && status_text.contains(" ok "),
        "{status_text}"
    );
    assert_eq!(twilio.calls().len(), 1);
}
