//! One integration test binary: the real `mailcall` executable, real SMTP over loopback
//! sockets, and a fake Twilio that checks requests the way Twilio does.

mod bridge;
mod cli;
mod core;
mod corpus;
mod durability;
mod edge;
mod fake_twilio;
mod fuzz;
mod harness;
mod http;
mod ops;
mod source_files;
