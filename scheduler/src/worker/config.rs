//! The scheduler's configuration: a TOML file (`--config` or `INSTAPOD_SCHEDULER_CONFIG`) plus
//! `INSTAPOD_SCHEDULER_<FIELD>` overrides. Unknown fields are refused.

use std::net::SocketAddr;

use instapod_common::config::Secret;
use instapod_common::telemetry::LogFormat;
use serde::Deserialize;

use crate::Strategy;

pub const ENV_PREFIX: &str = "INSTAPOD_SCHEDULER_";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Postgres (the control plane's database). Default `postgres://postgres@127.0.0.1:5432/instapod`.
    pub database_url: Secret,
    /// Default 8.
    pub database_pool_size: usize,
    /// Redis of the job queues. Default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// `bin_pack` (default) or `spread`.
    pub strategy: Strategy,
    /// Pod jobs handled at once (and fetched per poll); pods that need a node among them are
    /// placed in one transaction (`worker/batch.rs`). Default 32.
    pub concurrency: usize,
    /// Seconds between reconcile passes. Default 5.
    pub reconcile_interval_secs: u64,
    /// Grace period of stops, in seconds. Default 10.
    pub stop_grace_secs: u32,
    /// Where `/metrics` (Prometheus text) is served. Default `127.0.0.1:9103` (a node agent's
    /// `/metrics` and peer endpoint use 9101 and 9102, and a small fleet may run both on one host).
    pub metrics_listen: SocketAddr,
    /// `text` or `json`. Default `text`.
    pub log_format: LogFormat,
    /// Default `info`.
    pub log_filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/instapod"),
            database_pool_size: 8,
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            strategy: Strategy::default(),
            concurrency: 32,
            reconcile_interval_secs: 5,
            stop_grace_secs: 10,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9103)),
            log_format: LogFormat::Text,
            log_filter: "info".to_string(),
        }
    }
}
