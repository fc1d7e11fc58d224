//! The four SSH endpoints of a pod: connection info, and list, add and remove its SSH keys.
//! The pod is addressed by name within the caller's active team; another team's pod is a 404.
//!
//! - `GET /api/pods/{name}/ssh`: `{host, port, username, command}` — the gateway of the node
//!   the pod is placed on, and a ready `ssh -p PORT USER@HOST` line. 409 `ssh_unavailable` while
//!   the pod has no node or that node's gateway has not reported its address.
//! - `POST /api/pods/{name}/ssh/keys` `{"public_key": "<OpenSSH public-key line>"}` → 201 with
//!   the key (id, SHA-256 fingerprint, algorithm, bits, comment). Ed25519, ECDSA and RSA ≥ 2048
//!   bits; anything else 400; the same key twice on a pod 409 `ssh_key_exists`.
//! - `DELETE /api/pods/{name}/ssh/keys` with the key named by `id` or `fingerprint`, in the JSON
//!   body (`{"id": "…"}` or `{"fingerprint": "SHA256:…"}`) or in the query string
//!   (`?id=…`, `?fingerprint=…`) → 204; an unknown key 404. New logins with it fail at once.

use salvo::http::StatusCode;
use salvo::oapi::ToSchema;
use salvo::oapi::extract::{PathParam, QueryParam};
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::responses::{Created, NoContent};
use crate::error::ApiError;
use crate::http::auth::caller;
use crate::http::json;
use crate::http::state::app;
use crate::ssh::keys;
use crate::ssh::store::{self, KeyRow, KeySelector};

/// How to reach a pod over SSH.
#[derive(Debug, Serialize, ToSchema)]
pub struct SshConnectionView {
    /// The SSH gateway of the pod's node.
    pub host: String,
    pub port: u16,
    /// The pod's SSH username: the first label of its platform hostname (`<pod>-<team slug>`),
    /// or the pod id when another pod shares that label.
    pub username: String,
    /// A ready command line.
    pub command: String,
    /// The node the pod is placed on.
    pub node: Option<String>,
}

/// A registered SSH key.
#[derive(Debug, Serialize, ToSchema)]
pub struct SshKeyView {
    pub id: Uuid,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256|384|521` or `ssh-rsa`.
    pub algorithm: String,
    pub bits: i32,
    pub comment: String,
    /// `<algorithm> <base64>` (without the comment).
    pub public_key: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<KeyRow> for SshKeyView {
    fn from(row: KeyRow) -> Self {
        SshKeyView {
            id: row.id,
            fingerprint: row.fingerprint,
            algorithm: row.algorithm,
            bits: row.bits,
            comment: row.comment,
            public_key: row.public_key,
            created_at: row.created_at,
        }
    }
}

/// A pod's SSH keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct SshKeyList {
    pub keys: Vec<SshKeyView>,
}

/// Register an SSH key on a pod.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddSshKeyRequest {
    /// One OpenSSH public-key line, e.g. the content of `~/.ssh/id_ed25519.pub`.
    pub public_key: String,
}

/// Which key to remove: exactly one of `id` and `fingerprint`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveSshKeyRequest {
    pub id: Option<Uuid>,
    pub fingerprint: Option<String>,
}

impl From<store::SshKeyError> for ApiError {
    fn from(err: store::SshKeyError) -> Self {
        match err {
            store::SshKeyError::PodNotFound(_) | store::SshKeyError::KeyNotFound { .. } => {
                ApiError::not_found(err.to_string())
            }
            store::SshKeyError::Duplicate { .. } => ApiError::conflict("ssh_key_exists", err.to_string()),
            store::SshKeyError::Db(err) => err.into(),
        }
    }
}

/// Get a pod's SSH connection info
#[endpoint(tags("ssh"))]
pub async fn connection(name: PathParam<String>, depot: &mut Depot) -> Result<Json<SshConnectionView>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let name = name.into_inner();
    let info = store::connection(&state.db, me.team_id, &name).await?;
    let unavailable = |why: &str| {
        ApiError::conflict(
            "ssh_unavailable",
            format!("pod {name:?} cannot be reached over SSH yet: {why}"),
        )
    };
    let Some(addr) = info.ssh_addr.as_deref() else {
        return Err(unavailable(if info.node_name.is_none() {
            "it is not placed on a node (start it first)"
        } else {
            "its node's SSH gateway has not reported its address"
        }));
    };
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
        .ok_or_else(|| unavailable("its node reported an unusable SSH address"))?;
    let port_flag = if port == 22 {
        String::new()
    } else {
        format!("-p {port} ")
    };
    Ok(Json(SshConnectionView {
        command: format!("ssh {port_flag}{}@{host}", info.username),
        host,
        port,
        username: info.username,
        node: info.node_name,
    }))
}

/// List a pod's SSH keys
#[endpoint(tags("ssh"))]
pub async fn list_keys(name: PathParam<String>, depot: &mut Depot) -> Result<Json<SshKeyList>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let keys = store::list(&state.db, me.team_id, &name).await?;
    Ok(Json(SshKeyList {
        keys: keys.into_iter().map(SshKeyView::from).collect(),
    }))
}

/// Add an SSH key to a pod
#[endpoint(tags("ssh"), request_body = AddSshKeyRequest)]
pub async fn add_key(
    name: PathParam<String>,
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Created<SshKeyView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let body: AddSshKeyRequest = json::read(req).await?;
    let key = keys::parse(&body.public_key).map_err(|err| ApiError::bad_request("invalid_ssh_key", err.to_string()))?;
    let row = store::add(&state.db, me.team_id, me.user_id, &name, &key).await?;
    tracing::info!(team_id = %me.team_id, pod = %*name, fingerprint = %row.fingerprint, "ssh key added");
    Ok(Created(row.into()))
}

/// Remove an SSH key from a pod (by `id` or `fingerprint`, in the body or the query)
#[endpoint(tags("ssh"))]
pub async fn remove_key(
    name: PathParam<String>,
    id: QueryParam<String, false>,
    fingerprint: QueryParam<String, false>,
    req: &mut Request,
    depot: &mut Depot,
) -> Result<NoContent, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let mut selector = RemoveSshKeyRequest {
        id: id
            .as_deref()
            .map(|id| {
                id.parse::<Uuid>()
                    .map_err(|_| ApiError::validation(format!("id must be a UUID, not {id:?}")))
            })
            .transpose()?,
        fingerprint: fingerprint.into_inner(),
    };
    if req.content_type().is_some() {
        let body: RemoveSshKeyRequest = json::read(req).await?;
        selector.id = selector.id.or(body.id);
        selector.fingerprint = selector.fingerprint.or(body.fingerprint);
    }
    let selector = match (selector.id, selector.fingerprint) {
        (Some(id), None) => KeySelector::Id(id),
        (None, Some(fingerprint)) => KeySelector::Fingerprint(fingerprint),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                "name the key to remove with exactly one of id or fingerprint (in the JSON body or the query)",
            ));
        }
    };
    store::remove(&state.db, me.team_id, &name, &selector).await?;
    tracing::info!(team_id = %me.team_id, pod = %*name, ?selector, "ssh key removed");
    Ok(NoContent)
}
