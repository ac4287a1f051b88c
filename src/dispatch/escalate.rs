//! Escalation, part of the rounds worker's pass: an incident's `escalate` steps whose
//! time has come ring their numbers into the current round (queued for the placer like
//! any round's calls, within the same budget and per-number rules), unless someone is
//! in the bridge by then or the incident is closed. Later rounds call them again with
//! everyone else.

use tracing::{error, info, warn};

use super::{Caller, Dispatcher};
use crate::store::{CallState, Escalated, now_ms};

impl Dispatcher {
    /// Runs every escalation step that is due, each in its own transaction.
    pub(super) async fn escalate_due(&self) {
        let real = matches!(self.caller, Caller::Twilio(_));
        let due = match self.store.due_escalations(now_ms(), real).await {
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
