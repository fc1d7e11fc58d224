//! What crosses the boundary between the control plane (and scheduler) and a node agent: the pod
//! spec a node runs, the jobs on a node's queue, and the agent's join, heartbeat and report
//! messages on the control plane's `/internal` API.
//!
//! *Invariants.* Every job and every report carries the pod's `generation`; an agent ignores a
//! job older than the newest generation it has seen for that pod, and the control plane ignores
//! a report older than the pod's current generation. Ids are UUIDs; byte sizes are bytes; CPU
//! is in millicores (1000 = one core).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The scheduler's queue (apalis): [`PodJob`]s from the control plane and the reconciler.
pub const PODS_QUEUE: &str = "pods";

/// "Bring this pod to its desired state": the scheduler places it when it has no node, then
/// sends the node the job that matches the desired state (start, restart, stop, delete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodJob {
    pub pod_id: Uuid,
    pub generation: i64,
}

/// The name of a node's job queue in Redis (apalis): `node:<id>`.
pub fn node_queue(node_id: Uuid) -> String {
    format!("node:{node_id}")
}

/// The resources a pod may use (its plan's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores: 500 is half a core (CFS quota), also the weight for shares.
    pub cpu_millis: u32,
    /// Memory limit in bytes (no swap beyond it).
    pub memory_bytes: u64,
    /// Disk quota of the volume in bytes.
    pub disk_bytes: u64,
    /// Maximum number of processes and threads.
    pub pids: u32,
}

/// What the agent does when the pod's main process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after every exit (with backoff).
    #[default]
    Always,
    /// Restart after a non-zero exit or a kill (with backoff), up to the agent's cap.
    OnFailure,
    /// Never restart.
    Never,
}

/// Credentials for a private registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Everything a node needs to run one pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodSpec {
    pub pod_id: Uuid,
    /// The pod's DNS-label name; also the container's hostname.
    pub name: String,
    /// Bumped by the control plane on every change of desired state or spec.
    pub generation: i64,
    /// An image reference such as `registry.example.com/team/app:1` or `busybox:latest`.
    pub image: String,
    /// Credentials for the image's registry, when it is private.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// Replaces the image's entrypoint when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Added to (and overriding) the image's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Replaces the image's working directory when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    pub resources: Resources,
    /// Where the pod's volume is mounted inside the container.
    #[serde(default = "default_volume_mount")]
    pub volume_mount: String,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// The port the pod's HTTP server listens on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    /// The host names the node ingress routes to this pod's `http_port` (lowercase, no port),
    /// e.g. `web-acme.apps.example.com`; the control plane decides them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Fill the pod's new volume from another pod's volume before the first start (a clone or
    /// a move): pulled from that node's peer endpoint and verified. Ignored once the volume
    /// was filled, and never part of what decides whether a container must be replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_source: Option<VolumeSource>,
}

/// Where a pod's volume comes from: the peer endpoint of the node holding it, whose volume
/// (by pod id) to copy, and the one-time token that node was told to accept.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSource {
    /// `host:port` of the source node's peer endpoint (its advertised `peer_addr`).
    pub addr: String,
    /// The pod whose volume is copied (for a move, the pod itself).
    pub pod_id: Uuid,
    /// The transfer token (`ipx_…`); the source node accepts it once, until it expires.
    pub token: String,
}

impl std::fmt::Debug for VolumeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeSource")
            .field("addr", &self.addr)
            .field("pod_id", &self.pod_id)
            .field("token", &"***")
            .finish()
    }
}

fn default_volume_mount() -> String {
    "/data".to_string()
}

/// A job on a node's queue (`node:<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum NodeJob {
    /// Make the pod exist and run with this spec (pull, network, volume, container, task).
    EnsureRunning { spec: PodSpec },
    /// Stop the pod's task (SIGTERM, then SIGKILL after the grace period); keep everything else.
    Stop {
        pod_id: Uuid,
        generation: i64,
        #[serde(default = "default_grace_secs")]
        grace_secs: u32,
    },
    /// Stop, then start the pod again with this spec.
    Restart { spec: PodSpec },
    /// Change the limits of the pod, live when it runs.
    Resize {
        pod_id: Uuid,
        generation: i64,
        resources: Resources,
    },
    /// Remove the task, container, snapshot and network, and the volume unless retained.
    Delete {
        pod_id: Uuid,
        generation: i64,
        #[serde(default)]
        retain_volume: bool,
    },
    /// Let another node pull this pod's volume once with `token`, within `expires_in_secs`.
    /// With `stop_first` (a move) the pod is stopped first and stays stopped (its volume is
    /// then consistent); without it (a clone) the pod is not touched and the job's generation
    /// does not matter.
    ExportVolume {
        pod_id: Uuid,
        generation: i64,
        token: String,
        expires_in_secs: u64,
        #[serde(default)]
        stop_first: bool,
    },
}

