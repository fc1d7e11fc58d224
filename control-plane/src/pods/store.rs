//! Pods in Postgres: creation under the team's plan quota, reads scoped by team, user actions
//! through the state machine, events, and the node reports that move a pod's state.
//!
//! *Invariants.* Every read and write names the team in SQL (another team's pod is a 404). The
//! quota check and the insert run in one transaction holding the team's row lock, so concurrent
//! creates cannot exceed the plan. An action locks the pod's row, decides with
//! [`super::state::decide`], bumps the generation and writes an event in one transaction. A
//! report moves a pod only when it comes from the pod's node and is not older than the pod's
//! generation.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::state::{self, Action, Current, Decision};
use crate::db::{self, DbError, Pool};

/// A pod row with its node's name.
#[derive(Debug, Clone)]
pub struct PodRow {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: String,
    pub state: String,
    pub desired_state: String,
    pub reason: Option<String>,
    pub generation: i64,
    pub image: String,
    pub runtime_id: Option<String>,
    pub preset_id: Option<String>,
    pub plan_id: String,
    pub region: String,
    pub cpu_millis: i32,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub env: BTreeMap<String, String>,
    pub command: Option<Vec<String>>,
    pub http_port: Option<i32>,
    pub restart_policy: String,
    pub hostnames: Vec<String>,
    pub node_id: Option<Uuid>,
    pub node_name: Option<String>,
    pub ip: Option<String>,
    pub restart_requested: bool,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const SELECT: &str = "SELECT p.id, p.team_id, p.name, p.state, p.desired_state, p.reason, p.generation, p.image,
        p.runtime_id, p.preset_id, p.plan_id, p.region, p.cpu_millis, p.memory_bytes, p.disk_bytes, p.env,
        p.command, p.http_port, p.restart_policy, p.hostnames, p.node_id, n.name, p.ip, p.restart_requested,
        p.created_at, p.updated_at
    FROM pods p LEFT JOIN nodes n ON n.id = p.node_id";

fn row_to_pod(row: &tokio_postgres::Row) -> PodRow {
    let env: serde_json::Value = row.get(15);
    PodRow {
        id: row.get(0),
        team_id: row.get(1),
        name: row.get(2),
        state: row.get(3),
        desired_state: row.get(4),
        reason: row.get(5),
        generation: row.get(6),
        image: row.get(7),
        runtime_id: row.get(8),
        preset_id: row.get(9),
        plan_id: row.get(10),
        region: row.get(11),
        cpu_millis: row.get(12),
        memory_bytes: row.get(13),
        disk_bytes: row.get(14),
        env: serde_json::from_value(env).unwrap_or_default(),
        command: row.get(16),
        http_port: row.get(17),
        restart_policy: row.get(18),
        hostnames: row.get(19),
        node_id: row.get(20),
        node_name: row.get(21),
        ip: row.get(22),
        restart_requested: row.get(23),
        created_at: row.get(24),
        updated_at: row.get(25),
    }
}

/// What a new pod is made of (validated by the caller).
#[derive(Debug, Clone)]
pub struct NewPod {
    pub team_id: Uuid,
    pub created_by: Uuid,
    pub name: String,
    pub image: String,
    pub runtime_id: Option<String>,
    pub preset_id: Option<String>,
    pub plan_id: String,
    pub region: String,
    pub cpu_millis: i32,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub env: BTreeMap<String, String>,
    pub command: Option<Vec<String>>,
    pub http_port: Option<i32>,
    pub restart_policy: String,
    pub hostnames: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("a pod named {0:?} exists in this team")]
    NameTaken(String),
    #[error("{0}")]
    Quota(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for CreateError {
    fn from(err: tokio_postgres::Error) -> Self {
        CreateError::Db(err.into())
    }
}

/// Inserts a pod (`pending`, generation 1) and its `created` event, within the team's plan.
pub async fn create(pool: &Pool, new: &NewPod) -> Result<PodRow, CreateError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let id = insert(&tx, new).await?;
    let row = tx.query_one(&format!("{SELECT} WHERE p.id = $1"), &[&id]).await?;
    tx.commit().await?;
    Ok(row_to_pod(&row))
}

/// Why a clone was refused.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("no pod named {0:?} in your active team")]
    NotFound(String),
    #[error("{0}")]
    State(String),
    #[error(transparent)]
    Create(#[from] CreateError),
}

impl From<tokio_postgres::Error> for CloneError {
    fn from(err: tokio_postgres::Error) -> Self {
        CloneError::Create(err.into())
    }
}

impl From<DbError> for CloneError {
    fn from(err: DbError) -> Self {
        CloneError::Create(err.into())
    }
}

/// Creates `new` as a clone of the team's pod `source` (by id): like [`create`] (same quota
/// and naming rules, in the same transaction under the team's lock), plus a `clone` transfer
/// from the source's node when the source has one (a source never placed has no volume, and
/// the clone starts empty). Events on both pods.
pub async fn create_clone(pool: &Pool, source: Uuid, new: &NewPod) -> Result<PodRow, CloneError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let id = insert(&tx, new).await?;
    // After the team's lock (taken by `insert`), as resize takes them: team, then pod.
    let Some(origin) = tx
        .query_opt(
            "SELECT p.name, p.node_id, p.desired_state, n.name FROM pods p LEFT JOIN nodes n ON n.id = p.node_id
             WHERE p.id = $1 AND p.team_id = $2 FOR SHARE OF p",
            &[&source, &new.team_id],
        )
        .await?
    else {
        return Err(CloneError::NotFound(source.to_string()));
    };
    let (source_name, source_node, desired, node_name): (String, Option<Uuid>, String, Option<String>) =
        (origin.get(0), origin.get(1), origin.get(2), origin.get(3));
    if desired == "deleted" {
        return Err(CloneError::State(format!(
            "cannot clone the pod {source_name:?}: it is being deleted"
        )));
    }
    if tx
        .query_opt("SELECT 1 FROM volume_transfers WHERE pod_id = $1", &[&source])
        .await?
        .is_some()
    {
        return Err(CloneError::State(format!(
            "cannot clone the pod {source_name:?} yet: its own volume is still being copied (a clone or a move)"
        )));
    }
    let message = match (source_node, node_name) {
        (Some(node), Some(node_name)) => {
            tx.execute(
                "INSERT INTO volume_transfers (pod_id, kind, source_pod_id, source_node_id)
                 VALUES ($1, 'clone', $2, $3)",
                &[&id, &source, &node],
            )
            .await?;
            format!("cloned from pod {source_name}: its volume is copied from node {node_name}")
        }
        _ => format!("cloned from pod {source_name} (never placed: the volume starts empty)"),
    };
    event(&tx, id, "created", Some("pending"), &message).await?;
    event(&tx, source, "action", None, &format!("cloned as pod {}", new.name)).await?;
    let row = tx.query_one(&format!("{SELECT} WHERE p.id = $1"), &[&id]).await?;
    tx.commit().await?;
    Ok(row_to_pod(&row))
}

