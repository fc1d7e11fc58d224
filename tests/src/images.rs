//! Tiny OCI images built by the tests themselves, from Debian's `busybox-static`, so no test
//! ever needs the internet: one gzip'd layer holding `/bin/busybox` with a symlink per applet
//! (`sh`, `httpd`, `echo`, ...), a few files in `/etc`, and any files a test adds; an OCI
//! image config (entrypoint, cmd, env, working directory) and an OCI manifest.
//!
//! An image can be written as an OCI image layout tarball ([`OciImage::write_oci_layout`], for
//! `ctr images import` or the agent's import path) and pushed to a registry over the OCI
//! distribution API ([`OciImage::push`]: blob uploads with POST + PUT, then the manifest).
//!
//! *Design.* The bytes are deterministic: fixed mtimes and owners in the tar, a gzip header
//! without a timestamp, JSON with a fixed field order. The same builder calls therefore give
//! the same digests, so tests in parallel can push the same image without conflict.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::process;

/// Where Debian's `busybox-static` installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// The `PATH` every image built here starts with.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The modification time of every tar entry (2020-01-01T00:00:00Z), for reproducible digests.
const MTIME: u64 = 1_577_836_800;

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A content-addressed blob: its bytes, `sha256:` digest and media type.
#[derive(Clone)]
pub struct Blob {
    pub media_type: &'static str,
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Blob {
    /// The descriptor, not the bytes: a layer is a megabyte that no failure message needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("media_type", &self.media_type)
            .field("digest", &self.digest)
            .field("size", &self.bytes.len())
            .finish()
    }
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type,
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// The OCI descriptor of this blob.
    pub fn descriptor(&self) -> serde_json::Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len() })
    }

    /// The hex part of the digest (the file name under `blobs/sha256/`).
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// What to put into a busybox image.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
    files: Vec<(String, Vec<u8>, u32)>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder {
            entrypoint: Vec::new(),
            cmd: vec!["sh".to_string()],
            env: vec![DEFAULT_PATH.to_string()],
            working_dir: "/".to_string(),
            files: Vec::new(),
        }
    }
}

impl ImageBuilder {
    /// A busybox image whose default command is `sh`.
    pub fn busybox() -> ImageBuilder {
        ImageBuilder::default()
    }

