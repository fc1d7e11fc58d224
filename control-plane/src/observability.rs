//! The control plane's metrics beyond HTTP (which [`crate::http::metrics`] records): the
//! Postgres pool, read on each scrape, and the depth of the job queues, sampled from Redis by
//! a worker. Names, types and labels: [`instapod_common::metrics::CONTROL_PLANE`] and
//! `docs/metrics.md`.
//!
//! *Design.* The pool's status is a few atomics, so it is read when `/metrics` is rendered. The
//! queues are read by one pipelined `LLEN` per sample ([`instapod_common::queue::waiting`]) every
//! [`QUEUE_SAMPLE_INTERVAL`], never on the scrape path (a slow Redis must not slow a scrape).
//! The `queue` label has two values: `pods` (the scheduler's queue) and `nodes` (every node's
//! queue added together; per-node series would grow with the fleet).
//!
//! *Limitations.* Every control plane replica samples the same Redis: dashboards and alerts take
//! `max by (queue)` over replicas. When Redis cannot be read the gauges keep their last value
//! and the failure is logged.

use std::time::Duration;

use tokio::sync::watch;

use crate::db::Pool;

pub const JOBS_ENQUEUED: &str = "instapod_control_plane_jobs_enqueued_total";
pub const QUEUE_DEPTH: &str = "instapod_control_plane_queue_depth";
pub const DOMAIN_REPORTS: &str = "instapod_control_plane_domain_reports_total";

/// How often the queues' depth is read from Redis.
pub const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// Describes the control plane's metrics to the installed recorder.
pub fn describe() {
    instapod_common::metrics::describe(instapod_common::metrics::CONTROL_PLANE);
}

/// Sets the pool gauges from its status (called before each render).
pub fn refresh_db_pool(pool: &Pool) {
    let status = pool.status();
    metrics::gauge!("instapod_control_plane_db_pool_max_connections").set(status.max_size as f64);
    metrics::gauge!("instapod_control_plane_db_pool_open_connections").set(status.size as f64);
    metrics::gauge!("instapod_control_plane_db_pool_idle_connections").set(status.available as f64);
    metrics::gauge!("instapod_control_plane_db_pool_waiters").set(status.waiting as f64);
}

/// One job pushed to `queue` because of `kind` (a fixed word: create, clone, start, …) with
/// `outcome` `ok`, `error` or `timeout`.
pub fn job_enqueued(queue: &'static str, kind: &'static str, outcome: &'static str) {
    metrics::counter!(JOBS_ENQUEUED, "queue" => queue, "kind" => kind, "outcome" => outcome).increment(1);
}

/// A node's report about a custom domain: `report` is `verification`, `certificate` or
/// `certificate_failure`; `outcome` a fixed word (verified, failed, inconclusive, stored,
/// invalid, rate_limited, not_found).
pub fn domain_report(report: &'static str, outcome: &'static str) {
    metrics::counter!(DOMAIN_REPORTS, "report" => report, "outcome" => outcome).increment(1);
}

/// The queue-depth worker: samples until `shutdown` changes.
pub async fn sample_queue_depth(db: Pool, redis_url: String, mut shutdown: watch::Receiver<bool>) {
    let mut redis: Option<apalis_redis::ConnectionManager> = None;
    loop {
        if let Err(err) = sample_once(&db, &redis_url, &mut redis).await {
            tracing::warn!(error = %err, "sampling the queues' depth failed");
            redis = None;
        }
        tokio::select! {
            _ = tokio::time::sleep(QUEUE_SAMPLE_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A failed sample of the queues' depth.
#[derive(Debug, thiserror::Error)]
enum SampleQueueDepthError {
    #[error("reading the nodes: {0}")]
    Db(#[from] crate::db::DbError),
    #[error("reading the queues from Redis: {0}")]
    Redis(#[from] apalis_redis::RedisError),
}

async fn sample_once(
    db: &Pool,
    redis_url: &str,
    redis: &mut Option<apalis_redis::ConnectionManager>,
) -> Result<(), SampleQueueDepthError> {
    let nodes: Vec<uuid::Uuid> = {
        let client = crate::db::connect(db).await?;
        let rows = client
            .query("SELECT id FROM nodes", &[])
            .await
            .map_err(crate::db::DbError::from)?;
        rows.iter().map(|row| row.get(0)).collect()
    };
    let conn = match redis {
        Some(conn) => conn,
        None => redis.insert(apalis_redis::connect(redis_url).await?),
    };
    let mut names = vec![instapod_common::node::PODS_QUEUE.to_string()];
    names.extend(nodes.into_iter().map(instapod_common::node::node_queue));
    let depths = instapod_common::queue::waiting(conn, &names).await?;
    let pods = depths.first().copied().unwrap_or(0);
    let nodes: u64 = depths.iter().skip(1).sum();
    metrics::gauge!(QUEUE_DEPTH, "queue" => "pods").set(pods as f64);
    metrics::gauge!(QUEUE_DEPTH, "queue" => "nodes").set(nodes as f64);
    Ok(())
}
