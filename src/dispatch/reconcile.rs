//! The reconciler: settles requests whose outcome is unknown (a timeout, a connection
//! lost after sending, a crash mid-request).
//!
//! Twilio's `Calls.json` has no idempotency key, so such a request is never simply sent
//! again. With a public URL its status callback carries the attempt's id and settles it
//! exactly (see `ingest::callbacks`). Otherwise the reconciler reads Twilio's call list
//! for the number (`Calls.json?To=&From=&StartTime>=`) and matches calls to attempts
//! one to one: a SID owned by an attempt is never a candidate (a unique index), and a
//! candidate must have been created inside the attempt's request window. Attempts to
//! one number whose windows overlap are decided together ([`decide`]): when there are
//! as many calls as requests, each gets one; when no call shows up within the grace
//! period, the calls are sent again; when some but not all did, nobody can tell which,
//! and all of them are sent again, since ringing twice beats missing. If the call list
//! cannot be read for that long, the same rule applies — once per call.
//!
//! Numbers are reconciled concurrently (bounded), each list request under the request
//! timeout, in tasks: the loop itself never waits on Twilio, and new calls never wait
//! on reconciliation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{Caller, Dispatcher, IDLE_POLL, WINDOW_SLACK};
use crate::health::Worker;
use crate::metrics::Outcome as Counted;
use crate::store::{
    AbsentAttempt, AttemptState, CALL_LIST, MAX_ABSENT, Settlement, Unresolved, ms, now_ms,
};
use crate::twilio;

/// Numbers reconciled at once, at most.
const MAX_CONCURRENT: usize = 8;
/// How far back requests settled `absent` are looked at for calls that show up late.
const ABSENT_LOOKBACK_MS: i64 = 60 * 60 * 1000;
/// One number's call list is read at most this often.
const LIST_EVERY: Duration = Duration::from_secs(2);
/// How often a number whose call waits to be sent again after `absent` has its list
/// read (for the absent request's call, showing up late): less often, since the wait
/// is often Twilio asking for less traffic (429, 503 with `Retry-After`).
const WAITING_LIST_EVERY: Duration = Duration::from_secs(4);
/// How long a call given up as `failed` after a request settled `absent` has its
/// number's list read for that request's late call.
const FAILED_LOOKBACK_MS: i64 = 15 * 60 * 1000;
/// Of the `MAX_CONCURRENT` list reads, this many are for waiting calls (and only
/// they): at most, and kept free of unknown requests' reads.
const MAX_WAITING_LISTS: usize = 2;

/// An unresolved request, as [`decide`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub attempt_id: i64,
    /// The earliest a call created for it can be stamped (Unix ms): its request time,
    /// less a second for Twilio's whole-second timestamps and the clock slack.
    pub window_start: i64,
    /// The latest (Unix ms).
    pub window_end: i64,
    /// Its request may still be in flight (so its own answer may settle it).
    pub in_flight: bool,
}

/// A call Twilio has that no attempt owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub sid: String,
    /// When Twilio created it (Unix ms, whole seconds).
    pub created_ms: i64,
}

/// What becomes of one pending request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This call is the request's.
    Found(String),
    /// Not yet: the list may lag, or a request of the same window is in flight.
    Wait,
    /// No call appeared within the grace period: send it again.
    Absent,
    /// Some of the overlapping requests reached Twilio, but which cannot be told.
    Undecided(String),
}

