//! What this machine has: CPUs (from the cgroup-independent online CPU count), memory
//! (`MemTotal` of `/proc/meminfo`) and disk (the filesystem of the state directory), and what
//! is left for pods after the configured reservations.

use std::path::Path;

use instapod_common::node::Capacity;

use crate::config::Reserved;

/// The machine's total capacity.
pub fn total(state_dir: &Path) -> Capacity {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0);
    let disk = rustix::fs::statvfs(state_dir)
        .map(|s| s.f_blocks.saturating_mul(s.f_frsize))
        .unwrap_or(0);
    Capacity {
        cpu_millis: cpus * 1000,
        memory_bytes: memory,
        disk_bytes: disk,
    }
}

/// Total minus reservations (never below zero).
pub fn allocatable(total: &Capacity, reserved: &Reserved) -> Capacity {
    Capacity {
        cpu_millis: total.cpu_millis.saturating_sub(reserved.cpu_millis),
        memory_bytes: total.memory_bytes.saturating_sub(reserved.memory_bytes),
        disk_bytes: total.disk_bytes.saturating_sub(reserved.disk_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_has_something_and_reservations_are_subtracted() {
        let total = total(Path::new("/"));
        assert!(
            total.cpu_millis >= 1000 && total.memory_bytes > 0 && total.disk_bytes > 0,
            "{total:?}"
        );
        let reserved = Reserved {
            cpu_millis: 500,
            memory_bytes: 1024,
            disk_bytes: u64::MAX,
        };
        let left = allocatable(&total, &reserved);
        assert_eq!(left.cpu_millis, total.cpu_millis - 500);
        assert_eq!(left.memory_bytes, total.memory_bytes - 1024);
        assert_eq!(left.disk_bytes, 0);
    }
}
