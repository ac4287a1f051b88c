//! The ways alerts come in. Each one stores the alert durably before it acknowledges
//! it, then wakes the dispatcher; none of them routes or calls anyone itself.

pub mod callbacks;
pub mod http;
pub mod oncall;
pub mod sendgrid;
pub mod smtp;
pub mod tls;

use crate::config::Config;

/// Secrets the ways in check against, read from the environment at start.
#[derive(Clone, Default)]
pub struct Secrets {
    pub sendgrid_password: Option<String>,
    pub webhook_token: Option<String>,
    /// SMTP AUTH user → password.
    pub smtp_passwords: std::collections::BTreeMap<String, String>,
    /// The Twilio auth token, which signs Twilio's callbacks (with `public_url`).
    pub twilio_auth_token: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

/// A secret the configuration names but the environment lacks.
#[derive(Debug, thiserror::Error)]
#[error(
    "{section} names the environment variable {var}, which is not set (or empty); set it, e.g. in /etc/mailcall/mailcall.env"
)]
pub struct MissingSecret {
    section: &'static str,
    var: String,
}

impl Secrets {
    /// Reads every secret the configuration names; a missing one stops the start.
    pub fn from_env(config: &Config) -> Result<Secrets, MissingSecret> {
        let read = |section: &'static str, var: &str| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| MissingSecret {
                    section,
                    var: var.to_string(),
                })
        };
        Ok(Secrets {
            sendgrid_password: match config.sendgrid.as_ref().and_then(|s| s.basic.as_ref()) {
                Some((_, var)) => Some(read("[sendgrid] password_env", var)?),
                None => None,
            },
            webhook_token: match &config.webhook {
                Some(w) => Some(read("[webhook] token_env", &w.token_env)?),
                None => None,
            },
            smtp_passwords: config
                .smtp
                .users
                .iter()
                .map(|(user, var)| Ok((user.clone(), read("[smtp.users]", var)?)))
                .collect::<Result<_, MissingSecret>>()?,
            twilio_auth_token: match &config.twilio.public_url {
                Some(_) => Some(read(
                    "[twilio] public_url (to verify Twilio's signatures)",
                    "TWILIO_AUTH_TOKEN",
                )?),
                // Still wanted, if there is one: incidents opened with a public URL
                // that a reload removed still get their calls' callbacks.
                None => std::env::var("TWILIO_AUTH_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
            },
        })
    }
}