/// The quota check, the insert and the `created` event, holding the team's row lock.
async fn insert(tx: &deadpool_postgres::Transaction<'_>, new: &NewPod) -> Result<Uuid, CreateError> {
    let plan = tx
        .query_one(
            "SELECT pl.id, pl.max_pods, pl.cpu_millicores, pl.memory_mib, pl.disk_gib
             FROM teams t JOIN plans pl ON pl.id = t.plan_id WHERE t.id = $1 FOR UPDATE OF t",
            &[&new.team_id],
        )
        .await?;
    let (plan_name, max_pods, cpu, memory_mib, disk_gib): (String, i32, i32, i32, i32) =
        (plan.get(0), plan.get(1), plan.get(2), plan.get(3), plan.get(4));
    // A taken name is the more useful answer than a full quota.
    if tx
        .query_opt(
            "SELECT 1 FROM pods WHERE team_id = $1 AND name = $2",
            &[&new.team_id, &new.name],
        )
        .await?
        .is_some()
    {
        return Err(CreateError::NameTaken(new.name.clone()));
    }
    let used = tx
        .query_one(
            "SELECT count(*), COALESCE(sum(cpu_millis), 0)::int8, COALESCE(sum(memory_bytes), 0)::int8,
                    COALESCE(sum(disk_bytes), 0)::int8
             FROM pods WHERE team_id = $1 AND desired_state <> 'deleted'",
            &[&new.team_id],
        )
        .await?;
    let (count, used_cpu, used_memory, used_disk): (i64, i64, i64, i64) =
        (used.get(0), used.get(1), used.get(2), used.get(3));
    let mut problems = Vec::new();
    if count + 1 > i64::from(max_pods) {
        problems.push(format!("{max_pods} pod(s)"));
    }
    if used_cpu + i64::from(new.cpu_millis) > i64::from(cpu) {
        problems.push(format!(
            "{cpu} millicores of CPU ({used_cpu} in use, {} asked)",
            new.cpu_millis
        ));
    }
    let memory_limit = i64::from(memory_mib) * 1024 * 1024;
    if used_memory + new.memory_bytes > memory_limit {
        problems.push(format!(
            "{memory_mib} MiB of memory ({} MiB in use, {} MiB asked)",
            used_memory >> 20,
            new.memory_bytes >> 20
        ));
    }
    let disk_limit = i64::from(disk_gib) * 1024 * 1024 * 1024;
    if used_disk + new.disk_bytes > disk_limit {
        problems.push(format!("{disk_gib} GiB of disk"));
    }
    if !problems.is_empty() {
        return Err(CreateError::Quota(format!(
            "the team's plan `{plan_name}` allows {}; delete a pod or upgrade the plan",
            problems.join(", ")
        )));
    }
    // A map of strings always serialises.
    let env = serde_json::to_value(&new.env).unwrap_or_default();
    let inserted = tx
        .query_one(
            "INSERT INTO pods (team_id, name, state, desired_state, image, runtime_id, preset_id, plan_id, region,
                               cpu_millis, memory_bytes, disk_bytes, env, command, http_port, restart_policy,
                               hostnames, created_by)
             VALUES ($1, $2, 'pending', 'running', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             RETURNING id",
            &[
                &new.team_id,
                &new.name,
                &new.image,
                &new.runtime_id,
                &new.preset_id,
                &new.plan_id,
                &new.region,
                &new.cpu_millis,
                &new.memory_bytes,
                &new.disk_bytes,
                &env,
                &new.command,
                &new.http_port,
                &new.restart_policy,
                &new.hostnames,
                &new.created_by,
            ],
        )
        .await;
    let id: Uuid = match inserted {
        Ok(row) => row.get(0),
        Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(CreateError::NameTaken(new.name.clone()));
        }
        Err(err) => return Err(err.into()),
    };
    event(
        tx,
        id,
        "created",
        Some("pending"),
        &format!("created from image {}", new.image),
    )
    .await?;
    Ok(id)
}

