//! The maintenance worker: deletes what has expired (sessions, one-time codes past their
//! expiry or used a week ago, mail delivered a month ago). Idempotent; safe on every replica.

use std::time::Duration;

use tokio::sync::watch;

use crate::db::{self, DbError, Pool};

/// How often the worker runs.
const INTERVAL: Duration = Duration::from_secs(600);

pub async fn run(pool: Pool, mut shutdown: watch::Receiver<bool>) {
    tracing::info!(worker = "maintenance", "worker started");
    loop {
        match sweep(&pool).await {
            Ok(deleted) if deleted > 0 => tracing::info!(worker = "maintenance", deleted, "expired rows deleted"),
            Ok(_) => {}
            Err(err) => tracing::warn!(worker = "maintenance", error = %err, "sweep failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(worker = "maintenance", "worker stopped");
}

/// One pass; returns the number of rows deleted.
pub async fn sweep(pool: &Pool) -> Result<u64, DbError> {
    let client = db::connect(pool).await?;
    let sessions = client
        .execute("DELETE FROM sessions WHERE expires_at <= now()", &[])
        .await?;
    let codes = client
        .execute(
            "DELETE FROM one_time_codes WHERE expires_at <= now() OR used_at < now() - interval '7 days'",
            &[],
        )
        .await?;
    let mail = client
        .execute(
            "DELETE FROM mail_outbox WHERE sent_at < now() - interval '30 days'",
            &[],
        )
        .await?;
    Ok(sessions + codes + mail)
}
