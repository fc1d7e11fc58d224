//! A node agent for tests: its configuration (own state directory, containerd namespace,
//! bridge, subnet, cgroup parent, metrics and ingress ports, so several nodes share one machine), the
//! pod manager built in-process for runtime tests, and the real `instapod-node-agent` binary
//! for fleet tests.
//!
//! *Invariants.* Each node's bridge and /24 subnet are random (`ipt<6 hex>`, `10.2xx.x.0/24`)
//! and removed when the node is dropped, with its namespace's leftovers; network traffic only
//! goes to these bridges and to loopback. A subnet is never one the host already routes (a
//! bridge left by a killed run keeps its route, and a second bridge on the same subnet would
//! lose its pods' traffic to the first) nor one this process handed out already. Each bridge is
//! recorded with its owner process, and the first node of a run removes the bridges (and pod
//! namespaces) of runs that were killed ([`leftovers`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use instapod_common::node::{PodReport, PodSpec, Resources, RestartPolicy};
use instapod_node_agent::config::Config;
use instapod_node_agent::dirs::Dirs;
use instapod_node_agent::pods::Pods;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::images::ImageBuilder;
use crate::{containerd, ids, leftovers, process, registry};

/// The node's settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub state_dir: PathBuf,
    pub namespace: String,
    pub bridge: String,
    pub subnet_prefix: String,
    pub metrics_port: u16,
    /// The agent binary's ingress port on loopback (never the default `0.0.0.0:80`).
    pub ingress_port: u16,
    /// The agent binary's TLS ingress port on loopback (never the default `0.0.0.0:443`).
    pub ingress_tls_port: u16,
    /// The agent's peer endpoint (volume transfers) on loopback.
    pub peer_port: u16,
    /// The agent's SSH gateway on loopback.
    pub ssh_port: u16,
}

/// A `10.<200-249>.<x>` prefix for a node's /24 that no route of the host covers and that this
/// process has not handed out before.
fn free_subnet_prefix() -> String {
    static HANDED_OUT: std::sync::Mutex<Vec<[u8; 2]>> = std::sync::Mutex::new(Vec::new());
    let routed = routed_destinations();
    let [second, third] = process::never_twice(&HANDED_OUT, || {
        let bytes = Uuid::new_v4().into_bytes();
        let pair = [200 + bytes[0] % 50, bytes[1]];
        (!routed.contains(&[10, pair[0], pair[1], 0])).then_some(pair)
    });
    format!("10.{second}.{third}")
}

/// The destinations of the host's IPv4 routes, from `/proc/net/route` (each a hexadecimal
/// number whose bytes are the address in network order, read as little-endian).
fn routed_destinations() -> HashSet<[u8; 4]> {
    route_destinations(&std::fs::read_to_string("/proc/net/route").unwrap_or_default())
}

fn route_destinations(table: &str) -> HashSet<[u8; 4]> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|hex| u32::from_str_radix(hex, 16).ok())
        .map(u32::to_le_bytes)
        .collect()
}

impl NodeSettings {
    pub fn new(label: &str) -> NodeSettings {
        // What killed runs left goes first: their bridges' routes would narrow the subnets.
        leftovers::reap_once();
        let suffix = ids::random_suffix();
        let bytes = Uuid::new_v4().into_bytes();
        let settings = NodeSettings {
            state_dir: process::temp_dir(&format!("agent-{label}")),
            namespace: format!("agent-{suffix}"),
            bridge: format!("ipt{}", &hex::encode(&bytes[..3])),
            subnet_prefix: free_subnet_prefix(),
            metrics_port: process::free_port(),
            ingress_port: process::free_port(),
            ingress_tls_port: process::free_port(),
            peer_port: process::free_port(),
            ssh_port: process::free_port(),
        };
        leftovers::record(Path::new(leftovers::DIR), &settings.bridge, &settings.subnet());
        settings
    }

