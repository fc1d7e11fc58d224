//! Volume transfers between nodes, for clones and moves: the peer endpoint that streams a pod's
//! volume to another node (`peer_listen`; it also serves pod logs and the files API to the
//! control plane, see `log_reader.rs` and `files/`), the grants that say which one-time tokens it
//! accepts, and the receiving side that pulls, unpacks and verifies a volume before its pod
//! starts.
//!
//! *Design.* The scheduler mints a random token per transfer and sends it to both nodes: the
//! source gets [`NodeJob::ExportVolume`](instapod_common::node::NodeJob) (kept here as a
//! [`Grants`] entry: the token's SHA-256 and an expiry, consumed by the first pull), the
//! destination gets the pod spec's `volume_source`. The destination calls
//! `GET /v1/volumes/{pod_id}` with `Authorization: Bearer <token>`; the answer is a tar stream
//! of the volume followed by the 32-byte SHA-256 of everything before it. The receiver unpacks
//! into a staging directory beside the volumes while hashing, compares the digest at the end
//! and only then renames the staging directory into place; any failure removes it. Both sides
//! stream through bounded channels (a few 64 KiB chunks), never holding a volume in memory.
//!
//! *Safety.* The sender walks the volume with directory file descriptors and `O_NOFOLLOW`, so a
//! symlink a pod planted is archived as a symlink and never followed on the host; sockets,
//! FIFOs and devices are skipped. The receiver accepts only relative paths of normal
//! components, regular files, directories and symlinks (stored as symlinks, whatever they point
//! at: they are resolved inside the pod), and creates everything relative to directory file
//! descriptors opened with `O_NOFOLLOW`, so an entry can never be written through a symlink an
//! earlier entry made. Modes (permission bits), owners and file modification times are kept.
//!
//! *Limitations.* A clone copies a running pod's volume while the pod writes to it: a file
//! written during the copy may be torn (a move stops the pod first). Hard links become separate
//! files. Extended attributes and ACLs are not copied.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use instapod_common::node::VolumeSource;
use instapod_common::peer_token::{self, Scope};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::pods::Pods;

/// Length of the SHA-256 trailer that ends every volume stream.
pub const DIGEST_LEN: usize = 32;
/// Prefix of transfer tokens.
pub const TOKEN_PREFIX: &str = "ipx_";
/// How long a destination keeps asking a source that refuses (its grant may still be on its
/// way through the source's queue) or cannot be reached, before the transfer fails.
pub const GRANT_WAIT: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;
/// Chunks in flight per transfer (bounded memory: about 1 MiB).
const CHUNKS_IN_FLIGHT: usize = 16;
/// Deepest directory nesting sent or accepted.
const MAX_DEPTH: usize = 256;

/// The SHA-256 of a token, as grants keep it.
fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal without an early exit (the comparison time does not tell how much matched).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One token this node accepts for one pod's volume.
#[derive(Debug, Clone)]
struct Grant {
    token_hash: [u8; 32],
    expires_at: Instant,
}

/// The transfer tokens this node accepts, per pod. In memory only: after an agent restart the
/// scheduler's reconciler sends the grants again.
#[derive(Debug, Default)]
pub struct Grants {
    by_pod: Mutex<HashMap<Uuid, Vec<Grant>>>,
}

impl Grants {
    /// Accepts `token` once for `pod_id`'s volume during `ttl`.
    pub fn allow(&self, pod_id: Uuid, token: &str, ttl: Duration) {
        let grant = Grant {
            token_hash: token_hash(token),
            expires_at: Instant::now() + ttl,
        };
        let mut by_pod = self.by_pod.lock().unwrap_or_else(|p| p.into_inner());
        let grants = by_pod.entry(pod_id).or_default();
        if !grants.iter().any(|g| g.token_hash == grant.token_hash) {
            grants.push(grant);
        }
    }

