//! SendGrid Inbound Parse payloads → the raw mail the rest of mailcall understands.
//!
//! SendGrid posts `multipart/form-data` in one of two modes. In *raw* mode the `email`
//! field is the whole MIME message, stored as it is. In *default* mode SendGrid has taken
//! the mail apart (`headers`, `text`, `html`, `subject`, …, with `text` and `html` left in
//! the charset the `charsets` field names — ISO-2022-JP for much Japanese mail); this
//! module decodes those parts and puts a plain UTF-8 MIME message back together from the
//! original headers, so that the store holds mail either way and routing has one input.
//!
//! Also here: the signed-webhook check (ECDSA P-256 over timestamp + body) and the SPF
//! and DKIM verdicts, with the DKIM domain held to the `From:` domain (DMARC's relaxed
//! alignment), because a valid signature of *some* domain says nothing about the sender.
//! No I/O.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use p256::ecdsa::signature::DigestVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::alert::{Alert, Envelope};

/// A mail as SendGrid delivered it, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub raw: Vec<u8>,
    pub envelope: Envelope,
    pub message_id: Option<String>,
    /// The address in the mail's `From:` header (empty without one): what DKIM must align with.
    pub header_from: String,
    /// SendGrid's SPF verdict (`pass`, `fail`, `softfail`, …), if sent.
    pub spf: Option<String>,
    /// SendGrid's DKIM results, e.g. `{@example.com : pass}`.
    pub dkim: Option<String>,
}

/// Why a payload is not a SendGrid Inbound Parse post.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error(
        "neither an `email` field (raw mode) nor `headers`/`text`/`html` fields (default mode)"
    )]
    NoMail,
    #[error("the `envelope` field is not the JSON SendGrid sends: {0}")]
    Envelope(String),
}

/// Why a signed request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing X-Twilio-Email-Event-Webhook-Signature or -Timestamp header")]
    Missing,
    #[error("the timestamp is not a Unix time")]
    BadTimestamp,
    #[error("the timestamp is {0} s away from now; stale or replayed")]
    Stale(i64),
    #[error("the signature is not base64 DER")]
    Malformed,
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Verifies SendGrid's signature: ECDSA P-256 with SHA-256 over `timestamp` followed by
/// the raw body (given in the chunks it arrived in), base64 DER in the signature header.
/// Checked before anything is parsed.
pub fn verify_signature(
    key: &VerifyingKey,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[impl AsRef<[u8]>],
    now_secs: i64,
    max_age: Duration,
) -> Result<(), SignatureError> {
    let signature = precheck_signature(signature, timestamp, now_secs, max_age)?;
    // Hashed in place, chunk by chunk as it arrived: a copy of timestamp + body would
    // double a 40 MiB body.
    let mut digest = Sha256::new_with_prefix(timestamp.unwrap_or_default().as_bytes());
    for chunk in body {
        digest.update(chunk);
    }
    key.verify_digest(digest, &signature)
        .map_err(|_| SignatureError::Mismatch)
}

/// Checks what can be checked without the body (both headers there, the timestamp fresh,
/// the signature base64 DER), so that a request without a chance is refused before its
/// body is read. Returns the decoded signature.
pub fn precheck_signature(
    signature: Option<&str>,
    timestamp: Option<&str>,
    now_secs: i64,
    max_age: Duration,
) -> Result<Signature, SignatureError> {
    let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
        return Err(SignatureError::Missing);
    };
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew = now_secs.saturating_sub(ts);
    if skew.unsigned_abs() > max_age.as_secs() {
        return Err(SignatureError::Stale(skew));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| SignatureError::Malformed)?;
    Signature::from_der(&der).map_err(|_| SignatureError::Malformed)
}

/// SendGrid's DKIM results (`{@a.example : pass, @b.example : fail}`) as (domain, passed).
fn dkim_results(dkim: &str) -> impl Iterator<Item = (String, bool)> + '_ {
    dkim.trim()
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter_map(|r| {
            let (domain, verdict) = r.rsplit_once(':')?;
            let domain = domain.trim().trim_start_matches('@').trim_end_matches('.');
            Some((
                domain.to_ascii_lowercase(),
                verdict.trim().eq_ignore_ascii_case("pass"),
            ))
        })
}

