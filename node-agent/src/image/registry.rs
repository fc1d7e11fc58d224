//! The node agent's client for OCI distribution registries (Docker Hub, GHCR, a private
//! `docker-registry`): resolving an image reference to its manifest, config and layer list for
//! one platform, and streaming layer blobs to the caller (the containerd content store).
//!
//! *Design.* [`RegistryClient::resolve`] asks for the reference's manifest accepting the OCI
//! index, OCI manifest, Docker manifest list and Docker schema 2 manifest; an index or list is
//! narrowed to the manifest of the wanted [`Platform`], which is then fetched by digest. The
//! image config blob is fetched and parsed for its `rootfs.diff_ids` and the process defaults
//! ([`ImageConfig`]). [`RegistryClient::blob_stream`] returns a layer as a stream of chunks.
//!
//! Authentication follows the distribution token protocol: every request goes out anonymously
//! (or with a cached token) first; a `401` with a `Bearer` challenge sends the client to the
//! challenge's realm for a token (HTTP Basic with the pod's credentials when it has some),
//! after which the request is retried once; a `Basic` challenge is answered with the
//! credentials directly. Tokens are cached per (API host, repository, credentials) until
//! shortly before their `expires_in` (60 s when the token endpoint does not say).
//!
//! Registries on a loopback host (`localhost`, `127.0.0.0/8`, `::1`, any port) and the hosts
//! given to [`RegistryClient::new`] are reached over plain `http://`; all others over
//! `https://`, verified against the Mozilla roots (webpki-roots).
//!
//! *Invariants.*
//! - Nothing fetched is trusted before its digest is checked: a manifest against the digest it
//!   was addressed by (or, fetched by tag, the `Docker-Content-Digest` header when sent; the
//!   digest is computed either way), the config blob against the manifest's descriptor, and a
//!   chosen platform manifest's size against the index entry. Digests from a manifest are
//!   validated (`sha256:`/`sha512:` + lowercase hex) before they are put into a URL.
//! - Manifests and configs are read with a cap ([`MANIFEST_MAX_BYTES`], [`CONFIG_MAX_BYTES`]);
//!   layers are never held in memory, and a [`BlobStream`] ends in an error when the registry
//!   sends more or fewer bytes than the descriptor's size. Checking a layer's digest is the
//!   caller's job (containerd's content store does it on commit).
//! - Credentials never leave for another host: a token cached for one set of credentials is
//!   never used for another (or for anonymous requests), and reqwest drops `Authorization` on
//!   a redirect to a different host or port (`reqwest::redirect::remove_sensitive_headers`, as
//!   of 0.12.28), which is how registries hand blobs to object storage. Redirects are followed
//!   at most 5 times, and never from `https` to `http`.
//! - Errors say what the user can do ([`RegistryError`]); [`RegistryError::is_transient`] tells
//!   the caller whether retrying later may help.
//!
//! *Limitations.* Docker schema 1 manifests, an index nested in an index, foreign or
//! non-distributable layers and artifacts that are not container images are refused. With no
//! variant asked for, the first index entry for the OS and architecture wins (so 32-bit ARM
//! hosts should ask for their variant). Requests are not retried here apart from the one
//! authentication retry; retrying transient errors is the caller's policy.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::Stream;
use instapod_common::node::RegistryAuth;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256, Sha512};
use tokio::time::Instant;

use super::reference::{ImageReference, is_loopback_registry, is_valid_digest, registry_host};

/// OCI image index (a list of per-platform manifests).
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (the Docker name for an index).
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Docker schema 1 manifests, signed and unsigned: refused.
const MEDIA_TYPES_SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// The layer media types an image may use: tar, gzip'd or zstd'd tar (OCI), gzip'd tar (Docker).
pub const LAYER_MEDIA_TYPES: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// The `Accept` header of a manifest request: every manifest format this client understands.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest or index accepted (the distribution spec's suggested limit).
pub const MANIFEST_MAX_BYTES: u64 = 4 << 20;
/// The largest image config accepted.
pub const CONFIG_MAX_BYTES: u64 = 4 << 20;
/// The largest token endpoint answer accepted.
const TOKEN_MAX_BYTES: u64 = 1 << 20;
/// How much of an error answer is read for its `{"errors": [...]}` detail.
const ERROR_BODY_MAX_BYTES: usize = 16 << 10;
/// How many characters of a registry's error detail go into a message.
const ERROR_DETAIL_MAX_CHARS: usize = 300;

/// Establishing a TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Waiting for any one read, including every read of a streamed layer.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// A whole small exchange: a manifest, a config, a token.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Redirects followed per request.
const MAX_REDIRECTS: usize = 5;

/// A token's lifetime when the token endpoint does not give one, and the least it may give
/// (as in the distribution token specification).
const TOKEN_MIN_LIFETIME_SECS: u64 = 60;
/// The longest a token is cached, whatever its `expires_in`.
const TOKEN_MAX_LIFETIME_SECS: u64 = 24 * 60 * 60;
/// A token is dropped from the cache this long before it expires.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// How long a `Basic` answer is reused before the registry is asked again.
const BASIC_AUTH_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// The platform an image is resolved for: `linux/amd64`, `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// OCI operating system name (`linux`).
    pub os: String,
    /// OCI architecture name (`amd64`, `arm64`), not Rust's (`x86_64`, `aarch64`).
    pub architecture: String,
    /// CPU variant (`v7`, `v8`); `None` accepts any variant.
    pub variant: Option<String>,
}

impl Platform {
    /// A platform without variant.
    pub fn new(os: &str, architecture: &str) -> Platform {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: None,
        }
    }

    /// This machine: `linux` and the OCI name of the architecture the agent was built for.
    pub fn host() -> Platform {
        Platform::new("linux", oci_architecture(std::env::consts::ARCH))
    }

    /// Whether an index entry's platform is this one. An entry without variant matches
    /// `arm64/v8`, which is what `arm64` means.
    fn matches(&self, candidate: &IndexPlatform) -> bool {
        if candidate.os != self.os || candidate.architecture != self.architecture {
            return false;
        }
        match &self.variant {
            None => true,
            Some(variant) => match &candidate.variant {
                Some(candidate_variant) => candidate_variant == variant,
                None => self.architecture == "arm64" && variant == "v8",
            },
        }
    }
}

impl Default for Platform {
    fn default() -> Platform {
        Platform::host()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// The OCI (Go) name of a Rust target architecture (`std::env::consts::ARCH`).
pub fn oci_architecture(rust_architecture: &str) -> &str {
    match rust_architecture {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        other => other,
    }
}

/// A content descriptor: what a manifest says about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>` (validated before use).
    pub digest: String,
    pub size: u64,
}

/// A small blob fetched whole (an index, a manifest, a config) with its descriptor, after its
/// digest was checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    pub descriptor: Descriptor,
    pub bytes: Bytes,
}

impl fmt::Debug for Blob {
    /// The descriptor only; the bytes would drown any message they appear in.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blob")
            .field("descriptor", &self.descriptor)
            .finish_non_exhaustive()
    }
}

