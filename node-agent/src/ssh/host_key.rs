//! The gateway's host key: an Ed25519 key generated once into `<state>/ssh_host_ed25519_key`
//! (OpenSSH private-key format, mode 0600) and reused on every start, so clients that saved the
//! node's fingerprint keep trusting it across agent restarts.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey};

/// The file name in the state directory.
pub const FILE_NAME: &str = "ssh_host_ed25519_key";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read the SSH host key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the SSH host key {path} is not an OpenSSH private key: {reason}")]
    Parse { path: String, reason: String },
    #[error("cannot write the SSH host key {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Loads the host key at `path`, creating it (0600, atomically) when there is none. A key file
/// readable by others is made private again.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = PrivateKey::from_openssh(text.as_bytes()).map_err(|err| HostKeyError::Parse {
                path: shown.clone(),
                reason: err.to_string(),
            })?;
            let mode = std::fs::metadata(path)
                .map_err(|source| HostKeyError::Read {
                    path: shown.clone(),
                    source,
                })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %shown, mode = format!("{mode:o}"), "the SSH host key was readable by others; made private");
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|source| HostKeyError::Write { path: shown, source })?;
            }
            Ok(key)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(source) => Err(HostKeyError::Read { path: shown, source }),
    }
}

fn create(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let shown = path.display().to_string();
    let write_error = |source| HostKeyError::Write {
        path: shown.clone(),
        source,
    };
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&rand::random::<[u8; 32]>()));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|err| write_error(std::io::Error::other(err.to_string())))?;
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(text.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(write_error)?;
    tracing::info!(
        path = %shown,
        fingerprint = %key.public_key().fingerprint(HashAlg::Sha256),
        "generated the SSH host key"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("instapod-hostkey-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(FILE_NAME);
        let first = load_or_create(&path).expect("created");
        let mode = std::fs::metadata(&path).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_create(&path).expect("loaded");
        assert_eq!(
            first.public_key().fingerprint(HashAlg::Sha256),
            second.public_key().fingerprint(HashAlg::Sha256)
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        load_or_create(&path).expect("loaded");
        assert_eq!(
            std::fs::metadata(&path).expect("exists").permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(load_or_create(&path), Err(HostKeyError::Parse { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
