//! Real alert mails (tests/corpus/, each reconstructed from its tool's public templates)
//! through the shipped rules.toml, by the real `mailcall route`: which rule, what action,
//! and what is said. Also the regression tests of issue 14, named after its defects.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::fake_twilio::FakeTwilio;
use crate::harness::{BIN, Daemon, config, with_closed_stdout, workdir};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One corpus mail: the rule and action it must get, and words that must be spoken within
/// the first 300 characters (the alert's name, status and host).
struct Case {
    file: &'static str,
    rule: &'static str,
    action: &'static str,
    language: &'static str,
    early: &'static [&'static str],
}

const fn case(
    file: &'static str,
    rule: &'static str,
    action: &'static str,
    early: &'static [&'static str],
) -> Case {
    Case {
        file,
        rule,
        action,
        language: "en-US",
        early,
    }
}

const JA: &str = "ja-JP";
const AWS_HOST: &str = "ip 1 0 dash 0 dash 1 dash 2 3 dot ap northeast 1 dot compute dot internal";

fn table() -> Vec<Case> {
    vec![
        case(
            "alertmanager-firing.eml",
            "alertmanager",
            "call",
            &[
                "Firing",
                "Host Down",
                "db1 dot example dot com colon 9 1 0 0",
            ],
        ),
        case(
            "alertmanager-grouped.eml",
            "alertmanager group",
            "call",
            &[
                "Firing",
                "Node Filesystem Almost Full",
                "var slash lib slash postgresql",
                // The group's first host: the subject holds only what the alerts share.
                AWS_HOST,
            ],
        ),
        case(
            "alertmanager-resolved.eml",
            "recoveries",
            "resolve",
            &["Resolved", "Host Down", "db1 dot example dot com"],
        ),
        case(
            "alertmanager-text.eml",
            "alertmanager",
            "call",
            &[
                "Firing",
                "High Request Latency",
                "1 0 dot 0 dot 2 dot 1 5 colon 8 0 8 0",
            ],
        ),
        case(
            "grafana-firing.eml",
            "alertmanager",
            "call",
            &["Firing", "High CPU", AWS_HOST],
        ),
        case(
            "grafana-resolved.eml",
            "recoveries",
            "resolve",
            &["Resolved", "High CPU", AWS_HOST],
        ),
        case(
            "zabbix-problem.eml",
            "zabbix",
            "call",
            &[
                "Zabbix problem",
                "High CPU utilization",
                "db1 dot example dot com",
            ],
        ),
        case(
            "zabbix-resolved.eml",
            "zabbix recoveries",
            "resolve",
            &["Resolved", "High CPU utilization"],
        ),
        case(
            "zabbix-not-ok.eml",
            "zabbix",
            "call",
            &[
                "Zabbix problem",
                "Replication status is not OK",
                "db2 dot example dot com",
            ],
        ),
        Case {
            language: JA,
            ..case(
                "zabbix-ja-problem-iso2022jp.eml",
                "zabbix japanese",
                "call",
                &["障害", "ping 応答なし", "web03 ドット example ドット jp"],
            )
        },
        Case {
            language: JA,
            ..case(
                "zabbix-ja-recovery-utf8.eml",
                "recoveries japanese",
                "resolve",
                &["復旧しました", "web03 ドット example ドット jp"],
            )
        },
        case(
            "nagios-host-down.eml",
            "nagios",
            "call",
            &[
                "Nagios",
                "db1 dot example dot com is DOWN",
                "1 0 dot 0 dot 1 dot 2 3",
            ],
        ),
        case(
            "nagios-service-critical.eml",
            "nagios",
            "call",
            &[
                "Nagios",
                "web1 dot example dot com slash HTTP is CRITICAL",
                // The check's output, from the service template's "Additional Info:".
                "Connection refused",
            ],
        ),
        case(
            "nagios-service-recovery.eml",
            "recoveries",
            "resolve",
            &["Resolved", "web1 dot example dot com slash HTTP is OK"],
        ),
        case(
            "icinga2-service-critical.eml",
            "icinga",
            "call",
            &[
                "Icinga",
                "HTTP on web1 dot example dot com is CRITICAL",
                "port 443",
            ],
        ),
        case(
            "checkmk-ok-to-crit.eml",
            "checkmk",
            "call",
            &["Checkmk", "web1 slash CPU load is CRIT"],
        ),
        case(
            "cloudwatch-alarm.eml",
            "cloudwatch",
            "call",
            &["alarm web1-cpu-high", AWS_HOST],
        ),
        case(
            "cloudwatch-ok.eml",
            "recoveries",
            "resolve",
            &["Resolved", "OK", "web1-cpu-high"],
        ),
        Case {
            language: JA,
            ..case(
                "mackerel-ja.eml",
                "mackerel",
                "call",
                &["CRITICAL", "app01 ドット example ドット jp", "CPU 使用率"],
            )
        },
        Case {
            language: JA,
            ..case(
                "mackerel-ja-ok.eml",
                "mackerel recoveries",
                "resolve",
                &["app01 ドット example ドット jp", "CPU 使用率"],
            )
        },
        case(
            "datadog-triggered.eml",
            "datadog",
            "call",
            &["triggered", AWS_HOST, "High CPU on web tier"],
        ),
        case(
            "uptime-kuma-down.eml",
            "uptime kuma",
            "call",
            &[
                "api dot example dot com is down",
                "1 0 dot 0 dot 2 dot 1 5 colon 4 4 3",
            ],
        ),
        case(
            "healthchecks-down.eml",
            "healthchecks",
            "call",
            &["nightly-backup is down"],
        ),
        case(
            "sentry-issue.eml",
            "sentry",
            "call",
            &[
                "Operational Error",
                "could not connect",
                "db1 dot example dot com",
            ],
        ),
        case(
            "cron-mailto.eml",
            "cron",
            "call",
            &[
                "Cron job on db1",
                "Connection refused",
                "1 0 dot 0 dot 1 dot 2 3",
            ],
        ),
        case(
            "smartd.eml",
            "everything else",
            "call",
            &[
                "SMART error",
                "Current Pending Sector",
                "nas1 dot example dot com",
            ],
        ),
        case(
            "mdadm.eml",
            "everything else",
            "call",
            &["Fail event", "md0", "db1 dot example dot com"],
        ),
    ]
}

