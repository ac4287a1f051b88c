//! `X-Twilio-Signature`: how Twilio signs the requests it sends us (status callbacks,
//! `<Gather>` actions, voice webhooks).
//!
//! The signature is HMAC-SHA1, keyed with the account's auth token, over the full URL
//! Twilio requested followed by every POST parameter, sorted by name, as name and value
//! run together; base64-encoded. Behind proxies the URL's port may or may not be written
//! out, so, as Twilio's own libraries do, a request is valid if either the URL with its
//! default port or the URL without it matches. Comparison is constant-time.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// The signature Twilio computes for `url` and the POST `params`.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Is `signature` Twilio's for this request?
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    url_variants(url).iter().any(|u| {
        bool::from(
            sign(auth_token, u, params)
                .as_bytes()
                .ct_eq(signature.trim().as_bytes()),
        )
    })
}

/// The URL as given, with its default port written out, and without it.
fn url_variants(url: &str) -> Vec<String> {
    let mut variants = vec![url.to_string()];
    let Some((scheme, rest)) = url.split_once("://") else {
        return variants;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => "443",
        "http" => "80",
        _ => return variants,
    };
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), authority),
    };
    // A port is what follows the last ':' outside an IPv6 literal's brackets.
    let port_at = host_port
        .rfind(':')
        .filter(|&i| !host_port[i..].contains(']'));
    match port_at {
        Some(i) => variants.push(format!("{scheme}://{userinfo}{}{tail}", &host_port[..i])),
        None => variants.push(format!(
            "{scheme}://{userinfo}{host_port}:{default_port}{tail}"
        )),
    }
    variants
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Twilio's published example (twilio.com/docs/usage/security).
    fn published() -> (&'static str, &'static str, Vec<(String, String)>) {
        (
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            params(&[
                ("CallSid", "CA1234567890ABCDE"),
                ("Caller", "+12349013030"),
                ("Digits", "1234"),
                ("From", "+12349013030"),
                ("To", "+18005551212"),
            ]),
        )
    }

    #[test]
    fn matches_twilios_published_example() {
        let (token, url, params) = published();
        assert_eq!(sign(token, url, &params), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        assert!(verify(token, url, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
    }

    #[test]
    fn parameter_order_does_not_matter_but_every_byte_does() {
        let (token, url, mut params) = published();
        params.reverse();
        assert!(verify(token, url, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        params[0].1.push('0');
        assert!(!verify(token, url, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        let (_, _, params) = published();
        assert!(!verify(
            "54321",
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        assert!(!verify(
            token,
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        assert!(!verify(token, url, &params, ""));
    }

    #[test]
    fn accepts_the_url_with_or_without_its_default_port() {
        let (token, url, params) = published();
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        // Signed without the port, requested with it (and the other way round).
        assert!(verify(
            token,
            with_port,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        let signed_with_port = sign(token, with_port, &params);
        assert!(verify(token, url, &params, &signed_with_port));
        assert_eq!(
            url_variants("http://user:pw@[::1]:8080/x?y#z"),
            [
                "http://user:pw@[::1]:8080/x?y#z",
                "http://user:pw@[::1]/x?y#z"
            ]
        );
        assert_eq!(url_variants("http://h"), ["http://h", "http://h:80"]);
    }
}
