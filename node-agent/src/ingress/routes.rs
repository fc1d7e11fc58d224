//! The routing table: which host name goes where, and the sources that keep it current.
//!
//! *Design.* A [`RoutingTable`] is an immutable map from a normalised host name to a
//! [`Target`]; a [`RouteSource`] hands out the current one as an `Arc`, so a request costs an
//! atomic load, a read lock and a hash lookup — no disk, no containerd. [`LocalRoutes`] derives
//! the table from the pod manager's records and rebuilds it only when
//! [`Pods::records_version`] moved. Routes to pods on other nodes come from the control plane
//! ([`RemoteRoutes`], filled by `ingress::feed`); [`FleetRoutes`] merges the two with
//! [`merge`] and rebuilds the merged table only when either side changed.
//!
//! *Merge rule.* A host this node has a record for stays local when that pod can take
//! requests, or when the control plane has no better answer; a local record that cannot serve
//! (stopped, starting, …) yields to a remote route to another node's ingress, because the
//! control plane knows where a pod that moved away runs now (it never lists this node's own
//! pods, so a pod placed here is always local).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use instapod_common::node::{IngressRoutes, IngressTarget};

use instapod_common::node::NodePodState;
use uuid::Uuid;

use crate::pods::{Desired, PodRecord, Pods};

/// Where requests for one host name go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A running pod on this node: proxy to its address and HTTP port.
    Pod { pod_id: Uuid, addr: SocketAddr },
    /// A pod on this node that cannot take requests now.
    Unavailable { pod_id: Uuid, why: Unavailable },
    /// A pod on another node: forward to that node's ingress, which routes it again.
    RemoteNode { addr: SocketAddr },
}

/// Why a pod on this node cannot take requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The pod is not running; `coming_back` when it is meant to run (starting, or exited and
    /// about to be restarted by its restart policy).
    NotRunning { state: NodePodState, coming_back: bool },
    /// Running, but without an address yet (should not last) or without an HTTP port.
    NoHttpEndpoint,
    /// (Another node's pod.) Waiting for the scheduler to place it.
    NotPlaced,
    /// (Another node's pod.) Its node is unhealthy or did not say where its ingress is.
    NodeUnreachable,
}

impl Target {
    /// Preference when two pods claim the same host (a hand-over in progress): a pod that
    /// answers beats one that is coming back, which beats one that is not.
    fn rank(&self) -> u8 {
        match self {
            Target::Pod { .. } => 3,
            Target::RemoteNode { .. } => 2,
            Target::Unavailable {
                why:
                    Unavailable::NotRunning { coming_back: true, .. }
                    | Unavailable::NotPlaced
                    | Unavailable::NodeUnreachable,
                ..
            } => 1,
            Target::Unavailable { .. } => 0,
        }
    }

    fn pod_id(&self) -> Option<Uuid> {
        match self {
            Target::Pod { pod_id, .. } | Target::Unavailable { pod_id, .. } => Some(*pod_id),
            Target::RemoteNode { .. } => None,
        }
    }
}

/// An immutable host → target map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    routes: HashMap<String, Target>,
    /// One host name of each pod, so a custom domain can be routed like its pod's platform
    /// host name.
    pod_hosts: HashMap<Uuid, String>,
}

impl RoutingTable {
    /// The target of a normalised host name (see [`normalize_host`]).
    pub fn get(&self, host: &str) -> Option<&Target> {
        self.routes.get(host)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Where requests for pod `pod_id` go: the target of its (first) host name.
    pub fn target_of_pod(&self, pod_id: Uuid) -> Option<&Target> {
        self.routes.get(self.pod_hosts.get(&pod_id)?)
    }

    /// Remembers one host name of a pod (the first one given wins).
    pub fn note_pod_host(&mut self, pod_id: Uuid, host: &str) {
        if let Some(host) = normalize_host(host) {
            self.pod_hosts.entry(pod_id).or_insert(host);
        }
    }

    /// Every route, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Target)> {
        self.routes.iter().map(|(host, target)| (host.as_str(), target))
    }

