//! The dispatch worker: stored alerts → routing → incidents → calls.
//!
//! It is fed only from the store, never directly by an ingest path, so an alert that was
//! acknowledged is processed even if the daemon died right after the `250`: on start the
//! worker routes every alert still marked `received` and resumes every call that was
//! decided but not finished.
//!
//! Every number of an incident is called by its own task, all at once; a failure for one
//! number never holds up the others. Twilio failures are classified by
//! [`twilio::Outcome`]: 429, 5xx and network errors are retried with capped, jittered
//! exponential backoff (honouring `Retry-After`) until `retry_for` after the call was
//! decided; 4xx errors are permanent for that number.
//!
//! A call whose request was in flight when the process died (`sending`) is ambiguous:
//! Twilio has no idempotency key for calls. After a restart the worker asks Twilio for
//! calls to that number since the request was sent; only when there is none (or Twilio
//! cannot be asked) is it placed again, since ringing twice beats not ringing at all.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::alert::Alert;
use crate::config::Config;
use crate::health::Health;
use crate::metrics::{CallError, Metrics, Outcome as CanaryOutcome, Routing};
use crate::route::{self, Action};
use crate::settings::Live;
use crate::store::{
    CallJob, CallUpdate, DueRound, NewIncident, PendingAlert, RoundEnd, Routed, Store, now_ms,
};
use crate::twilio::{self, CallRequest, Outcome, twiml};

/// How often the watcher looks at rounds and answerers.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often one call's answerer is asked for.
const CHECK_CALL_EVERY: Duration = Duration::from_secs(2);

/// Alerts routed per store transaction.
const BATCH: usize = 256;
/// How often the worker looks at the store even when nobody woke it: alerts stored by
/// another process (`mailcall call` beside a running daemon) wait at most this long.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Who places the calls.
#[derive(Debug, Clone)]
pub enum Caller {
    Twilio(twilio::Client),
    /// `--dry-run`: log the call that would be placed, send nothing.
    DryRun,
}

/// The dispatch worker and the call tasks it spawns.
#[derive(Debug)]
pub struct Dispatcher {
    pub live: Live,
    pub store: Store,
    pub caller: Caller,
    /// Notified by ingest after each stored alert.
    pub wake: Arc<Notify>,
    /// Tracks the call tasks, so shutdown can wait for requests in flight.
    pub calls: TaskTracker,
    pub shutdown: CancellationToken,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// When the next paced call request may leave (`[twilio] calls_per_second`).
    pub pacer: Pacer,
}

/// Hands out send times for call requests, in the order calls are spawned: with
/// `calls_per_second`, one slot per `1/cps` for the whole daemon; without it, calls of
/// one incident are only staggered by a millisecond each, so their requests leave in the
/// order the rule lists the numbers (Twilio queues calls beyond the account's rate in
/// request order) without waiting for one to be answered before the next.
#[derive(Debug, Default)]
pub struct Pacer {
    next: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    /// The earliest time call number `position` (0-based, within its incident) may be sent.
    fn slot(&self, calls_per_second: Option<f64>, position: usize) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let stagger =
            now + Duration::from_millis(u64::try_from(position).unwrap_or(u64::MAX).min(1000));
        let Some(cps) = calls_per_second else {
            return stagger;
        };
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = next.map_or(now, |n| n.max(now));
        *next = Some(slot + Duration::from_secs_f64(1.0 / cps));
        slot
    }
}

