//! Custom domains on this node: DNS verification, ACME certificates, and serving the domains
//! (routes and TLS certificates) at the ingress.
//!
//! Code map: [`dns`] (checking a domain's records with hickory-resolver against the configured
//! nameservers, no cache) · [`acme`] (the platform's ACME account and HTTP-01 orders with
//! instant-acme) · [`acme_http`] (instant-acme's requests on reqwest, keeping the CA's
//! `Retry-After`) · [`challenges`] (the HTTP-01 tokens of this node's orders in flight, answered
//! by the ingress) · [`feed`] (the `domain_feed` worker following the served domains, like the
//! ingress route feed) · [`tls`] (certificates chosen by SNI, the TLS listener) · [`tls_stream`]
//! (one TLS connection's server side: rustls over the socket, sending as few segments as the
//! protocol allows) · [`jobs`] (the
//! consumer of `domains:<node_id>`) · this module: [`Served`], the served domains as the
//! ingress and the TLS resolver read them.
//!
//! *Invariants.* The control plane decides everything (which domains are served, which
//! certificate is current); this node only follows [`Served`] from the feed and answers jobs.
//! A failed poll never changes what is served. Private keys live in memory only. A domain is
//! routed to its pod exactly as the pod's platform host name is (same target: this node's pod,
//! or the node it runs on).

pub mod acme;
pub mod acme_http;
pub mod challenges;
pub mod dns;
pub mod feed;
pub mod jobs;
pub mod tls;
pub mod tls_stream;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use instapod_common::domains::ServedDomains;
use rustls::sign::CertifiedKey;
use uuid::Uuid;

use crate::ingress::proxy::{CustomDomains, CustomHost};

/// Shows this module's series from the start (at zero), so dashboards and the catalogue test
/// see them before the first job, handshake or certificate.
pub fn register_metrics() {
    for operation in ["verify", "issue_certificate"] {
        metrics::counter!("instapod_node_agent_domain_jobs_total", "operation" => operation, "outcome" => "error")
            .increment(0);
        let _ = metrics::histogram!("instapod_node_agent_domain_job_duration_seconds", "operation" => operation);
    }
    for reason in ["handshake", "timeout"] {
        metrics::counter!("instapod_node_agent_ingress_tls_handshake_failures_total", "reason" => reason).increment(0);
    }
    metrics::gauge!("instapod_node_agent_domains_served").set(0.0);
    metrics::gauge!("instapod_node_agent_domain_certificate_expiry_seconds").set(0.0);
}

/// One served custom domain as loaded here.
#[derive(Debug, Clone)]
pub struct ServedHost {
    pub domain_id: Uuid,
    pub pod_id: Uuid,
    pub certificate: Option<LoadedCertificate>,
}

/// A certificate parsed into what rustls serves.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    pub not_after: i64,
    /// The PEM it was loaded from (an unchanged certificate is not parsed again).
    chain_pem: String,
}

/// One answer of the feed, ready for lookups.
#[derive(Debug, Default)]
pub struct ServedTable {
    /// The answer's version (`None` before the first answer).
    pub version: Option<String>,
    /// Normalised host name → what is served for it.
    pub hosts: HashMap<String, ServedHost>,
}

impl ServedTable {
    /// The table of an answer; certificates unchanged since `previous` are reused, and one
    /// that cannot be loaded is left out (the domain is still routed, over plain HTTP).
    pub fn from_answer(answer: &ServedDomains, previous: &ServedTable) -> ServedTable {
        let mut hosts = HashMap::with_capacity(answer.domains.len());
        for domain in &answer.domains {
            let Some(host) = crate::ingress::normalize_host(&domain.hostname) else {
                tracing::warn!(domain_id = %domain.domain_id, "a served domain with an unusable host name was ignored");
                continue;
            };
            let certificate = domain.certificate.as_ref().and_then(|served| {
                let reused = previous
                    .hosts
                    .get(&host)
                    .and_then(|old| old.certificate.as_ref())
                    .filter(|old| old.chain_pem == served.chain_pem);
                if let Some(old) = reused {
                    return Some(old.clone());
                }
                match tls::certified_key(&served.chain_pem, &served.key_pem) {
                    Ok(key) => Some(LoadedCertificate {
                        key: Arc::new(key),
                        not_after: served.not_after,
                        chain_pem: served.chain_pem.clone(),
                    }),
                    Err(err) => {
                        tracing::warn!(domain_id = %domain.domain_id, %host, error = %err, "a domain's certificate cannot be loaded; serving it without TLS");
                        None
                    }
                }
            });
            hosts.insert(
                host,
                ServedHost {
                    domain_id: domain.domain_id,
                    pod_id: domain.pod_id,
                    certificate,
                },
            );
        }
        ServedTable {
            version: Some(answer.version.clone()),
            hosts,
        }
    }
}

/// The served custom domains, replaced as a whole at each change (a request or a handshake
/// costs a read lock and a hash lookup).
#[derive(Debug, Default)]
pub struct Served {
    current: RwLock<Arc<ServedTable>>,
}

impl Served {
    pub fn current(&self) -> Arc<ServedTable> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies an answer of the feed.
    pub fn apply(&self, answer: &ServedDomains) -> Arc<ServedTable> {
        let table = Arc::new(ServedTable::from_answer(answer, &self.current()));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = table.clone();
        table
    }

    /// The certificate served for `host` (normalised), if it has one.
    pub fn certificate(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let table = self.current();
        table.hosts.get(host)?.certificate.as_ref().map(|c| c.key.clone())
    }
}

/// What the ingress asks about custom domains: the served table and the HTTP-01 tokens.
#[derive(Debug)]
pub struct IngressDomains {
    pub served: Arc<Served>,
    pub challenges: Arc<challenges::ChallengeStore>,
}

impl CustomDomains for IngressDomains {
    fn custom_host(&self, host: &str) -> Option<CustomHost> {
        let table = self.served.current();
        let served = table.hosts.get(host)?;
        Some(CustomHost {
            pod_id: served.pod_id,
            has_certificate: served.certificate.is_some(),
        })
    }

    fn acme_challenge(&self, token: &str) -> Option<String> {
        self.challenges.key_authorization(token)
    }
}
