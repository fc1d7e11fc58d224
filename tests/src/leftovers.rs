//! What a killed test run leaves on the host — a node's bridge with its route, its masquerade
//! rule and its pods' network namespaces — found and removed by the next run.
//!
//! *How.* Every node's bridge is recorded as a file named after the bridge in [`DIR`], holding
//! its owner: `<pid> <start time> <subnet>`. The node's own clean-up removes the record with the
//! bridge. The first node of a process removes what the records of owners no longer running
//! describe: the network namespaces on the far side of the bridge's veths (only the agent's
//! `instapod-…` ones), the bridge, its masquerade rule and the record. A run killed with
//! SIGKILL (with its cleanup watchdog, when the whole process group is killed) never ran a
//! `Drop`; before this, its bridges stayed until a reboot, each holding a /24 route.
//!
//! *Invariants.* An owner is a pid together with its start time (`/proc/<pid>/stat`), so a pid
//! reused by another process is not taken for the owner. A record that does not parse is left
//! alone. *Limitations.* An owner in another pid namespace looks gone: runs that share a host
//! must share its pid namespace.

use std::path::Path;
use std::process::Command;
use std::sync::Once;

/// Where the records live (on tmpfs: a reboot, which removes the bridges, removes them too).
pub const DIR: &str = "/run/instapod-tests/nodes";

/// A bridge's owner: the process that created it, and the subnet its masquerade rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    pid: u32,
    started: u64,
    subnet: String,
}

impl Owner {
    fn current(subnet: &str) -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            started: process_start(pid).unwrap_or(0),
            subnet: subnet.to_string(),
        }
    }

    fn parse(text: &str) -> Option<Owner> {
        let mut fields = text.split_whitespace();
        let owner = Owner {
            pid: fields.next()?.parse().ok()?,
            started: fields.next()?.parse().ok()?,
            subnet: fields.next()?.to_string(),
        };
        fields.next().is_none().then_some(owner)
    }

    fn format(&self) -> String {
        format!("{} {} {}\n", self.pid, self.started, self.subnet)
    }

    fn running(&self) -> bool {
        process_start(self.pid) == Some(self.started)
    }
}

/// A process's start time (field 22 of `/proc/<pid>/stat`, in clock ticks since boot).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) is in parentheses and may hold spaces; field 3 follows the last `)`.
    let after_command = &stat[stat.rfind(')')? + 1..];
    after_command.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Records this process as the owner of `bridge` (best effort: a record that cannot be written
/// only means a killed run's bridge is not removed later).
pub fn record(dir: &Path, bridge: &str, subnet: &str) {
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join(bridge), Owner::current(subnet).format());
}

/// Drops the record of `bridge` (its node removed it).
pub fn forget(dir: &Path, bridge: &str) {
    let _ = std::fs::remove_file(dir.join(bridge));
}

/// Removes the bridges, rules and pod namespaces of the records in `dir` whose owner is no
/// longer running, and those records; returns the bridges removed.
pub fn reap(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for entry in entries.flatten() {
        let bridge = entry.file_name().to_string_lossy().to_string();
        let owner = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|text| Owner::parse(&text));
        let Some(owner) = owner else { continue };
        if owner.running() {
            continue;
        }
        for netns in pod_namespaces_on(&bridge) {
            let _ = Command::new("ip").args(["netns", "delete", &netns]).output();
        }
        crate::node::remove_bridge(&bridge, &owner.subnet);
        forget(dir, &bridge);
        reaped.push(bridge);
    }
    reaped
}

/// [`reap`] of [`DIR`], once per process (before its first node picks a subnet).
pub fn reap_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let reaped = reap(Path::new(DIR));
        if !reaped.is_empty() {
            eprintln!("removed the bridges of test runs that were killed: {reaped:?}");
        }
    });
}

