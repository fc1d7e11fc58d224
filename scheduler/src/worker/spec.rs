//! A pod's row → the [`PodSpec`] its node runs.

use std::collections::BTreeMap;

use instapod_common::node::{PodSpec, Resources, RestartPolicy};
use uuid::Uuid;

/// The columns [`POD_COLUMNS`] selects, in order.
#[derive(Debug, Clone)]
pub struct PodRow {
    pub id: Uuid,
    pub name: String,
    pub generation: i64,
    pub state: String,
    pub desired: String,
    pub reason: Option<String>,
    pub image: String,
    pub region: String,
    pub cpu_millis: i32,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub env: serde_json::Value,
    pub command: Option<Vec<String>>,
    pub http_port: Option<i32>,
    pub restart_policy: String,
    pub hostnames: Vec<String>,
    pub node_id: Option<Uuid>,
    pub restart_requested: bool,
    pub resize_requested: bool,
}

pub const POD_COLUMNS: &str = "id, name, generation, state, desired_state, reason, image, region, cpu_millis,
    memory_bytes, disk_bytes, env, command, http_port, restart_policy, hostnames, node_id, restart_requested, resize_requested";

impl PodRow {
    pub fn from_row(row: &tokio_postgres::Row) -> PodRow {
        PodRow {
            id: row.get(0),
            name: row.get(1),
            generation: row.get(2),
            state: row.get(3),
            desired: row.get(4),
            reason: row.get(5),
            image: row.get(6),
            region: row.get(7),
            cpu_millis: row.get(8),
            memory_bytes: row.get(9),
            disk_bytes: row.get(10),
            env: row.get(11),
            command: row.get(12),
            http_port: row.get(13),
            restart_policy: row.get(14),
            hostnames: row.get(15),
            node_id: row.get(16),
            restart_requested: row.get(17),
            resize_requested: row.get(18),
        }
    }

    pub fn resources(&self) -> Resources {
        Resources {
            cpu_millis: u32::try_from(self.cpu_millis).unwrap_or(0),
            memory_bytes: u64::try_from(self.memory_bytes).unwrap_or(0),
            disk_bytes: u64::try_from(self.disk_bytes).unwrap_or(0),
            // Threads and processes: generous, but bounded by memory (one per 256 KiB).
            pids: u32::try_from((self.memory_bytes / (256 * 1024)).clamp(64, 32_768)).unwrap_or(1024),
        }
    }

    /// The spec the node runs.
    pub fn spec(&self) -> PodSpec {
        let env: BTreeMap<String, String> = serde_json::from_value(self.env.clone()).unwrap_or_default();
        PodSpec {
            pod_id: self.id,
            name: self.name.clone(),
            generation: self.generation,
            image: self.image.clone(),
            registry_auth: None,
            entrypoint: None,
            command: self.command.clone(),
            env,
            workdir: None,
            resources: self.resources(),
            volume_mount: "/data".to_string(),
            restart_policy: match self.restart_policy.as_str() {
                "never" => RestartPolicy::Never,
                "on-failure" => RestartPolicy::OnFailure,
                _ => RestartPolicy::Always,
            },
            http_port: self.http_port.and_then(|p| u16::try_from(p).ok()),
            hostnames: self.hostnames.clone(),
            volume_source: None,
        }
    }
}
