//! HTTP plumbing shared by every route: application state, JSON bodies, client IPs,
//! authentication and the same-origin rule, metrics, and the router that puts it together.
//! Only this module and `api` know salvo.

pub mod auth;
pub mod client_ip;
pub mod json;
pub mod metrics;
pub mod router;
pub mod state;
