//! The files API's agent side: list, read, download, write, upload, delete and create folders
//! in a pod's volume, for the control plane, on the peer endpoint at
//! `/v1/files/{pod_id}/{files | files/content | files/upload | folders}` (the same tails as
//! the public paths under `/api/pods/{name}/`, with the same query strings and bodies).
//!
//! *Design.* The control plane authorises the user and forwards the request with a peer token
//! of scope `files` for this node and pod (`instapod_common::peer_token`); the agent answers
//! in the API's own shapes — JSON bodies and `{"error": {"code", "message"}}` errors with
//! their statuses — so the control plane streams answers back unchanged. Request and response
//! bodies are streamed in chunks through bounded channels to a blocking thread that does the
//! file I/O: an upload or a download holds a few chunks in memory, never the file. JSON reads
//! and writes are capped ([`MAX_READ_BYTES`], [`MAX_WRITE_BODY_BYTES`]). Works whether the pod
//! runs or not: the volume is a directory on this node.
//!
//! *Confinement.* Paths are checked ([`path`]) and then resolved only beneath the volume's
//! directory handle ([`volume`]); disk usage is tracked and the pod's disk enforced on every
//! write ([`usage`]).
//!
//! *Limitations.* An upload refused part-way (quota, broken stream) reads and discards the rest
//! of the request before answering, so the client receives the answer; the control plane's
//! request cap bounds that. Names that are not UTF-8 are listed with replacement characters and
//! cannot be addressed.

pub mod path;
pub mod usage;
pub mod volume;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use instapod_common::files::{
    DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, MAX_PATH_BYTES, MAX_READ_BYTES, MAX_WRITE_BODY_BYTES,
};
use instapod_common::peer_token::Scope;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::pods::Pods;
use crate::transfer::PeerBody;
use path::VolumePath;
use usage::{QuotaExceeded, Reservation, Usage};
use volume::{FileOpError, Volume, WriteConditions, Written};

/// Bytes per chunk of a download.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight per transfer.
const CHUNKS_IN_FLIGHT: usize = 8;

/// Why a files request failed, with its status and code.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    InvalidRange(String),
    #[error(
        "{path:?} is {size} bytes, more than a JSON read returns ({MAX_READ_BYTES}); read it in ranges with offset and length, or download it with Accept: application/octet-stream"
    )]
    FileTooLarge { path: String, size: u64 },
    #[error("the request body is larger than {0} bytes; upload large files with POST …/files/upload")]
    BodyTooLarge(u64),
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the pod {0} is not on this node (yet)")]
    UnknownPod(Uuid),
    #[error(transparent)]
    File(#[from] FileOpError),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error("the upload broke off: {0}")]
    Interrupted(String),
    #[error("measuring the volume's usage: {0}")]
    Usage(std::io::Error),
}

impl FilesError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            FilesError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            FilesError::InvalidParameter(_) => (StatusCode::BAD_REQUEST, "validation_failed"),
            FilesError::InvalidRange(_) => (StatusCode::BAD_REQUEST, "invalid_range"),
            FilesError::FileTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large"),
            FilesError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            FilesError::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            FilesError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            // The control plane found the pod and this node in its records: the pod is not
            // here yet (its job is on its way) or has just moved away.
            FilesError::UnknownPod(_) => (StatusCode::CONFLICT, "volume_not_ready"),
            FilesError::File(err) => match err {
                FileOpError::NoVolume => (StatusCode::CONFLICT, "volume_not_ready"),
                FileOpError::NotFound(_) => (StatusCode::NOT_FOUND, "file_not_found"),
                FileOpError::OutsideVolume(_) => (StatusCode::BAD_REQUEST, "path_outside_volume"),
                FileOpError::NotAFile { .. } => (StatusCode::BAD_REQUEST, "not_a_regular_file"),
                FileOpError::NotADirectory(_) => (StatusCode::BAD_REQUEST, "not_a_directory"),
                FileOpError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
                FileOpError::NotEmpty(_) => (StatusCode::CONFLICT, "directory_not_empty"),
                FileOpError::DeleteRoot => (StatusCode::BAD_REQUEST, "cannot_delete_root"),
                FileOpError::EtagMismatch { .. } => (StatusCode::PRECONDITION_FAILED, "etag_mismatch"),
                FileOpError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            FilesError::Quota(_) => (StatusCode::INSUFFICIENT_STORAGE, "disk_quota_exceeded"),
            FilesError::Interrupted(_) => (StatusCode::BAD_REQUEST, "upload_interrupted"),
            FilesError::Usage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    fn into_response(self) -> Response<PeerBody> {
        let (status, code) = self.status_and_code();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "files request failed");
            "internal server error".to_string()
        } else {
            self.to_string()
        };
        metrics::counter!("instapod_node_agent_file_requests_total", "outcome" => code).increment(1);
        json_response(status, &json!({"error": {"code": code, "message": message}}))
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<PeerBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn ok(status: StatusCode, body: &impl Serialize) -> Response<PeerBody> {
    metrics::counter!("instapod_node_agent_file_requests_total", "outcome" => "ok").increment(1);
    json_response(status, body)
}

