//! Review of issues 13 ("bounded under any input") and 14 ("speak real alerts well"):
//! each test here reproduces one defect found by attacking the change over real sockets,
//! with the real binary and the fake Twilio. Each doc comment describes the defect as it
//! was found; the test is named for, and asserts, the behaviour that fixed it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;

use crate::fake_twilio::FakeTwilio;
use crate::harness::{BIN, Daemon, TEST_SENDGRID_PASSWORD, config, mail, workdir};

const SENDER: &str = "monitor@monitoring.example.com";
const RCPT: &str = "alerts@example.com";
const BOUNDARY: &str = "xYzZY";

/// Polls `done` every 50 ms until it holds or `timeout` passes; whether it held.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTML-only mail, as Alertmanager and most SaaS monitors send.
fn html_mail(subject: &str, html: &str) -> Vec<u8> {
    format!(
        "From: Monitor <{SENDER}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
    )
    .into_bytes()
}

/// A TCP connection to `to` from `from` (any address of 127.0.0.0/8), so that a test can
/// play several clients.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
            .await
            .expect("connect timed out")
            .unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Reads an HTTP answer's status line and headers, waiting at most `timeout`; `None` if
/// none came in time.
fn read_head(stream: &mut TcpStream, timeout: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, text))
}

/// `GET /healthz` over a fresh connection; the status, if one came within `timeout`.
fn healthz(addr: SocketAddr, timeout: Duration) -> Option<u16> {
    let mut s = connect_from(Ipv4Addr::LOCALHOST, addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    read_head(&mut s, timeout).map(|(status, _)| status)
}

/// A multipart/form-data body the way SendGrid Inbound Parse builds it.
fn sendgrid_body(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// A raw-mode SendGrid post of `mail` to `alerts@example.com`.
fn sendgrid_raw(mail: &[u8]) -> Vec<u8> {
    sendgrid_body(&[
        ("email", mail),
        (
            "envelope",
            br#"{"to":["alerts@example.com"],"from":"monitor@monitoring.example.com"}"#,
        ),
    ])
}

/// The head of a SendGrid post to `/sendgrid/inbound` announcing `length` bytes.
fn sendgrid_head(length: usize, extra_headers: &str) -> String {
    format!(
        "POST /sendgrid/inbound HTTP/1.1\r\nHost: t\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\
         {extra_headers}\r\n"
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// SendGrid's signature headers for `body` signed by `key` at `ts`.
fn signature_headers(key: &SigningKey, ts: u64, body: &[u8]) -> String {
    let mut signed = ts.to_string().into_bytes();
    signed.extend_from_slice(body);
    let sig: Signature = key.sign(&signed);
    format!(
        "X-Twilio-Email-Event-Webhook-Signature: {}\r\nX-Twilio-Email-Event-Webhook-Timestamp: {ts}\r\n",
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    )
}

/// The peak resident set of a process, in KiB (`VmHWM` in `/proc/<pid>/status`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("no VmHWM in /proc/<pid>/status")
}

/// `mailcall route --json` of one mail on stdin with the shipped `rules.toml`.
fn route_with_shipped_rules(raw: &[u8]) -> serde_json::Value {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules.toml");
    let mut child = std::process::Command::new(BIN)
        .args(["--config", rules, "route", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(raw).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "route failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

// ---- Bounded under any input ---------------------------------------------------------

/// html5ever's tree builder looks through the whole stack of open elements for each tag,
/// so nested `<ul><li>` cost time quadratic in their depth, and `html_to_text` takes up
/// to 1 MiB of HTML. A 240 KB mail (under a fortieth of `max_message_bytes`) keeps the
/// router busy ~2 minutes in a debug build (release: 12 s; 320 KB: 33 s; the 1 MiB cap:
/// ~6 min), and every alert stored after it waits: the next real outage rings minutes
/// late. Under systemd the router's heartbeat goes stale, the watchdog kills the daemon,
/// and after three restarts the mail is set aside — never called.
#[test]
fn a_deeply_nested_html_mail_does_not_hold_up_the_alerts_after_it() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\ncooldown = \"0s\"\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    let hostile = html_mail("weekly report", &"<ul><li>".repeat(30_000));
    let (code, text) = smtp.send(SENDER, &[RCPT], &hostile);
    assert_eq!(code, 250, "{text}");
    smtp.alert("db1.example.com is DOWN");
    let rang = wait_for(Duration::from_secs(10), || {
        twilio
            .calls()
            .iter()
            .any(|c| c.twiml.contains("db1 dot example dot com is DOWN"))
    });
    assert!(
        rang,
        "the outage stored right after a 240 KB HTML mail was not called within 10 s: the router is still parsing the HTML"
    );
}

/// The SendGrid handler parses the mail (`sendgrid::from_fields` → `Alert::from_mime`,
/// HTML conversion included) on the async worker that serves the request, against the
/// invariant that parsing mail runs on `spawn_blocking`. Anyone can mail the domain whose
/// MX is SendGrid, and SendGrid posts it with valid credentials: a few HTML mails then
/// hold every runtime worker, and nothing else is served — not `/healthz`, not SMTP.
#[test]
fn sendgrid_mail_is_parsed_off_the_async_workers() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let extra = "[http]\nlisten = \"127.0.0.1:0\"\n\
                 [sendgrid]\nusername = \"sendgrid\"\npassword_env = \"MAILCALL_TEST_SENDGRID_PASSWORD\"\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), extra), false);
    let addr = daemon.http.unwrap();
    assert_eq!(healthz(addr, Duration::from_secs(5)), Some(200));
    let auth = format!(
        "Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD
            .encode(format!("sendgrid:{TEST_SENDGRID_PASSWORD}"))
    );
    // Each takes ~8.6 s to parse in a release build (minutes in a debug build).
    let body = sendgrid_raw(&html_mail("newsletter", &"<ul><li>".repeat(25_000)));
    // More posts than the runtime has workers (one per CPU); each parse holds ~90 MB,
    // so a big machine is not sent more than ten.
    let posts = (std::thread::available_parallelism().map_or(2, usize::from) + 2).min(10);
    let mut held = Vec::new();
    for _ in 0..posts {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, addr);
        s.write_all(sendgrid_head(body.len(), &auth).as_bytes())
            .unwrap();
        s.write_all(&body).unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    let status = healthz(addr, Duration::from_secs(5));
    assert_eq!(
        status,
        Some(200),
        "/healthz did not answer within 5 s while {posts} SendGrid posts were being parsed"
    );
}

/// SendGrid's byte budget (64 MiB for all posts) is reserved from the *announced*
/// `Content-Length` before the body is read, and only the signature headers' form and
/// age are checked first (the signature itself needs the body). So a client with any
/// well-formed signature — made with any key — and a fresh timestamp reserves 40 MiB
/// and a second 24 MiB, sends a few bytes and stalls until `request_timeout`: every
/// real post (10 KiB, properly signed) waits 10 s and gets `503`. Two connections,
/// renewed every 30 s, keep SendGrid out for good.
#[test]
fn two_slow_posts_with_forged_signatures_do_not_starve_sendgrid() {
    let twilio = FakeTwilio::start();
    let signing = SigningKey::from_bytes(&[42u8; 32].into()).unwrap();
    let der = signing.verifying_key().to_public_key_der().unwrap();
    let public_key = base64::engine::general_purpose::STANDARD.encode(der.as_bytes());
    let dir = workdir();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[sendgrid]\npublic_key = \"{public_key}\"\n\
         [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n"
    );
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), &extra), false);
    let addr = daemon.http.unwrap();
    let forger = SigningKey::from_bytes(&[7u8; 32].into()).unwrap();
    let mut attackers = Vec::new();
    for (from, length) in [
        (Ipv4Addr::new(127, 0, 0, 2), 40 << 20),
        (Ipv4Addr::new(127, 0, 0, 3), 24 << 20),
    ] {
        let mut s = connect_from(from, addr);
        let forged = signature_headers(&forger, unix_now(), b"anything");
        s.write_all(sendgrid_head(length, &forged).as_bytes())
            .unwrap();
        s.write_all(&[b'a'; 1024]).unwrap();
        attackers.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let body = sendgrid_raw(&mail("db1.example.com is DOWN", &"x".repeat(10_000)));
    let mut s = connect_from(Ipv4Addr::LOCALHOST, addr);
    let signed = signature_headers(&signing, unix_now(), &body);
    s.write_all(sendgrid_head(body.len(), &signed).as_bytes())
        .unwrap();
    s.write_all(&body).unwrap();
    let answer = read_head(&mut s, Duration::from_secs(20));
    assert_eq!(
        answer.as_ref().map(|a| a.0),
        Some(200),
        "a signed 10 KiB SendGrid post was refused while two posts with forged signatures sat on the byte budget: {answer:?}"
    );
}

/// With the defaults (`max_connections = 200`, `max_connections_per_ip = 100`), one
/// address may hold twice its per-address cap — 200 greeted sessions — which is every
/// place there is: every other sender, the real monitoring included, gets `421` (and a
/// Postfix relay then holds back all its mail for 5 minutes). Before issue 13 one address
/// could take only 20 of the 200.
#[test]
fn one_address_cannot_take_every_smtp_place_with_the_default_limits() {
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &config(None, rules), true);
    let greeting = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        line
    };
    let mut held = Vec::new();
    let mut greeted = 0;
    for _ in 0..200 {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, daemon.smtp);
        if greeting(&mut s).starts_with("220") {
            greeted += 1;
        }
        held.push(s);
    }
    assert!(
        greeted < 200,
        "one address was greeted on all {greeted} places"
    );
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), daemon.smtp);
    let line = greeting(&mut other);
    assert!(
        line.starts_with("220"),
        "another address, with no session open, was turned away: {line:?}"
    );
}