/// The process defaults of an image config (`config` in the config JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `NAME=value` entries, in image order.
    pub env: Vec<String>,
    /// `None` when unset or empty.
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`; `None` when unset or empty.
    pub user: Option<String>,
}

/// An image resolved for one platform: everything needed to fetch and unpack it.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The index or manifest list, when the reference named one.
    pub index: Option<Blob>,
    /// The platform's image manifest.
    pub manifest: Blob,
    /// The image config blob.
    pub config: Blob,
    /// The layers, base first (validated digests and media types).
    pub layers: Vec<Descriptor>,
    /// The digests of the uncompressed layers, one per layer, from the config's `rootfs`.
    pub diff_ids: Vec<String>,
    /// The process defaults from the config.
    pub image_config: ImageConfig,
}

impl ResolvedImage {
    /// What the reference resolved to: the index when there is one (as `docker pull` and
    /// containerd record it), else the manifest.
    pub fn target(&self) -> &Descriptor {
        match &self.index {
            Some(index) => &index.descriptor,
            None => &self.manifest.descriptor,
        }
    }
}

/// A failure to resolve or fetch an image.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The HTTP client could not be built (no TLS support).
    #[error("cannot set up the registry HTTP client: {cause}")]
    ClientSetup { cause: String },
    /// The registry does not have the manifest or blob.
    #[error("image not found: registry answered 404 for {reference}")]
    NotFound { reference: String },
    /// The registry (or its token service) answered 401 or 403 after authentication.
    #[error("{}", unauthorized_message(.reference, .status, .with_credentials))]
    Unauthorized {
        reference: String,
        status: u16,
        with_credentials: bool,
    },
    /// No answer: DNS, connection, TLS, timeout, or the connection broke mid-answer.
    #[error("cannot reach registry {host}: {cause}")]
    Unreachable { host: String, cause: String },
    /// Any other unexpected status, with the registry's error code and message when it sent
    /// them (`TOOMANYREQUESTS: …`).
    #[error("registry {host} answered {status} for {reference}{}", detail_suffix(.detail))]
    Status {
        host: String,
        reference: String,
        status: u16,
        detail: String,
    },
    /// The registry answered, but with something this client cannot or will not use.
    #[error("{}", .problem.message(.reference))]
    Protocol {
        reference: String,
        problem: ProtocolProblem,
    },
    /// The index has no manifest for the platform, or the single manifest is for another one.
    #[error("{}", no_platform_message(.reference, .wanted, .available))]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        available: Vec<String>,
    },
}

impl RegistryError {
    /// Whether trying again later may succeed: the registry was unreachable, overloaded (5xx),
    /// rate-limiting (429) or slow (408). Not found, refused credentials and bad content stay
    /// that way.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            RegistryError::ClientSetup { .. }
            | RegistryError::NotFound { .. }
            | RegistryError::Unauthorized { .. }
            | RegistryError::Protocol { .. }
            | RegistryError::NoMatchingPlatform { .. } => false,
        }
    }

    fn protocol(reference: &str, problem: ProtocolProblem) -> RegistryError {
        RegistryError::Protocol {
            reference: reference.to_string(),
            problem,
        }
    }
}

fn unauthorized_message(reference: &str, status: &u16, with_credentials: &bool) -> String {
    if *with_credentials {
        format!("registry refused credentials for {reference} ({status})")
    } else {
        format!(
            "registry refused anonymous access to {reference} ({status}); the image is private \
             (give registry credentials) or does not exist"
        )
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn no_platform_message(reference: &str, wanted: &str, available: &[String]) -> String {
    if available.is_empty() {
        format!("no {wanted} image in {reference}; its index names no platforms")
    } else {
        format!(
            "no {wanted} image in {reference}; it is built for {}",
            available.join(", ")
        )
    }
}

/// What was wrong with a registry's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolProblem {
    /// The content does not hash to the digest it was addressed by or announced with.
    DigestMismatch { expected: String, actual: String },
    /// A blob or manifest is not as long as its descriptor says.
    SizeMismatch { digest: String, expected: u64, actual: u64 },
    /// A manifest, config or token answer is over its cap.
    TooLarge { what: &'static str, limit: u64 },
    /// A manifest, config or token answer that does not parse.
    InvalidJson { what: &'static str, cause: String },
    /// A manifest, config or layer of a kind this client does not handle.
    UnsupportedMediaType { what: &'static str, media_type: String },
    /// A Docker schema 1 manifest.
    SchemaV1,
    /// An index whose entry is another index.
    NestedIndex,
    /// A digest in a manifest or header that is not `sha256:`/`sha512:` + lowercase hex.
    InvalidDigest { digest: String },
    /// The config's `rootfs.diff_ids` does not have one entry per layer.
    LayerCountMismatch { layers: usize, diff_ids: usize },
    /// The authentication challenge, token realm or token is unusable.
    BadAuthentication { cause: String },
    /// A redirect that was refused (too many, or from https to http).
    BadRedirect { cause: String },
}

impl ProtocolProblem {
    fn message(&self, reference: &str) -> String {
        match self {
            ProtocolProblem::DigestMismatch { expected, actual } => {
                format!("digest mismatch for {reference}: expected {expected} got {actual}")
            }
            ProtocolProblem::SizeMismatch {
                digest,
                expected,
                actual,
            } => format!("size mismatch for {reference}: {digest} should be {expected} bytes, got {actual}"),
            ProtocolProblem::TooLarge { what, limit } => {
                format!("the {what} of {reference} is larger than {limit} bytes")
            }
            ProtocolProblem::InvalidJson { what, cause } => format!("invalid {what} for {reference}: {cause}"),
            ProtocolProblem::UnsupportedMediaType { what, media_type } => {
                format!("unsupported {what} media type {media_type:?} in {reference}")
            }
            ProtocolProblem::SchemaV1 => format!(
                "{reference} has a Docker schema 1 manifest, which is not supported; push the image \
                 again with a current docker, buildah or skopeo"
            ),
            ProtocolProblem::NestedIndex => {
                format!("{reference} is an image index that points to another index, which is not supported")
            }
            ProtocolProblem::InvalidDigest { digest } => format!("invalid digest {digest:?} in {reference}"),
            ProtocolProblem::LayerCountMismatch { layers, diff_ids } => {
                format!("{reference} has {layers} layers but its config lists {diff_ids} uncompressed layer digests")
            }
            ProtocolProblem::BadAuthentication { cause } => {
                format!("cannot authenticate to the registry for {reference}: {cause}")
            }
            ProtocolProblem::BadRedirect { cause } => {
                format!("refused a redirect from the registry for {reference}: {cause}")
            }
        }
    }
}

/// A connection pool to registries with a token cache; one per agent, shared by all pulls.
pub struct RegistryClient {
    http: reqwest::Client,
    /// Lowercased `host[:port]` entries reached over plain HTTP besides loopback hosts.
    plain_http_hosts: Vec<String>,
    auth_cache: Mutex<HashMap<AuthKey, CachedAuth>>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("plain_http_hosts", &self.plain_http_hosts)
            .finish_non_exhaustive()
    }
}

/// Whom a cached `Authorization` is for: tokens are scoped to one repository, and the
/// credentials are part of the key so that one pod's token never serves another's pull.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AuthKey {
    api_host: String,
    repository: String,
    /// A hash of username and password; empty for anonymous access.
    credentials: String,
}

struct CachedAuth {
    header: HeaderValue,
    expires_at: Instant,
}

/// One operation's view of a registry: where to send requests and with which credentials.
struct Session<'a> {
    reference: &'a ImageReference,
    auth: Option<&'a RegistryAuth>,
    /// `https://registry-1.docker.io`, `http://127.0.0.1:5000`.
    base_url: String,
    key: AuthKey,
}

impl Session<'_> {
    fn host(&self) -> &str {
        &self.key.api_host
    }

    fn url(&self, kind: &str, reference: &str) -> String {
        format!("{}/v2/{}/{kind}/{reference}", self.base_url, self.reference.repository)
    }
}

