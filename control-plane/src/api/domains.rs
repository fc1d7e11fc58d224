//! The four custom-domain endpoints of a pod. The pod is addressed by name within the caller's
//! active team and the domain by id; another team's pod or domain is a 404.
//!
//! - `GET /api/pods/{name}/domains` → `{"domains": [domain…]}` by host name.
//! - `POST /api/pods/{name}/domains` `{"hostname": "shop.example.com"}` → 201 with the domain
//!   (status `pending_dns`) and the DNS records to create. 400 `invalid_hostname` (IP
//!   addresses, wildcards, single labels, bad labels or lengths), 400 `hostname_reserved` (the
//!   platform's own names), 400 `apex_domain_unsupported` (an apex while no ingress addresses
//!   are configured), 409 `domain_taken` (claimed by any team, whatever its case or trailing
//!   dot), 409 `too_many_domains` past [`MAX_DOMAINS_PER_POD`].
//! - `DELETE /api/pods/{name}/domains/{id}` → 204; every ingress stops serving it (route and
//!   certificate) at its next long poll, which this wakes.
//! - `POST /api/pods/{name}/domains/{id}/verify` → 202 with the domain: a job on a node (the
//!   pod's, else any healthy one) resolves the records; the outcome shows in `status`,
//!   `status_message` and `checks`, and as a pod event. 503 `no_node_available` when no node
//!   is healthy.
//!
//! While `[domains] key_encryption_key` is not configured every endpoint answers 503
//! `domains_not_configured`.

use salvo::http::StatusCode;
use salvo::oapi::ToSchema;
use salvo::oapi::extract::PathParam;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::responses::{Accepted, Created, NoContent};
use crate::domains::records::{self, DnsRecord};
use crate::domains::store::{self, AddDomainError, DomainRow, JobTarget};
use crate::domains::{Domains, normalise};
use crate::error::ApiError;
use crate::http::auth::caller;
use crate::http::json;
use crate::http::state::app;

/// The most custom domains one pod may have.
pub const MAX_DOMAINS_PER_POD: i64 = 50;

/// A domain's certificate (the newest stored).
#[derive(Debug, Serialize, ToSchema)]
pub struct CertificateView {
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// The issuer's common name.
    pub issuer: Option<String>,
}

/// A custom domain of a pod.
#[derive(Debug, Serialize, ToSchema)]
pub struct DomainView {
    pub id: Uuid,
    /// Normalised: lowercase, punycode for international names, no trailing dot.
    pub hostname: String,
    /// `pending_dns`, `verified`, `issuing_certificate`, `active` or `failed`.
    pub status: String,
    /// Why the domain is in its status (what a failed verification found, a certificate
    /// order's failure and its next attempt, why it was detached).
    pub status_message: Option<String>,
    /// The DNS records to create.
    pub records: Vec<DnsRecord>,
    /// The last verification's record checks (`record_type`, `name`, `expected`, `found`,
    /// `ok`, `error`), or null before the first.
    pub checks: Option<serde_json::Value>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub verified_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_checked_at: Option<OffsetDateTime>,
    pub certificate: Option<CertificateView>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A pod's custom domains.
#[derive(Debug, Serialize, ToSchema)]
pub struct DomainList {
    pub domains: Vec<DomainView>,
}

/// The domain to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDomainRequest {
    /// A host name such as `shop.example.com` (international names allowed).
    pub hostname: String,
}

fn view(domains: &Domains, row: DomainRow) -> DomainView {
    let target = JobTarget {
        domain_id: row.id,
        pod_id: row.pod_id,
        hostname: row.hostname.clone(),
        txt_value: row.txt_value.clone(),
        platform_host: row.platform_host.clone(),
        node_id: None,
    };
    DomainView {
        records: records::records(&domains.expectation(&target), &row.hostname),
        id: row.id,
        hostname: row.hostname,
        status: row.status.as_str().to_string(),
        status_message: row.status_message,
        checks: row.checks,
        verified_at: row.verified_at,
        last_checked_at: row.last_checked_at,
        certificate: row.certificate.map(|c| CertificateView {
            not_before: c.not_before,
            not_after: c.not_after,
            issuer: c.issuer,
        }),
        created_at: row.created_at,
    }
}

fn pod_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("no pod named {name:?} in your active team"))
}

fn domain_not_found(name: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("the pod {name:?} has no domain {id:?}"))
}

/// The domains of this process, or 503 when they are not configured.
fn enabled(depot: &Depot) -> Result<std::sync::Arc<Domains>, ApiError> {
    let domains = app(depot).domains.clone();
    if domains.key.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "domains_not_configured",
            "custom domains are not configured on this platform ([domains] key_encryption_key)",
        ));
    }
    Ok(domains)
}

