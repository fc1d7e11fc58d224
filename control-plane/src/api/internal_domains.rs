//! The internal API of custom domains for node agents (node token, like the rest of
//! `/internal/nodes/{id}/…`; bodies are the wire types of `instapod_common::domains`):
//!
//! - `POST {id}/domains/{domain_id}/verification` [`VerificationReport`] → 204.
//! - `PUT {id}/domains/{domain_id}/certificate` [`IssuedCertificate`] → 204; 400
//!   `invalid_certificate` when the chain does not parse, the key does not match the leaf, the
//!   leaf does not cover the host name or has expired (nothing stored; a pod event says why).
//! - `POST {id}/domains/{domain_id}/certificate-failure` [`IssueFailure`] → 204.
//! - `GET {id}/acme-account` → [`AcmeAccount`] (credentials null while none is stored);
//!   `PUT` with credentials → the stored account (the first writer wins).
//! - `GET {id}/domains[?wait=<s>]` with `If-None-Match` → [`ServedDomains`] / 304: the long
//!   poll of the served domains, shaped like `/internal/nodes/{id}/routes`.
//!
//! A report about a domain that no longer exists answers 404 `domain_not_found` (the agent
//! acknowledges its job and drops it). Any node of the fleet may report: the job went to one,
//! and a node token is the fleet's trust. While domains are not configured these answer 503
//! `domains_not_configured`, except the feed, which is empty.

use instapod_common::domains::{AcmeAccount, IssueFailure, IssuedCertificate, ServedDomains, VerificationReport};
use salvo::http::{HeaderValue, StatusCode};
use salvo::prelude::*;
use uuid::Uuid;

use crate::api::internal::{authenticate_node, if_none_match};
use crate::api::responses::NoContent;
use crate::domains::store::{self, AcmeAccountError, StoreCertificateError, VerificationOutcome};
use crate::domains::{Domains, certificates, crypto::KeyEncryptionKey, feed};
use crate::error::ApiError;
use crate::http::json::{self, MAX_NODE_JSON_BODY};
use crate::http::state::app;

/// The most record checks a report may carry.
const MAX_CHECKS: usize = 64;

fn not_configured() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "domains_not_configured",
        "custom domains are not configured on this platform ([domains] key_encryption_key)",
    )
}

fn domain_not_found(id: Uuid) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "domain_not_found", format!("no domain {id}"))
}

/// The domains and their key, or 503.
fn configured(depot: &Depot) -> Result<(std::sync::Arc<Domains>, std::sync::Arc<KeyEncryptionKey>), ApiError> {
    let domains = app(depot).domains.clone();
    let key = domains.key.clone().ok_or_else(not_configured)?;
    Ok((domains, key))
}

fn domain_id(req: &Request) -> Result<Uuid, ApiError> {
    let raw = req.param::<String>("domain_id").unwrap_or_default();
    Uuid::parse_str(&raw)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "domain_not_found", format!("no domain {raw:?}")))
}

/// `POST /internal/nodes/{id}/domains/{domain_id}/verification`.
#[handler]
pub async fn verification(req: &mut Request, depot: &mut Depot) -> Result<NoContent, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let (domains, _) = configured(depot)?;
    let domain_id = domain_id(req)?;
    let report: VerificationReport = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    if report.checks.len() > MAX_CHECKS {
        return Err(ApiError::validation(format!(
            "a report carries at most {MAX_CHECKS} record checks"
        )));
    }
    let state = app(depot);
    let outcome = store::record_verification(&state.db, domain_id, &report, domains.reverify_interval).await?;
    tracing::info!(node_id = %node.id, domain_id = %domain_id, outcome = ?outcome, "domain verification reported");
    crate::observability::domain_report("verification", outcome_label(&outcome));
    match outcome {
        VerificationOutcome::NotFound => return Err(domain_not_found(domain_id)),
        VerificationOutcome::Verified { issue_now: true } => {
            domains.issue_now(&state.db, domain_id).await?;
        }
        VerificationOutcome::Verified { issue_now: false }
        | VerificationOutcome::Failed
        | VerificationOutcome::Inconclusive => {}
    }
    domains.feed.invalidate().await;
    Ok(NoContent)
}

fn outcome_label(outcome: &VerificationOutcome) -> &'static str {
    match outcome {
        VerificationOutcome::NotFound => "not_found",
        VerificationOutcome::Verified { .. } => "verified",
        VerificationOutcome::Failed => "failed",
        VerificationOutcome::Inconclusive => "inconclusive",
    }
}