/// Did SendGrid find a passing DKIM signature whose domain aligns with the `From:`
/// address's domain? Relaxed alignment as DMARC defines it (RFC 7489 3.1.1): both have
/// the same organisational domain (the registrable domain by the Public Suffix List), so
/// `mail.example.com` aligns with `example.com` but `example.net` or `evil.co.uk` with
/// `shop.co.uk` do not.
pub fn dkim_aligned(dkim: Option<&str>, header_from: &str) -> bool {
    let Some((_, from_domain)) = header_from.rsplit_once('@') else {
        return false;
    };
    let from_domain = a_labels(from_domain);
    let from_org = organisational_domain(&from_domain);
    dkim.is_some_and(|d| {
        dkim_results(d).any(|(domain, passed)| {
            passed && !domain.is_empty() && organisational_domain(&a_labels(&domain)) == from_org
        })
    })
}

/// A domain in its ASCII form, lower-cased: a `From:` of an internationalised domain
/// (`例え.jp`, as SMTPUTF8 mail has it) and its DKIM signature (`d=` is always
/// `xn--r8jz45g.jp`, RFC 6376 §3.5) are then the same name.
fn a_labels(domain: &str) -> String {
    let domain = domain.trim_end_matches('.');
    idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_ascii_lowercase())
}

/// The registrable domain (`mail.example.co.uk` → `example.co.uk`); the name itself when
/// the list has none (a public suffix, or a single label).
fn organisational_domain(domain: &str) -> &str {
    psl::domain_str(domain).unwrap_or(domain)
}

/// Builds the stored mail from the form fields (name → bytes; file parts left out).
pub fn from_fields(mut fields: HashMap<String, Vec<u8>>) -> Result<Inbound, PayloadError> {
    let text_field = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).trim().to_string())
    };
    let envelope = match fields.get("envelope") {
        None => Envelope::default(),
        Some(json) => {
            #[derive(serde::Deserialize)]
            struct Raw {
                #[serde(default)]
                to: Vec<String>,
                from: Option<String>,
            }
            let raw: Raw =
                serde_json::from_slice(json).map_err(|e| PayloadError::Envelope(e.to_string()))?;
            Envelope {
                mail_from: raw.from.filter(|f| !f.is_empty()),
                rcpt_to: raw.to,
            }
        }
    };
    let (spf, dkim) = (text_field("SPF"), text_field("dkim"));
    let raw = match fields.remove("email") {
        Some(email) => email,
        None => rebuild_mime(&fields)?,
    };
    // Without the envelope, `from` is the header's address (or nothing).
    let parsed = Alert::from_mime(&raw, &Envelope::default());
    Ok(Inbound {
        raw,
        envelope,
        message_id: parsed.message_id,
        header_from: parsed.from,
        spf,
        dkim,
    })
}

/// Default mode: the original headers (less the MIME ones, which described the parts
/// SendGrid took apart), then one UTF-8 body, text if there is any, else HTML.
fn rebuild_mime(fields: &HashMap<String, Vec<u8>>) -> Result<Vec<u8>, PayloadError> {
    let charsets: HashMap<String, String> = fields
        .get("charsets")
        .and_then(|c| serde_json::from_slice(c).ok())
        .unwrap_or_default();
    let decoded = |name: &str| -> Option<String> {
        let bytes = fields.get(name)?;
        let label = charsets.get(name).map_or("utf-8", String::as_str);
        let encoding =
            encoding_rs::Encoding::for_label(label.as_bytes()).unwrap_or(encoding_rs::UTF_8);
        Some(encoding.decode(bytes).0.into_owned())
    };
    let text = decoded("text").filter(|t| !t.trim().is_empty());
    let html = decoded("html").filter(|t| !t.trim().is_empty());
    let headers = decoded("headers");
    if text.is_none() && html.is_none() && headers.is_none() {
        return Err(PayloadError::NoMail);
    }
    let mut out = String::new();
    let has = |name: &str| headers.as_deref().is_some_and(|h| has_header(h, name));
    let (has_from, has_to, has_subject) = (has("from"), has("to"), has("subject"));
    if let Some(h) = &headers {
        out.push_str(&without_mime_headers(h));
    }
    for (present, name, field) in [
        (has_from, "From", "from"),
        (has_to, "To", "to"),
        (has_subject, "Subject", "subject"),
    ] {
        if !present && let Some(value) = decoded(field) {
            out.push_str(&format!(
                "{name}: {}\r\n",
                value.trim().replace(['\r', '\n'], " ")
            ));
        }
    }
    let (kind, body) = match (text, html) {
        (Some(t), _) => ("plain", t),
        (None, Some(h)) => ("html", h),
        (None, None) => ("plain", String::new()),
    };
    out.push_str(&format!(
        "MIME-Version: 1.0\r\nContent-Type: text/{kind}; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ));
    out.push_str(&body);
    Ok(out.into_bytes())
}

fn has_header(headers: &str, name: &str) -> bool {
    headers.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, _)| {
            !n.starts_with([' ', '\t']) && n.trim().eq_ignore_ascii_case(name)
        })
    })
}

