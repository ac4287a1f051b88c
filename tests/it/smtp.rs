//! SMTP as relays and hostile clients speak it (issue 13): a client that never reads its
//! replies, bare-LF smuggling, relay bursts against the per-address cap, SMTPUTF8.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::fake_twilio::FakeTwilio;
use crate::harness::{Daemon, SmtpClient, config, incidents, mail, wait_incidents, workdir};

const ALL: &str = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";

/// `config` with extra `[smtp]` keys.
fn with_smtp(cfg: &str, keys: &str) -> String {
    cfg.replace(
        "hostname = \"mx.test\"\n",
        &format!("hostname = \"mx.test\"\n{keys}"),
    )
}

/// Issue 13, defect 5: SMTP writes had no timeout, so a client that never read its
/// replies held its connection slot forever.
#[test]
fn smtp_writes_time_out_so_a_client_that_never_reads_frees_its_slot() {
    let dir = workdir();
    let cfg = with_smtp(
        &config(None, ALL),
        "timeout = \"1s\"\nmax_connections_per_ip = 1\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);

    // The hog: a small receive window, and commands whose replies are ~8 times their
    // size, written until the daemon stops reading them; it never reads a byte.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut hog = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket.connect(daemon.smtp).await.unwrap()
        })
        .into_std()
        .unwrap();
    hog.set_nonblocking(false).unwrap();
    hog.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let chunk = "EHLO never.reads.example\r\n".repeat(1000);
    let started = Instant::now();
    let mut written = 0;
    while written < 64 << 20 && started.elapsed() < Duration::from_secs(20) {
        match hog.write(chunk.as_bytes()) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    assert!(
        written < 64 << 20,
        "the daemon read 64 MiB without blocking"
    );

    // Another client from the same address: the hog holds the one place that may carry
    // mail until the daemon gives up writing to it.
    let blocked = Instant::now();
    let freed = loop {
        assert!(
            blocked.elapsed() < Duration::from_secs(15),
            "the hog still holds its slot after {:?}; log:\n{}",
            blocked.elapsed(),
            daemon.logs()
        );
        let mut client = SmtpClient::connect(daemon.smtp);
        if client.greeting.0 == 220 && client.cmd("EHLO second.example").0 == 250 {
            let (code, _) = client.cmd("MAIL FROM:<m@example.com>");
            if code == 250 {
                break client;
            }
            assert_eq!(code, 451, "a deferred session hears 451");
            client.cmd("QUIT");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "wrote {written} bytes the daemon never answered in full; its slot was free {:?} later",
        blocked.elapsed()
    );
    let mut client = freed;
    assert_eq!(client.cmd("RSET").0, 250);
    client.alert("after the hog");
    daemon.wait_for_log("did not read our replies", Duration::from_secs(2));
    assert!(
        daemon
            .logs()
            .lines()
            .any(|l| l.contains("did not read our replies") && l.contains("peer=127.0.0.1")),
        "the log names the client"
    );
    drop(hog);
}

/// Issue 13, defect 6: DATA also ended at a bare-LF `\n.\n`, so one DATA could carry a
/// second, forged message (SMTP smuggling, CVE-2023-51764).
#[test]
fn bare_lf_dot_does_not_end_data_so_a_smuggled_message_is_never_stored_or_called() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), ALL), false);
    let mut smtp = daemon.smtp();
    assert_eq!(smtp.cmd("EHLO relay.example").0, 250);
    assert_eq!(smtp.cmd("MAIL FROM:<monitor@example.com>").0, 250);
    assert_eq!(smtp.cmd("RCPT TO:<alerts@example.com>").0, 250);
    assert_eq!(smtp.cmd("DATA").0, 354);
    // What an outbound relay that passes bare LFs through would forward as one message.
    smtp.send_raw(
        b"From: monitor@example.com\r\nSubject: disk warning on web1\r\n\r\nfirst\n.\n\
          MAIL FROM:<ceo@example.com>\r\nRCPT TO:<alerts@example.com>\r\nDATA\r\n\
          From: ceo@example.com\r\nSubject: SMUGGLED wire the money\r\n\r\nforged\r\n.\r\n",
    );
    let (code, text) = smtp.read_reply();
    assert_eq!(code, 250, "{text}");
    // The next reply answers QUIT, not a smuggled MAIL.
    assert_eq!(smtp.cmd("QUIT").0, 221);

    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    assert!(calls[0].twiml.contains("disk warning on web1"), "{calls:?}");
    wait_incidents(dir.path(), Duration::from_secs(5), |l| !l.is_empty());
    // Give a second message the chance to show up before judging.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(twilio.calls().len(), 1, "{:?}", twilio.calls());
    assert!(twilio.calls().iter().all(|c| !c.twiml.contains("SMUGGLED")));
    let list = incidents(dir.path());
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["alert_count"], 1);
    assert_eq!(daemon.logs().matches("mail accepted and stored").count(), 1);
}