    /// Whether `token` is a live grant for `pod_id`; a match is consumed (one pull per token).
    /// Expired grants are dropped on the way.
    pub fn take(&self, pod_id: Uuid, token: &str, now: Instant) -> bool {
        let hash = token_hash(token);
        let mut by_pod = self.by_pod.lock().unwrap_or_else(|p| p.into_inner());
        let Some(grants) = by_pod.get_mut(&pod_id) else {
            return false;
        };
        grants.retain(|g| g.expires_at > now);
        let found = grants.iter().position(|g| constant_time_eq(&g.token_hash, &hash));
        if let Some(index) = found {
            grants.swap_remove(index);
        }
        if grants.is_empty() {
            by_pod.remove(&pod_id);
        }
        found.is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// Sending: the volume as a tar stream.

/// Writes `root` (a pod's volume) to `out` as a tar archive: directories, regular files and
/// symlinks, walked through directory descriptors without following symlinks. A missing
/// volume is an empty archive.
pub fn pack_volume<W: Write>(root: &Path, out: W) -> io::Result<W> {
    let mut builder = tar::Builder::new(out);
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_fd = match rustix::fs::open(root, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return builder.into_inner(),
        Err(err) => return Err(err.into()),
    };
    let mut stack: Vec<(OwnedFd, PathBuf, usize)> = vec![(root_fd, PathBuf::new(), 0)];
    while let Some((dir_fd, prefix, depth)) = stack.pop() {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir_fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        names.sort();
        for name in names {
            let name = OsStr::from_bytes(&name);
            let path = prefix.join(name);
            let stat = match rustix::fs::statat(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                // Removed meanwhile (a clone reads a running pod's volume).
                Err(rustix::io::Errno::NOENT) => continue,
                Err(err) => return Err(err.into()),
            };
            let mut header = tar::Header::new_gnu();
            header.set_mode(stat.st_mode & 0o7777);
            header.set_uid(u64::from(stat.st_uid));
            header.set_gid(u64::from(stat.st_gid));
            header.set_mtime(u64::try_from(stat.st_mtime).unwrap_or(0));
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::Directory => {
                    if depth + 1 > MAX_DEPTH {
                        return Err(io::Error::other(format!(
                            "{} is nested deeper than {MAX_DEPTH} directories",
                            path.display()
                        )));
                    }
                    let fd = match rustix::fs::openat(&dir_fd, name, flags, Mode::empty()) {
                        Ok(fd) => fd,
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(err) => return Err(err.into()),
                    };
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    builder.append_data(&mut header, &path, io::empty())?;
                    stack.push((fd, path, depth + 1));
                }
                FileType::RegularFile => {
                    let file_flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
                    let fd = match rustix::fs::openat(&dir_fd, name, file_flags, Mode::empty()) {
                        Ok(fd) => fd,
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(err) => return Err(err.into()),
                    };
                    // What was opened, not what was listed (it may have been replaced).
                    let stat = rustix::fs::fstat(&fd)?;
                    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                        continue;
                    }
                    let size = u64::try_from(stat.st_size).unwrap_or(0);
                    header.set_mode(stat.st_mode & 0o7777);
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(size);
                    // Exactly `size` bytes even when the file shrinks or grows meanwhile.
                    let data = std::fs::File::from(fd).take(size).chain(io::repeat(0)).take(size);
                    builder.append_data(&mut header, &path, data)?;
                }
                FileType::Symlink => {
                    let target = match rustix::fs::readlinkat(&dir_fd, name, Vec::new()) {
                        Ok(target) => target,
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(err) => return Err(err.into()),
                    };
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    builder.append_link(&mut header, &path, OsStr::from_bytes(target.as_bytes()))?;
                }
                _ => tracing::debug!(path = %path.display(), "special file not transferred"),
            }
        }
    }
    builder.into_inner()
}

/// A `Write` that hashes what passes and sends it on in chunks (blocking when the receiver is
/// behind), for the blocking thread that packs a volume.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    hasher: Sha256,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the receiver went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams `root` as tar followed by its SHA-256 into `tx` (run on a blocking thread).
fn send_volume(root: &Path, tx: mpsc::Sender<io::Result<Bytes>>) {
    let writer = io::BufWriter::with_capacity(
        CHUNK,
        ChannelWriter {
            tx: tx.clone(),
            hasher: Sha256::new(),
        },
    );
    let packed = pack_volume(root, writer).and_then(|writer| writer.into_inner().map_err(|e| e.into_error()));
    match packed {
        Ok(writer) => {
            let digest = writer.hasher.finalize();
            let _ = tx.blocking_send(Ok(Bytes::copy_from_slice(&digest)));
        }
        Err(err) => {
            tracing::warn!(volume = %root.display(), error = %err, "sending a volume failed");
            // The receiver sees a broken body, never a complete one.
            let _ = tx.blocking_send(Err(err));
        }
    }
}

