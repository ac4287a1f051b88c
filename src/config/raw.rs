//! The file as written: what serde reads `rules.toml` into. Every table refuses unknown
//! keys (`deny_unknown_fields`), and values keep their `toml::Spanned` position so that
//! validation can point at them.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) smtp: RawSmtp,
    pub(super) twilio: Spanned<RawTwilio>,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) contacts: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(super) groups: BTreeMap<String, Vec<Spanned<String>>>,
    #[serde(default, rename = "rule")]
    pub(super) rules: Vec<RawRule>,
    #[serde(default)]
    pub(super) state: RawState,
    #[serde(default)]
    pub(super) limits: RawLimits,
    pub(super) http: Option<RawHttp>,
    pub(super) sendgrid: Option<Spanned<RawSendgrid>>,
    pub(super) webhook: Option<RawWebhook>,
    pub(super) canary: Option<RawCanary>,
    pub(super) bridge: Option<RawBridge>,
    #[serde(default)]
    pub(super) prompts: BTreeMap<String, Spanned<BTreeMap<String, Spanned<String>>>>,
    #[serde(default, rename = "rotation")]
    pub(super) rotations: Vec<RawRotation>,
    #[serde(default, rename = "heartbeat")]
    pub(super) heartbeats: Vec<RawHeartbeat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRotation {
    pub(super) name: Spanned<String>,
    pub(super) members: Spanned<Vec<Spanned<String>>>,
    pub(super) shift: Spanned<String>,
    pub(super) start: Spanned<String>,
    pub(super) timezone: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWhen {
    pub(super) days: Option<Vec<Spanned<String>>>,
    pub(super) hours: Option<Spanned<String>>,
    pub(super) timezone: Option<Spanned<String>>,
    pub(super) holidays: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEscalation {
    pub(super) after: Spanned<String>,
    pub(super) call: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeartbeat {
    pub(super) name: Spanned<String>,
    pub(super) from: Option<Spanned<String>>,
    pub(super) to: Option<Spanned<String>>,
    pub(super) subject: Option<Spanned<String>>,
    pub(super) body: Option<Spanned<String>>,
    pub(super) every: Spanned<String>,
    pub(super) grace: Option<Spanned<String>>,
    pub(super) call: Spanned<Vec<Spanned<String>>>,
    pub(super) message: Option<Spanned<String>>,
    pub(super) language: Option<Spanned<String>>,
    pub(super) voice: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBridge {
    pub(super) pin: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCanary {
    pub(super) every: Spanned<String>,
    pub(super) call: Spanned<Vec<Spanned<String>>>,
    pub(super) message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) listen: Spanned<String>,
    pub(super) request_timeout: Option<Spanned<String>>,
    pub(super) max_body_bytes: Option<Spanned<u64>>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) max_connections_per_ip: Option<Spanned<u64>>,
    pub(super) header_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSendgrid {
    pub(super) path: Option<Spanned<String>>,
    pub(super) username: Option<String>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) public_key: Option<Spanned<String>>,
    pub(super) max_age: Option<Spanned<String>>,
    pub(super) require_spf: Option<bool>,
    pub(super) require_dkim: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) token_env: Spanned<String>,
    pub(super) numbers: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSmtp {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) hostname: Option<String>,
    pub(super) recipients: Option<Vec<Spanned<String>>>,
    pub(super) max_message_bytes: Option<Spanned<u64>>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) max_connections_per_ip: Option<Spanned<u64>>,
    pub(super) bare_newline: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) session_timeout: Option<Spanned<String>>,
    pub(super) tls_cert: Option<Spanned<String>>,
    pub(super) tls_key: Option<Spanned<String>>,
    pub(super) require_tls: Option<Spanned<bool>>,
    pub(super) users: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) require_auth: Option<Spanned<bool>>,
    pub(super) senders: Option<Vec<Spanned<String>>>,
    pub(super) max_auth_failures: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTwilio {
    pub(super) from: Spanned<String>,
    pub(super) api_base: Option<Spanned<String>>,
    pub(super) ring_seconds: Option<Spanned<u32>>,
    pub(super) retry_for: Option<Spanned<String>>,
    pub(super) request_timeout: Option<Spanned<String>>,
    pub(super) retry_initial_delay: Option<Spanned<String>>,
    pub(super) retry_max_delay: Option<Spanned<String>>,
    pub(super) calls_per_second: Option<Spanned<f64>>,
    pub(super) public_url: Option<Spanned<String>>,
    pub(super) reconcile_grace: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) language: Option<Spanned<String>>,
    pub(super) voice: Option<Spanned<String>>,
    pub(super) message: Option<Spanned<String>>,
    pub(super) cooldown: Option<Spanned<String>>,
    pub(super) sms: Option<bool>,
    pub(super) round_interval: Option<Spanned<String>>,
    pub(super) rounds: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: Spanned<String>,
    pub(super) from: Option<Spanned<String>>,
    pub(super) to: Option<Spanned<String>>,
    pub(super) subject: Option<Spanned<String>>,
    pub(super) body: Option<Spanned<String>>,
    pub(super) call: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) drop: Option<Spanned<bool>>,
    pub(super) resolve: Option<Spanned<bool>>,
    pub(super) message: Option<Spanned<String>>,
    pub(super) language: Option<Spanned<String>>,
    pub(super) voice: Option<Spanned<String>>,
    pub(super) dedup_key: Option<Spanned<String>>,
    pub(super) cooldown: Option<Spanned<String>>,
    pub(super) sms: Option<bool>,
    pub(super) round_interval: Option<Spanned<String>>,
    pub(super) rounds: Option<Spanned<u32>>,
    pub(super) when: Option<Spanned<RawWhen>>,
    pub(super) escalate: Option<Vec<Spanned<RawEscalation>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) path: Option<String>,
    pub(super) max_bytes: Option<Spanned<u64>>,
    pub(super) retain: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_calls_per_hour: Option<Spanned<u32>>,
}
