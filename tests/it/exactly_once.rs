//! Issue 12: each number is rung exactly once per round, whatever fails. One regression
//! test per measured defect, each driving the real daemon over sockets against a fake
//! Twilio having a bad day.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_twilio::{AUTH_TOKEN, Answer, FakeTwilio, Reply};
use crate::harness::{
    Daemon, calls, command, config, http_get, incidents, mail, scrape, wait_incidents, workdir,
};

const PUBLIC: &str = "https://alerts.example.com";
const ALICE: &str = "+15005550001";
const BOB: &str = "+15005550002";

/// The test config (whose reconciliation grace is 2 s) with a 1 s request timeout.
fn tuned(twilio: &FakeTwilio, extra: &str) -> String {
    config(Some(twilio), extra).replace("request_timeout = \"2s\"", "request_timeout = \"1s\"")
}

/// With `[http]` and a public URL, so Twilio's callbacks reach the daemon.
fn public(cfg: String) -> String {
    cfg.replace(
        "ring_seconds = 25\n",
        &format!("ring_seconds = 25\npublic_url = \"{PUBLIC}\"\n"),
    ) + "[http]\nlisten = \"127.0.0.1:0\"\n"
}

fn call_to<'a>(incident: &'a Value, number: &str) -> &'a Value {
    calls(incident)
        .iter()
        .find(|c| c["number"] == number)
        .unwrap_or_else(|| panic!("no call to {number}: {incident:#}"))
}

/// Defect 1: Twilio's `201` arrives after `request_timeout`; the call must not be sent
/// again blindly, and the call list settles which call it was.
#[test]
fn slow_accept_is_reconciled_not_sent_again() {
    let twilio = FakeTwilio::start();
    twilio.set_delay(Duration::from_millis(2500));
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &tuned(&twilio, rules), false);
    daemon.smtp().alert("db1 is DOWN");
    let list = wait_incidents(dir.path(), Duration::from_secs(20), |l| {
        l.len() == 1 && l[0]["calls"][0]["status"] == "placed"
    });
    // Time for a blind resend to show up, had there been one.
    std::thread::sleep(Duration::from_secs(3));
    let created = twilio.created();
    assert_eq!(created.len(), 1, "one alert, one call: {created:#?}");
    let call = &list[0]["calls"][0];
    assert_eq!(call["sid"].as_str(), created[0].sid.as_deref());
    let requests = call["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 1, "{call:#}");
    assert_eq!(requests[0]["state"], "placed");
    assert_eq!(requests[0]["reconciled"], "call list", "{call:#}");
    assert!(twilio.list_requests() >= 1);
    daemon.wait_for_log("outcome unknown", Duration::from_secs(1));
}

/// Defect 1 with a public URL: the status callback carries the attempt's id and
/// settles it even while the call list hangs.
#[test]
fn slow_accept_with_a_public_url_is_settled_by_the_status_callback() {
    let twilio = FakeTwilio::start();
    twilio.set_delay(Duration::from_millis(2500));
    twilio.set_list_hangs(true);
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &public(tuned(&twilio, rules)), false);
    twilio.deliver_callbacks(PUBLIC, daemon.http.unwrap());
    daemon.smtp().alert("db1 is DOWN");
    let list = wait_incidents(dir.path(), Duration::from_secs(20), |l| {
        l.len() == 1 && l[0]["calls"][0]["status"] == "placed"
    });
    std::thread::sleep(Duration::from_secs(3));
    let created = twilio.created();
    assert_eq!(created.len(), 1, "{created:#?}");
    let form = &created[0].form;
    let callback = &form["StatusCallback"];
    assert!(
        callback.starts_with(&format!("{PUBLIC}/twilio/status?attempt=")),
        "{callback}"
    );
    assert_eq!(
        form["StatusCallbackEvent"],
        "initiated ringing answered completed"
    );
    let request = &list[0]["calls"][0]["requests"][0];
    assert_eq!(request["state"], "placed");
    assert_eq!(request["reconciled"], "status callback");
    assert_eq!(request["sid"].as_str(), created[0].sid.as_deref());
}