impl RegistryClient {
    /// A client that reaches loopback registries and `plain_http_hosts` over plain HTTP and
    /// everything else over HTTPS. An entry is `host:port` (that port only) or `host` (any
    /// port); IPv6 addresses are written in brackets.
    pub fn new(plain_http_hosts: Vec<String>) -> Result<RegistryClient, RegistryError> {
        install_crypto_provider();
        let redirect_policy = reqwest::redirect::Policy::custom(|attempt| {
            let downgrade = attempt
                .previous()
                .last()
                .is_some_and(|previous| previous.scheme() == "https")
                && attempt.url().scheme() == "http";
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if downgrade {
                let message = format!("a redirect from https to {}", attempt.url());
                attempt.error(message)
            } else {
                attempt.follow()
            }
        });
        let http = reqwest::Client::builder()
            .user_agent(concat!("instapod-node-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(redirect_policy)
            .build()
            .map_err(|err| RegistryError::ClientSetup {
                cause: crate::error_chain(&err),
            })?;
        Ok(RegistryClient {
            http,
            plain_http_hosts: plain_http_hosts.iter().map(|host| host.to_ascii_lowercase()).collect(),
            auth_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `registry` (`host[:port]`, as in an [`ImageReference`]) is reached over plain
    /// HTTP: it is a loopback host, or listed.
    pub fn uses_plain_http(&self, registry: &str) -> bool {
        if is_loopback_registry(registry) {
            return true;
        }
        let registry = registry.to_ascii_lowercase();
        let host = registry_host(&registry);
        self.plain_http_hosts.iter().any(|entry| {
            let entry_has_port = entry.trim_start_matches('[').trim_end_matches(']') != registry_host(entry);
            *entry == registry || (!entry_has_port && registry_host(entry) == host)
        })
    }

    /// Resolves `reference` for this machine's platform ([`Platform::host`]).
    pub async fn resolve(
        &self,
        reference: &ImageReference,
        auth: Option<&RegistryAuth>,
    ) -> Result<ResolvedImage, RegistryError> {
        self.resolve_for_platform(reference, auth, &Platform::host()).await
    }

    /// Resolves `reference` to the manifest for `platform`, with its config and layer list,
    /// checking every digest on the way (see the module documentation).
    pub async fn resolve_for_platform(
        &self,
        reference: &ImageReference,
        auth: Option<&RegistryAuth>,
        platform: &Platform,
    ) -> Result<ResolvedImage, RegistryError> {
        let session = self.session(reference, auth);
        let subject = reference.to_string();
        tracing::debug!(image = %subject, platform = %platform, "resolving image");
        let top = self.fetch_manifest(&session, reference.reference(), &subject).await?;
        let (index, manifest, manifest_subject) = match top.kind {
            ManifestKind::Manifest => (None, top.blob, subject.clone()),
            ManifestKind::Index => {
                let index: IndexJson = parse_json(&top.blob.bytes, "image index", &subject)?;
                let entry = choose_platform(&index, platform, &subject)?;
                let entry_subject = reference.with_digest(&entry.digest).to_string();
                let child = self.fetch_manifest(&session, &entry.digest, &entry_subject).await?;
                if child.kind == ManifestKind::Index {
                    return Err(RegistryError::protocol(&subject, ProtocolProblem::NestedIndex));
                }
                if child.blob.descriptor.size != entry.size {
                    return Err(RegistryError::protocol(
                        &entry_subject,
                        ProtocolProblem::SizeMismatch {
                            digest: entry.digest.clone(),
                            expected: entry.size,
                            actual: child.blob.descriptor.size,
                        },
                    ));
                }
                (Some(top.blob), child.blob, entry_subject)
            }
        };

        let manifest_json: ManifestJson = parse_json(&manifest.bytes, "image manifest", &manifest_subject)?;
        validate_config_descriptor(&manifest_json.config, &manifest_subject)?;
        for layer in &manifest_json.layers {
            validate_layer_descriptor(layer, &manifest_subject)?;
        }
        let config = self
            .fetch_small_blob(
                &session,
                &manifest_json.config,
                CONFIG_MAX_BYTES,
                "image config",
                &subject,
            )
            .await?;
        let config_file: ConfigFile = parse_json(&config.bytes, "image config", &subject)?;

        if index.is_none() {
            check_config_platform(&config_file, platform, &subject)?;
        }
        let diff_ids = config_file.rootfs.diff_ids;
        if diff_ids.len() != manifest_json.layers.len() {
            return Err(RegistryError::protocol(
                &subject,
                ProtocolProblem::LayerCountMismatch {
                    layers: manifest_json.layers.len(),
                    diff_ids: diff_ids.len(),
                },
            ));
        }
        if let Some(bad) = diff_ids.iter().find(|diff_id| !is_valid_digest(diff_id)) {
            return Err(RegistryError::protocol(
                &subject,
                ProtocolProblem::InvalidDigest { digest: bad.clone() },
            ));
        }
        let image_config = config_file.config.map(ImageConfig::from).unwrap_or_default();
        tracing::debug!(
            image = %subject,
            manifest = %manifest.descriptor.digest,
            n_layers = manifest_json.layers.len(),
            "resolved image"
        );
        Ok(ResolvedImage {
            index,
            manifest,
            config,
            layers: manifest_json.layers,
            diff_ids,
            image_config,
        })
    }

    /// Starts downloading the blob `descriptor` (a layer) of `reference`'s repository. The
    /// stream yields the bytes as they arrive and ends with an error if their count differs
    /// from `descriptor.size`; the caller checks the digest.
    pub async fn blob_stream(
        &self,
        reference: &ImageReference,
        auth: Option<&RegistryAuth>,
        descriptor: &Descriptor,
    ) -> Result<BlobStream, RegistryError> {
        let subject = reference.with_digest(&descriptor.digest).to_string();
        if !is_valid_digest(&descriptor.digest) {
            let problem = ProtocolProblem::InvalidDigest {
                digest: descriptor.digest.clone(),
            };
            return Err(RegistryError::protocol(&reference.to_string(), problem));
        }
        let session = self.session(reference, auth);
        let url = session.url("blobs", &descriptor.digest);
        let response = self.get(&session, &url, None, None, &subject).await?;
        if let Some(length) = response.content_length()
            && length != descriptor.size
        {
            return Err(RegistryError::protocol(
                &subject,
                ProtocolProblem::SizeMismatch {
                    digest: descriptor.digest.clone(),
                    expected: descriptor.size,
                    actual: length,
                },
            ));
        }
        tracing::debug!(blob = %subject, size = descriptor.size, "streaming blob");
        Ok(BlobStream {
            inner: Box::pin(response.bytes_stream()),
            host: session.host().to_string(),
            subject,
            digest: descriptor.digest.clone(),
            expected_size: descriptor.size,
            received: 0,
            finished: false,
        })
    }

    fn session<'a>(&self, reference: &'a ImageReference, auth: Option<&'a RegistryAuth>) -> Session<'a> {
        let scheme = if self.uses_plain_http(&reference.registry) {
            "http"
        } else {
            "https"
        };
        let api_host = reference.api_host().to_string();
        Session {
            reference,
            auth,
            base_url: format!("{scheme}://{api_host}"),
            key: AuthKey {
                api_host,
                repository: reference.repository.clone(),
                credentials: auth.map(credentials_fingerprint).unwrap_or_default(),
            },
        }
    }

    /// Fetches a manifest or index by tag or digest, checks its digest and tells its kind.
    async fn fetch_manifest(
        &self,
        session: &Session<'_>,
        tag_or_digest: &str,
        subject: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = session.url("manifests", tag_or_digest);
        let response = self
            .get(session, &url, Some(MANIFEST_ACCEPT), Some(REQUEST_TIMEOUT), subject)
            .await?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
        let announced_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|value| value.to_str().ok())
            .map(|value| value.trim().to_string());
        let bytes = read_capped(response, MANIFEST_MAX_BYTES, "manifest", subject, session.host()).await?;

        // By digest, the content must hash to it. By tag, the registry's announced digest is
        // checked when it sent one in a form we know; it is advisory, so an unknown form is
        // ignored rather than refused.
        let expected = if is_valid_digest(tag_or_digest) {
            Some(tag_or_digest.to_string())
        } else {
            announced_digest.filter(|digest| is_valid_digest(digest))
        };
        let digest = match expected {
            Some(expected) => {
                let actual = digest_like(&expected, &bytes);
                if actual != expected {
                    return Err(RegistryError::protocol(
                        subject,
                        ProtocolProblem::DigestMismatch { expected, actual },
                    ));
                }
                expected
            }
            None => sha256_digest(&bytes),
        };
        let media_type = manifest_media_type(&bytes, content_type.as_deref(), subject)?;
        let kind = match media_type.as_str() {
            MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_MANIFEST_LIST => ManifestKind::Index,
            MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => ManifestKind::Manifest,
            _ => {
                let problem = ProtocolProblem::UnsupportedMediaType {
                    what: "manifest",
                    media_type,
                };
                return Err(RegistryError::protocol(subject, problem));
            }
        };
        Ok(FetchedManifest {
            kind,
            blob: Blob {
                descriptor: Descriptor {
                    media_type,
                    digest,
                    size: bytes.len() as u64,
                },
                bytes,
            },
        })
    }

    /// Fetches a blob small enough to hold (a config), checking its size and digest.
    async fn fetch_small_blob(
        &self,
        session: &Session<'_>,
        descriptor: &Descriptor,
        limit: u64,
        what: &'static str,
        subject: &str,
    ) -> Result<Blob, RegistryError> {
        if descriptor.size > limit {
            return Err(RegistryError::protocol(
                subject,
                ProtocolProblem::TooLarge { what, limit },
            ));
        }
        let url = session.url("blobs", &descriptor.digest);
        let response = self.get(session, &url, None, Some(REQUEST_TIMEOUT), subject).await?;
        let bytes = read_capped(response, limit, what, subject, session.host()).await?;
        if bytes.len() as u64 != descriptor.size {
            return Err(RegistryError::protocol(
                subject,
                ProtocolProblem::SizeMismatch {
                    digest: descriptor.digest.clone(),
                    expected: descriptor.size,
                    actual: bytes.len() as u64,
                },
            ));
        }
        let actual = digest_like(&descriptor.digest, &bytes);
        if actual != descriptor.digest {
            return Err(RegistryError::protocol(
                subject,
                ProtocolProblem::DigestMismatch {
                    expected: descriptor.digest.clone(),
                    actual,
                },
            ));
        }
        Ok(Blob {
            descriptor: descriptor.clone(),
            bytes,
        })
    }

    /// A GET to the registry with authentication: with the cached `Authorization` if any,
    /// else anonymous; on 401, once more after answering the challenge. Returns a 2xx
    /// response; every other status becomes the matching [`RegistryError`].
    async fn get(
        &self,
        session: &Session<'_>,
        url: &str,
        accept: Option<&str>,
        timeout: Option<Duration>,
        subject: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let cached = self.cached_auth(&session.key);
        let used_cache = cached.is_some();
        let response = self
            .send(session, url, accept, timeout, cached.as_ref(), subject)
            .await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return check_status(session, response, subject).await;
        }
        if used_cache {
            self.forget_auth(&session.key);
        }
        let (authorization, lifetime) = self.authenticate(session, response.headers(), subject).await?;
        self.remember_auth(&session.key, authorization.clone(), lifetime);
        let response = self
            .send(session, url, accept, timeout, Some(&authorization), subject)
            .await?;
        check_status(session, response, subject).await
    }

    async fn send(
        &self,
        session: &Session<'_>,
        url: &str,
        accept: Option<&str>,
        timeout: Option<Duration>,
        authorization: Option<&HeaderValue>,
        subject: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut request = self.http.get(url);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        request
            .send()
            .await
            .map_err(|err| transport_error(&err, session.host(), subject))
    }

    /// Answers a 401's challenge: a token from the `Bearer` realm, or the credentials for
    /// `Basic`. Returns the `Authorization` value and how long it may be reused.
    async fn authenticate(
        &self,
        session: &Session<'_>,
        headers: &HeaderMap,
        subject: &str,
    ) -> Result<(HeaderValue, Duration), RegistryError> {
        let challenges: Vec<Challenge> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        if let Some(bearer) = challenges.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer")) {
            return self.fetch_token(session, bearer, subject).await;
        }
        let refused = RegistryError::Unauthorized {
            reference: subject.to_string(),
            status: StatusCode::UNAUTHORIZED.as_u16(),
            with_credentials: session.auth.is_some(),
        };
        if challenges.iter().any(|c| c.scheme.eq_ignore_ascii_case("basic"))
            && let Some(auth) = session.auth
        {
            return Ok((basic_authorization(auth, subject)?, BASIC_AUTH_LIFETIME));
        }
        Err(refused)
    }

    /// Gets a token from a `Bearer` challenge's realm (token specification of the
    /// distribution project).
    async fn fetch_token(
        &self,
        session: &Session<'_>,
        challenge: &Challenge,
        subject: &str,
    ) -> Result<(HeaderValue, Duration), RegistryError> {
        let bad = |cause: String| RegistryError::protocol(subject, ProtocolProblem::BadAuthentication { cause });
        let realm = challenge
            .param("realm")
            .ok_or_else(|| bad("the Bearer challenge has no realm".to_string()))?;
        let mut url = Url::parse(realm).map_err(|err| bad(format!("the token realm {realm:?} is not a URL: {err}")))?;
        let realm_host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            (None, _) => return Err(bad(format!("the token realm {realm:?} has no host"))),
        };
        // Credentials go to the realm, so it gets the same transport rule as a registry.
        let secure_enough = match url.scheme() {
            "https" => true,
            "http" => self.uses_plain_http(&realm_host),
            _ => false,
        };
        if !secure_enough {
            return Err(bad(format!("the token realm {realm} is not https")));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                query.append_pair("service", service);
            }
            let default_scope = format!("repository:{}:pull", session.reference.repository);
            let scopes = challenge.param("scope").unwrap_or(&default_scope);
            for scope in scopes.split_whitespace() {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url).timeout(REQUEST_TIMEOUT);
        if let Some(auth) = session.auth {
            request = request.basic_auth(&auth.username, Some(&auth.password));
        }
        tracing::debug!(registry = %session.host(), realm = %realm_host, "fetching a registry token");
        let response = request
            .send()
            .await
            .map_err(|err| transport_error(&err, &realm_host, subject))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                reference: subject.to_string(),
                status: status.as_u16(),
                with_credentials: session.auth.is_some(),
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Status {
                host: realm_host,
                reference: subject.to_string(),
                status: status.as_u16(),
                detail: error_detail(response).await,
            });
        }
        let body = read_capped(response, TOKEN_MAX_BYTES, "token answer", subject, &realm_host).await?;
        let (token, lifetime) = parse_token_answer(&body).map_err(bad)?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| bad("the token endpoint sent a token that is not a valid header value".to_string()))?;
        header.set_sensitive(true);
        Ok((header, lifetime))
    }

    fn cached_auth(&self, key: &AuthKey) -> Option<HeaderValue> {
        let cache = self.auth_cache.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        cache
            .get(key)
            .filter(|cached| cached.expires_at > now)
            .map(|cached| cached.header.clone())
    }

    fn remember_auth(&self, key: &AuthKey, header: HeaderValue, lifetime: Duration) {
        let now = Instant::now();
        let mut cache = self.auth_cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.retain(|_, cached| cached.expires_at > now);
        cache.insert(
            key.clone(),
            CachedAuth {
                header,
                expires_at: now + lifetime,
            },
        );
    }

    fn forget_auth(&self, key: &AuthKey) {
        let mut cache = self.auth_cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.remove(key);
    }
}

