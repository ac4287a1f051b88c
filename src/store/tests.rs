//! The store's own tests: migrations, the `CHECK`s behind the typed states, group
//! commit, routing, and the transitions of calls and attempts.

use std::time::Duration;

use rusqlite::{Connection, params};

use super::schema::MIGRATIONS;
use super::states::checked_columns;
use super::*;
use crate::route::{Action, Decision};

fn decision(key: &str, numbers: &[&str], cooldown: Duration) -> Decision {
    Decision {
        rule: Some("r".into()),
        action: Action::Call,
        numbers: numbers.iter().map(|n| n.to_string()).collect(),
        message: "m".into(),
        language: "en-US".into(),
        voice: "Polly.Joanna".into(),
        dedup_key: key.into(),
        cooldown,
        sms: false,
        subject: "s".into(),
        rounds: 3,
        round_interval: Duration::from_secs(60),
        silenced_by: None,
        escalations: Vec::new(),
        trace: crate::route::Trace::default(),
    }
}

fn incident(id: &str) -> NewIncident {
    NewIncident {
        public_id: id.into(),
        twiml: "<Response/>".into(),
        kind: IncidentKind::Alert,
        dry_run: false,
        received_at: now_ms(),
        press_one: false,
        public_url: None,
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("s.db"), None).unwrap()
}

async fn alert(store: &Store) -> i64 {
    store
        .insert_alert(NewAlert {
            source: "test",
            raw: b"Subject: x\r\n\r\n".to_vec(),
            ..NewAlert::default()
        })
        .await
        .unwrap()
        .id
}

/// Routes one alert with `decision`; returns what the store did.
async fn route(store: &Store, decision: Decision, public_id: &str) -> Routed {
    let id = alert(store).await;
    store
        .record_routings(vec![(id, decision, incident(public_id))], 1000)
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
}

async fn scalar(store: &Store, sql: &'static str) -> i64 {
    store
        .run(move |c| c.query_row(sql, [], |r| r.get(0)))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_version_1_store_is_migrated_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO alerts (received_at, source, rcpt_to, raw) VALUES (1, 'smtp', '[]', x'00')",
            [],
        )
        .unwrap();
    }
    let store = Store::open(&path, None).unwrap();
    assert_eq!(store.pending_alerts(10, usize::MAX).await.unwrap().len(), 1);
    assert_eq!(
        scalar(&store, "PRAGMA user_version").await,
        MIGRATIONS.len() as i64
    );
    assert_eq!(scalar(&store, "SELECT COUNT(*) FROM attempts").await, 0);
}

#[tokio::test]
async fn a_version_6_store_keeps_its_calls_and_a_request_in_flight_becomes_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v6.db");
    {
        let c = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..6] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 6).unwrap();
        c.execute_batch(
            "INSERT INTO incidents (id, public_id, opened_at, rule, dedup_key, message, language, voice, twiml, last_alert_at, status)
                 VALUES (1, 'a', 1, 'r', 'k', 'm', 'en-US', 'alice', '<Response/>', 1, 'reached'),
                        (2, 'b', 1, 'canary', 'canary 1', 'm', 'en-US', 'alice', '<Response/>', 1, 'open');
             INSERT INTO calls (id, incident_id, number, created_at, status, attempts, sid, updated_at)
                 VALUES (1, 1, '+1555', 1, 'placed', 1, 'CA1', 1),
                        (2, 1, '+1666', 1, 'sending', 1, NULL, 5),
                        (3, 2, '+1555', 1, 'dry-run', 1, 'dry-run', 1);
             INSERT INTO call_attempts (call_id, at, outcome, sid) VALUES (1, 1, 'placed', 'CA1'), (1, 2, 'pressed 1', NULL);
             INSERT INTO rounds (incident_id, round, started_at, outcome) VALUES (1, 1, 1, 'reached: someone is in the bridge');",
        )
        .unwrap();
    }
    let store = Store::open(&path, None).unwrap();
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(report.status, IncidentStatus::Bridged);
    assert_eq!(report.rounds[0].outcome, Some(RoundOutcome::Bridged));
    assert_eq!(report.calls[0].status, CallState::Placed);
    assert_eq!(report.calls[0].requests[0].sid.as_deref(), Some("CA1"));
    assert_eq!(report.calls[0].events[0].event, "pressed 1");
    // A request that was in flight under the old version is reconciled, not re-sent.
    assert_eq!(report.calls[1].status, CallState::Unknown);
    assert_eq!(report.calls[1].requests[0].state, AttemptState::Unknown);
    let canary = store.incident(2).await.unwrap().unwrap();
    assert_eq!(
        (canary.kind, canary.status, canary.dry_run),
        (IncidentKind::Canary, IncidentStatus::Resolved, true)
    );
}

#[tokio::test]
async fn every_state_enum_matches_its_sql_check() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    for (table, column, states) in checked_columns() {
        let result = store
            .run(move |c| {
                let sql: String = c.query_row(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [table],
                    |r| r.get(0),
                )?;
                Ok(sql)
            })
            .await
            .unwrap();
        let check = result
            .split(&format!("{column} TEXT"))
            .nth(1)
            .and_then(|rest| rest.split("CHECK").nth(1))
            .and_then(|rest| rest.split(')').next())
            .unwrap_or_else(|| panic!("no CHECK on {table}.{column}: {result}"));
        let mut listed: Vec<&str> = check.split('\'').skip(1).step_by(2).collect();
        let mut expected = states.clone();
        listed.sort_unstable();
        expected.sort_unstable();
        assert_eq!(listed, expected, "{table}.{column}");
    }
    // And the CHECK bites.
    let err = store
        .run(|c| c.execute("UPDATE incidents SET status = 'reached'", []))
        .await;
    assert!(err.is_ok(), "no rows yet, so nothing to refuse");
    route(&store, decision("k", &["+1555"], Duration::ZERO), "p").await;
    let err = store
        .run(|c| c.execute("UPDATE calls SET state = 'sending'", []))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CHECK"), "{err}");
}