/// Defect 1 when Twilio drops the connection after creating the call, and its call
/// list lags behind: the reconciler waits for the call to show up (within the grace
/// period) instead of calling again.
#[test]
fn a_dropped_answer_and_a_lagging_call_list_still_ring_once() {
    let twilio = FakeTwilio::start();
    twilio.script(ALICE, vec![Reply::CreatedThenDrop]);
    twilio.script(BOB, vec![Reply::CreatedLate(Duration::from_secs(3))]);
    twilio.set_list_lag(Duration::from_millis(2500));
    let dir = workdir();
    let daemon = Daemon::start(
        dir.path(),
        &tuned(
            &twilio,
            "[[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n",
        ),
        false,
    );
    daemon.smtp().alert("db1 is DOWN");
    let list = wait_incidents(dir.path(), Duration::from_secs(20), |l| {
        l.len() == 1 && calls(&l[0]).iter().all(|c| c["status"] == "placed")
    });
    std::thread::sleep(Duration::from_secs(3));
    let created = twilio.created();
    assert_eq!(created.len(), 2, "{created:#?}");
    assert!(created.iter().any(|c| c.dropped && c.to == ALICE));
    for number in [ALICE, BOB] {
        let requests = call_to(&list[0], number)["requests"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(requests.len(), 1, "{number}: {requests:#?}");
        assert_eq!(requests[0]["reconciled"], "call list");
    }
}

/// Defects 2 and 3: `kill -9` between a Calls.json request and the commit of its
/// answer, with a slow Twilio, then a second incident for the same person after the
/// restart. The unknown request is reconciled one to one: each incident's call carries
/// the SID of the call made into its own room (never the other's), and each room is
/// rung exactly once.
#[test]
fn a_crash_mid_request_gives_each_alert_its_own_sid_and_rings_each_once() {
    let twilio = FakeTwilio::start();
    // The call is created at once; its answer comes long after the crash.
    twilio.script(ALICE, vec![Reply::CreatedLate(Duration::from_secs(8))]);
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"1h\"\n\
                 [[rule]]\nname = \"page\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\"]\ndedup_key = \"{host}\"\n";
    let mut daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    daemon.smtp().alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.iter().any(|c| c.to == ALICE));
    daemon.kill9();
    let daemon = Daemon::start_existing(dir.path(), false);
    daemon.smtp().alert("web1 is DOWN");
    let list = wait_incidents(dir.path(), Duration::from_secs(30), |l| {
        l.len() == 2 && l.iter().all(|i| calls(i)[0]["status"] == "placed")
    });
    // Time for a wrong resend to arrive, had there been one.
    std::thread::sleep(Duration::from_secs(3));
    let created = twilio.created();
    for incident in &list {
        let room = format!("mailcall-{}", incident["public_id"].as_str().unwrap());
        let into_room: Vec<_> = created.iter().filter(|c| c.room() == room).collect();
        assert_eq!(
            into_room.len(),
            1,
            "{room} rung {} times: {incident:#}",
            into_room.len()
        );
        assert_eq!(
            calls(incident)[0]["sid"],
            Value::from(into_room[0].sid.clone()),
            "the incident holds another call's SID: {incident:#}"
        );
    }
}

/// Defect 4: after a crash with requests in flight and a call list that hangs, a new
/// incident's calls leave at once instead of waiting for the old reconciliation.
#[test]
fn restart_never_holds_new_calls_behind_old_reconciliation() {
    let twilio = FakeTwilio::start();
    twilio.set_delay(Duration::from_secs(4));
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\", \"carol\"]\n";
    let cfg = tuned(&twilio, rules).replace("request_timeout = \"1s\"", "request_timeout = \"5s\"");
    let mut daemon = Daemon::start(dir.path(), &cfg, false);
    daemon.smtp().alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 3);
    daemon.kill9();

    twilio.set_list_hangs(true);
    twilio.set_delay(Duration::ZERO);
    let daemon = Daemon::start_existing(dir.path(), false);
    let sent = Instant::now();
    daemon.smtp().alert("web1 is DOWN");
    let new = |c: &crate::fake_twilio::CallRecord| c.twiml.contains("web1");
    let calls = twilio.wait_until(Duration::from_secs(30), |c| {
        c.iter().filter(|c| new(c)).count() == 3
    });
    let waited = calls.iter().filter(|c| new(c)).map(|c| c.at).max().unwrap() - sent;
    assert!(
        waited < Duration::from_secs(4),
        "the new incident's calls waited {waited:?} behind reconciliation"
    );
}

