//! Benchmark: 100 pods created at once through the API until all run, against raw containerd
//! starts of the same image on the same containerd (issue 4: throughput ≥ 80% of raw `ctr`
//! starts/s with the same parallelism).
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --release --workspace --bins
//! cargo run --release --example bench_pods_burst         # as root; needs ~3 GiB free memory
//! ```
//!
//! Set-up (not timed): a [`Fleet`] from the release binaries next to this example (or
//! `INSTAPOD_CONTROL_PLANE_BIN`, `INSTAPOD_SCHEDULER_BIN`, `INSTAPOD_AGENT_BIN`): the control
//! plane, the scheduler (reconciling every 5 s, its production default) and two node agents in
//! region `local`, each offering 500 millicores (the agents reserve the rest of the cores), each
//! with its default job concurrency (4). Two plans are added to the database: `bench-tiny`
//! (10 millicores, 16 MiB, 1 GiB disk) for the pods, so that each node holds exactly 50, and
//! `bench-burst` (100 pods, 1,000 millicores, 1,600 MiB, 100 GiB) for the team. Warm-up: two
//! pods of 500 millicores (one fills a node, so the other lands on the second node) are
//! created, waited for and deleted, so both nodes have the busybox `httpd` image. 100
//! clients, each with its own `X-Forwarded-For` (the 50 creates/hour/IP limit), open their
//! connection.
//!
//! Timed:
//!
//! - **pods**: 100 tasks wait on one barrier, then each sends `POST /api/pods` (plan
//!   `bench-tiny`); the clock starts when the barrier opens and stops when a `GET /api/pods`
//!   (sent every 50 ms from the start) lists all 100 as `running`. Throughput = 100 / that
//!   time. Also printed: when the last 202 arrived, each pod's time to running as seen by the
//!   list (p50/p99), and how the pods were spread over the nodes.
//! - **ctr × 8**: 100 `ctr run -d` of the same image with the pods' limits (10 millicores,
//!   16 MiB, see [`CtrBaseline`]), at most 8 at a time — the parallelism the platform really
//!   has: 2 agents × 4 concurrent jobs — from the first start until the last `ctr` exits. The
//!   primary baseline.
//! - **ctr × 100**: the same with all 100 `ctr run -d` at once (the API's parallelism), as a
//!   second reference.
//!
//! Order: one uncounted `ctr` warm-up start, ctr × 8, pods, ctr × 100. After each series the
//! containers are checked to be running (one `ctr task ls`, not timed) and removed (pods with
//! `DELETE` through the API, then the list polled until empty; `ctr` containers killed and
//! deleted, 8 at a time), not timed. Every wait is bounded.
//!
//! Clean-up: pods left by a failure are deleted through the API and waited for; the baseline's
//! containers, image and namespace are removed; dropping the fleet kills the agents and the
//! scheduler and removes every container, network namespace and bridge left.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use instapod_node_agent::network::{Network, netns_path};
use instapod_tests::ctr_baseline::CtrBaseline;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::node::{NodeSettings, web_image};
use instapod_tests::{Client, TestUser, cpu, ids, process, register_and_login};
use serde_json::{Value, json};
use tokio::sync::{Barrier, Semaphore};
use uuid::Uuid;

const PODS: usize = 100;
/// Each node's allocatable CPU: exactly 50 pods of `bench-tiny`.
const NODE_CPU_MILLIS: u64 = 500;
const POD_CPU_MILLIS: u32 = 10;
const POD_MEMORY_BYTES: u64 = 16 << 20;
/// 2 agents × their default job concurrency.
const AGENT_PARALLELISM: usize = 8;
/// How often the pod list is read while waiting.
const POLL: Duration = Duration::from_millis(50);
/// The longest a burst (or its clean-up) may take.
const BURST_TIMEOUT: Duration = Duration::from_secs(300);
/// Memory the benchmark wants free before it starts (100 pods and their shims use ~1.5 GiB).
const MIN_AVAILABLE_BYTES: u64 = 3 << 30;

fn available_memory() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")?;
    Ok(kib * 1024)
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut all = values.to_vec();
    all.sort_by(f64::total_cmp);
    if all.is_empty() {
        return f64::NAN;
    }
    let rank = ((all.len() as f64) * q).ceil().max(1.0) as usize;
    all[rank.min(all.len()) - 1]
}

