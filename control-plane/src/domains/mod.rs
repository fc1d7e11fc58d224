//! Custom domains (issue 7): a team adds `shop.example.com` to a pod, creates the DNS records
//! it is shown, asks for a verification, and from then on the fleet's ingresses serve the pod
//! under that name with a certificate from an ACME CA, renewed before it expires.
//!
//! *Design.* The control plane decides and stores; the node agents act. `normalise` turns what
//! a user typed into the one spelling stored (and refuses what may not be claimed), `records`
//! says which DNS records prove a claim, `store` owns the rows and every status change,
//! `crypto` seals private keys and the ACME account's credentials at rest, `certificates`
//! checks what an agent sends before it is stored, `queue` puts [`DomainJob`]s on a node's
//! domain queue, `feed` is the served-domains snapshot every agent long-polls, and `worker`
//! re-verifies, renews and retries. Every outcome is also a pod event.
//!
//! *Status machine.* `pending_dns` (added) → verification passes → `verified` → a certificate
//! order is enqueued at once → `issuing_certificate` → certificate stored → `active`. A failed
//! verification of a domain that is not served makes it `failed` (the message names what was
//! found); a definite failure (records answered but wrong or gone, no resolver error) of a
//! served domain detaches it (`failed`, no longer served). A failed order keeps the status
//! (an `active` domain keeps its working certificate) and backs off. Served = `verified`,
//! `issuing_certificate` or `active`, of a pod not being deleted.
//!
//! *Invariants.* No certificate order is enqueued for a domain that is not in a served status
//! (see [`store::IssueGate`]). A hostname is claimed once across all teams (unique index on the
//! normalised name). Private keys are never stored or logged in plain text.
//!
//! [`DomainJob`]: instapod_common::domains::DomainJob

pub mod certificates;
pub mod crypto;
pub mod feed;
pub mod normalise;
pub mod queue;
pub mod records;
pub mod store;
pub mod worker;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use instapod_common::domains::DomainJob;
use uuid::Uuid;

use crate::config::Config;
use crate::db::Pool;
use crypto::KeyEncryptionKey;
use normalise::PlatformNames;
use queue::DomainQueue;
use store::JobTarget;

/// Custom domains for one control-plane process: settings, the key, the queue and the feed.
#[derive(Debug)]
pub struct Domains {
    /// `None` while `[domains] key_encryption_key` is empty (domains are disabled).
    pub key: Option<Arc<KeyEncryptionKey>>,
    pub platform: PlatformNames,
    pub ingress_addresses: Vec<IpAddr>,
    pub acme_directory_url: String,
    pub acme_contact: Vec<String>,
    pub reverify_interval: Duration,
    pub renew_before: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub worker_interval: Duration,
    pub queue: DomainQueue,
    pub feed: feed::ServedCache,
}

impl Domains {
    /// From the (validated) configuration.
    pub fn new(config: &Config) -> anyhow::Result<Domains> {
        let settings = &config.domains;
        let key = match settings.key_encryption_key.expose() {
            "" => None,
            text => Some(Arc::new(
                KeyEncryptionKey::from_base64(text)
                    .map_err(|err| anyhow::anyhow!("domains.key_encryption_key: {err}"))?,
            )),
        };
        let apps_domain = normalise::normalise(&config.apps_domain, &PlatformNames::default())
            .unwrap_or_else(|_| config.apps_domain.trim_end_matches('.').to_ascii_lowercase());
        let control_plane_hosts = config.public_host().into_iter().collect();
        Ok(Domains {
            feed: feed::ServedCache::new(key.clone()),
            key,
            platform: PlatformNames {
                apps_domain,
                control_plane_hosts,
            },
            ingress_addresses: settings.ingress_addresses.clone(),
            acme_directory_url: settings.acme_directory_url.clone(),
            acme_contact: settings.acme_contact_urls(),
            reverify_interval: Duration::from_secs(settings.reverify_interval_secs),
            renew_before: Duration::from_secs(settings.renew_before_secs),
            retry_min: Duration::from_secs(settings.retry_min_secs),
            retry_max: Duration::from_secs(settings.retry_max_secs),
            worker_interval: Duration::from_secs(settings.worker_interval_secs),
            queue: DomainQueue::new(config.redis_url.expose()),
        })
    }

