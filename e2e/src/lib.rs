//! The e2e harness: real `ferry-server` processes (the compiled binary, on a free loopback port,
//! against SQLite or a scratch PostgreSQL database) and real devices using the public client API.

pub mod server;

pub use ferry_server::testing::Backend;
pub use server::ServerProcess;
