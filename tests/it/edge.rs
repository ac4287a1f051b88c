//! The hostile edge: floods of idle and slow connections, endless lines, deadlines,
//! STARTTLS through a real TLS client, AUTH and its rate limit, sender rules, and the
//! HTTP connection cap.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::fake_twilio::FakeTwilio;
use crate::harness::{Daemon, config, mail, workdir};

/// An SMTP dialogue over any stream (plain TCP, or TLS after STARTTLS).
struct Dialog<S: Read + Write> {
    reader: BufReader<S>,
}

impl<S: Read + Write> Dialog<S> {
    fn new(stream: S) -> Dialog<S> {
        Dialog {
            reader: BufReader::new(stream),
        }
    }

    fn read_reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            assert!(
                self.reader.read_line(&mut line).unwrap() > 0,
                "connection closed; so far: {text:?}"
            );
            text.push_str(line[4..].trim_end());
            if line.as_bytes()[3] == b' ' {
                return (line[..3].parse().unwrap(), text);
            }
            text.push('\n');
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
        self.reader.get_mut().flush().unwrap();
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    fn closed(&mut self) -> bool {
        let mut buf = String::new();
        matches!(self.reader.read_line(&mut buf), Ok(0) | Err(_))
    }
}

fn connect(addr: SocketAddr) -> Dialog<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut d = Dialog::new(stream);
    assert_eq!(d.read_reply().0, 220);
    d
}

const ALL: &str = "[[rule]]\nname = \"all\"\ncall = [\"alice\"]\n";

#[test]
fn a_real_alert_gets_through_300_idle_and_slow_connections() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let cfg = config(Some(&twilio), ALL).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\nmax_connections = 400\nmax_connections_per_ip = 40\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let smtp = daemon.smtp;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 300 connections from ten other loopback addresses: half say nothing, half type
    // one byte a second.
    let mut idle = Vec::new();
    for i in 0..300u32 {
        let local: SocketAddr = format!("127.0.0.{}:0", 2 + i % 10).parse().unwrap();
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(local).unwrap();
            socket.connect(smtp).await.unwrap()
        });
        idle.push(stream);
    }
    let slow: Vec<_> = idle
        .drain(150..)
        .map(|mut stream| {
            runtime.spawn(async move {
                use tokio::io::AsyncWriteExt;
                for byte in b"EHLO slowpoke".iter().take(8) {
                    if stream.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                stream
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let mut client = daemon.smtp();
    assert_eq!(client.greeting.0, 220);
    let (code, text) = client.send(
        "m@example.com",
        &["a@example.com"],
        &mail("db1 is DOWN", "real"),
    );
    assert_eq!(code, 250, "{text}");
    twilio.wait_until(Duration::from_secs(5), |c| c.len() == 1);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the alert took {took:?} to ring"
    );
    drop(idle);
    for task in slow {
        task.abort();
    }
}

#[test]
fn connections_beyond_the_per_address_cap_are_deferred_then_beyond_twice_it_get_421() {
    let dir = workdir();
    let cfg = config(None, ALL).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\nmax_connections_per_ip = 3\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let held: Vec<_> = (0..3).map(|_| connect(daemon.smtp)).collect();
    // Up to the cap again: greeted, but transactions are deferred.
    let mut over: Vec<_> = (0..3).map(|_| connect(daemon.smtp)).collect();
    assert_eq!(over[0].cmd("EHLO over.test").0, 250);
    let (code, text) = over[0].cmd("MAIL FROM:<m@example.com>");
    assert_eq!(code, 451, "{text}");
    assert!(
        text.starts_with("4.7.0 too many concurrent sessions"),
        "{text}"
    );
    let mut refused = Dialog::new(TcpStream::connect(daemon.smtp).unwrap());
    let (code, text) = refused.read_reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("too many connections from your address"));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(over[0].cmd("MAIL FROM:<m@example.com>").0, 250);
    connect(daemon.smtp);
}

#[test]
fn an_endless_line_closes_the_connection_with_500() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &config(None, ALL), true);
    let mut d = connect(daemon.smtp);
    d.send(&vec![b'A'; 5000]);
    let (code, _) = d.read_reply();
    assert_eq!(code, 500);
    assert!(d.closed());
    // The daemon is fine.
    assert_eq!(connect(daemon.smtp).cmd("NOOP").0, 250);
}

