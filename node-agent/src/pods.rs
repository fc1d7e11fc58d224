//! The pods of this node: turning jobs into containerd state, idempotently, and keeping it so.
//!
//! *Invariants.*
//! - One operation at a time per pod (a per-pod lock); operations on different pods run
//!   concurrently.
//! - The pod's record (spec, desired state, generation) is saved before anything is created,
//!   so after a crash the agent knows every pod it may have started. A job whose generation is
//!   older than the record's is acknowledged and ignored; a deleted pod leaves a tombstone
//!   record so a late, older job cannot bring it back.
//! - The container id is the pod id: a retried or duplicated create finds the existing
//!   container instead of making a second one. A container whose spec hash label differs from
//!   the spec being applied is replaced.
//! - A failure that retrying cannot fix (bad image, bad command, absurd limits) is reported as
//!   `failed` with its reason and leaves nothing behind but the record (and the volume when it
//!   holds data). A transient failure (containerd or the registry unavailable) is returned to
//!   the job system, which retries with backoff.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use instapod_common::node::{HeartbeatPod, NodeJob, NodePodState, PodReport, PodSpec, Resources, RestartPolicy};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc};
use uuid::Uuid;

use crate::dirs::{Dirs, write_atomic};
use crate::image::store::{ImageError, ImageStore};
use crate::network::{Attachment, Network};
use crate::runtime::containers::{NewContainer, TaskEvent, TaskState};
use crate::runtime::{Runtime, RuntimeError};
use crate::spec::{self, PodPaths, SpecError};

const LABEL_POD: &str = "instapod.pod-id";
const LABEL_NAME: &str = "instapod.pod-name";
const LABEL_SPEC_HASH: &str = "instapod.spec-hash";
const SIGTERM: u32 = 15;
const SIGKILL: u32 = 9;
/// Restarts allowed in a crash loop before the pod is declared failed (`on-failure`; `always`
/// keeps trying with the longest backoff).
pub const MAX_RESTARTS: u32 = 5;
/// A task that ran this long resets its restart count.
const STABLE_RUN: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the control plane wants of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Stopped,
    Deleted,
}

/// A pod's record, saved in the state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub spec: PodSpec,
    pub desired: Desired,
    pub generation: i64,
    pub state: NodePodState,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub attachment: Option<Attachment>,
    #[serde(default)]
    pub retain_volume: bool,
    #[serde(default)]
    pub restarts: u32,
    /// The volume was filled from the spec's `volume_source` (a clone or a move): later specs
    /// that still name a source do not fill it again. Reset by a delete.
    #[serde(default)]
    pub volume_filled: bool,
}

/// What handling a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The job's generation is older than the pod's: acknowledged, nothing done.
    Stale,
    /// The same operation at the same generation is being applied right now (a job delivered
    /// twice, or re-sent by the scheduler's reconciler while the first waited in the queue):
    /// acknowledged at once instead of holding a job slot while it waits for the pod's lock.
    Duplicate,
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// Worth retrying (containerd, the registry or the network are temporarily unavailable).
    #[error("{0}")]
    Transient(String),
    #[error("the pod {0} is not on this node")]
    Unknown(Uuid),
    #[error("cannot save the pod's record: {0}")]
    Storage(#[from] std::io::Error),
}

/// The limits the node accepts for one pod, and how its log is written.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max: Resources,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// The log driver program (`None`: raw `file://` logs, without timestamps or streams).
    pub log_driver: Option<PathBuf>,
}

/// Runtime state of a pod that is not saved.
#[derive(Debug, Default)]
struct Live {
    oom: bool,
    started_at: Option<Instant>,
}

