//! The SSH gateway: users log into their pods with a stock OpenSSH client
//! (`ssh -p <port> <pod>-<team>@<node>`), and every session runs *inside* the pod's container
//! through containerd's exec (`runtime::exec`). Nothing ever runs on the node itself.
//!
//! *Authentication.* Public keys only. The username names the pod (the first label of its
//! platform hostname, or its id). russh calls [`Handler::auth_publickey`] only after the client
//! proved the key with a signature; the gateway then asks the control plane
//! (`POST /internal/nodes/{id}/ssh/authorize`, node token) whether that key is registered on
//! that pod — at every attempt, never cached, so a removed key is refused at once. A key merely
//! offered (no signature) is never accepted. Failed attempts are counted per source IP
//! ([`rate_limit`]); a blocked address is refused without asking.
//!
//! *Refusals.* An unknown pod or key fails authentication ("Permission denied"). A known pod
//! that cannot take a session here — stopped, not yet running, deleted, or placed on another
//! node — gets a message on stderr naming the reason (and for another node, its gateway) and
//! exit status 1; no process is started.
//!
//! *Sessions.* `shell` runs `/bin/sh` from the pod's image, `exec` runs `/bin/sh -c <command>`;
//! with a `pty-req` the process gets a terminal of the requested size and `TERM`, resized on
//! `window-change`. Input EOF closes the process's stdin; its exit status is passed back. A
//! channel closed by the client (or a dropped connection) kills the process.
//!
//! *Limitations.* No SFTP/subsystems, port forwarding, agent or X11 forwarding. Connections
//! that never authenticate are bounded only by russh's authentication attempts and timeouts.

pub mod host_key;
pub mod rate_limit;
mod session;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instapod_common::node::{NodePodState, SshAuthorization};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::sync::{Semaphore, mpsc};

use crate::config::SshConfig;
use crate::fleet::Fleet;
use crate::pods::{Desired, Pods};
use rate_limit::AuthLimiter;
use session::{Input, SessionRequest};

/// What every connection shares.
#[derive(Debug)]
pub struct Gateway {
    pods: Pods,
    fleet: Arc<Fleet>,
    limiter: AuthLimiter,
    sessions: Arc<Semaphore>,
    /// Where the FIFOs of exec'd processes live (`<state>/ssh/exec`).
    fifo_root: PathBuf,
}

impl Gateway {
    pub fn new(config: &SshConfig, pods: Pods, fleet: Arc<Fleet>) -> std::io::Result<Gateway> {
        let fifo_root = pods.dirs().root().join("ssh").join("exec");
        // FIFOs of sessions that were running when the agent stopped are useless now.
        let _ = std::fs::remove_dir_all(&fifo_root);
        std::fs::create_dir_all(&fifo_root)?;
        // Every series exists from the start (zero), so dashboards and alerts see them.
        for outcome in ["exited_zero", "exited_nonzero", "refused", "error"] {
            metrics::counter!("instapod_node_agent_ssh_sessions_total", "outcome" => outcome).increment(0);
        }
        for reason in ["denied", "rate_limited", "control_plane_unavailable"] {
            metrics::counter!("instapod_node_agent_ssh_auth_failures_total", "reason" => reason).increment(0);
        }
        metrics::gauge!("instapod_node_agent_ssh_sessions_active").set(0.0);
        Ok(Gateway {
            pods,
            fleet,
            limiter: AuthLimiter::new(
                config.max_auth_failures,
                Duration::from_secs(config.failure_window_secs),
                Duration::from_secs(config.block_secs),
            ),
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            fifo_root,
        })
    }
}

