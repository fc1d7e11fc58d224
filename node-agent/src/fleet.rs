//! Fleet membership: joining the control plane, heartbeats, and delivering pod reports to its
//! `/internal` API.
//!
//! *Invariants.* The node id and token are saved in `<state>/node.json` (mode 0600) on the first
//! join; later starts rejoin with the saved id so the node keeps its identity. Reports are
//! delivered in order, retried with backoff while the control plane is away, and bounded in
//! memory (the oldest are dropped past [`MAX_PENDING_REPORTS`]; heartbeats carry every pod's
//! current state anyway). When the control plane stops accepting the node token (401: a later
//! join replaced it), the agent joins again with its saved id. A batch of reports refused as
//! malformed (another 4xx) is logged and dropped, so it cannot block the reports after it.
//!
//! *Ingress.* The join and every heartbeat carry the address other nodes reach this node's
//! ingress at ([`advertised_ingress`]); [`Fleet::ingress_routes`] long-polls the routes of the
//! other nodes' pods (the worker that applies them is `ingress::feed`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use instapod_common::node::{
    Heartbeat, IngressRoutes, JoinRequest, JoinResponse, PodReport, ReportBatch, SshAuthorization, SshAuthorizeRequest,
};
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
#[derive(Debug)]
pub struct Fleet {
    http: reqwest::Client,
    base: String,
    config: Config,
    credentials_file: PathBuf,
    credentials: RwLock<Credentials>,
    pub heartbeat_interval: Duration,
    /// Where other nodes reach this node's ingress, as sent at join.
    pub ingress_addr: Option<SocketAddr>,
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
            reason: crate::error_chain(&err),
        })?;
    if response.status().is_success() {
        Ok(response)
    } else {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        Err(FleetError::Refused { what, status, body })
    }
}

impl FleetError {
    /// The control plane no longer accepts this node's token.
    fn is_unauthorized(&self) -> bool {
        matches!(self, FleetError::Refused { status: 401, .. })
    }

    /// The control plane refused the request itself (not an outage): retrying cannot help.
    pub(crate) fn is_rejected(&self) -> bool {
        matches!(self, FleetError::Refused { status, .. } if (400..500).contains(status) && *status != 401 && *status != 429)
    }
}

/// The node's name as the fleet knows it: a DNS label (a fully qualified hostname keeps its
/// first label), lowercased.
pub fn fleet_name(name: &str) -> String {
    name.split('.').next().unwrap_or(name).to_ascii_lowercase()
}

impl Fleet {
    /// Joins (or rejoins with the saved id) and saves the credentials.
    pub async fn join(config: &Config, credentials_file: &Path) -> Result<Fleet, FleetError> {
        let http = http_client();
        let base = config.control_plane_url.trim_end_matches('/').to_string();
        let ingress_addr = advertised_ingress(config).await;
        let (credentials, interval) = join_once(&http, &base, config, ingress_addr, credentials_file).await?;
        Ok(Fleet {
            http,
            base,
            config: config.clone(),
            credentials_file: credentials_file.to_path_buf(),
            credentials: RwLock::new(credentials),
            heartbeat_interval: interval,
            ingress_addr,
        })
    }

    /// The node's id (stable across rejoins).
    pub fn node_id(&self) -> Uuid {
        self.credentials().node_id
    }

    fn credentials(&self) -> Credentials {
        self.credentials.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Joins again with the saved id after the token was refused.
    async fn rejoin(&self) -> Result<(), FleetError> {
        let (credentials, _) = join_once(
            &self.http,
            &self.base,
            &self.config,
            self.ingress_addr,
            &self.credentials_file,
        )
        .await?;
        tracing::info!(node_id = %credentials.node_id, "rejoined the fleet with a new node token");
        *self.credentials.write().unwrap_or_else(|p| p.into_inner()) = credentials;
        Ok(())
    }

    /// Posts `body` with the node token ([`Fleet::send_as_node`]).
    async fn post_as_node<T: Serialize>(&self, path: &str, body: &T, what: &'static str) -> Result<(), FleetError> {
        self.send_as_node(reqwest::Method::POST, path, Some(body), what)
            .await
            .map(drop)
    }

    /// The routes of the other nodes' pods: `None` when they are still those of
    /// `known_version` after waiting up to `wait` for a change (304).
    pub async fn ingress_routes(
        &self,
        known_version: Option<&str>,
        wait: Duration,
    ) -> Result<Option<IngressRoutes>, FleetError> {
        self.long_poll("routes", "the ingress routes", known_version, wait)
            .await
    }

    /// The served custom domains: `None` when they are still those of `known_version` after
    /// waiting up to `wait` for a change (304).
    pub async fn served_domains(
        &self,
        known_version: Option<&str>,
        wait: Duration,
    ) -> Result<Option<instapod_common::domains::ServedDomains>, FleetError> {
        self.long_poll("domains", "the served domains", known_version, wait)
            .await
    }

    /// `GET /internal/nodes/{id}/{path}?wait=<s>` with `If-None-Match`: `None` on 304.
    async fn long_poll<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &'static str,
        known_version: Option<&str>,
        wait: Duration,
    ) -> Result<Option<T>, FleetError> {
        let response = self
            .request_as_node(what, |node| {
                let request = self
                    .http
                    .get(format!("{node}/{path}?wait={}", wait.as_secs()))
                    // The control plane holds the request up to `wait`; leave room for the answer.
                    .timeout(wait + Duration::from_secs(10));
                match known_version {
                    Some(version) => request.header(reqwest::header::IF_NONE_MATCH, format!("\"{version}\"")),
                    None => request,
                }
            })
            .await?;
        if response.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let url = response.url().to_string();
        let answer = response.json().await.map_err(|err| FleetError::Unreachable {
            url,
            reason: format!("unreadable {what}: {}", crate::error_chain(&err)),
        })?;
        Ok(Some(answer))
    }

