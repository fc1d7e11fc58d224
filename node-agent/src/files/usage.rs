//! Disk usage per volume, and the plan's disk enforced on writes through the files API.
//!
//! *Design.* Usage is the sum of the apparent sizes of the volume's regular files, measured by
//! walking the volume ([`measure`](super::volume::measure)) on first use and again when the
//! measurement is older than [`REFRESH`] or something was deleted. Between walks, writes
//! through the API keep it current: a write reserves its bytes as they arrive (so concurrent
//! uploads cannot together pass the limit), and on commit the reservation becomes usage minus
//! the bytes of the file it replaced. A write that would take usage plus reservations past the
//! pod's disk (`spec.resources.disk_bytes` in the agent's record) is refused with 507 and its
//! temporary file removed. A replaced file still counts until the rename: replacing a file
//! needs room for both for a moment, as it does on the disk.
//!
//! *Limitations.* This bounds what the files API writes. The pod's own processes write to the
//! bind-mounted directory directly, and nothing here stops them: a real limit needs a
//! filesystem quota (ext4/XFS project quotas on the volumes' filesystem, or a loop-mounted
//! image per volume), which the agent does not set up. Their writes show in the usage at the
//! next walk. Apparent sizes over-count sparse files and under-count directories' blocks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Age after which a usage measurement is walked again.
pub const REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Tracked {
    used: u64,
    reserved: u64,
    measured_at: Instant,
}

static VOLUMES: LazyLock<Mutex<HashMap<PathBuf, Tracked>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn volumes() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Tracked>> {
    VOLUMES.lock().unwrap_or_else(|p| p.into_inner())
}

/// A volume's usage against its limit, as list answers show it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

/// A write would exceed the pod's disk.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the write would take the volume to {would_be} bytes, over the pod's disk of {limit} bytes")]
pub struct QuotaExceeded {
    pub would_be: u64,
    pub limit: u64,
}

/// The usage of the volume at `root` (blocking: may walk it).
pub fn current(root: &Path) -> std::io::Result<u64> {
    if let Some(tracked) = volumes().get(root)
        && tracked.measured_at.elapsed() < REFRESH
    {
        return Ok(tracked.used);
    }
    let used = super::volume::measure(root)?;
    let mut volumes = volumes();
    let tracked = volumes.entry(root.to_path_buf()).or_insert(Tracked {
        used,
        reserved: 0,
        measured_at: Instant::now(),
    });
    tracked.used = used;
    tracked.measured_at = Instant::now();
    Ok(used)
}

/// Forgets the measurement of `root` (after deletes): the next use walks it again.
pub fn invalidate(root: &Path) {
    if let Some(tracked) = volumes().get_mut(root) {
        tracked.measured_at = Instant::now() - REFRESH - Duration::from_secs(1);
    }
}

/// The bytes one write has reserved; released when dropped, turned into usage by
/// [`Reservation::commit`].
#[derive(Debug)]
pub struct Reservation {
    root: PathBuf,
    limit: u64,
    bytes: u64,
}

impl Reservation {
    /// Starts reserving for a write in the volume at `root` limited to `limit` bytes (blocking:
    /// measures the volume when needed).
    pub fn start(root: &Path, limit: u64) -> std::io::Result<Reservation> {
        current(root)?;
        Ok(Reservation {
            root: root.to_path_buf(),
            limit,
            bytes: 0,
        })
    }

    /// Reserves `more` bytes, or refuses when usage and every reservation would pass the limit.
    pub fn grow(&mut self, more: u64) -> Result<(), QuotaExceeded> {
        let mut volumes = volumes();
        let tracked = volumes.entry(self.root.clone()).or_insert(Tracked {
            used: 0,
            reserved: 0,
            measured_at: Instant::now(),
        });
        let would_be = tracked.used.saturating_add(tracked.reserved).saturating_add(more);
        if would_be > self.limit {
            return Err(QuotaExceeded {
                would_be,
                limit: self.limit,
            });
        }
        tracked.reserved += more;
        self.bytes += more;
        Ok(())
    }

    /// The write was committed, replacing a file of `replaced_bytes`.
    pub fn commit(mut self, replaced_bytes: u64) {
        let mut volumes = volumes();
        if let Some(tracked) = volumes.get_mut(&self.root) {
            tracked.reserved = tracked.reserved.saturating_sub(self.bytes);
            tracked.used = tracked.used.saturating_add(self.bytes).saturating_sub(replaced_bytes);
        }
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0
            && let Some(tracked) = volumes().get_mut(&self.root)
        {
            tracked.reserved = tracked.reserved.saturating_sub(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_hold_the_limit_and_become_usage() {
        let root = std::env::temp_dir().join(format!("instapod-usage-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(root.join("sub")).expect("dir");
        std::fs::write(root.join("sub/a"), vec![0u8; 100]).expect("file");
        assert_eq!(current(&root).expect("measure"), 100);
        let mut first = Reservation::start(&root, 300).expect("start");
        let mut second = Reservation::start(&root, 300).expect("start");
        first.grow(150).expect("fits");
        let err = second.grow(60).expect_err("100 + 150 + 60 > 300");
        assert_eq!((err.would_be, err.limit), (310, 300));
        second.grow(50).expect("exactly the limit");
        drop(second); // aborted: its 50 are free again
        first.commit(100); // replaced the 100-byte file
        assert_eq!(current(&root).expect("cached"), 150);
        invalidate(&root);
        assert_eq!(current(&root).expect("walked again"), 100);
        std::fs::remove_dir_all(&root).ok();
    }
}
