//! A few long-lived Postgres connections shared by many requests at once, for the hottest
//! read-only query (the session lookup on every authenticated request).
//!
//! *Why.* tokio-postgres pipelines concurrent queries on one connection: many requests' queries
//! travel in one write and are answered back to back by one backend, instead of each request
//! taking a pooled connection and waking its own backend. On a small machine that halves the
//! per-request cost of authentication. Connections are made lazily and replaced when closed,
//! so a Postgres restart costs one failed request per slot, answered 503.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Statement};

use crate::db::DbError;

/// One connection with the statement prepared on it.
struct Prepared {
    client: Client,
    statement: Statement,
}

/// `n_slots` connections running one prepared query.
pub struct SharedQuery {
    url: String,
    sql: &'static str,
    timeout: Duration,
    slots: Vec<RwLock<Option<Arc<Prepared>>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for SharedQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQuery")
            .field("sql", &self.sql)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl SharedQuery {
    pub fn new(url: String, sql: &'static str, n_slots: usize, timeout: Duration) -> Self {
        SharedQuery {
            url,
            sql,
            timeout,
            slots: (0..n_slots.max(1)).map(|_| RwLock::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Runs the query with `params` and returns every row.
    pub async fn query(
        &self,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, DbError> {
        let slot_idx = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let prepared = self.connection(slot_idx).await?;
        let query = prepared.client.query(&prepared.statement, params);
        match tokio::time::timeout(self.timeout, query).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(err)) => {
                if prepared.client.is_closed() {
                    self.forget(slot_idx, &prepared);
                }
                Err(err.into())
            }
            Err(_) => Err(DbError::Unavailable("query timed out".to_string())),
        }
    }

    fn forget(&self, slot_idx: usize, broken: &Arc<Prepared>) {
        let mut slot = self.slots[slot_idx]
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, broken)) {
            *slot = None;
        }
    }

    async fn connection(&self, slot_idx: usize) -> Result<Arc<Prepared>, DbError> {
        {
            let slot = self.slots[slot_idx]
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(prepared) = slot.as_ref().filter(|p| !p.client.is_closed()) {
                return Ok(prepared.clone());
            }
        }
        // Two requests may connect at once; the later one replaces the earlier, which then
        // closes when its last user is done. Rare (start-up, after an outage) and harmless.
        let connect = async {
            let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::warn!(error = %err, "shared Postgres connection ended");
                }
            });
            let statement = client.prepare(self.sql).await?;
            Ok::<_, tokio_postgres::Error>(Prepared { client, statement })
        };
        let prepared = match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(prepared)) => Arc::new(prepared),
            Ok(Err(err)) => return Err(DbError::Unavailable(err.to_string())),
            Err(_) => return Err(DbError::Unavailable("connecting timed out".to_string())),
        };
        let mut slot = self.slots[slot_idx]
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(prepared.clone());
        Ok(prepared)
    }
}
