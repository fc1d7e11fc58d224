//! The Postgres pool and the one mapping from database failures to our errors.

use std::time::Duration;

use deadpool_postgres::{ManagerConfig, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;

use crate::config::Config;

pub type Pool = deadpool_postgres::Pool;
pub type Client = deadpool_postgres::Client;

/// A failure talking to Postgres.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had (server down, pool exhausted past the timeout).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The query itself failed.
    #[error("database query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// A query shared by a batch of requests failed (not for lack of a connection); every
    /// request of the batch gets its message.
    #[error("batched database query failed: {0}")]
    BatchFailed(String),
}

impl DbError {
    /// The SQLSTATE of a failed query, to tell a unique violation from a real failure.
    pub fn sql_state(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            DbError::Query(err) => err.code(),
            DbError::Unavailable(_) | DbError::BatchFailed(_) => None,
        }
    }

    /// Whether the query failed because the connection broke (then the database is down for us).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unavailable(_) => true,
            DbError::BatchFailed(_) => false,
            DbError::Query(err) => err.is_closed() || err.code().is_none() && err.as_db_error().is_none(),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        DbError::Unavailable(err.to_string())
    }
}

/// Builds the pool; connections are made lazily, so this succeeds even while Postgres is down.
pub fn create_pool(config: &Config) -> anyhow::Result<Pool> {
    let timeout = Some(Duration::from_secs(config.database_timeout_secs));
    let mut pg = deadpool_postgres::Config::new();
    pg.url = Some(config.database_url.expose().to_string());
    pg.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    pg.pool = Some(PoolConfig {
        max_size: config.database_pool_size,
        timeouts: Timeouts {
            wait: timeout,
            create: timeout,
            recycle: timeout,
        },
        ..PoolConfig::default()
    });
    Ok(pg.create_pool(Some(Runtime::Tokio1), NoTls)?)
}

/// A pooled connection, or `Unavailable`.
pub async fn connect(pool: &Pool) -> Result<Client, DbError> {
    Ok(pool.get().await?)
}
