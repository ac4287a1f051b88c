//! Incidents after their first calls: rounds until someone is in the bridge (each end
//! of a round is one transaction that first checks the incident is still open and in
//! that round), the bridge itself, the lookups Twilio's callbacks need, and the reports
//! `mailcall incidents` prints.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::calls::add_event;
use super::routing::{CallTarget, RoutedCall, insert_calls};
use super::{
    AttemptState, CallState, IncidentKind, IncidentStatus, RoundOutcome, Store, StoreError,
    TwilioStatus, now_ms, rfc3339,
};

/// An incident whose round is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRound {
    pub incident_id: i64,
    pub public_id: String,
    pub round: i64,
    pub rounds: i64,
    pub dry_run: bool,
    /// Its calls ask to press 1: a person is one who did (else AMD and polling tell).
    pub press_one: bool,
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundEnd {
    /// The incident is no longer open in that round (resolved or bridged meanwhile,
    /// or the round already ended): nothing was done.
    Stale,
    /// Someone is in the bridge: no more rounds.
    Bridged { round: i64 },
    /// Nobody joined: round `round` starts with these calls.
    NextRound { round: i64, calls: Vec<RoutedCall> },
    /// Nobody joined in any of the `rounds` rounds.
    Unanswered { rounds: i64 },
    /// The last round is up, but some of its calls have not rung out yet (still to be
    /// placed, retried or settled, or ringing): it ends once they have, looked at
    /// again after `wait_ms`.
    LastCallsPending { wait_ms: i64 },
}

/// How often a last round whose calls are still under way is looked at again.
const LAST_ROUND_RECHECK_MS: i64 = 2_000;
/// The longest a last round waits for a placed call that is still live: longer than
/// any ring (`ring_seconds` is at most 600).
const LIVE_CALL_WAIT_MS: i64 = 11 * 60 * 1000;

/// A placed call that may still be live, for the end of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCall {
    pub call_id: i64,
    pub sid: String,
    pub number: String,
    pub answered_by: Option<String>,
}

/// An incident as `mailcall incidents` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IncidentReport {
    pub id: i64,
    pub public_id: String,
    pub kind: IncidentKind,
    pub dry_run: bool,
    /// RFC 3339, UTC.
    pub opened_at: String,
    /// RFC 3339, UTC; `None` while open or bridged.
    pub closed_at: Option<String>,
    pub rule: String,
    pub dedup_key: String,
    pub alert_count: i64,
    pub status: IncidentStatus,
    /// The silence that muted it (`status` is `silenced`).
    pub silence_id: Option<i64>,
    /// Each round of calls and how it ended.
    pub rounds: Vec<RoundReport>,
    pub calls: Vec<CallReport>,
}

/// One round of calls of an incident.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundReport {
    pub round: i64,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// `None` while the round goes on.
    pub outcome: Option<RoundOutcome>,
}

/// One number of one round of an incident.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallReport {
    pub number: String,
    pub status: CallState,
    pub sid: Option<String>,
    pub error_code: Option<i64>,
    pub error: Option<String>,
    /// Requests sent to Twilio for this call.
    pub attempts: i64,
    /// The round this call belongs to.
    pub round: i64,
    /// Twilio's `answered_by` (`human`, `machine_start`, `unknown`…), or `declined`.
    pub answered_by: Option<String>,
    /// The call's last status at Twilio, as learned from callbacks or polling.
    pub twilio_status: Option<TwilioStatus>,
    /// Every request to Twilio, oldest first.
    pub requests: Vec<AttemptReport>,
    /// What else happened (callbacks, SMS, voicemail), oldest first.
    pub events: Vec<EventReport>,
}

/// One request to Twilio for a call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptReport {
    pub id: i64,
    /// RFC 3339, UTC.
    pub requested_at: String,
    pub state: AttemptState,
    pub sid: Option<String>,
    pub http_status: Option<i64>,
    pub error_code: Option<i64>,
    pub error: Option<String>,
    /// How an unknown outcome was settled: `status callback`, `call list`, or why the
    /// call was sent again.
    pub reconciled: Option<String>,
}

