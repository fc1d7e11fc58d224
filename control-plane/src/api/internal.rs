//! The internal API for node agents, under `/internal` (not part of the public spec or the
//! OpenAPI document): join, heartbeat, pod reports, the fleet's ingress routes, pod metric samples
//! and the SSH gateways' authorization question. The bodies are the wire types of
//! `instapod_common::node`; the rules are in `nodes` and in docs/api.md.
//!
//! Agents authenticate with `Authorization: Bearer …` only: the fleet's join token for a join,
//! their own node token afterwards. They send no cookies and no `Origin`, so the service-wide
//! same-origin hoop (which only refuses unsafe requests naming a foreign `Origin`) never stands
//! in their way, and the session hoop (`require_auth`) is not on these routes.

use instapod_common::node::{
    Heartbeat, JoinRequest, JoinResponse, ReportBatch, SshAuthorization, SshAuthorizeRequest, node_queue,
};
use instapod_common::pod_metrics::{MAX_SAMPLES_PER_BATCH, SampleBatch};
use salvo::http::{HeaderValue, StatusCode};
use salvo::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use crate::error::ApiError;
use crate::http::auth::bearer_token;
use crate::http::json::{self, MAX_NODE_JSON_BODY};
use crate::http::state::app;
use crate::nodes::store::{self, AuthenticatedNode, JoinKind, NodeAuthError};
use crate::nodes::validate::{self, MAX_REPORTS_PER_BATCH};
use crate::nodes::{NodeStatus, routes as ingress_routes, tokens};

/// The answer to a heartbeat.
#[derive(Debug, Serialize)]
pub struct HeartbeatAnswer {
    pub node_id: Uuid,
    pub status: NodeStatus,
}

/// The answer to a report batch.
#[derive(Debug, Serialize)]
pub struct ReportsAnswer {
    /// How many reports were stored.
    pub accepted: u64,
}

/// Authenticates the node named by the path's `{id}` with the request's bearer token. A
/// malformed id answers like a wrong token: no node has it.
pub(crate) async fn authenticate_node(req: &Request, depot: &Depot) -> Result<AuthenticatedNode, ApiError> {
    let node_id = req.param::<Uuid>("id").ok_or(NodeAuthError::InvalidToken)?;
    let token = bearer_token(req);
    Ok(store::authenticate(&app(depot).db, node_id, token.as_deref()).await?)
}

/// `POST /internal/nodes/join`: join (or rejoin) the fleet with the join token.
#[handler]
pub async fn join(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<Json<JoinResponse>, ApiError> {
    let state = app(depot).clone();
    let presented = bearer_token(req);
    tokens::check_join_token(state.config.node_join_token.expose(), presented.as_deref())?;
    let body: JoinRequest = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    let input = validate::join(&body).map_err(ApiError::validation)?;
    let joined = store::join(&state.db, &input).await?;
    let how = match joined.kind {
        JoinKind::Inserted => "new node",
        JoinKind::RejoinedById => "rejoined by id",
        JoinKind::RejoinedByName => "rejoined by name",
    };
    tracing::info!(
        node_id = %joined.id,
        node = %input.name,
        region = %input.region,
        agent_version = %input.agent_version,
        how,
        "node joined"
    );
    // The answer carries a credential: no cache may keep it.
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(Json(JoinResponse {
        node_id: joined.id,
        node_token: joined.token,
        queue: node_queue(joined.id),
        heartbeat_interval_secs: state.config.node_heartbeat_interval_secs,
    }))
}

/// `POST /internal/nodes/{id}/heartbeat`: capacity, labels, version and pods; marks the node
/// healthy.
#[handler]
pub async fn heartbeat(req: &mut Request, depot: &mut Depot) -> Result<Json<HeartbeatAnswer>, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let body: Heartbeat = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    let input = validate::heartbeat(&body).map_err(ApiError::validation)?;
    let peer_addr = body
        .peer_addr
        .as_deref()
        .map(crate::pods::validate::peer_addr)
        .transpose()
        .map_err(ApiError::validation)?;
    store::record_heartbeat(&app(depot).db, &node, &input).await?;
    store::record_peer_addr(&app(depot).db, &node, peer_addr.as_deref()).await?;
    let ssh_addr = body
        .ssh_addr
        .as_deref()
        .map(crate::pods::validate::peer_addr)
        .transpose()
        .map_err(ApiError::validation)?;
    store::record_ssh_addr(&app(depot).db, &node, ssh_addr.as_deref()).await?;
    Ok(Json(HeartbeatAnswer {
        node_id: node.id,
        status: NodeStatus::Healthy,
    }))
}

