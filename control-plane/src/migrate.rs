//! Applies the SQL files of `migrations/` in order, at start-up.
//!
//! *Design.* The files are embedded by `build.rs`. Every run takes a session-level
//! Postgres advisory lock first, so replicas starting together apply each file exactly once: the
//! second waits, then sees the files recorded. Each file runs in its own transaction together
//! with its row in `schema_migrations` (version, name, SHA-256 checksum). A file that was
//! applied and has since been edited is an error naming the file: migrations are append-only.

use sha2::{Digest, Sha256};

/// One embedded migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The migrations compiled into this binary, in order.
pub const MIGRATIONS: &[Migration] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// A fixed key for `pg_advisory_xact_lock`, shared by every replica.
const LOCK_KEY: i64 = 0x1057_A90D;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "migration {name} was edited after it was applied (recorded checksum {recorded}, file has {actual}); add a new migration instead"
    )]
    Edited {
        name: String,
        recorded: String,
        actual: String,
    },
    #[error(
        "the database has migration {version} ({name}) that this binary does not know; is it older than the database?"
    )]
    Unknown { version: i64, name: String },
    #[error("migration {name} failed: {source}")]
    Failed {
        name: String,
        source: tokio_postgres::Error,
    },
    #[error("migration bookkeeping failed: {0}")]
    Database(#[from] tokio_postgres::Error),
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Applies every migration not yet recorded; returns how many were applied.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<usize, MigrateError> {
    run_migrations(client, MIGRATIONS).await
}

pub async fn run_migrations(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<usize, MigrateError> {
    // A session-level lock: held across the per-file transactions below, and released by
    // Postgres if this process dies half-way.
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await?;
    let outcome = apply_pending(client, migrations).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    let applied = outcome?;
    unlocked?;
    Ok(applied)
}

async fn apply_pending(client: &mut tokio_postgres::Client, migrations: &[Migration]) -> Result<usize, MigrateError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    bigint PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let rows = client
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let mut recorded_versions = Vec::with_capacity(rows.len());
    for row in &rows {
        let version: i64 = row.get(0);
        let name: String = row.get(1);
        let recorded: String = row.get(2);
        let Some(migration) = migrations.iter().find(|m| m.version == version) else {
            return Err(MigrateError::Unknown { version, name });
        };
        let actual = checksum(migration.sql);
        if actual != recorded {
            return Err(MigrateError::Edited {
                name: migration.name.to_string(),
                recorded,
                actual,
            });
        }
        recorded_versions.push(version);
    }
    let mut applied = 0;
    for migration in migrations {
        if recorded_versions.contains(&migration.version) {
            continue;
        }
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(migration.sql)
            .await
            .map_err(|source| MigrateError::Failed {
                name: migration.name.to_string(),
                source,
            })?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                &[&migration.version, &migration.name, &checksum(migration.sql)],
            )
            .await?;
        transaction.commit().await?;
        tracing::info!(migration = migration.name, "applied migration");
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_migrations_are_ordered_and_unique() {
        assert!(!MIGRATIONS.is_empty());
        for pair in MIGRATIONS.windows(2) {
            assert!(
                pair[0].version < pair[1].version,
                "{} before {}",
                pair[0].name,
                pair[1].name
            );
        }
    }
}
