//! Custom domains: what crosses between the control plane and the node agents for DNS
//! verification, ACME certificates and serving a domain at every ingress.
//!
//! *Flow.* The control plane owns every domain row (status, token, certificate, the platform's
//! ACME account). It puts [`DomainJob`]s on the node's domain queue ([`domains_queue`]); the
//! agent resolves the records ([`DomainJob::Verify`] → [`VerificationReport`]) or orders a
//! certificate ([`DomainJob::IssueCertificate`] → [`IssuedCertificate`] or [`IssueFailure`]) and
//! reports back on `/internal/nodes/{id}/domains/…`. Every agent follows the served domains
//! (hostname → pod, certificate) with a long poll of `GET /internal/nodes/{id}/domains`
//! ([`ServedDomains`]), exactly like the ingress routes.
//!
//! *Invariants.* No certificate is ever ordered for a domain that has not verified (the control
//! plane enqueues [`DomainJob::IssueCertificate`] only from the verified states, and the agent
//! answers HTTP-01 only for tokens of its own orders). A failed renewal never removes a
//! certificate that still works. Private keys travel only on the node-token-authenticated
//! internal API and are stored encrypted at rest by the control plane; agents keep them in
//! memory.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The name of a node's domain job queue in Redis (apalis): `domains:<id>`.
pub fn domains_queue(node_id: Uuid) -> String {
    format!("domains:{node_id}")
}

/// The label of the TXT record that proves a team controls a domain:
/// `_instapod-challenge.<hostname>`.
pub const CHALLENGE_LABEL: &str = "_instapod-challenge";

/// The TXT record name for `hostname` (already normalised).
pub fn challenge_record_name(hostname: &str) -> String {
    format!("{CHALLENGE_LABEL}.{hostname}")
}

/// The path prefix of ACME HTTP-01 challenges, answered by every ingress on port 80 before
/// routing (and never redirected to HTTPS).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// A job on a node's domain queue (`domains:<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DomainJob {
    /// Resolve the domain's records against the configured nameservers (no cache) and report a
    /// [`VerificationReport`].
    Verify {
        domain_id: Uuid,
        pod_id: Uuid,
        hostname: String,
        expected: DnsExpectation,
    },
    /// Order a certificate for `hostname` with the platform's ACME account (HTTP-01 answered
    /// by this node's ingress) and report [`IssuedCertificate`] or [`IssueFailure`].
    IssueCertificate {
        domain_id: Uuid,
        pod_id: Uuid,
        hostname: String,
    },
}

impl DomainJob {
    pub fn domain_id(&self) -> Uuid {
        match self {
            DomainJob::Verify { domain_id, .. } | DomainJob::IssueCertificate { domain_id, .. } => *domain_id,
        }
    }

    /// A short name for logs and metrics labels.
    pub fn operation(&self) -> &'static str {
        match self {
            DomainJob::Verify { .. } => "verify",
            DomainJob::IssueCertificate { .. } => "issue_certificate",
        }
    }
}

/// The records a domain must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsExpectation {
    /// `_instapod-challenge.<hostname>`.
    pub txt_name: String,
    /// The token one of its TXT strings must equal exactly.
    pub txt_value: String,
    /// How traffic must reach the platform: a CNAME to the pod's platform host name, or (apex
    /// domains, which cannot have a CNAME) A/AAAA records naming only ingress addresses. Either
    /// is accepted when both are given.
    pub cname_target: Option<String>,
    pub addresses: Vec<IpAddr>,
}

/// One record as checked by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCheck {
    /// `TXT`, `CNAME`, `A` or `AAAA`.
    pub record_type: String,
    pub name: String,
    pub expected: Vec<String>,
    /// What the nameservers answered (empty when nothing).
    pub found: Vec<String>,
    pub ok: bool,
    /// A resolver error other than "no such record" (timeout, SERVFAIL, …).
    pub error: Option<String>,
}

/// `POST /internal/nodes/{id}/domains/{domain_id}/verification` (node token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationReport {
    pub verified: bool,
    pub checks: Vec<RecordCheck>,
}

/// `PUT /internal/nodes/{id}/domains/{domain_id}/certificate` (node token).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// The full chain, leaf first, PEM.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key_pem", &"***")
            .finish()
    }
}

/// `POST /internal/nodes/{id}/domains/{domain_id}/certificate-failure` (node token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueFailure {
    pub message: String,
    /// The CA said "rate limited" (or similar): back off at least `retry_after_secs`.
    #[serde(default)]
    pub rate_limited: bool,
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
}

/// `GET /internal/nodes/{id}/acme-account` (node token); `PUT` with `credentials` set stores
/// them unless some node stored credentials first, and answers with the stored ones (one
/// account per platform: the first node to create it wins, the others use it).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeAccount {
    pub directory_url: String,
    /// Contact e-mail addresses (`mailto:` URLs) for a new account.
    #[serde(default)]
    pub contact: Vec<String>,
    /// instant-acme's `AccountCredentials` as JSON, when the account exists.
    pub credentials: Option<serde_json::Value>,
}

impl std::fmt::Debug for AcmeAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeAccount")
            .field("directory_url", &self.directory_url)
            .field("credentials", &self.credentials.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `GET /internal/nodes/{id}/domains` (node token): every domain the ingresses serve, with
/// `If-None-Match: "<version>"` (304 while unchanged) and `?wait=<seconds>` (long poll), like
/// the ingress routes. A domain is served from the moment it verifies until it is removed or
/// detached.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedDomains {
    pub version: String,
    pub domains: Vec<ServedDomain>,
}

impl std::fmt::Debug for ServedDomains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedDomains")
            .field("version", &self.version)
            .field("domains", &self.domains.len())
            .finish()
    }
}

/// One served custom domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedDomain {
    pub domain_id: Uuid,
    pub pod_id: Uuid,
    /// Normalised (lowercase ASCII, punycode, no trailing dot).
    pub hostname: String,
    /// The current certificate (the newest that still works), when one was issued.
    pub certificate: Option<ServedCertificate>,
}

/// A certificate and its key, as an ingress loads them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedCertificate {
    pub chain_pem: String,
    pub key_pem: String,
    pub not_after: i64,
}

impl std::fmt::Debug for ServedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedCertificate")
            .field("not_after", &self.not_after)
            .field("key_pem", &"***")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_with_an_op_tag() {
        let job = DomainJob::IssueCertificate {
            domain_id: Uuid::nil(),
            pod_id: Uuid::nil(),
            hostname: "shop.example.com".into(),
        };
        let text = serde_json::to_string(&job).expect("serialises");
        assert!(text.contains(r#""op":"issue_certificate""#), "{text}");
        assert_eq!(serde_json::from_str::<DomainJob>(&text).expect("parses"), job);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let cert = ServedCertificate {
            chain_pem: "CHAIN".into(),
            key_pem: "SECRET".into(),
            not_after: 1,
        };
        assert!(!format!("{cert:?}").contains("SECRET"));
        let issued = IssuedCertificate {
            chain_pem: "CHAIN".into(),
            key_pem: "SECRET".into(),
            not_before: 0,
            not_after: 1,
        };
        assert!(!format!("{issued:?}").contains("SECRET"));
    }

    #[test]
    fn the_challenge_record_sits_under_the_domain() {
        assert_eq!(
            challenge_record_name("shop.example.com"),
            "_instapod-challenge.shop.example.com"
        );
    }
}