#[test]
fn idle_and_overlong_sessions_are_closed_with_421() {
    let dir = workdir();
    let cfg = config(None, ALL).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\ntimeout = \"1s\"\nsession_timeout = \"3s\"\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let mut idle = connect(daemon.smtp);
    let started = Instant::now();
    let (code, text) = idle.read_reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("idle"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Busy but endless: a NOOP every half second still ends at the session deadline.
    let mut busy = connect(daemon.smtp);
    let started = Instant::now();
    loop {
        let (code, text) = busy.cmd("NOOP");
        if code == 421 {
            assert!(text.contains("session too long"), "{text}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(6), "never cut off");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(started.elapsed() >= Duration::from_millis(2500));
}

#[test]
fn senders_outside_the_allowlist_get_550_and_are_never_stored() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let cfg = config(Some(&twilio), ALL).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\nsenders = [\"*@monitoring.example.com\"]\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let mut d = connect(daemon.smtp);
    assert_eq!(d.cmd("EHLO t").0, 250);
    assert_eq!(d.cmd("MAIL FROM:<mallory@evil.example>").0, 550);
    assert_eq!(d.cmd("MAIL FROM:<>").0, 550);
    assert_eq!(d.cmd("MAIL FROM:<nagios@Monitoring.Example.com>").0, 250);
    daemon.wait_for_log(
        "sender refused: not in [smtp] senders",
        Duration::from_secs(2),
    );
    assert!(
        daemon.logs().contains("peer=127.0.0.1"),
        "{}",
        daemon.logs()
    );
    assert!(crate::harness::incidents(dir.path()).is_empty());
}

/// A self-signed certificate for `localhost`, as PEM (cert, key) and DER.
fn test_certificate() -> (String, String, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        certified.cert.pem(),
        certified.key_pair.serialize_pem(),
        certified.cert.der().to_vec(),
    )
}

fn tls_client(cert_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

type TlsDialog = Dialog<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// Connects, EHLOs, STARTTLSes (optionally pipelining `inject` after it) and returns
/// the TLS dialogue and the certificate the server presented.
fn starttls(addr: SocketAddr, trust: &[u8], inject: &str) -> (TlsDialog, Vec<u8>) {
    let mut plain = connect(addr);
    let (_, ehlo) = plain.cmd("EHLO client.test");
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    plain.send(format!("STARTTLS\r\n{inject}").as_bytes());
    assert_eq!(plain.read_reply().0, 220);
    let tcp = plain.reader.into_inner();
    let conn =
        rustls::ClientConnection::new(tls_client(trust), "localhost".try_into().unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream.flush().unwrap();
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    let presented = stream.conn.peer_certificates().unwrap()[0].to_vec();
    (Dialog::new(stream), presented)
}

#[test]
fn starttls_auth_and_require_rules_through_a_real_tls_client() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let (cert, key, der) = test_certificate();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let cfg = config(Some(&twilio), ALL).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\nrequire_tls = true\nrequire_auth = true\n\
         max_auth_failures = 3\n[smtp.users]\nmonitor = \"MAILCALL_TEST_SMTP_PASSWORD\"\n",
    );
    std::fs::write(dir.path().join("rules.toml"), &cfg).unwrap();
    let daemon =
        Daemon::launch_with_env(dir.path(), &[("MAILCALL_TEST_SMTP_PASSWORD", "pa55word")]);

    // In plain text: no AUTH offered, AUTH refused, mail refused.
    let mut plain = connect(daemon.smtp);
    let (_, ehlo) = plain.cmd("EHLO plain.test");
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert_eq!(plain.cmd("AUTH PLAIN AG1vbml0b3IAcGE1NXdvcmQ=").0, 538);
    assert_eq!(plain.cmd("MAIL FROM:<m@example.com>").0, 530);

    // Over TLS. Commands pipelined after STARTTLS in plain text are thrown away.
    let (mut tls, presented) = starttls(daemon.smtp, &der, "RSET\r\n");
    assert_eq!(presented, der);
    let (code, ehlo) = tls.cmd("EHLO tls.test");
    assert_eq!(code, 250, "the injected RSET was answered: {ehlo}");
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    assert_eq!(tls.cmd("MAIL FROM:<m@example.com>").0, 530, "require_auth");
    let plain_auth = |user: &str, pass: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
    };
    assert_eq!(
        tls.cmd(&format!("AUTH PLAIN {}", plain_auth("monitor", "wrong")))
            .0,
        535
    );
    assert_eq!(
        tls.cmd(&format!("AUTH PLAIN {}", plain_auth("monitor", "pa55word")))
            .0,
        235
    );
    assert_eq!(tls.cmd("MAIL FROM:<m@example.com>").0, 250);
    assert_eq!(tls.cmd("RCPT TO:<a@example.com>").0, 250);
    assert_eq!(tls.cmd("DATA").0, 354);
    tls.send(b"Subject: over tls\r\n\r\nhello\r\n.\r\n");
    assert_eq!(tls.read_reply().0, 250);
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    assert!(calls[0].twiml.contains("over tls"));
    daemon.wait_for_log("tls=true user=Some(\"monitor\")", Duration::from_secs(2));

    // AUTH LOGIN with challenges.
    let (mut tls, _) = starttls(daemon.smtp, &der, "");
    tls.cmd("EHLO tls.test");
    assert_eq!(tls.cmd("AUTH LOGIN"), (334, "VXNlcm5hbWU6".to_string()));
    assert_eq!(
        tls.cmd(&base64::engine::general_purpose::STANDARD.encode("monitor"))
            .0,
        334
    );
    assert_eq!(
        tls.cmd(&base64::engine::general_purpose::STANDARD.encode("pa55word"))
            .0,
        235
    );

    // Failed AUTH is rate limited per address: the third failure (one happened above)
    // shuts the address out.
    let (mut tls, _) = starttls(daemon.smtp, &der, "");
    tls.cmd("EHLO tls.test");
    assert_eq!(
        tls.cmd(&format!("AUTH PLAIN {}", plain_auth("monitor", "guess1")))
            .0,
        535
    );
    assert_eq!(
        tls.cmd(&format!("AUTH PLAIN {}", plain_auth("monitor", "guess2")))
            .0,
        421
    );
    assert!(tls.closed());
    let mut refused = Dialog::new(TcpStream::connect(daemon.smtp).unwrap());
    let (code, text) = refused.read_reply();
    assert_eq!(code, 421);
    assert!(text.contains("failed authentications"), "{text}");
}

#[test]
fn sighup_reloads_the_certificate() {
    let dir = workdir();
    let (cert, key, der) = test_certificate();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let cfg = config(None, ALL).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);
    assert_eq!(starttls(daemon.smtp, &der, "").1, der);

    // A broken file is refused and the old certificate stays.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration NOT reloaded", Duration::from_secs(5));
    daemon.wait_for_log("cannot read TLS certificate", Duration::from_secs(1));
    assert_eq!(starttls(daemon.smtp, &der, "").1, der);

    let (cert2, key2, der2) = test_certificate();
    std::fs::write(dir.path().join("cert.pem"), cert2).unwrap();
    std::fs::write(dir.path().join("key.pem"), key2).unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(5));
    assert_eq!(starttls(daemon.smtp, &der2, "").1, der2);
}

#[test]
fn the_http_server_caps_its_connections() {
    let dir = workdir();
    let cfg = config(
        None,
        &format!("[http]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\n{ALL}"),
    );
    let daemon = Daemon::start(dir.path(), &cfg, true);
    let http = daemon.http.unwrap();
    let healthz = || {
        let mut s = TcpStream::connect(http).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        response
    };
    assert!(healthz().starts_with("HTTP/1.1 200"));
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(http).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        healthz(),
        "",
        "a third connection was served while two were held"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert!(healthz().starts_with("HTTP/1.1 200"));
}
