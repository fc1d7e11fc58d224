//! The node-health worker: marks `healthy` nodes whose last heartbeat is older than the
//! configured timeout `unhealthy`, and publishes the gauge
//! `instapod_control_plane_nodes{status="healthy"|"unhealthy"}`.
//!
//! *Design.* One conditional `UPDATE … WHERE status = 'healthy' AND last_heartbeat_at < now() -
//! timeout RETURNING …`: idempotent, and safe on every replica at once (a node is marked, and
//! logged, by whichever replica's statement gets its row lock first; the others no longer match
//! it). The worker runs every `min(timeout / 4, 5 s)`, so a node is marked at most a quarter of
//! the timeout late. Failures are logged and retried with a doubling pause (at most 30 s).

use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::db::{self, DbError, Pool};
use crate::nodes::NodeStatus;

/// The gauge of nodes by status.
pub const NODES_GAUGE: &str = "instapod_control_plane_nodes";

/// The longest pause between two passes.
const MAX_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest pause between two passes (for tiny test timeouts).
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest pause after failed passes.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A node that was just marked unhealthy.
#[derive(Debug, Clone)]
pub struct MarkedNode {
    pub id: Uuid,
    pub name: String,
    pub last_heartbeat_at: Option<OffsetDateTime>,
}

/// How often the worker runs for a given heartbeat timeout.
pub fn interval_for(timeout: Duration) -> Duration {
    (timeout / 4).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

pub async fn run(pool: Pool, timeout: Duration, mut shutdown: watch::Receiver<bool>) {
    let interval = interval_for(timeout);
    tracing::info!(
        worker = "node_health",
        interval_ms = interval.as_millis(),
        "worker started"
    );
    let mut pause = interval;
    loop {
        match pass(&pool, timeout).await {
            Ok(()) => pause = interval,
            Err(err) => {
                tracing::warn!(worker = "node_health", error = %err, "pass failed");
                pause = (pause * 2).min(MAX_BACKOFF);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(worker = "node_health", "worker stopped");
}

/// One pass: mark overdue nodes, then refresh the gauge.
async fn pass(pool: &Pool, timeout: Duration) -> Result<(), DbError> {
    for node in mark_overdue_unhealthy(pool, timeout).await? {
        tracing::warn!(
            worker = "node_health",
            node_id = %node.id,
            node = %node.name,
            last_heartbeat_at = ?node.last_heartbeat_at,
            timeout_secs = timeout.as_secs_f64(),
            "node unhealthy: heartbeats stopped"
        );
    }
    for (status, count) in count_by_status(pool).await? {
        metrics::gauge!(NODES_GAUGE, "status" => status.as_str()).set(count as f64);
    }
    Ok(())
}

/// Marks every healthy node whose last heartbeat is older than `timeout` unhealthy; returns
/// the nodes it marked (none when run again right away).
pub async fn mark_overdue_unhealthy(pool: &Pool, timeout: Duration) -> Result<Vec<MarkedNode>, DbError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query(
            "UPDATE nodes SET status = 'unhealthy', status_changed_at = now()
             WHERE status = 'healthy' AND last_heartbeat_at < now() - make_interval(secs => $1)
             RETURNING id, name, last_heartbeat_at",
            &[&timeout.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| MarkedNode {
            id: row.get(0),
            name: row.get(1),
            last_heartbeat_at: row.get(2),
        })
        .collect())
}

/// The number of nodes in each status (zero included).
pub async fn count_by_status(pool: &Pool) -> Result<Vec<(NodeStatus, i64)>, DbError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query("SELECT status, count(*) FROM nodes GROUP BY status", &[])
        .await?;
    Ok(NodeStatus::ALL
        .iter()
        .map(|&status| {
            let count = rows
                .iter()
                .find(|row| row.get::<_, &str>(0) == status.as_str())
                .map_or(0, |row| row.get::<_, i64>(1));
            (status, count)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_a_quarter_of_the_timeout_within_bounds() {
        assert_eq!(interval_for(Duration::from_secs(20)), Duration::from_secs(5));
        assert_eq!(interval_for(Duration::from_secs(60)), Duration::from_secs(5));
        assert_eq!(interval_for(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(interval_for(Duration::from_millis(100)), MIN_INTERVAL);
    }
}
