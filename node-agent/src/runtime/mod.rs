//! The one module that talks to containerd, over its gRPC socket (never by running `ctr`).
//!
//! A [`Runtime`] is a connection to one containerd socket bound to one namespace (`instapod`
//! in production, [`NAMESPACE`]); every request it sends carries the `containerd-namespace`
//! header, so the agent sees and touches only its own images, containers and tasks. Failures
//! come back as [`RuntimeError`], never as raw gRPC statuses.
//!
//! *Design.* Requests are built with [`Runtime::request`] rather than containerd-client's
//! `with_namespace!` macro: the macro expands to a bare `Request::new` (which clashes with
//! other `Request` types in scope) and `unwrap`s the header value, while the namespace here is
//! validated once, when connecting.
//!
//! The services are split by concept: [`content`] (leases and the content store), [`images`]
//! (image records, unpacking layers into snapshots), [`containers`] (containers, tasks and the
//! exit/OOM event stream), [`exec`] (processes run in a pod's container, for SSH sessions).

pub mod containers;
pub mod content;
mod error;
pub mod exec;
pub mod images;
pub mod stats;

use std::path::Path;

use containerd_client::services::v1::ListImagesRequest;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, metadata::Ascii};

pub use error::RuntimeError;

/// The containerd namespace the agent uses in production.
pub const NAMESPACE: &str = "instapod";

/// The gRPC metadata key containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// The gRPC metadata key that puts what a request creates under a lease (safe from GC).
const LEASE_HEADER: &str = "containerd-lease";

/// The snapshotter pods use.
pub const SNAPSHOTTER: &str = "overlayfs";

/// The longest namespace containerd accepts.
const MAX_NAMESPACE_LEN: usize = 76;

/// What containerd says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// The release, e.g. `1.6.20~ds1`.
    pub version: String,
    /// The build's revision.
    pub revision: String,
}

/// A connection to containerd, scoped to one namespace. Cheap to clone (the channel is shared).
#[derive(Debug, Clone)]
pub struct Runtime {
    channel: Channel,
    namespace: MetadataValue<Ascii>,
}

/// Whether containerd accepts `name` as a namespace: labels of ASCII letters and digits
/// separated by single `.`, `_` or `-`, at most 76 characters (containerd's `identifiers`).
pub fn is_valid_namespace(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAMESPACE_LEN
        && name
            .split(['.', '_', '-'])
            .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric()))
}

impl Runtime {
    /// Connects to the containerd socket at `socket`; every request will carry `namespace`.
    /// Fails at once when the socket cannot be opened.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Runtime, RuntimeError> {
        if !is_valid_namespace(namespace) {
            return Err(RuntimeError::InvalidNamespace(namespace.to_string()));
        }
        let namespace = namespace
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| RuntimeError::InvalidNamespace(namespace.to_string()))?;
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|err| RuntimeError::Connect {
                socket: socket.to_path_buf(),
                reason: crate::error_chain(&err),
            })?;
        Ok(Runtime { channel, namespace })
    }

    /// The namespace this runtime works in.
    pub fn namespace(&self) -> &str {
        self.namespace
            .to_str()
            .expect("the namespace was validated as ASCII letters, digits and separators")
    }

    /// A request carrying `message` and this runtime's namespace header.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(NAMESPACE_HEADER, self.namespace.clone());
        request
    }

    /// Like [`Runtime::request`], with what the request creates held by `lease`.
    fn leased_request<T>(&self, message: T, lease: &content::Lease) -> tonic::Request<T> {
        let mut request = self.request(message);
        if let Ok(value) = lease.id().parse::<MetadataValue<Ascii>>() {
            request.metadata_mut().insert(LEASE_HEADER, value);
        }
        request
    }

    /// The underlying channel, for service clients.
    fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// containerd's version (the Version service). Also the cheapest liveness check.
    pub async fn version(&self) -> Result<ServerVersion, RuntimeError> {
        let response = VersionClient::new(self.channel.clone())
            .version(self.request(()))
            .await
            .map_err(|status| RuntimeError::from_status("Version", &status))?
            .into_inner();
        Ok(ServerVersion {
            version: response.version,
            revision: response.revision,
        })
    }

    /// The names of the images in this namespace, sorted.
    pub async fn image_names(&self) -> Result<Vec<String>, RuntimeError> {
        let response = ImagesClient::new(self.channel.clone())
            .list(self.request(ListImagesRequest { filters: Vec::new() }))
            .await
            .map_err(|status| RuntimeError::from_status("Images.List", &status))?
            .into_inner();
        let mut names: Vec<String> = response.images.into_iter().map(|image| image.name).collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_follow_containerds_rules() {
        for good in ["instapod", "instapod-test", "a", "a.b_c-d", "k8s.io", &"x".repeat(76)] {
            assert!(is_valid_namespace(good), "{good:?} should be valid");
        }
        for bad in ["", "-a", "a-", "a--b", "a b", "a/b", "ns\n", "é", &"x".repeat(77)] {
            assert!(!is_valid_namespace(bad), "{bad:?} should be invalid");
        }
    }

    #[tokio::test]
    async fn an_invalid_namespace_is_refused_before_connecting() {
        let err = Runtime::connect(Path::new("/nonexistent/containerd.sock"), "bad namespace")
            .await
            .expect_err("an invalid namespace must be refused");
        assert!(matches!(err, RuntimeError::InvalidNamespace(_)), "{err}");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error_that_names_it() {
        let err = Runtime::connect(Path::new("/nonexistent/containerd.sock"), NAMESPACE)
            .await
            .expect_err("there is no socket there");
        assert!(matches!(err, RuntimeError::Connect { .. }), "{err}");
        assert!(err.is_transient());
        let text = err.to_string();
        assert!(text.contains("/nonexistent/containerd.sock"), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
    }
}
