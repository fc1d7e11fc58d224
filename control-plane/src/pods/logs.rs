//! Reading a pod's log: find the node that hosts it, sign a logs token for that node and pod,
//! and open the agent's stream of JSON lines (`GET /v1/logs/{pod_id}` on the node's peer
//! endpoint, `nodes.peer_addr`). The caller streams the response on without holding it.
//!
//! *Design.* The token is an HMAC keyed with the node token's SHA-256 — the one secret both
//! the control plane (`nodes.token_hash`) and the agent (its plain token) know; see
//! `instapod_common::peer_token`. It is scoped to logs, names the node and the pod and expires within a minute, so a
//! leaked token reads one pod's log on one node, briefly.

use std::time::Duration;

use instapod_common::peer_token::{self, Scope};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::{self, DbError, Pool};

/// What to read (already validated).
#[derive(Debug, Clone, Copy)]
pub struct LogsQuery {
    pub tail: u32,
    pub since: Option<OffsetDateTime>,
    pub follow: bool,
}

/// Why a log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenLogsError {
    #[error("no pod named {0:?} in the team")]
    NotFound(String),
    #[error("node {node_id} has no peer address to read logs from")]
    NoPeerAddress { node_id: Uuid },
    #[error("cannot reach node {node_id} at {addr}: {source}")]
    Unreachable {
        node_id: Uuid,
        addr: String,
        source: reqwest::Error,
    },
    #[error("node {node_id} answered {status} to the logs request for pod {pod_id}")]
    Refused { node_id: Uuid, pod_id: Uuid, status: u16 },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The opened log: the agent's response (JSON lines), or nothing when the pod has no node yet
/// (it has never run, so it has no output).
#[derive(Debug)]
pub enum OpenedLogs {
    Stream(reqwest::Response),
    NotPlaced,
}

/// The client for the agents' peer endpoints: no overall timeout (a follow lasts as long as the
/// client wants), TCP keepalive so a vanished node ends the stream.
pub fn node_http_client() -> reqwest::Client {
    // reqwest uses rustls without a bundled provider: the workspace uses aws-lc-rs only.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_keepalive(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap_or_default()
}

/// Opens the log of the team's pod `name` on its node.
pub async fn open(
    pool: &Pool,
    http: &reqwest::Client,
    team_id: Uuid,
    name: &str,
    query: LogsQuery,
) -> Result<OpenedLogs, OpenLogsError> {
    let client = db::connect(pool).await?;
    let row = client
        .query_opt(
            "SELECT p.id, p.node_id, n.peer_addr, n.token_hash
             FROM pods p LEFT JOIN nodes n ON n.id = p.node_id
             WHERE p.team_id = $1 AND p.name = $2",
            &[&team_id, &name],
        )
        .await
        .map_err(DbError::from)?
        .ok_or_else(|| OpenLogsError::NotFound(name.to_string()))?;
    drop(client);
    let pod_id: Uuid = row.get(0);
    let (Some(node_id), Some(token_hash)) = (row.get::<_, Option<Uuid>>(1), row.get::<_, Option<Vec<u8>>>(3)) else {
        return Ok(OpenedLogs::NotPlaced);
    };
    let addr: String = row
        .get::<_, Option<String>>(2)
        .ok_or(OpenLogsError::NoPeerAddress { node_id })?;
    let expires = OffsetDateTime::now_utc().unix_timestamp() + peer_token::TOKEN_TTL_SECS;
    let token = peer_token::sign(&token_hash, Scope::Logs, node_id, pod_id, expires);
    let mut url = format!("http://{addr}/v1/logs/{pod_id}?tail={}", query.tail);
    if let Some(since) = query.since {
        url.push_str(&format!("&since_ns={}", since.unix_timestamp_nanos()));
    }
    if query.follow {
        url.push_str("&follow=1");
    }
    let response = http
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|source| OpenLogsError::Unreachable {
            node_id,
            addr: addr.clone(),
            source,
        })?;
    match response.status().as_u16() {
        200 => Ok(OpenedLogs::Stream(response)),
        // The node no longer has it (deleted, or moved away a moment ago).
        404 => Err(OpenLogsError::NotFound(name.to_string())),
        status => Err(OpenLogsError::Refused {
            node_id,
            pod_id,
            status,
        }),
    }
}
