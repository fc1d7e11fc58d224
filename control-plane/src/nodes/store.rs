//! The `nodes` and `pod_reports` rows: joining (insert or rejoin with a new token), node-token
//! authentication, heartbeats and report batches.
//!
//! *Join rules.* A join that names a `node_id` the table knows keeps that id (and takes the
//! name it sends). A join without one, or with an id the table does not know (the database was
//! restored from an older backup, or an operator deleted the node), is matched by name: a
//! known name is the same machine re-installed and keeps its id; a new name is a new node with
//! a fresh id. An unknown `node_id` is never inserted as given, so a former node cannot bring a
//! deleted identity back; the agent learns its new id from the answer. Every join issues a new
//! token, which revokes the previous one.

use std::collections::BTreeMap;

use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::db::{self, DbError, Pool};
use crate::nodes::validate::{HeartbeatInput, JoinInput, ReportInput};
use crate::nodes::{NodeStatus, tokens};

/// The unique constraint on `nodes.name` (Postgres's default name for it).
const NAME_CONSTRAINT: &str = "nodes_name_key";

/// How a join found its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// A new node.
    Inserted,
    /// The node named by its `node_id`.
    RejoinedById,
    /// The node with the same name (no `node_id`, or an unknown one).
    RejoinedByName,
}

