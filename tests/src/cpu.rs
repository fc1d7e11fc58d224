//! CPU use by process name between two moments, for benchmarks' profiles: `/proc/stat` for
//! the whole machine, and `/proc/<pid>/stat` (own time, and the time of the children it
//! waited for) for every process alive at the second moment. Processes that exited in between
//! (shims of removed containers, `runc`, `ctr`, CNI plugins not waited for by a listed
//! process) only show in the machine total.

use std::collections::{BTreeMap, HashMap};

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 when it cannot be read): the
/// unit of the CPU times in `/proc/<pid>/stat`.
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `/proc/<pid>/stat` line: the command name, and the numeric fields after the state (the
/// 14th field of the line, `utime`, is `fields[10]`).
fn parse_stat(stat: &str) -> Option<(&str, Vec<u64>)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields = stat[close + 1..]
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    Some((&stat[open + 1..close], fields))
}

/// CPU seconds used so far by this process's threads named `name` (user and system).
pub fn own_threads_seconds(name: &str) -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((comm, fields)) = parse_stat(&stat) else {
            continue;
        };
        if comm == name && fields.len() > 11 {
            ticks += fields[10] + fields[11];
        }
    }
    ticks as f64 / ticks_per_second()
}

/// Busy CPU seconds of the whole machine so far (`/proc/stat`, all but idle and iowait).
pub fn machine_busy_seconds() -> f64 {
    snapshot_busy() as f64 / ticks_per_second()
}

fn snapshot_busy() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| {
            let line = text.lines().next()?.to_string();
            let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal
            Some(
                values
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 3 && *i != 4)
                    .map(|(_, v)| v)
                    .sum(),
            )
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    busy: u64,
    by_pid: HashMap<u32, (String, u64, u64)>,
}

pub fn snapshot() -> Snapshot {
    let busy = snapshot_busy();
    let mut by_pid = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((comm, fields)) = parse_stat(&stat) else {
            continue;
        };
        if fields.len() > 13 {
            by_pid.insert(
                pid,
                (comm.to_string(), fields[10] + fields[11], fields[12] + fields[13]),
            );
        }
    }
    Snapshot { busy, by_pid }
}

/// Machine CPU seconds used between `before` and `after`, and per process name (own
/// seconds, seconds of waited-for children), largest first.
pub fn between(before: &Snapshot, after: &Snapshot) -> (f64, Vec<(String, f64, f64)>) {
    let hz = ticks_per_second();
    let mut by_name: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (pid, (comm, own, children)) in &after.by_pid {
        let (own0, children0) = before
            .by_pid
            .get(pid)
            .filter(|(c, _, _)| c == comm)
            .map(|(_, o, c)| (*o, *c))
            .unwrap_or((0, 0));
        let entry = by_name.entry(comm.clone()).or_default();
        entry.0 += own.saturating_sub(own0) as f64 / hz;
        entry.1 += children.saturating_sub(children0) as f64 / hz;
    }
    let mut rows: Vec<(String, f64, f64)> = by_name
        .into_iter()
        .map(|(name, (own, children))| (name, own, children))
        .filter(|(_, own, children)| own + children >= 0.05)
        .collect();
    rows.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
    (after.busy.saturating_sub(before.busy) as f64 / hz, rows)
}

/// One line: the machine total and the largest consumers.
pub fn describe(before: &Snapshot, after: &Snapshot) -> String {
    let (total, rows) = between(before, after);
    let listed: f64 = rows.iter().map(|(_, own, children)| own + children).sum();
    let top: Vec<String> = rows
        .iter()
        .take(8)
        .map(|(name, own, children)| {
            if *children >= 0.05 {
                format!("{name} {own:.1}+{children:.1}")
            } else {
                format!("{name} {own:.1}")
            }
        })
        .collect();
    format!(
        "{total:.1} CPU-s in all; {} ; exited, not waited for: {:.1}",
        top.join(", "),
        (total - listed).max(0.0)
    )
}
