//! Benchmark: create → running through the whole platform, image present on the node, against
//! a raw containerd start of the same image on the same containerd (issue 4: median ≤ 1.5× the
//! raw time + 50 ms, p99 ≤ 500 ms).
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --release --workspace --bins
//! cargo run --release --example bench_pods_create        # as root; BENCH_N=<rounds>, default 20
//! ```
//!
//! Set-up (not timed): a [`Fleet`] from the release binaries next to this example (or
//! `INSTAPOD_CONTROL_PLANE_BIN`, `INSTAPOD_SCHEDULER_BIN`, `INSTAPOD_AGENT_BIN`): the control
//! plane, the scheduler (reconciling every 5 s, its production default) and two node agents
//! (regions `local` and `eu-central`, heartbeats every second as in the tests, `info` logs),
//! on the harness's Postgres, Redis, containerd and registry. A user whose team is on the
//! `scale` plan. The busybox `httpd` image is pushed to the registry; one warm-up pod per
//! region is created, waited for and deleted (so each node has the image), and the image is
//! pulled with `ctr images pull` into a separate namespace for the baseline.
//!
//! Each round, alternating which goes first, with fresh names:
//!
//! - **pod**: the time from sending `POST /api/pods` (image, plan `free` = 250 millicores and
//!   256 MiB, the round's region, HTTP port 8080) until a `GET /api/pods/{name}` answers
//!   `"state": "running"`; the GET is sent again 10 ms after each answer. The client (a fresh
//!   one per round, with its own `X-Forwarded-For`, so the 50 creates/hour limit holds) has
//!   its connection open before the clock starts. Also recorded, from Postgres afterwards
//!   (not timed): when the pod's `running` event was written (`pod_events.created_at`,
//!   wall clock of the same machine) relative to sending the POST, and the breakdown below.
//! - **ctr**: `ctr run -d` of the same image with the same memory and CPU limits (see
//!   [`CtrBaseline`]), measured as the `ctr` process's run time; the task is then checked to be
//!   `RUNNING` (not timed).
//!
//! Before each pod round the benchmark pauses for a random 0–200 ms (not timed), so that rounds
//! do not fall into step with the queues' poll timers. After each measurement the pod is
//! deleted through the API (`DELETE`, then `GET` until 404) and the `ctr` container killed and
//! removed; none of that is timed. Every wait is bounded.
//!
//! Breakdown of each pod round (medians printed), from the same machine's clock: the POST
//! until its 202; the 202 until the scheduler's placement transaction started (the
//! `scheduled` event's timestamp: queue wait until the scheduler fetched the job); from there
//! until the agent observed the task running (`pod_reports.observed_at`), split into the
//! agent's handler time (the delta of its `instapod_node_agent_operation_duration_seconds`
//! sum for `ensure_running`, from its `/metrics`) and the rest (placement commit, node job
//! push, node-queue wait); then until the control plane wrote the `running` event (report
//! delivery); then until the polling GET saw it.
//!
//! Clean-up: pods left by a failure are deleted through the API and waited for; then the
//! baseline's containers, image and namespace are removed; dropping the fleet kills the agents
//! and the scheduler and removes every container, network namespace and bridge left.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use instapod_tests::ctr_baseline::CtrBaseline;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::node::web_image;
use instapod_tests::{Client, TestUser, ids, scale_user};
use serde_json::json;
use uuid::Uuid;

