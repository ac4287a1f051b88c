//! The ways alerts come in. Each one stores the alert durably before it acknowledges
//! it, then wakes the dispatcher; none of them routes or calls anyone itself.

pub mod http;
pub mod sendgrid;
pub mod smtp;