pub(crate) type PeerBody = BoxBody<Bytes, io::Error>;

/// The bearer token of a request to the peer endpoint, if any.
pub(crate) fn bearer<B>(request: &Request<B>) -> Option<&str> {
    request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Checks that `request` carries a peer token the control plane signed for `scope` on this
/// node and `pod_id` (see `instapod_common::peer_token`); the refusal to send otherwise.
pub(crate) fn authorise<B>(
    pods: &Pods,
    request: &Request<B>,
    scope: Scope,
    pod_id: Uuid,
) -> Result<(), Box<Response<PeerBody>>> {
    let Some(token) = bearer(request) else {
        return Err(Box::new(plain(StatusCode::UNAUTHORIZED, "a peer token is required")));
    };
    // The credentials the agent saved at its last join (a rejoin rewrites the file).
    let credentials = std::fs::read(pods.dirs().node_file())
        .ok()
        .and_then(|bytes| serde_json::from_slice::<crate::fleet::Credentials>(&bytes).ok());
    let Some(credentials) = credentials else {
        return Err(Box::new(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node has not joined the fleet",
        )));
    };
    let key = peer_token::node_token_hash(&credentials.node_token);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if !peer_token::verify(token, &key, scope, credentials.node_id, pod_id, now) {
        tracing::warn!(pod = %pod_id, ?scope, "peer request refused: bad or expired token");
        return Err(Box::new(plain(StatusCode::FORBIDDEN, "bad or expired peer token")));
    }
    Ok(())
}

pub(crate) fn plain(status: StatusCode, message: &str) -> Response<PeerBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// Answers one peer request.
async fn answer(pods: Pods, request: Request<Incoming>) -> Response<PeerBody> {
    let path = request.uri().path();
    if let Some(id) = path.strip_prefix("/v1/logs/") {
        let Ok(pod_id) = id.parse::<Uuid>() else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };
        return crate::log_reader::answer(&pods, pod_id, &request).await;
    }
    if let Some(rest) = path.strip_prefix("/v1/files/") {
        let Some((pod_id, operation)) = rest
            .split_once('/')
            .and_then(|(id, op)| Some((id.parse::<Uuid>().ok()?, op)))
        else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };
        let operation = operation.to_string();
        return crate::files::answer(&pods, pod_id, &operation, request).await;
    }
    let Some(pod_id) = path.strip_prefix("/v1/volumes/").and_then(|id| id.parse::<Uuid>().ok()) else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    if request.method() != hyper::Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let token = bearer(&request).filter(|t| t.starts_with(TOKEN_PREFIX));
    let Some(token) = token else {
        return plain(StatusCode::UNAUTHORIZED, "a transfer token is required");
    };
    if !pods.grants().take(pod_id, token, Instant::now()) {
        metrics::counter!("instapod_node_agent_volume_transfers_total", "side" => "send", "outcome" => "refused")
            .increment(1);
        tracing::warn!(pod = %pod_id, "volume pull refused: unknown, used or expired token");
        return plain(StatusCode::FORBIDDEN, "unknown, used or expired transfer token");
    }
    tracing::info!(pod = %pod_id, "sending the volume to a peer");
    metrics::counter!("instapod_node_agent_volume_transfers_total", "side" => "send", "outcome" => "started")
        .increment(1);
    let root = pods.dirs().volume(pod_id);
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || send_volume(&root, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-instapod-volume+tar"),
    );
    response
}

