//! Issue 13, defect 1: the store only grew, then refused everything. Retention deletes
//! closed incidents after `[state] retain`; under `max_bytes` the oldest closed data goes
//! first and mail is refused (452 4.3.1) only while open data alone fills the store, with
//! `/healthz` and a metric saying so; an accepted alert is never stranded.

use std::time::Duration;

use crate::fake_twilio::FakeTwilio;
use crate::harness::{Daemon, config, http_get, incidents, mail, scrape, wait_incidents, workdir};

const HTTP: &str = "[http]\nlisten = \"127.0.0.1:0\"\n";

#[test]
fn retention_deletes_closed_incidents_after_retain() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = format!(
        "{HTTP}[state]\nretain = \"2s\"\n[defaults]\nround_interval = \"500ms\"\nrounds = 1\n\
         [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n"
    );
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), &rules), false);
    daemon.smtp().alert("db1 is DOWN");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    // Unanswered after its one round, then deleted 2 s later with its alert and calls.
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.first().is_some_and(|i| i["status"] == "unanswered")
    });
    wait_incidents(dir.path(), Duration::from_secs(15), <[_]>::is_empty);
    let db = rusqlite::Connection::open(dir.path().join("mailcall.db")).unwrap();
    for table in ["alerts", "calls", "attempts", "rounds"] {
        let n: i64 = db
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "{table} still holds rows");
    }
    daemon.wait_for_log(
        "retention: deleted closed incidents",
        Duration::from_secs(1),
    );
    let m = scrape(&format!("http://{}/metrics", daemon.http.unwrap()));
    assert_eq!(m["mailcall_pruned_total{what=\"incidents\"}"], 1.0);
}

#[test]
fn a_store_filled_to_max_bytes_prunes_closed_data_and_refuses_only_for_open_data() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = format!(
        "{HTTP}[state]\nmax_bytes = 1048576\n[limits]\nmax_calls_per_hour = 1000\n\
         [defaults]\nround_interval = \"1h\"\nrounds = 1\ncooldown = \"1h\"\n\
         [[rule]]\nname = \"up\"\nsubject = '(?P<host>\\S+) is UP'\nresolve = true\ndedup_key = \"{{host}}\"\n\
         [[rule]]\nname = \"down\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\"]\ndedup_key = \"{{host}}\"\n"
    );
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), &rules), false);
    let body = "y".repeat(150_000);
    let mut smtp = daemon.smtp();
    let send = |smtp: &mut crate::harness::SmtpClient, subject: &str| {
        smtp.send("m@example.com", &["a@example.com"], &mail(subject, &body))
    };
    // Three times the cap in problems that are resolved: every one is accepted and
    // rings (the oldest closed incidents make room).
    for i in 0..10 {
        let (code, text) = send(&mut smtp, &format!("db{i} is DOWN"));
        assert_eq!(code, 250, "db{i}: {text}");
        twilio.wait_until(Duration::from_secs(10), |c| c.len() == i + 1);
        smtp.alert(&format!("db{i} is UP"));
    }
    assert!(
        incidents(dir.path()).len() < 10,
        "closed incidents were pruned"
    );
    // Open problems fill it: the first that does not fit is deferred, not lost.
    let (mut deferred, mut accepted) = (None, 0);
    for i in 0..20 {
        let (code, text) = send(&mut smtp, &format!("web{i} is DOWN"));
        if code != 250 {
            deferred = Some((code, text));
            break;
        }
        accepted += 1;
    }
    let (code, text) = deferred.expect("open incidents must fill the store");
    assert_eq!(code, 452, "{text}");
    assert!(text.starts_with("4.3.1"), "{text}");
    // Every acknowledged alert rang: nothing was stranded at the cap. (The last one
    // acknowledged may still be on its way through the router: wait for it.)
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.iter().filter(|i| i["status"] == "open").count() == accepted
    });
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 10 + accepted);
    let (status, health) = http_get(&format!("http://{}/healthz", daemon.http.unwrap()));
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("\"store_full\":true"), "{health}");
    let m = scrape(&format!("http://{}/metrics", daemon.http.unwrap()));
    assert_eq!(m["mailcall_store_full"], 1.0);
    // Resolutions are small and still fit (big mails leave a reserve for them); once
    // open incidents are closed, their room is free again and big mail is accepted.
    smtp.alert("web0 is UP");
    smtp.alert("web1 is UP");
    // Stored is not yet routed: wait until the router has closed them.
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.iter()
            .filter(|i| {
                i["status"] == "resolved"
                    && ["web0", "web1"].contains(&i["dedup_key"].as_str().unwrap_or_default())
            })
            .count()
            == 2
    });
    let (code, text) = send(&mut smtp, "web99 is DOWN");
    assert_eq!(code, 250, "{text}");
    let (status, _) = http_get(&format!("http://{}/healthz", daemon.http.unwrap()));
    assert_eq!(status, 200);
}
