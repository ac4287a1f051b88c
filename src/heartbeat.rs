//! The heartbeat worker: watches `[[heartbeat]]` monitors (dead man's switches). A beat
//! is a mail matching a heartbeat's fields or a `POST /heartbeat/<name>`; both are
//! stored alerts that the router records as beats (resolving a missed-beat incident in
//! the same transaction). When no beat came within `every + grace` — counted from the
//! last beat, or from when the daemon first watched the heartbeat — this worker marks
//! the heartbeat missed and stores an alert in one transaction; the router opens the
//! incident and its calls through the same path as any alert, rounds follow
//! `[defaults]`. Only the next beat clears it, so a missed beat rings once.
//!
//! All state is in the store (`heartbeats` table), so a restart neither forgets a
//! deadline nor rings twice for one miss. It has its own heartbeat in `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::alert::DirectAlert;
use crate::clock::Clock;
use crate::config::Heartbeat;
use crate::health::{Health, Worker};
use crate::metrics::{Metrics, WorkerLabel};
use crate::oncall::from_ms;
use crate::settings::Live;
use crate::store::{HeartbeatRow, NewAlert, Store, ms, now_ms};

/// How often the worker looks: a deadline is noticed within this (tests use seconds).
const EVERY: Duration = Duration::from_millis(500);

/// A heartbeat whose deadline passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    pub name: String,
    /// What the deadline counted from (the last beat, or when watching began).
    pub base: i64,
    /// The rendered message.
    pub message: String,
}

/// Which heartbeats are past their deadline at `now` and not yet missed for a daemon
/// that is (or is not) a `dry_run` (pure).
pub fn due(
    heartbeats: &[Heartbeat],
    rows: &[HeartbeatRow],
    now: i64,
    tz: &TimeZone,
    dry_run: bool,
) -> Vec<Missed> {
    heartbeats
        .iter()
        .zip(rows)
        .filter(|(hb, row)| {
            !row.missed_for(dry_run) && now >= row.base().saturating_add(ms(hb.every + hb.grace))
        })
        .map(|(hb, row)| {
            let last_seen = from_ms(row.base())
                .to_zoned_datetime(tz.clone())
                .strftime("%Y-%m-%d %H:%M %Z")
                .to_string();
            let message = hb.message.render(|name| match name {
                "name" => Some(hb.name.as_str()),
                "last_seen" => Some(last_seen.as_str()),
                _ => None,
            });
            Missed {
                name: hb.name.clone(),
                base: row.base(),
                message,
            }
        })
        .collect()
}

