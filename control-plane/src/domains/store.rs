//! Domains in Postgres: claims scoped by team and pod, the status changes the agents' reports
//! cause (each with its pod event), the certificates and the ACME account (sealed), and the
//! workers' claims of due re-verifications and certificate orders.
//!
//! *Invariants.* Every user-facing read and write names the team in SQL (another team's pod
//! or domain is a 404). A report locks its domain's row and changes it in one transaction with
//! its event. A certificate order is only ever claimed for a domain in a served status of a
//! pod not being deleted ([`IssueGate`]); the claim moves `next_issue_at` forward in the same
//! statement, so two replicas never order twice for one due row. Time comes from Postgres's
//! clock.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use instapod_common::domains::{IssueFailure, RecordCheck, VerificationReport};
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::DomainStatus;
use super::certificates::CheckedCertificate;
use super::crypto::{self, KeyEncryptionKey, OpenError, SealError};
use crate::db::{self, DbError, Pool};
use crate::pods::store::event;

/// The pod event kind of every domain event.
pub const EVENT_KIND: &str = "domain";

/// How long a claimed certificate order may take before the worker orders again.
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The longest a CA's `Retry-After` is followed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// The longest agent-supplied text kept in a message.
const MAX_AGENT_TEXT: usize = 300;

/// A domain with what the API shows.
#[derive(Debug, Clone)]
pub struct DomainRow {
    pub id: Uuid,
    pub pod_id: Uuid,
    pub hostname: String,
    pub txt_value: String,
    pub status: DomainStatus,
    pub status_message: Option<String>,
    pub checks: Option<serde_json::Value>,
    pub verified_at: Option<OffsetDateTime>,
    pub last_checked_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    /// The pod's platform host name (the CNAME target).
    pub platform_host: Option<String>,
    /// The newest certificate stored.
    pub certificate: Option<CertificateSummary>,
}

/// A stored certificate, without its key.
#[derive(Debug, Clone)]
pub struct CertificateSummary {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub issuer: Option<String>,
}

const SELECT: &str = "SELECT d.id, d.pod_id, d.hostname, d.txt_value, d.status, d.status_message, d.checks,
        d.verified_at, d.last_checked_at, d.created_at, p.hostnames[1],
        c.not_before, c.not_after, c.issuer
    FROM domains d JOIN pods p ON p.id = d.pod_id
    LEFT JOIN LATERAL (SELECT not_before, not_after, issuer FROM domain_certificates
                       WHERE domain_id = d.id ORDER BY id DESC LIMIT 1) c ON true";

fn row_to_domain(row: &tokio_postgres::Row) -> DomainRow {
    let not_before: Option<OffsetDateTime> = row.get(11);
    let not_after: Option<OffsetDateTime> = row.get(12);
    DomainRow {
        id: row.get(0),
        pod_id: row.get(1),
        hostname: row.get(2),
        txt_value: row.get(3),
        status: DomainStatus::parse(row.get(4)),
        status_message: row.get(5),
        checks: row.get(6),
        verified_at: row.get(7),
        last_checked_at: row.get(8),
        created_at: row.get(9),
        platform_host: row.get(10),
        certificate: match (not_before, not_after) {
            (Some(not_before), Some(not_after)) => Some(CertificateSummary {
                not_before,
                not_after,
                issuer: row.get(13),
            }),
            _ => None,
        },
    }
}

/// The team's pod `pod_name` (not being deleted): its id.
async fn pod_id(client: &impl GenericClient, team_id: Uuid, pod_name: &str) -> Result<Option<Uuid>, DbError> {
    Ok(client
        .query_opt(
            "SELECT id FROM pods WHERE team_id = $1 AND name = $2 AND desired_state <> 'deleted'",
            &[&team_id, &pod_name],
        )
        .await?
        .map(|row| row.get(0)))
}