    /// Adds a route; when the host has one already, the better target wins (ties: the smaller
    /// pod id), so the table does not depend on the order routes come in.
    pub fn insert(&mut self, host: &str, target: Target) {
        let Some(host) = normalize_host(host) else {
            tracing::warn!(host, "a host name that cannot be routed was ignored");
            return;
        };
        match self.routes.get(&host) {
            Some(existing)
                if (existing.rank(), std::cmp::Reverse(existing.pod_id()))
                    >= (target.rank(), std::cmp::Reverse(target.pod_id())) => {}
            _ => {
                self.routes.insert(host, target);
            }
        }
    }

    /// Adds the routes of one of this node's pods. Deleted pods (tombstones) have none.
    pub fn add_record(&mut self, record: &PodRecord) {
        if let Some(target) = local_target(record) {
            for host in &record.spec.hostnames {
                self.insert(host, target.clone());
                self.note_pod_host(record.spec.pod_id, host);
            }
        }
    }

    /// The routes of this node's pods, from their records.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a PodRecord>) -> RoutingTable {
        let mut table = RoutingTable::default();
        for record in records {
            table.add_record(record);
        }
        table
    }
}

/// The routes of this node's pods merged with the routes of the other nodes' pods (see the
/// module's merge rule).
pub fn merge(local: &RoutingTable, remote: &RoutingTable) -> RoutingTable {
    let mut merged = local.clone();
    for (host, target) in remote.iter() {
        let replace = match merged.routes.get(host) {
            None => true,
            Some(Target::Unavailable { .. }) => matches!(target, Target::RemoteNode { .. }),
            Some(_) => false,
        };
        if replace {
            merged.routes.insert(host.to_string(), target.clone());
        }
    }
    for (pod_id, host) in &remote.pod_hosts {
        merged.pod_hosts.entry(*pod_id).or_insert_with(|| host.clone());
    }
    merged
}

/// Where a pod's requests go, from its record; `None` for a deleted pod.
fn local_target(record: &PodRecord) -> Option<Target> {
    let pod_id = record.spec.pod_id;
    if record.desired == Desired::Deleted || record.state == NodePodState::Deleted {
        return None;
    }
    if record.state != NodePodState::Running {
        return Some(Target::Unavailable {
            pod_id,
            why: Unavailable::NotRunning {
                state: record.state,
                coming_back: record.desired == Desired::Running,
            },
        });
    }
    let ip = record.attachment.as_ref().and_then(|a| a.ip.parse::<IpAddr>().ok());
    match (ip, record.spec.http_port) {
        (Some(ip), Some(port)) => Some(Target::Pod {
            pod_id,
            addr: SocketAddr::new(ip, port),
        }),
        _ => Some(Target::Unavailable {
            pod_id,
            why: Unavailable::NoHttpEndpoint,
        }),
    }
}

/// The host name a route is keyed by: lowercase, without port, without a trailing dot. `None`
/// for an empty host or one with characters no host name has (so a hostile `Host` header never
/// reaches a page or a log unescaped as something else).
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    // An IPv6 literal keeps its brackets; only a port after them is dropped.
    let host = if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']')?;
        &raw[..end + 2]
    } else {
        match raw.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':'));
    valid.then(|| host.to_ascii_lowercase())
}

/// Where the ingress gets its routing table. A source answers from memory: it is asked once
/// per request.
pub trait RouteSource: Send + Sync + std::fmt::Debug + 'static {
    /// The current table.
    fn table(&self) -> Arc<RoutingTable>;

    /// The fleet's hop token (the value of [`super::proxy::HOP_HEADER`] between nodes), once
    /// the control plane told it.
    fn hop_token(&self) -> Option<Arc<str>> {
        None
    }
}

/// Routes that do not change: a table given once, and the fleet's hop token if any (tests and
/// benchmarks of the proxy, which route a known set of hosts).
#[derive(Debug)]
pub struct FixedRoutes {
    table: Arc<RoutingTable>,
    hop_token: Option<Arc<str>>,
}

impl FixedRoutes {
    pub fn new(table: impl Into<Arc<RoutingTable>>) -> FixedRoutes {
        FixedRoutes {
            table: table.into(),
            hop_token: None,
        }
    }