    /// The node's pod subnet.
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.subnet_prefix)
    }

    /// The bridge's (gateway's) address.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.subnet_prefix)
    }

    /// The agent's configuration for the harness's containerd and registry.
    pub fn config(&self) -> Config {
        let mut config = Config {
            containerd_socket: containerd::shared().socket().to_path_buf(),
            containerd_namespace: self.namespace.clone(),
            state_dir: self.state_dir.clone(),
            cgroup_parent: "/instapod-test".into(),
            metrics_listen: ([127, 0, 0, 1], self.metrics_port).into(),
            ingress_listen: ([127, 0, 0, 1], self.ingress_port).into(),
            ingress_tls_listen: ([127, 0, 0, 1], self.ingress_tls_port).into(),
            peer_listen: ([127, 0, 0, 1], self.peer_port).into(),
            dns_servers: vec![self.gateway()],
            ssh: instapod_node_agent::config::SshConfig {
                listen: ([127, 0, 0, 1], self.ssh_port).into(),
                ..Default::default()
            },
            // In-process agents (`TestNode`) run inside a test binary: the shim must start the
            // real agent binary as the log driver.
            log_driver: agent_binary(),
            ..Config::default()
        };
        config.network.bridge = self.bridge.clone();
        config.network.subnet = self.subnet();
        config.reserved.disk_bytes = 0;
        config
    }

    /// The same as `INSTAPOD_AGENT_*` variables, for the binary.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "INSTAPOD_AGENT_CONTAINERD_SOCKET".into(),
                containerd::shared().socket().display().to_string(),
            ),
            ("INSTAPOD_AGENT_CONTAINERD_NAMESPACE".into(), self.namespace.clone()),
            ("INSTAPOD_AGENT_STATE_DIR".into(), self.state_dir.display().to_string()),
            ("INSTAPOD_AGENT_CGROUP_PARENT".into(), "/instapod-test".into()),
            (
                "INSTAPOD_AGENT_METRICS_LISTEN".into(),
                format!("127.0.0.1:{}", self.metrics_port),
            ),
            (
                "INSTAPOD_AGENT_INGRESS_LISTEN".into(),
                format!("127.0.0.1:{}", self.ingress_port),
            ),
            (
                "INSTAPOD_AGENT_INGRESS_TLS_LISTEN".into(),
                format!("127.0.0.1:{}", self.ingress_tls_port),
            ),
            (
                "INSTAPOD_AGENT_PEER_LISTEN".into(),
                format!("127.0.0.1:{}", self.peer_port),
            ),
            ("INSTAPOD_AGENT_DNS_SERVERS".into(), format!("[\"{}\"]", self.gateway())),
            (
                "INSTAPOD_AGENT_SSH__LISTEN".into(),
                format!("127.0.0.1:{}", self.ssh_port),
            ),
            ("INSTAPOD_AGENT_NETWORK__BRIDGE".into(), self.bridge.clone()),
            (
                "INSTAPOD_AGENT_NETWORK__SUBNET".into(),
                format!("{}.0/24", self.subnet_prefix),
            ),
            ("INSTAPOD_AGENT_RESERVED__DISK_BYTES".into(), "0".into()),
            (
                "INSTAPOD_AGENT_LOG_FILTER".into(),
                "info,instapod_node_agent=debug".into(),
            ),
        ]
    }

    /// Kills and removes every container of this node's namespace and the network namespaces
    /// of its pods, so a test leaves no process behind even when it failed half-way.
    pub fn remove_pods(&self) {
        let containerd = containerd::shared();
        let output = containerd
            .ctr(&self.namespace)
            .args(["containers", "ls", "-q"])
            .output();
        let ids: Vec<String> = output
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
            .unwrap_or_default();
        for id in &ids {
            let _ = containerd
                .ctr(&self.namespace)
                .args(["tasks", "kill", "-a", "-s", "SIGKILL", id])
                .output();
        }
        for id in &ids {
            for _ in 0..40 {
                let removed = containerd.ctr(&self.namespace).args(["tasks", "rm", "-f", id]).output();
                let listed = containerd.ctr(&self.namespace).args(["tasks", "ls", "-q"]).output();
                let still = listed
                    .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l == id))
                    .unwrap_or(false);
                if removed.is_ok() && !still {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = containerd.ctr(&self.namespace).args(["containers", "rm", id]).output();
            let _ = containerd.ctr(&self.namespace).args(["snapshots", "rm", id]).output();
        }
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("pods")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(id) = name.strip_suffix(".json").and_then(|id| id.parse::<Uuid>().ok()) {
                    let _ = Command::new("ip")
                        .args(["netns", "delete", &instapod_node_agent::network::netns_name(id)])
                        .output();
                }
            }
        }
    }

    /// Removes the bridge (pods' veths went with their namespaces), the node's masquerade rule
    /// and the bridge's record ([`leftovers`]).
    pub fn remove_bridge(&self) {
        remove_bridge(&self.bridge, &self.subnet());
        leftovers::forget(Path::new(leftovers::DIR), &self.bridge);
    }
}