const DEFAULT_ROUNDS: usize = 20;
const MAX_ROUNDS: usize = 200;
const REGIONS: [&str; 2] = ["local", "eu-central"];
/// The pods' plan and the baseline's limits (the `free` plan: 250 millicores, 256 MiB).
const PLAN: &str = "free";
const CPU_MILLIS: u32 = 250;
const MEMORY_BYTES: u64 = 256 << 20;
/// How often the pod is read while waiting for `running`.
const POLL: Duration = Duration::from_millis(10);
/// The longest one start or one delete may take before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn rounds() -> anyhow::Result<usize> {
    match std::env::var("BENCH_N") {
        Ok(value) => {
            let n: usize = value.trim().parse().context("BENCH_N must be a number")?;
            ensure!((1..=MAX_ROUNDS).contains(&n), "BENCH_N must be in 1..={MAX_ROUNDS}");
            Ok(n)
        }
        Err(_) => Ok(DEFAULT_ROUNDS),
    }
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn median(values: &[f64]) -> f64 {
    let mut all = values.to_vec();
    all.sort_by(f64::total_cmp);
    let n = all.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        all[n / 2]
    } else {
        (all[n / 2 - 1] + all[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile (`q` in 0..=1).
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut all = values.to_vec();
    all.sort_by(f64::total_cmp);
    if all.is_empty() {
        return f64::NAN;
    }
    let rank = ((all.len() as f64) * q).ceil().max(1.0) as usize;
    all[rank.min(all.len()) - 1]
}

fn ms(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1000.0)
}

/// One pod round's figures, in seconds.
#[derive(Debug, Clone, Default)]
struct PodRound {
    /// POST sent → GET saw `running` (the measured figure).
    running: f64,
    /// POST sent → `running` event written.
    event: f64,
    post: f64,
    to_scheduled: f64,
    scheduled_to_observed: f64,
    handler: Option<f64>,
    observed_to_event: f64,
    event_to_seen: f64,
}

/// The sum of the agent's `ensure_running` handler times so far, and their count.
async fn handler_seconds(metrics_port: u16) -> anyhow::Result<(f64, f64)> {
    let text = instapod_tests::node::agent_metrics(metrics_port).await?;
    let mut sum = 0.0;
    let mut count = 0.0;
    for line in text.lines() {
        let relevant = line.contains("operation=\"ensure_running\"") && line.contains("outcome=\"applied\"");
        if !relevant {
            continue;
        }
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        if line.starts_with("instapod_node_agent_operation_duration_seconds_sum") {
            sum += value;
        } else if line.starts_with("instapod_node_agent_operation_duration_seconds_count") {
            count += value;
        }
    }
    Ok((sum, count))
}

/// A client with its own client IP and an open connection.
async fn fresh_client(user: &TestUser) -> Client {
    let client = user.client();
    client.get("/api/pods").send().await.assert_status(200);
    client
}

/// Deletes pod `name` through the API and waits until it is gone.
async fn delete_pod(client: &Client, name: &str) -> anyhow::Result<()> {
    let response = client.delete(&format!("/api/pods/{name}")).send().await;
    ensure!(
        response.status == 202 || response.status == 404,
        "DELETE {name}: {} {}",
        response.status,
        response.text()
    );
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if client.get(&format!("/api/pods/{name}")).send().await.status == 404 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "pod {name} not gone after {STEP_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates pod `name` in `region`, waits until the API shows it running; returns the figures.
async fn pod_round(
    fleet: &Fleet,
    user: &TestUser,
    image: &str,
    name: &str,
    region_index: usize,
) -> anyhow::Result<PodRound> {
    let client = fresh_client(user).await;
    // A random pause (not timed), so that rounds do not fall into step with the queues' poll
    // timers (the previous round's delete ends right after an agent's poll).
    let random = *Uuid::new_v4().as_bytes();
    let jitter = u64::from(u16::from_le_bytes([random[0], random[1]]) % 200);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let metrics_port = fleet.nodes[region_index].metrics_port;
    let (sum_before, count_before) = handler_seconds(metrics_port).await?;
    let body = json!({"name": name, "image": image, "plan": PLAN, "region": REGIONS[region_index], "http_port": 8080});
    let sent_at = SystemTime::now();
    let started = Instant::now();
    let created = client.post_json("/api/pods", &body).await;
    let post = started.elapsed();
    ensure!(created.status == 202, "POST: {} {}", created.status, created.text());
    let path = format!("/api/pods/{name}");
    let (running, seen_at) = loop {
        let response = client.get(&path).send().await;
        let elapsed = started.elapsed();
        if response.status == 200 {
            let pod = response.json();
            match pod["state"].as_str() {
                Some("running") => break (elapsed, SystemTime::now()),
                Some("failed") => bail!("pod {name} failed: {pod}"),
                _ => {}
            }
        }
        ensure!(
            elapsed < STEP_TIMEOUT,
            "pod {name} not running after {STEP_TIMEOUT:?}: {}",
            response.text()
        );
        tokio::time::sleep(POLL).await;
    };
    // Not timed from here on.
    let pod_id: Uuid = created.json()["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .context("the created pod's id")?;
    let (sum_after, count_after) = handler_seconds(metrics_port).await?;
    let handler = (count_after - count_before == 1.0).then_some(sum_after - sum_before);

    let db = fleet.cp.db().await;
    let events = db
        .query(
            "SELECT kind, COALESCE(state, ''), extract(epoch FROM created_at)::float8 FROM pod_events
             WHERE pod_id = $1 ORDER BY id",
            &[&pod_id],
        )
        .await?;
    let event_at = |kind: &str, state: Option<&str>| {
        events
            .iter()
            .find(|e| e.get::<_, String>(0) == kind && state.is_none_or(|s| e.get::<_, String>(1) == s))
            .map(|e| e.get::<_, f64>(2))
    };
    let scheduled = event_at("scheduled", None).context("no scheduled event")?;
    let running_event = event_at("state", Some("running")).context("no running event")?;
    let observed: f64 = db
        .query_one(
            "SELECT extract(epoch FROM observed_at)::float8 FROM pod_reports
             WHERE pod_id = $1 AND state = 'running' ORDER BY id LIMIT 1",
            &[&pod_id],
        )
        .await
        .context("the running report")?
        .get(0);
    let sent = epoch(sent_at);
    let answered = sent + post.as_secs_f64();
    Ok(PodRound {
        running: running.as_secs_f64(),
        event: running_event - sent,
        post: post.as_secs_f64(),
        to_scheduled: scheduled - answered,
        scheduled_to_observed: observed - scheduled,
        handler,
        observed_to_event: running_event - observed,
        event_to_seen: epoch(seen_at) - running_event,
    })
}

#[derive(Default)]
struct Results {
    pods: Vec<PodRound>,
    ctr: Vec<f64>,
}

async fn ctr_round(baseline: &CtrBaseline, created: &mut Vec<String>) -> anyhow::Result<f64> {
    let id = format!("bench-ctr-{}", ids::random_suffix());
    created.push(id.clone());
    let elapsed = baseline.run(&id).await?;
    baseline.ensure_running(&id)?;
    baseline.remove(&id).await?;
    created.pop();
    Ok(elapsed.as_secs_f64())
}

async fn run(
    fleet: &Fleet,
    user: &TestUser,
    baseline: &CtrBaseline,
    image: &str,
    n: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let admin = user.client();
    let mut ctr_created = Vec::new();
    // Warm-up: one pod per node (the image comes onto it) and one ctr start.
    for (index, _) in REGIONS.iter().enumerate() {
        let name = format!("warm-{index}-{}", &ids::random_suffix()[..6]);
        pod_round(fleet, user, image, &name, index)
            .await
            .context("warm-up pod")?;
        delete_pod(&admin, &name).await?;
    }
    ctr_round(baseline, &mut ctr_created).await.context("warm-up ctr")?;
    for round in 0..n {
        let pod_first = round % 2 == 0;
        for step in 0..2 {
            if (step == 0) == pod_first {
                let name = format!("bench-{round}-{}", &ids::random_suffix()[..6]);
                let figures = pod_round(fleet, user, image, &name, round % REGIONS.len())
                    .await
                    .with_context(|| format!("round {}", round + 1))?;
                delete_pod(&admin, &name).await?;
                results.pods.push(figures);
            } else {
                let elapsed = ctr_round(baseline, &mut ctr_created)
                    .await
                    .with_context(|| format!("round {}", round + 1))?;
                results.ctr.push(elapsed);
            }
        }
    }
    Ok(())
}

/// Deletes every pod the user still has and waits until they are gone.
async fn delete_all(user: &TestUser) {
    let client = user.client();
    let list = client.get("/api/pods").send().await;
    let names: Vec<String> = list.json()["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for name in names {
        if let Err(err) = delete_pod(&client, &name).await {
            eprintln!("clean-up: {err:#}");
        }
    }
}

fn row(name: &str, values: &[f64]) {
    println!(
        "{name:<34} median {:>9}   p99 {:>9}   min {:>9}   max {:>9}   (n={})",
        ms(median(values)),
        ms(percentile(values, 0.99)),
        ms(percentile(values, 0.0)),
        ms(percentile(values, 1.0)),
        values.len()
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = rounds()?;
    let options = FleetOptions::regions(REGIONS)
        .quiet_logs()
        .scheduler_env("INSTAPOD_SCHEDULER_RECONCILE_INTERVAL_SECS", "5");
    let fleet = Fleet::start(options).await;
    let user = scale_user(&fleet.cp).await;
    let image = web_image().await;
    let baseline = CtrBaseline::pull(&image, MEMORY_BYTES, CPU_MILLIS)?;

    let mut results = Results::default();
    let outcome = run(&fleet, &user, &baseline, &image, n, &mut results).await;
    delete_all(&user).await;
    baseline.clean_up().await;
    drop(fleet);
    outcome?;

    let cores = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0);
    println!("create -> running through the API, image present, {n} rounds (+ warm-up), {cores} cores");
    let pods = &results.pods;
    let column = |f: fn(&PodRound) -> f64| pods.iter().map(f).collect::<Vec<f64>>();
    let running = column(|r| r.running);
    row("pod: POST -> GET shows running", &running);
    row("pod: POST -> running event written", &column(|r| r.event));
    row("ctr run -d (baseline)", &results.ctr);
    println!("breakdown of the pod rounds (same clock):");
    row("  POST -> 202", &column(|r| r.post));
    row("  202 -> scheduler picks the job", &column(|r| r.to_scheduled));
    row(
        "  scheduled -> agent observed running",
        &column(|r| r.scheduled_to_observed),
    );
    let handlers: Vec<f64> = pods.iter().filter_map(|r| r.handler).collect();
    row("    of which the agent's handler", &handlers);
    let rest: Vec<f64> = pods
        .iter()
        .filter_map(|r| r.handler.map(|h| r.scheduled_to_observed - h))
        .collect();
    row("    of which the rest (commit, queue)", &rest);
    row("  observed -> running event", &column(|r| r.observed_to_event));
    row("  running event -> GET sees it", &column(|r| r.event_to_seen));
    let raw = median(&results.ctr);
    let pod_median = median(&running);
    let pod_p99 = percentile(&running, 0.99);
    let limit = 1.5 * raw + 0.050;
    println!(
        "ratio of medians pod / ctr = {:.2}; check: median {} <= 1.5 x {} + 50 ms = {}: {}; p99 {} <= 500 ms: {}",
        pod_median / raw,
        ms(pod_median),
        ms(raw),
        ms(limit),
        if pod_median <= limit { "MET" } else { "NOT MET" },
        ms(pod_p99),
        if pod_p99 <= 0.5 { "MET" } else { "NOT MET" }
    );
    Ok(())
}