impl Dispatcher {
    /// Runs until shutdown: resumes unfinished calls, then routes stored alerts as they
    /// arrive.
    pub async fn run(self: Arc<Self>) {
        // Alive from the start: resuming (which may ask Twilio) is work, not a hang.
        self.health.dispatcher_beat();
        self.resume().await;
        loop {
            self.health.dispatcher_beat();
            self.drain().await;
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    /// One pass without a daemon (`mailcall call`): resumes unfinished calls and routes
    /// what is stored; the caller then waits for the call tasks.
    pub async fn run_once(&self) {
        self.resume().await;
        self.drain().await;
    }

    /// Rounds until someone is in the bridge, and voicemail handling, by polling Twilio:
    /// each second, incidents whose round is up are checked for a human in their
    /// conference (someone there: no more rounds; nobody: everyone is called again, up
    /// to `rounds`), and placed calls are asked who answered (a machine gets a short
    /// voicemail and is hung up on, and does not count as reaching anyone).
    pub async fn watch(self: Arc<Self>) {
        let mut checked: HashMap<i64, Instant> = HashMap::new();
        let mut postponed: HashMap<i64, Instant> = HashMap::new();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(WATCH_EVERY) => {}
            }
            // With a public URL, pressing 1 tells a person from a voicemail.
            if let Caller::Twilio(client) = &self.caller
                && self.live.load().config.twilio.public_url.is_none()
            {
                self.check_answerers(client, &mut checked).await;
            }
            let due = match self.store.due_rounds(now_ms()).await {
                Ok(due) => due,
                Err(e) => {
                    error!(error = %e, "cannot read the incidents whose round is up");
                    continue;
                }
            };
            for round in due {
                if postponed
                    .get(&round.incident_id)
                    .is_some_and(|until| Instant::now() < *until)
                {
                    continue;
                }
                let reached = match self.someone_in_bridge(&round).await {
                    Ok(reached) => reached,
                    Err(e) => {
                        warn!(incident = round.incident_id, error = %e, "cannot tell who is in the bridge; asking again in 10 s");
                        postponed
                            .insert(round.incident_id, Instant::now() + Duration::from_secs(10));
                        continue;
                    }
                };
                self.finish_round(&round, reached).await;
            }
        }
    }

