//! The on-call policy's durable state: overrides of rotations, silences, heartbeat
//! monitors and the escalation steps of incidents. Each change is one transaction;
//! routing reads the overrides and silences not yet over (indexed by their end), the
//! rounds worker the escalation steps that are due.

use rusqlite::{Connection, OptionalExtension, params};

use super::routing::{CallTarget, RoutedCall, insert_calls};
use super::{
    EscalationState, HeartbeatState, IncidentKind, IncidentStatus, NewAlert, Store, StoreError,
    insert_alert_row, ms, now_ms, rfc3339,
};
use crate::oncall::{Matcher, Override, Policy, Silence, from_ms};
use crate::route::EscalationStep;

/// An override as `mailcall override list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OverrideRow {
    pub id: i64,
    pub rotation: String,
    pub who: String,
    /// RFC 3339, UTC.
    pub from: String,
    pub until: String,
    pub created_by: String,
}

/// A silence as `silence list` and `GET /silences` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SilenceRow {
    pub id: i64,
    pub matchers: Vec<String>,
    /// RFC 3339, UTC.
    pub starts_at: String,
    pub ends_at: String,
    pub comment: String,
    pub created_by: String,
}

impl SilenceRow {
    /// As listed (`silence list --json`, `GET /silences`): with `unknown_names`, the
    /// names no longer in `known` that make it ignored (empty: it is in force).
    pub fn listed(&self, known: &std::collections::BTreeSet<String>) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        value["unknown_names"] = serde_json::json!(crate::oncall::silence::unknown_in_texts(
            &self.matchers,
            known
        ));
        value
    }
}

/// A heartbeat monitor's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRow {
    pub name: String,
    pub state: HeartbeatState,
    /// When the daemon first watched it (Unix ms): the deadline's base before a beat.
    pub since: i64,
    pub last_beat_at: Option<i64>,
    /// Only a dry run marked it missed: a real daemon has not called for it yet.
    pub missed_dry_run: bool,
}

impl HeartbeatRow {
    /// What the deadline counts from: the last beat, else when watching began.
    pub fn base(&self) -> i64 {
        self.last_beat_at.unwrap_or(self.since)
    }

    /// Whether this miss was already acted on by a daemon of this kind (`dry_run`):
    /// a miss a dry run recorded is still to be called by a real daemon.
    pub fn missed_for(&self, dry_run: bool) -> bool {
        self.state == HeartbeatState::Missed && (dry_run || !self.missed_dry_run)
    }
}

/// An escalation step whose time has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueEscalation {
    pub incident_id: i64,
    pub step: i64,
}

/// What an escalation step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Escalated {
    /// Already done, or gone (pruned).
    Stale,
    /// The incident is bridged or closed: nobody more is rung.
    NotNeeded { status: IncidentStatus },
    /// These calls joined the incident's current round.
    Called { round: i64, calls: Vec<RoutedCall> },
}