/// Removes `bridge` and the masquerade rule of its `subnet`.
pub(crate) fn remove_bridge(bridge: &str, subnet: &str) {
    let _ = Command::new("ip").args(["link", "delete", bridge]).output();
    let rule = instapod_node_agent::network::masquerade_rule(bridge, subnet);
    let _ = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-D"])
        .args(&rule)
        .output();
}

/// Removes a node's pods and bridge when dropped (also when a test panics).
#[derive(Debug)]
pub struct CleanupGuard(NodeSettings);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        self.0.remove_pods();
        self.0.remove_bridge();
    }
}

impl NodeSettings {
    /// A guard that cleans this node up when dropped.
    pub fn cleanup_guard(&self) -> CleanupGuard {
        CleanupGuard(self.clone())
    }
}

/// A pod manager in this process, on the harness's containerd.
#[derive(Debug)]
pub struct TestNode {
    pub settings: NodeSettings,
    pub pods: Pods,
    pub reports: mpsc::UnboundedReceiver<PodReport>,
    pub dirs: Dirs,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

impl TestNode {
    pub async fn start(label: &str) -> TestNode {
        let settings = NodeSettings::new(label);
        let config = settings.config();
        let runtime = instapod_node_agent::agent::connect_runtime(&config, Duration::from_secs(30))
            .await
            .unwrap_or_else(|err| panic!("containerd: {err}\n{}", containerd::shared().log_tail()));
        let dirs = Dirs::new(&settings.state_dir).expect("state directory");
        let (pods, reports) = instapod_node_agent::agent::build_pods(&config, runtime, dirs.clone()).expect("pods");
        // Exit and OOM events drive restart policies, as in the agent.
        let (shutdown, watching) = tokio::sync::watch::channel(false);
        tokio::spawn(instapod_node_agent::agent::watch_events(pods.clone(), watching));
        TestNode {
            _shutdown: shutdown,
            settings,
            pods,
            reports,
            dirs,
        }
    }

    /// Starts the node's ingress on a free loopback port (for the life of the test's runtime)
    /// and returns its address.
    pub async fn start_ingress(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a bound listener has an address");
        tokio::spawn(instapod_node_agent::ingress::local(self.pods.clone()).serve(listener));
        addr
    }

