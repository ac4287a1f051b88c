//! `mailcall serve`: opens the store, starts the dispatcher and the SMTP listener, and
//! shuts them down in order.
//!
//! Shutdown is passed in as a [`CancellationToken`] (the binary cancels it on
//! SIGTERM/SIGINT; tests cancel it directly). On shutdown the listener stops accepting,
//! open SMTP sessions hear `421`, the dispatcher stops taking new alerts, and calls whose
//! request is in flight get a few seconds to finish. Everything else is already in the
//! store and is picked up by the next start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::dispatch::{Caller, Dispatcher};
use crate::health::Health;
use crate::ingest::Secrets;
use crate::ingest::http;
use crate::ingest::smtp;
use crate::ingest::tls::Tls;
use crate::store::Store;

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

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(
    config: Arc<Config>,
    store: Store,
    caller: Caller,
    listeners: Listeners,
    secrets: Secrets,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let wake = Arc::new(Notify::new());
    let tasks = TaskTracker::new();
    let calls = TaskTracker::new();
    let health = Arc::new(Health::default());

    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&config),
        store.clone(),
        caller,
        Arc::clone(&wake),
        calls.clone(),
        shutdown.clone(),
        Arc::clone(&health),
    ));
    tasks.spawn(dispatcher.run());

    if let Some(listener) = listeners.http {
        if let Ok(addr) = listener.local_addr() {
            info!(addr = %addr, "http listening");
        }
        let max_connections = config.http.as_ref().map_or(100, |h| h.max_connections);
        let app = http::app(Arc::new(http::HttpContext {
            config: Arc::clone(&config),
            store: store.clone(),
            wake: Arc::clone(&wake),
            health: Arc::clone(&health),
            secrets: secrets.clone(),
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
        config,
        store,
        wake,
        tls,
        passwords: secrets.smtp_passwords.clone(),
        guard: Arc::new(smtp::Guard::default()),
    });
    let (smtp_tasks, smtp_shutdown) = (tasks.clone(), shutdown.clone());
    tasks.spawn(async move {
        health.set_smtp_running(true);
        smtp::serve(listeners.smtp, ctx, smtp_shutdown, smtp_tasks).await;
        health.set_smtp_running(false);
    });

    shutdown.cancelled().await;
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
            "some Twilio requests did not finish in time; those calls are resumed at the next start"
        );
    }
    info!("stopped");
}
