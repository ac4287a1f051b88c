//! The HTTP ways in: SendGrid Inbound Parse (both modes, Basic auth, signatures,
//! SPF/DKIM, duplicates, size), the `/alert` webhook and `/healthz`; and `mailcall call`.

use std::time::Duration;

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
        let email = format!("Subject: {subject}\r\nMessage-ID: <{subject}@x>\r\n\r\nbody");
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
    let (_daemon, _dir, base) = http_daemon(&twilio, "[sendgrid]\n[state]\nmax_bytes = 262144\n");
    let url = format!("{base}/sendgrid/inbound");
    let huge = vec![b'a'; 40 * 1024 * 1024 + 1024];
    let body = sendgrid_body(&[("email", &huge)], &[]);
    assert_eq!(request("POST", &url, &[multipart()], body).0, 413);
    // 1 MiB fits the HTTP limit but not the (capped) store: SendGrid must retry later.
    let big = format!("Subject: big\r\n\r\n{}", "b".repeat(1024 * 1024));
    let body = sendgrid_body(
        &[
            ("email", big.as_bytes()),
            ("envelope", br#"{"to":["alerts@example.com"]}"#),
        ],
        &[],
    );
    let (status, _, text) = request("POST", &url, &[multipart()], body);
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
    let (_daemon, dir, base) = http_daemon(&twilio, "");
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