fn default_grace_secs() -> u32 {
    10
}

impl NodeJob {
    pub fn pod_id(&self) -> Uuid {
        match self {
            NodeJob::EnsureRunning { spec } | NodeJob::Restart { spec } => spec.pod_id,
            NodeJob::Stop { pod_id, .. }
            | NodeJob::Resize { pod_id, .. }
            | NodeJob::Delete { pod_id, .. }
            | NodeJob::ExportVolume { pod_id, .. } => *pod_id,
        }
    }

    pub fn generation(&self) -> i64 {
        match self {
            NodeJob::EnsureRunning { spec } | NodeJob::Restart { spec } => spec.generation,
            NodeJob::Stop { generation, .. }
            | NodeJob::Resize { generation, .. }
            | NodeJob::Delete { generation, .. }
            | NodeJob::ExportVolume { generation, .. } => *generation,
        }
    }

    /// A short name for logs and metrics labels.
    pub fn operation(&self) -> &'static str {
        match self {
            NodeJob::EnsureRunning { .. } => "ensure_running",
            NodeJob::Stop { .. } => "stop",
            NodeJob::Restart { .. } => "restart",
            NodeJob::Resize { .. } => "resize",
            NodeJob::Delete { .. } => "delete",
            NodeJob::ExportVolume { .. } => "export_volume",
        }
    }
}

/// The state of a pod as its node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodePodState {
    /// Pulling the image, preparing network, volume and container.
    Starting,
    Running,
    /// Stopped on request.
    Stopped,
    /// The main process exited and is not (or not yet) restarted.
    Exited,
    /// It cannot run (bad image, bad command, out of memory, crash loop); see the reason.
    Failed,
    /// Everything of the pod is gone from the node.
    Deleted,
}

impl NodePodState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodePodState::Starting => "starting",
            NodePodState::Running => "running",
            NodePodState::Stopped => "stopped",
            NodePodState::Exited => "exited",
            NodePodState::Failed => "failed",
            NodePodState::Deleted => "deleted",
        }
    }
}

/// A pod's state change, sent by the agent to `POST /internal/nodes/{id}/reports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodReport {
    pub pod_id: Uuid,
    pub generation: i64,
    pub state: NodePodState,
    /// Why, in words a user can act on ("image not found: …", "out of memory", "exit code 1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The pod's address on the node's bridge, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// RFC 3339 time the agent observed the change.
    pub at: String,
}

/// A batch of reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportBatch {
    pub reports: Vec<PodReport>,
}

/// Capacity in one dimension set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// `POST /internal/nodes/join`, authenticated by the fleet's join token (bearer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The node's name (its hostname unless configured); unique in the fleet.
    pub name: String,
    pub region: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    /// The id this node had before, when its state directory remembers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<Uuid>,
    /// Where other nodes' ingresses reach this node's ingress (`ip:port`), to forward requests
    /// for its pods; `None` when the agent cannot tell (its pods then answer 503 elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_addr: Option<String>,
}

/// The answer to a join: the node's id and its own token for everything after.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub node_id: Uuid,
    pub node_token: String,
    /// The Redis queue the node consumes (`node:<id>`).
    pub queue: String,
    /// How often the control plane expects a heartbeat.
    pub heartbeat_interval_secs: u64,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse")
            .field("node_id", &self.node_id)
            .field("node_token", &"***")
            .field("queue", &self.queue)
            .field("heartbeat_interval_secs", &self.heartbeat_interval_secs)
            .finish()
    }
}

