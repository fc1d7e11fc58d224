//! Task statistics from containerd (`Tasks.Metrics`): the cgroup v1 and v2 statistics the
//! shims report, decoded into one [`TaskStats`].
//!
//! *Design.* containerd answers with a `google.protobuf.Any` per task whose type is
//! `io.containerd.cgroups.v1.Metrics` (cgroup v1 hosts, like this one) or
//! `io.containerd.cgroups.v2.Metrics` (unified hierarchy). The messages below declare only the
//! fields the agent reads, with the tags of containerd/cgroups' `metrics.proto`; prost skips the
//! others. One request returns every task of the namespace, so a sampling round costs one call
//! whatever the number of pods.
//!
//! Memory "in use" is the working set — usage minus inactive file cache — as `docker stats`
//! and the kubelet report it: page cache the kernel can drop at once is not the pod's
//! pressure.

use std::collections::HashMap;

use containerd_client::services::v1::MetricsRequest;
use containerd_client::services::v1::tasks_client::TasksClient;
use prost::Message;

use super::{Runtime, RuntimeError};

/// One task's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskStats {
    /// CPU time used since the task started, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory usage without inactive file cache.
    pub memory_working_set_bytes: u64,
    /// The cgroup's memory limit; `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// Processes and threads.
    pub pids: u64,
}

/// Why a task's statistics could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeStatsError {
    #[error("task metrics of unknown type {0:?}")]
    UnknownType(String),
    #[error("task metrics of type {type_url:?} do not decode: {message}")]
    Malformed { type_url: String, message: String },
}

/// Limits at or above this are "no limit" (cgroup v1 reports `PAGE_COUNTER_MAX` pages, v2
/// `max` as `u64::MAX`).
const UNLIMITED: u64 = 1 << 62;

