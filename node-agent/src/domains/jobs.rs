//! The consumer of this node's domain queue (`domains:<node_id>`, apalis on Redis, like the
//! pod jobs in `crate::jobs`): DNS verification and certificate orders, each reported to the
//! control plane.
//!
//! *Invariants.* Jobs are at-least-once and idempotent on the control plane's side (a report
//! for a domain that no longer exists answers 404: the job is acknowledged and dropped). An
//! outcome the user or the CA must fix (records wrong, challenge failed, rate limited) is a
//! report, not a job error; only failing to reach the control plane is retried here (with
//! backoff). A certificate that was issued but could not be reported is retried by ordering
//! again (the CA's duplicate-certificate limits are generous for this rare case).
//!
//! *Metrics.* `instapod_node_agent_domain_jobs_total{operation,outcome}` with `operation`
//! `verify` or `issue_certificate` and `outcome` one of `verified`, `not_verified`, `issued`,
//! `failed`, `rate_limited`, `gone`, `error`;
//! `instapod_node_agent_domain_job_duration_seconds{operation}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::layers::retry::HasherRng;
use apalis::layers::retry::backoff::{ExponentialBackoffMaker, MakeBackoff};
use apalis::prelude::*;
use apalis_redis::RedisStorage;
use instapod_common::domains::{DomainJob, domains_queue};
use instapod_common::queue::{POLL_INTERVAL, PollEvery};
use uuid::Uuid;

use super::acme::AcmeIssuer;
use super::dns::{self, HickoryLookup};
use crate::fleet::{Fleet, FleetError};

/// Attempts after the first while the control plane cannot be reached.
const RETRIES: usize = 5;
/// Orders or checks at once on this node.
const CONCURRENCY: usize = 2;

/// What the handler needs.
#[derive(Debug, Clone)]
pub struct DomainWorker {
    pub fleet: Arc<Fleet>,
    pub dns: HickoryLookup,
    pub issuer: Arc<AcmeIssuer>,
}

/// A report the control plane answered 404 to: the domain is gone.
fn is_gone(err: &FleetError) -> bool {
    matches!(err, FleetError::Refused { status: 404, .. })
}

impl DomainWorker {
    /// Runs one job: `Ok(outcome)` when it is done (reported, or dropped because the domain is
    /// gone), `Err` when it should be retried.
    pub async fn run_job(&self, job: &DomainJob) -> Result<&'static str, FleetError> {
        match job {
            DomainJob::Verify {
                domain_id,
                hostname,
                expected,
                ..
            } => {
                let report = dns::check(&self.dns, hostname, expected).await;
                let outcome = if report.verified { "verified" } else { "not_verified" };
                tracing::info!(%domain_id, hostname, verified = report.verified, result = %dns::summary(&report), "domain records checked");
                let path = format!("domains/{domain_id}/verification");
                self.report(&path, &report, "the verification report").await?;
                Ok(outcome)
            }
            DomainJob::IssueCertificate {
                domain_id, hostname, ..
            } => match self.issuer.issue(self.fleet.as_ref(), hostname).await {
                Ok(certificate) => {
                    tracing::info!(%domain_id, hostname, not_after = certificate.not_after, "certificate issued");
                    let path = format!("domains/{domain_id}/certificate");
                    self.send(reqwest::Method::PUT, &path, &certificate, "the certificate")
                        .await?;
                    Ok("issued")
                }
                Err(err) if err.is_transient() => {
                    tracing::warn!(%domain_id, hostname, error = %err, "cannot order a certificate now");
                    match err {
                        super::acme::IssueError::Account(err) => Err(err),
                        _ => Ok("error"),
                    }
                }
                Err(err) => {
                    let failure = self.issuer.failure(&err);
                    tracing::warn!(%domain_id, hostname, error = %err, rate_limited = failure.rate_limited, "certificate order failed");
                    let path = format!("domains/{domain_id}/certificate-failure");
                    self.report(&path, &failure, "the certificate failure").await?;
                    Ok(if failure.rate_limited { "rate_limited" } else { "failed" })
                }
            },
        }
    }

    async fn report<T: serde::Serialize>(&self, path: &str, body: &T, what: &'static str) -> Result<(), FleetError> {
        self.send(reqwest::Method::POST, path, body, what).await
    }

    async fn send<T: serde::Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &T,
        what: &'static str,
    ) -> Result<(), FleetError> {
        self.fleet
            .send_as_node(method, path, Some(body), what)
            .await
            .map(|_| ())
    }
}

async fn handle(job: DomainJob, worker: Data<DomainWorker>) -> Result<(), BoxDynError> {
    let started = Instant::now();
    let operation = job.operation();
    let result = worker.run_job(&job).await;
    let outcome = match &result {
        Ok(outcome) => *outcome,
        Err(err) if is_gone(err) => "gone",
        Err(_) => "error",
    };
    metrics::counter!("instapod_node_agent_domain_jobs_total", "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("instapod_node_agent_domain_job_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(_) => Ok(()),
        Err(err) if is_gone(&err) => {
            tracing::info!(domain_id = %job.domain_id(), operation, "the domain no longer exists; job dropped");
            Ok(())
        }
        Err(err) if err.is_rejected() => {
            tracing::warn!(domain_id = %job.domain_id(), operation, error = %err, "the control plane refused the report; job dropped");
            Ok(())
        }
        Err(err) => {
            tracing::warn!(domain_id = %job.domain_id(), operation, error = %err, "domain job failed; retrying with backoff");
            Err(Box::new(err))
        }
    }
}

/// Consumes `domains:<node_id>` until the worker stops (Redis gone: returns the error).
pub async fn run(redis_url: &str, node_id: Uuid, worker: DomainWorker) -> Result<(), BoxDynError> {
    let conn = apalis_redis::connect(redis_url).await?;
    let storage = RedisStorage::<DomainJob>::new(conn)
        .with_config(instapod_common::queue::config(domains_queue(node_id)))
        .poll_with_strategy(PollEvery::new(POLL_INTERVAL));
    let backoff = ExponentialBackoffMaker::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        0.5,
        HasherRng::default(),
    )?
    .make_backoff();
    let worker = WorkerBuilder::new(format!("node-agent-domains-{node_id}-{}", Uuid::new_v4().simple()))
        .backend(storage)
        .retry(RetryPolicy::retries(RETRIES).with_backoff(backoff))
        .concurrency(CONCURRENCY)
        .data(worker)
        .build(handle);
    worker.run().await?;
    Ok(())
}
