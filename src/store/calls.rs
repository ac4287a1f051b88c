//! Placing calls and settling what became of each request, as recovery points in the
//! store (Brandur Leach's "atomic phases"): a request is committed as a `requesting`
//! attempt before it leaves ([`Store::claim`]), its answer is committed after
//! ([`Store::record_attempt`]), and an attempt whose answer never came is `unknown`
//! until the reconciler settles it ([`Store::settle`]). Twilio's `Calls.json` has no
//! idempotency key, so an `unknown` attempt is never simply sent again.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AttemptState, CallState, IncidentKind, IncidentStatus, SmsState, Store, StoreError, now_ms,
};
use crate::store::TwilioStatus;

/// One call to place: what the placer needs to request it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallJob {
    pub call_id: i64,
    pub incident_id: i64,
    /// The rule that decided the call, for the log.
    pub rule: String,
    pub number: String,
    pub twiml: String,
    /// When the call was decided, in Unix milliseconds; retries stop `retry_for` later.
    pub created_at: i64,
    /// Requests made for this call so far.
    pub attempts: i64,
    /// A canary call (counted apart from incidents' calls).
    pub canary: bool,
    /// The SMS summary to send once the call is placed (`sms = true`).
    pub sms: Option<String>,
    /// For the first request of an incident's first round: when its alert was stored
    /// (Unix milliseconds), for the latency metric.
    pub received_at: Option<i64>,
    /// The incident's calls ask to press 1; else answering-machine detection is on.
    pub press_one: bool,
    /// The public URL the incident was opened with (press-1 incidents).
    pub public_url: Option<String>,
}

/// The SMS summary of an incident.
pub fn sms_text(incident_id: i64, subject: &str) -> String {
    let text = format!("mailcall incident #{incident_id}: {subject}");
    // Twilio takes up to 1,600 characters.
    text.chars().take(1600).collect()
}

/// How an attempt settled by its status callback says so.
pub const CALLBACK: &str = "status callback";
/// How an attempt settled by Twilio's call list says so.
pub const CALL_LIST: &str = "call list";
/// How a request given up (`absent`, `undecided`) is settled when its status callback
/// comes after all.
pub const CALLBACK_LATE: &str = "status callback, late: the request had been given up";

/// What [`Store::record_attempt`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The attempt's state afterwards.
    pub state: AttemptState,
    /// This answer decided it (rather than a status callback or the reconciler first).
    pub decided: bool,
    /// How it was settled when something else decided it (`status callback`, …).
    pub reconciled: Option<String>,
    /// Twilio refused this request, but an earlier request of the call did make a call
    /// (it showed up late while this one was out): the call is `placed` by it.
    pub placed_earlier: bool,
}

/// Whether a call may be requested now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The attempt is committed as `requesting`: send it.
    Go { attempt_id: i64 },
    /// The call is no longer waiting (canceled by a resolution, or already under way).
    Gone(CallState),
    /// A request to the same number is in flight: one at a time, so that a call found
    /// in Twilio's list can only be one request's.
    Busy,
    /// An earlier request of the call did make a call (it showed up late): the call is
    /// now `placed`, and nothing is sent.
    Placed,
}

/// Twilio's answer to one request, as the placer classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Twilio created the call.
    Placed { sid: String },
    /// Twilio answered an error: no call exists. Tried again at `retry_at`, or never.
    Failed {
        http_status: Option<u16>,
        code: Option<i64>,
        error: String,
        retry_at: Option<i64>,
    },
    /// No answer to rely on (timeout, connection lost after sending): a call may exist.
    Unknown { error: String },
}

/// How the reconciler settles an unknown attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Twilio has the call: this SID (owned by no other attempt) is the attempt's.
    Found { sid: String, how: &'static str },
    /// No such call appeared within the grace period: the call is sent again.
    Absent { how: String },
    /// Twilio could not tell; the call is sent again (ringing twice beats missing),
    /// but only once per call.
    Undecided { reason: String },
}

/// An attempt whose outcome is not settled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    pub attempt_id: i64,
    pub call_id: i64,
    pub incident_id: i64,
    pub number: String,
    /// The caller ID the request used.
    pub from_number: String,
    pub requested_at: i64,
    /// A call Twilio created for this request was created before this (Unix ms).
    pub window_end: i64,
    pub state: AttemptState,
    /// Earlier requests of the same call settled `absent`: each one more makes the
    /// grace for this one longer (a call list that lags is given the time it takes).
    pub absent_before: i64,
}

/// A request settled `absent` whose call may still show up in the list, late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsentAttempt {
    pub attempt_id: i64,
    pub requested_at: i64,
    pub window_end: i64,
}

