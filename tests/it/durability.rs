//! Nothing accepted is lost, no storm rings twice: crash recovery, retries, dedup, the
//! call budget and the 451 contract, against the real binary.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::fake_twilio::{CallRecord, FakeTwilio, Reply};
use crate::harness::{Daemon, config, incidents, mail, wait_incidents, workdir};

/// Created calls grouped by conference room (one room per incident) → numbers called.
fn by_room(calls: &[CallRecord]) -> HashMap<String, Vec<String>> {
    let mut rooms: HashMap<String, Vec<String>> = HashMap::new();
    for c in calls.iter().filter(|c| c.status == 201) {
        rooms.entry(c.room()).or_default().push(c.to.clone());
    }
    rooms
}

#[test]
fn acknowledged_alerts_survive_kill_9_and_no_incident_is_called_twice() {
    const ALERTS: usize = 40;
    let twilio = FakeTwilio::start();
    // Slow answers keep calls in flight when the daemon is killed: Twilio has created
    // them, but the daemon has not heard so.
    twilio.set_delay(Duration::from_millis(300));
    let dir = workdir();
    let rules = "[limits]\nmax_calls_per_hour = 1000\n[[rule]]\nname = \"each\"\ncall = [\"alice\", \"bob\"]\n";
    let mut daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    assert_eq!(smtp.cmd("EHLO burst.test").0, 250);
    for i in 0..ALERTS {
        let (code, text) = smtp.send(
            "m@example.com",
            &["alerts@example.com"],
            &mail(&format!("problem {i}"), "x"),
        );
        assert_eq!(code, 250, "{text}");
    }
    // Right after the last 250, before the dispatcher can have placed everything.
    daemon.kill9();
    let before_restart = twilio.created().len();

    assert!(
        before_restart < 2 * ALERTS,
        "the kill came too late to test anything"
    );
    let daemon = Daemon::start_existing(dir.path(), false);
    twilio.wait_until(Duration::from_secs(30), |c| {
        let rooms = by_room(c);
        rooms.len() == ALERTS && rooms.values().all(|n| n.len() >= 2)
    });
    // Give a duplicate the chance to show up before judging.
    std::thread::sleep(Duration::from_millis(500));
    let rooms = by_room(&twilio.calls());
    assert_eq!(
        rooms.len(),
        ALERTS,
        "every acknowledged alert is an incident"
    );
    for (room, numbers) in &rooms {
        let unique: HashSet<&String> = numbers.iter().collect();
        assert_eq!(
            numbers.len(),
            2,
            "{room} was called {numbers:?} (before restart: {before_restart})"
        );
        assert_eq!(unique.len(), 2, "{room}: {numbers:?}");
    }
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.len() == ALERTS
            && l.iter().all(|i| {
                i["calls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| c["status"] == "placed")
            })
    });
    assert!(list.iter().all(|i| i["alert_count"] == 1));
    // Calls created at Twilio just before the kill were found, not placed again.
    assert!(
        daemon
            .logs()
            .contains("did reach Twilio; not calling again"),
        "{}",
        daemon.logs()
    );
}