/// Appends an event.
pub async fn event(
    client: &impl GenericClient,
    pod_id: Uuid,
    kind: &str,
    state: Option<&str>,
    message: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pod_events (pod_id, kind, state, message) VALUES ($1, $2, $3, $4)",
            &[&pod_id, &kind, &state, &message],
        )
        .await
        .map(|_| ())
}

/// The team's pods, by name.
pub async fn list(pool: &Pool, team_id: Uuid) -> Result<Vec<PodRow>, DbError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query(&format!("{SELECT} WHERE p.team_id = $1 ORDER BY p.name"), &[&team_id])
        .await?;
    Ok(rows.iter().map(row_to_pod).collect())
}

/// One of the team's pods.
pub async fn get(pool: &Pool, team_id: Uuid, name: &str) -> Result<Option<PodRow>, DbError> {
    let client = db::connect(pool).await?;
    let row = client
        .query_opt(
            &format!("{SELECT} WHERE p.team_id = $1 AND p.name = $2"),
            &[&team_id, &name],
        )
        .await?;
    Ok(row.as_ref().map(row_to_pod))
}

/// The outcome of an action.
#[derive(Debug)]
pub enum ActOutcome {
    /// Accepted (or already in flight): the pod now, and whether a job must be enqueued.
    Accepted {
        pod: PodRow,
        enqueue: bool,
    },
    /// Refused by the state machine.
    Conflict {
        pod: PodRow,
        message: String,
    },
    NotFound,
}

