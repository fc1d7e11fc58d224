//! The agent's configuration: a TOML file (`--config` or `INSTAPOD_AGENT_CONFIG`) plus
//! `INSTAPOD_AGENT_<FIELD>` overrides (nested with `__`, e.g. `INSTAPOD_AGENT_NETWORK__SUBNET`).
//! Unknown fields are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use instapod_common::config::Secret;
use instapod_common::telemetry::LogFormat;
use serde::Deserialize;

/// The prefix of the agent's environment overrides.
pub const ENV_PREFIX: &str = "INSTAPOD_AGENT_";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The control plane's base URL (its `/internal` API). Default `http://127.0.0.1:8080`.
    pub control_plane_url: String,
    /// The fleet's join token (the control plane's `node_join_token`). Needed for the first
    /// join; later starts use the node token saved in the state directory.
    pub join_token: Secret,
    /// The node's name in the fleet. Default: the machine's hostname.
    pub node_name: String,
    /// Region reported to the scheduler. Default `local`.
    pub region: String,
    /// Labels reported to the scheduler.
    pub labels: BTreeMap<String, String>,
    /// Redis URL of the job queues. Default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// containerd's socket. Default `/run/containerd/containerd.sock`.
    pub containerd_socket: PathBuf,
    /// containerd namespace the agent owns. Default `instapod`.
    pub containerd_namespace: String,
    /// Where records, volumes and logs live. Default `/var/lib/instapod-agent`.
    pub state_dir: PathBuf,
    /// cgroup parent of pod cgroups. Default `/instapod`.
    pub cgroup_parent: String,
    /// Capacity kept for the system (not offered to pods).
    pub reserved: Reserved,
    /// Largest limits one pod may ask for (absurd specs are refused).
    pub max_pod: MaxPod,
    /// Seconds between heartbeats; the control plane's answer to join overrides it. Default 5.
    pub heartbeat_interval_secs: u64,
    /// Seconds between reconcile passes (besides the one at start-up). Default 30.
    pub reconcile_interval_secs: u64,
    pub network: NetworkConfig,
    /// A pod's log is rotated when larger than this. Default 10 MiB.
    pub log_max_bytes: u64,
    /// Rotated log files kept per pod. Default 3.
    pub log_keep: u32,
    /// The program the containerd shim starts as each pod's log driver (run as
    /// `<program> log-driver FILE`, see `log_driver.rs`). Default (empty): this agent's own
    /// binary.
    pub log_driver: PathBuf,
    /// Where `/metrics` and `/healthz` are served. Default `127.0.0.1:9101`.
    pub metrics_listen: SocketAddr,
    /// Seconds between two samples of every pod's CPU, memory, network and disk (pushed to the
    /// control plane as the pods' metrics history). 0 turns sampling off. Default 10.
    pub metrics_sample_interval_secs: u64,
    /// Seconds between two measurements of a volume's disk usage (a walk of the volume, the
    /// costly part of sampling); rounds in between reuse the last one. Default 60.
    pub disk_usage_interval_secs: u64,
    /// Where the HTTP ingress (the reverse proxy to pods, routed by `Host`) listens. Default
    /// `0.0.0.0:80`, as production needs; tests and the local stack set a loopback port.
    pub ingress_listen: SocketAddr,
    /// Where the other nodes' ingresses reach this one (`ip:port`), to forward requests for
    /// this node's pods. Default: `ingress_listen` when it names an address; when it listens
    /// on all addresses, the address this machine uses to reach the control plane, with
    /// `ingress_listen`'s port.
    pub ingress_advertise: Option<SocketAddr>,
    /// Where the TLS ingress listens (HTTPS for custom domains with a certificate and, when
    /// `platform_cert_file` is set, the platform's host names). Default `0.0.0.0:443`.
    pub ingress_tls_listen: SocketAddr,
    /// The port clients reach the TLS ingress on, named in the HTTP→HTTPS redirect of a
    /// custom domain unless it is 443. Default: `ingress_tls_listen`'s port (set it when a
    /// port forward puts the public port elsewhere).
    pub ingress_https_port: Option<u16>,
    /// The platform's own certificate (PEM chain, e.g. `*.apps.example.com`), served on the TLS
    /// ingress for the names it covers. Optional; needs `platform_key_file`.
    pub platform_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `platform_cert_file`.
    pub platform_key_file: Option<PathBuf>,
    /// Custom domains: how their DNS records are checked.
    pub domains: DomainsConfig,
    /// The ACME client that orders custom domains' certificates.
    pub acme: AcmeConfig,
    /// Where the peer endpoint listens: other nodes pull pod volumes from it (clones and moves),
    /// each pull authorised by a one-time token. Default `0.0.0.0:9102`.
    pub peer_listen: SocketAddr,
    /// `host:port` other nodes use to reach `peer_listen`, sent with every heartbeat. Default
    /// (empty): `peer_listen` when it names an address, else the address this machine uses to
    /// reach the control plane, with `peer_listen`'s port.
    pub peer_advertise: String,
    /// The SSH gateway into this node's pods (see `ssh/`).
    pub ssh: SshConfig,
    /// Jobs handled at once. Default 4.
    pub job_concurrency: usize,
    /// Registries reached over plain HTTP besides loopback ones (`host:port`).
    pub plain_http_registries: Vec<String>,
    /// Name servers written into pods' `/etc/resolv.conf`. Default: the host's non-loopback
    /// ones, else `1.1.1.1` and `8.8.8.8`.
    pub dns_servers: Vec<String>,
    /// `text` or `json`. Default `text`.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax. Default `info`.
    pub log_filter: String,
}

