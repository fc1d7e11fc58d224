//! What the scheduler knows about one node: a read-only view built by the caller from the
//! `nodes` rows (health, region, labels, allocatable) and the sum of the reservations of the pods
//! placed on it.
//!
//! *Invariants.* A view is a snapshot: placement never changes it. Free capacity is
//! `allocatable - reserved` per dimension, saturating at zero, so a node whose allocatable shrank
//! below what is already reserved (a smaller heartbeat after a reconfiguration) has nothing free
//! rather than an underflow. CPU is in millicores, memory and disk in bytes, as everywhere in
//! `instapod_common::node`.

use std::collections::BTreeMap;

use instapod_common::node::Capacity;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: Uuid,
    /// The node's name, for messages and logs only; placement never looks at it.
    pub name: String,
    pub region: String,
    /// The node's labels; a request's `required_labels` must all be present with equal values.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether the node heartbeats in time; an unhealthy node never receives a pod.
    pub healthy: bool,
    /// What pods may use on the node (its heartbeat's `allocatable`).
    pub allocatable: Capacity,
    /// What is already committed to pods placed on the node.
    pub reserved: Capacity,
}

impl NodeView {
    /// `allocatable - reserved` per dimension, never below zero.
    pub fn free(&self) -> Capacity {
        free_capacity(self.allocatable, self.reserved)
    }
}

/// `allocatable - reserved` per dimension, never below zero.
pub(crate) fn free_capacity(allocatable: Capacity, reserved: Capacity) -> Capacity {
    Capacity {
        cpu_millis: allocatable.cpu_millis.saturating_sub(reserved.cpu_millis),
        memory_bytes: allocatable.memory_bytes.saturating_sub(reserved.memory_bytes),
        disk_bytes: allocatable.disk_bytes.saturating_sub(reserved.disk_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_capacity_saturates_when_reserved_exceeds_allocatable() {
        let allocatable = Capacity {
            cpu_millis: 1000,
            memory_bytes: 100,
            disk_bytes: 10,
        };
        let reserved = Capacity {
            cpu_millis: 1500,
            memory_bytes: 40,
            disk_bytes: 10,
        };
        assert_eq!(
            free_capacity(allocatable, reserved),
            Capacity {
                cpu_millis: 0,
                memory_bytes: 60,
                disk_bytes: 0,
            }
        );
    }
}
