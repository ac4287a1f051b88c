//! The HTTP ways in: SendGrid Inbound Parse (both modes, Basic auth, signatures,
//! SPF/DKIM, duplicates, size), the `/alert` webhook and `/healthz`; and `mailcall call`.
//! Also the server's limits against hostile clients (issue 13): authentication before the
//! body, slow and greedy connections, and who may ring a phone.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;

use crate::fake_twilio::FakeTwilio;
use crate::harness::{
    Daemon, TEST_SENDGRID_PASSWORD, TEST_TOKEN, command, config, incidents, wait_incidents, workdir,
};

const BOUNDARY: &str = "xYzZY";

/// An HTTP request from a real client; returns the status, headers and body.
fn request(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut req = client.request(method.parse().unwrap(), url).body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let response = req.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.unwrap())
    })
}

/// A multipart/form-data body built the way SendGrid builds it: CRLF, boundary xYzZY,
/// form fields then file parts.
fn sendgrid_body(fields: &[(&str, &[u8])], files: &[(&str, &str, &str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    for (name, filename, content_type, data) in files {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn multipart() -> (&'static str, String) {
    (
        "Content-Type",
        format!("multipart/form-data; boundary={BOUNDARY}"),
    )
}

const RULES: &str = r#"
[[rule]]
name = "jp"
subject = '(?P<host>[a-z]+\d+)\s*停止'
call = ["alice"]
message = "{host} 停止。{body}"
language = "ja-JP"
voice = "Polly.Mizuki"

[[rule]]
name = "all"
call = ["bob"]
"#;

/// A daemon with HTTP, SendGrid (with `sendgrid`) and the webhook enabled.
fn http_daemon(twilio: &FakeTwilio, sendgrid: &str) -> (Daemon, tempfile::TempDir, String) {
    let dir = workdir();
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[webhook]\ntoken_env = \"MAILCALL_TEST_TOKEN\"\n{sendgrid}\n{RULES}"
    );
    let cfg = config(Some(twilio), &extra).replace(
        "hostname = \"mx.test\"\n",
        "hostname = \"mx.test\"\nrecipients = [\"alerts@example.com\", \"*@pager.example.com\"]\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let base = format!("http://{}", daemon.http.expect("no http listener"));
    (daemon, dir, base)
}

#[test]
fn sendgrid_raw_mode_with_attachments_rings_and_the_same_message_id_is_stored_once() {
    let twilio = FakeTwilio::start();
    let (daemon, dir, base) = http_daemon(&twilio, "[sendgrid]\n");
    let email = "From: Monitor <m@monitoring.example.com>\r\nTo: alerts@example.com\r\nSubject: disk full on nas1\r\n\
                 Message-ID: <sg-raw-1@monitoring.example.com>\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n\
                 The disk is full.\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"log.bin\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--b1--\r\n";
    let body = sendgrid_body(
        &[
            ("dkim", b"{@monitoring.example.com : pass}"),
            ("email", email.as_bytes()),
            ("to", b"alerts@example.com"),
            ("from", b"Monitor <m@monitoring.example.com>"),
            ("sender_ip", b"127.0.0.1"),
            (
                "envelope",
                br#"{"to":["alerts@example.com"],"from":"m@monitoring.example.com"}"#,
            ),
            ("subject", b"disk full on nas1"),
            (
                "charsets",
                br#"{"to":"UTF-8","from":"UTF-8","subject":"UTF-8"}"#,
            ),
            ("SPF", b"pass"),
        ],
        &[],
    );
    let (status, _, text) = request(
        "POST",
        &format!("{base}/sendgrid/inbound"),
        &[multipart()],
        body.clone(),
    );
    assert_eq!(status, 200, "{text}");
    // SendGrid delivers the same mail again.
    let (status, _, _) = request(
        "POST",
        &format!("{base}/sendgrid/inbound"),
        &[multipart()],
        body,
    );
    assert_eq!(status, 200);
    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    assert_eq!(calls[0].to, "+15005550002");
    assert!(
        calls[0].twiml.contains("Alert. disk full on nas1"),
        "{}",
        calls[0].twiml
    );
    daemon.wait_for_log(
        "delivered this Message-ID before; stored once",
        Duration::from_secs(5),
    );
    let list = incidents(dir.path());
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0]["alert_count"], 1,
        "the duplicate delivery was stored once"
    );
}

#[test]
fn sendgrid_default_mode_decodes_iso_2022_jp_and_ignores_attachments() {
    let twilio = FakeTwilio::start();
    let (_daemon, _dir, base) = http_daemon(&twilio, "[sendgrid]\n");
    let (text, _, _) = encoding_rs::ISO_2022_JP.encode("ホスト web01 が応答しません。\r\n");
    let headers = "MIME-Version: 1.0\r\nFrom: Zabbix <zabbix@example.jp>\r\nTo: ops@pager.example.com\r\n\
                   Subject: =?ISO-2022-JP?B?d2ViMDEgGyRCRGQ7XxsoQg==?=\r\nMessage-ID: <jp-1@example.jp>\r\n\
                   Content-Type: multipart/mixed; boundary=\"zz\"\r\n";
    let body = sendgrid_body(
        &[
            ("headers", headers.as_bytes()),
            ("dkim", b"{@example.jp : pass}"),
            ("to", b"ops@pager.example.com"),
            ("text", &text),
            ("from", b"Zabbix <zabbix@example.jp>"),
            (
                "envelope",
                br#"{"to":["ops@pager.example.com"],"from":"zabbix@example.jp"}"#,
            ),
            ("attachments", b"1"),
            (
                "attachment-info",
                br#"{"attachment1":{"filename":"graph.png","type":"image/png"}}"#,
            ),
            ("subject", "web01 停止".as_bytes()),
            (
                "charsets",
                br#"{"to":"UTF-8","text":"iso-2022-jp","subject":"UTF-8","from":"UTF-8"}"#,
            ),
            ("SPF", b"pass"),
        ],
        &[(
            "attachment1",
            "graph.png",
            "image/png",
            b"\x89PNG\r\n\x1a\n\0\0\0binary",
        )],
    );
    let (status, _, text) = request(
        "POST",
        &format!("{base}/sendgrid/inbound"),
        &[multipart()],
        body,
    );
    assert_eq!(status, 200, "{text}");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    assert_eq!(calls[0].to, "+15005550001");
    assert!(
        calls[0]
            .twiml
            .contains("web01 停止。ホスト web01 が応答しません。"),
        "{}",
        calls[0].twiml
    );
    assert!(calls[0].twiml.contains("language=\"ja-JP\""));
}

#[test]
fn sendgrid_basic_auth_is_required_when_configured() {
    let twilio = FakeTwilio::start();
    let (_daemon, dir, base) = http_daemon(
        &twilio,
        "[sendgrid]\nusername = \"sendgrid\"\npassword_env = \"MAILCALL_TEST_SENDGRID_PASSWORD\"\n",
    );
    let body = sendgrid_body(
        &[
            ("email", b"Subject: x\r\n\r\ny"),
            ("envelope", br#"{"to":["alerts@example.com"]}"#),
        ],
        &[],
    );
    let url = format!("{base}/sendgrid/inbound");
    let basic = |user: &str, pass: &str| {
        (
            "Authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            ),
        )
    };
    let (status, headers, _) = request("POST", &url, &[multipart()], body.clone());
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Basic realm=\"mailcall\"");
    assert_eq!(
        request(
            "POST",
            &url,
            &[multipart(), basic("sendgrid", "wrong")],
            body.clone()
        )
        .0,
        401
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &[multipart(), basic("other", TEST_SENDGRID_PASSWORD)],
            body.clone()
        )
        .0,
        401
    );
    assert!(
        incidents(dir.path()).is_empty(),
        "a refused request is not stored"
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &[multipart(), basic("sendgrid", TEST_SENDGRID_PASSWORD)],
            body
        )
        .0,
        200
    );
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
}

