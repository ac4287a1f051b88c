//! The durable store (SQLite): received alerts, incidents, calls and every request to
//! Twilio.
//!
//! It is the only thing ingest and dispatch share. An ingest path answers `250`/`2xx`
//! only after [`Store::insert_alert`] returned, which is after the transaction holding
//! the alert was committed with `synchronous=FULL` — so an acknowledged alert survives a
//! `kill -9` or a power cut, and the dispatcher finds it in the table after a restart.
//!
//! All writes go through one writer thread that owns the connection. It takes every job
//! waiting in its queue, runs each inside its own savepoint (one failing job does not
//! undo the others) and commits them together: one fsync for a whole batch, which is
//! what lets a storm of mails be absorbed at thousands per second (group commit). Every
//! state change of an alert, incident, call or attempt is one such job, so each
//! transition is one transaction.
//!
//! Before each commit the writer checks that the database file is still the one it
//! opened: a store deleted or replaced under a running daemon would acknowledge mail
//! that no restart could find, so from then on every write fails (`451`, `/healthz`
//! 503) until the daemon is restarted.
//!
//! Layout: [`states`] (the typed states), `schema` (migrations), `routing` (alerts into
//! incidents and calls), `calls` (placing and reconciling requests to Twilio),
//! `incidents` (rounds, the bridge, callbacks' lookups, reports).

mod calls;
mod incidents;
mod oncall;
mod retention;
mod routing;
mod schema;
pub mod states;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::alert::{DirectAlert, Envelope};

pub use calls::{
    AbsentAttempt, AttemptOutcome, CALL_LIST, CALLBACK, CALLBACK_LATE, CallJob, Claim, MAX_ABSENT,
    Recorded, Settled, Settlement, Unresolved, WatchedCall, sms_text,
};
pub use incidents::{
    AttemptReport, CallReport, DueRound, EventReport, IncidentReport, LiveCall, RoundEnd,
    RoundReport,
};
pub use oncall::{DueEscalation, Escalated, HeartbeatRow, OverrideRow, SilenceRow};
pub use retention::{Pruned, Usage};
pub use routing::{NewIncident, Routed, RoutedCall};
pub use states::{
    AlertState, AttemptState, CallState, EscalationState, HeartbeatState, IncidentKind,
    IncidentStatus, RoundOutcome, SmsState, TwilioStatus,
};

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open store {path}: {source}; check that the directory exists and is writable, or set [state] path"
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "cannot create {path}: {source}; check the directory's permissions, or set [state] path"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no store at {path} yet: the daemon creates it when it first starts")]
    Missing { path: PathBuf },
    #[error(
        "store {path} is corrupt or not a mailcall database ({detail}); move it aside to start with an empty store, or restore a backup"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "store {path} has schema version {found}, but this mailcall knows only up to {known}; run a newer mailcall"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "store {path} has schema version {found}, older than this mailcall's {known}; start `mailcall serve` once to upgrade it"
    )]
    Outdated {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "the store is full: open incidents and unrouted alerts alone fill [state] max_bytes ({max_bytes} bytes); raise it, or resolve incidents"
    )]
    Full { max_bytes: u64 },
    #[error(
        "a mail of {bytes} bytes can never fit into [state] max_bytes ({max_bytes} bytes), even with the store empty; raise max_bytes, or lower smtp.max_message_bytes"
    )]
    TooBig { bytes: u64, max_bytes: u64 },
    #[error("store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store commit failed: {0}")]
    Commit(String),
    #[error(
        "the store file {path} was deleted or replaced while mailcall ran; nothing can be stored until mailcall is restarted (restore the file first if you have it)"
    )]
    Lost { path: PathBuf },
    #[error("the store has been shut down")]
    Closed,
    #[error(
        "another mailcall daemon{pid} is already serving the store {path}; stop it first (two would place every call twice)"
    )]
    Locked { path: PathBuf, pid: String },
}

/// The daemon's claim on a store: only one process may dispatch from it, or every call
/// would be placed twice. Held (an advisory lock on `<store>.lock`) until dropped.
#[derive(Debug)]
pub struct DaemonLock {
    _file: std::fs::File,
}

