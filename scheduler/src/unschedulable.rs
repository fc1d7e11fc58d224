//! Why a pod cannot be placed, in words a user can act on, with a count of nodes per reason.
//!
//! *Design.* Placement's hot loop only looks for the best node and records nothing; when it
//! finds none, [`diagnose`] walks the fleet a second time and sorts every node under the first
//! filter it fails, in a fixed order: excluded (the pod's current node), another region,
//! unhealthy, missing a required label. A node that passes all four ("eligible") is counted
//! under *every* dimension it lacks (CPU, memory, disk), the way kube-scheduler reports
//! "3 Insufficient cpu, 2 Insufficient memory", because each count answers "how many more nodes
//! would fit if I asked for less of this". Beside each count stands the largest free amount of
//! that dimension among the nodes counted — the nearest miss, so "need 512 MiB, largest free
//! 256 MiB" tells the user how far to shrink the pod for that dimension to stop being a reason.
//!
//! *Invariants.* The filter counts partition the fleet: `nodes_total = nodes_excluded +
//! nodes_in_other_regions + nodes_unhealthy + nodes_missing_labels + eligible`, and every
//! eligible node lacks at least one dimension. Amounts a request *needs* are rounded up and
//! amounts *free* rounded down when printed, so the message never shows a need that looks like
//! it fits. Messages are lowercase without a trailing period (the project's error style).

use std::collections::BTreeMap;
use std::fmt;

use instapod_common::node::Capacity;
use serde::{Deserialize, Serialize};

use crate::node::NodeView;
use crate::request::PlacementRequest;

/// No node can take the pod; the counts say why. `Display` renders the explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unschedulable {
    /// What the pod asked for.
    pub requested: Capacity,
    /// The region it was restricted to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The labels it required.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub required_labels: BTreeMap<String, String>,
    /// Nodes in the snapshot.
    pub nodes_total: usize,
    /// The request's `exclude_node`, when it was in the snapshot (0 or 1).
    pub nodes_excluded: usize,
    pub nodes_in_other_regions: usize,
    /// Unhealthy nodes that were otherwise in the right region.
    pub nodes_unhealthy: usize,
    /// Healthy nodes in the right region without every required label.
    pub nodes_missing_labels: usize,
    /// Eligible nodes (passing every filter above) with too little free CPU.
    pub nodes_lacking_cpu: usize,
    pub nodes_lacking_memory: usize,
    pub nodes_lacking_disk: usize,
    /// Per dimension, the most free on an eligible node that lacks it: how close the nearest
    /// miss came, always below the request (zero when no node lacks that dimension).
    pub largest_free: Capacity,
}

impl std::error::Error for Unschedulable {}

/// Explains why no node in `nodes` can take `request`. Meant for the cold path, after placement
/// found nothing; on a fleet where some node fits, every count of capacity stays zero for it.
pub(crate) fn diagnose<'a>(nodes: impl IntoIterator<Item = &'a NodeView>, request: &PlacementRequest) -> Unschedulable {
    let mut report = Unschedulable::for_request(request);
    for node in nodes {
        report.nodes_total += 1;
        if request.exclude_node == Some(node.id) {
            report.nodes_excluded += 1;
        } else if request.region.as_deref().is_some_and(|region| region != node.region) {
            report.nodes_in_other_regions += 1;
        } else if !node.healthy {
            report.nodes_unhealthy += 1;
        } else if !has_labels(node, &request.required_labels) {
            report.nodes_missing_labels += 1;
        } else {
            report.record_eligible(node.free(), request);
        }
    }
    report
}

impl Unschedulable {
    /// A report for `request` with every count at zero.
    pub(crate) fn for_request(request: &PlacementRequest) -> Unschedulable {
        Unschedulable {
            requested: request.capacity(),
            region: request.region.clone(),
            required_labels: request.required_labels.clone(),
            nodes_total: 0,
            nodes_excluded: 0,
            nodes_in_other_regions: 0,
            nodes_unhealthy: 0,
            nodes_missing_labels: 0,
            nodes_lacking_cpu: 0,
            nodes_lacking_memory: 0,
            nodes_lacking_disk: 0,
            largest_free: Capacity::default(),
        }
    }

    /// Counts an eligible node with `free` under every dimension it lacks.
    pub(crate) fn record_eligible(&mut self, free: Capacity, request: &PlacementRequest) {
        let largest = &mut self.largest_free;
        if free.cpu_millis < request.cpu_millis {
            self.nodes_lacking_cpu += 1;
            largest.cpu_millis = largest.cpu_millis.max(free.cpu_millis);
        }
        if free.memory_bytes < request.memory_bytes {
            self.nodes_lacking_memory += 1;
            largest.memory_bytes = largest.memory_bytes.max(free.memory_bytes);
        }
        if free.disk_bytes < request.disk_bytes {
            self.nodes_lacking_disk += 1;
            largest.disk_bytes = largest.disk_bytes.max(free.disk_bytes);
        }
    }
}