/// `Report::healthy` counts a full store as unhealthy, and the systemd watchdog is pinged
/// only while the report is healthy. But a full store (open incidents fill `max_bytes`)
/// is a state the daemon is designed to work through — mail is deferred with `452`,
/// accepted alerts are still called — and a restart frees nothing: systemd kills
/// mailcall (SIGABRT, `WatchdogSec=30s`) in the middle of its calls, again and again
/// while the store stays full. README promises the watchdog only for stuck workers, a
/// dead SMTP listener and a store that cannot commit.
#[test]
fn a_full_store_keeps_the_watchdog_fed() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let rules = "[http]\nlisten = \"127.0.0.1:0\"\n[state]\nmax_bytes = 1048576\n\
                 [limits]\nmax_calls_per_hour = 1000\n[defaults]\nround_interval = \"1h\"\nrounds = 1\n\
                 [[rule]]\nname = \"down\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\"]\ndedup_key = \"{host}\"\n";
    std::fs::write(dir.path().join("rules.toml"), config(Some(&twilio), rules)).unwrap();
    let daemon = Daemon::launch_with_env(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let pings = |within: Duration| {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 512];
        let mut n = 0;
        while Instant::now() < deadline {
            if let Ok(len) = socket.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..len]).contains("WATCHDOG=1")
            {
                n += 1;
            }
        }
        n
    };
    assert!(
        pings(Duration::from_secs(2)) >= 2,
        "no watchdog pings at start"
    );
    // Open problems fill the store until a mail is deferred.
    let mut smtp = daemon.smtp();
    let body = "y".repeat(150_000);
    let mut deferred = None;
    for i in 0..20 {
        let (code, text) = smtp.send(SENDER, &[RCPT], &mail(&format!("web{i} is DOWN"), &body));
        if code != 250 {
            deferred = Some((code, text));
            break;
        }
    }
    let (code, text) = deferred.expect("open incidents must fill the store");
    assert_eq!(code, 452, "{text}");
    // Every accepted alert is still being called; the daemon is doing its job.
    pings(Duration::from_millis(500));
    let n = pings(Duration::from_secs(2));
    assert!(
        n >= 3,
        "{n} watchdog pings in 2 s (every 150 ms expected) while the store is full: systemd would kill the daemon; log:\n{}",
        daemon
            .logs()
            .lines()
            .filter(|l| l.contains("watchdog"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// mail-parser keeps a structure per MIME part, ~20 times the part's size for tiny
/// parts, and the router parses the whole stored mail although routing needs only the
/// headers and the first text part. One 10 MB mail (under `max_message_bytes`) of a
/// million empty parts takes the daemon to ~220 MB (a plain 10 MB mail: ~58 MB); the
/// issue's own bound is 128 MiB. Through SendGrid (40 MiB bodies, parsed in the request
/// handler) the same shape costs ~730 MB per post.
#[test]
fn a_mail_of_a_million_tiny_mime_parts_stays_under_128_mib() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut raw = format!(
        "From: Monitor <{SENDER}>\r\nTo: {RCPT}\r\nSubject: db1 report\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..1_000_000 {
        raw.extend_from_slice(b"--b\r\n\r\nx\r\n");
    }
    raw.extend_from_slice(b"--b--\r\n");
    let mut smtp = daemon.smtp();
    let (code, text) = smtp.send(SENDER, &[RCPT], &raw);
    assert_eq!(code, 250, "{text}");
    drop(raw);
    twilio.wait_until(Duration::from_secs(20), |c| c.len() == 1);
    let peak = peak_rss_kib(daemon.pid());
    assert!(
        peak < 128 * 1024,
        "routing one 10 MB mail took the daemon's resident memory to {} MiB",
        peak / 1024
    );
}

// ---- Speak real alerts well ------------------------------------------------------------

/// A port is spoken as a port (a colon, digit by digit) only after a host name with a
/// dot or `localhost`: `db1:9100` — the shape of the shipped rules.toml's own
/// Alertmanager example, `[FIRING:2] HostDown (db1:9100 node critical)`, and of most
/// Prometheus `instance` labels (`node-exporter:9100`, `redis-0:6379`) — becomes
/// "db1 9100", which the voice reads as "nine thousand one hundred", with no colon.
#[test]
fn a_port_after_a_short_host_name_is_read_as_a_port() {
    let raw = b"From: alertmanager@monitoring.example.com\r\nTo: alerts@example.com\r\n\
                Subject: [FIRING:1] HostDown (db1:9100 node critical)\r\n\r\nInstance db1:9100 down\r\n";
    let decision = route_with_shipped_rules(raw);
    assert_eq!(decision["rule"], "alertmanager", "{decision}");
    let message = decision["message"].as_str().unwrap();
    assert!(
        message.contains("db1 colon 9 1 0 0"),
        "the port is not spoken as one: {message:?}"
    );
}

/// `store_full` is set by the insert that did not fit and cleared only by one that does:
/// nothing else looks again. Once the open incidents that filled the store have ended
/// (here: unanswered after their one round), nothing open fills it and the next mail
/// would make room, yet `/healthz` keeps answering 503 `"store_full": true` (and
/// `mailcall status` exits 1, and the watchdog stays silent) until some sender happens
/// to retry — a relay may wait many minutes.
#[test]
fn store_full_ends_with_the_incidents_that_filled_the_store() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[http]\nlisten = \"127.0.0.1:0\"\n[state]\nmax_bytes = 1048576\n\
                 [limits]\nmax_calls_per_hour = 1000\n[defaults]\nround_interval = \"500ms\"\nrounds = 1\n\
                 [[rule]]\nname = \"down\"\nsubject = '(?P<host>\\S+) is DOWN'\ncall = [\"alice\"]\ndedup_key = \"{host}\"\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let addr = daemon.http.unwrap();
    let mut smtp = daemon.smtp();
    let body = "y".repeat(150_000);
    let mut deferred = None;
    let mut accepted = 0;
    for i in 0..20 {
        let (code, text) = smtp.send(SENDER, &[RCPT], &mail(&format!("web{i} is DOWN"), &body));
        if code != 250 {
            deferred = Some((code, text));
            break;
        }
        accepted += 1;
    }
    let (code, text) = deferred.expect("open incidents must fill the store");
    assert_eq!(code, 452, "{text}");
    assert!(accepted >= 2, "the store took {accepted} mails");
    // Every incident ends unanswered after its one round: nothing open is left. (Once
    // they have ended, the store may delete them at any moment to make room.)
    let closed = wait_for(Duration::from_secs(15), || {
        crate::harness::incidents(dir.path())
            .iter()
            .all(|i| i["status"] == "unanswered")
            && twilio.created().len() >= accepted
    });
    assert!(closed, "the incidents never ended");
    // The store is looked at again every second while it is full.
    let mut last = None;
    let healthy = wait_for(Duration::from_secs(5), || {
        let (status, health) = crate::harness::http_get(&format!("http://{addr}/healthz"));
        last = Some(health);
        status == 200
    });
    assert!(
        healthy,
        "no incident is open any more, but /healthz still says the store is full: {last:?}"
    );
}

/// An answered incident is `bridged`, and only a recovery mail closes a bridged incident;
/// otherwise it counts as live for the whole `retain` period (30 days) and `make_room`
/// never deletes it. Half of the corpus's tools never send a recovery (cron, smartd,
/// mdadm, Sentry): every such incident somebody answered stays in the store as if open,
/// and under `max_bytes` they fill it — from then on every alert, the next real outage
/// included, is refused with `452` although no incident is open, for up to a month.
#[test]
fn answered_incidents_without_a_recovery_give_way_under_pressure() {
    let twilio = FakeTwilio::start();
    twilio.answer(
        "+15005550001",
        crate::fake_twilio::Answer {
            answered_by: "human",
            joins: true,
        },
    );
    let dir = workdir();
    let rules = "[state]\nmax_bytes = 1048576\n[limits]\nmax_calls_per_hour = 1000\n\
                 [[rule]]\nname = \"cron\"\nsubject = '^Cron <root@(?P<host>[^>]+)>'\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    let output = "backup failed\n".repeat(10_000);
    let mut accepted = 0;
    for i in 0..10 {
        let subject = format!("Cron <root@db{i}> /usr/local/bin/backup-db.sh");
        let (code, _) = smtp.send(SENDER, &[RCPT], &mail(&subject, &output));
        if code != 250 {
            break;
        }
        accepted += 1;
    }
    assert!(accepted >= 2, "the store took {accepted} mails");
    // Somebody answered each call: every incident is bridged, none is open.
    let bridged = wait_for(Duration::from_secs(20), || {
        let list = crate::harness::incidents(dir.path());
        list.len() == accepted && list.iter().all(|i| i["status"] == "bridged")
    });
    assert!(bridged, "the answered incidents never became bridged");
    // Each of them hangs up once they have dealt with it; no recovery ever comes. Once
    // mailcall has seen the bridges end, they are closed data: room for new mail.
    for call in twilio.created() {
        twilio.hang_up(call.sid.as_deref().unwrap());
    }
    let over = wait_for(Duration::from_secs(30), || {
        crate::harness::incidents(dir.path()).iter().all(|i| {
            i["calls"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["twilio_status"] == "completed")
        })
    });
    assert!(over, "mailcall never saw the bridges end");
    let (code, text) = smtp.send(
        SENDER,
        &[RCPT],
        &mail("Cron <root@web1> /usr/local/bin/rotate.sh", &output),
    );
    assert_eq!(
        code, 250,
        "mail refused while the store holds no open incident, only {accepted} answered ones: {text}"
    );
}

/// `/twilio/*` callbacks read their whole body (up to `max_body_bytes`, 1 MiB) before
/// anything is checked, even when the request has no `X-Twilio-Signature` header at all
/// and so no chance: an unauthenticated client announcing 1 MiB and sending nothing more
/// holds its connection until `request_timeout` (30 s), and 500 of them (25 addresses ×
/// 20) hold 500 MiB once they send. The missing header could be refused (403) from the
/// headers alone, as SendGrid's are.
#[test]
fn an_unsigned_twilio_callback_is_refused_before_its_body_is_read() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let cfg = config(
        Some(&twilio),
        "[http]\nlisten = \"127.0.0.1:0\"\n[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n",
    )
    .replace(
        "ring_seconds = 25\n",
        "ring_seconds = 25\npublic_url = \"https://alerts.example.com\"\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let mut s = connect_from(Ipv4Addr::LOCALHOST, daemon.http.unwrap());
    s.write_all(
        b"POST /twilio/status HTTP/1.1\r\nHost: alerts.example.com\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1048576\r\n\r\nCallSid=CA",
    )
    .unwrap();
    let answer = read_head(&mut s, Duration::from_secs(5));
    assert_eq!(
        answer.as_ref().map(|a| a.0),
        Some(403),
        "a callback without any signature header is still waiting for its 1 MiB body: {answer:?}"
    );
    // One that carries a signature header and says its body is over the limit gets the
    // standard answer for that, 413 (not 400).
    let mut s = connect_from(Ipv4Addr::LOCALHOST, daemon.http.unwrap());
    s.write_all(
        b"POST /twilio/status HTTP/1.1\r\nHost: alerts.example.com\r\nX-Twilio-Signature: x\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 2097152\r\n\r\nCallSid=CA",
    )
    .unwrap();
    let answer = read_head(&mut s, Duration::from_secs(5));
    assert_eq!(answer.as_ref().map(|a| a.0), Some(413), "{answer:?}");
}

/// Bytes of the store holding data, as `retention::data_bytes` counts them.
fn store_data_bytes(dir: &std::path::Path) -> u64 {
    let db = rusqlite::Connection::open_with_flags(
        dir.join("mailcall.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let pragma = |name: &str| -> u64 {
        db.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
            .unwrap()
            .try_into()
            .unwrap()
    };
    (pragma("page_count") - pragma("freelist_count")) * pragma("page_size")
}

/// `make_room` deletes at most 20 × 8 incidents and 20 × 8 unattached alerts for the mail
/// that needs the room, then gives up and answers `Full`. A 1 MiB store 80 % full of
/// nothing but dropped mail (~340 small mails: closed data, all of it deletable) refuses
/// a 600 KB alert (which fits with its reserve once they are gone) with `452` and reports
/// itself full, though README promises refusal "only while open incidents and unrouted
/// alerts alone fill it"; below nine tenths the pruner does not step in either, so only
/// the sender's retries (minutes apart, 160 mails deleted each) get it in.
#[test]
fn a_store_full_of_closed_data_makes_room_for_a_big_alert() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[state]\nmax_bytes = 1048576\n\
                 [[rule]]\nname = \"noise\"\nsubject = '^noise'\ndrop = true\n\
                 [[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    // Small dropped mails up to ~80 % of max_bytes (the pruner steps in above 90 %).
    let filler = "z".repeat(1500);
    let mut sent = 0;
    while store_data_bytes(dir.path()) < 820 * 1024 {
        for _ in 0..20 {
            let (code, text) = smtp.send(SENDER, &[RCPT], &mail(&format!("noise {sent}"), &filler));
            assert_eq!(code, 250, "{text}");
            sent += 1;
        }
        assert!(sent < 2000, "the store does not grow");
    }
    let big = "b".repeat(600_000);
    let (code, text) = smtp.send(SENDER, &[RCPT], &mail("db1.example.com is DOWN", &big));
    assert_eq!(
        code, 250,
        "a 600 KB alert refused while the store held only {sent} dropped mails and no open incident: {text}"
    );
}

/// The shipped `mackerel` rule and the `[Mackerel] [OK]` branch of `recoveries` both take
/// the whole rest of the subject as the dedup key, and Mackerel's subject (as the corpus
/// reconstructs it) ends with the metric's value and threshold: `cpu% 97.20 > 90.00` when
/// it fires, the recovered value (`cpu% 12.40 < 90.00`) when it is OK. The keys never
/// match, so a Mackerel recovery closes nothing and the rounds go on calling everyone for
/// a problem that is gone. (And `recoveries` is `en-US`: were it matched, the Japanese
/// bridge would hear "Resolved." and "dot" in English words.)
#[test]
fn a_mackerel_recovery_closes_its_incident() {
    let problem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/corpus/mackerel-ja.eml"
    ))
    .unwrap();
    let opened = route_with_shipped_rules(&problem);
    assert_eq!(opened["rule"], "mackerel", "{opened}");
    let recovery = "From: Mackerel <noreply@mackerel.io>\r\nTo: alerts@example.com\r\n\
                    Subject: [Mackerel] [OK] app01.example.jp - CPU使用率 cpu% 12.40 < 90.00\r\n\
                    MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\n\
                    アラートが解決しました。\r\n";
    let resolved = route_with_shipped_rules(recovery.as_bytes());
    assert_eq!(resolved["action"], "resolve", "{resolved}");
    assert_eq!(
        resolved["dedup_key"], opened["dedup_key"],
        "the recovery computes another dedup key than the problem it recovers from"
    );
}

