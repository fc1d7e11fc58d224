//! The agent's `/metrics` (Prometheus text) and `/healthz`, on `metrics_listen`.
//!
//! Names follow `instapod_node_agent_<what>_<unit>`:
//! - `instapod_node_agent_pods{state}` — pods by their node state (gauge)
//! - `instapod_node_agent_operation_duration_seconds{operation,outcome}` — job handling (histogram)
//! - `instapod_node_agent_jobs_total{operation,outcome}`
//! - `instapod_node_agent_containerd_errors_total{operation}` — failed containerd calls other
//!   than not-found/already-exists
//! - `instapod_node_agent_image_pulls_total`, `instapod_node_agent_image_pull_bytes_total`,
//!   `instapod_node_agent_image_reuses_total`
//! - `instapod_node_agent_log_followers` — log readers following a pod's log now (gauge)
//! - `instapod_node_agent_sampling_duration_seconds` — one sampling round (histogram)
//! - per pod, labelled `pod_id`, from the newest sample (see `sampler::render_prometheus`):
//!   `instapod_node_agent_pod_cpu_seconds_total`, `…_pod_cpu_limit_cores`,
//!   `…_pod_memory_bytes`, `…_pod_memory_limit_bytes`, `…_pod_network_receive_bytes_total`,
//!   `…_pod_network_transmit_bytes_total`, `…_pod_disk_used_bytes`, `…_pod_disk_quota_bytes`,
//!   `…_pod_pids`
//! - `instapod_node_agent_pod_restarts_total{pod_id}` — restarts by the restart policy
//! - `instapod_node_agent_{capacity,allocatable,allocated}_{cpu_cores,memory_bytes,disk_bytes}`
//!   and `instapod_node_agent_filesystem_avail_bytes` — what the node has, what pods may
//!   reserve, what they do reserve, and the free space of the state directory's filesystem
//! - `instapod_node_agent_ssh_sessions_total{outcome}` — SSH sessions by how they ended
//!   (`exited_zero`, `exited_nonzero`, `refused`, `error`)
//! - `instapod_node_agent_ssh_auth_failures_total{reason}` — refused SSH authentications
//!   (`denied`, `rate_limited`, `control_plane_unavailable`)
//! - `instapod_node_agent_ssh_sessions_active` — SSH sessions running a process now (gauge)
//!
//! The full list, with the pod sampler's and the ingress's series, is the catalogue
//! [`instapod_common::metrics::NODE_AGENT`] (described at start-up; `docs/metrics.md`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use instapod_common::node::{Capacity, NodePodState};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use salvo::affix_state;
use salvo::prelude::*;

use crate::pods::Pods;
use crate::sampler::Samples;

const STATES: [NodePodState; 6] = [
    NodePodState::Starting,
    NodePodState::Running,
    NodePodState::Stopped,
    NodePodState::Exited,
    NodePodState::Failed,
    NodePodState::Deleted,
];

pub const POD_RESTARTS: &str = "instapod_node_agent_pod_restarts_total";

/// Installs the global recorder and describes the agent's metrics.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        .map_err(|err| err.to_string())?
        .install_recorder()
        .map_err(|err| err.to_string())?;
    instapod_common::metrics::describe(instapod_common::metrics::NODE_AGENT);
    Ok(handle)
}

/// Publishes what the machine has and what pods may reserve (fixed while the agent runs).
pub fn set_capacity(total: &Capacity, allocatable: &Capacity) {
    for (kind, capacity) in [("capacity", total), ("allocatable", allocatable)] {
        set_resources(kind, capacity);
    }
}

fn set_resources(kind: &str, capacity: &Capacity) {
    let prefix = format!("instapod_node_agent_{kind}");
    metrics::gauge!(format!("{prefix}_cpu_cores")).set(capacity.cpu_millis as f64 / 1000.0);
    metrics::gauge!(format!("{prefix}_memory_bytes")).set(capacity.memory_bytes as f64);
    metrics::gauge!(format!("{prefix}_disk_bytes")).set(capacity.disk_bytes as f64);
}

/// The restart policy restarted pod `pod_id`'s task (its series lives until the agent restarts:
/// bounded by the pods this node has run).
pub fn pod_restarted(pod_id: uuid::Uuid) {
    metrics::counter!(POD_RESTARTS, "pod_id" => pod_id.to_string()).increment(1);
}

/// Updates gauges from current state (called before each render).
pub fn refresh(pods: &Pods) {
    let counts = pods.counts();
    for state in STATES {
        metrics::gauge!("instapod_node_agent_pods", "state" => state.as_str())
            .set(counts.get(&state).copied().unwrap_or(0) as f64);
    }
    let stats = &pods.images().stats;
    metrics::counter!("instapod_node_agent_image_pulls_total").absolute(stats.pulls.load(Ordering::Relaxed));
    metrics::counter!("instapod_node_agent_image_pull_bytes_total").absolute(stats.bytes.load(Ordering::Relaxed));
    metrics::counter!("instapod_node_agent_image_reuses_total").absolute(stats.reused.load(Ordering::Relaxed));
    set_resources("allocated", &pods.allocated());
    if let Ok(fs) = rustix::fs::statvfs(pods.dirs().root()) {
        metrics::gauge!("instapod_node_agent_filesystem_avail_bytes")
            .set(fs.f_bavail.saturating_mul(fs.f_frsize) as f64);
    }
}

#[derive(Clone, Debug)]
struct MetricsState {
    handle: PrometheusHandle,
    pods: Pods,
    samples: Samples,
}

#[handler]
async fn render_metrics(depot: &mut Depot, res: &mut Response) {
    let Ok(state) = depot.get_typed::<MetricsState>() else {
        res.status_code(StatusCode::INTERNAL_SERVER_ERROR);
        return;
    };
    refresh(&state.pods);
    res.add_header("content-type", "text/plain; version=0.0.4", true).ok();
    // Per-pod series come straight from the newest samples, so a pod that left disappears at
    // once instead of lingering in the recorder.
    let mut body = state.handle.render();
    body.push_str(&crate::sampler::render_prometheus(&state.samples.latest()));
    res.render(body);
}

#[handler]
async fn healthz(res: &mut Response) {
    res.render(Json(serde_json::json!({"status": "ok"})));
}

/// Serves until the process ends.
pub async fn serve(listen: SocketAddr, handle: PrometheusHandle, pods: Pods, samples: Samples) -> std::io::Result<()> {
    let router = Router::new()
        .hoop(affix_state::inject(MetricsState { handle, pods, samples }))
        .push(Router::with_path("metrics").get(render_metrics))
        .push(Router::with_path("healthz").get(healthz));
    let acceptor = TcpListener::new(listen)
        .try_bind()
        .await
        .map_err(std::io::Error::other)?;
    Server::new(acceptor).serve(router).await;
    Ok(())
}
