//! Prometheus metrics (`GET /metrics`), kept by prometheus-client.
//!
//! Counters say what came in, what was refused and why, what routing decided, and what
//! became of every call; the latency histogram measures what users feel (from the moment
//! an alert was stored to the moment its first call request leaves for Twilio). The
//! canary gauges turn a broken phone path into an alertable metric before a real incident.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ingress {
    pub ingress: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rejection {
    pub ingress: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Routing {
    pub rule: String,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallError {
    /// The Twilio error code, or `none` (transport errors, retries given up).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Pruned {
    pub what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: &'static str,
}

/// Every metric mailcall exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    store_path: PathBuf,
    pub mails_received: Family<Ingress, Counter>,
    pub mails_rejected: Family<Rejection, Counter>,
    pub alerts_routed: Family<Routing, Counter>,
    pub incidents_opened: Counter,
    pub calls_placed: Counter,
    pub calls_failed: Family<CallError, Counter>,
    pub call_retries: Counter,
    pub budget_refusals: Counter,
    /// Seconds from an alert being stored to its first call request leaving for Twilio.
    pub dispatch_latency: Histogram,
    pub store_bytes: Gauge,
    pub reloads: Family<Outcome, Counter>,
    pub canary_runs: Family<Outcome, Counter>,
    /// Unix time of the last canary call Twilio accepted.
    pub canary_last_success: Gauge,
    /// Requests to Twilio whose outcome was unknown (reconciled, never re-sent blindly).
    pub calls_unknown: Counter,
    /// How unknown requests were settled: `placed`, `absent`, `undecided`.
    pub reconciliations: Family<Outcome, Counter>,
    /// Unix time of each dispatch worker's last heartbeat.
    pub worker_heartbeat: Family<WorkerLabel, Gauge>,
    /// Log lines dropped because stderr did not keep up.
    pub log_lines_dropped: Counter,
    /// 1 while new mail is refused because open data alone fills `[state] max_bytes`.
    pub store_full: Gauge,
    /// Closed incidents and alerts the retention deleted, by `what`.
    pub pruned: Family<Pruned, Counter>,
    /// Where dropped log lines are counted (the non-blocking log writer).
    log_drops: Option<tracing_appender::non_blocking::ErrorCounter>,
    /// How many of those `log_lines_dropped` already counts.
    log_drops_seen: AtomicU64,
}

impl Metrics {
    /// Registers every metric; `store_path` is measured at each scrape.
    pub fn new(store_path: PathBuf) -> Metrics {
        let mut registry = Registry::with_prefix("mailcall");
        let m = Metrics {
            registry: Registry::default(),
            store_path,
            mails_received: Family::default(),
            mails_rejected: Family::default(),
            alerts_routed: Family::default(),
            incidents_opened: Counter::default(),
            calls_placed: Counter::default(),
            calls_failed: Family::default(),
            call_retries: Counter::default(),
            budget_refusals: Counter::default(),
            dispatch_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            store_bytes: Gauge::default(),
            reloads: Family::default(),
            canary_runs: Family::default(),
            canary_last_success: Gauge::default(),
            calls_unknown: Counter::default(),
            reconciliations: Family::default(),
            worker_heartbeat: Family::default(),
            log_lines_dropped: Counter::default(),
            store_full: Gauge::default(),
            pruned: Family::default(),
            log_drops: None,
            log_drops_seen: AtomicU64::new(0),
        };
        let up = Gauge::<i64>::default();
        up.set(1);
        registry.register("up", "1 while the daemon runs", up);
        registry.register(
            "build",
            "the running version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "mails_received",
            "alerts accepted and stored, by way in",
            m.mails_received.clone(),
        );
        registry.register(
            "mails_rejected",
            "mail refused, by way in and reason",
            m.mails_rejected.clone(),
        );
        registry.register(
            "alerts_routed",
            "routing decisions, by rule and action",
            m.alerts_routed.clone(),
        );
        registry.register(
            "incidents_opened",
            "incidents opened (rounds of calls)",
            m.incidents_opened.clone(),
        );
        registry.register(
            "calls_placed",
            "calls Twilio accepted",
            m.calls_placed.clone(),
        );
        registry.register(
            "calls_failed",
            "calls that failed for good, by Twilio error code",
            m.calls_failed.clone(),
        );
        registry.register(
            "call_retries",
            "retryable Twilio failures that were retried",
            m.call_retries.clone(),
        );
        registry.register(
            "budget_refusals",
            "calls not placed because of max_calls_per_hour",
            m.budget_refusals.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "from an alert being stored to its first call request leaving for Twilio",
            m.dispatch_latency.clone(),
        );
        registry.register(
            "store_bytes",
            "size of the SQLite store, WAL included",
            m.store_bytes.clone(),
        );
        registry.register("reloads", "SIGHUP reloads, by result", m.reloads.clone());
        registry.register(
            "canary_runs",
            "canary calls, by result",
            m.canary_runs.clone(),
        );
        registry.register(
            "canary_last_success_timestamp_seconds",
            "when Twilio last accepted a canary call",
            m.canary_last_success.clone(),
        );
        registry.register(
            "calls_unknown",
            "call requests whose outcome was unknown (timeouts, lost connections): reconciled, never re-sent blindly",
            m.calls_unknown.clone(),
        );
        registry.register(
            "reconciliations",
            "unknown call requests settled, by result (placed, absent: sent again, undecided: sent again to be safe)",
            m.reconciliations.clone(),
        );
        registry.register(
            "worker_heartbeat_timestamp_seconds",
            "when each dispatch worker last completed a pass of its loop",
            m.worker_heartbeat.clone(),
        );
        registry.register(
            "store_full",
            "1 while new mail is refused (452/503) because open incidents alone fill [state] max_bytes",
            m.store_full.clone(),
        );
        registry.register(
            "pruned",
            "closed incidents and unattached alerts deleted by retention, by what",
            m.pruned.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "log lines dropped because stderr did not keep up (a stalled log pipe)",
            m.log_lines_dropped.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts the log lines the non-blocking log writer drops.
    pub fn with_log_drops(self, drops: tracing_appender::non_blocking::ErrorCounter) -> Metrics {
        Metrics {
            log_drops: Some(drops),
            ..self
        }
    }

    /// Counts a refused mail.
    pub fn reject(&self, ingress: &'static str, reason: &'static str) {
        self.mails_rejected
            .get_or_create(&Rejection { ingress, reason })
            .inc();
    }

    /// Counts an accepted mail.
    pub fn receive(&self, ingress: &'static str) {
        self.mails_received
            .get_or_create(&Ingress { ingress })
            .inc();
    }

    /// The Prometheus text exposition. Reads the store's size from the file system:
    /// call it off the async workers.
    pub fn render(&self) -> String {
        let wal = {
            let mut p = self.store_path.clone().into_os_string();
            p.push("-wal");
            PathBuf::from(p)
        };
        let size = [&self.store_path, &wal]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum::<u64>();
        self.store_bytes
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        if let Some(drops) = &self.log_drops {
            let dropped = u64::try_from(drops.dropped_lines()).unwrap_or(u64::MAX);
            let seen = self.log_drops_seen.fetch_max(dropped, Ordering::Relaxed);
            if dropped > seen {
                self.log_lines_dropped.inc_by(dropped - seen);
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new(PathBuf::from("/nonexistent/mailcall.db"));
        m.receive("smtp");
        m.reject("smtp", "recipient");
        m.alerts_routed
            .get_or_create(&Routing {
                rule: "host down".into(),
                action: "call",
            })
            .inc();
        m.dispatch_latency.observe(0.002);
        let text = m.render();
        for line in [
            "mailcall_up 1",
            "mailcall_build_info{version=\"",
            "mailcall_mails_received_total{ingress=\"smtp\"} 1",
            "mailcall_mails_rejected_total{ingress=\"smtp\",reason=\"recipient\"} 1",
            "mailcall_alerts_routed_total{rule=\"host down\",action=\"call\"} 1",
            "mailcall_dispatch_latency_seconds_count 1",
            "mailcall_store_bytes 0",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