/// Everything the pod manager needs.
#[derive(Debug, Clone)]
pub struct Pods {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    runtime: Runtime,
    images: ImageStore,
    network: Network,
    dirs: Dirs,
    limits: Limits,
    cgroup_parent: String,
    resolv_conf: String,
    reports: mpsc::UnboundedSender<PodReport>,
    locks: StdMutex<HashMap<Uuid, Arc<Mutex<()>>>>,
    /// The operation (generation, name) each pod's lock holder is applying.
    applying: StdMutex<HashMap<Uuid, (i64, &'static str)>>,
    records: StdMutex<HashMap<Uuid, PodRecord>>,
    /// Bumped after every change of `records`, so derived views (the ingress's routing table)
    /// are rebuilt only when something changed.
    records_version: AtomicU64,
    live: StdMutex<HashMap<Uuid, Live>>,
    /// Transfer tokens the peer endpoint accepts (volumes other nodes may pull).
    grants: crate::transfer::Grants,
    /// Pulls volumes from other nodes' peer endpoints.
    peer_http: reqwest::Client,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The client that pulls volumes from peers (plain HTTP between nodes; no overall timeout, as a
/// volume may be large, but a stalled read ends it).
fn peer_http_client() -> reqwest::Client {
    // reqwest uses rustls without a bundled provider: the workspace uses aws-lc-rs only.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .no_proxy()
        .build()
        .unwrap_or_default()
}

fn transient(err: impl std::fmt::Display) -> PodError {
    PodError::Transient(err.to_string())
}

/// A short, stable hash of what the container is made from (not the generation: a new
/// generation with the same content keeps the container).
fn spec_hash(spec: &PodSpec, image_chain: &str) -> String {
    let mut hasher = Sha256::new();
    let content = PodSpec {
        generation: 0,
        volume_source: None,
        ..spec.clone()
    };
    hasher.update(serde_json::to_vec(&(content, image_chain)).unwrap_or_default());
    hex::encode(&hasher.finalize()[..12])
}

/// A user-facing failure, or a transient error to retry.
enum StepError {
    Failed(String),
    Transient(String),
}

impl StepError {
    fn classify(transient: bool, err: &impl std::fmt::Display) -> StepError {
        if transient {
            StepError::Transient(err.to_string())
        } else {
            StepError::Failed(err.to_string())
        }
    }
}

impl From<RuntimeError> for StepError {
    fn from(err: RuntimeError) -> Self {
        StepError::classify(err.is_transient(), &err)
    }
}

impl From<ImageError> for StepError {
    fn from(err: ImageError) -> Self {
        StepError::classify(err.is_transient(), &err)
    }
}

impl From<SpecError> for StepError {
    fn from(err: SpecError) -> Self {
        StepError::Failed(err.to_string())
    }
}

/// Marks what a pod's lock holder applies, until dropped.
struct Applying<'a> {
    map: &'a StdMutex<HashMap<Uuid, (i64, &'static str)>>,
    id: Uuid,
}

impl<'a> Applying<'a> {
    fn start(map: &'a StdMutex<HashMap<Uuid, (i64, &'static str)>>, id: Uuid, what: (i64, &'static str)) -> Self {
        map.lock().unwrap_or_else(|p| p.into_inner()).insert(id, what);
        Applying { map, id }
    }
}

impl Drop for Applying<'_> {
    fn drop(&mut self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Pods {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runtime: Runtime,
        images: ImageStore,
        network: Network,
        dirs: Dirs,
        limits: Limits,
        cgroup_parent: String,
        resolv_conf: String,
        reports: mpsc::UnboundedSender<PodReport>,
    ) -> Pods {
        Pods {
            inner: Arc::new(Inner {
                runtime,
                images,
                network,
                dirs,
                limits,
                cgroup_parent,
                resolv_conf,
                reports,
                locks: StdMutex::default(),
                applying: StdMutex::default(),
                records: StdMutex::default(),
                records_version: AtomicU64::new(0),
                live: StdMutex::default(),
                grants: crate::transfer::Grants::default(),
                peer_http: peer_http_client(),
            }),
        }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    pub fn images(&self) -> &ImageStore {
        &self.inner.images
    }

    pub fn dirs(&self) -> &Dirs {
        &self.inner.dirs
    }

    /// The transfer tokens this node's peer endpoint accepts.
    pub fn grants(&self) -> &crate::transfer::Grants {
        &self.inner.grants
    }

    fn lock_for(&self, id: Uuid) -> Arc<Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id).or_default().clone()
    }

