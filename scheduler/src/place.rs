//! [`place()`]: choose a node for one pod from a snapshot of the fleet.
//!
//! *Design.* One pass over the nodes. A node qualifies when it is healthy, has at least the
//! requested CPU, memory and disk free, is not the excluded node, is in the requested region
//! and carries the required labels — tested in that order, cheapest first, with the three
//! capacity comparisons combined without short-circuiting so the common case is one branch.
//! Region and labels are only compared when the request has them. Qualifying nodes are ranked
//! by [`Strategy`]; the loop keeps the best so far and allocates nothing. Only when no node
//! qualifies does a second, slower pass ([`crate::unschedulable`]) count the reasons.
//!
//! *Invariants.* Pure and deterministic: no I/O, no clock, no randomness; the same snapshot and
//! request always give the same node, whatever the order of `nodes` (ties go to the smallest
//! node id). The chosen node always fits the request; no qualifying node ranks strictly higher.
//!
//! *Limitations.* The pass is linear in the fleet and reads every [`NodeView`] (about 150
//! bytes, plus the region's heap string when a region is requested and the label map when
//! labels are), so at 10,000 nodes it manages only a few thousand placements a second (see
//! `BENCHMARKS.md`); most of the time goes to region string comparisons and label lookups on
//! scattered heap memory. [`crate::FleetIndex`] answers the same question from a compact,
//! pre-filtered copy of the snapshot for callers that place many pods against one snapshot.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::node::NodeView;
use crate::request::PlacementRequest;
use crate::strategy::{Strategy, free_fraction_after, reciprocal};
use crate::unschedulable::{Unschedulable, diagnose, has_labels};

/// The node chosen for a pod.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub node_id: Uuid,
    /// In `[0, 1]`, higher is better under the strategy used: for bin-packing the node's mean
    /// used fraction of CPU and memory after the placement, for spread the mean free fraction.
    pub score: f64,
}