    /// Sends `method` to `/internal/nodes/{id}/{path}` with the node token (and `body` as
    /// JSON); on 401 joins again once and resends. A status other than 2xx (or 304) is
    /// [`FleetError::Refused`].
    pub async fn send_as_node<T: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&T>,
        what: &'static str,
    ) -> Result<reqwest::Response, FleetError> {
        self.request_as_node(what, |node| {
            let request = self.http.request(method.clone(), format!("{node}/{path}"));
            match body {
                Some(body) => request.json(body),
                None => request,
            }
        })
        .await
    }

    /// Sends the request `build` makes from this node's base URL (`…/internal/nodes/{id}`),
    /// with the node token; on 401 joins again once and resends. The answer when its status is
    /// 2xx or 304, else [`FleetError::Refused`] (`what` names the request).
    async fn request_as_node(
        &self,
        what: &'static str,
        build: impl Fn(String) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, FleetError> {
        let mut rejoined = false;
        loop {
            let credentials = self.credentials();
            let node = format!("{}/internal/nodes/{}", self.base, credentials.node_id);
            let request = build(node.clone())
                .bearer_auth(&credentials.node_token)
                .build()
                .map_err(|err| FleetError::Unreachable {
                    url: node.clone(),
                    reason: crate::error_chain(&err),
                })?;
            let url = request.url().to_string();
            let response = self
                .http
                .execute(request)
                .await
                .map_err(|err| FleetError::Unreachable {
                    url,
                    reason: crate::error_chain(&err),
                })?;
            let status = response.status();
            if status.is_success() || status == reqwest::StatusCode::NOT_MODIFIED {
                return Ok(response);
            }
            let body = response.text().await.unwrap_or_default();
            let err = FleetError::Refused {
                what,
                status: status.as_u16(),
                body,
            };
            if err.is_unauthorized() && !rejoined {
                tracing::warn!(error = %err, "the node token was refused; joining again");
                self.rejoin().await?;
                rejoined = true;
                continue;
            }
            return Err(err);
        }
    }

    /// Asks the control plane whether the (signature-verified) `public_key` may log into the
    /// pod named by the SSH `username`: `Ok(None)` when it may not (403). Never cached: a
    /// removed key is refused at the next attempt.
    pub async fn ssh_authorize(
        &self,
        username: &str,
        public_key: &str,
    ) -> Result<Option<SshAuthorization>, FleetError> {
        let body = SshAuthorizeRequest {
            username: username.to_string(),
            public_key: public_key.to_string(),
        };
        let response = match self
            .send_as_node(
                reqwest::Method::POST,
                "ssh/authorize",
                Some(&body),
                "the ssh authorization",
            )
            .await
        {
            Ok(response) => response,
            Err(FleetError::Refused { status: 403, .. }) => return Ok(None),
            Err(err) => return Err(err),
        };
        let url = response.url().to_string();
        let answer = response.json().await.map_err(|err| FleetError::Unreachable {
            url,
            reason: format!("unreadable ssh authorization: {}", crate::error_chain(&err)),
        })?;
        Ok(Some(answer))
    }

    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<(), FleetError> {
        self.post_as_node("heartbeat", heartbeat, "the heartbeat").await
    }

    pub async fn report(&self, reports: &[PodReport]) -> Result<(), FleetError> {
        let batch = ReportBatch {
            reports: reports.to_vec(),
        };
        self.post_as_node("reports", &batch, "the reports").await
    }

    /// Pushes a batch of pod samples (the history the control plane keeps).
    pub async fn push_samples(&self, batch: &instapod_common::pod_metrics::SampleBatch) -> Result<(), FleetError> {
        self.post_as_node("metrics", batch, "the pod samples").await
    }
}

