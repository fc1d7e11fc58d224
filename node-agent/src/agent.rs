//! Assembling and running the agent: containerd, images, network, pods, fleet membership,
//! the job consumer, reconciliation, log rotation and the metrics endpoint.
//!
//! *Start-up order.* State directory → containerd (waits until it answers) → records loaded →
//! metrics endpoint, ingress and TLS ingress (pods that outlived an agent restart are reachable before the
//! agent has joined) → join (retried until the control plane answers) → report and heartbeat
//! loops, the ingress route feed (the other nodes' pods), the served-domains feed, the domain job
//! consumer (`domains:<id>`) and the SSH gateway (it asks the control
//! plane about every key, so it starts once joined) → a first reconcile (adopt,
//! restart, remove) → the task-event watcher, the periodic reconcile and log rotation, the pod sampler → the job consumer (restarted when Redis goes away). SIGTERM or
//! Ctrl-C stops it; pods keep running (they belong to containerd's shims, not to the agent).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::dirs::Dirs;
use crate::fleet::{self, Fleet};
use crate::image::registry::RegistryClient;
use crate::image::store::ImageStore;
use crate::network::Network;
use crate::pods::{Limits, Pods};
use crate::runtime::Runtime;

/// Connects to containerd, retrying until it answers or `patience` passes.
pub async fn connect_runtime(config: &Config, patience: Duration) -> anyhow::Result<Runtime> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let attempt = async {
            let runtime = Runtime::connect(&config.containerd_socket, &config.containerd_namespace).await?;
            runtime.version().await?;
            Ok::<Runtime, crate::runtime::RuntimeError>(runtime)
        }
        .await;
        match attempt {
            Ok(runtime) => return Ok(runtime),
            Err(err) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %err, "containerd not ready; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Builds the pod manager (shared by `run` and the tests).
pub fn build_pods(
    config: &Config,
    runtime: Runtime,
    dirs: Dirs,
) -> anyhow::Result<(Pods, mpsc::UnboundedReceiver<instapod_common::node::PodReport>)> {
    let registry = RegistryClient::new(config.plain_http_registries.clone())?;
    let images = ImageStore::new(runtime.clone(), registry, dirs.scratch());
    let network = Network::new(
        config.network.bridge.clone(),
        config.network.subnet.clone(),
        config.network.cni_bin_dir.clone(),
        dirs.ipam(),
    );
    let total = crate::capacity::total(dirs.root());
    let allocatable = crate::capacity::allocatable(&total, &config.reserved);
    crate::metrics::set_capacity(&total, &allocatable);
    let max = instapod_common::node::Resources {
        cpu_millis: config
            .max_pod
            .cpu_millis
            .min(u32::try_from(allocatable.cpu_millis).unwrap_or(u32::MAX)),
        memory_bytes: config.max_pod.memory_bytes.min(allocatable.memory_bytes),
        disk_bytes: config.max_pod.disk_bytes.min(allocatable.disk_bytes),
        pids: config.max_pod.pids,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let pods = Pods::new(
        runtime,
        images,
        network,
        dirs,
        Limits {
            max,
            log_max_bytes: config.log_max_bytes,
            log_keep: config.log_keep,
            log_driver: if config.log_driver.as_os_str().is_empty() {
                std::env::current_exe().ok()
            } else {
                Some(config.log_driver.clone())
            },
        },
        config.cgroup_parent.clone(),
        config.resolv_conf(),
        tx,
    );
    Ok((pods, rx))
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let dirs = Dirs::new(&config.state_dir)?;
    let handle = crate::metrics::install().map_err(anyhow::Error::msg)?;
    let runtime = connect_runtime(&config, Duration::from_secs(60)).await?;
    let (pods, reports) = build_pods(&config, runtime.clone(), dirs.clone())?;
    let loaded = pods.load_records()?;
    tracing::info!(records = loaded, socket = %config.containerd_socket.display(), "containerd connected");
    let samples = crate::sampler::Samples::default();
    {
        let pods = pods.clone();
        let samples = samples.clone();
        let listen = config.metrics_listen;
        tokio::spawn(async move {
            if let Err(err) = crate::metrics::serve(listen, handle, pods, samples).await {
                tracing::error!(error = %err, %listen, "metrics endpoint failed");
            }
        });
    }
    crate::domains::register_metrics();
    crate::ingress::connect::register_metrics();
    let remote_routes = Arc::new(crate::ingress::RemoteRoutes::default());
    let served_domains = Arc::new(crate::domains::Served::default());
    let challenges = Arc::new(crate::domains::challenges::ChallengeStore::default());
    let ingress = crate::ingress::fleet_wide(
        pods.clone(),
        remote_routes.clone(),
        Arc::new(crate::domains::IngressDomains {
            served: served_domains.clone(),
            challenges: challenges.clone(),
        }),
        config.ingress_https_port.unwrap_or(config.ingress_tls_listen.port()),
    );
    tokio::spawn(crate::ingress::run(config.ingress_listen, ingress.clone()));
    let platform_certificate = match (&config.platform_cert_file, &config.platform_key_file) {
        (Some(cert), Some(key)) => Some(crate::domains::tls::PlatformCertificate::load(cert, key)?),
        _ => None,
    };
    let tls_config = crate::domains::tls::server_config(Arc::new(crate::domains::tls::SniResolver::new(
        served_domains.clone(),
        platform_certificate,
    )))?;
    tokio::spawn(crate::domains::tls::run(config.ingress_tls_listen, ingress, tls_config));
    let dns = crate::domains::dns::HickoryLookup::new(
        &config.domains.nameservers,
        Duration::from_secs(config.domains.resolver_timeout_secs),
    )?;
    let issuer = Arc::new(crate::domains::acme::AcmeIssuer::new(
        config.acme.ca_file.clone(),
        challenges,
    ));
    tokio::spawn(crate::transfer::run(config.peer_listen, pods.clone()));
    let fleet = loop {
        match Fleet::join(&config, &dirs.node_file()).await {
            Ok(fleet) => break Arc::new(fleet),
            Err(err) => {
                tracing::warn!(error = %err, "joining the fleet failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let node_id = fleet.node_id();
    if config.ssh.enabled {
        let host_key = crate::ssh::host_key::load_or_create(&dirs.root().join(crate::ssh::host_key::FILE_NAME))?;
        let gateway = Arc::new(crate::ssh::Gateway::new(&config.ssh, pods.clone(), fleet.clone())?);
        tokio::spawn(crate::ssh::run(config.ssh.clone(), host_key, gateway));
    }
    tracing::info!(%node_id, queue = %instapod_common::node::node_queue(node_id), "joined the fleet");
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(fleet::report_loop(fleet.clone(), reports, shutdown.clone()));
    tokio::spawn(fleet::heartbeat_loop(
        fleet.clone(),
        config.clone(),
        pods.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::ingress::feed::run(
        fleet.clone(),
        remote_routes,
        shutdown.clone(),
    ));
    tokio::spawn(crate::domains::feed::run(
        fleet.clone(),
        served_domains,
        shutdown.clone(),
    ));
    {
        let worker = crate::domains::jobs::DomainWorker {
            fleet: fleet.clone(),
            dns,
            issuer,
        };
        let redis_url = config.redis_url.clone();
        tokio::spawn(async move {
            loop {
                match crate::domains::jobs::run(redis_url.expose(), node_id, worker.clone()).await {
                    Ok(()) => tracing::warn!("domain job consumer stopped; restarting"),
                    Err(err) => tracing::warn!(error = %err, "domain job consumer failed; restarting"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    if let Err(err) = pods.reconcile().await {
        tracing::warn!(error = %err, "initial reconcile failed");
    }
    tokio::spawn(watch_events(pods.clone(), shutdown.clone()));
    tokio::spawn(periodic(pods.clone(), config.clone(), shutdown.clone()));
    if config.metrics_sample_interval_secs > 0 {
        tokio::spawn(crate::sampler::run(
            samples,
            pods.clone(),
            fleet.clone(),
            Duration::from_secs(config.metrics_sample_interval_secs),
            Duration::from_secs(config.disk_usage_interval_secs),
            shutdown.clone(),
        ));
    }
    let jobs = {
        let pods = pods.clone();
        let config = config.clone();
        async move {
            loop {
                let result =
                    crate::jobs::run(config.redis_url.expose(), node_id, pods.clone(), config.job_concurrency).await;
                match result {
                    Ok(()) => tracing::warn!("job consumer stopped; restarting"),
                    Err(err) => tracing::warn!(error = %err, "job consumer failed; restarting"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    tracing::info!("node agent ready");
    tokio::select! {
        _ = jobs => {}
        _ = shutdown_signal() => tracing::info!("shutting down; pods keep running"),
    }
    let _ = shutdown_tx.send(true);
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Follows containerd's task events; after the stream breaks, resubscribes and reconciles
/// (events missed meanwhile are recovered from task states).
pub async fn watch_events(pods: Pods, mut shutdown: watch::Receiver<bool>) {
    loop {
        match pods.runtime().task_events().await {
            Ok(mut events) => loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(event)) => pods.on_event(event).await,
                        Some(Err(err)) => { tracing::warn!(error = %err, "event stream broke"); break; }
                        None => break,
                    },
                    _ = shutdown.changed() => return,
                }
            },
            Err(err) => tracing::warn!(error = %err, "cannot subscribe to containerd events"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(err) = pods.reconcile().await {
            tracing::warn!(error = %err, "reconcile after an event-stream break failed");
        }
    }
}

async fn periodic(pods: Pods, config: Arc<Config>, mut shutdown: watch::Receiver<bool>) {
    let rotate_every = Duration::from_secs(5);
    let reconcile_every = Duration::from_secs(config.reconcile_interval_secs);
    let mut since_reconcile = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(rotate_every) => {}
            _ = shutdown.changed() => return,
        }
        let rotating = pods.clone();
        let _ = tokio::task::spawn_blocking(move || rotating.rotate_logs()).await;
        since_reconcile += rotate_every;
        if since_reconcile >= reconcile_every {
            since_reconcile = Duration::ZERO;
            if let Err(err) = pods.reconcile().await {
                tracing::warn!(error = %err, "periodic reconcile failed");
            }
        }
    }
}
