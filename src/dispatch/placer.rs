//! The placer: queued calls → requests to Twilio. Each request is committed as a
//! `requesting` attempt before it leaves and its answer is committed after, so a crash
//! in between leaves a record the reconciler settles instead of a blind resend.
//! Twilio's answers are classified by [`twilio::Outcome`]: 429, 503 and connection
//! failures are retried with capped, jittered exponential backoff (honouring
//! `Retry-After`) until `retry_for` after the call was decided; 4xx errors are
//! permanent for that number; a lost answer is `unknown`, for the reconciler.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tracing::{error, info, warn};

use super::{Caller, Dispatcher, IDLE_POLL, WINDOW_SLACK, backoff, error_hint};
use crate::health::Worker;
use crate::metrics::{CallError, Metrics, Outcome as CanaryOutcome};
use crate::store::{
    AttemptOutcome, AttemptState, CALLBACK, CallJob, Claim, Recorded, SmsState, StoreError, ms,
    now_ms,
};
use crate::twilio::{self, CallRequest, Outcome};

/// Calls being placed at once, at most.
const MAX_IN_FLIGHT: usize = 256;

/// The set of calls whose task is running, shared with the tasks.
type InFlight = Arc<Mutex<HashSet<i64>>>;

impl Dispatcher {
    /// Places due calls as they come, until shutdown.
    pub(super) async fn place_loop(self: Arc<Self>) {
        let in_flight: InFlight = Arc::default();
        let sms_in_flight: InFlight = Arc::default();
        let mut sms_looked = std::time::Instant::now();
        loop {
            self.beat(Worker::Placer);
            // Owed SMS: at once when a call placed here owes one, else once a second
            // (status callbacks, a restart): not a store read on every busy pass.
            if self
                .sms_owed
                .swap(false, std::sync::atomic::Ordering::AcqRel)
                || sms_looked.elapsed() >= IDLE_POLL
            {
                sms_looked = std::time::Instant::now();
                self.spawn_owed_sms(&sms_in_flight).await;
            }
            let wait = self.spawn_due(&in_flight).await;
            if !self.idle(&self.placer_wake, wait).await {
                return;
            }
        }
    }

