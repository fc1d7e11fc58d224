//! [`FleetIndex`]: the same placement as [`crate::place()`], from a compact copy of the snapshot
//! built once, for callers that place many pods against one view of the fleet.
//!
//! *Design.* [`crate::place()`] reads every [`NodeView`] on every call; at 10,000 nodes that is
//! about 1.5 MB of scattered memory per placement (region strings and label maps live on the
//! heap), which holds it to a few thousand placements a second. The index keeps only healthy
//! nodes, grouped by region, each as a 56-byte slot: free CPU, memory and disk, a bit set of its
//! labels, the reciprocals of its allocatable CPU and memory, and its free fraction `f` (the
//! mean of its free CPU and memory fractions). A request has a fraction too on each node,
//! `r = (cpu / allocatable cpu + memory / allocatable memory) / 2`, and the score's "free
//! fraction after placement" is exactly `f - r`; a node can only fit when `f >= r`.
//!
//! Within a region the slots are ordered by shape (allocatable CPU and memory, rounded to steps
//! of 1/8 of a power of two), then by `f`, and cut into blocks of at most 32 slots of one
//! shape. Each block keeps a summary: the most free in each dimension, the union of its label
//! bits, and the ranges of its `f` and of its reciprocals (hence of `r` for any request).
//! Because a block holds one shape, `r` is nearly constant across it and the summary bounds the
//! block's best score tightly. A search visits a block only when some slot could fit (every
//! dimension's maximum and every required label bit present, and the largest `f` at least the
//! smallest `r`) and could beat the best found so far; within each shape it starts from the end
//! the strategy prefers (the fullest for bin-packing, the emptiest for spread). Inside a block
//! it walks the slots in that same order, skips those too full to fit, and stops at the first
//! slot whose `f` already rules out beating the best: every slot after it is further from what
//! the strategy prefers. Bin-packing thus looks, per shape, at a narrow band of nodes just roomy
//! enough for the pod, and spread at the emptiest few. Every bound carries a margin far above
//! floating-point error, so pruning never drops a tie.
//!
//! *Invariants.* For the same nodes, request and strategy, [`FleetIndex::place`] returns exactly
//! what [`crate::place()`] returns — the same node and bit-identical score (both use
//! [`crate::strategy::free_fraction_after`] on the same reciprocals, and pruning only drops
//! slots that are provably worse, never tied), and the same [`Unschedulable`] (the diagnosis
//! counts the same nodes from per-region totals and the slots). The slots of every block are in
//! ascending order of `f` (ties by id), and each block's summary describes its slots:
//! [`FleetIndex::reserve`] and [`FleetIndex::release`] update the view and the slot, re-sort the
//! slot's block and recompute its summary, so afterwards the index still agrees with
//! [`crate::place()`] over [`FleetIndex::nodes`]. Node ids must be unique in the snapshot.
//!
//! *Limitations.* A reservation re-sorts a slot within its block but never moves it to another
//! block, so as pods are placed the blocks of a shape overlap more in `f` and fewer are skipped
//! (never wrongly); build a new index when the caller refreshes its snapshot anyway. Changes of
//! health, labels, region or allocatable need a new index too. The first 64 label pairs (the
//! most common on healthy nodes) get a bit; a request that requires a rarer pair is checked
//! against the view's labels for every slot that fits, which is slower but exact.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use instapod_common::node::Capacity;
use uuid::Uuid;

use crate::node::NodeView;
use crate::place::Placement;
use crate::request::PlacementRequest;
use crate::strategy::{Strategy, free_fraction_after, reciprocal};
use crate::unschedulable::{Unschedulable, has_labels};

/// Slots per block: small enough that a block's bounds are tight, large enough that the pass
/// over block summaries stays a small part of a search.
const BLOCK: usize = 32;

/// How much a bound may be off through floating-point rounding, with room to spare: fractions
/// are at most about 1, and each is a handful of operations with a relative error of 2^-53.
const MARGIN: f64 = 1e-9;

/// A label pair without a bit (beyond the first 64) is checked against the view.
const LABEL_BITS: usize = 64;

/// An index of a fleet snapshot for fast, exact placement. See the module documentation.
#[derive(Debug, Clone)]
pub struct FleetIndex {
    /// Every node of the snapshot, healthy or not, in the order given.
    views: Vec<NodeView>,
    /// Node id → position in `views`.
    positions: HashMap<Uuid, usize>,
    /// Position in `views` → (group, slot) for healthy nodes.
    locations: Vec<Option<(usize, usize)>>,
    /// One group per region with at least one healthy node.
    groups: Vec<RegionGroup>,
    /// Region → (nodes, healthy nodes), for the diagnosis.
    region_counts: HashMap<String, (usize, usize)>,
    /// Label pairs on healthy nodes: key → value → bit, `None` for pairs beyond the 64 bits.
    labels: BTreeMap<String, BTreeMap<String, Option<u8>>>,
}

