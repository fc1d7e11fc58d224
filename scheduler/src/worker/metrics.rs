//! The scheduler's `/metrics` (Prometheus text) on `metrics_listen`, and the calls that record
//! its series. The names, types and labels are listed in
//! [`instapod_common::metrics::SCHEDULER`] (and `docs/metrics.md`).
//!
//! *Design.* The exporter's own HTTP listener serves every path with the rendered text; the
//! recorder is installed once per process. Label values are the `&'static str` sets below, so
//! they stay bounded. Counters with a fixed label set are registered at zero on start-up, so
//! `rate()` and alert rules see them before the first event.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;

pub const PLACEMENTS: &str = "instapod_scheduler_placements_total";
pub const PLACEMENT_FAILURES: &str = "instapod_scheduler_placement_failures_total";
pub const PLACEMENT_DURATION: &str = "instapod_scheduler_placement_duration_seconds";
pub const POD_JOBS: &str = "instapod_scheduler_pod_jobs_total";
pub const NODE_JOBS_SENT: &str = "instapod_scheduler_node_jobs_sent_total";
pub const RECONCILER_ACTIONS: &str = "instapod_scheduler_reconciler_actions_total";
pub const RECONCILE_PASSES: &str = "instapod_scheduler_reconcile_passes_total";
pub const RECONCILE_DURATION: &str = "instapod_scheduler_reconcile_duration_seconds";

/// How a pod was placed: `batch` (with the pods whose jobs ran at the same moment) or
/// `single` (converged alone).
pub const MODES: [&str; 2] = ["batch", "single"];

/// Why a placement found no node (see [`failure_reason`]); `contention` when the chosen nodes
/// kept losing their room to other placements before they could be locked.
pub const FAILURE_REASONS: [&str; 4] = ["no_nodes", "no_eligible_node", "insufficient_capacity", "contention"];

/// What a reconcile pass did to pods.
pub const RECONCILER_ACTION_KINDS: [&str; 3] = ["marked_unknown", "recovered", "requeued"];

/// Latency buckets, in seconds (placement is milliseconds; a reconcile pass up to seconds).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the recorder and starts serving `/metrics` on `listen` (fails when it cannot bind).
pub fn install(listen: SocketAddr) -> anyhow::Result<()> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(BUCKETS)?
        .build()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    tokio::spawn(async move {
        if let Err(err) = exporter.await {
            tracing::error!(error = ?err, %listen, "metrics endpoint failed");
        }
    });
    // Histograms are drained into their buckets on render; upkeep bounds what accumulates
    // between scrapes when nobody scrapes.
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(5));
        loop {
            interval.tick().await;
            handle.run_upkeep();
        }
    });
    instapod_common::metrics::describe(instapod_common::metrics::SCHEDULER);
    instapod_common::metrics::register_counters(PLACEMENTS, "mode", &MODES);
    instapod_common::metrics::register_counters(PLACEMENT_FAILURES, "reason", &FAILURE_REASONS);
    instapod_common::metrics::register_counters(RECONCILER_ACTIONS, "action", &RECONCILER_ACTION_KINDS);
    instapod_common::metrics::register_counters(RECONCILE_PASSES, "outcome", &["ok", "error"]);
    instapod_common::metrics::register_counters(POD_JOBS, "outcome", &["ok", "error"]);
    tracing::info!(%listen, "metrics endpoint listening");
    Ok(())
}

/// The `reason` label of a placement that found no node.
pub fn failure_reason(unschedulable: &crate::Unschedulable) -> &'static str {
    if unschedulable.nodes_total == 0 {
        "no_nodes"
    } else if unschedulable.nodes_lacking_cpu + unschedulable.nodes_lacking_memory + unschedulable.nodes_lacking_disk
        > 0
    {
        "insufficient_capacity"
    } else {
        "no_eligible_node"
    }
}

/// `n` pods placed in `mode`, each after `took`.
pub fn placed(mode: &'static str, n: usize, took: Duration) {
    metrics::counter!(PLACEMENTS, "mode" => mode).increment(n as u64);
    let histogram = metrics::histogram!(PLACEMENT_DURATION, "mode" => mode);
    for _ in 0..n {
        histogram.record(took.as_secs_f64());
    }
}

pub fn placement_failed(reason: &'static str) {
    metrics::counter!(PLACEMENT_FAILURES, "reason" => reason).increment(1);
}

pub fn node_jobs_sent(operation: &'static str, n: usize) {
    metrics::counter!(NODE_JOBS_SENT, "operation" => operation).increment(n as u64);
}

pub fn pod_job(ok: bool) {
    metrics::counter!(POD_JOBS, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

pub fn reconciler_action(action: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(RECONCILER_ACTIONS, "action" => action).increment(n as u64);
    }
}

pub fn reconcile_pass(ok: bool, took: Duration) {
    metrics::counter!(RECONCILE_PASSES, "outcome" => if ok { "ok" } else { "error" }).increment(1);
    metrics::histogram!(RECONCILE_DURATION).record(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_set_is_in_the_catalogue_help() {
        let help = |name: &str| {
            instapod_common::metrics::SCHEDULER
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.help)
                .unwrap_or_else(|| panic!("{name} is not in the catalogue"))
        };
        for reason in FAILURE_REASONS {
            assert!(help(PLACEMENT_FAILURES).contains(reason), "{reason}");
        }
        for action in RECONCILER_ACTION_KINDS {
            assert!(help(RECONCILER_ACTIONS).contains(action), "{action}");
        }
        for mode in MODES {
            assert!(help(PLACEMENTS).contains(mode), "{mode}");
        }
        for name in [
            POD_JOBS,
            NODE_JOBS_SENT,
            RECONCILE_PASSES,
            RECONCILE_DURATION,
            PLACEMENT_DURATION,
        ] {
            help(name);
        }
    }
}
