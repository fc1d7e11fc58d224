//! Converging one pod: place it if it has no node, then send its node the job matching the
//! desired state.
//!
//! *Placement.* Choosing a node reads a snapshot of the fleet — every node with what its
//! pods reserve — that the process keeps in a [`FleetIndex`] for up to a second, with the
//! reservations it commits mirrored into it, instead of reading the whole fleet from Postgres
//! for every pod. The choice is then checked against Postgres under the node's row lock: the
//! node is locked (`FOR UPDATE`), and a statement that starts after the lock is held sums
//! what the node's pods reserve and assigns the pod only if it still fits, so a stale snapshot
//! can cost another choice but never over-commits a node, with one scheduler or several. A
//! node that lost its room to another placement is corrected in the snapshot with what the
//! lock showed (and stays in it, so an unschedulable answer still names it); a node that is
//! gone, unhealthy or relabelled makes the snapshot be read again. A pod is declared
//! unschedulable only against a snapshot read while placing it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use deadpool_postgres::GenericClient;
use instapod_common::node::{Capacity, NodeJob, node_queue};
use uuid::Uuid;

use super::Context;
use super::spec::{POD_COLUMNS, PodRow};
use super::transfer::{self, Transfer};
use crate::{FleetIndex, NodeView, Placement, PlacementRequest, Strategy, Unschedulable};

/// How long a fleet snapshot chooses nodes before it is read again: nodes that joined and room
/// that deletes freed show up within this time (and at once for a pod that would otherwise be
/// unschedulable).
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// Choices checked under a node's lock before converging fails (and the job is retried).
const MAX_CHOICES: usize = 16;

/// A fleet snapshot and when it was read.
struct Snapshot {
    index: FleetIndex,
    read_at: Instant,
}

/// What the process knows for placing pods in one database.
#[derive(Default)]
struct Placer {
    snapshot: Option<Snapshot>,
    /// Nodes this process is assigning a pod to right now (the node's row is locked or about to
    /// be), with how many assignments: other placements prefer other nodes meanwhile.
    in_flight: HashMap<Uuid, usize>,
}

impl Snapshot {
    /// Makes the snapshot's view of `node` reserve exactly `used` (what its row lock showed).
    fn set_reserved(&mut self, node: Uuid, used: Capacity) {
        let seen = self
            .index
            .nodes()
            .iter()
            .find(|view| view.id == node)
            .map(|view| view.reserved);
        if let Some(seen) = seen {
            let _ = self.index.release(node, seen);
            let _ = self.index.reserve(node, used);
        }
    }

    /// The snapshot's choice for `request`, preferring nodes without an assignment of this
    /// process in flight (one would only wait for that assignment's lock); such a node is
    /// chosen when nothing else fits.
    #[allow(
        clippy::result_large_err,
        reason = "the same result as `FleetIndex::place`, passed on as it is"
    )]
    fn choose(
        &mut self,
        in_flight: &HashMap<Uuid, usize>,
        request: &PlacementRequest,
        strategy: Strategy,
    ) -> Result<Placement, Unschedulable> {
        let busy: Vec<(Uuid, Capacity)> = self
            .index
            .nodes()
            .iter()
            .filter(|node| in_flight.contains_key(&node.id))
            .map(|node| (node.id, node.free()))
            .collect();
        // Make them look full for this one choice, then exactly as they were.
        for (id, free) in &busy {
            let _ = self.index.reserve(*id, *free);
        }
        let avoiding = self.index.place(request, strategy);
        for (id, free) in &busy {
            let _ = self.index.release(*id, *free);
        }
        match avoiding {
            Err(_) if !busy.is_empty() => self.index.place(request, strategy),
            chosen => chosen,
        }
    }
}

/// Per database URL (a scheduler process has one database).
static PLACERS: LazyLock<Mutex<HashMap<String, Placer>>> = LazyLock::new(Default::default);

