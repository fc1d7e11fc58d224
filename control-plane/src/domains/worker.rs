//! The domain worker: every `[domains] worker_interval_secs` it re-verifies served domains whose
//! period passed (a domain whose proof is gone is detached when the report comes back), orders
//! certificates that are due (retries after the backoff, renewals of certificates expiring
//! within `renew_before_secs`, orders lost with a node), and sets the domains gauge.
//!
//! *Design.* Each pass claims rows with one conditional `UPDATE … RETURNING` (`FOR UPDATE SKIP
//! LOCKED`) that also moves the row's next due time, so replicas running the same worker never
//! send the same job twice, and a pass that dies half-way leaves nothing stuck: a lost job is
//! sent again when its time comes (certificate orders after `store::ISSUE_TIMEOUT`). Idempotent;
//! a failed pass is logged and the next one starts over.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Domains, store};
use crate::db::{DbError, Pool};

/// Gauge of domains by status.
pub const DOMAINS_GAUGE: &str = "instapod_control_plane_domains";

/// At most this many jobs of each kind per pass.
const BATCH: i64 = 100;

pub async fn run(pool: Pool, domains: Arc<Domains>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!(worker = "domains", "worker started");
    loop {
        if let Err(err) = pass(&pool, &domains).await {
            tracing::warn!(worker = "domains", error = %err, "pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(domains.worker_interval) => {}
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(worker = "domains", "worker stopped");
}

/// One pass.
pub async fn pass(pool: &Pool, domains: &Domains) -> Result<(), DbError> {
    for (status, count) in store::count_by_status(pool).await? {
        metrics::gauge!(DOMAINS_GAUGE, "status" => status.as_str()).set(count as f64);
    }
    if domains.key.is_none() {
        return Ok(());
    }
    let reverify = store::claim_reverifications(pool, domains.reverify_interval, BATCH).await?;
    for target in &reverify {
        if !domains.send_verify("reverify", target).await {
            tracing::warn!(worker = "domains", domain_id = %target.domain_id, "re-verification not sent; next period");
        }
    }
    let issues = store::claim_issues(
        pool,
        store::IssueGate::Due {
            renew_before: domains.renew_before,
            limit: BATCH,
        },
    )
    .await?;
    domains.send_issues(pool, "renew_or_retry", &issues).await;
    if !reverify.is_empty() || !issues.is_empty() {
        tracing::info!(
            worker = "domains",
            reverifications = reverify.len(),
            certificate_orders = issues.len(),
            "domain jobs sent"
        );
    }
    Ok(())
}