/// DNS verification of custom domains.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DomainsConfig {
    /// Name servers asked (`ip:port`), without caching. Default (empty): those of the host's
    /// `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// Seconds one DNS query may take before it is retried (once) and then reported as a
    /// resolver error. Default 5.
    pub resolver_timeout_secs: u64,
}

impl Default for DomainsConfig {
    fn default() -> Self {
        DomainsConfig {
            nameservers: Vec::new(),
            resolver_timeout_secs: 5,
        }
    }
}

/// The ACME client (the directory URL and contacts are the control plane's `[domains]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// An extra root certificate (PEM) trusted for the ACME server's HTTPS, for a private or
    /// test CA such as Pebble. Default: none (the system's roots).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Reserved {
    /// Default 250.
    pub cpu_millis: u64,
    /// Default 512 MiB.
    pub memory_bytes: u64,
    /// Default 5 GiB.
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaxPod {
    /// Default 16000 (16 cores).
    pub cpu_millis: u32,
    /// Default 64 GiB.
    pub memory_bytes: u64,
    /// Default 1 TiB.
    pub disk_bytes: u64,
    /// Default 32768.
    pub pids: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The bridge pods attach to (at most 15 characters). Default `instapod0`.
    pub bridge: String,
    /// The pods' subnet. Default `10.88.0.0/16`.
    pub subnet: String,
    /// Where the CNI plugins are. Default `/usr/lib/cni`.
    pub cni_bin_dir: PathBuf,
}

/// The SSH gateway: users log into their pods with a stock `ssh` client; keys are checked by
/// the control plane at every attempt.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshConfig {
    /// Whether the gateway runs. Default true.
    pub enabled: bool,
    /// Where it listens. Default `0.0.0.0:2222`; tests and the local stack set a loopback port.
    pub listen: SocketAddr,
    /// `host:port` users connect to (sent with every heartbeat, shown in the pods' connection
    /// info). Default (empty): `listen` when it names an address, else the address this machine
    /// uses to reach the control plane, with `listen`'s port.
    pub advertise: String,
    /// Failed authentications one source IP may have within `failure_window_secs`; the next
    /// attempts from it are refused for `block_secs` without asking the control plane.
    /// Default 10.
    pub max_auth_failures: u32,
    /// Default 60.
    pub failure_window_secs: u64,
    /// Default 300.
    pub block_secs: u64,
    /// Sessions (channels running a process in a pod) open at once on this node; more are
    /// refused. Default 512.
    pub max_sessions: usize,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 2222)),
            advertise: String::new(),
            max_auth_failures: 10,
            failure_window_secs: 60,
            block_secs: 300,
            max_sessions: 512,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            control_plane_url: "http://127.0.0.1:8080".into(),
            join_token: Secret::new(""),
            node_name: String::new(),
            region: "local".into(),
            labels: BTreeMap::new(),
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            containerd_namespace: "instapod".into(),
            state_dir: "/var/lib/instapod-agent".into(),
            cgroup_parent: "/instapod".into(),
            reserved: Reserved::default(),
            max_pod: MaxPod::default(),
            heartbeat_interval_secs: 5,
            reconcile_interval_secs: 30,
            network: NetworkConfig::default(),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
            log_driver: PathBuf::new(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
            metrics_sample_interval_secs: 10,
            disk_usage_interval_secs: 60,
            ingress_listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            ingress_advertise: None,
            ingress_tls_listen: SocketAddr::from(([0, 0, 0, 0], 443)),
            ingress_https_port: None,
            platform_cert_file: None,
            platform_key_file: None,
            domains: DomainsConfig::default(),
            acme: AcmeConfig::default(),
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 9102)),
            peer_advertise: String::new(),
            ssh: SshConfig::default(),
            job_concurrency: 4,
            plain_http_registries: Vec::new(),
            dns_servers: Vec::new(),
            log_format: LogFormat::Text,
            log_filter: "info".into(),
        }
    }
}