/// The query parameters, refusing any not in `allowed` and any given twice.
fn query(request: &Request<Incoming>, allowed: &[&str]) -> Result<HashMap<String, String>, FilesError> {
    let mut params = HashMap::new();
    let raw = request.uri().query().unwrap_or_default();
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        if !allowed.contains(&key.as_ref()) {
            return Err(FilesError::InvalidParameter(format!(
                "unknown query parameter {key:?} (expected {})",
                allowed.join(", ")
            )));
        }
        if params.insert(key.to_string(), value.into_owned()).is_some() {
            return Err(FilesError::InvalidParameter(format!(
                "query parameter {key:?} is given twice"
            )));
        }
    }
    Ok(params)
}

fn number(params: &HashMap<String, String>, key: &str) -> Result<Option<u64>, FilesError> {
    params
        .get(key)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| FilesError::InvalidParameter(format!("{key} must be a non-negative integer, not {v:?}")))
        })
        .transpose()
}

fn flag(params: &HashMap<String, String>, key: &str) -> Result<bool, FilesError> {
    match params.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(FilesError::InvalidParameter(format!(
            "{key} must be true or false, not {other:?}"
        ))),
    }
}

fn volume_path(raw: &str) -> Result<VolumePath, FilesError> {
    VolumePath::parse(raw).map_err(FilesError::InvalidPath)
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FilesError> + Send + 'static,
) -> Result<T, FilesError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|err| Err(FilesError::Interrupted(format!("the file task failed: {err}"))))
}

/// What a pod's request works on.
#[derive(Debug, Clone)]
struct Target {
    root: PathBuf,
    disk_bytes: u64,
}

/// Answers one files request (already routed to `/v1/files/{pod_id}/{operation}`).
pub async fn answer(pods: &Pods, pod_id: Uuid, operation: &str, request: Request<Incoming>) -> Response<PeerBody> {
    if let Err(refused) = crate::transfer::authorise(pods, &request, Scope::Files, pod_id) {
        return *refused;
    }
    let record = pods.record(pod_id).filter(|_| pods.hosts(pod_id));
    let Some(record) = record else {
        return FilesError::UnknownPod(pod_id).into_response();
    };
    let target = Target {
        root: pods.dirs().volume(pod_id),
        disk_bytes: record.spec.resources.disk_bytes,
    };
    let method = request.method().clone();
    let answered = match (&method, operation) {
        (&Method::GET, "files") => list(&target, &request).await,
        (&Method::GET, "files/content") => read(&target, &request).await,
        (&Method::PUT, "files/content") => write(&target, request).await,
        (&Method::POST, "files/upload") => upload(&target, request).await,
        (&Method::DELETE, "files") => delete(&target, &request).await,
        (&Method::POST, "folders") => create_folder(&target, request).await,
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": {"code": "not_found", "message": format!("no files operation {method} {operation}")}}),
            );
        }
    };
    answered.unwrap_or_else(FilesError::into_response)
}

/// A page of a directory, with the volume's usage.
#[derive(Debug, Serialize)]
struct ListAnswer {
    path: String,
    entries: Vec<volume::Entry>,
    next_cursor: Option<String>,
    usage: Usage,
}

