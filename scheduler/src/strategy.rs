//! How placement ranks the nodes that can take a pod.
//!
//! *Design.* Both strategies rank by one number: the mean of the free fractions of CPU and
//! memory a node would have left after the placement, each normalised by the node's own
//! allocatable (so a half-empty small node and a half-empty large node rank alike). Bin-packing
//! prefers the smallest such fraction (fill nodes up, keep whole nodes free for large pods and
//! for draining); spread prefers the largest (keep load even). Disk is a hard limit but not part
//! of the ranking: volumes are sized up front and rarely the scarce dimension.
//!
//! *Invariants.* The fraction is computed by exactly one function, [`free_fraction_after`], from
//! precomputed reciprocals of the allocatable amounts, so every caller (the slice scan, the
//! index, the tests' oracle) gets bit-identical numbers and therefore identical choices. Ranking
//! compares `key`s, where bin-packing's key is the exact negation of the fraction (negation
//! never rounds): two nodes tie exactly when their fractions are equal, and ties go to the
//! smaller node id.

use serde::{Deserialize, Serialize};

/// Which node placement prefers among those that can take the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Prefer the node with the least free CPU and memory left after placement.
    #[default]
    BinPack,
    /// Prefer the node with the most free CPU and memory left after placement.
    Spread,
}

impl Strategy {
    /// The strategy's name as in configuration (`bin_pack`, `spread`), for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::BinPack => "bin_pack",
            Strategy::Spread => "spread",
        }
    }

    /// The ranking key for a node with `free_after` (see [`free_fraction_after`]): higher wins.
    #[inline(always)]
    pub(crate) fn key(self, free_after: f64) -> f64 {
        match self {
            Strategy::BinPack => -free_after,
            Strategy::Spread => free_after,
        }
    }

    /// The score reported in a [`crate::Placement`]: in `[0, 1]`, higher is better under this
    /// strategy. Bin-packing reports the mean used fraction after placement, spread the mean
    /// free fraction.
    pub(crate) fn score(self, free_after: f64) -> f64 {
        match self {
            Strategy::BinPack => 1.0 - free_after,
            Strategy::Spread => free_after,
        }
    }
}

/// `1 / allocatable`, or zero for a dimension the node does not have (then nothing is free in
/// it either, and only a request of zero fits, contributing a fraction of zero).
#[inline(always)]
pub(crate) fn reciprocal(allocatable: u64) -> f64 {
    if allocatable == 0 {
        0.0
    } else {
        1.0 / allocatable as f64
    }
}

/// The mean of the CPU and memory fractions left free after placing `request_*` on a node with
/// `free_*` free and the given reciprocals of its allocatable amounts. Meaningful only when the
/// request fits (`free_* >= request_*`); otherwise the result is garbage, not a panic, so that a
/// scan may compute it for every node and discard the ones that do not fit without branching.
#[inline(always)]
pub(crate) fn free_fraction_after(
    free_cpu_millis: u64,
    free_memory_bytes: u64,
    reciprocal_cpu: f64,
    reciprocal_memory: f64,
    request_cpu_millis: u64,
    request_memory_bytes: u64,
) -> f64 {
    let cpu = free_cpu_millis.wrapping_sub(request_cpu_millis) as f64 * reciprocal_cpu;
    let memory = free_memory_bytes.wrapping_sub(request_memory_bytes) as f64 * reciprocal_memory;
    (cpu + memory) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_is_the_mean_of_cpu_and_memory_left() {
        // 4 cores with 2 free, 8 GiB with 6 free; take 1 core and 2 GiB: 1/4 and 4/8 left.
        let fraction = free_fraction_after(2000, 6 << 30, reciprocal(4000), reciprocal(8 << 30), 1000, 2 << 30);
        assert_eq!(fraction, 0.375);
        assert_eq!(Strategy::BinPack.score(fraction), 0.625);
        assert_eq!(Strategy::Spread.score(fraction), 0.375);
        assert!(Strategy::BinPack.key(0.1) > Strategy::BinPack.key(0.2));
        assert!(Strategy::Spread.key(0.2) > Strategy::Spread.key(0.1));
    }

    #[test]
    fn a_missing_dimension_counts_as_nothing_left() {
        assert_eq!(free_fraction_after(0, 50, reciprocal(0), reciprocal(100), 0, 0), 0.25);
    }

    #[test]
    fn names_match_the_serde_names() {
        for strategy in [Strategy::BinPack, Strategy::Spread] {
            let text = serde_json::to_string(&strategy).expect("serialises");
            assert_eq!(text, format!("\"{}\"", strategy.as_str()));
        }
    }
}
