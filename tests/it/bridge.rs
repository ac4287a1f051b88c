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