/// The agent's pod namespaces (`instapod-…`) at the far end of the veths on `bridge`.
fn pod_namespaces_on(bridge: &str) -> Vec<String> {
    let ids: Vec<i64> = ip_json(&["link", "show", "master", bridge])
        .iter()
        .filter_map(|link| link.get("link_netnsid")?.as_i64())
        .collect();
    ip_json(&["netns", "list"])
        .iter()
        .filter(|netns| {
            netns
                .get("id")
                .and_then(|id| id.as_i64())
                .is_some_and(|id| ids.contains(&id))
        })
        .filter_map(|netns| netns.get("name")?.as_str())
        .filter(|name| name.starts_with("instapod-"))
        .map(str::to_string)
        .collect()
}

/// The JSON array `ip -j <args>` prints (empty when it fails or prints nothing).
fn ip_json(args: &[&str]) -> Vec<serde_json::Value> {
    Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice(&out.stdout).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("ip");
        assert!(status.success(), "ip {args:?}");
    }

    fn link_exists(name: &str) -> bool {
        Command::new("ip")
            .args(["link", "show", name])
            .output()
            .is_ok_and(|out| out.status.success())
    }

    #[test]
    fn an_owner_is_its_pid_and_start_time() {
        let me = Owner::current("10.250.1.0/24");
        assert!(me.running());
        assert_eq!(Owner::parse(&me.format()), Some(me.clone()));
        assert_eq!(Owner::parse("12 34"), None);
        assert_eq!(Owner::parse("12 34 10.0.0.0/24 extra"), None);
        // The same pid with another start time is another process (the pid was reused).
        let reused = Owner {
            started: me.started + 1,
            ..me.clone()
        };
        assert!(!reused.running());
        // A process that ended.
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!Owner { pid, ..me }.running());
    }

    /// Real links and a real namespace: a killed run's bridge with a pod namespace on it is
    /// removed with the namespace; a running owner's bridge stays.
    #[test]
    fn reaping_removes_what_killed_runs_left_and_nothing_else() {
        let dir = crate::process::temp_dir("leftovers");
        let suffix = &crate::ids::random_suffix()[..6];
        let (gone, alive) = (format!("iptg{suffix}"), format!("ipta{suffix}"));
        let netns = format!("instapod-{}", uuid::Uuid::new_v4().simple());
        let veth = format!("vlo{suffix}");
        ip(&["link", "add", &gone, "type", "bridge"]);
        ip(&["link", "add", &alive, "type", "bridge"]);
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &veth, "master", &gone]);
        // `gone`'s owner ended; `alive`'s is this process.
        let mut child = Command::new("true").spawn().expect("spawn true");
        let dead = Owner {
            pid: child.id(),
            ..Owner::current("10.251.2.0/24")
        };
        child.wait().expect("wait");
        std::fs::write(dir.join(&gone), dead.format()).expect("record");
        record(&dir, &alive, "10.251.3.0/24");
        std::fs::write(dir.join("iptbroken"), "not a record").expect("record");

        assert_eq!(pod_namespaces_on(&gone), vec![netns.clone()]);
        let reaped = reap(&dir);

        let namespaces = ip_json(&["netns", "list"]);
        let netns_left = namespaces
            .iter()
            .any(|n| n.get("name").and_then(|v| v.as_str()) == Some(&netns));
        let (gone_left, alive_left) = (link_exists(&gone), link_exists(&alive));
        // Clean up before asserting.
        let _ = Command::new("ip").args(["link", "delete", &alive]).status();
        let _ = Command::new("ip").args(["link", "delete", &gone]).status();
        let _ = Command::new("ip").args(["netns", "delete", &netns]).status();
        assert_eq!(reaped, vec![gone.clone()]);
        assert!(
            !gone_left && !netns_left,
            "the killed run's bridge or namespace is still there"
        );
        assert!(alive_left, "a running owner's bridge was removed");
        assert!(!dir.join(&gone).exists() && dir.join(&alive).exists() && dir.join("iptbroken").exists());
    }
}