/// List a pod's custom domains
#[endpoint(tags("domains"))]
pub async fn list(name: PathParam<String>, depot: &mut Depot) -> Result<Json<DomainList>, ApiError> {
    let domains = enabled(depot)?;
    let state = app(depot);
    let me = caller(depot);
    let rows = store::list(&state.db, me.team_id, &name)
        .await?
        .ok_or_else(|| pod_not_found(&name))?;
    Ok(Json(DomainList {
        domains: rows.into_iter().map(|row| view(&domains, row)).collect(),
    }))
}

/// Add a custom domain
///
/// Answers 201 with the domain in `pending_dns` and the DNS records to create: a TXT record
/// `_instapod-challenge.<hostname>` with a token bound to this claim, and a CNAME to the pod's
/// platform host name (A/AAAA records to the ingress for an apex domain). Then call verify.
#[endpoint(tags("domains"), request_body = AddDomainRequest)]
pub async fn add(
    name: PathParam<String>,
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Created<DomainView>, ApiError> {
    let domains = enabled(depot)?;
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let body: AddDomainRequest = json::read(req).await?;
    let hostname = normalise::normalise(&body.hostname, &domains.platform)
        .map_err(|err| ApiError::bad_request(err.code(), err.to_string()))?;
    if normalise::is_apex(&hostname) && domains.ingress_addresses.is_empty() {
        return Err(ApiError::bad_request(
            "apex_domain_unsupported",
            format!(
                "{hostname} is an apex domain, which cannot have a CNAME, and this platform has no ingress addresses for A/AAAA records; add a subdomain such as www.{hostname}"
            ),
        ));
    }
    let row = store::add(
        &state.db,
        me.team_id,
        &name,
        &hostname,
        &records::new_txt_value(),
        MAX_DOMAINS_PER_POD,
    )
    .await
    .map_err(|err| match err {
        AddDomainError::PodNotFound(_) => pod_not_found(&name),
        AddDomainError::Taken(_) => ApiError::conflict(
            "domain_taken",
            format!("{hostname} is already claimed on this platform"),
        ),
        AddDomainError::TooMany(limit) => {
            ApiError::conflict("too_many_domains", format!("a pod has at most {limit} custom domains"))
        }
        AddDomainError::Db(err) => err.into(),
    })?;
    tracing::info!(domain_id = %row.id, pod_id = %row.pod_id, hostname = %row.hostname, "domain added");
    Ok(Created(view(&domains, row)))
}

/// Remove a custom domain
///
/// Every ingress stops serving it, route and certificate, at once.
#[endpoint(tags("domains"))]
pub async fn remove(name: PathParam<String>, id: PathParam<String>, depot: &mut Depot) -> Result<NoContent, ApiError> {
    let domains = enabled(depot)?;
    let state = app(depot);
    let me = caller(depot);
    let domain_id = Uuid::parse_str(&id).map_err(|_| domain_not_found(&name, &id))?;
    if store::get(&state.db, me.team_id, &name, domain_id).await?.is_none() {
        return Err(match store::list(&state.db, me.team_id, &name).await? {
            None => pod_not_found(&name),
            Some(_) => domain_not_found(&name, &id),
        });
    }
    if !store::delete(&state.db, me.team_id, &name, domain_id).await? {
        return Err(domain_not_found(&name, &id));
    }
    domains.feed.invalidate().await;
    tracing::info!(domain_id = %domain_id, "domain removed");
    Ok(NoContent)
}

/// Verify a custom domain's DNS records
///
/// Answers 202 with the domain; a node resolves the records (without caching) and the outcome
/// shows in `status`, `status_message` and `checks`, and as a pod event. Once verified, the
/// certificate is ordered at once.
#[endpoint(tags("domains"))]
pub async fn verify(
    name: PathParam<String>,
    id: PathParam<String>,
    depot: &mut Depot,
) -> Result<Accepted<DomainView>, ApiError> {
    let domains = enabled(depot)?;
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let domain_id = Uuid::parse_str(&id).map_err(|_| domain_not_found(&name, &id))?;
    let Some(target) = store::verify_target(&state.db, me.team_id, &name, domain_id).await? else {
        return Err(match store::list(&state.db, me.team_id, &name).await? {
            None => pod_not_found(&name),
            Some(_) => domain_not_found(&name, &id),
        });
    };
    if target.node_id.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_node_available",
            "no healthy node can check the DNS records now, try again shortly",
        ));
    }
    if !domains.send_verify("verify", &target).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_unavailable",
            "the verification could not be queued, try again shortly",
        ));
    }
    store::domain_event(
        &state.db,
        target.pod_id,
        &format!("domain {}: verification requested", target.hostname),
    )
    .await?;
    let row = store::get(&state.db, me.team_id, &name, domain_id)
        .await?
        .ok_or_else(|| domain_not_found(&name, &id))?;
    Ok(Accepted(view(&domains, row)))
}
