//! Benchmark: placements end to end through the queue and committed in Postgres, with
//! SIMULATED nodes (issue 4: ≥ 2,000 placements/s).
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --release --workspace --bins
//! cargo run --release --example bench_placement_e2e   # BENCH_NODES (1,000), BENCH_PODS (2,000)
//! ```
//!
//! Set-up (not timed): a control plane (for its migrated database; node heartbeat timeout of a
//! day, so its health worker leaves the simulated nodes alone) on the harness's Postgres and a
//! Redis logical database of its own. `BENCH_NODES` simulated nodes are inserted straight into
//! `nodes`: `healthy`, region `local`, no labels, 16,000 millicores, 64 GiB of memory and
//! 1 TiB of disk allocatable each, and no agent behind them. A team on the `scale` plan. The
//! real `instapod-scheduler` binary (the release build next to this example, or
//! `INSTAPOD_SCHEDULER_BIN`) with its production defaults (32 concurrent jobs, placed in
//! batches; a pool of 8 Postgres connections, bin-packing), `info` logs, and the reconciler every hour (so that it
//! does not enqueue the benchmark's pods a second time; `BENCH_SCHEDULER_CONCURRENCY=<n>` sets
//! its concurrency and pool size instead). One warm-up pod is placed first.
//! Then `BENCH_PODS` pods are inserted in one `INSERT … SELECT` (`pending`, desired
//! `running`, 250 millicores, 256 MiB, 1 GiB each, region `local`).
//!
//! Timed: from pushing the pods' `PodJob`s onto the scheduler's `pods` queue (apalis
//! `RedisStorage::push_bulk` in batches of 500, as the control plane's queue client would,
//! only batched) until `SELECT count(*) FROM pods WHERE node_id IS NOT NULL` — polled every
//! 20 ms — counts all of them: each placement is the scheduler's whole transaction (pod row
//! lock, fleet read, placement, node row lock and re-check, update, event, commit) plus its
//! push of the `EnsureRunning` job to the node's queue. Placements/s = pods / that time.
//! Also printed: the scheduler-side rate from the first to the last `scheduled` event, CPU
//! by process during the timed part, and a check that no node is over-committed.
//!
//! The node jobs go to queues nobody consumes. Clean-up: the scheduler is killed, the Redis
//! logical database is flushed (`FLUSHDB`), the pods, the team and the nodes are deleted; the
//! control plane, Postgres and Redis are the harness's and go when the process exits.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use instapod_common::node::{PODS_QUEUE, PodJob};
use instapod_tests::scheduler::Scheduler;
use instapod_tests::{ControlPlane, ControlPlaneOptions, cpu, fleet, ids, redis};
use uuid::Uuid;

const DEFAULT_NODES: i64 = 1_000;
const DEFAULT_PODS: i64 = 2_000;
const MAX_NODES: i64 = 20_000;
const MAX_PODS: i64 = 50_000;
const PUSH_BATCH: usize = 500;
const POLL: Duration = Duration::from_millis(20);
const TIMEOUT: Duration = Duration::from_secs(600);

fn env_count(name: &str, default: i64, max: i64) -> anyhow::Result<i64> {
    match std::env::var(name) {
        Ok(value) => {
            let n: i64 = value
                .trim()
                .parse()
                .with_context(|| format!("{name} must be a number"))?;
            ensure!((1..=max).contains(&n), "{name} must be in 1..={max}");
            Ok(n)
        }
        Err(_) => Ok(default),
    }
}

/// Inserts `count` pods named `<prefix>-<n>`; returns their jobs.
async fn insert_pods(db: &tokio_postgres::Client, team: Uuid, prefix: &str, count: i64) -> anyhow::Result<Vec<PodJob>> {
    let rows = db
        .query(
            "INSERT INTO pods (team_id, name, state, desired_state, image, plan_id, region, cpu_millis,
                               memory_bytes, disk_bytes)
             SELECT $1, $2 || '-' || i, 'pending', 'running', 'registry.invalid/simulated:1', 'free', 'local',
                    250, 268435456, 1073741824
             FROM generate_series(1, $3::int8) i
             RETURNING id, generation",
            &[&team, &prefix, &count],
        )
        .await
        .context("inserting pods")?;
    Ok(rows
        .iter()
        .map(|r| PodJob {
            pod_id: r.get(0),
            generation: r.get(1),
        })
        .collect())
}

async fn placed(db: &tokio_postgres::Client, prefix: &str) -> anyhow::Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM pods WHERE node_id IS NOT NULL AND name LIKE $1 || '-%'",
            &[&prefix],
        )
        .await?
        .get(0))
}