#[test]
fn twilio_outage_503_and_429_is_retried_until_the_call_goes_out() {
    let twilio = FakeTwilio::start();
    twilio.script(
        "+15005550001",
        vec![
            Reply::error(503, 20500, "Service Unavailable"),
            Reply::Error {
                status: 429,
                code: 20429,
                message: "Too Many Requests".into(),
                retry_after: Some(1),
            },
            Reply::error(503, 20503, "Service Unavailable"),
        ],
    );
    let dir = workdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(
            Some(&twilio),
            "[[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n",
        ),
        false,
    );
    let mut smtp = daemon.smtp();
    let started = Instant::now();
    assert_eq!(
        smtp.send("m@example.com", &["a@example.com"], &mail("db down", ""))
            .0,
        250
    );
    let calls = twilio.wait_until(Duration::from_secs(15), |c| {
        c.iter().any(|c| c.to == "+15005550001" && c.status == 201)
    });
    let alice: Vec<&CallRecord> = calls.iter().filter(|c| c.to == "+15005550001").collect();
    assert_eq!(
        alice.iter().map(|c| c.status).collect::<Vec<_>>(),
        [503, 429, 503, 201]
    );
    // The 429 said Retry-After: 1, and it was honoured.
    assert!(
        alice[2].at - alice[1].at >= Duration::from_millis(950),
        "{:?}",
        alice[2].at - alice[1].at
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Bob was never held up by Alice's retries.
    let bob = calls.iter().find(|c| c.to == "+15005550002").unwrap();
    assert!(bob.at < alice[1].at);
    let list = wait_incidents(dir.path(), Duration::from_secs(5), |l| {
        l.len() == 1
            && l[0]["calls"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["status"] == "placed")
    });
    let alice_row = list[0]["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["number"] == "+15005550001")
        .unwrap();
    assert_eq!(alice_row["attempts"], 4);
    let states: Vec<&str> = alice_row["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "failed", "failed", "placed"]);
    assert!(
        alice_row["requests"][1]["error"]
            .as_str()
            .unwrap()
            .contains("429")
    );
    daemon.wait_for_log("retrying", Duration::from_secs(1));
}

#[test]
fn retries_stop_after_retry_for_and_the_failure_is_recorded() {
    let twilio = FakeTwilio::start();
    twilio.script_all(
        (0..100)
            .map(|_| Reply::error(503, 20500, "Service Unavailable"))
            .collect(),
    );
    let dir = workdir();
    let cfg = config(
        Some(&twilio),
        "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n",
    )
    .replace(
        "retry_initial_delay",
        "retry_for = \"700ms\"\nretry_initial_delay",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    assert_eq!(
        daemon
            .smtp()
            .send("m@example.com", &["a@example.com"], &mail("db down", ""))
            .0,
        250
    );
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.len() == 1 && l[0]["calls"][0]["status"] == "failed"
    });
    let error = list[0]["calls"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("gave up after retrying for 700ms") && error.contains("503"),
        "{error}"
    );
    let attempts = twilio.calls().len();
    assert!((2..=20).contains(&attempts), "{attempts} attempts");
}

#[test]
fn a_permanent_error_for_one_number_never_stops_the_others() {
    let twilio = FakeTwilio::start();
    twilio.script("+15005550002", vec![Reply::error(400, 21219, "The number +15005550002 is unverified. Trial accounts may only make calls to verified numbers.")]);
    let dir = workdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(
            Some(&twilio),
            "[[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\", \"carol\"]\n",
        ),
        false,
    );
    assert_eq!(
        daemon
            .smtp()
            .send("m@example.com", &["a@example.com"], &mail("db down", ""))
            .0,
        250
    );
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.len() == 1
            && l[0]["calls"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["status"] == "placed" || c["status"] == "failed")
    });
    let calls = list[0]["calls"].as_array().unwrap();
    let bob = calls
        .iter()
        .find(|c| c["number"] == "+15005550002")
        .unwrap();
    assert_eq!(bob["status"], "failed");
    assert_eq!(bob["error_code"], 21219);
    assert_eq!(bob["attempts"], 1, "a 4xx is not retried");
    assert!(bob["error"].as_str().unwrap().contains("unverified"));
    assert_eq!(calls.iter().filter(|c| c["status"] == "placed").count(), 2);
    // The human-readable listing shows the error too.
    let out = crate::harness::command(dir.path())
        .arg("incidents")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("error 21219"), "{text}");
    daemon.wait_for_log(
        "trial accounts can only call verified numbers",
        Duration::from_secs(2),
    );
}

#[test]
fn a_storm_of_1000_identical_alerts_rings_once() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules =
        "[defaults]\ncooldown = \"1h\"\n[[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    // Ten connections at once, 1,000 identical alerts in all.
    std::thread::scope(|s| {
        for _ in 0..10 {
            s.spawn(|| {
                let mut smtp = daemon.smtp();
                for _ in 0..100 {
                    smtp.alert("DB1 is DOWN");
                }
            });
        }
    });
    let list = wait_incidents(dir.path(), Duration::from_secs(30), |l| {
        l.len() == 1 && l[0]["alert_count"] == 1000
    });
    assert_eq!(list[0]["calls"].as_array().unwrap().len(), 2);
    // A differently cased, forwarded copy is the same problem.
    daemon.smtp().alert("Fwd: db1 is  down");
    wait_incidents(dir.path(), Duration::from_secs(5), |l| {
        l.len() == 1 && l[0]["alert_count"] == 1001
    });
    assert_eq!(
        twilio.calls().len(),
        2,
        "one round of calls for the whole storm"
    );
}

#[test]
fn after_the_cooldown_the_same_problem_rings_again_and_cooldown_zero_always_rings() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    // The specific rule comes first: the first match wins.
    let rules = "[defaults]\ncooldown = \"1s\"\n\
                 [[rule]]\nname = \"no dedup\"\nsubject = '^flappy'\ncall = [\"carol\"]\ncooldown = \"0s\"\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    for _ in 0..3 {
        smtp.alert("flappy check");
    }
    twilio.wait_until(Duration::from_secs(5), |c| {
        c.iter().filter(|c| c.to == "+15005550003").count() == 3
    });

    smtp.alert("DB1 is DOWN");
    twilio.wait_until(Duration::from_secs(5), |c| c.len() == 5);
    std::thread::sleep(Duration::from_millis(1200));
    smtp.alert("DB1 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(5), |c| c.len() == 7);
    assert_eq!(
        by_room(&calls).len(),
        5,
        "three flappy incidents and two DB1 incidents"
    );
}