#[test]
fn only_one_daemon_may_hold_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let first = DaemonLock::acquire(&path).unwrap();
    let err = DaemonLock::acquire(&path).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(first);
    DaemonLock::acquire(&path).unwrap();
}

#[tokio::test]
async fn a_store_from_a_newer_mailcall_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = Store::open(&path, None).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("new.db"));
}

#[tokio::test]
async fn concurrent_writes_are_committed_together_and_each_gets_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { alert(&store).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    // A failing job rolls back only itself.
    let bad = store.run(|c| c.execute("INSERT INTO nowhere VALUES (1)", []));
    let good = alert(&store);
    let (bad, good) = tokio::join!(bad, good);
    assert!(bad.is_err());
    assert!(good > 0);
    assert_eq!(
        store.pending_alerts(1000, usize::MAX).await.unwrap().len(),
        201
    );
}

#[tokio::test]
async fn a_deleted_or_replaced_store_file_fails_every_write() {
    for replace in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path, None).unwrap();
        alert(&store).await;
        if replace {
            std::fs::copy(&path, dir.path().join("copy.db")).unwrap();
            std::fs::rename(dir.path().join("copy.db"), &path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        let err = store
            .insert_alert(NewAlert {
                source: "test",
                ..NewAlert::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Lost { .. }), "{err}");
        assert!(store.check_writable().await.is_err());
    }
}

#[tokio::test]
async fn the_same_delivery_is_stored_once_and_rejections_are_never_routed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let delivery = |id: &str| NewAlert {
        source: "sendgrid",
        raw: b"Subject: x\r\n\r\n".to_vec(),
        dedup_id: Some(id.into()),
        ..NewAlert::default()
    };
    let first = store.insert_alert(delivery("<a@b>")).await.unwrap();
    let again = store.insert_alert(delivery("<a@b>")).await.unwrap();
    let other = store.insert_alert(delivery("<c@d>")).await.unwrap();
    assert_eq!(
        again,
        Inserted {
            id: first.id,
            duplicate: true
        }
    );
    assert!(!first.duplicate && !other.duplicate && other.id != first.id);
    let rejected = NewAlert {
        rejected: Some("SPF fail".into()),
        ..delivery("<e@f>")
    };
    store.insert_alert(rejected).await.unwrap();
    assert_eq!(store.pending_alerts(10, usize::MAX).await.unwrap().len(), 2);
    store.check_writable().await.unwrap();
}

fn opened(routed: &Routed) -> (i64, Vec<CallState>) {
    match routed {
        Routed::Opened { incident_id, calls } => {
            (*incident_id, calls.iter().map(|c| c.state).collect())
        }
        other => panic!("not opened: {other:?}"),
    }
}

#[tokio::test]
async fn routing_deduplicates_within_the_cooldown_and_enforces_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let hour = Duration::from_secs(3600);
    let mut items = Vec::new();
    for i in 0..3 {
        let id = alert(&store).await;
        items.push((
            id,
            decision("k", &["+1555", "+1666"], hour),
            incident(&format!("p{i}")),
        ));
    }
    let id = alert(&store).await;
    items.push((
        id,
        decision("other", &["+1777", "+1888"], hour),
        incident("q"),
    ));
    let results: Vec<Routed> = store
        .record_routings(items, 3)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let (incident_id, states) = opened(&results[0]);
    assert_eq!(states, [CallState::Queued, CallState::Queued]);
    assert_eq!(
        results[1],
        Routed::Deduplicated {
            incident_id,
            alert_count: 2
        }
    );
    assert_eq!(
        results[2],
        Routed::Deduplicated {
            incident_id,
            alert_count: 3
        }
    );
    let (_, states) = opened(&results[3]);
    assert_eq!(
        states,
        [CallState::Queued, CallState::Refused],
        "one call left in the budget of 3"
    );
    assert!(
        store
            .pending_alerts(10, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    // Cooldown zero: always a new incident.
    opened(&route(&store, decision("k", &[], Duration::ZERO), "z").await);
}

#[tokio::test]
async fn dedup_joins_only_live_incidents() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let hour = Duration::from_secs(3600);
    let (first, _) = opened(&route(&store, decision("k", &["+1555"], hour), "a").await);
    let resolve = Decision {
        action: Action::Resolve,
        ..decision("k", &[], hour)
    };
    assert!(matches!(
        route(&store, resolve.clone(), "r").await,
        Routed::Resolved { ref incidents, canceled: 1 } if incidents[0].0 == first
    ));
    // After the resolution the same key opens a new incident.
    let (second, _) = opened(&route(&store, decision("k", &["+1555"], hour), "b").await);
    assert_ne!(second, first);
    // Bridged is still live: joined.
    assert!(store.mark_bridged(second).await.unwrap());
    assert!(matches!(
        route(&store, decision("k", &["+1555"], hour), "c").await,
        Routed::Deduplicated { incident_id, .. } if incident_id == second
    ));
    // A dry run never joins a real incident.
    let id = alert(&store).await;
    let dry = NewIncident {
        dry_run: true,
        ..incident("d")
    };
    let routed = store
        .record_routings(vec![(id, decision("k", &["+1555"], hour), dry)], 1000)
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(opened(&routed).1, [CallState::DryRun]);
}

