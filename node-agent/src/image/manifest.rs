//! The JSON documents of an OCI (or Docker v2) image, as read back from containerd's content
//! store: indexes, manifests and the image config's runtime defaults.

use serde::Deserialize;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// An index or a manifest: which one is told by the media type or by which fields are set.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

/// The image config's `config` (what a container runs by default) and its layer diff ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub config: RunDefaults,
    #[serde(default)]
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunDefaults {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The OCI architecture name of this machine.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Document {
    pub fn is_index(&self) -> bool {
        matches!(self.media_type.as_deref(), Some(OCI_INDEX | DOCKER_LIST))
            || (self.manifests.is_some() && self.config.is_none())
    }

    /// The manifest of an index for linux on this machine's architecture.
    pub fn manifest_for_host(&self) -> Option<&Descriptor> {
        let manifests = self.manifests.as_ref()?;
        manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == host_architecture())
            })
            .or_else(|| {
                // An index without platforms (single-platform OCI layouts) means "this one".
                (manifests.len() == 1 && manifests[0].platform.is_none()).then(|| &manifests[0])
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_picks_this_machines_platform() {
        let doc: Document = serde_json::from_value(serde_json::json!({
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": "sha256:aa", "size": 1, "platform": {"os": "linux", "architecture": "s390x"}},
                {"mediaType": OCI_MANIFEST, "digest": "sha256:bb", "size": 2, "platform": {"os": "linux", "architecture": host_architecture()}}
            ]
        }))
        .expect("parses");
        assert!(doc.is_index());
        assert_eq!(doc.manifest_for_host().map(|d| d.digest.as_str()), Some("sha256:bb"));
    }

    #[test]
    fn image_config_defaults_parse() {
        let config: ImageConfig = serde_json::from_value(serde_json::json!({
            "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "Env": ["A=1"], "WorkingDir": "/w"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:11"]}
        }))
        .expect("parses");
        assert_eq!(config.config.entrypoint, Some(vec!["/bin/sh".to_string()]));
        assert_eq!(config.rootfs.diff_ids, vec!["sha256:11".to_string()]);
    }
}
