//! The durable store (SQLite): received alerts, incidents and call attempts.
//!
//! It is the only thing ingest and dispatch share. An ingest path answers `250`/`2xx`
//! only after [`Store::insert_alert`] returned, which is after the transaction holding
//! the alert was committed with `synchronous=FULL` — so an acknowledged alert survives a
//! `kill -9` or a power cut, and the dispatcher finds it in the table after a restart.
//!
//! All writes go through one writer thread that owns the connection. It takes every job
//! waiting in its queue, runs each inside its own savepoint (one failing job does not
//! undo the others) and commits them together: one fsync for a whole batch, which is
//! what lets a storm of mails be absorbed at thousands per second (group commit).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::alert::{DirectAlert, Envelope};
use crate::route::{Action, Decision};

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
    #[error("store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store commit failed: {0}")]
    Commit(String),
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
}

/// An alert as an ingest path hands it over.
#[derive(Debug, Clone, Default)]
pub struct NewAlert {
    /// `smtp`, `sendgrid`, `webhook` or `cli`.
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

/// An incident whose round is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRound {
    pub incident_id: i64,
    pub public_id: String,
    pub round: i64,
    pub rounds: i64,
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundEnd {
    /// Someone is in the bridge: no more rounds.
    Reached { round: i64 },
    /// Nobody joined: these calls start round `round`.
    NextRound {
        round: i64,
        calls: Vec<CallJob>,
        refused: Vec<String>,
    },
    /// Nobody joined in any of the `rounds` rounds.
    Unanswered { rounds: i64 },
}

/// A placed call whose answerer is still to be found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallToCheck {
    pub call_id: i64,
    pub incident_id: i64,
    pub sid: Option<String>,
    pub number: String,
    pub message: String,
    pub language: String,
    pub voice: String,
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
}

/// One call to place (or to go on placing after a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallJob {
    pub call_id: i64,
    pub incident_id: i64,
    /// The rule that decided the call, for the log.
    pub rule: String,
    pub number: String,
    pub twiml: String,
    /// When the call was decided, in Unix milliseconds; retries stop `retry_for` later.
    pub created_at: i64,
    /// When the alert behind it was stored (Unix milliseconds), for the latency metric;
    /// `None` for calls resumed after a restart.
    pub received_at: Option<i64>,
    pub attempts: i64,
    /// Set when a request for this call was in flight when the daemon stopped: when it
    /// was sent (Unix milliseconds). Whether it reached Twilio must be checked before
    /// calling again.
    pub in_flight_since: Option<i64>,
    /// The first attempt is already recorded as `sending` (calls opened by
    /// [`Store::record_routings`] are, to save a commit before the first request).
    pub sending_recorded: bool,
    /// The SMS summary to send once the call is placed (`sms = true`).
    pub sms: Option<String>,
}

/// The SMS summary of an incident.
pub fn sms_text(incident_id: i64, subject: &str) -> String {
    let text = format!("mailcall incident #{incident_id}: {subject}");
    // Twilio takes up to 1,600 characters.
    text.chars().take(1600).collect()
}

/// What the store did with a routed alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// A new incident: these calls are to be placed now; `refused` are over the budget.
    Opened {
        incident_id: i64,
        calls: Vec<CallJob>,
        refused: Vec<String>,
    },
    /// Recorded on an incident opened within the cooldown; nobody is called.
    Deduplicated { incident_id: i64, alert_count: i64 },
    /// Dropped by a rule, or matched by none (or a resolve with nothing open to close).
    NotCalled,
    /// A resolve rule closed this incident: no further rounds.
    Resolved { incident_id: i64, public_id: String },
}

/// What an incident needs besides the routing decision, prepared by the dispatcher
/// (used only when the alert does not join an incident already open).
#[derive(Debug, Clone)]
pub struct NewIncident {
    /// Opaque, random: names the conference room.
    pub public_id: String,
    /// The TwiML every call of the incident uses.
    pub twiml: String,
}

/// An incident as `mailcall incidents` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IncidentReport {
    pub id: i64,
    pub public_id: String,
    /// RFC 3339, UTC.
    pub opened_at: String,
    pub rule: String,
    pub dedup_key: String,
    pub alert_count: i64,
    /// `open` (rounds going on), `reached`, `unanswered` or `resolved`.
    pub status: String,
    /// Each round of calls and how it ended.
    pub rounds: Vec<RoundReport>,
    pub calls: Vec<CallReport>,
}

/// One round of calls of an incident.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundReport {
    pub round: i64,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// `None` while the round goes on.
    pub outcome: Option<String>,
}

/// One number of an incident.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallReport {
    pub number: String,
    /// `pending`, `sending`, `retrying`, `placed`, `failed`, `refused` or `dry-run`.
    pub status: String,
    pub sid: Option<String>,
    pub error_code: Option<i64>,
    pub error: Option<String>,
    pub attempts: i64,
    /// The round this call belongs to.
    pub round: i64,
    /// Twilio's `answered_by` (`human`, `machine_start`, …), once known.
    pub answered_by: Option<String>,
    /// Every attempt's outcome, oldest first.
    pub history: Vec<AttemptReport>,
}