impl Default for Reserved {
    fn default() -> Self {
        Reserved {
            cpu_millis: 250,
            memory_bytes: 512 * 1024 * 1024,
            disk_bytes: 5 * 1024 * 1024 * 1024,
        }
    }
}

impl Default for MaxPod {
    fn default() -> Self {
        MaxPod {
            cpu_millis: 16_000,
            memory_bytes: 64 * 1024 * 1024 * 1024,
            disk_bytes: 1024 * 1024 * 1024 * 1024,
            pids: 32_768,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "instapod0".into(),
            subnet: "10.88.0.0/16".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
        }
    }
}

impl Config {
    /// Every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if !(self.control_plane_url.starts_with("http://") || self.control_plane_url.starts_with("https://")) {
            problems.push(format!(
                "control_plane_url {:?} is not an http(s) URL",
                self.control_plane_url
            ));
        }
        if self.network.bridge.is_empty()
            || self.network.bridge.len() > 15
            || !self
                .network
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            problems.push(format!(
                "network.bridge {:?} must be 1-15 letters, digits, - or _",
                self.network.bridge
            ));
        }
        if !self.network.subnet.contains('/') {
            problems.push(format!(
                "network.subnet {:?} must be a CIDR such as 10.88.0.0/16",
                self.network.subnet
            ));
        }
        if !crate::runtime::is_valid_namespace(&self.containerd_namespace) {
            problems.push(format!(
                "containerd_namespace {:?} is not a valid namespace",
                self.containerd_namespace
            ));
        }
        if self.heartbeat_interval_secs == 0 || self.reconcile_interval_secs == 0 || self.job_concurrency == 0 {
            problems
                .push("heartbeat_interval_secs, reconcile_interval_secs and job_concurrency must be positive".into());
        }
        if !self.cgroup_parent.starts_with('/') {
            problems.push(format!("cgroup_parent {:?} must start with /", self.cgroup_parent));
        }
        if self.ingress_listen == self.metrics_listen {
            problems.push(format!(
                "ingress_listen and metrics_listen are both {}",
                self.ingress_listen
            ));
        }
        if let Some(advertise) = self.ingress_advertise
            && (advertise.ip().is_unspecified() || advertise.port() == 0)
        {
            problems.push(format!(
                "ingress_advertise {advertise} must name an address and port other nodes can connect to"
            ));
        }
        if [self.ingress_listen, self.metrics_listen, self.peer_listen].contains(&self.ingress_tls_listen) {
            problems.push(format!(
                "ingress_tls_listen {} is also the ingress, metrics or peer address",
                self.ingress_tls_listen
            ));
        }
        if self.platform_cert_file.is_some() != self.platform_key_file.is_some() {
            problems.push("platform_cert_file and platform_key_file must be set together".into());
        }
        if self.domains.resolver_timeout_secs == 0 {
            problems.push("domains.resolver_timeout_secs must be positive".into());
        }
        if self.peer_listen == self.metrics_listen || self.peer_listen == self.ingress_listen {
            problems.push(format!(
                "peer_listen {} is also the metrics or ingress address",
                self.peer_listen
            ));
        }
        if !self.peer_advertise.is_empty() && !is_host_port(&self.peer_advertise) {
            problems.push(format!("peer_advertise {:?} must be host:port", self.peer_advertise));
        }
        if !self.ssh.advertise.is_empty() && !is_host_port(&self.ssh.advertise) {
            problems.push(format!("ssh.advertise {:?} must be host:port", self.ssh.advertise));
        }
        if self.ssh.enabled && [self.metrics_listen, self.ingress_listen, self.peer_listen].contains(&self.ssh.listen) {
            problems.push(format!(
                "ssh.listen {} is also the metrics, ingress or peer address",
                self.ssh.listen
            ));
        }
        if self.ssh.max_auth_failures == 0 || self.ssh.failure_window_secs == 0 || self.ssh.max_sessions == 0 {
            problems
                .push("ssh.max_auth_failures, ssh.failure_window_secs and ssh.max_sessions must be positive".into());
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Where users reach the SSH gateway (see `ssh.advertise`).
    pub fn ssh_addr(&self) -> Option<String> {
        if !self.ssh.enabled {
            return None;
        }
        if !self.ssh.advertise.is_empty() {
            return Some(self.ssh.advertise.clone());
        }
        let as_peer = Config {
            peer_listen: self.ssh.listen,
            peer_advertise: String::new(),
            control_plane_url: self.control_plane_url.clone(),
            ..Config::default()
        };
        as_peer.peer_addr()
    }

    /// Where other nodes reach the peer endpoint (see `peer_advertise`); `None` when it cannot
    /// be told (volumes of this node's pods then cannot be cloned or moved).
    pub fn peer_addr(&self) -> Option<String> {
        if !self.peer_advertise.is_empty() {
            return Some(self.peer_advertise.clone());
        }
        let port = self.peer_listen.port();
        if !self.peer_listen.ip().is_unspecified() {
            return Some(self.peer_listen.to_string());
        }
        // The source address of a route to the control plane (a UDP "connection" sends nothing).
        let host = self
            .control_plane_url
            .split("://")
            .nth(1)?
            .split(['/', '?'])
            .next()?
            .to_string();
        let target = if host.contains(':') { host } else { format!("{host}:80") };
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
        socket.connect(target).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        Some(SocketAddr::new(ip, port).to_string())
    }

    /// The node name: configured, else the hostname.
    pub fn node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".to_string())
    }

    /// The `/etc/resolv.conf` pods get.
    pub fn resolv_conf(&self) -> String {
        let mut servers = self.dns_servers.clone();
        if servers.is_empty() {
            let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            servers = host
                .lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .map(|s| s.trim().to_string())
                .filter(|s| !(s.starts_with("127.") || s == "::1"))
                .collect();
        }
        if servers.is_empty() {
            servers = vec!["1.1.1.1".into(), "8.8.8.8".into()];
        }
        servers.iter().map(|s| format!("nameserver {s}\n")).collect()
    }
}