// ---- SMTP AUTH ---------------------------------------------------------------------------

/// A line-by-line SMTP dialogue over TLS.
struct TlsDialog {
    reader: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl TlsDialog {
    fn cmd(&mut self, line: &str) -> (u16, String) {
        let stream = self.reader.get_mut();
        stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        stream.flush().unwrap();
        let mut text = String::new();
        loop {
            let mut reply = String::new();
            assert!(
                self.reader.read_line(&mut reply).unwrap() > 0,
                "connection closed; so far: {text:?}"
            );
            text.push_str(reply[4..].trim_end());
            if reply.as_bytes()[3] == b' ' {
                return (reply[..3].parse().unwrap(), text);
            }
            text.push('\n');
        }
    }
}

/// Connects, says EHLO, starts TLS trusting `cert_der`, and says EHLO again.
fn smtp_over_tls(addr: SocketAddr, cert_der: &[u8]) -> TlsDialog {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut plain = BufReader::new(tcp);
    let mut line = String::new();
    let mut expect = |plain: &mut BufReader<TcpStream>, code: &str| loop {
        line.clear();
        plain.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "{line:?}");
        if line.as_bytes()[3] == b' ' {
            break;
        }
    };
    expect(&mut plain, "220");
    plain.get_mut().write_all(b"EHLO client.test\r\n").unwrap();
    expect(&mut plain, "250");
    plain.get_mut().write_all(b"STARTTLS\r\n").unwrap();
    expect(&mut plain, "220");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let conn = rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, plain.into_inner());
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    let mut dialog = TlsDialog {
        reader: BufReader::new(stream),
    };
    let (code, ehlo) = dialog.cmd("EHLO client.test");
    assert!(code == 250 && ehlo.contains("AUTH"), "{ehlo}");
    dialog
}

