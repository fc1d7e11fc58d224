//! The files API's control-plane side: find the node that hosts the team's pod, sign a peer
//! token of scope `files` for that node and pod, and forward the request to the agent's peer
//! endpoint (`/v1/files/{pod_id}/…`, see `node-agent/src/files/`), streaming the request body
//! there and the answer back.
//!
//! *Design.* The agent does the work and answers in the API's shapes (JSON bodies, JSON
//! errors with their statuses), so the control plane's part is tenancy (another team's pod is a
//! 404 here, before any node is asked), the request cap of uploads and the node's reachability.
//! Bodies are passed on chunk by chunk, never collected: memory stays flat whatever the size of
//! a file. The token is an HMAC keyed with the node token's SHA-256 (see
//! `instapod_common::peer_token`): scoped to files, one pod, one node, a minute.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use instapod_common::peer_token::{self, Scope};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::{self, DbError, Pool};

/// Why a files request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardFilesError {
    #[error("no pod named {0:?} in the team")]
    NotFound(String),
    #[error("pod {0:?} has not been placed on a node yet, so it has no volume")]
    NotPlaced(String),
    #[error("node {node_id} has no peer address for the files API")]
    NoPeerAddress { node_id: Uuid },
    #[error("cannot reach node {node_id} at {addr}: {source}")]
    Unreachable {
        node_id: Uuid,
        addr: String,
        source: reqwest::Error,
    },
    #[error("node {node_id} answered {status} to a files request for pod {pod_id}")]
    Refused { node_id: Uuid, pod_id: Uuid, status: u16 },
    #[error("the upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Where a pod's files are served, with a token for them.
#[derive(Debug, Clone)]
pub struct FilesTarget {
    pub pod_id: Uuid,
    pub node_id: Uuid,
    pub addr: String,
    token: String,
}

/// Finds the team's pod `name` and the node that hosts it.
pub async fn locate(pool: &Pool, team_id: Uuid, name: &str) -> Result<FilesTarget, ForwardFilesError> {
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
        .ok_or_else(|| ForwardFilesError::NotFound(name.to_string()))?;
    drop(client);
    let pod_id: Uuid = row.get(0);
    let (Some(node_id), Some(token_hash)) = (row.get::<_, Option<Uuid>>(1), row.get::<_, Option<Vec<u8>>>(3)) else {
        return Err(ForwardFilesError::NotPlaced(name.to_string()));
    };
    let addr: String = row
        .get::<_, Option<String>>(2)
        .ok_or(ForwardFilesError::NoPeerAddress { node_id })?;
    let expires = OffsetDateTime::now_utc().unix_timestamp() + peer_token::TOKEN_TTL_SECS;
    let token = peer_token::sign(&token_hash, Scope::Files, node_id, pod_id, expires);
    Ok(FilesTarget {
        pod_id,
        node_id,
        addr,
        token,
    })
}

/// One request to forward.
#[derive(Debug)]
pub struct Forward<'a> {
    pub method: reqwest::Method,
    /// `files`, `files/content`, `files/upload` or `folders`.
    pub operation: &'static str,
    /// The query string as the client sent it (the agent parses it).
    pub query: Option<&'a str>,
    pub accept: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub content_length: Option<u64>,
    pub body: Option<reqwest::Body>,
}

/// Bytes of a refused upload read and discarded after the cap, so the client receives the
/// 413 instead of a connection reset (a client that sends more than this sees the reset).
pub const DRAIN_AFTER_CAP: u64 = 64 * 1024 * 1024;

/// Caps a request body at `limit` bytes: past it, the rest of the client's body is read and
/// discarded (at most [`DRAIN_AFTER_CAP`]), `exceeded` is set and the stream fails, so the
/// agent drops what it wrote and the caller answers 413.
pub fn capped<S>(body: S, limit: u64, exceeded: Arc<AtomicBool>) -> impl Stream<Item = std::io::Result<Bytes>>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    futures_util::stream::unfold((body, 0u64, false), move |(mut body, mut seen, done)| {
        let exceeded = exceeded.clone();
        async move {
            if done {
                return None;
            }
            match body.next().await? {
                Err(err) => Some((Err(err), (body, seen, true))),
                Ok(chunk) => {
                    seen += chunk.len() as u64;
                    if seen <= limit {
                        return Some((Ok(chunk), (body, seen, false)));
                    }
                    exceeded.store(true, Ordering::Release);
                    drain(&mut body, DRAIN_AFTER_CAP).await;
                    let err = std::io::Error::other(format!("upload over {limit} bytes"));
                    Some((Err(err), (body, seen, true)))
                }
            }
        }
    })
}

/// Reads and discards at most `max` bytes of `body`.
pub async fn drain<S>(body: &mut S, max: u64)
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let mut discarded = 0u64;
    while discarded < max {
        match body.next().await {
            Some(Ok(chunk)) => discarded += chunk.len() as u64,
            _ => break,
        }
    }
}

/// Sends `request` to the pod's node; the agent's answer (any status it chose for the user)
/// or why there is none.
pub async fn forward(
    http: &reqwest::Client,
    target: &FilesTarget,
    request: Forward<'_>,
) -> Result<reqwest::Response, ForwardFilesError> {
    let mut url = format!(
        "http://{}/v1/files/{}/{}",
        target.addr, target.pod_id, request.operation
    );
    if let Some(query) = request.query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(query);
    }
    let mut builder = http.request(request.method, &url).bearer_auth(&target.token);
    if let Some(accept) = request.accept {
        builder = builder.header(reqwest::header::ACCEPT, accept);
    }
    if let Some(content_type) = request.content_type {
        builder = builder.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    if let Some(length) = request.content_length {
        builder = builder.header(reqwest::header::CONTENT_LENGTH, length);
    }
    if let Some(body) = request.body {
        builder = builder.body(body);
    }
    let response = builder.send().await.map_err(|source| ForwardFilesError::Unreachable {
        node_id: target.node_id,
        addr: target.addr.clone(),
        source,
    })?;
    match response.status().as_u16() {
        // The agent refusing the token or the route is our fault, not the user's.
        status @ (401 | 403 | 405 | 503) => Err(ForwardFilesError::Refused {
            node_id: target.node_id,
            pod_id: target.pod_id,
            status,
        }),
        _ => Ok(response),
    }
}