/// A layer download: chunks as they arrive, ending in an error when the registry sends more
/// or fewer bytes than the descriptor says, or the connection breaks.
pub struct BlobStream {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    host: String,
    /// `registry/repository@digest`, for messages.
    subject: String,
    digest: String,
    expected_size: u64,
    received: u64,
    finished: bool,
}

impl BlobStream {
    /// The size the blob must have.
    pub fn expected_size(&self) -> u64 {
        self.expected_size
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    fn size_mismatch(&self) -> RegistryError {
        RegistryError::protocol(
            &self.subject,
            ProtocolProblem::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.expected_size,
                actual: self.received,
            },
        )
    }
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("subject", &self.subject)
            .field("expected_size", &self.expected_size)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                self.received += chunk.len() as u64;
                if self.received > self.expected_size {
                    self.finished = true;
                    return Poll::Ready(Some(Err(self.size_mismatch())));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.finished = true;
                let cause = format!("while downloading {}: {}", self.digest, crate::error_chain(&err));
                Poll::Ready(Some(Err(RegistryError::Unreachable {
                    host: self.host.clone(),
                    cause,
                })))
            }
            Poll::Ready(None) => {
                self.finished = true;
                if self.received != self.expected_size {
                    return Poll::Ready(Some(Err(self.size_mismatch())));
                }
                Poll::Ready(None)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ManifestKind {
    Index,
    Manifest,
}

struct FetchedManifest {
    kind: ManifestKind,
    blob: Blob,
}

/// The fields of a manifest that tell its kind.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestHead {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
    config: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct IndexJson {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    media_type: String,
    digest: String,
    size: u64,
    platform: Option<IndexPlatform>,
}

#[derive(Deserialize)]
struct IndexPlatform {
    architecture: String,
    os: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct ManifestJson {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The parts of an image config this client reads.
#[derive(Deserialize)]
struct ConfigFile {
    architecture: Option<String>,
    os: Option<String>,
    variant: Option<String>,
    config: Option<ContainerConfigJson>,
    rootfs: RootFsJson,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfigJson {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

impl From<ContainerConfigJson> for ImageConfig {
    fn from(config: ContainerConfigJson) -> ImageConfig {
        ImageConfig {
            entrypoint: config.entrypoint,
            cmd: config.cmd,
            env: config.env.unwrap_or_default(),
            working_dir: config.working_dir.filter(|dir| !dir.is_empty()),
            user: config.user.filter(|user| !user.is_empty()),
        }
    }
}

#[derive(Deserialize)]
struct RootFsJson {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

fn parse_json<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
    what: &'static str,
    subject: &str,
) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|err| {
        RegistryError::protocol(
            subject,
            ProtocolProblem::InvalidJson {
                what,
                cause: err.to_string(),
            },
        )
    })
}

/// A manifest's media type: its `mediaType` field, else a known `Content-Type`, else guessed
/// from its shape (old OCI manifests may omit the field). Schema 1 is refused here.
fn manifest_media_type(bytes: &[u8], content_type: Option<&str>, subject: &str) -> Result<String, RegistryError> {
    let head: ManifestHead = parse_json(bytes, "manifest", subject)?;
    let schema1 = head.schema_version.as_ref().and_then(serde_json::Value::as_u64) == Some(1)
        || [head.media_type.as_deref(), content_type]
            .into_iter()
            .flatten()
            .any(|media_type| MEDIA_TYPES_SCHEMA1.contains(&media_type));
    if schema1 {
        return Err(RegistryError::protocol(subject, ProtocolProblem::SchemaV1));
    }
    if let Some(media_type) = head.media_type {
        return Ok(media_type);
    }
    let known = [
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
        MEDIA_TYPE_DOCKER_MANIFEST,
    ];
    if let Some(content_type) = content_type
        && known.contains(&content_type)
    {
        return Ok(content_type.to_string());
    }
    if head.manifests.is_some() {
        return Ok(MEDIA_TYPE_OCI_INDEX.to_string());
    }
    if head.config.is_some() {
        return Ok(MEDIA_TYPE_OCI_MANIFEST.to_string());
    }
    let problem = ProtocolProblem::UnsupportedMediaType {
        what: "manifest",
        media_type: content_type.unwrap_or("none").to_string(),
    };
    Err(RegistryError::protocol(subject, problem))
}

/// The index entry for `platform`, with a checked digest and media type.
fn choose_platform<'a>(
    index: &'a IndexJson,
    platform: &Platform,
    subject: &str,
) -> Result<&'a IndexEntry, RegistryError> {
    let Some(entry) = index.manifests.iter().find(|entry| {
        entry
            .platform
            .as_ref()
            .is_some_and(|candidate| platform.matches(candidate))
    }) else {
        let mut available: Vec<String> = Vec::new();
        for candidate in index.manifests.iter().filter_map(|entry| entry.platform.as_ref()) {
            // Attestation manifests (BuildKit) are listed as unknown/unknown.
            if candidate.os == "unknown" {
                continue;
            }
            let name = match &candidate.variant {
                Some(variant) => format!("{}/{}/{variant}", candidate.os, candidate.architecture),
                None => format!("{}/{}", candidate.os, candidate.architecture),
            };
            if !available.contains(&name) {
                available.push(name);
            }
        }
        return Err(RegistryError::NoMatchingPlatform {
            reference: subject.to_string(),
            wanted: platform.to_string(),
            available,
        });
    };
    if !is_valid_digest(&entry.digest) {
        let problem = ProtocolProblem::InvalidDigest {
            digest: entry.digest.clone(),
        };
        return Err(RegistryError::protocol(subject, problem));
    }
    match entry.media_type.as_str() {
        MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => {}
        MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_MANIFEST_LIST => {
            return Err(RegistryError::protocol(subject, ProtocolProblem::NestedIndex));
        }
        other => {
            let problem = ProtocolProblem::UnsupportedMediaType {
                what: "manifest",
                media_type: other.to_string(),
            };
            return Err(RegistryError::protocol(subject, problem));
        }
    }
    if entry.size > MANIFEST_MAX_BYTES {
        let problem = ProtocolProblem::TooLarge {
            what: "manifest",
            limit: MANIFEST_MAX_BYTES,
        };
        return Err(RegistryError::protocol(subject, problem));
    }
    Ok(entry)
}

fn validate_config_descriptor(descriptor: &Descriptor, subject: &str) -> Result<(), RegistryError> {
    if !is_valid_digest(&descriptor.digest) {
        let problem = ProtocolProblem::InvalidDigest {
            digest: descriptor.digest.clone(),
        };
        return Err(RegistryError::protocol(subject, problem));
    }
    if descriptor.media_type != MEDIA_TYPE_OCI_CONFIG && descriptor.media_type != MEDIA_TYPE_DOCKER_CONFIG {
        // Artifacts (Helm charts, WASM modules, signatures) use other config types.
        let problem = ProtocolProblem::UnsupportedMediaType {
            what: "image config",
            media_type: descriptor.media_type.clone(),
        };
        return Err(RegistryError::protocol(subject, problem));
    }
    Ok(())
}

fn validate_layer_descriptor(descriptor: &Descriptor, subject: &str) -> Result<(), RegistryError> {
    if !is_valid_digest(&descriptor.digest) {
        let problem = ProtocolProblem::InvalidDigest {
            digest: descriptor.digest.clone(),
        };
        return Err(RegistryError::protocol(subject, problem));
    }
    if !LAYER_MEDIA_TYPES.contains(&descriptor.media_type.as_str()) {
        let problem = ProtocolProblem::UnsupportedMediaType {
            what: "layer",
            media_type: descriptor.media_type.clone(),
        };
        return Err(RegistryError::protocol(subject, problem));
    }
    Ok(())
}

/// A single manifest (not chosen from an index) must be for the wanted OS and architecture
/// when its config says which it is for: refusing here is clearer than `exec format error`.
fn check_config_platform(config: &ConfigFile, platform: &Platform, subject: &str) -> Result<(), RegistryError> {
    let (Some(os), Some(architecture)) = (config.os.as_deref(), config.architecture.as_deref()) else {
        return Ok(());
    };
    if os.is_empty() || architecture.is_empty() || (os == platform.os && architecture == platform.architecture) {
        return Ok(());
    }
    let built_for = match config.variant.as_deref() {
        Some(variant) if !variant.is_empty() => format!("{os}/{architecture}/{variant}"),
        _ => format!("{os}/{architecture}"),
    };
    Err(RegistryError::NoMatchingPlatform {
        reference: subject.to_string(),
        wanted: platform.to_string(),
        available: vec![built_for],
    })
}

/// Maps a non-2xx answer to its error.
async fn check_status(
    session: &Session<'_>,
    response: reqwest::Response,
    subject: &str,
) -> Result<reqwest::Response, RegistryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound {
            reference: subject.to_string(),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
            reference: subject.to_string(),
            status: status.as_u16(),
            with_credentials: session.auth.is_some(),
        },
        _ => RegistryError::Status {
            host: session.host().to_string(),
            reference: subject.to_string(),
            status: status.as_u16(),
            detail: error_detail(response).await,
        },
    })
}