/// One attempt at placing a call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttemptReport {
    /// RFC 3339, UTC.
    pub at: String,
    /// `placed`, `dry-run`, `retry` or `failed`.
    pub outcome: String,
    pub error_code: Option<i64>,
    pub error: Option<String>,
    pub sid: Option<String>,
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: alerts, incidents, calls.
    "CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        peer TEXT,
        mail_from TEXT,
        rcpt_to TEXT NOT NULL,
        raw BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'received',
        rule TEXT,
        action TEXT,
        incident_id INTEGER REFERENCES incidents(id)
    );
    CREATE INDEX alerts_received ON alerts(id) WHERE state = 'received';
    CREATE TABLE incidents (
        id INTEGER PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        opened_at INTEGER NOT NULL,
        rule TEXT NOT NULL,
        dedup_key TEXT NOT NULL,
        message TEXT NOT NULL,
        language TEXT NOT NULL,
        voice TEXT NOT NULL,
        twiml TEXT NOT NULL,
        alert_count INTEGER NOT NULL DEFAULT 1,
        last_alert_at INTEGER NOT NULL
    );
    CREATE INDEX incidents_key ON incidents(dedup_key, opened_at);
    CREATE TABLE calls (
        id INTEGER PRIMARY KEY,
        incident_id INTEGER NOT NULL REFERENCES incidents(id),
        number TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        sid TEXT,
        error_code INTEGER,
        error TEXT,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX calls_incident ON calls(incident_id);
    CREATE INDEX calls_created ON calls(created_at);
    CREATE INDEX calls_open ON calls(id) WHERE status IN ('pending', 'sending', 'retrying');",
    // 2: the outcome of every attempt, not only the last.
    "CREATE TABLE call_attempts (
        id INTEGER PRIMARY KEY,
        call_id INTEGER NOT NULL REFERENCES calls(id),
        at INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        error_code INTEGER,
        error TEXT,
        sid TEXT
    );
    CREATE INDEX call_attempts_call ON call_attempts(call_id);",
    // 3: alerts that are not mail (webhook, CLI), once-only delivery ids, rejections,
    // and a scratch table the health check writes to.
    "ALTER TABLE alerts ADD COLUMN direct TEXT;
    ALTER TABLE alerts ADD COLUMN dedup_id TEXT;
    ALTER TABLE alerts ADD COLUMN note TEXT;
    CREATE UNIQUE INDEX alerts_dedup_id ON alerts(source, dedup_id) WHERE dedup_id IS NOT NULL;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 4: calls per minute, so the hourly budget is a sum over at most 61 rows instead of
    // a scan of every call of the last hour (which made storms slower as they grew).
    "CREATE TABLE call_budget (minute INTEGER PRIMARY KEY, calls INTEGER NOT NULL);
    INSERT INTO call_budget (minute, calls)
        SELECT created_at / 60000, COUNT(*) FROM calls
        WHERE status != 'refused' AND created_at > (CAST(strftime('%s', 'now') AS INTEGER) - 3600) * 1000
        GROUP BY created_at / 60000;",
    // 5: what the SMS summary needs, kept with the incident so resumed calls still send it.
    "ALTER TABLE incidents ADD COLUMN subject TEXT NOT NULL DEFAULT '';
    ALTER TABLE incidents ADD COLUMN sms INTEGER NOT NULL DEFAULT 0;",
    // 6: rounds of calls until someone is in the bridge, and what answered each call.
    "ALTER TABLE incidents ADD COLUMN status TEXT NOT NULL DEFAULT 'open';
    ALTER TABLE incidents ADD COLUMN round INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE incidents ADD COLUMN rounds INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE incidents ADD COLUMN round_interval_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE incidents ADD COLUMN next_round_at INTEGER;
    CREATE INDEX incidents_next_round ON incidents(next_round_at) WHERE next_round_at IS NOT NULL;
    ALTER TABLE calls ADD COLUMN round INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE calls ADD COLUMN answered_by TEXT;
    CREATE TABLE rounds (
        incident_id INTEGER NOT NULL REFERENCES incidents(id),
        round INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        outcome TEXT,
        PRIMARY KEY (incident_id, round)
    );",
];

/// The most jobs committed together; bounds the latency one batch adds.
const MAX_BATCH: usize = 512;

