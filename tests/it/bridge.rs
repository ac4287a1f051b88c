//! The bridge reaches a human: rounds of calls until someone is in the conference, and
//! voicemail handled by polling Twilio (no public URL).

use std::time::Duration;

use crate::fake_twilio::{Answer, FakeTwilio};
use crate::harness::{Daemon, config, mail, wait_incidents, workdir};

const ROUNDS: &str = "[defaults]\nround_interval = \"1500ms\"\nrounds = 3\n[[rule]]\nname = \"all\"\ncall = [\"alice\", \"bob\"]\n";

fn outcomes(incident: &serde_json::Value) -> Vec<String> {
    incident["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or("running").to_string())
        .collect()
}

#[test]
fn rounds_call_everyone_again_until_someone_joins_then_stop() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), ROUNDS), false);
    assert_eq!(
        daemon
            .smtp()
            .send(
                "m@example.com",
                &["a@example.com"],
                &mail("db1 is DOWN", "x")
            )
            .0,
        250
    );
    // Round 1: nobody answers. Round 2 calls both again.
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    twilio.answer(
        "+15005550001",
        Answer {
            answered_by: "human",
            joins: true,
        },
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 4);
    assert_eq!(
        calls[2].room(),
        calls[0].room(),
        "every round dials the same conference"
    );
    // Alice is in the bridge: round 2 ends reached, and no round 3 follows.
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l[0]["status"] == "reached"
    });
    assert_eq!(
        outcomes(&list[0]),
        ["nobody joined", "reached: someone is in the bridge"]
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        twilio.calls().len(),
        4,
        "no further rounds once someone joined"
    );
    let rounds: Vec<i64> = list[0]["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["round"].as_i64().unwrap())
        .collect();
    assert_eq!(rounds, [1, 1, 2, 2]);
    daemon.wait_for_log(
        "someone is in the bridge: no further rounds",
        Duration::from_secs(1),
    );
}

#[test]
fn after_the_last_round_the_incident_is_unanswered() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = ROUNDS.replace("rounds = 3", "rounds = 2");
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), &rules), false);
    assert_eq!(
        daemon
            .smtp()
            .send(
                "m@example.com",
                &["a@example.com"],
                &mail("db1 is DOWN", "x")
            )
            .0,
        250
    );
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l[0]["status"] == "unanswered"
    });
    assert_eq!(outcomes(&list[0]), ["nobody joined", "nobody joined"]);
    assert_eq!(twilio.calls().len(), 4);
    daemon.wait_for_log("NOBODY JOINED THE BRIDGE", Duration::from_secs(1));
}

#[test]
fn a_voicemail_gets_a_message_and_does_not_count_as_reached() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    // Bob's voicemail picks up and (as voicemail does) lands in the conference.
    twilio.answer(
        "+15005550002",
        Answer {
            answered_by: "machine_start",
            joins: true,
        },
    );
    let daemon = Daemon::start(
        dir.path(),
        &config(Some(&twilio), &ROUNDS.replace("rounds = 3", "rounds = 2")),
        false,
    );
    assert_eq!(
        daemon
            .smtp()
            .send(
                "m@example.com",
                &["a@example.com"],
                &mail("db1 is DOWN", "x")
            )
            .0,
        250
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let bob = calls
        .iter()
        .find(|c| c.to == "+15005550002")
        .unwrap()
        .sid
        .clone()
        .unwrap();
    // The call is redirected to a voicemail message and hung up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !twilio.updates().iter().any(|u| u.sid == bob) {
        assert!(
            std::time::Instant::now() < deadline,
            "no voicemail update for {bob}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let update = twilio.updates().into_iter().find(|u| u.sid == bob).unwrap();
    assert!(
        update
            .twiml
            .contains(">This is mailcall. Alert. db1 is DOWN</Say><Hangup/>"),
        "{}",
        update.twiml
    );
    // A machine in the bridge is not a person: the next round still comes.
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l[0]["status"] == "unanswered"
    });
    let bob_row = list[0]["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["number"] == "+15005550002")
        .unwrap();
    assert_eq!(bob_row["answered_by"], "machine_start");
    daemon.wait_for_log("voicemail answered: left a message", Duration::from_secs(1));
}

const RESOLVING: &str = "[defaults]\nround_interval = \"1500ms\"\nrounds = 3\n\
    [[rule]]\nname = \"recovery\"\nsubject = '(?P<host>\\S+) is UP'\nresolve = true\ndedup_key = \"{host}\"\n\
    [[rule]]\nname = \"down\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\", \"bob\"]\ndedup_key = \"{host}\"\n";

#[test]
fn a_resolve_mail_stops_the_rounds() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), RESOLVING), false);
    let mut smtp = daemon.smtp();
    assert_eq!(
        smtp.send(
            "m@example.com",
            &["a@example.com"],
            &mail("db1 is DOWN", "x")
        )
        .0,
        250
    );
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    assert_eq!(
        smtp.send("m@example.com", &["a@example.com"], &mail("db1 is UP", "x"))
            .0,
        250
    );
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l[0]["status"] == "resolved"
    });
    assert_eq!(outcomes(&list[0]), ["resolved"]);
    assert_eq!(list[0]["alert_count"], 1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(twilio.calls().len(), 2, "no rounds after the resolution");
    daemon.wait_for_log(
        "incident resolved: no further rounds",
        Duration::from_secs(1),
    );
    // A recovery for something that is not open resolves nothing.
    assert_eq!(
        smtp.send(
            "m@example.com",
            &["a@example.com"],
            &mail("web9 is UP", "x")
        )
        .0,
        250
    );
    daemon.wait_for_log(
        "resolve: no open incident with this dedup key",
        Duration::from_secs(5),
    );
}

#[test]
fn a_resolution_is_announced_to_whoever_is_in_the_bridge() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    twilio.answer(
        "+15005550001",
        Answer {
            answered_by: "human",
            joins: true,
        },
    );
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), RESOLVING), false);
    let mut smtp = daemon.smtp();
    assert_eq!(
        smtp.send(
            "m@example.com",
            &["a@example.com"],
            &mail("db1 is DOWN", "x")
        )
        .0,
        250
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let alice = calls.iter().find(|c| c.to == "+15005550001").unwrap();
    let bob = calls
        .iter()
        .find(|c| c.to == "+15005550002")
        .unwrap()
        .sid
        .clone()
        .unwrap();
    assert_eq!(
        smtp.send("m@example.com", &["a@example.com"], &mail("db1 is UP", "x"))
            .0,
        250
    );
    daemon.wait_for_log(
        "resolution announced in the bridge",
        Duration::from_secs(10),
    );
    let updates = twilio.updates();
    let to_alice: Vec<_> = updates
        .iter()
        .filter(|u| Some(&u.sid) == alice.sid.as_ref())
        .collect();
    assert_eq!(to_alice.len(), 1, "{updates:?}");
    let twiml = &to_alice[0].twiml;
    assert!(
        twiml.contains("loop=\"1\">Resolved. db1 is UP</Say>"),
        "{twiml}"
    );
    assert!(
        twiml.contains(&format!(">{}</Conference>", alice.room())),
        "back into the same room: {twiml}"
    );
    assert!(
        !updates.iter().any(|u| u.sid == bob),
        "bob never joined: {updates:?}"
    );
}
