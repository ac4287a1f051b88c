//! One integration test binary: the real `mailcall` executable, real SMTP over loopback
//! sockets, and a fake Twilio that checks requests the way Twilio does.

mod cli;
mod core;
mod durability;
mod fake_twilio;
mod harness;
mod http;
mod source_files;