/// Runs until `shutdown`; `wake` is the router's bell, `clock` the time deadlines go by.
pub async fn run(
    store: Store,
    live: Live,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    clock: Clock,
) {
    let tz = TimeZone::try_system().unwrap_or(TimeZone::UTC);
    loop {
        health.beat(Worker::Heartbeat);
        metrics
            .worker_heartbeat
            .get_or_create(&WorkerLabel {
                worker: Worker::Heartbeat.as_str(),
            })
            .set(now_ms() / 1000);
        let heartbeats = live.load().config.heartbeats.clone();
        if !heartbeats.is_empty() {
            check(&store, &heartbeats, &wake, &tz, clock.now_ms()).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One pass at `now`: opens an incident (through a stored alert) for each missed
/// deadline.
async fn check(store: &Store, heartbeats: &[Heartbeat], wake: &Notify, tz: &TimeZone, now: i64) {
    let names = heartbeats.iter().map(|h| h.name.clone()).collect();
    let rows = match store.heartbeats(names, now).await {
        Ok(rows) => rows,
        Err(e) => {
            error!(error = %e, "cannot read the heartbeats' state; will try again");
            return;
        }
    };
    for missed in due(heartbeats, &rows, now, tz, store.is_dry_run()) {
        let alert = NewAlert {
            source: "heartbeat",
            direct: Some(DirectAlert {
                message: missed.message.clone(),
                heartbeat: Some(missed.name.clone()),
                ..DirectAlert::default()
            }),
            ..NewAlert::default()
        };
        match store
            .heartbeat_missed(missed.name.clone(), missed.base, alert)
            .await
        {
            Ok(Some(alert)) => {
                error!(heartbeat = %missed.name, alert, "HEARTBEAT MISSED: no beat in time; opening an incident");
                wake.notify_one();
            }
            Ok(None) => {}
            Err(e) => {
                warn!(heartbeat = %missed.name, error = %e, "cannot record a missed heartbeat; will try again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HeartbeatState;
    use std::path::Path;

    #[test]
    fn a_deadline_is_every_plus_grace_from_the_last_beat_or_the_start() {
        let config = crate::config::Config::parse(
            Path::new("r.toml"),
            "[twilio]\nfrom = \"+15005550006\"\n[contacts]\nalice = \"+15005550001\"\n\
             [[heartbeat]]\nname = \"backup\"\nsubject = 'backup ok'\nevery = \"10s\"\ngrace = \"5s\"\n\
             call = [\"alice\"]\nmessage = \"No backup since {last_seen}.\"\n",
        )
        .unwrap();
        let row = |state, last: Option<i64>| HeartbeatRow {
            name: "backup".into(),
            state,
            since: 1_000_000,
            last_beat_at: last,
            missed_dry_run: false,
        };
        let hb = &config.heartbeats;
        let utc = TimeZone::UTC;
        assert!(
            due(
                hb,
                &[row(HeartbeatState::Waiting, None)],
                1_014_999,
                &utc,
                false
            )
            .is_empty()
        );
        let missed = due(
            hb,
            &[row(HeartbeatState::Waiting, None)],
            1_015_000,
            &utc,
            false,
        );
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].message, "No backup since 1970-01-01 00:16 UTC.");
        assert!(
            due(
                hb,
                &[row(HeartbeatState::Ok, Some(1_010_000))],
                1_020_000,
                &utc,
                false
            )
            .is_empty()
        );
        assert_eq!(
            due(
                hb,
                &[row(HeartbeatState::Ok, Some(1_010_000))],
                1_025_000,
                &utc,
                false
            )[0]
            .base,
            1_010_000
        );
        // Missed once is missed until the next beat: no second incident.
        assert!(
            due(
                hb,
                &[row(HeartbeatState::Missed, None)],
                9_999_999,
                &utc,
                false
            )
            .is_empty()
        );
        // A miss only a dry run recorded is still to be called by a real daemon, and
        // not again by a dry run.
        let dry = HeartbeatRow {
            missed_dry_run: true,
            ..row(HeartbeatState::Missed, None)
        };
        assert_eq!(
            due(hb, std::slice::from_ref(&dry), 1_015_000, &utc, false).len(),
            1
        );
        assert!(due(hb, &[dry], 1_015_000, &utc, true).is_empty());
    }

    /// A missed beat on tokio's paused clock: `every + grace` (70 s) pass in no time,
    /// and the miss is noticed once they are up — not before.
    #[tokio::test(start_paused = true)]
    async fn a_missed_beat_is_noticed_when_every_and_grace_are_up() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse(
            &dir.path().join("rules.toml"),
            "[twilio]\nfrom = \"+15005550006\"\n[contacts]\nalice = \"+15005550001\"\n\
             [[heartbeat]]\nname = \"backup\"\nsubject = 'backup ok'\nevery = \"60s\"\ngrace = \"10s\"\n\
             call = [\"alice\"]\n",
        )
        .unwrap();
        let store = Store::open(&config.state.path, None).unwrap();
        let metrics = Arc::new(Metrics::new(config.state.path.clone()));
        let live = crate::settings::Settings {
            config,
            secrets: crate::ingest::Secrets::default(),
            tls: None,
        }
        .live();
        let clock = Clock::following_tokio();
        let start = clock.now_ms();
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(run(
            store.clone(),
            live,
            Arc::new(Health::default()),
            metrics,
            Arc::new(Notify::new()),
            shutdown.clone(),
            clock,
        ));
        let state = || async {
            store
                .heartbeats(vec!["backup".into()], start)
                .await
                .unwrap()[0]
                .state
        };
        tokio::time::sleep(Duration::from_secs(69)).await;
        assert_ne!(state().await, HeartbeatState::Missed, "missed before 70 s");
        let mut noticed = None;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if state().await == HeartbeatState::Missed {
                noticed = Some(clock.now_ms() - start);
                break;
            }
        }
        let noticed = noticed.expect("the missed beat was never noticed");
        // Looked at every 500 ms of tokio time; a pass may be waiting on the store
        // meanwhile, so allow a few of them.
        assert!(
            (70_000..75_000).contains(&noticed),
            "noticed after {noticed} ms"
        );
        shutdown.cancel();
        worker.await.unwrap();
    }
}
