//! Messages to systemd (`sd_notify`), sent from a thread of their own.
//!
//! `sd_notify` writes a datagram to `$NOTIFY_SOCKET`, and that write blocks when the
//! socket's queue is full (a systemd that is busy, or anything that stopped reading).
//! Done on an async worker it froze the runtime: no SMTP, no calls, no exit on SIGTERM.
//! So async code only hands messages to a bounded queue without waiting
//! ([`Notifier::send`] drops a message when the queue is full: a missed watchdog ping
//! is what a stuck notification path deserves), and one dedicated thread does the
//! writes. The thread is not joined on exit, so a blocked write cannot hold up
//! shutdown either.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use sd_notify::NotifyState;

/// Messages queued for systemd at most; more are dropped.
const QUEUE: usize = 16;

/// A message for systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `READY=1` with a status line.
    Ready(&'static str),
    /// `RELOADING=1` (with `MONOTONIC_USEC`).
    Reloading,
    Stopping,
    Watchdog,
}

/// The handle async code uses; cheap to clone. Without `$NOTIFY_SOCKET` it does
/// nothing.
#[derive(Debug, Clone)]
pub struct Notifier {
    queue: Option<SyncSender<Message>>,
}

impl Notifier {
    /// Starts the notification thread when systemd asked for notifications.
    pub fn start() -> Notifier {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Notifier { queue: None };
        }
        let (tx, rx) = sync_channel(QUEUE);
        let started = std::thread::Builder::new()
            .name("mailcall-notify".into())
            .spawn(move || deliver(&rx));
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the systemd notification thread; systemd will not hear from mailcall");
            return Notifier { queue: None };
        }
        Notifier { queue: Some(tx) }
    }

    /// Queues a message without waiting; dropped (and logged) when the queue is full.
    pub fn send(&self, message: Message) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(message) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(message)) => {
                tracing::warn!(
                    ?message,
                    "systemd is not reading notifications; dropped one"
                );
            }
        }
    }
}

/// The notification thread: writes each message, blocking only itself.
fn deliver(queue: &Receiver<Message>) {
    while let Ok(message) = queue.recv() {
        let result = match message {
            Message::Ready(status) => {
                sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)])
            }
            Message::Reloading => sd_notify::notify(&[
                NotifyState::Reloading,
                NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
            ]),
            Message::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
            Message::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "cannot notify systemd");
        }
    }
}