async fn list(target: &Target, request: &Request<Incoming>) -> Result<Response<PeerBody>, FilesError> {
    let params = query(request, &["path", "limit", "cursor"])?;
    let path = volume_path(params.get("path").map(String::as_str).unwrap_or_default())?;
    let limit = number(&params, "limit")?.unwrap_or(DEFAULT_LIST_LIMIT as u64);
    if limit == 0 || limit > MAX_LIST_LIMIT as u64 {
        return Err(FilesError::InvalidParameter(format!(
            "limit must be 1 to {MAX_LIST_LIMIT}"
        )));
    }
    let cursor = params.get("cursor").cloned();
    let target = target.clone();
    let answer = blocking(move || {
        let volume = Volume::open(&target.root)?;
        let listing = volume.list(&path, cursor.as_deref(), limit as usize)?;
        let used_bytes = usage::current(&target.root).map_err(FilesError::Usage)?;
        Ok(ListAnswer {
            path: path.display(),
            entries: listing.entries,
            next_cursor: listing.next_cursor,
            usage: Usage {
                used_bytes,
                limit_bytes: target.disk_bytes,
            },
        })
    })
    .await?;
    Ok(ok(StatusCode::OK, &answer))
}

/// A JSON read.
#[derive(Debug, Serialize)]
struct ReadAnswer {
    path: String,
    size: u64,
    etag: String,
    mtime: String,
    offset: u64,
    length: u64,
    /// `utf-8` or `base64`.
    encoding: &'static str,
    content: String,
}

fn wants_raw(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("application/octet-stream")))
}

async fn read(target: &Target, request: &Request<Incoming>) -> Result<Response<PeerBody>, FilesError> {
    let params = query(request, &["path", "offset", "length"])?;
    let path = volume_path(params.get("path").map(String::as_str).unwrap_or_default())?;
    let offset = number(&params, "offset")?.unwrap_or(0);
    let length = number(&params, "length")?;
    let raw = wants_raw(request);
    if !raw && length.is_some_and(|l| l > MAX_READ_BYTES) {
        return Err(FilesError::InvalidRange(format!(
            "length must be at most {MAX_READ_BYTES} for a JSON read"
        )));
    }
    let root = target.root.clone();
    let mut opened = blocking(move || {
        let volume = Volume::open(&root)?;
        Ok((volume.open_file(&path)?, path))
    })
    .await?;
    let size = u64::try_from(opened.0.stat.st_size).unwrap_or(0);
    if offset > size {
        return Err(FilesError::InvalidRange(format!(
            "offset {offset} is past the end of the file ({size} bytes)"
        )));
    }
    let available = size - offset;
    let etag = volume::etag(&opened.0.stat);
    if raw {
        let length = length.unwrap_or(available).min(available);
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
        let mut file = opened.0.file;
        tokio::task::spawn_blocking(move || {
            if let Err(err) = file.seek(SeekFrom::Start(offset)) {
                let _ = tx.blocking_send(Err(err));
                return;
            }
            let mut reader = file.take(length);
            loop {
                let mut buffer = vec![0u8; CHUNK];
                match reader.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => {
                        buffer.truncate(n);
                        if tx.blocking_send(Ok(Bytes::from(buffer))).is_err() {
                            break; // the client went away
                        }
                    }
                    Err(err) => {
                        let _ = tx.blocking_send(Err(err));
                        break;
                    }
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item.map(Frame::data), rx))
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        if let Ok(value) = HeaderValue::from_str(&format!("\"{etag}\"")) {
            headers.insert(ETAG, value);
        }
        metrics::counter!("instapod_node_agent_file_requests_total", "outcome" => "ok").increment(1);
        return Ok(response);
    }
    let length = match length {
        Some(length) => length.min(available),
        None if available > MAX_READ_BYTES => {
            return Err(FilesError::FileTooLarge {
                path: opened.1.display(),
                size,
            });
        }
        None => available,
    };
    let (bytes, opened) = blocking(move || {
        let bytes = Volume::read_range(&mut opened.0, offset, length).map_err(|source| FileOpError::Io {
            path: opened.1.display(),
            source,
        })?;
        Ok((bytes, opened))
    })
    .await?;
    let read_length = bytes.len() as u64;
    let (encoding, content) = match String::from_utf8(bytes) {
        Ok(text) => ("utf-8", text),
        Err(err) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(err.as_bytes()),
        ),
    };
    let answer = ReadAnswer {
        path: opened.1.display(),
        size,
        etag,
        mtime: volume::mtime(&opened.0.stat),
        offset,
        length: read_length,
        encoding,
        content,
    };
    Ok(ok(StatusCode::OK, &answer))
}

/// The body of `PUT …/files/content`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteRequest {
    path: String,
    content: String,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    create_only: bool,
    #[serde(default)]
    if_match: Option<String>,
}

fn is_json(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        })
}

