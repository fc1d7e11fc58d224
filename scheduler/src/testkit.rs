//! Test helpers: a seeded random generator, random fleets and requests shaped to hit the edges
//! (ties, full nodes, zero-sized dimensions, over-committed nodes), and a slow, obvious oracle
//! that the fast code is compared against.

use std::collections::BTreeMap;

use instapod_common::node::Capacity;
use uuid::Uuid;

use crate::node::NodeView;
use crate::request::PlacementRequest;
use crate::strategy::{Strategy, free_fraction_after, reciprocal};

/// SplitMix64: small, seeded, good enough to vary test cases.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    pub(crate) fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub(crate) const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// A node with the given shape, healthy, in `eu`, with nothing reserved.
pub(crate) fn node(id: u128, cpu_millis: u64, memory_bytes: u64, disk_bytes: u64) -> NodeView {
    NodeView {
        id: Uuid::from_u128(id),
        name: format!("node-{id}"),
        region: "eu".to_string(),
        labels: BTreeMap::new(),
        healthy: true,
        allocatable: Capacity {
            cpu_millis,
            memory_bytes,
            disk_bytes,
        },
        reserved: Capacity::default(),
    }
}

/// A small random fleet drawn from few shapes and reservation steps, so exact ties are common.
pub(crate) fn random_fleet(rng: &mut Rng, max_nodes: u64) -> Vec<NodeView> {
    let count = rng.below(max_nodes + 1);
    (0..count)
        .map(|index| {
            let allocatable = Capacity {
                cpu_millis: rng.pick(&[0, 1000, 2000, 4000, 8000]),
                memory_bytes: rng.pick(&[0, 1 << 30, 2 << 30, 4 << 30, 16 << 30]),
                disk_bytes: rng.pick(&[0, 10 << 30, 100 << 30]),
            };
            // Quarters of the allocatable, sometimes beyond it (a node that shrank).
            let quarters = |rng: &mut Rng, amount: u64| amount / 4 * rng.below(6);
            let reserved = Capacity {
                cpu_millis: quarters(rng, allocatable.cpu_millis),
                memory_bytes: quarters(rng, allocatable.memory_bytes),
                disk_bytes: quarters(rng, allocatable.disk_bytes),
            };
            let mut labels = BTreeMap::new();
            if rng.chance(40) {
                labels.insert("disk".to_string(), rng.pick(&["ssd", "hdd"]).to_string());
            }
            if rng.chance(30) {
                labels.insert("gpu".to_string(), "yes".to_string());
            }
            NodeView {
                // Small ids, drawn with repeats avoided by mixing in the index.
                id: Uuid::from_u128(u128::from(rng.below(1000)) << 32 | u128::from(index)),
                name: format!("node-{index}"),
                region: rng.pick(&REGIONS).to_string(),
                labels,
                healthy: rng.chance(85),
                allocatable,
                reserved,
            }
        })
        .collect()
}

/// A random request, sometimes constrained by region, labels or an excluded node.
pub(crate) fn random_request(rng: &mut Rng, nodes: &[NodeView]) -> PlacementRequest {
    let mut required_labels = BTreeMap::new();
    if rng.chance(20) {
        required_labels.insert("disk".to_string(), rng.pick(&["ssd", "hdd", "nvme"]).to_string());
    }
    if rng.chance(10) {
        required_labels.insert("gpu".to_string(), "yes".to_string());
    }
    PlacementRequest {
        cpu_millis: rng.pick(&[0, 250, 500, 1000, 2000, 3000, 8000]),
        memory_bytes: rng.pick(&[0, 256 << 20, 1 << 30, 2 << 30, 3 << 30, 8 << 30]),
        disk_bytes: rng.pick(&[0, 1 << 30, 10 << 30, 50 << 30]),
        region: rng.chance(50).then(|| rng.pick(&REGIONS).to_string()),
        required_labels,
        exclude_node: (rng.chance(20) && !nodes.is_empty()).then(|| rng.pick(nodes).id),
    }
}

/// Whether `node` may take `request`, written as plainly as possible.
pub(crate) fn oracle_qualifies(node: &NodeView, request: &PlacementRequest) -> bool {
    let free_cpu = node.allocatable.cpu_millis.saturating_sub(node.reserved.cpu_millis);
    let free_memory = node.allocatable.memory_bytes.saturating_sub(node.reserved.memory_bytes);
    let free_disk = node.allocatable.disk_bytes.saturating_sub(node.reserved.disk_bytes);
    let region_ok = match &request.region {
        None => true,
        Some(region) => *region == node.region,
    };
    let labels_ok = request
        .required_labels
        .iter()
        .all(|(key, value)| node.labels.get(key).map(String::as_str) == Some(value.as_str()));
    node.healthy
        && free_cpu >= request.cpu_millis
        && free_memory >= request.memory_bytes
        && free_disk >= request.disk_bytes
        && Some(node.id) != request.exclude_node
        && region_ok
        && labels_ok
}

/// The canonical free fraction after placement of `request` on `node` (which must fit).
pub(crate) fn oracle_free_after(node: &NodeView, request: &PlacementRequest) -> f64 {
    let free = node.free();
    free_fraction_after(
        free.cpu_millis,
        free.memory_bytes,
        reciprocal(node.allocatable.cpu_millis),
        reciprocal(node.allocatable.memory_bytes),
        request.cpu_millis,
        request.memory_bytes,
    )
}

/// The same fraction in plain real arithmetic (division, no reciprocals), to check the
/// canonical one is accurate.
pub(crate) fn exact_free_after(node: &NodeView, request: &PlacementRequest) -> f64 {
    let fraction = |free: u64, need: u64, allocatable: u64| {
        if allocatable == 0 {
            0.0
        } else {
            (free - need) as f64 / allocatable as f64
        }
    };
    let free = node.free();
    (fraction(free.cpu_millis, request.cpu_millis, node.allocatable.cpu_millis)
        + fraction(free.memory_bytes, request.memory_bytes, node.allocatable.memory_bytes))
        / 2.0
}

/// Every qualifying node sorted best first (key descending, then id ascending); the oracle's
/// choice is the first.
pub(crate) fn oracle_ranking<'a>(
    nodes: &'a [NodeView],
    request: &PlacementRequest,
    strategy: Strategy,
) -> Vec<(&'a NodeView, f64)> {
    let mut ranked: Vec<(&NodeView, f64)> = nodes
        .iter()
        .filter(|node| oracle_qualifies(node, request))
        .map(|node| (node, oracle_free_after(node, request)))
        .collect();
    ranked.sort_by(|(a, a_free), (b, b_free)| {
        strategy
            .key(*b_free)
            .total_cmp(&strategy.key(*a_free))
            .then(a.id.cmp(&b.id))
    });
    ranked
}
