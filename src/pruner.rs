//! The pruner: the store's retention, run in the background (see `store/retention.rs`
//! for what is deleted and why). It deletes a small batch per transaction (bounded in
//! rows and bytes, so a huge incident takes several) and goes on
//! while there is more, so a year of history is worked off without ever holding up
//! ingest; then it looks again every [`EVERY`]. It has its own heartbeat.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::health::{Health, Worker};
use crate::metrics::{Metrics, Pruned as PrunedLabel, WorkerLabel};
use crate::settings::Live;
use crate::store::{Store, ms, now_ms};

/// How often the pruner looks when there was nothing to delete.
const EVERY: Duration = Duration::from_secs(10);
/// Incidents (and unattached alerts) deleted per transaction.
const BATCH: usize = 20;
/// How often a full store is looked at again.
const FULL_EVERY: Duration = Duration::from_secs(1);
/// A pause between batches, so other writers get the store in between.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Runs until `shutdown`.
pub async fn run(
    store: Store,
    live: Live,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        health.beat(Worker::Pruner);
        metrics
            .worker_heartbeat
            .get_or_create(&WorkerLabel {
                worker: Worker::Pruner.as_str(),
            })
            .set(now_ms() / 1000);
        let retain = live.load().config.state.retain;
        let wait = match store
            .prune(now_ms().saturating_sub(ms(retain)), BATCH)
            .await
        {
            Ok(pruned) if pruned.any() => {
                metrics
                    .pruned
                    .get_or_create(&PrunedLabel { what: "incidents" })
                    .inc_by(pruned.incidents as u64);
                for (what, n) in [
                    ("alerts", pruned.alerts),
                    ("silences", pruned.silences),
                    ("overrides", pruned.overrides),
                ] {
                    metrics
                        .pruned
                        .get_or_create(&PrunedLabel { what })
                        .inc_by(n as u64);
                }
                if pruned.incidents + pruned.alerts + pruned.silences + pruned.overrides > 0 {
                    info!(
                    incidents = pruned.incidents,
                    alerts = pruned.alerts,
                    silences = pruned.silences,
                    overrides = pruned.overrides,
                    retain = %humantime::format_duration(retain),
                    "retention: deleted closed incidents and alerts"
                    );
                }
                BETWEEN_BATCHES
            }
            // A short retention (tests use seconds) is looked after more often.
            Ok(_) => EVERY.min(retain / 2).max(BETWEEN_BATCHES),
            Err(e) => {
                error!(error = %e, "retention: cannot prune the store; will try again");
                EVERY
            }
        };
        // While mail is refused, look again every second whether it fits.
        let wait = if store.is_full() {
            if let Err(e) = store.recheck_full().await {
                error!(error = %e, "retention: cannot look again whether the store is full");
            }
            wait.min(FULL_EVERY)
        } else {
            wait
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = store.refused_mail() => {}
        }
    }
}