/// Serves the peer endpoint on `listen` until the process ends; binding is retried (1 s …
/// 30 s) so the rest of the agent runs meanwhile.
pub async fn run(listen: SocketAddr, pods: Pods) {
    let mut backoff = Duration::from_secs(1);
    let listener = loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => break listener,
            Err(err) => {
                tracing::error!(%listen, error = %err, "cannot bind the peer endpoint; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(%listen, "peer endpoint listening");
    serve(listener, pods).await;
}

/// Accepts peer connections on `listener`.
pub async fn serve(listener: tokio::net::TcpListener, pods: Pods) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "peer endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let pods = pods.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let pods = pods.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(pods, request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "peer connection ended with an error");
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving: pull, unpack, verify.

/// Why a volume could not be received; the pod fails with this reason (nothing is left).
#[derive(Debug, thiserror::Error)]
pub enum ImportVolumeError {
    #[error("volume transfer from {addr}: the source node did not hand out the volume within {secs} s ({last})")]
    NotAccepted { addr: String, secs: u64, last: String },
    #[error("volume transfer from {addr} broke off: {reason}")]
    Interrupted { addr: String, reason: String },
    #[error("volume transfer from {addr}: checksum mismatch (the data is not what the source sent)")]
    ChecksumMismatch { addr: String },
    #[error("volume transfer from {addr}: {source}")]
    Unpack { addr: String, source: UnpackError },
    #[error("volume transfer: cannot prepare the volume directory {path}: {source}")]
    Local { path: PathBuf, source: io::Error },
}

/// Why an archive was refused while unpacking.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("refused entry {path:?}: {why}")]
    Refused { path: String, why: &'static str },
    #[error("the files exceed the pod's disk of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("unpacking failed: {0}")]
    Io(#[from] io::Error),
}

/// The components of an archive path when it is relative and made of normal components only
/// (`.` components are dropped); `None` for absolute paths and any `..`.
pub fn safe_components(path: &Path) -> Option<Vec<&OsStr>> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts)
}

fn refused(path: &Path, why: &'static str) -> UnpackError {
    UnpackError::Refused {
        path: path.display().to_string(),
        why,
    }
}

/// Opens (creating as needed) the directory `parts` under `root`, never through a symlink.
fn open_dir_beneath(root: &OwnedFd, parts: &[&OsStr], path: &Path) -> Result<OwnedFd, UnpackError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut current = rustix::io::dup(root).map_err(io::Error::from)?;
    for part in parts {
        match rustix::fs::mkdirat(&current, *part, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(err) => return Err(UnpackError::Io(err.into())),
        }
        current = match rustix::fs::openat(&current, *part, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(refused(path, "its path goes through a symlink or a file"));
            }
            Err(err) => return Err(UnpackError::Io(err.into())),
        };
    }
    Ok(current)
}

/// Unpacks a volume archive into the empty directory `dest`: regular files, directories and
/// symlinks only, at relative paths, never through a symlink; at most `max_file_bytes` of file
/// data. Returns the bytes of file data written. On error `dest` holds a partial tree (the
/// caller removes it).
pub fn unpack_volume(reader: impl Read, dest: &Path, max_file_bytes: u64) -> Result<u64, UnpackError> {
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    let mut archive = tar::Archive::new(reader);
    let mut written: u64 = 0;
    // Directory modes are applied last, so a read-only directory can still be filled.
    let mut directory_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(parts) = safe_components(&path) else {
            return Err(refused(&path, "absolute paths and `..` are not allowed"));
        };
        if parts.len() > MAX_DEPTH {
            return Err(refused(&path, "nested too deeply"));
        }
        let Some((name, parents)) = parts.split_last() else {
            continue; // the root itself
        };
        let header = entry.header();
        let mode = header.mode()? & 0o7777;
        let uid = header.uid()?;
        let gid = header.gid()?;
        let mtime = header.mtime()?;
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                let dir = open_dir_beneath(&root, &parts, &path)?;
                chown(&dir, uid, gid)?;
                directory_modes.push((path.clone(), mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let parent = open_dir_beneath(&root, parents, &path)?;
                let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = match rustix::fs::openat(&parent, *name, flags, Mode::from_raw_mode(0o600)) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::EXIST) => return Err(refused(&path, "it is in the archive twice")),
                    Err(err) => return Err(UnpackError::Io(err.into())),
                };
                let size = entry.size();
                written = written.saturating_add(size);
                if written > max_file_bytes {
                    return Err(UnpackError::TooLarge { limit: max_file_bytes });
                }
                let mut file = std::fs::File::from(fd);
                io::copy(&mut entry, &mut file)?;
                chown(&file, uid, gid)?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(io::Error::from)?;
                let at = rustix::fs::Timespec {
                    tv_sec: i64::try_from(mtime).unwrap_or(0),
                    tv_nsec: 0,
                };
                rustix::fs::futimens(
                    &file,
                    &rustix::fs::Timestamps {
                        last_access: at,
                        last_modification: at,
                    },
                )
                .map_err(io::Error::from)?;
            }
            tar::EntryType::Symlink => {
                let Some(target) = entry.link_name()? else {
                    return Err(refused(&path, "a symlink without a target"));
                };
                let parent = open_dir_beneath(&root, parents, &path)?;
                match rustix::fs::symlinkat(target.as_os_str(), &parent, *name) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::EXIST) => return Err(refused(&path, "it is in the archive twice")),
                    Err(err) => return Err(UnpackError::Io(err.into())),
                }
                rustix::fs::chownat(
                    &parent,
                    *name,
                    Some(rustix::fs::Uid::from_raw(uid_raw(uid))),
                    Some(rustix::fs::Gid::from_raw(uid_raw(gid))),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(io::Error::from)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refused(&path, "device files are not allowed"));
            }
            tar::EntryType::Fifo => return Err(refused(&path, "FIFOs are not allowed")),
            tar::EntryType::Link => return Err(refused(&path, "hard links are not allowed")),
            _ => return Err(refused(&path, "unsupported entry type")),
        }
    }
    for (path, mode) in directory_modes.iter().rev() {
        let parts = safe_components(path).unwrap_or_default();
        let dir = open_dir_beneath(&root, &parts, path)?;
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(*mode)).map_err(io::Error::from)?;
    }
    Ok(written)
}