#[derive(Debug, Clone)]
struct RegionGroup {
    region: String,
    slots: Vec<Slot>,
    /// Per slot: the node's id (read only to break exact ties) and position in `views`.
    ids: Vec<Uuid>,
    views: Vec<usize>,
    blocks: Vec<Block>,
}

/// What the inner loop reads of one node.
#[derive(Debug, Clone, Copy)]
struct Slot {
    free_cpu_millis: u64,
    free_memory_bytes: u64,
    free_disk_bytes: u64,
    label_bits: u64,
    reciprocal_cpu: f64,
    reciprocal_memory: f64,
    /// The free fraction before any placement (see [`Slot::compute_free_fraction`]), kept in
    /// step with the free amounts; slots of a block are in ascending order of it.
    free_fraction: f64,
}

impl Slot {
    /// The mean free fraction of CPU and memory before any placement: the part of the score
    /// that does not depend on the request. A slot that fits a request has at least the
    /// request's fraction `(cpu·r_cpu + memory·r_memory)/2` free (up to rounding).
    fn compute_free_fraction(&self) -> f64 {
        (self.free_cpu_millis as f64 * self.reciprocal_cpu + self.free_memory_bytes as f64 * self.reciprocal_memory)
            * 0.5
    }
}

/// A healthy node while the index is built: its slot and what it is sorted by.
struct Entry {
    shape: (u32, u32),
    free_fraction: f64,
    id: Uuid,
    slot: Slot,
    /// Position in `views`.
    position: usize,
}

/// A summary of the slots `start..end` of a group, from which a search decides to skip them.
#[derive(Debug, Clone, Copy)]
struct Block {
    start: usize,
    end: usize,
    max_free_cpu_millis: u64,
    max_free_memory_bytes: u64,
    max_free_disk_bytes: u64,
    /// The union of the slots' label bits.
    label_bits_any: u64,
    min_free_fraction: f64,
    max_free_fraction: f64,
    min_reciprocal_cpu: f64,
    max_reciprocal_cpu: f64,
    min_reciprocal_memory: f64,
    max_reciprocal_memory: f64,
}

impl Block {
    fn summarise(slots: &[Slot], start: usize, end: usize) -> Block {
        let mut block = Block {
            start,
            end,
            max_free_cpu_millis: 0,
            max_free_memory_bytes: 0,
            max_free_disk_bytes: 0,
            label_bits_any: 0,
            min_free_fraction: f64::INFINITY,
            max_free_fraction: f64::NEG_INFINITY,
            min_reciprocal_cpu: f64::INFINITY,
            max_reciprocal_cpu: f64::NEG_INFINITY,
            min_reciprocal_memory: f64::INFINITY,
            max_reciprocal_memory: f64::NEG_INFINITY,
        };
        for slot in &slots[start..end] {
            block.max_free_cpu_millis = block.max_free_cpu_millis.max(slot.free_cpu_millis);
            block.max_free_memory_bytes = block.max_free_memory_bytes.max(slot.free_memory_bytes);
            block.max_free_disk_bytes = block.max_free_disk_bytes.max(slot.free_disk_bytes);
            block.label_bits_any |= slot.label_bits;
            let fraction = slot.free_fraction;
            block.min_free_fraction = block.min_free_fraction.min(fraction);
            block.max_free_fraction = block.max_free_fraction.max(fraction);
            block.min_reciprocal_cpu = block.min_reciprocal_cpu.min(slot.reciprocal_cpu);
            block.max_reciprocal_cpu = block.max_reciprocal_cpu.max(slot.reciprocal_cpu);
            block.min_reciprocal_memory = block.min_reciprocal_memory.min(slot.reciprocal_memory);
            block.max_reciprocal_memory = block.max_reciprocal_memory.max(slot.reciprocal_memory);
        }
        block
    }

    /// The range of a request's fraction `(cpu·r_cpu + memory·r_memory)/2` over the slots of
    /// this block, for a request of `cpu`/`memory` (as floats).
    #[inline(always)]
    fn request_fractions(&self, cpu: f64, memory: f64) -> RequestFractions {
        RequestFractions {
            smallest: 0.5 * (cpu * self.min_reciprocal_cpu + memory * self.min_reciprocal_memory),
            largest: 0.5 * (cpu * self.max_reciprocal_cpu + memory * self.max_reciprocal_memory),
        }
    }

