//! Benchmark: what sampling 100 pods costs the node agent (issue 6: ≤ 2 ms of CPU per pod per
//! round).
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --release --workspace --bins
//! INSTAPOD_AGENT_BIN=$CARGO_TARGET_DIR/release/instapod-node-agent \
//!     cargo run --release -p instapod-tests --example bench_sampling        # as root
//! ```
//!
//! One real agent binary against the harness's control plane, Redis, private containerd and
//! registry. 100 pods (busybox `httpd`, 10 millicores and 16 MiB each) are started through the
//! node's queue with sampling **off**; once all run and the agent has settled, its CPU time
//! (`utime + stime` of `/proc/<pid>/stat`) is read over a 30 s window: the baseline (heartbeats,
//! reports, the reconciler). Then the agent is restarted on the same state directory (the pods
//! keep running and are adopted) with sampling every second, first with the default volume
//! walk every 60 s, then with the walk in every round (the worst case), and the same window is
//! measured again. Rounds are counted from the agent's own
//! `instapod_node_agent_sampling_duration_seconds_count`. Cost per round = (CPU in the window −
//! the baseline's CPU over as long) / rounds; per pod = that / 100. containerd's CPU over each
//! window is printed too (its shims answer `Tasks.Metrics`), but is not the agent's.
//!
//! Clean-up: 100 `Delete` jobs, a wait until all are deleted, the agent killed, the bridge
//! removed. Every wait is bounded.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::time::{Duration, Instant};

use anyhow::Context;
use instapod_common::node::{NodeJob, PodSpec};
use instapod_tests::node::{NodeSettings, agent_binary, agent_metrics, pod_spec, spawn_agent, web_image};
use instapod_tests::standalone_agent::{cpu_ticks, push_all, wait_all, wait_joined};
use instapod_tests::{ControlPlane, ControlPlaneOptions, containerd, process, redis};
use uuid::Uuid;

const JOIN_TOKEN: &str = "bench-sampling-join-token-abcdefghijklmn";
const PODS: usize = 100;
const WINDOW: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(8);