impl DaemonLock {
    /// Takes the lock, or says which process holds it.
    pub fn acquire(store_path: &Path) -> Result<DaemonLock, StoreError> {
        use std::io::{Read, Seek, Write};
        let path = lock_path(store_path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let open_error = |source: std::io::Error| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(open_error)?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(open_error)?;
                file.rewind().map_err(open_error)?;
                write!(file, "{}", std::process::id()).map_err(open_error)?;
                Ok(DaemonLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                Err(StoreError::Locked {
                    path: store_path.to_path_buf(),
                    pid: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(open_error(e)),
        }
    }
}

fn lock_path(store_path: &Path) -> PathBuf {
    let mut name = store_path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    store_path.with_file_name(name)
}

/// A handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
    /// Alerts stored through this handle are dry runs (`serve --dry-run`,
    /// `call --dry-run`): their incidents are never dialled, by any process.
    dry_run: bool,
    capacity: Arc<Capacity>,
}

/// `[state] max_bytes`, and whether new mail is being refused for it.
#[derive(Debug, Default)]
struct Capacity {
    max_bytes: Option<u64>,
    full: AtomicBool,
    /// The size of the last mail refused for want of room: the store is full until a
    /// mail of that size would fit again.
    refused_bytes: AtomicU64,
    /// Wakes the pruner when a mail is refused, so that a full store is looked at again
    /// every second from then on, not only at the pruner's next idle pass.
    refused: tokio::sync::Notify,
}

impl Capacity {
    fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }
}

/// An alert as an ingest path hands it over.
#[derive(Debug, Clone, Default)]
pub struct NewAlert {
    /// `smtp`, `sendgrid`, `webhook`, `cli` or `canary`.
    pub source: &'static str,
    /// The client's address, for the log and for forensics.
    pub peer: Option<String>,
    pub envelope: Envelope,
    /// The raw RFC 5322 message (empty for a direct alert).
    pub raw: Vec<u8>,
    /// Set for alerts that are not mail.
    pub direct: Option<DirectAlert>,
    /// A delivery id (a SendGrid mail's Message-ID): the same id from the same source
    /// is stored once.
    pub dedup_id: Option<String>,
    /// Stored for the record but never routed: why it was refused.
    pub rejected: Option<String>,
}

/// What [`Store::insert_alert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub id: i64,
    /// The same delivery was stored before; this is the earlier alert's id.
    pub duplicate: bool,
}