/// Defect 5: `sd_notify` to a socket nobody drains never freezes the runtime: SMTP
/// answers after SIGHUPs and SIGTERM still exits.
#[test]
fn a_stuck_notify_socket_never_blocks_smtp_or_shutdown() {
    let dir = workdir();
    let socket_path = dir.path().join("notify.sock");
    // Bound, never read: its queue fills and a blocking send would hang.
    let _socket = UnixDatagram::bind(&socket_path).unwrap();
    std::fs::write(
        dir.path().join("rules.toml"),
        config(None, "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n"),
    )
    .unwrap();
    let mut daemon = Daemon::launch_with_env(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "100000"),
        ],
    );
    for _ in 0..20 {
        daemon.signal("HUP");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut smtp = daemon.smtp();
    assert_eq!(smtp.greeting.0, 220);
    smtp.alert("db1 is DOWN");
    let status = daemon.terminate(Duration::from_secs(8));
    assert!(status.success(), "{status:?}");
}

/// Defect 6: a stalled stderr (nobody reads the pipe) never stops SMTP or calls; the
/// lines that could not be written are counted.
#[test]
fn a_stalled_log_pipe_never_stops_calls() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[http]\nlisten = \"127.0.0.1:0\"\n\
                 [[rule]]\nname = \"noise\"\nsubject = '^noise'\ndrop = true\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    std::fs::write(dir.path().join("rules.toml"), config(Some(&twilio), rules)).unwrap();
    let daemon = Daemon::launch_with_stalled_stderr(dir.path(), &[]);
    // Each dropped mail logs two lines: 3,000 lines are more than the pipe and the
    // log queue (2,048 lines) hold together.
    let mut smtp = daemon.smtp();
    for i in 0..1500 {
        smtp.alert(&format!("noise {i}"));
    }
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(20), |c| c.len() == 1);
    let m = scrape(&format!("http://{}/metrics", daemon.http.unwrap()));
    assert!(
        m["mailcall_log_lines_dropped_total"] > 0.0,
        "dropped lines are counted"
    );
}

/// Defect 7: a store file deleted (or replaced) while running is noticed: `451`, not a
/// `250` that a restart would lose, and `/healthz` says 503.
#[test]
fn a_deleted_store_file_answers_451_not_250() {
    for replace in [false, true] {
        let twilio = FakeTwilio::start();
        let dir = workdir();
        let rules =
            "[http]\nlisten = \"127.0.0.1:0\"\n[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
        let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
        daemon.smtp().alert("first");
        twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
        let db = dir.path().join("mailcall.db");
        if replace {
            std::fs::copy(&db, dir.path().join("copy.db")).unwrap();
            std::fs::rename(dir.path().join("copy.db"), &db).unwrap();
        } else {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
        }
        let (code, text) =
            daemon
                .smtp()
                .send("m@example.com", &["a@example.com"], &mail("second", "x"));
        assert_eq!(code, 451, "replace={replace}: {text}");
        let (status, body) = http_get(&format!("http://{}/healthz", daemon.http.unwrap()));
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"store\":false"), "{body}");
        daemon.wait_for_log("STORE FILE", Duration::from_secs(5));
    }
}