/// Waits until `count` pods of `prefix` are placed; returns when.
async fn wait_placed(
    db: &tokio_postgres::Client,
    prefix: &str,
    count: i64,
    scheduler: &Scheduler,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let done = placed(db, prefix).await?;
        if done == count {
            return Ok(());
        }
        ensure!(
            started.elapsed() < TIMEOUT,
            "{done} of {count} pods placed after {TIMEOUT:?}; scheduler log:\n{}",
            scheduler.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn push(redis_url: &str, jobs: Vec<PodJob>) -> anyhow::Result<()> {
    let conn = apalis_redis::connect(redis_url).await.context("redis")?;
    let mut storage = RedisStorage::<PodJob>::new(conn).with_config(instapod_common::queue::config(PODS_QUEUE));
    let mut jobs = jobs;
    while !jobs.is_empty() {
        let rest = jobs.split_off(jobs.len().min(PUSH_BATCH));
        storage.push_bulk(jobs).await.context("pushing jobs")?;
        jobs = rest;
    }
    Ok(())
}

struct Figures {
    elapsed: Duration,
    pushed_after: Duration,
    scheduler_span: f64,
    nodes_used: i64,
    overcommitted: i64,
    cpu: String,
}

async fn run(
    db: &tokio_postgres::Client,
    redis_url: &str,
    scheduler: &Scheduler,
    team: Uuid,
    pods: i64,
) -> anyhow::Result<Figures> {
    let warm = insert_pods(db, team, "warm", 1).await?;
    push(redis_url, warm).await?;
    wait_placed(db, "warm", 1, scheduler).await.context("warm-up")?;

    let jobs = insert_pods(db, team, "sim", pods).await?;
    let cpu_before = cpu::snapshot();
    let started = Instant::now();
    push(redis_url, jobs).await?;
    let pushed_after = started.elapsed();
    wait_placed(db, "sim", pods, scheduler).await?;
    let elapsed = started.elapsed();
    let cpu = cpu::describe(&cpu_before, &cpu::snapshot());

    let span: f64 = db
        .query_one(
            "SELECT extract(epoch FROM max(e.created_at) - min(e.created_at))::float8
             FROM pod_events e JOIN pods p ON p.id = e.pod_id WHERE p.name LIKE 'sim-%' AND e.kind = 'scheduled'",
            &[],
        )
        .await?
        .get(0);
    let nodes_used: i64 = db
        .query_one(
            "SELECT count(DISTINCT node_id) FROM pods WHERE node_id IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let overcommitted: i64 = db
        .query_one(
            "SELECT count(*) FROM (
                SELECT n.id FROM nodes n JOIN pods p ON p.node_id = n.id
                GROUP BY n.id
                HAVING sum(p.cpu_millis) > max(n.allocatable_cpu_millis)
                    OR sum(p.memory_bytes) > max(n.allocatable_memory_bytes)
                    OR sum(p.disk_bytes) > max(n.allocatable_disk_bytes)) o",
            &[],
        )
        .await?
        .get(0);
    Ok(Figures {
        elapsed,
        pushed_after,
        scheduler_span: span,
        nodes_used,
        overcommitted,
        cpu,
    })
}

fn flush_redis(redis_url: &str) -> anyhow::Result<()> {
    let database = redis_url.rsplit('/').next().unwrap_or("0");
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &redis::shared().port().to_string(), "-n", database, "FLUSHDB"])
        .output()
        .context("running redis-cli")?;
    ensure!(
        String::from_utf8_lossy(&output.stdout).contains("OK"),
        "FLUSHDB: {output:?}"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes = env_count("BENCH_NODES", DEFAULT_NODES, MAX_NODES)?;
    let pods = env_count("BENCH_PODS", DEFAULT_PODS, MAX_PODS)?;
    let redis_url = redis::shared().next_url();
    let cp = ControlPlane::start(
        ControlPlaneOptions::default()
            .redis_url(&redis_url)
            .env("INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS", "86400"),
    )
    .await;
    let db = cp.db().await;
    fleet::insert_simulated_nodes(&db, "sim-node", nodes, 16_000)
        .await
        .context("inserting the simulated nodes")?;
    let team: Uuid = db
        .query_one(
            "INSERT INTO teams (name, slug, plan_id) VALUES ('Placement bench', $1, 'scale') RETURNING id",
            &[&ids::unique_slug("placement")],
        )
        .await?
        .get(0);
    let mut scheduler_env = vec![
        ("INSTAPOD_SCHEDULER_LOG_FILTER", "info".to_string()),
        ("INSTAPOD_SCHEDULER_RECONCILE_INTERVAL_SECS", "3600".to_string()),
    ];
    if let Ok(concurrency) = std::env::var("BENCH_SCHEDULER_CONCURRENCY") {
        scheduler_env.push(("INSTAPOD_SCHEDULER_CONCURRENCY", concurrency.clone()));
        scheduler_env.push(("INSTAPOD_SCHEDULER_DATABASE_POOL_SIZE", concurrency));
    }
    let scheduler_env: Vec<(&str, &str)> = scheduler_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let scheduler = Scheduler::start_with_env(cp.database_url(), &redis_url, &scheduler_env);

    let outcome = run(&db, &redis_url, &scheduler, team, pods).await;
    let log = scheduler.log_tail();
    drop(scheduler);
    let flushed = flush_redis(&redis_url);
    let deleted = db
        .batch_execute(&format!(
            "DELETE FROM pods WHERE team_id = '{team}'; DELETE FROM teams WHERE id = '{team}';
             DELETE FROM nodes WHERE agent_version = 'simulated';"
        ))
        .await;
    let figures = outcome.with_context(|| format!("scheduler log:\n{log}"))?;
    flushed?;
    deleted.context("deleting the benchmark's rows")?;

    let cores = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0);
    println!("placement end to end, {nodes} SIMULATED nodes (no agents), {pods} pods, {cores} cores");
    let rate = pods as f64 / figures.elapsed.as_secs_f64();
    println!(
        "all {pods} placed and committed {:.2} s after the first push ({:.2} s to push the jobs): {rate:.0} placements/s (target >= 2,000: {})",
        figures.elapsed.as_secs_f64(),
        figures.pushed_after.as_secs_f64(),
        if rate >= 2000.0 { "MET" } else { "NOT MET" }
    );
    println!(
        "first to last `scheduled` event: {:.2} s = {:.0} placements/s; {} nodes used; over-committed nodes: {}",
        figures.scheduler_span,
        pods as f64 / figures.scheduler_span.max(1e-9),
        figures.nodes_used,
        figures.overcommitted
    );
    println!("CPU during the timed part: {}", figures.cpu);
    ensure!(figures.overcommitted == 0, "a node was over-committed");
    Ok(())
}