/// Reads a JSON body of at most `limit` bytes.
async fn json_body<T: for<'de> Deserialize<'de>>(request: Request<Incoming>, limit: u64) -> Result<T, FilesError> {
    if !is_json(&request) {
        return Err(FilesError::UnsupportedMediaType(
            "request body must be JSON with Content-Type: application/json".into(),
        ));
    }
    let limited = Limited::new(request.into_body(), usize::try_from(limit).unwrap_or(usize::MAX));
    let bytes = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => return Err(FilesError::BodyTooLarge(limit)),
        Err(err) => return Err(FilesError::Interrupted(err.to_string())),
    };
    serde_json::from_slice(&bytes).map_err(|err| FilesError::InvalidBody(format!("invalid JSON body: {err}")))
}

fn conditions(create_only: bool, if_match: Option<String>) -> Result<WriteConditions, FilesError> {
    if create_only && if_match.is_some() {
        return Err(FilesError::InvalidParameter(
            "create_only and if_match cannot be combined".into(),
        ));
    }
    Ok(WriteConditions {
        create_only,
        if_match: if_match.map(|etag| etag.trim_matches('"').to_string()),
    })
}

fn written(answer: &Written) -> Response<PeerBody> {
    let status = if answer.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    ok(status, answer)
}

async fn write(target: &Target, request: Request<Incoming>) -> Result<Response<PeerBody>, FilesError> {
    let body: WriteRequest = json_body(request, MAX_WRITE_BODY_BYTES).await?;
    let path = volume_path(&body.path)?;
    let content = match body.encoding.as_deref() {
        None | Some("utf-8") => body.content.into_bytes(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body.content.as_bytes())
            .map_err(|err| FilesError::InvalidBody(format!("content is not valid base64: {err}")))?,
        Some(other) => {
            return Err(FilesError::InvalidParameter(format!(
                "encoding must be utf-8 or base64, not {other:?}"
            )));
        }
    };
    let conditions = conditions(body.create_only, body.if_match)?;
    let target = target.clone();
    let answer = blocking(move || {
        let volume = Volume::open(&target.root)?;
        let mut reservation = Reservation::start(&target.root, target.disk_bytes).map_err(FilesError::Usage)?;
        let mut pending = volume.begin_write(&path)?;
        reservation.grow(content.len() as u64)?;
        pending.write(&content)?;
        let answer = pending.commit(&conditions)?;
        reservation.commit(answer.replaced_bytes);
        Ok(answer)
    })
    .await?;
    Ok(written(&answer))
}

/// What the async side of an upload sends the writing thread.
#[derive(Debug)]
enum Piece {
    Data(Bytes),
    /// The part ended normally: commit.
    End,
}

/// Writes the pieces from `rx` to `path` on a blocking thread, reserving disk as they come.
fn write_pieces(
    target: Target,
    path: VolumePath,
    conditions: WriteConditions,
    mut rx: mpsc::Receiver<Piece>,
) -> Result<Written, FilesError> {
    let volume = Volume::open(&target.root)?;
    let mut reservation = Reservation::start(&target.root, target.disk_bytes).map_err(FilesError::Usage)?;
    let mut pending = volume.begin_write(&path)?;
    loop {
        match rx.blocking_recv() {
            Some(Piece::Data(chunk)) => {
                reservation.grow(chunk.len() as u64)?;
                pending.write(&chunk)?;
            }
            Some(Piece::End) => break,
            None => return Err(FilesError::Interrupted("the request body ended early".into())),
        }
    }
    let answer = pending.commit(&conditions)?;
    reservation.commit(answer.replaced_bytes);
    Ok(answer)
}

/// Reads a small text part of a multipart body.
async fn small_text(field: &mut multra::Field<'_>, name: &str) -> Result<String, FilesError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|err| FilesError::InvalidBody(format!("invalid multipart body: {err}")))?
    {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_PATH_BYTES {
            return Err(FilesError::InvalidParameter(format!("the {name} part is too long")));
        }
    }
    String::from_utf8(bytes).map_err(|_| FilesError::InvalidParameter(format!("the {name} part is not UTF-8")))
}

