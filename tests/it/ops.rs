//! Running as a service: reload, metrics, sd_notify readiness and watchdog, `status`,
//! the canary, and secrets staying out of the log.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::fake_twilio::{AUTH_TOKEN, FakeTwilio, Reply};
use crate::harness::{Daemon, TEST_TOKEN, command, config, mail, scrape, workdir};

fn rules(callee: &str) -> String {
    format!(
        "[[rule]]\nname = \"recoveries\"\nsubject = 'RECOVERED'\ndrop = true\n[[rule]]\nname = \"all\"\ncall = [\"{callee}\"]\n"
    )
}

#[test]
fn sighup_swaps_a_valid_config_and_keeps_the_old_one_when_invalid() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), &rules("alice")), false);
    let send = |subject: &str| {
        assert_eq!(
            daemon
                .smtp()
                .send("m@example.com", &["a@example.com"], &mail(subject, "x"))
                .0,
            250
        )
    };
    send("first");
    twilio.wait_until(Duration::from_secs(10), |c| {
        c.len() == 1 && c[0].to == "+15005550001"
    });

    std::fs::write(
        dir.path().join("rules.toml"),
        config(Some(&twilio), &rules("bob")),
    )
    .unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(5));
    send("second");
    twilio.wait_until(Duration::from_secs(10), |c| {
        c.len() == 2 && c[1].to == "+15005550002"
    });

    // Invalid: every problem is logged with its position, and the old config stays.
    let broken = config(
        Some(&twilio),
        "[[rule]]\nname = \"broken\"\nsubject = '(unclosed'\ncall = [\"nobody\"]\n",
    );
    std::fs::write(dir.path().join("rules.toml"), &broken).unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration NOT reloaded", Duration::from_secs(5));
    let logs = daemon.logs();
    assert!(
        logs.contains("invalid regex for `subject`") && logs.contains("`nobody` in rule `broken`"),
        "{logs}"
    );
    assert!(
        logs.contains("rules.toml:"),
        "problems carry file:line:column: {logs}"
    );
    send("third");
    twilio.wait_until(Duration::from_secs(10), |c| {
        c.len() == 3 && c[2].to == "+15005550002"
    });
}

#[test]
fn metrics_count_what_happened_and_secrets_stay_out_of_the_log() {
    let twilio = FakeTwilio::start();
    twilio.script(
        "+15005550002",
        vec![Reply::error(400, 21211, "Invalid 'To' Phone Number")],
    );
    let dir = workdir();
    let extra = "[http]\nlisten = \"127.0.0.1:0\"\n[webhook]\ntoken_env = \"MAILCALL_TEST_TOKEN\"\n\
         [[rule]]\nname = \"recoveries\"\nsubject = 'RECOVERED'\ndrop = true\n\
         [[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let cfg = config(Some(&twilio), extra).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\nrecipients = [\"a@example.com\"]\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let mut smtp = daemon.smtp();
    smtp.alert("db1 down");
    smtp.alert("db1 RECOVERED");
    assert_eq!(smtp.cmd("MAIL FROM:<m@example.com>").0, 250);
    assert_eq!(smtp.cmd("RCPT TO:<stranger@example.com>").0, 550);
    assert_eq!(smtp.cmd("RSET").0, 250);
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    daemon.wait_for_log("call failed permanently", Duration::from_secs(5));
    daemon.wait_for_log("call placed", Duration::from_secs(5));
    daemon.wait_for_log("dropped by rule", Duration::from_secs(5));

    let base = format!("http://{}", daemon.http.unwrap());
    let m = scrape(&format!("{base}/metrics"));
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:#?}"))
    };
    assert_eq!(get("mailcall_up"), 1.0);
    assert!(
        m.keys()
            .any(|k| k.starts_with("mailcall_build_info{version="))
    );
    assert_eq!(get("mailcall_mails_received_total{ingress=\"smtp\"}"), 2.0);
    assert_eq!(
        get("mailcall_mails_rejected_total{ingress=\"smtp\",reason=\"recipient\"}"),
        1.0
    );
    assert_eq!(
        get("mailcall_alerts_routed_total{rule=\"all\",action=\"call\"}"),
        1.0
    );
    assert_eq!(
        get("mailcall_alerts_routed_total{rule=\"recoveries\",action=\"drop\"}"),
        1.0
    );
    assert_eq!(get("mailcall_incidents_opened_total"), 1.0);
    assert_eq!(get("mailcall_calls_placed_total"), 1.0);
    assert_eq!(get("mailcall_calls_failed_total{code=\"21211\"}"), 1.0);
    assert_eq!(get("mailcall_dispatch_latency_seconds_count"), 2.0);
    assert!(get("mailcall_dispatch_latency_seconds_sum") < 5.0);
    assert!(get("mailcall_store_bytes") > 0.0);

    // The webhook with the right token, and with a wrong one.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let c = reqwest::Client::new();
        let ok = c
            .get(format!(
                "{base}/alert?tels=carol&message=hi&token={TEST_TOKEN}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let bad = c
            .get(format!("{base}/alert?tels=carol&message=hi"))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 401);
    });
    let m = scrape(&format!("{base}/metrics"));
    assert_eq!(m["mailcall_mails_received_total{ingress=\"webhook\"}"], 1.0);
    assert_eq!(
        m["mailcall_mails_rejected_total{ingress=\"webhook\",reason=\"token\"}"],
        1.0
    );

    let logs = daemon.logs();
    for secret in [TEST_TOKEN, AUTH_TOKEN] {
        assert!(
            !logs.contains(secret),
            "secret {secret:?} in the log:\n{logs}"
        );
    }
}