/// One join: sends the saved id when there is one and saves what the control plane answers.
async fn join_once(
    http: &reqwest::Client,
    base: &str,
    config: &Config,
    ingress_addr: Option<SocketAddr>,
    credentials_file: &Path,
) -> Result<(Credentials, Duration), FleetError> {
    let saved: Option<Credentials> = std::fs::read(credentials_file)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let request = JoinRequest {
        name: fleet_name(&config.node_name()),
        region: config.region.clone(),
        labels: config.labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        node_id: saved.as_ref().map(|c| c.node_id),
        ingress_addr: ingress_addr.map(|addr| addr.to_string()),
    };
    let url = format!("{base}/internal/nodes/join");
    let response = post(http, &url, config.join_token.expose(), &request, "the join").await?;
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
    Ok((credentials, Duration::from_secs(joined.heartbeat_interval_secs.max(1))))
}

/// Where other nodes reach this node's ingress: `ingress_advertise`, else `ingress_listen` when
/// it names an address, else the address this machine uses towards the control plane (a UDP
/// socket "connected" to it: no packet is sent) with `ingress_listen`'s port. `None` (logged)
/// when none can be found; the node's pods then answer 503 on the other nodes.
pub async fn advertised_ingress(config: &Config) -> Option<SocketAddr> {
    if let Some(addr) = config.ingress_advertise {
        return Some(addr);
    }
    let listen = config.ingress_listen;
    if !listen.ip().is_unspecified() {
        return Some(listen);
    }
    let target = reqwest::Url::parse(&config.control_plane_url).ok().and_then(|url| {
        let host = url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Some((host, url.port_or_known_default()?))
    });
    let local_ip = async {
        let (host, port) = target?;
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(listen.ip(), 0))
            .await
            .ok()?;
        socket.connect((host.as_str(), port)).await.ok()?;
        socket.local_addr().ok().map(|addr| addr.ip())
    }
    .await;
    match local_ip {
        Some(ip) if !ip.is_unspecified() => Some(SocketAddr::new(ip, listen.port())),
        _ => {
            tracing::warn!(
                %listen,
                control_plane_url = %config.control_plane_url,
                "cannot tell which address other nodes reach this ingress at; set ingress_advertise"
            );
            None
        }
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
    let peer_addr = config.peer_addr();
    let ssh_addr = config.ssh_addr();
    loop {
        let heartbeat = Heartbeat {
            total,
            allocatable,
            region: config.region.clone(),
            labels: config.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            pods: pods.summary(),
            ingress_addr: fleet.ingress_addr.map(|addr| addr.to_string()),
            peer_addr: peer_addr.clone(),
            ssh_addr: ssh_addr.clone(),
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
            Err(err) if err.is_rejected() => {
                tracing::error!(error = %err, dropped = batch.len(), "the control plane refused a batch of reports; dropped");
                pending.drain(..batch.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_names_are_the_first_dns_label_in_lowercase() {
        assert_eq!(fleet_name("Node-1.example.com"), "node-1");
        assert_eq!(fleet_name("vm"), "vm");
    }

    #[tokio::test]
    async fn the_advertised_ingress_is_configured_or_derived_from_the_listener() {
        let check = async |advertise: Option<&str>, listen: &str, control_plane: &str| {
            let config = Config {
                ingress_advertise: advertise.map(|a| a.parse().expect("address")),
                ingress_listen: listen.parse().expect("address"),
                control_plane_url: control_plane.to_string(),
                ..Config::default()
            };
            advertised_ingress(&config).await.map(|a| a.to_string())
        };
        assert_eq!(
            check(Some("192.0.2.1:8080"), "0.0.0.0:80", "http://127.0.0.1:8080").await,
            Some("192.0.2.1:8080".into())
        );
        assert_eq!(
            check(None, "127.0.0.1:8088", "http://127.0.0.1:8080").await,
            Some("127.0.0.1:8088".into())
        );
        // Listening everywhere: the address towards the control plane (loopback here).
        assert_eq!(
            check(None, "0.0.0.0:8089", "http://127.0.0.1:8080").await,
            Some("127.0.0.1:8089".into())
        );
        assert_eq!(check(None, "0.0.0.0:80", "not a url").await, None);
    }

    #[test]
    fn only_client_errors_other_than_401_and_429_drop_reports() {
        let refused = |status| FleetError::Refused {
            what: "x",
            status,
            body: String::new(),
        };
        assert!(refused(400).is_rejected() && refused(413).is_rejected());
        assert!(!refused(401).is_rejected() && !refused(429).is_rejected() && !refused(503).is_rejected());
        assert!(refused(401).is_unauthorized());
    }
}
