//! Fleet membership: joining the control plane, heartbeats, and delivering pod reports to its
//! `/internal` API.
//!
//! *Invariants.* The node id and token are saved in `<state>/node.json` (mode 0600) on the first
//! join; later starts rejoin with the saved id so the node keeps its identity. Reports are
//! delivered in order, retried with backoff while the control plane is away, and bounded in
//! memory (the oldest are dropped past [`MAX_PENDING_REPORTS`]; heartbeats carry every pod's
//! current state anyway).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use instapod_common::node::{Heartbeat, JoinRequest, JoinResponse, PodReport, ReportBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::config::Config;
use crate::dirs::write_atomic;
use crate::pods::Pods;

pub const MAX_PENDING_REPORTS: usize = 10_000;
const REPORT_BATCH: usize = 200;

/// The node's identity, saved in the state directory.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub node_id: Uuid,
    pub node_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// A client of the control plane's `/internal` API.
#[derive(Debug, Clone)]
pub struct Fleet {
    http: reqwest::Client,
    base: String,
    pub credentials: Credentials,
    pub heartbeat_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot reach the control plane at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the control plane refused {what} ({status}): {body}")]
    Refused {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("cannot save the node credentials: {0}")]
    Storage(#[from] std::io::Error),
}

fn http_client() -> reqwest::Client {
    // reqwest uses rustls without a bundled provider: the workspace uses aws-lc-rs only.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap_or_default()
}

async fn post<T: Serialize>(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &T,
    what: &'static str,
) -> Result<reqwest::Response, FleetError> {
    let response = http
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .map_err(|err| FleetError::Unreachable {
            url: url.to_string(),
            reason: crate::runtime::error_chain(&err),
        })?;
    if response.status().is_success() {
        Ok(response)
    } else {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        Err(FleetError::Refused { what, status, body })
    }
}

impl Fleet {
    /// Joins (or rejoins with the saved id) and saves the credentials.
    pub async fn join(config: &Config, credentials_file: &Path) -> Result<Fleet, FleetError> {
        let http = http_client();
        let base = config.control_plane_url.trim_end_matches('/').to_string();
        let saved: Option<Credentials> = std::fs::read(credentials_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let request = JoinRequest {
            name: config.node_name(),
            region: config.region.clone(),
            labels: config.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            node_id: saved.as_ref().map(|c| c.node_id),
        };
        let url = format!("{base}/internal/nodes/join");
        let response = post(&http, &url, config.join_token.expose(), &request, "the join").await?;
        let joined: JoinResponse = response.json().await.map_err(|err| FleetError::Unreachable {
            url: url.clone(),
            reason: format!("unreadable join answer: {err}"),
        })?;
        let credentials = Credentials {
            node_id: joined.node_id,
            node_token: joined.node_token,
        };
        let bytes = serde_json::to_vec(&credentials).map_err(std::io::Error::other)?;
        write_atomic(credentials_file, &bytes)?;
        set_private(credentials_file)?;
        Ok(Fleet {
            http,
            base,
            credentials,
            heartbeat_interval: Duration::from_secs(joined.heartbeat_interval_secs.max(1)),
        })
    }

    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<(), FleetError> {
        let url = format!("{}/internal/nodes/{}/heartbeat", self.base, self.credentials.node_id);
        post(
            &self.http,
            &url,
            &self.credentials.node_token,
            heartbeat,
            "the heartbeat",
        )
        .await?;
        Ok(())
    }

    pub async fn report(&self, reports: &[PodReport]) -> Result<(), FleetError> {
        let url = format!("{}/internal/nodes/{}/reports", self.base, self.credentials.node_id);
        let batch = ReportBatch {
            reports: reports.to_vec(),
        };
        post(&self.http, &url, &self.credentials.node_token, &batch, "the reports").await?;
        Ok(())
    }
}

fn set_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Sends a heartbeat every interval until shutdown.
pub async fn heartbeat_loop(fleet: Arc<Fleet>, config: Arc<Config>, pods: Pods, mut shutdown: watch::Receiver<bool>) {
    let total = crate::capacity::total(&config.state_dir);
    let allocatable = crate::capacity::allocatable(&total, &config.reserved);
    loop {
        let heartbeat = Heartbeat {
            total,
            allocatable,
            region: config.region.clone(),
            labels: config.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            pods: pods.summary(),
        };
        if let Err(err) = fleet.heartbeat(&heartbeat).await {
            tracing::warn!(error = %err, "heartbeat failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(fleet.heartbeat_interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Delivers reports in order, in batches, retrying while the control plane is away.
pub async fn report_loop(
    fleet: Arc<Fleet>,
    mut reports: mpsc::UnboundedReceiver<PodReport>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pending: std::collections::VecDeque<PodReport> = std::collections::VecDeque::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        if pending.is_empty() {
            tokio::select! {
                report = reports.recv() => match report {
                    Some(report) => pending.push_back(report),
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
        while let Ok(report) = reports.try_recv() {
            pending.push_back(report);
        }
        while pending.len() > MAX_PENDING_REPORTS {
            pending.pop_front();
        }
        let batch: Vec<PodReport> = pending.iter().take(REPORT_BATCH).cloned().collect();
        match fleet.report(&batch).await {
            Ok(()) => {
                pending.drain(..batch.len());
                backoff = Duration::from_millis(200);
            }
            Err(err) => {
                tracing::warn!(error = %err, pending = pending.len(), "reports not delivered; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