/// Matches pending requests to one number with the calls Twilio has for it.
///
/// Twilio may create a call late, processing a request after the client gave up, so a
/// request's window stays open through the grace period: a call created then may be
/// its, and is never forced onto a later request that could also have made it.
pub fn decide(
    pending: &[Pending],
    candidates: &[Candidate],
    now: i64,
    grace_ms: i64,
) -> Vec<(i64, Decision)> {
    let widened: Vec<Pending> = pending
        .iter()
        .map(|p| Pending {
            window_end: p.window_end.saturating_add(grace_ms),
            ..p.clone()
        })
        .collect();
    let mut sorted: Vec<&Pending> = widened.iter().collect();
    sorted.sort_by_key(|p| (p.window_start, p.window_end));
    // Windows that overlap, directly or through others, are decided together.
    let mut clusters: Vec<(i64, Vec<&Pending>)> = Vec::new();
    for p in sorted {
        match clusters.last_mut() {
            Some((end, members)) if p.window_start <= *end => {
                *end = (*end).max(p.window_end);
                members.push(p);
            }
            _ => clusters.push((p.window_end, vec![p])),
        }
    }
    let mut decisions = Vec::with_capacity(pending.len());
    for (end, cluster) in clusters {
        let start = cluster.iter().map(|p| p.window_start).min().unwrap_or(end);
        if cluster.iter().any(|p| p.in_flight) {
            decisions.extend(cluster.iter().map(|p| (p.attempt_id, Decision::Wait)));
            continue;
        }
        let mut calls: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| (start..=end).contains(&c.created_ms))
            .collect();
        calls.sort_by_key(|c| c.created_ms);
        // Maximum matching of points (calls) to intervals (windows): windows by their
        // end, each taking the earliest free call inside it.
        let mut by_end = cluster.clone();
        by_end.sort_by_key(|p| (p.window_end, p.window_start));
        let mut used = vec![false; calls.len()];
        let mut matched = Vec::new();
        for p in &by_end {
            let free = calls.iter().enumerate().position(|(i, c)| {
                !used[i] && (p.window_start..=p.window_end).contains(&c.created_ms)
            });
            if let Some(i) = free {
                used[i] = true;
                matched.push((p.attempt_id, calls[i].sid.clone()));
            }
        }
        if matched.len() == cluster.len() {
            decisions.extend(
                matched
                    .into_iter()
                    .map(|(id, sid)| (id, Decision::Found(sid))),
            );
        } else if now <= end {
            // The grace period of some request is not over: the list may still lag.
            decisions.extend(cluster.iter().map(|p| (p.attempt_id, Decision::Wait)));
        } else {
            decisions.extend(short_of_calls(cluster, calls));
        }
    }
    decisions
}

/// After the grace period, fewer calls than requests: some never reached Twilio. What
/// the windows force is settled — a request with no call in its window is absent; a
/// call only one request's window holds, when that window holds no other call, is that
/// request's — and whatever is left cannot be told apart: sent again.
fn short_of_calls(mut open: Vec<&Pending>, mut calls: Vec<&Candidate>) -> Vec<(i64, Decision)> {
    let fits = |p: &Pending, c: &Candidate| (p.window_start..=p.window_end).contains(&c.created_ms);
    let mut decisions = Vec::new();
    loop {
        let before = decisions.len();
        open.retain(|p| {
            let absent = !calls.iter().any(|c| fits(p, c));
            if absent {
                decisions.push((p.attempt_id, Decision::Absent));
            }
            !absent
        });
        let forced = calls.iter().enumerate().find_map(|(ci, c)| {
            let owners: Vec<usize> = (0..open.len()).filter(|&pi| fits(open[pi], c)).collect();
            match owners[..] {
                [pi] if calls.iter().filter(|other| fits(open[pi], other)).count() == 1 => {
                    Some((pi, ci))
                }
                _ => None,
            }
        });
        if let Some((pi, ci)) = forced {
            let (p, c) = (open.remove(pi), calls.remove(ci));
            decisions.push((p.attempt_id, Decision::Found(c.sid.clone())));
        }
        if decisions.len() == before {
            break;
        }
    }
    let why = format!(
        "{} calls for {} requests to this number close together, and which request made which cannot be told",
        calls.len(),
        open.len()
    );
    decisions.extend(
        open.iter()
            .map(|p| (p.attempt_id, Decision::Undecided(why.clone()))),
    );
    decisions
}

/// Numbers (with their caller ID) being reconciled now, and when each was last asked.
#[derive(Debug, Default)]
struct Progress {
    busy: HashSet<(String, String)>,
    /// Of those, the ones listed for a call waiting to be sent again.
    waiting: HashSet<(String, String)>,
    /// When each number with a waiting call was last listed for it (only numbers
    /// still waiting are kept).
    waiting_listed: HashMap<(String, String), Instant>,
    asked: HashMap<(String, String), Instant>,
}

impl Dispatcher {
    /// Settles unknown requests until shutdown.
    pub(super) async fn reconcile_loop(self: Arc<Self>) {
        let Caller::Twilio(client) = self.caller.clone() else {
            return;
        };
        let progress: Arc<Mutex<Progress>> = Arc::default();
        loop {
            self.beat(Worker::Reconciler);
            self.reconcile_pass(&client, &progress).await;
            if !self.idle(&self.reconciler_wake, IDLE_POLL).await {
                return;
            }
        }
    }