    /// The expectation of a job target's records.
    pub fn expectation(&self, target: &JobTarget) -> instapod_common::domains::DnsExpectation {
        records::expectation(
            &target.hostname,
            &target.txt_value,
            target.platform_host.as_deref(),
            &self.ingress_addresses,
        )
    }

    /// Sends a verification job; false when no node is healthy or the push failed.
    pub async fn send_verify(&self, kind: &'static str, target: &JobTarget) -> bool {
        let Some(node_id) = target.node_id else {
            tracing::warn!(domain_id = %target.domain_id, "no healthy node to verify the domain");
            return false;
        };
        let job = DomainJob::Verify {
            domain_id: target.domain_id,
            pod_id: target.pod_id,
            hostname: target.hostname.clone(),
            expected: self.expectation(target),
        };
        self.queue.push(kind, node_id, job).await
    }

    /// Sends claimed certificate orders; one that cannot be sent is retried after the minimum
    /// backoff.
    pub async fn send_issues(&self, pool: &Pool, kind: &'static str, targets: &[JobTarget]) {
        for target in targets {
            let sent = match target.node_id {
                Some(node_id) => {
                    let job = DomainJob::IssueCertificate {
                        domain_id: target.domain_id,
                        pod_id: target.pod_id,
                        hostname: target.hostname.clone(),
                    };
                    self.queue.push(kind, node_id, job).await
                }
                None => {
                    tracing::warn!(domain_id = %target.domain_id, "no healthy node to order the certificate");
                    false
                }
            };
            if sent {
                tracing::info!(domain_id = %target.domain_id, hostname = %target.hostname, kind, "certificate order enqueued");
            } else if let Err(err) = store::retry_issue_later(pool, target.domain_id, self.retry_min).await {
                tracing::warn!(domain_id = %target.domain_id, error = %err, "cannot reschedule the certificate order");
            }
        }
    }

    /// Orders a certificate for `domain_id` now when its order is due (right after it verified).
    pub async fn issue_now(&self, pool: &Pool, domain_id: Uuid) -> Result<(), crate::db::DbError> {
        let targets = store::claim_issues(pool, store::IssueGate::One(domain_id)).await?;
        self.send_issues(pool, "issue", &targets).await;
        Ok(())
    }
}

/// A domain's status, as stored in `domains.status` and shown by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainStatus {
    PendingDns,
    Verified,
    IssuingCertificate,
    Active,
    Failed,
}

impl DomainStatus {
    pub const ALL: [DomainStatus; 5] = [
        DomainStatus::PendingDns,
        DomainStatus::Verified,
        DomainStatus::IssuingCertificate,
        DomainStatus::Active,
        DomainStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DomainStatus::PendingDns => "pending_dns",
            DomainStatus::Verified => "verified",
            DomainStatus::IssuingCertificate => "issuing_certificate",
            DomainStatus::Active => "active",
            DomainStatus::Failed => "failed",
        }
    }

    /// The status stored in the column (its check allows only these).
    pub fn parse(text: &str) -> DomainStatus {
        match text {
            "verified" => DomainStatus::Verified,
            "issuing_certificate" => DomainStatus::IssuingCertificate,
            "active" => DomainStatus::Active,
            "failed" => DomainStatus::Failed,
            _ => DomainStatus::PendingDns,
        }
    }

    /// Whether the ingresses serve a domain in this status.
    pub fn is_served(self) -> bool {
        matches!(
            self,
            DomainStatus::Verified | DomainStatus::IssuingCertificate | DomainStatus::Active
        )
    }
}
