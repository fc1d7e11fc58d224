//! The files API: `GET|DELETE /api/pods/{name}/files`, `GET|PUT /api/pods/{name}/files/content`,
//! `POST /api/pods/{name}/files/upload` and `POST /api/pods/{name}/folders`, forwarded to the
//! node that hosts the pod (`pods/files.rs`), whose agent does the work (`node-agent/src/files/`).
//!
//! Paths are relative to the pod's volume (mounted at `/data` in the pod unless its spec says
//! otherwise): `notes/todo.txt`; the root is the empty path. They are a `path` query parameter
//! for GET and DELETE, and a `path` field of the JSON body (or the multipart form) otherwise.
//! `..` components, a leading `/`, NUL bytes and backslashes are refused (400 `invalid_path`);
//! symlinks that lead out of the volume are refused (400 `path_outside_volume`); FIFOs,
//! sockets and devices are never opened (400 `not_a_regular_file`).
//!
//! - List: `?path=&limit=&cursor=`; entries sorted by name, `limit` 1 to 10,000 (default
//!   1,000), `next_cursor` for the next page; with the volume's `usage`.
//! - Read: `?path=&offset=&length=`; JSON with UTF-8 `content` (or base64 when the bytes are
//!   not UTF-8); at most 1 MiB per read (413 `file_too_large` for a larger file read without
//!   `length`). With `Accept: application/octet-stream` the same endpoint streams the raw
//!   bytes (the range if given), with `Content-Length` and `ETag`.
//! - Write: JSON `{"path", "content", "encoding": "utf-8"|"base64", "create_only", "if_match"}`,
//!   at most 16 MiB; atomic (temporary file + rename). 201 when created, 200 when replaced;
//!   409 `already_exists` for create-only, 412 `etag_mismatch` when `if_match` is stale.
//! - Upload: `multipart/form-data` with a `path` part (then optional `create_only` and
//!   `if_match` parts), then the `file` part; streamed to disk, atomic; 413 over the request
//!   cap (`files_max_upload_bytes`), 507 `disk_quota_exceeded` over the pod's disk.
//! - Delete: `?path=&recursive=true|false`; a non-empty directory needs `recursive=true` (else
//!   409 `directory_not_empty`); the root cannot be deleted (400).
//! - Create folder: JSON `{"path", "parents"}`; 201, or 200 when it exists and `parents` is set.
//!
//! A pod not placed on a node yet answers 409 `pod_not_placed`; a node whose volume for the pod
//! is not there yet 409 `volume_not_ready`; an unreachable node 503 `node_unavailable`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use instapod_common::files::MAX_WRITE_BODY_BYTES;
use salvo::http::StatusCode;
use salvo::http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderValue};
use salvo::oapi::ToSchema;
use salvo::oapi::extract::{PathParam, QueryParam};
use salvo::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::http::auth::caller;
use crate::http::state::app;
use crate::pods::files::{DRAIN_AFTER_CAP, Forward, ForwardFilesError, capped, drain, forward, locate};

/// One entry of a directory.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileEntry {
    pub name: String,
    /// `file`, `directory`, `symlink`, `fifo`, `socket`, `char_device` or `block_device`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// Permission bits in octal, e.g. `"0644"`.
    pub mode: String,
    /// Modification time, RFC 3339 UTC.
    pub mtime: String,
    /// Regular files only: what `if_match` compares with (`<inode>-<size>-<mtime ns>` in hex).
    pub etag: Option<String>,
}

/// The volume's disk usage against the pod's disk.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileUsage {
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

/// A page of a directory.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    /// The directory, normalised (`""` is the root).
    pub path: String,
    pub entries: Vec<FileEntry>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
    pub usage: FileUsage,
}

/// A file's content (or a range of it).
#[derive(Debug, Serialize, ToSchema)]
pub struct FileContent {
    pub path: String,
    /// The whole file's size in bytes.
    pub size: u64,
    pub etag: String,
    pub mtime: String,
    pub offset: u64,
    /// Bytes returned.
    pub length: u64,
    /// `utf-8` or `base64`.
    pub encoding: String,
    pub content: String,
}

/// The body of a write.
#[derive(Debug, Deserialize, ToSchema)]
pub struct WriteFileRequest {
    pub path: String,
    pub content: String,
    /// `utf-8` (default) or `base64`.
    pub encoding: Option<String>,
    /// Refuse with 409 when something exists at the path.
    pub create_only: Option<bool>,
    /// Refuse with 412 unless the file's etag is this one.
    pub if_match: Option<String>,
}

/// A file after a write or an upload.
#[derive(Debug, Serialize, ToSchema)]
pub struct WrittenFile {
    pub path: String,
    pub size: u64,
    pub etag: String,
    pub mtime: String,
    /// No file was there before.
    pub created: bool,
}

/// The body of a folder creation.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateFolderRequest {
    pub path: String,
    /// Create missing parents too, and accept an existing directory (default false).
    pub parents: Option<bool>,
}

/// A created (or existing) folder.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedFolder {
    pub path: String,
    pub created: bool,
}

/// A deleted file or directory.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedFile {
    pub path: String,
    pub deleted: bool,
}

/// What a forwarded request carries.
#[derive(Debug, Clone, Copy)]
enum BodyKind {
    None,
    /// Streamed on, capped at this many bytes.
    Capped(u64),
}