    /// Starts a task for each number with unknown requests that is not being
    /// reconciled and was not asked about within [`LIST_EVERY`], and for numbers whose
    /// call waits to be sent again (or was given up) after `absent`, in turn, within
    /// their own slots and at most every [`WAITING_LIST_EVERY`].
    async fn reconcile_pass(
        self: &Arc<Self>,
        client: &twilio::Client,
        progress: &Arc<Mutex<Progress>>,
    ) {
        let unresolved = match self.store.unresolved(now_ms()).await {
            Ok(u) => u,
            Err(e) => {
                error!(error = %e, "cannot read the requests to reconcile");
                return;
            }
        };
        // Calls waiting to be sent again after `absent` (a retry after 429/503): the
        // absent request's call may still show up in a list that lags, and then
        // nothing need be sent.
        let waiting = self
            .store
            .resends_waiting(
                now_ms().saturating_sub(ABSENT_LOOKBACK_MS),
                now_ms().saturating_sub(FAILED_LOOKBACK_MS),
            )
            .await
            .unwrap_or_else(|e| {
                error!(error = %e, "cannot read the calls waiting to be sent again");
                Vec::new()
            });
        let from = self.live.load().config.twilio.from.clone();
        let mut by_number: BTreeMap<(String, String), Vec<Unresolved>> = BTreeMap::new();
        for (number, caller) in waiting {
            let caller = if caller.is_empty() {
                from.clone()
            } else {
                caller
            };
            by_number.entry((number, caller)).or_default();
        }
        for u in unresolved {
            let key = (u.number.clone(), caller_id(&u, &from).to_string());
            by_number.entry(key).or_default().push(u);
        }
        let mut progress_now = lock(progress);
        progress_now
            .asked
            .retain(|_, at| at.elapsed() < WAITING_LIST_EVERY);
        // Unknown requests and waiting calls each have their slots: a storm of
        // waiting calls (a 503 with a long `Retry-After` for many numbers) neither
        // starves the unknown ones nor hammers Twilio, and a storm of unknown ones
        // never keeps a waiting call's list unread until its retry rings again.
        let mut keys: Vec<_> = by_number
            .into_iter()
            .filter_map(|(key, attempts)| {
                let unknown = attempts.iter().any(|a| a.state == AttemptState::Unknown);
                // A number with only requests in flight: their answers settle them.
                (unknown || attempts.is_empty()).then_some((!unknown, key, attempts))
            })
            .collect();
        // Waiting numbers in turn: the one listed longest ago (or never) first, so
        // however many wait, each is read within a few passes.
        let waiting_now: HashSet<&(String, String)> =
            keys.iter().filter(|k| k.0).map(|k| &k.1).collect();
        progress_now
            .waiting_listed
            .retain(|key, _| waiting_now.contains(key));
        let listed = &progress_now.waiting_listed;
        keys.sort_by_key(|(waiting, key, _)| (*waiting, listed.get(key).copied(), key.clone()));
        for (waiting, key, attempts) in keys {
            let every = if waiting {
                WAITING_LIST_EVERY
            } else {
                LIST_EVERY
            };
            // Each kind has slots of its own: unknown requests hold calls back, and a
            // waiting call's late call must be found before its retry rings again.
            let unknown_busy = progress_now.busy.len() - progress_now.waiting.len();
            if (waiting && progress_now.waiting.len() >= MAX_WAITING_LISTS)
                || (!waiting && unknown_busy >= MAX_CONCURRENT - MAX_WAITING_LISTS)
                || progress_now.busy.contains(&key)
                || progress_now
                    .asked
                    .get(&key)
                    .is_some_and(|at| at.elapsed() < every)
            {
                continue;
            }
            if waiting {
                progress_now.waiting.insert(key.clone());
                progress_now
                    .waiting_listed
                    .insert(key.clone(), Instant::now());
            }
            progress_now.busy.insert(key.clone());
            progress_now.asked.insert(key.clone(), Instant::now());
            let me = Arc::clone(self);
            let client = client.clone();
            let progress = Arc::clone(progress);
            self.calls.spawn(async move {
                me.reconcile_number(&client, &key.0, &key.1, attempts).await;
                let mut progress = lock(&progress);
                progress.busy.remove(&key);
                progress.waiting.remove(&key);
            });
        }
    }

