//! Routing decisions into incidents and calls, each alert in one transaction: dedup
//! against the live incidents with its key, resolution, a new incident with its first
//! round of calls, and the hourly call budget.

use rusqlite::{Connection, params};

use super::{
    AlertState, CallState, IncidentKind, IncidentStatus, RoundOutcome, Store, StoreError, ms,
    now_ms, oncall,
};
use crate::route::{Action, Decision};

/// What an incident needs besides the routing decision, prepared by the dispatcher
/// (used only when the alert does not join an incident already open).
#[derive(Debug, Clone)]
pub struct NewIncident {
    /// Opaque, random: names the conference room.
    pub public_id: String,
    /// The TwiML every call of the incident uses.
    pub twiml: String,
    pub kind: IncidentKind,
    /// The alert is a dry run: so are the incident and every call of it.
    pub dry_run: bool,
    /// When the alert was stored (Unix milliseconds), for the dispatch latency metric.
    pub received_at: i64,
    /// Its calls ask to press 1 (a public URL): a person is one who pressed it. Else
    /// answering-machine detection and polling tell who answered.
    pub press_one: bool,
    /// With `press_one`: the public URL its calls' callbacks come to, kept so that they
    /// are still taken after a reload that changes `[twilio] public_url`.
    pub public_url: Option<String>,
}

/// A number of a round, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedCall {
    pub number: String,
    pub state: CallState,
    /// Why it is not called (refused, skipped).
    pub reason: Option<String>,
}

/// What the store did with a routed alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// A new incident and its first round of calls.
    Opened {
        incident_id: i64,
        calls: Vec<RoutedCall>,
    },
    /// Recorded on a live incident with the same key, opened within the cooldown;
    /// nobody is called.
    Deduplicated { incident_id: i64, alert_count: i64 },
    /// Dropped by a rule, or matched by none (or a resolve with nothing open to close).
    NotCalled,
    /// A resolve rule closed these incidents (every live one with the key): no further
    /// rounds, and calls not yet sent are canceled.
    Resolved {
        /// `(id, public id)` of each, newest first.
        incidents: Vec<(i64, String)>,
        canceled: usize,
    },
    /// A silence muted it: recorded on a `silenced` incident (a new one, or the one its
    /// key muted within the cooldown); nobody is called.
    Silenced {
        incident_id: i64,
        silence_id: i64,
        alert_count: i64,
    },
}

/// What the calls of one round share.
pub(super) struct CallTarget {
    pub incident_id: i64,
    pub round: i64,
    pub kind: IncidentKind,
    pub dry_run: bool,
}

impl Store {
    /// Records the routing of a batch of alerts in one transaction, in order. Each is
    /// atomic on its own: deduplication against live incidents, resolution, a new
    /// incident with its calls, and the hourly call budget.
    pub async fn record_routings(
        &self,
        items: Vec<(i64, Decision, NewIncident)>,
        max_calls_per_hour: u32,
    ) -> Result<Vec<Result<Routed, StoreError>>, StoreError> {
        self.run(move |c| {
            let mut results = Vec::with_capacity(items.len());
            for (alert_id, decision, new) in items {
                c.execute_batch("SAVEPOINT item")?;
                let result = record_routing(c, alert_id, &decision, &new, max_calls_per_hour);
                if result.is_ok() {
                    c.execute_batch("RELEASE item")?;
                } else {
                    c.execute_batch("ROLLBACK TO item; RELEASE item")?;
                }
                results.push(result.map_err(StoreError::Sqlite));
            }
            Ok(results)
        })
        .await
    }
}