    pub fn with_hop_token(mut self, token: Option<&str>) -> FixedRoutes {
        self.hop_token = token.map(Arc::from);
        self
    }
}

impl RouteSource for FixedRoutes {
    fn table(&self) -> Arc<RoutingTable> {
        self.table.clone()
    }

    fn hop_token(&self) -> Option<Arc<str>> {
        self.hop_token.clone()
    }
}

/// The routes of the pods on this node, derived from the pod manager's records.
#[derive(Debug)]
pub struct LocalRoutes {
    pods: Pods,
    cached: RwLock<Cached>,
    /// Serialises rebuilds, so a burst of requests after a change rebuilds once.
    rebuilding: Mutex<()>,
}

#[derive(Debug)]
struct Cached {
    version: Option<u64>,
    table: Arc<RoutingTable>,
}

impl LocalRoutes {
    pub fn new(pods: Pods) -> LocalRoutes {
        LocalRoutes {
            pods,
            cached: RwLock::new(Cached {
                version: None,
                table: Arc::default(),
            }),
            rebuilding: Mutex::new(()),
        }
    }

    fn current(&self, version: u64) -> Option<Arc<RoutingTable>> {
        let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
        (cached.version == Some(version)).then(|| cached.table.clone())
    }
}

impl RouteSource for LocalRoutes {
    fn table(&self) -> Arc<RoutingTable> {
        let version = self.pods.records_version();
        if let Some(table) = self.current(version) {
            return table;
        }
        let _rebuilding = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(table) = self.current(version) {
            return table;
        }
        // The version is read before the records, so a change racing with this rebuild leaves
        // the table tagged older than what it holds: at worst one more rebuild, never a stale
        // table tagged as current.
        let mut table = RoutingTable::default();
        self.pods.visit_records(|record| table.add_record(record));
        let table = Arc::new(table);
        tracing::debug!(routes = table.len(), version, "ingress routing table rebuilt");
        *self.cached.write().unwrap_or_else(|p| p.into_inner()) = Cached {
            version: Some(version),
            table: table.clone(),
        };
        table
    }
}

/// The routes of the other nodes' pods as the control plane last gave them (the last good
/// answer is kept while the control plane is away).
#[derive(Debug, Default)]
pub struct RemoteRoutes {
    current: RwLock<Arc<RemoteTable>>,
}

/// One answer of the control plane, as a routing table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RemoteTable {
    /// The answer's version (`None` before the first answer).
    pub version: Option<String>,
    pub hop_token: Option<Arc<str>>,
    pub table: Arc<RoutingTable>,
}

impl RemoteTable {
    /// The table of an answer for node `own_node` (a route to that node itself, which the
    /// control plane never sends, is dropped rather than followed).
    pub fn from_answer(answer: &IngressRoutes, own_node: Option<Uuid>) -> RemoteTable {
        let mut table = RoutingTable::default();
        for route in &answer.routes {
            let target = match &route.target {
                IngressTarget::Node { node_id, .. } if Some(*node_id) == own_node => continue,
                IngressTarget::Node { node_id, addr } => match addr.parse::<SocketAddr>() {
                    Ok(addr) => Target::RemoteNode { addr },
                    Err(_) => {
                        tracing::warn!(%node_id, addr, "a node's ingress address cannot be used");
                        Target::Unavailable {
                            pod_id: route.pod_id,
                            why: Unavailable::NodeUnreachable,
                        }
                    }
                },
                IngressTarget::Unplaced => Target::Unavailable {
                    pod_id: route.pod_id,
                    why: Unavailable::NotPlaced,
                },
                IngressTarget::NodeUnreachable { .. } => Target::Unavailable {
                    pod_id: route.pod_id,
                    why: Unavailable::NodeUnreachable,
                },
            };
            for host in &route.hostnames {
                table.insert(host, target.clone());
                table.note_pod_host(route.pod_id, host);
            }
        }
        RemoteTable {
            version: Some(answer.version.clone()),
            hop_token: Some(Arc::from(answer.hop_token.as_str())),
            table: Arc::new(table),
        }
    }
}