/// Runs `f` on the placer of `key`'s database, under its lock (never held across an `.await`).
fn with_placer<R>(key: &str, f: impl FnOnce(&mut Placer) -> R) -> R {
    let mut placers = PLACERS.lock().unwrap_or_else(PoisonError::into_inner);
    let placer = match placers.get_mut(key) {
        Some(placer) => placer,
        None => placers.entry(key.to_string()).or_default(),
    };
    f(placer)
}

/// An assignment in flight on a node; counted down when dropped, whatever happened.
pub(super) struct InFlight {
    key: String,
    node: Uuid,
}

impl InFlight {
    fn start(placer: &mut Placer, key: &str, node: Uuid) -> InFlight {
        *placer.in_flight.entry(node).or_default() += 1;
        InFlight {
            key: key.to_string(),
            node,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        with_placer(&self.key, |placer| {
            if let Some(count) = placer.in_flight.get_mut(&self.node) {
                *count -= 1;
                if *count == 0 {
                    placer.in_flight.remove(&self.node);
                }
            }
        });
    }
}

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
        // The server's message, not only "db error".
        match err.as_db_error() {
            Some(db) => ConvergeError::Db(format!("{}: {}", db.code().code(), db.message())),
            None => ConvergeError::Db(err.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ConvergeError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        ConvergeError::Db(err.to_string())
    }
}

/// Sends `job` to node `node_id`'s queue.
pub async fn send(ctx: &Context, node_id: Uuid, job: NodeJob) -> Result<(), ConvergeError> {
    let mut storage = RedisStorage::<NodeJob>::new(ctx.redis.clone())
        .with_config(instapod_common::queue::config(node_queue(node_id)));
    let operation = job.operation();
    storage
        .push(job)
        .await
        .map_err(|err| ConvergeError::Queue(err.to_string()))?;
    super::metrics::node_jobs_sent(operation, 1);
    Ok(())
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

/// The fleet with what each node has committed (pods placed on it that are not gone): one
/// pass over `nodes` and `pods`, so it is read per snapshot, not per placement.
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

pub(super) fn capacity(cpu: i64, memory: i64, disk: i64) -> Capacity {
    Capacity {
        cpu_millis: u64::try_from(cpu).unwrap_or(0),
        memory_bytes: u64::try_from(memory).unwrap_or(0),
        disk_bytes: u64::try_from(disk).unwrap_or(0),
    }
}

/// Reads the fleet and makes it the snapshot placement chooses from.
pub(super) async fn refresh(ctx: &Context, client: &impl GenericClient) -> Result<(), ConvergeError> {
    let nodes = fleet(client).await?;
    let index = FleetIndex::new(&nodes);
    let snapshot = Snapshot {
        index,
        read_at: Instant::now(),
    };
    with_placer(ctx.config.database_url.expose(), |placer| {
        placer.snapshot = Some(snapshot)
    });
    Ok(())
}

/// Whether the process has a snapshot younger than [`SNAPSHOT_MAX_AGE`].
pub(super) fn snapshot_is_fresh(ctx: &Context) -> bool {
    with_placer(ctx.config.database_url.expose(), |placer| {
        placer
            .snapshot
            .as_ref()
            .is_some_and(|snapshot| snapshot.read_at.elapsed() < SNAPSHOT_MAX_AGE)
    })
}

/// For batches ([`super::batch`]): the snapshot's node for `request`, reserved in the snapshot
/// and marked in flight; `None` when the snapshot has no room (or there is no snapshot). Nodes
/// in flight are not avoided: a batch's pods share its node locks.
pub(super) fn choose_and_reserve(ctx: &Context, request: &PlacementRequest) -> Option<(Uuid, InFlight)> {
    let key = ctx.config.database_url.expose();
    with_placer(key, |placer| {
        let snapshot = placer.snapshot.as_mut()?;
        let placement = snapshot.index.place(request, ctx.config.strategy).ok()?;
        snapshot.index.reserve(placement.node_id, request.capacity()).ok()?;
        Some((placement.node_id, InFlight::start(placer, key, placement.node_id)))
    })
}

/// For batches: choices that failed their check under the node's lock, as (node, what was
/// reserved for the pod in the snapshot, what the node's pods reserve according to the lock —
/// `None` when the node no longer qualifies). The snapshot takes the lock's figure, or is
/// read again soon when the node changed.
pub(super) fn forget_choices(ctx: &Context, refused: &[(Uuid, Capacity, Option<Capacity>)]) {
    if refused.is_empty() {
        return;
    }
    with_placer(ctx.config.database_url.expose(), |placer| {
        let Some(snapshot) = placer.snapshot.as_mut() else {
            return;
        };
        for (node, reserved, used) in refused {
            match used {
                Some(used) => snapshot.set_reserved(*node, *used),
                None => {
                    let _ = snapshot.index.release(*node, *reserved);
                    // Gone, unhealthy or relabelled: read the fleet again before the next choice.
                    placer.snapshot = None;
                    return;
                }
            }
        }
    });
}

/// Sends node `node_id` several jobs with one push.
pub(super) async fn send_all(ctx: &Context, node_id: Uuid, jobs: Vec<NodeJob>) -> Result<(), ConvergeError> {
    let mut storage = RedisStorage::<NodeJob>::new(ctx.redis.clone())
        .with_config(instapod_common::queue::config(node_queue(node_id)));
    let mut operations: Vec<&'static str> = jobs.iter().map(NodeJob::operation).collect();
    storage
        .push_bulk(jobs)
        .await
        .map_err(|err| ConvergeError::Queue(err.to_string()))?;
    operations.sort_unstable();
    for group in operations.chunk_by(|a, b| a == b) {
        super::metrics::node_jobs_sent(group[0], group.len());
    }
    Ok(())
}

/// Where placing a pod ended.
enum Placed {
    /// On this node (id, name); the pod's row and its `scheduled` event are written in the
    /// transaction, not yet committed. The node counts as in flight until this is dropped
    /// (after the commit releases its row lock).
    Node(Uuid, String, InFlight),
    /// Nowhere, according to a snapshot read while placing: why, and the `reason` label.
    Unschedulable(String, &'static str),
}

/// Chooses a node for `pod` from the snapshot and assigns it under the node's row lock (see
/// the module documentation). The pod's row is locked by `tx`.
async fn place_pod(
    ctx: &Context,
    tx: &deadpool_postgres::Transaction<'_>,
    pod: &PodRow,
    request: &PlacementRequest,
) -> Result<Placed, ConvergeError> {
    let key = ctx.config.database_url.expose();
    // Whether the snapshot was read while placing this pod.
    let mut fresh = false;
    for _ in 0..MAX_CHOICES {
        let choice = with_placer(key, |placer| {
            let snapshot = placer
                .snapshot
                .as_mut()
                .filter(|snapshot| fresh || snapshot.read_at.elapsed() < SNAPSHOT_MAX_AGE)?;
            let chosen = snapshot.choose(&placer.in_flight, request, ctx.config.strategy);
            Some(chosen.map(|placement| {
                let in_flight = InFlight::start(placer, key, placement.node_id);
                (placement, in_flight)
            }))
        });
        let (placement, in_flight) = match choice {
            Some(Ok(chosen)) => chosen,
            Some(Err(unschedulable)) if fresh => {
                let reason = super::metrics::failure_reason(&unschedulable);
                return Ok(Placed::Unschedulable(unschedulable.to_string(), reason));
            }
            // No snapshot, an old one, or one that says no without having been read now.
            _ => {
                refresh(ctx, tx).await?;
                fresh = true;
                continue;
            }
        };
        match assign(tx, pod, request, placement.node_id).await? {
            Assigned::Yes(name) => {
                // Mirror the reservation (before the commit: if that fails, the snapshot only
                // over-counts until it is read again).
                with_placer(key, |placer| {
                    if let Some(snapshot) = placer.snapshot.as_mut() {
                        let _ = snapshot.index.reserve(placement.node_id, request.capacity());
                    }
                });
                return Ok(Placed::Node(placement.node_id, name, in_flight));
            }
            Assigned::Full(used) => {
                // Another placement (of this process or another scheduler) took the room the
                // snapshot saw: correct the node's view with what the lock showed, choose again.
                with_placer(key, |placer| {
                    if let Some(snapshot) = placer.snapshot.as_mut() {
                        snapshot.set_reserved(placement.node_id, used);
                    }
                });
            }
            Assigned::Unqualified => {
                // Gone, unhealthy or relabelled since the snapshot was read: read it again.
                refresh(ctx, tx).await?;
                fresh = true;
            }
        }
    }
    super::metrics::placement_failed("contention");
    Err(ConvergeError::Db(format!(
        "pod {}: {MAX_CHOICES} nodes chosen in a row lost their room before they could be locked",
        pod.id
    )))
}

/// Whether a node, as its locked row shows it, may take `request` (health, region, labels,
/// not the excluded node); room is checked separately.
pub(super) fn qualifies(
    request: &PlacementRequest,
    node_id: Uuid,
    healthy: bool,
    region: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    healthy
        && request.region.as_deref().is_none_or(|wanted| wanted == region)
        && request
            .required_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
        && request.exclude_node != Some(node_id)
}

/// What [`assign`] did.
enum Assigned {
    /// The pod is assigned to the node (named here), not yet committed.
    Yes(String),
    /// The node lacks the room; what its pods reserve, read under its lock.
    Full(Capacity),
    /// The node is gone, unhealthy, or no longer meets the request's constraints.
    Unqualified,
}

/// Locks node `node_id`'s row and, if it still qualifies and has the room, assigns the pod to
/// it and writes the `scheduled` event.
async fn assign(
    tx: &deadpool_postgres::Transaction<'_>,
    pod: &PodRow,
    request: &PlacementRequest,
    node_id: Uuid,
) -> Result<Assigned, ConvergeError> {
    let lock = tx
        .prepare_cached(
            "SELECT name, region, labels, status = 'healthy', COALESCE(allocatable_cpu_millis, 0),
                    COALESCE(allocatable_memory_bytes, 0), COALESCE(allocatable_disk_bytes, 0)
             FROM nodes WHERE id = $1 FOR UPDATE",
        )
        .await?;
    let Some(node) = tx.query_opt(&lock, &[&node_id]).await? else {
        return Ok(Assigned::Unqualified);
    };
    let (name, region, labels, healthy): (String, String, serde_json::Value, bool) =
        (node.get(0), node.get(1), node.get(2), node.get(3));
    let (cpu, memory, disk): (i64, i64, i64) = (node.get(4), node.get(5), node.get(6));
    let labels: BTreeMap<String, String> = serde_json::from_value(labels).unwrap_or_default();
    if !qualifies(request, node_id, healthy, &region, &labels) {
        return Ok(Assigned::Unqualified);
    }
    // This statement starts after the lock is held, so it sees every placement committed on
    // the node; its parts share one snapshot.
    let assign = tx
        .prepare_cached(
            "WITH used AS (
                 SELECT COALESCE(sum(cpu_millis), 0)::int8 AS cpu, COALESCE(sum(memory_bytes), 0)::int8 AS memory,
                        COALESCE(sum(disk_bytes), 0)::int8 AS disk
                 FROM pods WHERE node_id = $2),
             placed AS (
                 UPDATE pods SET node_id = $2, state = 'scheduled', reason = NULL, updated_at = now()
                 WHERE id = $1
                   AND EXISTS (SELECT 1 FROM used
                               WHERE cpu + $3::int8 <= $6::int8 AND memory + $4::int8 <= $7::int8
                                 AND disk + $5::int8 <= $8::int8)
                 RETURNING id),
             scheduled AS (
                 INSERT INTO pod_events (pod_id, kind, state, message)
                 SELECT id, 'scheduled', 'scheduled', $9 FROM placed
                 RETURNING pod_id)
             SELECT EXISTS (SELECT 1 FROM scheduled), cpu, memory, disk FROM used",
        )
        .await?;
    let message = format!("placed on node {name}");
    let row = tx
        .query_one(
            &assign,
            &[
                &pod.id,
                &node_id,
                &i64::from(pod.cpu_millis),
                &pod.memory_bytes,
                &pod.disk_bytes,
                &cpu,
                &memory,
                &disk,
                &message,
            ],
        )
        .await?;
    if row.get::<_, bool>(0) {
        return Ok(Assigned::Yes(name));
    }
    Ok(Assigned::Full(capacity(row.get(1), row.get(2), row.get(3))))
}

/// Brings pod `pod_id` one step towards its desired state.
pub async fn converge(ctx: &Context, pod_id: Uuid) -> Result<(), ConvergeError> {
    let mut client = ctx.db.get().await?;
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached(&format!(
            "SELECT {POD_COLUMNS}, EXISTS (SELECT 1 FROM volume_transfers t WHERE t.pod_id = pods.id)
             FROM pods WHERE id = $1 FOR UPDATE"
        ))
        .await?;
    let Some(row) = tx.query_opt(&lock, &[&pod_id]).await? else {
        return Ok(());
    };
    let pod = PodRow::from_row(&row);
    // A clone or a move still copying its volume (read only when there is one).
    let transfer: Option<Transfer> = if row.get::<_, bool>(19) {
        transfer::load(&tx, pod.id).await?
    } else {
        None
    };
    if pod.desired == "running"
        && let Some(why) = transfer.as_ref().and_then(Transfer::impossible)
    {
        if pod.state != "failed" {
            let message = format!("cannot copy the volume: {why}");
            tx.execute(
                "UPDATE pods SET state = 'failed', reason = $2, updated_at = now() WHERE id = $1",
                &[&pod.id, &message],
            )
            .await?;
            event(&tx, pod.id, "failure", Some("failed"), &message).await?;
        }
        tx.commit().await?;
        return Ok(());
    }
    match (pod.desired.as_str(), pod.node_id) {
        ("deleted", None) => {
            tx.execute("DELETE FROM pods WHERE id = $1", &[&pod.id]).await?;
            tx.commit().await?;
        }
        ("deleted", Some(node)) => {
            tx.commit().await?;
            // A move that never finished: the old node still holds the pod's stopped copy.
            if let Some(moving) = transfer.as_ref().filter(|t| t.is_move && t.source_node_id != node) {
                send(
                    ctx,
                    moving.source_node_id,
                    NodeJob::Delete {
                        pod_id: pod.id,
                        generation: pod.generation,
                        retain_volume: false,
                    },
                )
                .await?;
            }
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
            let mut spec = pod.spec();
            if let Some(transfer) = &transfer {
                transfer::prepare(ctx, transfer, pod.id, &mut spec).await?;
            }
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
            let started = std::time::Instant::now();
            match place_pod(ctx, &tx, &pod, &request).await? {
                Placed::Node(node, name, in_flight) => {
                    tx.commit().await?;
                    drop(in_flight);
                    super::metrics::placed("single", 1, started.elapsed());
                    tracing::debug!(pod = %pod.id, node = %name, "placed");
                    let mut spec = pod.spec();
                    if let Some(transfer) = &transfer {
                        transfer::prepare(ctx, transfer, pod.id, &mut spec).await?;
                    }
                    send(ctx, node, NodeJob::EnsureRunning { spec }).await?;
                }
                Placed::Unschedulable(why, reason) => {
                    super::metrics::placement_failed(reason);
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
