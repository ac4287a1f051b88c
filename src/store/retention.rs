//! What the store forgets, so that it stays small for a year on a small VM: closed
//! incidents (resolved, unanswered, silenced, or bridged with no alert for the retention
//! period) and alerts no incident holds, once older than `[state] retain`, each with
//! everything that hangs off it (alerts and raw mail, calls, attempts, events, rounds,
//! escalation steps); and silences and overrides that ended longer ago than that. Deletion
//! goes in small batches, each its own short transaction, so it never holds up ingest.
//!
//! Under `[state] max_bytes` the oldest closed data goes first, whatever its age — inside
//! the transaction of the alert that needs the room — and new mail is refused only while
//! open data alone fills the store. Nothing a daemon needs to finish an accepted alert is
//! ever deleted, and its own writes are never refused.

use rusqlite::{Connection, params};

use super::{Store, StoreError};

/// Rows' overhead besides the raw mail, when judging whether an alert fits.
const ROW_OVERHEAD: u64 = 4096;
/// Mails up to this size may use the last of the room; bigger ones leave [`reserve`]
/// free, so that when big mails fill the store, a recovery (which is small) still gets
/// in and closes the incidents that fill it.
const SMALL_MAIL: u64 = 64 * 1024;

/// The room a big mail must leave free under `max`.
fn reserve(max: u64) -> u64 {
    (max / 10).min(1024 * 1024)
}

/// What one pass of the pruner deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub incidents: usize,
    pub alerts: usize,
    /// Silences and overrides that ended before the retention period.
    pub silences: usize,
    pub overrides: usize,
    /// An incident was only partly deleted (its alerts are many, or big): the next
    /// transaction goes on with it.
    pub partial: bool,
}

impl Pruned {
    /// Something was deleted, or is being: look again at once.
    pub fn any(&self) -> bool {
        self.partial || self.incidents + self.alerts + self.silences + self.overrides > 0
    }

    fn add(&mut self, other: Pruned) {
        self.incidents += other.incidents;
        self.alerts += other.alerts;
        self.silences += other.silences;
        self.overrides += other.overrides;
        self.partial |= other.partial;
    }
}

/// How full the store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of the database file holding data (free pages excluded).
    pub used_bytes: u64,
    /// `[state] max_bytes`.
    pub max_bytes: Option<u64>,
    /// New mail is being refused: open data alone fills `max_bytes`.
    pub full: bool,
}

impl Store {
    /// Deletes up to `batch` closed incidents (and alerts no incident holds) that ended
    /// before `before` (Unix ms), oldest first; under `max_bytes`, while the store is
    /// above nine tenths of it, the oldest closed ones whatever their age.
    pub async fn prune(&self, before: i64, batch: usize) -> Result<Pruned, StoreError> {
        let max_bytes = self.capacity.max_bytes;
        self.run(move |c| {
            let mut pruned = prune_closed(c, before, batch, false)?;
            if let Some(max) = max_bytes
                && !pruned.any()
                && data_bytes(c)? > max / 10 * 9
            {
                pruned.add(prune_closed(c, i64::MAX, batch, true)?);
            }
            Ok(pruned)
        })
        .await
    }

    /// Looks again whether the mail last refused would fit now (making room, as for an
    /// alert): a store that was full stops saying so once the incidents that filled it
    /// have ended, even before the next mail arrives.
    pub async fn recheck_full(&self) -> Result<bool, StoreError> {
        let capacity = std::sync::Arc::clone(&self.capacity);
        self.run(move |c| {
            let Some(max) = capacity.max_bytes else {
                return Ok(false);
            };
            let need = capacity
                .refused_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            let full = !make_room(c, max, need)?;
            capacity
                .full
                .store(full, std::sync::atomic::Ordering::Relaxed);
            Ok(full)
        })
        .await
    }

    /// How full the store is.
    pub async fn usage(&self) -> Result<Usage, StoreError> {
        let capacity = std::sync::Arc::clone(&self.capacity);
        self.run(move |c| {
            Ok(Usage {
                used_bytes: data_bytes(c)?,
                max_bytes: capacity.max_bytes,
                full: capacity.is_full(),
            })
        })
        .await
    }
}