fn record_routing(
    c: &Connection,
    alert_id: i64,
    decision: &Decision,
    new: &NewIncident,
    max_calls_per_hour: u32,
) -> rusqlite::Result<Routed> {
    let now = now_ms();
    let mark = |action: &str, incident_id: Option<i64>| {
        c.prepare_cached(
            "UPDATE alerts SET state = ?5, rule = ?2, action = ?3, incident_id = ?4 WHERE id = ?1",
        )?
        .execute(params![
            alert_id,
            decision.rule,
            action,
            incident_id,
            AlertState::Routed
        ])
    };
    // Only a live incident of the same kind of run is the same problem: a real alert
    // never joins (or resolves) a dry run's incident, nor the reverse. Newest first.
    let live = |c: &Connection, since: i64| -> rusqlite::Result<Vec<(i64, String)>> {
        c.prepare_cached(
            "SELECT id, public_id FROM incidents
             WHERE dedup_key = ?1 AND status IN ('open', 'bridged') AND kind = 'alert'
               AND dry_run = ?2 AND opened_at > ?3
             ORDER BY opened_at DESC, id DESC",
        )?
        .query_map(params![decision.dedup_key, new.dry_run, since], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect()
    };
    // A heartbeat's beat (as of when it arrived, not when it was routed), then like a
    // resolution of its missed-beat incident.
    if decision.action == Action::Beat {
        oncall::beat(
            c,
            decision.rule.as_deref().unwrap_or_default(),
            new.received_at,
        )?;
    }
    if matches!(decision.action, Action::Resolve | Action::Beat) {
        let action = decision.action.as_str();
        // The recovery is over for every live incident of the problem (a repeat after
        // the cooldown opens a second one).
        let incidents = live(c, i64::MIN)?;
        let Some((newest, _)) = incidents.first() else {
            mark(action, None)?;
            return Ok(Routed::NotCalled);
        };
        let mut canceled = 0;
        for (incident_id, _) in &incidents {
            canceled += resolve(c, *incident_id, now)?;
        }
        mark(action, Some(*newest))?;
        return Ok(Routed::Resolved {
            incidents,
            canceled,
        });
    }
    if decision.action != Action::Call {
        mark(decision.action.as_str(), None)?;
        return Ok(Routed::NotCalled);
    }
    if !decision.cooldown.is_zero()
        && new.kind == IncidentKind::Alert
        && let Some((incident_id, _)) = live(c, now - ms(decision.cooldown))?.into_iter().next()
    {
        let alert_count: i64 = c
            .prepare_cached(
                "UPDATE incidents SET alert_count = alert_count + 1, last_alert_at = ?2
                 WHERE id = ?1 RETURNING alert_count",
            )?
            .query_row(params![incident_id, now], |r| r.get(0))?;
        mark("deduplicated", Some(incident_id))?;
        return Ok(Routed::Deduplicated {
            incident_id,
            alert_count,
        });
    }
    // A silence read by the router that is still in force mutes the alert: it joins
    // the silenced incident of its key, or opens one (closed, ringing nobody).
    let silence_id = match decision.silenced_by {
        Some(id) if new.kind == IncidentKind::Alert && oncall::silence_in_force(c, id, now)? => {
            Some(id)
        }
        _ => None,
    };
    if let Some(silence_id) = silence_id
        && let Some((incident_id, alert_count)) = oncall::join_silenced(
            c,
            &decision.dedup_key,
            new.dry_run,
            now.saturating_sub(ms(decision.cooldown)),
            now,
        )?
    {
        mark("silenced", Some(incident_id))?;
        return Ok(Routed::Silenced {
            incident_id,
            silence_id,
            alert_count,
        });
    }
    // The canary is one call per number: closed from the start, so it has no rounds,
    // takes no later alert and is no dial-in's bridge.
    let (status, closed_at, next_round_at) = match (new.kind, silence_id) {
        (IncidentKind::Canary, _) => (IncidentStatus::Resolved, Some(now), None),
        (IncidentKind::Alert, Some(_)) => (IncidentStatus::Silenced, Some(now), None),
        (IncidentKind::Alert, None) => (
            IncidentStatus::Open,
            None,
            Some(now.saturating_add(ms(decision.round_interval))),
        ),
    };
    c.prepare_cached(
        "INSERT INTO incidents (public_id, kind, dry_run, status, opened_at, first_received_at, closed_at, rule,
                                dedup_key, message, language, voice, twiml, subject, sms, last_alert_at,
                                rounds, round_interval_ms, next_round_at, silence_id, press_one, public_url)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?5, ?16, ?17, ?18, ?19, ?20, ?21)",
    )?
    .execute(params![
        new.public_id,
        new.kind,
        new.dry_run,
        status,
        now,
        new.received_at,
        closed_at,
        decision.rule,
        decision.dedup_key,
        decision.message,
        decision.language,
        decision.voice,
        new.twiml,
        decision.subject,
        decision.sms && new.kind == IncidentKind::Alert,
        decision.rounds,
        ms(decision.round_interval),
        next_round_at,
        silence_id,
        new.press_one,
        new.public_url
    ])?;
    let incident_id = c.last_insert_rowid();
    if let Some(silence_id) = silence_id {
        mark("silenced", Some(incident_id))?;
        return Ok(Routed::Silenced {
            incident_id,
            silence_id,
            alert_count: 1,
        });
    }
    if new.kind == IncidentKind::Alert {
        oncall::insert_escalations(c, incident_id, now, &decision.escalations)?;
        c.prepare_cached("INSERT INTO rounds (incident_id, round, started_at) VALUES (?1, 1, ?2)")?
            .execute(params![incident_id, now])?;
    }
    let target = CallTarget {
        incident_id,
        round: 1,
        kind: new.kind,
        dry_run: new.dry_run,
    };
    let numbers: Vec<(String, Option<String>)> =
        decision.numbers.iter().map(|n| (n.clone(), None)).collect();
    let calls = insert_calls(c, &target, &numbers, now, max_calls_per_hour)?;
    mark("call", Some(incident_id))?;
    Ok(Routed::Opened { incident_id, calls })
}