    /// Reads the number's call list once and settles what it can.
    async fn reconcile_number(
        &self,
        client: &twilio::Client,
        number: &str,
        from: &str,
        attempts: Vec<Unresolved>,
    ) {
        let settings = self.live.load_full();
        let t = &settings.config.twilio;
        let grace = ms(t.reconcile_grace);
        let before = 1000 + ms(WINDOW_SLACK);
        // Requests of the last hour settled `absent`: a list that lags may show their
        // calls now, and the list is asked from early enough to hold them.
        let absent = self
            .store
            .absent_attempts(
                number.to_string(),
                from.to_string(),
                now_ms().saturating_sub(ABSENT_LOOKBACK_MS),
            )
            .await
            .unwrap_or_else(|e| {
                error!(error = %e, "cannot read the requests settled absent");
                Vec::new()
            });
        let since = attempts
            .iter()
            .map(|a| a.requested_at - before)
            .chain(absent.iter().map(|a| a.requested_at - before))
            .min()
            .unwrap_or(0);
        let listed =
            tokio::time::timeout(2 * client.timeout(), client.calls_to(number, from, since))
                .await
                .unwrap_or_else(|_| Err("timed out waiting for Twilio's call list".into()));
        let now = now_ms();
        let calls = match listed {
            Ok(calls) => calls,
            Err(e) => {
                // Ringing twice beats missing: after twice the grace, send it again.
                for a in attempts.iter().filter(|a| {
                    a.state == AttemptState::Unknown && now > a.window_end.saturating_add(2 * grace)
                }) {
                    let reason = format!(
                        "Twilio's call list could not be read ({e}); sent again so nobody is missed"
                    );
                    self.settle(a, Settlement::Undecided { reason }).await;
                }
                warn!(number, error = %e, "cannot read Twilio's call list to reconcile requests whose answer was lost; will ask again");
                return;
            }
        };
        // The number's requests as they are now, not as they were before the list was
        // asked for: a request sent meanwhile (a new incident's call to the same
        // number) may have made a call in this list, and must be in the matching —
        // in flight, it holds its cluster back — or the call would be given to an
        // older request. Every call in the list was made by a request committed before
        // it was sent, so reading after the list sees them all.
        let attempts = match self.store.unresolved(now_ms()).await {
            Ok(all) => {
                let default_from = self.live.load().config.twilio.from.clone();
                all.into_iter()
                    .filter(|u| u.number == number && caller_id(u, &default_from) == from)
                    .collect::<Vec<_>>()
            }
            Err(e) => {
                error!(error = %e, "cannot read the requests to reconcile");
                return;
            }
        };
        let sids: Vec<String> = calls.iter().map(|(sid, _)| sid.clone()).collect();
        let owned = match self.store.owned_sids(sids).await {
            Ok(owned) => owned,
            Err(e) => {
                error!(error = %e, "cannot read which calls are known");
                return;
            }
        };
        let candidates: Vec<Candidate> = calls
            .into_iter()
            .filter(|(sid, _)| !owned.contains(sid))
            .map(|(sid, created_ms)| Candidate { sid, created_ms })
            .collect();
        // A request sent again after `absent` waits longer for its call: twice the grace
        // after one absence, four times after two… (a list that lags behind the grace).
        let pending: Vec<Pending> = attempts
            .iter()
            .map(|a| Pending {
                attempt_id: a.attempt_id,
                window_start: a.requested_at - before,
                window_end: a.window_end.saturating_add(
                    grace.saturating_mul((1 << a.absent_before.clamp(0, MAX_ABSENT)) - 1),
                ),
                in_flight: a.state == AttemptState::Requesting,
            })
            .collect();
        let decisions = decide(&pending, &candidates, now, grace);
        // Calls no pending request takes, created inside the window of exactly one
        // request settled `absent`: that request did make a call, shown late.
        let taken: HashSet<&str> = decisions
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::Found(sid) => Some(sid.as_str()),
                _ => None,
            })
            .collect();
        for candidate in candidates
            .iter()
            .filter(|c| !taken.contains(c.sid.as_str()))
        {
            let fits: Vec<&AbsentAttempt> = absent
                .iter()
                .filter(|a| {
                    (a.requested_at - before..=a.window_end).contains(&candidate.created_ms)
                })
                .collect();
            if let [late] = fits[..] {
                self.settle_late(number, late.attempt_id, &candidate.sid)
                    .await;
            }
        }
        for (attempt_id, decision) in decisions {
            let Some(attempt) = attempts.iter().find(|a| a.attempt_id == attempt_id) else {
                continue;
            };
            let settlement = match decision {
                Decision::Wait => continue,
                Decision::Found(sid) => Settlement::Found {
                    sid,
                    how: CALL_LIST,
                },
                Decision::Absent => Settlement::Absent {
                    how: format!(
                        "Twilio's call list had no such call {} s after the request; sent again",
                        (now - attempt.requested_at) / 1000
                    ),
                },
                Decision::Undecided(reason) => Settlement::Undecided {
                    reason: format!("{reason}; sent again so nobody is missed"),
                },
            };
            self.settle(attempt, settlement).await;
        }
    }

    /// A request settled `absent` made call `sid` after all (the list showed it late).
    async fn settle_late(&self, number: &str, attempt_id: i64, sid: &str) {
        match self
            .store
            .settle_absent_late(attempt_id, sid.to_string())
            .await
        {
            Ok(None) => {}
            Ok(Some(placed)) => {
                warn!(
                    number,
                    attempt = attempt_id,
                    sid,
                    "a request settled absent did reach Twilio: its call showed up late in the call list"
                );
                if let Some(settled) = placed {
                    info!(
                        incident = settled.call.incident_id,
                        number, sid, "the call was to be sent again and is not: it is placed"
                    );
                    self.placed(&settled.call);
                }
            }
            Err(e) => error!(attempt = attempt_id, error = %e, "cannot record a late call"),
        }
    }

    /// Records a settlement, logs it, and follows up: a placed call gets its SMS, a
    /// call sent again wakes the placer.
    async fn settle(&self, attempt: &Unresolved, settlement: Settlement) {
        let result = match &settlement {
            Settlement::Found { .. } => "placed",
            Settlement::Absent { .. } => "absent",
            Settlement::Undecided { .. } => "undecided",
        };
        let settled = match self
            .store
            .settle(attempt.attempt_id, settlement.clone())
            .await
        {
            Ok(Some(settled)) => settled,
            Ok(None) => return,
            Err(e) => {
                error!(attempt = attempt.attempt_id, error = %e, "cannot record a reconciliation; will try again");
                return;
            }
        };
        self.metrics
            .reconciliations
            .get_or_create(&Counted { result })
            .inc();
        let (incident, number, id) = (attempt.incident_id, &attempt.number, attempt.attempt_id);
        if settled.state == crate::store::CallState::Placed
            && !matches!(settlement, Settlement::Found { .. })
        {
            info!(incident, number = %number, attempt = id,
                "an earlier request's call showed up late: the call is placed, and not sent again");
            self.placed(&settled.call);
            return;
        }
        if settled.state == crate::store::CallState::Failed {
            error!(incident, number = %number, attempt = id, call = %settled.call.call_id,
                "this call's requests were given up as often as allowed (Twilio's call list never showed their calls, or could not tell): it may have rung, and is not sent again");
            return;
        }
        match settlement {
            Settlement::Found { sid, .. } => {
                info!(incident, number = %number, attempt = id, sid = %sid,
                    "the request whose answer was lost did reach Twilio; not calling again");
                self.placed(&settled.call);
            }
            Settlement::Absent { how } => {
                warn!(incident, number = %number, attempt = id, call = %settled.state, how = %how,
                    "the request whose answer was lost never reached Twilio");
                self.placer_wake.notify_one();
            }
            Settlement::Undecided { reason } => {
                error!(incident, number = %number, attempt = id, call = %settled.state, reason = %reason,
                    "cannot tell whether a request reached Twilio: calling again (ringing twice beats missing)");
                self.placer_wake.notify_one();
            }
        }
    }
}

