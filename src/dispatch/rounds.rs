//! The rounds worker: while nobody is in an incident's bridge, everyone is called
//! again each `round_interval`, up to `rounds`; and, without a public URL, who answered
//! each call is learned by polling Twilio.
//!
//! A person is someone answering-machine detection calls `human` (the call's TwiML
//! takes them straight into the bridge), someone who pressed 1 or joined the bridge
//! (callbacks, with a public URL), or a participant of the bridge that is not one of
//! our calls (a dial-in). AMD's `unknown` is not a person. Polling watches every call
//! that may still be answered, through the whole round, not one snapshot at its end:
//! a call retried past its round's end, and a call still ringing after someone joined
//! (a voicemail answering then gets its message instead of recording the bridge).
//!
//! A round's end is one store transaction that first checks the incident is still open
//! and in that round, and skips numbers whose call is still live (queued, ringing, in
//! progress) or still being placed. Twilio is asked in tasks (each request with a
//! timeout), never in the loop.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tracing::{error, info, warn};

use super::{Caller, Dispatcher, IDLE_POLL};
use crate::health::Worker;
use crate::store::{CallState, DueRound, LiveCall, RoundEnd, TwilioStatus, WatchedCall, now_ms};
use crate::twilio::{self, twiml};

/// One call's answerer is asked for at most this often.
const CHECK_CALL_EVERY: Duration = Duration::from_secs(2);
/// Requests to Twilio one pass makes at once, at most.
const CONCURRENT_READS: usize = 8;
/// How often the calls of bridged incidents are followed.
const BRIDGE_EVERY: Duration = Duration::from_secs(10);
/// Calls of bridged incidents asked about per pass, at most.
const BRIDGE_CALLS: usize = 64;

/// What the loop's tasks share.
#[derive(Debug, Default)]
struct Busy {
    /// Incidents whose round is being finished.
    finishing: HashSet<i64>,
    /// When each watched call was last asked about.
    checked: HashMap<i64, Instant>,
}

