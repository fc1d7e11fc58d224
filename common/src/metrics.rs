//! The catalogue of every Prometheus metric Instapod exports: name, type, labels and meaning,
//! per component. Each binary describes its part at start-up ([`describe`]), so `/metrics`
//! carries a `# HELP` line for every series it shows; `docs/metrics.md` is the readable form, and
//! `tests/tests/observability.rs` checks the three against each other and against the shipped
//! dashboards and alert rules (a query may only name a metric listed here, every metric a
//! running component shows must be listed here, and every listed metric is documented).
//!
//! *Conventions (an invariant of the project).* Names are `instapod_<component>_<what>_<unit>`
//! with `_total` for counters and a base unit (`_seconds`, `_bytes`, `_cores`) where there is
//! one; label values come from small fixed sets (route templates, status classes, operations,
//! outcomes, reasons) or from ids bounded by what one process manages (`pod_id` on a node
//! agent: the pods of that node). Never a raw path, an error message or a user's name.
//!
//! *Limitations.* The catalogue lists names, not the label values each series takes: a query
//! with a wrong label value is not caught by the test. `instapod_node_agent_pod_restarts_total`
//! stays in an agent's `/metrics` after the pod is deleted until the agent restarts (the
//! `metrics` crate has no way to remove a series); the per-pod samples are rendered from the
//! newest sample and leave with the pod.

/// What a metric is, as Prometheus types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Exported as `<name>_bucket`, `<name>_sum` and `<name>_count`.
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

impl Metric {
    /// The series names Prometheus stores for this metric (a histogram's three).
    pub fn series_names(&self) -> Vec<String> {
        match self.kind {
            Kind::Counter | Kind::Gauge => vec![self.name.to_string()],
            Kind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{}{suffix}", self.name))
                .collect(),
        }
    }
}

const fn counter(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        labels,
        help,
    }
}

const fn gauge(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        labels,
        help,
    }
}

const fn histogram(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram,
        labels,
        help,
    }
}

/// The control plane's metrics (served on its listener at `/metrics`).
pub const CONTROL_PLANE: &[Metric] = &[
    counter(
        "instapod_control_plane_http_requests_total",
        &["method", "route", "status"],
        "HTTP requests answered, by method, route template (`unmatched` for unknown paths) and status class",
    ),
    histogram(
        "instapod_control_plane_http_request_duration_seconds",
        &["method", "route", "status"],
        "Time to answer an HTTP request (until the response head; streamed bodies are not included)",
    ),
    counter(
        "instapod_control_plane_jobs_enqueued_total",
        &["queue", "kind", "outcome"],
        "Jobs pushed to a queue, by queue (pods, domains), what caused them (create, clone, start, stop, restart, delete, resize; verify, reverify, issue, renew_or_retry) and outcome (ok, error, timeout)",
    ),
    gauge(
        "instapod_control_plane_queue_depth",
        &["queue"],
        "Jobs waiting to be fetched: queue `pods` (the scheduler's) and `nodes` (every node queue together), sampled from Redis every 15 s",
    ),
    gauge(
        "instapod_control_plane_db_pool_max_connections",
        &[],
        "The Postgres pool's maximum size",
    ),
    gauge(
        "instapod_control_plane_db_pool_open_connections",
        &[],
        "Postgres connections open in the pool (in use or idle)",
    ),
    gauge(
        "instapod_control_plane_db_pool_idle_connections",
        &[],
        "Open Postgres connections not in use",
    ),
    gauge(
        "instapod_control_plane_db_pool_waiters",
        &[],
        "Requests waiting for a Postgres connection",
    ),
    gauge(
        "instapod_control_plane_nodes",
        &["status"],
        "Nodes by status (healthy, unhealthy), as the node health worker last saw them",
    ),
    counter(
        "instapod_control_plane_ingress_route_refreshes_total",
        &["outcome"],
        "Reads of the fleet's ingress routes from Postgres, by outcome (changed, unchanged, error)",
    ),
    gauge(
        "instapod_control_plane_ingress_routes",
        &[],
        "Ingress routes in the control plane's cache",
    ),
    gauge(
        "instapod_control_plane_domains",
        &["status"],
        "Custom domains by status (pending_dns, verified, issuing_certificate, active, failed), set by the domain worker every pass",
    ),
    counter(
        "instapod_control_plane_domain_reports_total",
        &["report", "outcome"],
        "Node reports about custom domains, by report (verification, certificate, certificate_failure) and outcome (verified, failed, inconclusive, stored, invalid, rate_limited, not_found)",
    ),
];

