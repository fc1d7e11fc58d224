//! Leases and the content store: writing blobs (streamed, digest-verified by containerd) and
//! reading small ones back.
//!
//! *Invariants.* Everything written while pulling or importing is written under a [`Lease`], so
//! containerd's garbage collector cannot remove a layer between its write and the moment the
//! image record (and the `containerd.io/gc.ref.*` labels on its parents) references it. Leases
//! carry a `containerd.io/gc.expire` label, so one left behind by a crashed agent expires by
//! itself. A blob that exists already is not written again. Every write has its own ingest
//! ref (the digest plus a random suffix): two pulls that share a layer (two images, or a job
//! retried while the first attempt still runs) never write into one ingest, where containerd
//! would fail the second with `OutOfRange` offsets; the first commit wins and the other gets
//! `AlreadyExists`. A write that does not commit aborts its ingest (best effort; the lease
//! covers the rest).

use std::collections::HashMap;

use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    AbortRequest, CreateRequest, DeleteRequest, InfoRequest, ReadContentRequest, WriteAction, WriteContentRequest,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::{Runtime, RuntimeError};

/// The largest blob [`Runtime::read_blob`] loads into memory (manifests and configs).
pub const MAX_SMALL_BLOB: i64 = 4 * 1024 * 1024;

/// A containerd lease: what is created under it survives garbage collection until it is
/// deleted or expires.
#[derive(Debug, Clone)]
pub struct Lease {
    id: String,
}