/// An alert that was stored but not yet routed.
#[derive(Debug, Clone)]
pub struct PendingAlert {
    pub id: i64,
    /// When it was stored, in Unix milliseconds.
    pub received_at: i64,
    pub source: String,
    pub envelope: Envelope,
    pub raw: Vec<u8>,
    pub direct: Option<DirectAlert>,
    pub dry_run: bool,
    /// How many runs of the daemon died while routing it.
    pub crashes: i64,
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A duration in milliseconds, saturating.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Formats Unix milliseconds as RFC 3339 (UTC, seconds).
pub fn rfc3339(unix_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The most jobs committed together; bounds the latency one batch adds.
const MAX_BATCH: usize = 512;
/// Jobs waiting for the writer, at most; each caller waits for its own, so what a job
/// carries (a mail) is bounded by the ingest limits that admitted it.
const QUEUE: usize = 4096;

/// Why a batch did not commit; every job of the batch gets it.
#[derive(Debug, Clone)]
enum CommitFailure {
    Sqlite(String),
    /// The database file is no longer the one opened.
    Lost,
}

type Completion = Box<dyn FnOnce(Result<(), CommitFailure>) + Send>;
/// A unit of work for the writer thread. `None` means the batch could not even begin,
/// so the job must fail without running.
type Job = Box<dyn FnOnce(Option<&Connection>) -> (bool, Completion) + Send>;

impl Store {
    /// Opens (creating if missing) and migrates the store, then starts its writer thread.
    pub fn open(path: &Path, max_bytes: Option<u64>) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(corrupt)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("cannot switch to WAL journal mode (got {mode})"),
            });
        }
        // `journal_size_limit`: a WAL that was reset is cut back to this size, instead of
        // keeping the largest size a burst ever gave it.
        conn.execute_batch(&format!(
            "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000; PRAGMA journal_size_limit = {WAL_KEPT};"
        ))
        .map_err(corrupt)?;
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(corrupt)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: check,
            });
        }
        schema::migrate(&conn, path)?;
        // `max_bytes` is not SQLite's `max_page_count`: that would refuse the
        // dispatcher's own writes too and strand accepted alerts. Only new alerts are
        // refused (see `insert_alert`).
        let identity = file_identity(path).ok_or_else(|| StoreError::Missing {
            path: path.to_path_buf(),
        })?;
        // Checkpoints copy the WAL into the database file and fsync it: done by the
        // committing connection they would stall a commit (and a 250) for milliseconds, so
        // a second connection does them in the background instead.
        conn.query_row("PRAGMA wal_autocheckpoint = 0", [], |_| Ok(()))?;
        let checkpointer = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // A truncating checkpoint holds up commits while it waits for readers: briefly.
        checkpointer.busy_timeout(TRUNCATE_WAIT)?;
        let running = Arc::new(AtomicBool::new(true));
        // Bounded: when the writer falls behind, callers wait for room (asynchronously)
        // instead of piling up work without end.
        let (jobs, queue) = mpsc::channel::<Job>(QUEUE);
        let writer_running = Arc::clone(&running);
        let writer_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("mailcall-store".into())
            .spawn(move || {
                writer(conn, queue, &writer_path, identity);
                writer_running.store(false, Ordering::Relaxed);
            })
            .map_err(|e| StoreError::Commit(format!("cannot start the store thread: {e}")))?;
        std::thread::Builder::new()
            .name("mailcall-checkpoint".into())
            .spawn({
                let wal = wal_path(path);
                move || checkpoint(&checkpointer, &wal, &running)
            })
            .map_err(|e| StoreError::Commit(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Store {
            jobs,
            path: path.to_path_buf(),
            dry_run: false,
            capacity: Arc::new(Capacity {
                max_bytes,
                full: AtomicBool::new(false),
                refused_bytes: AtomicU64::new(0),
                refused: tokio::sync::Notify::new(),
            }),
        })
    }

    /// New mail is being refused: open data alone fills `[state] max_bytes`.
    pub fn is_full(&self) -> bool {
        self.capacity.is_full()
    }

    /// Resolves once a mail has been refused for want of room (at once if one was
    /// refused since the last call).
    pub async fn refused_mail(&self) {
        self.capacity.refused.notified().await;
    }

    /// Whether this handle stores its alerts as dry runs.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// This handle, storing every alert as a dry run.
    pub fn dry_run(self) -> Store {
        Store {
            dry_run: true,
            ..self
        }
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in the writer thread; resolves after the transaction holding it was
    /// committed (or failed).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let path = self.path.clone();
        let failed = move |failure: CommitFailure| match failure {
            CommitFailure::Sqlite(reason) => StoreError::Commit(reason),
            CommitFailure::Lost => StoreError::Lost { path },
        };
        let job: Job = Box::new(move |conn| {
            let Some(conn) = conn else {
                let done: Completion = Box::new(move |e| {
                    let failure = e.err().unwrap_or_else(|| {
                        CommitFailure::Sqlite("cannot start a savepoint".into())
                    });
                    let _ = tx.send(Err(failed(failure)));
                });
                return (false, done);
            };
            match f(conn) {
                Ok(value) => (
                    true,
                    Box::new(move |committed: Result<(), CommitFailure>| {
                        let _ = tx.send(committed.map(|()| value).map_err(failed));
                    }),
                ),
                Err(e) => (
                    false,
                    Box::new(move |_| {
                        let _ = tx.send(Err(StoreError::Sqlite(e)));
                    }),
                ),
            }
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores a received alert durably; resolves once it is committed. Under
    /// `[state] max_bytes` the oldest closed data makes room first; `Full` when open
    /// data alone leaves none, `TooBig` when not even an empty store would.
    pub async fn insert_alert(&self, alert: NewAlert) -> Result<Inserted, StoreError> {
        let dry_run = self.dry_run;
        let capacity = Arc::clone(&self.capacity);
        self.run(move |c| insert_within(c, &capacity, &alert, dry_run))
            .await?
    }

    /// Stores an alert and sets a `meta` value in the same transaction: the canary's
    /// test alert and its schedule, so that a crash can neither queue the test call
    /// without moving the schedule (two calls in one period) nor the reverse.
    pub async fn insert_alert_and_meta(
        &self,
        alert: NewAlert,
        key: &'static str,
        value: String,
    ) -> Result<Inserted, StoreError> {
        let dry_run = self.dry_run;
        let capacity = Arc::clone(&self.capacity);
        self.run(move |c| {
            let inserted = insert_within(c, &capacity, &alert, dry_run)?;
            if inserted.is_ok() {
                set_meta(c, key, &value)?;
            }
            Ok(inserted)
        })
        .await?
    }

    /// A value from the `meta` table (e.g. when the canary last ran).
    pub async fn meta(&self, key: &'static str) -> Result<Option<String>, StoreError> {
        self.run(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// Sets a value in the `meta` table.
    pub async fn set_meta(&self, key: &'static str, value: &str) -> Result<(), StoreError> {
        let value = value.to_string();
        self.run(move |c| set_meta(c, key, &value)).await
    }

    /// Proves the store takes writes (for `/healthz`): a tiny committed write.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('health', ?1) ON CONFLICT (key) DO UPDATE SET value = ?1",
            )?
            .execute([now_ms().to_string()])?;
            Ok(())
        })
        .await
    }

    /// The routing outcome of one alert: `(state, action, incident id)`, e.g. for
    /// `mailcall call` waiting on a daemon.
    pub async fn alert_outcome(
        &self,
        id: i64,
    ) -> Result<(AlertState, Option<String>, Option<i64>), StoreError> {
        self.run(move |c| {
            c.query_row(
                "SELECT state, action, incident_id FROM alerts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
        .await
    }

    /// Alerts stored but not yet routed, oldest first: at most `limit` of them, and no
    /// more raw mail than `max_bytes` (but always the first), so that a backlog of big
    /// mails is routed a few at a time instead of all in memory at once.
    pub async fn pending_alerts(
        &self,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<PendingAlert>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, source, mail_from, rcpt_to, direct, received_at, dry_run, length(raw), raw, route_attempts
                 FROM alerts WHERE state = 'received' ORDER BY id LIMIT ?1",
            )?;
            let mut rows = stmt.query([i64::try_from(limit).unwrap_or(i64::MAX)])?;
            let (mut alerts, mut bytes) = (Vec::new(), 0usize);
            while let Some(r) = rows.next()? {
                // The length is in the row's header: the mail itself is read only if
                // it fits the budget.
                let size = usize::try_from(r.get::<_, i64>(7)?).unwrap_or(usize::MAX);
                if !alerts.is_empty() && bytes.saturating_add(size) > max_bytes {
                    break;
                }
                bytes = bytes.saturating_add(size);
                let rcpt: String = r.get(3)?;
                alerts.push(PendingAlert {
                    id: r.get(0)?,
                    source: r.get(1)?,
                    envelope: Envelope {
                        mail_from: r.get(2)?,
                        rcpt_to: serde_json::from_str(&rcpt).unwrap_or_default(),
                    },
                    direct: r
                        .get::<_, Option<String>>(4)?
                        .and_then(|d| serde_json::from_str(&d).ok()),
                    received_at: r.get(5)?,
                    dry_run: r.get(6)?,
                    raw: r.get(8)?,
                    crashes: r.get(9)?,
                });
            }
            Ok(alerts)
        })
        .await
    }
}

