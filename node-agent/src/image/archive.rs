//! Reading an OCI image layout tarball (`index.json`, `oci-layout`, `blobs/sha256/<hex>`) for
//! air-gapped nodes.
//!
//! *Invariants.* Only the layout's own files are taken, as regular files, into a fresh
//! directory the agent creates: `index.json` and `blobs/sha256/<64 hex>`. Every other entry
//! (other paths, `..`, links, devices) is skipped, so a hostile tarball cannot write outside
//! that directory. Blob contents are verified by containerd against their digests when they
//! are written to the content store.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest `index.json` accepted.
const MAX_INDEX: u64 = 1024 * 1024;

/// An extracted layout.
#[derive(Debug)]
pub struct Layout {
    pub dir: PathBuf,
    pub index_json: Vec<u8>,
}

impl Layout {
    /// Where blob `digest` (`sha256:<hex>`) was extracted, if the archive had it.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        if !is_sha256_hex(hex) {
            return None;
        }
        let path = self.dir.join("blobs").join(hex);
        path.is_file().then_some(path)
    }
}

fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Extracts the layout tarball at `archive` into `dir` (created; must not exist).
pub fn extract(archive: &Path, dir: &Path) -> Result<Layout, String> {
    let file = std::fs::File::open(archive).map_err(|err| format!("cannot open: {err}"))?;
    std::fs::create_dir_all(dir.join("blobs")).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut index_json = None;
    let entries = tar.entries().map_err(|err| format!("not a tar archive: {err}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|err| format!("corrupt tar archive: {err}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|err| format!("bad entry name: {err}"))?
            .into_owned();
        let name = path.to_string_lossy().trim_start_matches("./").to_string();
        if name == "index.json" {
            if entry.size() > MAX_INDEX {
                return Err("index.json is too large".into());
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|err| format!("reading index.json: {err}"))?;
            index_json = Some(bytes);
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/")
            && is_sha256_hex(hex)
        {
            let target = dir.join("blobs").join(hex);
            let mut out = std::fs::File::create(&target).map_err(|err| format!("writing {hex}: {err}"))?;
            std::io::copy(&mut entry, &mut out).map_err(|err| format!("writing {hex}: {err}"))?;
        }
    }
    let index_json = index_json.ok_or("the archive has no index.json (is it an OCI image layout?)")?;
    Ok(Layout {
        dir: dir.to_path_buf(),
        index_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], kind: tar::EntryType) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        // set_path refuses `..`; write the raw name to test hostile archives.
        let bytes = name.as_bytes();
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_cksum();
        builder.append(&header, data).expect("append");
    }

    #[test]
    fn only_layout_files_are_extracted_and_hostile_names_are_skipped() {
        let root = std::env::temp_dir().join(format!("instapod-archive-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root).expect("mkdir");
        let hex = "a".repeat(64);
        let mut builder = tar::Builder::new(Vec::new());
        append(
            &mut builder,
            "index.json",
            br#"{"manifests":[]}"#,
            tar::EntryType::Regular,
        );
        append(
            &mut builder,
            &format!("blobs/sha256/{hex}"),
            b"layer",
            tar::EntryType::Regular,
        );
        append(&mut builder, "../escape", b"x", tar::EntryType::Regular);
        append(
            &mut builder,
            "blobs/sha256/../../escape2",
            b"x",
            tar::EntryType::Regular,
        );
        append(&mut builder, "blobs/sha256/link", b"", tar::EntryType::Symlink);
        let tarball = root.join("image.tar");
        std::fs::write(&tarball, builder.into_inner().expect("tar")).expect("write");
        let dir = root.join("out");
        let layout = extract(&tarball, &dir).expect("extracts");
        assert_eq!(layout.index_json, br#"{"manifests":[]}"#);
        let blob = layout.blob_path(&format!("sha256:{hex}")).expect("blob extracted");
        assert_eq!(std::fs::read(blob).expect("read"), b"layer");
        assert!(!root.join("escape").exists() && !root.join("escape2").exists());
        assert!(layout.blob_path("sha256:../../etc/passwd").is_none());
        let mut names: Vec<_> = std::fs::read_dir(dir.join("blobs"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from(&hex)]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_archive_without_index_json_is_refused() {
        let root = std::env::temp_dir().join(format!("instapod-archive-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root).expect("mkdir");
        let tarball = root.join("x.tar");
        std::fs::write(&tarball, tar::Builder::new(Vec::new()).into_inner().expect("tar")).expect("write");
        let err = extract(&tarball, &root.join("out")).expect_err("no index");
        assert!(err.contains("index.json"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
