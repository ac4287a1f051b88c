//! Everything that speaks Twilio: the REST client and the TwiML it sends.
//!
//! No other module builds a Twilio request or a line of TwiML, so the API's rules
//! (form encoding, Basic auth, E.164, the 4,000-character `Twiml` limit) live here.

pub mod client;
pub mod signature;
pub mod twiml;

pub use client::{CallRequest, Client, CredentialError, Credentials, Outcome};