    /// The image's `Entrypoint`.
    pub fn entrypoint<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = args.into_iter().map(Into::into).collect();
        self
    }

    /// The image's `Cmd`.
    pub fn cmd<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd = args.into_iter().map(Into::into).collect();
        self
    }

    /// Adds `NAME=value` to the image's `Env` (after `PATH`).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push(format!("{name}={value}"));
        self
    }

    /// The image's `WorkingDir`.
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = dir.to_string();
        self
    }

    /// Adds a regular file at the absolute path `path` (its parent directories are created).
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files.push((path.to_string(), contents.into(), mode));
        self
    }

    /// Builds the layer, config and manifest. Panics when busybox-static is not installed.
    pub fn build(&self) -> OciImage {
        let busybox = busybox_binary();
        let applets = busybox_applets(&busybox);
        let busybox_bytes =
            std::fs::read(&busybox).unwrap_or_else(|err| panic!("cannot read {}: {err}", busybox.display()));
        let tar = self
            .layer_tar(&busybox_bytes, &applets)
            .expect("writing a tar into memory cannot fail");
        let diff_id = sha256_digest(&tar);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&tar).expect("compressing into memory cannot fail");
        let layer = Blob::new(
            LAYER_MEDIA_TYPE,
            gz.finish().expect("compressing into memory cannot fail"),
        );

        let config = json!({
            "architecture": oci_architecture(),
            "os": "linux",
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": self.working_dir,
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created_by": "instapod-tests: busybox-static image" }],
        });
        let config = Blob::new(
            CONFIG_MEDIA_TYPE,
            serde_json::to_vec(&config).expect("a JSON value serializes"),
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(),
            "layers": [layer.descriptor()],
        });
        let manifest = Blob::new(
            MANIFEST_MEDIA_TYPE,
            serde_json::to_vec(&manifest).expect("a JSON value serializes"),
        );
        OciImage {
            layer,
            diff_id,
            config,
            manifest,
        }
    }

    /// The uncompressed layer: directories, busybox, one symlink per applet, /etc files, extras.
    fn layer_tar(&self, busybox: &[u8], applets: &[String]) -> std::io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dirs: Vec<String> = ["bin", "etc", "root", "tmp", "usr", "usr/bin", "var"]
            .iter()
            .map(|d| d.to_string())
            .collect();
        for (path, _, _) in &self.files {
            let relative = path.trim_start_matches('/');
            let mut parent = Path::new(relative).parent();
            while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
                dirs.push(dir.to_string_lossy().into_owned());
                parent = dir.parent();
            }
        }
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
            let mut header = tar_header(tar::EntryType::Directory, 0, mode);
            tar.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
        }
        let mut header = tar_header(tar::EntryType::Regular, busybox.len() as u64, 0o755);
        tar.append_data(&mut header, "bin/busybox", busybox)?;
        for applet in applets.iter().filter(|a| a.as_str() != "busybox") {
            let mut header = tar_header(tar::EntryType::Symlink, 0, 0o777);
            tar.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
        }
        let etc: [(&str, &[u8]); 3] = [
            (
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            ),
            ("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
            ("etc/hosts", b"127.0.0.1 localhost\n"),
        ];
        for (path, contents) in etc {
            let mut header = tar_header(tar::EntryType::Regular, contents.len() as u64, 0o644);
            tar.append_data(&mut header, path, contents)?;
        }
        for (path, contents, mode) in &self.files {
            let mut header = tar_header(tar::EntryType::Regular, contents.len() as u64, *mode);
            tar.append_data(&mut header, path.trim_start_matches('/'), contents.as_slice())?;
        }
        tar.into_inner()
    }
}

/// A ustar header owned by root with the fixed mtime.
fn tar_header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header
}

/// The OCI name of this machine's architecture (images must match the host to run).
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The static busybox, or a panic that says what to install.
fn busybox_binary() -> PathBuf {
    let path = Path::new(BUSYBOX);
    if !process::is_executable(path) {
        panic!("{BUSYBOX} not found; install it (Debian: `apt-get install busybox-static`)");
    }
    path.to_path_buf()
}

/// The applet names busybox was built with (`busybox --list`).
fn busybox_applets(busybox: &Path) -> Vec<String> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap_or_else(|err| panic!("cannot run {} --list: {err}", busybox.display()));
    if !output.status.success() {
        panic!("{} --list failed ({})", busybox.display(), output.status);
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();
    assert!(
        applets.iter().any(|a| a == "sh"),
        "{} has no `sh` applet; is it busybox-static?",
        busybox.display()
    );
    applets
}

/// A built image: one gzip'd layer, its config and its manifest.
#[derive(Debug, Clone)]
pub struct OciImage {
    pub layer: Blob,
    /// The digest of the uncompressed layer (the config's `rootfs.diff_ids[0]`).
    pub diff_id: String,
    pub config: Blob,
    pub manifest: Blob,
}

