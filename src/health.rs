//! Liveness of the daemon's parts, for `/healthz` (and later metrics and the watchdog).
//!
//! The parts report in (the dispatcher stamps a heartbeat on every loop, listeners flag
//! when they run); [`Health::check`] adds a real write to the store, since a store that
//! cannot commit means every new alert is refused with 451.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::store::{Store, now_ms};

/// How stale the dispatcher's heartbeat may be before it counts as stuck.
pub const DISPATCHER_STALE: Duration = Duration::from_secs(30);

/// Shared liveness flags.
#[derive(Debug, Default)]
pub struct Health {
    dispatcher_beat: AtomicI64,
    smtp_running: AtomicBool,
}

/// The outcome of a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub store: bool,
    pub dispatcher: bool,
    pub smtp: bool,
}

impl Report {
    pub fn healthy(&self) -> bool {
        self.store && self.dispatcher && self.smtp
    }
}

impl Health {
    /// Called by the dispatcher on every pass of its loop.
    pub fn dispatcher_beat(&self) {
        self.dispatcher_beat.store(now_ms(), Ordering::Relaxed);
    }

    pub fn set_smtp_running(&self, running: bool) {
        self.smtp_running.store(running, Ordering::Relaxed);
    }

    /// Checks every part; the store check is a real, committed write.
    pub async fn check(&self, store: &Store) -> Report {
        let store_ok = matches!(
            tokio::time::timeout(Duration::from_secs(5), store.check_writable()).await,
            Ok(Ok(()))
        );
        let beat = self.dispatcher_beat.load(Ordering::Relaxed);
        let stale = i64::try_from(DISPATCHER_STALE.as_millis()).unwrap_or(i64::MAX);
        Report {
            store: store_ok,
            dispatcher: beat > 0 && now_ms() - beat < stale,
            smtp: self.smtp_running.load(Ordering::Relaxed),
        }
    }
}
