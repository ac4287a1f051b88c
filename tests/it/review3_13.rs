//! Third review of issue 13 ("bounded under any input"): each test reproduces one defect
//! found by attacking the change with the real binary over loopback sockets. Each doc
//! comment says what was done, what happened and why it matters; the test is named for,
//! and asserts, the behaviour that should hold.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Daemon, SmtpClient, config, mail, workdir};

const SENDER: &str = "monitor@monitoring.example.com";
const RCPT: &str = "alerts@example.com";

/// `config` with extra `[smtp]` keys.
fn with_smtp(cfg: &str, keys: &str) -> String {
    cfg.replace(
        "hostname = \"mx.test\"\n",
        &format!("hostname = \"mx.test\"\n{keys}"),
    )
}

/// A mail of about `mib` MiB: 998-byte lines, as big alert mails (graphs, logs) are.
fn big_mail(subject: &str, mib: usize) -> Vec<u8> {
    let line = format!("{}\r\n", "y".repeat(998));
    let mut body = String::with_capacity(mib << 20);
    for _ in 0..(mib << 20) / line.len() {
        body.push_str(&line);
    }
    mail(subject, &body)
}

/// Bytes the store takes on disk: the database file and its WAL.
fn store_files_bytes(dir: &Path) -> (u64, u64) {
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    (size("mailcall.db"), size("mailcall.db-wal"))
}

/// The resident set of a process now, in KiB (`VmRSS` in `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("no VmRSS in /proc/<pid>/status")
}