    /// The highest ranking key any slot of this block could reach, before the margin.
    #[inline(always)]
    fn best_possible_key(&self, strategy: Strategy, fractions: &RequestFractions) -> f64 {
        match strategy {
            Strategy::Spread => best_possible_key(strategy, self.max_free_fraction, fractions),
            Strategy::BinPack => best_possible_key(strategy, self.min_free_fraction, fractions),
        }
    }
}

/// The range of a request's fraction over the slots of one block (see
/// [`Block::request_fractions`]).
#[derive(Debug, Clone, Copy)]
struct RequestFractions {
    smallest: f64,
    largest: f64,
}

/// The highest ranking key a slot with free fraction `free_fraction` could reach for a request
/// whose fraction lies in `fractions`, before the margin. The score's free fraction after
/// placement is the slot's free fraction minus the request's fraction (exactly, in real
/// arithmetic): spread ranks by it, bin-packing by its negation.
#[inline(always)]
fn best_possible_key(strategy: Strategy, free_fraction: f64, fractions: &RequestFractions) -> f64 {
    match strategy {
        Strategy::Spread => free_fraction - fractions.smallest,
        Strategy::BinPack => fractions.largest - free_fraction,
    }
}

/// [`FleetIndex::reserve`] or [`FleetIndex::release`] named a node the index does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownNode(pub Uuid);

impl fmt::Display for UnknownNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} is not in the fleet index", self.0)
    }
}

impl std::error::Error for UnknownNode {}

/// The request, prepared once per search.
struct Query {
    cpu_millis: u64,
    memory_bytes: u64,
    disk_bytes: u64,
    cpu_float: f64,
    memory_float: f64,
    label_mask: u64,
    /// Some required pair has no bit: check the view's labels of every slot that fits.
    check_labels_on_views: bool,
    /// Some required pair is on no healthy node.
    labels_impossible: bool,
    /// The excluded node's position in `views`, when the index holds it.
    excluded_position: Option<usize>,
    /// The excluded node's (group, slot), when it is a candidate.
    excluded: Option<(usize, usize)>,
}

/// The best slot so far.
struct Best {
    key: f64,
    free_after: f64,
    node_id: Option<Uuid>,
}

impl FleetIndex {
    /// Builds the index of a snapshot. Costs a sort of the healthy nodes per region; meant to be
    /// done once per snapshot, not per placement.
    pub fn new(nodes: &[NodeView]) -> FleetIndex {
        let views = nodes.to_vec();
        let positions = views
            .iter()
            .enumerate()
            .map(|(position, view)| (view.id, position))
            .collect();
        let labels = label_bits(&views);

        // Healthy nodes per region, in region-name order.
        let mut by_region: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut region_counts: HashMap<&str, (usize, usize)> = HashMap::new();
        for (position, view) in views.iter().enumerate() {
            let counts = region_counts.entry(view.region.as_str()).or_default();
            counts.0 += 1;
            if view.healthy {
                counts.1 += 1;
                by_region.entry(view.region.as_str()).or_default().push(position);
            }
        }
        let mut locations = vec![None; views.len()];
        let mut groups = Vec::with_capacity(by_region.len());
        for (region, positions) in by_region {
            let mut entries: Vec<Entry> = positions
                .into_iter()
                .map(|position| {
                    let view = &views[position];
                    let slot = slot_of(view, &labels);
                    Entry {
                        shape: shape_of(view),
                        free_fraction: slot.free_fraction,
                        id: view.id,
                        slot,
                        position,
                    }
                })
                .collect();
            // Nodes of one shape together, each shape from the fullest to the emptiest.
            entries.sort_by(|a, b| {
                a.shape
                    .cmp(&b.shape)
                    .then(a.free_fraction.total_cmp(&b.free_fraction))
                    .then(a.id.cmp(&b.id))
            });
            let group_index = groups.len();
            for (slot_index, entry) in entries.iter().enumerate() {
                locations[entry.position] = Some((group_index, slot_index));
            }
            let slots: Vec<Slot> = entries.iter().map(|entry| entry.slot).collect();
            // Blocks of at most BLOCK slots that never straddle two shapes.
            let mut blocks = Vec::with_capacity(slots.len() / BLOCK + 1);
            let mut start = 0;
            while start < entries.len() {
                let mut end = start + 1;
                while end < entries.len() && end - start < BLOCK && entries[end].shape == entries[start].shape {
                    end += 1;
                }
                blocks.push(Block::summarise(&slots, start, end));
                start = end;
            }
            groups.push(RegionGroup {
                region: region.to_string(),
                ids: entries.iter().map(|entry| entry.id).collect(),
                views: entries.iter().map(|entry| entry.position).collect(),
                slots,
                blocks,
            });
        }
        let region_counts = region_counts
            .into_iter()
            .map(|(region, counts)| (region.to_string(), counts))
            .collect();
        FleetIndex {
            views,
            positions,
            locations,
            groups,
            region_counts,
            labels,
        }
    }

