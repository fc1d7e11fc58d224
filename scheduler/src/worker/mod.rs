//! The scheduler process: consumes [`PodJob`]s (queue `pods`), places pods with [`crate::place`]
//! and commits the placement in Postgres, sends nodes their jobs (`node:<id>`), and runs the
//! reconciler that re-enqueues every pod not in its desired state. Its `/metrics` is served on
//! `metrics_listen` ([`metrics`]).
//!
//! *Invariants.*
//! - Placement locks the pod's row, then the chosen node's row, and re-sums the node's
//!   committed pods under that lock before assigning: several scheduler replicas can never
//!   over-commit a node (the check and the write happen under the node's lock). The pods being
//!   placed at the same moment share one transaction ([`batch`]); the rule is the same.
//! - Postgres is the truth: a job only says "converge this pod"; the worker reads the pod's
//!   desired state and generation from its row, so a lost, duplicated or stale job is
//!   harmless, and the reconciler rebuilds lost work after a Redis flush.

pub mod batch;
pub mod config;
pub mod converge;
pub mod metrics;
pub mod reconcile;
pub mod spec;
pub mod transfer;

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_redis::RedisStorage;
use instapod_common::node::{PODS_QUEUE, PodJob};
use instapod_common::queue::{POLL_INTERVAL, PollEvery};
use tokio::sync::watch;

pub use config::Config;

/// Shared by every job.
#[derive(Debug, Clone)]
pub struct Context {
    pub db: deadpool_postgres::Pool,
    pub redis: apalis_redis::ConnectionManager,
    pub config: Arc<Config>,
}

/// What a job needs: the context and the batching task.
#[derive(Debug, Clone)]
struct Worker {
    ctx: Context,
    batcher: batch::Batcher,
}

/// A pod that needs a node is placed with the other pods whose jobs run now (one
/// transaction: [`batch`]); anything else, and a pod the batch left alone, converges alone.
async fn handle(job: PodJob, worker: Data<Worker>) -> Result<(), BoxDynError> {
    let ctx = &worker.ctx;
    let converged = match worker.batcher.place(job.pod_id).await {
        Ok(batch::Batched::Placed) => Ok(()),
        Ok(batch::Batched::NotPlaced) => converge::converge(ctx, job.pod_id).await,
        Err(err) => Err(err),
    };
    metrics::pod_job(converged.is_ok());
    converged.map_err(|err| {
        tracing::warn!(pod = %job.pod_id, error = %err, "converging failed; retrying");
        Box::new(err) as BoxDynError
    })
}

/// Runs the scheduler until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    metrics::install(config.metrics_listen)?;
    let mut pg = deadpool_postgres::Config::new();
    pg.url = Some(config.database_url.expose().to_string());
    pg.pool = Some(deadpool_postgres::PoolConfig::new(config.database_pool_size));
    let db = pg.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?;
    let redis = loop {
        match apalis_redis::connect(config.redis_url.expose()).await {
            Ok(conn) => break conn,
            Err(err) => {
                tracing::warn!(error = %err, "Redis not reachable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let ctx = Context {
        db,
        redis: redis.clone(),
        config: Arc::new(config),
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(reconcile::run(ctx.clone(), shutdown.clone()));
    let concurrency = ctx.config.concurrency;
    let worker_ctx = Worker {
        batcher: batch::Batcher::start(ctx.clone()),
        ctx: ctx.clone(),
    };
    let jobs = async move {
        loop {
            // apalis-redis fetches from an empty queue only on its heartbeat (30 s) unless told
            // to poll: a new pod must be placed within a fraction of a second (every 20 ms: see
            // BENCHMARKS.md, "Pods end to end").
            let storage = RedisStorage::<PodJob>::new(worker_ctx.ctx.redis.clone())
                .with_config(instapod_common::queue::config(PODS_QUEUE).batch_size(concurrency.max(1)))
                .poll_with_strategy(PollEvery::new(POLL_INTERVAL));
            let worker = WorkerBuilder::new(format!("scheduler-{}", uuid::Uuid::new_v4().simple()))
                .backend(storage)
                .retry(RetryPolicy::retries(5))
                .concurrency(concurrency)
                .data(worker_ctx.clone())
                .build(handle);
            if let Err(err) = worker.run().await {
                tracing::warn!(error = %err, "pod job consumer stopped; restarting");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tracing::info!("scheduler ready");
    tokio::select! {
        _ = jobs => {}
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    let _ = shutdown_tx.send(true);
    Ok(())
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
