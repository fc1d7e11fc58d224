//! What every handler can reach, injected with `affix_state` and read with [`app`].

use std::sync::Arc;

use salvo::Depot;

use crate::accounts::sessions::SessionLookup;
use crate::config::Config;
use crate::db::Pool;
use crate::ratelimit::RateLimiter;

/// The control plane's shared state; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Pool,
    /// The session lookup run by every authenticated request, on shared pipelined connections.
    pub session_lookup: SessionLookup,
    pub rate_limiter: RateLimiter,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The scheduler's queue of pod jobs.
    pub pod_queue: Arc<crate::pods::queue::PodQueue>,
    /// The fleet's ingress routes, shared by every agent's request.
    pub ingress_routes: Arc<crate::nodes::routes::RouteCache>,
    /// The client that reads pod logs from the agents' peer endpoints.
    pub node_http: reqwest::Client,
    /// Custom domains: settings, key, queue and the served-domains feed.
    pub domains: Arc<crate::domains::Domains>,
}

/// The state, which the router always injects.
pub fn app(depot: &Depot) -> &AppState {
    depot
        .get_typed::<AppState>()
        .expect("AppState is injected by the router")
}