/// Whether `node` carries every required label with the required value.
pub(crate) fn has_labels(node: &NodeView, required: &BTreeMap<String, String>) -> bool {
    required.iter().all(|(key, value)| node.labels.get(key) == Some(value))
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes_total == 0 {
            return f.write_str("no node has joined the fleet");
        }
        let in_region = self.nodes_total - self.nodes_excluded - self.nodes_in_other_regions;
        let region = self.region.as_deref();
        let where_ = region.map(|region| format!(" in region {region}")).unwrap_or_default();

        // The two situations where one fact explains everything get one sentence.
        if in_region == 0 && self.nodes_excluded == 0 {
            return write!(
                f,
                "no node{where_} ({} in other regions)",
                count(self.nodes_in_other_regions, "node", "nodes")
            );
        }
        if in_region > 0 && self.nodes_unhealthy == in_region {
            write!(
                f,
                "no healthy node{where_} ({} unhealthy",
                count(self.nodes_unhealthy, "node", "nodes")
            )?;
            if self.nodes_excluded > 0 {
                f.write_str(", and the pod's current node is excluded")?;
            }
            return f.write_str(")");
        }

        write!(f, "no node{where_} can take the pod: ")?;
        let mut parts: Vec<String> = Vec::new();
        if self.nodes_lacking_cpu > 0 {
            parts.push(format!(
                "{} cpu (need {}, largest free {})",
                count(self.nodes_lacking_cpu, "node lacks", "nodes lack"),
                cores(self.requested.cpu_millis),
                cores(self.largest_free.cpu_millis),
            ));
        }
        if self.nodes_lacking_memory > 0 {
            parts.push(format!(
                "{} memory (need {}, largest free {})",
                count(self.nodes_lacking_memory, "node lacks", "nodes lack"),
                bytes(self.requested.memory_bytes, Rounding::Up),
                bytes(self.largest_free.memory_bytes, Rounding::Down),
            ));
        }
        if self.nodes_lacking_disk > 0 {
            parts.push(format!(
                "{} disk (need {}, largest free {})",
                count(self.nodes_lacking_disk, "node lacks", "nodes lack"),
                bytes(self.requested.disk_bytes, Rounding::Up),
                bytes(self.largest_free.disk_bytes, Rounding::Down),
            ));
        }
        if self.nodes_missing_labels > 0 {
            let labels: Vec<String> = self
                .required_labels
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            parts.push(format!(
                "{} a required label ({})",
                count(self.nodes_missing_labels, "node lacks", "nodes lack"),
                labels.join(", ")
            ));
        }
        if self.nodes_unhealthy > 0 {
            parts.push(format!("{} unhealthy", count(self.nodes_unhealthy, "node", "nodes")));
        }
        if self.nodes_in_other_regions > 0 {
            parts.push(format!(
                "{} in other regions",
                count(self.nodes_in_other_regions, "node", "nodes")
            ));
        }
        if self.nodes_excluded > 0 {
            parts.push("the pod's current node is excluded".to_string());
        }
        f.write_str(&parts.join("; "))
    }
}

/// `1 node lacks` / `3 nodes lack`.
fn count(n: usize, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// Millicores as cores, exactly: `1 core`, `1.5 cores`, `0.25 cores`.
fn cores(millis: u64) -> String {
    let whole = millis / 1000;
    let fraction = millis % 1000;
    let number = if fraction == 0 {
        whole.to_string()
    } else {
        let digits = format!("{fraction:03}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    };
    format!("{number} {}", if millis == 1000 { "core" } else { "cores" })
}

#[derive(Clone, Copy)]
enum Rounding {
    Up,
    Down,
}

/// Bytes in the largest binary unit that keeps the number at least 1, to one decimal.
fn bytes(value: u64, rounding: Rounding) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit_index = 0;
    while unit_index + 1 < UNITS.len() && value >> (10 * (unit_index + 1)) > 0 {
        unit_index += 1;
    }
    let unit_size = 1u128 << (10 * unit_index);
    let scaled = u128::from(value) * 10;
    let tenths = match rounding {
        Rounding::Down => scaled / unit_size,
        Rounding::Up => scaled.div_ceil(unit_size),
    };
    let (whole, tenth) = (tenths / 10, tenths % 10);
    if tenth == 0 {
        format!("{whole} {}", UNITS[unit_index])
    } else {
        format!("{whole}.{tenth} {}", UNITS[unit_index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_printed_exactly() {
        let check = |millis, expected: &str| assert_eq!(cores(millis), expected, "{millis}");
        check(0, "0 cores");
        check(250, "0.25 cores");
        check(1000, "1 core");
        check(1500, "1.5 cores");
        check(2001, "2.001 cores");
        check(16000, "16 cores");
    }

    #[test]
    fn bytes_round_needs_up_and_free_amounts_down() {
        let check = |value, rounding, expected: &str| assert_eq!(bytes(value, rounding), expected, "{value}");
        check(0, Rounding::Down, "0 B");
        check(512, Rounding::Down, "512 B");
        check(512 << 20, Rounding::Up, "512 MiB");
        check(256 << 20, Rounding::Down, "256 MiB");
        check(3 << 29, Rounding::Down, "1.5 GiB");
        check((256 << 20) + 1, Rounding::Up, "256.1 MiB");
        check((256 << 20) - 1, Rounding::Down, "255.9 MiB");
        check(u64::MAX, Rounding::Down, "15.9 EiB");
    }
}