/// `CODE: message` from a distribution error answer (`{"errors": [{"code", "message"}]}`), or
/// nothing: other bodies (HTML from a proxy) are not repeated.
async fn error_detail(mut response: reqwest::Response) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_MAX_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let Ok(errors) = serde_json::from_slice::<Errors>(&body) else {
        return String::new();
    };
    let detail = errors
        .errors
        .iter()
        .map(|entry| match (&entry.code, &entry.message) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(text), None) | (None, Some(text)) => text.clone(),
            (None, None) => String::new(),
        })
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(ERROR_DETAIL_MAX_CHARS)
        .collect()
}

/// Reads a whole body of at most `limit` bytes.
async fn read_capped(
    mut response: reqwest::Response,
    limit: u64,
    what: &'static str,
    subject: &str,
    host: &str,
) -> Result<Bytes, RegistryError> {
    let too_large = || RegistryError::protocol(subject, ProtocolProblem::TooLarge { what, limit });
    if response.content_length().is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| transport_error(&err, host, subject))?
    {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

fn transport_error(err: &reqwest::Error, host: &str, subject: &str) -> RegistryError {
    if err.is_redirect() {
        return RegistryError::protocol(
            subject,
            ProtocolProblem::BadRedirect {
                cause: crate::error_chain(err),
            },
        );
    }
    RegistryError::Unreachable {
        host: host.to_string(),
        cause: crate::error_chain(err),
    }
}

/// The token and its cache lifetime from a token endpoint's JSON: `token`, or the OAuth2
/// `access_token`; `expires_in` seconds, at least 60, at most a day, minus a margin.
fn parse_token_answer(body: &[u8]) -> Result<(String, Duration), String> {
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|err| format!("the token endpoint sent invalid JSON: {err}"))?;
    let token = answer
        .token
        .filter(|token| !token.is_empty())
        .or(answer.access_token.filter(|token| !token.is_empty()))
        .ok_or_else(|| "the token endpoint answered without a token".to_string())?;
    let seconds = answer
        .expires_in
        .unwrap_or(TOKEN_MIN_LIFETIME_SECS)
        .clamp(TOKEN_MIN_LIFETIME_SECS, TOKEN_MAX_LIFETIME_SECS);
    Ok((token, Duration::from_secs(seconds).saturating_sub(TOKEN_EXPIRY_MARGIN)))
}