impl RemoteRoutes {
    pub fn current(&self) -> Arc<RemoteTable> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, table: RemoteTable) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }
}

/// Every route this node's ingress knows: its own pods' ([`LocalRoutes`]) merged with the
/// other nodes' ([`RemoteRoutes`]).
#[derive(Debug)]
pub struct FleetRoutes {
    local: Arc<dyn RouteSource>,
    remote: Arc<RemoteRoutes>,
    merged: RwLock<Option<Merged>>,
}

/// A merged table and the two tables it was made of.
#[derive(Debug)]
struct Merged {
    local: Arc<RoutingTable>,
    remote: Arc<RemoteTable>,
    table: Arc<RoutingTable>,
}

impl FleetRoutes {
    pub fn new(local: Arc<dyn RouteSource>, remote: Arc<RemoteRoutes>) -> FleetRoutes {
        FleetRoutes {
            local,
            remote,
            merged: RwLock::new(None),
        }
    }
}

impl RouteSource for FleetRoutes {
    fn table(&self) -> Arc<RoutingTable> {
        let local = self.local.table();
        let remote = self.remote.current();
        if remote.table.is_empty() {
            return local;
        }
        if let Some(merged) = self.merged.read().unwrap_or_else(|p| p.into_inner()).as_ref()
            && Arc::ptr_eq(&merged.local, &local)
            && Arc::ptr_eq(&merged.remote, &remote)
        {
            return merged.table.clone();
        }
        // Two requests may both rebuild after a change; the result is the same either way.
        let table = Arc::new(merge(&local, &remote.table));
        tracing::debug!(
            routes = table.len(),
            local = local.len(),
            remote = remote.table.len(),
            "ingress routing table merged"
        );
        *self.merged.write().unwrap_or_else(|p| p.into_inner()) = Some(Merged {
            local,
            remote,
            table: table.clone(),
        });
        table
    }

