//! What every Instapod process shares.
//!
//! Today that is the configuration loader ([`config`]), the logging set-up ([`telemetry`]) and
//! the catalogue of metrics ([`metrics`]), used by each binary. As the scheduler and node agent gain behaviour, the types that cross a
//! process boundary (job payloads, agent reports, the pod spec and its states) live here too, so
//! both sides of a queue or an HTTP call compile against one definition.

pub mod config;
pub mod domains;
pub mod files;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod peer_token;
pub mod pod_metrics;
pub mod queue;
pub mod telemetry;
