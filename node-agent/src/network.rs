//! Pod networking: one network namespace per pod, attached to the node's bridge by Debian's
//! CNI plugins (`bridge` + `host-local` IPAM), outbound NAT by one node-wide masquerade rule,
//! with the pod's bridge port isolated so that pods cannot reach each other.
//!
//! *Design.* CNI plugins are executables by specification: the agent runs them with an argv
//! and the CNI environment, and the network config on stdin (no shell). The namespace is made
//! with iproute2 (`ip netns add`), and the host side of the pod's veth is marked `isolated` on
//! the bridge (`/sys/class/net/<veth>/brport/isolated`, or `bridge link set dev <veth> isolated
//! on` where sysfs lacks it): isolated ports can talk to the bridge (the host, the gateway to
//! the internet) but not to each other.
//!
//! Outbound NAT is one `iptables -t nat` rule per node (`-s <subnet> ! -d <subnet> -j
//! MASQUERADE`, tagged with the bridge's name), added once per agent process if missing —
//! not the bridge plugin's `ipMasq`, which adds a chain and three rules per pod: every
//! iptables call rewrites the whole table, so per-pod rules made each start slower than the
//! last (a 50-pod burst spent three times as long in CNI) and a pod whose DEL never ran left
//! its chain behind for good.
//!
//! *Invariants.* Setting up is idempotent: a pod whose namespace exists and whose attachment
//! was recorded is left alone; a namespace without a record (the agent died between the two)
//! is torn down (CNI DEL frees the address) and set up again. Teardown tolerates every piece
//! being missing already.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;
use uuid::Uuid;

/// Where network namespaces made by `ip netns add` live.
const NETNS_DIR: &str = "/run/netns";

/// The node's CNI settings.
#[derive(Debug, Clone)]
pub struct Network {
    pub bridge: String,
    pub subnet: String,
    pub cni_bin_dir: PathBuf,
    /// host-local's allocation store.
    pub ipam_dir: PathBuf,
    /// Set once the node's masquerade rule is known to be in place.
    nat: Arc<OnceCell<()>>,
}

/// A pod's attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub netns: PathBuf,
    pub ip: String,
    pub host_veth: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network setup failed: {0}")]
    Failed(String),
}

#[derive(Debug, Deserialize)]
struct CniResult {
    #[serde(default)]
    interfaces: Vec<CniInterface>,
    #[serde(default)]
    ips: Vec<CniIp>,
}

#[derive(Debug, Deserialize)]
struct CniInterface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CniIp {
    address: String,
}

/// The namespace name of a pod.
pub fn netns_name(pod_id: Uuid) -> String {
    format!("instapod-{}", pod_id.simple())
}

pub fn netns_path(pod_id: Uuid) -> PathBuf {
    Path::new(NETNS_DIR).join(netns_name(pod_id))
}