impl Store {
    /// The overrides and silences not yet over at `now` (routing's view), with `now`.
    pub async fn policy(&self, now: i64) -> Result<Policy, StoreError> {
        self.run(move |c| {
            let overrides = c
                .prepare_cached(
                    "SELECT id, rotation, who, from_at, until_at FROM overrides WHERE until_at > ?1",
                )?
                .query_map([now], |r| {
                    Ok(Override {
                        id: r.get(0)?,
                        rotation: r.get(1)?,
                        who: r.get(2)?,
                        from: from_ms(r.get(3)?),
                        until: from_ms(r.get(4)?),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let silences = c
                .prepare_cached(
                    "SELECT id, matchers, starts_at, ends_at, comment FROM silences WHERE ends_at > ?1",
                )?
                .query_map([now], |r| {
                    let texts: String = r.get(1)?;
                    let texts: Vec<String> = serde_json::from_str(&texts).unwrap_or_default();
                    Ok(Silence {
                        id: r.get(0)?,
                        // Stored matchers were parsed when added; one that no longer
                        // parses makes the silence match nothing rather than everything.
                        matchers: texts
                            .iter()
                            .map(|t| Matcher::parse(t))
                            .collect::<Result<Vec<_>, _>>()
                            .unwrap_or_default(),
                        starts_at: from_ms(r.get(2)?),
                        ends_at: from_ms(r.get(3)?),
                        comment: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            // In the order they were added: the first silence that matches is the one
            // recorded; the last override added wins.
            let (mut overrides, mut silences) = (overrides, silences);
            overrides.sort_by_key(|o| o.id);
            silences.sort_by_key(|s| s.id);
            Ok(Policy {
                now: from_ms(now),
                overrides,
                silences,
            })
        })
        .await
    }

    /// Stores an override; its id.
    pub async fn add_override(
        &self,
        rotation: String,
        who: String,
        from: i64,
        until: i64,
        created_by: String,
    ) -> Result<i64, StoreError> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO overrides (rotation, who, from_at, until_at, created_at, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![rotation, who, from, until, now_ms(), created_by],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    /// Overrides not over at `now`, in the order they were added.
    pub async fn overrides(&self, now: i64) -> Result<Vec<OverrideRow>, StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "SELECT id, rotation, who, from_at, until_at, created_by FROM overrides
                 WHERE until_at > ?1",
            )?
            .query_map([now], |r| {
                Ok(OverrideRow {
                    id: r.get(0)?,
                    rotation: r.get(1)?,
                    who: r.get(2)?,
                    from: rfc3339(r.get(3)?),
                    until: rfc3339(r.get(4)?),
                    created_by: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map(|mut list| {
                list.sort_by_key(|o| o.id);
                list
            })
        })
        .await
    }

    /// Deletes an override; false if there is none with that id.
    pub async fn remove_override(&self, id: i64) -> Result<bool, StoreError> {
        self.run(move |c| Ok(c.execute("DELETE FROM overrides WHERE id = ?1", [id])? == 1))
            .await
    }

    /// Stores a silence (its matchers already checked); its id.
    pub async fn add_silence(
        &self,
        matchers: Vec<String>,
        starts_at: i64,
        ends_at: i64,
        comment: String,
        created_by: String,
    ) -> Result<i64, StoreError> {
        let matchers = serde_json::to_string(&matchers).unwrap_or_else(|_| "[]".into());
        self.run(move |c| {
            c.execute(
                "INSERT INTO silences (matchers, starts_at, ends_at, comment, created_at, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![matchers, starts_at, ends_at, comment, now_ms(), created_by],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    /// Silences in force (or not yet started) at `now`, oldest first.
    pub async fn silences(&self, now: i64) -> Result<Vec<SilenceRow>, StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "SELECT id, matchers, starts_at, ends_at, comment, created_by FROM silences
                 WHERE ends_at > ?1",
            )?
            .query_map([now], |r| {
                let matchers: String = r.get(1)?;
                Ok(SilenceRow {
                    id: r.get(0)?,
                    matchers: serde_json::from_str(&matchers).unwrap_or_default(),
                    starts_at: rfc3339(r.get(2)?),
                    ends_at: rfc3339(r.get(3)?),
                    comment: r.get(4)?,
                    created_by: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map(|mut list| {
                list.sort_by_key(|s| s.id);
                list
            })
        })
        .await
    }

    /// Ends a silence now; false if there is none with that id still in force.
    pub async fn expire_silence(&self, id: i64, now: i64) -> Result<bool, StoreError> {
        self.run(move |c| {
            Ok(c.execute(
                "UPDATE silences SET ends_at = MAX(starts_at, ?2) WHERE id = ?1 AND ends_at > ?2",
                params![id, now],
            )? == 1)
        })
        .await
    }

    /// The stored state of every heartbeat named, watching those not seen before from
    /// `now` on.
    pub async fn heartbeats(
        &self,
        names: Vec<String>,
        now: i64,
    ) -> Result<Vec<HeartbeatRow>, StoreError> {
        self.run(move |c| {
            let mut insert = c.prepare_cached(
                "INSERT INTO heartbeats (name, state, since) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
            )?;
            let mut select = c.prepare_cached(
                "SELECT state, since, last_beat_at, missed_dry_run FROM heartbeats WHERE name = ?1",
            )?;
            let mut rows = Vec::with_capacity(names.len());
            for name in names {
                insert.execute(params![name, HeartbeatState::Waiting, now])?;
                let (state, since, last_beat_at, missed_dry_run) = select
                    .query_row([&name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                rows.push(HeartbeatRow {
                    name,
                    state,
                    since,
                    last_beat_at,
                    missed_dry_run,
                });
            }
            Ok(rows)
        })
        .await
    }

    /// A heartbeat missed its deadline: in one transaction, checks that it is still
    /// the same wait (no beat came since `base`, not already missed), marks it missed
    /// and stores `alert`, which the router turns into an incident. The alert's id, or
    /// `None` when a beat or another pass got there first, or while mail received
    /// before now is not routed yet (it may be the beat; the next pass looks again).
    pub async fn heartbeat_missed(
        &self,
        name: String,
        base: i64,
        alert: NewAlert,
    ) -> Result<Option<i64>, StoreError> {
        let dry_run = self.dry_run;
        self.run(move |c| {
            let now = now_ms();
            // A mail that arrived before the deadline and is not routed yet may be the
            // beat: the deadline is judged once the router has caught up.
            let unrouted = c
                .prepare_cached(
                    "SELECT 1 FROM alerts WHERE state = 'received' AND received_at <= ?1 LIMIT 1",
                )?
                .exists([now])?;
            if unrouted {
                return Ok(None);
            }
            // Not missed yet for this kind of daemon: a real one takes over a miss only
            // a dry run recorded (and calls for it), never the other way round.
            let changed = c.execute(
                "UPDATE heartbeats SET state = ?2, missed_at = ?3, missed_dry_run = ?5
                 WHERE name = ?1 AND (state != 'missed' OR (missed_dry_run = 1 AND ?5 = 0))
                   AND COALESCE(last_beat_at, since) = ?4",
                params![name, HeartbeatState::Missed, now, base, dry_run],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            insert_alert_row(c, &alert, dry_run, now).map(Some)
        })
        .await
    }
}

/// Records a beat of heartbeat `name` that arrived `at` (in the routing transaction).
/// Beats routed out of order never move the last beat back.
pub(super) fn beat(c: &Connection, name: &str, at: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO heartbeats (name, state, since, last_beat_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (name) DO UPDATE SET state = ?2, last_beat_at = MAX(COALESCE(last_beat_at, ?3), ?3),
                                          missed_at = NULL, missed_dry_run = 0",
    )?
    .execute(params![name, HeartbeatState::Ok, at])?;
    Ok(())
}

/// Is silence `id` still in force at `now`? (It may have been expired since routing
/// read it.)
pub(super) fn silence_in_force(c: &Connection, id: i64, now: i64) -> rusqlite::Result<bool> {
    Ok(c.prepare_cached(
        "SELECT 1 FROM silences WHERE id = ?1 AND starts_at <= ?2 AND ends_at > ?2",
    )?
    .query_row(params![id, now], |_| Ok(()))
    .optional()?
    .is_some())
}

/// A silenced incident with `key` opened after `since`, of the same kind of run: later
/// muted alerts join it. Its id and new alert count.
pub(super) fn join_silenced(
    c: &Connection,
    key: &str,
    dry_run: bool,
    since: i64,
    now: i64,
) -> rusqlite::Result<Option<(i64, i64)>> {
    let Some(id) = c
        .prepare_cached(
            "SELECT id FROM incidents WHERE dedup_key = ?1 AND status = 'silenced' AND dry_run = ?2
               AND opened_at > ?3 ORDER BY opened_at DESC LIMIT 1",
        )?
        .query_row(params![key, dry_run, since], |r| r.get::<_, i64>(0))
        .optional()?
    else {
        return Ok(None);
    };
    let count = c
        .prepare_cached(
            "UPDATE incidents SET alert_count = alert_count + 1, last_alert_at = ?2, closed_at = ?2
             WHERE id = ?1 RETURNING alert_count",
        )?
        .query_row(params![id, now], |r| r.get(0))?;
    Ok(Some((id, count)))
}

/// Records a new incident's escalation steps, each due `after` its opening.
pub(super) fn insert_escalations(
    c: &Connection,
    incident_id: i64,
    opened_at: i64,
    steps: &[EscalationStep],
) -> rusqlite::Result<()> {
    for (step, e) in (1..).zip(steps) {
        c.prepare_cached(
            "INSERT INTO escalations (incident_id, step, due_at, numbers) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            incident_id,
            step,
            opened_at.saturating_add(ms(e.after)),
            serde_json::to_string(&e.numbers).unwrap_or_else(|_| "[]".into())
        ])?;
    }
    Ok(())
}

impl Store {
    /// Escalation steps due at `now`, oldest first; only dry runs' unless `real` (as
    /// for rounds).
    pub async fn due_escalations(
        &self,
        now: i64,
        real: bool,
    ) -> Result<Vec<DueEscalation>, StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "SELECT e.incident_id, e.step FROM escalations e
                 WHERE e.state = 'pending' AND e.due_at <= ?1
                   AND (?2 OR EXISTS (SELECT 1 FROM incidents i WHERE i.id = e.incident_id AND i.dry_run = 1))
                 ORDER BY e.due_at LIMIT 256",
            )?
            .query_map(params![now, real], |r| {
                Ok(DueEscalation {
                    incident_id: r.get(0)?,
                    step: r.get(1)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// Runs an escalation step in one transaction: if its incident is still open (nobody
    /// in the bridge), its numbers join the current round — queued for the placer
    /// within the hourly budget, like any round's calls; a number already called in
    /// this round, or that declined, is not called again. Otherwise the step is not
    /// needed.
    pub async fn escalate(
        &self,
        due: DueEscalation,
        max_calls_per_hour: u32,
    ) -> Result<Escalated, StoreError> {
        self.run(move |c| escalate(c, due, max_calls_per_hour))
            .await
    }
}

fn escalate(
    c: &Connection,
    due: DueEscalation,
    max_calls_per_hour: u32,
) -> rusqlite::Result<Escalated> {
    let now = now_ms();
    let Some(numbers) = c
        .prepare_cached(
            "SELECT numbers FROM escalations WHERE incident_id = ?1 AND step = ?2 AND state = 'pending'",
        )?
        .query_row(params![due.incident_id, due.step], |r| r.get::<_, String>(0))
        .optional()?
    else {
        return Ok(Escalated::Stale);
    };
    let (status, round, kind, dry_run): (IncidentStatus, i64, IncidentKind, bool) = c
        .prepare_cached("SELECT status, round, kind, dry_run FROM incidents WHERE id = ?1")?
        .query_row([due.incident_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    let done = |state: EscalationState| {
        c.prepare_cached(
            "UPDATE escalations SET state = ?3, done_at = ?4 WHERE incident_id = ?1 AND step = ?2",
        )?
        .execute(params![due.incident_id, due.step, state, now])
    };
    if status != IncidentStatus::Open {
        done(EscalationState::NotNeeded)?;
        return Ok(Escalated::NotNeeded { status });
    }
    let numbers: Vec<String> = serde_json::from_str(&numbers).unwrap_or_default();
    let mut called = c.prepare_cached(
        "SELECT 1 FROM calls WHERE incident_id = ?1 AND number = ?2
           AND ((round = ?3 AND state != 'skipped') OR answered_by IS 'declined') LIMIT 1",
    )?;
    let mut targets = Vec::with_capacity(numbers.len());
    for number in numbers {
        if called
            .query_row(params![due.incident_id, number, round], |_| Ok(()))
            .optional()?
            .is_none()
        {
            // A number whose call from an earlier round still rings is skipped, as a
            // round skips it.
            let skip = super::incidents::still_live(c, due.incident_id, &number)?;
            targets.push((number, skip));
        }
    }
    let target = CallTarget {
        incident_id: due.incident_id,
        round,
        kind,
        dry_run,
    };
    let calls = insert_calls(c, &target, &targets, now, max_calls_per_hour)?;
    done(EscalationState::Called)?;
    Ok(Escalated::Called { round, calls })
}