/// The pod's domains by host name; `None` when the team has no such pod.
pub async fn list(pool: &Pool, team_id: Uuid, pod_name: &str) -> Result<Option<Vec<DomainRow>>, DbError> {
    let client = db::connect(pool).await?;
    let Some(pod) = pod_id(&client, team_id, pod_name).await? else {
        return Ok(None);
    };
    let rows = client
        .query(&format!("{SELECT} WHERE d.pod_id = $1 ORDER BY d.hostname"), &[&pod])
        .await?;
    Ok(Some(rows.iter().map(row_to_domain).collect()))
}

/// One of the pod's domains; `None` when the team has no such pod or the pod no such domain.
pub async fn get(pool: &Pool, team_id: Uuid, pod_name: &str, domain_id: Uuid) -> Result<Option<DomainRow>, DbError> {
    let client = db::connect(pool).await?;
    let Some(pod) = pod_id(&client, team_id, pod_name).await? else {
        return Ok(None);
    };
    let row = client
        .query_opt(
            &format!("{SELECT} WHERE d.pod_id = $1 AND d.id = $2"),
            &[&pod, &domain_id],
        )
        .await?;
    Ok(row.as_ref().map(row_to_domain))
}

#[derive(Debug, thiserror::Error)]
pub enum AddDomainError {
    #[error("no pod named {0:?} in your active team")]
    PodNotFound(String),
    #[error("{0} is already claimed")]
    Taken(String),
    #[error("a pod has at most {0} custom domains")]
    TooMany(i64),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for AddDomainError {
    fn from(err: tokio_postgres::Error) -> Self {
        AddDomainError::Db(err.into())
    }
}

/// Claims `hostname` (normalised) for the team's pod, with its TXT value, when the pod has
/// fewer than `max_per_pod` domains; an event on the pod.
pub async fn add(
    pool: &Pool,
    team_id: Uuid,
    pod_name: &str,
    hostname: &str,
    txt_value: &str,
    max_per_pod: i64,
) -> Result<DomainRow, AddDomainError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    // The pod's row lock serialises concurrent adds to one pod (the count below).
    let pod: Uuid = tx
        .query_opt(
            "SELECT id FROM pods WHERE team_id = $1 AND name = $2 AND desired_state <> 'deleted' FOR UPDATE",
            &[&team_id, &pod_name],
        )
        .await?
        .map(|row| row.get(0))
        .ok_or_else(|| AddDomainError::PodNotFound(pod_name.to_string()))?;
    let existing: i64 = tx
        .query_one("SELECT count(*) FROM domains WHERE pod_id = $1", &[&pod])
        .await?
        .get(0);
    if existing >= max_per_pod {
        return Err(AddDomainError::TooMany(max_per_pod));
    }
    let inserted = tx
        .query_one(
            "INSERT INTO domains (pod_id, team_id, hostname, txt_value) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&pod, &team_id, &hostname, &txt_value],
        )
        .await;
    let id: Uuid = match inserted {
        Ok(row) => row.get(0),
        Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(AddDomainError::Taken(hostname.to_string()));
        }
        Err(err) => return Err(err.into()),
    };
    event(
        &tx,
        pod,
        EVENT_KIND,
        None,
        &format!("domain {hostname} added: create its DNS records, then verify"),
    )
    .await?;
    let row = tx.query_one(&format!("{SELECT} WHERE d.id = $1"), &[&id]).await?;
    tx.commit().await?;
    Ok(row_to_domain(&row))
}

/// Removes one of the team's pod's domains (and its certificates); false when not found.
pub async fn delete(pool: &Pool, team_id: Uuid, pod_name: &str, domain_id: Uuid) -> Result<bool, DbError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let Some(pod) = pod_id(&tx, team_id, pod_name).await? else {
        return Ok(false);
    };
    let Some(row) = tx
        .query_opt(
            "DELETE FROM domains WHERE id = $1 AND pod_id = $2 RETURNING hostname",
            &[&domain_id, &pod],
        )
        .await?
    else {
        return Ok(false);
    };
    let hostname: String = row.get(0);
    event(&tx, pod, EVENT_KIND, None, &format!("domain {hostname} removed")).await?;
    tx.commit().await?;
    Ok(true)
}