impl Dispatcher {
    /// Watches answers and ends rounds until shutdown.
    pub(super) async fn rounds_loop(self: Arc<Self>) {
        let busy: Arc<Mutex<Busy>> = Arc::default();
        let watching = Arc::new(AtomicBool::new(false));
        let following = Arc::new(AtomicBool::new(false));
        let mut followed = Instant::now();
        loop {
            self.beat(Worker::Rounds);
            if let Caller::Twilio(client) = &self.caller
                && followed.elapsed() >= BRIDGE_EVERY
                && !following.swap(true, Ordering::AcqRel)
            {
                followed = Instant::now();
                let (me, client, following) =
                    (Arc::clone(&self), client.clone(), Arc::clone(&following));
                self.calls.spawn(async move {
                    me.follow_bridges(&client).await;
                    following.store(false, Ordering::Release);
                });
            }
            // Polling incidents are watched whatever `public_url` says now: an
            // incident keeps the mode it opened with.
            if let Caller::Twilio(client) = &self.caller
                && !watching.swap(true, Ordering::AcqRel)
            {
                let (me, client, busy, watching) = (
                    Arc::clone(&self),
                    client.clone(),
                    Arc::clone(&busy),
                    Arc::clone(&watching),
                );
                self.calls.spawn(async move {
                    me.watch_answers(&client, &busy).await;
                    watching.store(false, Ordering::Release);
                });
            }
            self.spawn_due_rounds(&busy).await;
            self.escalate_due().await;
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    async fn spawn_due_rounds(self: &Arc<Self>, busy: &Arc<Mutex<Busy>>) {
        let real = matches!(self.caller, Caller::Twilio(_));
        let due = match self.store.due_rounds(now_ms(), real).await {
            Ok(due) => due,
            Err(e) => {
                error!(error = %e, "cannot read the incidents whose round is up");
                return;
            }
        };
        for round in due {
            if !lock(busy).finishing.insert(round.incident_id) {
                continue;
            }
            let (me, busy) = (Arc::clone(self), Arc::clone(busy));
            self.calls.spawn(async move {
                let incident = round.incident_id;
                me.finish(round).await;
                lock(&busy).finishing.remove(&incident);
            });
        }
    }

    /// Polling mode: asks Twilio about the calls that may still be answered (each at
    /// most every [`CHECK_CALL_EVERY`]). A person answering bridges the incident at once; an
    /// answering machine gets the voicemail TwiML.
    async fn watch_answers(&self, client: &twilio::Client, busy: &Mutex<Busy>) {
        let ring = Duration::from_secs(u64::from(self.live.load().config.twilio.ring_seconds));
        let since = now_ms().saturating_sub(
            i64::try_from((ring + Duration::from_secs(120)).as_millis()).unwrap_or(i64::MAX),
        );
        let calls = match self.store.calls_to_watch(since).await {
            Ok(calls) => calls,
            Err(e) => {
                error!(error = %e, "cannot read the calls to watch");
                return;
            }
        };
        let due: Vec<WatchedCall> = {
            let mut busy = lock(busy);
            busy.checked
                .retain(|id, _| calls.iter().any(|c| c.call_id == *id));
            calls
                .into_iter()
                .filter(|c| {
                    let fresh = busy
                        .checked
                        .get(&c.call_id)
                        .is_some_and(|at| at.elapsed() < CHECK_CALL_EVERY);
                    if !fresh {
                        busy.checked.insert(c.call_id, Instant::now());
                    }
                    !fresh
                })
                .collect()
        };
        futures_util::stream::iter(due)
            .for_each_concurrent(CONCURRENT_READS, |call| self.watch_call(client, call))
            .await;
    }

    async fn watch_call(&self, client: &twilio::Client, call: WatchedCall) {
        let info = match client.get_call(&call.sid).await {
            Ok(info) => info,
            Err(e) => {
                warn!(incident = call.incident_id, number = %call.number, error = %e, "cannot read a call's status");
                return;
            }
        };
        let status = info.status.parse::<TwilioStatus>().ok();
        if let Err(e) = self
            .store
            .set_call_status(call.call_id, status, info.answered_by.clone())
            .await
        {
            error!(error = %e, "cannot record a call's status");
        }
        let Some(answered_by) = info.answered_by.as_deref() else {
            return;
        };
        if info.human() {
            info!(incident = call.incident_id, number = %call.number, answered_by, "call answered by a person");
            self.bridged(call.incident_id).await;
        } else if info.machine() {
            let prompts = self.live.load().config.prompts(&call.language);
            let voicemail = twiml::voicemail(&prompts, &call.message, &call.language, &call.voice);
            let event = match client.update_call(&call.sid, &voicemail).await {
                Ok(()) => {
                    info!(incident = call.incident_id, number = %call.number, answered_by, "voicemail answered: left a message; not counted as reached");
                    "voicemail: left a message"
                }
                Err(e) => {
                    warn!(incident = call.incident_id, number = %call.number, error = %e, "voicemail answered, but the message could not be left");
                    "voicemail: the message could not be left"
                }
            };
            let _ = self.store.call_event(call.call_id, event.into()).await;
        } else {
            info!(incident = call.incident_id, number = %call.number, answered_by,
                "call answered, but answering-machine detection cannot tell by whom; not counted as a person");
        }
    }

    /// A person is in the bridge: no further rounds.
    async fn bridged(&self, incident: i64) {
        match self.store.mark_bridged(incident).await {
            Ok(true) => info!(incident, "someone is in the bridge: no further rounds"),
            Ok(false) => {}
            Err(e) => error!(incident, error = %e, "cannot record that someone is in the bridge"),
        }
    }

    /// Ends a round: refreshes what Twilio says about the incident's calls, looks in
    /// the bridge, and records the end (which rechecks the incident is still open).
    async fn finish(&self, round: DueRound) {
        let mut bridged = false;
        if let (Caller::Twilio(client), false) = (&self.caller, round.dry_run) {
            let polling = !round.press_one;
            bridged |= self.refresh_live_calls(client, round.incident_id).await && polling;
            match self
                .someone_in_bridge(client, &round.public_id, polling)
                .await
            {
                Ok(found) => bridged |= found,
                Err(e) => warn!(incident = round.incident_id, error = %e,
                    "cannot tell who is in the bridge; ending the round on what is known"),
            }
        }
        let settings = self.live.load_full();
        let max = settings.config.limits.max_calls_per_hour;
        let (incident, of) = (round.incident_id, round.rounds);
        match self
            .store
            .finish_round(incident, round.round, bridged, max)
            .await
        {
            Ok(RoundEnd::Stale) => {}
            Ok(RoundEnd::LastCallsPending { wait_ms }) => {
                tracing::debug!(
                    incident,
                    round = round.round,
                    wait_ms,
                    "the last round is up but some of its calls are still under way; it ends once they have rung out"
                )
            }
            Ok(RoundEnd::Bridged { round }) => {
                info!(
                    incident,
                    round, "someone is in the bridge: no further rounds"
                )
            }
            Ok(RoundEnd::Unanswered { rounds }) => error!(
                incident,
                rounds,
                "NOBODY JOINED THE BRIDGE after every round of calls; the incident is unanswered"
            ),
            Ok(RoundEnd::NextRound { round, calls }) => {
                let calling: Vec<&str> = calls
                    .iter()
                    .filter(|c| matches!(c.state, CallState::Queued | CallState::DryRun))
                    .map(|c| c.number.as_str())
                    .collect();
                warn!(incident, round, of, calling = ?calling, dry_run = round_is_dry(&calls),
                    "nobody joined the bridge: calling everyone again");
                for call in &calls {
                    let reason = call.reason.as_deref().unwrap_or_default();
                    match call.state {
                        CallState::Skipped => {
                            info!(incident, round, number = %call.number, reason, "not called again this round")
                        }
                        CallState::Refused => {
                            self.metrics.budget_refusals.inc();
                            error!(incident, number = %call.number, "CALL BUDGET EXHAUSTED: this number is NOT called this round");
                        }
                        CallState::DryRun => {
                            info!(incident, round, number = %call.number, "dry-run: would call again")
                        }
                        _ => {}
                    }
                }
                if calls.iter().any(|c| c.state == CallState::Queued) {
                    self.placer_wake.notify_one();
                }
            }
            Err(e) => {
                error!(incident, error = %e, "cannot record the end of a round; will try again")
            }
        }
    }

    /// Asks Twilio about the incident's calls that may still be live, so the next round
    /// skips those that are; true when one was answered by a person.
    async fn refresh_live_calls(&self, client: &twilio::Client, incident: i64) -> bool {
        match self.store.live_calls(incident).await {
            Ok(calls) => self.refresh(client, calls).await,
            Err(e) => {
                error!(incident, error = %e, "cannot read the incident's calls");
                false
            }
        }
    }

    /// Follows the calls of bridged incidents until they end, so that a bridge is known
    /// to be over (retention may then delete the incident when the store is full) and
    /// a later round never skips a number on a stale "in progress".
    async fn follow_bridges(&self, client: &twilio::Client) {
        match self.store.bridged_live_calls(BRIDGE_CALLS).await {
            Ok(calls) => {
                self.refresh(client, calls).await;
            }
            Err(e) => error!(error = %e, "cannot read the calls of bridged incidents"),
        }
    }

    /// Asks Twilio about each call and records its status and answerer; true when one
    /// was answered by a person.
    async fn refresh(&self, client: &twilio::Client, calls: Vec<LiveCall>) -> bool {
        let human = AtomicBool::new(false);
        futures_util::stream::iter(calls)
            .for_each_concurrent(CONCURRENT_READS, |call| {
                let human = &human;
                async move {
                    match client.get_call(&call.sid).await {
                        Ok(info) => {
                            human.fetch_or(info.human(), Ordering::Relaxed);
                            let status = info.status.parse::<TwilioStatus>().ok();
                            if let Err(e) = self
                                .store
                                .set_call_status(call.call_id, status, info.answered_by)
                                .await
                            {
                                error!(error = %e, "cannot record a call's status");
                            }
                        }
                        Err(e) => {
                            warn!(number = %call.number, error = %e, "cannot read a call's status")
                        }
                    }
                }
            })
            .await;
        human.into_inner()
    }

    /// Is a person in the incident's conference? A participant that dialled in is; one
    /// of our calls is a person if they pressed 1 to get there (public URL) or
    /// answering-machine detection said `human` (polling). A participant the store does
    /// not know may still be our call (its request's answer was lost): Twilio is asked
    /// which way it went.
    async fn someone_in_bridge(
        &self,
        client: &twilio::Client,
        public_id: &str,
        polling: bool,
    ) -> Result<bool, String> {
        for sid in client
            .conference_calls(&twiml::room_name(public_id))
            .await?
        {
            let person = match self.store.answered_by(&sid).await {
                Ok(None) => match client.get_call(&sid).await {
                    Ok(info) if info.outbound() => !polling || info.human(),
                    Ok(_) => true,
                    // Cannot tell: not counted (calling again beats leaving nobody).
                    Err(_) => false,
                },
                Ok(Some(answered_by)) => !polling || answered_by.as_deref() == Some("human"),
                Err(e) => return Err(e.to_string()),
            };
            if person {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn round_is_dry(calls: &[crate::store::RoutedCall]) -> bool {
    calls.iter().any(|c| c.state == CallState::DryRun)
}

fn lock(busy: &Mutex<Busy>) -> std::sync::MutexGuard<'_, Busy> {
    busy.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
