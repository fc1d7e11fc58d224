//! What a pod asks of a node: the resources to reserve and the constraints a node must meet.
//!
//! *Invariants.* Every constraint is a hard filter (a node that breaks one is never chosen);
//! preferences live in [`crate::Strategy`], not here. An empty constraint (no region, no labels,
//! no excluded node) constrains nothing.

use std::collections::BTreeMap;

use instapod_common::node::{Capacity, Resources};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A request to place one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PlacementRequest {
    /// CPU to reserve, in millicores.
    pub cpu_millis: u64,
    /// Memory to reserve, in bytes.
    pub memory_bytes: u64,
    /// Disk to reserve for the pod's volume, in bytes.
    pub disk_bytes: u64,
    /// Only nodes in this region qualify; any region when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Labels a node must carry, each with exactly this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub required_labels: BTreeMap<String, String>,
    /// A node that must not be chosen: the pod's current node when it moves (a resize that does
    /// not fit where it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_node: Option<Uuid>,
}

impl PlacementRequest {
    /// A request for a pod's resources, with no constraints yet.
    pub fn for_resources(resources: &Resources) -> Self {
        PlacementRequest {
            cpu_millis: u64::from(resources.cpu_millis),
            memory_bytes: resources.memory_bytes,
            disk_bytes: resources.disk_bytes,
            ..PlacementRequest::default()
        }
    }

    /// The resources to reserve, as a [`Capacity`].
    pub fn capacity(&self) -> Capacity {
        Capacity {
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            disk_bytes: self.disk_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_constraints_are_left_out_of_json_and_default_when_absent() {
        let request = PlacementRequest::for_resources(&Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            disk_bytes: 1 << 30,
            pids: 256,
        });
        let text = serde_json::to_string(&request).expect("serialises");
        assert_eq!(
            text,
            r#"{"cpu_millis":500,"memory_bytes":268435456,"disk_bytes":1073741824}"#
        );
        assert_eq!(
            serde_json::from_str::<PlacementRequest>(&text).expect("parses"),
            request
        );
    }
}
