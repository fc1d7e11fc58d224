//! A whole platform on this machine for end-to-end work: a control plane, the real
//! `instapod-scheduler` and one or more real `instapod-node-agent` processes joined to it, all
//! on one Redis logical database (the control plane's), each agent on its own bridge, subnet,
//! containerd namespace and state directory ([`NodeSettings`]).
//!
//! *Clean-up.* Dropping a [`Fleet`] kills the agents, then removes every container and network
//! namespace left in their containerd namespaces, their bridges and runc state directories
//! ([`NodeSettings::cleanup_guard`]), and kills the scheduler. Pods should be deleted through
//! the API before that (the agents' own clean-up); the guards only catch what a failure left.
//! The control plane, Postgres, Redis and containerd are the harness's and go when the process
//! exits.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use anyhow::ensure;

use crate::node::{CleanupGuard, NodeSettings, spawn_agent};
use crate::scheduler::Scheduler;
use crate::{ControlPlane, ControlPlaneOptions, eventually, process, redis};

const JOIN_TOKEN: &str = "fleet-helper-join-token-0123456789abcdef";
/// How long the agents may take to join and report capacity.
const JOIN_WAIT: Duration = Duration::from_secs(90);

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// One agent per entry, in this region (node names `node-<index>-<region>`).
    pub regions: Vec<String>,
    /// Each agent's allocatable CPU (the agent reserves the rest of the machine's cores);
    /// `None`: the agent's default reservation.
    pub allocatable_cpu_millis: Option<u64>,
    /// Extra `INSTAPOD_AGENT_*` variables for every agent (later entries win).
    pub agent_env: Vec<(String, String)>,
    /// Extra `INSTAPOD_AGENT_*` variables for one agent (its index first; these win over
    /// `agent_env`).
    pub node_agent_env: Vec<(usize, String, String)>,
    /// Extra `INSTAPOD_SCHEDULER_*` variables.
    pub scheduler_env: Vec<(String, String)>,
    /// Extra control-plane variables.
    pub control_plane_env: Vec<(String, String)>,
}

impl FleetOptions {
    /// One agent per region, default reservations, the harness's log filters.
    pub fn regions<S: AsRef<str>>(regions: impl IntoIterator<Item = S>) -> FleetOptions {
        FleetOptions {
            regions: regions.into_iter().map(|r| r.as_ref().to_string()).collect(),
            allocatable_cpu_millis: None,
            agent_env: Vec::new(),
            node_agent_env: Vec::new(),
            scheduler_env: Vec::new(),
            control_plane_env: Vec::new(),
        }
    }

    pub fn allocatable_cpu_millis(mut self, millis: u64) -> FleetOptions {
        self.allocatable_cpu_millis = Some(millis);
        self
    }

    pub fn agent_env(mut self, key: &str, value: &str) -> FleetOptions {
        self.agent_env.push((key.to_string(), value.to_string()));
        self
    }

    /// A variable for agent `index` only (e.g. its own listen address).
    pub fn node_agent_env(mut self, index: usize, key: &str, value: &str) -> FleetOptions {
        self.node_agent_env.push((index, key.to_string(), value.to_string()));
        self
    }

