//! The node's images: pulled from registries or imported from OCI tarballs into containerd's
//! content store, unpacked into snapshots, and found again by name.
//!
//! *Invariants.* One pull or import per image name at a time (a per-name lock), so two pods
//! with the same image do not fetch it twice. An image whose record and top snapshot exist is
//! used as it is (pull policy "if not present": a tag is not re-resolved while it is on the
//! node). Children are written before parents, each parent labelled with
//! `containerd.io/gc.ref.*` references to its children and the config with its snapshot, all
//! under one lease that is deleted once the image record holds everything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use containerd_client::types::Descriptor as CtrDescriptor;
use futures_util::Stream;
use instapod_common::node::RegistryAuth;
use tokio::sync::Mutex;

use super::archive;
use super::manifest::{Document, ImageConfig, RunDefaults};
use super::reference::ImageReference;
use super::registry::{RegistryClient, RegistryError};
use crate::runtime::content::{BlobWrite, Lease};
use crate::runtime::images::chain_ids;
use crate::runtime::{Runtime, RuntimeError, SNAPSHOTTER};

/// How long a pull's lease protects its content if the agent dies mid-pull.
const LEASE_TTL: Duration = Duration::from_secs(3600);

/// An image ready to run.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// The canonical name (`docker.io/library/busybox:latest`).
    pub name: String,
    pub defaults: RunDefaults,
    /// The chain id of the top layer: the parent of a container's rootfs snapshot.
    pub chain_id: String,
}

/// Why an image could not be made available; messages are meant for users.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("importing {}: {reason}", path.display())]
    Archive { path: PathBuf, reason: String },
}

impl ImageError {
    /// Worth retrying later (registry or containerd temporarily unavailable).
    pub fn is_transient(&self) -> bool {
        match self {
            ImageError::Registry(err) => err.is_transient(),
            ImageError::Runtime(err) => err.is_transient(),
            _ => false,
        }
    }
}

/// Counters of what the store did, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct PullStats {
    pub pulls: std::sync::atomic::AtomicU64,
    pub reused: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

/// Pulls, imports and finds images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    runtime: Runtime,
    registry: Arc<RegistryClient>,
    locks: Arc<StdMutex<HashMap<String, Arc<Mutex<()>>>>>,
    scratch: PathBuf,
    pub stats: Arc<PullStats>,
}

/// A blob to store and where its bytes come from.
enum Source {
    File(PathBuf),
    Registry,
}

impl ImageStore {
    /// `scratch` is a directory for unpacking tarballs (on the same disk as the state).
    pub fn new(runtime: Runtime, registry: RegistryClient, scratch: PathBuf) -> ImageStore {
        ImageStore {
            runtime,
            registry: Arc::new(registry),
            locks: Arc::default(),
            scratch,
            stats: Arc::default(),
        }
    }