/// Requests of a call settled `absent` that are sent again, at most; then the call is
/// `failed`. Each absence waits twice as long as the one before (`reconcile_grace`,
/// then 2×, 4×, 8×), so a list that lags behind the grace still shows the calls in time.
pub const MAX_ABSENT: i64 = 4;

/// How long a placed call's SMS summary stays owed before it is given up (`owed_sms`).
const SMS_STALE_MS: i64 = 60 * 60 * 1000;

/// What a settlement did, for the log and the SMS summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub call: CallJob,
    /// The call's state afterwards.
    pub state: CallState,
    /// The attempt's state before: `requesting` (its request still out: the placer
    /// follows up when its answer comes) or `unknown` (nobody waits for it).
    pub was: AttemptState,
}

/// A placed call whose answerer or status is still to be learned by polling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedCall {
    pub call_id: i64,
    pub incident_id: i64,
    pub sid: String,
    pub number: String,
    pub message: String,
    pub language: String,
    pub voice: String,
}

const JOB_COLUMNS: &str = "c.id, c.incident_id, i.rule, c.number, i.twiml, c.created_at, c.attempts, i.kind, i.sms, i.subject,
     CASE WHEN c.round = 1 AND c.attempts = 0 THEN i.first_received_at END, i.press_one, i.public_url";

fn job(r: &rusqlite::Row<'_>) -> rusqlite::Result<CallJob> {
    let incident_id: i64 = r.get(1)?;
    let kind: IncidentKind = r.get(7)?;
    let sms: bool = r.get(8)?;
    Ok(CallJob {
        call_id: r.get(0)?,
        incident_id,
        rule: r.get(2)?,
        number: r.get(3)?,
        twiml: r.get(4)?,
        created_at: r.get(5)?,
        attempts: r.get(6)?,
        canary: kind == IncidentKind::Canary,
        sms: (sms && kind == IncidentKind::Alert)
            .then(|| sms_text(incident_id, &r.get::<_, String>(9).unwrap_or_default())),
        received_at: r.get(10)?,
        press_one: r.get(11)?,
        public_url: r.get(12)?,
    })
}

fn call_job(c: &Connection, call_id: i64) -> rusqlite::Result<CallJob> {
    c.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM calls c JOIN incidents i ON i.id = c.incident_id WHERE c.id = ?1"
    ))?
    .query_row([call_id], job)
}

