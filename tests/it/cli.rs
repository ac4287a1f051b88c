//! `mailcall check` and `mailcall route`, run as a user runs them.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::harness::BIN;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn mailcall(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("MAILCALL_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_example_config() {
    let out = mailcall(&["--config", &format!("{ROOT}/rules.toml"), "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
}

#[test]
fn check_reports_every_problem_as_path_line_column() {
    let dir = crate::harness::workdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[twilio]\nfrom = \"+15005550006\"\n[contacts]\nalice = \"090-1234-5678\"\n\
         [[rule]]\nname = \"a\"\nsubject = '(?P<host>\\w+'\ncall = [\"alicee\"]\nmessage = \"{hots} down\"\n\
         [[rule]]\nname = \"b\"\n",
    )
    .unwrap();
    let out = mailcall(&["--config", path.to_str().unwrap(), "check"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let p = path.display();
    // The broken regex names no captures: `{hots}` is not reported on top of it.
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(
        lines[0].starts_with(&format!(
            "{p}:4:9: contact `alice` has number `090-1234-5678`"
        )),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("{p}:7:12: invalid regex for `subject`")),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{p}:8:9: `alicee` in rule `a` is neither a contact"
        )),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with(&format!(
            "{p}:11:8: rule `b` has neither `call` nor `drop = true`"
        )),
        "{stdout}"
    );
}

#[test]
fn check_reports_unknown_keys_and_the_config_path_comes_from_the_environment() {
    let dir = crate::harness::workdir();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "[twilio]\nfrom = \"+15005550006\"\nring_secs = 30\n").unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .env("MAILCALL_CONFIG", &path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with(&format!(
            "{}:3:1: unknown field `ring_secs`",
            path.display()
        )),
        "{stdout}"
    );
}

#[test]
fn a_missing_config_says_how_to_point_at_one() {
    let dir = crate::harness::workdir();
    let out = Command::new(BIN)
        .arg("check")
        .current_dir(dir.path())
        .env_remove("MAILCALL_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("rules.toml") && stderr.contains("--config"),
        "{stderr}"
    );
}

/// The fixture table: each `.eml` and what `route` must decide for it.
fn expected() -> Vec<(&'static str, Value)> {
    let oncall = json!(["+15005550001", "+15005550002"]);
    vec![
        (
            "nagios.eml",
            json!({"rule": "nagios", "action": "call", "numbers": oncall,
            "message": "db1 dot example dot com is down", "dedup_key": "db1.example.com", "language": "en-US"}),
        ),
        (
            "nagios-recovery.eml",
            json!({"rule": "recoveries", "action": "drop", "numbers": []}),
        ),
        (
            "alertmanager.eml",
            json!({"rule": "alertmanager", "action": "call", "numbers": ["+15005550001"],
            "dedup_key": "HighLatency/api-gateway"}),
        ),
        (
            "cloudwatch.eml",
            json!({"rule": "cloudwatch", "action": "call", "numbers": ["+15005550002"],
            "message": "Cloud Watch alarm cpu-high"}),
        ),
        (
            "iso2022jp.eml",
            json!({"rule": "japanese", "action": "call", "numbers": oncall,
            "message": "web03 停止。ホスト web03 が応答しません。 リンク", "dedup_key": "web03",
            "language": "ja-JP", "voice": "Polly.Mizuki"}),
        ),
        (
            "shift_jis.eml",
            json!({"rule": "japanese", "action": "call",
            "message": "web02 停止。障害が発生しました。ホスト: web02 状態: 停止", "dedup_key": "web02"}),
        ),
        (
            "euc-jp.eml",
            json!({"rule": "japanese", "action": "call",
            "message": "db05 停止。監視対象 db05 がダウンしました。", "dedup_key": "db05"}),
        ),
        (
            "html-only.eml",
            json!({"rule": "disk", "action": "call", "message": "disk full. Disk full on nas1: 99% used open"}),
        ),
        (
            "malformed.eml",
            json!({"rule": "disk", "action": "call", "message": "disk full. Disk full on backup2"}),
        ),
        (
            "unrelated.eml",
            json!({"rule": null, "action": "none", "numbers": [], "twiml": null}),
        ),
    ]
}

#[test]
fn route_json_decides_each_fixture_as_expected() {
    let config = format!("{ROOT}/tests/fixtures/rules.toml");
    let table = expected();
    let mut args = vec![
        "--config".to_string(),
        config,
        "route".into(),
        "--json".into(),
    ];
    args.extend(
        table
            .iter()
            .map(|(f, _)| format!("{ROOT}/tests/fixtures/{f}")),
    );
    let out = Command::new(BIN).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let decisions: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decisions.len(), table.len());
    for ((file, want), got) in table.iter().zip(&decisions) {
        for (key, value) in want.as_object().unwrap() {
            assert_eq!(&got[key], value, "{file}: `{key}` in {got:#}");
        }
        for key in [
            "rule",
            "action",
            "numbers",
            "message",
            "language",
            "voice",
            "dedup_key",
            "twiml",
        ] {
            assert!(got.get(key).is_some(), "{file}: no `{key}` in {got}");
        }
        if got["action"] == "call" {
            let twiml = got["twiml"].as_str().unwrap();
            crate::fake_twilio::well_formed(twiml).unwrap();
            assert!(twiml.chars().count() <= 4000);
            assert!(
                !twiml.contains("http"),
                "{file}: URL left in speech: {twiml}"
            );
        }
    }
}