/// Removes every domain of a pod being deleted (inside the delete's transaction).
pub async fn delete_all_of_pod(client: &impl GenericClient, pod_id: Uuid) -> Result<u64, tokio_postgres::Error> {
    client
        .execute("DELETE FROM domains WHERE pod_id = $1", &[&pod_id])
        .await
}

/// What a job about one domain needs.
#[derive(Debug, Clone)]
pub struct JobTarget {
    pub domain_id: Uuid,
    pub pod_id: Uuid,
    pub hostname: String,
    pub txt_value: String,
    pub platform_host: Option<String>,
    /// The node to send the job to: the pod's when healthy, else any healthy node.
    pub node_id: Option<Uuid>,
}

/// The healthy node to run a domain's job: the pod's own when healthy, else any healthy one.
async fn pick_node(client: &impl GenericClient, pod_node: Option<Uuid>) -> Result<Option<Uuid>, DbError> {
    Ok(client
        .query_opt(
            "SELECT id FROM nodes WHERE status = 'healthy'
             ORDER BY (id IS NOT DISTINCT FROM $1) DESC, random() LIMIT 1",
            &[&pod_node],
        )
        .await?
        .map(|row| row.get(0)))
}

/// The job target of the team's pod's domain (for a user's verification).
pub async fn verify_target(
    pool: &Pool,
    team_id: Uuid,
    pod_name: &str,
    domain_id: Uuid,
) -> Result<Option<JobTarget>, DbError> {
    let client = db::connect(pool).await?;
    let row = client
        .query_opt(
            "SELECT d.id, d.pod_id, d.hostname, d.txt_value, p.hostnames[1], p.node_id
             FROM domains d JOIN pods p ON p.id = d.pod_id
             WHERE d.id = $1 AND p.team_id = $2 AND p.name = $3 AND p.desired_state <> 'deleted'",
            &[&domain_id, &team_id, &pod_name],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let node_id = pick_node(&client, row.get(5)).await?;
    Ok(Some(JobTarget {
        domain_id: row.get(0),
        pod_id: row.get(1),
        hostname: row.get(2),
        txt_value: row.get(3),
        platform_host: row.get(4),
        node_id,
    }))
}

/// Writes a pod event about a domain (outside any other change).
pub async fn domain_event(pool: &Pool, pod_id: Uuid, message: &str) -> Result<(), DbError> {
    let client = db::connect(pool).await?;
    event(&client, pod_id, EVENT_KIND, None, message).await?;
    Ok(())
}

/// What a verification report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerificationOutcome {
    /// The domain no longer exists (or its pod is being deleted).
    NotFound,
    /// Verified; `issue_now` when a certificate order is due at once.
    Verified { issue_now: bool },
    /// Not verified: the domain is `failed` (or was detached).
    Failed,
    /// A served domain whose records could not be read: nothing changes but the message.
    Inconclusive,
}

/// A sanitised, bounded piece of agent text for a message.
fn agent_text(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_AGENT_TEXT)
        .collect();
    if text.chars().count() > MAX_AGENT_TEXT {
        format!("{cleaned}…")
    } else {
        cleaned
    }
}

fn list_text(values: &[String]) -> String {
    let shown: Vec<String> = values.iter().take(8).map(|v| format!("{:?}", agent_text(v))).collect();
    let more = values.len().saturating_sub(8);
    if more > 0 {
        format!("[{} and {more} more]", shown.join(", "))
    } else {
        format!("[{}]", shown.join(", "))
    }
}