/// The caller ID a request went out with (older records have none: the configured one).
fn caller_id<'a>(u: &'a Unresolved, default: &'a str) -> &'a str {
    if u.from_number.is_empty() {
        default
    } else {
        &u.from_number
    }
}

fn lock(progress: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    progress
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: i64, start: i64, end: i64) -> Pending {
        Pending {
            attempt_id: id,
            window_start: start,
            window_end: end,
            in_flight: false,
        }
    }

    fn c(sid: &str, at: i64) -> Candidate {
        Candidate {
            sid: sid.into(),
            created_ms: at,
        }
    }

    const GRACE: i64 = 30_000;

    #[test]
    fn a_lone_request_takes_the_call_in_its_window_and_nothing_outside() {
        let d = decide(
            &[p(1, 1000, 5000)],
            &[c("CAold", 0), c("CAx", 3000)],
            6000,
            GRACE,
        );
        assert_eq!(d, [(1, Decision::Found("CAx".into()))]);
        // A call before the window is another request's: wait, then absent.
        let pending = [p(1, 1000, 5000)];
        let old = [c("CAold", 0)];
        assert_eq!(decide(&pending, &old, 6000, GRACE), [(1, Decision::Wait)]);
        assert_eq!(
            decide(&pending, &old, 5000 + GRACE + 1, GRACE),
            [(1, Decision::Absent)]
        );
    }

    #[test]
    fn overlapping_requests_each_get_one_call() {
        let pending = [p(1, 0, 5000), p(2, 1000, 6000), p(3, 20_000, 25_000)];
        let calls = [c("CAb", 2000), c("CAa", 2000), c("CAc", 21_000)];
        let d = decide(&pending, &calls, 26_000, GRACE);
        let found: HashSet<String> = d
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::Found(sid) => Some(sid.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(found.len(), 3, "{d:?}");
        assert!(d.contains(&(3, Decision::Found("CAc".into()))));
    }

    #[test]
    fn a_call_is_never_given_to_a_request_it_does_not_fit() {
        // Request 2 cannot have made a call stamped at 500; request 1 can.
        let pending = [p(1, 0, 5000), p(2, 1000, 6000)];
        let d = decide(&pending, &[c("CA1", 500), c("CA2", 5500)], 7000, GRACE);
        assert!(d.contains(&(1, Decision::Found("CA1".into()))), "{d:?}");
        assert!(d.contains(&(2, Decision::Found("CA2".into()))), "{d:?}");
    }

    #[test]
    fn fewer_calls_than_overlapping_requests_is_undecided_after_the_grace() {
        let pending = [p(1, 0, 5000), p(2, 1000, 6000)];
        let calls = [c("CA1", 3000)];
        assert!(
            decide(&pending, &calls, 7000, GRACE)
                .iter()
                .all(|(_, d)| *d == Decision::Wait)
        );
        let d = decide(&pending, &calls, 6000 + GRACE + 1, GRACE);
        assert!(
            d.iter().all(|(_, d)| matches!(d, Decision::Undecided(_))),
            "{d:?}"
        );
    }

    #[test]
    fn fewer_calls_than_requests_settles_what_the_windows_force() {
        // The call at 500 fits request 1 only; request 2's window then holds nothing.
        let pending = [p(1, 0, 5000), p(2, 1000, 6000)];
        let d = decide(&pending, &[c("CA1", 500)], 6000 + GRACE + 1, GRACE);
        assert!(d.contains(&(1, Decision::Found("CA1".into()))), "{d:?}");
        assert!(d.contains(&(2, Decision::Absent)), "{d:?}");
        // A call created after request 1's window, in request 2's: Twilio may have
        // made request 1's call late, so it is not forced onto request 2 (which might
        // have created nothing): both are sent again.
        let pending = [p(1, 0, 5000), p(2, 4000, 9000)];
        let d = decide(&pending, &[c("CAlate", 8000)], 9000 + GRACE + 1, GRACE);
        assert!(
            d.iter().all(|(_, d)| matches!(d, Decision::Undecided(_))),
            "{d:?}"
        );
    }

    #[test]
    fn a_request_in_flight_holds_back_its_cluster_only() {
        let mut flying = p(2, 1000, 6000);
        flying.in_flight = true;
        let pending = [p(1, 0, 5000), flying, p(3, 50_000, 55_000)];
        let calls = [c("CA1", 2000), c("CA3", 51_000)];
        let d = decide(&pending, &calls, 56_000, GRACE);
        assert!(d.contains(&(1, Decision::Wait)) && d.contains(&(2, Decision::Wait)));
        assert!(d.contains(&(3, Decision::Found("CA3".into()))));
    }
}
