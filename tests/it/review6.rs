//! Sixth review of issue 12 ("ring each number exactly once per round, whatever
//! fails"), of commit 76984f9 (a claim or an error answer finds an earlier placed
//! request; a late status callback places a given-up request; the reconciler lists the
//! numbers whose calls wait to be sent again; the last round waits for a placed call
//! with no status yet): each test drives the real daemon over sockets against the fake
//! Twilio and fails on the code as it stands, for a defect named in its doc comment.

use std::time::{Duration, Instant};

use crate::fake_twilio::{FakeTwilio, Reply};
use crate::harness::{Daemon, calls, config, workdir};

/// Nine numbers of one incident whose calls wait to be sent again (Twilio overloaded),
/// and one number of a new incident, sorting after them, whose request was lost.
const STORM: [&str; 9] = [
    "+15005550101",
    "+15005550102",
    "+15005550103",
    "+15005550104",
    "+15005550105",
    "+15005550106",
    "+15005550107",
    "+15005550108",
    "+15005550109",
];
const VICTIM: &str = "+15005550999";

/// A lost request of a new incident is never reconciled — so its number is never
/// called — while eight or more numbers wait to be sent again after `absent` and
/// Twilio's call list is slow.
///
/// Measured (`request_timeout = "5s"`, `reconcile_grace = "1s"`): nine numbers of one
/// incident each have a first request that Twilio answers after the timeout
/// (`unknown`); the call list (lagging an hour) shows nothing, so each is settled
/// `absent` and sent again, and the resends meet `503` with `Retry-After: 120`: nine
/// calls `retrying`, each with an `absent` request, which `Store::resends_waiting`
/// lists. Then Twilio's call list hangs (as it may in the overload that sends the
/// 503s) and a second incident's request to +15005550999 is lost (the connection dies
/// without an answer, no call made): it is `unknown`, to be settled by the call list
/// or — the list unreadable — sent again after twice the grace ("ringing twice beats
/// missing"). It never is: in `reconcile_pass` (src/dispatch/reconcile.rs) the nine
/// waiting numbers and the unknown one share the `MAX_CONCURRENT` (8) slots, visited in
/// `BTreeMap` order; a listing of a waiting number takes the 5 s request timeout, by
/// which time `WAITING_LIST_EVERY` (4 s) has passed, so the waiting numbers sorting
/// first take every freed slot again and the unknown request's number is never listed
/// (at most once, before the waiting numbers' listings line up). 18 s on the request is
/// still `unknown` and +15005550999 was never called — for as long as the storm lasts:
/// the precautionary re-listing of calls that can only be saved a second ring starves
/// the reconciliation that decides whether someone is called at all (before 76984f9,
/// only numbers with `unknown` requests were listed). Fix: start numbers with
/// `unknown` requests first (or reserve slots for them) and let waiting numbers use only
/// what is left.
#[test]
fn a_lost_request_is_reconciled_while_many_resends_wait_and_the_list_is_slow() {
    let twilio = FakeTwilio::start();
    for number in STORM {
        twilio.script(
            number,
            vec![
                Reply::CreatedLate(Duration::from_millis(5500)),
                Reply::unavailable(120),
            ],
        );
    }
    twilio.script(VICTIM, vec![Reply::LostThenDrop]);
    twilio.set_list_lag(Duration::from_secs(3600));
    let dir = workdir();
    let storm: Vec<String> = STORM.iter().map(|n| format!("\"{n}\"")).collect();
    let rules = format!(
        "[defaults]\nround_interval = \"1h\"\n\
         [[rule]]\nname = \"storm\"\nsubject = \"storm\"\ncall = [{}]\n\
         [[rule]]\nname = \"page\"\ncall = [\"{VICTIM}\"]\n",
        storm.join(", ")
    );
    let cfg = config(Some(&twilio), &rules)
        .replace("request_timeout = \"2s\"", "request_timeout = \"5s\"")
        .replace("reconcile_grace = \"2s\"", "reconcile_grace = \"1s\"");
    let daemon = Daemon::start(dir.path(), &cfg, false);
    daemon.smtp().alert("storm is DOWN");
    // Every storm number: first request (answered late), then the resend (503).
    twilio.wait_until(Duration::from_secs(25), |c| {
        STORM
            .iter()
            .all(|n| c.iter().filter(|c| c.to == *n).count() >= 2)
    });
    twilio.set_list_hangs(true);
    // The waiting numbers' listings now take the list timeout, back to back.
    std::thread::sleep(Duration::from_secs(3));
    daemon.smtp().alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| {
        c.iter().any(|c| c.to == VICTIM)
    });
    let deadline = Instant::now() + Duration::from_secs(18);
    while Instant::now() < deadline
        && !twilio
            .created()
            .iter()
            .any(|c| c.to == VICTIM && c.sid.is_some())
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let list = crate::harness::incidents(dir.path());
    let victim = list
        .iter()
        .find(|i| calls(i).iter().any(|c| c["number"] == VICTIM))
        .expect("the second incident");
    let rang = twilio
        .created()
        .iter()
        .filter(|c| c.to == VICTIM && c.sid.is_some())
        .count();
    assert_eq!(
        rang, 1,
        "{VICTIM} was never called, 18 s after its request was lost: {victim:#}"
    );
}

