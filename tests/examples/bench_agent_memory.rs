//! Benchmark: the node agent's resident memory, idle and with 50 pods running (issue 3:
//! ≤ 25 MB idle, ≤ 40 MB with 50 pods; containerd and the shims are not counted).
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --release --workspace --bins
//! INSTAPOD_AGENT_BIN=$CARGO_TARGET_DIR/release/instapod-node-agent \
//!     cargo run --release --example bench_agent_memory        # as root
//! ```
//!
//! The real `instapod-node-agent` binary (`INSTAPOD_AGENT_BIN`, else the one next to this
//! example) runs as in production, with its default `info` log filter, against a real control
//! plane (the harness's, with `INSTAPOD_NODE_JOIN_TOKEN`), the harness's Redis, private
//! containerd and registry. Once the node row is `healthy` the agent is left alone for 10 s,
//! then `VmRSS` is read from `/proc/<pid>/status` five times, one second apart: the idle figure
//! is the largest sample. Then 50 `EnsureRunning` jobs (the busybox `httpd` image, 16 MiB and
//! 25 millicores each, so that 50 fit on two cores) go through the node's apalis queue in
//! Redis, the benchmark waits until the latest report of every pod in `pod_reports` is
//! `running`, lets the agent settle for 10 s and samples again the same way. `VmHWM` (the
//! peak) is printed too. Only the agent's own process is measured.
//!
//! Clean-up: 50 `Delete` jobs, then a wait until every pod's latest report is `deleted`; the
//! agent is killed, the bridge removed. The control plane, Redis, containerd, the registry and
//! their directories belong to the harness and go when this process exits. Every wait is
//! bounded (a few minutes at most).

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::time::Duration;

use anyhow::Context;
use instapod_common::node::{NodeJob, PodSpec};
use instapod_tests::node::{NodeSettings, agent_binary, pod_spec, spawn_agent, web_image};
use instapod_tests::standalone_agent::{push_all, status_field, wait_all, wait_joined};
use instapod_tests::{ControlPlane, ControlPlaneOptions, process, redis};
use uuid::Uuid;

const JOIN_TOKEN: &str = "bench-memory-join-token-abcdefghijklmnop";
const PODS: usize = 50;
const SETTLE: Duration = Duration::from_secs(10);
const SAMPLES: usize = 5;

/// Waits `SETTLE`, then returns the largest of `SAMPLES` VmRSS readings a second apart.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    tokio::time::sleep(SETTLE).await;
    let mut largest = 0;
    for i in 0..SAMPLES {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        largest = largest.max(status_field(pid, "VmRSS:")?);
    }
    Ok(largest)
}

fn mb(bytes: u64) -> String {
    format!(
        "{:.1} MB ({:.1} MiB)",
        bytes as f64 / 1e6,
        bytes as f64 / f64::from(1 << 20)
    )
}

fn small_pod(image: &str) -> PodSpec {
    let mut spec = pod_spec(image, 1);
    spec.resources.memory_bytes = 16 << 20;
    spec.resources.cpu_millis = 25;
    spec
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let binary = agent_binary();
    let cp = ControlPlane::start(ControlPlaneOptions::default().env("INSTAPOD_NODE_JOIN_TOKEN", JOIN_TOKEN)).await;
    let redis_url = redis::shared().next_url();
    let image = web_image().await;
    let settings = NodeSettings::new("bench-mem");
    let name = format!("bench-{}", &instapod_tests::ids::random_suffix()[..8]);
    let env = vec![
        ("INSTAPOD_AGENT_CONTROL_PLANE_URL".to_string(), cp.url().to_string()),
        ("INSTAPOD_AGENT_JOIN_TOKEN".to_string(), JOIN_TOKEN.to_string()),
        ("INSTAPOD_AGENT_REDIS_URL".to_string(), redis_url.clone()),
        ("INSTAPOD_AGENT_NODE_NAME".to_string(), name.clone()),
        ("INSTAPOD_AGENT_REGION".to_string(), "bench-region".to_string()),
        // The production default (the harness turns on debug logs for tests).
        ("INSTAPOD_AGENT_LOG_FILTER".to_string(), "info".to_string()),
    ];
    let (mut agent, log) = spawn_agent(&settings, &env);
    let pid = agent.id();

    let specs: Vec<PodSpec> = (0..PODS).map(|_| small_pod(&image)).collect();
    let ids: Vec<Uuid> = specs.iter().map(|s| s.pod_id).collect();
    let mut pushed = false;
    let outcome = async {
        let node_id = wait_joined(&cp, &name, &log).await?;
        let idle = settled_rss(pid).await?;
        let jobs = specs
            .iter()
            .map(|spec| NodeJob::EnsureRunning { spec: spec.clone() })
            .collect();
        pushed = true;
        push_all(&redis_url, node_id, jobs).await?;
        let start_all = wait_all(&cp, &ids, "running", &log).await?;
        let busy = settled_rss(pid).await?;
        let peak = status_field(pid, "VmHWM:")?;
        Ok::<_, anyhow::Error>((node_id, idle, start_all, busy, peak))
    }
    .await;

    // Clean up whatever happened: every pod that may exist is deleted through the queue.
    let node_id = match &outcome {
        Ok((node_id, ..)) => Some(*node_id),
        Err(_) if pushed => wait_joined(&cp, &name, &log).await.ok(),
        Err(_) => None,
    };
    let mut cleanup = Ok(Duration::ZERO);
    if let Some(node_id) = node_id.filter(|_| pushed) {
        let jobs = ids
            .iter()
            .map(|&pod_id| NodeJob::Delete {
                pod_id,
                generation: 2,
                retain_volume: false,
            })
            .collect();
        cleanup = match push_all(&redis_url, node_id, jobs).await {
            Ok(()) => wait_all(&cp, &ids, "deleted", &log).await,
            Err(err) => Err(err),
        };
    }
    process::kill_and_reap(&mut agent);
    settings.remove_bridge();
    let _ = std::fs::remove_dir(std::path::Path::new("/run/containerd/runc").join(&settings.namespace));

    let (_, idle, start_all, busy, peak) = outcome?;
    let delete_all = cleanup.context("deleting the pods")?;
    println!(
        "agent {} (release build expected), {} cores",
        binary.display(),
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0)
    );
    println!("idle, 10 s after joining      VmRSS {}", mb(idle));
    println!(
        "{PODS} pods running, 10 s after VmRSS {}   (all {PODS} running {:.1} s after the push)",
        mb(busy),
        start_all.as_secs_f64()
    );
    println!("peak (VmHWM)                  {}", mb(peak));
    println!("all {PODS} deleted {:.1} s after the push", delete_all.as_secs_f64());
    let ok = |value: u64, limit: u64| if value <= limit { "met" } else { "NOT met" };
    println!(
        "targets: idle <= 25 MB {}; 50 pods <= 40 MB {}",
        ok(idle, 25_000_000),
        ok(busy, 40_000_000)
    );
    Ok(())
}