/// A node that joined: its id and the plain token to hand out once.
#[derive(Debug)]
pub struct JoinedNode {
    pub id: Uuid,
    pub token: String,
    pub kind: JoinKind,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("node name {0:?} is already taken by another node")]
    NameTaken(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for JoinError {
    fn from(err: tokio_postgres::Error) -> Self {
        JoinError::Db(err.into())
    }
}

/// A request that proved to be node `id` by its token. Writes repeat the check in SQL.
#[derive(Debug, Clone)]
pub struct AuthenticatedNode {
    pub id: Uuid,
    token_hash: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeAuthError {
    /// No token, not a node token, or not the current token of that node (or no such node).
    #[error("invalid node token")]
    InvalidToken,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for NodeAuthError {
    fn from(err: tokio_postgres::Error) -> Self {
        NodeAuthError::Db(err.into())
    }
}

/// What a heartbeat changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatOutcome {
    /// The status before this heartbeat (it is `healthy` after it).
    pub previous: NodeStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The node's token was replaced (a rejoin) after the request was authenticated.
    #[error("node {0} has a new token; this one was revoked")]
    TokenRevoked(Uuid),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for HeartbeatError {
    fn from(err: tokio_postgres::Error) -> Self {
        HeartbeatError::Db(err.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordReportsError {
    /// The node's token was replaced (a rejoin) after the request was authenticated.
    #[error("node {0} has a new token; this one was revoked")]
    TokenRevoked(Uuid),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for RecordReportsError {
    fn from(err: tokio_postgres::Error) -> Self {
        RecordReportsError::Db(err.into())
    }
}

fn labels_json(labels: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(key, value)| (key.clone(), serde_json::Value::String(value.clone())))
            .collect(),
    )
}

fn is_name_conflict(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&SqlState::UNIQUE_VIOLATION)
        && err
            .as_db_error()
            .and_then(|db_error| db_error.constraint())
            .is_some_and(|constraint| constraint == NAME_CONSTRAINT)
}

/// Joins (or rejoins) a node; see the module's join rules.
pub async fn join(pool: &Pool, input: &JoinInput) -> Result<JoinedNode, JoinError> {
    let token = tokens::generate_node_token();
    let labels = labels_json(&input.labels);
    let client = db::connect(pool).await?;
    if let Some(node_id) = input.node_id {
        let updated = client
            .query_opt(
                "UPDATE nodes SET name = $2, region = $3, labels = $4, agent_version = $5, token_hash = $6,
                     ingress_addr = $7
                 WHERE id = $1 RETURNING id",
                &[
                    &node_id,
                    &input.name,
                    &input.region,
                    &labels,
                    &input.agent_version,
                    &token.hash,
                    &input.ingress_addr,
                ],
            )
            .await;
        match updated {
            Ok(Some(row)) => {
                return Ok(JoinedNode {
                    id: row.get(0),
                    token: token.plain,
                    kind: JoinKind::RejoinedById,
                });
            }
            Ok(None) => {
                tracing::warn!(
                    node_id = %node_id,
                    node = %input.name,
                    "a node joined with an unknown node id; matching it by name instead"
                );
            }
            Err(err) if is_name_conflict(&err) => return Err(JoinError::NameTaken(input.name.clone())),
            Err(err) => return Err(err.into()),
        }
    }
    // One statement, so two agents joining under one new name at once end up with one row
    // (the later join's token wins).
    let row = client
        .query_one(
            "INSERT INTO nodes (name, region, labels, agent_version, token_hash, ingress_addr)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET region = excluded.region, labels = excluded.labels,
                 agent_version = excluded.agent_version, token_hash = excluded.token_hash,
                 ingress_addr = excluded.ingress_addr
             RETURNING id, xmax = 0",
            &[
                &input.name,
                &input.region,
                &labels,
                &input.agent_version,
                &token.hash,
                &input.ingress_addr,
            ],
        )
        .await?;
    let inserted: bool = row.get(1);
    Ok(JoinedNode {
        id: row.get(0),
        token: token.plain,
        kind: if inserted {
            JoinKind::Inserted
        } else {
            JoinKind::RejoinedByName
        },
    })
}

/// Checks that `token` is the current token of node `node_id`. Unknown nodes and wrong tokens
/// are the same error, so the answer does not tell which node ids exist.
pub async fn authenticate(pool: &Pool, node_id: Uuid, token: Option<&str>) -> Result<AuthenticatedNode, NodeAuthError> {
    let token_hash = token
        .and_then(tokens::node_token_hash)
        .ok_or(NodeAuthError::InvalidToken)?;
    let client = db::connect(pool).await?;
    let found = client
        .query_opt(
            "SELECT 1 FROM nodes WHERE id = $1 AND token_hash = $2",
            &[&node_id, &token_hash],
        )
        .await?;
    match found {
        Some(_) => Ok(AuthenticatedNode {
            id: node_id,
            token_hash,
        }),
        None => Err(NodeAuthError::InvalidToken),
    }
}

/// Records a heartbeat and marks the node `healthy`; logs when that is a change.
pub async fn record_heartbeat(
    pool: &Pool,
    node: &AuthenticatedNode,
    input: &HeartbeatInput,
) -> Result<HeartbeatOutcome, HeartbeatError> {
    let labels = labels_json(&input.labels);
    let client = db::connect(pool).await?;
    // The CTE locks the row and reads the status it had, so the transition is seen by exactly
    // one writer even while the health worker marks the node at the same moment.
    let row = client
        .query_opt(
            "WITH previous AS (
                 SELECT id, status FROM nodes WHERE id = $1 AND token_hash = $2 FOR UPDATE
             )
             UPDATE nodes AS n SET
                 region = $3, labels = $4, agent_version = $5,
                 total_cpu_millis = $6, total_memory_bytes = $7, total_disk_bytes = $8,
                 allocatable_cpu_millis = $9, allocatable_memory_bytes = $10, allocatable_disk_bytes = $11,
                 pods = $12, ingress_addr = $13, last_heartbeat_at = now(), status = 'healthy',
                 status_changed_at = CASE WHEN previous.status = 'healthy' THEN n.status_changed_at ELSE now() END
             FROM previous WHERE n.id = previous.id
             RETURNING previous.status, n.name",
            &[
                &node.id,
                &node.token_hash,
                &input.region,
                &labels,
                &input.agent_version,
                &input.total.cpu_millis,
                &input.total.memory_bytes,
                &input.total.disk_bytes,
                &input.allocatable.cpu_millis,
                &input.allocatable.memory_bytes,
                &input.allocatable.disk_bytes,
                &input.pods,
                &input.ingress_addr,
            ],
        )
        .await?
        .ok_or(HeartbeatError::TokenRevoked(node.id))?;
    let previous = NodeStatus::parse(row.get(0));
    if previous != NodeStatus::Healthy {
        let name: &str = row.get(1);
        tracing::info!(node_id = %node.id, node = name, previous = previous.as_str(), "node healthy again");
    }
    Ok(HeartbeatOutcome { previous })
}

/// Appends a batch of reports in one statement, in the batch's order; returns how many.
pub async fn record_reports(
    pool: &Pool,
    node: &AuthenticatedNode,
    reports: &[ReportInput],
) -> Result<u64, RecordReportsError> {
    if reports.is_empty() {
        return Ok(0);
    }
    let pod_ids: Vec<Uuid> = reports.iter().map(|r| r.pod_id).collect();
    let generations: Vec<i64> = reports.iter().map(|r| r.generation).collect();
    let states: Vec<&str> = reports.iter().map(|r| r.state).collect();
    let reasons: Vec<Option<&str>> = reports.iter().map(|r| r.reason.as_deref()).collect();
    let exit_codes: Vec<Option<i32>> = reports.iter().map(|r| r.exit_code).collect();
    let ips: Vec<Option<&str>> = reports.iter().map(|r| r.ip.as_deref()).collect();
    let observed: Vec<time::OffsetDateTime> = reports.iter().map(|r| r.observed_at).collect();
    let client = db::connect(pool).await?;
    let inserted = client
        .execute(
            "INSERT INTO pod_reports (node_id, pod_id, generation, state, reason, exit_code, ip, observed_at)
             SELECT $1, r.pod_id, r.generation, r.state, r.reason, r.exit_code, r.ip, r.observed_at
             FROM unnest($3::uuid[], $4::int8[], $5::text[], $6::text[], $7::int4[], $8::text[], $9::timestamptz[])
                  WITH ORDINALITY AS r(pod_id, generation, state, reason, exit_code, ip, observed_at, n)
             WHERE EXISTS (SELECT 1 FROM nodes WHERE id = $1 AND token_hash = $2)
             ORDER BY r.n",
            &[
                &node.id,
                &node.token_hash,
                &pod_ids,
                &generations,
                &states,
                &reasons,
                &exit_codes,
                &ips,
                &observed,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(RecordReportsError::TokenRevoked(node.id));
    }
    Ok(inserted)
}

/// Records where the node's SSH gateway is reached, as its heartbeat says; a row that already
/// holds it is not written.
pub async fn record_ssh_addr(
    pool: &Pool,
    node: &AuthenticatedNode,
    ssh_addr: Option<&str>,
) -> Result<(), HeartbeatError> {
    let client = db::connect(pool).await?;
    client
        .execute(
            "UPDATE nodes SET ssh_addr = $3
             WHERE id = $1 AND token_hash = $2 AND ssh_addr IS DISTINCT FROM $3",
            &[&node.id, &node.token_hash, &ssh_addr],
        )
        .await?;
    Ok(())
}

/// Records where other nodes reach this node's peer endpoint (volume transfers for clones and
/// moves), as its heartbeat says; a row that already holds it is not written.
pub async fn record_peer_addr(
    pool: &Pool,
    node: &AuthenticatedNode,
    peer_addr: Option<&str>,
) -> Result<(), HeartbeatError> {
    let client = db::connect(pool).await?;
    client
        .execute(
            "UPDATE nodes SET peer_addr = $3
             WHERE id = $1 AND token_hash = $2 AND peer_addr IS DISTINCT FROM $3",
            &[&node.id, &node.token_hash, &peer_addr],
        )
        .await?;
    Ok(())
}