#[test]
fn calls_over_the_hourly_budget_are_refused_and_recorded() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules =
        "[limits]\nmax_calls_per_hour = 3\n[[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    assert_eq!(
        smtp.send(
            "m@example.com",
            &["a@example.com"],
            &mail("first problem", "")
        )
        .0,
        250
    );
    assert_eq!(
        smtp.send(
            "m@example.com",
            &["a@example.com"],
            &mail("second problem", "")
        )
        .0,
        250
    );
    assert_eq!(
        smtp.send(
            "m@example.com",
            &["a@example.com"],
            &mail("third problem", "")
        )
        .0,
        250
    );
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.len() == 3
            && l.iter()
                .flat_map(|i| i["calls"].as_array().unwrap())
                .all(|c| c["status"] == "placed" || c["status"] == "refused")
    });
    let statuses: Vec<String> = list
        .iter()
        .rev()
        .flat_map(|i| {
            i["calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["status"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        statuses,
        [
            "placed", "placed", "placed", "refused", "refused", "refused"
        ]
    );
    assert!(
        list[0]["calls"][0]["error"]
            .as_str()
            .unwrap()
            .contains("call budget")
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(twilio.calls().len(), 3);
    daemon.wait_for_log("CALL BUDGET EXHAUSTED", Duration::from_secs(1));
}

/// A mail that could not fit even into an empty store is refused for good (`552`):
/// answering `452` would only make its sender retry for days. (A store that open data
/// fills answers `452`: see `retention.rs`.)
#[test]
fn a_mail_too_big_for_the_store_is_refused_for_good_and_the_daemon_keeps_running() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    // A store capped at 1 MiB (the least `check` allows) stands in for a small disk.
    let rules = "[state]\nmax_bytes = 1048576\n[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    let (code, text) = smtp.send(
        "m@example.com",
        &["a@example.com"],
        &mail("huge", &"y".repeat(1_200_000)),
    );
    assert_eq!(code, 552, "{text}");
    assert!(text.starts_with("5.3.4"), "{text}");
    daemon.wait_for_log("cannot store a mail", Duration::from_secs(2));
    // Nothing was stored, so nothing rings; the next (small) mail is accepted and rings.
    let (code, text) = smtp.send("m@example.com", &["a@example.com"], &mail("small", "z"));
    assert_eq!(code, 250, "{text}");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    assert!(calls[0].twiml.contains("small"));
    assert_eq!(incidents(dir.path()).len(), 1);
}

#[test]
fn a_corrupt_store_stops_the_start_with_a_message_naming_the_file() {
    let dir = workdir();
    std::fs::write(dir.path().join("rules.toml"), config(None, "")).unwrap();
    std::fs::write(
        dir.path().join("mailcall.db"),
        b"this is not a database, it is a text file ".repeat(200),
    )
    .unwrap();
    let out = crate::harness::command(dir.path())
        .args(["serve", "--dry-run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mailcall.db") && stderr.contains("corrupt"),
        "{stderr}"
    );
}

#[test]
fn sigterm_answers_421_to_open_sessions_and_exits_promptly() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let mut daemon = Daemon::start(
        dir.path(),
        &config(
            Some(&twilio),
            "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n",
        ),
        false,
    );
    let mut idle = daemon.smtp();
    assert_eq!(idle.cmd("EHLO idle.test").0, 250);
    let mut mid = daemon.smtp();
    assert_eq!(mid.cmd("EHLO mid.test").0, 250);
    assert_eq!(mid.cmd("MAIL FROM:<m@example.com>").0, 250);
    assert_eq!(mid.cmd("RCPT TO:<a@example.com>").0, 250);
    assert_eq!(mid.cmd("DATA").0, 354);
    mid.send_raw(b"Subject: half a message\r\n\r\nstill typing");
    std::thread::sleep(Duration::from_millis(100));

    let started = Instant::now();
    let status = daemon.terminate(Duration::from_secs(8));
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(idle.read_reply().0, 421);
    assert_eq!(mid.read_reply().0, 421);
    // The half message was never acknowledged, so nothing was stored or called.
    assert!(incidents(dir.path()).is_empty());
    assert!(twilio.calls().is_empty());
}
