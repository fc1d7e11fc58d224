//! The agent's state directory: where each pod's record, volume, log and generated files live.
//!
//! ```text
//! <state>/node.json              node id and token (0600)
//! <state>/pods/<id>.json         the pod's record (spec, desired state, generation, network)
//! <state>/pods/<id>/hosts        generated /etc/hosts (read-only in the pod)
//! <state>/pods/<id>/resolv.conf  generated /etc/resolv.conf (read-only in the pod)
//! <state>/volumes/<id>/          the pod's volume, bind-mounted at its mount path
//! <state>/logs/<id>.log          stdout+stderr, appended by the containerd shim; .1, .2 rotated
//! <state>/cni/                   host-local IPAM allocations
//! <state>/tmp/                   scratch space (image imports)
//! ```
//!
//! *Invariants.* Records are written atomically (temporary file + rename), so a crash leaves
//! the old or the new record, never a torn one. Paths are built from pod ids (UUIDs), never
//! from names a user chose.

use std::path::{Path, PathBuf};

use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Dirs {
    root: PathBuf,
}

impl Dirs {
    pub fn new(root: &Path) -> std::io::Result<Dirs> {
        for sub in ["pods", "volumes", "logs", "cni", "tmp"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(Dirs {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn node_file(&self) -> PathBuf {
        self.root.join("node.json")
    }
    pub fn records(&self) -> PathBuf {
        self.root.join("pods")
    }
    pub fn record(&self, id: Uuid) -> PathBuf {
        self.root.join("pods").join(format!("{id}.json"))
    }
    pub fn pod_files(&self, id: Uuid) -> PathBuf {
        self.root.join("pods").join(id.to_string())
    }
    pub fn volume(&self, id: Uuid) -> PathBuf {
        self.root.join("volumes").join(id.to_string())
    }
    pub fn log(&self, id: Uuid) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn ipam(&self) -> PathBuf {
        self.root.join("cni")
    }
    pub fn scratch(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", Uuid::new_v4().simple()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}