/// One relay connection delivering `n` messages the way Postfix does by default: one
/// message per connection, and `QUIT` without waiting for its answer
/// (`smtp_skip_quit_response = yes`), then straight on to the next connection.
/// Returns every reply that was not the expected one.
fn relay(addr: std::net::SocketAddr, worker: usize, n: usize) -> Vec<String> {
    let mut unexpected = Vec::new();
    for i in 0..n {
        let mut c = SmtpClient::connect(addr);
        if c.greeting.0 != 220 {
            unexpected.push(format!("greeting {:?}", c.greeting));
            continue;
        }
        assert_eq!(c.cmd("EHLO relay.example").0, 250);
        for (line, want) in [
            ("MAIL FROM:<monitor@example.com>".to_string(), 250),
            ("RCPT TO:<alerts@example.com>".to_string(), 250),
            ("DATA".to_string(), 354),
        ] {
            let reply = c.cmd(&line);
            if reply.0 != want {
                unexpected.push(format!("{line}: {reply:?}"));
            }
        }
        let mut message = mail(&format!("relay {worker} message {i}"), "x");
        message.extend_from_slice(b".\r\n");
        c.send_raw(&message);
        let reply = c.read_reply();
        if reply.0 != 250 {
            unexpected.push(format!("end of DATA: {reply:?}"));
        }
        c.send_raw(b"QUIT\r\n");
    }
    unexpected
}

/// Issue 13, defect 7: `max_connections_per_ip` was 20, Postfix's default destination
/// concurrency, and sessions still closing counted: a relay flushing its queue got
/// `421` greetings (and then held everything back for minutes).
#[test]
fn a_relay_burst_of_20_reconnecting_sessions_never_sees_421() {
    const WORKERS: usize = 20;
    const EACH: usize = 5;
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(None, ALL), true);
    let addr = daemon.smtp;
    let unexpected: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| s.spawn(move || relay(addr, w, EACH)))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    let logs = daemon.logs();
    assert!(
        !logs.contains("with 421") && !logs.contains("with 451"),
        "{logs}"
    );
    // Nothing accepted is lost: every message became an incident.
    wait_incidents(dir.path(), Duration::from_secs(30), |l| {
        l.len() == WORKERS * EACH
    });
}

/// Defect 7, the other half: a session's place is free the moment it ends. At exactly
/// the cap, a client that reconnects as soon as it reads `221` is never deferred.
#[test]
fn at_the_per_address_cap_a_client_reconnecting_on_221_finds_its_place_free() {
    const WORKERS: usize = 20;
    let dir = workdir();
    let cfg = with_smtp(&config(None, ALL), "max_connections_per_ip = 20\n");
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let addr = daemon.smtp;
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            s.spawn(move || {
                for i in 0..5 {
                    let mut c = SmtpClient::connect(addr);
                    assert_eq!(c.greeting.0, 220, "{:?}", c.greeting);
                    // `alert` insists on 250 for MAIL: a deferred session would fail it.
                    c.alert(&format!("worker {w} message {i}"));
                    assert_eq!(c.cmd("QUIT").0, 221);
                }
            });
        }
    });
    assert!(
        !daemon.logs().contains("deferred a transaction"),
        "{}",
        daemon.logs()
    );
}

/// Issue 13, defect 8: no SMTPUTF8, so Postfix bounced (5.6.7) mail with a raw UTF-8
/// subject, as Japanese tools send it.
#[test]
fn smtputf8_with_a_raw_utf8_subject_is_accepted_and_its_subject_spoken() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let rules = "[[rule]]\nname = \"japanese\"\nfrom = '^監視@例え\\.jp$'\ncall = [\"alice\"]\n\
                 language = \"ja-JP\"\nvoice = \"Polly.Mizuki\"\nmessage = \"{subject}\"\n";
    let daemon = Daemon::start(dir.path(), &config(Some(&twilio), rules), false);
    let mut smtp = daemon.smtp();
    let (code, ehlo) = smtp.cmd("EHLO relay.example");
    assert_eq!(code, 250);
    for capability in ["SMTPUTF8", "8BITMIME"] {
        assert!(ehlo.lines().any(|l| l == capability), "{ehlo}");
    }
    assert_eq!(
        smtp.cmd("MAIL FROM:<監視@例え.jp> SMTPUTF8 BODY=8BITMIME")
            .0,
        250
    );
    assert_eq!(smtp.cmd("RCPT TO:<当番@例え.jp>").0, 250);
    assert_eq!(smtp.cmd("DATA").0, 354);
    smtp.send_raw(
        "From: 監視システム <監視@例え.jp>\r\nTo: 当番 <当番@例え.jp>\r\n\
         Subject: 【障害】db1 ディスク満杯\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nディスク使用率 99%\r\n.\r\n"
            .as_bytes(),
    );
    let (code, text) = smtp.read_reply();
    assert_eq!(code, 250, "{text}");
    assert_eq!(smtp.cmd("QUIT").0, 221);

    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    // The raw UTF-8 subject is decoded (speech puts a pause after the bracket).
    assert!(
        calls[0].twiml.contains("【障害】") && calls[0].twiml.contains("db1 ディスク満杯"),
        "{}",
        calls[0].twiml
    );
    assert!(
        calls[0].twiml.contains("Polly.Mizuki"),
        "{}",
        calls[0].twiml
    );
}

/// A relay over its per-address cap is greeted and has only its transactions deferred
/// (`451 4.7.0`) until a place frees up.
#[test]
fn a_session_over_the_cap_is_promoted_when_a_place_frees_up() {
    let dir = workdir();
    let cfg = with_smtp(&config(None, ALL), "max_connections_per_ip = 1\n");
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let mut first = daemon.smtp();
    assert_eq!(first.cmd("EHLO a").0, 250);
    let mut second = daemon.smtp();
    assert_eq!(second.greeting.0, 220);
    assert_eq!(second.cmd("EHLO b").0, 250);
    let (code, text) = second.cmd("MAIL FROM:<m@example.com>");
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("4.7.0 "), "{text}");
    assert_eq!(first.cmd("QUIT").0, 221);
    second.alert("promoted");
}
