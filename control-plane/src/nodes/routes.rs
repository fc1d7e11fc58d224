//! The fleet's ingress routes: which node's ingress serves each pod's host names, handed to the
//! agents (`GET /internal/nodes/{id}/routes`, handler in `api::internal`) so that a request
//! arriving at any node reaches a pod on another one.
//!
//! *Design.* One [`RouteCache`] per control-plane process reads every routed pod in one query
//! and keeps the result (a [`Snapshot`]) for [`REFRESH`]; all agents asking meanwhile share it,
//! so the database sees at most one such query per second per replica however many agents
//! poll, and none when no agent asks. A snapshot's version is a hash of its content (and of the
//! hop token), so every replica computes the same version for the same rows: an agent's
//! `If-None-Match` is answered 304 by any replica, from memory. Agents long-poll: a request
//! whose version is current waits (re-checking every [`REFRESH`]) up to `wait` seconds (at most
//! [`MAX_WAIT`]) for a change, so a change reaches every agent within about two refresh
//! periods.
//!
//! *What a route says.* A pod whose desired state is not `deleted` and that has host names is
//! routed: to its node's advertised ingress address when the node is healthy and has one
//! ([`IngressTarget::Node`], whatever the pod's state: that node's ingress knows it best and
//! answers 503 for a stopped pod), as [`IngressTarget::NodeUnreachable`] when the node is
//! unhealthy or advertised nothing, and as [`IngressTarget::Unplaced`] while it has no node.
//! Deleted pods have no route (404). An agent never gets the routes of its own pods: its own
//! records are fresher.
//!
//! *Limitations.* The refresh reads all routed pods (no change feed from Postgres yet), which
//! is fine for thousands of pods; past that, a `LISTEN/NOTIFY` trigger or a version column
//! would let a refresh skip the read.

use std::sync::Arc;
use std::time::Duration;

use instapod_common::node::{IngressRoute, IngressRoutes, IngressTarget};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use uuid::Uuid;

use crate::db::{self, DbError, Pool};

/// How long a snapshot is served before the next request reads the routes again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The longest an agent's request waits for a change.
pub const MAX_WAIT: Duration = Duration::from_secs(25);

/// Counter of refreshes by `outcome` (`changed`, `unchanged`, `error`).
pub const REFRESHES_COUNTER: &str = "instapod_control_plane_ingress_route_refreshes_total";
/// Gauge of the pods in the current snapshot.
pub const ROUTES_GAUGE: &str = "instapod_control_plane_ingress_routes";

/// One routed pod, as read from `pods` and its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRow {
    pub pod_id: Uuid,
    pub hostnames: Vec<String>,
    pub node_id: Option<Uuid>,
    /// The node's status is `healthy` (false without a node).
    pub node_healthy: bool,
    pub ingress_addr: Option<String>,
}

impl RouteRow {
    fn target(&self) -> IngressTarget {
        match (self.node_id, self.node_healthy, &self.ingress_addr) {
            (None, _, _) => IngressTarget::Unplaced,
            (Some(node_id), true, Some(addr)) => IngressTarget::Node {
                node_id,
                addr: addr.clone(),
            },
            (Some(node_id), _, _) => IngressTarget::NodeUnreachable { node_id },
        }
    }
}

/// The routes of every routed pod at one moment, and their version.
#[derive(Debug)]
pub struct Snapshot {
    version: String,
    hop_token: String,
    /// In pod id order.
    routes: Vec<IngressRoute>,
}