    fn lock_for(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// `reference` parsed, or the user-facing error.
    fn parse(reference: &str) -> Result<ImageReference, ImageError> {
        reference
            .parse()
            .map_err(|err: super::reference::ReferenceError| ImageError::InvalidReference {
                reference: reference.to_string(),
                reason: err.to_string(),
            })
    }

    /// The canonical name of `reference`.
    pub fn canonical(reference: &str) -> Result<String, ImageError> {
        Ok(Self::parse(reference)?.to_string())
    }

    /// Makes `reference` available, pulling it when it is not on the node.
    pub async fn ensure(&self, reference: &str, auth: Option<&RegistryAuth>) -> Result<ImageInfo, ImageError> {
        let parsed = Self::parse(reference)?;
        let name = parsed.to_string();
        let lock = self.lock_for(&name);
        let _guard = lock.lock().await;
        if let Some(info) = self.local(&name).await? {
            self.stats.reused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(info);
        }
        let resolved = self.registry.resolve(&parsed, auth).await?;
        let lease = self.runtime.create_lease("pull", LEASE_TTL).await?;
        let result = async {
            let mut layer_sources = Vec::new();
            for layer in &resolved.layers {
                layer_sources.push((to_local(layer), Source::Registry));
            }
            let config: ImageConfig = serde_json::from_slice(&resolved.config.bytes)
                .map_err(|err| ImageError::Invalid(format!("the image config is not valid JSON: {err}")))?;
            let parts = Parts {
                index: resolved
                    .index
                    .as_ref()
                    .map(|b| (to_local(&b.descriptor), b.bytes.clone())),
                manifest: (to_local(&resolved.manifest.descriptor), resolved.manifest.bytes.clone()),
                config_desc: to_local(&resolved.config.descriptor),
                config_bytes: resolved.config.bytes.clone(),
                config,
                layers: layer_sources,
            };
            self.store(&lease, &name, parts, Some((&parsed, auth))).await
        }
        .await;
        let _ = self.runtime.delete_lease(lease).await;
        let info = result?;
        self.stats.pulls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(info)
    }

    /// Imports the OCI image layout tarball at `path` as image `name`.
    pub async fn import_archive(&self, path: &Path, name: &str) -> Result<ImageInfo, ImageError> {
        let name = Self::canonical(name)?;
        let lock = self.lock_for(&name);
        let _guard = lock.lock().await;
        let dir = self.scratch.join(format!("import-{}", uuid::Uuid::new_v4().simple()));
        let layout = {
            let path = path.to_path_buf();
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || archive::extract(&path, &dir))
                .await
                .map_err(|err| ImageError::Invalid(format!("import task failed: {err}")))?
        };
        let result = async {
            let layout = layout.map_err(|reason| ImageError::Archive {
                path: path.to_path_buf(),
                reason,
            })?;
            let lease = self.runtime.create_lease("import", LEASE_TTL).await?;
            let outcome = async {
                let parts = layout_parts(&layout).await?;
                self.store(&lease, &name, parts, None).await
            }
            .await;
            let _ = self.runtime.delete_lease(lease).await;
            outcome
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        result
    }

    /// The image `name` if it is on the node and unpacked.
    pub async fn local(&self, name: &str) -> Result<Option<ImageInfo>, ImageError> {
        let Some(target) = self.runtime.image_target(name).await? else {
            return Ok(None);
        };
        let doc = self.read_document(&target.digest).await?;
        let manifest = if doc.is_index() {
            let Some(desc) = doc.manifest_for_host() else {
                return Ok(None);
            };
            self.read_document(&desc.digest).await?
        } else {
            doc
        };
        let (Some(config_desc), Some(layers)) = (manifest.config, manifest.layers) else {
            return Ok(None);
        };
        let config: ImageConfig = match self.runtime.read_blob(&config_desc.digest).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|err| ImageError::Invalid(format!("the stored image config is not valid JSON: {err}")))?,
            Err(RuntimeError::NotFound { .. }) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let chain = chain_ids(&config.rootfs.diff_ids);
        let Some(top) = chain.last().cloned() else {
            return Ok(None);
        };
        if !self.runtime.snapshot_exists(&top).await? {
            // The record exists but the snapshots were removed: unpack again from the blobs.
            let lease = self.runtime.create_lease("unpack", LEASE_TTL).await?;
            let layers: Vec<CtrDescriptor> = layers.iter().map(to_ctr).collect();
            let unpacked = self.runtime.unpack(&lease, &layers, &config.rootfs.diff_ids).await;
            let _ = self.runtime.delete_lease(lease).await;
            if unpacked.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(ImageInfo {
            name: name.to_string(),
            defaults: config.config,
            chain_id: top,
        }))
    }

    async fn read_document(&self, digest: &str) -> Result<Document, ImageError> {
        let bytes = self.runtime.read_blob(digest).await?;
        serde_json::from_slice(&bytes).map_err(|err| ImageError::Invalid(format!("{digest} is not valid JSON: {err}")))
    }