/// `host:port` with a non-empty host and a numeric port.
fn is_host_port(raw: &str) -> bool {
    raw.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_overrides_apply() {
        let config: Config = instapod_common::config::load_from(
            None,
            ENV_PREFIX,
            [
                ("INSTAPOD_AGENT_NETWORK__SUBNET".to_string(), "10.99.0.0/24".to_string()),
                ("INSTAPOD_AGENT_REGION".to_string(), "eu".to_string()),
                (
                    "INSTAPOD_AGENT_INGRESS_LISTEN".to_string(),
                    "127.0.0.1:8088".to_string(),
                ),
                (
                    "INSTAPOD_AGENT_INGRESS_ADVERTISE".to_string(),
                    "192.0.2.10:80".to_string(),
                ),
            ],
        )
        .expect("loads");
        assert_eq!(config.network.subnet, "10.99.0.0/24");
        assert_eq!(config.ingress_listen, SocketAddr::from(([127, 0, 0, 1], 8088)));
        assert_eq!(Config::default().ingress_listen, SocketAddr::from(([0, 0, 0, 0], 80)));
        assert_eq!(config.ingress_advertise, Some(SocketAddr::from(([192, 0, 2, 10], 80))));
        assert_eq!(Config::default().ingress_advertise, None);
        assert_eq!(config.region, "eu");
        config.validate().expect("valid");
        let peer = Config {
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 9333)),
            ..Config::default()
        };
        assert_eq!(peer.peer_addr().as_deref(), Some("127.0.0.1:9333"));
        let advertised = Config {
            peer_advertise: "10.1.2.3:9102".into(),
            ..Config::default()
        };
        assert_eq!(advertised.peer_addr().as_deref(), Some("10.1.2.3:9102"));
        assert!(is_host_port("node-1:9102") && !is_host_port("node-1") && !is_host_port(":9102"));
    }

    #[test]
    fn tls_and_domain_settings_are_checked() {
        let config: Config = instapod_common::config::load_from(
            None,
            ENV_PREFIX,
            [
                (
                    "INSTAPOD_AGENT_DOMAINS__NAMESERVERS".to_string(),
                    "[\"127.0.0.1:5353\"]".to_string(),
                ),
                (
                    "INSTAPOD_AGENT_ACME__CA_FILE".to_string(),
                    "/etc/pebble/ca.pem".to_string(),
                ),
            ],
        )
        .expect("loads");
        assert_eq!(
            config.domains.nameservers,
            vec![SocketAddr::from(([127, 0, 0, 1], 5353))]
        );
        assert_eq!(config.acme.ca_file, Some(PathBuf::from("/etc/pebble/ca.pem")));
        assert_eq!(config.ingress_tls_listen, SocketAddr::from(([0, 0, 0, 0], 443)));
        config.validate().expect("valid");
        let bad = Config {
            ingress_tls_listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            platform_cert_file: Some("/cert.pem".into()),
            domains: DomainsConfig {
                resolver_timeout_secs: 0,
                ..DomainsConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(bad.validate().expect_err("invalid").len(), 3);
    }

    #[test]
    fn bad_values_are_all_reported() {
        let config = Config {
            control_plane_url: "ftp://x".into(),
            network: NetworkConfig {
                bridge: "a-bridge-name-that-is-too-long".into(),
                ..NetworkConfig::default()
            },
            ..Config::default()
        };
        let problems = config.validate().expect_err("invalid");
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