    /// Spawns a task for every due call not already being placed; returns how long to
    /// wait before looking again.
    async fn spawn_due(self: &Arc<Self>, in_flight: &InFlight) -> Duration {
        let room = MAX_IN_FLIGHT.saturating_sub(lock(in_flight).len());
        if room == 0 {
            return IDLE_POLL;
        }
        let now = now_ms();
        let due = match self.store.due_calls(now, room).await {
            Ok(due) => due,
            Err(e) => {
                error!(error = %e, "cannot read the calls to place; will try again");
                return IDLE_POLL;
            }
        };
        let cps = self.live.load().config.twilio.calls_per_second;
        for job in due {
            if !lock(in_flight).insert(job.call_id) {
                continue;
            }
            let not_before = self.pacer.slot(cps);
            let me = Arc::clone(self);
            let in_flight = Arc::clone(in_flight);
            self.calls.spawn(async move {
                let call_id = job.call_id;
                tokio::select! {
                    // Not claimed yet: it stays queued and goes out after the restart.
                    () = me.shutdown.cancelled() => {}
                    () = tokio::time::sleep_until(not_before) => me.place(job).await,
                }
                lock(&in_flight).remove(&call_id);
                me.placer_wake.notify_one();
            });
        }
        // A call due now is being placed (its task rings the bell when done); a retry
        // due later sets the alarm.
        match self.store.next_call_due().await {
            Ok(Some(at)) if at > now_ms() => {
                Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)).min(IDLE_POLL)
            }
            _ => IDLE_POLL,
        }
    }

    /// Sends the SMS summaries placed calls still owe, each in a task of its own. Owed
    /// is durable (set where the call was settled placed), so whoever settled it — the
    /// answer, the reconciler, a status callback, a daemon since killed — the SMS goes
    /// out once the call is placed: at least once, and more only if a crash comes
    /// between sending and recording it.
    async fn spawn_owed_sms(self: &Arc<Self>, in_flight: &InFlight) {
        let Caller::Twilio(client) = &self.caller else {
            return;
        };
        let owed = match self.store.owed_sms(MAX_IN_FLIGHT).await {
            Ok(owed) => owed,
            Err(e) => {
                error!(error = %e, "cannot read the SMS summaries still owed; will try again");
                return;
            }
        };
        for job in owed {
            if !lock(in_flight).insert(job.call_id) {
                continue;
            }
            let (store, client, in_flight) =
                (self.store.clone(), client.clone(), Arc::clone(in_flight));
            let from = self.live.load().config.twilio.from.clone();
            self.calls.spawn(async move {
                send_sms(&client, &store, &job, &from).await;
                lock(&in_flight).remove(&job.call_id);
            });
        }
    }

    /// One request for one call: claim (commit the attempt), send, record the answer.
    async fn place(&self, job: CallJob) {
        let Caller::Twilio(client) = &self.caller else {
            return;
        };
        let settings = self.live.load_full();
        let t = &settings.config.twilio;
        // The client's own timeout bounds the request (a reload does not change it).
        let window = ms(client.timeout() + WINDOW_SLACK);
        let attempt_id = match self.store.claim(job.call_id, &t.from, window).await {
            Ok(Claim::Go { attempt_id }) => attempt_id,
            Ok(Claim::Gone(_) | Claim::Busy) => return,
            Ok(Claim::Placed) => {
                info!(incident = job.incident_id, number = %job.number,
                    "an earlier request's call showed up late: the call is placed, and not sent again");
                self.placed(&job);
                return;
            }
            Err(e) => {
                error!(incident = job.incident_id, number = %job.number, error = %e, "cannot record a call request; not sending it");
                return;
            }
        };
        if let Some(received) = job.received_at.filter(|_| !job.canary) {
            let waited = now_ms().saturating_sub(received).max(0);
            self.metrics
                .dispatch_latency
                .observe(waited as f64 / 1000.0);
        }
        // Today's public URL, else the one the incident was opened with (a reload
        // removed it while the incident's calls are still being made).
        let callback = t
            .public_url
            .as_ref()
            .or(job.public_url.as_ref())
            .map(|base| format!("{base}/twilio/status?attempt={attempt_id}"));
        let outcome = client
            .create_call(&CallRequest {
                to: &job.number,
                from: &t.from,
                twiml: &job.twiml,
                timeout_secs: t.ring_seconds,
                // Polling tells voicemail from a person (see `rounds`); on a press-1
                // call a person presses 1 instead. The incident's own mode: a reload
                // that adds or removes `public_url` changes no incident in flight.
                machine_detection: !job.press_one,
                status_callback: callback.as_deref(),
            })
            .await;
        let permanent = matches!(outcome, Outcome::Permanent { .. });
        let record = match outcome {
            Outcome::Placed { sid } => AttemptOutcome::Placed { sid },
            Outcome::Unknown { reason } => {
                self.metrics.calls_unknown.inc();
                AttemptOutcome::Unknown { error: reason }
            }
            Outcome::Permanent {
                status,
                code,
                message,
            } => AttemptOutcome::Failed {
                http_status: Some(status),
                code,
                error: message,
                retry_at: None,
            },
            Outcome::Retry {
                after,
                status,
                code,
                reason,
            } => {
                let attempt = u32::try_from(job.attempts).unwrap_or(u32::MAX);
                let delay = backoff(
                    attempt,
                    after,
                    t.retry_initial_delay,
                    t.retry_max_delay,
                    rand::rng().random(),
                );
                let next = now_ms().saturating_add(ms(delay));
                if next > job.created_at.saturating_add(ms(t.retry_for)) {
                    let error = format!(
                        "gave up after retrying for {}: {reason}",
                        humantime::format_duration(t.retry_for)
                    );
                    AttemptOutcome::Failed {
                        http_status: status,
                        code,
                        error,
                        retry_at: None,
                    }
                } else {
                    warn!(
                        incident = job.incident_id, number = %job.number, error = %reason,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "call not placed yet; retrying"
                    );
                    self.metrics.call_retries.inc();
                    AttemptOutcome::Failed {
                        http_status: status,
                        code,
                        error: reason,
                        retry_at: Some(next),
                    }
                }
            }
        };
        let recorded = match self.record(attempt_id, record.clone()).await {
            Ok(recorded) => recorded,
            Err(e) => {
                error!(
                    incident = job.incident_id, number = %job.number, attempt = attempt_id, error = %e,
                    "cannot record Twilio's answer; the request will be reconciled"
                );
                return;
            }
        };
        if recorded.placed_earlier {
            info!(incident = job.incident_id, number = %job.number, attempt = attempt_id,
                "an earlier request's call showed up late while this one was out: the call is placed, and not sent again");
            self.placed(&job);
            return;
        }
        match (&record, recorded.state) {
            (
                AttemptOutcome::Failed {
                    http_status,
                    code,
                    error,
                    retry_at: None,
                },
                AttemptState::Failed,
            ) if recorded.decided => {
                // Counted and told once the answer is recorded: it may turn out that an
                // earlier request placed the call after all (above).
                self.count_failure(&job, *code, error);
                if permanent {
                    error!(
                        incident = job.incident_id, rule = %job.rule, number = %job.number, http_status = http_status.unwrap_or_default(),
                        twilio_code = code, error = %error, hint = error_hint(*code),
                        "call failed permanently; this number is not called"
                    );
                } else {
                    error!(incident = job.incident_id, number = %job.number, error = %error, "call failed; this number is not called");
                }
            }
            (AttemptOutcome::Placed { sid }, AttemptState::Placed) => {
                info!(incident = job.incident_id, rule = %job.rule, number = %job.number, sid = %sid, "call placed");
            }
            (AttemptOutcome::Unknown { error }, AttemptState::Unknown) => {
                warn!(incident = job.incident_id, number = %job.number, attempt = attempt_id, error = %error,
                    "call request outcome unknown: reconciling with Twilio before anything is sent again");
                self.reconciler_wake.notify_one();
            }
            (_, AttemptState::Placed) => {
                info!(incident = job.incident_id, number = %job.number, "call placed (confirmed by its status callback)");
            }
            _ => {}
        }
        // Whoever settles an attempt as placed follows up: this answer, or (for a
        // status callback, which runs in the HTTP server) the placer after it.
        let follow_up = recorded.decided || recorded.reconciled.as_deref() == Some(CALLBACK);
        if recorded.state == AttemptState::Placed && follow_up {
            self.placed(&job);
        }
    }

    /// Records an attempt's answer, trying a few times: a lost record turns a known
    /// answer into an unknown one, which costs a reconciliation.
    async fn record(
        &self,
        attempt_id: i64,
        outcome: AttemptOutcome,
    ) -> Result<Recorded, StoreError> {
        let mut tries = 0;
        loop {
            match self.store.record_attempt(attempt_id, outcome.clone()).await {
                Err(e) if tries < 3 && !matches!(e, StoreError::Lost { .. }) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                result => return result,
            }
        }
    }

    /// A call became placed (by its answer, or by reconciliation): counted, and its
    /// SMS summary (owed since that commit) sent now rather than at the next pass.
    pub(super) fn placed(&self, job: &CallJob) {
        count_placed(&self.metrics, job);
        if job.sms.is_some() {
            self.sms_owed
                .store(true, std::sync::atomic::Ordering::Release);
            self.placer_wake.notify_one();
        }
    }

    fn count_failure(&self, job: &CallJob, code: Option<i64>, error: &str) {
        if job.canary {
            canary_result(&self.metrics, job, Some(error));
            return;
        }
        self.metrics
            .calls_failed
            .get_or_create(&CallError {
                code: code.map_or("none".into(), |c| c.to_string()),
            })
            .inc();
    }
}