/// The room a mail of `bytes` takes under `max`: itself, its rows, and for a big one
/// the reserve it must leave free.
fn room_for(max: u64, bytes: u64) -> u64 {
    bytes
        .saturating_add(ROW_OVERHEAD)
        .saturating_add(if bytes > SMALL_MAIL { reserve(max) } else { 0 })
}

/// Would a mail of `bytes` not fit under `max` even in an empty store (every table and
/// index at its one page)? Then deferring it (`452`) would only make the sender retry
/// for days: it is refused for good.
pub(super) fn never_fits(c: &Connection, max: u64, bytes: u64) -> rusqlite::Result<bool> {
    let trees: i64 = c.query_row(
        "SELECT COUNT(*) FROM sqlite_schema WHERE type IN ('table', 'index')",
        [],
        |r| r.get(0),
    )?;
    let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    // One page per b-tree, and the database header's.
    let empty = u64::try_from((trees + 1) * page).unwrap_or(0);
    Ok(empty.saturating_add(room_for(max, bytes)) > max)
}

/// Makes room for `need` bytes under `max`, deleting the oldest closed data a little at
/// a time; false when open data alone leaves no room.
pub(super) fn make_room(c: &Connection, max: u64, need: u64) -> rusqlite::Result<bool> {
    let need = room_for(max, need);
    // Deletes until the mail fits or nothing closed is left, within a time budget: the
    // alert waits, and so does every commit behind it. Past the budget the mail is
    // deferred (the sender retries) and the pruner goes on deleting in the background.
    let started = std::time::Instant::now();
    while started.elapsed() < MAKE_ROOM_FOR {
        if data_bytes(c)?.saturating_add(need) <= max {
            return Ok(true);
        }
        if !prune_closed(c, i64::MAX, 64, true)?.any() {
            return Ok(false);
        }
    }
    Ok(data_bytes(c)?.saturating_add(need) <= max)
}

/// How long one alert's transaction may spend deleting closed data to make room.
const MAKE_ROOM_FOR: std::time::Duration = std::time::Duration::from_millis(250);

/// Bytes of the database holding data: pages in use (free pages are reused first).
fn data_bytes(c: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(u64::try_from((pages - free).max(0) * size).unwrap_or(0))
}