const RESOLVING: &str = "[defaults]\ncooldown = \"1h\"\nround_interval = \"1s\"\nrounds = 1\n\
    [[rule]]\nname = \"recovery\"\nsubject = '(?P<host>\\S+) is UP'\nresolve = true\ndedup_key = \"{host}\"\n\
    [[rule]]\nname = \"down\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\", \"bob\"]\ndedup_key = \"{host}\"\n";

/// Defect 8: DOWN → recovery → DOWN within the cooldown rings again, and so does DOWN
/// after an incident ended unanswered: dedup joins open incidents only.
#[test]
fn dedup_joins_only_an_open_incident() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &tuned(&twilio, RESOLVING), false);
    let mut smtp = daemon.smtp();
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    smtp.alert("db1 is UP");
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.first().is_some_and(|i| i["status"] == "resolved")
    });
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 4);
    // One round only: a second later it has ended unanswered.
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.len() == 2 && l[0]["status"] == "unanswered"
    });
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 6);
    let list = incidents(dir.path());
    assert_eq!(list.len(), 3, "{list:#?}");
    assert!(list.iter().all(|i| i["alert_count"] == 1));
}

/// Defect 9: a number whose call still rings is skipped by the next round.
#[test]
fn a_round_skips_a_number_whose_call_still_rings() {
    let twilio = FakeTwilio::start();
    twilio.set_ring_time(Duration::from_secs(8));
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"2s\"\nrounds = 2\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let daemon = Daemon::start(dir.path(), &tuned(&twilio, rules), false);
    daemon.smtp().alert("db1 is DOWN");
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l.first().is_some_and(|i| i["status"] == "unanswered")
    });
    assert_eq!(twilio.calls().len(), 2, "ringing phones are not rung again");
    let round2: Vec<&Value> = calls(&list[0]).iter().filter(|c| c["round"] == 2).collect();
    assert_eq!(round2.len(), 2, "{:#}", list[0]);
    assert!(
        round2
            .iter()
            .all(|c| c["status"] == "skipped" && c["error"].as_str().unwrap().contains("ringing")),
        "{round2:#?}"
    );
}

/// Defect 9: a number whose call is still being retried is skipped by the next round,
/// instead of getting a second, parallel call.
#[test]
fn a_round_skips_a_number_still_being_retried() {
    let twilio = FakeTwilio::start();
    twilio.script(
        ALICE,
        (0..400)
            .map(|_| Reply::error(503, 20500, "Service Unavailable"))
            .collect(),
    );
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"1500ms\"\nrounds = 2\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let daemon = Daemon::start(dir.path(), &tuned(&twilio, rules), false);
    daemon.smtp().alert("db1 is DOWN");
    // Round 2 has rung bob again and its time is up; alice is still being retried.
    wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l.first().is_some_and(|i| {
            calls(i)
                .iter()
                .filter(|c| c["number"] == BOB && c["status"] == "placed")
                .count()
                == 2
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    let list = crate::harness::incidents(dir.path());
    let alice: Vec<&Value> = calls(&list[0])
        .iter()
        .filter(|c| c["number"] == ALICE)
        .collect();
    assert_eq!(alice.len(), 2, "{:#}", list[0]);
    // Still being retried: waiting for its next try, or in the middle of one.
    assert!(
        ["retrying", "requesting"].contains(&alice[0]["status"].as_str().unwrap_or_default()),
        "{:#}",
        list[0]
    );
    assert_eq!(alice[1]["status"], "skipped");
    assert!(alice[1]["error"].as_str().unwrap().contains("retried"));
    // Bob's first call ended unanswered: round 2 rang him again.
    let bob = calls(&list[0])
        .iter()
        .filter(|c| c["number"] == BOB && c["status"] == "placed")
        .count();
    assert_eq!(bob, 2);
    // The last round's time is up, but the incident is not "unanswered" while alice's
    // call may still get through: it waits for her retries.
    assert_eq!(list[0]["status"], "open", "{:#}", list[0]);
}

/// Defect 9: a resolution that lands while a round's end is being checked stops the
/// next round.
#[test]
fn finishing_a_round_rechecks_that_the_incident_is_open() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = RESOLVING.replace("rounds = 1", "rounds = 3");
    let cfg =
        tuned(&twilio, &rules).replace("request_timeout = \"1s\"", "request_timeout = \"10s\"");
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let mut smtp = daemon.smtp();
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    // The round ends a second later; its check of the bridge takes 3 s, and the
    // recovery arrives in the middle of it.
    twilio.set_conference_delay(Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(1500));
    smtp.alert("db1 is UP");
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.first().is_some_and(|i| i["status"] == "resolved")
    });
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(twilio.calls().len(), 2, "no round after the resolution");
}