    /// Is a person (not a voicemail) in the incident's conference? Dry runs never are.
    async fn someone_in_bridge(&self, round: &DueRound) -> Result<bool, String> {
        let Caller::Twilio(client) = &self.caller else {
            return Ok(false);
        };
        for sid in client
            .conference_calls(&twiml::room_name(&round.public_id))
            .await?
        {
            // A participant whose call cannot be read counts as a person: better no
            // further round than calling people out of a live bridge.
            if !client.get_call(&sid).await.is_ok_and(|info| info.machine()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn finish_round(&self, round: &DueRound, reached: bool) {
        let settings = self.live.load_full();
        let max = settings.config.limits.max_calls_per_hour;
        let (incident, of) = (round.incident_id, round.rounds);
        match self.store.finish_round(incident, reached, max).await {
            Ok(RoundEnd::Reached { round }) => info!(
                incident,
                round, "someone is in the bridge: no further rounds"
            ),
            Ok(RoundEnd::Unanswered { rounds }) => error!(
                incident,
                rounds,
                "NOBODY JOINED THE BRIDGE after every round of calls; the incident is unanswered"
            ),
            Ok(RoundEnd::NextRound {
                round,
                calls,
                refused,
            }) => {
                warn!(
                    incident,
                    round,
                    of,
                    calls = calls.len(),
                    "nobody joined the bridge: calling everyone again"
                );
                self.metrics.budget_refusals.inc_by(refused.len() as u64);
                if !refused.is_empty() {
                    error!(incident, refused = ?refused, "CALL BUDGET EXHAUSTED: these numbers are NOT called this round");
                }
                for (position, job) in calls.into_iter().enumerate() {
                    let not_before = self
                        .pacer
                        .slot(settings.config.twilio.calls_per_second, position);
                    self.spawn_call(job, not_before);
                }
            }
            Err(e) => {
                error!(incident, error = %e, "cannot record the end of a round; will try again")
            }
        }
    }

    /// Asks Twilio who answered the calls of running rounds (each at most every
    /// [`CHECK_CALL_EVERY`]); an answering machine gets the voicemail TwiML.
    async fn check_answerers(&self, client: &twilio::Client, checked: &mut HashMap<i64, Instant>) {
        let ring = Duration::from_secs(u64::from(self.live.load().config.twilio.ring_seconds));
        let since = now_ms().saturating_sub(
            i64::try_from((ring + Duration::from_secs(120)).as_millis()).unwrap_or(i64::MAX),
        );
        let calls = match self.store.calls_to_check(since).await {
            Ok(calls) => calls,
            Err(e) => {
                error!(error = %e, "cannot read the calls to check");
                return;
            }
        };
        checked.retain(|id, _| calls.iter().any(|c| c.call_id == *id));
        for call in calls {
            let Some(sid) = call.sid.as_deref() else {
                continue;
            };
            if checked
                .get(&call.call_id)
                .is_some_and(|at| at.elapsed() < CHECK_CALL_EVERY)
            {
                continue;
            }
            checked.insert(call.call_id, Instant::now());
            let info = match client.get_call(sid).await {
                Ok(info) => info,
                Err(e) => {
                    warn!(incident = call.incident_id, number = %call.number, error = %e, "cannot read a call's status");
                    continue;
                }
            };
            let Some(answered_by) = info.answered_by.clone() else {
                continue;
            };
            if let Err(e) = self
                .store
                .set_answered_by(call.call_id, answered_by.clone())
                .await
            {
                error!(error = %e, "cannot record who answered a call");
            }
            if info.machine() {
                let voicemail = twiml::voicemail(&call.message, &call.language, &call.voice);
                match client.update_call(sid, &voicemail).await {
                    Ok(()) => {
                        info!(incident = call.incident_id, number = %call.number, answered_by, "voicemail answered: left a message; not counted as reached")
                    }
                    Err(e) => {
                        warn!(incident = call.incident_id, number = %call.number, error = %e, "voicemail answered, but the message could not be left")
                    }
                }
            } else {
                info!(incident = call.incident_id, number = %call.number, answered_by, "call answered");
            }
        }
    }

    /// Resumes the calls the last run left unfinished.
    async fn resume(&self) {
        match self.store.unfinished_calls().await {
            Ok(jobs) => {
                if !jobs.is_empty() {
                    info!(
                        calls = jobs.len(),
                        "resuming calls left unfinished by the last run"
                    );
                }
                let cps = self.live.load().config.twilio.calls_per_second;
                for job in self.reconcile(jobs).await {
                    let not_before = self.pacer.slot(cps, 0);
                    self.spawn_call(job, not_before);
                }
            }
            Err(e) => error!(error = %e, "cannot read unfinished calls from the store"),
        }
    }

    /// Settles calls whose request was in flight when the daemon stopped: a call Twilio
    /// created since then, for that number, and not already known to the store as
    /// another call's, is taken as theirs (each such call for at most one of them).
    /// Returns the calls still to place.
    async fn reconcile(&self, jobs: Vec<CallJob>) -> Vec<CallJob> {
        let Caller::Twilio(client) = &self.caller else {
            return jobs;
        };
        let (in_flight, mut to_place): (Vec<CallJob>, Vec<CallJob>) =
            jobs.into_iter().partition(|j| j.in_flight_since.is_some());
        if in_flight.is_empty() {
            return to_place;
        }
        let known = match self.store.known_sids().await {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %e, "cannot read known call SIDs; calls in flight at the last stop are placed again");
                to_place.extend(in_flight);
                return to_place;
            }
        };
        let mut by_number: BTreeMap<String, Vec<CallJob>> = BTreeMap::new();
        for job in in_flight {
            by_number.entry(job.number.clone()).or_default().push(job);
        }
        for (number, mut jobs) in by_number {
            jobs.sort_by_key(|j| j.in_flight_since);
            let since = jobs[0].in_flight_since.unwrap_or(0);
            let mut candidates = match client
                .recent_calls(&number, &self.live.load().config.twilio.from, since)
                .await
            {
                Ok(c) => c
                    .into_iter()
                    .filter(|(sid, _)| !known.contains(sid))
                    .collect::<Vec<_>>(),
                Err(e) => {
                    warn!(number = %number, error = %e,
                        "cannot tell whether requests in flight at the last stop reached Twilio; calling again so nobody is missed");
                    to_place.extend(jobs);
                    continue;
                }
            };
            for job in jobs {
                let sent = job.in_flight_since.unwrap_or(0).div_euclid(1000) - 1;
                match candidates.iter().position(|(_, created)| *created >= sent) {
                    Some(i) => {
                        let (sid, _) = candidates.remove(i);
                        info!(incident = job.incident_id, number = %job.number, sid = %sid,
                            "the request in flight at the last stop did reach Twilio; not calling again");
                        record(
                            &self.store,
                            &job,
                            CallUpdate::Placed {
                                sid,
                                dry_run: false,
                            },
                        )
                        .await;
                    }
                    None => to_place.push(job),
                }
            }
        }
        to_place
    }

    /// Routes every stored alert not yet routed.
    async fn drain(&self) {
        loop {
            let batch = match self.store.pending_alerts(BATCH).await {
                Ok(b) if b.is_empty() => return,
                Ok(b) => b,
                Err(e) => {
                    error!(error = %e, "cannot read stored alerts; will try again");
                    return;
                }
            };
            if !self.route_batch(batch).await {
                return;
            }
        }
    }

    /// Routes a batch and records the outcome; false if the store failed for any of
    /// it, so that the caller waits before trying again instead of spinning.
    async fn route_batch(&self, batch: Vec<PendingAlert>) -> bool {
        let settings = self.live.load_full();
        let config = &settings.config;
        let mut items = Vec::with_capacity(batch.len());
        let mut alerts = Vec::with_capacity(batch.len());
        for pending in batch {
            let (alert, decision) = match &pending.direct {
                Some(direct) => (
                    Alert {
                        subject: direct.message.clone(),
                        ..Alert::default()
                    },
                    route::direct(config, &pending.source, direct),
                ),
                None => {
                    let alert = Alert::from_mime(&pending.raw, &pending.envelope);
                    let decision = route::route(config, &alert);
                    (alert, decision)
                }
            };
            let public_id = new_public_id();
            let twiml = match &config.twilio.public_url {
                // Press 1 to join: only a person who chose to is in the bridge.
                Some(base) => twiml::gather_call(
                    &decision.message,
                    &decision.language,
                    &decision.voice,
                    &format!("{base}/twilio/gather?room={public_id}"),
                ),
                None => twiml::call(
                    &decision.message,
                    &decision.language,
                    &decision.voice,
                    &twiml::room_name(&public_id),
                ),
            };
            let new = NewIncident { twiml, public_id };
            alerts.push((
                pending.id,
                pending.received_at,
                pending.source,
                alert,
                decision.clone(),
            ));
            items.push((pending.id, decision, new));
        }
        let results = match self
            .store
            .record_routings(items, config.limits.max_calls_per_hour)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot record routing decisions; will try again");
                return false;
            }
        };
        let all_recorded = results.iter().all(Result::is_ok);
        for ((alert_id, received_at, source, alert, decision), result) in
            alerts.into_iter().zip(results)
        {
            let message_id = alert.message_id.as_deref().unwrap_or("-");
            let rule = decision.rule.as_deref().unwrap_or("-");
            let action = match &result {
                Err(_) => None,
                Ok(Routed::NotCalled) => Some(decision.action.as_str()),
                Ok(Routed::Deduplicated { .. }) => Some("deduplicated"),
                Ok(Routed::Opened { .. }) => Some("call"),
                Ok(Routed::Resolved { .. }) => Some("resolve"),
            };
            if let Some(action) = action {
                self.metrics
                    .alerts_routed
                    .get_or_create(&Routing {
                        rule: rule.to_string(),
                        action,
                    })
                    .inc();
            }
            match result {
                Err(e) => {
                    error!(alert = alert_id, error = %e, "cannot record routing; will try again")
                }
                Ok(Routed::NotCalled) if decision.action == Action::None => warn!(
                    alert = alert_id, source, message_id, from = %alert.from, subject = %alert.subject,
                    action = "none", "unrouted: no rule matches this mail; nobody is called"
                ),
                Ok(Routed::Resolved {
                    incident_id,
                    public_id,
                }) => {
                    info!(
                        alert = alert_id, source, message_id, from = %alert.from, rule, action = "resolve",
                        incident = incident_id, dedup_key = %decision.dedup_key, "incident resolved: no further rounds"
                    );
                    self.announce_resolution(incident_id, public_id, &decision);
                }
                Ok(Routed::NotCalled) if decision.action == Action::Resolve => info!(
                    alert = alert_id, source, message_id, rule, dedup_key = %decision.dedup_key,
                    "resolve: no open incident with this dedup key"
                ),
                Ok(Routed::NotCalled) => info!(
                    alert = alert_id, source, message_id, from = %alert.from, rule, action = "drop",
                    "dropped by rule"
                ),
                Ok(Routed::Deduplicated {
                    incident_id,
                    alert_count,
                }) => info!(
                    alert = alert_id, source, message_id, from = %alert.from, rule, action = "deduplicated",
                    incident = incident_id, alert_count, dedup_key = %decision.dedup_key,
                    "same problem as an open incident; nobody is called again"
                ),
                Ok(Routed::Opened {
                    incident_id,
                    calls,
                    refused,
                }) => {
                    self.metrics.incidents_opened.inc();
                    self.metrics.budget_refusals.inc_by(refused.len() as u64);
                    let numbers: Vec<&str> = calls.iter().map(|c| c.number.as_str()).collect();
                    info!(
                        alert = alert_id, source, message_id, from = %alert.from, rule, action = "call",
                        incident = incident_id, numbers = ?numbers, dedup_key = %decision.dedup_key,
                        "new incident; calling everyone at once"
                    );
                    if !refused.is_empty() {
                        error!(
                            incident = incident_id, refused = ?refused,
                            max_calls_per_hour = config.limits.max_calls_per_hour,
                            "CALL BUDGET EXHAUSTED: these numbers are NOT called; raise [limits] max_calls_per_hour if this is a real incident"
                        );
                    }
                    for (position, job) in calls.into_iter().enumerate() {
                        let not_before = self.pacer.slot(config.twilio.calls_per_second, position);
                        self.spawn_call(
                            CallJob {
                                received_at: Some(received_at),
                                ..job
                            },
                            not_before,
                        );
                    }
                }
            }
        }
        all_recorded
    }

    /// Speaks the resolve message to whoever is in the bridge: with a public URL as a
    /// conference announcement (Twilio fetches the TwiML from us); without one, each
    /// participant's call is redirected to hear it and rejoin the room.
    fn announce_resolution(&self, incident_id: i64, public_id: String, decision: &route::Decision) {
        let Caller::Twilio(client) = self.caller.clone() else {
            return;
        };
        let room = twiml::room_name(&public_id);
        if let Some(base) = self.live.load().config.twilio.public_url.clone() {
            let query =
                serde_urlencoded::to_string([("text", &decision.message)]).unwrap_or_default();
            let url = format!("{base}/twilio/announce?{query}");
            self.calls.spawn(async move {
                match client.conferences(&room).await {
                    Ok(sids) => {
                        for sid in sids {
                            match client.announce(&sid, &url).await {
                                Ok(()) => info!(incident = incident_id, conference = %sid, "resolution announced in the bridge"),
                                Err(e) => warn!(incident = incident_id, error = %e, "cannot announce the resolution"),
                            }
                        }
                    }
                    Err(e) => warn!(incident = incident_id, error = %e, "cannot find the bridge to announce the resolution"),
                }
            });
            return;
        }
        let announcement = twiml::announce(
            &decision.message,
            &decision.language,
            &decision.voice,
            &room,
        );
        self.calls.spawn(async move {
            let participants = match client.conference_calls(&room).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(incident = incident_id, error = %e, "cannot tell who is in the bridge to announce the resolution");
                    return;
                }
            };
            for sid in participants {
                match client.update_call(&sid, &announcement).await {
                    Ok(()) => info!(incident = incident_id, call = %sid, "resolution announced in the bridge"),
                    Err(e) => warn!(incident = incident_id, call = %sid, error = %e, "cannot announce the resolution to a participant"),
                }
            }
        });
    }

    fn spawn_call(&self, job: CallJob, not_before: tokio::time::Instant) {
        let caller = self.caller.clone();
        let store = self.store.clone();
        let settings = self.live.load_full();
        let shutdown = self.shutdown.clone();
        let metrics = Arc::clone(&self.metrics);
        self.calls.spawn(async move {
            tokio::select! {
                // Not sent yet: it stays in the store and is placed after the restart.
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep_until(not_before) => {
                    place_call(job, &caller, &store, &settings.config, &metrics, &shutdown).await;
                }
            }
        });
    }
}