impl OciImage {
    /// Writes an OCI image layout as a tar file at `path`. `name` is the full reference the
    /// image gets on import (`io.containerd.image.name`); its tag is also the layout's
    /// `org.opencontainers.image.ref.name`.
    pub fn write_oci_layout(&self, path: &Path, name: &str) -> anyhow::Result<()> {
        let tag = name
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map(|(_, tag)| tag)
            .unwrap_or("latest");
        let mut descriptor = self.manifest.descriptor();
        descriptor["annotations"] = json!({
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": tag,
        });
        let index = json!({ "schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [descriptor] });
        let index = serde_json::to_vec(&index).expect("a JSON value serializes");
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

        let mut tar = tar::Builder::new(Vec::new());
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut header = tar_header(tar::EntryType::Directory, 0, 0o755);
            tar.append_data(&mut header, dir, std::io::empty())?;
        }
        for blob in [&self.layer, &self.config, &self.manifest] {
            let mut header = tar_header(tar::EntryType::Regular, blob.bytes.len() as u64, 0o644);
            tar.append_data(
                &mut header,
                format!("blobs/sha256/{}", blob.hex()),
                blob.bytes.as_slice(),
            )?;
        }
        for (file, bytes) in [("oci-layout", &layout[..]), ("index.json", index.as_slice())] {
            let mut header = tar_header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
            tar.append_data(&mut header, file, bytes)?;
        }
        let bytes = tar.into_inner()?;
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// Pushes the blobs and the manifest to the registry at `base_url` (`http://host:port`) as
    /// `<repository>:<tag>`, then checks that the registry serves the manifest back unchanged.
    pub async fn push(&self, base_url: &str, repository: &str, tag: &str) -> anyhow::Result<()> {
        let http = crate::http_builder().build()?;
        let base = reqwest::Url::parse(base_url).with_context(|| format!("registry URL {base_url}"))?;
        for blob in [&self.layer, &self.config] {
            push_blob(&http, &base, repository, blob).await?;
        }
        let url = base.join(&format!("/v2/{repository}/manifests/{tag}"))?;
        let response = http
            .put(url.clone())
            .header(reqwest::header::CONTENT_TYPE, MANIFEST_MEDIA_TYPE)
            .body(self.manifest.bytes.clone())
            .send()
            .await
            .with_context(|| format!("PUT {url}"))?;
        let status = response.status();
        ensure!(
            status == reqwest::StatusCode::CREATED,
            "PUT {url}: {status} {}",
            response.text().await.unwrap_or_default()
        );

        let served = self.fetch_manifest(&http, &base, repository, tag).await?;
        ensure!(
            served == self.manifest.bytes,
            "the registry serves another manifest for {repository}:{tag}"
        );
        Ok(())
    }

    async fn fetch_manifest(
        &self,
        http: &reqwest::Client,
        base: &reqwest::Url,
        repository: &str,
        tag: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let url = base.join(&format!("/v2/{repository}/manifests/{tag}"))?;
        let response = http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, MANIFEST_MEDIA_TYPE)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        ensure!(status.is_success(), "GET {url}: {status}");
        let digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        ensure!(
            digest.as_deref() == Some(self.manifest.digest.as_str()),
            "GET {url}: Docker-Content-Digest {digest:?}, expected {}",
            self.manifest.digest
        );
        Ok(response.bytes().await?.to_vec())
    }
}

/// Uploads one blob unless the registry has it: `POST /v2/<name>/blobs/uploads/`, then `PUT`
/// to the returned location with `?digest=`.
async fn push_blob(http: &reqwest::Client, base: &reqwest::Url, repository: &str, blob: &Blob) -> anyhow::Result<()> {
    let url = base.join(&format!("/v2/{repository}/blobs/{}", blob.digest))?;
    let response = http
        .head(url.clone())
        .send()
        .await
        .with_context(|| format!("HEAD {url}"))?;
    if response.status().is_success() {
        return Ok(());
    }

    let url = base.join(&format!("/v2/{repository}/blobs/uploads/"))?;
    let response = http
        .post(url.clone())
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    if status != reqwest::StatusCode::ACCEPTED {
        bail!("POST {url}: {status} {}", response.text().await.unwrap_or_default());
    }
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .with_context(|| format!("POST {url}: 202 without a Location header"))?;
    // The location may be relative, and usually carries its own query (upload state).
    let mut upload = base
        .join(location)
        .with_context(|| format!("upload location {location}"))?;
    upload.query_pairs_mut().append_pair("digest", &blob.digest);
    let response = http
        .put(upload.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(blob.bytes.clone())
        .send()
        .await
        .with_context(|| format!("PUT {upload}"))?;
    let status = response.status();
    ensure!(
        status == reqwest::StatusCode::CREATED,
        "PUT {upload}: {status} {}",
        response.text().await.unwrap_or_default()
    );
    Ok(())
}