/// `[state] max_bytes = 16 MiB`; 48 mails of 1 MiB (noise a rule drops, so all of it is
/// closed data the store may delete) sent over two connections as fast as the daemon
/// takes them; then one small mail a second.
///
/// Measured: the database file stays under the cap (15 MiB), but its WAL grew to 47–94 MB
/// during the burst, 55–101 MB after it, and never shrinks (60 s of quiet later it was the
/// same size; 96–103 MB in a release build); 500 MiB of 5 MiB mails through a 50 MiB cap
/// left a 910 MB WAL. The checkpointer runs only `PASSIVE` checkpoints, which never catch
/// up while the writer commits back to back, so the WAL is never reset during a burst; and
/// no `journal_size_limit` is set, so the file keeps its high-water mark for ever. On a
/// small VM the disk fills although `max_bytes` says the store is capped — and once the
/// disk is full, SQLite refuses the dispatcher's own writes too, the one thing `max_bytes`
/// promises never to do.
#[test]
fn the_store_on_disk_stays_near_max_bytes_after_a_burst_of_big_mails() {
    let dir = workdir();
    let max: u64 = 16 << 20;
    let cfg = config(
        None,
        &format!("[state]\nmax_bytes = {max}\n[[rule]]\nname = \"noise\"\ndrop = true\n"),
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let addr = daemon.smtp;
    let senders: Vec<_> = (0..2)
        .map(|worker| {
            std::thread::spawn(move || {
                let mut smtp = SmtpClient::connect(addr);
                assert_eq!(smtp.cmd("EHLO burst.example").0, 250);
                for i in 0..24 {
                    let message = big_mail(&format!("noise {worker} {i}"), 1);
                    // A 452 while the router catches up is fine: a relay tries again.
                    let mut tries = 0;
                    loop {
                        let (code, text) = smtp.send(SENDER, &[RCPT], &message);
                        tries += 1;
                        if code == 250 {
                            break;
                        }
                        assert!(
                            code == 452 && tries < 50,
                            "mail {i} of worker {worker}: {code} {text}"
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                smtp.cmd("QUIT");
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let after_burst = store_files_bytes(dir.path());
    // The burst is over: the pruner finishes, then small mails trickle in, one a second,
    // as they do on a quiet day. The store's files must come back near the cap.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut smtp = daemon.smtp();
    let mut n = 0;
    let sizes = loop {
        std::thread::sleep(Duration::from_secs(1));
        smtp.alert(&format!("quiet {n}"));
        n += 1;
        let (db, wal) = store_files_bytes(dir.path());
        if db + wal <= 2 * max || Instant::now() >= deadline {
            break (db, wal);
        }
    };
    eprintln!(
        "max_bytes {max}: after the burst db {} + WAL {}; {n} quiet mails later db {} + WAL {}",
        after_burst.0, after_burst.1, sizes.0, sizes.1
    );
    assert!(
        sizes.0 <= max,
        "the database file itself passed max_bytes: {sizes:?}"
    );
    assert!(
        sizes.0 + sizes.1 <= 2 * max,
        "with max_bytes = {max}, the store takes {} bytes on disk (db {}, WAL {}) after the burst",
        sizes.0 + sizes.1,
        sizes.0,
        sizes.1
    );
}

/// 24 SMTP sessions from one address (the default per-address cap is 100), no AUTH (the
/// default), each sending a 9 MiB message (the default `max_message_bytes` is 10 MiB) and
/// stalling before the final `.`.
///
/// Measured: the daemon's resident memory went from 13–28 MiB to 231–245 MiB (40 such
/// sessions: 392 MB); every byte of every message in flight is buffered in its session
/// (`read_data` collects the whole message in a `Vec`), with no budget shared between
/// sessions. One unauthenticated address can hold 100 × 10 MiB = 1 GiB, 200 sessions
/// (the total cap) 2 GiB: the daemon a small VM runs for a year is OOM-killed by anyone who
/// can reach port 25. It is defect 3 of the issue again, on the other way in: SendGrid
/// bodies were given a 64 MiB budget shared by all posts for exactly this reason (24 × 40
/// MiB "must not mean a gigabyte"), SMTP messages were not.
#[test]
fn smtp_messages_in_flight_share_a_memory_budget() {
    let dir = workdir();
    let cfg = config(None, "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n");
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let before = rss_kib(daemon.pid());
    let message = big_mail("big", 9);
    let mut sessions = Vec::new();
    for _ in 0..24 {
        let stream = TcpStream::connect_timeout(&daemon.smtp, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A daemon that stops reading (to keep within a budget) must not hang the test.
        stream
            .set_write_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut reply = || {
            let mut last = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return last;
                }
                if line.as_bytes().get(3) != Some(&b'-') {
                    return line;
                }
                last = line;
            }
        };
        reply();
        let mut accepted = true;
        for cmd in [
            "EHLO big.example".to_string(),
            format!("MAIL FROM:<{SENDER}>"),
            format!("RCPT TO:<{RCPT}>"),
            "DATA".to_string(),
        ] {
            writer.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
            let answer = reply();
            if !answer.starts_with('2') && !answer.starts_with('3') {
                accepted = false;
                break;
            }
        }
        if accepted {
            // The whole message but the final ".": the session holds it, waiting.
            let _ = writer.write_all(&message);
        }
        sessions.push(writer);
    }
    std::thread::sleep(Duration::from_secs(1));
    let during = rss_kib(daemon.pid());
    eprintln!(
        "RSS before {before} KiB, with 24 stalled 9 MiB messages {during} KiB ({} MiB)",
        during / 1024
    );
    assert!(
        during < 128 * 1024,
        "24 unauthenticated SMTP sessions from one address hold {} MiB of the daemon's memory",
        during / 1024
    );
    drop(sessions);
}

/// Reads one SMTP reply (all its lines); the code, or `None` when the connection closed.
fn reply_code(reader: &mut BufReader<TcpStream>) -> Option<(u16, String)> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        text.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Some((line.get(..3)?.parse().ok()?, text));
        }
    }
}

/// `max_connections_per_ip = 1`: one session from the address carries mail, a second is
/// greeted and has its transactions deferred (`451 4.7.0`) — the relay-friendly answer the
/// issue asks for instead of `421`. The second session is driven as Postfix drives a
/// cached connection with PIPELINING (on by default): `MAIL`, `RCPT`, `DATA` in one write,
/// then `RSET`, once per queued message.
///
/// Measured: the first nine messages get `451`, `503` (RCPT: no MAIL), `503` (DATA); the
/// tenth gets `421 4.7.0 mx.test too many errors, closing` and the connection is closed.
/// The `503`s that pipelining makes of the daemon's own deferral count as the client's
/// syntax errors (`MAX_ERRORS` = 20, `is_protocol_error` takes every 500–504), and the
/// count is never reset (Postfix, which `MAX_ERRORS` copies, resets it whenever a message
/// is transferred). So a relay that the daemon defers is shut out with exactly the `421`
/// the deferral exists to avoid, and the same happens to any long relay session that
/// carries ten messages from a sender `[smtp] senders` refuses, however much good mail it
/// delivered in between.
#[test]
fn a_deferred_relay_session_is_deferred_with_451_and_never_closed_for_errors() {
    let dir = workdir();
    let cfg = with_smtp(
        &config(None, "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n"),
        "max_connections_per_ip = 1\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);
    // The session that holds the address's one place.
    let mut first = daemon.smtp();
    assert_eq!(first.cmd("EHLO relay.example").0, 250);
    assert_eq!(first.cmd(&format!("MAIL FROM:<{SENDER}>")).0, 250);

    let stream = TcpStream::connect_timeout(&daemon.smtp, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(reply_code(&mut reader).map(|r| r.0), Some(220));
    writer.write_all(b"EHLO relay.example\r\n").unwrap();
    assert_eq!(reply_code(&mut reader).map(|r| r.0), Some(250));
    let mut answers = Vec::new();
    for n in 0..15 {
        let pipeline = format!("MAIL FROM:<{SENDER}> SIZE=300\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n");
        if writer.write_all(pipeline.as_bytes()).is_err() {
            answers.push(format!("message {n}: connection closed"));
            break;
        }
        let mail = reply_code(&mut reader);
        let rcpt = reply_code(&mut reader);
        let data = reply_code(&mut reader);
        let closed = data.is_none() || matches!(&data, Some((421, _)));
        answers.push(format!(
            "message {n}: MAIL {:?} RCPT {:?} DATA {:?}",
            mail.as_ref().map(|r| r.1.trim()),
            rcpt.as_ref().map(|r| r.1.trim()),
            data.as_ref().map(|r| r.1.trim())
        ));
        assert_eq!(
            mail.as_ref().map(|r| r.0),
            Some(451),
            "the deferred session's MAIL is not answered 451:\n{}",
            answers.join("\n")
        );
        assert!(
            !closed,
            "the deferred relay session was closed:\n{}",
            answers.join("\n")
        );
        writer.write_all(b"RSET\r\n").unwrap();
        assert_eq!(reply_code(&mut reader).map(|r| r.0), Some(250));
    }
    // Once the place is free, the same session delivers: nothing was lost.
    assert_eq!(first.cmd("QUIT").0, 221);
    writer
        .write_all(format!("MAIL FROM:<{SENDER}>\r\n").as_bytes())
        .unwrap();
    assert_eq!(reply_code(&mut reader).map(|r| r.0), Some(250));
}

/// Reads one HTTP/1.1 answer with a `Content-Length` body from a kept-alive connection;
/// its status, or `None` when the connection ended.
fn read_answer(reader: &mut BufReader<TcpStream>) -> Option<u16> {
    let mut status = None;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if status.is_none() {
            status = line.get(9..12)?.parse().ok();
        } else if line == "\r\n" {
            break;
        } else if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    std::io::Read::read_exact(reader, &mut body).ok()?;
    status
}

/// Eight kept-alive connections from one address (the per-address cap is 20) asking
/// `GET /healthz` — unauthenticated, as monitoring asks it — as fast as they are answered.
///
/// Measured: 2,000–7,500 answers a second, and the WAL grows with every one of them
/// (14–19 MB after 20,000 requests in a debug build, 5.4 MB in a release build: 270–950
/// bytes a request) for as long as the requests come, and keeps that size afterwards.
/// Every `/healthz` commits a write (`check_writable`, a `meta` row), so the writer
/// commits back to back; the checkpointer's `PASSIVE` checkpoints never find the WAL fully
/// copied between two commits, so it is never reset, and nothing truncates it. Anyone who
/// can reach the HTTP port fills the disk at gigabytes an hour (2 MB/s measured),
/// `max_bytes` or not; when the disk is full every alert is refused and the dispatcher
/// cannot record its calls.
#[test]
fn a_flood_of_healthz_requests_does_not_grow_the_store() {
    let dir = workdir();
    let cfg = config(None, "[http]\nlisten = \"127.0.0.1:0\"\n");
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let addr: SocketAddr = daemon.http.unwrap();
    let (_, wal_before) = store_files_bytes(dir.path());
    let started = Instant::now();
    let floods: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut answered = 0u64;
                while answered < 2_500 && started.elapsed() < Duration::from_secs(25) {
                    if writer
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                        .is_err()
                    {
                        break;
                    }
                    match read_answer(&mut reader) {
                        Some(200) => answered += 1,
                        other => panic!("/healthz answered {other:?}"),
                    }
                }
                answered
            })
        })
        .collect();
    let answered: u64 = floods.into_iter().map(|f| f.join().unwrap()).sum();
    let took = started.elapsed();
    // A quiet moment, then one more request: whatever the WAL would shed, it has shed.
    std::thread::sleep(Duration::from_secs(2));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let _ = read_answer(&mut BufReader::new(s));
    std::thread::sleep(Duration::from_secs(1));
    let (db, wal) = store_files_bytes(dir.path());
    eprintln!(
        "{answered} /healthz answers in {took:?}: WAL {wal_before} → {wal} bytes, database {db}"
    );
    assert!(
        answered >= 10_000,
        "the flood did not get far enough to judge ({answered} answers in {took:?})"
    );
    assert!(
        wal < 2 << 20,
        "{answered} unauthenticated GET /healthz left a WAL of {wal} bytes ({} per request)",
        wal / answered
    );
}

/// `[state] max_bytes = 100000` (100 kB, perhaps meant as kilobytes): `mailcall check`
/// says `ok`, the daemon starts, and on an empty store — no incident, no alert, nothing
/// open at all — every mail is answered `452 4.3.1` and `/healthz` reports
/// `store_full`, for ever: the empty schema alone takes 180 kB, more than the cap. Senders
/// retry for days and then bounce; nothing ever rings. The issue promises that mail is
/// refused "only while open data alone exceeds" `max_bytes`; a cap that nothing can fit
/// under must be refused (or at least warned about) by `check` and at start, as a typo in
/// `rules.toml` is, instead of silently disabling every alert. (The same happens, for one
/// mail, with `max_bytes` near `max_message_bytes`: a 9.5 MiB mail, which `SIZE`
/// invites, never fits under `max_bytes = 10 MiB` because of the reserve big mails must
/// leave, and gets `452` on an empty store.)
#[test]
fn a_max_bytes_too_small_for_any_mail_is_refused_by_check_or_still_takes_mail() {
    let dir = workdir();
    let cfg = config(
        None,
        "[state]\nmax_bytes = 100000\n[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n",
    );
    std::fs::write(dir.path().join("rules.toml"), &cfg).unwrap();
    let out = crate::harness::command(dir.path())
        .arg("check")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if said.contains("max_bytes") {
        // The config is refused or warned about: the operator is told. Fine.
        return;
    }
    assert!(out.status.success(), "{said}");
    // `check` found nothing wrong: then the daemon must keep the promise.
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let mut smtp = daemon.smtp();
    let (code, text) = smtp.send(SENDER, &[RCPT], &mail("db1 is down", "ping fails"));
    assert_eq!(
        code, 250,
        "`mailcall check` said {said:?}, yet an empty store refuses a 100-byte alert: {code} {text}"
    );
}

/// The first SQL string literal given to `prepare_cached` in `fn name` of
/// `src/store/calls.rs`: the query that function really runs, whatever it becomes.
fn query_of(name: &str) -> String {
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/calls.rs"))
            .unwrap();
    let body = src
        .split(&format!("pub async fn {name}("))
        .nth(1)
        .unwrap_or_else(|| panic!("no fn {name} in src/store/calls.rs"));
    let call = body.split("prepare_cached(").nth(1).unwrap();
    let literal = call.split('"').nth(1).unwrap();
    literal.to_string()
}

/// What the issue asks — "every lookup on a hot path has an index (a test checks the
/// plans)" — checked on the queries the workers really run, not on look-alikes. The store
/// is the real daemon's.
///
/// Measured: the reconciler runs `unresolved` every second (`IDLE_POLL`, in every real
/// daemon), and its first statement, `UPDATE attempts … WHERE state = 'requesting' AND
/// window_end < ?1`, is `SCAN attempts`: the partial index `attempts_unresolved` is on
/// `state IN ('requesting', 'unknown')`, which SQLite cannot use for `state =
/// 'requesting'`. `store::tests::hot_lookups_use_indexes` checks
/// `… WHERE state IN ('requesting', 'unknown')` instead, so it passes. Every attempt of
/// the retention period (43,000 in 30 days at the default budget) is read once a second
/// on the store's only connection, which every `250` waits behind (19 ms a pass with
/// 200,000 attempts, in a release SQLite). The rounds worker's `calls_to_watch`, once a
/// second in polling mode (the default, without `public_url`), is no better: its plan is
/// `SEARCH c USING INDEX calls_sid (sid>?)`, i.e. every placed call ever kept, each with
/// its incident looked up, to find the few of open incidents' current rounds.
#[test]
fn the_workers_once_a_second_lookups_use_indexes() {
    let dir = workdir();
    let cfg = config(None, "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n");
    let mut daemon = Daemon::start(dir.path(), &cfg, true);
    daemon.smtp().alert("db1 is down");
    daemon.kill9();
    let db = rusqlite::Connection::open(dir.path().join("mailcall.db")).unwrap();
    let mut bad = Vec::new();
    for name in ["unresolved", "calls_to_watch"] {
        let sql = query_of(name);
        let params = (1..=9).filter(|n| sql.contains(&format!("?{n}"))).count();
        let plan: Vec<String> = db
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(
                rusqlite::params_from_iter(vec![rusqlite::types::Null; params]),
                |r| r.get::<_, String>(3),
            )
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        // A full scan, or a walk through the whole SID index: both read every row kept.
        if plan.iter().any(|step| {
            (step.starts_with("SCAN ") && !step.contains("USING")) || step.contains("(sid>?)")
        }) {
            bad.push(format!(
                "{name}: {}\n    {}",
                plan.join("; "),
                sql.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "hot-path lookups without an index:\n{}",
        bad.join("\n")
    );
}

/// A SendGrid Inbound Parse post in raw mode (`email`, `envelope`, `dkim`) to `addr`;
/// the status.
fn sendgrid_post(addr: SocketAddr, email: &str, dkim: &str) -> u16 {
    const BOUNDARY: &str = "xYzZY";
    let mut body = Vec::new();
    let envelope = format!(r#"{{"to":["{RCPT}"],"from":"{SENDER}"}}"#);
    for (name, value) in [("email", email), ("envelope", &envelope), ("dkim", dkim)] {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "POST /sendgrid/inbound HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
             Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&body).unwrap();
    read_answer(&mut BufReader::new(s)).unwrap_or(0)
}

/// `[sendgrid] require_dkim = true`, and a mail from a Japanese internationalised domain
/// — `From: 監視 <alert@例え.jp>`, raw UTF-8 as SMTPUTF8 mail carries it, the case the
/// issue's SMTPUTF8 work is for — signed by that very domain. SendGrid reports the
/// signature's `d=` domain, which RFC 6376 (3.5) requires in A-label form:
/// `{@xn--r8jz45g.jp : pass}`.
///
/// Measured: the mail is recorded as rejected ("DKIM {@xn--r8jz45g.jp : pass} for From:
/// alert@例え.jp") and nobody is called. `dkim_aligned` compares the organisational domain
/// of the `From:` address as written (U-labels, `例え.jp`) with that of the DKIM domain
/// (A-labels, `xn--r8jz45g.jp`) byte for byte, so a correctly signed mail from any IDN
/// domain never aligns. Both must be brought to one form (A-labels, `idna`) before they
/// are compared, as DMARC does for EAI mail.
#[test]
fn dkim_alignment_holds_for_an_internationalised_from_domain() {
    let dir = workdir();
    let cfg = config(
        None,
        "[http]\nlisten = \"127.0.0.1:0\"\n[sendgrid]\nrequire_dkim = true\n\
         [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let addr = daemon.http.unwrap();
    let mail = |subject: &str| {
        format!(
            "From: 監視 <alert@例え.jp>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n\
             Message-ID: <{subject}@例え.jp>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
             web01 停止\r\n"
        )
    };
    // Signed by another domain: rightly refused (the check is on).
    assert_eq!(
        sendgrid_post(addr, &mail("forged"), "{@evil.example : pass}"),
        200
    );
    daemon.wait_for_log("recorded as rejected", Duration::from_secs(5));
    // Signed by the From: domain itself, as SendGrid reports it (A-labels).
    assert_eq!(
        sendgrid_post(addr, &mail("genuine"), "{@xn--r8jz45g.jp : pass}"),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.logs().contains("SendGrid mail accepted and stored") {
        let rejected = daemon.logs().matches("recorded as rejected").count();
        assert!(
            rejected < 2 && Instant::now() < deadline,
            "a mail DKIM-signed by its own IDN From: domain was refused:\n{}",
            daemon
                .logs()
                .lines()
                .filter(|l| l.contains("SendGrid"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