/// The checks as stored: at most 16, each with at most 16 values of at most
/// [`MAX_AGENT_TEXT`] characters (what a resolver found is shown, not kept in bulk).
fn bounded_checks(checks: &[RecordCheck]) -> Vec<RecordCheck> {
    let values = |list: &[String]| list.iter().take(16).map(|v| agent_text(v)).collect::<Vec<_>>();
    checks
        .iter()
        .take(16)
        .map(|c| RecordCheck {
            record_type: agent_text(&c.record_type),
            name: agent_text(&c.name),
            expected: values(&c.expected),
            found: values(&c.found),
            ok: c.ok,
            error: c.error.as_deref().map(agent_text),
        })
        .collect()
}

/// What went wrong in a failed verification, naming what was found.
pub fn failure_summary(checks: &[RecordCheck]) -> String {
    let problems: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .take(6)
        .map(|c| {
            let what = format!("{} {}", agent_text(&c.record_type), agent_text(&c.name));
            match &c.error {
                Some(error) => format!("{what}: the lookup failed ({})", agent_text(error)),
                None if c.found.is_empty() => format!("{what}: expected {}, found nothing", list_text(&c.expected)),
                None => format!(
                    "{what}: expected {}, found {}",
                    list_text(&c.expected),
                    list_text(&c.found)
                ),
            }
        })
        .collect();
    if problems.is_empty() {
        "the records do not match".to_string()
    } else {
        problems.join("; ")
    }
}