/// Closes a live incident as resolved: no further rounds, its open round ends
/// `resolved`, and calls not yet sent are canceled. Returns how many were canceled.
fn resolve(c: &Connection, incident_id: i64, now: i64) -> rusqlite::Result<usize> {
    c.prepare_cached(
        "UPDATE incidents SET status = ?2, next_round_at = NULL, closed_at = ?3, last_alert_at = ?3 WHERE id = ?1",
    )?
    .execute(params![incident_id, IncidentStatus::Resolved, now])?;
    c.prepare_cached("UPDATE rounds SET outcome = ?2 WHERE incident_id = ?1 AND outcome IS NULL")?
        .execute(params![incident_id, RoundOutcome::Resolved])?;
    c.prepare_cached(
        "UPDATE calls SET state = ?2, next_attempt_at = NULL, error = 'the incident was resolved before this call went out', updated_at = ?3
         WHERE incident_id = ?1 AND state IN ('queued', 'retrying')",
    )?
    .execute(params![incident_id, CallState::Canceled, now])
}

/// Inserts a round's calls. A number with a reason is recorded `skipped` with it; the
/// others are `queued` for the placer (from now on), or `dry-run` in a dry run, or
/// `refused` beyond the hourly budget. The canary's and dry runs' calls do not count
/// toward the budget.
pub(super) fn insert_calls(
    c: &Connection,
    target: &CallTarget,
    numbers: &[(String, Option<String>)],
    now: i64,
    max_calls_per_hour: u32,
) -> rusqlite::Result<Vec<RoutedCall>> {
    let budgeted = target.kind == IncidentKind::Alert && !target.dry_run;
    // The budget window is the current minute and the 60 before it.
    let minute = now.div_euclid(60_000);
    let mut used: i64 = c
        .prepare_cached("SELECT COALESCE(SUM(calls), 0) FROM call_budget WHERE minute >= ?1")?
        .query_row([minute - 60], |r| r.get(0))?;
    let used_before = used;
    let mut calls = Vec::with_capacity(numbers.len());
    for (number, skip) in numbers {
        let (state, reason) = match skip {
            Some(reason) => (CallState::Skipped, Some(reason.clone())),
            None if target.dry_run => (CallState::DryRun, None),
            None if !budgeted => (CallState::Queued, None),
            None if used < i64::from(max_calls_per_hour) => {
                used += 1;
                (CallState::Queued, None)
            }
            None => (
                CallState::Refused,
                Some(format!(
                    "over the call budget of {max_calls_per_hour} calls per hour"
                )),
            ),
        };
        let next_attempt_at = (state == CallState::Queued).then_some(now);
        c.prepare_cached(
            "INSERT INTO calls (incident_id, round, number, state, created_at, updated_at, next_attempt_at, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
        )?
        .execute(params![
            target.incident_id,
            target.round,
            number,
            state,
            now,
            next_attempt_at,
            reason
        ])?;
        calls.push(RoutedCall {
            number: number.clone(),
            state,
            reason,
        });
    }
    if used > used_before {
        c.prepare_cached(
            "INSERT INTO call_budget (minute, calls) VALUES (?1, ?2)
             ON CONFLICT (minute) DO UPDATE SET calls = calls + excluded.calls",
        )?
        .execute(params![minute, used - used_before])?;
        c.prepare_cached("DELETE FROM call_budget WHERE minute < ?1")?
            .execute([minute - 120])?;
    }
    Ok(calls)
}