/// One pod in a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatPod {
    pub pod_id: Uuid,
    pub generation: i64,
    pub state: NodePodState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// `POST /internal/nodes/{id}/heartbeat`, authenticated by the node token (bearer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// What the machine has.
    pub total: Capacity,
    /// What pods may use: total minus the configured reservations.
    pub allocatable: Capacity,
    pub region: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub pods: Vec<HeartbeatPod>,
    /// As in [`JoinRequest::ingress_addr`]; every heartbeat repeats it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_addr: Option<String>,
    /// `host:port` where other nodes reach this node's peer endpoint (volume transfers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// `host:port` where users reach this node's SSH gateway (the connection info of its pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_addr: Option<String>,
}

/// `POST /internal/nodes/{id}/ssh/authorize` (node token): the gateway asks, at every
/// authentication attempt and after the client proved the key with a signature, whether the key
/// may log into `username`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshAuthorizeRequest {
    /// The SSH username: the first label of a pod's platform hostname, or the pod id.
    pub username: String,
    /// The verified key as `<algorithm> <base64>` (OpenSSH public-key line without comment).
    pub public_key: String,
}

/// The answer when the key may log in (otherwise 403 `ssh_denied`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshAuthorization {
    pub pod_id: Uuid,
    pub pod_name: String,
    /// Whether the pod is placed on the asking node (if not, the gateway refuses the session
    /// and names `node_name` / `node_ssh_addr`).
    pub on_this_node: bool,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub node_ssh_addr: Option<String>,
}

/// `GET /internal/nodes/{id}/routes` (node token): where the pods of the *other* nodes are, for
/// the asking node's ingress. Conditional with `If-None-Match: "<version>"` (304 while the
/// routes are the same) and long-polled with `?wait=<seconds>`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct IngressRoutes {
    /// Changes whenever the routes (or the hop token) change; also the answer's `ETag`.
    pub version: String,
    /// The fleet's value of the `x-instapod-hop` header: a request carrying it was forwarded by
    /// another node's ingress, whose `X-Forwarded-*` headers can be kept.
    pub hop_token: String,
    pub routes: Vec<IngressRoute>,
}

impl std::fmt::Debug for IngressRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressRoutes")
            .field("version", &self.version)
            .field("hop_token", &"***")
            .field("routes", &self.routes)
            .finish()
    }
}

/// The host names of one pod of another node, and where its requests go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRoute {
    pub pod_id: Uuid,
    pub hostnames: Vec<String>,
    pub target: IngressTarget,
}

/// Where a pod of another node is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IngressTarget {
    /// Placed on a healthy node: forward to that node's ingress (`ip:port`), which answers for
    /// the pod whatever its state.
    Node { node_id: Uuid, addr: String },
    /// Waiting for a node (pending or unschedulable).
    Unplaced,
    /// Placed on a node that is unhealthy or advertised no ingress address.
    NodeUnreachable { node_id: Uuid },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_with_an_op_tag() {
        let job = NodeJob::Stop {
            pod_id: Uuid::nil(),
            generation: 3,
            grace_secs: 5,
        };
        let text = serde_json::to_string(&job).expect("serialises");
        assert!(text.contains(r#""op":"stop""#), "{text}");
        assert_eq!(serde_json::from_str::<NodeJob>(&text).expect("parses"), job);
        assert_eq!(job.generation(), 3);
        assert_eq!(job.operation(), "stop");
    }

    #[test]
    fn secrets_are_not_printed() {
        let auth = RegistryAuth {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
        let join = JoinResponse {
            node_id: Uuid::nil(),
            node_token: "tok-secret".into(),
            queue: node_queue(Uuid::nil()),
            heartbeat_interval_secs: 5,
        };
        assert!(!format!("{join:?}").contains("tok-secret"));
        let source = VolumeSource {
            addr: "10.0.0.1:9102".into(),
            pod_id: Uuid::nil(),
            token: "ipx_secret".into(),
        };
        assert!(!format!("{source:?}").contains("ipx_secret"));
    }

    #[test]
    fn spec_defaults_fill_in_the_volume_mount_and_restart_policy() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "pod_id": Uuid::nil(), "name": "web", "generation": 1, "image": "busybox",
            "resources": {"cpu_millis": 500, "memory_bytes": 268435456u64, "disk_bytes": 1073741824u64, "pids": 256}
        }))
        .expect("parses");
        assert_eq!(spec.volume_mount, "/data");
        assert_eq!(spec.restart_policy, RestartPolicy::Always);
    }
}
