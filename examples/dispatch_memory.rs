//! The dispatcher's memory under a backlog of big mails, behind BENCHMARKS.md; run it
//! with `bench/dispatch_memory.sh`.
//!
//! Issue 13 measured 1.9 GB of RSS, and a 25 s wait for the next alert, when 300 mails of
//! 9 MiB each were queued: the router loaded up to 256 raw mails at once. This program
//! builds that backlog in a store (300 received alerts of 9 MiB, written straight into
//! SQLite as the daemon would have stored them), starts the *release* binary on it
//! (`serve --dry-run`, nothing leaves the machine), sends one more alert over SMTP, and
//! reads `VmRSS`/`VmHWM` from /proc until every alert is routed. Every loop is bounded.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BACKLOG: usize = 300;
const MAIL_BYTES: usize = 9 * 1024 * 1024;

fn main() {
    let bin = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/mailcall".into());
    let dir = tempfile::tempdir().unwrap();
    let config = "[smtp]\nlisten = \"127.0.0.1:0\"\nmax_message_bytes = 20000000\n\
                  [twilio]\nfrom = \"+15005550006\"\n[state]\npath = \"bench.db\"\n\
                  [[rule]]\nname = \"all\"\ncall = [\"+15005550001\"]\n";
    std::fs::write(dir.path().join("rules.toml"), config).unwrap();

    // The store, with its schema: one dry start, stopped at once.
    drop(start(&bin, dir.path()));
    let started = Instant::now();
    backlog(&dir.path().join("bench.db"));
    println!(
        "backlog: {BACKLOG} alerts of {} MiB written in {:.1} s",
        MAIL_BYTES / 1024 / 1024,
        started.elapsed().as_secs_f64()
    );

    let (daemon, smtp) = start(&bin, dir.path());
    let pid = daemon.0.id();
    let started = Instant::now();
    let id = send(smtp, "the next alert");
    let mut peak = 0;
    let mut next_routed = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        peak = peak.max(proc_status(pid, "VmRSS:"));
        let log = std::fs::read_to_string(dir.path().join("mailcall.log")).unwrap_or_default();
        let next = format!("alert={id} ");
        if next_routed.is_none()
            && log
                .lines()
                .any(|l| l.contains("new incident") && l.contains(&next))
        {
            next_routed = Some(started.elapsed());
        }
        let routed = log.matches("new incident").count();
        if routed > BACKLOG {
            break;
        }
        assert!(Instant::now() < deadline, "not routed in time: {routed}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let total = started.elapsed();
    peak = peak.max(proc_status(pid, "VmHWM:"));
    println!(
        "routing {} alerts: {:.1} s; RSS peak {:.1} MiB (VmRSS sampled every 10 ms, and VmHWM); the next alert routed after {:.2} s",
        BACKLOG + 1,
        total.as_secs_f64(),
        peak as f64 / 1024.0,
        next_routed.unwrap_or(total).as_secs_f64()
    );
}

/// Writes the backlog as the daemon stores mail: `received`, raw RFC 5322.
fn backlog(db: &Path) {
    let mut c = rusqlite::Connection::open(db).unwrap();
    let tx = c.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO alerts (received_at, source, mail_from, rcpt_to, raw, state)
                 VALUES (?1, 'smtp', 'monitor@bench.example', '[\"alerts@bench.example\"]', ?2, 'received')",
            )
            .unwrap();
        let line = b"filler: host db1 answered slowly, nothing to worry about yet\r\n";
        for n in 0..BACKLOG {
            let mut raw = format!(
                "From: monitor@bench.example\r\nTo: alerts@bench.example\r\nSubject: backlog {n} is DOWN\r\n\r\n"
            )
            .into_bytes();
            while raw.len() < MAIL_BYTES {
                raw.extend_from_slice(line);
            }
            insert.execute(rusqlite::params![now_ms(), raw]).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A daemon under test; stopped (SIGTERM, then killed) when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `serve --dry-run`; its SMTP address once it listens.
fn start(bin: &str, dir: &Path) -> (Daemon, SocketAddr) {
    let log = std::fs::File::create(dir.join("mailcall.log")).unwrap();
    let daemon = Daemon(
        Command::new(bin)
            .args(["--config", dir.join("rules.toml").to_str().unwrap()])
            .args(["serve", "--dry-run"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(dir.join("mailcall.log")).unwrap_or_default();
        if let Some(addr) = log
            .split("smtp listening addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
        {
            return (daemon, addr);
        }
        assert!(Instant::now() < deadline, "mailcall did not start:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one small alert; the alert id from the `250`.
fn send(addr: SocketAddr, subject: &str) -> String {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut reply = || {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            text.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                return text;
            }
        }
    };
    reply();
    for command in [
        "EHLO bench\r\n",
        "MAIL FROM:<m@bench.example>\r\n",
        "RCPT TO:<a@bench.example>\r\n",
        "DATA\r\n",
    ] {
        writer.write_all(command.as_bytes()).unwrap();
        reply();
    }
    writer
        .write_all(format!("Subject: {subject}\r\n\r\nx\r\n.\r\n").as_bytes())
        .unwrap();
    let done = reply();
    assert!(done.starts_with("250"), "{done}");
    done.split("alert ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

/// A `kB` field of /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
