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

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use instapod_common::node::NodePodState;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use salvo::affix_state;
use salvo::prelude::*;

use crate::pods::Pods;

const STATES: [NodePodState; 6] = [
    NodePodState::Starting,
    NodePodState::Running,
    NodePodState::Stopped,
    NodePodState::Exited,
    NodePodState::Failed,
    NodePodState::Deleted,
];

/// Installs the global recorder.
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        .map_err(|err| err.to_string())?
        .install_recorder()
        .map_err(|err| err.to_string())
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
}

#[derive(Clone, Debug)]
struct MetricsState {
    handle: PrometheusHandle,
    pods: Pods,
}

#[handler]
async fn render_metrics(depot: &mut Depot, res: &mut Response) {
    let Ok(state) = depot.get_typed::<MetricsState>() else {
        res.status_code(StatusCode::INTERNAL_SERVER_ERROR);
        return;
    };
    refresh(&state.pods);
    res.add_header("content-type", "text/plain; version=0.0.4", true).ok();
    res.render(state.handle.render());
}

#[handler]
async fn healthz(res: &mut Response) {
    res.render(Json(serde_json::json!({"status": "ok"})));
}

/// Serves until the process ends.
pub async fn serve(listen: SocketAddr, handle: PrometheusHandle, pods: Pods) -> std::io::Result<()> {
    let router = Router::new()
        .hoop(affix_state::inject(MetricsState { handle, pods }))
        .push(Router::with_path("metrics").get(render_metrics))
        .push(Router::with_path("healthz").get(healthz));
    let acceptor = TcpListener::new(listen)
        .try_bind()
        .await
        .map_err(std::io::Error::other)?;
    Server::new(acceptor).serve(router).await;
    Ok(())
}