/// Runs the gateway on `config.listen` until the process ends (the listener is re-opened after
/// an accept failure).
pub async fn run(config: SshConfig, host_key: russh::keys::PrivateKey, gateway: Arc<Gateway>) {
    let russh_config = Arc::new(russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 6,
        inactivity_timeout: Some(Duration::from_secs(3600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        nodelay: true,
        ..Default::default()
    });
    loop {
        match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => {
                tracing::info!(listen = %config.listen, "ssh gateway listening");
                let mut acceptor = Acceptor {
                    gateway: gateway.clone(),
                };
                let result = russh::server::Server::run_on_socket(&mut acceptor, russh_config.clone(), &listener).await;
                if let Err(err) = result {
                    tracing::warn!(error = %err, "ssh gateway stopped accepting; restarting");
                }
            }
            Err(err) => tracing::error!(error = %err, listen = %config.listen, "ssh gateway cannot listen; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

struct Acceptor {
    gateway: Arc<Gateway>,
}

impl russh::server::Server for Acceptor {
    type Handler = Connection;

    fn new_client(&mut self, peer_addr: Option<std::net::SocketAddr>) -> Connection {
        Connection {
            gateway: self.gateway.clone(),
            peer_ip: peer_addr.map(|addr| addr.ip()),
            pod: None,
            channels: HashMap::new(),
        }
    }

    fn handle_session_error(&mut self, error: russh::Error) {
        tracing::debug!(error = %error, "ssh connection ended with an error");
    }
}

/// The terminal a channel asked for.
#[derive(Debug, Clone)]
struct Pty {
    term: String,
    columns: u32,
    rows: u32,
}

#[derive(Debug, Default)]
struct ChannelState {
    pty: Option<Pty>,
    /// Set once a process runs: its input, and the session to resize.
    input: Option<mpsc::Sender<Input>>,
    resize: Option<mpsc::UnboundedSender<(u32, u32)>>,
}

/// One client connection.
#[derive(Debug)]
pub struct Connection {
    gateway: Arc<Gateway>,
    peer_ip: Option<IpAddr>,
    /// The pod the client authenticated for.
    pod: Option<SshAuthorization>,
    channels: HashMap<ChannelId, ChannelState>,
}

impl Connection {
    fn blocked(&self) -> bool {
        self.peer_ip
            .is_some_and(|ip| self.gateway.limiter.is_blocked(ip, Instant::now()))
    }

    fn failed(&self, reason: &'static str) {
        metrics::counter!("instapod_node_agent_ssh_auth_failures_total", "reason" => reason).increment(1);
        if let Some(ip) = self.peer_ip
            && self.gateway.limiter.record_failure(ip, Instant::now())
        {
            tracing::warn!(%ip, "ssh authentication failures from this address: blocked for a while");
        }
    }

    /// Why the authenticated pod cannot take a session on this node, if it cannot.
    fn refusal(&self, pod: &SshAuthorization) -> Option<String> {
        if !pod.on_this_node {
            return Some(match (&pod.node_name, &pod.node_ssh_addr) {
                (Some(node), Some(addr)) => format!(
                    "pod {} is on node {node}, not this one: connect to its gateway at {addr}",
                    pod.pod_name
                ),
                (Some(node), None) => format!("pod {} is on node {node}, not this one", pod.pod_name),
                _ => format!("pod {} is not placed on a node; start it first", pod.pod_name),
            });
        }
        let Some(record) = self.gateway.pods.record(pod.pod_id) else {
            return Some(format!(
                "pod {} is not on this node yet; try again shortly",
                pod.pod_name
            ));
        };
        if record.desired == Desired::Deleted {
            return Some(format!("pod {} is being deleted", pod.pod_name));
        }
        if record.state != NodePodState::Running {
            return Some(format!(
                "pod {} is not running (it is {}); start it with POST /api/pods/{}/start",
                pod.pod_name,
                record.state.as_str(),
                pod.pod_name
            ));
        }
        None
    }

    /// Starts the channel's process (`command` None: an interactive shell).
    async fn start(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(pod) = self.pod.clone() else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let pty = match self.channels.get(&channel) {
            // One process per channel.
            Some(state) if state.input.is_none() => state.pty.clone(),
            _ => {
                session.channel_failure(channel)?;
                return Ok(());
            }
        };
        session.channel_success(channel)?;
        let handle = session.handle();
        if let Some(message) = self.refusal(&pod) {
            tracing::info!(pod_id = %pod.pod_id, reason = %message, "ssh session refused");
            metrics::counter!("instapod_node_agent_ssh_sessions_total", "outcome" => "refused").increment(1);
            tokio::spawn(session::refuse(handle, channel, message));
            return Ok(());
        }
        let Ok(permit) = self.gateway.sessions.clone().try_acquire_owned() else {
            metrics::counter!("instapod_node_agent_ssh_sessions_total", "outcome" => "refused").increment(1);
            tokio::spawn(session::refuse(
                handle,
                channel,
                "this node has too many SSH sessions open; try again later".to_string(),
            ));
            return Ok(());
        };
        let (input_tx, input_rx) = mpsc::channel(64);
        let (resize_tx, resize_rx) = mpsc::unbounded_channel();
        if let Some(state) = self.channels.get_mut(&channel) {
            state.input = Some(input_tx);
            state.resize = Some(resize_tx);
        }
        let request = SessionRequest {
            pod_id: pod.pod_id,
            command,
            pty: pty.map(|pty| (pty.term, pty.columns, pty.rows)),
            fifo_root: self.gateway.fifo_root.clone(),
        };
        tracing::info!(
            pod_id = %pod.pod_id,
            peer = ?self.peer_ip,
            interactive = request.command.is_none(),
            pty = request.pty.is_some(),
            "ssh session starting"
        );
        tokio::spawn(session::run(
            self.gateway.pods.runtime().clone(),
            handle,
            channel,
            request,
            input_rx,
            resize_rx,
            permit,
        ));
        Ok(())
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, _user: &str, _offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        // Only lets the client go on to sign; nothing is decided before the signature.
        if self.blocked() {
            metrics::counter!("instapod_node_agent_ssh_auth_failures_total", "reason" => "rate_limited").increment(1);
            return Ok(Auth::reject());
        }
        Ok(Auth::Accept)
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if self.blocked() {
            metrics::counter!("instapod_node_agent_ssh_auth_failures_total", "reason" => "rate_limited").increment(1);
            return Ok(Auth::reject());
        }
        let mut public_key = key.public_key.clone();
        public_key.set_comment("");
        let Ok(line) = public_key.to_openssh() else {
            self.failed("denied");
            return Ok(Auth::reject());
        };
        match self.gateway.fleet.ssh_authorize(user, line.trim()).await {
            Ok(Some(pod)) => {
                tracing::info!(pod_id = %pod.pod_id, peer = ?self.peer_ip, "ssh authenticated");
                self.pod = Some(pod);
                Ok(Auth::Accept)
            }
            Ok(None) => {
                tracing::info!(user, peer = ?self.peer_ip, "ssh key refused for this username");
                self.failed("denied");
                Ok(Auth::reject())
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot ask the control plane about an ssh key; refused");
                metrics::counter!("instapod_node_agent_ssh_auth_failures_total", "reason" => "control_plane_unavailable")
                    .increment(1);
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.pod.is_none() || self.channels.len() >= 10 {
            drop(reply);
            return Ok(());
        }
        self.channels.insert(channel.id(), ChannelState::default());
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(state) if state.input.is_none() => {
                let term = if !term.is_empty() && term.len() <= 64 && term.bytes().all(|b| b.is_ascii_graphic()) {
                    term.to_string()
                } else {
                    "xterm".to_string()
                };
                state.pty = Some(Pty {
                    term,
                    columns: col_width.clamp(1, 1000),
                    rows: row_height.clamp(1, 1000),
                });
                session.channel_success(channel)?;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, None, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(channel, Some(command), session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get_mut(&channel) {
            let size = (col_width.clamp(1, 1000), row_height.clamp(1, 1000));
            match &state.resize {
                Some(resize) => {
                    let _ = resize.send(size);
                }
                None => {
                    if let Some(pty) = state.pty.as_mut() {
                        (pty.columns, pty.rows) = size;
                    }
                }
            }
        }
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(input) = self.channels.get(&channel).and_then(|state| state.input.as_ref()) {
            // Bounded: a process that does not read its input slows the client down.
            let _ = input.send(Input::Data(bytes::Bytes::copy_from_slice(data))).await;
        }
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(input) = self.channels.get(&channel).and_then(|state| state.input.as_ref()) {
            let _ = input.send(Input::Eof).await;
        }
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        // Dropping the input tells the session the client is gone (its process is killed if it
        // still runs).
        self.channels.remove(&channel);
        Ok(())
    }
}