fn uid_raw(id: u64) -> u32 {
    u32::try_from(id).unwrap_or(65534)
}

fn chown(fd: impl AsFd, uid: u64, gid: u64) -> io::Result<()> {
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(uid_raw(uid))),
        Some(rustix::fs::Gid::from_raw(uid_raw(gid))),
    )
    .map_err(io::Error::from)
}

/// Reads the payload of a volume stream from a channel of chunks, holding back the last
/// [`DIGEST_LEN`] bytes (the trailer) and hashing the rest.
struct TrailerReader {
    rx: mpsc::Receiver<Bytes>,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    hasher: Sha256,
}

impl TrailerReader {
    fn new(rx: mpsc::Receiver<Bytes>) -> TrailerReader {
        TrailerReader {
            rx,
            buf: Vec::new(),
            pos: 0,
            eof: false,
            hasher: Sha256::new(),
        }
    }

    /// Reads what is left; then whether the trailer matches the payload's hash (false when the
    /// stream was shorter than a trailer).
    fn finish(mut self) -> io::Result<bool> {
        io::copy(&mut self, &mut io::sink())?;
        let trailer = &self.buf[self.pos..];
        Ok(trailer.len() == DIGEST_LEN && constant_time_eq(trailer, &self.hasher.finalize()))
    }
}

impl Read for TrailerReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while !self.eof && self.buf.len() - self.pos <= DIGEST_LEN {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.buf.drain(..self.pos);
                    self.pos = 0;
                    self.buf.extend_from_slice(&chunk);
                }
                None => self.eof = true,
            }
        }
        let available = (self.buf.len() - self.pos).saturating_sub(DIGEST_LEN);
        let n = available.min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.hasher.update(&out[..n]);
        self.pos += n;
        Ok(n)
    }
}

