//! End-to-end checks: the real `ferry-server` binary and real devices (the public client API)
//! over loopback HTTP. One test binary; one module per area. Every scenario runs on SQLite and
//! on PostgreSQL (`backend_tests!`).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod basics;
mod blobs;
mod faults;
mod model;
mod ops;
mod receive;
mod security;
mod send;
