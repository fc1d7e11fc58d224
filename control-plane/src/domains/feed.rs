//! The served domains every ingress follows (`GET /internal/nodes/{id}/domains`, handler in
//! `api::internal_domains`): each custom host name in a served status of a pod not being
//! deleted, with its current certificate (the newest stored one that has not expired) and key.
//!
//! *Design.* Like the ingress routes (`nodes::routes`): one [`ServedCache`] per process reads
//! the rows in one query at most every [`REFRESH`] and all agents share the snapshot; its
//! version is a hash of what identifies the content (domain, pod, host name, certificate row),
//! so every replica computes the same version and answers an agent's `If-None-Match` from
//! memory. Keys are decrypted only when the version changed. A change made by this process
//! (a domain removed, a certificate stored) calls [`ServedCache::invalidate`], so the next
//! long-poll round reads at once instead of up to a refresh period later.
//!
//! *Limitations.* A key that does not decrypt (the key encryption key was changed) is logged
//! and its domain served without a certificate.

use std::sync::Arc;
use std::time::Duration;

use instapod_common::domains::{ServedCertificate, ServedDomain, ServedDomains};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use uuid::Uuid;

use super::crypto::{self, KeyEncryptionKey};
use crate::db::{self, DbError, Pool};

/// How long a snapshot is served before the next request reads the rows again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The longest an agent's request waits for a change.
pub const MAX_WAIT: Duration = Duration::from_secs(25);

/// One served row, as read.
#[derive(Debug, Clone)]
struct ServedRow {
    domain_id: Uuid,
    pod_id: Uuid,
    hostname: String,
    certificate: Option<(i64, String, Vec<u8>, i64)>,
}

fn version_of(rows: &[ServedRow]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"instapod served domains v1\n");
    for row in rows {
        hasher.update(row.domain_id.as_bytes());
        hasher.update(row.pod_id.as_bytes());
        hasher.update(row.hostname.as_bytes());
        hasher.update(b"\n");
        if let Some((id, _, _, not_after)) = &row.certificate {
            hasher.update(id.to_be_bytes());
            hasher.update(not_after.to_be_bytes());
        }
        hasher.update(b"\n");
    }
    hex::encode(&hasher.finalize()[..16])
}

/// The served domains at one moment.
pub type Snapshot = ServedDomains;

/// The current snapshot, refreshed at most every [`REFRESH`].
pub struct ServedCache {
    key: Option<Arc<KeyEncryptionKey>>,
    current: tokio::sync::Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl std::fmt::Debug for ServedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedCache").finish_non_exhaustive()
    }
}

impl ServedCache {
    pub fn new(key: Option<Arc<KeyEncryptionKey>>) -> ServedCache {
        ServedCache {
            key,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// Makes the next [`Self::snapshot`] read the rows.
    pub async fn invalidate(&self) {
        let mut current = self.current.lock().await;
        if let Some((_, snapshot)) = current.take() {
            // Keep the snapshot (its keys are reused when the version did not change) but
            // make it look old.
            let old = Instant::now().checked_sub(REFRESH).unwrap_or_else(Instant::now);
            *current = Some((old, snapshot));
        }
    }

    /// The current snapshot; reads the rows when the one held is older than [`REFRESH`].
    pub async fn snapshot(&self, pool: &Pool) -> Result<Arc<Snapshot>, DbError> {
        let mut current = self.current.lock().await;
        if let Some((read_at, snapshot)) = current.as_ref()
            && read_at.elapsed() < REFRESH
        {
            return Ok(snapshot.clone());
        }
        let rows = read_served(pool).await?;
        let version = version_of(&rows);
        let snapshot = match current.take() {
            Some((_, old)) if old.version == version => old,
            _ => {
                let domains = rows.into_iter().map(|row| self.served(row)).collect::<Vec<_>>();
                tracing::debug!(version = %version, domains = domains.len(), "served domains changed");
                Arc::new(ServedDomains { version, domains })
            }
        };
        *current = Some((Instant::now(), snapshot.clone()));
        Ok(snapshot)
    }

    fn served(&self, row: ServedRow) -> ServedDomain {
        let certificate = match (row.certificate, &self.key) {
            (Some((_, chain_pem, sealed, not_after)), Some(key)) => {
                match key.open(&crypto::domain_key_context(row.domain_id), &sealed) {
                    Ok(plain) => match String::from_utf8(plain) {
                        Ok(key_pem) => Some(ServedCertificate {
                            chain_pem,
                            key_pem,
                            not_after,
                        }),
                        Err(_) => None,
                    },
                    Err(err) => {
                        tracing::warn!(domain_id = %row.domain_id, error = %err, "a certificate key does not decrypt; served without it");
                        None
                    }
                }
            }
            _ => None,
        };
        ServedDomain {
            domain_id: row.domain_id,
            pod_id: row.pod_id,
            hostname: row.hostname,
            certificate,
        }
    }
}

async fn read_served(pool: &Pool) -> Result<Vec<ServedRow>, DbError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query(
            "SELECT d.id, d.pod_id, d.hostname, c.id, c.chain_pem, c.key_encrypted,
                    extract(epoch FROM c.not_after)::int8
             FROM domains d JOIN pods p ON p.id = d.pod_id
             LEFT JOIN LATERAL (SELECT id, chain_pem, key_encrypted, not_after FROM domain_certificates
                                WHERE domain_id = d.id AND not_after > now() ORDER BY id DESC LIMIT 1) c ON true
             WHERE d.status IN ('verified', 'issuing_certificate', 'active') AND p.desired_state <> 'deleted'
             ORDER BY d.hostname",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let cert_id: Option<i64> = row.get(3);
            ServedRow {
                domain_id: row.get(0),
                pod_id: row.get(1),
                hostname: row.get(2),
                certificate: cert_id.map(|id| (id, row.get(4), row.get(5), row.get(6))),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u128, cert: Option<i64>) -> ServedRow {
        ServedRow {
            domain_id: Uuid::from_u128(n),
            pod_id: Uuid::from_u128(100 + n),
            hostname: format!("d{n}.example.com"),
            certificate: cert.map(|id| (id, "CHAIN".to_string(), vec![1, 2, 3], 2_000_000_000)),
        }
    }

    #[test]
    fn the_version_follows_domains_and_certificates() {
        let base = version_of(&[row(1, None), row(2, Some(7))]);
        assert_eq!(base, version_of(&[row(1, None), row(2, Some(7))]));
        assert_ne!(base, version_of(&[row(1, None)]), "a removed domain");
        assert_ne!(
            base,
            version_of(&[row(1, Some(8)), row(2, Some(7))]),
            "a new certificate"
        );
        assert_ne!(
            base,
            version_of(&[row(1, None), row(2, Some(9))]),
            "a renewed certificate"
        );
    }
}
