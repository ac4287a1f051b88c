//! The schema: migrations applied in order on open, `PRAGMA user_version` counting
//! those applied. A migration never changes after it shipped; later ones rebuild what
//! must change (SQLite cannot add a `CHECK` to an existing table).

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// Schema migrations; `PRAGMA user_version` is the number applied.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 7: typed states mirrored by CHECKs (see `states.rs`); every request to Twilio as an
    // attempt of its own, whose SID no other attempt may own; dry-run and canary as
    // properties of the incident. SQLite cannot add a CHECK to a table, so the tables
    // are rebuilt (foreign keys are off while migrating). Ids are AUTOINCREMENT: they go
    // out (an attempt's id in its status callback URL, `alert N`, `incident #N`), so a
    // pruned row's id must never come back as another's.
    "CREATE TABLE alerts_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        peer TEXT,
        mail_from TEXT,
        rcpt_to TEXT NOT NULL,
        raw BLOB NOT NULL,
        direct TEXT,
        dedup_id TEXT,
        dry_run INTEGER NOT NULL DEFAULT 0 CHECK (dry_run IN (0, 1)),
        state TEXT NOT NULL DEFAULT 'received' CHECK (state IN ('received', 'routed', 'rejected')),
        note TEXT,
        rule TEXT,
        action TEXT,
        incident_id INTEGER REFERENCES incidents(id)
    );
    INSERT INTO alerts_new (id, received_at, source, peer, mail_from, rcpt_to, raw, direct, dedup_id, state, note, rule, action, incident_id)
        SELECT id, received_at, source, peer, mail_from, rcpt_to, raw, direct, dedup_id, state, note, rule, action, incident_id FROM alerts;
    DROP TABLE alerts;
    ALTER TABLE alerts_new RENAME TO alerts;
    CREATE INDEX alerts_received ON alerts(id) WHERE state = 'received';
    CREATE UNIQUE INDEX alerts_dedup_id ON alerts(source, dedup_id) WHERE dedup_id IS NOT NULL;
    CREATE INDEX alerts_incident ON alerts(incident_id) WHERE incident_id IS NOT NULL;

    CREATE TABLE incidents_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        public_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL DEFAULT 'alert' CHECK (kind IN ('alert', 'canary')),
        dry_run INTEGER NOT NULL DEFAULT 0 CHECK (dry_run IN (0, 1)),
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'bridged', 'unanswered', 'resolved')),
        opened_at INTEGER NOT NULL,
        first_received_at INTEGER,
        closed_at INTEGER,
        rule TEXT NOT NULL,
        dedup_key TEXT NOT NULL,
        message TEXT NOT NULL,
        language TEXT NOT NULL,
        voice TEXT NOT NULL,
        twiml TEXT NOT NULL,
        subject TEXT NOT NULL DEFAULT '',
        sms INTEGER NOT NULL DEFAULT 0,
        alert_count INTEGER NOT NULL DEFAULT 1,
        last_alert_at INTEGER NOT NULL,
        round INTEGER NOT NULL DEFAULT 1,
        rounds INTEGER NOT NULL DEFAULT 1,
        round_interval_ms INTEGER NOT NULL DEFAULT 0,
        next_round_at INTEGER,
        CHECK (next_round_at IS NULL OR status = 'open'),
        CHECK ((closed_at IS NULL) = (status IN ('open', 'bridged')))
    );
    INSERT INTO incidents_new (id, public_id, kind, dry_run, status, opened_at, closed_at, rule, dedup_key, message,
                               language, voice, twiml, subject, sms, alert_count, last_alert_at, round, rounds,
                               round_interval_ms, next_round_at)
        SELECT id, public_id,
            CASE WHEN rule = 'canary' THEN 'canary' ELSE 'alert' END,
            EXISTS (SELECT 1 FROM calls c WHERE c.incident_id = incidents.id AND c.status = 'dry-run'),
            CASE WHEN rule = 'canary' THEN 'resolved' WHEN status = 'reached' THEN 'bridged' ELSE status END,
            opened_at,
            CASE WHEN rule != 'canary' AND status IN ('open', 'reached') THEN NULL ELSE last_alert_at END,
            rule, dedup_key, message, language, voice, twiml, subject, sms, alert_count, last_alert_at,
            round, rounds, round_interval_ms,
            CASE WHEN rule != 'canary' AND status = 'open' THEN next_round_at END
        FROM incidents;
    DROP TABLE incidents;
    ALTER TABLE incidents_new RENAME TO incidents;
    CREATE INDEX incidents_key ON incidents(dedup_key, opened_at) WHERE status IN ('open', 'bridged');
    CREATE INDEX incidents_live ON incidents(opened_at) WHERE status IN ('open', 'bridged');
    CREATE INDEX incidents_next_round ON incidents(next_round_at) WHERE next_round_at IS NOT NULL;

    CREATE TABLE calls_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        incident_id INTEGER NOT NULL REFERENCES incidents(id),
        round INTEGER NOT NULL DEFAULT 1,
        number TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'requesting', 'unknown', 'retrying', 'placed', 'failed',
                                             'refused', 'skipped', 'canceled', 'dry-run')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        next_attempt_at INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        sid TEXT,
        error_code INTEGER,
        error TEXT,
        answered_by TEXT,
        twilio_status TEXT CHECK (twilio_status IS NULL OR twilio_status IN ('queued', 'initiated', 'ringing',
            'in-progress', 'completed', 'busy', 'failed', 'no-answer', 'canceled')),
        CHECK ((next_attempt_at IS NOT NULL) = (state IN ('queued', 'retrying')))
    );
    INSERT INTO calls_new (id, incident_id, round, number, state, created_at, updated_at, next_attempt_at, attempts,
                           sid, error_code, error, answered_by)
        SELECT id, incident_id, round, number,
            CASE status WHEN 'pending' THEN 'queued' WHEN 'sending' THEN 'unknown' ELSE status END,
            created_at, updated_at,
            CASE WHEN status IN ('pending', 'retrying') THEN updated_at END,
            attempts, sid, error_code, error, answered_by
        FROM calls;

    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id INTEGER NOT NULL REFERENCES calls(id),
        state TEXT NOT NULL CHECK (state IN ('requesting', 'placed', 'failed', 'unknown', 'absent', 'undecided')),
        requested_at INTEGER NOT NULL,
        window_end INTEGER NOT NULL,
        from_number TEXT NOT NULL,
        settled_at INTEGER,
        sid TEXT,
        http_status INTEGER,
        error_code INTEGER,
        error TEXT,
        reconciled TEXT,
        CHECK ((settled_at IS NULL) = (state IN ('requesting', 'unknown')))
    );
    INSERT INTO attempts (call_id, state, requested_at, window_end, from_number, settled_at, sid, error_code, error)
        SELECT call_id, CASE outcome WHEN 'placed' THEN 'placed' ELSE 'failed' END, at, at, '', at,
            CASE WHEN outcome = 'placed' AND ROW_NUMBER() OVER (PARTITION BY sid ORDER BY id) = 1 THEN sid END,
            error_code, error
        FROM call_attempts WHERE outcome IN ('placed', 'retry', 'failed') ORDER BY id;
    -- A retry after a lost answer (a timeout, a dropped connection, a 500 or a gateway's
    -- 502/504) may have followed a request that created the call: reconciled, like a
    -- request that was in flight. Older versions retried those blindly.
    UPDATE calls_new SET state = 'unknown', next_attempt_at = NULL
        WHERE state = 'retrying' AND (
            SELECT a.error NOT LIKE 'HTTP %' AND a.error != 'cannot connect to Twilio'
                OR a.error LIKE 'HTTP 500%' OR a.error LIKE 'HTTP 502%' OR a.error LIKE 'HTTP 504%'
            FROM call_attempts a WHERE a.call_id = calls_new.id ORDER BY a.id DESC LIMIT 1);
    -- When such a request was sent (and how long it could take) is not recorded: its
    -- window opens when the call was decided, or a minute before its last recorded
    -- outcome if that is earlier (a request times out before its retry is recorded), and
    -- closes now; no later request can be confused with it.
    INSERT INTO attempts (call_id, state, requested_at, window_end, from_number)
        SELECT id, 'unknown',
            MIN(created_at, updated_at - 60000,
                COALESCE((SELECT MAX(a.at) FROM call_attempts a WHERE a.call_id = calls_new.id), updated_at) - 60000),
            CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), ''
        FROM calls_new WHERE state = 'unknown';
    CREATE UNIQUE INDEX attempts_sid ON attempts(sid) WHERE sid IS NOT NULL;
    CREATE INDEX attempts_call ON attempts(call_id);
    CREATE INDEX attempts_unresolved ON attempts(call_id) WHERE state IN ('requesting', 'unknown');

    CREATE TABLE call_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id INTEGER NOT NULL REFERENCES calls(id),
        at INTEGER NOT NULL,
        event TEXT NOT NULL
    );
    INSERT INTO call_events (call_id, at, event)
        SELECT call_id, at, outcome || COALESCE(' ' || sid, '') || COALESCE(': ' || error, '')
        FROM call_attempts WHERE outcome NOT IN ('placed', 'retry', 'failed') ORDER BY id;
    CREATE INDEX call_events_call ON call_events(call_id);
    DROP TABLE call_attempts;
    DROP TABLE calls;
    ALTER TABLE calls_new RENAME TO calls;
    CREATE INDEX calls_incident ON calls(incident_id);
    CREATE INDEX calls_sid ON calls(sid) WHERE sid IS NOT NULL;
    CREATE INDEX calls_due ON calls(next_attempt_at) WHERE state IN ('queued', 'retrying');
    CREATE INDEX calls_waiting ON calls(number, next_attempt_at, id) WHERE state IN ('queued', 'retrying');
    CREATE INDEX calls_requesting ON calls(number) WHERE state = 'requesting';

    CREATE TABLE rounds_new (
        incident_id INTEGER NOT NULL REFERENCES incidents(id),
        round INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        outcome TEXT CHECK (outcome IS NULL OR outcome IN ('bridged', 'nobody joined', 'resolved')),
        PRIMARY KEY (incident_id, round)
    );
    INSERT INTO rounds_new (incident_id, round, started_at, outcome)
        SELECT incident_id, round, started_at,
            CASE WHEN outcome LIKE 'reached%' THEN 'bridged'
                 WHEN outcome IN ('nobody joined', 'resolved') THEN outcome END
        FROM rounds;
    DROP TABLE rounds;
    ALTER TABLE rounds_new RENAME TO rounds;",
    // 8: what retention looks up: closed incidents by when they closed, bridged ones by
    // their last alert, and alerts no incident holds by when they came; how many runs
    // of the daemon died routing an alert (a poison mail is set aside, not retried
    // forever).
    "ALTER TABLE alerts ADD COLUMN route_attempts INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX incidents_closed ON incidents(closed_at) WHERE closed_at IS NOT NULL;
    CREATE INDEX incidents_bridged ON incidents(last_alert_at) WHERE status = 'bridged';
    CREATE INDEX alerts_orphans ON alerts(received_at) WHERE incident_id IS NULL AND state != 'received';",
    // 9: on-call policy (issue 15): overrides of rotations, silences, heartbeat monitors,
    // and the escalation steps of each incident. Routing reads the overrides and
    // silences not yet over, the rounds worker the steps that are due, retention what
    // ended long ago: each by an index on its end. Ids are AUTOINCREMENT (`override
    // remove ID`, `silence expire ID`: a pruned id never names another).
    "CREATE TABLE overrides (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rotation TEXT NOT NULL,
        who TEXT NOT NULL,
        from_at INTEGER NOT NULL,
        until_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        CHECK (until_at > from_at)
    );
    CREATE INDEX overrides_until ON overrides(until_at);
    CREATE TABLE silences (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        matchers TEXT NOT NULL,
        starts_at INTEGER NOT NULL,
        ends_at INTEGER NOT NULL,
        comment TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        CHECK (ends_at >= starts_at)
    );
    CREATE INDEX silences_ends ON silences(ends_at);
    CREATE TABLE heartbeats (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('waiting', 'ok', 'missed')),
        since INTEGER NOT NULL,
        last_beat_at INTEGER,
        missed_at INTEGER,
        CHECK ((missed_at IS NOT NULL) = (state = 'missed')),
        CHECK ((last_beat_at IS NULL) = (state = 'waiting') OR state = 'missed')
    );
    CREATE TABLE escalations (
        incident_id INTEGER NOT NULL REFERENCES incidents(id),
        step INTEGER NOT NULL,
        due_at INTEGER NOT NULL,
        numbers TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'called', 'not needed')),
        done_at INTEGER,
        PRIMARY KEY (incident_id, step),
        CHECK ((done_at IS NULL) = (state = 'pending'))
    );
    CREATE INDEX escalations_due ON escalations(due_at) WHERE state = 'pending';",
    // 10: incidents a silence muted (`silenced`, with the silence's id). SQLite cannot
    // change a CHECK, so the table is rebuilt as in 7 (ids AUTOINCREMENT), with its
    // indexes.
    "CREATE TABLE incidents_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        public_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL DEFAULT 'alert' CHECK (kind IN ('alert', 'canary')),
        dry_run INTEGER NOT NULL DEFAULT 0 CHECK (dry_run IN (0, 1)),
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'bridged', 'unanswered', 'resolved', 'silenced')),
        opened_at INTEGER NOT NULL,
        first_received_at INTEGER,
        closed_at INTEGER,
        rule TEXT NOT NULL,
        dedup_key TEXT NOT NULL,
        message TEXT NOT NULL,
        language TEXT NOT NULL,
        voice TEXT NOT NULL,
        twiml TEXT NOT NULL,
        subject TEXT NOT NULL DEFAULT '',
        sms INTEGER NOT NULL DEFAULT 0,
        alert_count INTEGER NOT NULL DEFAULT 1,
        last_alert_at INTEGER NOT NULL,
        round INTEGER NOT NULL DEFAULT 1,
        rounds INTEGER NOT NULL DEFAULT 1,
        round_interval_ms INTEGER NOT NULL DEFAULT 0,
        next_round_at INTEGER,
        silence_id INTEGER,
        CHECK (next_round_at IS NULL OR status = 'open'),
        CHECK ((closed_at IS NULL) = (status IN ('open', 'bridged'))),
        CHECK ((silence_id IS NOT NULL) = (status = 'silenced'))
    );
    INSERT INTO incidents_new (id, public_id, kind, dry_run, status, opened_at, first_received_at, closed_at, rule,
                               dedup_key, message, language, voice, twiml, subject, sms, alert_count, last_alert_at,
                               round, rounds, round_interval_ms, next_round_at)
        SELECT id, public_id, kind, dry_run, status, opened_at, first_received_at, closed_at, rule,
               dedup_key, message, language, voice, twiml, subject, sms, alert_count, last_alert_at,
               round, rounds, round_interval_ms, next_round_at
        FROM incidents;
    DROP TABLE incidents;
    ALTER TABLE incidents_new RENAME TO incidents;
    CREATE INDEX incidents_key ON incidents(dedup_key, opened_at) WHERE status IN ('open', 'bridged');
    CREATE INDEX incidents_live ON incidents(opened_at) WHERE status IN ('open', 'bridged');
    CREATE INDEX incidents_next_round ON incidents(next_round_at) WHERE next_round_at IS NOT NULL;
    CREATE INDEX incidents_closed ON incidents(closed_at) WHERE closed_at IS NOT NULL;
    CREATE INDEX incidents_bridged ON incidents(last_alert_at) WHERE status = 'bridged';
    CREATE INDEX incidents_silenced ON incidents(dedup_key, opened_at) WHERE status = 'silenced';",
    // 11: a heartbeat missed by a dry run (`serve --dry-run`) is missed for dry runs
    // only: a real daemon on the same store still opens its incident. And the calls
    // whose answerer polling still waits for, found by their last change; and the
    // requests whose answer is overdue, for the reconciler's pass every second. And
    // whether an incident's calls ask to press 1 (public URL) or are watched by
    // polling: decided when it opens, kept through a reload that changes `public_url`,
    // with the public URL its callbacks come to (taken from the stored TwiML).
    // And each placed call's SMS summary, owed until sent, so a crash never loses it.
    "ALTER TABLE heartbeats ADD COLUMN missed_dry_run INTEGER NOT NULL DEFAULT 0 CHECK (missed_dry_run IN (0, 1));
    CREATE INDEX calls_unanswered ON calls(updated_at) WHERE state = 'placed' AND answered_by IS NULL;
    CREATE INDEX attempts_overdue ON attempts(window_end) WHERE state = 'requesting';
    CREATE INDEX attempts_absent ON attempts(requested_at) WHERE state = 'absent';
    ALTER TABLE incidents ADD COLUMN press_one INTEGER NOT NULL DEFAULT 0 CHECK (press_one IN (0, 1));
    UPDATE incidents SET press_one = 1 WHERE twiml LIKE '%<Gather%';
    ALTER TABLE incidents ADD COLUMN public_url TEXT;
    UPDATE incidents SET public_url = substr(twiml, instr(twiml, 'action=\"') + 8,
                                             instr(twiml, '/twilio/gather') - instr(twiml, 'action=\"') - 8)
        WHERE press_one = 1;
    ALTER TABLE calls ADD COLUMN sms_state TEXT CHECK (sms_state IN ('owed', 'sent', 'failed'));
    CREATE INDEX calls_sms_owed ON calls(id) WHERE sms_state = 'owed';",
];

pub(super) fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    // Rebuilding a table (migration 7) drops tables others reference: foreign keys are
    // off while migrating (a no-op inside a transaction, so set here), and checked
    // before each migration commits.
    conn.execute_batch("PRAGMA foreign_keys = OFF")?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        let broken: i64 =
            tx.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })?;
        if broken > 0 {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("{broken} rows break foreign keys after migration {}", i + 1),
            });
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    conn.execute_batch("PRAGMA foreign_keys = ON")?;
    Ok(())
}