/// `mailcall route --json` of corpus files with `config`: one decision per file.
fn route(config: &str, files: &[&str]) -> Vec<Value> {
    succeed(
        Command::new(BIN)
            .args(["--config", config, "route", "--json"])
            .args(files.iter().map(|f| format!("{ROOT}/tests/corpus/{f}")))
            .env_remove("MAILCALL_CONFIG"),
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

/// Runs `command`, which must succeed; its standard output.
fn succeed(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn shipped() -> String {
    format!("{ROOT}/rules.toml")
}

/// The first `n` characters of `s`.
fn head(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

#[test]
fn every_corpus_mail_routes_and_speaks_as_expected_with_the_shipped_rules() {
    let table = table();
    let on_disk: BTreeSet<String> = std::fs::read_dir(format!("{ROOT}/tests/corpus"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".eml"))
        .collect();
    let tested: BTreeSet<String> = table.iter().map(|c| c.file.to_string()).collect();
    assert_eq!(on_disk, tested, "every corpus mail is in the table");
    assert!(table.len() >= 15);

    let files: Vec<&str> = table.iter().map(|c| c.file).collect();
    let decisions = route(&shipped(), &files);
    let mut snapshot = String::new();
    for (c, d) in table.iter().zip(&decisions) {
        let raw = std::fs::read(format!("{ROOT}/tests/corpus/{}", c.file)).unwrap();
        assert!(
            raw.starts_with(b"X-Corpus-Source: "),
            "{}: name the template it was reconstructed from",
            c.file
        );
        let message = d["message"].as_str().unwrap();
        assert_eq!(d["rule"], c.rule, "{}: {d:#}", c.file);
        assert_eq!(d["action"], c.action, "{}: {d:#}", c.file);
        assert_eq!(d["language"], c.language, "{}: {d:#}", c.file);
        for word in c.early {
            assert!(
                head(message, 300).contains(word),
                "{}: {word:?} not in the first 300 characters of {message:?}",
                c.file
            );
        }
        assert!(
            !message.contains("http"),
            "{}: a URL is spoken: {message}",
            c.file
        );
        if c.action == "call" {
            let twiml = d["twiml"].as_str().unwrap();
            crate::fake_twilio::well_formed(twiml).unwrap();
            assert!(twiml.chars().count() <= 4000, "{}", c.file);
        }
        snapshot.push_str(&format!(
            "{}: {} {} [{}]\n  {message}\n",
            c.file, d["rule"], d["action"], d["dedup_key"]
        ));
    }
    insta::assert_snapshot!(snapshot);
}

#[test]
fn recoveries_close_the_incident_their_problem_opened() {
    // A resolve rule closes the open incident with the same dedup key, so each recovery
    // must compute the key its problem mail did.
    for (problem, recovery) in [
        ("alertmanager-firing.eml", "alertmanager-resolved.eml"),
        ("grafana-firing.eml", "grafana-resolved.eml"),
        ("zabbix-problem.eml", "zabbix-resolved.eml"),
        (
            "zabbix-ja-problem-iso2022jp.eml",
            "zabbix-ja-recovery-utf8.eml",
        ),
        ("cloudwatch-alarm.eml", "cloudwatch-ok.eml"),
        ("nagios-service-critical.eml", "nagios-service-recovery.eml"),
        ("mackerel-ja.eml", "mackerel-ja-ok.eml"),
    ] {
        let d = route(&shipped(), &[problem, recovery]);
        assert_eq!(
            (&d[0]["action"], &d[1]["action"]),
            (&Value::from("call"), &Value::from("resolve"))
        );
        assert_eq!(
            d[0]["dedup_key"], d[1]["dedup_key"],
            "{problem} / {recovery}"
        );
    }
}

#[test]
fn defect_1_host_names_addresses_and_ports_are_spoken_not_deleted() {
    let d = route(
        &shipped(),
        &["alertmanager-firing.eml", "datadog-triggered.eml"],
    );
    let m = d[0]["message"].as_str().unwrap();
    assert!(
        m.contains("Host Down db1 dot example dot com colon 9 1 0 0"),
        "{m}"
    );
    let m = d[1]["message"].as_str().unwrap();
    assert!(m.contains(AWS_HOST), "{m}");
}

#[test]
fn defect_2_html_table_cells_and_line_breaks_separate_words() {
    let dir = workdir();
    let path = dir.path().join("body.toml");
    std::fs::write(
        &path,
        "[twilio]\nfrom = \"+15005550006\"\n[[rule]]\nname = \"all\"\ncall = [\"+15005550001\"]\nmessage = \"{body}\"\n",
    )
    .unwrap();
    let d = route(path.to_str().unwrap(), &["alertmanager-firing.eml"]);
    let m = d[0]["message"].as_str().unwrap();
    assert!(!m.contains("9100job") && !m.contains("0 0job"), "{m}");
    assert!(
        m.contains("instance db1 dot example dot com colon 9 1 0 0 job node severity critical"),
        "{m}"
    );
    assert!(!m.contains("font-family"), "styles are not text: {m}");
}

#[test]
fn defect_3_recoveries_match_real_recoveries_and_never_a_problem() {
    let d = route(
        &shipped(),
        &[
            "checkmk-ok-to-crit.eml",
            "zabbix-not-ok.eml",
            "cloudwatch-alarm.eml",
            "nagios-service-recovery.eml",
            "zabbix-ja-recovery-utf8.eml",
        ],
    );
    let actions: Vec<&str> = d.iter().map(|d| d["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["call", "call", "call", "resolve", "resolve"]);
}

/// POSTs a signed Twilio callback to `daemon` (public URL `public`).
fn callback(daemon: &Daemon, public: &str, path: &str, params: &[(&str, &str)]) -> String {
    let pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let signature = mailcall::twilio::signature::sign(
        crate::fake_twilio::AUTH_TOKEN,
        &format!("{public}{path}"),
        &pairs,
    );
    let url = format!("http://{}{path}", daemon.http.unwrap());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let response = reqwest::Client::new()
                .post(url)
                .header("X-Twilio-Signature", signature)
                .form(&pairs)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        })
}

#[test]
fn defect_4_japanese_calls_hear_japanese_prompts() {
    const PUBLIC: &str = "https://alerts.example.com";
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[http]\nlisten = \"127.0.0.1:0\"\n[bridge]\npin = \"4321\"\n\
                 [defaults]\nlanguage = \"ja-JP\"\nvoice = \"Polly.Mizuki\"\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let cfg = config(Some(&twilio), rules).replace(
        "ring_seconds = 25\n",
        &format!("ring_seconds = 25\npublic_url = \"{PUBLIC}\"\n"),
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    daemon.smtp().alert("db1 停止");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    let twiml = &calls[0].twiml;
    assert!(
        twiml.contains("1 を") && !twiml.contains("Press 1"),
        "{twiml}"
    );
    let start = twiml.find("action=\"").unwrap() + 8;
    let action = twiml[start..start + twiml[start..].find('"').unwrap()]
        .replace("&amp;", "&")
        .replacen(PUBLIC, "", 1);

    let english = [
        "Joining", "Declined", "Goodbye", "PIN", "joined", "incident",
    ];
    let answers = [
        callback(
            &daemon,
            PUBLIC,
            &action,
            &[("CallSid", "CAx"), ("Digits", "1")],
        ),
        callback(
            &daemon,
            PUBLIC,
            &action,
            &[("CallSid", "CAx"), ("Digits", "9")],
        ),
        callback(
            &daemon,
            PUBLIC,
            &action,
            &[("CallSid", "CAx"), ("Digits", "")],
        ),
        callback(
            &daemon,
            PUBLIC,
            "/twilio/voice",
            &[("From", "+15559876543")],
        ),
        callback(
            &daemon,
            PUBLIC,
            "/twilio/pin",
            &[("From", "+15559876543"), ("Digits", "1111")],
        ),
    ];
    for answer in &answers {
        assert!(answer.contains("language=\"ja-JP\""), "{answer}");
        for word in english {
            assert!(!answer.contains(word), "{word:?} in {answer}");
        }
    }
    assert!(
        answers[0].contains("ブリッジに参加します"),
        "{}",
        answers[0]
    );
    assert!(answers[3].contains("暗証番号を入力"), "{}", answers[3]);
    assert!(
        answers[4].contains("暗証番号が違います。 失礼します。"),
        "{}",
        answers[4]
    );
}

#[test]
fn defect_5_an_empty_call_message_is_refused() {
    let dir = workdir();
    std::fs::write(dir.path().join("rules.toml"), config(None, "")).unwrap();
    for message in ["", "   "] {
        let out = crate::harness::command(dir.path())
            .args(["call", "--to", "alice", "--message", message, "--dry-run"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--message is empty"), "{stderr}");
    }
    assert!(
        !dir.path().join("mailcall.db").exists(),
        "nothing is stored for a refused call"
    );
}

#[test]
fn defect_6_every_command_exits_0_quietly_on_a_closed_pipe() {
    let dir = workdir();
    std::fs::write(dir.path().join("rules.toml"), config(None, "")).unwrap();
    // An incident for `incidents` to list.
    succeed(crate::harness::command(dir.path()).args([
        "call",
        "--to",
        "alice",
        "--message",
        "db1 is down",
        "--dry-run",
    ]));
    let mail = format!("{ROOT}/tests/corpus/nagios-host-down.eml");
    for args in [
        vec!["incidents"],
        vec!["incidents", "--json"],
        vec!["check"],
        vec!["route", "--json", &mail],
        vec!["route", &mail],
    ] {
        let out = with_closed_stdout(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("Broken pipe") && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
    // And as a user sees it: `mailcall route ... | head -1`, with more output than a pipe
    // buffer holds.
    let mut child = crate::harness::command(dir.path())
        .args(["route", "--json"])
        .args(std::iter::repeat_n(&mail, 300))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with('{'), "{first}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Quiet on a closed pipe is not "succeeded": `mailcall check | head -1` on an invalid
/// config, in a deploy script with `pipefail`, exited 0 and let the bad config through.
#[test]
fn check_of_an_invalid_config_exits_1_also_on_a_closed_pipe() {
    let dir = workdir();
    std::fs::write(
        dir.path().join("rules.toml"),
        config(None, "[[rule]]\nname = \"x\"\ncall = [\"nobody\"]\n"),
    )
    .unwrap();
    let out = with_closed_stdout(dir.path(), &["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("Broken pipe") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn defect_7_a_bad_regex_points_into_the_pattern_without_follow_on_errors() {
    let dir = workdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[twilio]\nfrom = \"+15005550006\"\n[[rule]]\nname = \"a\"\n\
         subject = '(?P<host>[\\w.-]+) is [DOWN'\ncall = [\"+15005550001\"]\nmessage = \"{host} is down\"\ndedup_key = \"{host}\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Line 5, column 33: the `[` that opens the unclosed class.
    let want = format!(
        "{}:5:33: invalid regex for `subject`: unclosed character class",
        path.display()
    );
    assert_eq!(stdout.trim_end(), want);
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn defect_8_the_shipped_config_answers_status_and_the_readme_builds_once() {
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let quick_start =
        &readme[readme.find("## Quick start").unwrap()..readme.find("## Commands").unwrap()];
    assert!(
        quick_start.contains("cargo build --release"),
        "{quick_start}"
    );
    assert!(
        quick_start.contains("target/release/mailcall"),
        "{quick_start}"
    );
    assert!(
        !quick_start.contains("cargo run"),
        "one build, one binary: {quick_start}"
    );
    for recipe in [
        "Alertmanager",
        "Grafana",
        "Zabbix",
        "Nagios",
        "CloudWatch",
        "relayhost",
        "transport",
    ] {
        assert!(readme.contains(recipe), "no recipe mentions {recipe}");
    }
    let gitignore = std::fs::read_to_string(format!("{ROOT}/.gitignore")).unwrap();
    assert!(
        gitignore.lines().any(|l| l.trim() == "mailcall.db.lock"),
        "{gitignore}"
    );

    // `mailcall status` against a daemon serving the shipped rules.toml (ports moved so
    // the test does not need 2525 and 8025 free).
    let shipped = std::fs::read_to_string(shipped()).unwrap();
    let (smtp, http) = (free_port(), free_port());
    let cfg = shipped
        .replace("127.0.0.1:2525", &format!("127.0.0.1:{smtp}"))
        .replace("127.0.0.1:8025", &format!("127.0.0.1:{http}"));
    let dir = workdir();
    let _daemon = Daemon::start(dir.path(), &cfg, true);
    let out = crate::harness::command(dir.path())
        .arg("status")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": ok"), "{stdout}");
    assert!(Path::new(&dir.path().join("mailcall.db.lock")).exists());
}