    fn hop_token(&self) -> Option<Arc<str>> {
        self.remote.current().hop_token.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use instapod_common::node::{PodSpec, Resources, RestartPolicy};

    use super::*;
    use crate::network::Attachment;

    fn check_host(raw: &str, expected: Option<&str>) {
        assert_eq!(normalize_host(raw).as_deref(), expected, "{raw:?}");
    }

    #[test]
    fn hosts_are_normalised() {
        check_host("Web-1.Apps.Example.COM", Some("web-1.apps.example.com"));
        check_host("web.apps.test:8088", Some("web.apps.test"));
        check_host("web.apps.test.", Some("web.apps.test"));
        check_host("web.apps.test.:80", Some("web.apps.test"));
        check_host("[::1]:8080", Some("[::1]"));
        check_host("10.0.0.1:80", Some("10.0.0.1"));
        check_host("", None);
        check_host(":80", None);
        check_host("<script>.test", None);
        check_host("a b.test", None);
        check_host("[::1", None);
    }

    fn record(hostnames: &[&str], state: NodePodState, desired: Desired, ip: Option<&str>) -> PodRecord {
        PodRecord {
            spec: PodSpec {
                pod_id: Uuid::new_v4(),
                name: "web".into(),
                generation: 1,
                image: "busybox".into(),
                registry_auth: None,
                entrypoint: None,
                command: None,
                env: BTreeMap::new(),
                workdir: None,
                resources: Resources {
                    cpu_millis: 100,
                    memory_bytes: 1 << 20,
                    disk_bytes: 1 << 20,
                    pids: 10,
                },
                volume_mount: "/data".into(),
                restart_policy: RestartPolicy::Never,
                http_port: Some(8080),
                hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
                volume_source: None,
            },
            desired,
            generation: 1,
            state,
            reason: None,
            exit_code: None,
            attachment: ip.map(|ip| Attachment {
                netns: "/run/netns/x".into(),
                ip: ip.into(),
                host_veth: "veth0".into(),
            }),
            retain_volume: false,
            volume_filled: false,
            restarts: 0,
        }
    }

    #[test]
    fn records_become_routes() {
        let running = record(
            &["web.apps.test", "WWW.Shop.Test."],
            NodePodState::Running,
            Desired::Running,
            Some("10.88.0.5"),
        );
        let stopped = record(
            &["stopped.apps.test"],
            NodePodState::Stopped,
            Desired::Stopped,
            Some("10.88.0.6"),
        );
        let starting = record(&["starting.apps.test"], NodePodState::Starting, Desired::Running, None);
        let mut no_port = record(
            &["noport.apps.test"],
            NodePodState::Running,
            Desired::Running,
            Some("10.88.0.7"),
        );
        no_port.spec.http_port = None;
        let deleted = record(&["gone.apps.test"], NodePodState::Deleted, Desired::Deleted, None);
        let table = RoutingTable::from_records([&running, &stopped, &starting, &no_port, &deleted]);

        let pod = Target::Pod {
            pod_id: running.spec.pod_id,
            addr: "10.88.0.5:8080".parse().expect("address"),
        };
        assert_eq!(table.get("web.apps.test"), Some(&pod));
        assert_eq!(table.get("www.shop.test"), Some(&pod));
        assert_eq!(
            table.get("stopped.apps.test"),
            Some(&Target::Unavailable {
                pod_id: stopped.spec.pod_id,
                why: Unavailable::NotRunning {
                    state: NodePodState::Stopped,
                    coming_back: false
                }
            })
        );
        assert_eq!(
            table.get("starting.apps.test"),
            Some(&Target::Unavailable {
                pod_id: starting.spec.pod_id,
                why: Unavailable::NotRunning {
                    state: NodePodState::Starting,
                    coming_back: true
                }
            })
        );
        assert_eq!(
            table.get("noport.apps.test"),
            Some(&Target::Unavailable {
                pod_id: no_port.spec.pod_id,
                why: Unavailable::NoHttpEndpoint
            })
        );
        assert_eq!(table.get("gone.apps.test"), None);
        assert_eq!(table.len(), 5);
    }

    #[test]
    fn a_running_pod_wins_a_shared_host_whatever_the_order() {
        let old = record(
            &["web.apps.test"],
            NodePodState::Stopped,
            Desired::Stopped,
            Some("10.88.0.5"),
        );
        let new = record(
            &["web.apps.test"],
            NodePodState::Running,
            Desired::Running,
            Some("10.88.0.6"),
        );
        for table in [
            RoutingTable::from_records([&old, &new]),
            RoutingTable::from_records([&new, &old]),
        ] {
            assert!(
                matches!(table.get("web.apps.test"), Some(Target::Pod { pod_id, .. }) if *pod_id == new.spec.pod_id)
            );
        }
    }

    fn remote(addr: &str) -> Target {
        Target::RemoteNode {
            addr: addr.parse().expect("address"),
        }
    }

    #[test]
    fn local_pods_that_answer_win_and_remote_nodes_beat_local_records_that_cannot() {
        let running = record(
            &["web.apps.test"],
            NodePodState::Running,
            Desired::Running,
            Some("10.88.0.5"),
        );
        // A pod that moved away: its old record here is stopped.
        let moved = record(
            &["moved.apps.test"],
            NodePodState::Stopped,
            Desired::Stopped,
            Some("10.88.0.6"),
        );
        let starting = record(&["starting.apps.test"], NodePodState::Starting, Desired::Running, None);
        let local = RoutingTable::from_records([&running, &moved, &starting]);

        let mut other = RoutingTable::default();
        for host in ["web.apps.test", "moved.apps.test", "elsewhere.apps.test"] {
            other.insert(host, remote("10.0.0.2:80"));
        }
        let waiting = Target::Unavailable {
            pod_id: Uuid::from_u128(7),
            why: Unavailable::NotPlaced,
        };
        other.insert("starting.apps.test", waiting.clone());
        other.insert("pending.apps.test", waiting.clone());

        let merged = merge(&local, &other);
        let check = |host: &str, expected: Option<&Target>| assert_eq!(merged.get(host), expected, "{host}");
        check("web.apps.test", local.get("web.apps.test"));
        check("moved.apps.test", Some(&remote("10.0.0.2:80")));
        check("starting.apps.test", local.get("starting.apps.test"));
        check("elsewhere.apps.test", Some(&remote("10.0.0.2:80")));
        check("pending.apps.test", Some(&waiting));
        check("nobody.apps.test", None);
        assert_eq!(merged.len(), 5);
        assert_eq!(merge(&local, &RoutingTable::default()), local);
    }

    #[test]
    fn answers_become_tables_without_routes_to_this_node() {
        let own = Uuid::from_u128(1);
        let answer = IngressRoutes {
            version: "v9".into(),
            hop_token: "hop".into(),
            routes: vec![
                instapod_common::node::IngressRoute {
                    pod_id: Uuid::from_u128(10),
                    hostnames: vec!["a.apps.test".into(), "WWW.Shop.Test".into()],
                    target: IngressTarget::Node {
                        node_id: Uuid::from_u128(2),
                        addr: "10.0.0.2:8080".into(),
                    },
                },
                instapod_common::node::IngressRoute {
                    pod_id: Uuid::from_u128(11),
                    hostnames: vec!["mine.apps.test".into()],
                    target: IngressTarget::Node {
                        node_id: own,
                        addr: "10.0.0.1:8080".into(),
                    },
                },
                instapod_common::node::IngressRoute {
                    pod_id: Uuid::from_u128(12),
                    hostnames: vec!["down.apps.test".into()],
                    target: IngressTarget::NodeUnreachable {
                        node_id: Uuid::from_u128(3),
                    },
                },
                instapod_common::node::IngressRoute {
                    pod_id: Uuid::from_u128(13),
                    hostnames: vec!["bad.apps.test".into()],
                    target: IngressTarget::Node {
                        node_id: Uuid::from_u128(4),
                        addr: "node-4:80".into(),
                    },
                },
            ],
        };
        let table = RemoteTable::from_answer(&answer, Some(own));
        assert_eq!(table.version.as_deref(), Some("v9"));
        assert_eq!(table.table.get("a.apps.test"), Some(&remote("10.0.0.2:8080")));
        assert_eq!(table.table.get("www.shop.test"), Some(&remote("10.0.0.2:8080")));
        assert_eq!(table.table.get("mine.apps.test"), None);
        for (host, pod) in [("down.apps.test", 12), ("bad.apps.test", 13)] {
            assert_eq!(
                table.table.get(host),
                Some(&Target::Unavailable {
                    pod_id: Uuid::from_u128(pod),
                    why: Unavailable::NodeUnreachable
                }),
                "{host}"
            );
        }
    }

    #[test]
    fn fleet_routes_merge_again_only_when_a_side_changed() {
        let mut local = RoutingTable::default();
        local.insert(
            "here.apps.test",
            Target::Pod {
                pod_id: Uuid::from_u128(1),
                addr: "10.88.0.5:8080".parse().expect("address"),
            },
        );
        let local = Arc::new(local);
        let feed = Arc::new(RemoteRoutes::default());
        let routes = FleetRoutes::new(Arc::new(FixedRoutes::new(local.clone())), feed.clone());
        assert!(
            Arc::ptr_eq(&routes.table(), &local),
            "nothing remote: the local table as it is"
        );
        assert_eq!(routes.hop_token(), None);

        let mut other = RoutingTable::default();
        other.insert("far.apps.test", remote("10.0.0.9:80"));
        feed.replace(RemoteTable {
            version: Some("v1".into()),
            hop_token: Some(Arc::from("hop")),
            table: Arc::new(other),
        });
        let first = routes.table();
        assert_eq!(first.len(), 2);
        assert!(
            Arc::ptr_eq(&first, &routes.table()),
            "unchanged sides: the same merged table"
        );
        assert_eq!(routes.hop_token().as_deref(), Some("hop"));

        let mut moved = RoutingTable::default();
        moved.insert("far.apps.test", remote("10.0.0.10:80"));
        feed.replace(RemoteTable {
            version: Some("v2".into()),
            hop_token: Some(Arc::from("hop")),
            table: Arc::new(moved),
        });
        assert_eq!(routes.table().get("far.apps.test"), Some(&remote("10.0.0.10:80")));
    }
}