impl Snapshot {
    /// A snapshot of `rows` (in any order).
    pub fn new(mut rows: Vec<RouteRow>, hop_token: &str) -> Snapshot {
        rows.sort_by_key(|row| row.pod_id);
        let routes: Vec<IngressRoute> = rows
            .iter()
            .map(|row| IngressRoute {
                pod_id: row.pod_id,
                hostnames: row.hostnames.clone(),
                target: row.target(),
            })
            .collect();
        let mut hasher = Sha256::new();
        hasher.update(hop_token.as_bytes());
        hasher.update(b"\n");
        // Serialising plain structs cannot fail; an empty hash input would still be a version.
        hasher.update(serde_json::to_vec(&routes).unwrap_or_default());
        let version = hex::encode(&hasher.finalize()[..16]);
        Snapshot {
            version,
            hop_token: hop_token.to_string(),
            routes,
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// What node `node_id` gets: every route but those of its own pods.
    pub fn for_node(&self, node_id: Uuid) -> IngressRoutes {
        let own = |target: &IngressTarget| match target {
            IngressTarget::Node { node_id: id, .. } | IngressTarget::NodeUnreachable { node_id: id } => *id == node_id,
            IngressTarget::Unplaced => false,
        };
        IngressRoutes {
            version: self.version.clone(),
            hop_token: self.hop_token.clone(),
            routes: self.routes.iter().filter(|r| !own(&r.target)).cloned().collect(),
        }
    }
}

/// The fleet's hop token: what a node's ingress puts in `x-instapod-hop` when it forwards a
/// request to another node, so that node can trust the `X-Forwarded-*` headers it carries.
/// Derived from the join token, so every replica agrees without storing anything, and it
/// changes when the join token is rotated.
pub fn hop_token(join_token: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"instapod ingress hop token v1\n");
    hasher.update(join_token.as_bytes());
    hex::encode(hasher.finalize())
}

/// The current snapshot, refreshed at most every [`REFRESH`].
#[derive(Debug)]
pub struct RouteCache {
    hop_token: String,
    /// The last snapshot and when it was read; the lock also makes concurrent refreshes one.
    current: tokio::sync::Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl RouteCache {
    pub fn new(join_token: &str) -> RouteCache {
        RouteCache {
            hop_token: hop_token(join_token),
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The current snapshot; reads the routes when the one held is older than [`REFRESH`].
    pub async fn snapshot(&self, pool: &Pool) -> Result<Arc<Snapshot>, DbError> {
        let mut current = self.current.lock().await;
        if let Some((read_at, snapshot)) = current.as_ref()
            && read_at.elapsed() < REFRESH
        {
            return Ok(snapshot.clone());
        }
        let rows = match read_routes(pool).await {
            Ok(rows) => rows,
            Err(err) => {
                metrics::counter!(REFRESHES_COUNTER, "outcome" => "error").increment(1);
                return Err(err);
            }
        };
        let fresh = Snapshot::new(rows, &self.hop_token);
        let snapshot = match current.take() {
            // Unchanged: keep the old one (same content), only its age is new.
            Some((_, old)) if old.version == fresh.version => {
                metrics::counter!(REFRESHES_COUNTER, "outcome" => "unchanged").increment(1);
                old
            }
            _ => {
                metrics::counter!(REFRESHES_COUNTER, "outcome" => "changed").increment(1);
                metrics::gauge!(ROUTES_GAUGE).set(fresh.len() as f64);
                tracing::debug!(version = %fresh.version, routes = fresh.len(), "ingress routes changed");
                Arc::new(fresh)
            }
        };
        *current = Some((Instant::now(), snapshot.clone()));
        Ok(snapshot)
    }
}

/// Every routed pod: not being deleted, with host names.
async fn read_routes(pool: &Pool) -> Result<Vec<RouteRow>, DbError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query(
            "SELECT p.id, p.hostnames, p.node_id, n.status = 'healthy', n.ingress_addr
             FROM pods p LEFT JOIN nodes n ON n.id = p.node_id
             WHERE p.desired_state <> 'deleted' AND cardinality(p.hostnames) > 0",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| RouteRow {
            pod_id: row.get(0),
            hostnames: row.get(1),
            node_id: row.get(2),
            node_healthy: row.get::<_, Option<bool>>(3).unwrap_or(false),
            ingress_addr: row.get(4),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u128, node: Option<u128>, healthy: bool, addr: Option<&str>) -> RouteRow {
        RouteRow {
            pod_id: Uuid::from_u128(n),
            hostnames: vec![format!("pod{n}-team.apps.test")],
            node_id: node.map(Uuid::from_u128),
            node_healthy: healthy,
            ingress_addr: addr.map(str::to_string),
        }
    }

    #[test]
    fn targets_follow_the_node_and_its_health() {
        let node = Uuid::from_u128(100);
        assert_eq!(
            row(1, Some(100), true, Some("10.0.0.1:80")).target(),
            IngressTarget::Node {
                node_id: node,
                addr: "10.0.0.1:80".into()
            }
        );
        assert_eq!(row(1, None, false, None).target(), IngressTarget::Unplaced);
        assert_eq!(
            row(1, Some(100), false, Some("10.0.0.1:80")).target(),
            IngressTarget::NodeUnreachable { node_id: node }
        );
        assert_eq!(
            row(1, Some(100), true, None).target(),
            IngressTarget::NodeUnreachable { node_id: node }
        );
    }

    #[test]
    fn the_version_depends_on_the_content_only() {
        let a = row(1, Some(100), true, Some("10.0.0.1:80"));
        let b = row(2, Some(200), true, Some("10.0.0.2:80"));
        let first = Snapshot::new(vec![a.clone(), b.clone()], "hop");
        let same = Snapshot::new(vec![b.clone(), a.clone()], "hop");
        assert_eq!(
            first.version(),
            same.version(),
            "the order rows come in does not matter"
        );

        let mut moved = b.clone();
        moved.ingress_addr = Some("10.0.0.3:80".into());
        let mut renamed = b.clone();
        renamed.hostnames.push("www.shop.test".into());
        let mut down = b.clone();
        down.node_healthy = false;
        for (what, other) in [
            ("an address", Snapshot::new(vec![a.clone(), moved], "hop")),
            ("a host name", Snapshot::new(vec![a.clone(), renamed], "hop")),
            ("a node's health", Snapshot::new(vec![a.clone(), down], "hop")),
            ("a deleted pod", Snapshot::new(vec![a.clone()], "hop")),
            ("the hop token", Snapshot::new(vec![a.clone(), b.clone()], "other")),
        ] {
            assert_ne!(first.version(), other.version(), "{what} changes the version");
        }
    }

    #[test]
    fn a_node_gets_every_route_but_its_own() {
        let snapshot = Snapshot::new(
            vec![
                row(1, Some(100), true, Some("10.0.0.1:80")),
                row(2, Some(200), true, Some("10.0.0.2:80")),
                row(3, Some(100), false, Some("10.0.0.1:80")),
                row(4, None, false, None),
            ],
            "hop",
        );
        let for_100 = snapshot.for_node(Uuid::from_u128(100));
        let pods: Vec<u128> = for_100.routes.iter().map(|r| r.pod_id.as_u128()).collect();
        assert_eq!(pods, vec![2, 4]);
        assert_eq!(for_100.version, snapshot.version());
        assert_eq!(for_100.hop_token, "hop");
        assert_eq!(snapshot.for_node(Uuid::from_u128(300)).routes.len(), 4);
    }

    #[test]
    fn hop_tokens_are_derived_from_the_join_token() {
        assert_eq!(hop_token("a"), hop_token("a"));
        assert_ne!(hop_token("a"), hop_token("b"));
        assert_eq!(hop_token("a").len(), 64);
        assert!(!hop_token("secret-join-token").contains("secret"));
    }
}