/// The scheduler's metrics (served on `metrics_listen` at `/metrics`).
pub const SCHEDULER: &[Metric] = &[
    counter(
        "instapod_scheduler_placements_total",
        &["mode"],
        "Pods given a node, by mode (batch: several pods in one transaction; single: a pod converged alone)",
    ),
    counter(
        "instapod_scheduler_placement_failures_total",
        &["reason"],
        "Placements that found no node, by reason (no_nodes, no_eligible_node, insufficient_capacity, contention)",
    ),
    histogram(
        "instapod_scheduler_placement_duration_seconds",
        &["mode"],
        "Time from taking a pod to committing its node (a batch's time counts once per pod of the batch)",
    ),
    counter(
        "instapod_scheduler_pod_jobs_total",
        &["outcome"],
        "Pod jobs handled, by outcome (ok, error: retried)",
    ),
    counter(
        "instapod_scheduler_node_jobs_sent_total",
        &["operation"],
        "Jobs sent to nodes' queues, by operation (ensure_running, stop, restart, resize, delete, export_volume)",
    ),
    counter(
        "instapod_scheduler_reconciler_actions_total",
        &["action"],
        "What reconcile passes did to pods, by action (marked_unknown: node silent; recovered: node back; requeued: not in desired state)",
    ),
    counter(
        "instapod_scheduler_reconcile_passes_total",
        &["outcome"],
        "Reconcile passes, by outcome (ok, error)",
    ),
    histogram(
        "instapod_scheduler_reconcile_duration_seconds",
        &[],
        "Time one reconcile pass took",
    ),
];

/// The node agent's metrics (served on `metrics_listen` at `/metrics`).
pub const NODE_AGENT: &[Metric] = &[
    gauge(
        "instapod_node_agent_pods",
        &["state"],
        "Pods on this node by node state (starting, running, stopped, exited, failed, deleted)",
    ),
    histogram(
        "instapod_node_agent_operation_duration_seconds",
        &["operation", "outcome"],
        "Time to handle a node job, by operation and outcome",
    ),
    counter(
        "instapod_node_agent_jobs_total",
        &["operation", "outcome"],
        "Node jobs handled, by operation and outcome",
    ),
    counter(
        "instapod_node_agent_containerd_errors_total",
        &["operation"],
        "Failed containerd calls other than not-found and already-exists, by operation",
    ),
    counter(
        "instapod_node_agent_image_pulls_total",
        &[],
        "Images pulled from a registry",
    ),
    counter(
        "instapod_node_agent_image_pull_bytes_total",
        &[],
        "Bytes of image layers downloaded",
    ),
    counter(
        "instapod_node_agent_image_reuses_total",
        &[],
        "Image references answered from the local store without a pull",
    ),
    gauge(
        "instapod_node_agent_log_followers",
        &[],
        "Log readers following a pod's log now",
    ),
    counter(
        "instapod_node_agent_ssh_sessions_total",
        &["outcome"],
        "SSH sessions by how they ended (exited_zero, exited_nonzero, refused, error)",
    ),
    counter(
        "instapod_node_agent_ssh_auth_failures_total",
        &["reason"],
        "Refused SSH authentications (denied, rate_limited, control_plane_unavailable)",
    ),
    gauge(
        "instapod_node_agent_ssh_sessions_active",
        &[],
        "SSH sessions running a process in a pod now",
    ),
    counter(
        "instapod_node_agent_pod_restarts_total",
        &["pod_id"],
        "Restarts of a pod's task after it exited (restart policy); a steady rate means a crash loop",
    ),
    gauge("instapod_node_agent_capacity_cpu_cores", &[], "CPUs of the machine"),
    gauge(
        "instapod_node_agent_capacity_memory_bytes",
        &[],
        "Memory of the machine",
    ),
    gauge(
        "instapod_node_agent_capacity_disk_bytes",
        &[],
        "Size of the filesystem of the state directory",
    ),
    gauge(
        "instapod_node_agent_allocatable_cpu_cores",
        &[],
        "CPUs pods may reserve (capacity minus the configured reservation)",
    ),
    gauge(
        "instapod_node_agent_allocatable_memory_bytes",
        &[],
        "Memory pods may reserve",
    ),
    gauge(
        "instapod_node_agent_allocatable_disk_bytes",
        &[],
        "Disk pods may reserve",
    ),
    gauge(
        "instapod_node_agent_allocated_cpu_cores",
        &[],
        "CPUs reserved by the pods on this node (not deleted)",
    ),
    gauge(
        "instapod_node_agent_allocated_memory_bytes",
        &[],
        "Memory reserved by the pods on this node",
    ),
    gauge(
        "instapod_node_agent_allocated_disk_bytes",
        &[],
        "Disk (volume quotas) reserved by the pods on this node",
    ),
    gauge(
        "instapod_node_agent_filesystem_avail_bytes",
        &[],
        "Free bytes of the state directory's filesystem available to the agent (what `df` shows as available)",
    ),
    counter(
        "instapod_node_agent_pod_cpu_seconds_total",
        &["pod_id"],
        "CPU time used by the pod's task",
    ),
    gauge(
        "instapod_node_agent_pod_cpu_limit_cores",
        &["pod_id"],
        "The pod's CPU limit",
    ),
    gauge(
        "instapod_node_agent_pod_memory_bytes",
        &["pod_id"],
        "Memory used by the pod's task",
    ),
    gauge(
        "instapod_node_agent_pod_memory_limit_bytes",
        &["pod_id"],
        "The pod's memory limit",
    ),
    counter(
        "instapod_node_agent_pod_network_receive_bytes_total",
        &["pod_id"],
        "Bytes received on the pod's interface",
    ),
    counter(
        "instapod_node_agent_pod_network_transmit_bytes_total",
        &["pod_id"],
        "Bytes sent from the pod's interface",
    ),
    gauge(
        "instapod_node_agent_pod_disk_used_bytes",
        &["pod_id"],
        "Bytes used in the pod's volume",
    ),
    gauge(
        "instapod_node_agent_pod_disk_quota_bytes",
        &["pod_id"],
        "The pod's volume quota",
    ),
    gauge("instapod_node_agent_pod_pids", &["pod_id"], "Processes in the pod"),
    histogram(
        "instapod_node_agent_sampling_duration_seconds",
        &[],
        "Time one round of sampling every pod took",
    ),
    counter(
        "instapod_node_agent_ingress_requests_total",
        &["outcome"],
        "Requests through the node's ingress, by outcome",
    ),
    histogram(
        "instapod_node_agent_ingress_request_duration_seconds",
        &["outcome"],
        "Time to answer a request through the ingress, by outcome",
    ),
    counter(
        "instapod_node_agent_ingress_route_feed_polls_total",
        &["outcome"],
        "Polls of the control plane's route feed, by outcome",
    ),
    gauge(
        "instapod_node_agent_ingress_remote_routes",
        &[],
        "Routes to pods on other nodes known to this node's ingress",
    ),
    gauge(
        "instapod_node_agent_ingress_route_feed_last_success_timestamp_seconds",
        &[],
        "When the route feed was last read successfully (Unix time)",
    ),
    counter(
        "instapod_node_agent_ingress_connect_retries_total",
        &[],
        "Connects to pods of this node tried again because the last attempt did not complete in time",
    ),
    counter(
        "instapod_node_agent_ingress_tls_handshake_failures_total",
        &["reason"],
        "TLS handshakes at the ingress that failed (handshake) or timed out (timeout)",
    ),
    counter(
        "instapod_node_agent_domain_jobs_total",
        &["operation", "outcome"],
        "Custom domain jobs (verify, issue_certificate) handled, by outcome",
    ),
    histogram(
        "instapod_node_agent_domain_job_duration_seconds",
        &["operation"],
        "Time to handle a custom domain job (DNS checks, or an ACME order), by operation",
    ),
    counter(
        "instapod_node_agent_domain_feed_polls_total",
        &["outcome"],
        "Polls of the control plane's served-domains feed, by outcome",
    ),
    gauge(
        "instapod_node_agent_domains_served",
        &[],
        "Custom domains this node's ingress serves",
    ),
    gauge(
        "instapod_node_agent_domain_certificate_expiry_seconds",
        &[],
        "The earliest expiry among the served custom domain certificates (Unix time; 0 while none is served)",
    ),
    counter(
        "instapod_node_agent_volume_transfers_total",
        &["side", "outcome"],
        "Volume copies between nodes (clone, move), by side (send, receive) and outcome",
    ),
];