impl Lease {
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A blob to write: its digest, size and labels (GC references to its children).
#[derive(Debug, Clone)]
pub struct BlobWrite {
    pub digest: String,
    pub size: i64,
    pub labels: HashMap<String, String>,
}

impl Runtime {
    /// Creates a lease that expires after `ttl` unless deleted first.
    pub async fn create_lease(&self, purpose: &str, ttl: std::time::Duration) -> Result<Lease, RuntimeError> {
        let id = format!("instapod-{purpose}-{}", uuid::Uuid::new_v4().simple());
        let expire = time::OffsetDateTime::now_utc() + ttl;
        let expire = expire
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|err| RuntimeError::Invalid(format!("formatting a lease expiry: {err}")))?;
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire)]);
        LeasesClient::new(self.channel())
            .create(self.request(CreateRequest { id: id.clone(), labels }))
            .await
            .map_err(|status| RuntimeError::from_status("Leases.Create", &status))?;
        Ok(Lease { id })
    }

    /// Deletes a lease; what it protected is kept only when something else references it.
    pub async fn delete_lease(&self, lease: Lease) -> Result<(), RuntimeError> {
        match LeasesClient::new(self.channel())
            .delete(self.request(DeleteRequest {
                id: lease.id,
                sync: false,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => match RuntimeError::from_status("Leases.Delete", &status) {
                RuntimeError::NotFound { .. } => Ok(()),
                err => Err(err),
            },
        }
    }

    /// Whether the content store has the blob `digest`.
    pub async fn has_blob(&self, digest: &str) -> Result<bool, RuntimeError> {
        match ContentClient::new(self.channel())
            .info(self.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(status) => match RuntimeError::from_status("Content.Info", &status) {
                RuntimeError::NotFound { .. } => Ok(false),
                err => Err(err),
            },
        }
    }

    /// Writes a blob from a stream of chunks under `lease`; containerd checks size and digest
    /// at commit. Returns `false` when the blob was there already (nothing read from `data`).
    pub async fn write_blob<S, E>(&self, lease: &Lease, blob: &BlobWrite, data: S) -> Result<bool, RuntimeError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        if self.has_blob(&blob.digest).await? {
            return Ok(false);
        }
        let reference = format!(
            "instapod-{}-{}",
            blob.digest.replace(':', "-"),
            uuid::Uuid::new_v4().simple()
        );
        let (tx, mut rx) = mpsc::channel::<WriteContentRequest>(4);
        let (failure_tx, failure_rx) = tokio::sync::oneshot::channel::<String>();
        let commit = blob.clone();
        let reference_for_feeder = reference.clone();
        // Feeds the request stream; a failing source ends the stream without a commit, which
        // makes containerd fail the write (and the partial data is discarded with the ref).
        let feeder = tokio::spawn(async move {
            let mut data = data;
            let mut offset: i64 = 0;
            while let Some(chunk) = data.next().await {
                match chunk {
                    Ok(chunk) => {
                        let len = chunk.len() as i64;
                        let message = WriteContentRequest {
                            action: WriteAction::Write as i32,
                            r#ref: reference_for_feeder.clone(),
                            total: commit.size,
                            expected: commit.digest.clone(),
                            offset,
                            data: chunk.to_vec(),
                            labels: HashMap::new(),
                        };
                        offset += len;
                        if offset > commit.size || tx.send(message).await.is_err() {
                            let _ = failure_tx.send(format!(
                                "blob {} is larger than its declared {} bytes",
                                commit.digest, commit.size
                            ));
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = failure_tx.send(err.to_string());
                        return;
                    }
                }
            }
            let _ = tx
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    r#ref: reference_for_feeder,
                    total: commit.size,
                    expected: commit.digest.clone(),
                    offset,
                    data: Vec::new(),
                    labels: commit.labels.clone(),
                })
                .await;
        });
        let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let outcome = async {
            let mut responses = ContentClient::new(self.channel())
                .write(self.leased_request(requests, lease))
                .await
                .map_err(|status| RuntimeError::from_status("Content.Write", &status))?
                .into_inner();
            let mut committed = false;
            while let Some(response) = responses
                .message()
                .await
                .map_err(|status| RuntimeError::from_status("Content.Write", &status))?
            {
                if response.action == WriteAction::Commit as i32 {
                    committed = true;
                }
            }
            Ok::<bool, RuntimeError>(committed)
        }
        .await;
        let _ = feeder.await;
        let failure = failure_rx.await;
        if !matches!((&outcome, &failure), (Ok(true), Err(_))) {
            self.abort_ingest(&reference).await;
        }
        match (outcome, failure) {
            (_, Ok(failure)) => Err(RuntimeError::Invalid(format!("writing {}: {failure}", blob.digest))),
            (Ok(true), Err(_)) => Ok(true),
            (Ok(false), Err(_)) => Err(RuntimeError::Invalid(format!(
                "writing {}: containerd closed the write without committing",
                blob.digest
            ))),
            (Err(RuntimeError::AlreadyExists { .. }), Err(_)) => Ok(false),
            (Err(err), Err(_)) => Err(err),
        }
    }

    /// Drops the partial data of an ingest that will not commit; an ingest that is gone
    /// already (never started, or committed by containerd before the error) is fine.
    async fn abort_ingest(&self, reference: &str) {
        let result = ContentClient::new(self.channel())
            .abort(self.request(AbortRequest {
                r#ref: reference.to_string(),
            }))
            .await;
        if let Err(status) = result
            && status.code() != containerd_client::tonic::Code::NotFound
        {
            tracing::debug!(reference, error = %status.message(), "aborting an ingest failed");
        }
    }

    /// Writes a blob held in memory.
    pub async fn write_small_blob(&self, lease: &Lease, blob: &BlobWrite, bytes: Bytes) -> Result<bool, RuntimeError> {
        let stream = futures_util::stream::iter([Ok::<Bytes, std::convert::Infallible>(bytes)]);
        self.write_blob(lease, blob, stream).await
    }

    /// Reads a whole blob (at most [`MAX_SMALL_BLOB`] bytes): manifests, indexes, configs.
    pub async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RuntimeError> {
        let mut stream = ContentClient::new(self.channel())
            .read(self.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Content.Read", &status))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|status| RuntimeError::from_status("Content.Read", &status))?
        {
            out.extend_from_slice(&chunk.data);
            if out.len() as i64 > MAX_SMALL_BLOB {
                return Err(RuntimeError::Invalid(format!(
                    "blob {digest} is larger than {MAX_SMALL_BLOB} bytes"
                )));
            }
        }
        Ok(out)
    }
}
