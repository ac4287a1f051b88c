//! The router: stored alerts → routing decisions → incidents and their first round of
//! calls, each alert in one store transaction. It queues calls; it never places them.
//!
//! A mail whose parsing kills the process (a parser bug a hostile mail finds) must not
//! kill every restart too, leaving all later alerts acknowledged and never called. So a
//! marker file next to the store names the alerts being parsed while they are; a start
//! that finds it counts a strike against each, alerts with a strike are then routed one
//! at a time, and an alert with [`MAX_CRASHES`] strikes is set aside (kept, `rejected`,
//! never routed) with a loud log line. A panic counts the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};

use super::{Caller, Dispatcher, IDLE_POLL, new_public_id};
use crate::alert::Alert;
use crate::config::Config;
use crate::health::Worker;
use crate::metrics::Routing;
use crate::oncall::Policy;
use crate::route::{self, Action};
use crate::store::{CallState, IncidentKind, NewIncident, PendingAlert, Routed, now_ms};
use crate::twilio::twiml;

/// Alerts routed per store transaction, at most.
const BATCH: usize = 256;
/// Raw mail read per batch, at most (but always one mail): a backlog of big mails is
/// routed a few at a time, not all in memory at once.
const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Runs of the daemon that may die routing one alert before it is set aside.
pub const MAX_CRASHES: i64 = 3;

/// The marker naming the alerts being parsed: `<store>.routing`.
pub fn routing_marker(store: &Path) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(".routing");
    store.with_file_name(name)
}

/// What the log says about a routed alert (the mail itself is dropped once parsed).
struct Seen {
    message_id: Option<String>,
    from: String,
    subject: String,
}

/// One batch's decisions: what to record, and what to log about each alert.
type Decided = (
    Vec<(i64, route::Decision, NewIncident)>,
    Vec<(i64, String, Seen, route::Decision, NewIncident)>,
);

/// Parses and routes a batch of stored alerts (pure CPU work: no I/O) under `policy`
/// (the time, and the overrides and silences in force).
fn decide(config: &Config, batch: Vec<PendingAlert>, policy: &Policy) -> Decided {
    let mut items = Vec::with_capacity(batch.len());
    let mut alerts = Vec::with_capacity(batch.len());
    for pending in batch {
        let (alert, decision) = match &pending.direct {
            Some(direct) => (
                Alert {
                    subject: direct.message.clone(),
                    ..Alert::default()
                },
                route::direct(config, &pending.source, direct, policy),
            ),
            None => {
                let alert = Alert::from_mime(&pending.raw, &pending.envelope);
                let decision = route::route(config, &alert, policy);
                (alert, decision)
            }
        };
        let public_id = new_public_id();
        let twiml = call_twiml(config, &decision, &public_id);
        let kind = if pending.source == "canary" {
            IncidentKind::Canary
        } else {
            IncidentKind::Alert
        };
        let new = NewIncident {
            twiml,
            public_id,
            kind,
            dry_run: pending.dry_run,
            received_at: pending.received_at,
            // As `call_twiml` decided: kept with the incident, whatever a reload does.
            press_one: config.twilio.public_url.is_some(),
            public_url: config.twilio.public_url.clone(),
        };
        let seen = Seen {
            message_id: alert.message_id,
            from: alert.from,
            subject: alert.subject,
        };
        alerts.push((
            pending.id,
            pending.source,
            seen,
            decision.clone(),
            new.clone(),
        ));
        items.push((pending.id, decision, new));
    }
    (items, alerts)
}

impl Dispatcher {
    /// Routes stored alerts as they arrive, until shutdown.
    pub(super) async fn route_loop(self: Arc<Self>) {
        self.count_crashed_batch().await;
        loop {
            self.beat(Worker::Router);
            self.drain().await;
            if !self.idle(&self.wake, IDLE_POLL).await {
                return;
            }
        }
    }

    /// A marker left behind means the last run died routing those alerts: a strike
    /// each.
    async fn count_crashed_batch(&self) {
        let marker = routing_marker(self.store.path());
        let read = tokio::task::spawn_blocking(move || {
            let ids = std::fs::read_to_string(&marker).ok()?;
            let _ = std::fs::remove_file(&marker);
            Some(ids)
        })
        .await;
        let Ok(Some(ids)) = read else { return };
        let ids: Vec<i64> = ids
            .split_whitespace()
            .filter_map(|i| i.parse().ok())
            .collect();
        warn!(alerts = ?ids, "mailcall stopped while routing these alerts: routing them one at a time now, in case one of them is what stopped it");
        if let Err(e) = self.store.note_routing_crash(ids).await {
            error!(error = %e, "cannot count the routing crash");
        }
    }

    /// Routes every stored alert not yet routed.
    pub(super) async fn drain(&self) {
        loop {
            let mut batch = match self.store.pending_alerts(BATCH, BATCH_BYTES).await {
                Ok(b) if b.is_empty() => return,
                Ok(b) => b,
                Err(e) => {
                    error!(error = %e, "cannot read stored alerts; will try again");
                    return;
                }
            };
            if let Some(poison) = batch.iter().find(|a| a.crashes >= MAX_CRASHES) {
                self.set_aside(poison.id).await;
                continue;
            }
            // Suspects go alone, so that a strike lands on the right alert.
            match batch.iter().position(|a| a.crashes > 0) {
                Some(0) => batch.truncate(1),
                Some(first) => batch.truncate(first),
                None => {}
            }
            if !self.route_batch(batch).await {
                return;
            }
            self.beat(Worker::Router);
        }
    }