#[test]
fn route_caps_a_long_japanese_body_within_twilio_limits() {
    let out = mailcall(&[
        "--config",
        &format!("{ROOT}/tests/fixtures/rules.toml"),
        "route",
        "--json",
        &format!("{ROOT}/tests/fixtures/iso2022jp-long.eml"),
    ]);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = got["message"].as_str().unwrap();
    assert!(message.starts_with("web01 停止。データベースサーバーの応答がありません。"));
    assert!(message.len() <= 3000, "{} bytes", message.len());
    assert!(
        message.len() > 2500,
        "cut too much: {} bytes",
        message.len()
    );
    assert!(got["twiml"].as_str().unwrap().chars().count() <= 4000);
}

#[test]
fn route_reads_stdin_when_no_file_is_given() {
    let mut child = Command::new(BIN)
        .args([
            "--config",
            &format!("{ROOT}/tests/fixtures/rules.toml"),
            "route",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(format!("{ROOT}/tests/fixtures/nagios.eml")).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("-: rule \"nagios\" → call"), "{stdout}");
    assert!(stdout.contains("+15005550001, +15005550002"), "{stdout}");
}

#[test]
fn check_reports_every_on_call_problem_as_path_line_column() {
    let dir = crate::harness::workdir();
    let path = dir.path().join("oncall.toml");
    std::fs::write(
        &path,
        "[twilio]\nfrom = \"+15005550006\"\n[contacts]\nalice = \"+15005550001\"\n\
         [[rotation]]\nname = \"primary\"\nmembers = [\"alice\", \"bobb\"]\nshift = \"1w\"\nstart = \"2026-01-05T10:00:00+09:00\"\n\
         [[rotation]]\nname = \"primary\"\nmembers = []\nshift = \"1w\"\nstart = \"2026-01-05T10:00:00+09:00\"\ntimezone = \"Asia/Tokio\"\n\
         [[rule]]\nname = \"a\"\ncall = [\"primary\"]\nwhen = { days = [\"mon\"], hours = \"9-18\", timezone = \"Mars/Olympus\" }\n\
         [[heartbeat]]\nname = \"backup\"\nevery = \"1d\"\ncall = [\"nobody\"]\nmessage = \"since {last_sen}\"\n\
         [[rotation]]\nname = \"fast\"\nmembers = [\"alice\"]\nshift = \"500ms\"\nstart = \"2026-01-05T10:00:00+09:00\"\n",
    )
    .unwrap();
    let out = mailcall(&["--config", path.to_str().unwrap(), "check"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let p = path.display();
    for expected in [
        format!("{p}:7:21: rotation `primary` lists `bobb`, which is not a contact"),
        format!("{p}:11:8: duplicate rotation `primary`"),
        format!("{p}:12:11: rotation `primary` has no members"),
        format!("{p}:15:12: unknown time zone `Asia/Tokio`"),
        format!("{p}:19:34: invalid `hours` `9-18`"),
        format!("{p}:19:53: unknown time zone `Mars/Olympus`"),
        format!("{p}:23:9: `nobody` in heartbeat `backup` is neither a contact"),
        format!("{p}:24:11: placeholder `{{last_sen}}` in `message` names nothing"),
        format!("{p}:28:9: invalid `shift` `500ms`; write a length of at least a second"),
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&expected)),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert_eq!(stdout.lines().count(), 9, "{stdout}");
}

/// `route` shows the TwiML `serve` would send: with a public URL, the press-1 call in the
/// rule's language (its prompts can be checked before a real alert comes).
#[test]
fn route_previews_the_press_one_call_with_a_public_url() {
    let dir = crate::harness::workdir();
    let path = dir.path().join("public.toml");
    std::fs::write(
        &path,
        "[twilio]\nfrom = \"+15005550006\"\npublic_url = \"https://alerts.example.com\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [[rule]]\nname = \"ja\"\ncall = [\"+15005550001\"]\nlanguage = \"ja-JP\"\nvoice = \"Polly.Mizuki\"\n",
    )
    .unwrap();
    let mail = dir.path().join("a.eml");
    std::fs::write(&mail, "Subject: web01 down\r\n\r\nx\r\n").unwrap();
    let out = mailcall(&[
        "--config",
        path.to_str().unwrap(),
        "route",
        "--json",
        mail.to_str().unwrap(),
    ]);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let twiml = got["twiml"].as_str().unwrap();
    assert!(
        twiml.contains("<Gather")
            && twiml.contains("https://alerts.example.com/twilio/gather?room=preview")
            && twiml.contains("1 を"),
        "{twiml}"
    );
}