#[test]
fn sendgrid_signatures_are_verified_before_anything_is_stored() {
    let twilio = FakeTwilio::start();
    let signing = SigningKey::from_bytes(&[42u8; 32].into()).unwrap();
    let der = signing.verifying_key().to_public_key_der().unwrap();
    let public_key = base64::engine::general_purpose::STANDARD.encode(der.as_bytes());
    let (_daemon, dir, base) = http_daemon(
        &twilio,
        &format!("[sendgrid]\npublic_key = \"{public_key}\"\nmax_age = \"5m\"\n"),
    );
    let url = format!("{base}/sendgrid/inbound");
    let body = sendgrid_body(
        &[
            ("email", b"Subject: signed alert\r\n\r\ny"),
            ("envelope", br#"{"to":["alerts@example.com"]}"#),
        ],
        &[],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |key: &SigningKey, ts: u64, body: &[u8]| {
        let mut signed = ts.to_string().into_bytes();
        signed.extend_from_slice(body);
        let sig: Signature = key.sign(&signed);
        vec![
            multipart(),
            (
                "X-Twilio-Email-Event-Webhook-Signature",
                base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()),
            ),
            ("X-Twilio-Email-Event-Webhook-Timestamp", ts.to_string()),
        ]
    };
    // Unsigned, tampered, signed by another key, too old: all refused.
    assert_eq!(request("POST", &url, &[multipart()], body.clone()).0, 403);
    let mut tampered = body.clone();
    let at = tampered.windows(6).position(|w| w == b"signed").unwrap();
    tampered[at] = b'S';
    assert_eq!(
        request("POST", &url, &sign(&signing, now, &body), tampered).0,
        403
    );
    let other = SigningKey::from_bytes(&[43u8; 32].into()).unwrap();
    assert_eq!(
        request("POST", &url, &sign(&other, now, &body), body.clone()).0,
        403
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &sign(&signing, now - 3600, &body),
            body.clone()
        )
        .0,
        403
    );
    assert!(incidents(dir.path()).is_empty());
    assert!(twilio.calls().is_empty());
    // Signed properly: accepted.
    let (status, _, text) = request("POST", &url, &sign(&signing, now, &body), body);
    assert_eq!(status, 200, "{text}");
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 1);
    assert!(calls[0].twiml.contains("signed alert"));
}