/// Defect 10: AMD `unknown` in the bridge is not a person: the incident is not bridged.
#[test]
fn amd_unknown_is_not_a_person() {
    let twilio = FakeTwilio::start();
    twilio.answer(
        ALICE,
        Answer {
            answered_by: "unknown",
            joins: true,
        },
    );
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"1500ms\"\nrounds = 2\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let daemon = Daemon::start(dir.path(), &tuned(&twilio, rules), false);
    daemon.smtp().alert("db1 is DOWN");
    // Both rounds end, not bridged: `unknown` is not a person. Her call is still on
    // the line, but its answerer is known and nothing about it can change that: the
    // last round does not wait for it (Twilio keeps such a call up for hours).
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l.first()
            .is_some_and(|i| i["status"] != "open" && i["rounds"].as_array().unwrap().len() == 2)
    });
    assert_eq!(list[0]["status"], "unanswered", "{:#}", list[0]);
    assert_eq!(call_to(&list[0], ALICE)["answered_by"], "unknown");
}

/// Defect 10: in polling mode the bridge is watched through the whole round: a person
/// who joined and left before the round's end reached the incident.
#[test]
fn polling_watches_the_bridge_through_the_round() {
    let twilio = FakeTwilio::start();
    twilio.answer(
        ALICE,
        Answer {
            answered_by: "human",
            joins: true,
        },
    );
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"4s\"\nrounds = 3\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";
    let daemon = Daemon::start(dir.path(), &tuned(&twilio, rules), false);
    daemon.smtp().alert("db1 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let alice = calls.iter().find(|c| c.to == ALICE).unwrap();
    // She hears the alert, joins, and hangs up well before the round ends.
    std::thread::sleep(Duration::from_millis(300));
    twilio.hang_up(alice.sid.as_deref().unwrap());
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l.first().is_some_and(|i| i["status"] != "open")
    });
    assert_eq!(list[0]["status"], "bridged", "{:#}", list[0]);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        twilio.calls().len(),
        2,
        "no round after a person was reached"
    );
}

/// Defect 11: `mailcall call --dry-run` beside a running daemon never dials.
#[test]
fn call_dry_run_never_dials_beside_a_running_daemon() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let _daemon = Daemon::start(dir.path(), &tuned(&twilio, rules), false);
    let out = command(dir.path())
        .args([
            "call",
            "--dry-run",
            "--to",
            "alice,bob",
            "--message",
            "a drill",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("dry-run"), "{stdout}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(twilio.calls().is_empty(), "{:#?}", twilio.calls());
    let list = incidents(dir.path());
    assert_eq!(list[0]["dry_run"], true);
    assert!(calls(&list[0]).iter().all(|c| c["status"] == "dry-run"));
}

/// Defect 11: an incident opened by `serve --dry-run` keeps its rounds dry: a later
/// real daemon never dials them.
#[test]
fn dry_run_incidents_are_never_dialled_by_a_later_real_daemon() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"1s\"\nrounds = 4\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    std::fs::write(dir.path().join("rules.toml"), tuned(&twilio, rules)).unwrap();
    let mut dry = Daemon::launch(dir.path(), true, false);
    dry.smtp().alert("db1 is DOWN");
    dry.wait_for_log("dry-run: would place this call", Duration::from_secs(10));
    dry.terminate(Duration::from_secs(8));

    let real = Daemon::start_existing(dir.path(), false);
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l.first().is_some_and(|i| i["status"] == "unanswered")
    });
    assert!(twilio.calls().is_empty(), "{:#?}", twilio.calls());
    assert!(calls(&list[0]).iter().all(|c| c["status"] == "dry-run"));
    // Real alerts still ring.
    real.smtp().alert("web1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
}