    /// Reports received so far.
    pub fn drain_reports(&mut self) -> Vec<PodReport> {
        let mut out = Vec::new();
        while let Ok(report) = self.reports.try_recv() {
            out.push(report);
        }
        out
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.settings.remove_pods();
        self.settings.remove_bridge();
    }
}

/// A pod spec with small limits.
pub fn pod_spec(image: &str, generation: i64) -> PodSpec {
    PodSpec {
        pod_id: Uuid::new_v4(),
        name: format!("pod-{}", &ids::random_suffix()[..6]),
        generation,
        image: image.to_string(),
        registry_auth: None,
        entrypoint: None,
        command: None,
        env: BTreeMap::new(),
        workdir: None,
        resources: Resources {
            cpu_millis: 250,
            memory_bytes: 64 << 20,
            disk_bytes: 256 << 20,
            pids: 128,
        },
        volume_mount: "/data".into(),
        restart_policy: RestartPolicy::Never,
        http_port: Some(8080),
        hostnames: Vec::new(),
        volume_source: None,
    }
}

/// Pushes (once per test binary) a busybox image whose default command serves `/data` over
/// HTTP on port 8080, and returns its reference in the harness registry.
pub async fn web_image() -> String {
    static PUSHED: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    PUSHED
        .get_or_init(|| async {
            let registry = registry::shared();
            let repository = format!("test/web-{}", &ids::random_suffix()[..8]);
            ImageBuilder::busybox()
                .entrypoint(["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/data"])
                .build()
                .push(&registry.base_url(), &repository, "1")
                .await
                .expect("push the web image");
            format!("{}/{repository}:1", registry.host())
        })
        .await
        .clone()
}

/// Pushes (once per test binary) a busybox image with no entrypoint and `sh` as its command,
/// for pods that run a script, and returns its reference in the harness registry.
pub async fn shell_image() -> String {
    static PUSHED: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    PUSHED
        .get_or_init(|| async {
            let registry = registry::shared();
            let repository = format!("test/shell-{}", &ids::random_suffix()[..8]);
            ImageBuilder::busybox()
                .build()
                .push(&registry.base_url(), &repository, "1")
                .await
                .expect("push the shell image");
            format!("{}/{repository}:1", registry.host())
        })
        .await
        .clone()
}

/// Starts the agent binary with `env` (plus the node's settings); its log goes to a file.
pub fn spawn_agent(settings: &NodeSettings, extra_env: &[(String, String)]) -> (Child, PathBuf) {
    let binary = agent_binary();
    let log = settings.state_dir.join(format!("agent-{}.log", ids::random_suffix()));
    let (out, err) = process::log_file_stdio(&log);
    let mut command = Command::new(&binary);
    process::clear_instapod_env(&mut command);
    command
        .envs(settings.env())
        .envs(extra_env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let child = command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
    process::register_child(&child, process::StopSignal::Kill);
    (child, log)
}

/// The agent binary: `INSTAPOD_AGENT_BIN` when set (benchmarks point it at the release build),
/// else the one next to the test executable (run `cargo build --workspace --bins` first).
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("INSTAPOD_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let binary = dir.join("instapod-node-agent");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        binary.display()
    );
    binary
}

/// The text of a node agent's `/metrics` on `127.0.0.1:metrics_port`.
pub async fn agent_metrics(metrics_port: u16) -> anyhow::Result<String> {
    let client = crate::http_builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    Ok(client
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_destinations_are_read_in_network_order() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n\
                     iptd5b1d8\t008DCC0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        let routed = route_destinations(table);
        assert!(routed.contains(&[10, 204, 141, 0]), "{routed:?}");
        assert!(routed.contains(&[0, 0, 0, 0]));
        assert_eq!(routed.len(), 2);
        // The prefixes handed out never repeat and never hit a routed /24.
        let prefixes: Vec<String> = (0..50).map(|_| free_subnet_prefix()).collect();
        let unique: HashSet<&String> = prefixes.iter().collect();
        assert_eq!(unique.len(), prefixes.len());
        let host = routed_destinations();
        for prefix in &prefixes {
            let octets: Vec<u8> = prefix.split('.').map(|o| o.parse().expect("an octet")).collect();
            assert!(
                !host.contains(&[octets[0], octets[1], octets[2], 0]),
                "{prefix} is routed"
            );
        }
    }
}