async fn run(program: &Path, args: &[&str]) -> Result<String, NetworkError> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|err| NetworkError::Failed(format!("cannot run {}: {err}", program.display())))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NetworkError::Failed(format!(
            "{} {}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The arguments after `iptables -t nat -A|-C|-D` of the node's masquerade rule: traffic from
/// the pods' subnet to anywhere else leaves with the node's address.
pub fn masquerade_rule(bridge: &str, subnet: &str) -> Vec<String> {
    [
        "POSTROUTING",
        "-s",
        subnet,
        "!",
        "-d",
        subnet,
        "-m",
        "comment",
        "--comment",
        &format!("instapod {bridge}"),
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Marks the bridge port `host_veth` isolated: through sysfs (no process to start), or with
/// iproute2's `bridge` where the kernel has no `brport/isolated` file.
async fn isolate_port(host_veth: &str) -> Result<(), NetworkError> {
    let flag = Path::new("/sys/class/net").join(host_veth).join("brport/isolated");
    match tokio::fs::write(&flag, b"1").await {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => run(
            Path::new("bridge"),
            &["link", "set", "dev", host_veth, "isolated", "on"],
        )
        .await
        .map(|_| ()),
        Err(err) => Err(NetworkError::Failed(format!("{}: {err}", flag.display()))),
    }
}

impl Network {
    pub fn new(bridge: String, subnet: String, cni_bin_dir: PathBuf, ipam_dir: PathBuf) -> Network {
        Network {
            bridge,
            subnet,
            cni_bin_dir,
            ipam_dir,
            nat: Arc::new(OnceCell::new()),
        }
    }

    /// Adds the node's masquerade rule unless it is there (checked once per process).
    async fn ensure_nat(&self) -> Result<(), NetworkError> {
        self.nat
            .get_or_try_init(|| async {
                let rule = masquerade_rule(&self.bridge, &self.subnet);
                let args = |op: &'static str| {
                    let mut args = vec!["-w", "5", "-t", "nat", op];
                    args.extend(rule.iter().map(String::as_str));
                    args
                };
                let iptables = Path::new("iptables");
                if run(iptables, &args("-C")).await.is_err() {
                    run(iptables, &args("-A")).await?;
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    fn conf(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("instapod-{}", self.bridge),
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir,
            }
        })
    }

    async fn cni(&self, command: &str, pod_id: Uuid, netns: &Path) -> Result<String, NetworkError> {
        let plugin = self.cni_bin_dir.join("bridge");
        let mut child = tokio::process::Command::new(&plugin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod_id.to_string())
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_bin_dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| NetworkError::Failed(format!("cannot run CNI plugin {}: {err}", plugin.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            let conf = serde_json::to_vec(&self.conf()).map_err(|err| NetworkError::Failed(err.to_string()))?;
            stdin
                .write_all(&conf)
                .await
                .map_err(|err| NetworkError::Failed(format!("writing to the CNI plugin: {err}")))?;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|err| NetworkError::Failed(format!("CNI plugin: {err}")))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(NetworkError::Failed(format!(
                "CNI {command}: {} {}",
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    /// Attaches pod `pod_id`, or returns its existing attachment.
    pub async fn setup(&self, pod_id: Uuid, existing: Option<&Attachment>) -> Result<Attachment, NetworkError> {
        let netns = netns_path(pod_id);
        if let Some(existing) = existing
            && netns.exists()
            && existing.netns == netns
        {
            return Ok(existing.clone());
        }
        if netns.exists() {
            self.teardown(pod_id).await?;
        }
        self.ensure_nat().await?;
        let ip = Path::new("ip");
        run(ip, &["netns", "add", &netns_name(pod_id)]).await?;
        let attached = async {
            let out = self.cni("ADD", pod_id, &netns).await?;
            let result: CniResult = serde_json::from_str(&out)
                .map_err(|err| NetworkError::Failed(format!("unreadable CNI result ({err}): {out}")))?;
            let address = result
                .ips
                .first()
                .map(|ip| ip.address.split('/').next().unwrap_or_default().to_string())
                .ok_or_else(|| NetworkError::Failed(format!("CNI gave no address: {out}")))?;
            let host_veth = result
                .interfaces
                .iter()
                .find(|i| i.sandbox.as_deref().unwrap_or("").is_empty() && i.name != self.bridge)
                .map(|i| i.name.clone())
                .ok_or_else(|| NetworkError::Failed(format!("CNI named no host interface: {out}")))?;
            isolate_port(&host_veth).await?;
            Ok(Attachment {
                netns: netns.clone(),
                ip: address,
                host_veth,
            })
        }
        .await;
        if attached.is_err() {
            let _ = self.teardown(pod_id).await;
        }
        attached
    }

    /// Detaches pod `pod_id` and deletes its namespace; missing pieces are fine.
    pub async fn teardown(&self, pod_id: Uuid) -> Result<(), NetworkError> {
        let netns = netns_path(pod_id);
        // DEL frees the address even when the namespace is gone.
        let deleted = self.cni("DEL", pod_id, &netns).await;
        if netns.exists() {
            run(Path::new("ip"), &["netns", "delete", &netns_name(pod_id)]).await?;
        }
        deleted.map(|_| ())
    }
}
