//! Placing pods in batches: the pod jobs being handled at the same moment hand their pod to
//! one task, which places all of them in one transaction.
//!
//! *Why.* Placing one pod per transaction costs Postgres a transaction, three locking
//! statements and a commit per pod, and the scheduler as many round trips: on two cores that
//! capped placement at about 1,400 pods/s. A batch pays that once for up to [`MAX_BATCH`]
//! pods. Nothing waits to fill a batch: the task takes what has arrived while the previous
//! batch ran, so a lone pod is placed at once.
//!
//! *How (one transaction).* (1) The batch's pods that need a node — no node, desired
//! `running`, no volume copy — are locked (`FOR UPDATE SKIP LOCKED`: a pod another job is
//! converging is left to it). (2) Each is given a node from the fleet snapshot, the snapshot
//! mirroring each choice so the next pod sees it. (3) The chosen nodes are locked in id order
//! (no deadlock between batches of several schedulers), and one statement started after the
//! locks sums what each node's pods reserve. (4) Every choice is checked against those sums
//! and the nodes' current health, region and labels; the pods that fit are assigned, with
//! their `scheduled` events, in one statement. (5) Commit, then each node gets its pods'
//! `EnsureRunning` jobs.
//!
//! *Invariants.* The over-commit rule of [`super::converge`] holds: a pod is assigned only if
//! it fits under the node's lock, counting what the batch itself assigns to the node. Every
//! pod the batch does not place — not in need of a node, locked by another job, no room in
//! the snapshot, or a choice that failed the check — is answered [`Batched::NotPlaced`], and
//! its job converges it alone (with fresh reads and the unschedulable event).

use std::collections::{BTreeMap, HashMap};

use instapod_common::node::{Capacity, NodeJob};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::Context;
use super::converge::{self, ConvergeError, InFlight};
use super::spec::{POD_COLUMNS, PodRow};
use crate::PlacementRequest;

/// Most pods placed in one transaction.
pub const MAX_BATCH: usize = 64;

/// What the batch did with a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batched {
    /// Placed and committed; its node has been sent the job.
    Placed,
    /// Left alone: converge it on its own.
    NotPlaced,
}

struct Request {
    pod_id: Uuid,
    reply: oneshot::Sender<Result<Batched, String>>,
}

/// The handle jobs use to reach the batching task.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Request>,
}

impl Batcher {
    /// Starts the batching task.
    pub fn start(ctx: Context) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(ctx, rx));
        Batcher { tx }
    }

    /// Places `pod_id` with whatever else is waiting, or says it was not placed.
    pub async fn place(&self, pod_id: Uuid) -> Result<Batched, ConvergeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { pod_id, reply })
            .map_err(|_| ConvergeError::Db("the placement task stopped".into()))?;
        answer
            .await
            .map_err(|_| ConvergeError::Db("the placement task stopped".into()))?
            .map_err(ConvergeError::Db)
    }
}

