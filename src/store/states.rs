//! The typed states of everything the store keeps, one enum per state machine. Each is
//! stored as text and mirrored by a SQL `CHECK` on its column (see `schema.rs`), so a
//! state the code does not know can neither be written nor read back silently; a test
//! holds every enum and its `CHECK` to the same list.

use std::fmt;

/// Defines a state enum stored as text: `as_str`, `FromStr`, `Display`, serde and
/// rusqlite conversions, and `ALL` (every state, for the `CHECK` tests).
macro_rules! state_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored (and displayed) name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<$name, UnknownState> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err(UnknownState {
                        kind: stringify!($name),
                        value: other.to_string(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(
                value: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<$name> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

/// A stored value that is not one of its enum's states (a store written by a newer
/// mailcall, or edited by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}` in the store; was it written by a newer mailcall?")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
}

state_enum! {
    /// An alert: stored, then routed once (or kept only for the record).
    pub enum AlertState {
        /// Stored and acknowledged; not routed yet.
        Received = "received",
        Routed = "routed",
        /// Refused by a check (SPF, DKIM, recipient); kept for the record, never routed.
        Rejected = "rejected",
    }
}

state_enum! {
    /// What an incident is: an alert's, or the canary's test call.
    pub enum IncidentKind {
        Alert = "alert",
        /// One call per number; no rounds, no SMS, never a dial-in's bridge.
        Canary = "canary",
    }
}

state_enum! {
    /// An incident's lifecycle: `open` while rounds of calls go on, then `bridged` (a
    /// person is in the conference), `unanswered` (every round rang out) or `resolved`
    /// (a resolve rule closed it). Dedup joins `open` and `bridged` incidents only. A
    /// `silenced` incident holds alerts a silence muted: closed from the start, it
    /// never rings, and later muted alerts with its key join it.
    pub enum IncidentStatus {
        Open = "open",
        Bridged = "bridged",
        Unanswered = "unanswered",
        Resolved = "resolved",
        Silenced = "silenced",
    }
}

impl IncidentStatus {
    /// Still an ongoing problem: later alerts with its dedup key join it.
    pub fn is_live(self) -> bool {
        matches!(self, IncidentStatus::Open | IncidentStatus::Bridged)
    }
}

state_enum! {
    /// How a round of calls ended.
    pub enum RoundOutcome {
        /// Someone is (or was) in the bridge.
        Bridged = "bridged",
        NobodyJoined = "nobody joined",
        Resolved = "resolved",
    }
}

state_enum! {
    /// One number of one round of an incident:
    /// `queued → requesting → placed | retrying → requesting … | failed | unknown`;
    /// `unknown` (the request's outcome is not known) is settled by the reconciler into
    /// `placed`, or back to `queued` when Twilio has no such call. A number is `refused`
    /// over the budget, `skipped` when its call from an earlier round is still live,
    /// `canceled` when the incident was resolved before the call left, and `dry-run`
    /// when the incident is a dry run (never dialled by any process).
    pub enum CallState {
        Queued = "queued",
        Requesting = "requesting",
        Unknown = "unknown",
        Retrying = "retrying",
        Placed = "placed",
        Failed = "failed",
        Refused = "refused",
        Skipped = "skipped",
        Canceled = "canceled",
        DryRun = "dry-run",
    }
}

impl CallState {
    /// Nothing more happens to the call by itself.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CallState::Queued | CallState::Requesting | CallState::Unknown | CallState::Retrying
        )
    }
}

state_enum! {
    /// One request to Twilio's `Calls.json`. It is committed as `requesting` before the
    /// request leaves; then `placed` (Twilio's SID, owned by no other attempt), `failed`
    /// (Twilio answered an error: no call exists), or `unknown` (timeout, connection lost
    /// after sending: a call may exist). An `unknown` attempt is never sent again
    /// blindly: the reconciler settles it as `placed` (the status callback or the call
    /// list found its call), `absent` (no call appeared within the grace period) or
    /// `undecided` (Twilio could not tell; the call is sent again, since ringing twice
    /// beats missing).
    pub enum AttemptState {
        Requesting = "requesting",
        Placed = "placed",
        Failed = "failed",
        Unknown = "unknown",
        Absent = "absent",
        Undecided = "undecided",
    }
}

state_enum! {
    /// A call's status as Twilio reports it (callbacks and `Calls/{sid}.json`).
    pub enum TwilioStatus {
        Queued = "queued",
        Initiated = "initiated",
        Ringing = "ringing",
        InProgress = "in-progress",
        Completed = "completed",
        Busy = "busy",
        Failed = "failed",
        NoAnswer = "no-answer",
        Canceled = "canceled",
    }
}

impl TwilioStatus {
    /// The phone rings or the call is on: calling the number again would interrupt it.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            TwilioStatus::Queued
                | TwilioStatus::Initiated
                | TwilioStatus::Ringing
                | TwilioStatus::InProgress
        )
    }
}

state_enum! {
    /// A heartbeat monitor: `waiting` for its first beat (the deadline counts from when
    /// the daemon first saw it), `ok` (beats come), `missed` (an incident was opened;
    /// the next beat resolves it).
    pub enum HeartbeatState {
        Waiting = "waiting",
        Ok = "ok",
        Missed = "missed",
    }
}

state_enum! {
    /// A placed call's SMS summary (`sms = true`): `owed` from the transaction that
    /// settled the call as placed, whoever settled it, until it is `sent` or has
    /// `failed` (one attempt: the call is what matters). A crash in between leaves it
    /// owed, and the next daemon sends it.
    pub enum SmsState {
        Owed = "owed",
        Sent = "sent",
        Failed = "failed",
    }
}

state_enum! {
    /// One `escalate` step of an incident: `pending` until its time, then `called`
    /// (its numbers joined the incident's rounds) or `not needed` (the incident was
    /// bridged or closed by then).
    pub enum EscalationState {
        Pending = "pending",
        Called = "called",
        NotNeeded = "not needed",
    }
}

/// Every state enum as `(table, column, states)`, for the `CHECK` tests.
#[cfg(test)]
pub(crate) fn checked_columns() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    fn names<T: Copy>(all: &[T], f: fn(T) -> &'static str) -> Vec<&'static str> {
        all.iter().map(|s| f(*s)).collect()
    }
    vec![
        (
            "alerts",
            "state",
            names(AlertState::ALL, AlertState::as_str),
        ),
        (
            "incidents",
            "kind",
            names(IncidentKind::ALL, IncidentKind::as_str),
        ),
        (
            "incidents",
            "status",
            names(IncidentStatus::ALL, IncidentStatus::as_str),
        ),
        (
            "rounds",
            "outcome",
            names(RoundOutcome::ALL, RoundOutcome::as_str),
        ),
        ("calls", "state", names(CallState::ALL, CallState::as_str)),
        (
            "calls",
            "twilio_status",
            names(TwilioStatus::ALL, TwilioStatus::as_str),
        ),
        (
            "attempts",
            "state",
            names(AttemptState::ALL, AttemptState::as_str),
        ),
        (
            "heartbeats",
            "state",
            names(HeartbeatState::ALL, HeartbeatState::as_str),
        ),
        (
            "escalations",
            "state",
            names(EscalationState::ALL, EscalationState::as_str),
        ),
        ("calls", "sms_state", names(SmsState::ALL, SmsState::as_str)),
    ]
}