fn header(req: &Request, name: salvo::http::header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Authorises, forwards and streams the agent's answer back.
async fn pass(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
    name: &str,
    method: reqwest::Method,
    operation: &'static str,
    body: BodyKind,
) -> Result<(), ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let target = locate(&state.db, me.team_id, name).await?;
    let exceeded = Arc::new(AtomicBool::new(false));
    let mut content_length = None;
    let stream = match body {
        BodyKind::None => None,
        BodyKind::Capped(limit) => {
            content_length = header(req, CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
            let mut frames = Box::pin(req.take_body().filter_map(|frame| {
                std::future::ready(match frame {
                    Ok(frame) => frame.into_data().ok().map(Ok),
                    Err(err) => Some(Err(err)),
                })
            }));
            if content_length.is_some_and(|length| length > limit) {
                // Read it (bounded) so the client receives the answer, not a reset.
                if content_length.is_some_and(|length| length <= limit + DRAIN_AFTER_CAP) {
                    drain(&mut frames, limit + DRAIN_AFTER_CAP).await;
                }
                return Err(ForwardFilesError::TooLarge { limit }.into());
            }
            Some(reqwest::Body::wrap_stream(capped(frames, limit, exceeded.clone())))
        }
    };
    let query = req.uri().query().map(str::to_string);
    let request = Forward {
        method,
        operation,
        query: query.as_deref(),
        accept: header(req, salvo::http::header::ACCEPT),
        content_type: header(req, CONTENT_TYPE),
        content_length,
        body: stream,
    };
    let forwarded = forward(&state.node_http, &target, request).await;
    if exceeded.load(Ordering::Acquire)
        && let BodyKind::Capped(limit) = body
    {
        return Err(ForwardFilesError::TooLarge { limit }.into());
    }
    let upstream = forwarded?;
    res.status_code(StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for name in [CONTENT_TYPE, CONTENT_LENGTH, ETAG] {
        if let Some(value) = upstream.headers().get(name.as_str())
            && let Ok(value) = HeaderValue::from_bytes(value.as_bytes())
        {
            res.headers_mut().insert(name, value);
        }
    }
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res.stream(upstream.bytes_stream());
    Ok(())
}

/// List a directory of the pod's volume (sorted, paged), with the volume's disk usage
#[endpoint(tags("files"), responses((status_code = 200, description = "One page of the directory", body = FileList)))]
pub async fn list(
    name: PathParam<String>,
    path: QueryParam<String, false>,
    limit: QueryParam<String, false>,
    cursor: QueryParam<String, false>,
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    // Documented here, parsed by the agent from the forwarded query string.
    let _ = (path, limit, cursor);
    pass(req, depot, res, &name, reqwest::Method::GET, "files", BodyKind::None).await
}

/// Read a file: JSON (UTF-8 or base64, at most 1 MiB per read, `offset`/`length` for a range), or the raw bytes with `Accept: application/octet-stream`
#[endpoint(tags("files"), responses((status_code = 200, description = "The content (or the raw bytes with Accept: application/octet-stream)", body = FileContent)))]
pub async fn read(
    name: PathParam<String>,
    path: QueryParam<String, true>,
    offset: QueryParam<String, false>,
    length: QueryParam<String, false>,
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    let _ = (path, offset, length);
    pass(
        req,
        depot,
        res,
        &name,
        reqwest::Method::GET,
        "files/content",
        BodyKind::None,
    )
    .await
}

/// Write a file atomically (create or replace; `create_only` and `if_match` guard against lost updates)
#[endpoint(tags("files"), request_body = WriteFileRequest, responses((status_code = 201, description = "Created", body = WrittenFile), (status_code = 200, description = "Replaced", body = WrittenFile), (status_code = 412, description = "if_match is not the file's etag"), (status_code = 507, description = "Over the pod's disk")))]
pub async fn write(
    name: PathParam<String>,
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    pass(
        req,
        depot,
        res,
        &name,
        reqwest::Method::PUT,
        "files/content",
        BodyKind::Capped(MAX_WRITE_BODY_BYTES),
    )
    .await
}

/// Upload a file: multipart/form-data with a `path` part, optional `create_only` and `if_match` parts, then the `file` part; streamed to disk, atomic
#[endpoint(tags("files"), responses((status_code = 201, description = "Created", body = WrittenFile), (status_code = 200, description = "Replaced", body = WrittenFile), (status_code = 507, description = "Over the pod's disk; nothing is kept")))]
pub async fn upload(
    name: PathParam<String>,
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    let limit = app(depot).config.files_max_upload_bytes;
    pass(
        req,
        depot,
        res,
        &name,
        reqwest::Method::POST,
        "files/upload",
        BodyKind::Capped(limit),
    )
    .await
}

/// Delete a file, a symlink, or a directory (`recursive=true` for one that is not empty)
#[endpoint(tags("files"), responses((status_code = 200, description = "Deleted", body = DeletedFile)))]
pub async fn delete(
    name: PathParam<String>,
    path: QueryParam<String, true>,
    recursive: QueryParam<String, false>,
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    let _ = (path, recursive);
    pass(req, depot, res, &name, reqwest::Method::DELETE, "files", BodyKind::None).await
}

/// Create a folder (`parents: true` creates missing parents and accepts an existing folder)
#[endpoint(tags("files"), request_body = CreateFolderRequest, responses((status_code = 201, description = "Created", body = CreatedFolder), (status_code = 200, description = "Existed already (parents: true)", body = CreatedFolder)))]
pub async fn create_folder(
    name: PathParam<String>,
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    pass(
        req,
        depot,
        res,
        &name,
        reqwest::Method::POST,
        "folders",
        BodyKind::Capped(64 * 1024),
    )
    .await
}