async fn run(ctx: Context, mut rx: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut requests = vec![first];
        while requests.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        let ids: Vec<Uuid> = requests.iter().map(|r| r.pod_id).collect();
        match place_batch(&ctx, &ids).await {
            Ok(placed) => {
                for request in requests {
                    let outcome = if placed.contains_key(&request.pod_id) {
                        Batched::Placed
                    } else {
                        Batched::NotPlaced
                    };
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for request in requests {
                    let _ = request.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

/// A pod of the batch and the node chosen for it.
struct Choice {
    pod: PodRow,
    request: PlacementRequest,
    node: Uuid,
    in_flight: InFlight,
}

/// Places what it can of `ids`; returns the placed pods with their nodes.
async fn place_batch(ctx: &Context, ids: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, ConvergeError> {
    let started = std::time::Instant::now();
    let mut client = ctx.db.get().await?;
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached(&format!(
            "SELECT {POD_COLUMNS} FROM pods
             WHERE id = ANY($1) AND node_id IS NULL AND desired_state = 'running'
               AND NOT EXISTS (SELECT 1 FROM volume_transfers t WHERE t.pod_id = pods.id)
             ORDER BY id FOR UPDATE SKIP LOCKED"
        ))
        .await?;
    let pods: Vec<PodRow> = tx.query(&lock, &[&ids]).await?.iter().map(PodRow::from_row).collect();
    if pods.is_empty() {
        tx.commit().await?;
        return Ok(HashMap::new());
    }

    // (2) Choices from the snapshot (read first when it is missing or old).
    if !converge::snapshot_is_fresh(ctx) {
        converge::refresh(ctx, &tx).await?;
    }
    let mut choices = Vec::with_capacity(pods.len());
    for pod in pods {
        let request = PlacementRequest {
            region: Some(pod.region.clone()),
            ..PlacementRequest::for_resources(&pod.resources())
        };
        if let Some((node, in_flight)) = converge::choose_and_reserve(ctx, &request) {
            choices.push(Choice {
                pod,
                request,
                node,
                in_flight,
            });
        }
    }
    if choices.is_empty() {
        tx.commit().await?;
        return Ok(HashMap::new());
    }

    // (3) The chosen nodes, locked in id order, then what their pods reserve.
    let mut nodes: Vec<Uuid> = choices.iter().map(|c| c.node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let lock_nodes = tx
        .prepare_cached(
            "SELECT id, name, region, labels, status = 'healthy', COALESCE(allocatable_cpu_millis, 0),
                    COALESCE(allocatable_memory_bytes, 0), COALESCE(allocatable_disk_bytes, 0)
             FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .await?;
    let locked = tx.query(&lock_nodes, &[&nodes]).await?;
    let sums = tx
        .prepare_cached(
            "SELECT node_id, COALESCE(sum(cpu_millis), 0)::int8, COALESCE(sum(memory_bytes), 0)::int8,
                    COALESCE(sum(disk_bytes), 0)::int8
             FROM pods WHERE node_id = ANY($1) GROUP BY node_id",
        )
        .await?;
    let used: HashMap<Uuid, Capacity> = tx
        .query(&sums, &[&nodes])
        .await?
        .iter()
        .map(|r| (r.get(0), converge::capacity(r.get(1), r.get(2), r.get(3))))
        .collect();
    struct Locked {
        name: String,
        region: String,
        labels: BTreeMap<String, String>,
        healthy: bool,
        allocatable: Capacity,
        used: Capacity,
    }
    let mut locked: HashMap<Uuid, Locked> = locked
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let labels: serde_json::Value = r.get(3);
            let node = Locked {
                name: r.get(1),
                region: r.get(2),
                labels: serde_json::from_value(labels).unwrap_or_default(),
                healthy: r.get(4),
                allocatable: converge::capacity(r.get(5), r.get(6), r.get(7)),
                used: used.get(&id).copied().unwrap_or_default(),
            };
            (id, node)
        })
        .collect();

    // (4) Check each choice under the locks, counting the batch's own assignments.
    let mut placed_pods = Vec::new();
    let mut placed_nodes = Vec::new();
    let mut messages = Vec::new();
    let mut assigned: Vec<(PodRow, Uuid)> = Vec::new();
    let mut refused: Vec<(Uuid, Capacity, Option<Capacity>)> = Vec::new();
    // Other placements of this process avoid the batch's nodes until it has committed.
    let mut in_flight = Vec::with_capacity(choices.len());
    for choice in choices {
        let Choice {
            pod,
            request,
            node: node_id,
            in_flight: guard,
        } = choice;
        in_flight.push(guard);
        let need = request.capacity();
        let Some(node) = locked.get_mut(&node_id) else {
            refused.push((node_id, need, None));
            continue;
        };
        let qualifies = converge::qualifies(&request, node_id, node.healthy, &node.region, &node.labels);
        let after = Capacity {
            cpu_millis: node.used.cpu_millis + need.cpu_millis,
            memory_bytes: node.used.memory_bytes + need.memory_bytes,
            disk_bytes: node.used.disk_bytes + need.disk_bytes,
        };
        let fits = after.cpu_millis <= node.allocatable.cpu_millis
            && after.memory_bytes <= node.allocatable.memory_bytes
            && after.disk_bytes <= node.allocatable.disk_bytes;
        if !(qualifies && fits) {
            refused.push((node_id, need, qualifies.then_some(node.used)));
            continue;
        }
        node.used = after;
        placed_pods.push(pod.id);
        placed_nodes.push(node_id);
        messages.push(format!("placed on node {}", node.name));
        assigned.push((pod, node_id));
    }
    // Undo the snapshot's mirror of refused choices (a node the lock showed fuller, or one that
    // no longer qualifies, is read again with the next snapshot).
    converge::forget_choices(ctx, &refused);
    if assigned.is_empty() {
        tx.commit().await?;
        return Ok(HashMap::new());
    }
    let write = tx
        .prepare_cached(
            "WITH a AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS a(pod_id, node_id, message)),
             placed AS (
                 UPDATE pods p SET node_id = a.node_id, state = 'scheduled', reason = NULL, updated_at = now()
                 FROM a WHERE p.id = a.pod_id
                 RETURNING p.id)
             INSERT INTO pod_events (pod_id, kind, state, message)
             SELECT a.pod_id, 'scheduled', 'scheduled', a.message FROM a JOIN placed ON placed.id = a.pod_id",
        )
        .await?;
    tx.execute(&write, &[&placed_pods, &placed_nodes, &messages]).await?;
    tx.commit().await?;
    drop(in_flight);
    super::metrics::placed("batch", assigned.len(), started.elapsed());

    // (5) The nodes' jobs.
    let mut by_node: HashMap<Uuid, Vec<NodeJob>> = HashMap::new();
    for (pod, node) in &assigned {
        by_node
            .entry(*node)
            .or_default()
            .push(NodeJob::EnsureRunning { spec: pod.spec() });
    }
    for (node, jobs) in by_node {
        converge::send_all(ctx, node, jobs).await?;
    }
    tracing::debug!(pods = assigned.len(), "placed a batch");
    Ok(assigned.into_iter().map(|(pod, node)| (pod.id, node)).collect())
}
