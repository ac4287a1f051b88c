//! `mailcall serve`: starts the dispatch workers, the listeners, the watchdog and the
//! canary, tells systemd when it is ready, and shuts everything down in order.
//!
//! Shutdown is passed in as a [`CancellationToken`] (the binary cancels it on
//! SIGTERM/SIGINT; tests cancel it directly). On shutdown the listener stops accepting,
//! open SMTP sessions hear `421`, the workers stop, and requests in flight get a few
//! seconds to finish. Everything else is already in the store and is picked up by the
//! next start (a request that did not finish is reconciled, not re-sent).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::alert::DirectAlert;
use crate::config::Config;
use crate::dispatch::{Caller, Dispatcher};
use crate::health::Health;
use crate::ingest::http;
use crate::ingest::smtp;
use crate::metrics::{Metrics, Outcome};
use crate::notify::{Message, Notifier};
use crate::settings::Live;
use crate::store::Store;
use crate::store::{NewAlert, now_ms};

/// How long shutdown waits for SMTP sessions and the dispatcher.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long shutdown waits for Twilio requests in flight.
const CALLS_TIMEOUT: Duration = Duration::from_secs(3);

/// The listeners, bound before [`run`] so that callers (and tests) know the addresses
/// and bind errors surface before anything starts.
#[derive(Debug)]
pub struct Listeners {
    pub smtp: TcpListener,
    /// Present when the configuration has `[http]`.
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the configuration names.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let smtp = bind(config.smtp.listen, "SMTP", "[smtp] listen").await?;
        let http = match &config.http {
            Some(h) => Some(bind(h.listen, "HTTP", "[http] listen").await?),
            None => None,
        };
        Ok(Listeners { smtp, http })
    }
}

async fn bind(addr: SocketAddr, what: &str, key: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for {what} on {addr}: {e}; change {key} (ports below 1024 need CAP_NET_BIND_SERVICE)"),
        )
    })
}

/// Runs the daemon until `shutdown` is cancelled. In a dry run `store` is a dry-run
/// handle: every alert it stores is a dry run.
pub async fn run(
    live: Live,
    store: Store,
    caller: Caller,
    listeners: Listeners,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    shutdown: CancellationToken,
) {
    let wake = Arc::new(Notify::new());
    let tasks = TaskTracker::new();
    let health = Arc::new(Health::default());
    let twilio = match &caller {
        Caller::Twilio(client) => Some(client.clone()),
        Caller::DryRun => None,
    };
    let places_calls = twilio.is_some();

    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&live),
        store.clone(),
        caller,
        Arc::clone(&wake),
        Arc::clone(&health),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    dispatcher.start(&tasks, dispatcher.workers()).await;
    let calls = dispatcher.calls.clone();
    tasks.spawn(crate::pruner::run(
        store.clone(),
        Arc::clone(&live),
        Arc::clone(&health),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));

    tasks.spawn(crate::heartbeat::run(
        store.clone(),
        Arc::clone(&live),
        Arc::clone(&health),
        Arc::clone(&metrics),
        Arc::clone(&wake),
        shutdown.clone(),
        crate::clock::Clock::Wall,
    ));

    if let Some(listener) = listeners.http {
        if let Ok(addr) = listener.local_addr() {
            info!(addr = %addr, "http listening");
        }
        let max_connections = live
            .load()
            .config
            .http
            .as_ref()
            .map_or(100, |h| h.max_connections);
        let app = http::app(Arc::new(http::HttpContext {
            live: Arc::clone(&live),
            store: store.clone(),
            wake: Arc::clone(&wake),
            health: Arc::clone(&health),
            metrics: Arc::clone(&metrics),
            twilio,
        }));
        tasks.spawn(http::serve(
            listener,
            max_connections,
            app,
            shutdown.clone(),
        ));
    }

    if let Ok(addr) = listeners.smtp.local_addr() {
        info!(addr = %addr, "smtp listening");
    }
    let ctx = Arc::new(smtp::Context {
        live: Arc::clone(&live),
        store: store.clone(),
        wake: Arc::clone(&wake),
        guard: Arc::new(smtp::Guard::default()),
        metrics: Arc::clone(&metrics),
        data_budget: smtp::DataBudget::new(live.load().config.smtp.max_message_bytes),
    });
    let (smtp_tasks, smtp_shutdown, smtp_health) =
        (tasks.clone(), shutdown.clone(), Arc::clone(&health));
    // The listener is bound: it is running from here on, not from when the task first polls.
    smtp_health.set_smtp_running(true);
    tasks.spawn(async move {
        smtp::serve(listeners.smtp, ctx, smtp_shutdown, smtp_tasks).await;
        smtp_health.set_smtp_running(false);
    });

    // A dry run does not test the phone path, and must not use up the canary's
    // schedule, which lives in the store a real daemon shares.
    if places_calls {
        tasks.spawn(canary(
            Arc::clone(&live),
            store.clone(),
            Arc::clone(&wake),
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tasks.spawn(watchdog(
            interval,
            Arc::clone(&health),
            store.clone(),
            notifier.clone(),
            shutdown.clone(),
        ));
    }
    // Listeners are bound and the store is open: tell systemd (Type=notify).
    notifier.send(Message::Ready("accepting alerts"));

    shutdown.cancelled().await;
    notifier.send(Message::Stopping);
    info!("shutting down: no new mail is accepted");
    tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            "some SMTP sessions did not end in time; their mail was not acknowledged, so senders retry"
        );
    }
    calls.close();
    if tokio::time::timeout(CALLS_TIMEOUT, calls.wait())
        .await
        .is_err()
    {
        warn!(
            "some Twilio requests did not finish in time; they are reconciled with Twilio at the next start, not sent again blindly"
        );
    }
    info!("stopped");
}

