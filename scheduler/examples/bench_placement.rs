//! Placement throughput of the pure algorithm on a simulated fleet of 10,000 nodes.
//!
//! ```sh
//! cargo run --release --example bench_placement [-- <seconds per measurement, default 1>]
//! ```
//!
//! *What is measured.* The fleet is simulated: 10,000 in-memory [`NodeView`]s with seeded
//! random sizes (8–64 cores, 32–512 GiB memory, 500–4,000 GiB disk) and reservations (0–100% of
//! each dimension), spread over 3 regions, about 5% unhealthy and a third labelled `disk=ssd`.
//! No Postgres, no Redis, no worker: this is the library function alone, on one thread.
//! Requests cycle through 4,096 seeded variants (0.25–8 cores, 256 MiB–32 GiB, 1–100 GiB disk;
//! 60% pinned to a region, 10% requiring `disk=ssd`, 5% excluding a node; about 1% ask for 96
//! cores, more than any node has, so the unschedulable path with its diagnosis is in the mix). The
//! snapshot is not changed between placements (nothing is reserved), so every placement sees
//! the same fleet. For each strategy it times [`place`] (a pass over the slice) and
//! [`FleetIndex::place`] (the index is built before timing; its build time is printed apart),
//! each for the given duration, and prints placements per second and nanoseconds per
//! placement. Before timing, it checks that both return the same answers on 512 requests per
//! strategy.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use instapod_common::node::Capacity;
use instapod_scheduler::{FleetIndex, NodeView, PlacementRequest, Strategy, place};
use uuid::Uuid;

const NODES: usize = 10_000;
const REQUESTS: usize = 4_096;
const REGIONS: [&str; 3] = ["eu-central", "us-east", "ap-southeast"];
const GIB: u64 = 1 << 30;

/// SplitMix64: a tiny seeded generator, so every run sees the same fleet and requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn fleet(rng: &mut Rng) -> Vec<NodeView> {
    (0..NODES)
        .map(|index| {
            let allocatable = Capacity {
                cpu_millis: rng.pick(&[8, 16, 32, 64]) * 1000,
                memory_bytes: rng.pick(&[32, 64, 128, 256, 512]) * GIB,
                disk_bytes: rng.pick(&[500, 1000, 2000, 4000]) * GIB,
            };
            let reserved = Capacity {
                cpu_millis: allocatable.cpu_millis * rng.below(101) / 100,
                memory_bytes: allocatable.memory_bytes / 100 * rng.below(101),
                disk_bytes: allocatable.disk_bytes / 100 * rng.below(101),
            };
            let mut labels = BTreeMap::new();
            if rng.chance(33) {
                labels.insert("disk".to_string(), "ssd".to_string());
            }
            labels.insert("rack".to_string(), format!("r{}", rng.below(50)));
            NodeView {
                id: Uuid::from_u64_pair(rng.next(), rng.next()),
                name: format!("node-{index:05}"),
                region: rng.pick(&REGIONS).to_string(),
                labels,
                healthy: !rng.chance(5),
                allocatable,
                reserved,
            }
        })
        .collect()
}

fn requests(rng: &mut Rng, nodes: &[NodeView]) -> Vec<PlacementRequest> {
    (0..REQUESTS)
        .map(|_| PlacementRequest {
            // About 1% ask for more CPU than any node has, so the diagnosis runs too.
            cpu_millis: if rng.chance(1) {
                96_000
            } else {
                rng.pick(&[250, 500, 1000, 2000, 4000, 8000])
            },
            memory_bytes: rng.pick(&[256 << 20, 512 << 20, GIB, 2 * GIB, 4 * GIB, 8 * GIB, 32 * GIB]),
            disk_bytes: rng.pick(&[1, 5, 10, 20, 100]) * GIB,
            region: rng.chance(60).then(|| rng.pick(&REGIONS).to_string()),
            required_labels: if rng.chance(10) {
                BTreeMap::from([("disk".to_string(), "ssd".to_string())])
            } else {
                BTreeMap::new()
            },
            exclude_node: rng.chance(5).then(|| nodes[rng.below(nodes.len() as u64) as usize].id),
        })
        .collect()
}

struct Measurement {
    placements: u64,
    unschedulable: u64,
    elapsed: Duration,
}

/// Calls `place_one` with the request variants in turn until `duration` has passed (checking
/// the clock every 256 placements); `place_one` answers whether the pod was placed.
fn measure(
    duration: Duration,
    requests: &[PlacementRequest],
    mut place_one: impl FnMut(&PlacementRequest) -> bool,
) -> Measurement {
    let started = Instant::now();
    let mut placements = 0u64;
    let mut unschedulable = 0u64;
    let mut next = 0usize;
    while started.elapsed() < duration {
        for _ in 0..256 {
            if !place_one(black_box(&requests[next])) {
                unschedulable += 1;
            }
            next = (next + 1) % requests.len();
        }
        placements += 256;
    }
    Measurement {
        placements,
        unschedulable,
        elapsed: started.elapsed(),
    }
}

fn report(label: &str, measurement: &Measurement) {
    let seconds = measurement.elapsed.as_secs_f64();
    println!(
        "{label:<28} {:>9.0} placements/s {:>8.0} ns/placement  ({} placements in {:.2} s, {:.1}% unschedulable)",
        measurement.placements as f64 / seconds,
        seconds * 1e9 / measurement.placements as f64,
        measurement.placements,
        seconds,
        100.0 * measurement.unschedulable as f64 / measurement.placements as f64,
    );
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|text| {
            text.parse()
                .expect("the argument is the number of seconds per measurement")
        })
        .unwrap_or(1.0);
    let duration = Duration::from_secs_f64(seconds);
    let mut rng = Rng(0x1A57_A90D);
    let nodes = fleet(&mut rng);
    let requests = requests(&mut rng, &nodes);
    println!(
        "{NODES} simulated nodes ({} healthy), {REQUESTS} request variants, {seconds} s per measurement, one thread",
        nodes.iter().filter(|node| node.healthy).count()
    );

    // Building the index is per snapshot, not per placement; report the fastest of five.
    let mut fastest_build = Duration::MAX;
    let mut built = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        built.push(black_box(FleetIndex::new(&nodes)));
        fastest_build = fastest_build.min(started.elapsed());
    }
    let index = built.pop().expect("built five times");
    drop(built);
    println!(
        "FleetIndex::new over {NODES} nodes: {:.1} ms (fastest of 5)",
        fastest_build.as_secs_f64() * 1e3
    );

    // Both entry points must agree; check a sample before timing anything.
    for strategy in [Strategy::BinPack, Strategy::Spread] {
        for request in requests.iter().take(512) {
            assert_eq!(
                index.place(request, strategy),
                place(&nodes, request, strategy),
                "the index and the slice scan disagree on {request:?}"
            );
        }
    }

    for strategy in [Strategy::BinPack, Strategy::Spread] {
        let measurement = measure(duration, &requests, |request| {
            black_box(place(black_box(&nodes), request, strategy)).is_ok()
        });
        report(&format!("place, {}", strategy.as_str()), &measurement);
        let measurement = measure(duration, &requests, |request| {
            black_box(black_box(&index).place(request, strategy)).is_ok()
        });
        report(&format!("FleetIndex::place, {}", strategy.as_str()), &measurement);
    }
}