/// Defect 12: the canary is one call per number: no rounds, no SMS, not counted as an
/// incident's call, and never the bridge a dial-in joins.
#[test]
fn the_canary_rings_once_per_number_without_rounds_sms_or_dial_in() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"1s\"\nrounds = 3\nsms = true\n\
                 [canary]\nevery = \"1h\"\ncall = [\"alice\", \"bob\"]\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let cfg = public(tuned(&twilio, rules));
    let mut daemon = Daemon::start(dir.path(), &cfg, false);
    daemon.terminate(Duration::from_secs(8));
    crate::ops::backdate_canary(dir.path());
    let daemon = Daemon::start_existing(dir.path(), false);
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(twilio.calls().len(), 2, "the canary has no rounds");
    assert!(twilio.messages().is_empty(), "the canary sends no SMS");
    let m = scrape(&format!("http://{}/metrics", daemon.http.unwrap()));
    assert_eq!(m["mailcall_canary_runs_total{result=\"ok\"}"], 2.0);
    assert_eq!(m["mailcall_calls_placed_total"], 0.0, "{m:?}");
    assert_eq!(m["mailcall_incidents_opened_total"], 0.0);
    // A contact dialling in is not put into the canary's bridge.
    let pairs = vec![
        ("From".to_string(), "+15005550003".to_string()),
        ("CallSid".to_string(), "CAin".to_string()),
    ];
    let signature =
        mailcall::twilio::signature::sign(AUTH_TOKEN, &format!("{PUBLIC}/twilio/voice"), &pairs);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let twiml = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{}/twilio/voice", daemon.http.unwrap()))
            .header("X-Twilio-Signature", signature)
            .form(&pairs)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(twiml.contains("There is no open incident"), "{twiml}");
    let list = incidents(dir.path());
    assert_eq!(list[0]["kind"], "canary");
}

/// A mail whose routing kills the daemon (a parser bug a hostile mail finds) must not
/// kill every restart: the marker the router leaves names it, each start counts a
/// strike, a suspect is routed alone, and after three it is set aside while later
/// alerts ring. (The crash is simulated by what it leaves behind: the marker and the
/// strikes of earlier runs.)
#[test]
fn an_alert_that_keeps_killing_the_router_is_set_aside() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let mut daemon = Daemon::start(dir.path(), &tuned(&twilio, rules), false);
    daemon.terminate(Duration::from_secs(8));
    let db = rusqlite::Connection::open(dir.path().join("mailcall.db")).unwrap();
    let store = |subject: &str, strikes: i64| -> i64 {
        db.execute(
            "INSERT INTO alerts (received_at, source, rcpt_to, raw, state, route_attempts)
             VALUES (1, 'smtp', '[]', ?1, 'received', ?2)",
            rusqlite::params![mail(subject, "x"), strikes],
        )
        .unwrap();
        db.last_insert_rowid()
    };
    let poison = store("poison", 2);
    let suspect = store("suspect", 0);
    // The last run died routing both.
    std::fs::write(
        dir.path().join("mailcall.db.routing"),
        format!("{poison}\n{suspect}\n"),
    )
    .unwrap();
    let daemon = Daemon::start_existing(dir.path(), false);
    daemon.wait_for_log("ALERT SET ASIDE", Duration::from_secs(10));
    // The suspect had one strike: routed alone, it rings; the poison does not.
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    assert!(calls[0].twiml.contains("suspect"), "{}", calls[0].twiml);
    daemon.smtp().alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let (state, note): (String, String) = db
        .query_row(
            "SELECT state, note FROM alerts WHERE id = ?1",
            [poison],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(state, "rejected");
    assert!(note.contains("died 3 times"), "{note}");
    assert!(!dir.path().join("mailcall.db.routing").exists());
}