/// Pings systemd's watchdog at half its interval, but only while every part is healthy:
/// a stuck worker or a store that cannot commit gets the daemon restarted.
async fn watchdog(
    interval: Duration,
    health: Arc<Health>,
    store: Store,
    notifier: Notifier,
    shutdown: CancellationToken,
) {
    let period = interval / 2;
    loop {
        let report = health.check(&store).await;
        if report.alive() {
            notifier.send(Message::Watchdog);
        } else {
            warn!(?report, "unhealthy: not pinging the systemd watchdog");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// `[canary]`: a test call through the whole pipeline (store → dispatch → Twilio) every
/// `every`, counted from the last one even across restarts.
async fn canary(
    live: Live,
    store: Store,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    const LAST: &str = "canary_last";
    loop {
        let Some(canary) = live.load().config.canary.clone() else {
            // Not configured (a reload may add it): look again later.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(60)) => continue,
            }
        };
        let every = i64::try_from(canary.every.as_millis()).unwrap_or(i64::MAX);
        let last = match store.meta(LAST).await {
            Ok(Some(v)) => v.parse::<i64>().unwrap_or(0),
            Ok(None) => {
                // First start with a canary: the first call comes one period from now.
                let now = now_ms();
                let _ = store.set_meta(LAST, &now.to_string()).await;
                now
            }
            Err(e) => {
                warn!(error = %e, "canary: cannot read its schedule; trying again in a minute");
                now_ms() - every + 60_000
            }
        };
        let due = last.saturating_add(every);
        let wait = Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0))
            .min(Duration::from_secs(60));
        if !wait.is_zero() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => continue,
            }
        }
        let now = now_ms();
        let alert = NewAlert {
            source: "canary",
            direct: Some(DirectAlert {
                numbers: canary.numbers.clone(),
                message: canary.message.clone(),
                dedup_key: Some(format!("canary {now}")),
                ..DirectAlert::default()
            }),
            ..NewAlert::default()
        };
        // The test alert and its schedule in one transaction: a crash can neither ring
        // twice in a period nor skip one.
        match store
            .insert_alert_and_meta(alert, LAST, now.to_string())
            .await
        {
            Ok(inserted) => {
                info!(alert = inserted.id, numbers = ?canary.numbers, "canary: test call queued");
                wake.notify_one();
            }
            Err(e) => {
                metrics
                    .canary_runs
                    .get_or_create(&Outcome { result: "failed" })
                    .inc();
                error!(error = %e, "CANARY FAILED: cannot store the test alert");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}