    pub fn scheduler_env(mut self, key: &str, value: &str) -> FleetOptions {
        self.scheduler_env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn control_plane_env(mut self, key: &str, value: &str) -> FleetOptions {
        self.control_plane_env.push((key.to_string(), value.to_string()));
        self
    }

    /// Production-like logging: `info` for the agents and the scheduler.
    pub fn quiet_logs(self) -> FleetOptions {
        self.agent_env("INSTAPOD_AGENT_LOG_FILTER", "info")
            .scheduler_env("INSTAPOD_SCHEDULER_LOG_FILTER", "info")
    }
}

/// A running fleet. See the module documentation.
#[derive(Debug)]
pub struct Fleet {
    pub cp: ControlPlane,
    pub redis_url: String,
    pub scheduler: Scheduler,
    pub nodes: Vec<NodeSettings>,
    /// Each agent's node id (same order as `nodes`).
    pub node_ids: Vec<uuid::Uuid>,
    /// Each agent's environment (beyond its [`NodeSettings::env`]), to restart it.
    pub agent_env: Vec<Vec<(String, String)>>,
    pub agent_logs: Vec<PathBuf>,
    agents: Vec<Child>,
    cleanup: Vec<CleanupGuard>,
}

impl Fleet {
    /// Starts the control plane, the scheduler and the agents, and waits until every node is
    /// `healthy` with its capacity reported.
    pub async fn start(options: FleetOptions) -> Fleet {
        let redis_url = redis::shared().next_url();
        let mut cp_options = ControlPlaneOptions::default()
            .redis_url(&redis_url)
            .env("INSTAPOD_NODE_JOIN_TOKEN", JOIN_TOKEN)
            .env("INSTAPOD_NODE_HEARTBEAT_INTERVAL_SECS", "1")
            .env("INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS", "5");
        for (key, value) in &options.control_plane_env {
            cp_options = cp_options.env(key, value);
        }
        let cp = ControlPlane::start(cp_options).await;
        let scheduler_env: Vec<(&str, &str)> = options
            .scheduler_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let scheduler = Scheduler::start_with_env(cp.database_url(), &redis_url, &scheduler_env);
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64;
        let mut fleet = Fleet {
            cp,
            redis_url,
            scheduler,
            nodes: Vec::new(),
            node_ids: Vec::new(),
            agent_env: Vec::new(),
            agent_logs: Vec::new(),
            agents: Vec::new(),
            cleanup: Vec::new(),
        };
        for (index, region) in options.regions.iter().enumerate() {
            let settings = NodeSettings::new(region);
            fleet.cleanup.push(settings.cleanup_guard());
            let mut env = vec![
                (
                    "INSTAPOD_AGENT_CONTROL_PLANE_URL".to_string(),
                    fleet.cp.url().to_string(),
                ),
                ("INSTAPOD_AGENT_JOIN_TOKEN".to_string(), JOIN_TOKEN.to_string()),
                ("INSTAPOD_AGENT_REDIS_URL".to_string(), fleet.redis_url.clone()),
                ("INSTAPOD_AGENT_NODE_NAME".to_string(), format!("node-{index}-{region}")),
                ("INSTAPOD_AGENT_REGION".to_string(), region.clone()),
            ];
            if let Some(millis) = options.allocatable_cpu_millis {
                env.push((
                    "INSTAPOD_AGENT_RESERVED__CPU_MILLIS".to_string(),
                    (cpus * 1000).saturating_sub(millis).to_string(),
                ));
            }
            env.extend(options.agent_env.iter().cloned());
            env.extend(
                options
                    .node_agent_env
                    .iter()
                    .filter(|(node, _, _)| *node == index)
                    .map(|(_, key, value)| (key.clone(), value.clone())),
            );
            let (child, log) = spawn_agent(&settings, &env);
            fleet.agents.push(child);
            fleet.agent_env.push(env);
            fleet.agent_logs.push(log);
            fleet.nodes.push(settings);
        }
        let expected = fleet.nodes.len();
        let names: Vec<String> = options
            .regions
            .iter()
            .enumerate()
            .map(|(index, region)| format!("node-{index}-{region}"))
            .collect();
        let allocatable = options.allocatable_cpu_millis.map(|m| m as i64);
        let ids = eventually(JOIN_WAIT, "every node healthy with its capacity", || async {
            let db = fleet.cp.db().await;
            let rows = db
                .query(
                    "SELECT name, id, allocatable_cpu_millis FROM nodes
                     WHERE status = 'healthy' AND allocatable_cpu_millis IS NOT NULL AND name = ANY($1)",
                    &[&names],
                )
                .await?;
            ensure!(
                rows.len() == expected,
                "{} of {expected} nodes healthy; last agent log:\n{}",
                rows.len(),
                fleet
                    .agent_logs
                    .last()
                    .map(|log| process::log_tail(log, 10))
                    .unwrap_or_default()
            );
            if let Some(millis) = allocatable {
                ensure!(
                    rows.iter().all(|r| r.get::<_, Option<i64>>(2) == Some(millis)),
                    "allocatable CPU not yet {millis}"
                );
            }
            let mut ids = Vec::new();
            for name in &names {
                let row = rows.iter().find(|r| r.get::<_, String>(0) == *name);
                ids.push(row.map(|r| r.get::<_, uuid::Uuid>(1)).unwrap_or_default());
            }
            Ok(ids)
        })
        .await;
        fleet.node_ids = ids;
        fleet
    }

    /// Agent `index`'s process id (for memory measurements).
    pub fn agent_pid(&self, index: usize) -> u32 {
        self.agents[index].id()
    }

    /// Agent `index`'s `instapod_node_agent_ingress_requests_total` for `outcome` (0 before the
    /// first such request).
    pub async fn ingress_requests(&self, index: usize, outcome: &str) -> f64 {
        let metrics = crate::node::agent_metrics(self.nodes[index].metrics_port)
            .await
            .expect("the agent's metrics");
        let prefix = format!("instapod_node_agent_ingress_requests_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Kills agent `index` (its containers keep running).
    pub fn kill_agent(&mut self, index: usize) {
        process::kill_and_reap(&mut self.agents[index]);
    }

    /// Starts agent `index` again with the same settings and environment.
    pub fn restart_agent(&mut self, index: usize) {
        self.kill_agent(index);
        let (child, log) = spawn_agent(&self.nodes[index], &self.agent_env[index]);
        self.agents[index] = child;
        self.agent_logs[index] = log;
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            process::kill_and_reap(agent);
        }
        // Containers, network namespaces and bridges (the guards' drop), then runc's state
        // directory of each namespace, which is empty once its containers are gone.
        self.cleanup.clear();
        for node in &self.nodes {
            let _ = std::fs::remove_dir(std::path::Path::new("/run/containerd/runc").join(&node.namespace));
        }
    }
}

/// Inserts `count` simulated nodes named `<prefix>-<n>` straight into `nodes`: healthy, region
/// `local`, no labels, `cpu_millis` millicores, 64 GiB of memory and 1 TiB of disk allocatable,
/// agent version `simulated`, no agent behind them. For placement work without containers
/// (give the control plane a long heartbeat timeout, or its health worker marks them
/// unhealthy).
pub async fn insert_simulated_nodes(
    db: &tokio_postgres::Client,
    prefix: &str,
    count: i64,
    cpu_millis: i64,
) -> anyhow::Result<()> {
    db.execute(
        "INSERT INTO nodes (name, region, labels, token_hash, status, agent_version,
                            total_cpu_millis, total_memory_bytes, total_disk_bytes,
                            allocatable_cpu_millis, allocatable_memory_bytes, allocatable_disk_bytes,
                            last_heartbeat_at)
         SELECT $1 || '-' || i, 'local', '{}'::jsonb, decode(md5($1 || '-' || i), 'hex'), 'healthy', 'simulated',
                $3, 68719476736, 1099511627776, $3, 68719476736, 1099511627776, now()
         FROM generate_series(1, $2::int8) i",
        &[&prefix, &count, &cpu_millis],
    )
    .await?;
    Ok(())
}
