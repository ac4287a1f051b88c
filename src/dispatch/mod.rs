//! Dispatch: stored alerts → incidents → calls → Twilio, as small workers with one job
//! each, coordinated only through the store:
//!
//! - the **router** (`router.rs`) routes stored alerts into incidents and their first
//!   round of calls (queued in the store);
//! - the **placer** (`placer.rs`) requests queued calls from Twilio, each request
//!   committed as an attempt before it leaves, and retries what Twilio refused for
//!   now;
//! - the **reconciler** (`reconcile.rs`) settles requests whose outcome is unknown
//!   (timeouts, lost connections, a crash), by status callback or Twilio's call list,
//!   and sends a call again only when Twilio has no such call;
//! - the **rounds** worker (`rounds.rs`) calls everyone again while nobody is in the
//!   bridge, and learns by polling who answered; it also runs incidents' escalation
//!   steps when they are due (`escalate.rs`).
//!
//! Each worker stamps its own heartbeat on every pass and never waits on Twilio in its
//! loop (requests run in tasks, each with a timeout), so a restart with a thousand
//! requests to reconcile never holds up a new incident's calls, and the watchdog is fed
//! only while every worker is alive. Every fact a worker acts on is in the store, so a
//! crash loses nothing: on start the workers pick up where the last run stopped.

mod escalate;
mod placer;
mod reconcile;
mod rounds;
mod router;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::health::{Health, Worker};
use crate::metrics::{Metrics, WorkerLabel};
use crate::settings::Live;
use crate::store::{Store, now_ms};
use crate::twilio;

pub use placer::count_placed;
pub use reconcile::{Candidate, Decision as Reconciliation, Pending, decide};
pub use router::call_twiml;

/// How often an idle worker looks at the store even when nobody woke it: work stored by
/// another process (`mailcall call` beside a running daemon) waits at most this long.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Slack on each side of a request's window, for clock skew between us and Twilio.
pub const WINDOW_SLACK: Duration = Duration::from_secs(2);

/// Who places the calls.
#[derive(Debug, Clone)]
pub enum Caller {
    Twilio(twilio::Client),
    /// `--dry-run`: no Twilio at all. Only dry runs' incidents are handled; calls of
    /// real incidents wait in the store for a daemon that can place them.
    DryRun,
}

/// The workers' shared context.
#[derive(Debug)]
pub struct Dispatcher {
    pub live: Live,
    pub store: Store,
    pub caller: Caller,
    /// Notified by ingest after each stored alert (wakes the router).
    pub wake: Arc<Notify>,
    /// Wakes the placer: calls were queued.
    pub placer_wake: Notify,
    /// Wakes the reconciler: a request's outcome is unknown.
    pub reconciler_wake: Notify,
    /// Tracks the request tasks, so shutdown can wait for requests in flight.
    pub calls: TaskTracker,
    pub shutdown: CancellationToken,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// When the next paced call request may leave (`[twilio] calls_per_second`).
    pub pacer: Pacer,
    /// A call this process placed owes an SMS: the placer looks for owed SMS at once
    /// instead of at its next once-a-second look.
    pub sms_owed: std::sync::atomic::AtomicBool,
    /// The time escalation steps go by (tests move it with `tokio::time::pause`).
    pub clock: crate::clock::Clock,
}

impl Dispatcher {
    /// The workers' context; `wake` is the router's bell that ingest rings.
    pub fn new(
        live: Live,
        store: Store,
        caller: Caller,
        wake: Arc<Notify>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Dispatcher {
        Dispatcher {
            live,
            store,
            caller,
            wake,
            placer_wake: Notify::new(),
            reconciler_wake: Notify::new(),
            calls: TaskTracker::new(),
            shutdown,
            health,
            metrics,
            pacer: Pacer::default(),
            sms_owed: std::sync::atomic::AtomicBool::new(true),
            clock: crate::clock::Clock::Wall,
        }
    }

    /// The workers this process runs: all of them with Twilio, only the router and
    /// the rounds of dry runs without.
    pub fn workers(&self) -> &'static [Worker] {
        match self.caller {
            Caller::Twilio(_) => &[
                Worker::Router,
                Worker::Placer,
                Worker::Reconciler,
                Worker::Rounds,
            ],
            Caller::DryRun => &[Worker::Router, Worker::Rounds],
        }
    }

    /// Starts `workers` on `tasks`. Requests in flight at the last stop are marked
    /// unknown first (their process is gone), so the reconciler settles them.
    pub async fn start(self: &Arc<Self>, tasks: &TaskTracker, workers: &[Worker]) {
        if workers.contains(&Worker::Reconciler) {
            match self.store.recover_in_flight().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    requests = n,
                    "requests were in flight when mailcall last stopped: reconciling them with Twilio before any is sent again"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the requests in flight at the last stop")
                }
            }
        }
        for worker in workers {
            // Alive from the start: the first pass may take a moment.
            self.beat(*worker);
            let me = Arc::clone(self);
            match worker {
                Worker::Router => tasks.spawn(me.route_loop()),
                Worker::Placer => tasks.spawn(me.place_loop()),
                Worker::Reconciler => tasks.spawn(me.reconcile_loop()),
                Worker::Rounds => tasks.spawn(me.rounds_loop()),
                Worker::Pruner | Worker::Heartbeat => continue,
            };
        }
    }

    /// A worker finished a pass of its loop.
    fn beat(&self, worker: Worker) {
        self.health.beat(worker);
        self.metrics
            .worker_heartbeat
            .get_or_create(&WorkerLabel {
                worker: worker.as_str(),
            })
            .set(now_ms() / 1000);
    }

    /// Waits until `bell` rings or `max` passed; false once shutting down.
    async fn idle(&self, bell: &Notify, max: Duration) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = bell.notified() => true,
            () = tokio::time::sleep(max) => true,
        }
    }
}

/// Hands out send times for call requests, in the order calls are queued: with
/// `calls_per_second`, one slot per `1/cps` for the whole daemon; without it, at once.
#[derive(Debug, Default)]
pub struct Pacer {
    next: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    /// The earliest time the next request may be sent.
    fn slot(&self, calls_per_second: Option<f64>) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let Some(cps) = calls_per_second else {
            return now;
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