    /// The snapshot as it stands, with every reservation made through the index applied.
    pub fn nodes(&self) -> &[NodeView] {
        &self.views
    }

    /// Number of nodes in the snapshot, healthy or not.
    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// Chooses the node for `request` under `strategy`, or explains why none fits: the same
    /// answer as [`crate::place()`] over [`FleetIndex::nodes`].
    #[allow(
        clippy::result_large_err,
        reason = "the error is the rare, cold outcome and is meant to be read field by field; boxing it would change nothing but the signature"
    )]
    pub fn place(&self, request: &PlacementRequest, strategy: Strategy) -> Result<Placement, Unschedulable> {
        let query = self.query(request);
        // One copy of the search per strategy, so the strategy's choices are made at compile time.
        let found = match strategy {
            Strategy::BinPack => self.search::<false>(request, &query),
            Strategy::Spread => self.search::<true>(request, &query),
        };
        found.ok_or_else(|| self.diagnose(request, &query))
    }

    /// Adds `amount` to the node's reservation (after the caller committed a placement there).
    pub fn reserve(&mut self, node_id: Uuid, amount: Capacity) -> Result<(), UnknownNode> {
        self.adjust(node_id, |reserved| Capacity {
            cpu_millis: reserved.cpu_millis.saturating_add(amount.cpu_millis),
            memory_bytes: reserved.memory_bytes.saturating_add(amount.memory_bytes),
            disk_bytes: reserved.disk_bytes.saturating_add(amount.disk_bytes),
        })
    }

    /// Takes `amount` off the node's reservation (a pod left it), never below zero.
    pub fn release(&mut self, node_id: Uuid, amount: Capacity) -> Result<(), UnknownNode> {
        self.adjust(node_id, |reserved| Capacity {
            cpu_millis: reserved.cpu_millis.saturating_sub(amount.cpu_millis),
            memory_bytes: reserved.memory_bytes.saturating_sub(amount.memory_bytes),
            disk_bytes: reserved.disk_bytes.saturating_sub(amount.disk_bytes),
        })
    }

    fn adjust(&mut self, node_id: Uuid, change: impl FnOnce(Capacity) -> Capacity) -> Result<(), UnknownNode> {
        let position = *self.positions.get(&node_id).ok_or(UnknownNode(node_id))?;
        let view = &mut self.views[position];
        view.reserved = change(view.reserved);
        let free = view.free();
        if let Some((group_index, slot_index)) = self.locations[position] {
            let group = &mut self.groups[group_index];
            let slot = &mut group.slots[slot_index];
            slot.free_cpu_millis = free.cpu_millis;
            slot.free_memory_bytes = free.memory_bytes;
            slot.free_disk_bytes = free.disk_bytes;
            slot.free_fraction = slot.compute_free_fraction();
            let block_index = group.blocks.partition_point(|block| block.end <= slot_index);
            if let Some(block) = group.blocks.get_mut(block_index) {
                // Restore the block's order (the slot's fraction changed), then its summary.
                let (start, end) = (block.start, block.end);
                let mut members: Vec<(Slot, Uuid, usize)> = (start..end)
                    .map(|index| (group.slots[index], group.ids[index], group.views[index]))
                    .collect();
                members.sort_by(|(a, a_id, _), (b, b_id, _)| {
                    a.free_fraction.total_cmp(&b.free_fraction).then(a_id.cmp(b_id))
                });
                for (offset, (member_slot, id, view_position)) in members.into_iter().enumerate() {
                    group.slots[start + offset] = member_slot;
                    group.ids[start + offset] = id;
                    group.views[start + offset] = view_position;
                    self.locations[view_position] = Some((group_index, start + offset));
                }
                *block = Block::summarise(&group.slots, start, end);
            }
        }
        Ok(())
    }

    /// The same answer as [`crate::unschedulable::diagnose`] over the views, computed from the
    /// per-region counts and the compact slots instead of every view.
    fn diagnose(&self, request: &PlacementRequest, query: &Query) -> Unschedulable {
        let mut report = Unschedulable::for_request(request);
        report.nodes_total = self.views.len();
        let excluded = query.excluded_position.map(|position| &self.views[position]);
        report.nodes_excluded = usize::from(excluded.is_some());
        let excluded_in_scope = |healthy: bool| {
            excluded.is_some_and(|view| {
                view.healthy == healthy && request.region.as_deref().is_none_or(|region| region == view.region)
            })
        };
        // Nodes in the requested region (every node without one), before exclusion.
        let (in_scope, in_scope_healthy) = match request.region.as_deref() {
            None => (
                self.views.len(),
                self.groups.iter().map(|group| group.slots.len()).sum(),
            ),
            Some(region) => self.region_counts.get(region).copied().unwrap_or((0, 0)),
        };
        let excluded_elsewhere =
            excluded.is_some_and(|view| request.region.as_deref().is_some_and(|region| region != view.region));
        report.nodes_in_other_regions = self.views.len() - in_scope - usize::from(excluded_elsewhere);
        report.nodes_unhealthy = in_scope - in_scope_healthy - usize::from(excluded_in_scope(false));
        for (group_index, group) in self.groups.iter().enumerate() {
            if request.region.as_deref().is_some_and(|region| region != group.region) {
                continue;
            }
            for (slot_index, slot) in group.slots.iter().enumerate() {
                if query.excluded == Some((group_index, slot_index)) {
                    continue;
                }
                let labelled = !query.labels_impossible
                    && slot.label_bits & query.label_mask == query.label_mask
                    && (!query.check_labels_on_views
                        || has_labels(&self.views[group.views[slot_index]], &request.required_labels));
                if labelled {
                    report.record_eligible(
                        Capacity {
                            cpu_millis: slot.free_cpu_millis,
                            memory_bytes: slot.free_memory_bytes,
                            disk_bytes: slot.free_disk_bytes,
                        },
                        request,
                    );
                } else {
                    report.nodes_missing_labels += 1;
                }
            }
        }
        report
    }

    /// Prepares `request` for a search or a diagnosis.
    fn query(&self, request: &PlacementRequest) -> Query {
        let mut label_mask = 0u64;
        let mut check_labels_on_views = false;
        let mut labels_impossible = false;
        for (key, value) in &request.required_labels {
            match self
                .labels
                .get(key.as_str())
                .and_then(|values| values.get(value.as_str()))
            {
                None => labels_impossible = true,
                Some(Some(bit)) => label_mask |= 1 << bit,
                Some(None) => check_labels_on_views = true,
            }
        }
        Query {
            cpu_millis: request.cpu_millis,
            memory_bytes: request.memory_bytes,
            disk_bytes: request.disk_bytes,
            cpu_float: request.cpu_millis as f64,
            memory_float: request.memory_bytes as f64,
            label_mask,
            check_labels_on_views,
            labels_impossible,
            excluded_position: request.exclude_node.and_then(|id| self.positions.get(&id).copied()),
            excluded: request
                .exclude_node
                .and_then(|id| self.positions.get(&id))
                .and_then(|position| self.locations[*position]),
        }
    }

    /// The best slot for `query` under spread (`SPREAD`) or bin-packing.
    fn search<const SPREAD: bool>(&self, request: &PlacementRequest, query: &Query) -> Option<Placement> {
        let strategy = if SPREAD { Strategy::Spread } else { Strategy::BinPack };
        if query.labels_impossible {
            // No healthy node carries some required label: nothing qualifies.
            return None;
        }
        let mut best = Best {
            key: f64::NEG_INFINITY,
            free_after: 0.0,
            node_id: None,
        };
        for (group_index, group) in self.groups.iter().enumerate() {
            if request.region.as_deref().is_some_and(|region| region != group.region) {
                continue;
            }
            let count = group.blocks.len();
            for step in 0..count {
                // Bin-packing starts from the fullest block, spread from the emptiest.
                let block = match strategy {
                    Strategy::BinPack => &group.blocks[step],
                    Strategy::Spread => &group.blocks[count - 1 - step],
                };
                let may_fit = (block.max_free_cpu_millis >= query.cpu_millis)
                    & (block.max_free_memory_bytes >= query.memory_bytes)
                    & (block.max_free_disk_bytes >= query.disk_bytes)
                    & (block.label_bits_any & query.label_mask == query.label_mask);
                let fractions = block.request_fractions(query.cpu_float, query.memory_float);
                let roomy_enough = block.max_free_fraction + MARGIN >= fractions.smallest;
                let may_win = block.best_possible_key(strategy, &fractions) + MARGIN >= best.key;
                if !(may_fit & roomy_enough & may_win) {
                    continue;
                }
                self.scan::<SPREAD>(group_index, group, block, &fractions, query, request, &mut best);
            }
        }
        best.node_id.map(|node_id| Placement {
            node_id,
            score: strategy.score(best.free_after),
        })
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the search's state, passed down to its inner loop"
    )]
    #[inline(never)]
    fn scan<const SPREAD: bool>(
        &self,
        group_index: usize,
        group: &RegionGroup,
        block: &Block,
        fractions: &RequestFractions,
        query: &Query,
        request: &PlacementRequest,
        best: &mut Best,
    ) {
        let strategy = if SPREAD { Strategy::Spread } else { Strategy::BinPack };
        // The excluded slot, or one no slot has.
        let excluded_slot = match query.excluded {
            Some((excluded_group, excluded_slot)) if excluded_group == group_index => excluded_slot,
            _ => usize::MAX,
        };
        let count = block.end - block.start;
        for step in 0..count {
            // Slots are in ascending order of free fraction: bin-packing walks up from the
            // fullest, spread down from the emptiest, and both stop at the first slot that
            // cannot beat the best even with the most favourable request fraction, since every
            // slot after it is further from what the strategy prefers.
            let slot_index = match strategy {
                Strategy::BinPack => block.start + step,
                Strategy::Spread => block.end - 1 - step,
            };
            let slot = &group.slots[slot_index];
            if slot.free_fraction + MARGIN < fractions.smallest {
                // Too full to fit: for bin-packing the roomier slots follow, for spread only
                // fuller ones do.
                match strategy {
                    Strategy::BinPack => continue,
                    Strategy::Spread => break,
                }
            }
            if best_possible_key(strategy, slot.free_fraction, fractions) + MARGIN < best.key {
                break;
            }
            // Branch-light: the key is minus infinity when the slot does not qualify, so the
            // only data-dependent branch is "could this beat the best".
            let qualifies = (slot.free_cpu_millis >= query.cpu_millis)
                & (slot.free_memory_bytes >= query.memory_bytes)
                & (slot.free_disk_bytes >= query.disk_bytes)
                & (slot.label_bits & query.label_mask == query.label_mask)
                & (slot_index != excluded_slot);
            let free_after = free_fraction_after(
                slot.free_cpu_millis,
                slot.free_memory_bytes,
                slot.reciprocal_cpu,
                slot.reciprocal_memory,
                query.cpu_millis,
                query.memory_bytes,
            );
            let key = if qualifies {
                strategy.key(free_after)
            } else {
                f64::NEG_INFINITY
            };
            if key < best.key || !qualifies {
                continue;
            }
            if query.check_labels_on_views
                && !has_labels(&self.views[group.views[slot_index]], &request.required_labels)
            {
                continue;
            }
            if key > best.key || best.node_id.is_none_or(|best_id| group.ids[slot_index] < best_id) {
                best.key = key;
                best.free_after = free_after;
                best.node_id = Some(group.ids[slot_index]);
            }
        }
    }
}