#[tokio::test]
async fn an_attempt_is_claimed_before_it_is_sent_and_a_sid_belongs_to_one_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(
        &store,
        decision("k", &["+1555", "+1666"], Duration::ZERO),
        "a",
    )
    .await;
    let jobs = store.due_calls(now_ms(), 10).await.unwrap();
    assert_eq!(jobs.len(), 2);
    let Claim::Go { attempt_id: a } = store.claim(jobs[0].call_id, "+1000", 5000).await.unwrap()
    else {
        panic!()
    };
    // Claimed once: a second claim finds it under way.
    assert_eq!(
        store.claim(jobs[0].call_id, "+1000", 5000).await.unwrap(),
        Claim::Gone(CallState::Requesting)
    );
    let Claim::Go { attempt_id: b } = store.claim(jobs[1].call_id, "+1000", 5000).await.unwrap()
    else {
        panic!()
    };
    let placed = AttemptOutcome::Placed { sid: "CA1".into() };
    assert_eq!(
        store.record_attempt(a, placed.clone()).await.unwrap().state,
        AttemptState::Placed
    );
    // The same SID for another attempt is not recorded twice.
    store.record_attempt(b, placed).await.unwrap();
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(report.calls[0].requests[0].sid.as_deref(), Some("CA1"));
    assert_eq!(report.calls[1].requests[0].sid, None);
    assert!(
        report.calls[1].requests[0]
            .error
            .as_deref()
            .unwrap()
            .contains("already owns")
    );
    let owned = store
        .owned_sids(vec!["CA1".into(), "CA2".into()])
        .await
        .unwrap();
    assert_eq!(owned.into_iter().collect::<Vec<_>>(), ["CA1"]);
}

