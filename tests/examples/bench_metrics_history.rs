//! Benchmark: `GET /api/pods/{name}/metrics/history` for 30 days at a 1-hour step (issue 6:
//! p99 ≤ 50 ms), against `GET /api/pods/{name}` (an authenticated read of one pod row) in the
//! same run.
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --release --workspace --bins
//! INSTAPOD_CONTROL_PLANE_BIN=$CARGO_TARGET_DIR/release/instapod-control-plane \
//!     cargo run --release -p instapod-tests --example bench_metrics_history
//! ```
//!
//! A real control plane (release build) on the harness's Postgres. One team gets 500 pods,
//! each with a full history as the rollups would hold it: 31 days of hour buckets and 25 hours
//! of minute buckets (about 1.1 million rows), plus 2 hours of raw samples at 10 s for the
//! measured pods. Then, one request at a time over one keep-alive connection, 1,000 history
//! requests (a different pod each, `start` = now − 30 days, `step=1h`: 720 or 721 points) and
//! 1,000 pod reads; p50, p99 and max of each, and the ratio of the p99s.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use instapod_tests::{ControlPlane, ControlPlaneOptions, register_and_login};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

const PODS: i64 = 500;
const REQUESTS: usize = 1_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await;
    let user = register_and_login(&cp).await;
    let team: Uuid = user.personal_team_id.parse().context("team id")?;
    let db = cp.db().await;
    let filled = Instant::now();
    db.execute(
        "INSERT INTO pods (team_id, name) SELECT $1, 'pod-' || lpad(i::text, 4, '0') FROM generate_series(1, $2::bigint) AS i",
        &[&team, &PODS],
    )
    .await
    .context("pods")?;
    db.execute(
        "INSERT INTO pod_metrics_rollup (pod_id, resolution_secs, bucket, samples, cpu_cores_sum, cpu_cores_max,
             memory_bytes_sum, memory_bytes_max, rx_bytes_per_sec_sum, tx_bytes_per_sec_sum, disk_used_bytes_max,
             pids_max, cpu_limit_cores, memory_limit_bytes, disk_quota_bytes)
         SELECT p.id, 3600, date_trunc('hour', now()) - make_interval(hours => h), 360, 36, 0.2, 360e6, 1.2e6, 3600, 7200,
                1e8, 12, 0.5, 536870912, 5368709120
         FROM pods p CROSS JOIN generate_series(0, 31 * 24) AS h WHERE p.team_id = $1",
        &[&team],
    )
    .await
    .context("hour buckets")?;
    db.execute(
        "INSERT INTO pod_metrics_rollup (pod_id, resolution_secs, bucket, samples, cpu_cores_sum, cpu_cores_max,
             memory_bytes_sum, memory_bytes_max, rx_bytes_per_sec_sum, tx_bytes_per_sec_sum, disk_used_bytes_max,
             pids_max, cpu_limit_cores, memory_limit_bytes, disk_quota_bytes)
         SELECT p.id, 60, date_trunc('minute', now()) - make_interval(mins => m), 6, 0.6, 0.2, 6e6, 1.2e6, 60, 120,
                1e8, 12, 0.5, 536870912, 5368709120
         FROM pods p CROSS JOIN generate_series(0, 25 * 60) AS m WHERE p.team_id = $1",
        &[&team],
    )
    .await
    .context("minute buckets")?;
    db.execute(
        "INSERT INTO pod_metrics_raw (pod_id, at, cpu_seconds_total, cpu_cores, cpu_limit_cores, memory_bytes,
             memory_limit_bytes, rx_bytes, tx_bytes, rx_bytes_per_sec, tx_bytes_per_sec, disk_used_bytes,
             disk_quota_bytes, pids)
         SELECT p.id, now() - make_interval(secs => s * 10), s, 0.1, 0.5, 1e6, 536870912, s * 100, s * 200, 10, 20,
                1e8, 5368709120, 12
         FROM pods p CROSS JOIN generate_series(0, 720) AS s WHERE p.team_id = $1",
        &[&team],
    )
    .await
    .context("raw samples")?;
    db.execute("ANALYZE pod_metrics_rollup", &[]).await?;
    db.execute("ANALYZE pod_metrics_raw", &[]).await?;
    let rows: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM pod_metrics_rollup) + (SELECT count(*) FROM pod_metrics_raw)",
            &[],
        )
        .await?
        .get(0);
    println!(
        "{PODS} pods, {rows} metric rows written in {:.1} s",
        filled.elapsed().as_secs_f64()
    );

    let http = instapod_tests::http_builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let now = OffsetDateTime::now_utc();
    let start = (now - time::Duration::days(30)).format(&Rfc3339)?;
    let end = now.format(&Rfc3339)?;
    let mut history = Vec::with_capacity(REQUESTS);
    let mut reads = Vec::with_capacity(REQUESTS);
    // Warm-up: connections, prepared statements, caches.
    for round in 0..(REQUESTS / 10 + 2 * REQUESTS) {
        // A different pod each time, spread over all of them (7919 is prime, so coprime to PODS).
        let pod = format!("pod-{:04}", (round as i64 * 7_919) % PODS + 1);
        let measured = round >= REQUESTS / 10;
        let (url, is_history) = if round % 2 == 0 {
            (
                format!(
                    "{}/api/pods/{pod}/metrics/history?start={start}&end={end}&step=1h",
                    cp.url()
                ),
                true,
            )
        } else {
            (format!("{}/api/pods/{pod}", cp.url()), false)
        };
        let began = Instant::now();
        let response = http.get(&url).bearer_auth(&user.token).send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        let took = began.elapsed();
        ensure!(
            status.is_success(),
            "{url}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        if is_history {
            let parsed: serde_json::Value = serde_json::from_slice(&body)?;
            let points = parsed["timestamps"].as_array().map_or(0, Vec::len);
            ensure!((720..=721).contains(&points), "{points} points");
            ensure!(parsed["resolution"] == "1h");
        }
        if measured {
            if is_history {
                history.push(took);
            } else {
                reads.push(took);
            }
        }
    }
    history.sort();
    reads.sort();
    let (h99, r99) = (percentile(&history, 0.99), percentile(&reads, 0.99));
    println!(
        "history 30 d / 1 h ({} requests): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        history.len(),
        ms(percentile(&history, 0.5)),
        ms(h99),
        ms(*history.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "GET /api/pods/{{name}} ({} requests): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        reads.len(),
        ms(percentile(&reads, 0.5)),
        ms(r99),
        ms(*reads.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "p99 ratio history / pod read: {:.2}; target p99 <= 50 ms: {}",
        h99.as_secs_f64() / r99.as_secs_f64(),
        if ms(h99) <= 50.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
