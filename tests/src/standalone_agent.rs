//! For benchmarks that drive one agent binary directly, without the scheduler: push node jobs
//! into its queue, wait for it to join, wait for its pods' reports, read its process figures.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use instapod_common::node::{NodeJob, node_queue};
use uuid::Uuid;

use crate::{ControlPlane, process};

/// Longest wait for an agent to join.
pub const JOIN_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for a set of pods to reach a state.
pub const PODS_WAIT: Duration = Duration::from_secs(300);

/// Pushes `jobs` into the node's queue.
pub async fn push_all(redis_url: &str, node_id: Uuid, jobs: Vec<NodeJob>) -> anyhow::Result<()> {
    let conn = apalis_redis::connect(redis_url).await.context("redis")?;
    let mut storage =
        RedisStorage::<NodeJob>::new(conn).with_config(instapod_common::queue::config(node_queue(node_id)));
    for job in jobs {
        storage.push(job).await.context("pushing a job")?;
    }
    Ok(())
}

/// The node's id once its row is `healthy`.
pub async fn wait_joined(cp: &ControlPlane, name: &str, log: &std::path::Path) -> anyhow::Result<Uuid> {
    let deadline = Instant::now() + JOIN_WAIT;
    let db = cp.db().await;
    loop {
        let row = db
            .query_opt("SELECT id, status FROM nodes WHERE name = $1", &[&name])
            .await?;
        if let Some(row) = row
            && row.get::<_, String>(1) == "healthy"
        {
            return Ok(row.get(0));
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not join within {JOIN_WAIT:?}; its log:\n{}",
                process::log_tail(log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the latest report of every pod is `state`; returns how long that took.
pub async fn wait_all(
    cp: &ControlPlane,
    pods: &[Uuid],
    state: &str,
    log: &std::path::Path,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let db = cp.db().await;
    let ids: Vec<Uuid> = pods.to_vec();
    loop {
        let rows = db
            .query(
                "SELECT DISTINCT ON (pod_id) pod_id, state FROM pod_reports \
                 WHERE pod_id = ANY($1) ORDER BY pod_id, id DESC",
                &[&ids],
            )
            .await?;
        let done = rows.iter().filter(|r| r.get::<_, String>(1) == state).count();
        if done == pods.len() {
            return Ok(started.elapsed());
        }
        if let Some(failed) = rows.iter().find(|r| r.get::<_, String>(1) == "failed") {
            bail!(
                "pod {} failed; agent log:\n{}",
                failed.get::<_, Uuid>(0),
                process::log_tail(log, 30)
            );
        }
        if started.elapsed() > PODS_WAIT {
            bail!(
                "only {done} of {} pods are {state} after {PODS_WAIT:?}; agent log:\n{}",
                pods.len(),
                process::log_tail(log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
pub fn status_field(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading the process status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("unreadable line {line:?}"))?
        .parse()
        .with_context(|| format!("unreadable line {line:?}"))?;
    Ok(kb * 1024)
}

/// CPU time (user + system) the process `pid` has used, in clock ticks (`/proc/<pid>/stat`).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading the process stat")?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis
    // start with the state (field 3), so utime and stime (14 and 15) are the 12th and 13th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).context("unreadable stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}