fn basic_authorization(auth: &RegistryAuth, subject: &str) -> Result<HeaderValue, RegistryError> {
    let encoded = BASE64.encode(format!("{}:{}", auth.username, auth.password));
    let mut header = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
        let cause = "the credentials cannot be sent in a header".to_string();
        RegistryError::protocol(subject, ProtocolProblem::BadAuthentication { cause })
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// A hash standing for a username and password in the token cache's key, so the cache does
/// not hold passwords in its keys.
fn credentials_fingerprint(auth: &RegistryAuth) -> String {
    let mut hasher = Sha256::new();
    hasher.update(auth.username.as_bytes());
    hasher.update([0]);
    hasher.update(auth.password.as_bytes());
    hex::encode(hasher.finalize())
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The digest of `bytes` with the algorithm of `expected` (`sha256` or `sha512`; `expected`
/// is a validated digest).
fn digest_like(expected: &str, bytes: &[u8]) -> String {
    if expected.starts_with("sha512:") {
        format!("sha512:{}", hex::encode(Sha512::digest(bytes)))
    } else {
        sha256_digest(bytes)
    }
}

/// reqwest is built without a TLS crypto provider; the agent's `main` installs aws-lc-rs, and
/// this makes sure one is there for any other user of the client (tests, tools), because
/// reqwest panics when it builds a client without one.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race against another installer leaves that one's provider, which is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// One challenge of a `WWW-Authenticate` header: `Bearer realm="…",service="…",scope="…"`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    /// Lowercased names, unquoted values.
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Parses a `WWW-Authenticate` value into its challenges (RFC 9110 §11.6.1): a scheme
/// followed by comma-separated `name=value` or `name="quoted, value"` parameters; a further
/// scheme starts the next challenge.
fn parse_challenges(header: &str) -> Vec<Challenge> {
    let bytes = header.as_bytes();
    let mut position = 0;
    let mut challenges = Vec::new();
    let is_token_byte = |b: u8| !b.is_ascii_whitespace() && b != b',' && b != b'=' && b != b'"';
    let skip = |position: &mut usize, what: &dyn Fn(u8) -> bool| {
        while *position < bytes.len() && what(bytes[*position]) {
            *position += 1;
        }
    };
    loop {
        skip(&mut position, &|b| b.is_ascii_whitespace() || b == b',');
        let start = position;
        skip(&mut position, &is_token_byte);
        if position == start {
            break;
        }
        let mut challenge = Challenge {
            scheme: header[start..position].to_string(),
            params: Vec::new(),
        };
        loop {
            let parameter_start = position;
            skip(&mut position, &|b| b.is_ascii_whitespace() || b == b',');
            let name_start = position;
            skip(&mut position, &is_token_byte);
            let name_end = position;
            skip(&mut position, &|b| b.is_ascii_whitespace());
            if name_end == name_start || position >= bytes.len() || bytes[position] != b'=' {
                // Not a parameter: the end, or the next challenge's scheme.
                position = parameter_start;
                break;
            }
            position += 1;
            skip(&mut position, &|b| b.is_ascii_whitespace());
            let value = if position < bytes.len() && bytes[position] == b'"' {
                position += 1;
                let mut value = String::new();
                let mut chars = header[position..].char_indices();
                let mut end = header.len();
                while let Some((offset, c)) = chars.next() {
                    match c {
                        '"' => {
                            end = position + offset + 1;
                            break;
                        }
                        '\\' => {
                            if let Some((_, escaped)) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        c => value.push(c),
                    }
                }
                position = end;
                value
            } else {
                let value_start = position;
                skip(&mut position, &|b| !b.is_ascii_whitespace() && b != b',');
                header[value_start..position].to_string()
            };
            challenge
                .params
                .push((header[name_start..name_end].to_ascii_lowercase(), value));
        }
        challenges.push(challenge);
    }
    challenges
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use futures_util::StreamExt as _;
    use serde_json::json;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    // --- A tiny HTTP/1.1 server: one request per connection, answered by a handler. ---

    #[derive(Debug, Clone)]
    struct TestRequest {
        path: String,
        /// Lowercased names.
        headers: HashMap<String, String>,
    }

    impl TestRequest {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).map(String::as_str)
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Framing {
        /// `Content-Length` of the body.
        Exact,
        /// No `Content-Length`: the body ends when the connection closes.
        UntilClose,
    }

    #[derive(Debug, Clone)]
    struct TestResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        framing: Framing,
    }

    impl TestResponse {
        fn new(status: u16) -> TestResponse {
            TestResponse {
                status,
                headers: Vec::new(),
                body: Vec::new(),
                framing: Framing::Exact,
            }
        }

        fn ok(content_type: &str, body: Vec<u8>) -> TestResponse {
            TestResponse::new(200).header("Content-Type", content_type).body(body)
        }

        fn not_found() -> TestResponse {
            let body = json!({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]});
            TestResponse::new(404)
                .header("Content-Type", "application/json")
                .body(body.to_string().into_bytes())
        }

        fn header(mut self, name: &str, value: &str) -> TestResponse {
            self.headers.push((name.to_string(), value.to_string()));
            self
        }

        fn body(mut self, body: Vec<u8>) -> TestResponse {
            self.body = body;
            self
        }

        fn framing(mut self, framing: Framing) -> TestResponse {
            self.framing = framing;
            self
        }
    }

    type Handler = Arc<dyn Fn(&TestRequest, SocketAddr) -> TestResponse + Send + Sync>;

    struct TestServer {
        address: SocketAddr,
        requests: Arc<Mutex<Vec<TestRequest>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestServer {
        async fn start(
            handler: impl Fn(&TestRequest, SocketAddr) -> TestResponse + Send + Sync + 'static,
        ) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a test port");
            let address = listener.local_addr().expect("local address");
            let handler: Handler = Arc::new(handler);
            let requests: Arc<Mutex<Vec<TestRequest>>> = Arc::default();
            let task = tokio::spawn({
                let requests = Arc::clone(&requests);
                async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        let handler = Arc::clone(&handler);
                        let requests = Arc::clone(&requests);
                        tokio::spawn(async move {
                            // A client hanging up early is not the server's concern.
                            let _ = serve_connection(stream, address, handler, requests).await;
                        });
                    }
                }
            });
            TestServer {
                address,
                requests,
                task,
            }
        }

        /// `127.0.0.1:<port>`, a loopback registry, so reached over plain HTTP.
        fn registry(&self) -> String {
            self.address.to_string()
        }

        fn reference(&self, name: &str) -> ImageReference {
            format!("{}/{name}", self.registry())
                .parse()
                .expect("valid test reference")
        }

        fn requests(&self) -> Vec<TestRequest> {
            self.requests.lock().expect("requests lock").clone()
        }

        fn count(&self, path_prefix: &str) -> usize {
            self.requests()
                .iter()
                .filter(|r| r.path.starts_with(path_prefix))
                .count()
        }
    }

    async fn serve_connection(
        mut stream: TcpStream,
        address: SocketAddr,
        handler: Handler,
        requests: Arc<Mutex<Vec<TestRequest>>>,
    ) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut buffer = [0u8; 4096];
        while !head.windows(4).any(|window| window == b"\r\n\r\n") {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buffer[..n]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let path = request_line.split(' ').nth(1).unwrap_or_default().to_string();
        let headers = lines
            .take_while(|line| !line.is_empty())
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let request = TestRequest { path, headers };
        requests.lock().expect("requests lock").push(request.clone());
        let response = handler(&request, address);
        let mut out = format!("HTTP/1.1 {} Test\r\nConnection: close\r\n", response.status);
        if let Framing::Exact = response.framing {
            out.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
        }
        for (name, value) in &response.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(&response.body).await?;
        stream.shutdown().await
    }

    // --- Test images ---

    const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    struct TestImage {
        manifest: Vec<u8>,
        manifest_digest: String,
        config: Vec<u8>,
        config_digest: String,
        layers: Vec<Vec<u8>>,
        diff_ids: Vec<String>,
    }

    fn test_image(architecture: &str, layers: &[&[u8]]) -> TestImage {
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|layer| sha256_digest(&[b"uncompressed ", *layer].concat()))
            .collect();
        let config = json!({
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo hello"],
                "Env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
                "WorkingDir": "/srv",
                "User": "1000:1000",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string()
        .into_bytes();
        let config_digest = sha256_digest(&config);
        let layer_descriptors: Vec<_> = layers
            .iter()
            .map(|layer| json!({"mediaType": LAYER_TYPE, "digest": sha256_digest(layer), "size": layer.len()}))
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": layer_descriptors,
        })
        .to_string()
        .into_bytes();
        TestImage {
            manifest_digest: sha256_digest(&manifest),
            manifest,
            config,
            config_digest,
            layers: layers.iter().map(|layer| layer.to_vec()).collect(),
            diff_ids,
        }
    }

    type Routes = HashMap<String, TestResponse>;

    /// Serves the image's manifest by digest (and by `tag`, with `Docker-Content-Digest`), its
    /// config and its layers.
    fn add_image(routes: &mut Routes, repository: &str, tag: Option<&str>, image: &TestImage) {
        let manifest = TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, image.manifest.clone())
            .header("Docker-Content-Digest", &image.manifest_digest);
        if let Some(tag) = tag {
            routes.insert(format!("/v2/{repository}/manifests/{tag}"), manifest.clone());
        }
        routes.insert(
            format!("/v2/{repository}/manifests/{}", image.manifest_digest),
            manifest,
        );
        routes.insert(
            format!("/v2/{repository}/blobs/{}", image.config_digest),
            TestResponse::ok("application/octet-stream", image.config.clone()),
        );
        for layer in &image.layers {
            routes.insert(
                format!("/v2/{repository}/blobs/{}", sha256_digest(layer)),
                TestResponse::ok("application/octet-stream", layer.clone()),
            );
        }
    }

    fn serve(routes: Routes) -> impl Fn(&TestRequest, SocketAddr) -> TestResponse + Send + Sync + 'static {
        move |request, _| {
            routes
                .get(&request.path)
                .cloned()
                .unwrap_or_else(TestResponse::not_found)
        }
    }

    fn client() -> RegistryClient {
        RegistryClient::new(Vec::new()).expect("registry client")
    }

    fn amd64() -> Platform {
        Platform::new("linux", "amd64")
    }

    // --- Tests ---

    #[tokio::test]
    async fn resolves_a_manifest_by_tag_and_by_digest() {
        let image = test_image("amd64", &[b"layer one", b"layer two"]);
        let mut routes = Routes::new();
        add_image(&mut routes, "team/app", Some("v1"), &image);
        let server = TestServer::start(serve(routes)).await;
        let client = client();

        let resolved = client
            .resolve_for_platform(&server.reference("team/app:v1"), None, &amd64())
            .await
            .expect("resolve by tag");
        assert!(resolved.index.is_none());
        assert_eq!(resolved.manifest.descriptor.digest, image.manifest_digest);
        assert_eq!(resolved.manifest.descriptor.media_type, MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(resolved.manifest.descriptor.size, image.manifest.len() as u64);
        assert_eq!(resolved.target().digest, image.manifest_digest);
        assert_eq!(resolved.config.descriptor.digest, image.config_digest);
        assert_eq!(resolved.config.bytes, image.config);
        let layer_digests: Vec<_> = resolved.layers.iter().map(|layer| layer.digest.clone()).collect();
        let expected_layers: Vec<_> = image.layers.iter().map(|layer| sha256_digest(layer)).collect();
        assert_eq!(layer_digests, expected_layers);
        assert_eq!(resolved.diff_ids, image.diff_ids);
        assert_eq!(
            resolved.image_config,
            ImageConfig {
                entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
                cmd: Some(vec!["echo hello".into()]),
                env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hi".into()],
                working_dir: Some("/srv".into()),
                user: Some("1000:1000".into()),
            }
        );
        let first = &server.requests()[0];
        assert_eq!(first.path, "/v2/team/app/manifests/v1");
        let accept = first.header("accept").expect("an Accept header");
        for media_type in [
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_DOCKER_MANIFEST_LIST,
            MEDIA_TYPE_DOCKER_MANIFEST,
        ] {
            assert!(accept.contains(media_type), "{accept}");
        }
        assert!(first.header("authorization").is_none());

        let by_digest = server.reference(&format!("team/app@{}", image.manifest_digest));
        let resolved = client
            .resolve_for_platform(&by_digest, None, &amd64())
            .await
            .expect("resolve by digest");
        assert_eq!(resolved.manifest.descriptor.digest, image.manifest_digest);

        // A single-platform image for another architecture is refused with the reason.
        let err = client
            .resolve_for_platform(&server.reference("team/app:v1"), None, &Platform::new("linux", "arm64"))
            .await
            .expect_err("wrong architecture");
        assert!(matches!(err, RegistryError::NoMatchingPlatform { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "no linux/arm64 image in {}/team/app:v1; it is built for linux/amd64",
                server.registry()
            )
        );
    }

    #[tokio::test]
    async fn an_index_resolves_to_the_platform_manifest() {
        let amd64_image = test_image("amd64", &[b"amd64 layer"]);
        let arm64_image = test_image("arm64", &[b"arm64 layer"]);
        let descriptor = |image: &TestImage, platform: serde_json::Value| {
            json!({
                "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": image.manifest.len(),
                "platform": platform,
            })
        };
        // Without mediaType in the body: the Content-Type tells (Docker's manifest list).
        let index = json!({
            "schemaVersion": 2,
            "manifests": [
                descriptor(&amd64_image, json!({"os": "linux", "architecture": "amd64"})),
                descriptor(&arm64_image, json!({"os": "linux", "architecture": "arm64", "variant": "v8"})),
                descriptor(&amd64_image, json!({"os": "unknown", "architecture": "unknown"})),
            ],
        })
        .to_string()
        .into_bytes();
        let index_digest = sha256_digest(&index);
        let mut routes = Routes::new();
        add_image(&mut routes, "library/multi", None, &amd64_image);
        add_image(&mut routes, "library/multi", None, &arm64_image);
        routes.insert(
            "/v2/library/multi/manifests/latest".into(),
            TestResponse::ok(MEDIA_TYPE_DOCKER_MANIFEST_LIST, index.clone()),
        );
        let server = TestServer::start(serve(routes)).await;
        let client = client();
        let reference = server.reference("multi");
        assert_eq!(reference.repository, "multi", "only Docker Hub has library/");
        let reference = server.reference("library/multi");

        let check = async |platform: Platform, expected: &TestImage| {
            let resolved = client
                .resolve_for_platform(&reference, None, &platform)
                .await
                .expect("resolve");
            let index_blob = resolved.index.as_ref().expect("an index");
            assert_eq!(index_blob.descriptor.digest, index_digest);
            assert_eq!(index_blob.descriptor.media_type, MEDIA_TYPE_DOCKER_MANIFEST_LIST);
            assert_eq!(resolved.target().digest, index_digest);
            assert_eq!(resolved.manifest.descriptor.digest, expected.manifest_digest);
            assert_eq!(resolved.diff_ids, expected.diff_ids);
        };
        check(amd64(), &amd64_image).await;
        check(Platform::new("linux", "arm64"), &arm64_image).await;
        let arm64_v8 = Platform {
            variant: Some("v8".into()),
            ..Platform::new("linux", "arm64")
        };
        check(arm64_v8, &arm64_image).await;

        let err = client
            .resolve_for_platform(&reference, None, &Platform::new("linux", "s390x"))
            .await
            .expect_err("no s390x image");
        assert_eq!(
            err.to_string(),
            format!(
                "no linux/s390x image in {}/library/multi:latest; it is built for linux/amd64, linux/arm64/v8",
                server.registry()
            )
        );
        assert!(!err.is_transient());
    }

    /// A registry that wants `Bearer good-token` for `/v2/…`, handed out by `/token` for
    /// alice's credentials; `extra` answers the paths outside `/v2/`.
    fn bearer_registry(
        routes: Routes,
        extra: impl Fn(&TestRequest) -> TestResponse + Send + Sync + 'static,
    ) -> impl Fn(&TestRequest, SocketAddr) -> TestResponse + Send + Sync + 'static {
        let alice = format!("Basic {}", BASE64.encode("alice:s3cret"));
        move |request, address| {
            if request.path.starts_with("/token?") {
                let query_ok = request.path.contains("service=test-registry")
                    && request.path.contains("scope=repository%3Ateam%2Fapp%3Apull");
                if request.header("authorization") == Some(alice.as_str()) && query_ok {
                    let body = json!({"token": "good-token", "expires_in": 300}).to_string();
                    return TestResponse::ok("application/json", body.into_bytes());
                }
                return TestResponse::new(401);
            }
            if !request.path.starts_with("/v2/") {
                return extra(request);
            }
            if request.header("authorization") != Some("Bearer good-token") {
                let challenge = format!(
                    "Bearer realm=\"http://{address}/token\",service=\"test-registry\",scope=\"repository:team/app:pull\""
                );
                return TestResponse::new(401).header("WWW-Authenticate", &challenge);
            }
            routes
                .get(&request.path)
                .cloned()
                .unwrap_or_else(TestResponse::not_found)
        }
    }

    fn alice(password: &str) -> RegistryAuth {
        RegistryAuth {
            username: "alice".into(),
            password: password.into(),
        }
    }

    #[tokio::test]
    async fn bearer_token_flow_with_cache_per_credentials() {
        let image = test_image("amd64", &[b"private layer"]);
        let mut routes = Routes::new();
        add_image(&mut routes, "team/app", Some("v1"), &image);
        let server = TestServer::start(bearer_registry(routes, |_| TestResponse::not_found())).await;
        let client = client();
        let reference = server.reference("team/app:v1");
        let good = alice("s3cret");

        let resolved = client
            .resolve_for_platform(&reference, Some(&good), &amd64())
            .await
            .expect("resolve with credentials");
        assert_eq!(resolved.manifest.descriptor.digest, image.manifest_digest);
        assert_eq!(server.count("/token"), 1);
        let requests = server.requests();
        assert!(requests[0].header("authorization").is_none(), "anonymous first");
        assert_eq!(requests[1].path.split('?').next(), Some("/token"));
        assert_eq!(requests[2].path, "/v2/team/app/manifests/v1");
        assert_eq!(requests[2].header("authorization"), Some("Bearer good-token"));

        // The token is cached: a second pull goes straight to the registry.
        let before = server.requests().len();
        client
            .resolve_for_platform(&reference, Some(&good), &amd64())
            .await
            .expect("resolve again");
        assert_eq!(server.count("/token"), 1);
        assert_eq!(server.requests().len() - before, 2, "manifest and config, no retries");

        // Other credentials (or none) never get the cached token.
        let err = client
            .resolve_for_platform(&reference, Some(&alice("wrong")), &amd64())
            .await
            .expect_err("wrong password");
        assert!(
            matches!(
                err,
                RegistryError::Unauthorized {
                    with_credentials: true,
                    status: 401,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("registry refused credentials for {reference} (401)")
        );
        assert!(!err.is_transient());
        let err = client
            .resolve_for_platform(&reference, None, &amd64())
            .await
            .expect_err("anonymous");
        assert!(
            err.to_string()
                .starts_with(&format!("registry refused anonymous access to {reference} (401)")),
            "{err}"
        );
        assert_eq!(server.count("/token"), 3);
    }

    #[tokio::test]
    async fn basic_challenge_is_answered_with_the_credentials() {
        let image = test_image("amd64", &[b"layer"]);
        let mut routes = Routes::new();
        add_image(&mut routes, "team/app", Some("v1"), &image);
        let expected = format!("Basic {}", BASE64.encode("alice:s3cret"));
        let server = TestServer::start(move |request, _| {
            if request.header("authorization") != Some(expected.as_str()) {
                return TestResponse::new(401).header("WWW-Authenticate", "Basic realm=\"Registry Realm\"");
            }
            routes
                .get(&request.path)
                .cloned()
                .unwrap_or_else(TestResponse::not_found)
        })
        .await;
        let client = client();
        let reference = server.reference("team/app:v1");
        let resolved = client
            .resolve_for_platform(&reference, Some(&alice("s3cret")), &amd64())
            .await
            .expect("resolve with basic auth");
        assert_eq!(resolved.manifest.descriptor.digest, image.manifest_digest);
        let err = client
            .resolve_for_platform(&reference, None, &amd64())
            .await
            .expect_err("no credentials");
        assert!(
            matches!(
                err,
                RegistryError::Unauthorized {
                    with_credentials: false,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn not_found_names_the_reference() {
        let server = TestServer::start(serve(Routes::new())).await;
        let err = client()
            .resolve_for_platform(&server.reference("team/missing"), None, &amd64())
            .await
            .expect_err("missing image");
        assert_eq!(
            err.to_string(),
            format!(
                "image not found: registry answered 404 for {}/team/missing:latest",
                server.registry()
            )
        );
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn digest_mismatches_are_refused() {
        let image = test_image("amd64", &[b"layer"]);
        let other = test_image("amd64", &[b"other layer"]);
        let mut routes = Routes::new();
        add_image(&mut routes, "team/app", Some("v1"), &image);
        // By tag, with a Docker-Content-Digest that is not the body's.
        routes.insert(
            "/v2/team/app/manifests/lying-header".into(),
            TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, image.manifest.clone())
                .header("Docker-Content-Digest", &other.manifest_digest),
        );
        // By digest, with another body.
        routes.insert(
            format!("/v2/team/app/manifests/{}", other.manifest_digest),
            TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, image.manifest.clone()),
        );
        // A manifest whose config blob is served tampered with (same length).
        let tampered = test_image("amd64", &[b"tampered"]);
        let mut config = tampered.config.clone();
        config[0] = b' ';
        add_image(&mut routes, "team/app", Some("tampered"), &tampered);
        routes.insert(
            format!("/v2/team/app/blobs/{}", tampered.config_digest),
            TestResponse::ok("application/octet-stream", config.clone()),
        );
        let server = TestServer::start(serve(routes)).await;
        let client = client();

        let err = client
            .resolve_for_platform(&server.reference("team/app:lying-header"), None, &amd64())
            .await
            .expect_err("header mismatch");
        assert_eq!(
            err.to_string(),
            format!(
                "digest mismatch for {}/team/app:lying-header: expected {} got {}",
                server.registry(),
                other.manifest_digest,
                image.manifest_digest
            )
        );
        assert!(!err.is_transient());

        let by_digest = server.reference(&format!("team/app@{}", other.manifest_digest));
        let err = client
            .resolve_for_platform(&by_digest, None, &amd64())
            .await
            .expect_err("body mismatch");
        assert!(
            matches!(&err, RegistryError::Protocol { problem: ProtocolProblem::DigestMismatch { expected, .. }, .. } if *expected == other.manifest_digest),
            "{err:?}"
        );

        let err = client
            .resolve_for_platform(&server.reference("team/app:tampered"), None, &amd64())
            .await
            .expect_err("config mismatch");
        assert!(
            matches!(&err, RegistryError::Protocol { problem: ProtocolProblem::DigestMismatch { expected, actual }, .. }
                if *expected == tampered.config_digest && *actual == sha256_digest(&config)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn unusable_manifests_are_refused() {
        let mut routes = Routes::new();
        let schema1 = json!({"schemaVersion": 1, "name": "team/app", "tag": "old", "fsLayers": []});
        routes.insert(
            "/v2/team/app/manifests/old".into(),
            TestResponse::ok(MEDIA_TYPES_SCHEMA1[1], schema1.to_string().into_bytes()),
        );
        routes.insert(
            "/v2/team/app/manifests/huge".into(),
            TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, vec![b' '; (MANIFEST_MAX_BYTES + 1) as usize]),
        );
        routes.insert(
            "/v2/team/app/manifests/huge-unannounced".into(),
            TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, vec![b' '; (MANIFEST_MAX_BYTES + 1) as usize])
                .framing(Framing::UntilClose),
        );
        routes.insert(
            "/v2/team/app/manifests/garbage".into(),
            TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, b"<html>".to_vec()),
        );
        let helm = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": sha256_digest(b"{}"), "size": 2},
            "layers": [],
        });
        routes.insert(
            "/v2/team/app/manifests/chart".into(),
            TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, helm.to_string().into_bytes()),
        );
        let traversal = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": "sha256:../../../etc", "size": 2},
            "layers": [],
        });
        routes.insert(
            "/v2/team/app/manifests/traversal".into(),
            TestResponse::ok(MEDIA_TYPE_OCI_MANIFEST, traversal.to_string().into_bytes()),
        );
        let server = TestServer::start(serve(routes)).await;
        let client = client();
        let resolve = async |tag: &str| {
            client
                .resolve_for_platform(&server.reference(&format!("team/app:{tag}")), None, &amd64())
                .await
                .expect_err("refused")
        };
        let registry = server.registry();

        let err = resolve("old").await;
        assert!(
            err.to_string()
                .starts_with(&format!("{registry}/team/app:old has a Docker schema 1 manifest")),
            "{err}"
        );
        for tag in ["huge", "huge-unannounced"] {
            let err = resolve(tag).await;
            assert_eq!(
                err.to_string(),
                format!("the manifest of {registry}/team/app:{tag} is larger than 4194304 bytes")
            );
        }
        let err = resolve("garbage").await;
        assert!(
            err.to_string()
                .starts_with(&format!("invalid manifest for {registry}/team/app:garbage: ")),
            "{err}"
        );
        let err = resolve("chart").await;
        assert_eq!(
            err.to_string(),
            format!(
                "unsupported image config media type \"application/vnd.cncf.helm.config.v1+json\" in {registry}/team/app:chart"
            )
        );
        let err = resolve("traversal").await;
        assert!(
            matches!(
                err,
                RegistryError::Protocol {
                    problem: ProtocolProblem::InvalidDigest { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            server.count("/v2/team/app/blobs"),
            0,
            "nothing fetched for refused manifests"
        );
    }

    #[tokio::test]
    async fn blobs_stream_through_a_cross_host_redirect_without_credentials() {
        let layer: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let layer_digest = sha256_digest(&layer);
        let mut routes = Routes::new();
        // The registry hands the blob to "storage" on another host name (localhost instead of
        // 127.0.0.1), as registries do with S3.
        routes.insert(format!("/v2/team/app/blobs/{layer_digest}"), TestResponse::new(307));
        let storage_layer = layer.clone();
        let server = TestServer::start({
            let registry = bearer_registry(routes, move |request| {
                if request.path.starts_with("/storage/") {
                    TestResponse::ok("application/octet-stream", storage_layer.clone())
                } else {
                    TestResponse::not_found()
                }
            });
            move |request, address| {
                let response = registry(request, address);
                if response.status == 307 {
                    let location = format!("http://localhost:{}/storage/{}", address.port(), layer_digest);
                    return response.header("Location", &location);
                }
                response
            }
        })
        .await;
        let client = client();
        let reference = server.reference("team/app:v1");
        let descriptor = Descriptor {
            media_type: LAYER_TYPE.into(),
            digest: sha256_digest(&layer),
            size: layer.len() as u64,
        };

        let mut stream = client
            .blob_stream(&reference, Some(&alice("s3cret")), &descriptor)
            .await
            .expect("blob stream");
        let mut received = Vec::new();
        while let Some(chunk) = stream.next().await {
            received.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(received, layer);
        assert_eq!(stream.received(), layer.len() as u64);

        let requests = server.requests();
        let blob_requests: Vec<_> = requests.iter().filter(|r| r.path.contains("/blobs/")).collect();
        assert_eq!(
            blob_requests.last().and_then(|r| r.header("authorization")),
            Some("Bearer good-token")
        );
        let storage: Vec<_> = requests.iter().filter(|r| r.path.starts_with("/storage/")).collect();
        assert_eq!(storage.len(), 1);
        assert!(
            storage[0].header("authorization").is_none(),
            "the token must not follow a redirect to another host"
        );
        assert!(
            storage[0]
                .header("host")
                .is_some_and(|host| host.starts_with("localhost:"))
        );

        // A descriptor with another size is refused from Content-Length before streaming...
        let longer = Descriptor {
            size: descriptor.size + 1,
            ..descriptor.clone()
        };
        let err = client
            .blob_stream(&reference, Some(&alice("s3cret")), &longer)
            .await
            .expect_err("size mismatch");
        assert!(
            matches!(
                err,
                RegistryError::Protocol {
                    problem: ProtocolProblem::SizeMismatch { .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn blob_stream_checks_the_size_without_content_length() {
        let layer = b"0123456789".repeat(1000);
        let mut routes = Routes::new();
        let digest = sha256_digest(&layer);
        routes.insert(
            format!("/v2/team/app/blobs/{digest}"),
            TestResponse::ok("application/octet-stream", layer.clone()).framing(Framing::UntilClose),
        );
        let server = TestServer::start(serve(routes)).await;
        let client = client();
        let reference = server.reference("team/app:v1");
        let collect = async |size: u64| {
            let descriptor = Descriptor {
                media_type: LAYER_TYPE.into(),
                digest: digest.clone(),
                size,
            };
            let mut stream = client.blob_stream(&reference, None, &descriptor).await?;
            let mut received = Vec::new();
            while let Some(chunk) = stream.next().await {
                received.extend_from_slice(&chunk?);
            }
            Ok::<_, RegistryError>(received)
        };
        assert_eq!(collect(layer.len() as u64).await.expect("exact size"), layer);
        for size in [layer.len() as u64 - 1, layer.len() as u64 + 1] {
            let err = collect(size).await.expect_err("wrong size");
            assert!(
                matches!(&err, RegistryError::Protocol { problem: ProtocolProblem::SizeMismatch { expected, .. }, .. } if *expected == size),
                "{err:?}"
            );
            assert!(err.to_string().starts_with("size mismatch for "), "{err}");
        }

        let bad = Descriptor {
            media_type: LAYER_TYPE.into(),
            digest: "sha256:../../evil".into(),
            size: 1,
        };
        let err = client
            .blob_stream(&reference, None, &bad)
            .await
            .expect_err("bad digest");
        assert!(matches!(
            err,
            RegistryError::Protocol {
                problem: ProtocolProblem::InvalidDigest { .. },
                ..
            }
        ));
    }

    #[tokio::test]
    async fn transient_and_permanent_failures() {
        let server = TestServer::start(|request, _| match request.path.as_str() {
            "/v2/team/app/manifests/busy" => TestResponse::new(503),
            "/v2/team/app/manifests/limited" => {
                let body = json!({"errors": [{"code": "TOOMANYREQUESTS", "message": "pull rate limit\nexceeded"}]});
                TestResponse::new(429).body(body.to_string().into_bytes())
            }
            "/v2/team/app/manifests/denied" => TestResponse::new(403),
            _ => TestResponse::not_found(),
        })
        .await;
        let client = client();
        let registry = server.registry();
        let resolve = async |tag: &str| {
            client
                .resolve_for_platform(&server.reference(&format!("team/app:{tag}")), None, &amd64())
                .await
                .expect_err("failure")
        };

        let err = resolve("busy").await;
        assert!(err.is_transient());
        assert_eq!(
            err.to_string(),
            format!("registry {registry} answered 503 for {registry}/team/app:busy")
        );
        let err = resolve("limited").await;
        assert!(err.is_transient());
        assert_eq!(
            err.to_string(),
            format!(
                "registry {registry} answered 429 for {registry}/team/app:limited: TOOMANYREQUESTS: pull rate limit exceeded"
            )
        );
        let err = resolve("denied").await;
        assert!(!err.is_transient());
        assert!(
            matches!(err, RegistryError::Unauthorized { status: 403, .. }),
            "{err:?}"
        );

        // Nobody listening: unreachable, with the cause, and worth retrying.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed = listener.local_addr().expect("address");
        drop(listener);
        let reference: ImageReference = format!("{closed}/team/app").parse().expect("reference");
        let err = client
            .resolve_for_platform(&reference, None, &amd64())
            .await
            .expect_err("unreachable");
        assert!(err.is_transient());
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot reach registry {closed}: ")),
            "{message}"
        );
        assert!(message.to_lowercase().contains("connect"), "{message}");
    }

    #[tokio::test]
    async fn redirects_are_capped() {
        let server = TestServer::start(|request, address| {
            let hop: u32 = request
                .path
                .rsplit('/')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            TestResponse::new(302).header("Location", &format!("http://{address}/hop/{}", hop + 1))
        })
        .await;
        let err = client()
            .resolve_for_platform(&server.reference("team/app:v1"), None, &amd64())
            .await
            .expect_err("redirect loop");
        assert!(
            matches!(
                err,
                RegistryError::Protocol {
                    problem: ProtocolProblem::BadRedirect { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(server.requests().len(), MAX_REDIRECTS + 1);
    }

    #[test]
    fn plain_http_hosts() {
        let client = RegistryClient::new(vec![
            "registry.lan".into(),
            "Mirror.LAN:5000".into(),
            "[fd00::1]".into(),
        ])
        .expect("client");
        for registry in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "registry.lan",
            "registry.lan:8080",
            "mirror.lan:5000",
            "[fd00::1]:5000",
        ] {
            assert!(client.uses_plain_http(registry), "{registry}");
        }
        for registry in [
            "docker.io",
            "mirror.lan",
            "mirror.lan:5001",
            "registry.lan.evil.com",
            "[fd00::2]",
        ] {
            assert!(!client.uses_plain_http(registry), "{registry}");
        }
    }

    #[test]
    fn challenges() {
        let parsed = parse_challenges(
            "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:library/busybox:pull,push\"",
        );
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].scheme, "Bearer");
        assert_eq!(parsed[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(parsed[0].param("service"), Some("registry.docker.io"));
        assert_eq!(parsed[0].param("scope"), Some("repository:library/busybox:pull,push"));

        let parsed =
            parse_challenges("Basic realm=\"a \\\"quoted\\\" realm\", Bearer realm=x, error=insufficient_scope");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].scheme, "Basic");
        assert_eq!(parsed[0].param("realm"), Some("a \"quoted\" realm"));
        assert_eq!(parsed[1].scheme, "Bearer");
        assert_eq!(parsed[1].param("realm"), Some("x"));
        assert_eq!(parsed[1].param("error"), Some("insufficient_scope"));

        assert_eq!(parse_challenges(""), Vec::new());
        assert_eq!(parse_challenges("Basic").len(), 1);
        let unterminated = parse_challenges("Bearer realm=\"https://x");
        assert_eq!(unterminated[0].param("realm"), Some("https://x"));
        assert_eq!(parse_challenges("Bearer REALM = \"y\"")[0].param("realm"), Some("y"));
    }

    #[test]
    fn token_answers() {
        let check =
            |body: &str| parse_token_answer(body.as_bytes()).map(|(token, lifetime)| (token, lifetime.as_secs()));
        assert_eq!(check(r#"{"token":"t","expires_in":300}"#), Ok(("t".into(), 290)));
        assert_eq!(check(r#"{"access_token":"a"}"#), Ok(("a".into(), 50)));
        assert_eq!(
            check(r#"{"token":"","access_token":"a","expires_in":5}"#),
            Ok(("a".into(), 50))
        );
        assert_eq!(
            check(r#"{"token":"t","expires_in":99999999999}"#),
            Ok(("t".into(), 86390))
        );
        assert!(check(r#"{"expires_in":300}"#).is_err());
        assert!(check("not json").is_err());
    }

    #[test]
    fn platforms() {
        assert_eq!(oci_architecture("x86_64"), "amd64");
        assert_eq!(oci_architecture("aarch64"), "arm64");
        assert_eq!(oci_architecture("riscv64"), "riscv64");
        let host = Platform::default();
        assert_eq!(host.os, "linux");
        assert_eq!(host.architecture, oci_architecture(std::env::consts::ARCH));
        let arm = Platform {
            variant: Some("v7".into()),
            ..Platform::new("linux", "arm")
        };
        assert_eq!(arm.to_string(), "linux/arm/v7");
        let candidate = |architecture: &str, variant: Option<&str>| IndexPlatform {
            architecture: architecture.into(),
            os: "linux".into(),
            variant: variant.map(str::to_string),
        };
        assert!(arm.matches(&candidate("arm", Some("v7"))));
        assert!(!arm.matches(&candidate("arm", Some("v6"))));
        assert!(!arm.matches(&candidate("arm", None)));
        assert!(Platform::new("linux", "arm").matches(&candidate("arm", Some("v6"))));
    }

    #[test]
    fn errors_are_readable_and_credentials_hidden() {
        let auth = alice("hunter2");
        assert!(!format!("{:?}", basic_authorization(&auth, "x").expect("header")).contains("hunter2"));
        assert!(!credentials_fingerprint(&auth).contains("hunter2"));
        assert_ne!(
            credentials_fingerprint(&auth),
            credentials_fingerprint(&alice("hunter3"))
        );
        let err = RegistryError::protocol(
            "docker.io/library/busybox:latest",
            ProtocolProblem::SizeMismatch {
                digest: "sha256:abc".into(),
                expected: 10,
                actual: 9,
            },
        );
        assert_eq!(
            err.to_string(),
            "size mismatch for docker.io/library/busybox:latest: sha256:abc should be 10 bytes, got 9"
        );
    }
}