/// `max_auth_failures` is checked only when a connection comes in (`Guard::admit`);
/// `authenticate` checks the password first and counts the failure after. A client that
/// opens its sessions (up to 200 from one address) before guessing gets one guess in
/// each, however many failed before: with `max_auth_failures = 3`, the 20th guess in a
/// row — the right password here — still logs in, where README promises the address is
/// "shut out" after 3.
#[test]
fn sessions_opened_before_the_auth_limit_cannot_keep_guessing() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        certified.key_pair.serialize_pem(),
    )
    .unwrap();
    let der = certified.cert.der().to_vec();
    let cfg = config(Some(&twilio), "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n").replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\nrequire_auth = true\n\
         max_auth_failures = 3\n[smtp.users]\nmonitor = \"MAILCALL_TEST_SMTP_PASSWORD\"\n",
    );
    std::fs::write(dir.path().join("rules.toml"), &cfg).unwrap();
    let daemon =
        Daemon::launch_with_env(dir.path(), &[("MAILCALL_TEST_SMTP_PASSWORD", "pa55word")]);
    let mut sessions: Vec<TlsDialog> = (0..20).map(|_| smtp_over_tls(daemon.smtp, &der)).collect();
    let plain_auth =
        |pass: &str| base64::engine::general_purpose::STANDARD.encode(format!("\0monitor\0{pass}"));
    let mut last = sessions.pop().unwrap();
    for (i, session) in sessions.iter_mut().enumerate() {
        let (code, text) = session.cmd(&format!("AUTH PLAIN {}", plain_auth(&format!("guess{i}"))));
        assert_ne!(code, 235, "{text}");
    }
    let (code, text) = last.cmd(&format!("AUTH PLAIN {}", plain_auth("pa55word")));
    assert_ne!(
        code, 235,
        "logged in on the 20th guess in a row from one address with max_auth_failures = 3: {text}"
    );
}
