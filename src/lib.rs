//! mailcall turns alert e-mails into phone calls: everyone a rule names is called at
//! once, and whoever answers hears the alert and joins one conference per incident.
//!
//! # Layout
//! The code follows the data:
//!
//! ```text
//! ingest::smtp ──► store ──► dispatch ──► twilio
//!  (bytes in,      (SQLite:   (alert → route → incident,
//!   250 after       alerts,    dedup, budget, calls,
//!   commit)         incidents, retries)
//!                   calls)
//! ```
//!
//! - [`config`]: `rules.toml` → a validated [`config::Config`], every problem with its
//!   line and column.
//! - [`alert`]: a raw mail → the [`alert::Alert`] fields routing looks at (mail-parser).
//! - [`route`]: pure `(Config, Alert) → Decision`; `mailcall route` prints the same.
//! - [`speech`]: alert text → speakable text; [`twilio::twiml`] → the call's TwiML.
//! - [`ingest`]: the ways in (SMTP now); they only store and wake the dispatcher.
//! - [`store`]: SQLite, the only state shared between ingest and dispatch.
//! - [`dispatch`]: the worker that routes stored alerts and places the calls.
//! - [`twilio`]: the only code that talks to Twilio.
//! - [`oncall`]: pure on-call policy: rotations, time conditions and Japanese
//!   holidays, silences; [`heartbeat`]: the worker behind `[[heartbeat]]` monitors.
//! - [`server`]: wires the pieces together for `mailcall serve`.
//! - [`clock`]: the time deadlines go by (the system's; tokio's in tests).

pub mod alert;
pub mod clock;
pub mod config;
pub mod dispatch;
pub mod health;
pub mod heartbeat;
pub mod ingest;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod oncall;
pub mod pruner;
pub mod route;
pub mod server;
pub mod settings;
pub mod speech;
pub mod store;
pub mod template;
pub mod twilio;