/// One line of a call's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventReport {
    /// RFC 3339, UTC.
    pub at: String,
    pub event: String,
}

impl Store {
    /// Open incidents whose current round's time is up; only dry runs' unless `real`
    /// (a dry-run daemon cannot look at real bridges, so it leaves them alone).
    pub async fn due_rounds(&self, now: i64, real: bool) -> Result<Vec<DueRound>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, public_id, round, rounds, dry_run, press_one FROM incidents
                 WHERE next_round_at IS NOT NULL AND next_round_at <= ?1 AND status = 'open'
                   AND (?2 OR dry_run = 1)
                 ORDER BY next_round_at",
            )?;
            let rows = stmt.query_map(params![now, real], |r| {
                Ok(DueRound {
                    incident_id: r.get(0)?,
                    public_id: r.get(1)?,
                    round: r.get(2)?,
                    rounds: r.get(3)?,
                    dry_run: r.get(4)?,
                    press_one: r.get(5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The incident's placed calls that may still ring or be on (their last known
    /// status is live, or unknown).
    pub async fn live_calls(&self, incident_id: i64) -> Result<Vec<LiveCall>, StoreError> {
        self.live_calls_where("c.incident_id = ?1", incident_id)
            .await
    }

    /// Placed calls of bridged incidents that may still be on (at most `limit`).
    pub async fn bridged_live_calls(&self, limit: usize) -> Result<Vec<LiveCall>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.live_calls_where("i.status = 'bridged' LIMIT ?1", limit)
            .await
    }

    /// Placed calls that may still be live, of incidents chosen by `filter` (SQL over
    /// `calls c` and `incidents i`, with one parameter).
    async fn live_calls_where(
        &self,
        filter: &'static str,
        param: i64,
    ) -> Result<Vec<LiveCall>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT c.id, c.sid, c.number, c.answered_by FROM calls c JOIN incidents i ON i.id = c.incident_id
                 WHERE c.state = 'placed' AND c.sid IS NOT NULL
                   AND (c.twilio_status IS NULL OR c.twilio_status IN ('queued', 'initiated', 'ringing', 'in-progress'))
                   AND {filter}"
            ))?;
            let rows = stmt.query_map([param], |r| {
                Ok(LiveCall {
                    call_id: r.get(0)?,
                    sid: r.get(1)?,
                    number: r.get(2)?,
                    answered_by: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Who answered the call Twilio knows as `sid`, if it is one of ours.
    pub async fn answered_by(&self, sid: &str) -> Result<Option<Option<String>>, StoreError> {
        let sid = sid.to_string();
        self.run(move |c| {
            c.prepare_cached("SELECT answered_by FROM calls WHERE sid = ?1")?
                .query_row([sid], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// Ends round `round` of an open incident, in one transaction that first checks
    /// the incident is still open and in that round. `bridged` ends the calling;
    /// otherwise the next round calls everyone again (within the budget) but those who
    /// declined and those whose call is still live or still being placed, who are
    /// recorded as skipped; after the last round the incident is unanswered.
    pub async fn finish_round(
        &self,
        incident_id: i64,
        round: i64,
        bridged: bool,
        max_calls_per_hour: u32,
    ) -> Result<RoundEnd, StoreError> {
        self.run(move |c| finish_round(c, incident_id, round, bridged, max_calls_per_hour))
            .await
    }

    /// Someone is in the bridge (a join callback, a press of 1, a human answer): the
    /// incident is bridged, no more rounds. True when this changed it.
    pub async fn mark_bridged(&self, incident_id: i64) -> Result<bool, StoreError> {
        self.run(move |c| {
            let changed = c.execute(
                "UPDATE incidents SET status = ?2, next_round_at = NULL WHERE id = ?1 AND status = 'open'",
                params![incident_id, IncidentStatus::Bridged],
            )?;
            if changed == 1 {
                c.execute(
                    "UPDATE rounds SET outcome = ?2 WHERE incident_id = ?1 AND outcome IS NULL",
                    params![incident_id, RoundOutcome::Bridged],
                )?;
            }
            Ok(changed == 1)
        })
        .await
    }

    /// The call Twilio knows as `sid`: `(call id, incident id, number)`.
    pub async fn call_by_sid(&self, sid: &str) -> Result<Option<(i64, i64, String)>, StoreError> {
        let sid = sid.to_string();
        self.run(move |c| {
            c.prepare_cached("SELECT id, incident_id, number FROM calls WHERE sid = ?1")?
                .query_row([sid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .await
    }

    /// An incident by its public id (the room name): `(id, status)`.
    pub async fn incident_by_public_id(
        &self,
        public_id: &str,
    ) -> Result<Option<(i64, IncidentStatus)>, StoreError> {
        let public_id = public_id.to_string();
        self.run(move |c| {
            c.prepare_cached("SELECT id, status FROM incidents WHERE public_id = ?1")?
                .query_row([public_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .await
    }

    /// The public URL the callbacks of a press-1 incident come to: the incident's by its
    /// public id (`room`), or the incident of a request (`attempt`).
    pub async fn callback_base(
        &self,
        room: Option<String>,
        attempt: Option<i64>,
    ) -> Result<Option<String>, StoreError> {
        self.run(move |c| {
            if let Some(room) = room {
                return c
                    .prepare_cached("SELECT public_url FROM incidents WHERE public_id = ?1")?
                    .query_row([room], |r| r.get::<_, Option<String>>(0))
                    .optional()
                    .map(Option::flatten);
            }
            let Some(attempt) = attempt else {
                return Ok(None);
            };
            c.prepare_cached(
                "SELECT i.public_url FROM attempts a JOIN calls c ON c.id = a.call_id
                 JOIN incidents i ON i.id = c.incident_id WHERE a.id = ?1",
            )?
            .query_row([attempt], |r| r.get::<_, Option<String>>(0))
            .optional()
            .map(Option::flatten)
        })
        .await
    }

    /// The language and voice an incident's calls speak, by its public id.
    pub async fn incident_voice(
        &self,
        public_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let public_id = public_id.to_string();
        self.run(move |c| {
            c.prepare_cached("SELECT language, voice FROM incidents WHERE public_id = ?1")?
                .query_row([public_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .await
    }

    /// The newest live incident a dial-in joins: `(id, public id)`. Never the canary's
    /// or a dry run's.
    pub async fn newest_open_incident(&self) -> Result<Option<(i64, String)>, StoreError> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT id, public_id FROM incidents
                 WHERE status IN ('open', 'bridged') AND kind = 'alert' AND dry_run = 0
                 ORDER BY opened_at DESC, id DESC LIMIT 1",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })
        .await
    }

    /// A person declined (pressed 9): not called again for this incident.
    pub async fn decline(&self, call_id: i64) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute(
                "UPDATE calls SET answered_by = 'declined' WHERE id = ?1",
                [call_id],
            )?;
            add_event(c, call_id, "declined")
        })
        .await
    }

    /// Recent incidents, newest first, from a read-only connection: works while a
    /// daemon has the store open.
    pub fn incidents(path: &Path, limit: usize) -> Result<Vec<IncidentReport>, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let c = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        c.busy_timeout(Duration::from_secs(5))?;
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        let known = i64::try_from(super::schema::MIGRATIONS.len()).unwrap_or(i64::MAX);
        if version == 0 {
            return Ok(Vec::new());
        }
        if version < known {
            return Err(StoreError::Outdated {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        Ok(reports(
            &c,
            "ORDER BY id DESC LIMIT ?1",
            i64::try_from(limit).unwrap_or(i64::MAX),
        )?)
    }

    /// One incident, through the store's own connection.
    pub async fn incident(&self, id: i64) -> Result<Option<IncidentReport>, StoreError> {
        self.run(move |c| Ok(reports(c, "WHERE id = ?1", id)?.pop()))
            .await
    }
}

fn finish_round(
    c: &Connection,
    incident_id: i64,
    round: i64,
    bridged: bool,
    max_calls_per_hour: u32,
) -> rusqlite::Result<RoundEnd> {
    let now = now_ms();
    let (status, current, rounds, interval, kind, dry_run): (
        IncidentStatus,
        i64,
        i64,
        i64,
        IncidentKind,
        bool,
    ) = c.query_row(
        "SELECT status, round, rounds, round_interval_ms, kind, dry_run FROM incidents WHERE id = ?1",
        [incident_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
    )?;
    if status != IncidentStatus::Open || current != round {
        return Ok(RoundEnd::Stale);
    }
    let end_round = |outcome: RoundOutcome| {
        c.execute(
            "UPDATE rounds SET outcome = ?3 WHERE incident_id = ?1 AND round = ?2",
            params![incident_id, round, outcome],
        )
    };
    if bridged {
        end_round(RoundOutcome::Bridged)?;
        c.execute(
            "UPDATE incidents SET status = ?2, next_round_at = NULL WHERE id = ?1",
            params![incident_id, IncidentStatus::Bridged],
        )?;
        return Ok(RoundEnd::Bridged { round });
    }
    if round >= rounds {
        // "Nobody answered" only once everybody could have: a call still to be placed
        // (a 503 with a long Retry-After, a request being reconciled) or still ringing
        // may yet reach a person, and a recovery must still find the incident open to
        // cancel what has not gone out. A call whose answerer is known (a machine, or
        // AMD's `unknown`) decides nothing more however long it stays up; one whose
        // status nobody reported yet (callbacks late, status reads failing) may be
        // ringing. None is waited for longer than `LIVE_CALL_WAIT_MS` after it was
        // placed.
        let pending = c
            .prepare_cached(
                "SELECT 1 FROM calls WHERE incident_id = ?1
                   AND (state IN ('queued', 'requesting', 'unknown', 'retrying')
                        OR (state = 'placed' AND answered_by IS NULL AND updated_at > ?2
                            AND (twilio_status IS NULL
                                 OR twilio_status IN ('queued', 'initiated', 'ringing', 'in-progress'))))
                 LIMIT 1",
            )?
            .exists(params![incident_id, now.saturating_sub(LIVE_CALL_WAIT_MS)])?;
        if pending {
            c.execute(
                "UPDATE incidents SET next_round_at = ?2 WHERE id = ?1",
                params![incident_id, now.saturating_add(LAST_ROUND_RECHECK_MS)],
            )?;
            return Ok(RoundEnd::LastCallsPending {
                wait_ms: LAST_ROUND_RECHECK_MS,
            });
        }
    }
    end_round(RoundOutcome::NobodyJoined)?;
    if round >= rounds {
        c.execute(
            "UPDATE incidents SET status = ?2, next_round_at = NULL, closed_at = ?3 WHERE id = ?1",
            params![incident_id, IncidentStatus::Unanswered, now],
        )?;
        return Ok(RoundEnd::Unanswered { rounds });
    }
    let next = round + 1;
    // Everyone of the incident again, in the order first called, but those who
    // declined (pressed 9); a number whose last call is still live or still being
    // placed is skipped, with the reason.
    let numbers: Vec<String> = c
        .prepare_cached(
            "SELECT number FROM calls WHERE incident_id = ?1 GROUP BY number
             HAVING SUM(answered_by IS 'declined') = 0 ORDER BY MIN(id)",
        )?
        .query_map([incident_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut targets = Vec::with_capacity(numbers.len());
    for number in numbers {
        let skip = still_live(c, incident_id, &number)?;
        targets.push((number, skip));
    }
    c.execute(
        "UPDATE incidents SET round = ?2, next_round_at = ?3 WHERE id = ?1",
        params![incident_id, next, now.saturating_add(interval)],
    )?;
    c.execute(
        "INSERT INTO rounds (incident_id, round, started_at) VALUES (?1, ?2, ?3)",
        params![incident_id, next, now],
    )?;
    let target = CallTarget {
        incident_id,
        round: next,
        kind,
        dry_run,
    };
    let calls = insert_calls(c, &target, &targets, now, max_calls_per_hour)?;
    Ok(RoundEnd::NextRound { round: next, calls })
}

/// Why `number` must not be called again for the incident now, if so: its last call
/// (of any round) is still live — queued, being retried or requested, ringing, in
/// progress. Rounds and escalation steps both ask, so neither rings a phone that
/// already rings.
pub(super) fn still_live(
    c: &Connection,
    incident_id: i64,
    number: &str,
) -> rusqlite::Result<Option<String>> {
    let last: Option<(i64, CallState, Option<TwilioStatus>, i64)> = c
        .prepare_cached(
            "SELECT round, state, twilio_status, attempts FROM calls
             WHERE incident_id = ?1 AND number = ?2 AND state != 'skipped' ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![incident_id, number], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    Ok(last.and_then(|(of, state, status, attempts)| {
        let doing = match state {
            CallState::Queued if attempts == 0 => "is still waiting to be placed",
            CallState::Queued | CallState::Retrying => "is still being retried",
            CallState::Requesting | CallState::Unknown => "is still being requested",
            CallState::Placed => match status.filter(|s| s.is_live()) {
                Some(TwilioStatus::InProgress) => "is still in progress",
                Some(_) => "is still ringing",
                None => return None,
            },
            _ => return None,
        };
        Some(format!("its call from round {of} {doing}"))
    }))
}

/// Incident reports with their rounds, calls, requests and events; `filter` follows
/// `FROM incidents` and takes one parameter.
fn reports(c: &Connection, filter: &str, param: i64) -> rusqlite::Result<Vec<IncidentReport>> {
    let mut stmt = c.prepare(&format!(
        "SELECT id, public_id, kind, dry_run, opened_at, closed_at, rule, dedup_key, alert_count, status, silence_id
         FROM incidents {filter}"
    ))?;
    let mut incidents = stmt
        .query_map([param], |r| {
            Ok(IncidentReport {
                id: r.get(0)?,
                public_id: r.get(1)?,
                kind: r.get(2)?,
                dry_run: r.get(3)?,
                opened_at: rfc3339(r.get(4)?),
                closed_at: r.get::<_, Option<i64>>(5)?.map(rfc3339),
                rule: r.get(6)?,
                dedup_key: r.get(7)?,
                alert_count: r.get(8)?,
                status: r.get(9)?,
                silence_id: r.get(10)?,
                rounds: Vec::new(),
                calls: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut rounds = c.prepare_cached(
        "SELECT round, started_at, outcome FROM rounds WHERE incident_id = ?1 ORDER BY round",
    )?;
    let mut calls = c.prepare_cached(
        "SELECT id, number, state, sid, error_code, error, attempts, round, answered_by, twilio_status
         FROM calls WHERE incident_id = ?1 ORDER BY id",
    )?;
    let mut attempts = c.prepare_cached(
        "SELECT id, requested_at, state, sid, http_status, error_code, error, reconciled
         FROM attempts WHERE call_id = ?1 ORDER BY id",
    )?;
    let mut events =
        c.prepare_cached("SELECT at, event FROM call_events WHERE call_id = ?1 ORDER BY id")?;
    for incident in &mut incidents {
        incident.rounds = rounds
            .query_map([incident.id], |r| {
                Ok(RoundReport {
                    round: r.get(0)?,
                    started_at: rfc3339(r.get(1)?),
                    outcome: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let rows: Vec<(i64, CallReport)> = calls
            .query_map([incident.id], |r| {
                Ok((
                    r.get(0)?,
                    CallReport {
                        number: r.get(1)?,
                        status: r.get(2)?,
                        sid: r.get(3)?,
                        error_code: r.get(4)?,
                        error: r.get(5)?,
                        attempts: r.get(6)?,
                        round: r.get(7)?,
                        answered_by: r.get(8)?,
                        twilio_status: r.get(9)?,
                        requests: Vec::new(),
                        events: Vec::new(),
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (id, mut call) in rows {
            call.requests = attempts
                .query_map([id], |r| {
                    Ok(AttemptReport {
                        id: r.get(0)?,
                        requested_at: rfc3339(r.get(1)?),
                        state: r.get(2)?,
                        sid: r.get(3)?,
                        http_status: r.get(4)?,
                        error_code: r.get(5)?,
                        error: r.get(6)?,
                        reconciled: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            call.events = events
                .query_map([id], |r| {
                    Ok(EventReport {
                        at: rfc3339(r.get(0)?),
                        event: r.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            incident.calls.push(call);
        }
    }
    Ok(incidents)
}
