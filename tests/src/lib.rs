//! The end-to-end test harness: real Postgres, Redis and Instapod binaries on loopback.
//!
//! A test binary (one file under `tests/tests/`) shares one Postgres cluster and one Redis
//! server, started lazily by the first test that needs them ([`postgres::shared`],
//! [`redis::shared`]). Every [`ControlPlane`] gets a fresh database on that cluster, so
//! migrations run from scratch and tests do not see each other's rows. Tests in a binary run in
//! parallel threads, so each test invents its own emails, slugs and client IP addresses
//! ([`ids`]).
//!
//! For the node agent, a binary can likewise share a private containerd ([`containerd::shared`],
//! root only, its own socket) and a private OCI registry ([`registry::shared`]), and build tiny
//! busybox images to push or import ([`images`]).
//!
//! *Design.* Services and control planes are real child processes. They are stopped by `Drop`
//! when a test ends, and by a watchdog ([`process`]) when the test binary itself exits, since a
//! `Drop` on a static never runs at exit. Missing binaries make the harness panic with a message
//! that says what to install or build: a test never skips silently.
//!
//! *Limitations.* Free ports are found by binding port 0 and releasing it, so another process
//! could take the port in between; the window is short and start-up failures print the
//! process's log.

pub mod acme;
pub mod browser;
pub mod checks;
pub mod client;
pub mod containerd;
pub mod control_plane;
pub mod cpu;
pub mod ctr_baseline;
pub mod eventually;
pub mod fleet;
pub mod ids;
pub mod images;
pub mod leftovers;
pub mod mail;
pub mod node;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod registry;
pub mod scheduler;
pub mod smtp;
pub mod ssh;
pub mod standalone_agent;
pub mod users;

pub use browser::{Browser, StaticPage};
pub use client::{Client, Response};
pub use containerd::Containerd;
pub use control_plane::{ControlPlane, ControlPlaneOptions};
pub use eventually::eventually;
pub use images::{ImageBuilder, OciImage};
pub use mail::MailKind;
pub use postgres::PostgresServer;
pub use redis::RedisServer;
pub use registry::Registry;
pub use smtp::SmtpSink;
pub use users::{
    Registration, TestUser, login, register_and_login, register_and_login_as, register_user, scale_user, string_field,
    verify_email,
};

/// A reqwest client builder. reqwest is built with rustls but no bundled crypto provider (the
/// workspace uses aws-lc-rs only), so the process-wide provider is installed first.
pub fn http_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
}