/// Drops `Content-Type`, `Content-Transfer-Encoding` and `MIME-Version` (with their
/// folded continuation lines); ends every line with CRLF.
fn without_mime_headers(headers: &str) -> String {
    let mut out = String::with_capacity(headers.len());
    let mut skipping = false;
    for line in headers.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if !skipping {
                out.push_str(line);
                out.push_str("\r\n");
            }
            continue;
        }
        let name = line.split(':').next().unwrap_or_default().trim();
        skipping = ["content-type", "content-transfer-encoding", "mime-version"]
            .iter()
            .any(|m| name.eq_ignore_ascii_case(m));
        if !skipping {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn raw_mode_keeps_the_mail_as_sent() {
        let mail = b"From: a@b.example\r\nMessage-ID: <m1@b>\r\nSubject: db down\r\n\r\nbody\r\n";
        let f = fields(&[
            ("email", mail),
            (
                "envelope",
                br#"{"to":["alerts@example.com"],"from":"a@b.example"}"#,
            ),
            ("SPF", b"pass"),
        ]);
        let inbound = from_fields(f).unwrap();
        assert_eq!(inbound.raw, mail);
        assert_eq!(inbound.envelope.rcpt_to, ["alerts@example.com"]);
        assert_eq!(inbound.envelope.mail_from.as_deref(), Some("a@b.example"));
        assert_eq!(inbound.message_id.as_deref(), Some("m1@b"));
        assert_eq!(inbound.spf.as_deref(), Some("pass"));
    }

    #[test]
    fn default_mode_decodes_iso_2022_jp_text_and_keeps_the_original_headers() {
        let (text, _, _) = encoding_rs::ISO_2022_JP.encode("サーバー web01 停止\n");
        let headers = "MIME-Version: 1.0\nFrom: Zabbix <zabbix@example.jp>\nSubject: =?ISO-2022-JP?B?GyRCRGQ7XxsoQg==?= web01\n\
                       Message-ID: <z1@example.jp>\nContent-Type: multipart/alternative;\n boundary=\"xx\"\nTo: alerts@example.com\n";
        let f = fields(&[
            ("headers", headers.as_bytes()),
            ("text", &text),
            ("html", b"<p>ignored when there is text</p>"),
            ("charsets", br#"{"to":"UTF-8","html":"UTF-8","subject":"UTF-8","from":"UTF-8","text":"iso-2022-jp"}"#),
            ("subject", "停止 web01".as_bytes()),
        ]);
        let inbound = from_fields(f).unwrap();
        let alert = Alert::from_mime(&inbound.raw, &inbound.envelope);
        assert_eq!(alert.subject, "停止 web01");
        assert_eq!(alert.body, "サーバー web01 停止");
        assert_eq!(alert.from, "zabbix@example.jp");
        assert_eq!(inbound.message_id.as_deref(), Some("z1@example.jp"));
        let raw = String::from_utf8(inbound.raw).unwrap();
        assert!(
            !raw.contains("multipart/alternative") && !raw.contains("boundary"),
            "{raw}"
        );
    }

    #[test]
    fn default_mode_without_headers_uses_the_fields_and_html() {
        let f = fields(&[
            ("from", b"Nagios <n@example.com>"),
            ("subject", b"db1 is DOWN"),
            ("html", b"<p>Disk <b>full</b></p>"),
        ]);
        let alert = Alert::from_mime(&from_fields(f).unwrap().raw, &Envelope::default());
        assert_eq!(alert.subject, "db1 is DOWN");
        assert_eq!(alert.from, "n@example.com");
        assert_eq!(alert.body, "Disk full");
    }

    #[test]
    fn not_sendgrid_at_all() {
        assert_eq!(
            from_fields(fields(&[("x", b"y")])),
            Err(PayloadError::NoMail)
        );
        assert!(matches!(
            from_fields(fields(&[("email", b"x"), ("envelope", b"nope")])),
            Err(PayloadError::Envelope(_))
        ));
    }

    #[test]
    fn dkim_must_pass_and_align_with_the_from_domain() {
        let from = "alerts@example.com";
        assert!(dkim_aligned(Some("{@example.com : pass}"), from));
        assert!(dkim_aligned(Some("{@Example.COM. : PASS}"), from));
        assert!(dkim_aligned(
            Some("{@evil.example : pass, @mail.example.com : pass}"),
            from
        ));
        // Relaxed: the same organisational domain either way round.
        assert!(dkim_aligned(
            Some("{@example.com : pass}"),
            "a@mon.eu.example.com"
        ));
        assert!(dkim_aligned(
            Some("{@mail.example.co.uk : pass}"),
            "a@example.co.uk"
        ));
        // An internationalised domain: the signature names it in A-labels.
        assert!(dkim_aligned(
            Some("{@xn--r8jz45g.jp : pass}"),
            "alert@例え.jp"
        ));
        assert!(!dkim_aligned(
            Some("{@xn--r8jz45g.jp : pass}"),
            "alert@例.jp"
        ));
        // A passing signature of someone else's domain is not enough.
        assert!(!dkim_aligned(Some("{@sendgrid.net : pass}"), from));
        assert!(!dkim_aligned(Some("{@example.com.evil.org : pass}"), from));
        assert!(!dkim_aligned(
            Some("{@other.co.uk : pass}"),
            "a@example.co.uk"
        ));
        assert!(!dkim_aligned(Some("{@co.uk : pass}"), "a@example.co.uk"));
        assert!(!dkim_aligned(Some("{@example.com : fail}"), from));
        assert!(!dkim_aligned(
            Some("{@a.example : fail, @example.com : neutral}"),
            from
        ));
        assert!(!dkim_aligned(Some("none"), from));
        assert!(!dkim_aligned(None, from));
        assert!(!dkim_aligned(Some("{@example.com : pass}"), ""));
        assert!(!dkim_aligned(Some("{@ : pass}"), "a@"));
    }

    #[test]
    fn signatures() {
        use p256::ecdsa::SigningKey;
        use p256::ecdsa::signature::Signer;
        let signing = SigningKey::from_bytes(&[7u8; 32].into()).unwrap();
        let key = VerifyingKey::from(&signing);
        let body =
            b"--xYzZY\r\nContent-Disposition: form-data; name=\"email\"\r\n\r\nhi\r\n--xYzZY--\r\n";
        let sign = |ts: &str, body: &[u8]| {
            let mut m = ts.as_bytes().to_vec();
            m.extend_from_slice(body);
            let sig: Signature = signing.sign(&m);
            base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
        };
        let max = Duration::from_secs(600);
        let good = sign("1700000000", body);
        assert_eq!(
            verify_signature(
                &key,
                Some(&good),
                Some("1700000000"),
                &[body],
                1_700_000_100,
                max
            ),
            Ok(())
        );
        // The same body in the chunks it may arrive in.
        let (head, tail) = body.split_at(20);
        assert_eq!(
            verify_signature(
                &key,
                Some(&good),
                Some("1700000000"),
                &[head, tail],
                1_700_000_100,
                max
            ),
            Ok(())
        );
        let mut tampered = body.to_vec();
        tampered[60] ^= 1;
        assert_eq!(
            verify_signature(
                &key,
                Some(&good),
                Some("1700000000"),
                &[&tampered],
                1_700_000_100,
                max
            ),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is signed too: changing it breaks the signature.
        assert_eq!(
            verify_signature(
                &key,
                Some(&good),
                Some("1700000001"),
                &[body],
                1_700_000_100,
                max
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(
                &key,
                Some(&good),
                Some("1700000000"),
                &[body],
                1_700_001_000,
                max
            ),
            Err(SignatureError::Stale(1000))
        );
        assert_eq!(
            verify_signature(&key, None, Some("1"), &[body], 1, max),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_signature(
                &key,
                Some("!!"),
                Some("1700000000"),
                &[body],
                1_700_000_000,
                max
            ),
            Err(SignatureError::Malformed)
        );
        let other = VerifyingKey::from(&SigningKey::from_bytes(&[9u8; 32].into()).unwrap());
        assert_eq!(
            verify_signature(
                &other,
                Some(&good),
                Some("1700000000"),
                &[body],
                1_700_000_000,
                max
            ),
            Err(SignatureError::Mismatch)
        );
    }
}