type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;
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
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
        )
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
        migrate(&conn, path)?;
        if let Some(max) = max_bytes {
            let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = i64::try_from(max).unwrap_or(i64::MAX) / page_size.max(1);
            conn.query_row(
                &format!("PRAGMA max_page_count = {}", pages.max(1)),
                [],
                |_| Ok(()),
            )?;
        }
        // Checkpoints copy the WAL into the database file and fsync it: done by the
        // committing connection they would stall a commit (and a 250) for milliseconds, so
        // a second connection does them in the background instead.
        conn.query_row("PRAGMA wal_autocheckpoint = 0", [], |_| Ok(()))?;
        let checkpointer = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        checkpointer.busy_timeout(Duration::from_secs(5))?;
        let running = Arc::new(AtomicBool::new(true));
        let (jobs, queue) = mpsc::channel::<Job>();
        let writer_running = Arc::clone(&running);
        std::thread::Builder::new()
            .name("mailcall-store".into())
            .spawn(move || {
                writer(conn, queue);
                writer_running.store(false, Ordering::Relaxed);
            })
            .map_err(|e| StoreError::Commit(format!("cannot start the store thread: {e}")))?;
        std::thread::Builder::new()
            .name("mailcall-checkpoint".into())
            .spawn(move || checkpoint(&checkpointer, &running))
            .map_err(|e| StoreError::Commit(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Store {
            jobs,
            path: path.to_path_buf(),
        })
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
        let job: Job = Box::new(move |conn| {
            let Some(conn) = conn else {
                let done: Completion = Box::new(move |e| {
                    let reason = e.err().unwrap_or_else(|| "cannot start a savepoint".into());
                    let _ = tx.send(Err(StoreError::Commit(reason)));
                });
                return (false, done);
            };
            match f(conn) {
                Ok(value) => (
                    true,
                    Box::new(move |committed: Result<(), String>| {
                        let _ = tx.send(committed.map(|()| value).map_err(StoreError::Commit));
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
        self.jobs.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores a received alert durably; resolves once it is committed.
    pub async fn insert_alert(&self, alert: NewAlert) -> Result<Inserted, StoreError> {
        let rcpt = serde_json::to_string(&alert.envelope.rcpt_to).unwrap_or_else(|_| "[]".into());
        let direct = alert
            .direct
            .as_ref()
            .and_then(|d| serde_json::to_string(d).ok());
        let state = if alert.rejected.is_some() {
            "rejected"
        } else {
            "received"
        };
        self.run(move |c| {
            let inserted = c
                .prepare_cached(
                    "INSERT INTO alerts (received_at, source, peer, mail_from, rcpt_to, raw, direct, dedup_id, state, note)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (source, dedup_id) WHERE dedup_id IS NOT NULL DO NOTHING",
                )?
                .execute(params![
                    now_ms(),
                    alert.source,
                    alert.peer,
                    alert.envelope.mail_from,
                    rcpt,
                    alert.raw,
                    direct,
                    alert.dedup_id,
                    state,
                    alert.rejected
                ])?;
            if inserted == 1 {
                return Ok(Inserted { id: c.last_insert_rowid(), duplicate: false });
            }
            let id = c
                .prepare_cached("SELECT id FROM alerts WHERE source = ?1 AND dedup_id = ?2")?
                .query_row(params![alert.source, alert.dedup_id], |r| r.get(0))?;
            Ok(Inserted { id, duplicate: true })
        })
        .await
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
        self.run(move |c| {
            c.execute("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2", params![key, value])
                .map(|_| ())
        })
        .await
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
    ) -> Result<(String, Option<String>, Option<i64>), StoreError> {
        self.run(move |c| {
            c.query_row(
                "SELECT state, action, incident_id FROM alerts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
        .await
    }

    /// Alerts stored but not yet routed, oldest first.
    pub async fn pending_alerts(&self, limit: usize) -> Result<Vec<PendingAlert>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, source, mail_from, rcpt_to, raw, direct, received_at FROM alerts
                 WHERE state = 'received' ORDER BY id LIMIT ?1",
            )?;
            let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                let rcpt: String = r.get(3)?;
                Ok(PendingAlert {
                    id: r.get(0)?,
                    source: r.get(1)?,
                    envelope: Envelope {
                        mail_from: r.get(2)?,
                        rcpt_to: serde_json::from_str(&rcpt).unwrap_or_default(),
                    },
                    raw: r.get(4)?,
                    direct: r
                        .get::<_, Option<String>>(5)?
                        .and_then(|d| serde_json::from_str(&d).ok()),
                    received_at: r.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Records the routing of a batch of alerts in one transaction, in order. Each is
    /// atomic on its own: deduplication against recent incidents, a new incident with
    /// its calls, and the hourly call budget.
    pub async fn record_routings(
        &self,
        items: Vec<(i64, Decision, NewIncident)>,
        max_calls_per_hour: u32,
    ) -> Result<Vec<Result<Routed, StoreError>>, StoreError> {
        self.run(move |c| {
            let mut results = Vec::with_capacity(items.len());
            for (alert_id, decision, new) in items {
                c.execute_batch("SAVEPOINT item")?;
                let result = record_routing(c, alert_id, &decision, &new, max_calls_per_hour);
                if result.is_ok() {
                    c.execute_batch("RELEASE item")?;
                } else {
                    c.execute_batch("ROLLBACK TO item; RELEASE item")?;
                }
                results.push(result.map_err(StoreError::Sqlite));
            }
            Ok(results)
        })
        .await
    }

    /// Calls decided but not finished: after a restart they are placed (or retried).
    pub async fn unfinished_calls(&self) -> Result<Vec<CallJob>, StoreError> {
        self.run(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.id, c.incident_id, i.rule, c.number, i.twiml, c.created_at, c.attempts, c.status, c.updated_at, i.sms, i.subject
                 FROM calls c JOIN incidents i ON i.id = c.incident_id
                 WHERE c.status IN ('pending', 'sending', 'retrying') ORDER BY c.id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(CallJob {
                    call_id: r.get(0)?,
                    incident_id: r.get(1)?,
                    rule: r.get(2)?,
                    number: r.get(3)?,
                    twiml: r.get(4)?,
                    created_at: r.get(5)?,
                    attempts: r.get(6)?,
                    received_at: None,
                    in_flight_since: (r.get::<_, String>(7)? == "sending").then_some(r.get(8)?),
                    sending_recorded: false,
                    sms: r.get::<_, bool>(9)?.then(|| sms_text(r.get(1).unwrap_or_default(), &r.get::<_, String>(10).unwrap_or_default())),
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Incidents whose current round's time is up.
    pub async fn due_rounds(&self, now: i64) -> Result<Vec<DueRound>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, public_id, round, rounds FROM incidents
                 WHERE next_round_at IS NOT NULL AND next_round_at <= ?1 AND status = 'open' ORDER BY next_round_at",
            )?;
            let rows = stmt.query_map([now], |r| {
                Ok(DueRound {
                    incident_id: r.get(0)?,
                    public_id: r.get(1)?,
                    round: r.get(2)?,
                    rounds: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Closes the incident's current round: `reached` ends the calling; otherwise the
    /// next round calls everyone again (within the budget), or, after the last round,
    /// the incident is marked unanswered.
    pub async fn finish_round(
        &self,
        incident_id: i64,
        reached: bool,
        max_calls_per_hour: u32,
    ) -> Result<RoundEnd, StoreError> {
        self.run(move |c| {
            let now = now_ms();
            let (round, rounds, interval, rule, twiml, sms, subject): (i64, i64, i64, String, String, bool, String) = c.query_row(
                "SELECT round, rounds, round_interval_ms, rule, twiml, sms, subject FROM incidents WHERE id = ?1",
                [incident_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )?;
            let outcome = if reached { "reached: someone is in the bridge" } else { "nobody joined" };
            c.execute("UPDATE rounds SET outcome = ?3 WHERE incident_id = ?1 AND round = ?2", params![incident_id, round, outcome])?;
            if reached || round >= rounds {
                let status = if reached { "reached" } else { "unanswered" };
                c.execute("UPDATE incidents SET status = ?2, next_round_at = NULL WHERE id = ?1", params![incident_id, status])?;
                return Ok(if reached { RoundEnd::Reached { round } } else { RoundEnd::Unanswered { rounds } });
            }
            let next = round + 1;
            // Everyone of the incident again, in the order first called, but those who
            // declined (pressed 9).
            let numbers: Vec<String> = c
                .prepare_cached(
                    "SELECT number FROM calls WHERE incident_id = ?1 GROUP BY number
                     HAVING SUM(answered_by IS 'declined') = 0 ORDER BY MIN(id)",
                )?
                .query_map([incident_id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            c.execute(
                "UPDATE incidents SET round = ?2, next_round_at = ?3 WHERE id = ?1",
                params![incident_id, next, now.saturating_add(interval)],
            )?;
            c.execute("INSERT INTO rounds (incident_id, round, started_at) VALUES (?1, ?2, ?3)", params![incident_id, next, now])?;
            let target = CallTarget { incident_id, rule, twiml, sms: sms.then(|| sms_text(incident_id, &subject)), round: next };
            let (calls, refused) = insert_calls(c, &target, &numbers, now, max_calls_per_hour)?;
            Ok(RoundEnd::NextRound { round: next, calls, refused })
        })
        .await
    }

    /// Placed calls of open incidents' current rounds whose answerer is not known yet,
    /// placed since `since` (Unix milliseconds).
    pub async fn calls_to_check(&self, since: i64) -> Result<Vec<CallToCheck>, StoreError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.id, c.incident_id, c.sid, c.number, i.message, i.language, i.voice
                 FROM calls c JOIN incidents i ON i.id = c.incident_id
                 WHERE i.status = 'open' AND c.round = i.round AND c.status = 'placed'
                   AND c.answered_by IS NULL AND c.created_at > ?1",
            )?;
            let rows = stmt.query_map([since], |r| {
                Ok(CallToCheck {
                    call_id: r.get(0)?,
                    incident_id: r.get(1)?,
                    sid: r.get(2)?,
                    number: r.get(3)?,
                    message: r.get(4)?,
                    language: r.get(5)?,
                    voice: r.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The call Twilio knows as `sid`: `(call id, incident id, number)`.
    pub async fn call_by_sid(&self, sid: &str) -> Result<Option<(i64, i64, String)>, StoreError> {
        let sid = sid.to_string();
        self.run(move |c| {
            c.prepare_cached("SELECT id, incident_id, number FROM calls WHERE sid = ?1")?
                .query_row([sid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .await
    }

    /// An incident by its public id (the room name): `(id, status)`.
    pub async fn incident_by_public_id(
        &self,
        public_id: &str,
    ) -> Result<Option<(i64, String)>, StoreError> {
        let public_id = public_id.to_string();
        self.run(move |c| {
            c.prepare_cached("SELECT id, status FROM incidents WHERE public_id = ?1")?
                .query_row([public_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .await
    }

    /// The newest incident still open or reached, for dial-in: `(id, public id)`.
    pub async fn newest_open_incident(&self) -> Result<Option<(i64, String)>, StoreError> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT id, public_id FROM incidents WHERE status IN ('open', 'reached') ORDER BY opened_at DESC, id DESC LIMIT 1",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })
        .await
    }

    /// Someone is in the bridge (a join callback): the incident is reached, no more rounds.
    pub async fn mark_reached(&self, incident_id: i64) -> Result<bool, StoreError> {
        self.run(move |c| {
            let changed = c.execute(
                "UPDATE incidents SET status = 'reached', next_round_at = NULL WHERE id = ?1 AND status = 'open'",
                [incident_id],
            )?;
            if changed == 1 {
                c.execute(
                    "UPDATE rounds SET outcome = 'reached: someone is in the bridge' WHERE incident_id = ?1 AND outcome IS NULL",
                    [incident_id],
                )?;
            }
            Ok(changed == 1)
        })
        .await
    }

    /// Adds a Twilio callback's news to a call's history (`outcome` such as
    /// `status:completed`, `pressed 1`, `declined`).
    pub async fn call_event(&self, call_id: i64, outcome: String) -> Result<(), StoreError> {
        self.run(move |c| {
            c.prepare_cached(
                "INSERT INTO call_attempts (call_id, at, outcome) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![call_id, now_ms(), outcome])
            .map(|_| ())
        })
        .await
    }

    /// Records who (or what) answered a call, as Twilio's `answered_by` says.
    pub async fn set_answered_by(
        &self,
        call_id: i64,
        answered_by: String,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute(
                "UPDATE calls SET answered_by = ?2 WHERE id = ?1",
                params![call_id, answered_by],
            )
            .map(|_| ())
        })
        .await
    }

    /// Records the SMS summary sent (or not) for a call, in its attempt history.
    pub async fn record_sms(
        &self,
        call_id: i64,
        result: Result<String, String>,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            let (outcome, sid, error) = match result {
                Ok(sid) => ("sms", Some(sid), None),
                Err(e) => ("sms-failed", None, Some(e)),
            };
            c.prepare_cached("INSERT INTO call_attempts (call_id, at, outcome, error, sid) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![call_id, now_ms(), outcome, error, sid])
                .map(|_| ())
        })
        .await
    }

    /// Every Twilio call SID the store knows, so a call found at Twilio can be told to
    /// be ours-and-recorded or ours-and-lost.
    pub async fn known_sids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        self.run(|c| {
            let mut stmt = c.prepare_cached("SELECT sid FROM calls WHERE sid IS NOT NULL")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    /// Records a change of a call's status.
    pub async fn update_call(&self, call_id: i64, update: CallUpdate) -> Result<(), StoreError> {
        self.run(move |c| {
            let now = now_ms();
            match &update {
                CallUpdate::Sending => c
                    .prepare_cached("UPDATE calls SET status = 'sending', attempts = attempts + 1, updated_at = ?2 WHERE id = ?1")?
                    .execute(params![call_id, now])?,
                CallUpdate::Placed { sid, dry_run } => c
                    .prepare_cached("UPDATE calls SET status = ?3, sid = ?2, error = NULL, updated_at = ?4 WHERE id = ?1")?
                    .execute(params![call_id, sid, if *dry_run { "dry-run" } else { "placed" }, now])?,
                CallUpdate::Retrying { error } => c
                    .prepare_cached("UPDATE calls SET status = 'retrying', error = ?2, updated_at = ?3 WHERE id = ?1")?
                    .execute(params![call_id, error, now])?,
                CallUpdate::Failed { code, error } => c
                    .prepare_cached("UPDATE calls SET status = 'failed', error_code = ?2, error = ?3, updated_at = ?4 WHERE id = ?1")?
                    .execute(params![call_id, code, error, now])?,
            };
            let (outcome, code, error, sid) = match &update {
                CallUpdate::Sending => return Ok(()),
                CallUpdate::Placed { sid, dry_run } => (if *dry_run { "dry-run" } else { "placed" }, None, None, Some(sid)),
                CallUpdate::Retrying { error } => ("retry", None, Some(error), None),
                CallUpdate::Failed { code, error } => ("failed", *code, Some(error), None),
            };
            c.prepare_cached(
                "INSERT INTO call_attempts (call_id, at, outcome, error_code, error, sid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![call_id, now, outcome, code, error, sid])?;
            Ok(())
        })
        .await
    }

    /// Recent incidents, newest first, from a read-only connection: works while a
    /// daemon has the store open.
    pub fn incidents(path: &Path, limit: usize) -> Result<Vec<IncidentReport>, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let c = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        c.busy_timeout(Duration::from_secs(5))?;
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        if version == 0 {
            return Ok(Vec::new());
        }
        Ok(reports(
            &c,
            "ORDER BY id DESC LIMIT ?1",
            i64::try_from(limit).unwrap_or(i64::MAX),
        )?)
    }

    /// One incident, through the store's own connection.
    pub async fn incident(&self, id: i64) -> Result<Option<IncidentReport>, StoreError> {
        self.run(move |c| Ok(reports(c, "WHERE id = ?1", id)?.pop()))
            .await
    }
}

/// A change of a call's status, as the dispatcher reports it.
#[derive(Debug, Clone)]
pub enum CallUpdate {
    /// A request to Twilio is about to be sent.
    Sending,
    Placed {
        sid: String,
        dry_run: bool,
    },
    Retrying {
        error: String,
    },
    Failed {
        code: Option<i64>,
        error: String,
    },
}

/// Formats Unix milliseconds as RFC 3339 (UTC, seconds).
pub fn rfc3339(unix_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What the calls of one round share.
struct CallTarget {
    incident_id: i64,
    rule: String,
    twiml: String,
    sms: Option<String>,
    round: i64,
}

/// Inserts a round's calls, recorded as being sent right away (the dispatcher sends the
/// first request as soon as this commits), within the hourly budget; the numbers beyond
/// it are recorded as refused. Returns the calls to place and the refused numbers.
fn insert_calls(
    c: &Connection,
    target: &CallTarget,
    numbers: &[String],
    now: i64,
    max_calls_per_hour: u32,
) -> rusqlite::Result<(Vec<CallJob>, Vec<String>)> {
    // The budget window is the current minute and the 60 before it.
    let minute = now.div_euclid(60_000);
    let mut used: i64 = c
        .prepare_cached("SELECT COALESCE(SUM(calls), 0) FROM call_budget WHERE minute >= ?1")?
        .query_row([minute - 60], |r| r.get(0))?;
    let used_before = used;
    let (mut calls, mut refused) = (Vec::new(), Vec::new());
    for number in numbers {
        let within = used < i64::from(max_calls_per_hour);
        let (status, error) = if within {
            used += 1;
            ("sending", None)
        } else {
            (
                "refused",
                Some(format!(
                    "over the call budget of {max_calls_per_hour} calls per hour"
                )),
            )
        };
        c.prepare_cached(
            "INSERT INTO calls (incident_id, number, created_at, status, error, updated_at, attempts, round)
             VALUES (?1, ?2, ?3, ?4, ?5, ?3, ?6, ?7)",
        )?
        .execute(params![target.incident_id, number, now, status, error, i64::from(within), target.round])?;
        if within {
            calls.push(CallJob {
                call_id: c.last_insert_rowid(),
                incident_id: target.incident_id,
                rule: target.rule.clone(),
                number: number.clone(),
                twiml: target.twiml.clone(),
                created_at: now,
                attempts: 1,
                received_at: None,
                in_flight_since: None,
                sending_recorded: true,
                sms: target.sms.clone(),
            });
        } else {
            refused.push(number.clone());
        }
    }
    if used > used_before {
        c.prepare_cached(
            "INSERT INTO call_budget (minute, calls) VALUES (?1, ?2)
             ON CONFLICT (minute) DO UPDATE SET calls = calls + excluded.calls",
        )?
        .execute(params![minute, used - used_before])?;
        c.prepare_cached("DELETE FROM call_budget WHERE minute < ?1")?
            .execute([minute - 120])?;
    }
    Ok((calls, refused))
}

/// Incident reports with their calls and attempts; `filter` follows `FROM incidents`
/// and takes one parameter.
fn reports(c: &Connection, filter: &str, param: i64) -> rusqlite::Result<Vec<IncidentReport>> {
    let mut stmt = c.prepare(&format!(
        "SELECT id, public_id, opened_at, rule, dedup_key, alert_count, status FROM incidents {filter}"
    ))?;
    let mut incidents = stmt
        .query_map([param], |r| {
            let opened: i64 = r.get(2)?;
            Ok(IncidentReport {
                id: r.get(0)?,
                public_id: r.get(1)?,
                opened_at: rfc3339(opened),
                rule: r.get(3)?,
                dedup_key: r.get(4)?,
                alert_count: r.get(5)?,
                status: r.get(6)?,
                rounds: Vec::new(),
                calls: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut calls = c.prepare(
            "SELECT number, status, sid, error_code, error, attempts, id, round, answered_by FROM calls WHERE incident_id = ?1 ORDER BY id",
        )?;
    let mut rounds = c.prepare(
        "SELECT round, started_at, outcome FROM rounds WHERE incident_id = ?1 ORDER BY round",
    )?;
    for incident in &mut incidents {
        incident.rounds = rounds
            .query_map([incident.id], |r| {
                Ok(RoundReport {
                    round: r.get(0)?,
                    started_at: rfc3339(r.get(1)?),
                    outcome: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
    }
    let mut attempts = c.prepare(
            "SELECT at, outcome, error_code, error, sid FROM call_attempts WHERE call_id = ?1 ORDER BY id",
        )?;
    for incident in &mut incidents {
        incident.calls = calls
            .query_map([incident.id], |r| {
                Ok(CallReport {
                    number: r.get(0)?,
                    status: r.get(1)?,
                    sid: r.get(2)?,
                    error_code: r.get(3)?,
                    error: r.get(4)?,
                    attempts: r.get(5)?,
                    round: r.get(7)?,
                    answered_by: r.get(8)?,
                    history: Vec::new(),
                })
                .map(|report| (report, r.get::<_, i64>(6)))
            })?
            .map(|row| {
                let (mut report, id) = row?;
                report.history = attempts
                    .query_map([id?], |r| {
                        Ok(AttemptReport {
                            at: rfc3339(r.get(0)?),
                            outcome: r.get(1)?,
                            error_code: r.get(2)?,
                            error: r.get(3)?,
                            sid: r.get(4)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(report)
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
    }
    Ok(incidents)
}

fn record_routing(
    c: &Connection,
    alert_id: i64,
    decision: &Decision,
    new: &NewIncident,
    max_calls_per_hour: u32,
) -> rusqlite::Result<Routed> {
    let now = now_ms();
    let mark = |action: &str, incident_id: Option<i64>| {
        c.prepare_cached(
            "UPDATE alerts SET state = 'routed', rule = ?2, action = ?3, incident_id = ?4 WHERE id = ?1",
        )?
        .execute(params![alert_id, decision.rule, action, incident_id])
    };
    if decision.action == Action::Resolve {
        let open: Option<(i64, String)> = c
            .prepare_cached(
                "SELECT id, public_id FROM incidents WHERE dedup_key = ?1 AND status IN ('open', 'reached')
                 ORDER BY opened_at DESC LIMIT 1",
            )?
            .query_row([&decision.dedup_key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((incident_id, public_id)) = open else {
            mark("resolve", None)?;
            return Ok(Routed::NotCalled);
        };
        c.prepare_cached("UPDATE incidents SET status = 'resolved', next_round_at = NULL, last_alert_at = ?2 WHERE id = ?1")?
            .execute(params![incident_id, now])?;
        c.prepare_cached(
            "UPDATE rounds SET outcome = 'resolved' WHERE incident_id = ?1 AND outcome IS NULL",
        )?
        .execute([incident_id])?;
        mark("resolve", Some(incident_id))?;
        return Ok(Routed::Resolved {
            incident_id,
            public_id,
        });
    }
    if decision.action != Action::Call {
        mark(decision.action.as_str(), None)?;
        return Ok(Routed::NotCalled);
    }
    if !decision.cooldown.is_zero() {
        let open: Option<i64> = c
            .prepare_cached(
                "SELECT id FROM incidents WHERE dedup_key = ?1 AND opened_at > ?2
                 ORDER BY opened_at DESC LIMIT 1",
            )?
            .query_row(
                params![decision.dedup_key, now - ms(decision.cooldown)],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(incident_id) = open {
            let alert_count: i64 = c
                .prepare_cached(
                    "UPDATE incidents SET alert_count = alert_count + 1, last_alert_at = ?2
                     WHERE id = ?1 RETURNING alert_count",
                )?
                .query_row(params![incident_id, now], |r| r.get(0))?;
            mark("deduplicated", Some(incident_id))?;
            return Ok(Routed::Deduplicated {
                incident_id,
                alert_count,
            });
        }
    }
    c.prepare_cached(
        "INSERT INTO incidents (public_id, opened_at, rule, dedup_key, message, language, voice, twiml, last_alert_at, subject, sms,
                                rounds, round_interval_ms, next_round_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?2, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        new.public_id,
        now,
        decision.rule,
        decision.dedup_key,
        decision.message,
        decision.language,
        decision.voice,
        new.twiml,
        decision.subject,
        decision.sms,
        decision.rounds,
        ms(decision.round_interval),
        now.saturating_add(ms(decision.round_interval))
    ])?;
    let incident_id = c.last_insert_rowid();
    c.prepare_cached("INSERT INTO rounds (incident_id, round, started_at) VALUES (?1, 1, ?2)")?
        .execute(params![incident_id, now])?;
    let target = CallTarget {
        incident_id,
        rule: decision.rule.clone().unwrap_or_default(),
        twiml: new.twiml.clone(),
        sms: decision
            .sms
            .then(|| sms_text(incident_id, &decision.subject)),
        round: 1,
    };
    let (calls, refused) = insert_calls(c, &target, &decision.numbers, now, max_calls_per_hour)?;
    mark("call", Some(incident_id))?;
    Ok(Routed::Opened {
        incident_id,
        calls,
        refused,
    })
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The checkpoint thread: a passive checkpoint twice a second (it never blocks the
/// writer), until the writer thread has stopped.
fn checkpoint(conn: &Connection, running: &AtomicBool) {
    while running.load(Ordering::Relaxed) {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; will try again");
        }
    }
}

/// The writer thread: batches queued jobs into one transaction each.
fn writer(conn: Connection, queue: mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let reason = e.to_string();
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
        let committed = conn.execute_batch("COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            e.to_string()
        });
        for done in completions {
            done(committed.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(key: &str, numbers: &[&str], cooldown: Duration) -> Decision {
        Decision {
            rule: Some("r".into()),
            action: Action::Call,
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
            message: "m".into(),
            language: "en-US".into(),
            voice: "Polly.Joanna".into(),
            dedup_key: key.into(),
            cooldown,
            sms: false,
            subject: "s".into(),
            rounds: 1,
            round_interval: Duration::from_secs(60),
        }
    }

    fn incident(id: &str) -> NewIncident {
        NewIncident {
            public_id: id.into(),
            twiml: "<Response/>".into(),
        }
    }

    async fn alert(store: &Store) -> i64 {
        store
            .insert_alert(NewAlert {
                source: "test",
                raw: b"Subject: x\r\n\r\n".to_vec(),
                ..NewAlert::default()
            })
            .await
            .unwrap()
            .id
    }

    #[tokio::test]
    async fn a_version_1_store_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO alerts (received_at, source, rcpt_to, raw) VALUES (1, 'smtp', '[]', x'00')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path, None).unwrap();
        let pending = store.pending_alerts(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        let version: i64 = store
            .run(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let attempts: i64 = store
            .run(|c| c.query_row("SELECT COUNT(*) FROM call_attempts", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(attempts, 0);
    }

    #[test]
    fn only_one_daemon_may_hold_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let first = DaemonLock::acquire(&path).unwrap();
        let err = DaemonLock::acquire(&path).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DaemonLock::acquire(&path).unwrap();
    }

    #[tokio::test]
    async fn a_store_from_a_newer_mailcall_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path, None).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
        assert!(err.to_string().contains("new.db"));
    }

    #[tokio::test]
    async fn concurrent_writes_are_committed_together_and_each_gets_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), None).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { alert(&store).await })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 200);
        // A failing job rolls back only itself.
        let bad = store.run(|c| c.execute("INSERT INTO nowhere VALUES (1)", []));
        let good = alert(&store);
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        assert!(good > 0);
        assert_eq!(store.pending_alerts(1000).await.unwrap().len(), 201);
    }

    #[tokio::test]
    async fn the_same_delivery_is_stored_once_and_rejections_are_never_routed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), None).unwrap();
        let delivery = |id: &str| NewAlert {
            source: "sendgrid",
            raw: b"Subject: x\r\n\r\n".to_vec(),
            dedup_id: Some(id.into()),
            ..NewAlert::default()
        };
        let first = store.insert_alert(delivery("<a@b>")).await.unwrap();
        let again = store.insert_alert(delivery("<a@b>")).await.unwrap();
        let other = store.insert_alert(delivery("<c@d>")).await.unwrap();
        assert_eq!(
            again,
            Inserted {
                id: first.id,
                duplicate: true
            }
        );
        assert!(!first.duplicate && !other.duplicate && other.id != first.id);
        let rejected = NewAlert {
            rejected: Some("SPF fail".into()),
            ..delivery("<e@f>")
        };
        store.insert_alert(rejected).await.unwrap();
        assert_eq!(store.pending_alerts(10).await.unwrap().len(), 2);
        store.check_writable().await.unwrap();
    }

    #[tokio::test]
    async fn routing_deduplicates_within_the_cooldown_and_enforces_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), None).unwrap();
        let hour = Duration::from_secs(3600);
        let mut items = Vec::new();
        for i in 0..3 {
            let id = alert(&store).await;
            items.push((
                id,
                decision("k", &["+1555", "+1666"], hour),
                incident(&format!("p{i}")),
            ));
        }
        let id = alert(&store).await;
        items.push((
            id,
            decision("other", &["+1777", "+1888"], hour),
            incident("q"),
        ));
        let results = store.record_routings(items, 3).await.unwrap();
        let results: Vec<Routed> = results.into_iter().map(Result::unwrap).collect();
        let Routed::Opened {
            incident_id,
            calls,
            refused,
        } = &results[0]
        else {
            panic!("{results:?}")
        };
        assert_eq!((calls.len(), refused.len()), (2, 0));
        assert_eq!(
            results[1],
            Routed::Deduplicated {
                incident_id: *incident_id,
                alert_count: 2
            }
        );
        assert_eq!(
            results[2],
            Routed::Deduplicated {
                incident_id: *incident_id,
                alert_count: 3
            }
        );
        let Routed::Opened { calls, refused, .. } = &results[3] else {
            panic!("{results:?}")
        };
        assert_eq!(calls.len(), 1, "one call left in the budget of 3");
        assert_eq!(refused, &["+1888".to_string()]);
        assert!(store.pending_alerts(10).await.unwrap().is_empty());

        // Cooldown zero: always a new incident.
        let id = alert(&store).await;
        let r = store
            .record_routings(
                vec![(id, decision("k", &[], Duration::ZERO), incident("z"))],
                100,
            )
            .await
            .unwrap();
        assert!(matches!(r[0], Ok(Routed::Opened { .. })));
    }
}
