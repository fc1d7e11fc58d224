//! Image records and snapshots: creating an image record that points at a manifest, unpacking
//! layers into the snapshotter through the Diff and Snapshots services, and preparing a
//! container's writable rootfs.
//!
//! *Invariants.* Unpacked layers are committed snapshots named by their chain id
//! (`chainID(n) = sha256(chainID(n-1) + " " + diffID(n))`), so an unpack that finds a chain
//! id present skips that layer and two pods with the same image share every layer. A layer is
//! applied into a uniquely named active snapshot and committed only when the apply succeeded;
//! a failed apply removes its active snapshot. This works on containerd 1.6, 1.7 and 2.x (it
//! uses no Transfer service).

use std::collections::HashMap;

use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, UpdateImageRequest,
    diff_client::DiffClient,
};
use containerd_client::types::{Descriptor, Mount};
use sha2::{Digest, Sha256};

use super::content::Lease;
use super::{Runtime, RuntimeError, SNAPSHOTTER};

/// The chain ids of a stack of layers with the given diff ids (uncompressed digests).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{parent} {diff_id}")))),
        };
        out.push(next);
    }
    out
}

impl Runtime {
    /// The target descriptor of the image record `name`, if there is one.
    pub async fn image_target(&self, name: &str) -> Result<Option<Descriptor>, RuntimeError> {
        match ImagesClient::new(self.channel())
            .get(self.request(GetImageRequest { name: name.to_string() }))
            .await
        {
            Ok(response) => Ok(response.into_inner().image.and_then(|image| image.target)),
            Err(status) => match RuntimeError::from_status("Images.Get", &status) {
                RuntimeError::NotFound { .. } => Ok(None),
                err => Err(err),
            },
        }
    }

    /// Creates the image record `name` → `target`, or points an existing one at `target`.
    pub async fn put_image(&self, lease: &Lease, name: &str, target: Descriptor) -> Result<(), RuntimeError> {
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let created = ImagesClient::new(self.channel())
            .create(self.leased_request(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                lease,
            ))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(status) => match RuntimeError::from_status("Images.Create", &status) {
                RuntimeError::AlreadyExists { .. } => {
                    ImagesClient::new(self.channel())
                        .update(self.leased_request(
                            UpdateImageRequest {
                                image: Some(image),
                                update_mask: None,
                                source_date_epoch: None,
                            },
                            lease,
                        ))
                        .await
                        .map_err(|status| RuntimeError::from_status("Images.Update", &status))?;
                    Ok(())
                }
                err => Err(err),
            },
        }
    }

    /// Removes the image record `name` (its content goes with the next GC unless shared).
    pub async fn delete_image(&self, name: &str) -> Result<(), RuntimeError> {
        match ImagesClient::new(self.channel())
            .delete(self.request(DeleteImageRequest {
                name: name.to_string(),
                sync: false,
                target: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => match RuntimeError::from_status("Images.Delete", &status) {
                RuntimeError::NotFound { .. } => Ok(()),
                err => Err(err),
            },
        }
    }

    /// Whether the snapshot `key` exists.
    pub async fn snapshot_exists(&self, key: &str) -> Result<bool, RuntimeError> {
        match SnapshotsClient::new(self.channel())
            .stat(self.request(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.to_string(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(status) => match RuntimeError::from_status("Snapshots.Stat", &status) {
                RuntimeError::NotFound { .. } => Ok(false),
                err => Err(err),
            },
        }
    }

    /// Unpacks `layers` (with their uncompressed `diff_ids`) into committed snapshots named by
    /// chain id; returns the top chain id. Layers already unpacked are skipped.
    pub async fn unpack(
        &self,
        lease: &Lease,
        layers: &[Descriptor],
        diff_ids: &[String],
    ) -> Result<String, RuntimeError> {
        if layers.len() != diff_ids.len() || layers.is_empty() {
            return Err(RuntimeError::Invalid(format!(
                "the image has {} layers but its config lists {} diff ids",
                layers.len(),
                diff_ids.len()
            )));
        }
        let chain = chain_ids(diff_ids);
        for (index, layer) in layers.iter().enumerate() {
            let chain_id = &chain[index];
            if self.snapshot_exists(chain_id).await? {
                continue;
            }
            let parent = if index == 0 {
                String::new()
            } else {
                chain[index - 1].clone()
            };
            let key = format!("instapod-extract-{}-{chain_id}", uuid::Uuid::new_v4().simple());
            let mounts = SnapshotsClient::new(self.channel())
                .prepare(self.leased_request(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.to_string(),
                        key: key.clone(),
                        parent,
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await
                .map_err(|status| RuntimeError::from_status("Snapshots.Prepare", &status))?
                .into_inner()
                .mounts;
            let applied = DiffClient::new(self.channel())
                .apply(self.leased_request(
                    ApplyRequest {
                        diff: Some(layer.clone()),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    lease,
                ))
                .await
                .map_err(|status| RuntimeError::from_status("Diff.Apply", &status));
            let committed = match applied {
                Ok(_) => SnapshotsClient::new(self.channel())
                    .commit(self.leased_request(
                        CommitSnapshotRequest {
                            snapshotter: SNAPSHOTTER.to_string(),
                            name: chain_id.clone(),
                            key: key.clone(),
                            labels: HashMap::new(),
                        },
                        lease,
                    ))
                    .await
                    .map(|_| ())
                    .map_err(|status| RuntimeError::from_status("Snapshots.Commit", &status)),
                Err(err) => Err(err),
            };
            match committed {
                Ok(()) => {}
                // Another unpack of the same layer won the race: its snapshot serves us too.
                Err(RuntimeError::AlreadyExists { .. }) => self.remove_snapshot(&key).await?,
                Err(err) => {
                    let _ = self.remove_snapshot(&key).await;
                    return Err(err);
                }
            }
        }
        Ok(chain.last().cloned().unwrap_or_default())
    }

    /// Prepares the writable snapshot `key` on top of `parent` (a chain id) and returns its
    /// mounts; when it exists already (a retried create), returns its mounts.
    pub async fn prepare_rootfs(&self, key: &str, parent: &str) -> Result<Vec<Mount>, RuntimeError> {
        let prepared = SnapshotsClient::new(self.channel())
            .prepare(self.request(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: HashMap::new(),
            }))
            .await;
        match prepared {
            Ok(response) => Ok(response.into_inner().mounts),
            Err(status) => match RuntimeError::from_status("Snapshots.Prepare", &status) {
                RuntimeError::AlreadyExists { .. } => Ok(SnapshotsClient::new(self.channel())
                    .mounts(self.request(MountsRequest {
                        snapshotter: SNAPSHOTTER.to_string(),
                        key: key.to_string(),
                    }))
                    .await
                    .map_err(|status| RuntimeError::from_status("Snapshots.Mounts", &status))?
                    .into_inner()
                    .mounts),
                err => Err(err),
            },
        }
    }

    /// Removes the snapshot `key`; a missing one is fine.
    pub async fn remove_snapshot(&self, key: &str) -> Result<(), RuntimeError> {
        match SnapshotsClient::new(self.channel())
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.to_string(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => match RuntimeError::from_status("Snapshots.Remove", &status) {
                RuntimeError::NotFound { .. } => Ok(()),
                err => Err(err),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a, "the first chain id is the first diff id");
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(format!("{a} {b}"))));
        assert_eq!(chain[1], expected);
        assert!(chain_ids(&[]).is_empty());
    }
}