mod v1 {
    //! `io.containerd.cgroups.v1.Metrics`, the fields read.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metrics {
        #[prost(message, optional, tag = "2")]
        pub pids: Option<PidsStat>,
        #[prost(message, optional, tag = "3")]
        pub cpu: Option<CpuStat>,
        #[prost(message, optional, tag = "4")]
        pub memory: Option<MemoryStat>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PidsStat {
        #[prost(uint64, tag = "1")]
        pub current: u64,
        #[prost(uint64, tag = "2")]
        pub limit: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CpuStat {
        #[prost(message, optional, tag = "1")]
        pub usage: Option<CpuUsage>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CpuUsage {
        /// Nanoseconds.
        #[prost(uint64, tag = "1")]
        pub total: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MemoryStat {
        #[prost(uint64, tag = "30")]
        pub total_inactive_file: u64,
        #[prost(message, optional, tag = "33")]
        pub usage: Option<MemoryEntry>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MemoryEntry {
        #[prost(uint64, tag = "1")]
        pub limit: u64,
        #[prost(uint64, tag = "2")]
        pub usage: u64,
    }
}

mod v2 {
    //! `io.containerd.cgroups.v2.Metrics`, the fields read.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metrics {
        #[prost(message, optional, tag = "1")]
        pub pids: Option<PidsStat>,
        #[prost(message, optional, tag = "2")]
        pub cpu: Option<CpuStat>,
        #[prost(message, optional, tag = "4")]
        pub memory: Option<MemoryStat>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PidsStat {
        #[prost(uint64, tag = "1")]
        pub current: u64,
        #[prost(uint64, tag = "2")]
        pub limit: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CpuStat {
        /// Microseconds.
        #[prost(uint64, tag = "1")]
        pub usage_usec: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MemoryStat {
        #[prost(uint64, tag = "13")]
        pub inactive_file: u64,
        #[prost(uint64, tag = "32")]
        pub usage: u64,
        #[prost(uint64, tag = "33")]
        pub usage_limit: u64,
    }
}

fn limit(value: u64) -> Option<u64> {
    (value > 0 && value < UNLIMITED).then_some(value)
}

/// Decodes one task's metrics `Any` (its type URL and bytes).
pub fn decode(type_url: &str, value: &[u8]) -> Result<TaskStats, DecodeStatsError> {
    let malformed = |err: prost::DecodeError| DecodeStatsError::Malformed {
        type_url: type_url.to_string(),
        message: err.to_string(),
    };
    // containerd writes the bare message name; accept a `type.googleapis.com/` style prefix too.
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    match name {
        "io.containerd.cgroups.v1.Metrics" => {
            let m = v1::Metrics::decode(value).map_err(malformed)?;
            let memory = m.memory.unwrap_or_default();
            let usage = memory.usage.unwrap_or_default();
            Ok(TaskStats {
                cpu_ns: m.cpu.and_then(|c| c.usage).map_or(0, |u| u.total),
                memory_working_set_bytes: usage.usage.saturating_sub(memory.total_inactive_file),
                memory_limit_bytes: limit(usage.limit),
                pids: m.pids.map_or(0, |p| p.current),
            })
        }
        "io.containerd.cgroups.v2.Metrics" => {
            let m = v2::Metrics::decode(value).map_err(malformed)?;
            let memory = m.memory.unwrap_or_default();
            Ok(TaskStats {
                cpu_ns: m.cpu.map_or(0, |c| c.usage_usec.saturating_mul(1_000)),
                memory_working_set_bytes: memory.usage.saturating_sub(memory.inactive_file),
                memory_limit_bytes: limit(memory.usage_limit),
                pids: m.pids.map_or(0, |p| p.current),
            })
        }
        _ => Err(DecodeStatsError::UnknownType(type_url.to_string())),
    }
}

impl Runtime {
    /// The statistics of every task in the namespace, by container id. Tasks whose metrics do
    /// not decode are left out (and logged): one odd shim does not blind the whole round.
    pub async fn task_stats(&self) -> Result<HashMap<String, TaskStats>, RuntimeError> {
        let response = TasksClient::new(self.channel())
            .metrics(self.request(MetricsRequest { filters: Vec::new() }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Metrics", &status))?;
        let mut stats = HashMap::new();
        for metric in response.into_inner().metrics {
            let Some(data) = metric.data else { continue };
            match decode(&data.type_url, &data.value) {
                Ok(decoded) => {
                    stats.insert(metric.id, decoded);
                }
                Err(err) => tracing::debug!(container = %metric.id, error = %err, "task metrics skipped"),
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v1_metrics_decode() {
        let message = v1::Metrics {
            pids: Some(v1::PidsStat { current: 7, limit: 100 }),
            cpu: Some(v1::CpuStat {
                usage: Some(v1::CpuUsage { total: 2_500_000_000 }),
            }),
            memory: Some(v1::MemoryStat {
                total_inactive_file: 1_000,
                usage: Some(v1::MemoryEntry {
                    limit: 64 << 20,
                    usage: 11_000,
                }),
            }),
        };
        let stats = decode("io.containerd.cgroups.v1.Metrics", &message.encode_to_vec()).expect("v1");
        assert_eq!(
            stats,
            TaskStats {
                cpu_ns: 2_500_000_000,
                memory_working_set_bytes: 10_000,
                memory_limit_bytes: Some(64 << 20),
                pids: 7,
            }
        );
        // v1's "no limit" is a page-counter maximum, not a real size.
        let unlimited = v1::Metrics {
            memory: Some(v1::MemoryStat {
                total_inactive_file: 0,
                usage: Some(v1::MemoryEntry {
                    limit: 9_223_372_036_854_771_712,
                    usage: 5,
                }),
            }),
            ..Default::default()
        };
        let stats = decode("io.containerd.cgroups.v1.Metrics", &unlimited.encode_to_vec()).expect("v1");
        assert_eq!(stats.memory_limit_bytes, None);
        assert_eq!(stats.cpu_ns, 0);
    }

    #[test]
    fn cgroup_v2_metrics_decode() {
        let message = v2::Metrics {
            pids: Some(v2::PidsStat { current: 3, limit: 0 }),
            cpu: Some(v2::CpuStat { usage_usec: 1_500_000 }),
            memory: Some(v2::MemoryStat {
                inactive_file: 4_096,
                usage: 1 << 20,
                usage_limit: u64::MAX,
            }),
        };
        let stats = decode(
            "type.googleapis.com/io.containerd.cgroups.v2.Metrics",
            &message.encode_to_vec(),
        )
        .expect("v2");
        assert_eq!(
            stats,
            TaskStats {
                cpu_ns: 1_500_000_000,
                memory_working_set_bytes: (1 << 20) - 4_096,
                memory_limit_bytes: None,
                pids: 3,
            }
        );
    }

    #[test]
    fn unknown_and_malformed_metrics_are_errors() {
        assert_eq!(
            decode("io.containerd.cgroups.v3.Metrics", b""),
            Err(DecodeStatsError::UnknownType("io.containerd.cgroups.v3.Metrics".into()))
        );
        assert!(matches!(
            decode("io.containerd.cgroups.v1.Metrics", &[0x1a, 0xff, 0x01]),
            Err(DecodeStatsError::Malformed { .. })
        ));
    }
}
