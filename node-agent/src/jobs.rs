//! The node's job queue: apalis on Redis, queue `node:<id>`, bounded concurrency, retries with
//! exponential backoff for transient failures.
//!
//! *Invariants.* Jobs are at-least-once: every operation is idempotent and carries the pod's
//! generation, and a stale job is acknowledged without effect ([`crate::pods::Outcome::Stale`]).
//! Failures a user must fix (bad image, bad command) are not errors here: they are reported
//! as the pod's `failed` state and the job is acknowledged.

use std::time::{Duration, Instant};

use apalis::layers::retry::HasherRng;
use apalis::layers::retry::backoff::{ExponentialBackoffMaker, MakeBackoff};
use apalis::prelude::*;
use apalis_redis::RedisStorage;
use instapod_common::node::{NodeJob, node_queue};
use instapod_common::queue::{POLL_INTERVAL, PollEvery};
use uuid::Uuid;

use crate::pods::{Outcome, PodError, Pods};

/// Attempts after the first for a job that fails transiently.
const RETRIES: usize = 8;

/// How often finished jobs are swept from Redis.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

async fn handle(job: NodeJob, pods: Data<Pods>) -> Result<(), BoxDynError> {
    let started = Instant::now();
    let operation = job.operation();
    let result = pods.handle(&job).await;
    let outcome = match &result {
        Ok(Outcome::Applied) => "applied",
        Ok(Outcome::Stale) => "stale",
        Ok(Outcome::Duplicate) => "duplicate",
        Err(PodError::Transient(_)) => "transient_error",
        Err(_) => "error",
    };
    metrics::histogram!("instapod_node_agent_operation_duration_seconds", "operation" => operation, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("instapod_node_agent_jobs_total", "operation" => operation, "outcome" => outcome).increment(1);
    match result {
        Ok(_) => Ok(()),
        Err(PodError::Unknown(id)) => {
            tracing::info!(pod = %id, operation, "job for a pod this node does not have; acknowledged");
            Ok(())
        }
        Err(err) => {
            tracing::warn!(pod = %job.pod_id(), operation, error = %err, "job failed; retrying with backoff");
            Err(Box::new(err))
        }
    }
}

/// Consumes `node:<node_id>` until the worker stops (Redis gone: returns the error).
pub async fn run(redis_url: &str, node_id: Uuid, pods: Pods, concurrency: usize) -> Result<(), BoxDynError> {
    let conn = apalis_redis::connect(redis_url).await?;
    let conn_for_sweep = conn.clone();
    // apalis-redis fetches from an empty queue only on its heartbeat (30 s) unless told to
    // poll: a job must start within a fraction of a second.
    let storage = RedisStorage::<NodeJob>::new(conn)
        .with_config(instapod_common::queue::config(node_queue(node_id)))
        .poll_with_strategy(PollEvery::new(POLL_INTERVAL));
    let backoff = ExponentialBackoffMaker::new(
        Duration::from_millis(500),
        Duration::from_secs(30),
        0.5,
        HasherRng::default(),
    )?
    .make_backoff();
    // A fresh name per run: a restarted agent must not wait for its previous registration to
    // expire (jobs a killed agent held in flight are redone by the reconcilers).
    let worker = WorkerBuilder::new(format!("node-agent-{node_id}-{}", uuid::Uuid::new_v4().simple()))
        .backend(storage)
        .retry(RetryPolicy::retries(RETRIES).with_backoff(backoff))
        .concurrency(concurrency)
        .data(pods)
        .build(handle);
    // Finished jobs' leftovers in Redis (see `instapod_common::queue::sweep_done`), every
    // `SWEEP_EVERY` while the consumer runs.
    let mut sweeper = conn_for_sweep;
    let queue = node_queue(node_id);
    let sweep = async move {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            match instapod_common::queue::sweep_done(&mut sweeper, &queue, 500).await {
                Ok(0) => {}
                Ok(swept) => tracing::debug!(swept, "finished jobs swept from Redis"),
                Err(err) => tracing::warn!(error = %err, "sweeping finished jobs failed"),
            }
        }
    };
    tokio::select! {
        ran = worker.run() => ran?,
        () = sweep => {}
    }
    Ok(())
}