/// Every component's catalogue, with the component's name.
pub const ALL: &[(&str, &[Metric])] = &[
    ("control_plane", CONTROL_PLANE),
    ("scheduler", SCHEDULER),
    ("node_agent", NODE_AGENT),
];

/// Describes every metric of `catalogue` to the installed recorder (HELP lines).
pub fn describe(catalogue: &[Metric]) {
    for metric in catalogue {
        match metric.kind {
            Kind::Counter => ::metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => ::metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => ::metrics::describe_histogram!(metric.name, metric.help),
        }
    }
}

/// Registers `name` at zero for each of `values` of its one label, so that `rate()` and
/// alerts see a series before the first event.
pub fn register_counters(name: &'static str, label: &'static str, values: &[&'static str]) {
    for value in values {
        ::metrics::counter!(name, label => *value).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_follow_the_convention_and_are_unique() {
        let mut seen = HashSet::new();
        for (component, catalogue) in ALL {
            for metric in *catalogue {
                let prefix = format!("instapod_{component}_");
                assert!(metric.name.starts_with(&prefix), "{} lacks {prefix}", metric.name);
                assert!(
                    metric
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                    "{}",
                    metric.name
                );
                assert_eq!(
                    metric.kind == Kind::Counter,
                    metric.name.ends_with("_total"),
                    "{}: counters, and only counters, end in _total",
                    metric.name
                );
                assert!(!metric.help.is_empty(), "{} has no help", metric.name);
                assert!(seen.insert(metric.name), "{} is listed twice", metric.name);
            }
        }
    }

    #[test]
    fn histograms_export_three_series() {
        let metric = histogram("instapod_x_duration_seconds", &[], "x");
        assert_eq!(
            metric.series_names(),
            [
                "instapod_x_duration_seconds_bucket",
                "instapod_x_duration_seconds_sum",
                "instapod_x_duration_seconds_count"
            ]
        );
        assert_eq!(
            counter("instapod_x_total", &[], "x").series_names(),
            ["instapod_x_total"]
        );
    }
}