/// Chooses the node for `request` among `nodes` under `strategy`, or explains why none fits.
#[allow(
    clippy::result_large_err,
    reason = "the error is the rare, cold outcome and is meant to be read field by field; boxing it would change nothing but the signature"
)]
pub fn place(nodes: &[NodeView], request: &PlacementRequest, strategy: Strategy) -> Result<Placement, Unschedulable> {
    let region = request.region.as_deref();
    let check_labels = !request.required_labels.is_empty();
    let (need_cpu, need_memory, need_disk) = (request.cpu_millis, request.memory_bytes, request.disk_bytes);

    // (ranking key, free fraction after placement, node)
    let mut best: Option<(f64, f64, &NodeView)> = None;
    for node in nodes {
        let free = node.free();
        let fits = node.healthy
            & (free.cpu_millis >= need_cpu)
            & (free.memory_bytes >= need_memory)
            & (free.disk_bytes >= need_disk);
        if !fits
            || request.exclude_node == Some(node.id)
            || region.is_some_and(|region| region != node.region)
            || (check_labels && !has_labels(node, &request.required_labels))
        {
            continue;
        }
        let free_after = free_fraction_after(
            free.cpu_millis,
            free.memory_bytes,
            reciprocal(node.allocatable.cpu_millis),
            reciprocal(node.allocatable.memory_bytes),
            need_cpu,
            need_memory,
        );
        let key = strategy.key(free_after);
        let better = match best {
            None => true,
            Some((best_key, _, best_node)) => key > best_key || (key == best_key && node.id < best_node.id),
        };
        if better {
            best = Some((key, free_after, node));
        }
    }
    match best {
        Some((_, free_after, node)) => Ok(Placement {
            node_id: node.id,
            score: strategy.score(free_after),
        }),
        None => Err(diagnose(nodes, request)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use instapod_common::node::Capacity;

    use super::*;
    use crate::testkit::{
        Rng, exact_free_after, node, oracle_free_after, oracle_qualifies, oracle_ranking, random_fleet, random_request,
    };

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn request(cpu_millis: u64, memory_bytes: u64, disk_bytes: u64) -> PlacementRequest {
        PlacementRequest {
            cpu_millis,
            memory_bytes,
            disk_bytes,
            ..PlacementRequest::default()
        }
    }

    fn reserved(mut view: NodeView, cpu_millis: u64, memory_bytes: u64, disk_bytes: u64) -> NodeView {
        view.reserved = Capacity {
            cpu_millis,
            memory_bytes,
            disk_bytes,
        };
        view
    }

    fn in_region(mut view: NodeView, region: &str) -> NodeView {
        view.region = region.to_string();
        view
    }

    fn unhealthy(mut view: NodeView) -> NodeView {
        view.healthy = false;
        view
    }

    fn labelled(mut view: NodeView, key: &str, value: &str) -> NodeView {
        view.labels.insert(key.to_string(), value.to_string());
        view
    }

    /// Places `request` on `nodes` with both strategies and expects node `expected` (by the
    /// number its id was made from) for each, or the message for `Err`.
    #[track_caller]
    fn check(nodes: &[NodeView], request: &PlacementRequest, expected: [Result<u128, &str>; 2]) {
        for (strategy, expected) in [Strategy::BinPack, Strategy::Spread].into_iter().zip(expected) {
            let got = place(nodes, request, strategy)
                .map(|placement| placement.node_id.as_u128())
                .map_err(|unschedulable| unschedulable.to_string());
            assert_eq!(got, expected.map_err(str::to_string), "{strategy:?}");
        }
    }

    #[test]
    fn region_filters_nodes() {
        let nodes = [
            node(1, 4000, 8 * GIB, 100 * GIB),
            in_region(node(2, 4000, 8 * GIB, 100 * GIB), "us"),
        ];
        let mut wants = request(1000, GIB, GIB);
        wants.region = Some("us".to_string());
        check(&nodes, &wants, [Ok(2), Ok(2)]);
        wants.region = Some("eu".to_string());
        check(&nodes, &wants, [Ok(1), Ok(1)]);
        wants.region = Some("ap".to_string());
        let message = "no node in region ap (2 nodes in other regions)";
        check(&nodes, &wants, [Err(message), Err(message)]);
    }

    #[test]
    fn unhealthy_nodes_are_skipped() {
        // Node 1 would win both strategies on capacity alone (it is the only candidate shape).
        let nodes = [
            unhealthy(node(1, 4000, 8 * GIB, 100 * GIB)),
            reserved(node(2, 4000, 8 * GIB, 100 * GIB), 2000, 0, 0),
        ];
        check(&nodes, &request(1000, GIB, GIB), [Ok(2), Ok(2)]);
        let all_down = [
            unhealthy(node(1, 4000, 8 * GIB, 100 * GIB)),
            unhealthy(node(2, 4000, 8 * GIB, 100 * GIB)),
        ];
        let mut wants = request(1000, GIB, GIB);
        check(
            &all_down,
            &wants,
            [
                Err("no healthy node (2 nodes unhealthy)"),
                Err("no healthy node (2 nodes unhealthy)"),
            ],
        );
        wants.region = Some("eu".to_string());
        let message = "no healthy node in region eu (2 nodes unhealthy)";
        check(&all_down, &wants, [Err(message), Err(message)]);
    }

    #[test]
    fn every_capacity_dimension_is_respected() {
        // Node 1 is the roomiest node in all dimensions but the one under test, where it has
        // one unit less than asked; node 2 has exactly what is asked.
        let wants = request(1000, GIB, 10 * GIB);
        let exact = node(2, 1000, GIB, 10 * GIB);
        for (dimension, short) in [
            ("cpu", node(1, 999, 64 * GIB, 1000 * GIB)),
            ("memory", node(1, 64_000, GIB - 1, 1000 * GIB)),
            ("disk", node(1, 64_000, 64 * GIB, 10 * GIB - 1)),
        ] {
            let nodes = [short.clone(), exact.clone()];
            for strategy in [Strategy::BinPack, Strategy::Spread] {
                let placement = place(&nodes, &wants, strategy).expect("node 2 fits exactly");
                assert_eq!(placement.node_id.as_u128(), 2, "{dimension} {strategy:?}");
            }
            let unschedulable = place(&nodes[..1], &wants, Strategy::BinPack).expect_err("node 1 is short");
            assert!(
                unschedulable.to_string().contains(&format!("1 node lacks {dimension}")),
                "{unschedulable}"
            );
        }
        // Reservations count the same way as a smaller node.
        let nodes = [reserved(node(1, 2000, 2 * GIB, 20 * GIB), 1001, 0, 0), exact];
        check(&nodes, &wants, [Ok(2), Ok(2)]);
    }

    #[test]
    fn bin_packing_and_spread_choose_differently() {
        // Node 1 is 3/4 used, node 2 is empty; both can take the pod.
        let nodes = [
            reserved(node(1, 4000, 4 * GIB, 100 * GIB), 3000, 3 * GIB, 0),
            node(2, 4000, 4 * GIB, 100 * GIB),
        ];
        let wants = request(500, 512 * MIB, GIB);
        check(&nodes, &wants, [Ok(1), Ok(2)]);
        // Bin-packing reports node 1's used fraction after placement: (3.5/4 + 3.5/4) / 2.
        let packed = place(&nodes, &wants, Strategy::BinPack).expect("fits");
        assert_eq!(packed.score, 0.875);
        // Spread reports node 2's free fraction after placement: (3.5/4 + 3.5/4) / 2.
        let spread = place(&nodes, &wants, Strategy::Spread).expect("fits");
        assert_eq!(spread.score, 0.875);
    }

    #[test]
    fn the_score_normalises_by_each_nodes_size() {
        // Half of a small node left versus a quarter of a large node left: bin-packing takes
        // the large node even though it has more free in absolute terms.
        let nodes = [
            reserved(node(1, 2000, 2 * GIB, 100 * GIB), 1000, GIB, 0),
            reserved(node(2, 16_000, 16 * GIB, 100 * GIB), 12_000, 12 * GIB, 0),
        ];
        check(&nodes, &request(0, 0, 0), [Ok(2), Ok(1)]);
    }

    #[test]
    fn required_labels_must_all_match() {
        let nodes = [
            labelled(node(1, 4000, 8 * GIB, 100 * GIB), "disk", "hdd"),
            labelled(
                labelled(reserved(node(2, 4000, 8 * GIB, 100 * GIB), 3000, 0, 0), "disk", "ssd"),
                "zone",
                "a",
            ),
            labelled(node(3, 4000, 8 * GIB, 100 * GIB), "zone", "a"),
        ];
        let mut wants = request(500, GIB, GIB);
        wants.required_labels = BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
        check(&nodes, &wants, [Ok(2), Ok(2)]);
        wants.required_labels.insert("zone".to_string(), "a".to_string());
        check(&nodes, &wants, [Ok(2), Ok(2)]);
        wants.required_labels.insert("zone".to_string(), "b".to_string());
        let message = "no node can take the pod: 3 nodes lack a required label (disk=ssd, zone=b)";
        check(&nodes, &wants, [Err(message), Err(message)]);
    }

    #[test]
    fn the_excluded_node_is_never_chosen() {
        let nodes = [
            node(1, 4000, 8 * GIB, 100 * GIB),
            reserved(node(2, 4000, 8 * GIB, 100 * GIB), 3000, 0, 0),
        ];
        let mut wants = request(500, GIB, GIB);
        check(&nodes, &wants, [Ok(2), Ok(1)]);
        wants.exclude_node = Some(Uuid::from_u128(2));
        check(&nodes, &wants, [Ok(1), Ok(1)]);
        wants.exclude_node = Some(Uuid::from_u128(1));
        check(&nodes, &wants, [Ok(2), Ok(2)]);
        let message = "no node can take the pod: the pod's current node is excluded";
        check(&nodes[..1], &wants, [Err(message), Err(message)]);
    }

    #[test]
    fn ties_go_to_the_smallest_id_whatever_the_order() {
        let mut nodes: Vec<NodeView> = [7, 3, 9, 5]
            .into_iter()
            .map(|id| node(id, 4000, 8 * GIB, 100 * GIB))
            .collect();
        for _ in 0..4 {
            check(&nodes, &request(1000, GIB, GIB), [Ok(3), Ok(3)]);
            nodes.rotate_left(1);
        }
        nodes.reverse();
        check(&nodes, &request(1000, GIB, GIB), [Ok(3), Ok(3)]);
    }

    #[test]
    fn unschedulable_names_every_reason_with_counts_and_largest_free() {
        let nodes = [
            // Three unhealthy nodes in eu.
            unhealthy(node(1, 8000, 8 * GIB, 100 * GIB)),
            unhealthy(node(2, 8000, 8 * GIB, 100 * GIB)),
            unhealthy(node(3, 8000, 8 * GIB, 100 * GIB)),
            // Two short of memory (the larger has 256 MiB free), one of them also of cpu.
            reserved(node(4, 8000, GIB, 100 * GIB), 0, 768 * MIB, 0),
            reserved(node(5, 8000, GIB, 100 * GIB), 7500, 896 * MIB, 0),
            // One short of cpu only: 1.5 cores free, which is also the nearest miss on cpu.
            reserved(node(6, 8000, 8 * GIB, 100 * GIB), 6500, 0, 0),
            // Healthy, but elsewhere.
            in_region(node(7, 64_000, 64 * GIB, 100 * GIB), "us"),
        ];
        let mut wants = request(2000, 512 * MIB, GIB);
        wants.region = Some("eu".to_string());
        let unschedulable = place(&nodes, &wants, Strategy::BinPack).expect_err("nothing fits in eu");
        assert_eq!(
            unschedulable.to_string(),
            "no node in region eu can take the pod: 2 nodes lack cpu (need 2 cores, largest free 1.5 cores); \
             2 nodes lack memory (need 512 MiB, largest free 256 MiB); 3 nodes unhealthy; \
             1 node in other regions"
        );
        assert_eq!(
            (
                unschedulable.nodes_total,
                unschedulable.nodes_unhealthy,
                unschedulable.nodes_in_other_regions
            ),
            (7, 3, 1)
        );
        assert_eq!(
            (unschedulable.nodes_lacking_cpu, unschedulable.nodes_lacking_memory),
            (2, 2)
        );
        assert_eq!(
            (
                unschedulable.largest_free.cpu_millis,
                unschedulable.largest_free.memory_bytes
            ),
            (1500, 256 * MIB)
        );
        assert_eq!(place(&nodes, &wants, Strategy::Spread), Err(unschedulable));
    }

    #[test]
    fn a_full_fleet_is_unschedulable() {
        let nodes: Vec<NodeView> = (1..=5)
            .map(|id| reserved(node(id, 4000, 8 * GIB, 100 * GIB), 4000, 8 * GIB, 100 * GIB))
            .collect();
        let unschedulable = place(&nodes, &request(250, 64 * MIB, GIB), Strategy::BinPack).expect_err("full");
        assert_eq!(
            unschedulable.to_string(),
            "no node can take the pod: 5 nodes lack cpu (need 0.25 cores, largest free 0 cores); \
             5 nodes lack memory (need 64 MiB, largest free 0 B); 5 nodes lack disk (need 1 GiB, largest free 0 B)"
        );
        // A pod that asks for nothing still fits on a full node.
        assert!(place(&nodes, &request(0, 0, 0), Strategy::BinPack).is_ok());
    }

    #[test]
    fn an_empty_fleet_is_unschedulable() {
        let unschedulable = place(&[], &request(250, MIB, 0), Strategy::Spread).expect_err("no nodes");
        assert_eq!(unschedulable.to_string(), "no node has joined the fleet");
    }

    #[test]
    fn types_round_trip_through_json() {
        let nodes = [labelled(node(1, 4000, 8 * GIB, 100 * GIB), "disk", "ssd")];
        let view: NodeView = serde_json::from_str(&serde_json::to_string(&nodes[0]).expect("json")).expect("parses");
        assert_eq!(view, nodes[0]);
        let placement = place(&nodes, &request(1000, GIB, GIB), Strategy::BinPack).expect("fits");
        let text = serde_json::to_string(&placement).expect("json");
        assert_eq!(serde_json::from_str::<Placement>(&text).expect("parses"), placement);
        let unschedulable = place(&nodes, &request(8000, GIB, GIB), Strategy::BinPack).expect_err("too big");
        let text = serde_json::to_string(&unschedulable).expect("json");
        assert_eq!(
            serde_json::from_str::<Unschedulable>(&text).expect("parses"),
            unschedulable
        );
    }

    /// Random fleets and requests against the oracle: the choice fits, nothing that fits ranks
    /// strictly higher, ties go to the smallest id, the order of the nodes does not matter, and
    /// an unschedulable answer's counts add up.
    #[test]
    fn random_cases_agree_with_the_oracle() {
        let mut rng = Rng(0x5EED_0001);
        let mut placed = 0;
        for case in 0..1000 {
            let nodes = random_fleet(&mut rng, 30);
            let wants = random_request(&mut rng, &nodes);
            for strategy in [Strategy::BinPack, Strategy::Spread] {
                let result = place(&nodes, &wants, strategy);
                let ranking = oracle_ranking(&nodes, &wants, strategy);
                let context = format!("case {case}, {strategy:?}, {wants:?}");
                match &result {
                    Ok(placement) => {
                        placed += 1;
                        let chosen = nodes
                            .iter()
                            .find(|node| node.id == placement.node_id)
                            .expect("the chosen node is in the fleet");
                        assert!(oracle_qualifies(chosen, &wants), "{context}");
                        let chosen_key = strategy.key(oracle_free_after(chosen, &wants));
                        for other in nodes.iter().filter(|node| oracle_qualifies(node, &wants)) {
                            let key = strategy.key(oracle_free_after(other, &wants));
                            assert!(key <= chosen_key, "{context}: {} ranks higher", other.id);
                            if key == chosen_key {
                                assert!(other.id >= chosen.id, "{context}: tie not broken by id");
                            }
                        }
                        assert_eq!(ranking.first().map(|(node, _)| node.id), Some(chosen.id), "{context}");
                        let exact = strategy.score(exact_free_after(chosen, &wants));
                        assert!(
                            (placement.score - exact).abs() < 1e-12,
                            "{context}: score {}",
                            placement.score
                        );
                        assert!((0.0..=1.0).contains(&placement.score), "{context}");
                    }
                    Err(unschedulable) => {
                        assert!(ranking.is_empty(), "{context}: the oracle found {}", ranking.len());
                        let filtered = unschedulable.nodes_excluded
                            + unschedulable.nodes_in_other_regions
                            + unschedulable.nodes_unhealthy
                            + unschedulable.nodes_missing_labels;
                        let eligible = nodes.len() - filtered;
                        assert_eq!(unschedulable.nodes_total, nodes.len(), "{context}");
                        assert!(unschedulable.nodes_lacking_cpu <= eligible, "{context}");
                        assert!(
                            unschedulable.nodes_lacking_cpu
                                + unschedulable.nodes_lacking_memory
                                + unschedulable.nodes_lacking_disk
                                >= eligible,
                            "{context}: every eligible node lacks something"
                        );
                        assert!(!unschedulable.to_string().is_empty());
                    }
                }
                let mut reversed = nodes.clone();
                reversed.reverse();
                assert_eq!(place(&reversed, &wants, strategy), result, "{context}: order matters");
            }
        }
        // The generator must exercise both outcomes a fair amount.
        assert!((300..1700).contains(&placed), "{placed} of 2000 placed");
    }
}
