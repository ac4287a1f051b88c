//! Third review of issue 14 ("Speak real alerts well"): real monitoring mails through the
//! shipped rules.toml, by the real binary (`mailcall route`, and `mailcall serve --dry-run`
//! over loopback SMTP where the consequence is an incident that is or is not opened).
//! Each test names the behaviour that should hold and fails on the code as reviewed.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::harness::{BIN, Daemon, incidents, wait_incidents, workdir};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn shipped_path() -> String {
    format!("{ROOT}/rules.toml")
}

/// A config whose one rule speaks the whole body, to hear what the HTML conversion and
/// the speech filter make of it.
const BODY_RULES: &str = "[twilio]\nfrom = \"+15005550006\"\n[[rule]]\nname = \"all\"\n\
                          call = [\"+15005550001\"]\nmessage = \"{body}\"\n";

/// `mailcall route --json` of each raw mail with the config at `config`.
fn route(config: &str, mails: &[Vec<u8>]) -> Vec<Value> {
    let dir = workdir();
    let files: Vec<String> = mails
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let path = dir.path().join(format!("{i}.eml"));
            std::fs::write(&path, raw).unwrap();
            path.to_string_lossy().into_owned()
        })
        .collect();
    let out = std::process::Command::new(BIN)
        .args(["--config", config, "route", "--json"])
        .args(&files)
        .env_remove("MAILCALL_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn message(d: &Value) -> &str {
    d["message"].as_str().unwrap()
}

/// A plain-text mail.
fn plain(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: alerts@example.com\r\nSubject: {subject}\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// A mail with only an HTML part, as Alertmanager and many SaaS monitors send.
fn html_only(subject: &str, html: &str) -> Vec<u8> {
    format!(
        "From: monitor@monitoring.example.com\r\nTo: alerts@example.com\r\nSubject: {subject}\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/html; charset=UTF-8\r\n\r\n{html}\r\n"
    )
    .into_bytes()
}

/// Zabbix 6.0/7.0's default Email media type: subject `Problem: {EVENT.NAME}` /
/// `Resolved in {EVENT.DURATION}: {EVENT.NAME}`, the host only in the body, UTF-8 text in
/// base64 (as tests/corpus/zabbix-problem.eml).
fn zabbix(subject: &str, body: &str, id: u32) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(body);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "From: Zabbix <zabbix@monitoring.example.com>\r\nTo: alerts@example.com\r\n\
         Subject: {subject}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"UTF-8\"\r\n\
         Content-Transfer-Encoding: base64\r\nMessage-ID: <{id}.zabbix@monitoring.example.com>\r\n\r\n{}\r\n",
        lines.join("\r\n")
    )
    .into_bytes()
}

const TRIGGER: &str = "Linux: High CPU utilization (over 90% for 5m)";

fn zabbix_problem(host: &str, event: u32) -> Vec<u8> {
    zabbix(
        &format!("Problem: {TRIGGER}"),
        &format!(
            "Problem started at 03:14:07 on 2025.03.03\nProblem name: {TRIGGER}\nHost: {host}\n\
             Severity: Warning\nOperational data: Current utilization: 97.31 %\n\
             Original problem ID: {event}\nhttp://zabbix.example.com/tr_events.php?triggerid=23861&eventid={event}\n"
        ),
        event,
    )
}

fn zabbix_recovery(host: &str, event: u32) -> Vec<u8> {
    zabbix(
        &format!("Resolved in 12m 3s: {TRIGGER}"),
        &format!(
            "Problem has been resolved at 03:26:10 on 2025.03.03\nProblem name: {TRIGGER}\n\
             Problem duration: 12m 3s\nHost: {host}\nSeverity: Warning\nOriginal problem ID: {event}\n\
             http://zabbix.example.com/tr_events.php?triggerid=23861&eventid={event}\n"
        ),
        event + 1,
    )
}