    async fn set_aside(&self, id: i64) {
        let why = format!(
            "mailcall died {MAX_CRASHES} times routing this alert; set aside so that later alerts are routed"
        );
        error!(
            alert = id,
            "ALERT SET ASIDE: {why}; nobody is called for it (see the stored mail with `mailcall incidents` or sqlite3)"
        );
        if let Err(e) = self.store.quarantine(id, why).await {
            error!(alert = id, error = %e, "cannot set the alert aside");
        }
    }

    /// Routes a batch and records the outcome; false if the store failed for any of
    /// it, so that the caller waits before trying again instead of spinning.
    async fn route_batch(&self, batch: Vec<PendingAlert>) -> bool {
        let settings = self.live.load_full();
        // Parsing big mails and matching rules is CPU work (tens of milliseconds for a
        // mail of megabytes): off the async workers.
        let decide_with = Arc::clone(&settings);
        let policy = match self.store.policy(now_ms()).await {
            Ok(policy) => policy,
            Err(e) => {
                error!(error = %e, "cannot read the overrides and silences; will try again");
                return false;
            }
        };
        let ids: Vec<i64> = batch.iter().map(|a| a.id).collect();
        let marker = routing_marker(self.store.path());
        let marked = ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        let decided = tokio::task::spawn_blocking(move || {
            // Not synced: it only has to outlive this process, not the machine.
            let _ = std::fs::write(&marker, marked);
            let decided = decide(&decide_with.config, batch, &policy);
            let _ = std::fs::remove_file(&marker);
            decided
        })
        .await;
        let Ok((items, alerts)) = decided else {
            error!(alerts = ?ids, "routing these alerts panicked; routing them one at a time next");
            let marker = routing_marker(self.store.path());
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(marker)).await;
            if let Err(e) = self.store.note_routing_crash(ids).await {
                error!(error = %e, "cannot count the routing crash");
            }
            return false;
        };
        let config = &settings.config;
        let results = match self
            .store
            .record_routings(items, config.limits.max_calls_per_hour)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot record routing decisions; will try again");
                return false;
            }
        };
        let all_recorded = results.iter().all(Result::is_ok);
        let mut queued = false;
        for ((alert_id, source, alert, decision, new), result) in alerts.into_iter().zip(results) {
            let message_id = alert.message_id.as_deref().unwrap_or("-");
            let rule = decision.rule.as_deref().unwrap_or("-");
            let action = match &result {
                Err(_) => None,
                Ok(Routed::NotCalled) => Some(decision.action.as_str()),
                Ok(Routed::Deduplicated { .. }) => Some("deduplicated"),
                Ok(Routed::Opened { .. }) => Some("call"),
                Ok(Routed::Resolved { .. }) => Some(decision.action.as_str()),
                Ok(Routed::Silenced { .. }) => Some("silenced"),
            };
            if let Some(action) = action {
                self.metrics
                    .alerts_routed
                    .get_or_create(&Routing {
                        rule: rule.to_string(),
                        action,
                    })
                    .inc();
            }
            match result {
                Err(e) => {
                    error!(alert = alert_id, error = %e, "cannot record routing; will try again")
                }
                Ok(Routed::NotCalled) if decision.action == Action::None => warn!(
                    alert = alert_id, source, message_id, from = %alert.from, subject = %alert.subject,
                    action = "none", "unrouted: no rule matches this mail; nobody is called"
                ),
                Ok(Routed::Resolved {
                    incidents,
                    canceled,
                }) => {
                    for (incident_id, public_id) in incidents {
                        info!(
                            alert = alert_id, source, message_id, from = %alert.from, rule, action = "resolve",
                            incident = incident_id, dedup_key = %decision.dedup_key, canceled,
                            "incident resolved: no further rounds"
                        );
                        if !new.dry_run {
                            self.announce_resolution(incident_id, public_id, &decision);
                        }
                    }
                }
                Ok(Routed::Silenced {
                    incident_id,
                    silence_id,
                    alert_count,
                }) => info!(
                    alert = alert_id, source, message_id, from = %alert.from, rule, action = "silenced",
                    incident = incident_id, silence = silence_id, alert_count, dedup_key = %decision.dedup_key,
                    "silenced: recorded on the incident, nobody is called"
                ),
                Ok(Routed::NotCalled) if decision.action == Action::Beat => info!(
                    alert = alert_id,
                    source,
                    message_id,
                    heartbeat = rule,
                    "heartbeat beat"
                ),
                Ok(Routed::NotCalled) if decision.action == Action::Resolve => info!(
                    alert = alert_id, source, message_id, rule, dedup_key = %decision.dedup_key,
                    "resolve: no open incident with this dedup key"
                ),
                Ok(Routed::NotCalled) => info!(
                    alert = alert_id, source, message_id, from = %alert.from, rule, action = "drop",
                    "dropped by rule"
                ),
                Ok(Routed::Deduplicated {
                    incident_id,
                    alert_count,
                }) => info!(
                    alert = alert_id, source, message_id, from = %alert.from, rule, action = "deduplicated",
                    incident = incident_id, alert_count, dedup_key = %decision.dedup_key,
                    "same problem as an open incident; nobody is called again"
                ),
                Ok(Routed::Opened { incident_id, calls }) => {
                    let numbers: Vec<&str> = calls.iter().map(|c| c.number.as_str()).collect();
                    let refused: Vec<&str> = calls
                        .iter()
                        .filter(|c| c.state == CallState::Refused)
                        .map(|c| c.number.as_str())
                        .collect();
                    if new.kind == IncidentKind::Canary {
                        info!(alert = alert_id, incident = incident_id, numbers = ?numbers, "canary: one test call per number");
                    } else {
                        if !new.dry_run {
                            self.metrics.incidents_opened.inc();
                        }
                        self.metrics.budget_refusals.inc_by(refused.len() as u64);
                        info!(
                            alert = alert_id, source, message_id, from = %alert.from, rule, action = "call",
                            incident = incident_id, numbers = ?numbers, dedup_key = %decision.dedup_key,
                            dry_run = new.dry_run, "new incident; calling everyone at once"
                        );
                    }
                    if !refused.is_empty() {
                        error!(
                            incident = incident_id, refused = ?refused,
                            max_calls_per_hour = config.limits.max_calls_per_hour,
                            "CALL BUDGET EXHAUSTED: these numbers are NOT called; raise [limits] max_calls_per_hour if this is a real incident"
                        );
                    }
                    for call in calls.iter().filter(|c| c.state == CallState::DryRun) {
                        info!(
                            incident = incident_id, rule = %rule, number = %call.number, twiml = %new.twiml,
                            "dry-run: would place this call"
                        );
                    }
                    queued |= calls.iter().any(|c| c.state == CallState::Queued);
                }
            }
        }
        if queued {
            self.placer_wake.notify_one();
        }
        all_recorded
    }

    /// Speaks the resolve message to whoever is in the bridge: with a public URL as a
    /// conference announcement (Twilio fetches the TwiML from us); without one, each
    /// participant's call is redirected to hear it and rejoin the room.
    fn announce_resolution(&self, incident_id: i64, public_id: String, decision: &route::Decision) {
        let Caller::Twilio(client) = self.caller.clone() else {
            return;
        };
        let room = twiml::room_name(&public_id);
        if let Some(base) = self.live.load().config.twilio.public_url.clone() {
            // The room names the incident, so the announcement is in its language.
            let query = serde_urlencoded::to_string([
                ("text", decision.message.as_str()),
                ("room", public_id.as_str()),
            ])
            .unwrap_or_default();
            let url = format!("{base}/twilio/announce?{query}");
            self.calls.spawn(async move {
                match client.conferences(&room).await {
                    Ok(sids) => {
                        for sid in sids {
                            match client.announce(&sid, &url).await {
                                Ok(()) => info!(incident = incident_id, conference = %sid, "resolution announced in the bridge"),
                                Err(e) => warn!(incident = incident_id, error = %e, "cannot announce the resolution"),
                            }
                        }
                    }
                    Err(e) => warn!(incident = incident_id, error = %e, "cannot find the bridge to announce the resolution"),
                }
            });
            return;
        }
        let (message, language, voice) = (
            decision.message.clone(),
            decision.language.clone(),
            decision.voice.clone(),
        );
        let store = self.store.clone();
        self.calls.spawn(async move {
            // In the incident's language and voice, as with a public URL.
            let (language, voice) = match store.incident_voice(&public_id).await {
                Ok(Some(speaker)) => speaker,
                _ => (language, voice),
            };
            let announcement = twiml::announce(&message, &language, &voice, &room);
            let participants = match client.conference_calls(&room).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(incident = incident_id, error = %e, "cannot tell who is in the bridge to announce the resolution");
                    return;
                }
            };
            for sid in participants {
                match client.update_call(&sid, &announcement).await {
                    Ok(()) => info!(incident = incident_id, call = %sid, "resolution announced in the bridge"),
                    Err(e) => warn!(incident = incident_id, call = %sid, error = %e, "cannot announce the resolution to a participant"),
                }
            }
        });
    }
}

/// The TwiML every call of an incident says, for the incident whose room is
/// `public_id`: with a public URL, press 1 to join (only a person who chose to is in
/// the bridge); without, straight into the bridge.
pub fn call_twiml(config: &Config, decision: &route::Decision, public_id: &str) -> String {
    match &config.twilio.public_url {
        Some(base) => twiml::gather_call(
            &config.prompts(&decision.language),
            &decision.message,
            &decision.language,
            &decision.voice,
            &format!("{base}/twilio/gather?room={public_id}"),
        ),
        None => twiml::call(
            &decision.message,
            &decision.language,
            &decision.voice,
            &twiml::room_name(public_id),
        ),
    }
}