/// Applies `action` to the team's pod `name`.
pub async fn act(pool: &Pool, team_id: Uuid, name: &str, action: Action) -> Result<ActOutcome, DbError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            &format!("{SELECT} WHERE p.team_id = $1 AND p.name = $2 FOR UPDATE OF p"),
            &[&team_id, &name],
        )
        .await?
    else {
        return Ok(ActOutcome::NotFound);
    };
    let pod = row_to_pod(&row);
    let current = Current {
        state: &pod.state,
        desired: &pod.desired_state,
        has_node: pod.node_id.is_some(),
        restart_requested: pod.restart_requested,
    };
    match state::decide(current, action) {
        Decision::Conflict(message) => Ok(ActOutcome::Conflict { pod, message }),
        Decision::InFlight => Ok(ActOutcome::Accepted { pod, enqueue: false }),
        Decision::Apply {
            state,
            desired,
            restart,
        } => {
            tx.execute(
                "UPDATE pods SET state = $2, desired_state = $3, restart_requested = $4, reason = NULL,
                        generation = generation + 1, updated_at = now()
                 WHERE id = $1",
                &[&pod.id, &state, &desired, &restart],
            )
            .await?;
            if action == Action::Delete {
                // Its custom domains go with it at once: no longer served, free to claim again.
                crate::domains::store::delete_all_of_pod(&tx, pod.id).await?;
            }
            event(
                &tx,
                pod.id,
                "action",
                Some(state),
                &format!("{} requested", action.as_str()),
            )
            .await?;
            let row = tx.query_one(&format!("{SELECT} WHERE p.id = $1"), &[&pod.id]).await?;
            tx.commit().await?;
            Ok(ActOutcome::Accepted {
                pod: row_to_pod(&row),
                enqueue: true,
            })
        }
    }
}

/// An event as listed.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: i64,
    pub kind: String,
    pub state: Option<String>,
    pub message: String,
    pub created_at: OffsetDateTime,
}

/// The team's pod's events, newest first, `limit` of them older than `before` (an event id).
pub async fn events(
    pool: &Pool,
    team_id: Uuid,
    name: &str,
    before: Option<i64>,
    limit: i64,
) -> Result<Option<Vec<EventRow>>, DbError> {
    let client = db::connect(pool).await?;
    let Some(pod) = client
        .query_opt(
            "SELECT id FROM pods WHERE team_id = $1 AND name = $2",
            &[&team_id, &name],
        )
        .await?
    else {
        return Ok(None);
    };
    let pod_id: Uuid = pod.get(0);
    let rows = client
        .query(
            "SELECT id, kind, state, message, created_at FROM pod_events
             WHERE pod_id = $1 AND ($2::int8 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
            &[&pod_id, &before, &limit],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| EventRow {
                id: r.get(0),
                kind: r.get(1),
                state: r.get(2),
                message: r.get(3),
                created_at: r.get(4),
            })
            .collect(),
    ))
}

/// One report, as the internal API received it.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub pod_id: Uuid,
    pub generation: i64,
    pub state: &'a str,
    pub reason: Option<&'a str>,
    pub exit_code: Option<i32>,
    pub ip: Option<&'a str>,
}