impl Store {
    /// The daemon died while routing these alerts (see `dispatch/router.rs`): one more
    /// strike each.
    pub async fn note_routing_crash(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "UPDATE alerts SET route_attempts = route_attempts + 1 WHERE id = ?1 AND state = 'received'",
            )?;
            for id in ids {
                stmt.execute([id])?;
            }
            Ok(())
        })
        .await
    }

    /// Sets an alert aside: kept for the record (`rejected`, with why), never routed.
    pub async fn quarantine(&self, id: i64, why: String) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute(
                "UPDATE alerts SET state = ?2, note = ?3 WHERE id = ?1 AND state = 'received'",
                params![id, AlertState::Rejected, why],
            )
            .map(|_| ())
        })
        .await
    }
}

/// Stores one alert in the caller's transaction: under `[state] max_bytes` the oldest
/// closed data makes room first; `Full` when open data alone leaves none, `TooBig` when
/// not even an empty store would.
fn insert_within(
    c: &Connection,
    capacity: &Capacity,
    alert: &NewAlert,
    dry_run: bool,
) -> rusqlite::Result<Result<Inserted, StoreError>> {
    if let Some(max) = capacity.max_bytes {
        let need = u64::try_from(alert.raw.len()).unwrap_or(u64::MAX);
        // Not a matter of waiting: even an empty store has no room for it.
        if retention::never_fits(c, max, need)? {
            return Ok(Err(StoreError::TooBig {
                bytes: need,
                max_bytes: max,
            }));
        }
        let room = retention::make_room(c, max, need)?;
        capacity.full.store(!room, Ordering::Relaxed);
        if !room {
            capacity.refused_bytes.store(need, Ordering::Relaxed);
            capacity.refused.notify_one();
            return Ok(Err(StoreError::Full { max_bytes: max }));
        }
    }
    let inserted = insert_alert_row(c, alert, dry_run, now_ms())?;
    if inserted > 0 {
        return Ok(Ok(Inserted {
            id: inserted,
            duplicate: false,
        }));
    }
    let id = c
        .prepare_cached("SELECT id FROM alerts WHERE source = ?1 AND dedup_id = ?2")?
        .query_row(params![alert.source, alert.dedup_id], |r| r.get(0))?;
    Ok(Ok(Inserted {
        id,
        duplicate: true,
    }))
}