/// A node's shape class: its allocatable CPU and memory, each rounded to a step of 1/8 of a
/// power of two (at most 12.5% apart). Nodes of one class have nearly equal reciprocals, so
/// the part of the score that depends on the request is nearly the same across a block, and a
/// block's bound is close to its best slot's score.
fn shape_of(view: &NodeView) -> (u32, u32) {
    (
        magnitude(view.allocatable.cpu_millis),
        magnitude(view.allocatable.memory_bytes),
    )
}

/// `value` on a log scale with 8 steps per power of two; 0 for 0.
fn magnitude(value: u64) -> u32 {
    if value == 0 {
        return 0;
    }
    let exponent = 63 - value.leading_zeros();
    let mantissa = if exponent >= 3 {
        (value >> (exponent - 3)) & 7
    } else {
        (value << (3 - exponent)) & 7
    };
    1 + exponent * 8 + mantissa as u32
}

/// The slot of a healthy node.
fn slot_of(view: &NodeView, labels: &BTreeMap<String, BTreeMap<String, Option<u8>>>) -> Slot {
    let free = view.free();
    let mut label_bits = 0u64;
    for (key, value) in &view.labels {
        if let Some(Some(bit)) = labels.get(key).and_then(|values| values.get(value)) {
            label_bits |= 1 << bit;
        }
    }
    let mut slot = Slot {
        free_cpu_millis: free.cpu_millis,
        free_memory_bytes: free.memory_bytes,
        free_disk_bytes: free.disk_bytes,
        label_bits,
        reciprocal_cpu: reciprocal(view.allocatable.cpu_millis),
        reciprocal_memory: reciprocal(view.allocatable.memory_bytes),
        free_fraction: 0.0,
    };
    slot.free_fraction = slot.compute_free_fraction();
    slot
}