/// `mailcall serve --dry-run` on the shipped rules.toml, its listeners on free loopback
/// ports.
fn shipped_daemon(dir: &Path) -> Daemon {
    let cfg = std::fs::read_to_string(shipped_path())
        .unwrap()
        .replace("127.0.0.1:2525", "127.0.0.1:0")
        .replace("127.0.0.1:8025", "127.0.0.1:0");
    Daemon::start(dir, &cfg, true)
}

fn deliver(daemon: &Daemon, raw: &[u8]) {
    let (code, text) = daemon.smtp().send(
        "bounce@monitoring.example.com",
        &["alerts@example.com"],
        raw,
    );
    assert_eq!(code, 250, "{text}");
}

/// Waits until the router has logged its decision on alert `id`.
fn wait_routed(daemon: &Daemon, id: usize) {
    daemon.wait_for_log(&format!("alert={id} source="), Duration::from_secs(15));
}

/// Letters and digits only, lower-cased: how a name sounds, whatever the spacing.
fn compact(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Zabbix's default templates name the trigger, not the host, in the subject
/// (`Problem: Linux: High CPU utilization (over 90% for 5m)`; the host is the body's
/// `Host:` line), and the shipped `zabbix` rule keys incidents on that subject alone
/// (`dedup_key = "{what}"`). Measured with `serve --dry-run` on the shipped rules.toml:
/// the problem on db1 opens incident 1; the same trigger firing on db2 a moment later is
/// logged "same problem as an open incident; nobody is called again" and nobody hears
/// that db2 is in trouble; and as db1's recovery computes the same key (`mailcall
/// route`), it resolves that one incident while db2's problem is still open. Cause:
/// rules.toml's `zabbix` and `recoveries` rules (dedup key from the subject only). Fix:
/// key Zabbix problems and recoveries on the host too, or better on the body's
/// `Original problem ID:` that both carry.
#[test]
fn zabbix_problems_on_two_hosts_are_two_incidents_and_a_recovery_closes_only_its_own() {
    let dir = workdir();
    let daemon = shipped_daemon(dir.path());
    deliver(&daemon, &zabbix_problem("db1.example.com", 8123457));
    wait_incidents(dir.path(), Duration::from_secs(15), |l| l.len() == 1);
    deliver(&daemon, &zabbix_problem("db2.example.com", 8123470));
    wait_routed(&daemon, 2);
    let list = incidents(dir.path());
    assert_eq!(
        list.len(),
        2,
        "db2's problem must ring someone, not fold into db1's incident: {:#?}",
        list.iter()
            .map(|i| (&i["dedup_key"], &i["alert_count"], &i["status"]))
            .collect::<Vec<_>>()
    );
    deliver(&daemon, &zabbix_recovery("db1.example.com", 8123457));
    wait_routed(&daemon, 3);
    let open: Vec<Value> = incidents(dir.path())
        .into_iter()
        .filter(|i| i["status"] != "resolved")
        .collect();
    assert_eq!(open.len(), 1, "db2's problem stays open: {open:#?}");
}

/// Nagios (`** ACKNOWLEDGEMENT Service Alert: … **`, sent to every contact when someone
/// acknowledges with "Send notification", the CGI's default), Icinga 2
/// (`[ACKNOWLEDGEMENT] … is CRITICAL!`, in the sample notification types) and Zabbix
/// (`Updated problem in 5m: …`, the default "Problem update" template) mail everyone when
/// a responder takes the problem. The shipped rules match none of them, so the catch-all
/// `everything else` opens a new incident (its key is the ack's own subject) and rings
/// alice: measured with `serve --dry-run`, three problems then their three
/// acknowledgements give six incidents, each with a call. Being phoned at 3 a.m. because
/// a colleague just said "I'm on it" is the opposite of what the tool is for. Cause:
/// rules.toml has no rule for acknowledgements/updates before the catch-all. Fix: drop
/// them (or key them to their problem's incident) in the shipped rules.
#[test]
fn acknowledgements_and_problem_updates_ring_nobody() {
    let dir = workdir();
    let daemon = shipped_daemon(dir.path());
    let nagios = |kind: &str| {
        plain(
            "nagios@monitoring.example.com",
            &format!("** {kind} Service Alert: web1.example.com/HTTP is CRITICAL **"),
            &format!(
                "***** Nagios *****\n\nNotification Type: {kind}\n\nService: HTTP\nHost: web1.example.com\n\
                 Address: 10.0.1.31\nState: CRITICAL\n\nDate/Time: Mon Mar 3 03:16:44 JST 2025\n\n\
                 Additional Info:\n\nconnect to address 10.0.1.31 and port 80: Connection refused\n"
            ),
        )
    };
    let icinga = |kind: &str| {
        plain(
            "icinga@monitoring.example.com",
            &format!("[{kind}] HTTP on db3.example.com is CRITICAL!"),
            "***** Service Monitoring on icinga2.monitoring.example.com *****\n\n\
             HTTP on db3.example.com is CRITICAL!\n\n\
             Info:    connect to address 10.0.1.33 and port 443: Connection refused\n",
        )
    };
    let update = zabbix(
        &format!("Updated problem in 5m 12s: {TRIGGER}"),
        &format!(
            "Bob Smith acknowledged problem at 2025.03.03 03:19:19.\nlooking at it\n\n\
             Current problem status is PROBLEM, age is 5m 12s, acknowledged: Yes.\n\
             Problem name: {TRIGGER}\nHost: db1.example.com\n"
        ),
        9,
    );
    let problems = [
        nagios("PROBLEM"),
        icinga("PROBLEM"),
        zabbix_problem("db1.example.com", 8123457),
    ];
    for p in &problems {
        deliver(&daemon, p);
    }
    wait_incidents(dir.path(), Duration::from_secs(15), |l| l.len() == 3);
    for ack in [nagios("ACKNOWLEDGEMENT"), icinga("ACKNOWLEDGEMENT"), update] {
        deliver(&daemon, &ack);
    }
    wait_routed(&daemon, 6);
    let list = incidents(dir.path());
    let rung: Vec<(&Value, &Value)> = list.iter().map(|i| (&i["rule"], &i["dedup_key"])).collect();
    assert_eq!(
        list.len(),
        3,
        "an acknowledgement opened an incident that rings: {rung:#?}"
    );
}

/// Alertmanager groups alerts by `alertname`; with two hosts in the group, the default
/// subject carries only the labels they share
/// (tests/corpus/alertmanager-grouped.eml: `[FIRING:2] NodeFilesystemAlmostFull
/// (/dev/nvme0n1p1 ext4 node /var/lib/postgresql warning)`), and the shipped rule says
/// "Firing: {what}. {summary}" where the summary ("Filesystem has less than 5% space
/// left.") names no host either. Measured with `mailcall route` on that corpus mail: the
/// whole spoken message (145 characters) never names ip-10-0-1-23 or ip-10-0-1-24, which
/// the issue requires within the first ~300 (the corpus test only checks the mount
/// point). Cause: rules.toml `alertmanager` rule (message/body captures). Fix: capture the
/// first `instance` label (or the description) from the body and speak it.
#[test]
fn a_grouped_alertmanager_mail_names_a_host_in_the_first_300_characters() {
    let raw = std::fs::read(format!("{ROOT}/tests/corpus/alertmanager-grouped.eml")).unwrap();
    let d = route(&shipped_path(), &[raw]);
    let m = message(&d[0]);
    let head: String = m.chars().take(300).collect();
    assert!(
        head.contains("compute dot internal"),
        "no host in the first 300 characters: {m:?}"
    );
}

/// The issue's own example of a host name, `ip-10-0-1-23.ap-northeast-1.compute.internal`,
/// is spoken "ip 1 0 0 1 2 3 dot …": the groups of digits run together, so
/// `ip-10-0-1-23`, `ip-10-0-12-3` and `ip-100-1-2-3` (three different EC2 hosts) sound
/// exactly the same, and the listener cannot tell which one to log into. Measured with
/// `mailcall route` on the shipped rules: three identical messages. IPv4 addresses keep
/// their groups ("1 0 dot 0 dot 1 dot 2 3"); dashed ones lose them. Cause: speech.rs
/// `speak_word` spells every numeric `-` segment and joins them with plain spaces. Fix:
/// keep the boundary audible (say "dash", or read each group as a number).
#[test]
fn dashed_numbers_in_a_host_name_keep_their_groups() {
    let hosts = [
        "ip-10-0-1-23.ap-northeast-1.compute.internal",
        "ip-10-0-12-3.ap-northeast-1.compute.internal",
        "ip-100-1-2-3.ap-northeast-1.compute.internal",
    ];
    let mails: Vec<Vec<u8>> = hosts
        .iter()
        .map(|h| {
            plain(
                "root@monitoring.example.com",
                &format!("{h} is unreachable"),
                "ping: 100% packet loss",
            )
        })
        .collect();
    let d = route(&shipped_path(), &mails);
    let spoken: Vec<&str> = d.iter().map(message).collect();
    for i in 0..spoken.len() {
        for j in i + 1..spoken.len() {
            assert_ne!(
                spoken[i], spoken[j],
                "{} and {} sound the same",
                hosts[i], hosts[j]
            );
        }
    }
}

/// IPv6 is named by the issue ("IP addresses incl. IPv6"), yet no test speaks an IPv6
/// address. Two shapes real alerts carry are mangled, measured
/// with `mailcall route` on the shipped rules:
/// - Uptime Kuma (Node ≥ 17 resolves `localhost` to `::1`):
///   `[api] [🔴 Down] connect ECONNREFUSED ::1:3000` is spoken "… ECONNREFUSED 1:3000",
///   the address gone and what is left read as a time of day;
/// - Alertmanager for an IPv6 target (`instance="[2001:db8::1]:9100"`): the port is
///   spoken "9100" (nine thousand one hundred) after the address, not "colon 9 1 0 0"
///   as for every IPv4 or named host.
///
/// Cause: speech.rs `speak_narrow`/`speak_core` trim leading punctuation (the `::`) and
/// split at `[`/`]`, so `speak_segment` never sees the address with its port. Fix:
/// recognise `::…` and `[v6]:port` before trimming and splitting.
#[test]
fn ipv6_loopback_and_bracketed_ipv6_ports_are_spoken() {
    let d = route(
        &shipped_path(),
        &[
            plain(
                "kuma@monitoring.example.com",
                "[api] [🔴 Down] connect ECONNREFUSED ::1:3000",
                "[api] [🔴 Down] connect ECONNREFUSED ::1:3000\nTime (Asia/Tokyo): 2025-03-03 03:14:07",
            ),
            plain(
                "alertmanager@monitoring.example.com",
                "[FIRING:1] HostDown ([2001:db8::1]:9100 node critical)",
                "Alerts Firing:\nLabels:\n - alertname = HostDown\n - instance = [2001:db8::1]:9100\n",
            ),
        ],
    );
    let kuma = message(&d[0]);
    assert!(
        kuma.contains("colon colon 1") && !kuma.contains("1:3000"),
        "{kuma}"
    );
    let am = message(&d[1]);
    assert!(
        am.contains("colon colon 1") && am.contains("9 1 0 0"),
        "{am}"
    );
}

/// CloudWatch alarm names are chosen by people and are the only thing that says what
/// broke: `prod-Web01-HighCPU-Api02`, `ECS-Service2-Memory85Percent`,
/// `ALB-Target5xx-Prod01`. Each is deleted whole as a "random id", measured with
/// `mailcall route` on an SNS alarm mail through the shipped `cloudwatch` rule: the call
/// says "Cloud Watch alarm." and nothing else. This is the defect 1 (identifiers
/// deleted) in another shape. Cause: speech.rs `is_noise`'s base64/random-id heuristic
/// (≥ 16 characters, mixed case, 3+ digits, frequent class switches) runs on the whole
/// token before it is split at `-`. Fix: judge the `-`-separated parts, and treat parts
/// that are words (`High`, `CPU`, `Prod`) as names.
#[test]
fn alarm_names_with_mixed_case_and_digits_are_spoken_not_dropped() {
    let alarms = [
        "prod-Web01-HighCPU-Api02",
        "ECS-Service2-Memory85Percent",
        "ALB-Target5xx-Prod01",
    ];
    let mails: Vec<Vec<u8>> = alarms
        .iter()
        .map(|a| {
            plain(
                "AWS Notifications <no-reply@sns.amazonaws.com>",
                &format!("ALARM: \"{a}\" in US East (N. Virginia)"),
                &format!(
                    "You are receiving this email because your Amazon CloudWatch Alarm \"{a}\" in the \
                     US East (N. Virginia) region has entered the ALARM state.\n\nAlarm Details:\n\
                     - Name:                       {a}\n- Description:                \n\
                     - State Change:               OK -> ALARM\n"
                ),
            )
        })
        .collect();
    let d = route(&shipped_path(), &mails);
    for (alarm, d) in alarms.iter().zip(&d) {
        assert_eq!(d["rule"], "cloudwatch");
        let m = message(d);
        assert!(
            compact(m).contains(&compact(alarm)),
            "{alarm} is not said: {m:?}"
        );
    }
}

/// "Block elements, `<br>` and table cells separate words" (issue, README "What is
/// spoken"). Only some do: an HTML-only alert laid out with `<center>`, `<header>`,
/// `<section>`, `<hr>` and `<footer>` — HTML5 and e-mail layout staples — comes out with
/// its words glued, measured with `mailcall route` and a rule speaking `{body}`:
/// "CRITICA Ldb1 dot example dot com is DOW Nweb1 dot example dot com is DOWN …"
/// (`CRITICAL` + `db1.example.com` became one token, then split as CamelCase). The same
/// holds for `<article>`, `<nav>`, `<aside>`, `<main>`, `<figure>`, `<address>`,
/// `<details>`, `<fieldset>`. Cause: html2text (0.17) lays these out inline, and
/// alert.rs `html_to_text` takes its output as is. Fix: map these elements (and `<hr>`)
/// to a block before conversion, or post-process.
#[test]
fn html5_block_elements_and_rules_separate_words() {
    let dir = workdir();
    let cfg = dir.path().join("body.toml");
    std::fs::write(&cfg, BODY_RULES).unwrap();
    let html = "<!DOCTYPE html><html><body><center><header>CRITICAL</header>\
                <section>db1.example.com is DOWN</section><hr>\
                <section>web1.example.com is DOWN</section>\
                <footer>Sent by monitor</footer></center></body></html>";
    let d = route(cfg.to_str().unwrap(), &[html_only("two hosts down", html)]);
    let m = message(&d[0]);
    let words: Vec<&str> = m.split_whitespace().collect();
    for w in ["CRITICAL", "db1", "DOWN", "web1", "Sent"] {
        assert!(words.contains(&w), "{w:?} is not a word of {m:?}");
    }
}

/// `mailcall check` puts a regex error at its line:column in the file. TOML's line-ending
/// backslash (the idiom for splitting a long string over lines in a `"""` string) is not
/// accounted for: it counts as one character of the value and the indentation it trims
/// as characters too. Measured: the unclosed `[` at 7:27 of the config below is reported
/// at 7:17, pointing into the middle of `[\\w.-]`. Cause: config/problems.rs
/// `raw_offset` treats `\` + newline as a one-character escape. Fix: a line-ending
/// backslash decodes to nothing and swallows the whitespace and newlines after it.
#[test]
fn a_regex_error_after_a_line_continuation_points_at_the_pattern() {
    let dir = workdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[twilio]\nfrom = \"+15005550006\"\n[[rule]]\nname = \"a\"\n\
         subject = \"\"\"\\\n    ^(?:PROBLEM|CRITICAL)\\\\s+\\\n    (?P<host>[\\\\w.-]+) is [DOWN\"\"\"\n\
         call = [\"+15005550001\"]\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let line7 = text.lines().nth(6).unwrap();
    assert_eq!(line7, "    (?P<host>[\\\\w.-]+) is [DOWN\"\"\"");
    let column = line7.find(" [DOWN").unwrap() + 2;
    let out = std::process::Command::new(BIN)
        .args(["--config", path.to_str().unwrap(), "check"])
        .env_remove("MAILCALL_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim_end(),
        format!(
            "{}:7:{column}: invalid regex for `subject`: unclosed character class",
            path.display()
        )
    );
}

/// Grafana's legacy alerting (the dashboard alerts of Grafana ≤ 10, still what many
/// installations run) mails `[Alerting] CPU alert` and, when it recovers, `[OK] CPU alert`
/// (`[state text] rule name`). The shipped rules know neither: measured with
/// `mailcall route`, `[OK] CPU alert` goes to the catch-all and rings alice — a recovery
/// calling someone, the defect 3 — and its key differs from the problem's, so it
/// could not close that incident anyway. Cause: rules.toml's `recoveries` pattern has no
/// `[OK]` alternative. Fix: add `^\[OK\] ` to the recoveries (and key `[Alerting]`
/// mails on the rule name so the two meet).
#[test]
fn a_grafana_legacy_ok_mail_resolves_its_alerting_mail_instead_of_ringing() {
    let grafana = |state: &str| {
        plain(
            "Grafana <grafana@monitoring.example.com>",
            &format!("[{state}] CPU alert"),
            &format!(
                "[{state}] CPU alert\n\nCPU usage on web1.example.com is high\n\n\
                 Metric name: web1.example.com\nValue: 97.2\n"
            ),
        )
    };
    let d = route(&shipped_path(), &[grafana("Alerting"), grafana("OK")]);
    assert_eq!(d[0]["action"], "call", "{:#}", d[0]);
    assert_ne!(d[1]["action"], "call", "a recovery rings: {:#}", d[1]);
    assert_eq!(
        d[0]["dedup_key"], d[1]["dedup_key"],
        "the recovery closes the alert's incident"
    );
}

/// Issue item 4: "with `language = "ja-JP"` … English text read by a Japanese voice".
/// The call's own opening still is: a config that sets `[defaults] language = "ja-JP"`
/// and `voice = "Polly.Mizuki"` and leaves `message` at its default gets
/// `<Say language="ja-JP" voice="Polly.Mizuki">Alert. web01 停止</Say>` (measured with
/// `mailcall route`), and a `language = "ja-JP"` rule without a `message` does the same
/// under English defaults. The built-in default of a resolve rule is localised (the
/// `resolved` prompt, "復旧しました。"), the one of a call rule is not, and no
/// `[prompts."ja-JP"]` key can change it. The same holds for the built-in heartbeat
/// ("Heartbeat {name} missed: …") and canary messages. Cause: config/validate.rs
/// hard-codes `"Alert. {subject}"` as the default message (config/oncall.rs and the
/// canary likewise). Fix: take the default's opening from the language's prompts (an
/// `alert` prompt), as the resolve default does.
#[test]
fn a_japanese_call_with_the_default_message_says_no_english() {
    let dir = workdir();
    let cfg = dir.path().join("ja.toml");
    std::fs::write(
        &cfg,
        "[twilio]\nfrom = \"+15005550006\"\n[defaults]\nlanguage = \"ja-JP\"\nvoice = \"Polly.Mizuki\"\n\
         [[rule]]\nname = \"all\"\ncall = [\"+15005550001\"]\n",
    )
    .unwrap();
    let d = route(
        cfg.to_str().unwrap(),
        &[plain(
            "zabbix@monitoring.example.com",
            "=?UTF-8?B?d2ViMDEg5YGc5q2i?=",
            "web01 停止",
        )],
    );
    let twiml = d[0]["twiml"].as_str().unwrap();
    assert!(twiml.contains("language=\"ja-JP\""), "{twiml}");
    assert!(
        !twiml.contains("Alert"),
        "English in a Japanese call: {twiml}"
    );
}