impl Store {
    /// Calls waiting to be requested whose time has come, oldest first: the oldest of
    /// each number, and none of a number with a request in flight.
    pub async fn due_calls(&self, now: i64, limit: usize) -> Result<Vec<CallJob>, StoreError> {
        self.run(move |c| {
            // The numbers with waiting calls, one index seek each (a loose index scan:
            // a backlog of thousands of calls to a few numbers costs a few seeks), then
            // each number's oldest waiting call.
            let mut stmt = c.prepare_cached(&format!(
                "WITH RECURSIVE numbers(number) AS (
                     SELECT MIN(number) FROM calls WHERE state IN ('queued', 'retrying')
                     UNION ALL
                     SELECT (SELECT MIN(number) FROM calls
                             WHERE state IN ('queued', 'retrying') AND number > numbers.number)
                     FROM numbers WHERE numbers.number IS NOT NULL
                 )
                 SELECT {JOB_COLUMNS} FROM numbers n
                 JOIN calls c ON c.id = (SELECT id FROM calls
                                         WHERE state IN ('queued', 'retrying') AND number = n.number
                                         ORDER BY next_attempt_at, id LIMIT 1)
                 JOIN incidents i ON i.id = c.incident_id
                 WHERE c.next_attempt_at <= ?1
                   AND NOT EXISTS (SELECT 1 FROM calls r WHERE r.state = 'requesting' AND r.number = n.number)
                 ORDER BY c.next_attempt_at, c.id LIMIT ?2"
            ))?;
            let rows =
                stmt.query_map(params![now, i64::try_from(limit).unwrap_or(i64::MAX)], job)?;
            rows.collect()
        })
        .await
    }

    /// When the next waiting call is due (Unix milliseconds), if any waits.
    pub async fn next_call_due(&self) -> Result<Option<i64>, StoreError> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT MIN(next_attempt_at) FROM calls WHERE state IN ('queued', 'retrying')",
            )?
            .query_row([], |r| r.get(0))
        })
        .await
    }

    /// Commits a new `requesting` attempt for a waiting call, before its request
    /// leaves, unless a request to the same number is in flight. `window_ms` bounds
    /// when Twilio can have created a call for it.
    pub async fn claim(
        &self,
        call_id: i64,
        from_number: &str,
        window_ms: i64,
    ) -> Result<Claim, StoreError> {
        let from_number = from_number.to_string();
        self.run(move |c| {
            let (state, number): (CallState, String) = c
                .prepare_cached("SELECT state, number FROM calls WHERE id = ?1")?
                .query_row([call_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            if !matches!(state, CallState::Queued | CallState::Retrying) {
                return Ok(Claim::Gone(state));
            }
            if resolved(c, call_id)? {
                cancel(c, call_id, now_ms())?;
                return Ok(Claim::Gone(CallState::Canceled));
            }
            // An earlier request's call showed up while this one waited to be sent
            // again: the call is placed, and nothing more is sent.
            if let Some(sid) = placed_attempt(c, call_id)? {
                place_found_late(c, call_id, &sid, now_ms())?;
                return Ok(Claim::Placed);
            }
            let busy = c
                .prepare_cached("SELECT 1 FROM calls WHERE number = ?1 AND state = 'requesting'")?
                .exists([&number])?;
            if busy {
                return Ok(Claim::Busy);
            }
            let now = now_ms();
            c.prepare_cached(
                "INSERT INTO attempts (call_id, state, requested_at, window_end, from_number) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                call_id,
                AttemptState::Requesting,
                now,
                now.saturating_add(window_ms),
                from_number
            ])?;
            let attempt_id = c.last_insert_rowid();
            c.prepare_cached(
                "UPDATE calls SET state = ?2, next_attempt_at = NULL, attempts = attempts + 1, updated_at = ?3 WHERE id = ?1",
            )?
            .execute(params![call_id, CallState::Requesting, now])?;
            Ok(Claim::Go { attempt_id })
        })
        .await
    }

    /// Records Twilio's answer to a request, unless the attempt was settled meanwhile (a
    /// status callback can arrive before the answer).
    pub async fn record_attempt(
        &self,
        attempt_id: i64,
        outcome: AttemptOutcome,
    ) -> Result<Recorded, StoreError> {
        self.run(move |c| {
            let (state, call_id, reconciled): (AttemptState, i64, Option<String>) = c
                .prepare_cached("SELECT state, call_id, reconciled FROM attempts WHERE id = ?1")?
                .query_row([attempt_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            // A late `201` still settles an attempt that went `unknown` meanwhile: it is
            // the best evidence there is.
            let late_placed =
                state == AttemptState::Unknown && matches!(outcome, AttemptOutcome::Placed { .. });
            if state != AttemptState::Requesting && !late_placed {
                return Ok(Recorded {
                    state,
                    decided: false,
                    reconciled,
                    placed_earlier: false,
                });
            }
            let now = now_ms();
            let decided = |state| Recorded {
                state,
                decided: true,
                reconciled: None,
                placed_earlier: false,
            };
            match outcome {
                AttemptOutcome::Placed { sid } => {
                    place(c, attempt_id, call_id, &sid, None, now)?;
                    Ok(decided(AttemptState::Placed))
                }
                AttemptOutcome::Failed {
                    http_status,
                    code,
                    error,
                    retry_at,
                } => {
                    c.prepare_cached(
                        "UPDATE attempts SET state = ?2, http_status = ?3, error_code = ?4, error = ?5, settled_at = ?6 WHERE id = ?1",
                    )?
                    .execute(params![attempt_id, AttemptState::Failed, http_status, code, error, now])?;
                    // An earlier request's call showed up while this one was out: the
                    // call is placed (this request made nothing), not retried or failed.
                    if let Some(sid) = placed_attempt(c, call_id)? {
                        place_found_late(c, call_id, &sid, now)?;
                        return Ok(Recorded {
                            state: AttemptState::Failed,
                            decided: true,
                            reconciled: None,
                            placed_earlier: true,
                        });
                    }
                    // No retry for an incident resolved while the request was out.
                    let (state, next) = match retry_at {
                        Some(_) if resolved(c, call_id)? => (CallState::Canceled, None),
                        Some(at) => (CallState::Retrying, Some(at)),
                        None => (CallState::Failed, None),
                    };
                    c.prepare_cached(
                        "UPDATE calls SET state = ?2, next_attempt_at = ?3, error_code = ?4, error = ?5, updated_at = ?6 WHERE id = ?1",
                    )?
                    .execute(params![call_id, state, next, code, error, now])?;
                    Ok(decided(AttemptState::Failed))
                }
                AttemptOutcome::Unknown { error } => {
                    c.prepare_cached("UPDATE attempts SET state = ?2, error = ?3 WHERE id = ?1")?
                        .execute(params![attempt_id, AttemptState::Unknown, error])?;
                    c.prepare_cached("UPDATE calls SET state = ?2, error = ?3, updated_at = ?4 WHERE id = ?1")?
                        .execute(params![call_id, CallState::Unknown, error, now])?;
                    Ok(decided(AttemptState::Unknown))
                }
            }
        })
        .await
    }

    /// At start: whatever was `requesting` belonged to a process that is gone, so its
    /// outcome is unknown. Returns how many attempts that concerns.
    pub async fn recover_in_flight(&self) -> Result<usize, StoreError> {
        self.run(|c| {
            let n = c.execute(
                "UPDATE attempts SET state = 'unknown', error = 'mailcall stopped while this request was in flight'
                 WHERE state = 'requesting'",
                [],
            )?;
            c.execute(
                "UPDATE calls SET state = 'unknown' WHERE state = 'requesting'",
                [],
            )?;
            Ok(n)
        })
        .await
    }

    /// Every attempt not settled yet. A `requesting` attempt whose window has passed
    /// lost its answer (its outcome could not be recorded) and becomes `unknown`.
    pub async fn unresolved(&self, now: i64) -> Result<Vec<Unresolved>, StoreError> {
        self.run(move |c| {
            let stale: Vec<i64> = c
                .prepare_cached(
                    "UPDATE attempts SET state = 'unknown', error = 'no answer was recorded for this request'
                     WHERE state = 'requesting' AND window_end < ?1 RETURNING call_id",
                )?
                .query_map([now], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for call_id in stale {
                c.prepare_cached("UPDATE calls SET state = 'unknown' WHERE id = ?1 AND state = 'requesting'")?
                    .execute([call_id])?;
            }
            let mut stmt = c.prepare_cached(
                "SELECT a.id, a.call_id, c.incident_id, c.number, a.from_number, a.requested_at, a.window_end, a.state,
                        (SELECT COUNT(*) FROM attempts b WHERE b.call_id = a.call_id AND b.state = 'absent')
                 FROM attempts a JOIN calls c ON c.id = a.call_id
                 WHERE a.state IN ('requesting', 'unknown') ORDER BY a.requested_at",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Unresolved {
                    attempt_id: r.get(0)?,
                    call_id: r.get(1)?,
                    incident_id: r.get(2)?,
                    number: r.get(3)?,
                    from_number: r.get(4)?,
                    requested_at: r.get(5)?,
                    window_end: r.get(6)?,
                    state: r.get(7)?,
                    absent_before: r.get(8)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Which of these Twilio SIDs already belong to an attempt.
    pub async fn owned_sids(&self, sids: Vec<String>) -> Result<HashSet<String>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached("SELECT 1 FROM attempts WHERE sid = ?1")?;
            let mut owned = HashSet::new();
            for sid in sids {
                if stmt.exists([&sid])? {
                    owned.insert(sid);
                }
            }
            Ok(owned)
        })
        .await
    }

    /// Settles an unresolved attempt. `None` when there was nothing to settle (already
    /// settled, or a found SID that meanwhile belongs to another attempt).
    pub async fn settle(
        &self,
        attempt_id: i64,
        settlement: Settlement,
    ) -> Result<Option<Settled>, StoreError> {
        self.run(move |c| settle(c, attempt_id, &settlement)).await
    }

    /// Requests to `number` from caller ID `from` made since `since` (Unix ms) that were
    /// settled `absent`: their calls may still show up in a list that lags.
    pub async fn absent_attempts(
        &self,
        number: String,
        from: String,
        since: i64,
    ) -> Result<Vec<AbsentAttempt>, StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "SELECT a.id, a.requested_at, a.window_end FROM attempts a JOIN calls c ON c.id = a.call_id
                 WHERE a.state = 'absent' AND a.requested_at >= ?3 AND c.number = ?1
                   AND (a.from_number = ?2 OR a.from_number = '')",
            )?
            .query_map(params![number, from, since], |r| {
                Ok(AbsentAttempt {
                    attempt_id: r.get(0)?,
                    requested_at: r.get(1)?,
                    window_end: r.get(2)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// Numbers, with their request's caller ID (`""` for the configured one), whose
    /// call waits to be sent again (`queued`, `retrying`) after a request settled
    /// `absent` since `since`, or was given up after such a request (`failed`) since
    /// `failed_since`, by when it was given up, with no request Twilio refused for
    /// good — a 4xx other than 429 — among them (a 503 storm outlasting `retry_for`
    /// counts): that request's call may yet show up in a list that lags, and then
    /// nothing need be sent — or the call did ring after all.
    pub async fn resends_waiting(
        &self,
        since: i64,
        failed_since: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "SELECT DISTINCT c.number, a.from_number FROM attempts a JOIN calls c ON c.id = a.call_id
                 WHERE a.state = 'absent' AND a.requested_at >= ?1
                   AND (c.state IN ('queued', 'retrying')
                        OR (c.state = 'failed' AND c.updated_at >= ?2 AND NOT EXISTS (
                              SELECT 1 FROM attempts b WHERE b.call_id = c.id AND b.state = 'failed'
                                AND b.http_status BETWEEN 400 AND 499 AND b.http_status != 429)))",
            )?
            .query_map(params![since, failed_since], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
        })
        .await
    }

    /// A request settled `absent` did make a call after all: Twilio's list shows it
    /// late (`sid`, unowned, created inside the request's window). The request is
    /// `placed` with it and, unless a later request placed the call already, so is the
    /// call: what was to be sent again is not. `None` when nothing was recorded (no
    /// longer absent, or the SID is another's); else the call, when this placed it.
    pub async fn settle_absent_late(
        &self,
        attempt_id: i64,
        sid: String,
    ) -> Result<Option<Option<Settled>>, StoreError> {
        self.run(move |c| {
            let Some(call_id): Option<i64> = c
                .prepare_cached("SELECT call_id FROM attempts WHERE id = ?1 AND state = 'absent'")?
                .query_row([attempt_id], |r| r.get(0))
                .optional()?
            else {
                return Ok(None);
            };
            place_given_up(
                c,
                attempt_id,
                call_id,
                &sid,
                "call list, late: it was settled absent before its call showed up",
                AttemptState::Absent,
            )
        })
        .await
    }

    /// A status callback: settles its attempt (the URL carries the attempt's id) with
    /// the call's SID, and records the call's status. Returns the call (id, incident,
    /// number) when the SID is known, and whether this callback settled the attempt.
    pub async fn status_callback(
        &self,
        attempt_id: Option<i64>,
        sid: String,
        status: Option<TwilioStatus>,
        event: String,
    ) -> Result<(Option<(i64, i64, String)>, Option<Settled>), StoreError> {
        self.run(move |c| {
            let settled = match attempt_id {
                Some(id) => settle(
                    c,
                    id,
                    &Settlement::Found {
                        sid: sid.clone(),
                        how: CALLBACK,
                    },
                )?,
                None => None,
            };
            let call: Option<(i64, i64, String)> = c
                .prepare_cached("SELECT id, incident_id, number FROM calls WHERE sid = ?1")?
                .query_row([&sid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            if let Some((call_id, _, _)) = &call {
                if let Some(status) = status {
                    c.prepare_cached("UPDATE calls SET twilio_status = ?2 WHERE id = ?1")?
                        .execute(params![call_id, status])?;
                }
                add_event(c, *call_id, &event)?;
                return Ok((call, settled));
            }
            // The request was given up (absent, undecided) and sent again, but it did
            // reach Twilio: the number rang twice. Say so on the call.
            if let (Some(id), None) = (attempt_id, &settled) {
                let given_up: Option<(i64, i64, String, AttemptState)> = c
                    .prepare_cached(
                        "SELECT c.id, c.incident_id, c.number, a.state FROM attempts a JOIN calls c ON c.id = a.call_id
                         WHERE a.id = ?1 AND a.state IN ('absent', 'undecided')",
                    )?
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .optional()?;
                if let Some((call_id, incident_id, number, state)) = given_up {
                    let placed =
                        place_given_up(c, id, call_id, &sid, CALLBACK_LATE, state)?.flatten();
                    if let Some(status) = status.filter(|_| placed.is_some()) {
                        c.prepare_cached("UPDATE calls SET twilio_status = ?2 WHERE id = ?1")?
                            .execute(params![call_id, status])?;
                    }
                    let now_state: CallState = c
                        .prepare_cached("SELECT state FROM calls WHERE id = ?1")?
                        .query_row([call_id], |r| r.get(0))?;
                    let then = format!("late status callback: request {id} ({state}) did reach Twilio as {sid}");
                    let event = match (&placed, now_state) {
                        (Some(_), _) => format!("{then}; the call is placed and not sent again"),
                        (None, CallState::Canceled) => {
                            // It did go out: say so where the call says it never did.
                            c.prepare_cached(
                                "UPDATE calls SET sid = COALESCE(sid, ?2), error = ?3 WHERE id = ?1",
                            )?
                            .execute(params![
                                call_id,
                                sid,
                                "it rang (its request's answer was lost) before the incident was resolved; not sent again"
                            ])?;
                            format!("{then}; it rang before the incident was resolved")
                        }
                        (None, CallState::Requesting | CallState::Unknown) => {
                            format!("{then}; a request sent again is out too")
                        }
                        (None, _) => format!("{then}; the call was sent again too (the number rang twice)"),
                    };
                    add_event(c, call_id, &event)?;
                    return Ok((Some((call_id, incident_id, number)), placed));
                }
            }
            Ok((None, settled))
        })
        .await
    }

    /// Placed calls whose answerer is not known yet and that may still be live, placed
    /// since `since` (Unix milliseconds), of incidents that are open or bridged: of
    /// any round (a call retried past its round's end is still someone who may
    /// answer), and after someone joined (a voicemail answering then must get its
    /// message, not the bridge).
    pub async fn calls_to_watch(&self, since: i64) -> Result<Vec<WatchedCall>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.id, c.incident_id, c.sid, c.number, i.message, i.language, i.voice
                 FROM incidents i JOIN calls c ON c.incident_id = i.id
                 WHERE i.status IN ('open', 'bridged') AND i.kind = 'alert' AND i.dry_run = 0 AND i.press_one = 0
                   AND c.state = 'placed' AND c.sid IS NOT NULL AND c.answered_by IS NULL
                   AND (c.twilio_status IS NULL OR c.twilio_status IN ('queued', 'initiated', 'ringing', 'in-progress'))
                   AND c.updated_at > ?1",
            )?;
            let rows = stmt.query_map([since], |r| {
                Ok(WatchedCall {
                    call_id: r.get(0)?,
                    incident_id: r.get(1)?,
                    sid: r.get(2)?,
                    number: r.get(3)?,
                    message: r.get(4)?,
                    language: r.get(5)?,
                    voice: r.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Placed calls whose SMS summary is still owed (at most `limit`), oldest first.
    /// A summary owed for longer than `SMS_STALE_MS` since the call last changed (the
    /// daemon was down that long: a summary is sent once, at once) is given up in the
    /// same transaction, with a line in the call's history: an SMS about a call that
    /// rang hours ago is noise, read as a new page.
    pub async fn owed_sms(&self, limit: usize) -> Result<Vec<CallJob>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |c| {
            let stale: Vec<i64> = c
                .prepare_cached(
                    "SELECT id FROM calls WHERE sms_state = 'owed' AND updated_at < ?1 LIMIT ?2",
                )?
                .query_map(params![now_ms() - SMS_STALE_MS, limit], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for id in stale {
                c.prepare_cached("UPDATE calls SET sms_state = ?2 WHERE id = ?1")?
                    .execute(params![id, SmsState::Failed])?;
                add_event(
                    c,
                    id,
                    "sms-failed: still owed an hour after the call was placed (was the daemon down?); not sent so late",
                )?;
            }
            c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM calls c JOIN incidents i ON i.id = c.incident_id
                 WHERE c.sms_state = 'owed' ORDER BY c.id LIMIT ?1"
            ))?
            .query_map([limit], job)?
            .collect()
        })
        .await
    }

    /// Records how a call's SMS summary went (`sent` or `failed`) and the line for its
    /// history, in one transaction.
    pub async fn sms_done(
        &self,
        call_id: i64,
        state: SmsState,
        event: String,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            c.prepare_cached("UPDATE calls SET sms_state = ?2 WHERE id = ?1")?
                .execute(params![call_id, state])?;
            add_event(c, call_id, &event)
        })
        .await
    }

    /// Records what polling learned about a call: its status and who answered.
    pub async fn set_call_status(
        &self,
        call_id: i64,
        status: Option<TwilioStatus>,
        answered_by: Option<String>,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "UPDATE calls SET twilio_status = COALESCE(?2, twilio_status), answered_by = COALESCE(?3, answered_by) WHERE id = ?1",
            )?
            .execute(params![call_id, status, answered_by])
            .map(|_| ())
        })
        .await
    }

    /// Adds a line to a call's history (callbacks, SMS, voicemail, declines).
    pub async fn call_event(&self, call_id: i64, event: String) -> Result<(), StoreError> {
        self.run(move |c| add_event(c, call_id, &event)).await
    }
}

pub(super) fn add_event(c: &Connection, call_id: i64, event: &str) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO call_events (call_id, at, event) VALUES (?1, ?2, ?3)")?
        .execute(params![call_id, now_ms(), event])
        .map(|_| ())
}

/// Marks an attempt and its call placed with `sid`. A SID another attempt already owns
/// is not recorded twice (the unique index forbids it): the attempt is placed without
/// one, and says why.
fn place(
    c: &Connection,
    attempt_id: i64,
    call_id: i64,
    sid: &str,
    reconciled: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    let owner: Option<i64> = c
        .prepare_cached("SELECT id FROM attempts WHERE sid = ?1")?
        .query_row([sid], |r| r.get(0))
        .optional()?;
    let (sid, error) = match owner {
        Some(other) if other != attempt_id => (
            None,
            Some(format!(
                "Twilio answered with SID {sid}, which request {other} already owns"
            )),
        ),
        _ => (Some(sid), None),
    };
    c.prepare_cached(
        // What went wrong with the request (it timed out, its answer was lost) stays
        // on record next to how it was settled.
        "UPDATE attempts SET state = ?2, sid = ?3, error = COALESCE(?4, error), reconciled = ?5, settled_at = ?6
         WHERE id = ?1",
    )?
    .execute(params![attempt_id, AttemptState::Placed, sid, error, reconciled, now])?;
    mark_placed(c, call_id, sid, now)
}

/// A placed call's SMS summary is owed from the transaction that placed it, whoever
/// settled the call: a crash before it is sent leaves it owed, not forgotten.
fn owe_sms(c: &Connection, call_id: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE calls SET sms_state = ?2 WHERE id = ?1 AND sms_state IS NULL
           AND EXISTS (SELECT 1 FROM incidents i WHERE i.id = calls.incident_id AND i.sms = 1 AND i.kind = 'alert')",
    )?
    .execute(params![call_id, SmsState::Owed])?;
    Ok(())
}

