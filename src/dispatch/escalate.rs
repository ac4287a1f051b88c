//! Escalation, part of the rounds worker's pass: an incident's `escalate` steps whose
//! time has come ring their numbers into the current round (queued for the placer like
//! any round's calls, within the same budget and per-number rules), unless someone is
//! in the bridge by then or the incident is closed. Later rounds call them again with
//! everyone else.

use tracing::{error, info, warn};

use super::{Caller, Dispatcher};
use crate::store::{CallState, Escalated};

impl Dispatcher {
    /// Runs every escalation step that is due, each in its own transaction.
    pub(super) async fn escalate_due(&self) {
        let real = matches!(self.caller, Caller::Twilio(_));
        let due = match self.store.due_escalations(self.clock.now_ms(), real).await {
            Ok(due) => due,
            Err(e) => {
                error!(error = %e, "cannot read the escalations that are due");
                return;
            }
        };
        let max = self.live.load().config.limits.max_calls_per_hour;
        let mut queued = false;
        for step in due {
            let incident = step.incident_id;
            match self.store.escalate(step, max).await {
                Ok(Escalated::Stale) => {}
                Ok(Escalated::NotNeeded { status }) => info!(
                    incident,
                    step = step.step,
                    %status,
                    "escalation not needed: the incident is no longer open"
                ),
                Ok(Escalated::Called { round, calls }) => {
                    let calling: Vec<&str> = calls
                        .iter()
                        .filter(|c| matches!(c.state, CallState::Queued | CallState::DryRun))
                        .map(|c| c.number.as_str())
                        .collect();
                    warn!(incident, step = step.step, round, calling = ?calling,
                        "ESCALATING: nobody is in the bridge; calling the next people too");
                    for call in calls.iter().filter(|c| c.state == CallState::Refused) {
                        self.metrics.budget_refusals.inc();
                        error!(incident, number = %call.number, "CALL BUDGET EXHAUSTED: this escalation number is NOT called");
                    }
                    queued |= calls.iter().any(|c| c.state == CallState::Queued);
                }
                Err(e) => {
                    error!(incident, error = %e, "cannot record an escalation; will try again")
                }
            }
        }
        if queued {
            self.placer_wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::clock::Clock;
    use crate::config::Config;
    use crate::health::Health;
    use crate::ingest::Secrets;
    use crate::metrics::Metrics;
    use crate::settings::Settings;
    use crate::store::{NewAlert, Store};

    /// Escalation timing on tokio's paused clock: five minutes pass in no time, and the
    /// step rings exactly when they are up — not a second before.
    #[tokio::test(start_paused = true)]
    async fn an_escalation_step_rings_when_its_time_comes_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(
            &dir.path().join("rules.toml"),
            "[twilio]\nfrom = \"+15005550006\"\n\
             [contacts]\nalice = \"+15005550001\"\nbob = \"+15005550002\"\n\
             [[rule]]\nname = \"page\"\ncall = [\"alice\"]\nrounds = 3\nround_interval = \"10m\"\n\
             escalate = [{ after = \"5m\", call = [\"bob\"] }]\n",
        )
        .unwrap();
        let store = Store::open(&config.state.path, None).unwrap().dry_run();
        let metrics = Arc::new(Metrics::new(config.state.path.clone()));
        let live = Settings {
            config,
            secrets: Secrets::default(),
            tls: None,
        }
        .live();
        let mut dispatcher = Dispatcher::new(
            live,
            store.clone(),
            Caller::DryRun,
            Arc::new(Notify::new()),
            Arc::new(Health::default()),
            metrics,
            CancellationToken::new(),
        );
        dispatcher.clock = Clock::following_tokio();
        store
            .insert_alert(NewAlert {
                source: "smtp",
                raw: b"Subject: db1 is DOWN\r\n\r\nno answer\r\n".to_vec(),
                ..NewAlert::default()
            })
            .await
            .unwrap();
        dispatcher.drain().await;
        let calls_to_bob = || async {
            store
                .run(|c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM calls WHERE number = '+15005550002'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .await
                .unwrap()
        };
        tokio::time::sleep(Duration::from_secs(4 * 60 + 50)).await;
        dispatcher.escalate_due().await;
        assert_eq!(calls_to_bob().await, 0, "rung before its five minutes");
        tokio::time::sleep(Duration::from_secs(20)).await;
        dispatcher.escalate_due().await;
        assert_eq!(
            calls_to_bob().await,
            1,
            "not rung once its five minutes were up"
        );
    }
}