#[test]
fn readiness_and_the_watchdog_reach_systemd_through_notify_socket() {
    let dir = workdir();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::fs::write(dir.path().join("rules.toml"), config(None, &rules("alice"))).unwrap();
    let mut daemon = Daemon::launch_with_env(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        assert!(Instant::now() < deadline, "messages so far: {seen:?}");
        let n = socket.recv(&mut buf).unwrap();
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    // READY only once the listeners answer.
    assert_eq!(daemon.smtp().greeting.0, 220);
    daemon.terminate(Duration::from_secs(8));
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}

#[test]
fn status_asks_the_running_daemon() {
    let dir = workdir();
    let cfg = config(
        None,
        &format!("[http]\nlisten = \"127.0.0.1:0\"\n{}", rules("alice")),
    );
    let mut daemon = Daemon::start(dir.path(), &cfg, true);
    // `status` reads the address from the config: point it at the port the daemon got.
    let fixed = cfg.replace(
        "listen = \"127.0.0.1:0\"\n[[rule]]",
        &format!("listen = \"{}\"\n[[rule]]", daemon.http.unwrap()),
    );
    std::fs::write(dir.path().join("status.toml"), &fixed).unwrap();
    let status = || {
        std::process::Command::new(crate::harness::BIN)
            .args([
                "--config",
                dir.path().join("status.toml").to_str().unwrap(),
                "status",
            ])
            .output()
            .unwrap()
    };
    let out = status();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(": ok") && stdout.contains("dispatcher ok"),
        "{stdout}"
    );
    daemon.kill9();
    let out = status();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the daemon running?"));
}

/// Makes the canary due now by backdating its last run in the store.
pub fn backdate_canary(dir: &std::path::Path) {
    let db = rusqlite::Connection::open(dir.join("mailcall.db")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('canary_last', ?1) ON CONFLICT (key) DO UPDATE SET value = ?1",
        [(now - 3_600_000).to_string()],
    )
    .unwrap();
}

#[test]
fn the_canary_calls_through_the_whole_pipeline_and_reports_failures() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let cfg = config(
        Some(&twilio),
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[canary]\nevery = \"1h\"\ncall = [\"alice\"]\n{}",
            rules("bob")
        ),
    );
    // First start: creates the store and schedules the first canary an hour out.
    let mut daemon = Daemon::start(dir.path(), &cfg, false);
    std::thread::sleep(Duration::from_millis(300));
    daemon.terminate(Duration::from_secs(8));
    assert!(twilio.calls().is_empty(), "no canary at the first start");

    backdate_canary(dir.path());
    let mut daemon = Daemon::start_existing(dir.path(), false);
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    assert_eq!(calls[0].to, "+15005550001");
    assert!(
        calls[0].twiml.contains("mailcall test call"),
        "{}",
        calls[0].twiml
    );
    daemon.wait_for_log("call placed", Duration::from_secs(5));
    let m = scrape(&format!("http://{}/metrics", daemon.http.unwrap()));
    assert_eq!(m["mailcall_canary_runs_total{result=\"ok\"}"], 1.0);
    assert!(m["mailcall_canary_last_success_timestamp_seconds"] > 1.7e9);
    daemon.terminate(Duration::from_secs(8));

    // A broken phone path (here: bad credentials) shows up before a real incident.
    twilio.script(
        "+15005550001",
        vec![Reply::error(401, 20003, "Authenticate")],
    );
    backdate_canary(dir.path());
    let daemon = Daemon::start_existing(dir.path(), false);
    daemon.wait_for_log("CANARY FAILED", Duration::from_secs(10));
    let m = scrape(&format!("http://{}/metrics", daemon.http.unwrap()));
    assert_eq!(m["mailcall_canary_runs_total{result=\"failed\"}"], 1.0);
    let out = command(dir.path())
        .args(["incidents", "--json"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"rule\":\"canary\""));
}