/// `instapod_node_agent_sampling_duration_seconds_count` (0 before the first round), and the
/// number of per-pod CPU series.
async fn rounds_and_series(port: u16) -> anyhow::Result<(f64, usize)> {
    let text = agent_metrics(port).await?;
    let rounds = text
        .lines()
        .find(|l| l.starts_with("instapod_node_agent_sampling_duration_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let series = text
        .lines()
        .filter(|l| l.starts_with("instapod_node_agent_pod_cpu_seconds_total{"))
        .count();
    Ok((rounds, series))
}

/// Agent and containerd CPU seconds and sampling rounds over one window.
struct Window {
    agent_secs: f64,
    containerd_secs: f64,
    rounds: f64,
}

async fn measure(agent_pid: u32, containerd_pid: u32, metrics_port: u16) -> anyhow::Result<Window> {
    let hz = instapod_tests::cpu::ticks_per_second();
    let (rounds_before, _) = rounds_and_series(metrics_port).await?;
    let (agent_before, containerd_before) = (cpu_ticks(agent_pid)?, cpu_ticks(containerd_pid)?);
    tokio::time::sleep(WINDOW).await;
    let (agent_after, containerd_after) = (cpu_ticks(agent_pid)?, cpu_ticks(containerd_pid)?);
    let (rounds_after, _) = rounds_and_series(metrics_port).await?;
    Ok(Window {
        agent_secs: (agent_after - agent_before) as f64 / hz,
        containerd_secs: (containerd_after - containerd_before) as f64 / hz,
        rounds: rounds_after - rounds_before,
    })
}

fn small_pod(image: &str) -> PodSpec {
    let mut spec = pod_spec(image, 1);
    spec.resources.memory_bytes = 16 << 20;
    spec.resources.cpu_millis = 10;
    spec
}

/// Restarts the agent with `sampling` env and waits until it measures every pod.
async fn restart_with(
    agent: &mut std::process::Child,
    settings: &NodeSettings,
    env: &[(String, String)],
    sampling: &[(&str, &str)],
) -> anyhow::Result<()> {
    process::kill_and_reap(agent);
    let mut env = env.to_vec();
    env.extend(sampling.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (child, _) = spawn_agent(settings, &env);
    *agent = child;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((_, series)) = rounds_and_series(settings.metrics_port).await
            && series == PODS
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the restarted agent never sampled all {PODS} pods"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let binary = agent_binary();
    let cp = ControlPlane::start(ControlPlaneOptions::default().env("INSTAPOD_NODE_JOIN_TOKEN", JOIN_TOKEN)).await;
    let redis_url = redis::shared().next_url();
    let image = web_image().await;
    let containerd_pid = containerd::shared().pid();
    let settings = NodeSettings::new("bench-smp");
    let name = format!("bench-{}", &instapod_tests::ids::random_suffix()[..8]);
    let env = vec![
        ("INSTAPOD_AGENT_CONTROL_PLANE_URL".to_string(), cp.url().to_string()),
        ("INSTAPOD_AGENT_JOIN_TOKEN".to_string(), JOIN_TOKEN.to_string()),
        ("INSTAPOD_AGENT_REDIS_URL".to_string(), redis_url.clone()),
        ("INSTAPOD_AGENT_NODE_NAME".to_string(), name.clone()),
        ("INSTAPOD_AGENT_REGION".to_string(), "bench-region".to_string()),
        ("INSTAPOD_AGENT_LOG_FILTER".to_string(), "info".to_string()),
    ];
    let mut off = env.clone();
    off.push((
        "INSTAPOD_AGENT_METRICS_SAMPLE_INTERVAL_SECS".to_string(),
        "0".to_string(),
    ));
    let (mut agent, log) = spawn_agent(&settings, &off);

    let specs: Vec<PodSpec> = (0..PODS).map(|_| small_pod(&image)).collect();
    let ids: Vec<Uuid> = specs.iter().map(|s| s.pod_id).collect();
    let mut node = None;
    let outcome = async {
        let node_id = wait_joined(&cp, &name, &log).await?;
        node = Some(node_id);
        let jobs = specs
            .iter()
            .map(|spec| NodeJob::EnsureRunning { spec: spec.clone() })
            .collect();
        push_all(&redis_url, node_id, jobs).await?;
        wait_all(&cp, &ids, "running", &log).await?;
        tokio::time::sleep(SETTLE).await;
        let baseline = measure(agent.id(), containerd_pid, settings.metrics_port).await?;
        anyhow::ensure!(baseline.rounds == 0.0, "sampling was meant to be off");

        restart_with(
            &mut agent,
            &settings,
            &env,
            &[("INSTAPOD_AGENT_METRICS_SAMPLE_INTERVAL_SECS", "1")],
        )
        .await?;
        tokio::time::sleep(SETTLE).await;
        let default = measure(agent.id(), containerd_pid, settings.metrics_port).await?;

        restart_with(
            &mut agent,
            &settings,
            &env,
            &[
                ("INSTAPOD_AGENT_METRICS_SAMPLE_INTERVAL_SECS", "1"),
                ("INSTAPOD_AGENT_DISK_USAGE_INTERVAL_SECS", "1"),
            ],
        )
        .await?;
        tokio::time::sleep(SETTLE).await;
        let walking = measure(agent.id(), containerd_pid, settings.metrics_port).await?;
        Ok::<_, anyhow::Error>((baseline, default, walking))
    }
    .await;

    if let Some(node_id) = node {
        let jobs = ids
            .iter()
            .map(|&pod_id| NodeJob::Delete {
                pod_id,
                generation: 2,
                retain_volume: false,
            })
            .collect();
        let deleted = match push_all(&redis_url, node_id, jobs).await {
            Ok(()) => wait_all(&cp, &ids, "deleted", &log).await.map(|_| ()),
            Err(err) => Err(err),
        };
        if let Err(err) = deleted {
            println!("clean-up incomplete: {err:#}");
        }
    }
    process::kill_and_reap(&mut agent);
    settings.remove_bridge();

    let (baseline, default, walking) = outcome.context("the benchmark")?;
    println!(
        "agent {} (release build expected), {PODS} pods, {} cores, {} s windows",
        binary.display(),
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        WINDOW.as_secs()
    );
    println!(
        "sampling off            agent {:.2} s CPU, containerd {:.2} s",
        baseline.agent_secs, baseline.containerd_secs
    );
    for (label, window) in [("every 1 s, walk 60 s", &default), ("every 1 s, walk 1 s", &walking)] {
        let extra = (window.agent_secs - baseline.agent_secs).max(0.0);
        let per_round_ms = extra / window.rounds.max(1.0) * 1e3;
        let per_pod_ms = per_round_ms / PODS as f64;
        println!(
            "{label:<23} agent {:.2} s CPU, containerd {:.2} s, {} rounds: {per_round_ms:.2} ms per round, \
             {per_pod_ms:.3} ms per pod per round ({}; target <= 2 ms)",
            window.agent_secs,
            window.containerd_secs,
            window.rounds,
            if per_pod_ms <= 2.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