/// Asks the source until it answers 200 (its grant may arrive after this job), for at most
/// [`GRANT_WAIT`].
async fn open_stream(http: &reqwest::Client, source: &VolumeSource) -> Result<reqwest::Response, ImportVolumeError> {
    let url = format!("http://{}/v1/volumes/{}", source.addr, source.pod_id);
    let deadline = tokio::time::Instant::now() + GRANT_WAIT;
    loop {
        let last = match http.get(&url).bearer_auth(&source.token).send().await {
            Ok(response) if response.status().is_success() => return Ok(response),
            Ok(response) => format!("last answer {}", response.status()),
            Err(err) => format!("last error: {}", crate::error_chain(&err)),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(ImportVolumeError::NotAccepted {
                addr: source.addr.clone(),
                secs: GRANT_WAIT.as_secs(),
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pulls `source`'s volume into `volume` (which must not hold data): unpacked into `staging`,
/// verified, then renamed into place. Nothing is left behind on failure. Returns the bytes of
/// file data received.
pub async fn import_volume(
    http: &reqwest::Client,
    source: &VolumeSource,
    volume: &Path,
    staging: &Path,
    max_file_bytes: u64,
) -> Result<u64, ImportVolumeError> {
    let local = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportVolumeError::Local { path, source }
    };
    // An empty directory (an earlier start) may go; one with data is never overwritten.
    if volume.exists() {
        std::fs::remove_dir(volume).map_err(local(volume))?;
    }
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging).map_err(local(staging))?;
    let received = receive(http, source, staging, max_file_bytes).await;
    let outcome = received.and_then(|bytes| {
        std::fs::rename(staging, volume).map_err(local(volume))?;
        Ok(bytes)
    });
    if outcome.is_err() {
        let _ = std::fs::remove_dir_all(staging);
    }
    let label = if outcome.is_ok() { "received" } else { "failed" };
    metrics::counter!("instapod_node_agent_volume_transfers_total", "side" => "receive", "outcome" => label)
        .increment(1);
    outcome
}

async fn receive(
    http: &reqwest::Client,
    source: &VolumeSource,
    staging: &Path,
    max_file_bytes: u64,
) -> Result<u64, ImportVolumeError> {
    let addr = source.addr.clone();
    let mut response = open_stream(http, source).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    let dest = staging.to_path_buf();
    let unpacking = tokio::task::spawn_blocking(move || {
        let mut reader = TrailerReader::new(rx);
        let unpacked = unpack_volume(&mut reader, &dest, max_file_bytes);
        // Drain on every path so the sender's side always completes.
        let matched = reader.finish();
        (unpacked, matched)
    });
    let mut broke = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if tx.send(chunk).await.is_err() {
                    break; // the unpacker stopped (refused the archive)
                }
            }
            Ok(None) => break,
            Err(err) => {
                broke = Some(crate::error_chain(&err));
                break;
            }
        }
    }
    drop(tx);
    let (unpacked, matched) = unpacking.await.map_err(|err| ImportVolumeError::Interrupted {
        addr: addr.clone(),
        reason: err.to_string(),
    })?;
    if let Some(reason) = broke {
        return Err(ImportVolumeError::Interrupted { addr, reason });
    }
    let bytes = match unpacked {
        Ok(bytes) => bytes,
        // A truncated or corrupted stream usually shows first as a malformed archive.
        Err(UnpackError::Io(_)) if !matches!(matched, Ok(true)) => {
            return Err(ImportVolumeError::ChecksumMismatch { addr });
        }
        Err(source) => return Err(ImportVolumeError::Unpack { addr, source }),
    };
    match matched {
        Ok(true) => Ok(bytes),
        Ok(false) => Err(ImportVolumeError::ChecksumMismatch { addr }),
        Err(err) => Err(ImportVolumeError::Interrupted {
            addr,
            reason: err.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_path(path: &str, expected: Option<&[&str]>) {
        let got = safe_components(Path::new(path));
        let expected: Option<Vec<&OsStr>> = expected.map(|parts| parts.iter().map(OsStr::new).collect());
        assert_eq!(got, expected, "{path}");
    }

    #[test]
    fn archive_paths_must_be_relative_without_parent_components() {
        check_path("a/b.txt", Some(&["a", "b.txt"]));
        check_path("./a/./b", Some(&["a", "b"]));
        check_path(".", Some(&[]));
        check_path("/etc/passwd", None);
        check_path("../escape", None);
        check_path("a/../../escape", None);
        check_path("a/..", None);
    }

    #[test]
    fn tokens_are_accepted_once_for_their_pod_until_they_expire() {
        let grants = Grants::default();
        let (pod, other) = (Uuid::new_v4(), Uuid::new_v4());
        let now = Instant::now();
        grants.allow(pod, "ipx_right", Duration::from_secs(60));
        assert!(!grants.take(pod, "ipx_wrong", now), "a wrong token");
        assert!(!grants.take(other, "ipx_right", now), "another pod's volume");
        assert!(grants.take(pod, "ipx_right", now));
        assert!(!grants.take(pod, "ipx_right", now), "used once");
        grants.allow(pod, "ipx_soon", Duration::from_secs(1));
        assert!(!grants.take(pod, "ipx_soon", now + Duration::from_secs(2)), "expired");
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"a", b"ab")
        );
    }

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("instapod-transfer-{label}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().expect("archive")
    }

    fn raw_entry(builder: &mut tar::Builder<Vec<u8>>, name: &[u8], kind: tar::EntryType, data: &[u8]) {
        let mut header = tar::Header::new_old();
        // Written raw: the builder's own path setter refuses `..` and absolute paths.
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder.append(&header, data).expect("append");
    }

    #[test]
    fn unsafe_entries_are_refused() {
        for (name, kind, why) in [
            (&b"../escape"[..], tar::EntryType::Regular, "absolute paths"),
            (b"/etc/escape", tar::EntryType::Regular, "absolute paths"),
            (b"dev", tar::EntryType::Char, "device files"),
            (b"blk", tar::EntryType::Block, "device files"),
            (b"pipe", tar::EntryType::Fifo, "FIFOs"),
            (b"hard", tar::EntryType::Link, "hard links"),
        ] {
            let dest = temp_dir("refuse");
            let bytes = archive(|b| raw_entry(b, name, kind, b""));
            let err = unpack_volume(&bytes[..], &dest, 1 << 20).expect_err("refused");
            assert!(err.to_string().contains(why), "{err}");
            std::fs::remove_dir_all(&dest).ok();
        }
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let outside = temp_dir("outside");
        let dest = temp_dir("through");
        let bytes = archive(|b| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            b.append_link(&mut header, "link", &outside).expect("link");
            raw_entry(b, b"link/owned", tar::EntryType::Regular, b"x");
        });
        let err = unpack_volume(&bytes[..], &dest, 1 << 20).expect_err("refused");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!outside.join("owned").exists());
        std::fs::remove_dir_all(&dest).ok();
        std::fs::remove_dir_all(&outside).ok();
    }

    #[test]
    fn a_volume_round_trips_with_modes_and_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let source = temp_dir("source");
        std::fs::create_dir_all(source.join("sub/deeper")).expect("dirs");
        std::fs::write(source.join("hello.txt"), b"hello").expect("file");
        std::fs::write(source.join("sub/deeper/run.sh"), b"#!/bin/sh\n").expect("file");
        std::fs::set_permissions(source.join("sub/deeper/run.sh"), std::fs::Permissions::from_mode(0o751))
            .expect("chmod");
        std::os::unix::fs::symlink("/etc/passwd", source.join("sub/abs-link")).expect("symlink");
        std::os::unix::fs::symlink("../hello.txt", source.join("sub/rel-link")).expect("symlink");
        let packed = pack_volume(&source, Vec::new()).expect("pack");
        let dest = temp_dir("dest");
        let bytes = unpack_volume(&packed[..], &dest, 1 << 20).expect("unpack");
        assert_eq!(bytes, 15);
        assert_eq!(std::fs::read(dest.join("hello.txt")).expect("read"), b"hello");
        let mode = std::fs::metadata(dest.join("sub/deeper/run.sh"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o751);
        assert_eq!(
            std::fs::read_link(dest.join("sub/abs-link")).expect("a symlink"),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::read_link(dest.join("sub/rel-link")).expect("a symlink"),
            Path::new("../hello.txt")
        );
        let small = temp_dir("small");
        let err = unpack_volume(&packed[..], &small, 4).expect_err("over the disk");
        assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
        std::fs::remove_dir_all(&small).ok();
        std::fs::remove_dir_all(&source).ok();
        std::fs::remove_dir_all(&dest).ok();
    }

    #[test]
    fn the_trailer_is_held_back_and_checked() {
        let payload = b"some payload bytes".repeat(1000);
        let digest = Sha256::digest(&payload);
        for (trailer, expected) in [
            (digest.to_vec(), true),
            (vec![0u8; DIGEST_LEN], false),
            (vec![1u8; 3], false),
        ] {
            let (tx, rx) = mpsc::channel(4);
            let mut stream = payload.clone();
            stream.extend_from_slice(&trailer);
            let reader = std::thread::spawn(move || {
                let mut reader = TrailerReader::new(rx);
                let mut got = Vec::new();
                reader.read_to_end(&mut got).expect("read");
                (got, reader.finish().expect("finish"))
            });
            for chunk in stream.chunks(1000) {
                tx.blocking_send(Bytes::copy_from_slice(chunk)).expect("send");
            }
            drop(tx);
            let (got, matched) = reader.join().expect("reader");
            assert_eq!(matched, expected);
            if expected {
                assert_eq!(got, payload);
            }
        }
    }
}
