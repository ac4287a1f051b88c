//! The end-to-end benchmark behind BENCHMARKS.md; run it with `bench/run.sh`.
//!
//! It starts a sink on 127.0.0.1 that plays Twilio for mailcall (`Calls.json`) and an
//! Apprise `json://` endpoint for mailrise, then drives the *release* binaries over real
//! SMTP and measures what users feel: end-to-end latency from the client's end of DATA to
//! the call request arriving, durable throughput, a storm of duplicates, memory (RSS from
//! /proc) and startup time. Every mail carries `BENCH-<n>` in its subject so the sink can
//! match arrivals to sends. Only loopback addresses; every loop is bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Arrival time of each `BENCH-<n>` at the sink.
#[derive(Default)]
struct Sink {
    arrivals: Mutex<HashMap<u64, Instant>>,
    /// Each call gets its own SID, as from Twilio (mailcall refuses to record one SID
    /// for two requests).
    next_sid: std::sync::atomic::AtomicU64,
}

/// The `<n>` of `BENCH-<n>` in a notification: mailrise posts the subject as it is;
/// mailcall posts a form whose TwiML speaks it ("BENCH 1 2 3": digits are read one by
/// one).
fn bench_id(body: &[u8]) -> Option<u64> {
    let text = match serde_urlencoded::from_bytes::<Vec<(String, String)>>(body) {
        Ok(form) if form.iter().any(|(k, _)| k == "Twiml") => form
            .into_iter()
            .find(|(k, _)| k == "Twiml")
            .map(|(_, v)| v)
            .unwrap_or_default(),
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let at = text.find("BENCH")? + "BENCH".len();
    let digits: String = text[at..]
        .chars()
        .skip_while(|c| *c == '-' || *c == ' ')
        .take_while(|c| c.is_ascii_digit() || *c == ' ')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

async fn record(State(sink): State<Arc<Sink>>, body: Bytes) -> impl IntoResponse {
    let now = Instant::now();
    if let Some(id) = bench_id(&body) {
        sink.arrivals.lock().unwrap().entry(id).or_insert(now);
    }
    let sid = sink
        .next_sid
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (
        StatusCode::CREATED,
        format!(r#"{{"sid":"CA{sid:032x}","status":"queued"}}"#),
    )
}

impl Sink {
    fn count(&self, range: std::ops::Range<u64>) -> usize {
        let a = self.arrivals.lock().unwrap();
        range.filter(|id| a.contains_key(id)).count()
    }

    fn wait(
        &self,
        range: std::ops::Range<u64>,
        expected: usize,
        timeout: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count(range.clone()) >= expected {
                let a = self.arrivals.lock().unwrap();
                return range.filter_map(|id| a.get(&id).copied()).max();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

/// A running gateway under test.
struct Gateway {
    name: &'static str,
    child: Child,
    smtp: SocketAddr,
    /// The address recipients must use.
    rcpt: &'static str,
}

impl Gateway {
    fn rss_kib(&self) -> u64 {
        proc_status(self.child.id(), "VmRSS:")
    }

    fn peak_kib(&self) -> u64 {
        proc_status(self.child.id(), "VmHWM:")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).map(|l| {
                l[key.len()..]
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for the SMTP greeting; returns how long it took from `started`.
fn wait_greeting(addr: SocketAddr, started: Instant, timeout: Duration) -> Duration {
    let deadline = started + timeout;
    loop {
        if let Ok(s) = std::net::TcpStream::connect(addr) {
            let mut r = std::io::BufReader::new(s);
            let mut line = String::new();
            if std::io::BufRead::read_line(&mut r, &mut line).is_ok() && line.starts_with("220") {
                return started.elapsed();
            }
        }
        assert!(Instant::now() < deadline, "no SMTP greeting from {addr}");
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn start_mailcall(bin: &Path, dir: &Path, sink: SocketAddr) -> (Gateway, Duration) {
    let port = free_port();
    // `phone<d>` at the end of a subject rings phone d: mailcall places one request per
    // phone at a time, so how many phones a load rings bounds how fast it is dispatched.
    let phones: String = (0..10)
        .map(|d| {
            format!("[[rule]]\nname = \"phone{d}\"\nsubject = 'phone{d}$'\ncall = [\"+150055500{:02}\"]\n", 10 + d)
        })
        .collect();
    let config = format!(
        r#"[smtp]
listen = "127.0.0.1:{port}"
hostname = "bench.local"
max_connections = 3000
max_connections_per_ip = 3000
[twilio]
from = "+15005550006"
api_base = "http://{sink}"
[limits]
max_calls_per_hour = 100000000
[state]
path = "bench.db"
[[rule]]
name = "storm"
subject = '(?P<problem>problem \d+)'
call = ["+15005550001"]
dedup_key = "{{problem}}"
cooldown = "1h"
{phones}[[rule]]
name = "all"
call = ["+15005550001"]
"#
    );
    std::fs::write(dir.join("rules.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("mailcall.log")).unwrap();
    let started = Instant::now();
    let child = Command::new(bin)
        .args([
            "--config",
            dir.join("rules.toml").to_str().unwrap(),
            "serve",
        ])
        .env("TWILIO_ACCOUNT_SID", "ACbench")
        .env("TWILIO_AUTH_TOKEN", "bench")
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let startup = wait_greeting(smtp, started, Duration::from_secs(20));
    (
        Gateway {
            name: "mailcall",
            child,
            smtp,
            rcpt: "alerts@example.com",
        },
        startup,
    )
}

fn start_mailrise(bin: &Path, dir: &Path, sink: SocketAddr) -> Gateway {
    let port = free_port();
    let config = format!(
        "listen:\n  host: 127.0.0.1\n  port: {port}\nconfigs:\n  alerts:\n    urls:\n      - json://{sink}/mailrise\n"
    );
    std::fs::write(dir.join("mailrise.yaml"), config).unwrap();
    let started = Instant::now();
    let child = Command::new(bin)
        .arg(dir.join("mailrise.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_greeting(smtp, started, Duration::from_secs(30));
    Gateway {
        name: "mailrise",
        child,
        smtp,
        rcpt: "alerts@mailrise.xyz",
    }
}

/// A minimal SMTP client for load: one EHLO, then transactions.
struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (r, w) = stream.into_split();
        let mut c = Client {
            reader: BufReader::new(r),
            writer: w,
            line: String::new(),
        };
        c.reply().await;
        c.command("EHLO bench.client").await;
        c
    }

    async fn reply(&mut self) -> u16 {
        loop {
            self.line.clear();
            let n = self.reader.read_line(&mut self.line).await.unwrap();
            assert!(n > 0, "connection closed");
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return self.line[..3].parse().unwrap();
            }
        }
    }

    async fn command(&mut self, line: &str) -> u16 {
        self.writer.write_all(line.as_bytes()).await.unwrap();
        self.writer.write_all(b"\r\n").await.unwrap();
        self.reply().await
    }

    /// Sends one mail; returns when its DATA was finished being sent (the latency
    /// start) after the server's final answer (which must be 250).
    async fn send(&mut self, rcpt: &str, id: u64, subject: &str) -> Instant {
        assert_eq!(self.command("MAIL FROM:<monitor@bench.example>").await, 250);
        assert_eq!(self.command(&format!("RCPT TO:<{rcpt}>")).await, 250);
        assert_eq!(self.command("DATA").await, 354);
        let body = format!(
            "From: monitor@bench.example\r\nTo: {rcpt}\r\nSubject: BENCH-{id} {subject}\r\nMessage-ID: <{id}@bench.example>\r\n\r\nhost db{id} does not answer\r\n.\r\n"
        );
        self.writer.write_all(body.as_bytes()).await.unwrap();
        let sent = Instant::now();
        let code = self.reply().await;
        assert_eq!(code, 250, "mail {id} refused: {}", self.line);
        sent
    }
}

/// Sends `count` mails from `first` over `connections` connections as fast as possible;
/// returns when the last 250 arrived.
async fn blast(
    gw: &Gateway,
    first: u64,
    count: u64,
    connections: u64,
    subject: impl Fn(u64) -> String + Send + Sync + 'static,
) -> Instant {
    let subject = Arc::new(subject);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (addr, rcpt, subject) = (gw.smtp, gw.rcpt, Arc::clone(&subject));
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut id = first + c;
            while id < first + count {
                client.send(rcpt, id, &subject(id)).await;
                id += connections;
            }
            let _ = client.command("QUIT").await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Instant::now()
}

struct Throughput {
    accepted_per_s: f64,
    dispatched_per_s: f64,
}

/// Sends `count` distinct alerts over `connections` connections, each ringing one of
/// `phones` phones (a distinct incident each).
async fn throughput(
    gw: &Gateway,
    sink: &Sink,
    first: u64,
    count: u64,
    connections: u64,
    phones: u64,
) -> Throughput {
    let started = Instant::now();
    let accepted = blast(gw, first, count, connections, move |id| {
        format!("db{id} is DOWN phone{}", id % phones)
    })
    .await;
    let last = tokio::task::block_in_place(|| {
        sink.wait(
            first..first + count,
            count as usize,
            Duration::from_secs(120),
        )
    })
    .unwrap_or_else(|| {
        panic!(
            "{}: only {} of {count} arrived",
            gw.name,
            sink.count(first..first + count)
        )
    });
    Throughput {
        accepted_per_s: count as f64 / (accepted - started).as_secs_f64(),
        dispatched_per_s: count as f64 / (last.max(accepted) - started).as_secs_f64(),
    }
}

struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// `count` mails at a steady `rate` per second over one connection.
async fn latency(gw: &Gateway, sink: &Sink, first: u64, count: u64, rate: u64) -> Latency {
    let mut client = Client::connect(gw.smtp).await;
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let mut sent = HashMap::new();
    for i in 0..count {
        tokio::time::sleep_until(start + period * u32::try_from(i).unwrap()).await;
        let id = first + i;
        sent.insert(
            id,
            client.send(gw.rcpt, id, &format!("web{id} is DOWN")).await,
        );
    }
    tokio::task::block_in_place(|| {
        sink.wait(
            first..first + count,
            count as usize,
            Duration::from_secs(60),
        )
    })
    .unwrap_or_else(|| {
        panic!(
            "{}: only {} of {count} arrived",
            gw.name,
            sink.count(first..first + count)
        )
    });
    let arrivals = sink.arrivals.lock().unwrap();
    let mut lat: Vec<Duration> = sent
        .iter()
        .map(|(id, t)| arrivals[id].saturating_duration_since(*t))
        .collect();
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Latency {
        p50: pick(0.50),
        p99: pick(0.99),
        max: *lat.last().unwrap(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut mailcall = PathBuf::from("target/release/mailcall");
    let mut mailrise = None;
    let mut quick = false;
    let mut only: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--only" => only = args.next(),
            "--mailcall" => mailcall = PathBuf::from(args.next().unwrap()),
            "--mailrise" => mailrise = Some(PathBuf::from(args.next().unwrap())),
            "--quick" => quick = true,
            other => panic!("unknown argument {other}; see bench/run.sh"),
        }
    }
    let scale = if quick { 10 } else { 1 };

    let sink = Arc::new(Sink::default());
    let app = Router::new()
        .route("/2010-04-01/Accounts/{sid}/Calls.json", post(record))
        // Asked who answered: nobody did, and the call is over (so it is asked once).
        .route(
            "/2010-04-01/Accounts/{sid}/Calls/{call}",
            axum::routing::get(|| async { r#"{"status":"no-answer","answered_by":null}"# }),
        )
        .route("/mailrise", post(record))
        .with_state(Arc::clone(&sink));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    println!(
        "# mailcall benchmark ({})\n",
        if quick { "quick run" } else { "full run" }
    );
    let dir = tempfile::tempdir().unwrap();

    // Startup: exec → SMTP greeting, first start (creates the store) and restarts.
    let mut startups = Vec::new();
    for _ in 0..11 {
        let (gw, startup) = start_mailcall(&mailcall, dir.path(), sink_addr);
        startups.push(startup);
        drop(gw);
    }
    let first_start = startups.remove(0);
    startups.sort();
    println!(
        "startup (exec → 220 greeting): first start {} / restart median {}",
        ms(first_start),
        ms(startups[startups.len() / 2])
    );

    let (gw, _) = start_mailcall(&mailcall, dir.path(), sink_addr);
    std::thread::sleep(Duration::from_secs(1));
    println!("idle RSS: {}", mib(gw.rss_kib()));

    let mut next_id = 1_000_000;
    if only.as_deref() == Some("throughput20") {
        let t = throughput(&gw, &sink, next_id, 40000 / scale, 20, 10).await;
        println!(
            "throughput, 20 connections: {:.0} accepted/s, {:.0} dispatched/s",
            t.accepted_per_s, t.dispatched_per_s
        );
        return;
    }
    let lat = latency(&gw, &sink, next_id, 2000 / scale, 100).await;
    next_id += 100_000;
    println!(
        "latency at 100 alerts/s (end of DATA → Calls.json request): p50 {} p99 {} max {}",
        ms(lat.p50),
        ms(lat.p99),
        ms(lat.max)
    );
    if only.as_deref() == Some("latency") {
        return;
    }

    let t1 = throughput(&gw, &sink, next_id, 3000 / scale, 1, 10).await;
    next_id += 100_000;
    println!(
        "throughput, 1 connection: {:.0} accepted/s, {:.0} dispatched/s",
        t1.accepted_per_s, t1.dispatched_per_s
    );
    let t20 = throughput(&gw, &sink, next_id, 20000 / scale, 20, 10).await;
    next_id += 100_000;
    println!(
        "throughput, 20 connections: {:.0} accepted/s, {:.0} dispatched/s",
        t20.accepted_per_s, t20.dispatched_per_s
    );
    let one = throughput(&gw, &sink, next_id, 5000 / scale, 20, 1).await;
    next_id += 100_000;
    println!(
        "throughput, 20 connections, every incident ringing one phone: {:.0} accepted/s, {:.0} dispatched/s",
        one.accepted_per_s, one.dispatched_per_s
    );
    drop(gw);

    // Storm: 10,000 mails about 50 problems, on a fresh store, with RSS sampled.
    let storm_dir = tempfile::tempdir().unwrap();
    let (gw, _) = start_mailcall(&mailcall, storm_dir.path(), sink_addr);
    std::thread::sleep(Duration::from_millis(300));
    let pid = gw.child.id();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        std::thread::spawn(move || {
            let mut max = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(proc_status(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        })
    };
    let storm_n = 10_000 / scale;
    let started = Instant::now();
    blast(&gw, next_id, storm_n, 20, |id| {
        format!("problem {} on db", id % 50)
    })
    .await;
    let stored = started.elapsed();
    // Every problem's call arrives once; the other mails only join incidents.
    let storm_first = next_id;
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink.count(storm_first..storm_first + storm_n) < 50 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let storm_peak = sampler.join().unwrap().max(gw.peak_kib());
    let calls = sink.count(storm_first..storm_first + storm_n);
    let incidents = Command::new(&mailcall)
        .args([
            "--config",
            storm_dir.path().join("rules.toml").to_str().unwrap(),
            "incidents",
            "--json",
            "--limit",
            "100000",
        ])
        .output()
        .unwrap();
    let incident_count = String::from_utf8_lossy(&incidents.stdout).lines().count();
    println!(
        "storm: {storm_n} mails about 50 problems stored in {} → {incident_count} incidents, {calls} calls; peak RSS {}; RSS after {}",
        ms(stored),
        mib(storm_peak),
        mib(gw.rss_kib())
    );
    next_id += 100_000;

    // 1,000 idle SMTP connections.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let s = TcpStream::connect(gw.smtp).await.unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        idle.push(r);
    }
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "RSS with 1,000 idle SMTP connections: {}",
        mib(gw.rss_kib())
    );
    drop(idle);
    drop(gw);

    let Some(mailrise) = mailrise else {
        println!("\n(mailrise not given: no comparison)");
        return;
    };
    let mr_dir = tempfile::tempdir().unwrap();
    let gw = start_mailrise(&mailrise, mr_dir.path(), sink_addr);
    std::thread::sleep(Duration::from_secs(1));
    println!("\nmailrise idle RSS: {}", mib(gw.rss_kib()));
    let mr_lat = latency(&gw, &sink, next_id, 1000 / scale, 100).await;
    next_id += 100_000;
    println!(
        "mailrise latency at 100 alerts/s: p50 {} p99 {} max {}",
        ms(mr_lat.p50),
        ms(mr_lat.p99),
        ms(mr_lat.max)
    );
    let mr1 = throughput(&gw, &sink, next_id, 1000 / scale, 1, 10).await;
    next_id += 100_000;
    println!(
        "mailrise throughput, 1 connection: {:.0} accepted/s, {:.0} dispatched/s",
        mr1.accepted_per_s, mr1.dispatched_per_s
    );
    let mr20 = throughput(&gw, &sink, next_id, 3000 / scale, 20, 10).await;
    println!(
        "mailrise throughput, 20 connections: {:.0} accepted/s, {:.0} dispatched/s",
        mr20.accepted_per_s, mr20.dispatched_per_s
    );
    println!(
        "\nratios mailcall/mailrise (ten phones): throughput 1 conn ×{:.1}, 20 conns ×{:.1}; p50 latency ×{:.2}, p99 latency ×{:.2} (lower is better for latency)",
        t1.dispatched_per_s / mr1.dispatched_per_s,
        t20.dispatched_per_s / mr20.dispatched_per_s,
        lat.p50.as_secs_f64() / mr_lat.p50.as_secs_f64(),
        lat.p99.as_secs_f64() / mr_lat.p99.as_secs_f64(),
    );
}
