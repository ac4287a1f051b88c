//! The bridge reaches a human: rounds of calls until someone is in the conference, and
//! voicemail handled by polling Twilio (no public URL).

use std::time::Duration;

use crate::fake_twilio::{Answer, FakeTwilio};
use crate::harness::{Daemon, config, wait_incidents, workdir};

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
    daemon.smtp().alert("db1 is DOWN");
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
        l.first().is_some_and(|i| i["status"] == "bridged")
    });
    assert_eq!(outcomes(&list[0]), ["nobody joined", "bridged"]);
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
    daemon.smtp().alert("db1 is DOWN");
    let list = wait_incidents(dir.path(), Duration::from_secs(15), |l| {
        l.first().is_some_and(|i| i["status"] == "unanswered")
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
    daemon.smtp().alert("db1 is DOWN");
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
        l.first().is_some_and(|i| i["status"] == "unanswered")
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
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    smtp.alert("db1 is UP");
    let list = wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.first().is_some_and(|i| i["status"] == "resolved")
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
    smtp.alert("web9 is UP");
    daemon.wait_for_log(
        "resolve: no open incident with this dedup key",
        Duration::from_secs(5),
    );
}

/// The bridge hears the resolution in the incident's voice, whatever the recovery rule's
/// (as with a public URL): a Japanese bridge is not spoken to by an English voice.
#[test]
fn a_resolution_is_announced_in_the_incidents_voice() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    twilio.answer(
        "+15005550001",
        Answer {
            answered_by: "human",
            joins: true,
        },
    );
    let rules = "[[rule]]\nname = \"recovery\"\nsubject = '(?P<host>\\S+) 復旧'\nresolve = true\ndedup_key = \"{host}\"\n\
                 [[rule]]\nname = \"down\"\nsubject = '(?P<host>\\S+) 停止'\ncall = [\"alice\"]\ndedup_key = \"{host}\"\n\
                 language = \"ja-JP\"\nvoice = \"Polly.Mizuki\"\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    smtp.alert("db1 停止");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    let alice = calls[0].sid.clone().unwrap();
    smtp.alert("db1 復旧");
    daemon.wait_for_log(
        "resolution announced in the bridge",
        Duration::from_secs(10),
    );
    let updates = twilio.updates();
    let update = updates.iter().find(|u| u.sid == alice).expect("announced");
    assert!(
        update
            .twiml
            .contains("language=\"ja-JP\" voice=\"Polly.Mizuki\""),
        "{}",
        update.twiml
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
    smtp.alert("db1 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let alice = calls.iter().find(|c| c.to == "+15005550001").unwrap();
    let bob = calls
        .iter()
        .find(|c| c.to == "+15005550002")
        .unwrap()
        .sid
        .clone()
        .unwrap();
    smtp.alert("db1 is UP");
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

const PUBLIC: &str = "https://alerts.example.com";

/// A daemon with a public URL (callbacks on its HTTP server) and a dial-in PIN.
fn public_daemon(twilio: &FakeTwilio) -> (Daemon, tempfile::TempDir) {
    let dir = workdir();
    let cfg = config(
        Some(twilio),
        &format!("[http]\nlisten = \"127.0.0.1:0\"\n[bridge]\npin = \"4321\"\n{ROUNDS}"),
    )
    .replace(
        "ring_seconds = 25\n",
        &format!("ring_seconds = 25\npublic_url = \"{PUBLIC}\"\n"),
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    (daemon, dir)
}

/// POSTs a Twilio callback to the daemon, signed (or not) as Twilio signs it.
fn callback(
    daemon: &Daemon,
    path_and_query: &str,
    params: &[(&str, &str)],
    signed: bool,
) -> (u16, String) {
    let pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let signature = if signed {
        mailcall::twilio::signature::sign(
            crate::fake_twilio::AUTH_TOKEN,
            &format!("{PUBLIC}{path_and_query}"),
            &pairs,
        )
    } else {
        "bm90IGEgc2lnbmF0dXJl".to_string()
    };
    let url = format!("http://{}{path_and_query}", daemon.http.unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(url)
            .header("X-Twilio-Signature", signature)
            .form(&pairs)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    })
}

/// The `action` of the first `<Gather>` in a TwiML document, as a path and query.
fn gather_action(twiml: &str) -> String {
    let start = twiml.find("action=\"").unwrap() + 8;
    let url = &twiml[start..start + twiml[start..].find('"').unwrap()];
    url.replace("&amp;", "&")
        .strip_prefix(PUBLIC)
        .unwrap()
        .to_string()
}

#[test]
fn press_1_joins_press_9_declines_and_forged_callbacks_are_refused() {
    let twilio = FakeTwilio::start();
    let (daemon, dir) = public_daemon(&twilio);
    daemon.smtp().alert("db1 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let (alice, bob) = (
        calls.iter().find(|c| c.to == "+15005550001").unwrap(),
        calls.iter().find(|c| c.to == "+15005550002").unwrap(),
    );
    assert_eq!(
        alice.twiml.matches("<Gather numDigits=\"1\"").count(),
        2,
        "{}",
        alice.twiml
    );
    assert!(alice.twiml.contains("Press 1 to join the incident bridge"));
    let action = gather_action(&alice.twiml);
    let room = action.rsplit('=').next().unwrap().to_string();

    // A forged or unsigned press-1 changes nothing.
    let (status, _) = callback(
        &daemon,
        &action,
        &[("CallSid", alice.sid.as_deref().unwrap()), ("Digits", "1")],
        false,
    );
    assert_eq!(status, 403);

    // Bob presses 9: declined, and not called in the next round.
    let (status, twiml) = callback(
        &daemon,
        &action,
        &[("CallSid", bob.sid.as_deref().unwrap()), ("Digits", "9")],
        true,
    );
    assert_eq!(status, 200);
    assert!(
        twiml.contains("Declined.") && twiml.contains("<Hangup/>"),
        "{twiml}"
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 3);
    assert_eq!(
        calls[2].to, "+15005550001",
        "round 2 calls only those who did not decline"
    );

    // Alice presses 1: into the bridge, with joins reported back.
    let alice2 = calls[2].sid.clone().unwrap();
    let (status, twiml) = callback(
        &daemon,
        &action,
        &[("CallSid", &alice2), ("Digits", "1")],
        true,
    );
    assert_eq!(status, 200);
    assert!(
        twiml.contains(&format!(
            "statusCallback=\"{PUBLIC}/twilio/conference?room={room}\""
        )),
        "{twiml}"
    );
    assert!(
        twiml.contains(&format!(">mailcall-{room}</Conference>")),
        "{twiml}"
    );

    // Twilio reports her joining: the incident is reached and everyone hears who joined.
    let join = format!("/twilio/conference?room={room}");
    let params = [
        ("CallSid", alice2.as_str()),
        ("ConferenceSid", "CF0001"),
        ("StatusCallbackEvent", "participant-join"),
    ];
    assert_eq!(callback(&daemon, &join, &params, false).0, 403);
    assert_eq!(callback(&daemon, &join, &params, true).0, 200);
    let list = wait_incidents(dir.path(), Duration::from_secs(5), |l| {
        l.first().is_some_and(|i| i["status"] == "bridged")
    });
    let history: Vec<String> = list[0]["calls"][1]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["event"].as_str().unwrap().to_string())
        .collect();
    assert!(history.contains(&"declined".to_string()), "{history:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while twilio.announcements().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no announcement");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (conference, url) = twilio.announcements()[0].clone();
    assert_eq!(conference, "CF0001");
    let announce_path = url.strip_prefix(PUBLIC).unwrap();
    let (status, twiml) = callback(&daemon, announce_path, &[], true);
    assert_eq!(status, 200);
    assert!(twiml.contains(">alice joined.</Say>"), "{twiml}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        twilio.calls().len(),
        3,
        "no further rounds after someone joined"
    );
}

#[test]
fn dial_in_from_a_contact_joins_the_newest_incident_and_strangers_need_the_pin() {
    let twilio = FakeTwilio::start();
    let (daemon, _dir) = public_daemon(&twilio);
    let (_, twiml) = callback(
        &daemon,
        "/twilio/voice",
        &[("From", "+15005550003"), ("CallSid", "CAin1")],
        true,
    );
    assert!(twiml.contains("There is no open incident."), "{twiml}");
    daemon.smtp().alert("db1 is DOWN");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let room = gather_action(&calls[0].twiml)
        .rsplit('=')
        .next()
        .unwrap()
        .to_string();

    // Carol is a contact: straight into the bridge.
    let (status, twiml) = callback(
        &daemon,
        "/twilio/voice",
        &[("From", "+15005550003"), ("CallSid", "CAin2")],
        true,
    );
    assert_eq!(status, 200);
    assert!(
        twiml.contains(&format!(">mailcall-{room}</Conference>")),
        "{twiml}"
    );
    // A stranger is asked for the PIN; the wrong one is refused, the right one joins.
    let (_, twiml) = callback(
        &daemon,
        "/twilio/voice",
        &[("From", "+15559876543"), ("CallSid", "CAin3")],
        true,
    );
    assert!(
        twiml.contains("<Gather numDigits=\"4\"")
            && twiml.contains(&format!("action=\"{PUBLIC}/twilio/pin\"")),
        "{twiml}"
    );
    let (_, twiml) = callback(
        &daemon,
        "/twilio/pin",
        &[("From", "+15559876543"), ("Digits", "1111")],
        true,
    );
    assert!(
        twiml.contains("Wrong PIN") && !twiml.contains("<Conference"),
        "{twiml}"
    );
    let (_, twiml) = callback(
        &daemon,
        "/twilio/pin",
        &[("From", "+15559876543"), ("Digits", "4321")],
        true,
    );
    assert!(
        twiml.contains(&format!(">mailcall-{room}</Conference>")),
        "{twiml}"
    );
    // A forged dial-in is refused outright.
    assert_eq!(
        callback(&daemon, "/twilio/voice", &[("From", "+15005550003")], false).0,
        403
    );
}

#[test]
fn with_a_public_url_the_resolution_is_a_conference_announcement() {
    let twilio = FakeTwilio::start();
    twilio.answer(
        "+15005550001",
        Answer {
            answered_by: "human",
            joins: true,
        },
    );
    let dir = workdir();
    let cfg = config(
        Some(&twilio),
        &format!("[http]\nlisten = \"127.0.0.1:0\"\n{RESOLVING}"),
    )
    .replace(
        "ring_seconds = 25\n",
        &format!("ring_seconds = 25\npublic_url = \"{PUBLIC}\"\n"),
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let mut smtp = daemon.smtp();
    smtp.alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    smtp.alert("db1 is UP");
    daemon.wait_for_log(
        "resolution announced in the bridge",
        Duration::from_secs(10),
    );
    let (_, url) = twilio.announcements()[0].clone();
    let (status, twiml) = callback(&daemon, url.strip_prefix(PUBLIC).unwrap(), &[], true);
    assert_eq!(status, 200);
    assert!(twiml.contains(">Resolved. db1 is UP</Say>"), "{twiml}");
    assert!(
        twilio.updates().is_empty(),
        "no call redirects with a public URL"
    );
}
