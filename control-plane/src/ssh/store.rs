//! The `pod_ssh_keys` rows: list, add and remove a pod's keys (scoped to the caller's team, so
//! another team's pod is `PodNotFound`), the connection info of a pod, and the question every
//! gateway asks at each authentication attempt: may this key log into this username here?

use deadpool_postgres::Pool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::{self, DbError};
use crate::ssh::keys::ParsedKey;

/// A stored key.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub id: Uuid,
    pub algorithm: String,
    pub public_key: String,
    pub fingerprint: String,
    pub comment: String,
    pub bits: i32,
    pub created_at: OffsetDateTime,
}

/// Which key to remove.
#[derive(Debug, Clone)]
pub enum KeySelector {
    Id(Uuid),
    Fingerprint(String),
}

/// Failures of the key operations.
#[derive(Debug, thiserror::Error)]
pub enum SshKeyError {
    #[error("no pod named {0:?} in your active team")]
    PodNotFound(String),
    #[error("the key {fingerprint} is already registered on pod {pod:?}")]
    Duplicate { pod: String, fingerprint: String },
    #[error("no SSH key {key} on pod {pod:?}")]
    KeyNotFound { pod: String, key: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

const KEY_COLUMNS: &str = "k.id, k.algorithm, k.public_key, k.fingerprint, k.comment, k.bits, k.created_at";

fn row_to_key(row: &tokio_postgres::Row) -> KeyRow {
    KeyRow {
        id: row.get(0),
        algorithm: row.get(1),
        public_key: row.get(2),
        fingerprint: row.get(3),
        comment: row.get(4),
        bits: row.get(5),
        created_at: row.get(6),
    }
}

async fn pod_id(client: &tokio_postgres::Client, team_id: Uuid, pod: &str) -> Result<Uuid, SshKeyError> {
    let row = client
        .query_opt(
            "SELECT id FROM pods WHERE team_id = $1 AND name = $2 AND desired_state <> 'deleted'",
            &[&team_id, &pod],
        )
        .await
        .map_err(DbError::from)?;
    row.map(|r| r.get(0))
        .ok_or_else(|| SshKeyError::PodNotFound(pod.to_string()))
}

/// The keys of the team's pod `pod`, oldest first.
pub async fn list(pool: &Pool, team_id: Uuid, pod: &str) -> Result<Vec<KeyRow>, SshKeyError> {
    let client = db::connect(pool).await?;
    let pod_id = pod_id(&client, team_id, pod).await?;
    let rows = client
        .query(
            &format!("SELECT {KEY_COLUMNS} FROM pod_ssh_keys k WHERE k.pod_id = $1 ORDER BY k.created_at, k.id"),
            &[&pod_id],
        )
        .await
        .map_err(DbError::from)?;
    Ok(rows.iter().map(row_to_key).collect())
}

/// Registers `key` on the team's pod `pod`; the same key (fingerprint) twice is `Duplicate`.
pub async fn add(pool: &Pool, team_id: Uuid, user_id: Uuid, pod: &str, key: &ParsedKey) -> Result<KeyRow, SshKeyError> {
    let client = db::connect(pool).await?;
    let pod_id = pod_id(&client, team_id, pod).await?;
    let row = client
        .query_opt(
            &format!(
                "INSERT INTO pod_ssh_keys AS k (pod_id, algorithm, public_key, fingerprint, comment, bits, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (pod_id, fingerprint) DO NOTHING
                 RETURNING {KEY_COLUMNS}"
            ),
            &[
                &pod_id,
                &key.algorithm,
                &key.public_key,
                &key.fingerprint,
                &key.comment,
                &(key.bits as i32),
                &user_id,
            ],
        )
        .await
        .map_err(DbError::from)?;
    row.as_ref().map(row_to_key).ok_or_else(|| SshKeyError::Duplicate {
        pod: pod.to_string(),
        fingerprint: key.fingerprint.clone(),
    })
}

/// Removes a key of the team's pod `pod`. From the commit on, the gateways refuse it (they ask
/// at every authentication attempt).
pub async fn remove(pool: &Pool, team_id: Uuid, pod: &str, selector: &KeySelector) -> Result<(), SshKeyError> {
    let client = db::connect(pool).await?;
    let pod_id = pod_id(&client, team_id, pod).await?;
    let (removed, key) = match selector {
        KeySelector::Id(id) => (
            client
                .execute("DELETE FROM pod_ssh_keys WHERE pod_id = $1 AND id = $2", &[&pod_id, id])
                .await,
            id.to_string(),
        ),
        KeySelector::Fingerprint(fingerprint) => (
            client
                .execute(
                    "DELETE FROM pod_ssh_keys WHERE pod_id = $1 AND fingerprint = $2",
                    &[&pod_id, fingerprint],
                )
                .await,
            fingerprint.clone(),
        ),
    };
    if removed.map_err(DbError::from)? == 0 {
        return Err(SshKeyError::KeyNotFound {
            pod: pod.to_string(),
            key,
        });
    }
    Ok(())
}

/// What a client needs to connect to a pod.
#[derive(Debug, Clone)]
pub struct Connection {
    pub pod_id: Uuid,
    /// The username to use: the hostname's first label, or the pod id when that label is shared.
    pub username: String,
    pub node_name: Option<String>,
    /// `host:port` of the gateway of the pod's node, as its heartbeat said.
    pub ssh_addr: Option<String>,
}

/// The connection info of the team's pod `pod`.
pub async fn connection(pool: &Pool, team_id: Uuid, pod: &str) -> Result<Connection, SshKeyError> {
    let client = db::connect(pool).await?;
    let row = client
        .query_opt(
            "SELECT p.id, split_part(p.hostnames[1], '.', 1), n.name, n.ssh_addr,
                    EXISTS (SELECT 1 FROM pods o
                             WHERE o.id <> p.id AND o.desired_state <> 'deleted'
                               AND split_part(o.hostnames[1], '.', 1) = split_part(p.hostnames[1], '.', 1))
               FROM pods p LEFT JOIN nodes n ON n.id = p.node_id
              WHERE p.team_id = $1 AND p.name = $2 AND p.desired_state <> 'deleted'",
            &[&team_id, &pod],
        )
        .await
        .map_err(DbError::from)?
        .ok_or_else(|| SshKeyError::PodNotFound(pod.to_string()))?;
    let pod_id: Uuid = row.get(0);
    let label: Option<String> = row.get(1);
    let shared: bool = row.get(4);
    let username = match label {
        Some(label) if !label.is_empty() && !shared => label,
        _ => pod_id.to_string(),
    };
    Ok(Connection {
        pod_id,
        username,
        node_name: row.get(2),
        ssh_addr: row.get(3),
    })
}

/// What the gateway learns when a key may log in.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub pod_id: Uuid,
    pub pod_name: String,
    /// The node the pod is placed on (`None`: not placed).
    pub node_id: Option<Uuid>,
    pub node_name: Option<String>,
    pub node_ssh_addr: Option<String>,
}

/// Whether the key with `fingerprint` is registered on the live pod named by `username` (the
/// first label of its platform hostname, or its id). `None` when it is not, or when the label
/// names several such pods (ambiguous: refused, logged).
pub async fn authorize(pool: &Pool, username: &str, fingerprint: &str) -> Result<Option<Authorized>, DbError> {
    let client = db::connect(pool).await?;
    let by_id = username.parse::<Uuid>().ok();
    let rows = client
        .query(
            "SELECT p.id, p.name, p.node_id, n.name, n.ssh_addr
               FROM pod_ssh_keys k
               JOIN pods p ON p.id = k.pod_id
               LEFT JOIN nodes n ON n.id = p.node_id
              WHERE k.fingerprint = $1 AND p.desired_state <> 'deleted'
                AND (p.id = $3 OR split_part(p.hostnames[1], '.', 1) = $2)
              LIMIT 2",
            &[&fingerprint, &username, &by_id],
        )
        .await?;
    if rows.len() > 1 {
        tracing::warn!(
            username,
            fingerprint,
            "an SSH username names more than one pod holding the key; refused"
        );
        return Ok(None);
    }
    Ok(rows.first().map(|row| Authorized {
        pod_id: row.get(0),
        pod_name: row.get(1),
        node_id: row.get(2),
        node_name: row.get(3),
        node_ssh_addr: row.get(4),
    }))
}
