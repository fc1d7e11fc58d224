//! Converging one pod: place it if it has no node, then send its node the job matching the
//! desired state.

use apalis::prelude::TaskSink;
use apalis_redis::{Config as QueueConfig, RedisStorage};
use deadpool_postgres::GenericClient;
use instapod_common::node::{Capacity, NodeJob, node_queue};
use uuid::Uuid;

use super::Context;
use super::spec::{POD_COLUMNS, PodRow};
use crate::{NodeView, PlacementRequest, place};

/// Why converging failed (retried by the job system).
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    #[error("database: {0}")]
    Db(String),
    #[error("queue: {0}")]
    Queue(String),
}

impl From<tokio_postgres::Error> for ConvergeError {
    fn from(err: tokio_postgres::Error) -> Self {
        ConvergeError::Db(err.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for ConvergeError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        ConvergeError::Db(err.to_string())
    }
}

/// Sends `job` to node `node_id`'s queue.
pub async fn send(ctx: &Context, node_id: Uuid, job: NodeJob) -> Result<(), ConvergeError> {
    let mut storage =
        RedisStorage::<NodeJob>::new(ctx.redis.clone()).with_config(QueueConfig::default().queue(node_queue(node_id)));
    storage
        .push(job)
        .await
        .map_err(|err| ConvergeError::Queue(err.to_string()))
}

async fn event(
    client: &impl GenericClient,
    pod: Uuid,
    kind: &str,
    state: Option<&str>,
    message: &str,
) -> Result<(), ConvergeError> {
    client
        .execute(
            "INSERT INTO pod_events (pod_id, kind, state, message) VALUES ($1, $2, $3, $4)",
            &[&pod, &kind, &state, &message],
        )
        .await?;
    Ok(())
}

/// The fleet with what each node has committed (pods placed on it that are not gone).
async fn fleet(client: &impl GenericClient) -> Result<Vec<NodeView>, ConvergeError> {
    let rows = client
        .query(
            "SELECT n.id, n.name, n.region, n.labels, n.status = 'healthy',
                    COALESCE(n.allocatable_cpu_millis, 0), COALESCE(n.allocatable_memory_bytes, 0),
                    COALESCE(n.allocatable_disk_bytes, 0),
                    COALESCE(sum(p.cpu_millis), 0)::int8, COALESCE(sum(p.memory_bytes), 0)::int8,
                    COALESCE(sum(p.disk_bytes), 0)::int8
             FROM nodes n LEFT JOIN pods p ON p.node_id = n.id
             GROUP BY n.id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let labels: serde_json::Value = r.get(3);
            NodeView {
                id: r.get(0),
                name: r.get(1),
                region: r.get(2),
                labels: serde_json::from_value(labels).unwrap_or_default(),
                healthy: r.get(4),
                allocatable: capacity(r.get(5), r.get(6), r.get(7)),
                reserved: capacity(r.get(8), r.get(9), r.get(10)),
            }
        })
        .collect())
}

fn capacity(cpu: i64, memory: i64, disk: i64) -> Capacity {
    Capacity {
        cpu_millis: u64::try_from(cpu).unwrap_or(0),
        memory_bytes: u64::try_from(memory).unwrap_or(0),
        disk_bytes: u64::try_from(disk).unwrap_or(0),
    }
}