    /// Writes layers, config, manifest and index (children first, with GC labels), unpacks
    /// and records the image.
    async fn store(
        &self,
        lease: &Lease,
        name: &str,
        parts: Parts,
        registry: Option<(&ImageReference, Option<&RegistryAuth>)>,
    ) -> Result<ImageInfo, ImageError> {
        let diff_ids = &parts.config.rootfs.diff_ids;
        if diff_ids.len() != parts.layers.len() || diff_ids.is_empty() {
            return Err(ImageError::Invalid(format!(
                "the manifest lists {} layers but the config {} diff ids",
                parts.layers.len(),
                diff_ids.len()
            )));
        }
        let chain = chain_ids(diff_ids);
        let top = chain.last().cloned().unwrap_or_default();
        for (layer, source) in &parts.layers {
            let blob = BlobWrite {
                digest: layer.digest.clone(),
                size: layer.size,
                labels: HashMap::new(),
            };
            match source {
                Source::File(path) => {
                    self.runtime.write_blob(lease, &blob, file_stream(path.clone())).await?;
                }
                Source::Registry => {
                    if self.runtime.has_blob(&layer.digest).await? {
                        continue;
                    }
                    let Some((reference, auth)) = registry else {
                        return Err(ImageError::Invalid("a registry layer without a registry".into()));
                    };
                    let stream = self.registry.blob_stream(reference, auth, &to_registry(layer)).await?;
                    let counted = CountingStream {
                        inner: stream,
                        stats: self.stats.clone(),
                    };
                    self.runtime.write_blob(lease, &blob, counted).await?;
                }
            }
        }
        let config_labels = HashMap::from([(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top.clone())]);
        self.runtime
            .write_small_blob(
                lease,
                &BlobWrite {
                    digest: parts.config_desc.digest.clone(),
                    size: parts.config_desc.size,
                    labels: config_labels,
                },
                parts.config_bytes.clone(),
            )
            .await?;
        let mut manifest_labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            parts.config_desc.digest.clone(),
        )]);
        for (i, (layer, _)) in parts.layers.iter().enumerate() {
            manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), layer.digest.clone());
        }
        let (manifest_desc, manifest_bytes) = &parts.manifest;
        self.runtime
            .write_small_blob(
                lease,
                &BlobWrite {
                    digest: manifest_desc.digest.clone(),
                    size: manifest_desc.size,
                    labels: manifest_labels,
                },
                manifest_bytes.clone(),
            )
            .await?;
        let mut target = manifest_desc.clone();
        if let Some((index_desc, index_bytes)) = &parts.index {
            let labels = HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_string(),
                manifest_desc.digest.clone(),
            )]);
            self.runtime
                .write_small_blob(
                    lease,
                    &BlobWrite {
                        digest: index_desc.digest.clone(),
                        size: index_desc.size,
                        labels,
                    },
                    index_bytes.clone(),
                )
                .await?;
            target = index_desc.clone();
        }
        let layers: Vec<CtrDescriptor> = parts.layers.iter().map(|(d, _)| to_ctr(d)).collect();
        self.runtime.unpack(lease, &layers, diff_ids).await?;
        self.runtime.put_image(lease, name, to_ctr(&target)).await?;
        Ok(ImageInfo {
            name: name.to_string(),
            defaults: parts.config.config,
            chain_id: top,
        })
    }
}

/// The pieces of one image, from a registry or a layout.
struct Parts {
    index: Option<(LocalDescriptor, Bytes)>,
    manifest: (LocalDescriptor, Bytes),
    config_desc: LocalDescriptor,
    config_bytes: Bytes,
    config: ImageConfig,
    layers: Vec<(LocalDescriptor, Source)>,
}

/// A descriptor independent of where it came from.
#[derive(Debug, Clone)]
struct LocalDescriptor {
    media_type: String,
    digest: String,
    size: i64,
}

fn to_local(d: &super::registry::Descriptor) -> LocalDescriptor {
    LocalDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
    }
}

fn to_registry(d: &LocalDescriptor) -> super::registry::Descriptor {
    super::registry::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as _,
    }
}

fn to_ctr(d: &impl AsDescriptor) -> CtrDescriptor {
    let (media_type, digest, size) = d.parts();
    CtrDescriptor {
        media_type,
        digest,
        size,
        annotations: HashMap::new(),
    }
}

trait AsDescriptor {
    fn parts(&self) -> (String, String, i64);
}