async fn upload(target: &Target, request: Request<Incoming>) -> Result<Response<PeerBody>, FilesError> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !content_type.to_ascii_lowercase().starts_with("multipart/form-data") {
        return Err(FilesError::UnsupportedMediaType(
            "an upload is multipart/form-data with a path part and then a file part".into(),
        ));
    }
    let boundary = multra::parse_boundary(&content_type)
        .map_err(|err| FilesError::InvalidBody(format!("invalid multipart content type: {err}")))?;
    let mut body = request.into_body().into_data_stream();
    let outcome = upload_parts(target, &mut body, boundary).await;
    // Read what is left, so the client (the control plane) sees this answer rather than a
    // connection closed under its feet; the control plane's request cap bounds it.
    if outcome.is_err() {
        while let Some(Ok(_)) = body.next().await {}
    }
    outcome.map(|answer| written(&answer))
}

async fn upload_parts(
    target: &Target,
    body: &mut http_body_util::BodyDataStream<Incoming>,
    boundary: String,
) -> Result<Written, FilesError> {
    let mut multipart = multra::Multipart::new(body, boundary);
    let mut path = None;
    let mut create_only = false;
    let mut if_match = None;
    loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|err| FilesError::InvalidBody(format!("invalid multipart body: {err}")))?;
        let Some(mut field) = field else {
            return Err(FilesError::InvalidBody("the upload has no file part".into()));
        };
        match field.name().unwrap_or_default() {
            "path" => path = Some(volume_path(&small_text(&mut field, "path").await?)?),
            "create_only" => {
                let value = small_text(&mut field, "create_only").await?;
                create_only = flag(&HashMap::from([("create_only".to_string(), value)]), "create_only")?;
            }
            "if_match" => if_match = Some(small_text(&mut field, "if_match").await?),
            "file" => {
                let Some(path) = path.take() else {
                    return Err(FilesError::InvalidBody(
                        "the path part must come before the file part".into(),
                    ));
                };
                let conditions = conditions(create_only, if_match.take())?;
                let (tx, rx) = mpsc::channel::<Piece>(CHUNKS_IN_FLIGHT);
                let writing = {
                    let target = target.clone();
                    tokio::task::spawn_blocking(move || write_pieces(target, path, conditions, rx))
                };
                let mut broke = None;
                loop {
                    match field.chunk().await {
                        Ok(Some(chunk)) => {
                            if tx.send(Piece::Data(chunk)).await.is_err() {
                                break; // the writer stopped: its error is the answer
                            }
                        }
                        Ok(None) => {
                            let _ = tx.send(Piece::End).await;
                            break;
                        }
                        Err(err) => {
                            broke = Some(err.to_string());
                            break;
                        }
                    }
                }
                drop(tx);
                let written = writing
                    .await
                    .unwrap_or_else(|err| Err(FilesError::Interrupted(format!("the file task failed: {err}"))));
                return match (written, broke) {
                    (Ok(written), _) => Ok(written),
                    (Err(FilesError::Interrupted(_)), Some(reason)) => Err(FilesError::Interrupted(reason)),
                    (Err(err), _) => Err(err),
                };
            }
            other => {
                return Err(FilesError::InvalidParameter(format!(
                    "unknown part {other:?} (expected path, create_only, if_match, file)"
                )));
            }
        }
    }
}

async fn delete(target: &Target, request: &Request<Incoming>) -> Result<Response<PeerBody>, FilesError> {
    let params = query(request, &["path", "recursive"])?;
    let raw = params
        .get("path")
        .ok_or_else(|| FilesError::InvalidParameter("path is required".into()))?;
    let path = volume_path(raw)?;
    let recursive = flag(&params, "recursive")?;
    let root = target.root.clone();
    let shown = path.display();
    blocking(move || {
        let volume = Volume::open(&root)?;
        let deleted = volume.delete(&path, recursive);
        usage::invalidate(&root);
        Ok(deleted?)
    })
    .await?;
    Ok(ok(StatusCode::OK, &json!({"path": shown, "deleted": true})))
}

/// The body of `POST …/folders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FolderRequest {
    path: String,
    #[serde(default)]
    parents: bool,
}

async fn create_folder(target: &Target, request: Request<Incoming>) -> Result<Response<PeerBody>, FilesError> {
    let body: FolderRequest = json_body(request, MAX_PATH_BYTES as u64 + 1024).await?;
    let path = volume_path(&body.path)?;
    let root = target.root.clone();
    let shown = path.display();
    let created = blocking(move || {
        let volume = Volume::open(&root)?;
        Ok(volume.create_dir(&path, body.parents)?)
    })
    .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(ok(status, &json!({"path": shown, "created": created})))
}