#[tokio::test]
async fn unknown_attempts_are_settled_found_absent_or_sent_again_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await;
    let call = store.due_calls(now_ms(), 10).await.unwrap().remove(0);
    let claim = |store: Store| async move {
        match store.claim(call.call_id, "+1000", 5000).await.unwrap() {
            Claim::Go { attempt_id } => attempt_id,
            other => panic!("{other:?}"),
        }
    };
    let unknown = AttemptOutcome::Unknown {
        error: "timed out".into(),
    };
    // Absent: sent again.
    let a = claim(store.clone()).await;
    store.record_attempt(a, unknown.clone()).await.unwrap();
    assert_eq!(store.unresolved(now_ms()).await.unwrap().len(), 1);
    let settled = store
        .settle(
            a,
            Settlement::Absent {
                how: "no call".into(),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(settled.state, CallState::Queued);
    // Undecided twice: the second time the call fails instead of a third send (each
    // request may have rung). An absence before does not count against it.
    for expected in [CallState::Queued, CallState::Failed] {
        let id = claim(store.clone()).await;
        store.record_attempt(id, unknown.clone()).await.unwrap();
        let settled = store
            .settle(
                id,
                Settlement::Undecided {
                    reason: "list down".into(),
                },
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(settled.state, expected);
    }
    // Settling twice does nothing the second time.
    assert_eq!(
        store
            .settle(
                a,
                Settlement::Absent {
                    how: "again".into()
                }
            )
            .await
            .unwrap(),
        None
    );
    assert!(store.unresolved(now_ms()).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_status_callback_settles_its_attempt_before_the_answer_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await;
    let call = store.due_calls(now_ms(), 10).await.unwrap().remove(0);
    let Claim::Go { attempt_id } = store.claim(call.call_id, "+1000", 5000).await.unwrap() else {
        panic!()
    };
    let (found, settled) = store
        .status_callback(
            Some(attempt_id),
            "CA9".into(),
            Some(TwilioStatus::Initiated),
            "status:initiated".into(),
        )
        .await
        .unwrap();
    assert_eq!(found.unwrap().0, call.call_id);
    assert_eq!(settled.unwrap().state, CallState::Placed);
    // The late answer (here: a timeout) does not undo it.
    assert_eq!(
        store
            .record_attempt(
                attempt_id,
                AttemptOutcome::Unknown {
                    error: "timed out".into()
                }
            )
            .await
            .unwrap(),
        Recorded {
            state: AttemptState::Placed,
            decided: false,
            reconciled: Some(CALLBACK.into()),
            placed_earlier: false,
        }
    );
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(report.calls[0].status, CallState::Placed);
    assert_eq!(report.calls[0].twilio_status, Some(TwilioStatus::Initiated));
    assert_eq!(
        report.calls[0].requests[0].reconciled.as_deref(),
        Some("status callback")
    );
}

#[tokio::test]
async fn a_round_ends_only_on_an_open_incident_in_that_round() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let (id, _) = opened(&route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await);
    // Its call is still queued: the next round skips the number.
    match store.finish_round(id, 1, false, 100).await.unwrap() {
        RoundEnd::NextRound { round: 2, calls } => {
            assert_eq!(calls[0].state, CallState::Skipped);
            assert!(
                calls[0]
                    .reason
                    .as_deref()
                    .unwrap()
                    .contains("waiting to be placed")
            );
        }
        other => panic!("{other:?}"),
    }
    // Round 1 is over: ending it again does nothing.
    assert_eq!(
        store.finish_round(id, 1, false, 100).await.unwrap(),
        RoundEnd::Stale
    );
    let resolve = Decision {
        action: Action::Resolve,
        ..decision("k", &[], Duration::ZERO)
    };
    route(&store, resolve, "r").await;
    assert_eq!(
        store.finish_round(id, 2, false, 100).await.unwrap(),
        RoundEnd::Stale,
        "a resolved incident has no further rounds"
    );
    // The queued call was canceled by the resolution.
    assert!(store.due_calls(now_ms(), 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn hot_lookups_use_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let plans = store
        .run(|c| {
            let queries = [
                "SELECT id FROM calls WHERE state IN ('queued', 'retrying') AND next_attempt_at <= 1",
                "SELECT 1 FROM attempts WHERE sid = 'x'",
                "SELECT id FROM calls WHERE sid = 'x'",
                "SELECT id FROM attempts WHERE state IN ('requesting', 'unknown')",
                "SELECT id FROM incidents WHERE dedup_key = 'k' AND status IN ('open', 'bridged') AND opened_at > 1",
                "SELECT id FROM incidents WHERE next_round_at IS NOT NULL AND next_round_at <= 1 AND status = 'open'",
                "SELECT id FROM alerts WHERE state = 'received' ORDER BY id",
                "SELECT id FROM calls WHERE incident_id = 1",
                "SELECT id FROM attempts WHERE call_id = 1",
                "SELECT MIN(number) FROM calls WHERE state IN ('queued', 'retrying') AND number > 'x'",
                "SELECT id FROM calls WHERE state IN ('queued', 'retrying') AND number = 'x' ORDER BY next_attempt_at, id LIMIT 1",
                "SELECT 1 FROM calls r WHERE r.state = 'requesting' AND r.number = 'x'",
                "SELECT id FROM incidents WHERE closed_at IS NOT NULL AND closed_at < 1 ORDER BY closed_at LIMIT 5",
                "SELECT id FROM incidents WHERE status = 'bridged' AND last_alert_at < 1 ORDER BY last_alert_at LIMIT 5",
                "SELECT id FROM alerts WHERE incident_id IS NULL AND state != 'received' AND received_at < 1 ORDER BY received_at LIMIT 5",
                "SELECT id FROM alerts WHERE incident_id = 1",
                "SELECT 1 FROM rounds WHERE incident_id = 1",
                "SELECT id FROM call_events WHERE call_id = 1",
                "SELECT id FROM incidents WHERE public_id = 'x'",
                // On-call policy: routing's overrides and silences, the rounds worker's
                // due escalations, the heartbeats, retention of what ended.
                "SELECT id FROM overrides WHERE until_at > 1",
                "SELECT id FROM silences WHERE ends_at > 1",
                "SELECT 1 FROM silences WHERE id = 1 AND starts_at <= 1 AND ends_at > 1",
                "SELECT id FROM silences WHERE ends_at < 1 ORDER BY ends_at LIMIT 5",
                "SELECT id FROM overrides WHERE until_at < 1 ORDER BY until_at LIMIT 5",
                "SELECT incident_id, step FROM escalations WHERE state = 'pending' AND due_at <= 1 ORDER BY due_at LIMIT 5",
                "SELECT numbers FROM escalations WHERE incident_id = 1 AND step = 1 AND state = 'pending'",
                "SELECT state FROM heartbeats WHERE name = 'x'",
                "SELECT id FROM calls WHERE state = 'placed' AND answered_by IS NULL AND updated_at > 1",
                "SELECT call_id FROM attempts WHERE state = 'requesting' AND window_end < 1",
                "SELECT id FROM attempts WHERE state = 'absent' AND requested_at >= 1",
                "SELECT id FROM incidents WHERE dedup_key = 'k' AND status = 'silenced' AND dry_run = 0 AND opened_at > 1 ORDER BY opened_at DESC LIMIT 1",
            ];
            let mut plans = Vec::new();
            for q in queries {
                let plan: Vec<String> = c
                    .prepare(&format!("EXPLAIN QUERY PLAN {q}"))?
                    .query_map([], |r| r.get::<_, String>(3))?
                    .collect::<rusqlite::Result<_>>()?;
                plans.push((q, plan.join("; ")));
            }
            Ok(plans)
        })
        .await
        .unwrap();
    // A search through an index, or a scan of a partial index (which holds only the
    // rows that qualify): never a scan of a whole table.
    for (query, plan) in plans {
        assert!(
            plan.split("; ").all(|step| step.contains("USING")),
            "{query}: {plan}"
        );
    }
}

#[tokio::test]
async fn one_request_per_number_is_in_flight_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    for key in ["a", "b"] {
        route(
            &store,
            decision(key, &["+1555", "+1666"], Duration::ZERO),
            key,
        )
        .await;
    }
    // Two incidents call the same two numbers: the oldest call of each number is due.
    let due = store.due_calls(now_ms(), 10).await.unwrap();
    assert_eq!(
        due.iter()
            .map(|j| (j.incident_id, j.number.as_str()))
            .collect::<Vec<_>>(),
        [(1, "+1555"), (1, "+1666")]
    );
    let Claim::Go { attempt_id } = store.claim(due[0].call_id, "+1000", 5000).await.unwrap() else {
        panic!()
    };
    // +1555 has a request in flight: its next call waits, +1666's does not.
    let due = store.due_calls(now_ms(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].number, "+1666");
    let later: i64 = store
        .run(|c| {
            c.query_row(
                "SELECT id FROM calls WHERE incident_id = 2 AND number = '+1555'",
                [],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(
        store.claim(later, "+1000", 5000).await.unwrap(),
        Claim::Busy
    );
    store
        .record_attempt(attempt_id, AttemptOutcome::Placed { sid: "CA1".into() })
        .await
        .unwrap();
    assert!(matches!(
        store.claim(later, "+1000", 5000).await.unwrap(),
        Claim::Go { .. }
    ));
}

/// Routes one alert with a raw mail of `size` bytes; returns the incident.
async fn big_incident(store: &Store, key: &str, size: usize) -> Result<i64, StoreError> {
    let id = store
        .insert_alert(NewAlert {
            source: "test",
            raw: vec![b'x'; size],
            ..NewAlert::default()
        })
        .await?
        .id;
    let routed = store
        .record_routings(
            vec![(id, decision(key, &["+1555"], Duration::ZERO), incident(key))],
            1000,
        )
        .await?
        .pop()
        .unwrap()?;
    Ok(opened(&routed).0)
}

/// Closes an incident as a recovery does: its calls not yet sent are canceled.
async fn resolve_now(store: &Store, incident_id: i64) {
    store
        .run(move |c| {
            c.execute(
                "UPDATE incidents SET status = 'resolved', next_round_at = NULL, closed_at = ?2 WHERE id = ?1",
                params![incident_id, now_ms()],
            )?;
            end_calls(c, incident_id)
        })
        .await
        .unwrap();
}

/// Ends every call of an incident that is still to be sent.
fn end_calls(c: &rusqlite::Connection, incident_id: i64) -> rusqlite::Result<usize> {
    c.execute(
        "UPDATE calls SET state = 'canceled', next_attempt_at = NULL WHERE incident_id = ?1 AND state IN ('queued', 'retrying')",
        [incident_id],
    )
}

#[tokio::test]
async fn retention_deletes_closed_incidents_with_everything_of_them_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let closed = big_incident(&store, "old", 100).await.unwrap();
    let live = big_incident(&store, "live", 100).await.unwrap();
    let bridged = big_incident(&store, "bridged", 100).await.unwrap();
    store.mark_bridged(bridged).await.unwrap();
    store.run(move |c| end_calls(c, bridged)).await.unwrap();
    resolve_now(&store, closed).await;
    // A dropped alert no incident holds.
    let dropped = alert(&store).await;
    let drop = Decision {
        action: Action::Drop,
        ..decision("d", &[], Duration::ZERO)
    };
    store
        .record_routings(vec![(dropped, drop, incident("x"))], 10)
        .await
        .unwrap();
    // Nothing is older than a day.
    assert!(!store.prune(now_ms() - 86_400_000, 10).await.unwrap().any());
    let pruned = store.prune(now_ms() + 1000, 10).await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            incidents: 2,
            alerts: 1,
            ..Pruned::default()
        },
        "the closed one and the bridged one silent since the cutoff"
    );
    assert!(store.incident(closed).await.unwrap().is_none());
    assert!(store.incident(live).await.unwrap().is_some());
    for table in ["calls", "alerts", "rounds", "attempts", "call_events"] {
        let sql = format!(
            "SELECT COUNT(*) FROM {table} WHERE {} IN (SELECT id FROM {})",
            if table == "attempts" || table == "call_events" {
                "call_id"
            } else {
                "incident_id"
            },
            if table == "attempts" || table == "call_events" {
                "calls WHERE incident_id IN (1, 3)"
            } else {
                "(SELECT 1 AS id UNION SELECT 3)"
            }
        );
        let left: i64 = store
            .run(move |c| c.query_row(&sql, [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(left, 0, "{table}");
    }
}

#[tokio::test]
async fn a_closed_incident_with_a_call_still_to_go_out_is_never_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    // Closed with its call still queued, as the canary's incident is from the start.
    let id = big_incident(&store, "canary", 100).await.unwrap();
    store
        .run(move |c| {
            c.execute(
                "UPDATE incidents SET status = 'resolved', next_round_at = NULL, closed_at = 1 WHERE id = ?1",
                [id],
            )
        })
        .await
        .unwrap();
    assert!(!store.prune(now_ms(), 10).await.unwrap().any());
    assert!(store.incident(id).await.unwrap().is_some());
    store.run(move |c| end_calls(c, id)).await.unwrap();
    assert_eq!(store.prune(now_ms(), 10).await.unwrap().incidents, 1);
}

#[tokio::test]
async fn max_bytes_prunes_the_oldest_closed_data_first_and_refuses_only_for_open_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db"), Some(2 * 1024 * 1024)).unwrap();
    // Closed incidents of 200 KB each, far more than the cap holds: each new one makes
    // room by deleting the oldest.
    let mut first = None;
    for i in 0..30 {
        let id = big_incident(&store, &format!("k{i}"), 200_000)
            .await
            .unwrap();
        first.get_or_insert(id);
        resolve_now(&store, id).await;
    }
    assert!(!store.is_full());
    assert!(store.incident(first.unwrap()).await.unwrap().is_none());
    assert!(store.usage().await.unwrap().used_bytes <= 2 * 1024 * 1024);
    // Open incidents are never deleted: once they alone fill it, new mail is refused.
    let mut refused = None;
    for i in 0..30 {
        match big_incident(&store, &format!("open{i}"), 200_000).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("open data must fill the store");
    assert!(matches!(refused, StoreError::Full { .. }), "{refused}");
    assert!(store.is_full());
    // The dispatcher's own writes still succeed (no SQLite page cap).
    route(&store, decision("small", &["+1666"], Duration::ZERO), "s").await;
    store.check_writable().await.unwrap();
}

/// Issue 13, defect 2: the router loaded up to 256 raw mails at once (300 queued mails of
/// 9 MiB: 1.9 GB). Stored alerts are read under a byte budget, but always one.
#[tokio::test]
async fn pending_alerts_are_read_under_a_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    for _ in 0..5 {
        store
            .insert_alert(NewAlert {
                source: "test",
                raw: vec![b'x'; 1000],
                ..NewAlert::default()
            })
            .await
            .unwrap();
    }
    let sizes = |alerts: Vec<PendingAlert>| alerts.iter().map(|a| a.raw.len()).collect::<Vec<_>>();
    assert_eq!(
        sizes(store.pending_alerts(100, 2500).await.unwrap()),
        [1000, 1000]
    );
    assert_eq!(
        sizes(store.pending_alerts(100, 10).await.unwrap()),
        [1000],
        "a mail bigger than the budget is still read, alone"
    );
    assert_eq!(store.pending_alerts(3, usize::MAX).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_silenced_alert_is_recorded_on_a_silenced_incident_and_rings_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let silence = store
        .add_silence(
            vec!["rule=r".into()],
            now - 1000,
            now + 60_000,
            "c".into(),
            "t".into(),
        )
        .await
        .unwrap();
    let mut d = decision("k", &["+1555"], Duration::from_secs(60));
    d.silenced_by = Some(silence);
    for count in [1, 2] {
        match route(&store, d.clone(), &format!("s{count}")).await {
            Routed::Silenced {
                silence_id,
                alert_count,
                ..
            } => assert_eq!((silence_id, alert_count), (silence, count)),
            other => panic!("not silenced: {other:?}"),
        }
    }
    assert_eq!(scalar(&store, "SELECT COUNT(*) FROM calls").await, 0);
    assert_eq!(
        scalar(
            &store,
            "SELECT COUNT(*) FROM incidents WHERE status = 'silenced'"
        )
        .await,
        1
    );
    // Expired after the router read it: the transaction sees that, and it rings.
    assert!(store.expire_silence(silence, now_ms()).await.unwrap());
    let (_, calls) = opened(&route(&store, d, "c").await);
    assert_eq!(calls, [CallState::Queued]);
}

#[tokio::test]
async fn escalation_steps_join_the_open_round_and_are_not_needed_once_bridged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut d = decision("k", &["+1555"], Duration::ZERO);
    d.escalations = vec![
        crate::route::EscalationStep {
            after: Duration::ZERO,
            numbers: vec!["+1555".into(), "+1666".into()],
        },
        crate::route::EscalationStep {
            after: Duration::from_secs(3600),
            numbers: vec!["+1777".into()],
        },
    ];
    let (id, _) = opened(&route(&store, d, "a").await);
    let due = store.due_escalations(now_ms() + 1, true).await.unwrap();
    assert_eq!(
        due,
        [DueEscalation {
            incident_id: id,
            step: 1
        }]
    );
    match store.escalate(due[0], 1000).await.unwrap() {
        // +1555 was rung in this round already.
        Escalated::Called { round, calls } => {
            assert_eq!(round, 1);
            let numbers: Vec<&str> = calls.iter().map(|c| c.number.as_str()).collect();
            assert_eq!(numbers, ["+1666"]);
        }
        other => panic!("not called: {other:?}"),
    }
    assert_eq!(
        store.escalate(due[0], 1000).await.unwrap(),
        Escalated::Stale
    );
    assert!(store.mark_bridged(id).await.unwrap());
    let later = store
        .due_escalations(now_ms() + 3_600_001, true)
        .await
        .unwrap();
    assert!(matches!(
        store.escalate(later[0], 1000).await.unwrap(),
        Escalated::NotNeeded {
            status: IncidentStatus::Bridged
        }
    ));
    assert_eq!(scalar(&store, "SELECT COUNT(*) FROM calls").await, 2);
}

#[tokio::test]
async fn a_beat_stored_before_the_deadline_but_not_routed_yet_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let name = "backup".to_string();
    let rows = store.heartbeats(vec![name.clone()], 1_000).await.unwrap();
    let base = rows[0].base();
    let missed = |store: Store| {
        let name = name.clone();
        async move {
            store
                .heartbeat_missed(
                    name,
                    base,
                    NewAlert {
                        source: "heartbeat",
                        ..NewAlert::default()
                    },
                )
                .await
                .unwrap()
        }
    };
    // The beat's mail is stored (acknowledged) but the router has not got to it: the
    // deadline waits for it.
    let beat = alert(&store).await;
    assert_eq!(missed(store.clone()).await, None);
    let received = scalar(&store, "SELECT received_at FROM alerts ORDER BY id LIMIT 1").await;
    let mut incident = incident("beat");
    incident.received_at = received;
    let mut decision = decision("heartbeat: backup", &[], Duration::ZERO);
    decision.rule = Some("backup".into());
    decision.action = Action::Beat;
    store
        .record_routings(vec![(beat, decision, incident)], 1000)
        .await
        .unwrap();
    // Routed: the beat counts from when it arrived, and this wait is over.
    let rows = store
        .heartbeats(vec!["backup".into()], 1_000)
        .await
        .unwrap();
    assert_eq!(rows[0].state, HeartbeatState::Ok);
    assert_eq!(rows[0].last_beat_at, Some(received));
    assert_eq!(
        missed(store.clone()).await,
        None,
        "a beat came since the base"
    );
}

#[test]
fn states_line_up_in_padded_columns() {
    // `mailcall status` and `incidents` print states in columns.
    assert_eq!(format!("[{:<8}]", HeartbeatState::Ok), "[ok      ]");
    assert_eq!(format!("[{:<10}]", CallState::Placed), "[placed    ]");
}

#[tokio::test]
async fn a_mail_that_could_never_fit_is_refused_for_good_not_deferred() {
    let dir = tempfile::tempdir().unwrap();
    let max = 2 * 1024 * 1024;
    let store = Store::open(&dir.path().join("s.db"), Some(max)).unwrap();
    let mail = |bytes: usize| NewAlert {
        source: "test",
        raw: vec![b'x'; bytes],
        ..NewAlert::default()
    };
    // With the store empty: a mail as big as the cap can never fit (the empty schema and
    // the reserve a big mail leaves), so waiting would not help.
    let refused = store.insert_alert(mail(max as usize)).await.unwrap_err();
    assert!(matches!(refused, StoreError::TooBig { .. }), "{refused}");
    assert!(
        !store.is_full(),
        "a mail too big for the store is not a full store"
    );
    // Half the cap fits.
    store.insert_alert(mail(1024 * 1024)).await.unwrap();
}

#[tokio::test]
async fn retention_deletes_a_huge_incident_over_several_small_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let id = big_incident(&store, "storm", 100).await.unwrap();
    // An alert storm joined to one incident: 5,000 more alerts.
    store
        .run(move |c| {
            c.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
                 INSERT INTO alerts (received_at, source, rcpt_to, raw, state, incident_id)
                 SELECT 1, 'smtp', '[]', x'00', 'routed', ?1 FROM n",
                [id],
            )
        })
        .await
        .unwrap();
    resolve_now(&store, id).await;
    let mut passes = 0;
    loop {
        // Closed "now": everything closed before the next millisecond is old enough.
        let pruned = store.prune(now_ms() + 1, 20).await.unwrap();
        passes += 1;
        if pruned.incidents == 1 {
            break;
        }
        assert!(pruned.partial, "pass {passes}: {pruned:?}");
        assert!(passes < 10, "never finished");
    }
    assert!(passes >= 3, "one transaction deleted 5,000 rows");
    assert!(store.incident(id).await.unwrap().is_none());
    assert_eq!(
        scalar(&store, "SELECT COUNT(*) FROM alerts").await,
        0,
        "every alert of it went"
    );
}

#[tokio::test]
async fn a_placed_calls_sms_is_owed_in_the_same_commit_until_it_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut texting = decision("sms", &["+1555"], Duration::ZERO);
    texting.sms = true;
    route(&store, texting, "a").await;
    route(&store, decision("quiet", &["+1666"], Duration::ZERO), "b").await;
    for (i, call) in store
        .due_calls(now_ms(), 10)
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let Claim::Go { attempt_id } = store.claim(call.call_id, "+1000", 5000).await.unwrap()
        else {
            panic!()
        };
        store
            .record_attempt(
                attempt_id,
                AttemptOutcome::Placed {
                    sid: format!("CA{i}"),
                },
            )
            .await
            .unwrap();
    }
    // Only the call of the incident with `sms = true` owes one; a restart would see it.
    let owed = store.owed_sms(10).await.unwrap();
    assert_eq!(owed.len(), 1, "{owed:?}");
    assert_eq!(owed[0].number, "+1555");
    assert!(owed[0].sms.as_deref().unwrap().contains("incident #"));
    store
        .sms_done(owed[0].call_id, SmsState::Sent, "sms SM1".into())
        .await
        .unwrap();
    assert!(store.owed_sms(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_sms_owed_for_over_an_hour_is_given_up_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut texting = decision("sms", &["+1555", "+1556"], Duration::ZERO);
    texting.sms = true;
    route(&store, texting, "a").await;
    for (i, call) in store
        .due_calls(now_ms(), 10)
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let Claim::Go { attempt_id } = store.claim(call.call_id, "+1000", 5000).await.unwrap()
        else {
            panic!()
        };
        store
            .record_attempt(
                attempt_id,
                AttemptOutcome::Placed {
                    sid: format!("CA{i}"),
                },
            )
            .await
            .unwrap();
    }
    // One was placed 61 minutes ago (a daemon down since), the other just now.
    let old = now_ms() - 61 * 60 * 1000;
    store
        .run(move |c| {
            c.execute(
                "UPDATE calls SET updated_at = ?1 WHERE number = '+1555'",
                [old],
            )
        })
        .await
        .unwrap();
    let owed = store.owed_sms(10).await.unwrap();
    assert_eq!(
        owed.iter().map(|j| j.number.as_str()).collect::<Vec<_>>(),
        ["+1556"]
    );
    let (state, event): (String, String) = store
        .run(|c| {
            c.query_row(
                "SELECT c.sms_state, e.event FROM calls c JOIN call_events e ON e.call_id = c.id
                 WHERE c.number = '+1555' AND e.event LIKE 'sms-failed%'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    assert_eq!(state, "failed");
    assert!(
        event.contains("an hour after the call was placed"),
        "{event}"
    );
}

#[tokio::test]
async fn the_canarys_alert_and_its_schedule_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db"), Some(2 * 1024 * 1024)).unwrap();
    let canary = |raw: Vec<u8>| NewAlert {
        source: "canary",
        raw,
        ..NewAlert::default()
    };
    store
        .insert_alert_and_meta(canary(Vec::new()), "canary_last", "42".into())
        .await
        .unwrap();
    assert_eq!(
        store.meta("canary_last").await.unwrap().as_deref(),
        Some("42")
    );
    // Not stored: the schedule does not move either.
    assert!(
        store
            .insert_alert_and_meta(
                canary(vec![b'x'; 4 * 1024 * 1024]),
                "canary_last",
                "43".into()
            )
            .await
            .is_err()
    );
    assert_eq!(
        store.meta("canary_last").await.unwrap().as_deref(),
        Some("42")
    );
}

/// One request for `call_id` whose answer is lost, then settled `absent`: its id and
/// the call's state afterwards.
async fn absent_once(store: &Store, call_id: i64) -> (i64, CallState) {
    let Claim::Go { attempt_id } = store.claim(call_id, "+1000", 5000).await.unwrap() else {
        panic!()
    };
    let lost = AttemptOutcome::Unknown {
        error: "timed out".into(),
    };
    store.record_attempt(attempt_id, lost).await.unwrap();
    let absent = Settlement::Absent {
        how: "no call".into(),
    };
    let settled = store.settle(attempt_id, absent).await.unwrap().unwrap();
    (attempt_id, settled.state)
}

#[tokio::test]
async fn a_call_twilio_says_is_absent_is_sent_again_up_to_a_limit_and_a_late_one_places_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await;
    let call = store.due_calls(now_ms(), 10).await.unwrap().remove(0);
    // Twilio's list says "no such call": sent again, up to MAX_ABSENT times.
    let mut first = None;
    for _ in 0..MAX_ABSENT {
        let (id, state) = absent_once(&store, call.call_id).await;
        first.get_or_insert(id);
        assert_eq!(state, CallState::Queued);
    }
    // The first request's call shows up late in the list: it did ring, and the call
    // waiting to be sent again is placed instead.
    let late = store
        .settle_absent_late(first.unwrap(), "CAlate".into())
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(late.map(|s| s.state), Some(CallState::Placed));
    assert!(store.due_calls(now_ms(), 10).await.unwrap().is_empty());
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(report.calls[0].sid.as_deref(), Some("CAlate"));
    // A SID is still one attempt's only.
    let again = store
        .settle_absent_late(first.unwrap() + 1, "CAlate".into())
        .await
        .unwrap();
    assert!(again.is_none());
}

#[tokio::test]
async fn absent_past_the_limit_fails_the_call_saying_it_may_have_rung() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await;
    let call = store.due_calls(now_ms(), 10).await.unwrap().remove(0);
    let mut last = CallState::Queued;
    let mut first = None;
    for _ in 0..=MAX_ABSENT {
        let (id, state) = absent_once(&store, call.call_id).await;
        first.get_or_insert(id);
        last = state;
    }
    assert_eq!(last, CallState::Failed);
    let report = store.incident(1).await.unwrap().unwrap();
    assert!(
        report.calls[0]
            .error
            .as_deref()
            .unwrap()
            .contains("may have rung")
    );
    // Its number's list is still looked at; a call that shows up late did ring.
    assert_eq!(store.resends_waiting(0, 0).await.unwrap().len(), 1);
    let late = store
        .settle_absent_late(first.unwrap(), "CAlate".into())
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(late.map(|s| s.state), Some(CallState::Placed));
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(
        (report.calls[0].status, report.calls[0].error.as_deref()),
        (CallState::Placed, None)
    );
    assert!(store.resends_waiting(0, 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_resend_out_when_the_absent_requests_call_shows_up_neither_retries_nor_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await;
    let call = store.due_calls(now_ms(), 10).await.unwrap().remove(0);
    let (first, _) = absent_once(&store, call.call_id).await;
    // The resend is out when the first request's call shows up late in the list.
    let Claim::Go { attempt_id } = store.claim(call.call_id, "+1000", 5000).await.unwrap() else {
        panic!()
    };
    let late = store
        .settle_absent_late(first, "CAlate".into())
        .await
        .unwrap();
    assert_eq!(
        late,
        Some(None),
        "recorded; the call is the resend's to settle"
    );
    // Twilio answers the resend 503: no retry, the call is placed by the first.
    let recorded = store
        .record_attempt(
            attempt_id,
            AttemptOutcome::Failed {
                http_status: Some(503),
                code: None,
                error: "busy".into(),
                retry_at: Some(now_ms() + 1000),
            },
        )
        .await
        .unwrap();
    assert!(recorded.placed_earlier, "{recorded:?}");
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(report.calls[0].status, CallState::Placed);
    assert_eq!(report.calls[0].sid.as_deref(), Some("CAlate"));
    assert!(
        store
            .due_calls(now_ms() + 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_call_waiting_to_be_sent_again_is_placed_not_sent_once_an_earlier_request_is() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await;
    let call = store.due_calls(now_ms(), 10).await.unwrap().remove(0);
    let (first, _) = absent_once(&store, call.call_id).await;
    assert_eq!(
        store
            .resends_waiting(0, 0)
            .await
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["+1555"],
        "the reconciler is to keep an eye on its list"
    );
    // The absent request is placed by its late status callback while the call waits.
    let (known, settled) = store
        .status_callback(
            Some(first),
            "CAlate".into(),
            Some(TwilioStatus::Ringing),
            "status:ringing".into(),
        )
        .await
        .unwrap();
    assert!(known.is_some());
    let settled = settled.expect("the callback placed the call");
    assert_eq!(
        (settled.state, settled.was),
        (CallState::Placed, AttemptState::Absent)
    );
    assert!(store.resends_waiting(0, 0).await.unwrap().is_empty());
    assert!(matches!(
        store.claim(call.call_id, "+1000", 5000).await.unwrap(),
        Claim::Gone(CallState::Placed)
    ));
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(report.calls[0].twilio_status, Some(TwilioStatus::Ringing));
    assert_eq!(
        report.calls[0].requests[0].reconciled.as_deref(),
        Some(CALLBACK_LATE)
    );
}

#[tokio::test]
async fn a_claim_finds_an_earlier_placed_request_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(&store, decision("k", &["+1555"], Duration::ZERO), "a").await;
    let call = store.due_calls(now_ms(), 10).await.unwrap().remove(0);
    let (first, _) = absent_once(&store, call.call_id).await;
    // The late call is recorded on the request while the call is (briefly) not
    // waiting; the claim that follows must not send it.
    store
        .run(move |c| {
            c.execute(
                "UPDATE attempts SET state = 'placed', sid = 'CAlate' WHERE id = ?1",
                [first],
            )
        })
        .await
        .unwrap();
    assert!(matches!(
        store.claim(call.call_id, "+1000", 5000).await.unwrap(),
        Claim::Placed
    ));
    let report = store.incident(1).await.unwrap().unwrap();
    assert_eq!(report.calls[0].status, CallState::Placed);
    assert_eq!(report.calls[0].requests.len(), 1, "nothing more was sent");
}

#[tokio::test]
async fn a_call_given_up_after_an_absence_is_watched_unless_twilio_refused_it_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    route(
        &store,
        decision("k", &["+1555", "+1666"], Duration::ZERO),
        "a",
    )
    .await;
    for call in store.due_calls(now_ms(), 10).await.unwrap() {
        absent_once(&store, call.call_id).await;
        // The resend is refused: 503 (overloaded; retries ran out) or 400 (for good).
        let Claim::Go { attempt_id } = store.claim(call.call_id, "+1000", 5000).await.unwrap()
        else {
            panic!()
        };
        let status = if call.number == "+1555" { 503 } else { 400 };
        store
            .record_attempt(
                attempt_id,
                AttemptOutcome::Failed {
                    http_status: Some(status),
                    code: None,
                    error: "refused".into(),
                    retry_at: None,
                },
            )
            .await
            .unwrap();
    }
    let watched: Vec<String> = store
        .resends_waiting(0, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(watched, ["+1555"]);
    // And only for as long as asked.
    assert!(
        store
            .resends_waiting(0, now_ms() + 1000)
            .await
            .unwrap()
            .is_empty()
    );
}
