//! The HTTP memory and slowloris benchmark behind BENCHMARKS.md; run it with
//! `bench/http_memory.sh`.
//!
//! Issue 13 measured 958 MB of RSS while 24 clients posted 40 MiB each to the SendGrid
//! endpoint without credentials, and `/healthz` unreachable behind a few hundred clients
//! trickling their headers. This program starts the *release* binary (a fresh process per
//! scenario, so that `VmHWM` is that scenario's peak), plays those clients over loopback
//! and reads `VmRSS`/`VmHWM` from /proc. Every loop is bounded in count and time.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BOUNDARY: &str = "xYzZY";
const POSTS: usize = 24;
const BODY_BYTES: usize = 40 * 1024 * 1024;

/// A `mailcall serve --dry-run` under test.
struct Daemon {
    child: Child,
    http: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// `extra` is appended to the config; `state`, to its `[state]` table.
    fn start(bin: &Path, dir: &Path, state: &str, extra: &str) -> Daemon {
        let config = format!(
            "[smtp]\nlisten = \"127.0.0.1:0\"\n[twilio]\nfrom = \"+15005550006\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"bench.db\"\n{state}\
             [[rule]]\nname = \"all\"\ncall = [\"+15005550001\"]\n{extra}"
        );
        std::fs::write(dir.join("rules.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("mailcall.log")).unwrap();
        let child = Command::new(bin)
            .args(["--config", dir.join("rules.toml").to_str().unwrap()])
            .args(["serve", "--dry-run"])
            .env("BENCH_SENDGRID_PASSWORD", "secret")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Killed on drop, also if it never starts.
        let mut daemon = Daemon {
            child,
            http: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        };
        // The daemon picks its ports and says which; SMTP is logged last, once all listen.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(dir.join("mailcall.log")).unwrap_or_default();
            let http = log
                .split("http listening addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|addr| addr.parse().ok());
            if let Some(http) = http.filter(|_| log.contains("smtp listening")) {
                daemon.http = http;
                return daemon;
            }
            assert!(Instant::now() < deadline, "mailcall did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn memory(&self) -> Memory {
        Memory::of(self.child.id())
    }
}

/// A process's resident memory now and at its peak, from /proc (KiB).
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss: u64,
    hwm: u64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        let mut memory = Memory::default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        for line in status.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            match key {
                "VmRSS:" => memory.rss = value.parse().unwrap_or(0),
                "VmHWM:" => memory.hwm = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        memory
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples the daemon's RSS every 10 ms until stopped; returns the largest sample.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let peak = AtomicU64::new(0);
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            peak.fetch_max(Memory::of(pid).rss, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
        peak.load(Ordering::Relaxed)
    })
}

/// A multipart body of `BODY_BYTES` with one `email` field, as SendGrid's raw mode.
fn sendgrid_body() -> Vec<u8> {
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"envelope\"\r\n\r\n\
         {{\"to\":[\"alerts@example.com\"],\"from\":\"m@example.com\"}}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"email\"\r\n\r\n\
         From: m@example.com\r\nSubject: big\r\n\r\n"
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let mut body = head.into_bytes();
    body.resize(BODY_BYTES - tail.len(), b'a');
    body.extend_from_slice(tail.as_bytes());
    body
}

/// Posts `body` from `from` with `headers` (no `Expect: 100-continue`: the whole body is sent unless
/// the server closes first); returns the status, or 0 if none came.
async fn post(from: Ipv4Addr, to: SocketAddr, headers: String, body: Arc<Vec<u8>>) -> u16 {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(10), socket.connect(to)).await
    else {
        return 0;
    };
    let head = format!(
        "POST /sendgrid/inbound HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n\
         Content-Length: {}\r\n{headers}\r\n",
        body.len()
    );
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(256 * 1024) {
            write.write_all(chunk).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let receive = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.len() < 12 {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got)
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    // The answer may come before the body is sent (and then the send fails): both run.
    let (_, status) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(send, receive)
    })
    .await
    .unwrap_or((Ok(()), 0));
    status
}

/// One scenario: `POSTS` parallel posts of `BODY_BYTES`; prints a table row.
fn scenario(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    name: &str,
    (state, extra): (&str, &str),
    headers: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(bin, dir.path(), state, extra);
    std::thread::sleep(Duration::from_millis(300));
    let idle = daemon.memory().rss;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(daemon.child.id(), Arc::clone(&stop));
    let body = Arc::new(sendgrid_body());
    let started = Instant::now();
    let statuses = rt.block_on(async {
        let tasks: Vec<_> = (0..POSTS)
            // Each from its own address, as SendGrid's many senders: under the per-address cap.
            .map(|i| {
                let from = Ipv4Addr::new(127, 0, 1, 1 + i as u8);
                tokio::spawn(post(
                    from,
                    daemon.http,
                    headers.to_string(),
                    Arc::clone(&body),
                ))
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap_or(0));
        }
        statuses
    });
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.join().unwrap();
    let hwm = daemon.memory().hwm;
    let mut counts = std::collections::BTreeMap::new();
    for s in statuses {
        *counts.entry(s).or_insert(0) += 1;
    }
    let answers: Vec<String> = counts
        .iter()
        .map(|(s, n)| {
            if *s == 0 {
                format!("{n}× none")
            } else {
                format!("{n}× {s}")
            }
        })
        .collect();
    println!(
        "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {:.1} s |",
        mib(idle),
        mib(sampled),
        mib(hwm),
        answers.join(", "),
        elapsed.as_secs_f64()
    );
}

/// 500 connections from 25 loopback addresses stuck in their headers; `/healthz` from
/// another address, timed; RSS with them open.
fn slowloris(rt: &tokio::runtime::Runtime, bin: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(bin, dir.path(), "", "");
    std::thread::sleep(Duration::from_millis(300));
    let idle = daemon.memory().rss;
    let http = daemon.http;
    rt.block_on(async {
        let mut slow = Vec::new();
        for host in 2..27u8 {
            for _ in 0..20 {
                let socket = TcpSocket::new_v4().unwrap();
                socket
                    .bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))
                    .unwrap();
                let mut s = tokio::time::timeout(Duration::from_secs(5), socket.connect(http))
                    .await
                    .unwrap()
                    .unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                    .await
                    .unwrap();
                slow.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let with_slow = daemon.memory().rss;
        let mut times = Vec::new();
        for _ in 0..20 {
            let started = Instant::now();
            let ok = tokio::time::timeout(Duration::from_secs(5), async {
                let mut s = TcpStream::connect(http).await.ok()?;
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                    .await
                    .ok()?;
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.ok()?;
                got.starts_with(b"HTTP/1.1 200").then_some(())
            })
            .await;
            times.push((ok.ok().flatten().is_some(), started.elapsed()));
        }
        let answered = times.iter().filter(|(ok, _)| *ok).count();
        let mut ms: Vec<f64> = times
            .iter()
            .map(|(_, d)| d.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        println!(
            "| 500 connections stuck in their headers (25 addresses × 20) | RSS idle {:.1} MiB, with them {:.1} MiB | /healthz {answered}/20 answered 200, median {:.1} ms, max {:.1} ms |",
            mib(idle),
            mib(with_slow),
            ms[ms.len() / 2],
            ms[ms.len() - 1]
        );
        drop(slow);
    });
}

fn main() {
    let bin: PathBuf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/mailcall".into())
        .into();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let signing = SigningKey::from_bytes(&[42u8; 32].into()).unwrap();
    let public_key = base64::engine::general_purpose::STANDARD.encode(
        signing
            .verifying_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forged: Signature = signing.sign(b"not this body");
    let forged = base64::engine::general_purpose::STANDARD.encode(forged.to_der().as_bytes());

    println!("{POSTS} parallel posts of {} MiB each:\n", BODY_BYTES >> 20);
    println!("| scenario | RSS idle | RSS peak (sampled) | VmHWM | answers | time |");
    println!("| --- | --- | --- | --- | --- | --- |");
    scenario(
        &rt,
        &bin,
        "Basic auth configured, no credentials",
        (
            "",
            "[sendgrid]\nusername = \"sendgrid\"\npassword_env = \"BENCH_SENDGRID_PASSWORD\"\n",
        ),
        "",
    );
    scenario(
        &rt,
        &bin,
        "signature configured, no signature headers",
        ("", &format!("[sendgrid]\npublic_key = \"{public_key}\"\n")),
        "",
    );
    scenario(
        &rt,
        &bin,
        "signature configured, forged signature (body must be read)",
        ("", &format!("[sendgrid]\npublic_key = \"{public_key}\"\n")),
        &format!(
            "X-Twilio-Email-Event-Webhook-Signature: {forged}\r\nX-Twilio-Email-Event-Webhook-Timestamp: {now}\r\n"
        ),
    );
    scenario(
        &rt,
        &bin,
        "no auth configured (warned), store full: every post read and parsed, none stored",
        ("max_bytes = 1048576\n", "[sendgrid]\n"),
        "",
    );
    scenario(
        &rt,
        &bin,
        "no auth configured (warned): every post is a mail, stored and routed",
        ("", "[sendgrid]\n"),
        "",
    );
    println!();
    slowloris(&rt, &bin);
}