/// The team's pods from `GET /api/pods`.
async fn list(client: &Client) -> anyhow::Result<Vec<Value>> {
    let response = client.get("/api/pods").send().await;
    ensure!(
        response.status == 200,
        "GET /api/pods: {} {}",
        response.status,
        response.text()
    );
    Ok(response.json()["pods"].as_array().cloned().unwrap_or_default())
}

/// Waits until the team has no pods left; returns how long that took.
async fn wait_empty(client: &Client) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let pods = list(client).await?;
        if pods.is_empty() {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < BURST_TIMEOUT,
            "{} pods still there after {BURST_TIMEOUT:?}",
            pods.len()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Deletes every pod of the team (`clients` in turn, one request each, concurrently).
async fn delete_all(clients: &[Client]) -> anyhow::Result<Duration> {
    let admin = clients.first().context("a client")?;
    let names: Vec<String> = list(admin)
        .await?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.into_iter().enumerate() {
        let client = clients[i % clients.len()].clone();
        tasks.spawn(async move {
            let response = client.delete(&format!("/api/pods/{name}")).send().await;
            (name, response.status)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (name, status) = done.context("a delete task")?;
        ensure!(status == 202 || status == 404, "DELETE {name}: {status}");
    }
    wait_empty(admin).await
}

/// Creates `names` (one pod per name, concurrently) with `plan`, and waits until they run.
async fn create_and_wait(client: &Client, names: &[String], image: &str, plan: &str) -> anyhow::Result<()> {
    for name in names {
        let response = client
            .post_json("/api/pods", &json!({"name": name, "image": image, "plan": plan}))
            .await;
        ensure!(
            response.status == 202,
            "POST {name}: {} {}",
            response.status,
            response.text()
        );
        // One after the other: the second is placed once the first holds its node.
        let started = Instant::now();
        loop {
            let pod = client.get(&format!("/api/pods/{name}")).send().await.json();
            if pod["state"] == "running" {
                break;
            }
            ensure!(pod["state"] != "failed", "warm-up pod failed: {pod}");
            ensure!(started.elapsed() < BURST_TIMEOUT, "warm-up pod not running: {pod}");
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

/// The agent's job counters from its `/metrics`: (jobs by `operation/outcome`, handler
/// seconds summed by the same key).
async fn agent_jobs(metrics_port: u16) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
    let text = instapod_tests::node::agent_metrics(metrics_port).await?;
    let mut jobs = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("instapod_node_agent_operation_duration_seconds_") else {
            continue;
        };
        let label = |name: &str| {
            rest.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or("?")
                .to_string()
        };
        let value: f64 = rest.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let key = format!("{}/{}", label("operation"), label("outcome"));
        let entry = jobs.entry(key).or_insert((0.0, 0.0));
        if rest.starts_with("count") {
            entry.0 += value;
        } else if rest.starts_with("sum") {
            entry.1 += value;
        }
    }
    Ok(jobs)
}

/// What the pod burst measured.
struct Burst {
    cpu: String,
    /// Per node: the agent's `ensure_running` jobs during the burst and their summed time.
    agent_jobs: Vec<(f64, f64)>,
    /// Seconds from the barrier to the first and last `scheduled` event, and to the first and
    /// last `running` event (Postgres timestamps, same clock).
    scheduled_span: (f64, f64),
    running_span: (f64, f64),
    all_running: Duration,
    last_accepted: Duration,
    per_pod: Vec<f64>,
    per_node: BTreeMap<String, usize>,
    deleted_after: Duration,
}

async fn pod_burst(fleet: &Fleet, clients: &[Client], image: &str) -> anyhow::Result<Burst> {
    let mut jobs_before = Vec::new();
    for node in &fleet.nodes {
        jobs_before.push(agent_jobs(node.metrics_port).await?);
    }
    let barrier = Arc::new(Barrier::new(PODS + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.iter().enumerate().take(PODS) {
        let (client, barrier, image) = (client.clone(), barrier.clone(), image.to_string());
        tasks.spawn(async move {
            let name = format!("burst-{i:03}");
            let body = json!({"name": name, "image": image, "plan": "bench-tiny"});
            barrier.wait().await;
            let response = client.post_json("/api/pods", &body).await;
            (name, response.status, response.text(), Instant::now())
        });
    }
    let cpu_before = cpu::snapshot();
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    barrier.wait().await;
    let admin = &clients[0];
    let mut running_at: BTreeMap<String, f64> = BTreeMap::new();
    let mut per_node = BTreeMap::new();
    let all_running = loop {
        tokio::time::sleep(POLL).await;
        let pods = list(admin).await?;
        let elapsed = started.elapsed();
        for pod in &pods {
            let name = pod["name"].as_str().unwrap_or_default().to_string();
            if pod["state"] == "failed" {
                bail!("pod {name} failed: {pod}");
            }
            if pod["state"] == "running" && !running_at.contains_key(&name) {
                running_at.insert(name, elapsed.as_secs_f64());
                let node = pod["node"].as_str().unwrap_or("?").to_string();
                *per_node.entry(node).or_insert(0) += 1;
            }
        }
        if running_at.len() == PODS {
            break elapsed;
        }
        ensure!(
            elapsed < BURST_TIMEOUT,
            "{} of {PODS} pods running after {BURST_TIMEOUT:?}",
            running_at.len()
        );
    };
    let cpu_used = cpu::describe(&cpu_before, &cpu::snapshot());
    let mut last_accepted = Duration::ZERO;
    while let Some(done) = tasks.join_next().await {
        let (name, status, body, at) = done.context("a create task")?;
        ensure!(status == 202, "POST {name}: {status} {body}");
        last_accepted = last_accepted.max(at.duration_since(started));
    }
    let mut agent_jobs_during = Vec::new();
    for (node, before) in fleet.nodes.iter().zip(&jobs_before) {
        let after = agent_jobs(node.metrics_port).await?;
        let key = "ensure_running/applied";
        let (c0, s0) = before.get(key).copied().unwrap_or_default();
        let (c1, s1) = after.get(key).copied().unwrap_or_default();
        agent_jobs_during.push((c1 - c0, s1 - s0));
    }
    let db = fleet.cp.db().await;
    let span = |row: tokio_postgres::Row| (row.get::<_, f64>(0) - started_wall, row.get::<_, f64>(1) - started_wall);
    let scheduled_span = span(
        db.query_one(
            "SELECT extract(epoch FROM min(e.created_at))::float8, extract(epoch FROM max(e.created_at))::float8
             FROM pod_events e JOIN pods p ON p.id = e.pod_id WHERE p.name LIKE 'burst-%' AND e.kind = 'scheduled'",
            &[],
        )
        .await?,
    );
    let running_span = span(
        db.query_one(
            "SELECT extract(epoch FROM min(e.created_at))::float8, extract(epoch FROM max(e.created_at))::float8
             FROM pod_events e JOIN pods p ON p.id = e.pod_id
             WHERE p.name LIKE 'burst-%' AND e.kind = 'state' AND e.state = 'running'",
            &[],
        )
        .await?,
    );
    let deleted_after = delete_all(clients).await?;
    Ok(Burst {
        cpu: cpu_used,
        agent_jobs: agent_jobs_during,
        scheduled_span,
        running_span,
        all_running,
        last_accepted,
        per_pod: running_at.into_values().collect(),
        per_node,
        deleted_after,
    })
}

/// 100 `ctr run -d`, at most `parallelism` at a time, each after setting up a pod network
/// with `network` when given; returns the wall time and the CPU used. Then checks that all
/// run and removes them (not timed).
async fn ctr_burst(
    baseline: &Arc<CtrBaseline>,
    parallelism: usize,
    network: Option<&Arc<Network>>,
) -> anyhow::Result<(Duration, String)> {
    let pods: Vec<(Uuid, String)> = (0..PODS)
        .map(|i| {
            let pod_id = Uuid::new_v4();
            (
                pod_id,
                format!("burst-ctr-{i:03}-{}", &pod_id.simple().to_string()[..8]),
            )
        })
        .collect();
    let ids: Vec<String> = pods.iter().map(|(_, id)| id.clone()).collect();
    let limit = Arc::new(Semaphore::new(parallelism));
    let cpu_before = cpu::snapshot();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (pod_id, id) in pods.clone() {
        let (baseline, limit, network) = (baseline.clone(), limit.clone(), network.cloned());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let netns = match &network {
                Some(network) => Some(network.setup(pod_id, None).await.context("CNI set-up")?.netns),
                None => None,
            };
            baseline
                .run_in(&id, netns.as_deref())
                .await
                .with_context(|| format!("ctr run {id}"))
        });
    }
    let mut failure = None;
    while let Some(done) = tasks.join_next().await {
        if let Err(err) = done.context("a ctr task").and_then(|r| r) {
            failure.get_or_insert(err);
        }
    }
    let elapsed = started.elapsed();
    let cpu_used = cpu::describe(&cpu_before, &cpu::snapshot());
    let running = baseline.running().unwrap_or_default();
    let missing = ids.iter().filter(|id| !running.contains(id)).count();
    // Remove them, 8 at a time.
    let limit = Arc::new(Semaphore::new(AGENT_PARALLELISM));
    let mut removals = tokio::task::JoinSet::new();
    for (pod_id, id) in pods {
        let (baseline, limit, network) = (baseline.clone(), limit.clone(), network.cloned());
        removals.spawn(async move {
            let _permit = limit.acquire_owned().await;
            if let Err(err) = baseline.remove(&id).await {
                eprintln!("removing {id}: {err:#}");
            }
            if let Some(network) = network
                && netns_path(pod_id).exists()
                && let Err(err) = network.teardown(pod_id).await
            {
                eprintln!("network of {id}: {err}");
            }
        });
    }
    while removals.join_next().await.is_some() {}
    if let Some(err) = failure {
        return Err(err);
    }
    ensure!(missing == 0, "{missing} ctr containers not RUNNING after the burst");
    Ok((elapsed, cpu_used))
}

struct Results {
    ctr_agents: (Duration, String),
    pods: Burst,
    ctr_all: (Duration, String),
    ctr_cni: (Duration, String),
}

async fn run(
    fleet: &Fleet,
    clients: &[Client],
    baseline: &Arc<CtrBaseline>,
    network: &Arc<Network>,
    image: &str,
) -> anyhow::Result<Results> {
    let admin = &clients[0];
    // Warm-up: one big pod per node (the first fills its node), then gone.
    let warm: Vec<String> = (0..fleet.nodes.len())
        .map(|i| format!("warm-{i}-{}", &ids::random_suffix()[..6]))
        .collect();
    create_and_wait(admin, &warm, image, "bench-warm")
        .await
        .context("warm-up pods")?;
    let nodes: Vec<String> = list(admin)
        .await?
        .iter()
        .filter_map(|p| p["node"].as_str().map(str::to_string))
        .collect();
    ensure!(
        nodes.len() == fleet.nodes.len() && nodes.iter().all(|n| nodes.iter().filter(|m| *m == n).count() == 1),
        "the warm-up pods did not land on different nodes: {nodes:?}"
    );
    delete_all(clients).await.context("deleting the warm-up pods")?;
    let warm_id = format!("burst-warm-{}", &ids::random_suffix()[..6]);
    baseline.run(&warm_id).await.context("ctr warm-up")?;
    baseline.ensure_running(&warm_id)?;
    baseline.remove(&warm_id).await?;

    let ctr_agents = ctr_burst(baseline, AGENT_PARALLELISM, None).await.context("ctr x 8")?;
    let pods = pod_burst(fleet, clients, image).await.context("pod burst")?;
    let ctr_all = ctr_burst(baseline, PODS, None).await.context("ctr x 100")?;
    let ctr_cni = ctr_burst(baseline, AGENT_PARALLELISM, Some(network))
        .await
        .context("ctr+CNI x 8")?;
    Ok(Results {
        ctr_agents,
        pods,
        ctr_all,
        ctr_cni,
    })
}

async fn set_up_plans(fleet: &Fleet, user: &TestUser) -> anyhow::Result<()> {
    let db = fleet.cp.db().await;
    db.batch_execute(
        "INSERT INTO plans (id, name, cpu_millicores, memory_mib, disk_gib, max_pods, price_cents_monthly, sort_order)
         VALUES ('bench-tiny', 'Bench tiny', 10, 16, 1, 1, 0, 90),
                ('bench-warm', 'Bench warm-up', 500, 16, 1, 1, 0, 91),
                ('bench-burst', 'Bench burst', 1000, 1600, 100, 100, 0, 92)
         ON CONFLICT (id) DO NOTHING",
    )
    .await
    .context("the benchmark's plans")?;
    db.execute(
        "UPDATE teams SET plan_id = 'bench-burst' WHERE id = $1::text::uuid",
        &[&user.personal_team_id],
    )
    .await
    .context("the team's plan")?;
    Ok(())
}

fn rate(d: Duration) -> f64 {
    PODS as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let available = available_memory()?;
    println!("memory available before the run: {} MiB", available >> 20);
    ensure!(
        available >= MIN_AVAILABLE_BYTES,
        "only {} MiB available; the benchmark wants {} MiB",
        available >> 20,
        MIN_AVAILABLE_BYTES >> 20
    );
    let options = FleetOptions::regions(["local", "local"])
        .allocatable_cpu_millis(NODE_CPU_MILLIS)
        .quiet_logs()
        .scheduler_env("INSTAPOD_SCHEDULER_RECONCILE_INTERVAL_SECS", "5");
    let fleet = Fleet::start(options).await;
    let user = register_and_login(&fleet.cp).await;
    set_up_plans(&fleet, &user).await?;
    let image = web_image().await;
    let baseline = Arc::new(CtrBaseline::pull(&image, POD_MEMORY_BYTES, POD_CPU_MILLIS)?);
    // The ctr+CNI reference's network: a bridge and /24 of its own, the agent's CNI code.
    let cni_node = NodeSettings::new("bench-cni");
    let cni_cleanup = cni_node.cleanup_guard();
    let config = cni_node.config();
    let network = Arc::new(Network::new(
        config.network.bridge.clone(),
        config.network.subnet.clone(),
        config.network.cni_bin_dir.clone(),
        process::temp_dir("bench-ipam"),
    ));
    let mut clients = Vec::new();
    for _ in 0..PODS {
        let client = user.client();
        client.get("/api/pods").send().await.assert_status(200);
        clients.push(client);
    }

    let outcome = run(&fleet, &clients, &baseline, &network, &image).await;
    if outcome.is_err()
        && let Err(err) = delete_all(&clients).await
    {
        eprintln!("clean-up: {err:#}");
    }
    baseline.clean_up().await;
    drop(cni_cleanup);
    let memory_after = available_memory().unwrap_or(0);
    drop(fleet);
    let results = outcome.inspect_err(|err| eprintln!("{err:#?}"))?;

    let cores = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0);
    println!("{PODS} pods at once (10 millicores, 16 MiB each), image present, 2 agents x 4 jobs, {cores} cores");
    let pods = &results.pods;
    println!(
        "pods through the API: all running after {:.2} s = {:.1} pods/s (last 202 after {:.2} s; per pod p50 {:.2} s, p99 {:.2} s; per node {:?}; all deleted {:.2} s after the DELETEs)",
        pods.all_running.as_secs_f64(),
        rate(pods.all_running),
        pods.last_accepted.as_secs_f64(),
        percentile(&pods.per_pod, 0.5),
        percentile(&pods.per_pod, 0.99),
        pods.per_node,
        pods.deleted_after.as_secs_f64()
    );
    println!(
        "ctr run -d, 8 at a time:   {:.2} s = {:.1} starts/s",
        results.ctr_agents.0.as_secs_f64(),
        rate(results.ctr_agents.0)
    );
    println!(
        "ctr run -d, 100 at once:   {:.2} s = {:.1} starts/s",
        results.ctr_all.0.as_secs_f64(),
        rate(results.ctr_all.0)
    );
    println!(
        "ctr+CNI, 8 at a time:      {:.2} s = {:.1} starts/s (reference: the agent's pod network set-up, then ctr run -d --with-ns)",
        results.ctr_cni.0.as_secs_f64(),
        rate(results.ctr_cni.0)
    );
    println!("  CPU, pods:    {}", pods.cpu);
    println!("  CPU, ctr x 8: {}", results.ctr_agents.1);
    println!("  CPU, ctr x 100: {}", results.ctr_all.1);
    println!("  CPU, ctr+CNI x 8: {}", results.ctr_cni.1);
    println!(
        "  profile: scheduled events {:.2}..{:.2} s, running events {:.2}..{:.2} s after the start",
        pods.scheduled_span.0, pods.scheduled_span.1, pods.running_span.0, pods.running_span.1
    );
    for (i, (count, seconds)) in pods.agent_jobs.iter().enumerate() {
        println!(
            "  profile: agent {i}: {count} ensure_running jobs applied, {seconds:.2} s of handler time (mean {:.0} ms)",
            seconds / count.max(1.0) * 1000.0
        );
    }
    let primary = rate(pods.all_running) / rate(results.ctr_agents.0);
    println!(
        "throughput ratio pods / ctr x 8 = {primary:.2} (target >= 0.80: {}); pods / ctr x 100 = {:.2}",
        if primary >= 0.8 { "MET" } else { "NOT MET" },
        rate(pods.all_running) / rate(results.ctr_all.0)
    );
    println!(
        "for reference: pods / ctr+CNI x 8 = {:.2}",
        rate(pods.all_running) / rate(results.ctr_cni.0)
    );
    println!(
        "memory available with the fleet still up, after clean-up: {} MiB",
        memory_after >> 20
    );
    Ok(())
}
