//! Pod resource samples: what a node agent measures for each pod every sampling round and
//! pushes to the control plane (`POST /internal/nodes/{id}/metrics`), which stores them as the
//! pod's history and answers `GET /api/pods/{name}/metrics` from the newest one.
//!
//! *Units.* Bytes, seconds and cores throughout (a core is one CPU fully busy; 0.25 is a
//! quarter of one). Counters (`*_total`, `rx_bytes`, `tx_bytes`) count from the container's
//! start, so they drop to zero after a restart; the rates next to them are computed by the
//! agent between two samples of the same container and are never negative.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most samples in one push; an agent with more pods sends several batches.
pub const MAX_SAMPLES_PER_BATCH: usize = 2_000;

/// One pod, measured once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodSample {
    pub pod_id: Uuid,
    /// When the sample was taken: Unix time in milliseconds.
    pub at_unix_ms: i64,
    /// CPU time the pod has used since its container started.
    pub cpu_seconds_total: f64,
    /// CPU in use: the average since the previous sample, in cores.
    pub cpu_cores: f64,
    /// The pod's CPU limit in cores.
    pub cpu_limit_cores: f64,
    /// Memory in use: the working set (usage without inactive page cache).
    pub memory_bytes: u64,
    /// The pod's memory limit.
    pub memory_limit_bytes: u64,
    /// Bytes the pod received and sent on its network interface since it was attached.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Receive and send rates since the previous sample.
    pub rx_bytes_per_second: f64,
    pub tx_bytes_per_second: f64,
    /// Bytes in the regular files of the pod's volume (apparent sizes, as the files API counts).
    pub disk_used_bytes: u64,
    /// The pod's disk quota.
    pub disk_quota_bytes: u64,
    /// Processes and threads in the pod.
    pub pids: u64,
}

/// A push of samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleBatch {
    pub samples: Vec<PodSample>,
}
