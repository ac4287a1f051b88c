//! On-call policy, pure (no I/O, no clock: the time is passed in): who is on call
//! (`rotation`), when a rule applies (`when`, with Japanese holidays from `holidays`),
//! and which alerts a silence mutes (`silence`). The store keeps overrides and
//! silences; routing gets them, with the time, as a [`Policy`].

pub mod holidays;
pub mod rotation;
pub mod silence;
pub mod when;

use jiff::Timestamp;

pub use rotation::{Override, Rotation, Segment, parse_start, rfc3339_in};
pub use silence::{Matcher, Silence};
pub use when::When;

/// Who a rotation rang for an alert, and until when they are on call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnCall {
    pub rotation: String,
    /// A contact name.
    pub who: String,
    pub until: Timestamp,
    /// The override that put them there, if any.
    pub override_id: Option<i64>,
}

/// What routing needs besides the configuration and the alert: the time it happens
/// at, and the overrides and silences in the store.
#[derive(Debug, Clone)]
pub struct Policy {
    pub now: Timestamp,
    pub overrides: Vec<Override>,
    pub silences: Vec<Silence>,
}

impl Policy {
    /// At `now`, with no overrides nor silences.
    pub fn at(now: Timestamp) -> Policy {
        Policy {
            now,
            overrides: Vec::new(),
            silences: Vec::new(),
        }
    }

    /// At the current time (for callers at the edges: the CLI, the daemon).
    pub fn now() -> Policy {
        Policy::at(Timestamp::now())
    }
}

/// Unix milliseconds → a timestamp (clamped to what jiff represents).
pub fn from_ms(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

/// Parses a time given on the command line or over HTTP: RFC 3339 with an offset, or
/// with an IANA zone in brackets.
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    text.trim()
        .parse::<Timestamp>()
        .or_else(|_| text.trim().parse::<jiff::ZonedDateTime>().map(|z| z.timestamp()))
        .map_err(|_| {
            format!("`{text}` is not a time; write RFC 3339 with an offset, e.g. 2026-11-23T10:00:00+09:00")
        })
}
