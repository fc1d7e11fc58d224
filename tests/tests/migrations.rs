//! Schema migrations at start-up: every file of `migrations/` applied once and recorded with
//! its checksum, concurrent starts serialised by the advisory lock, restarts applying nothing,
//! and an applied file that was edited refusing to start with a message naming it.

use std::collections::BTreeSet;
use std::path::Path;

use instapod_tests::{ControlPlane, ControlPlaneOptions, postgres, register_user};

/// The file names of `migrations/*.sql` in the repository.
fn migration_files() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".sql"))
        .collect();
    assert!(!files.is_empty(), "no migration files in {}", dir.display());
    files
}

/// `(version, name, checksum, applied_at as text)` of every recorded migration.
async fn recorded(cp: &ControlPlane) -> Vec<(i64, String, String, String)> {
    let db = cp.db().await;
    db.query(
        "SELECT version, name, checksum, applied_at::text FROM schema_migrations ORDER BY version",
        &[],
    )
    .await
    .expect("read schema_migrations")
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
    .collect()
}

fn assert_all_recorded_once(rows: &[(i64, String, String, String)]) {
    let files = migration_files();
    assert_eq!(rows.len(), files.len(), "one row per file: {rows:?} vs {files:?}");
    let versions: BTreeSet<i64> = rows.iter().map(|row| row.0).collect();
    assert_eq!(versions.len(), rows.len(), "versions are unique: {rows:?}");
    for (_, name, checksum, _) in rows {
        assert!(
            files
                .iter()
                .any(|file| file == name || file.trim_end_matches(".sql") == name),
            "recorded migration {name} is not a file in migrations/"
        );
        assert!(!checksum.is_empty());
    }
}

#[tokio::test]
async fn two_control_planes_starting_together_migrate_once() {
    let database = postgres::shared().create_database().await;
    let options = ControlPlaneOptions::default().database(&database);
    let (first, second) = tokio::join!(ControlPlane::start(options.clone()), ControlPlane::start(options));
    assert_all_recorded_once(&recorded(&first).await);

    // Both serve the same data.
    let registration = register_user(&first, "shared").await;
    instapod_tests::login(&second, &registration.email, &registration.password).await;
}

#[tokio::test]
async fn a_restart_applies_nothing_new() {
    let cp = ControlPlane::start_default().await;
    let before = recorded(&cp).await;
    assert_all_recorded_once(&before);
    let database = cp.database().to_string();
    drop(cp);
    let again = ControlPlane::start(ControlPlaneOptions::default().database(&database)).await;
    assert_eq!(recorded(&again).await, before, "nothing re-applied");
}

#[tokio::test]
async fn an_edited_migration_refuses_to_start() {
    let cp = ControlPlane::start_default().await;
    let rows = recorded(&cp).await;
    let (version, name, _, _) = rows.first().cloned().expect("at least one migration");
    let db = cp.db().await;
    db.execute(
        "UPDATE schema_migrations SET checksum = $1 WHERE version = $2",
        &[&"0".repeat(64), &version],
    )
    .await
    .expect("tamper with the checksum");
    let database = cp.database().to_string();
    drop(cp);

    let (status, log) = ControlPlane::start_expecting_exit(ControlPlaneOptions::default().database(&database)).await;
    assert!(
        !status.success(),
        "it must exit with an error, got {status}; log:\n{log}"
    );
    let stem = name.trim_end_matches(".sql");
    assert!(
        log.contains(stem),
        "the error must name the migration {name}; log:\n{log}"
    );
}