/// `POST /internal/nodes/{id}/reports`: a batch of pod state changes, stored together.
#[handler]
pub async fn reports(req: &mut Request, depot: &mut Depot) -> Result<Json<ReportsAnswer>, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let body: ReportBatch = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    if body.reports.len() > MAX_REPORTS_PER_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_reports",
            format!(
                "a batch carries at most {MAX_REPORTS_PER_BATCH} reports (got {}); send several batches",
                body.reports.len()
            ),
        ));
    }
    let inputs = body
        .reports
        .iter()
        .enumerate()
        .map(|(index, report)| validate::report(index, report))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::validation)?;
    let accepted = store::record_reports(&app(depot).db, &node, &inputs).await?;
    // The reports move the pods they are about (only pods placed on this node).
    let moves: Vec<crate::pods::store::Report<'_>> = inputs
        .iter()
        .map(|r| crate::pods::store::Report {
            pod_id: r.pod_id,
            generation: r.generation,
            state: r.state,
            reason: r.reason.as_deref(),
            exit_code: r.exit_code,
            ip: r.ip.as_deref(),
        })
        .collect();
    crate::pods::store::apply_reports(&app(depot).db, node.id, &moves).await?;
    Ok(Json(ReportsAnswer { accepted }))
}

/// `GET /internal/nodes/{id}/routes[?wait=<seconds>]`: the ingress routes of the pods on the
/// other nodes, with `ETag: "<version>"`. With `If-None-Match` naming the current version the
/// answer is 304 — after waiting up to `wait` seconds (at most 25) for the routes to change,
/// when asked to. See `nodes::routes` for what a route says and how fresh it is.
#[handler]
pub async fn routes(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    let node = authenticate_node(req, depot).await?;
    let state = app(depot);
    let known = if_none_match(req);
    let wait = req
        .query::<u64>("wait")
        .map_or(std::time::Duration::ZERO, std::time::Duration::from_secs)
        .min(ingress_routes::MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let snapshot = loop {
        let snapshot = state.ingress_routes.snapshot(&state.db).await?;
        let now = tokio::time::Instant::now();
        if known.as_deref() != Some(snapshot.version()) || now >= deadline {
            break snapshot;
        }
        tokio::time::sleep(ingress_routes::REFRESH.min(deadline - now)).await;
    };
    let etag = HeaderValue::from_str(&format!("\"{}\"", snapshot.version())).map_err(|_| ApiError::internal())?;
    res.headers_mut().insert("etag", etag);
    // The answer carries the hop token: no cache may keep it.
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    if known.as_deref() == Some(snapshot.version()) {
        res.status_code(StatusCode::NOT_MODIFIED);
    } else {
        res.render(Json(snapshot.for_node(node.id)));
    }
    Ok(())
}

/// `POST /internal/nodes/{id}/metrics`: a batch of pod samples (`instapod_common::pod_metrics`).
/// Samples of pods not placed on this node, older than an hour or from the future are ignored;
/// a sample already stored (same pod and time) is not counted twice.
#[handler]
pub async fn metrics(req: &mut Request, depot: &mut Depot) -> Result<Json<ReportsAnswer>, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let body: SampleBatch = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    if body.samples.len() > MAX_SAMPLES_PER_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_samples",
            format!(
                "a batch carries at most {MAX_SAMPLES_PER_BATCH} samples (got {}); send several batches",
                body.samples.len()
            ),
        ));
    }
    if let Some(bad) = body.samples.iter().find(|s| {
        ![
            s.cpu_seconds_total,
            s.cpu_cores,
            s.cpu_limit_cores,
            s.rx_bytes_per_second,
            s.tx_bytes_per_second,
        ]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
    }) {
        return Err(ApiError::validation(format!(
            "the sample of pod {} has a negative or non-finite value",
            bad.pod_id
        )));
    }
    let accepted = crate::pods::metrics::ingest(&app(depot).db, node.id, &body.samples).await?;
    Ok(Json(ReportsAnswer { accepted }))
}

/// The version named by `If-None-Match` (one entity tag, quotes and a weak prefix removed).
pub(crate) fn if_none_match(req: &Request) -> Option<String> {
    let raw = req.headers().get("if-none-match")?.to_str().ok()?.trim();
    let tag = raw.strip_prefix("W/").unwrap_or(raw);
    Some(tag.trim_matches('"').to_string())
}

/// `POST /internal/nodes/{id}/ssh/authorize`: may this (signature-verified) key log into this
/// username? Asked by the node's SSH gateway at every authentication attempt, so a removed key
/// stops working at once. 200 with the pod, or 403 `ssh_denied` (unknown username, key not
/// registered on that pod, pod deleted, or a username naming several pods).
#[handler]
pub async fn ssh_authorize(req: &mut Request, depot: &mut Depot) -> Result<Json<SshAuthorization>, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let body: SshAuthorizeRequest = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    let denied = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "ssh_denied",
            "this key may not log into this pod",
        )
    };
    let fingerprint = crate::ssh::keys::fingerprint_of(&body.public_key).ok_or_else(denied)?;
    if body.username.len() > 200 {
        return Err(denied());
    }
    let Some(authorized) = crate::ssh::store::authorize(&app(depot).db, &body.username, &fingerprint).await? else {
        tracing::info!(node_id = %node.id, username = %body.username, %fingerprint, "ssh key refused");
        return Err(denied());
    };
    Ok(Json(SshAuthorization {
        pod_id: authorized.pod_id,
        pod_name: authorized.pod_name,
        on_this_node: authorized.node_id == Some(node.id),
        node_name: authorized.node_name,
        node_ssh_addr: authorized.node_ssh_addr,
    }))
}
