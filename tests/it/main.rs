//! One integration test binary: the real `mailcall` executable, real SMTP over loopback
//! sockets, and a fake Twilio that checks requests the way Twilio does.

mod bridge;
mod cli;
mod core;
mod corpus;
mod crash;
mod durability;
mod edge;
mod exactly_once;
mod fake_twilio;
mod fuzz;
mod harness;
mod http;
mod oncall;
mod ops;
mod retention;
mod review;
mod review2;
mod review3_12;
mod review3_13;
mod review3_14;
mod review3_15;
mod review3b_12;
mod review4;
mod review5;
mod review6;
mod review6b;
mod review7;
mod review7b;
mod review8;
mod review9;
mod smtp;
mod source_files;
