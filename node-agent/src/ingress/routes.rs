//! The routing table: which host name goes where, and the sources that keep it current.
//!
//! *Design.* A [`RoutingTable`] is an immutable map from a normalised host name to a
//! [`Target`]; a [`RouteSource`] hands out the current one as an `Arc`, so a request costs an
//! atomic load, a read lock and a hash lookup — no disk, no containerd. [`LocalRoutes`] derives
//! the table from the pod manager's records and rebuilds it only when
//! [`Pods::records_version`] moved. Routes to pods on other nodes will come from a second
//! source (a feed from the control plane) merged with this one; [`Target::RemoteNode`] is the
//! shape they take.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

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
}

impl Target {
    /// Preference when two pods claim the same host (a hand-over in progress): a pod that
    /// answers beats one that is coming back, which beats one that is not.
    fn rank(&self) -> u8 {
        match self {
            Target::Pod { .. } => 3,
            Target::RemoteNode { .. } => 2,
            Target::Unavailable {
                why: Unavailable::NotRunning { coming_back: true, .. },
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
}