    /// Loads every saved record (at start-up).
    pub fn load_records(&self) -> std::io::Result<usize> {
        let mut loaded = HashMap::new();
        for entry in std::fs::read_dir(self.inner.dirs.records())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(bytes) = std::fs::read(&path)
            {
                match serde_json::from_slice::<PodRecord>(&bytes) {
                    Ok(record) => {
                        loaded.insert(record.spec.pod_id, record);
                    }
                    Err(err) => tracing::warn!(path = %path.display(), error = %err, "unreadable pod record skipped"),
                }
            }
        }
        let count = loaded.len();
        *self.inner.records.lock().unwrap_or_else(|p| p.into_inner()) = loaded;
        self.inner.records_version.fetch_add(1, Ordering::Release);
        Ok(count)
    }

    /// Whether pod `id` is on this node and not being deleted (what a log follower polls).
    pub fn hosts(&self, id: Uuid) -> bool {
        self.inner
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|record| record.desired != Desired::Deleted)
    }

    /// Rotated log files kept per pod.
    pub fn log_keep(&self) -> u32 {
        self.inner.limits.log_keep
    }

    pub fn record(&self, id: Uuid) -> Option<PodRecord> {
        self.inner
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn save(&self, record: &PodRecord) -> Result<(), PodError> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| PodError::Storage(std::io::Error::other(e)))?;
        write_atomic(&self.inner.dirs.record(record.spec.pod_id), &bytes)?;
        self.inner
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.spec.pod_id, record.clone());
        self.inner.records_version.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes whenever a record is saved or the records are loaded.
    pub fn records_version(&self) -> u64 {
        self.inner.records_version.load(Ordering::Acquire)
    }

    /// Calls `visit` with every record (tombstones included), under the records' lock: keep it
    /// short and free of I/O.
    pub fn visit_records(&self, mut visit: impl FnMut(&PodRecord)) {
        for record in self.inner.records.lock().unwrap_or_else(|p| p.into_inner()).values() {
            visit(record);
        }
    }

    /// The pods this node knows, for heartbeats (tombstones excluded).
    pub fn summary(&self) -> Vec<HeartbeatPod> {
        let records = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut pods: Vec<HeartbeatPod> = records
            .values()
            .filter(|r| r.desired != Desired::Deleted)
            .map(|r| HeartbeatPod {
                pod_id: r.spec.pod_id,
                generation: r.generation,
                state: r.state,
                ip: r.attachment.as_ref().map(|a| a.ip.clone()),
            })
            .collect();
        pods.sort_by_key(|p| p.pod_id);
        pods
    }

    /// Counts of pods by state, for metrics.
    pub fn counts(&self) -> HashMap<NodePodState, usize> {
        let mut counts = HashMap::new();
        for record in self.inner.records.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if record.desired != Desired::Deleted {
                *counts.entry(record.state).or_default() += 1;
            }
        }
        counts
    }

    /// What the pods on this node (not being deleted) reserve, for metrics.
    pub fn allocated(&self) -> instapod_common::node::Capacity {
        let mut sum = instapod_common::node::Capacity::default();
        for record in self.inner.records.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if record.desired != Desired::Deleted {
                let resources = &record.spec.resources;
                sum.cpu_millis += u64::from(resources.cpu_millis);
                sum.memory_bytes += resources.memory_bytes;
                sum.disk_bytes += resources.disk_bytes;
            }
        }
        sum
    }

    fn set_state(&self, record: &mut PodRecord, state: NodePodState, reason: Option<String>, exit_code: Option<i32>) {
        let changed = record.state != state || record.reason != reason || record.exit_code != exit_code;
        record.state = state;
        record.reason = reason.clone();
        record.exit_code = exit_code;
        if changed {
            let _ = self.inner.reports.send(PodReport {
                pod_id: record.spec.pod_id,
                generation: record.generation,
                state,
                reason,
                exit_code,
                ip: record.attachment.as_ref().map(|a| a.ip.clone()),
                at: now_rfc3339(),
            });
        }
    }

    /// Applies one job.
    pub async fn handle(&self, job: &NodeJob) -> Result<Outcome, PodError> {
        let id = job.pod_id();
        let this = (job.generation(), job.operation());
        let idempotent = matches!(job, NodeJob::EnsureRunning { .. } | NodeJob::Delete { .. });
        if idempotent && self.inner.applying.lock().unwrap_or_else(|p| p.into_inner()).get(&id) == Some(&this) {
            return Ok(Outcome::Duplicate);
        }
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let _applying = Applying::start(&self.inner.applying, id, this);
        let existing = self.record(id);
        // A clone's export does not touch the pod, so its generation does not matter.
        let clone_export = matches!(job, NodeJob::ExportVolume { stop_first: false, .. });
        if let Some(existing) = &existing
            && job.generation() < existing.generation
            && !clone_export
        {
            tracing::info!(pod = %id, job = job.operation(), generation = job.generation(), current = existing.generation, "stale job ignored");
            return Ok(Outcome::Stale);
        }
        match job {
            NodeJob::EnsureRunning { spec } | NodeJob::Restart { spec } => {
                let mut record = match existing {
                    Some(mut record) => {
                        record.spec = spec.clone();
                        record.generation = spec.generation;
                        record.desired = Desired::Running;
                        record
                    }
                    None => PodRecord {
                        spec: spec.clone(),
                        desired: Desired::Running,
                        generation: spec.generation,
                        state: NodePodState::Starting,
                        reason: None,
                        exit_code: None,
                        attachment: None,
                        retain_volume: false,
                        restarts: 0,
                        volume_filled: false,
                    },
                };
                record.restarts = 0;
                if record.volume_filled {
                    record.spec.volume_source = None;
                }
                self.save(&record)?;
                if record.spec.volume_source.is_some() && !self.fill_volume(&mut record).await? {
                    return Ok(Outcome::Applied);
                }
                if matches!(job, NodeJob::Restart { .. }) {
                    self.stop_task(&mut record, 10).await?;
                }
                self.ensure_running(&mut record).await?;
            }
            NodeJob::Stop {
                generation, grace_secs, ..
            } => {
                let mut record = existing.ok_or(PodError::Unknown(id))?;
                record.generation = *generation;
                record.desired = Desired::Stopped;
                self.save(&record)?;
                self.stop_task(&mut record, *grace_secs).await?;
                self.set_state(&mut record, NodePodState::Stopped, None, None);
                self.save(&record)?;
            }
            NodeJob::Resize {
                generation, resources, ..
            } => {
                let mut record = existing.ok_or(PodError::Unknown(id))?;
                record.generation = *generation;
                if let Err(err) = spec::check_resources(resources, &self.inner.limits.max) {
                    let (state, exit_code) = (record.state, record.exit_code);
                    self.set_state(&mut record, state, Some(format!("resize refused: {err}")), exit_code);
                    self.save(&record)?;
                    return Ok(Outcome::Applied);
                }
                record.spec.resources = *resources;
                record.spec.generation = *generation;
                self.save(&record)?;
                self.resize_live(&mut record).await?;
            }
            NodeJob::Delete {
                generation,
                retain_volume,
                ..
            } => {
                let mut record = match existing {
                    Some(record) => record,
                    None => {
                        // Never seen: leave a tombstone so an older job cannot create it.
                        PodRecord {
                            spec: PodSpec {
                                pod_id: id,
                                name: String::new(),
                                generation: *generation,
                                image: String::new(),
                                registry_auth: None,
                                entrypoint: None,
                                command: None,
                                env: Default::default(),
                                workdir: None,
                                resources: Resources {
                                    cpu_millis: 0,
                                    memory_bytes: 0,
                                    disk_bytes: 0,
                                    pids: 0,
                                },
                                volume_mount: "/data".into(),
                                restart_policy: RestartPolicy::Never,
                                http_port: None,
                                hostnames: Vec::new(),
                                volume_source: None,
                            },
                            desired: Desired::Deleted,
                            generation: *generation,
                            state: NodePodState::Deleted,
                            reason: None,
                            exit_code: None,
                            attachment: None,
                            retain_volume: *retain_volume,
                            restarts: 0,
                            volume_filled: false,
                        }
                    }
                };
                record.generation = *generation;
                record.desired = Desired::Deleted;
                record.retain_volume = *retain_volume;
                record.volume_filled = false;
                record.spec.volume_source = None;
                self.save(&record)?;
                self.remove_everything(&mut record, !*retain_volume).await?;
                self.set_state(&mut record, NodePodState::Deleted, None, None);
                self.save(&record)?;
            }
            NodeJob::ExportVolume {
                generation,
                token,
                expires_in_secs,
                stop_first,
                ..
            } => {
                let mut record = existing.ok_or(PodError::Unknown(id))?;
                // Deleted here, or its own volume not received yet: nothing to hand out.
                if record.desired == Desired::Deleted || (record.spec.volume_source.is_some() && !record.volume_filled)
                {
                    return Err(PodError::Unknown(id));
                }
                if *stop_first {
                    // A move: the pod stops here for good (its copy starts elsewhere), so the
                    // volume is consistent while it is sent.
                    record.generation = *generation;
                    record.desired = Desired::Stopped;
                    self.save(&record)?;
                    self.stop_task(&mut record, 10).await?;
                    self.set_state(&mut record, NodePodState::Stopped, None, None);
                    self.save(&record)?;
                }
                self.inner
                    .grants
                    .allow(id, token, Duration::from_secs(*expires_in_secs));
                tracing::info!(pod = %id, stop_first, "volume export granted");
            }
        }
        Ok(Outcome::Applied)
    }

    /// Fills a new pod's volume from its spec's `volume_source` (pulled from the source node's
    /// peer endpoint, verified, renamed into place). Returns whether the pod may start; on
    /// failure the pod is reported `failed` and nothing of the transfer is left.
    async fn fill_volume(&self, record: &mut PodRecord) -> Result<bool, PodError> {
        let Some(source) = record.spec.volume_source.clone() else {
            return Ok(true);
        };
        let id = record.spec.pod_id;
        if record.state != NodePodState::Starting {
            self.set_state(record, NodePodState::Starting, None, None);
            self.save(record)?;
        }
        let volume = self.inner.dirs.volume(id);
        let staging = self.inner.dirs.volume(id).with_file_name(format!(".incoming-{id}"));
        tracing::info!(pod = %id, source_pod = %source.pod_id, addr = %source.addr, "filling the volume from a peer");
        let started = Instant::now();
        match crate::transfer::import_volume(
            &self.inner.peer_http,
            &source,
            &volume,
            &staging,
            record.spec.resources.disk_bytes,
        )
        .await
        {
            Ok(bytes) => {
                tracing::info!(pod = %id, bytes, elapsed_ms = started.elapsed().as_millis() as u64, "volume filled and verified");
                record.volume_filled = true;
                record.spec.volume_source = None;
                self.save(record)?;
                Ok(true)
            }
            Err(err) => {
                tracing::warn!(pod = %id, error = %err, "filling the volume failed");
                record.desired = Desired::Stopped;
                self.set_state(record, NodePodState::Failed, Some(err.to_string()), None);
                self.save(record)?;
                Ok(false)
            }
        }
    }

    /// Makes the pod's task run: image, volume, network, container, task.
    async fn ensure_running(&self, record: &mut PodRecord) -> Result<(), PodError> {
        let id = record.spec.pod_id;
        // A volume still to be filled from a peer: only the job that carries the source starts it.
        if record.spec.volume_source.is_some() && !record.volume_filled {
            return Ok(());
        }
        if matches!(
            self.inner.runtime.task_state(&id.to_string()).await,
            Ok(Some(TaskState::Running))
        ) && self.container_matches(record).await.unwrap_or(false)
        {
            if record.state != NodePodState::Running {
                self.set_state(record, NodePodState::Running, None, None);
                self.save(record)?;
            }
            return Ok(());
        }
        if record.state != NodePodState::Starting {
            self.set_state(record, NodePodState::Starting, None, None);
            self.save(record)?;
        }
        match self.start_steps(record).await {
            Ok(()) => {
                self.live_mut(id, |live| {
                    live.oom = false;
                    live.started_at = Some(Instant::now());
                });
                self.set_state(record, NodePodState::Running, None, None);
                self.save(record)?;
                Ok(())
            }
            Err(StepError::Transient(message)) => Err(PodError::Transient(message)),
            Err(StepError::Failed(reason)) => {
                tracing::warn!(pod = %id, %reason, "pod failed to start");
                self.remove_everything(record, false).await?;
                self.remove_volume_if_empty(id);
                record.desired = Desired::Stopped;
                self.set_state(record, NodePodState::Failed, Some(reason), None);
                self.save(record)?;
                Ok(())
            }
        }
    }

    fn live_mut(&self, id: Uuid, f: impl FnOnce(&mut Live)) {
        let mut live = self.inner.live.lock().unwrap_or_else(|p| p.into_inner());
        f(live.entry(id).or_default());
    }

    async fn container_matches(&self, record: &PodRecord) -> Result<bool, RuntimeError> {
        let Some((info, _)) = self.inner.runtime.container(&record.spec.pod_id.to_string()).await? else {
            return Ok(false);
        };
        let Ok(Some(image)) = self
            .inner
            .images
            .local(&ImageStore::canonical(&record.spec.image).unwrap_or_default())
            .await
        else {
            return Ok(false);
        };
        Ok(info.labels.get(LABEL_SPEC_HASH) == Some(&spec_hash(&record.spec, &image.chain_id)))
    }

    async fn start_steps(&self, record: &mut PodRecord) -> Result<(), StepError> {
        let id = record.spec.pod_id;
        let cid = id.to_string();
        spec::check_resources(&record.spec.resources, &self.inner.limits.max)?;
        let image = self
            .inner
            .images
            .ensure(&record.spec.image, record.spec.registry_auth.as_ref())
            .await?;
        let volume = self.inner.dirs.volume(id);
        let files = self.inner.dirs.pod_files(id);
        let io = |e: std::io::Error| StepError::Transient(format!("preparing the pod's files: {e}"));
        std::fs::create_dir_all(&volume).map_err(io)?;
        std::fs::create_dir_all(&files).map_err(io)?;
        let attachment = self
            .inner
            .network
            .setup(id, record.attachment.as_ref())
            .await
            .map_err(|e| StepError::Transient(e.to_string()))?;
        if record.attachment.as_ref() != Some(&attachment) {
            record.attachment = Some(attachment.clone());
            self.save(record).map_err(|e| StepError::Transient(e.to_string()))?;
        }
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
            attachment.ip, record.spec.name
        );
        write_atomic(&files.join("hosts"), hosts.as_bytes()).map_err(io)?;
        write_atomic(&files.join("resolv.conf"), self.inner.resolv_conf.as_bytes()).map_err(io)?;
        let paths = PodPaths {
            netns: attachment.netns.clone(),
            volume,
            hosts_file: files.join("hosts"),
            resolv_file: files.join("resolv.conf"),
        };
        let spec_json = spec::build(&record.spec, &image.defaults, &paths, &self.inner.cgroup_parent)?;
        let hash = spec_hash(&record.spec, &image.chain_id);
        // The container: reuse it when it was made from the same spec, replace it otherwise.
        match self.inner.runtime.container(&cid).await? {
            Some((info, _)) if info.labels.get(LABEL_SPEC_HASH) == Some(&hash) => {}
            Some(_) => {
                self.remove_container(id).await?;
                self.create_container(record, &image.name, &image.chain_id, spec_json, &hash)
                    .await?;
            }
            None => {
                self.create_container(record, &image.name, &image.chain_id, spec_json, &hash)
                    .await?
            }
        }
        let log = crate::log_driver::log_uri(self.inner.limits.log_driver.as_deref(), &self.inner.dirs.log(id));
        match self.inner.runtime.task_state(&cid).await? {
            Some(TaskState::Running) | Some(TaskState::Paused) => return Ok(()),
            Some(TaskState::Created) => {}
            Some(TaskState::Stopped { .. }) | Some(TaskState::Unknown) => {
                self.inner.runtime.delete_task(&cid).await?;
                let mounts = self.inner.runtime.prepare_rootfs(&cid, &image.chain_id).await?;
                self.inner.runtime.create_task(&cid, mounts, &log).await?;
            }
            None => {
                let mounts = self.inner.runtime.prepare_rootfs(&cid, &image.chain_id).await?;
                self.inner.runtime.create_task(&cid, mounts, &log).await?;
            }
        }
        self.inner.runtime.start_task(&cid).await?;
        Ok(())
    }

    async fn create_container(
        &self,
        record: &PodRecord,
        image: &str,
        chain_id: &str,
        spec_json: Vec<u8>,
        hash: &str,
    ) -> Result<(), StepError> {
        let cid = record.spec.pod_id.to_string();
        self.inner.runtime.prepare_rootfs(&cid, chain_id).await?;
        let labels = HashMap::from([
            (LABEL_POD.to_string(), cid.clone()),
            (LABEL_NAME.to_string(), record.spec.name.clone()),
            (LABEL_SPEC_HASH.to_string(), hash.to_string()),
        ]);
        match self
            .inner
            .runtime
            .create_container(NewContainer {
                id: cid.clone(),
                image: image.to_string(),
                labels,
                spec_json,
                snapshot_key: cid,
            })
            .await
        {
            Ok(()) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Stops the task: SIGTERM, up to `grace_secs`, then SIGKILL; then deletes the task.
    async fn stop_task(&self, record: &mut PodRecord, grace_secs: u32) -> Result<(), PodError> {
        let cid = record.spec.pod_id.to_string();
        let runtime = &self.inner.runtime;
        match runtime.task_state(&cid).await.map_err(transient)? {
            None => return Ok(()),
            Some(TaskState::Running) | Some(TaskState::Paused) | Some(TaskState::Unknown) => {
                runtime.kill_task(&cid, SIGTERM).await.map_err(transient)?;
                let deadline = Instant::now() + Duration::from_secs(u64::from(grace_secs));
                let mut killed = false;
                loop {
                    match runtime.task_state(&cid).await.map_err(transient)? {
                        None | Some(TaskState::Stopped { .. }) => break,
                        _ => {}
                    }
                    if !killed && Instant::now() >= deadline {
                        runtime.kill_task(&cid, SIGKILL).await.map_err(transient)?;
                        killed = true;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
            Some(TaskState::Created) | Some(TaskState::Stopped { .. }) => {}
        }
        runtime.delete_task(&cid).await.map_err(transient)?;
        Ok(())
    }

    async fn remove_container(&self, id: Uuid) -> Result<(), RuntimeError> {
        let cid = id.to_string();
        let runtime = &self.inner.runtime;
        if runtime.task_state(&cid).await?.is_some() {
            runtime.kill_task(&cid, SIGKILL).await?;
            for _ in 0..200 {
                if matches!(runtime.task_state(&cid).await?, None | Some(TaskState::Stopped { .. })) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            runtime.delete_task(&cid).await?;
        }
        runtime.delete_container(&cid).await?;
        runtime.remove_snapshot(&cid).await?;
        Ok(())
    }

    /// Removes task, container, snapshot and network (and the volume and logs when asked).
    async fn remove_everything(&self, record: &mut PodRecord, volume: bool) -> Result<(), PodError> {
        let id = record.spec.pod_id;
        self.remove_container(id).await.map_err(transient)?;
        self.inner.network.teardown(id).await.map_err(transient)?;
        record.attachment = None;
        let _ = std::fs::remove_dir_all(self.inner.dirs.pod_files(id));
        if volume {
            let volume = self.inner.dirs.volume(id);
            if volume.exists() {
                std::fs::remove_dir_all(&volume)?;
            }
            crate::logs::remove_all(&self.inner.dirs.log(id), self.inner.limits.log_keep);
        }
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(())
    }

    fn remove_volume_if_empty(&self, id: Uuid) {
        let volume = self.inner.dirs.volume(id);
        if std::fs::read_dir(&volume).is_ok_and(|mut d| d.next().is_none()) {
            let _ = std::fs::remove_dir(&volume);
        }
    }

    async fn resize_live(&self, record: &mut PodRecord) -> Result<(), PodError> {
        let cid = record.spec.pod_id.to_string();
        let resources = spec::resources(&record.spec.resources, false).map_err(|e| transient(e.to_string()))?;
        let json = serde_json::to_vec(&resources).map_err(transient)?;
        if matches!(
            self.inner.runtime.task_state(&cid).await.map_err(transient)?,
            Some(TaskState::Running)
        ) {
            self.inner
                .runtime
                .update_task_resources(&cid, json)
                .await
                .map_err(transient)?;
        }
        // Keep the container's spec and hash in step so a restart keeps the new limits.
        if let Some((info, spec_json)) = self.inner.runtime.container(&cid).await.map_err(transient)?
            && let Ok(mut full) = serde_json::from_slice::<serde_json::Value>(&spec_json)
        {
            let all = spec::resources(&record.spec.resources, true).map_err(|e| transient(e.to_string()))?;
            full["linux"]["resources"] = serde_json::to_value(all).map_err(transient)?;
            let mut labels = info.labels.clone();
            if let Ok(Some(image)) = self
                .inner
                .images
                .local(&ImageStore::canonical(&record.spec.image).unwrap_or_default())
                .await
            {
                labels.insert(LABEL_SPEC_HASH.to_string(), spec_hash(&record.spec, &image.chain_id));
            }
            let bytes = serde_json::to_vec(&full).map_err(transient)?;
            self.inner
                .runtime
                .update_container(&cid, bytes, labels)
                .await
                .map_err(transient)?;
        }
        self.save(record)?;
        Ok(())
    }

    /// Handles a task event from containerd: OOM marks, exits apply the restart policy.
    pub async fn on_event(&self, event: TaskEvent) {
        match event {
            TaskEvent::Oom { container_id } => {
                if let Ok(id) = container_id.parse::<Uuid>() {
                    self.live_mut(id, |live| live.oom = true);
                }
            }
            TaskEvent::Exit {
                container_id,
                exit_status,
            } => {
                let Ok(id) = container_id.parse::<Uuid>() else { return };
                if self.record(id).is_none() {
                    return;
                }
                let pods = self.clone();
                tokio::spawn(async move { pods.on_exit(id, exit_status).await });
            }
        }
    }

    async fn on_exit(&self, id: Uuid, exit_status: u32) {
        let delay = {
            let lock = self.lock_for(id);
            let _guard = lock.lock().await;
            let Some(mut record) = self.record(id) else { return };
            if record.desired != Desired::Running {
                return;
            }
            let cid = id.to_string();
            // A newer task may already run (the exit was of the one a job replaced).
            match self.inner.runtime.task_state(&cid).await {
                Ok(Some(TaskState::Stopped { .. })) => {}
                _ => return,
            }
            let _ = self.inner.runtime.delete_task(&cid).await;
            let (oom, ran) = {
                let mut live = self.inner.live.lock().unwrap_or_else(|p| p.into_inner());
                let entry = live.entry(id).or_default();
                let oom = std::mem::take(&mut entry.oom);
                (oom, entry.started_at.map(|t| t.elapsed()).unwrap_or_default())
            };
            let code = exit_status as i32;
            let reason = if oom {
                format!(
                    "out of memory: killed at the {} MiB limit",
                    record.spec.resources.memory_bytes / (1024 * 1024)
                )
            } else {
                format!("exit code {code}")
            };
            if ran >= STABLE_RUN {
                record.restarts = 0;
            }
            let failed = oom || code != 0;
            let restart = match record.spec.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => failed && record.restarts < MAX_RESTARTS,
                RestartPolicy::Never => false,
            };
            let state = if failed && !restart {
                NodePodState::Failed
            } else {
                NodePodState::Exited
            };
            let reason = if failed && !restart && record.spec.restart_policy == RestartPolicy::OnFailure {
                format!("crash loop: exited {} times, last: {reason}", record.restarts + 1)
            } else {
                reason
            };
            self.set_state(&mut record, state, Some(reason), Some(code));
            if !restart {
                record.desired = Desired::Stopped;
                let _ = self.save(&record);
                return;
            }
            let backoff = Duration::from_secs(1u64 << record.restarts.min(6)).min(MAX_BACKOFF);
            record.restarts += 1;
            crate::metrics::pod_restarted(id);
            let _ = self.save(&record);
            (backoff, record.generation)
        };
        let (backoff, generation) = delay;
        tokio::time::sleep(backoff).await;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Some(mut record) = self.record(id) else { return };
        if record.desired != Desired::Running || record.generation != generation {
            return;
        }
        if let Err(err) = self.ensure_running(&mut record).await {
            tracing::warn!(pod = %id, error = %err, "restart failed; the next reconcile retries");
        }
    }

    /// Converges the node to the records: adopts containers, restarts what should run, stops
    /// what should not, removes containers that belong to no pod.
    pub async fn reconcile(&self) -> Result<(), PodError> {
        let containers = self.inner.runtime.containers().await.map_err(transient)?;
        for container in containers {
            let Ok(id) = container.id.parse::<Uuid>() else { continue };
            if !container.labels.contains_key(LABEL_POD) {
                continue;
            }
            let known = self.record(id).is_some_and(|r| r.desired != Desired::Deleted);
            if !known {
                let lock = self.lock_for(id);
                let _guard = lock.lock().await;
                if self.record(id).is_some_and(|r| r.desired != Desired::Deleted) {
                    continue;
                }
                tracing::info!(pod = %id, "removing a container that belongs to no pod");
                self.remove_container(id).await.map_err(transient)?;
                self.inner.network.teardown(id).await.map_err(transient)?;
            }
        }
        let ids: Vec<Uuid> = self
            .inner
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for id in ids {
            let lock = self.lock_for(id);
            let _guard = lock.lock().await;
            let Some(mut record) = self.record(id) else { continue };
            let result = match record.desired {
                Desired::Running => match self.inner.runtime.task_state(&id.to_string()).await {
                    // An exit the event stream missed: let the restart policy decide.
                    Ok(Some(TaskState::Stopped { exit_status })) if record.state == NodePodState::Running => {
                        drop(_guard);
                        self.on_exit(id, exit_status).await;
                        Ok(())
                    }
                    _ => self.ensure_running(&mut record).await,
                },
                Desired::Stopped => {
                    let stopped = self.stop_task(&mut record, 10).await;
                    if stopped.is_ok() && record.state == NodePodState::Running {
                        self.set_state(&mut record, NodePodState::Stopped, None, None);
                        let _ = self.save(&record);
                    }
                    stopped
                }
                Desired::Deleted => {
                    if record.state != NodePodState::Deleted {
                        let volume = !record.retain_volume;
                        let removed = self.remove_everything(&mut record, volume).await;
                        if removed.is_ok() {
                            self.set_state(&mut record, NodePodState::Deleted, None, None);
                            let _ = self.save(&record);
                        }
                        removed
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(err) = result {
                tracing::warn!(pod = %id, error = %err, "reconcile step failed");
            }
        }
        Ok(())
    }

    /// Rotates every pod's log that grew past the limit.
    pub fn rotate_logs(&self) {
        let ids: Vec<Uuid> = self
            .inner
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for id in ids {
            let log = self.inner.dirs.log(id);
            if let Err(err) =
                crate::logs::rotate_if_large(&log, self.inner.limits.log_max_bytes, self.inner.limits.log_keep)
            {
                tracing::warn!(pod = %id, error = %err, "log rotation failed");
            }
        }
    }
}
