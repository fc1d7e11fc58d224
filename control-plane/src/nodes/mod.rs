//! Fleet membership: node agents join with the fleet's join token and get an id and their own
//! token, then send heartbeats (capacity, labels, version, the pods they run, the address of
//! their ingress) and pod reports to the `/internal` API (handlers in `api::internal`), and
//! fetch the fleet's ingress routes (`routes`). A worker marks nodes whose heartbeats stopped
//! `unhealthy`; their next heartbeat makes them `healthy` again.
//!
//! *Design.* `tokens` owns both credentials, `validate` turns the wire types of
//! `instapod_common::node` into plain values, `store` writes them, and `health` is the worker.
//! Every write of a node's rows is conditional on `id = $node AND token_hash = $hash` in the
//! statement itself, so a token rotated by a concurrent rejoin stops working at once, and a
//! node can only ever write its own rows: the node id comes from the authenticated path, never
//! from the body.
//!
//! *Invariants.*
//! - A node token exists in plain text only in the join answer; `nodes.token_hash` holds its
//!   SHA-256. A join always issues a new token and thereby revokes the previous one.
//! - A report or heartbeat never changes another node's rows.
//! - Health marking is one idempotent conditional `UPDATE`, safe on every replica at once; time
//!   comes from Postgres's clock (`now()`), so replicas with skewed clocks agree.
//!
//! *Limitations.* Names identify machines: a second machine joining under a taken name takes
//! that node's id and token over (the first one's token stops working). `region` is not checked
//! against the catalog's regions.

pub mod health;
pub mod routes;
pub mod store;
pub mod tokens;
pub mod validate;

/// A node's health as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Heartbeats arrive in time.
    Healthy,
    /// No heartbeat yet, or none within `node_heartbeat_timeout_secs`.
    Unhealthy,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 2] = [NodeStatus::Healthy, NodeStatus::Unhealthy];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Healthy => "healthy",
            NodeStatus::Unhealthy => "unhealthy",
        }
    }

    /// The status stored in `nodes.status` (the column's check allows only these two).
    fn parse(text: &str) -> NodeStatus {
        match text {
            "healthy" => NodeStatus::Healthy,
            _ => NodeStatus::Unhealthy,
        }
    }
}
