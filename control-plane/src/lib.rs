//! Instapod's control plane as a library: the binary in `main.rs` parses arguments and calls
//! [`serve`], [`migrate`] or [`bootstrap_user`]; tests can do the same in-process.

pub mod accounts;
pub mod api;
pub mod config;
pub mod db;
pub mod domains;
pub mod error;
pub mod http;
pub mod mail;
pub mod maintenance;
pub mod migrate;
pub mod nodes;
pub mod observability;
pub mod pods;
pub mod ratelimit;
pub mod shared_client;
pub mod ssh;
pub mod teams;

use std::sync::Arc;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusBuilder;
use salvo::conn::TcpListener;
use salvo::prelude::*;
use tokio::sync::watch;

use crate::config::Config;
use crate::http::state::AppState;

/// Applies pending migrations on a dedicated connection.
pub async fn migrate(config: &Config) -> anyhow::Result<usize> {
    let (mut client, connection) = tokio_postgres::connect(config.database_url.expose(), tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres to apply migrations")?;
    let connection = tokio::spawn(connection);
    let applied = migrate::run(&mut client).await?;
    drop(client);
    let _finished = connection.await;
    Ok(applied)
}

/// Creates (or reuses) a verified account and prints nothing; returns the JSON line the
/// `bootstrap-user` command prints.
pub async fn bootstrap_user(
    config: &Config,
    email: &str,
    password: &str,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let email = accounts::validate::email(email).map_err(anyhow::Error::msg)?;
    accounts::validate::password(password).map_err(anyhow::Error::msg)?;
    let name = accounts::validate::display_name("name", name).map_err(anyhow::Error::msg)?;
    let pool = db::create_pool(config)?;
    let (user, session) =
        accounts::users::bootstrap(&pool, &email, password.to_string(), &name, config.session_ttl_hours)
            .await
            .map_err(|err| anyhow::anyhow!("{err}"))?;
    Ok(serde_json::json!({
        "user_id": user.id,
        "email": user.email,
        "team_id": user.personal_team_id,
        "token": session.token,
    }))
}

/// Runs the control plane until SIGINT/SIGTERM: migrations, the workers (mail, maintenance,
/// node health) and the HTTP server.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let applied = migrate(&config).await?;
    tracing::info!(applied, "migrations up to date");

    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_string()),
            http::metrics::LATENCY_BUCKETS,
        )?
        .build_recorder();
    let metrics = recorder.handle();
    // Tests may run several servers in one process; only the first installs the recorder.
    let _installed = metrics::set_global_recorder(recorder);
    observability::describe();

    let db = db::create_pool(&config)?;
    let rate_limiter = ratelimit::RateLimiter::new(&config)?;
    let config = Arc::new(config);
    let domains = Arc::new(domains::Domains::new(&config)?);
    if domains.key.is_none() {
        tracing::warn!("custom domains are disabled: [domains] key_encryption_key is not set");
    }
    let session_lookup = accounts::sessions::SessionLookup::start(&config);
    let state = AppState {
        config: config.clone(),
        db: db.clone(),
        session_lookup,
        rate_limiter,
        metrics: metrics.clone(),
        pod_queue: Arc::new(pods::queue::PodQueue::new(config.redis_url.expose())),
        ingress_routes: Arc::new(nodes::routes::RouteCache::new(config.node_join_token.expose())),
        node_http: pods::logs::node_http_client(),
        domains: domains.clone(),
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mail_worker = mail::worker::MailWorker::new(db.clone(), config.mail.clone())?;
    let mail_task = tokio::spawn(mail_worker.run(shutdown_rx.clone()));
    let maintenance_task = tokio::spawn(maintenance::run(db.clone(), shutdown_rx.clone()));
    let node_health_task = tokio::spawn(nodes::health::run(
        db.clone(),
        std::time::Duration::from_secs(config.node_heartbeat_timeout_secs),
        shutdown_rx.clone(),
    ));
    warn_unknown_runtime_images(&db, &config).await;
    let retention_task = tokio::spawn(pods::metrics::run_retention(
        db.clone(),
        config.metrics_retention(),
        shutdown_rx.clone(),
    ));
    let queue_depth_task = tokio::spawn(observability::sample_queue_depth(
        db.clone(),
        config.redis_url.expose().to_string(),
        shutdown_rx.clone(),
    ));
    let domains_task = tokio::spawn(domains::worker::run(db.clone(), domains, shutdown_rx.clone()));
    let upkeep_task = tokio::spawn(metrics_upkeep(metrics, shutdown_rx));

    let acceptor = TcpListener::new(config.listen)
        .try_bind()
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, public_url = %config.public_url, "control plane listening");
    let server = Server::new(acceptor);
    let handle = server.handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        handle.stop_graceful(std::time::Duration::from_secs(10));
    });
    server.serve(http::router::service(state)).await;
    let _sent = shutdown_tx.send(true);
    let _finished = tokio::join!(
        mail_task,
        maintenance_task,
        node_health_task,
        retention_task,
        upkeep_task,
        queue_depth_task,
        domains_task
    );
    Ok(())
}

/// Logs each `runtime_images` entry that names no runtime of the catalog (a typo would
/// otherwise silently change nothing). Best effort: the catalog may still be edited later.
async fn warn_unknown_runtime_images(db: &db::Pool, config: &config::Config) {
    if config.runtime_images.is_empty() {
        return;
    }
    let known = async {
        let client = db::connect(db).await?;
        let rows = client.query("SELECT id FROM runtimes", &[]).await?;
        Ok::<_, db::DbError>(rows.iter().map(|row| row.get::<_, String>(0)).collect::<Vec<_>>())
    };
    match known.await {
        Ok(known) => {
            for runtime in config.runtime_images.keys().filter(|id| !known.contains(id)) {
                tracing::warn!(runtime = %runtime, "runtime_images names a runtime the catalog does not have");
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot check runtime_images against the catalog"),
    }
}

async fn metrics_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => handle.run_upkeep(),
            _ = shutdown.changed() => break,
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
