//! The e2e harness: real `ferry-server` processes (the compiled binary, on a free loopback port,
//! against SQLite or a scratch PostgreSQL database) and real devices using the public client API.

pub mod device;
pub mod model;
pub mod proxy;
pub mod server;

pub use device::Site;
pub use ferry_server::testing::Backend;
pub use proxy::{Fault, Proxy, ProxyStats};
pub use server::ServerProcess;

/// The HS256 secret every e2e server is started with.
pub const TEST_SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-e2e";

/// A bearer token for `user`, valid for an hour, signed with [`TEST_SECRET`].
pub fn token(user: &str) -> String {
    let auth = ferry_server::auth::Auth::hs256(TEST_SECRET.as_bytes()).expect("test secret is long enough");
    auth.issue(user, std::time::Duration::from_secs(3600)).expect("signing a test token")
}