/// Counts a call that became placed, whoever settled it (its answer, the reconciler, a
/// status callback that came after the answer was lost), and notes the canary's result.
/// Each settlement happens once, so this does too. (Its SMS is owed in the store.)
pub fn count_placed(metrics: &Metrics, job: &CallJob) {
    if job.canary {
        canary_result(metrics, job, None);
    } else {
        metrics.calls_placed.inc();
    }
}

/// Accounts for a canary call's outcome (`error` is `None` when Twilio accepted it).
fn canary_result(metrics: &Metrics, job: &CallJob, error: Option<&str>) {
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

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashSet<i64>> {
    in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends the SMS summary of a placed call (one attempt: the call is what matters) and
/// records the outcome, which ends what the call owed.
async fn send_sms(client: &twilio::Client, store: &crate::store::Store, job: &CallJob, from: &str) {
    let (state, event) = match &job.sms {
        None => (
            SmsState::Failed,
            "sms-failed: the incident has no summary".to_string(),
        ),
        Some(text) => match client.send_sms(&job.number, from, text).await {
            Outcome::Placed { sid } => {
                info!(incident = job.incident_id, number = %job.number, sid = %sid, "SMS summary sent");
                (SmsState::Sent, format!("sms {sid}"))
            }
            Outcome::Permanent { code, message, .. } => {
                warn!(incident = job.incident_id, number = %job.number, twilio_code = code, error = %message, "SMS summary not sent");
                let event = match code {
                    Some(code) => format!("sms-failed: error {code}: {message}"),
                    None => format!("sms-failed: {message}"),
                };
                (SmsState::Failed, event)
            }
            Outcome::Retry { reason, .. } | Outcome::Unknown { reason } => {
                warn!(incident = job.incident_id, number = %job.number, error = %reason, "SMS summary not sent");
                (SmsState::Failed, format!("sms-failed: {reason}"))
            }
        },
    };
    if let Err(e) = store.sms_done(job.call_id, state, event).await {
        error!(incident = job.incident_id, error = %e, "cannot record the SMS summary; it may be sent again");
    }
}