fn settle(
    c: &Connection,
    attempt_id: i64,
    settlement: &Settlement,
) -> rusqlite::Result<Option<Settled>> {
    let Some((state, call_id)): Option<(AttemptState, i64)> = c
        .prepare_cached("SELECT state, call_id FROM attempts WHERE id = ?1")?
        .query_row([attempt_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
    else {
        return Ok(None);
    };
    if !matches!(state, AttemptState::Requesting | AttemptState::Unknown) {
        return Ok(None);
    }
    let now = now_ms();
    let call_state = match settlement {
        Settlement::Found { sid, how } => {
            let taken = c
                .prepare_cached("SELECT 1 FROM attempts WHERE sid = ?1 AND id != ?2")?
                .exists(params![sid, attempt_id])?;
            if taken {
                return Ok(None);
            }
            place(c, attempt_id, call_id, sid, Some(how), now)?;
            CallState::Placed
        }
        // Sent again. `absent` is Twilio's own word that the request made nothing —
        // up to `MAX_ABSENT` times (each absence waited longer, see `Unresolved`);
        // `undecided` (nobody can tell) once: a second request that cannot be told
        // apart either may well have rung, and every further one could ring again.
        Settlement::Absent { how: why } | Settlement::Undecided { reason: why } => {
            let (state, limit) = match settlement {
                Settlement::Absent { .. } => (AttemptState::Absent, MAX_ABSENT),
                _ => (AttemptState::Undecided, 1),
            };
            c.prepare_cached(
                "UPDATE attempts SET state = ?2, reconciled = ?3, settled_at = ?4 WHERE id = ?1",
            )?
            .execute(params![attempt_id, state, why, now])?;
            let before: i64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM attempts WHERE call_id = ?1 AND state = ?3 AND id != ?2",
                )?
                .query_row(params![call_id, attempt_id, state], |r| r.get(0))?;
            if let Some(sid) = placed_attempt(c, call_id)? {
                // An earlier request did make a call after all (it showed up late):
                // the call is placed, and nothing is sent again.
                place_found_late(c, call_id, &sid, now)?;
                CallState::Placed
            } else if before < limit {
                requeue(c, call_id, now, why)?
            } else {
                let error = format!(
                    "Twilio never confirmed {} requests for this call ({why}); it may have rung, and is not sent again",
                    before + 1
                );
                c.prepare_cached(
                    "UPDATE calls SET state = ?2, error = ?3, updated_at = ?4 WHERE id = ?1",
                )?
                .execute(params![call_id, CallState::Failed, error, now])?;
                CallState::Failed
            }
        }
    };
    Ok(Some(Settled {
        call: call_job(c, call_id)?,
        state: call_state,
        was: state,
    }))
}

/// The SID of a request of this call that was placed, if any.
fn placed_attempt(c: &Connection, call_id: i64) -> rusqlite::Result<Option<String>> {
    c.prepare_cached(
        "SELECT sid FROM attempts WHERE call_id = ?1 AND state = 'placed' AND sid IS NOT NULL ORDER BY id LIMIT 1",
    )?
    .query_row([call_id], |r| r.get(0))
    .optional()
}

/// A request given up (`absent`, or `undecided`) did make call `sid` after all (the
/// call list shows it late, or its status callback came): the request is `placed` with
/// it and — if the call still waits to be sent again, or was given up as `failed` — so
/// is the call, and nothing more is sent. A request of the call still out is settled
/// on its own and then finds this one placed (`settle`, `record_attempt`, `claim`).
/// `None` when the SID is another request's; else the call, when this placed it.
fn place_given_up(
    c: &Connection,
    attempt_id: i64,
    call_id: i64,
    sid: &str,
    how: &str,
    was: AttemptState,
) -> rusqlite::Result<Option<Option<Settled>>> {
    if c.prepare_cached("SELECT 1 FROM attempts WHERE sid = ?1")?
        .exists([sid])?
    {
        return Ok(None);
    }
    let now = now_ms();
    c.prepare_cached(
        "UPDATE attempts SET state = ?2, sid = ?3, settled_at = ?4, reconciled = ?5 WHERE id = ?1",
    )?
    .execute(params![attempt_id, AttemptState::Placed, sid, now, how])?;
    let state: CallState = c
        .prepare_cached("SELECT state FROM calls WHERE id = ?1")?
        .query_row([call_id], |r| r.get(0))?;
    // Waiting to be sent again, or given up as "may have rung" (`failed`): it did
    // ring. (Under way again, it is the request out that settles it.)
    if !matches!(
        state,
        CallState::Queued | CallState::Retrying | CallState::Failed
    ) {
        return Ok(Some(None));
    }
    place_found_late(c, call_id, sid, now)?;
    Ok(Some(Some(Settled {
        call: call_job(c, call_id)?,
        state: CallState::Placed,
        was,
    })))
}

/// The call is placed by an earlier request's call that showed up late (`sid`). Its
/// SMS summary is owed as for any placed call — unless a recovery resolved the
/// incident before the call was found: a summary now would read as a new page for a
/// problem that is over (the history says so). `unanswered` is not over: it is owed.
fn place_found_late(c: &Connection, call_id: i64, sid: &str, now: i64) -> rusqlite::Result<()> {
    let (resolved, texting): (bool, bool) = c
        .prepare_cached(
            "SELECT i.status = 'resolved', i.sms = 1 AND i.kind = 'alert'
             FROM calls c JOIN incidents i ON i.id = c.incident_id WHERE c.id = ?1",
        )?
        .query_row([call_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if !resolved {
        return mark_placed(c, call_id, Some(sid), now);
    }
    set_placed(c, call_id, Some(sid), now)?;
    if texting {
        add_event(
            c,
            call_id,
            "no SMS summary: the call was found after its incident was resolved",
        )?;
    }
    Ok(())
}

/// The call is placed (with `sid`, when it is the call's own): nothing more is sent
/// for it, and its SMS summary is owed. Also when an earlier request's call showed up
/// late, and what was to be sent again is not.
fn mark_placed(c: &Connection, call_id: i64, sid: Option<&str>, now: i64) -> rusqlite::Result<()> {
    set_placed(c, call_id, sid, now)?;
    owe_sms(c, call_id)
}

/// The call's row says `placed` (with `sid`); nothing more is sent for it.
fn set_placed(c: &Connection, call_id: i64, sid: Option<&str>, now: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE calls SET state = ?2, sid = ?3, error = NULL, error_code = NULL, next_attempt_at = NULL, updated_at = ?4
         WHERE id = ?1",
    )?
    .execute(params![call_id, CallState::Placed, sid, now])?;
    Ok(())
}

/// Sends a call again (its last request created nothing, or nobody can tell), unless
/// its incident was resolved meanwhile.
fn requeue(c: &Connection, call_id: i64, now: i64, why: &str) -> rusqlite::Result<CallState> {
    if resolved(c, call_id)? {
        cancel(c, call_id, now)?;
        return Ok(CallState::Canceled);
    }
    c.prepare_cached(
        "UPDATE calls SET state = ?2, next_attempt_at = ?3, error = ?4, updated_at = ?5 WHERE id = ?1",
    )?
    .execute(params![call_id, CallState::Queued, now, why, now])?;
    Ok(CallState::Queued)
}

/// The call's incident was resolved: nothing more is sent for it. (The canary's
/// incident is closed from the start; its calls still go out.)
fn resolved(c: &Connection, call_id: i64) -> rusqlite::Result<bool> {
    let (status, kind): (IncidentStatus, IncidentKind) = c
        .prepare_cached(
            "SELECT i.status, i.kind FROM calls c JOIN incidents i ON i.id = c.incident_id WHERE c.id = ?1",
        )?
        .query_row([call_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(status == IncidentStatus::Resolved && kind == IncidentKind::Alert)
}

fn cancel(c: &Connection, call_id: i64, now: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE calls SET state = ?2, next_attempt_at = NULL, error = 'the incident was resolved before this call went out', updated_at = ?3
         WHERE id = ?1",
    )?
    .execute(params![call_id, CallState::Canceled, now])
    .map(|_| ())
}