fn set_meta(c: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
    )?
    .execute(params![key, value])
    .map(|_| ())
}

/// Inserts an alert row; its id, or 0 when the same delivery (`source`, `dedup_id`)
/// was stored before.
pub(super) fn insert_alert_row(
    c: &Connection,
    alert: &NewAlert,
    dry_run: bool,
    now: i64,
) -> rusqlite::Result<i64> {
    let rcpt = serde_json::to_string(&alert.envelope.rcpt_to).unwrap_or_else(|_| "[]".into());
    let direct = alert
        .direct
        .as_ref()
        .and_then(|d| serde_json::to_string(d).ok());
    let state = if alert.rejected.is_some() {
        AlertState::Rejected
    } else {
        AlertState::Received
    };
    let inserted = c
        .prepare_cached(
            "INSERT INTO alerts (received_at, source, peer, mail_from, rcpt_to, raw, direct, dedup_id, state, note, dry_run)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (source, dedup_id) WHERE dedup_id IS NOT NULL DO NOTHING",
        )?
        .execute(params![
            now,
            alert.source,
            alert.peer,
            alert.envelope.mail_from,
            rcpt,
            alert.raw,
            direct,
            alert.dedup_id,
            state,
            alert.rejected,
            dry_run
        ])?;
    Ok(if inserted == 1 {
        c.last_insert_rowid()
    } else {
        0
    })
}

/// The device and inode of a file: what "the same file" means to the writer.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// The WAL size past which the checkpoint also resets and truncates it.
const WAL_TRUNCATE_AT: u64 = 16 * 1024 * 1024;
/// The size a reset WAL is cut back to (`journal_size_limit`).
const WAL_KEPT: u64 = 4 * 1024 * 1024;
/// How long a truncating checkpoint waits for readers (commits wait meanwhile).
const TRUNCATE_WAIT: Duration = Duration::from_millis(500);

/// The WAL file of the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push("-wal");
    path.with_file_name(name)
}

/// The checkpoint thread, until the writer thread has stopped: a passive checkpoint
/// twice a second (it never blocks the writer). Passive checkpoints never catch up
/// while commits come back to back (a burst of big mails, or clients asking
/// `/healthz`), and the WAL would grow without end — far past `max_bytes` — so once it
/// passes [`WAL_TRUNCATE_AT`] the checkpoint is a truncating one, which holds commits
/// back for the few milliseconds it takes to copy the WAL and cut it to nothing.
fn checkpoint(conn: &Connection, wal: &Path, running: &AtomicBool) {
    while running.load(Ordering::Relaxed) {
        std::thread::sleep(CHECKPOINT_EVERY);
        let big = std::fs::metadata(wal).is_ok_and(|m| m.len() > WAL_TRUNCATE_AT);
        let mode = if big { "TRUNCATE" } else { "PASSIVE" };
        if let Err(e) = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
            tracing::warn!(error = %e, mode, "WAL checkpoint failed; will try again");
        }
    }
}

/// The writer thread: batches queued jobs into one transaction each, and commits a
/// batch only while the database file is still the one it opened.
fn writer(conn: Connection, mut queue: mpsc::Receiver<Job>, path: &Path, identity: (u64, u64)) {
    let mut lost_logged = false;
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let reason = CommitFailure::Sqlite(e.to_string());
            for job in batch {
                let (_, done) = job(None);
                done(Err(reason.clone()));
            }
            continue;
        }
        let mut completions = Vec::with_capacity(batch.len());
        for job in batch {
            let savepoint = conn.execute_batch("SAVEPOINT job");
            let (ok, done) = job(savepoint.is_ok().then_some(&conn));
            let _ = if ok {
                conn.execute_batch("RELEASE job")
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            };
            completions.push(done);
        }
        let committed = if file_identity(path) == Some(identity) {
            conn.execute_batch("COMMIT").map_err(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                CommitFailure::Sqlite(e.to_string())
            })
        } else {
            let _ = conn.execute_batch("ROLLBACK");
            if !std::mem::replace(&mut lost_logged, true) {
                tracing::error!(
                    path = %path.display(),
                    "STORE FILE DELETED OR REPLACED while mailcall runs: every mail is now refused (451) and /healthz fails; restart mailcall (restore the file first if you can)"
                );
            }
            Err(CommitFailure::Lost)
        };
        for done in completions {
            done(committed.clone());
        }
    }
}

#[cfg(test)]
mod tests;