/// Stores a verification report for `domain_id` and moves its status (see the module
/// documentation of `domains`); `reverify_after` is the re-verification period.
pub async fn record_verification(
    pool: &Pool,
    domain_id: Uuid,
    report: &VerificationReport,
    reverify_after: Duration,
) -> Result<VerificationOutcome, DbError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT d.pod_id, d.hostname, d.status,
                    EXISTS (SELECT 1 FROM domain_certificates c WHERE c.domain_id = d.id AND c.not_after > now()),
                    d.status_message
             FROM domains d JOIN pods p ON p.id = d.pod_id
             WHERE d.id = $1 AND p.desired_state <> 'deleted' FOR UPDATE OF d",
            &[&domain_id],
        )
        .await?
    else {
        return Ok(VerificationOutcome::NotFound);
    };
    let (pod_id, hostname, status, has_certificate, old_message): (Uuid, String, String, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let status = DomainStatus::parse(&status);
    let checks = serde_json::to_value(bounded_checks(&report.checks)).unwrap_or(serde_json::Value::Null);
    let reverify_secs = reverify_after.as_secs_f64();
    // A failure is definite when every lookup answered (no resolver error): the records are
    // wrong or gone, not merely unreadable.
    let definite = report.checks.iter().all(|c| c.error.is_none());
    let outcome = if report.verified {
        let (new_status, issue_now) = match status {
            // A certificate that still works is served again at once.
            _ if has_certificate => (DomainStatus::Active, false),
            DomainStatus::IssuingCertificate => (DomainStatus::IssuingCertificate, false),
            _ => (DomainStatus::Verified, true),
        };
        tx.execute(
            "UPDATE domains SET status = $2, status_message = NULL, checks = $3, verified_at = now(),
                    last_checked_at = now(), reverify_at = now() + make_interval(secs => $4),
                    issue_failures = CASE WHEN $5 THEN 0 ELSE issue_failures END,
                    next_issue_at = CASE WHEN $5 THEN now() ELSE next_issue_at END,
                    updated_at = now()
             WHERE id = $1",
            &[&domain_id, &new_status.as_str(), &checks, &reverify_secs, &issue_now],
        )
        .await?;
        if status != new_status || !status.is_served() {
            event(&tx, pod_id, EVENT_KIND, None, &format!("domain {hostname} verified")).await?;
        }
        VerificationOutcome::Verified { issue_now }
    } else {
        let summary = failure_summary(&report.checks);
        if status.is_served() && !definite {
            tx.execute(
                "UPDATE domains SET status_message = $2, checks = $3, last_checked_at = now(), updated_at = now()
                 WHERE id = $1",
                &[
                    &domain_id,
                    &format!("the last re-verification could not read the records: {summary}"),
                    &checks,
                ],
            )
            .await?;
            event(
                &tx,
                pod_id,
                EVENT_KIND,
                None,
                &format!("domain {hostname}: re-verification inconclusive, still served: {summary}"),
            )
            .await?;
            VerificationOutcome::Inconclusive
        } else {
            let message = if status.is_served() {
                format!("detached: the DNS proof is gone: {summary}")
            } else {
                format!("verification failed: {summary}")
            };
            tx.execute(
                "UPDATE domains SET status = 'failed', status_message = $2, checks = $3, last_checked_at = now(),
                        reverify_at = NULL, next_issue_at = NULL, updated_at = now()
                 WHERE id = $1",
                &[&domain_id, &message, &checks],
            )
            .await?;
            // The same report twice (a job delivered again) is one event.
            if status != DomainStatus::Failed || old_message.as_deref() != Some(message.as_str()) {
                event(&tx, pod_id, EVENT_KIND, None, &format!("domain {hostname} {message}")).await?;
            }
            VerificationOutcome::Failed
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreCertificateError {
    #[error("no domain {0}")]
    NotFound(Uuid),
    #[error("cannot seal the key: {0}")]
    Seal(#[from] SealError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for StoreCertificateError {
    fn from(err: tokio_postgres::Error) -> Self {
        StoreCertificateError::Db(err.into())
    }
}

/// The domain's host name (for checking a certificate against it), when it exists.
pub async fn hostname(pool: &Pool, domain_id: Uuid) -> Result<Option<(Uuid, String)>, DbError> {
    let client = db::connect(pool).await?;
    Ok(client
        .query_opt("SELECT pod_id, hostname FROM domains WHERE id = $1", &[&domain_id])
        .await?
        .map(|row| (row.get(0), row.get(1))))
}

/// Stores a checked certificate with its key sealed; a served domain becomes `active`. Expired
/// certificates of the domain are deleted.
pub async fn store_certificate(
    pool: &Pool,
    key: &KeyEncryptionKey,
    domain_id: Uuid,
    chain_pem: &str,
    key_pem: &str,
    checked: &CheckedCertificate,
) -> Result<(), StoreCertificateError> {
    let sealed = key.seal(&crypto::domain_key_context(domain_id), key_pem.as_bytes())?;
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT pod_id, hostname, status FROM domains WHERE id = $1 FOR UPDATE",
            &[&domain_id],
        )
        .await?
    else {
        return Err(StoreCertificateError::NotFound(domain_id));
    };
    let (pod_id, hostname, status): (Uuid, String, String) = (row.get(0), row.get(1), row.get(2));
    let status = DomainStatus::parse(&status);
    // The same certificate twice (a report sent again) is stored once.
    if tx
        .query_opt(
            "SELECT 1 FROM domain_certificates WHERE domain_id = $1 AND chain_pem = $2",
            &[&domain_id, &chain_pem],
        )
        .await?
        .is_some()
    {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO domain_certificates (domain_id, chain_pem, key_encrypted, not_before, not_after, issuer)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &domain_id,
            &chain_pem,
            &sealed,
            &checked.not_before,
            &checked.not_after,
            &checked.issuer,
        ],
    )
    .await?;
    tx.execute(
        "DELETE FROM domain_certificates WHERE domain_id = $1 AND not_after <= now()",
        &[&domain_id],
    )
    .await?;
    let new_status = if status.is_served() {
        DomainStatus::Active
    } else {
        status
    };
    tx.execute(
        "UPDATE domains SET status = $2, status_message = CASE WHEN $3 THEN NULL ELSE status_message END,
                issue_failures = 0, next_issue_at = NULL, updated_at = now()
         WHERE id = $1",
        &[&domain_id, &new_status.as_str(), &status.is_served()],
    )
    .await?;
    let issuer = checked
        .issuer
        .as_deref()
        .map(|i| format!(" by {}", agent_text(i)))
        .unwrap_or_default();
    let until = checked
        .not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let served = if status.is_served() {
        ""
    } else {
        " (not served until the domain verifies again)"
    };
    event(
        &tx,
        pod_id,
        EVENT_KIND,
        None,
        &format!("certificate for {hostname} issued{issuer}, valid until {until}{served}"),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The backoff after `failures` failed orders in a row (`failures` ≥ 1).
pub fn backoff(failures: i32, min: Duration, max: Duration) -> Duration {
    let exponent = u32::try_from(failures.saturating_sub(1)).unwrap_or(0).min(30);
    min.saturating_mul(1u32 << exponent).min(max)
}

/// Records a failed certificate order: the status stays (an active domain keeps its working
/// certificate), the next order waits for the backoff (or the CA's `Retry-After`). False when
/// the domain does not exist.
pub async fn record_issue_failure(
    pool: &Pool,
    domain_id: Uuid,
    failure: &IssueFailure,
    retry_min: Duration,
    retry_max: Duration,
) -> Result<bool, DbError> {
    let mut client = db::connect(pool).await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT pod_id, hostname, status, issue_failures FROM domains WHERE id = $1 FOR UPDATE",
            &[&domain_id],
        )
        .await?
    else {
        return Ok(false);
    };
    let (pod_id, hostname, status, failures): (Uuid, String, String, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let status = DomainStatus::parse(&status);
    let failures = failures.saturating_add(1);
    let mut wait = backoff(failures, retry_min, retry_max);
    if failure.rate_limited || failure.retry_after_secs.is_some() {
        let asked = Duration::from_secs(failure.retry_after_secs.unwrap_or(0)).min(MAX_RETRY_AFTER);
        wait = wait.max(asked);
    }
    let reason = agent_text(&failure.message);
    let limited = if failure.rate_limited { " (rate limited)" } else { "" };
    let keeps = if status == DomainStatus::Active {
        "; the current certificate is still served"
    } else {
        ""
    };
    let message = format!(
        "certificate order failed{limited} (attempt {failures}): {reason}; next attempt in {} s{keeps}",
        wait.as_secs()
    );
    // A domain that is not served any more is not retried.
    let next = status.is_served().then_some(wait.as_secs_f64());
    tx.execute(
        "UPDATE domains SET issue_failures = $2, status_message = $3,
                next_issue_at = CASE WHEN $4::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $4) END,
                status = CASE WHEN status = 'verified' THEN 'issuing_certificate' ELSE status END,
                updated_at = now()
         WHERE id = $1",
        &[&domain_id, &failures, &message, &next],
    )
    .await?;
    event(&tx, pod_id, EVENT_KIND, None, &format!("domain {hostname}: {message}")).await?;
    tx.commit().await?;
    Ok(true)
}

/// Which certificate orders a claim takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueGate {
    /// Only this domain, when its order is due (after its verification).
    One(Uuid),
    /// Every due order: retries of `verified`/`issuing_certificate` domains and renewals of
    /// `active` ones whose certificate expires within `renew_before`.
    Due { renew_before: Duration, limit: i64 },
}

/// Claims due certificate orders: moves their `next_issue_at` to now + [`ISSUE_TIMEOUT`] (and
/// `verified` to `issuing_certificate`) and returns their targets. Only served statuses of
/// pods not being deleted are ever claimed.
pub async fn claim_issues(pool: &Pool, gate: IssueGate) -> Result<Vec<JobTarget>, DbError> {
    let client = db::connect(pool).await?;
    let timeout = ISSUE_TIMEOUT.as_secs_f64();
    let (only, renew_secs, limit): (Option<Uuid>, f64, i64) = match gate {
        IssueGate::One(id) => (Some(id), 0.0, 1),
        IssueGate::Due { renew_before, limit } => (None, renew_before.as_secs_f64(), limit),
    };
    let rows = client
        .query(
            "WITH due AS (
                SELECT d.id FROM domains d JOIN pods p ON p.id = d.pod_id
                WHERE p.desired_state <> 'deleted'
                  AND ($1::uuid IS NULL OR d.id = $1)
                  AND (
                    (d.status IN ('verified', 'issuing_certificate') AND d.next_issue_at <= now())
                    OR ($1::uuid IS NULL AND d.status = 'active'
                        AND (d.next_issue_at IS NULL OR d.next_issue_at <= now())
                        AND NOT EXISTS (SELECT 1 FROM domain_certificates c WHERE c.domain_id = d.id
                                        AND c.not_after > now() + make_interval(secs => $2)))
                  )
                ORDER BY d.next_issue_at NULLS FIRST LIMIT $3
                FOR UPDATE OF d SKIP LOCKED)
             UPDATE domains d SET next_issue_at = now() + make_interval(secs => $4),
                    status = CASE WHEN d.status = 'verified' THEN 'issuing_certificate' ELSE d.status END,
                    updated_at = now()
             FROM due, pods p WHERE d.id = due.id AND p.id = d.pod_id
             RETURNING d.id, d.pod_id, d.hostname, d.txt_value, p.hostnames[1], p.node_id",
            &[&only, &renew_secs, &limit, &timeout],
        )
        .await?;
    let mut targets = Vec::with_capacity(rows.len());
    for row in &rows {
        let node_id = pick_node(&client, row.get(5)).await?;
        targets.push(JobTarget {
            domain_id: row.get(0),
            pod_id: row.get(1),
            hostname: row.get(2),
            txt_value: row.get(3),
            platform_host: row.get(4),
            node_id,
        });
    }
    Ok(targets)
}

/// Moves a claimed order whose job could not be sent to a retry after `wait`.
pub async fn retry_issue_later(pool: &Pool, domain_id: Uuid, wait: Duration) -> Result<(), DbError> {
    let client = db::connect(pool).await?;
    client
        .execute(
            "UPDATE domains SET next_issue_at = now() + make_interval(secs => $2) WHERE id = $1",
            &[&domain_id, &wait.as_secs_f64()],
        )
        .await?;
    Ok(())
}

/// Claims due re-verifications (served domains whose `reverify_at` passed): moves their
/// `reverify_at` a period on and returns their targets.
pub async fn claim_reverifications(pool: &Pool, period: Duration, limit: i64) -> Result<Vec<JobTarget>, DbError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query(
            "WITH due AS (
                SELECT d.id FROM domains d JOIN pods p ON p.id = d.pod_id
                WHERE d.reverify_at <= now() AND p.desired_state <> 'deleted'
                  AND d.status IN ('verified', 'issuing_certificate', 'active')
                ORDER BY d.reverify_at LIMIT $2
                FOR UPDATE OF d SKIP LOCKED)
             UPDATE domains d SET reverify_at = now() + make_interval(secs => $1)
             FROM due, pods p WHERE d.id = due.id AND p.id = d.pod_id
             RETURNING d.id, d.pod_id, d.hostname, d.txt_value, p.hostnames[1], p.node_id",
            &[&period.as_secs_f64(), &limit],
        )
        .await?;
    let mut targets = Vec::with_capacity(rows.len());
    for row in &rows {
        let node_id = pick_node(&client, row.get(5)).await?;
        targets.push(JobTarget {
            domain_id: row.get(0),
            pod_id: row.get(1),
            hostname: row.get(2),
            txt_value: row.get(3),
            platform_host: row.get(4),
            node_id,
        });
    }
    Ok(targets)
}

