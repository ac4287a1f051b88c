//! Third review of issue 15 (on-call policy): each test here failed on the code as
//! reviewed, because of a defect in rotations, time conditions or escalation, measured
//! over the real executable (the CLI, or the daemon with SMTP and the fake Twilio).

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::fake_twilio::{Answer, FakeTwilio};
use crate::harness::{Daemon, command, config, workdir};

const ALICE: &str = "+15005550001";
const BOB: &str = "+15005550002";

/// `mailcall ARGS` on the test's config, killed if it runs longer than `limit`;
/// `None` when it had to be killed.
fn mailcall_within(dir: &Path, args: &[&str], limit: Duration) -> Option<Output> {
    let mut child = command(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mailcall(dir: &Path, args: &[&str]) -> Output {
    mailcall_within(dir, args, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("`mailcall {}` ran for over 20 s", args.join(" ")))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `mailcall oncall` for a rotation of one person never finishes: `Rotation::schedule`
/// (src/oncall/rotation.rs) collects `NEXT_HANDOFFS + 1` stretches but merges every
/// shift of the same person into the last one, so with one member the count never
/// grows and it walks shift by shift to the end of jiff's calendar (year 9999). With
/// `shift = "1d"` the command took 8.7 s and printed `solo: alice until
/// 9999-12-30T10:00:00+09:00`; with `shift = "1h"` (measured here) it was still
/// spinning a core after 20 s and printed nothing. A one-person rotation is what a
/// team of one, or a rotation being set up, looks like; `oncall` is the command people
/// run to ask who is on call.
#[test]
fn oncall_answers_at_once_for_a_rotation_of_one() {
    let dir = workdir();
    let rules = "[[rotation]]\nname = \"solo\"\nmembers = [\"alice\"]\nshift = \"1h\"\n\
        start = \"2026-01-05T10:00:00+09:00\"\n";
    std::fs::write(dir.path().join("rules.toml"), config(None, rules)).unwrap();
    let started = Instant::now();
    let out = mailcall_within(
        dir.path(),
        &["oncall", "--at", "2026-11-23T10:30:00+09:00"],
        Duration::from_secs(15),
    );
    let out = out.unwrap_or_else(|| {
        panic!(
            "`mailcall oncall` did not finish within 15 s (killed after {:?})",
            started.elapsed()
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("solo: alice until "),
        "{}",
        text(&out)
    );
}

/// A daily rotation whose `start` is the day before a daylight-saving change rings
/// nobody once it is about four years old. `Rotation::shift_at` estimates the shift
/// number as elapsed seconds / the *first* shift's length (`shift.total` relative to
/// `start`), which for `start = "2021-03-13T09:00:00"` in America/New_York is 23 h,
/// not 24 h; the estimate drifts by one shift every 23 days, and once it is more than
/// `MAX_STEPS` (64) shifts off (after ~1,500 days) `shift_at` gives up and returns
/// `None`. Then `Config::resolve` skips the rotation: measured, `mailcall check` says
/// ok, `mailcall oncall` prints nothing at all, `route` shows `numbers:` empty, and the
/// daemon opened an incident for the alert below "calling everyone at once" with
/// `numbers=[]` — nobody was rung. Fix: estimate with days counted as 24 h
/// (`SpanRelativeTo::days_are_24_hours()`), or search for the shift instead of stepping
/// a bounded number of times.
#[test]
fn a_daily_rotation_started_before_a_dst_change_still_rings_years_later() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[defaults]\nround_interval = \"1h\"\nrounds = 1\n\
        [[rotation]]\nname = \"us\"\nmembers = [\"alice\", \"bob\"]\nshift = \"1d\"\n\
        start = \"2021-03-13T09:00:00\"\ntimezone = \"America/New_York\"\n\
        [[rule]]\nname = \"page\"\nsubject = 'DOWN'\ncall = [\"us\"]\n";
    std::fs::write(dir.path().join("rules.toml"), config(Some(&twilio), rules)).unwrap();

    // The daemon, at today's date, rings whoever's day it is.
    let daemon = Daemon::start_existing(dir.path(), false);
    daemon.smtp().alert("db1 is DOWN");
    let rang = (0..250).find_map(|_| {
        let calls = twilio.calls();
        if calls.is_empty() {
            std::thread::sleep(Duration::from_millis(40));
            None
        } else {
            Some(calls)
        }
    });
    let Some(calls) = rang else {
        panic!(
            "nobody was rung within 10 s; log:\n{}",
            daemon
                .logs()
                .lines()
                .filter(|l| l.contains("incident"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    };
    assert!(
        calls[0].to == ALICE || calls[0].to == BOB,
        "{}",
        calls[0].to
    );

    // 2026-11-24 is a Tuesday: 2,082 daily shifts after the start, an even number.
    let out = mailcall(dir.path(), &["oncall", "--at", "2026-11-24T10:00:00-05:00"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("us: alice until 2026-11-25T09:00:00-05:00"),
        "{}",
        text(&out)
    );
}

/// `hours = "00:00-24:00"` (the whole day, written out) is refused by `mailcall check`
/// as "the range is empty". `when::parse_hours` maps the end `24:00` to `Time::MIN`
/// (00:00) and then refuses `start == end`, although the README says `24:00` is
/// allowed and the end is excluded: 00:00 up to 24:00 is every minute of the day, not
/// none. Measured: `check` exits 1 with `invalid \`hours\` \`00:00-24:00\`: the range is
/// empty`. Fix: compare before mapping 24:00, or treat (00:00, 24:00) as all day.
#[test]
fn hours_from_00_00_to_24_00_are_the_whole_day() {
    let dir = workdir();
    let rules = "[[rule]]\nname = \"weekend\"\nsubject = 'DOWN'\ncall = [\"alice\"]\n\
        when = { days = [\"sat\", \"sun\"], hours = \"00:00-24:00\", timezone = \"Asia/Tokyo\" }\n\
        [[rule]]\nname = \"weekdays\"\nsubject = 'DOWN'\ncall = [\"bob\"]\n";
    std::fs::write(dir.path().join("rules.toml"), config(None, rules)).unwrap();
    let out = mailcall(dir.path(), &["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let eml = dir.path().join("a.eml");
    std::fs::write(&eml, crate::harness::mail("db1 is DOWN", "x")).unwrap();
    let eml = eml.display().to_string();
    // Saturday 23:59 in Tokyo is inside; Monday noon is not.
    let out = mailcall(
        dir.path(),
        &["route", "--json", "--at", "2026-11-28T23:59:00+09:00", &eml],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"rule\":\"weekend\""),
        "{}",
        text(&out)
    );
    let out = mailcall(
        dir.path(),
        &["route", "--json", "--at", "2026-11-30T12:00:00+09:00", &eml],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"rule\":\"weekdays\""),
        "{}",
        text(&out)
    );
}

/// An escalation step rings someone a second time while their first call is still on
/// the line. The rule calls alice; she picks up but is not (yet) in the bridge (AMD
/// says `unknown`, the call stays in progress), so round 2 (4–8 s) records her as
/// skipped: "its call from round 1 is still in progress". The step at 6 s escalates
/// to the team (`oncall` = alice and bob). `escalate` in src/store/oncall.rs leaves out
/// only numbers with a non-skipped call in *this* round, so alice's skipped row does
/// not count, and a second call to her was requested while the first was still in
/// progress — what `finish_round` refuses to do, and what ARCHITECTURE.md's "same
/// per-number rules" for escalation promises against (measured: the fake Twilio got
/// alice, then alice again at 6 s, then bob). With the README's own example
/// (`round_interval` 3m, a step after 5m) every step lands in round 2 or later, so
/// anyone the step names whose earlier call is still up (or still being retried) gets
/// a second one. Fix: apply `finish_round`'s "last call still live or being placed →
/// skipped" rule to escalation numbers.
#[test]
fn an_escalation_does_not_ring_a_number_whose_call_is_still_on_the_line() {
    let twilio = FakeTwilio::start();
    twilio.answer(
        ALICE,
        Answer {
            answered_by: "unknown",
            joins: false,
        },
    );
    let dir = workdir();
    let rules = "[[rule]]\nname = \"page\"\nsubject = 'DOWN'\ncall = [\"alice\"]\n\
        round_interval = \"4s\"\nrounds = 3\n\
        escalate = [{ after = \"6s\", call = [\"oncall\"] }]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    daemon.smtp().alert("db1 is DOWN");
    // Bob is rung by the step, two seconds into round 2.
    twilio.wait_until(Duration::from_secs(20), |c| c.iter().any(|c| c.to == BOB));
    // Round 2 did not call alice: her round-1 call is still up.
    let list = daemon.incidents();
    let skipped = list[0]["calls"].as_array().unwrap().iter().any(|c| {
        c["number"] == ALICE
            && c["round"] == 2
            && c["status"] == "skipped"
            && c["error"]
                .as_str()
                .is_some_and(|e| e.contains("still in progress"))
    });
    assert!(skipped, "{list:#?}");
    let again = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(40));
        twilio.calls().iter().filter(|c| c.to == ALICE).count() > 1
    });
    let to_alice: Vec<(String, Option<String>)> =
        twilio.calls().into_iter().map(|c| (c.to, c.sid)).collect();
    assert!(
        !again,
        "alice's first call never ended, yet the escalation called her again: {to_alice:?}"
    );
}

/// A rotation `start` in UTC written the usual RFC 3339 way, with `Z`, is refused:
/// `mailcall check` exits 1 with `invalid \`start\`: cannot parse civil date/time from
/// string with a Zulu offset, parse as a \`jiff::Timestamp\` first and convert to a civil
/// date/time instead` — jiff's advice to the programmer, shown to the user. The README
/// says `start` is RFC 3339, and `--at`/`--until` on the command line take the same
/// text. `parse_start` (src/oncall/rotation.rs) parses it as a timestamp, then parses it
/// again as a civil date-time to recover the offset, which jiff refuses for `Z`. Fix:
/// treat `Z` as a fixed offset of zero (or take the offset from jiff's RFC 3339 parser).
#[test]
fn a_rotation_start_in_utc_with_z_is_rfc_3339() {
    let dir = workdir();
    let rules = "[[rotation]]\nname = \"utc\"\nmembers = [\"alice\", \"bob\"]\nshift = \"1w\"\n\
        start = \"2026-01-05T01:00:00Z\"\n";
    std::fs::write(dir.path().join("rules.toml"), config(None, rules)).unwrap();
    let out = mailcall(dir.path(), &["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = mailcall(dir.path(), &["oncall", "--at", "2026-01-12T01:00:00Z"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("utc: bob until 2026-01-19T01:00:00"),
        "{}",
        text(&out)
    );
}
