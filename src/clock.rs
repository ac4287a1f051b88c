//! The time the timed on-call work goes by: heartbeat deadlines and escalation steps.
//!
//! Deadlines are wall-clock timestamps kept in the store, so that a restart neither
//! forgets nor repeats them; the daemon reads the system clock. Tests hand in
//! [`Clock::following_tokio`], which starts at the wall clock and then moves only with
//! tokio's clock: under `tokio::time::pause` an hour passes when the test says so, and
//! a timed behaviour is checked in milliseconds, deterministically.

use crate::store::now_ms;

/// Unix milliseconds, from the system clock or from tokio's.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock: what the daemon runs on.
    Wall,
    /// The wall clock when it was made, plus the tokio time elapsed since.
    Tokio {
        base_ms: i64,
        base: tokio::time::Instant,
    },
}

impl Clock {
    /// Follows tokio's clock from now on (for tests under `tokio::time::pause`).
    pub fn following_tokio() -> Clock {
        Clock::Tokio {
            base_ms: now_ms(),
            base: tokio::time::Instant::now(),
        }
    }

    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::Wall => now_ms(),
            Clock::Tokio { base_ms, base } => base_ms
                .saturating_add(i64::try_from(base.elapsed().as_millis()).unwrap_or(i64::MAX)),
        }
    }
}
