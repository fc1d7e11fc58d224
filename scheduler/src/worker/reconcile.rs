//! The reconciler: every few seconds, (1) pods on nodes that stopped heartbeating become
//! `unknown`, (2) `unknown` pods whose node is back take the state its heartbeat reports, and
//! (3) every pod not in its desired state (and not failed, and not on an unhealthy node) is
//! enqueued again — so a lost job, a Redis flush or capacity that appeared later only delays
//! work. Safe with several scheduler replicas (each statement is idempotent; jobs converge).
//! Each pass also ends the volume transfers of pods that run now ([`super::transfer::complete`]).
//!
//! *Pods of a node that never returns* stay `unknown`: their volumes live on that node, so they
//! are not moved silently. Deleting them waits for the node; an operator who retires the node
//! deletes its row (`DELETE FROM nodes WHERE id = …`), which detaches its pods
//! (`node_id` → NULL): pods being deleted are then removed, running ones are placed again with
//! an empty volume.

use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use instapod_common::node::{PODS_QUEUE, PodJob};
use tokio::sync::watch;
use uuid::Uuid;

use super::Context;

/// Most pods enqueued per pass.
const BATCH: i64 = 1000;

/// Finished jobs swept from Redis per script call.
const SWEEP_BATCH: usize = 500;

pub async fn run(ctx: Context, mut shutdown: watch::Receiver<bool>) {
    let interval = Duration::from_secs(ctx.config.reconcile_interval_secs.max(1));
    loop {
        let started = std::time::Instant::now();
        let passed = pass(&ctx).await;
        super::metrics::reconcile_pass(passed.is_ok(), started.elapsed());
        if let Err(err) = passed {
            tracing::warn!(error = %err, "reconcile pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One pass; returns how many pods were enqueued.
pub async fn pass(ctx: &Context) -> anyhow::Result<usize> {
    // Clones and moves whose pod runs now: end them (a move's old copy is deleted).
    if let Err(err) = super::transfer::complete(ctx).await {
        tracing::warn!(error = %err, "ending volume transfers failed");
    }
    // Finished pod jobs' leftovers in Redis (see `instapod_common::queue::sweep_done`).
    match instapod_common::queue::sweep_done(&mut ctx.redis.clone(), PODS_QUEUE, SWEEP_BATCH).await {
        Ok(0) => {}
        Ok(swept) => tracing::debug!(swept, "finished pod jobs swept from Redis"),
        Err(err) => tracing::warn!(error = %err, "sweeping finished pod jobs failed"),
    }
    let client = ctx.db.get().await?;
    let lost = client
        .query(
            "WITH lost AS (
                UPDATE pods p SET state = 'unknown', updated_at = now()
                FROM nodes n
                WHERE p.node_id = n.id AND n.status = 'unhealthy'
                  AND p.state IN ('scheduled', 'starting', 'running', 'stopping')
                RETURNING p.id, n.name)
             INSERT INTO pod_events (pod_id, kind, state, message)
             SELECT id, 'state', 'unknown', 'node ' || name || ' stopped heartbeating' FROM lost
             RETURNING pod_id",
            &[],
        )
        .await?;
    super::metrics::reconciler_action("marked_unknown", lost.len());
    if !lost.is_empty() {
        tracing::warn!(pods = lost.len(), "pods on silent nodes marked unknown");
    }
    let recovered = client
        .execute(
            "WITH back AS (
                UPDATE pods p SET updated_at = now(), state = CASE hp->>'state'
                        WHEN 'running' THEN 'running' WHEN 'stopped' THEN 'stopped'
                        WHEN 'failed' THEN 'failed' ELSE 'starting' END
                FROM nodes n, jsonb_array_elements(n.pods) hp
                WHERE p.node_id = n.id AND n.status = 'healthy' AND p.state = 'unknown'
                  AND hp->>'pod_id' = p.id::text
                RETURNING p.id, p.state)
             INSERT INTO pod_events (pod_id, kind, state, message)
             SELECT id, 'state', state, 'node is back: ' || state FROM back",
            &[],
        )
        .await?;
    super::metrics::reconciler_action("recovered", usize::try_from(recovered).unwrap_or(usize::MAX));
    let rows = client
        .query(
            "SELECT p.id, p.generation FROM pods p LEFT JOIN nodes n ON n.id = p.node_id
             WHERE NOT (p.state = 'failed'
                     OR (p.desired_state = 'running' AND p.state = 'running')
                     OR (p.desired_state = 'stopped' AND p.state = 'stopped'))
               AND p.updated_at < now() - interval '2 seconds'
               AND (n.id IS NULL OR n.status = 'healthy')
             ORDER BY p.updated_at LIMIT $1",
            &[&BATCH],
        )
        .await?;
    let jobs: Vec<(Uuid, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if jobs.is_empty() {
        return Ok(0);
    }
    let mut storage =
        RedisStorage::<PodJob>::new(ctx.redis.clone()).with_config(instapod_common::queue::config(PODS_QUEUE));
    for (pod_id, generation) in &jobs {
        storage
            .push(PodJob {
                pod_id: *pod_id,
                generation: *generation,
            })
            .await
            .map_err(|err| anyhow::anyhow!("enqueue: {err}"))?;
    }
    super::metrics::reconciler_action("requeued", jobs.len());
    tracing::debug!(pods = jobs.len(), "unsettled pods enqueued");
    Ok(jobs.len())
}