/// Deletes up to `batch` incidents closed before `before`, and up to `batch` alerts no
/// incident holds, received before it; oldest first. Bridged incidents silent since
/// before `before` count as closed, but never under `pressure` (they may be live).
fn prune_closed(
    c: &Connection,
    before: i64,
    batch: usize,
    pressure: bool,
) -> rusqlite::Result<Pruned> {
    let limit = i64::try_from(batch).unwrap_or(i64::MAX);
    // Never an incident with a call still to be placed or settled: that call would be
    // lost (a round's retry outliving the incident's end, a canary still queued).
    let mut incidents: Vec<i64> = c
        .prepare_cached(
            "SELECT id FROM incidents i WHERE closed_at IS NOT NULL AND closed_at < ?1
               AND NOT EXISTS (SELECT 1 FROM calls c WHERE c.incident_id = i.id
                               AND c.state IN ('queued', 'requesting', 'unknown', 'retrying'))
             ORDER BY closed_at LIMIT ?2",
        )?
        .query_map(params![before, limit], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    // A bridged incident no recovery ever closed (cron, smartd and the like never send
    // one): over once nothing came for as long as `retain` — or, when the store is full,
    // once its bridge is over (no call of it is still live or under way).
    let silent_since = if pressure { i64::MAX } else { before };
    incidents.extend(
        c.prepare_cached(
            "SELECT id FROM incidents i WHERE status = 'bridged' AND last_alert_at < ?1
               AND NOT EXISTS (SELECT 1 FROM calls c WHERE c.incident_id = i.id
                               AND (c.state IN ('queued', 'requesting', 'unknown', 'retrying')
                                    OR c.twilio_status IN ('queued', 'initiated', 'ringing', 'in-progress')))
             ORDER BY last_alert_at LIMIT ?2",
        )?
        .query_map(params![silent_since, limit], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?,
    );
    incidents.truncate(batch);
    let mut work = Work::default();
    let mut deleted = 0;
    for id in &incidents {
        if !delete_incident(c, *id, &mut work)? {
            break;
        }
        deleted += 1;
    }
    // Alerts no incident holds (dropped, rejected, beats), within what is left of the
    // transaction's work.
    let unattached: Vec<(i64, u64)> = c
        .prepare_cached(
            "SELECT id, length(raw) FROM alerts WHERE incident_id IS NULL AND state != 'received'
               AND received_at < ?1 ORDER BY received_at LIMIT ?2",
        )?
        .query_map(params![before, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let alerts = delete_alerts(c, &unattached, &mut work)?;
    // Silences and overrides only grow: those that ended before `before` go too (not
    // under `pressure`, which is about open data: they are a few bytes each).
    let (silences, overrides) = if pressure {
        (0, 0)
    } else {
        (
            c.prepare_cached(
                "DELETE FROM silences WHERE id IN (
                     SELECT id FROM silences WHERE ends_at < ?1 ORDER BY ends_at LIMIT ?2)",
            )?
            .execute(params![before, limit])?,
            c.prepare_cached(
                "DELETE FROM overrides WHERE id IN (
                     SELECT id FROM overrides WHERE until_at < ?1 ORDER BY until_at LIMIT ?2)",
            )?
            .execute(params![before, limit])?,
        )
    };
    Ok(Pruned {
        incidents: deleted,
        alerts,
        silences,
        overrides,
        partial: deleted < incidents.len(),
    })
}

/// What one transaction of retention may delete: it runs on the store's one writer,
/// and every commit — every `250` — waits behind it. An alert storm joined to one
/// incident is 100,000 rows, a few big mails are megabytes of pages to free.
#[derive(Debug)]
struct Work {
    rows: usize,
    bytes: u64,
    /// Nothing was deleted yet: the first item goes whatever its size, so that one
    /// mail bigger than the whole budget is deleted too.
    fresh: bool,
}

impl Default for Work {
    fn default() -> Work {
        Work {
            rows: 2_000,
            bytes: 8 * 1024 * 1024,
            fresh: true,
        }
    }
}

impl Work {
    /// Takes one row of `bytes`; false when the budget has no room left for it.
    fn take(&mut self, bytes: u64) -> bool {
        if !self.fresh && (self.rows == 0 || bytes > self.bytes) {
            return false;
        }
        self.fresh = false;
        self.rows = self.rows.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
        true
    }
}

/// Deletes the alerts `(id, raw length)` in order while `work` lasts; how many.
fn delete_alerts(
    c: &Connection,
    alerts: &[(i64, u64)],
    work: &mut Work,
) -> rusqlite::Result<usize> {
    let mut deleted = 0;
    for (id, bytes) in alerts {
        if !work.take(*bytes) {
            break;
        }
        c.prepare_cached("DELETE FROM alerts WHERE id = ?1")?
            .execute([id])?;
        deleted += 1;
    }
    Ok(deleted)
}

/// Deletes an incident and everything that hangs off it, its alerts first and only as
/// many as `work` allows: false when some are left for the next transaction.
fn delete_incident(c: &Connection, id: i64, work: &mut Work) -> rusqlite::Result<bool> {
    loop {
        let alerts: Vec<(i64, u64)> = c
            .prepare_cached("SELECT id, length(raw) FROM alerts WHERE incident_id = ?1 LIMIT 100")?
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if alerts.is_empty() {
            break;
        }
        if delete_alerts(c, &alerts, work)? < alerts.len() {
            return Ok(false);
        }
    }
    for sql in [
        "DELETE FROM call_events WHERE call_id IN (SELECT id FROM calls WHERE incident_id = ?1)",
        "DELETE FROM attempts WHERE call_id IN (SELECT id FROM calls WHERE incident_id = ?1)",
        "DELETE FROM calls WHERE incident_id = ?1",
        "DELETE FROM rounds WHERE incident_id = ?1",
        "DELETE FROM escalations WHERE incident_id = ?1",
        "DELETE FROM incidents WHERE id = ?1",
    ] {
        c.prepare_cached(sql)?.execute([id])?;
    }
    Ok(true)
}