#[test]
fn sendgrid_spf_dkim_and_recipient_failures_are_recorded_and_ring_nobody() {
    let twilio = FakeTwilio::start();
    let (daemon, dir, base) = http_daemon(
        &twilio,
        "[sendgrid]\nrequire_spf = true\nrequire_dkim = true\n",
    );
    let url = format!("{base}/sendgrid/inbound");
    let post = |spf: &[u8], dkim: &[u8], to: &str, subject: &str| {
        let envelope = format!(r#"{{"to":["{to}"],"from":"m@example.com"}}"#);
        let email =
            format!("From: m@x\r\nSubject: {subject}\r\nMessage-ID: <{subject}@x>\r\n\r\nbody");
        let body = sendgrid_body(
            &[
                ("email", email.as_bytes()),
                ("envelope", envelope.as_bytes()),
                ("SPF", spf),
                ("dkim", dkim),
            ],
            &[],
        );
        request("POST", &url, &[multipart()], body).0
    };
    assert_eq!(
        post(b"fail", b"{@x : pass}", "alerts@example.com", "spf-fail"),
        200
    );
    assert_eq!(
        post(b"pass", b"{@x : fail}", "alerts@example.com", "dkim-fail"),
        200
    );
    assert_eq!(
        post(
            b"pass",
            b"{@x : pass}",
            "intruder@elsewhere.example",
            "rcpt-fail"
        ),
        200
    );
    assert_eq!(
        post(b"pass", b"{@x : pass}", "alerts@example.com", "all-good"),
        200
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(twilio.calls().len(), 1);
    assert!(calls[0].twiml.contains("all-good"));
    for reason in [
        "SPF fail",
        "DKIM {@x : fail}",
        "no envelope recipient is allowed",
    ] {
        daemon.wait_for_log(reason, Duration::from_secs(2));
    }
    assert_eq!(incidents(dir.path()).len(), 1);
}

#[test]
fn sendgrid_bodies_over_40_mib_get_413_and_a_store_failure_gets_503() {
    let twilio = FakeTwilio::start();
    let (_daemon, dir, base) = http_daemon(&twilio, "[sendgrid]\n[state]\nmax_bytes = 1048576\n");
    let url = format!("{base}/sendgrid/inbound");
    let huge = vec![b'a'; 40 * 1024 * 1024 + 1024];
    let body = sendgrid_body(&[("email", &huge)], &[]);
    assert_eq!(request("POST", &url, &[multipart()], body).0, 413);
    let post = |subject: &str, size: usize| {
        let mail = format!("Subject: {subject}\r\n\r\n{}", "b".repeat(size));
        let body = sendgrid_body(
            &[
                ("email", mail.as_bytes()),
                ("envelope", br#"{"to":["alerts@example.com"]}"#),
            ],
            &[],
        );
        request("POST", &url, &[multipart()], body)
    };
    // 1 MiB fits the HTTP limit but could never fit the (capped) store: 413, for good.
    assert_eq!(post("big", 1024 * 1024).0, 413);
    // A store that fails (its file is gone): SendGrid must retry later.
    std::fs::remove_file(dir.path().join("mailcall.db")).unwrap();
    let (status, _, text) = post("small", 10);
    assert_eq!(status, 503, "{text}");
    assert!(
        !text.contains("SQL") && !text.contains("sqlite"),
        "internals leaked: {text}"
    );
    // Not multipart at all.
    assert_eq!(
        request(
            "POST",
            &url,
            &[("Content-Type", "text/plain".into())],
            b"hi".to_vec()
        )
        .0,
        400
    );
}

#[test]
fn the_alert_webhook_takes_forms_and_queries_with_a_token() {
    let twilio = FakeTwilio::start();
    // Follows [webhook]: this test rings a number outside [contacts] too.
    let (_daemon, dir, base) = http_daemon(&twilio, "numbers = \"any\"\n");
    let url = format!("{base}/alert");
    let form = (
        "Content-Type",
        "application/x-www-form-urlencoded".to_string(),
    );
    let bearer = ("Authorization", format!("Bearer {TEST_TOKEN}"));

    let (status, headers, _) = request(
        "POST",
        &url,
        std::slice::from_ref(&form),
        b"tels=alice&message=x".to_vec(),
    );
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
    let wrong = ("Authorization", "Bearer nope".to_string());
    assert_eq!(
        request(
            "POST",
            &url,
            &[form.clone(), wrong],
            b"tels=alice&message=x".to_vec()
        )
        .0,
        401
    );
    assert_eq!(
        request(
            "GET",
            &format!("{url}?tels=alice&message=x&token=nope"),
            &[],
            vec![]
        )
        .0,
        401
    );

    // Bad requests: 400 with a reason naming what is wrong.
    for (body, reason) in [
        (
            "tels=alice,0312345678,nobody&message=x",
            "0312345678, nobody",
        ),
        (
            "tels=alice&message=x&voice=Polly%20Joanna%22",
            "invalid `voice`",
        ),
        (
            "tels=alice&message=x&language=english",
            "invalid `language`",
        ),
        ("tels=alice", "missing `message`"),
        ("message=x", "missing `tels`"),
    ] {
        let (status, _, text) = request(
            "POST",
            &url,
            &[form.clone(), bearer.clone()],
            body.as_bytes().to_vec(),
        );
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(reason), "{body}: {text}");
    }
    assert!(incidents(dir.path()).is_empty());

    // curl -d 'tels=+8170…,oncall&message=…' -H 'Authorization: Bearer …'
    let (status, _, text) = request(
        "POST",
        &url,
        &[form, bearer],
        b"tels=%2B15005550009,oncall&message=DB+is+down&language=ja-JP&voice=Polly.Mizuki".to_vec(),
    );
    assert_eq!(status, 200, "{text}");
    let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        reply["numbers"],
        serde_json::json!(["+15005550009", "+15005550001", "+15005550002"])
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| c.len() == 3);
    assert!(calls.iter().all(|c| {
        c.twiml
            .contains("voice=\"Polly.Mizuki\" loop=\"2\">DB is down</Say>")
    }));

    // GET with ?token=, and the same dedup key within the cooldown rings nobody again.
    for _ in 0..2 {
        let q = format!("{url}?tels=carol&message=web1+down&dedup_key=web1&token={TEST_TOKEN}");
        assert_eq!(request("GET", &q, &[], vec![]).0, 200);
    }
    wait_incidents(dir.path(), Duration::from_secs(10), |l| {
        l.len() == 2 && l[0]["alert_count"] == 2
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(twilio.calls().len(), 4);
}

#[test]
fn healthz_reports_the_parts() {
    let twilio = FakeTwilio::start();
    let (_daemon, _dir, base) = http_daemon(&twilio, "");
    let (status, _, text) = request("GET", &format!("{base}/healthz"), &[], vec![]);
    assert_eq!(status, 200, "{text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    for part in ["store", "dispatcher", "smtp"] {
        assert_eq!(body[part], true, "{body}");
    }
    assert_eq!(body["status"], "ok");
    // Every dispatch worker reports its own heartbeat.
    for worker in ["router", "placer", "reconciler", "rounds"] {
        assert_eq!(body["workers"][worker]["ok"], true, "{body}");
        assert!(body["workers"][worker]["age_ms"].as_i64().unwrap() < 30_000);
    }
    assert_eq!(request("GET", &format!("{base}/nope"), &[], vec![]).0, 404);
}

#[test]
fn mailcall_call_places_calls_directly_or_through_a_running_daemon() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    std::fs::write(dir.path().join("rules.toml"), config(Some(&twilio), "")).unwrap();
    // No daemon: this process places the calls.
    let out = command(dir.path())
        .args([
            "call",
            "--to",
            "alice,+15005550009",
            "--message",
            "DB is down",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches(" placed ").count(), 2, "{stdout}");
    let calls = twilio.calls();
    assert_eq!(calls.len(), 2);
    assert!(
        stdout.contains(calls[0].sid.as_deref().unwrap()),
        "{stdout}"
    );

    // Unknown names are refused before anything is stored.
    let out = command(dir.path())
        .args(["call", "--to", "alice,bobby", "--message", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bobby"));

    // With a daemon on the same store, the daemon places them.
    let daemon = Daemon::start_existing(dir.path(), false);
    let out = command(dir.path())
        .args([
            "call",
            "--to",
            "carol",
            "--message",
            "web1 is down",
            "--wait",
            "20s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("the running daemon places the calls"));
    assert!(
        stdout.contains("+15005550003") && stdout.contains(" placed "),
        "{stdout}"
    );
    daemon.wait_for_log("rule=\"cli\"", Duration::from_secs(5));
    assert_eq!(twilio.calls().len(), 3);
}

// ---- Issue 13: hostile clients ------------------------------------------------------

/// A runtime for opening sockets from a chosen loopback address.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A raw connection from `from` (any of 127.0.0.0/8) to `to`, for tests that play a
/// misbehaving client byte by byte, or many clients.
fn connect_from(rt: &tokio::runtime::Runtime, from: Ipv4Addr, to: SocketAddr) -> TcpStream {
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

/// Reads an answer's status line and headers, waiting at most `timeout`; `None` if none
/// came (the server is still waiting for something, or closed without a word).
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

/// Reads until the server closes the connection (`Some(rest)`) or `timeout` (`None`).
fn read_to_close(stream: &mut TcpStream, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).to_string()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).to_string());
            }
            Err(_) => return None,
        }
    }
}

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// `GET /healthz` over a fresh connection from `from`; the status, if one came in time.
fn healthz_from(rt: &tokio::runtime::Runtime, from: Ipv4Addr, to: SocketAddr) -> Option<u16> {
    let mut s = connect_from(rt, from, to);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    read_head(&mut s, Duration::from_secs(5)).map(|(status, _)| status)
}

/// Issue 13, defect 3: SendGrid bodies were read before auth, so 24 parallel
/// unauthenticated 40 MiB posts took 958 MB. Now credentials in headers (Basic, token,
/// signature headers) are checked first: a post announcing 40 MiB and sending 1 KiB gets
/// its 401/403 without the rest ever being sent.
#[test]
fn regression_sendgrid_bodies_are_read_before_auth() {
    let twilio = FakeTwilio::start();
    let (daemon, dir, _) = http_daemon(
        &twilio,
        "[sendgrid]\nusername = \"sendgrid\"\npassword_env = \"MAILCALL_TEST_SENDGRID_PASSWORD\"\n",
    );
    let addr = daemon.http.unwrap();
    let rt = runtime();
    let basic = |user: &str, pass: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };
    let post = |path: &str, headers: &str, length: usize| {
        let mut s = connect_from(&rt, LOCALHOST, addr);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n\
             Content-Length: {length}\r\n{headers}\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&[b'a'; 1024]).unwrap();
        let answer = read_head(&mut s, Duration::from_secs(10));
        assert!(
            answer.is_some(),
            "POST {path} {headers:?}: no answer while the body is unsent; the server waits for it"
        );
        answer.unwrap()
    };
    let forty_mib = 40 * 1024 * 1024;
    for (path, headers) in [
        ("/sendgrid/inbound", String::new()),
        ("/sendgrid/inbound", basic("sendgrid", "wrong")),
        ("/sendgrid/inbound", basic("other", TEST_SENDGRID_PASSWORD)),
        ("/alert", String::new()),
        ("/alert?token=nope", String::new()),
        ("/alert", "Authorization: Bearer nope\r\n".to_string()),
    ] {
        let (status, head) = post(path, &headers, forty_mib);
        assert_eq!(status, 401, "{path} {headers:?}: {head}");
    }
    // Authenticated, but announcing more than the limit: 413 before reading it.
    let (status, head) = post(
        "/sendgrid/inbound",
        &basic("sendgrid", TEST_SENDGRID_PASSWORD),
        forty_mib + 1,
    );
    assert_eq!(status, 413, "{head}");
    daemon.wait_for_log("SendGrid request refused", Duration::from_secs(5));
    daemon.wait_for_log(
        "body over the limit; refused with 413",
        Duration::from_secs(5),
    );
    assert!(
        daemon.logs().contains("peer=Some(\"127.0.0.1:"),
        "{}",
        daemon.logs()
    );
    drop(daemon);

    // Signatures: the headers are checked before the body, the body after it is read.
    let signing = SigningKey::from_bytes(&[42u8; 32].into()).unwrap();
    let der = signing.verifying_key().to_public_key_der().unwrap();
    let public_key = base64::engine::general_purpose::STANDARD.encode(der.as_bytes());
    let (daemon, _dir2, _) = http_daemon(
        &twilio,
        &format!("[sendgrid]\npublic_key = \"{public_key}\"\n"),
    );
    let addr = daemon.http.unwrap();
    let post = |headers: &str| {
        let mut s = connect_from(&rt, LOCALHOST, addr);
        let head = format!(
            "POST /sendgrid/inbound HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n\
             Content-Length: {forty_mib}\r\n{headers}\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        read_head(&mut s, Duration::from_secs(10))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good_sig = {
        let sig: Signature = signing.sign(b"anything");
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    };
    for headers in [
        String::new(),
        format!("X-Twilio-Email-Event-Webhook-Timestamp: {now}\r\n"),
        format!(
            "X-Twilio-Email-Event-Webhook-Signature: {good_sig}\r\nX-Twilio-Email-Event-Webhook-Timestamp: {}\r\n",
            now - 3600
        ),
        format!(
            "X-Twilio-Email-Event-Webhook-Signature: not base64!\r\nX-Twilio-Email-Event-Webhook-Timestamp: {now}\r\n"
        ),
    ] {
        let answer = post(&headers);
        assert_eq!(
            answer.as_ref().map(|a| a.0),
            Some(403),
            "{headers:?}: {answer:?}"
        );
    }
    assert!(incidents(dir.path()).is_empty());
    assert!(twilio.calls().is_empty());
}

/// Issue 13, defect 4: HTTP slowloris. A few hundred connections trickling their headers
/// made every endpoint, `/healthz` included, unreachable. Now: 500 connections stuck in
/// their headers from 25 other addresses (20 each, the per-address cap) leave `/healthz`
/// answering; one more from a full address gets 429; after `header_timeout` (10 s by
/// default) the slow ones get 408 and are closed. All with the default settings.
#[test]
fn regression_http_slowloris_makes_every_endpoint_unreachable() {
    let twilio = FakeTwilio::start();
    let (daemon, _dir, _) = http_daemon(&twilio, "");
    let addr = daemon.http.unwrap();
    let rt = runtime();
    let mut slow = Vec::new();
    for host in 2..27u8 {
        for _ in 0..20 {
            let mut s = connect_from(&rt, Ipv4Addr::new(127, 0, 0, host), addr);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                .unwrap();
            slow.push(s);
        }
    }
    let opened = Instant::now();
    // A kept-alive connection that goes quiet after its request: closed after
    // header_timeout too, but without a 408 (it had nothing under way).
    let mut idle = connect_from(&rt, Ipv4Addr::new(127, 0, 0, 98), addr);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_head(&mut idle, Duration::from_secs(5)).map(|a| a.0),
        Some(200)
    );

    let mut over = connect_from(&rt, Ipv4Addr::new(127, 0, 0, 2), addr);
    over.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let answer = read_head(&mut over, Duration::from_secs(5));
    let (status, head) = answer.expect("no answer over the per-address cap");
    assert_eq!(status, 429, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");

    let started = Instant::now();
    let status = healthz_from(&rt, LOCALHOST, addr);
    eprintln!(
        "/healthz with 500 slow connections open: {status:?} in {:?}",
        started.elapsed()
    );
    assert_eq!(
        status,
        Some(200),
        "/healthz unreachable behind slow clients"
    );
    // Another address with no slow connection of its own is served as well.
    assert_eq!(
        healthz_from(&rt, Ipv4Addr::new(127, 0, 0, 99), addr),
        Some(200)
    );

    // The slow ones are answered 408 once the default header_timeout (10 s) is over.
    for s in slow.iter_mut().step_by(50) {
        let answer = read_head(s, Duration::from_secs(30));
        let (status, head) = answer.expect("a slow client was never timed out");
        assert_eq!(status, 408, "{head}");
        assert!(
            read_to_close(s, Duration::from_secs(5)).is_some(),
            "not closed after 408"
        );
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(9),
        "timed out too early"
    );
    let rest = read_to_close(&mut idle, Duration::from_secs(10)).expect("idle connection kept");
    assert!(!rest.contains("408"), "{rest}");
    daemon.wait_for_log(
        "too many HTTP connections from one address; answered 429",
        Duration::from_secs(5),
    );
    daemon.wait_for_log("answered 408", Duration::from_secs(5));
    assert!(
        daemon
            .logs()
            .lines()
            .any(|l| l.contains("answered 408") && l.contains("peer=127.0.0.2")),
        "the 408 log line names the client"
    );
}

/// The limits follow `[http]`: `header_timeout` (408), `max_connections_per_ip` (429) and
/// `max_connections` (503 once a connection has waited 5 s for a slot).
#[test]
fn http_limits_follow_the_config() {
    let twilio = FakeTwilio::start();
    let dir = workdir();
    let cfg = config(
        Some(&twilio),
        "[http]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"7s\"\nmax_connections_per_ip = 2\nmax_connections = 4\n",
    );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let addr = daemon.http.unwrap();
    let rt = runtime();
    let a = Ipv4Addr::new(127, 0, 0, 3);
    let b = Ipv4Addr::new(127, 0, 0, 4);
    let opened = Instant::now();
    let mut slow: Vec<TcpStream> = [a, a, b, b]
        .into_iter()
        .map(|from| {
            let mut s = connect_from(&rt, from, addr);
            s.write_all(b"POST /alert HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let mut third = connect_from(&rt, a, addr);
    let (status, head) = read_head(&mut third, Duration::from_secs(5)).expect("no 429");
    assert_eq!(status, 429, "{head}");
    let mut fifth = connect_from(&rt, Ipv4Addr::new(127, 0, 0, 5), addr);
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (status, head) = read_head(&mut fifth, Duration::from_secs(15)).expect("no 503");
    assert_eq!(status, 503, "{head}");
    for s in &mut slow {
        let (status, head) = read_head(s, Duration::from_secs(15)).expect("no 408");
        assert_eq!(status, 408, "{head}");
        assert!(read_to_close(s, Duration::from_secs(5)).is_some());
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(6),
        "timed out too early"
    );
    daemon.wait_for_log(
        "too many HTTP connections; answered 503",
        Duration::from_secs(5),
    );
    // Once the clients close, their slots are free again.
    drop((slow, third, fifth));
    let deadline = Instant::now() + Duration::from_secs(5);
    while healthz_from(&rt, a, addr) != Some(200) {
        assert!(Instant::now() < deadline, "slots not released");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 13, defect 9 (the webhook part): `/alert` with a valid token called any number
/// in the world, and `Authorization: bearer …` (lowercase, which RFC 9110 allows) was
/// refused. Now only numbers of `[contacts]` and `[groups]` ring unless `[webhook]
/// numbers = "any"`, and the scheme is matched case-insensitively.
#[test]
fn regression_who_may_ring_a_phone_alert_calls_any_number_and_refuses_lowercase_bearer() {
    let twilio = FakeTwilio::start();
    let (_daemon, dir, base) = http_daemon(&twilio, "");
    let url = format!("{base}/alert");
    let form = (
        "Content-Type",
        "application/x-www-form-urlencoded".to_string(),
    );
    let bearer = ("Authorization", format!("bearer {TEST_TOKEN}"));
    // bob's number written out is fine: it is reachable through [contacts].
    let (status, _, text) = request(
        "POST",
        &url,
        &[form.clone(), bearer.clone()],
        b"tels=alice,%2B15005550002&message=db+down".to_vec(),
    );
    assert_eq!(status, 200, "{text}");
    twilio.wait_until(Duration::from_secs(10), |c| c.len() == 2);
    let (status, _, text) = request(
        "POST",
        &url,
        &[
            form.clone(),
            ("Authorization", format!("BEARER  {TEST_TOKEN}")),
        ],
        b"tels=oncall,%2B15005550009&message=other".to_vec(),
    );
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("+15005550009") && text.contains("numbers = \"any\""),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(twilio.calls().len(), 2, "a refused alert rang someone");
    assert_eq!(incidents(dir.path()).len(), 1);

    let (_daemon, _dir, base) = http_daemon(&twilio, "numbers = \"any\"\n");
    let (status, _, text) = request(
        "POST",
        &format!("{base}/alert"),
        &[form, bearer],
        b"tels=%2B15005550009&message=other".to_vec(),
    );
    assert_eq!(status, 200, "{text}");
    twilio.wait_until(Duration::from_secs(10), |c| {
        c.iter().any(|c| c.to == "+15005550009")
    });
}

/// Issue 13, defect 9 (the SendGrid part): SendGrid without auth was accepted with no
/// warning, `[smtp] senders` was not applied to SendGrid mail, and `require_dkim` took a
/// passing signature of any domain. Now: a warning at start and in `mailcall check`, the
/// envelope sender must be in `senders`, and the DKIM domain must align with `From:`.
#[test]
fn regression_who_may_ring_a_phone_sendgrid_unwarned_senders_ignored_dkim_unaligned() {
    let twilio = FakeTwilio::start();
    let (daemon, dir, _) = http_daemon(&twilio, "[sendgrid]\nrequire_dkim = true\n");
    daemon.wait_for_log(
        "[sendgrid] has neither `username` (Basic auth) nor `public_key`",
        Duration::from_secs(5),
    );
    let out = command(dir.path()).arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: [sendgrid] has neither"),
        "{stdout}"
    );
    drop(daemon);

    let cfg = std::fs::read_to_string(dir.path().join("rules.toml"))
        .unwrap()
        .replace(
            "hostname = \"mx.test\"\n",
            "hostname = \"mx.test\"\nsenders = [\"*@monitoring.example.com\"]\n",
        );
    let daemon = Daemon::start(dir.path(), &cfg, false);
    let url = format!("http://{}/sendgrid/inbound", daemon.http.unwrap());
    let post = |envelope_from: &str, from: &str, dkim: &str, subject: &str| {
        let envelope = format!(r#"{{"to":["alerts@example.com"],"from":"{envelope_from}"}}"#);
        let email =
            format!("From: {from}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@x>\r\n\r\nbody");
        let body = sendgrid_body(
            &[
                ("email", email.as_bytes()),
                ("envelope", envelope.as_bytes()),
                ("dkim", dkim.as_bytes()),
            ],
            &[],
        );
        request("POST", &url, &[multipart()], body).0
    };
    let ours = "m@monitoring.example.com";
    assert_eq!(
        post(
            "intruder@elsewhere.example",
            ours,
            "{@monitoring.example.com : pass}",
            "sender-refused"
        ),
        200
    );
    assert_eq!(
        post(ours, ours, "{@evil.example : pass}", "dkim-unaligned"),
        200
    );
    assert_eq!(
        post(
            ours,
            "boss@elsewhere.example",
            "{@monitoring.example.com : pass}",
            "from-unaligned"
        ),
        200
    );
    assert_eq!(
        post(
            ours,
            "Monitor <alerts@eu.monitoring.example.com>",
            "{@evil.example : pass, @monitoring.example.com : pass}",
            "all-good"
        ),
        200
    );
    let calls = twilio.wait_until(Duration::from_secs(10), |c| !c.is_empty());
    assert!(calls[0].twiml.contains("all-good"), "{}", calls[0].twiml);
    for reason in [
        "envelope sender <intruder@elsewhere.example> is not allowed by [smtp] senders",
        "DKIM {@evil.example : pass} for From: m@monitoring.example.com",
        "for From: boss@elsewhere.example",
    ] {
        daemon.wait_for_log(reason, Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(twilio.calls().len(), 1, "a refused mail rang someone");
    assert_eq!(incidents(dir.path()).len(), 1);
}
