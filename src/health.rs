//! Liveness of the daemon's parts, for `/healthz`, `mailcall status` and the systemd
//! watchdog.
//!
//! Each dispatch worker stamps its own heartbeat on every pass of its loop (and a loop
//! never waits on Twilio, so a stale heartbeat means a stuck worker, not a slow
//! Twilio); listeners flag when they run; [`Health::check`] adds a real write to the
//! store, since a store that cannot commit means every new alert is refused with 451.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::store::{Store, now_ms};

/// How stale a worker's heartbeat may be before it counts as stuck.
pub const WORKER_STALE: Duration = Duration::from_secs(30);

/// The dispatch workers, one job each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Worker {
    /// Stored alerts → incidents and calls.
    Router,
    /// Waiting calls → requests to Twilio.
    Placer,
    /// Requests whose outcome is unknown → settled.
    Reconciler,
    /// Rounds, and who answered.
    Rounds,
    /// Retention: what the store forgets.
    Pruner,
    /// Heartbeat monitors: a missed beat opens an incident.
    Heartbeat,
}

impl Worker {
    pub const ALL: [Worker; 6] = [
        Worker::Router,
        Worker::Placer,
        Worker::Reconciler,
        Worker::Rounds,
        Worker::Pruner,
        Worker::Heartbeat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Worker::Router => "router",
            Worker::Placer => "placer",
            Worker::Reconciler => "reconciler",
            Worker::Rounds => "rounds",
            Worker::Pruner => "pruner",
            Worker::Heartbeat => "heartbeat",
        }
    }
}

/// Shared liveness flags.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix milliseconds of each worker's last beat; 0 for a worker that does not run
    /// in this process (e.g. the placer of a dry run).
    beats: [AtomicI64; Worker::ALL.len()],
    smtp_running: AtomicBool,
    /// The last store write check and its outcome: one write at most every
    /// [`WRITE_CHECK_EVERY`], however often `/healthz` is asked (each write grows the
    /// WAL, and any client may ask).
    write_check: tokio::sync::Mutex<Option<(tokio::time::Instant, bool)>>,
}

/// How long a store write check stands for.
const WRITE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// One worker's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WorkerReport {
    pub ok: bool,
    /// Milliseconds since its last heartbeat.
    pub age_ms: i64,
}

/// The outcome of a health check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub store: bool,
    /// New mail is refused: open data alone fills `[state] max_bytes`.
    pub store_full: bool,
    /// Every running dispatch worker's heartbeat is fresh.
    pub dispatcher: bool,
    pub smtp: bool,
    /// Each running worker, by name.
    pub workers: BTreeMap<&'static str, WorkerReport>,
}

impl Report {
    /// Everything works and new mail is taken: `/healthz` answers 200.
    pub fn healthy(&self) -> bool {
        self.alive() && !self.store_full
    }

    /// Nothing is stuck: the systemd watchdog is fed. A full store is not stuck — the
    /// daemon works through it (calls go on, retention frees room) and a restart would
    /// free nothing, only cut calls short.
    pub fn alive(&self) -> bool {
        self.store && self.dispatcher && self.smtp
    }
}

impl Health {
    /// Called by a worker on every pass of its loop.
    pub fn beat(&self, worker: Worker) {
        self.beats[worker as usize].store(now_ms(), Ordering::Relaxed);
    }

    pub fn set_smtp_running(&self, running: bool) {
        self.smtp_running.store(running, Ordering::Relaxed);
    }

    /// The workers running here and their liveness.
    pub fn workers(&self) -> BTreeMap<&'static str, WorkerReport> {
        let now = now_ms();
        let stale = i64::try_from(WORKER_STALE.as_millis()).unwrap_or(i64::MAX);
        Worker::ALL
            .iter()
            .filter_map(|w| {
                let beat = self.beats[*w as usize].load(Ordering::Relaxed);
                (beat > 0).then(|| {
                    let age_ms = now.saturating_sub(beat).max(0);
                    (
                        w.as_str(),
                        WorkerReport {
                            ok: age_ms < stale,
                            age_ms,
                        },
                    )
                })
            })
            .collect()
    }

    /// Checks every part; the store check is a real, committed write (at most one a
    /// second: checks meanwhile take its outcome).
    pub async fn check(&self, store: &Store) -> Report {
        let store_ok = {
            let mut last = self.write_check.lock().await;
            match *last {
                Some((at, ok)) if at.elapsed() < WRITE_CHECK_EVERY => ok,
                _ => {
                    let ok = matches!(
                        tokio::time::timeout(Duration::from_secs(5), store.check_writable()).await,
                        Ok(Ok(()))
                    );
                    *last = Some((tokio::time::Instant::now(), ok));
                    ok
                }
            }
        };
        let workers = self.workers();
        Report {
            store: store_ok,
            // As of the last mail or the pruner's look (every second while full); not
            // looked at here, where any client could make it work the store.
            store_full: store.is_full(),
            dispatcher: !workers.is_empty() && workers.values().all(|w| w.ok),
            smtp: self.smtp_running.load(Ordering::Relaxed),
            workers,
        }
    }
}