/// Places one call, retrying what is worth retrying, and records every step.
async fn place_call(
    job: CallJob,
    caller: &Caller,
    store: &Store,
    config: &Config,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let t = &config.twilio;
    let deadline = job
        .created_at
        .saturating_add(i64::try_from(t.retry_for.as_millis()).unwrap_or(i64::MAX));
    // Attempts made before this one (the first one may already be recorded).
    let mut attempt = u32::try_from(job.attempts)
        .unwrap_or(u32::MAX)
        .saturating_sub(u32::from(job.sending_recorded));
    let mut recorded = job.sending_recorded;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        if !std::mem::take(&mut recorded) {
            record(store, &job, CallUpdate::Sending).await;
        }
        let outcome = match caller {
            Caller::DryRun => {
                info!(
                    incident = job.incident_id, rule = %job.rule, number = %job.number, twiml = %job.twiml,
                    "dry-run: would place this call"
                );
                record(
                    store,
                    &job,
                    CallUpdate::Placed {
                        sid: "dry-run".into(),
                        dry_run: true,
                    },
                )
                .await;
                if let Some(text) = &job.sms {
                    info!(incident = job.incident_id, number = %job.number, text, "dry-run: would send this SMS");
                }
                return;
            }
            Caller::Twilio(client) => {
                if let Some(received) = job.received_at.filter(|_| attempt == 0) {
                    let waited = now_ms().saturating_sub(received).max(0);
                    metrics.dispatch_latency.observe(waited as f64 / 1000.0);
                }
                client
                    .create_call(&CallRequest {
                        to: &job.number,
                        from: &t.from,
                        twiml: &job.twiml,
                        timeout_secs: t.ring_seconds,
                        // Polling tells voicemail from a person (see `watch`); with a
                        // public URL a person presses 1 instead.
                        machine_detection: t.public_url.is_none(),
                        status_callback: t
                            .public_url
                            .as_ref()
                            .map(|base| format!("{base}/twilio/status"))
                            .as_deref(),
                    })
                    .await
            }
        };
        match outcome {
            Outcome::Placed { sid } => {
                // Counted before it is logged: whoever sees the log line sees the count.
                metrics.calls_placed.inc();
                canary_result(metrics, &job, None);
                info!(incident = job.incident_id, rule = %job.rule, number = %job.number, sid = %sid, "call placed");
                if let (Some(text), Caller::Twilio(client)) = (&job.sms, caller) {
                    send_sms(client, store, &job, &t.from, text).await;
                }
                record(
                    store,
                    &job,
                    CallUpdate::Placed {
                        sid,
                        dry_run: false,
                    },
                )
                .await;
                return;
            }
            Outcome::Permanent {
                status,
                code,
                message,
            } => {
                metrics
                    .calls_failed
                    .get_or_create(&CallError {
                        code: code.map_or("none".into(), |c| c.to_string()),
                    })
                    .inc();
                error!(
                    incident = job.incident_id, rule = %job.rule, number = %job.number, http_status = status,
                    twilio_code = code, error = %message, hint = error_hint(code),
                    "call failed permanently; this number is not called"
                );
                canary_result(metrics, &job, Some(&message));
                record(
                    store,
                    &job,
                    CallUpdate::Failed {
                        code,
                        error: message,
                    },
                )
                .await;
                return;
            }
            Outcome::Retry { after, reason } => {
                let delay = backoff(
                    attempt,
                    after,
                    t.retry_initial_delay,
                    t.retry_max_delay,
                    rand::rng().random(),
                );
                let next =
                    now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                if next > deadline {
                    let error = format!(
                        "gave up after retrying for {}: {reason}",
                        humantime::format_duration(t.retry_for)
                    );
                    error!(incident = job.incident_id, number = %job.number, error = %error, "call failed; this number is not called");
                    metrics
                        .calls_failed
                        .get_or_create(&CallError {
                            code: "none".into(),
                        })
                        .inc();
                    canary_result(metrics, &job, Some(&error));
                    record(store, &job, CallUpdate::Failed { code: None, error }).await;
                    return;
                }
                warn!(
                    incident = job.incident_id, number = %job.number, error = %reason,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "call not placed yet; retrying"
                );
                metrics.call_retries.inc();
                record(store, &job, CallUpdate::Retrying { error: reason }).await;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// Sends the SMS summary of a placed call (one attempt: the call is what matters) and
/// records the outcome in the call's history.
async fn send_sms(client: &twilio::Client, store: &Store, job: &CallJob, from: &str, text: &str) {
    let result = match client.send_sms(&job.number, from, text).await {
        Outcome::Placed { sid } => {
            info!(incident = job.incident_id, number = %job.number, sid = %sid, "SMS summary sent");
            Ok(sid)
        }
        Outcome::Permanent { code, message, .. } => {
            warn!(incident = job.incident_id, number = %job.number, twilio_code = code, error = %message, "SMS summary not sent");
            Err(match code {
                Some(code) => format!("error {code}: {message}"),
                None => message,
            })
        }
        Outcome::Retry { reason, .. } => {
            warn!(incident = job.incident_id, number = %job.number, error = %reason, "SMS summary not sent");
            Err(reason)
        }
    };
    if let Err(e) = store.record_sms(job.call_id, result).await {
        error!(incident = job.incident_id, error = %e, "cannot record the SMS summary");
    }
}

/// Accounts for a canary call's outcome (`error` is `None` when Twilio accepted it).
fn canary_result(metrics: &Metrics, job: &CallJob, error: Option<&str>) {
    if job.rule != "canary" {
        return;
    }
    match error {
        None => {
            metrics
                .canary_runs
                .get_or_create(&CanaryOutcome { result: "ok" })
                .inc();
            metrics.canary_last_success.set(now_ms() / 1000);
        }
        Some(error) => {
            metrics
                .canary_runs
                .get_or_create(&CanaryOutcome { result: "failed" })
                .inc();
            error!(number = %job.number, error, "CANARY FAILED: the phone path is broken; real alerts would not ring either");
        }
    }
}

/// Records a call update; a store failure is logged but does not stop the call, since
/// ringing the phone matters more than the record of it.
async fn record(store: &Store, job: &CallJob, update: CallUpdate) {
    if let Err(e) = store.update_call(job.call_id, update).await {
        error!(incident = job.incident_id, number = %job.number, error = %e, "cannot record call status");
    }
}

/// The delay before retry number `attempt` (0-based): exponential from `initial`, capped
/// at `max`, with "equal jitter" (between half and all of it) so that retries from a
/// storm do not arrive in lockstep, and never shorter than Twilio's `Retry-After`.
/// `jitter` is a random number in `[0, 1)`.
pub fn backoff(
    attempt: u32,
    retry_after: Option<Duration>,
    initial: Duration,
    max: Duration,
    jitter: f64,
) -> Duration {
    let exp = initial
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(max);
    let jittered = exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    retry_after.map_or(jittered, |after| after.max(jittered))
}

/// What an operator should do about a Twilio error code.
pub fn error_hint(code: Option<i64>) -> &'static str {
    match code {
        Some(21211) => "the number is not a valid phone number; fix it in rules.toml",
        Some(21219) => {
            "trial accounts can only call verified numbers; verify it in the Twilio console or upgrade"
        }
        Some(21215 | 13227) => {
            "geo permissions forbid calling this country; enable it under Voice > Settings > Geo permissions"
        }
        Some(20003) => {
            "Twilio rejected the credentials; check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (or API key)"
        }
        Some(21210 | 21212) => {
            "the caller ID ([twilio] from) is not a number of this Twilio account"
        }
        Some(20404) => "the account SID is wrong, or api_base points at the wrong place",
        Some(10004) => "the account's concurrent-call limit is reached; retrying until calls end",
        _ => "see https://www.twilio.com/docs/api/errors",
    }
}

/// A random, opaque incident id (16 hex digits) that names the conference room.
fn new_public_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_jitters_and_honours_retry_after() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(0, None, i, m, 0.999_999).as_millis(), 999);
        assert_eq!(backoff(0, None, i, m, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(3, None, i, m, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(30, None, i, m, 0.0), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX, None, i, m, 1.0), m);
        assert_eq!(
            backoff(0, Some(Duration::from_secs(7)), i, m, 0.5),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(10, Some(Duration::from_secs(1)), i, m, 0.0),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn public_ids_are_opaque_hex() {
        let a = new_public_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_public_id());
    }
}
