//! The settings in force: the validated configuration plus what it points at (secrets
//! from the environment, the TLS certificate). Swapped whole on SIGHUP, so every unit of
//! work (an SMTP connection, an HTTP request, a routing batch, a call) sees one
//! consistent version, and work in flight keeps the version it started with.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError};
use crate::ingest::tls::{Tls, TlsError};
use crate::ingest::{MissingSecret, Secrets};

/// Everything a reload replaces.
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    pub secrets: Secrets,
    /// The STARTTLS certificate, when `[smtp] tls_cert` is set.
    pub tls: Option<Arc<Tls>>,
}

/// The settings in force, shared by every part of the daemon.
pub type Live = Arc<ArcSwap<Settings>>;

/// Why settings could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Secret(#[from] MissingSecret),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Settings {
    /// Reads the configuration, the secrets it names and its certificate.
    pub fn load(path: &Path) -> Result<Settings, LoadError> {
        Settings::from_config(Config::load(path)?, None)
    }

    /// Completes a validated configuration; `previous` lends its certificate when the
    /// files did not move (it is read again all the same).
    pub fn from_config(config: Config, previous: Option<&Settings>) -> Result<Settings, LoadError> {
        let secrets = Secrets::from_env(&config)?;
        let tls = match &config.smtp.tls {
            None => None,
            Some(files) => match previous.and_then(|p| {
                p.tls
                    .as_ref()
                    .filter(|_| p.config.smtp.tls.as_ref() == Some(files))
            }) {
                Some(tls) => {
                    tls.reload()?;
                    Some(Arc::clone(tls))
                }
                None => Some(Arc::new(Tls::load(files)?)),
            },
        };
        Ok(Settings {
            config,
            secrets,
            tls,
        })
    }

    /// Wraps settings for sharing.
    pub fn live(self) -> Live {
        Arc::new(ArcSwap::from_pointee(self))
    }

    /// SIGHUP: loads the file again and, only if all of it is valid, swaps it in.
    /// Returns what changed that needs a restart to take effect.
    pub fn reload(live: &Live, path: &Path) -> Result<Vec<String>, LoadError> {
        let current = live.load_full();
        let new = Settings::from_config(Config::load(path)?, Some(&current))?;
        let needs_restart = restart_only_changes(&current.config, &new.config);
        live.store(Arc::new(new));
        Ok(needs_restart)
    }
}

/// Settings that are read once at start (sockets, the store, the Twilio client).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut check = |differs: bool, what: &str| {
        if differs {
            changed.push(what.to_string());
        }
    };
    check(old.smtp.listen != new.smtp.listen, "[smtp] listen");
    check(
        old.smtp.max_connections != new.smtp.max_connections,
        "[smtp] max_connections",
    );
    check(
        old.http.as_ref().map(|h| (h.listen, h.max_connections))
            != new.http.as_ref().map(|h| (h.listen, h.max_connections)),
        "[http]",
    );
    check(
        old.sendgrid.as_ref().map(|s| &s.path) != new.sendgrid.as_ref().map(|s| &s.path),
        "[sendgrid] path",
    );
    check(old.webhook.is_some() != new.webhook.is_some(), "[webhook]");
    check(
        old.state.path != new.state.path || old.state.max_bytes != new.state.max_bytes,
        "[state]",
    );
    check(
        old.twilio.api_base != new.twilio.api_base
            || old.twilio.request_timeout != new.twilio.request_timeout,
        "[twilio] api_base/request_timeout",
    );
    check(old.canary.is_some() != new.canary.is_some(), "[canary]");
    changed
}