const ALICE: &str = "+15005550001";
const PUBLIC: &str = "https://alerts.example.com";

/// A call given up as "it may have rung" stays `failed`, with no SMS, when Twilio's
/// status callback then says that it did ring.
///
/// Measured: `public_url` set, `sms = true`, Twilio's call list hanging, status
/// callbacks delivered 17 s after a call is created. Alice's first request creates her
/// call but is answered after the 2 s `request_timeout`: `unknown`. The list cannot be
/// read, so after twice the grace it is settled `undecided` and sent again; that
/// request's connection dies with no call made (`unknown` again), and after twice the
/// grace it too is `undecided` — the last allowed — so the call is `failed`: "Twilio
/// never confirmed 2 requests for this call …; it may have rung, and is not sent
/// again". Then the first call's `initiated` callback arrives with `attempt=1` and its
/// SID: Twilio's own word that alice's phone is ringing, for the one call made.
/// `place_given_up` (src/store/calls.rs) records the request `placed` with the SID but
/// places the call only when it is `queued`/`retrying`; a `failed` call is left
/// `failed`, without its SID (so later callbacks and AMD answers for it find no call),
/// its SMS summary never owed, the call not counted placed (`mailcall_calls_placed`),
/// and the call's history says "the call was sent again too". `incidents` thus says
/// alice's call failed while it rang, and she never gets the text every called number
/// is promised ("also text every called number once its call is placed"). Fix: in
/// `place_given_up`, also place a call that was given up `failed` by reconciliation
/// (its error says "may have rung") when a given-up request's call shows up, with its
/// SID and its SMS owed, and count it.
#[test]
fn a_call_given_up_as_maybe_rung_is_placed_when_its_late_callback_says_it_rang() {
    let twilio = FakeTwilio::start();
    twilio.script(
        ALICE,
        vec![
            Reply::CreatedLate(Duration::from_millis(2500)),
            Reply::LostThenDrop,
        ],
    );
    twilio.set_list_hangs(true);
    twilio.set_callback_delay(Duration::from_secs(17));
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"1h\"\nsms = true\n\
                 [[rule]]\nname = \"page\"\ncall = [\"alice\"]\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = config(Some(&twilio), rules)
        .replace(
            "ring_seconds = 25\n",
            &format!("ring_seconds = 25\npublic_url = \"{PUBLIC}\"\n"),
        )
        .replace("reconcile_grace = \"2s\"", "reconcile_grace = \"1s\"");
    let daemon = Daemon::start(dir.path(), &cfg, false);
    twilio.deliver_callbacks(PUBLIC, daemon.http.unwrap());
    daemon.smtp().alert("db1 is DOWN");
    // Both requests given up: the call is failed, before the first call's callback.
    let list = crate::harness::wait_incidents(dir.path(), Duration::from_secs(16), |l| {
        l.first().is_some_and(|i| calls(i)[0]["status"] == "failed")
    });
    let callback = Instant::now() + Duration::from_secs(4);
    assert!(
        twilio
            .calls()
            .first()
            .is_some_and(|c| c.at + Duration::from_secs(17) > callback),
        "the setup: both requests given up well before the callback: {:#}",
        list[0]
    );
    // The callback (at 17 s) says the first request did make alice's call.
    let list = crate::harness::wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        calls(&l[0])[0]["requests"][0]["state"] == "placed"
    });
    let rung: Vec<String> = twilio
        .created()
        .iter()
        .filter(|c| c.to == ALICE)
        .filter_map(|c| c.sid.clone())
        .collect();
    assert_eq!(rung.len(), 1, "one call made: {:#}", list[0]);
    std::thread::sleep(Duration::from_secs(2));
    let list = crate::harness::incidents(dir.path());
    let call = &calls(&list[0])[0];
    let texted = twilio.messages().iter().filter(|m| m.to == ALICE).count();
    assert!(
        call["status"] == "placed" && call["sid"].as_str() == Some(rung[0].as_str()) && texted == 1,
        "Twilio says alice's call {} rang; the call is {} (sid {}), {texted} SMS: {:#}",
        rung[0],
        call["status"],
        call["sid"],
        list[0]
    );
}