/// `PUT /internal/nodes/{id}/domains/{domain_id}/certificate`.
#[handler]
pub async fn certificate(req: &mut Request, depot: &mut Depot) -> Result<NoContent, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let (domains, key) = configured(depot)?;
    let domain_id = domain_id(req)?;
    let issued: IssuedCertificate = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    let state = app(depot);
    let Some((pod_id, hostname)) = store::hostname(&state.db, domain_id).await? else {
        crate::observability::domain_report("certificate", "not_found");
        return Err(domain_not_found(domain_id));
    };
    let checked = match certificates::check(&issued, &hostname, time::OffsetDateTime::now_utc()) {
        Ok(checked) => checked,
        Err(err) => {
            tracing::warn!(node_id = %node.id, domain_id = %domain_id, error = %err, "certificate refused");
            crate::observability::domain_report("certificate", "invalid");
            store::domain_event(&state.db, pod_id, &format!("certificate for {hostname} refused: {err}")).await?;
            return Err(ApiError::bad_request(
                "invalid_certificate",
                format!("certificate for {hostname} refused: {err}"),
            ));
        }
    };
    match store::store_certificate(&state.db, &key, domain_id, &issued.chain_pem, &issued.key_pem, &checked).await {
        Ok(()) => {}
        Err(StoreCertificateError::NotFound(_)) => return Err(domain_not_found(domain_id)),
        Err(StoreCertificateError::Seal(err)) => {
            tracing::error!(domain_id = %domain_id, error = %err, "cannot seal a certificate key");
            return Err(ApiError::internal());
        }
        Err(StoreCertificateError::Db(err)) => return Err(err.into()),
    }
    crate::observability::domain_report("certificate", "stored");
    tracing::info!(node_id = %node.id, domain_id = %domain_id, hostname = %hostname, not_after = %checked.not_after, "certificate stored");
    domains.feed.invalidate().await;
    Ok(NoContent)
}

/// `POST /internal/nodes/{id}/domains/{domain_id}/certificate-failure`.
#[handler]
pub async fn certificate_failure(req: &mut Request, depot: &mut Depot) -> Result<NoContent, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let (domains, _) = configured(depot)?;
    let domain_id = domain_id(req)?;
    let failure: IssueFailure = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    let state = app(depot);
    let found =
        store::record_issue_failure(&state.db, domain_id, &failure, domains.retry_min, domains.retry_max).await?;
    if !found {
        crate::observability::domain_report("certificate_failure", "not_found");
        return Err(domain_not_found(domain_id));
    }
    crate::observability::domain_report(
        "certificate_failure",
        if failure.rate_limited { "rate_limited" } else { "failed" },
    );
    tracing::warn!(node_id = %node.id, domain_id = %domain_id, rate_limited = failure.rate_limited, "certificate order failed");
    Ok(NoContent)
}

fn account_error(err: AcmeAccountError) -> ApiError {
    match err {
        AcmeAccountError::Db(err) => err.into(),
        other => {
            tracing::error!(error = %other, "the ACME account cannot be read or stored");
            ApiError::internal()
        }
    }
}

/// `GET /internal/nodes/{id}/acme-account`.
#[handler]
pub async fn acme_account(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<Json<AcmeAccount>, ApiError> {
    authenticate_node(req, depot).await?;
    let (domains, key) = configured(depot)?;
    let credentials = store::acme_account(&app(depot).db, &key, &domains.acme_directory_url)
        .await
        .map_err(account_error)?;
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(Json(AcmeAccount {
        directory_url: domains.acme_directory_url.clone(),
        contact: domains.acme_contact.clone(),
        credentials,
    }))
}

/// `PUT /internal/nodes/{id}/acme-account`: stores the credentials unless some are stored;
/// answers the stored account.
#[handler]
pub async fn put_acme_account(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<Json<AcmeAccount>, ApiError> {
    let node = authenticate_node(req, depot).await?;
    let (domains, key) = configured(depot)?;
    let body: AcmeAccount = json::read_with_limit(req, MAX_NODE_JSON_BODY).await?;
    let Some(credentials) = body.credentials.filter(|c| c.is_object()) else {
        return Err(ApiError::validation("credentials must be a JSON object"));
    };
    if body.directory_url != domains.acme_directory_url {
        return Err(ApiError::validation(format!(
            "the platform's ACME directory is {}, not {}",
            domains.acme_directory_url, body.directory_url
        )));
    }
    let stored = store::put_acme_account(&app(depot).db, &key, &domains.acme_directory_url, &credentials)
        .await
        .map_err(account_error)?;
    tracing::info!(node_id = %node.id, kept_new = (stored == credentials), "ACME account stored or reused");
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(Json(AcmeAccount {
        directory_url: domains.acme_directory_url.clone(),
        contact: domains.acme_contact.clone(),
        credentials: Some(stored),
    }))
}

/// `GET /internal/nodes/{id}/domains[?wait=<seconds>]`: the served domains with
/// `ETag: "<version>"`; 304 when `If-None-Match` names the current version, after waiting up to
/// `wait` seconds (at most 25) for a change when asked to.
#[handler]
pub async fn served(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    authenticate_node(req, depot).await?;
    let state = app(depot);
    let domains = state.domains.clone();
    let known = if_none_match(req);
    let wait = req
        .query::<u64>("wait")
        .map_or(std::time::Duration::ZERO, std::time::Duration::from_secs)
        .min(feed::MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let snapshot = if domains.key.is_none() {
        std::sync::Arc::new(ServedDomains {
            version: "disabled".to_string(),
            domains: Vec::new(),
        })
    } else {
        loop {
            let snapshot = domains.feed.snapshot(&state.db).await?;
            let now = tokio::time::Instant::now();
            if known.as_deref() != Some(snapshot.version.as_str()) || now >= deadline {
                break snapshot;
            }
            tokio::time::sleep(feed::REFRESH.min(deadline - now)).await;
        }
    };
    let etag = HeaderValue::from_str(&format!("\"{}\"", snapshot.version)).map_err(|_| ApiError::internal())?;
    res.headers_mut().insert("etag", etag);
    // The answer carries private keys: no cache may keep it.
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    if known.as_deref() == Some(snapshot.version.as_str()) {
        res.status_code(StatusCode::NOT_MODIFIED);
    } else {
        res.render(Json(&*snapshot));
    }
    Ok(())
}
