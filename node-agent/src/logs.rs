//! Size-based rotation of pod log files.
//!
//! *Design.* The containerd shim keeps each pod's log open in append mode, so the agent
//! rotates by copy-and-truncate: `<id>.log` is copied to `<id>.log.1` (older files shift to
//! `.2` … and the oldest is dropped), then truncated; the shim's next append lands at the start
//! of the emptied file. Lines written between the copy and the truncation are lost; with the
//! check running every few seconds that window is a few microseconds per rotation.

use std::path::{Path, PathBuf};

/// Rotates `log` when it is larger than `max_bytes`, keeping `keep` old files.
pub fn rotate_if_large(log: &Path, max_bytes: u64, keep: u32) -> std::io::Result<bool> {
    let Ok(meta) = std::fs::metadata(log) else {
        return Ok(false);
    };
    if meta.len() <= max_bytes || keep == 0 {
        return Ok(false);
    }
    let numbered = |n: u32| -> PathBuf {
        let mut name = log.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::copy(log, numbered(1))?;
    std::fs::OpenOptions::new().write(true).open(log)?.set_len(0)?;
    Ok(true)
}

/// Removes a pod's log and its rotated files.
pub fn remove_all(log: &Path, keep: u32) {
    let _ = std::fs::remove_file(log);
    for n in 1..=keep {
        let mut name = log.as_os_str().to_owned();
        name.push(format!(".{n}"));
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_shifts_files_and_keeps_at_most_keep() {
        let dir = std::env::temp_dir().join(format!("instapod-logs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("p.log");
        for round in 0..4u8 {
            std::fs::write(&log, vec![b'a' + round; 100]).expect("write");
            assert!(rotate_if_large(&log, 50, 2).expect("rotate"));
            assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
        }
        assert_eq!(std::fs::read(dir.join("p.log.1")).expect(".1"), vec![b'd'; 100]);
        assert_eq!(std::fs::read(dir.join("p.log.2")).expect(".2"), vec![b'c'; 100]);
        assert!(!dir.join("p.log.3").exists());
        std::fs::write(&log, b"small").expect("write");
        assert!(!rotate_if_large(&log, 50, 2).expect("no rotation"));
        remove_all(&log, 2);
        assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