/// Every label pair on a healthy node, the 64 most common with a bit each.
fn label_bits(views: &[NodeView]) -> BTreeMap<String, BTreeMap<String, Option<u8>>> {
    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for view in views.iter().filter(|view| view.healthy) {
        for (key, value) in &view.labels {
            *counts.entry((key.as_str(), value.as_str())).or_default() += 1;
        }
    }
    let mut by_frequency: Vec<((&str, &str), usize)> = counts.into_iter().collect();
    // Most common first; ties in pair order, so the assignment is deterministic.
    by_frequency.sort_by(|(a_pair, a_count), (b_pair, b_count)| b_count.cmp(a_count).then(a_pair.cmp(b_pair)));
    let mut labels: BTreeMap<String, BTreeMap<String, Option<u8>>> = BTreeMap::new();
    for (rank, ((key, value), _)) in by_frequency.into_iter().enumerate() {
        let bit = (rank < LABEL_BITS).then_some(rank as u8);
        labels
            .entry(key.to_string())
            .or_default()
            .insert(value.to_string(), bit);
    }
    labels
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::place::place;
    use crate::testkit::{Rng, node, random_fleet, random_request};

    const GIB: u64 = 1 << 30;

    fn amount(cpu_millis: u64, memory_bytes: u64, disk_bytes: u64) -> Capacity {
        Capacity {
            cpu_millis,
            memory_bytes,
            disk_bytes,
        }
    }

    /// The index answers every request exactly as the slice scan does over the same views.
    #[track_caller]
    fn check_agrees(index: &FleetIndex, request: &PlacementRequest, context: &str) {
        for strategy in [Strategy::BinPack, Strategy::Spread] {
            assert_eq!(
                index.place(request, strategy),
                place(index.nodes(), request, strategy),
                "{context}, {strategy:?}, {request:?}"
            );
        }
    }

    /// Random fleets large enough for many blocks per region, random requests, and random
    /// reservations and releases between them: the index never disagrees with the scan.
    #[test]
    fn random_fleets_agree_with_the_slice_scan() {
        let mut rng = Rng(0x5EED_0002);
        for case in 0..200 {
            let mut nodes = random_fleet(&mut rng, 400);
            if case % 2 == 1 {
                // Few shapes, so regions hold full blocks of one shape.
                for view in &mut nodes {
                    view.allocatable =
                        rng.pick(&[amount(4000, 8 * GIB, 100 * GIB), amount(16_000, 64 * GIB, 100 * GIB)]);
                }
            }
            let mut index = FleetIndex::new(&nodes);
            assert_eq!(index.nodes(), &nodes[..]);
            for step in 0..10 {
                let context = format!("case {case}, step {step}");
                let request = random_request(&mut rng, index.nodes());
                check_agrees(&index, &request, &context);
                if let Ok(placement) = index.place(&request, Strategy::BinPack) {
                    index
                        .reserve(placement.node_id, request.capacity())
                        .expect("the node is indexed");
                }
                if !nodes.is_empty() && rng.chance(30) {
                    let node_id = rng.pick(&nodes).id;
                    let change = amount(rng.below(4000), rng.below(8 * GIB), rng.below(50 * GIB));
                    if rng.chance(50) {
                        index.reserve(node_id, change).expect("indexed");
                    } else {
                        index.release(node_id, change).expect("indexed");
                    }
                }
            }
        }
    }

    #[test]
    fn reservations_change_the_choice() {
        let nodes = [node(1, 4000, 8 * GIB, 100 * GIB), node(2, 4000, 8 * GIB, 100 * GIB)];
        let mut index = FleetIndex::new(&nodes);
        let request = PlacementRequest {
            cpu_millis: 3000,
            memory_bytes: GIB,
            ..PlacementRequest::default()
        };
        let first = index.place(&request, Strategy::BinPack).expect("fits");
        assert_eq!(first.node_id.as_u128(), 1);
        index.reserve(first.node_id, request.capacity()).expect("indexed");
        assert_eq!(index.nodes()[0].reserved, request.capacity());
        // Node 1 has 1 core left: the next pod goes to node 2.
        let second = index.place(&request, Strategy::BinPack).expect("fits");
        assert_eq!(second.node_id.as_u128(), 2);
        index.reserve(second.node_id, request.capacity()).expect("indexed");
        let full = index
            .place(&request, Strategy::BinPack)
            .expect_err("both nodes are taken");
        assert_eq!(full.nodes_lacking_cpu, 2);
        // A pod leaves node 2.
        index.release(second.node_id, request.capacity()).expect("indexed");
        check_agrees(&index, &request, "after release");
        assert_eq!(
            index.place(&request, Strategy::Spread).expect("fits").node_id.as_u128(),
            2
        );
    }

    /// Many identical nodes across several blocks: pruning and early exits must never drop a
    /// tie, so the smallest id wins under both strategies, also after reservations.
    #[test]
    fn ties_across_blocks_go_to_the_smallest_id() {
        let mut rng = Rng(0x5EED_0003);
        let mut ids: Vec<u128> = (1..=200).map(|index| index * 7919 % 1009 + 1).collect();
        // A shuffle, so the id order differs from the input order.
        for index in (1..ids.len()).rev() {
            ids.swap(index, rng.below(index as u64 + 1) as usize);
        }
        let nodes: Vec<NodeView> = ids.iter().map(|id| node(*id, 8000, 16 * GIB, 100 * GIB)).collect();
        let mut index = FleetIndex::new(&nodes);
        let request = PlacementRequest {
            cpu_millis: 1000,
            memory_bytes: GIB,
            ..PlacementRequest::default()
        };
        let smallest = *ids.iter().min().expect("ids");
        for strategy in [Strategy::BinPack, Strategy::Spread] {
            let placement = index.place(&request, strategy).expect("fits");
            assert_eq!(placement.node_id.as_u128(), smallest, "{strategy:?}");
        }
        // Reserve the same on the largest half of the ids: they tie again among themselves.
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        for id in &sorted[100..] {
            index
                .reserve(Uuid::from_u128(*id), request.capacity())
                .expect("indexed");
        }
        check_agrees(&index, &request, "after reservations");
        let packed = index.place(&request, Strategy::BinPack).expect("fits");
        assert_eq!(packed.node_id.as_u128(), sorted[100]);
        let spread = index.place(&request, Strategy::Spread).expect("fits");
        assert_eq!(spread.node_id.as_u128(), sorted[0]);
    }

    #[test]
    fn an_unknown_node_is_refused() {
        let mut index = FleetIndex::new(&[node(1, 1000, GIB, GIB)]);
        let stranger = Uuid::from_u128(99);
        assert_eq!(index.reserve(stranger, amount(1, 1, 1)), Err(UnknownNode(stranger)));
        assert_eq!(index.release(stranger, amount(1, 1, 1)), Err(UnknownNode(stranger)));
        assert_eq!(
            UnknownNode(stranger).to_string(),
            "node 00000000-0000-0000-0000-000000000063 is not in the fleet index"
        );
    }

    /// With more than 64 label pairs the rare ones have no bit and are checked on the views.
    #[test]
    fn rare_label_pairs_are_checked_on_the_views() {
        let nodes: Vec<NodeView> = (1..=100)
            .map(|id| {
                let mut view = node(id, 4000, 8 * GIB, 100 * GIB);
                view.labels.insert("host".to_string(), format!("h{id}"));
                if id % 2 == 0 {
                    view.labels.insert("disk".to_string(), "ssd".to_string());
                }
                view
            })
            .collect();
        let index = FleetIndex::new(&nodes);
        for (host, expected) in [("h7", None), ("h8", Some(8)), ("h100", Some(100)), ("h101", None)] {
            let request = PlacementRequest {
                cpu_millis: 1000,
                required_labels: BTreeMap::from([
                    ("host".to_string(), host.to_string()),
                    ("disk".to_string(), "ssd".to_string()),
                ]),
                ..PlacementRequest::default()
            };
            check_agrees(&index, &request, host);
            let got = index
                .place(&request, Strategy::BinPack)
                .ok()
                .map(|placement| placement.node_id.as_u128());
            assert_eq!(got, expected, "{host}");
        }
    }

    #[test]
    fn magnitudes_are_monotonic_with_eight_steps_per_doubling() {
        assert_eq!(magnitude(0), 0);
        let mut previous = 0;
        for value in [1, 2, 3, 7, 8, 9, 15, 16, 1000, 1024, 1100, 1 << 40, u64::MAX] {
            let current = magnitude(value);
            assert!(current >= previous, "{value}");
            previous = current;
        }
        assert_eq!(magnitude(1024) + 8, magnitude(2048));
        assert_eq!(magnitude(1024), magnitude(1024 + 127));
        assert_ne!(magnitude(1024), magnitude(1024 + 128));
    }
}