/// Brings pod `pod_id` one step towards its desired state.
pub async fn converge(ctx: &Context, pod_id: Uuid) -> Result<(), ConvergeError> {
    let mut client = ctx.db.get().await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            &format!("SELECT {POD_COLUMNS} FROM pods WHERE id = $1 FOR UPDATE"),
            &[&pod_id],
        )
        .await?
    else {
        return Ok(());
    };
    let pod = PodRow::from_row(&row);
    match (pod.desired.as_str(), pod.node_id) {
        ("deleted", None) => {
            tx.execute("DELETE FROM pods WHERE id = $1", &[&pod.id]).await?;
            tx.commit().await?;
        }
        ("deleted", Some(node)) => {
            tx.commit().await?;
            send(
                ctx,
                node,
                NodeJob::Delete {
                    pod_id: pod.id,
                    generation: pod.generation,
                    retain_volume: false,
                },
            )
            .await?;
        }
        ("stopped", None) => {
            if pod.state != "stopped" {
                tx.execute(
                    "UPDATE pods SET state = 'stopped', updated_at = now() WHERE id = $1",
                    &[&pod.id],
                )
                .await?;
                event(&tx, pod.id, "state", Some("stopped"), "stopped").await?;
            }
            tx.commit().await?;
        }
        ("stopped", Some(node)) => {
            tx.commit().await?;
            send(
                ctx,
                node,
                NodeJob::Stop {
                    pod_id: pod.id,
                    generation: pod.generation,
                    grace_secs: ctx.config.stop_grace_secs,
                },
            )
            .await?;
        }
        ("running", Some(node)) if pod.resize_requested && pod.state == "running" => {
            // Live: the node changes the running task's limits (and its stored spec).
            tx.execute("UPDATE pods SET resize_requested = false WHERE id = $1", &[&pod.id])
                .await?;
            tx.commit().await?;
            send(
                ctx,
                node,
                NodeJob::Resize {
                    pod_id: pod.id,
                    generation: pod.generation,
                    resources: pod.resources(),
                },
            )
            .await?;
        }
        (_, Some(node)) => {
            if pod.restart_requested {
                // Cleared here: a retried job sends an ensure, not a second restart.
                tx.execute("UPDATE pods SET restart_requested = false WHERE id = $1", &[&pod.id])
                    .await?;
            }
            tx.commit().await?;
            let spec = pod.spec();
            let job = if pod.restart_requested {
                NodeJob::Restart { spec }
            } else {
                NodeJob::EnsureRunning { spec }
            };
            send(ctx, node, job).await?;
        }
        (_, None) => {
            let request = PlacementRequest {
                region: Some(pod.region.clone()),
                ..PlacementRequest::for_resources(&pod.resources())
            };
            let mut nodes = fleet(&tx).await?;
            let mut attempts = 0;
            let placed = loop {
                match place(&nodes, &request, ctx.config.strategy) {
                    Err(unschedulable) => break Err(unschedulable.to_string()),
                    Ok(placement) => {
                        // Lock the node, then re-check its committed capacity under the lock.
                        let locked = tx
                            .query_one(
                                "SELECT n.name, COALESCE(n.allocatable_cpu_millis, 0), COALESCE(n.allocatable_memory_bytes, 0),
                                        COALESCE(n.allocatable_disk_bytes, 0), n.status = 'healthy'
                                 FROM nodes n WHERE n.id = $1 FOR UPDATE",
                                &[&placement.node_id],
                            )
                            .await?;
                        let used = tx
                            .query_one(
                                "SELECT COALESCE(sum(cpu_millis), 0)::int8, COALESCE(sum(memory_bytes), 0)::int8,
                                        COALESCE(sum(disk_bytes), 0)::int8
                                 FROM pods WHERE node_id = $1",
                                &[&placement.node_id],
                            )
                            .await?;
                        let (name, cpu, memory, disk, healthy): (String, i64, i64, i64, bool) = (
                            locked.get(0),
                            locked.get(1),
                            locked.get(2),
                            locked.get(3),
                            locked.get(4),
                        );
                        let fits = healthy
                            && used.get::<_, i64>(0) + i64::from(pod.cpu_millis) <= cpu
                            && used.get::<_, i64>(1) + pod.memory_bytes <= memory
                            && used.get::<_, i64>(2) + pod.disk_bytes <= disk;
                        if fits {
                            break Ok((placement.node_id, name));
                        }
                        // Another placement took that room: refresh the node's view with what the
                        // lock shows and choose again (an unschedulable answer then names it).
                        attempts += 1;
                        if let Some(view) = nodes.iter_mut().find(|n| n.id == placement.node_id) {
                            view.healthy = healthy;
                            view.reserved = capacity(used.get(0), used.get(1), used.get(2));
                        }
                        if attempts > 16 {
                            nodes.retain(|n| n.id != placement.node_id);
                        }
                    }
                }
            };
            match placed {
                Ok((node, name)) => {
                    tx.execute(
                        "UPDATE pods SET node_id = $2, state = 'scheduled', reason = NULL, updated_at = now()
                         WHERE id = $1",
                        &[&pod.id, &node],
                    )
                    .await?;
                    event(
                        &tx,
                        pod.id,
                        "scheduled",
                        Some("scheduled"),
                        &format!("placed on node {name}"),
                    )
                    .await?;
                    tx.commit().await?;
                    send(ctx, node, NodeJob::EnsureRunning { spec: pod.spec() }).await?;
                }
                Err(why) => {
                    let message = format!("unschedulable: {why}");
                    if pod.reason.as_deref() != Some(message.as_str()) {
                        tx.execute(
                            "UPDATE pods SET state = 'pending', reason = $2, updated_at = now() WHERE id = $1",
                            &[&pod.id, &message],
                        )
                        .await?;
                        event(&tx, pod.id, "unschedulable", Some("pending"), &message).await?;
                    } else {
                        tx.execute("UPDATE pods SET updated_at = now() WHERE id = $1", &[&pod.id])
                            .await?;
                    }
                    tx.commit().await?;
                }
            }
        }
    }
    Ok(())
}