impl AsDescriptor for LocalDescriptor {
    fn parts(&self) -> (String, String, i64) {
        (self.media_type.clone(), self.digest.clone(), self.size)
    }
}

impl AsDescriptor for super::manifest::Descriptor {
    fn parts(&self) -> (String, String, i64) {
        (self.media_type.clone(), self.digest.clone(), self.size)
    }
}

/// The parts of an extracted OCI layout.
async fn layout_parts(layout: &archive::Layout) -> Result<Parts, ImageError> {
    let read = |digest: &str| -> Result<(PathBuf, Bytes), ImageError> {
        let path = layout
            .blob_path(digest)
            .ok_or_else(|| ImageError::Invalid(format!("the archive lacks blob {digest}")))?;
        let bytes = std::fs::read(&path).map_err(|err| ImageError::Invalid(format!("reading blob {digest}: {err}")))?;
        Ok((path, Bytes::from(bytes)))
    };
    let index: Document = serde_json::from_slice(&layout.index_json)
        .map_err(|err| ImageError::Invalid(format!("index.json is not valid JSON: {err}")))?;
    let top = index
        .manifest_for_host()
        .or_else(|| index.manifests.as_ref().and_then(|m| m.first()))
        .cloned()
        .ok_or_else(|| ImageError::Invalid("index.json lists no manifest".into()))?;
    let (_, top_bytes) = read(&top.digest)?;
    let top_doc: Document = serde_json::from_slice(&top_bytes)
        .map_err(|err| ImageError::Invalid(format!("{} is not JSON: {err}", top.digest)))?;
    let (index_part, manifest_desc, manifest_bytes, manifest) = if top_doc.is_index() {
        let desc = top_doc
            .manifest_for_host()
            .cloned()
            .ok_or_else(|| ImageError::Invalid("the image has no manifest for this platform".into()))?;
        let (_, bytes) = read(&desc.digest)?;
        let doc: Document = serde_json::from_slice(&bytes)
            .map_err(|err| ImageError::Invalid(format!("{} is not JSON: {err}", desc.digest)))?;
        (Some((local_of(&top), top_bytes)), desc, bytes, doc)
    } else {
        (None, top, top_bytes.clone(), top_doc)
    };
    let config_desc = manifest
        .config
        .clone()
        .ok_or_else(|| ImageError::Invalid("the manifest has no config".into()))?;
    let (_, config_bytes) = read(&config_desc.digest)?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|err| ImageError::Invalid(format!("the image config is not valid JSON: {err}")))?;
    let mut layers = Vec::new();
    for layer in manifest.layers.clone().unwrap_or_default() {
        let path = layout
            .blob_path(&layer.digest)
            .ok_or_else(|| ImageError::Invalid(format!("the archive lacks layer {}", layer.digest)))?;
        layers.push((local_of(&layer), Source::File(path)));
    }
    Ok(Parts {
        index: index_part,
        manifest: (local_of(&manifest_desc), manifest_bytes),
        config_desc: local_of(&config_desc),
        config_bytes,
        config,
        layers,
    })
}

fn local_of(d: &super::manifest::Descriptor) -> LocalDescriptor {
    LocalDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
    }
}

/// A file's bytes as a stream of 256 KiB chunks.
fn file_stream(path: PathBuf) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static {
    use tokio::io::AsyncReadExt;
    Box::pin(futures_util::stream::unfold(
        (path, None::<tokio::fs::File>, false),
        |(path, file, done)| async move {
            if done {
                return None;
            }
            let mut file = match file {
                Some(file) => file,
                None => match tokio::fs::File::open(&path).await {
                    Ok(file) => file,
                    Err(err) => return Some((Err(err), (path, None, true))),
                },
            };
            let mut buf = vec![0u8; 256 * 1024];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), (path, Some(file), false)))
                }
                Err(err) => Some((Err(err), (path, None, true))),
            }
        },
    ))
}

/// Counts the bytes a registry stream yields.
struct CountingStream<S> {
    inner: S,
    stats: Arc<PullStats>,
}

impl<S, E> Stream for CountingStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &polled {
            self.stats
                .bytes
                .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}