/// Domains by status (for the gauge).
pub async fn count_by_status(pool: &Pool) -> Result<Vec<(DomainStatus, i64)>, DbError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query("SELECT status, count(*) FROM domains GROUP BY status", &[])
        .await?;
    let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(DomainStatus::ALL
        .iter()
        .map(|status| {
            let n = counts.iter().find(|(s, _)| s == status.as_str()).map_or(0, |(_, n)| *n);
            (*status, n)
        })
        .collect())
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeAccountError {
    #[error("cannot seal the credentials: {0}")]
    Seal(#[from] SealError),
    #[error("the stored credentials cannot be read: {0}")]
    Open(#[from] OpenError),
    #[error("the stored credentials are not JSON")]
    NotJson,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for AcmeAccountError {
    fn from(err: tokio_postgres::Error) -> Self {
        AcmeAccountError::Db(err.into())
    }
}

/// The stored credentials of the account at `directory_url`, when there is one.
pub async fn acme_account(
    pool: &Pool,
    key: &KeyEncryptionKey,
    directory_url: &str,
) -> Result<Option<serde_json::Value>, AcmeAccountError> {
    let client = db::connect(pool).await?;
    let Some(row) = client
        .query_opt(
            "SELECT credentials_encrypted FROM acme_accounts WHERE directory_url = $1",
            &[&directory_url],
        )
        .await?
    else {
        return Ok(None);
    };
    let sealed: Vec<u8> = row.get(0);
    let plain = key.open(&crypto::acme_account_context(directory_url), &sealed)?;
    serde_json::from_slice(&plain)
        .map(Some)
        .map_err(|_| AcmeAccountError::NotJson)
}

/// Stores `credentials` unless some credentials are stored already (the first writer wins);
/// returns the stored ones.
pub async fn put_acme_account(
    pool: &Pool,
    key: &KeyEncryptionKey,
    directory_url: &str,
    credentials: &serde_json::Value,
) -> Result<serde_json::Value, AcmeAccountError> {
    let plain = serde_json::to_vec(credentials).map_err(|_| AcmeAccountError::NotJson)?;
    let sealed = key.seal(&crypto::acme_account_context(directory_url), &plain)?;
    {
        let client = db::connect(pool).await?;
        client
            .execute(
                "INSERT INTO acme_accounts (directory_url, credentials_encrypted) VALUES ($1, $2)
                 ON CONFLICT (directory_url) DO NOTHING",
                &[&directory_url, &sealed],
            )
            .await?;
    }
    acme_account(pool, key, directory_url)
        .await?
        .ok_or(AcmeAccountError::NotJson)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_minimum_up_to_the_maximum() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(6 * 3600));
        let waits: Vec<u64> = (1..=10).map(|n| backoff(n, min, max).as_secs()).collect();
        assert_eq!(waits, vec![60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600]);
        assert_eq!(backoff(i32::MAX, min, max), max);
        assert_eq!(backoff(0, min, max), min);
    }

    fn check(record_type: &str, expected: &[&str], found: &[&str], error: Option<&str>) -> RecordCheck {
        RecordCheck {
            record_type: record_type.into(),
            name: "_instapod-challenge.shop.example.com".into(),
            expected: expected.iter().map(|s| s.to_string()).collect(),
            found: found.iter().map(|s| s.to_string()).collect(),
            ok: false,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn failures_name_what_was_found() {
        let summary = failure_summary(&[check("TXT", &["instapod-verify=good"], &["wrong\u{7}"], None)]);
        assert_eq!(
            summary,
            r#"TXT _instapod-challenge.shop.example.com: expected ["instapod-verify=good"], found ["wrong "]"#
        );
        assert!(failure_summary(&[check("TXT", &["x"], &[], None)]).contains("found nothing"));
        assert!(
            failure_summary(&[check("TXT", &["x"], &[], Some("timed out"))]).contains("the lookup failed (timed out)")
        );
        let long = "y".repeat(5000);
        assert!(failure_summary(&[check("TXT", &["x"], &[&long], None)]).len() < 1000);
    }
}