/// Moves pods by their node's reports (only the pod's own node, only current generations);
/// a `deleted` report of a pod being deleted removes its row (freeing its capacity).
pub async fn apply_reports(pool: &Pool, node_id: Uuid, reports: &[Report<'_>]) -> Result<(), DbError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    for report in reports {
        let Some(row) = tx
            .query_opt(
                "SELECT desired_state, state FROM pods
                 WHERE id = $1 AND node_id = $2 AND generation <= $3 FOR UPDATE",
                &[&report.pod_id, &node_id, &report.generation],
            )
            .await?
        else {
            continue;
        };
        let desired: String = row.get(0);
        let previous: String = row.get(1);
        match state::from_report(report.state, &desired) {
            None => {
                if desired == "deleted" {
                    tx.execute("DELETE FROM pods WHERE id = $1", &[&report.pod_id]).await?;
                }
            }
            Some(new_state) => {
                // While a stop or delete is in flight, a late `running` does not undo it.
                if (previous == "stopping" && new_state == "running") || previous == "deleting" {
                    continue;
                }
                let reason = match (report.reason, report.exit_code) {
                    (Some(reason), _) => Some(reason.to_string()),
                    (None, Some(code)) => Some(format!("exit code {code}")),
                    _ => None,
                };
                tx.execute(
                    "UPDATE pods SET state = $2, reason = $3, ip = COALESCE($4, ip), updated_at = now(),
                            restart_requested = CASE WHEN $2 = 'running' THEN false ELSE restart_requested END
                     WHERE id = $1",
                    &[&report.pod_id, &new_state, &reason, &report.ip],
                )
                .await?;
                if new_state != previous || reason.is_some() {
                    let kind = if new_state == "failed" { "failure" } else { "state" };
                    let message = match &reason {
                        Some(reason) => format!("{new_state}: {reason}"),
                        None => new_state.to_string(),
                    };
                    event(&tx, report.pod_id, kind, Some(new_state), &message).await?;
                }
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// New limits for a pod.
#[derive(Debug, Clone)]
pub struct NewSize {
    pub plan_id: Option<String>,
    pub cpu_millis: i32,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
}

/// Why a resize was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("no pod named {0:?} in your active team")]
    NotFound(String),
    #[error("{0}")]
    State(String),
    #[error("{0}")]
    Quota(String),
    #[error("{0}")]
    NoRoom(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for ResizeError {
    fn from(err: tokio_postgres::Error) -> Self {
        ResizeError::Db(err.into())
    }
}

/// Resizes the team's pod `name`: within the team's plan, and — when it is placed — live on its
/// node when that node has the room, checked under the node's row lock (the same lock the
/// scheduler takes, so a resize and a placement cannot over-commit the node together).
/// Otherwise the pod moves, volume included, to another healthy node of its region that has
/// the room, reserved in this transaction under that node's row lock (see [`room_elsewhere`]);
/// a `move` transfer records where its volume is. [`ResizeError::NoRoom`] when no node can
/// take it.
pub async fn resize(pool: &Pool, team_id: Uuid, name: &str, size: &NewSize) -> Result<PodRow, ResizeError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let plan = tx
        .query_one(
            "SELECT pl.id, pl.cpu_millicores, pl.memory_mib, pl.disk_gib
             FROM teams t JOIN plans pl ON pl.id = t.plan_id WHERE t.id = $1 FOR UPDATE OF t",
            &[&team_id],
        )
        .await?;
    let Some(row) = tx
        .query_opt(
            &format!("{SELECT} WHERE p.team_id = $1 AND p.name = $2 FOR UPDATE OF p"),
            &[&team_id, &name],
        )
        .await?
    else {
        return Err(ResizeError::NotFound(name.to_string()));
    };
    let pod = row_to_pod(&row);
    if pod.desired_state == "deleted" {
        return Err(ResizeError::State(format!(
            "the pod is being deleted (state {})",
            pod.state
        )));
    }
    let others = tx
        .query_one(
            "SELECT COALESCE(sum(cpu_millis), 0)::int8, COALESCE(sum(memory_bytes), 0)::int8,
                    COALESCE(sum(disk_bytes), 0)::int8
             FROM pods WHERE team_id = $1 AND desired_state <> 'deleted' AND id <> $2",
            &[&team_id, &pod.id],
        )
        .await?;
    let (plan_name, cpu, memory_mib, disk_gib): (String, i32, i32, i32) =
        (plan.get(0), plan.get(1), plan.get(2), plan.get(3));
    if others.get::<_, i64>(0) + i64::from(size.cpu_millis) > i64::from(cpu)
        || others.get::<_, i64>(1) + size.memory_bytes > i64::from(memory_mib) * 1024 * 1024
        || others.get::<_, i64>(2) + size.disk_bytes > i64::from(disk_gib) * 1024 * 1024 * 1024
    {
        return Err(ResizeError::Quota(format!(
            "the team's plan `{plan_name}` allows {cpu} millicores, {memory_mib} MiB and {disk_gib} GiB in total"
        )));
    }
    if let Some(node) = pod.node_id {
        let capacity = tx
            .query_one(
                "SELECT name, COALESCE(allocatable_cpu_millis, 0), COALESCE(allocatable_memory_bytes, 0),
                        COALESCE(allocatable_disk_bytes, 0), status = 'healthy', peer_addr IS NOT NULL
                 FROM nodes WHERE id = $1 FOR UPDATE",
                &[&node],
            )
            .await?;
        let used = tx
            .query_one(
                "SELECT COALESCE(sum(cpu_millis), 0)::int8, COALESCE(sum(memory_bytes), 0)::int8,
                        COALESCE(sum(disk_bytes), 0)::int8
                 FROM pods WHERE node_id = $1 AND id <> $2",
                &[&node, &pod.id],
            )
            .await?;
        let node_name: String = capacity.get(0);
        let free_cpu = capacity.get::<_, i64>(1) - used.get::<_, i64>(0);
        let free_memory = capacity.get::<_, i64>(2) - used.get::<_, i64>(1);
        let free_disk = capacity.get::<_, i64>(3) - used.get::<_, i64>(2);
        if i64::from(size.cpu_millis) > free_cpu || size.memory_bytes > free_memory || size.disk_bytes > free_disk {
            let here = format!(
                "its node {node_name} has {free_cpu} millicores, {} MiB and {} GiB free for it",
                free_memory >> 20,
                free_disk >> 30
            );
            let asked = format!(
                "no node can take the pod with {} millicores, {} MiB and {} GiB",
                size.cpu_millis,
                size.memory_bytes >> 20,
                size.disk_bytes >> 30
            );
            if !capacity.get::<_, bool>(4) || !capacity.get::<_, bool>(5) {
                return Err(ResizeError::NoRoom(format!(
                    "{asked}: {here}, and the pod cannot move: node {node_name} is not healthy or \
                     advertises no peer address for volume transfers"
                )));
            }
            if tx
                .query_opt("SELECT 1 FROM volume_transfers WHERE pod_id = $1", &[&pod.id])
                .await?
                .is_some()
            {
                return Err(ResizeError::State(format!(
                    "the volume of pod {name:?} is still being copied (a clone or a move); resize it once it runs"
                )));
            }
            match room_elsewhere(&tx, &pod, node, size).await? {
                Elsewhere::Node(to, to_name) => {
                    return moved(tx, &pod, size, (node, &node_name), (to, &to_name)).await;
                }
                Elsewhere::Nowhere(why) => return Err(ResizeError::NoRoom(format!("{asked}: {here}; {why}"))),
            }
        }
    }
    let plan_id = size.plan_id.clone().unwrap_or(pod.plan_id.clone());
    tx.execute(
        "UPDATE pods SET cpu_millis = $2, memory_bytes = $3, disk_bytes = $4, plan_id = $5,
                generation = generation + 1, resize_requested = node_id IS NOT NULL, updated_at = now()
         WHERE id = $1",
        &[
            &pod.id,
            &size.cpu_millis,
            &size.memory_bytes,
            &size.disk_bytes,
            &plan_id,
        ],
    )
    .await?;
    event(
        &tx,
        pod.id,
        "action",
        Some(&pod.state),
        &format!(
            "resize requested: {} millicores, {} MiB memory, {} GiB disk",
            size.cpu_millis,
            size.memory_bytes >> 20,
            size.disk_bytes >> 30
        ),
    )
    .await?;
    let row = tx.query_one(&format!("{SELECT} WHERE p.id = $1"), &[&pod.id]).await?;
    tx.commit().await?;
    Ok(row_to_pod(&row))
}

/// Where a pod that does not fit on its node could go.
enum Elsewhere {
    /// This node (id, name) is locked by the transaction and has the room.
    Node(Uuid, String),
    /// Nowhere: why, naming the nearest miss.
    Nowhere(String),
}

/// Finds another healthy node of the pod's region, able to receive volumes, with room for
/// `size`: candidates from one read of the fleet, tightest fit first (bin-packing, as the
/// scheduler's default), each then locked (`FOR UPDATE`, the scheduler's lock) and re-summed
/// by a statement that starts after the lock, so a concurrent placement or resize cannot make
/// both fit where only one does.
async fn room_elsewhere(
    tx: &deadpool_postgres::Transaction<'_>,
    pod: &PodRow,
    current: Uuid,
    size: &NewSize,
) -> Result<Elsewhere, ResizeError> {
    let rows = tx
        .query(
            "SELECT n.id, n.name,
                    COALESCE(n.allocatable_cpu_millis, 0) - COALESCE(sum(p.cpu_millis), 0)::int8,
                    COALESCE(n.allocatable_memory_bytes, 0) - COALESCE(sum(p.memory_bytes), 0)::int8,
                    COALESCE(n.allocatable_disk_bytes, 0) - COALESCE(sum(p.disk_bytes), 0)::int8
             FROM nodes n LEFT JOIN pods p ON p.node_id = n.id
             WHERE n.status = 'healthy' AND n.region = $1 AND n.id <> $2 AND n.peer_addr IS NOT NULL
             GROUP BY n.id ORDER BY n.id",
            &[&pod.region, &current],
        )
        .await?;
    let fits = |cpu: i64, memory: i64, disk: i64| {
        i64::from(size.cpu_millis) <= cpu && size.memory_bytes <= memory && size.disk_bytes <= disk
    };
    let mut candidates: Vec<(Uuid, String, i64, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let nearest = candidates.iter().max_by_key(|c| (c.2, c.3)).map(|c| {
        format!(
            "the roomiest other node, {}, has {} millicores, {} MiB and {} GiB free",
            c.1,
            c.2,
            c.3 >> 20,
            c.4 >> 30
        )
    });
    candidates.retain(|c| fits(c.2, c.3, c.4));
    candidates.sort_by_key(|c| (c.2, c.3, c.4, c.0));
    for (id, _, _, _, _) in candidates {
        let Some(node) = tx
            .query_opt(
                "SELECT name, COALESCE(allocatable_cpu_millis, 0), COALESCE(allocatable_memory_bytes, 0),
                        COALESCE(allocatable_disk_bytes, 0)
                 FROM nodes WHERE id = $1 AND status = 'healthy' AND peer_addr IS NOT NULL FOR UPDATE",
                &[&id],
            )
            .await?
        else {
            continue;
        };
        let used = tx
            .query_one(
                "SELECT COALESCE(sum(cpu_millis), 0)::int8, COALESCE(sum(memory_bytes), 0)::int8,
                        COALESCE(sum(disk_bytes), 0)::int8
                 FROM pods WHERE node_id = $1",
                &[&id],
            )
            .await?;
        if fits(
            node.get::<_, i64>(1) - used.get::<_, i64>(0),
            node.get::<_, i64>(2) - used.get::<_, i64>(1),
            node.get::<_, i64>(3) - used.get::<_, i64>(2),
        ) {
            return Ok(Elsewhere::Node(id, node.get(0)));
        }
    }
    Ok(Elsewhere::Nowhere(nearest.unwrap_or_else(|| {
        format!("no other healthy node in region {} can receive its volume", pod.region)
    })))
}

/// Commits a resize that moves the pod from `from` to `to` (whose row `tx` holds locked): the
/// new size and node, a `move` transfer from the old node, a new generation; a pod that should
/// run starts over (`starting`) on its new node. The scheduler then stops it on the old node,
/// has the new node pull the volume, and removes the old copy once the pod runs.
async fn moved(
    tx: deadpool_postgres::Transaction<'_>,
    pod: &PodRow,
    size: &NewSize,
    from: (Uuid, &str),
    to: (Uuid, &str),
) -> Result<PodRow, ResizeError> {
    let plan_id = size.plan_id.clone().unwrap_or(pod.plan_id.clone());
    tx.execute(
        "UPDATE pods SET cpu_millis = $2, memory_bytes = $3, disk_bytes = $4, plan_id = $5, node_id = $6,
                ip = NULL, reason = NULL, state = CASE WHEN desired_state = 'running' THEN 'starting' ELSE state END,
                generation = generation + 1, resize_requested = false, restart_requested = false,
                updated_at = now()
         WHERE id = $1",
        &[
            &pod.id,
            &size.cpu_millis,
            &size.memory_bytes,
            &size.disk_bytes,
            &plan_id,
            &to.0,
        ],
    )
    .await?;
    tx.execute(
        "INSERT INTO volume_transfers (pod_id, kind, source_pod_id, source_node_id) VALUES ($1, 'move', $1, $2)",
        &[&pod.id, &from.0],
    )
    .await?;
    let state = if pod.desired_state == "running" {
        "starting"
    } else {
        pod.state.as_str()
    };
    event(
        &tx,
        pod.id,
        "action",
        Some(state),
        &format!(
            "resize requested: {} millicores, {} MiB memory, {} GiB disk; node {} lacks the room, \
             so the pod moves to node {} with its volume",
            size.cpu_millis,
            size.memory_bytes >> 20,
            size.disk_bytes >> 30,
            from.1,
            to.1
        ),
    )
    .await?;
    let row = tx.query_one(&format!("{SELECT} WHERE p.id = $1"), &[&pod.id]).await?;
    tx.commit().await?;
    Ok(row_to_pod(&row))
}
