//! Operations on one pod's volume, every one of them beneath a directory handle.
//!
//! *Invariant.* Nothing here takes a host path from a request. The volume's root is opened once
//! per request (`O_PATH | O_DIRECTORY | O_NOFOLLOW`) from the agent's own state directory, and
//! every user path is resolved from that handle by the kernel with `openat2(2)` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`: a `..`, an absolute symlink, a
//! relative one that climbs out, `/proc/…` magic links and mount crossings all fail, per
//! component and at the moment of the lookup, so a symlink the pod swaps in while a request
//! runs is caught like one planted before. The last component is then handled with `*at`
//! calls on the parent's handle that never follow it (`statat(AT_SYMLINK_NOFOLLOW)`,
//! `unlinkat`, `renameat`, `mkdirat`).
//!
//! *Special files.* A file is read only after the handle opened with `O_PATH` (which does not
//! open a device, a FIFO or a socket: no driver `open`, no blocking) says it is a regular file;
//! that same inode is then reopened for reading through `/proc/self/fd`, so what was checked is
//! what is read. Lists show special files with their type and never open them.
//!
//! *Writes* go to a temporary file (`.instapod-tmp-<random>`) in the target's directory,
//! are fsynced and renamed over the target (then the directory is fsynced): a reader sees the
//! old or the new file, never a torn one. Create-only uses `RENAME_NOREPLACE`; if-match checks
//! the etag and renames under one lock, so writers through this agent cannot lose an update
//! between the check and the rename. A pending write that is dropped removes its temporary
//! file. A symlink at the target is replaced by the file, never written through. A replaced
//! file's mode and owner are kept; a new file is `0644` and owned by the agent's user (root).
//!
//! *Etag.* `<inode>-<size>-<mtime ns>` in hex: cheap (no hashing) and different after every
//! write through this API, since each write is a new inode. A write by the pod that keeps the
//! inode, size and modification time (within the filesystem's timestamp granularity) is not
//! seen; that is the price of not hashing files to list them.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::path::VolumePath;

/// Prefix of the temporary files of writes in progress.
pub const TMP_PREFIX: &str = ".instapod-tmp-";
/// Deepest nesting a recursive delete or a usage walk descends.
const MAX_DEPTH: usize = 256;

/// Serialises the check-and-rename step of writes (not the writing), so an if-match cannot be
/// overtaken between its check and its rename by another write through this agent.
static COMMIT: Mutex<()> = Mutex::new(());

/// Why an operation on a volume failed; mapped to HTTP in `mod.rs`.
#[derive(Debug, thiserror::Error)]
pub enum FileOpError {
    #[error("the pod's volume is not on this node yet (the pod has not started here)")]
    NoVolume,
    #[error("no file or directory at {0:?}")]
    NotFound(String),
    #[error("{0:?} leads outside the pod's volume (through a symlink or a mount)")]
    OutsideVolume(String),
    #[error("{path:?} is a {kind}, not a regular file")]
    NotAFile { path: String, kind: &'static str },
    #[error("{0:?} is not a directory")]
    NotADirectory(String),
    #[error("{0:?} already exists")]
    AlreadyExists(String),
    #[error("the directory {0:?} is not empty; pass recursive=true to delete it with its contents")]
    NotEmpty(String),
    #[error("the volume's root cannot be deleted")]
    DeleteRoot,
    #[error("{path:?} has changed: its etag is {current}, not {expected}")]
    EtagMismatch {
        path: String,
        expected: String,
        current: String,
    },
    #[error("{path:?}: {source}")]
    Io { path: String, source: io::Error },
}

fn io_error(path: &VolumePath, errno: rustix::io::Errno) -> FileOpError {
    let shown = path.display();
    match errno {
        rustix::io::Errno::NOENT => FileOpError::NotFound(shown),
        // RESOLVE_BENEATH / NO_XDEV refuse with EXDEV; NO_MAGICLINKS and O_NOFOLLOW with ELOOP.
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => FileOpError::OutsideVolume(shown),
        rustix::io::Errno::NOTDIR => FileOpError::NotADirectory(shown),
        errno => FileOpError::Io {
            path: shown,
            source: errno.into(),
        },
    }
}

/// What a file is, by its mode.
pub fn kind(stat: &Stat) -> &'static str {
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "char_device",
        FileType::BlockDevice => "block_device",
        FileType::Unknown => "unknown",
    }
}

/// The etag of a file's state (see the module's *Etag*).
pub fn etag(stat: &Stat) -> String {
    let mtime_ns = i128::from(stat.st_mtime) * 1_000_000_000 + i128::from(stat.st_mtime_nsec);
    format!("{:x}-{:x}-{:x}", stat.st_ino, stat.st_size, mtime_ns)
}

pub fn mtime(stat: &Stat) -> String {
    let nanos = i128::from(stat.st_mtime) * 1_000_000_000 + i128::from(stat.st_mtime_nsec);
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn size(stat: &Stat) -> u64 {
    u64::try_from(stat.st_size).unwrap_or(0)
}

/// One directory entry, as a list returns it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// The name (invalid UTF-8 replaced; such names cannot be addressed through the API).
    pub name: String,
    /// `file`, `directory`, `symlink`, `fifo`, `socket`, `char_device`, `block_device`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Bytes (of the symlink itself for a symlink).
    pub size: u64,
    /// Permission bits in octal, e.g. `"0644"`.
    pub mode: String,
    /// Modification time, RFC 3339 UTC.
    pub mtime: String,
    /// For regular files: the etag a write's `if_match` compares with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// One page of a directory.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// The `cursor` of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// A file opened for reading, with what was checked on its handle.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub stat: Stat,
}

/// The state of a file after a write.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub path: String,
    pub size: u64,
    pub etag: String,
    pub mtime: String,
    /// No file was there before.
    pub created: bool,
    /// Bytes of the file that was replaced (0 when created), for the usage count.
    #[serde(skip)]
    pub replaced_bytes: u64,
}

/// Conditions on a write.
#[derive(Debug, Clone, Default)]
pub struct WriteConditions {
    /// Refuse (409) when something exists at the path.
    pub create_only: bool,
    /// Refuse (412) unless the file's current etag is this.
    pub if_match: Option<String>,
}

/// One pod's volume, opened.
#[derive(Debug)]
pub struct Volume {
    root: OwnedFd,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

impl Volume {
    /// Opens the volume directory `root` (a path the agent built from the pod's id).
    pub fn open(root: &Path) -> Result<Volume, FileOpError> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::open(root, flags, Mode::empty()) {
            Ok(root) => Ok(Volume { root }),
            Err(rustix::io::Errno::NOENT) => Err(FileOpError::NoVolume),
            Err(errno) => Err(FileOpError::Io {
                path: String::new(),
                source: errno.into(),
            }),
        }
    }

    /// Opens `path` beneath the root with `flags`, following symlinks only where they stay
    /// beneath it. Retried when the kernel reports a concurrent rename (`EAGAIN`).
    fn resolve(&self, path: &VolumePath, flags: OFlags) -> Result<OwnedFd, FileOpError> {
        let relative = path.relative();
        let mut attempts = 0;
        loop {
            match rustix::fs::openat2(
                &self.root,
                relative.as_str(),
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                Ok(fd) => return Ok(fd),
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) if attempts < 16 => attempts += 1,
                Err(errno) => return Err(io_error(path, errno)),
            }
        }
    }

    /// Opens the directory at `path` for reading entries and `*at` calls.
    fn directory(&self, path: &VolumePath) -> Result<OwnedFd, FileOpError> {
        self.resolve(path, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// The parent directory of `path` and its last component (`None` for the root).
    fn parent<'p>(&self, path: &'p VolumePath) -> Result<Option<(OwnedFd, &'p str)>, FileOpError> {
        let Some((parent, name)) = path.split_last() else {
            return Ok(None);
        };
        Ok(Some((self.directory(&parent)?, name)))
    }

    /// What is at `path`, not following a final symlink.
    pub fn stat(&self, path: &VolumePath) -> Result<Stat, FileOpError> {
        match self.parent(path)? {
            None => rustix::fs::fstat(&self.root).map_err(|e| io_error(path, e)),
            Some((dir, name)) => {
                rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_error(path, e))
            }
        }
    }

    /// One page of the directory at `path`: entries sorted by name (bytewise), those after
    /// `after`, at most `limit`.
    pub fn list(&self, path: &VolumePath, after: Option<&str>, limit: usize) -> Result<Listing, FileOpError> {
        let dir = self.directory(path)?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir).map_err(|e| io_error(path, e))? {
            let entry = entry.map_err(|e| io_error(path, e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if after.is_some_and(|after| name <= after.as_bytes()) {
                continue;
            }
            names.push(name.to_vec());
        }
        names.sort_unstable();
        let more = names.len() > limit;
        names.truncate(limit);
        let mut entries = Vec::with_capacity(names.len());
        for name in &names {
            let stat = match rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(rustix::io::Errno::NOENT) => continue, // removed meanwhile
                Err(errno) => return Err(io_error(path, errno)),
            };
            let regular = FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile;
            entries.push(Entry {
                name: String::from_utf8_lossy(name).into_owned(),
                kind: kind(&stat),
                size: size(&stat),
                mode: format!("{:04o}", stat.st_mode & 0o7777),
                mtime: mtime(&stat),
                etag: regular.then(|| etag(&stat)),
            });
        }
        let next_cursor = if more {
            names.last().map(|name| String::from_utf8_lossy(name).into_owned())
        } else {
            None
        };
        Ok(Listing { entries, next_cursor })
    }

    /// Opens the regular file at `path` for reading (symlinks followed beneath the root). Other
    /// kinds of file are refused without being opened (see the module's *Special files*).
    pub fn open_file(&self, path: &VolumePath) -> Result<Opened, FileOpError> {
        let handle = self.resolve(path, OFlags::PATH)?;
        let stat = rustix::fs::fstat(&handle).map_err(|e| io_error(path, e))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(FileOpError::NotAFile {
                path: path.display(),
                kind: kind(&stat),
            });
        }
        // The same inode, now opened for reading (not a lookup by name: nothing can be swapped).
        let reopen = format!("/proc/self/fd/{}", handle.as_fd().as_raw_fd());
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = rustix::fs::open(reopen.as_str(), flags, Mode::empty()).map_err(|e| io_error(path, e))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(path, e))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(FileOpError::NotAFile {
                path: path.display(),
                kind: kind(&stat),
            });
        }
        Ok(Opened {
            file: File::from(fd),
            stat,
        })
    }

    /// Reads `length` bytes of the file at `path` from `offset` (fewer at its end).
    pub fn read_range(opened: &mut Opened, offset: u64, length: u64) -> io::Result<Vec<u8>> {
        opened.file.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0).min(1 << 20));
        (&mut opened.file).take(length).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Starts a write of the file at `path`: a temporary file in its directory. What is at the
    /// path is checked now (a directory is refused) and again when committing.
    pub fn begin_write(&self, path: &VolumePath) -> Result<PendingWrite, FileOpError> {
        let Some((dir, name)) = self.parent(path)? else {
            return Err(FileOpError::NotAFile {
                path: String::new(),
                kind: "directory",
            });
        };
        let existing = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Some(stat),
            Err(rustix::io::Errno::NOENT) => None,
            Err(errno) => return Err(io_error(path, errno)),
        };
        if let Some(stat) = &existing
            && FileType::from_raw_mode(stat.st_mode) == FileType::Directory
        {
            return Err(FileOpError::NotAFile {
                path: path.display(),
                kind: "directory",
            });
        }
        let tmp_name = format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, tmp_name.as_str(), flags, Mode::from_raw_mode(0o644))
            .map_err(|e| io_error(path, e))?;
        let pending = PendingWrite {
            dir,
            name: name.to_string(),
            path: path.clone(),
            tmp_name,
            file: File::from(fd),
            written: 0,
            done: false,
        };
        // Keep a replaced regular file's mode and owner.
        if let Some(stat) = existing
            && FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
        {
            rustix::fs::fchmod(&pending.file, Mode::from_raw_mode(stat.st_mode & 0o7777))
                .map_err(|e| io_error(path, e))?;
            rustix::fs::fchown(
                &pending.file,
                Some(rustix::fs::Uid::from_raw(stat.st_uid)),
                Some(rustix::fs::Gid::from_raw(stat.st_gid)),
            )
            .map_err(|e| io_error(path, e))?;
        }
        Ok(pending)
    }

    /// Deletes the file, symlink or empty directory at `path`; with `recursive`, a directory
    /// with everything in it (symlinks are removed, never followed).
    pub fn delete(&self, path: &VolumePath, recursive: bool) -> Result<(), FileOpError> {
        let Some((dir, name)) = self.parent(path)? else {
            return Err(FileOpError::DeleteRoot);
        };
        let stat = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_error(path, e))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
            return rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| io_error(path, e));
        }
        match rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) if !recursive => {
                Err(FileOpError::NotEmpty(path.display()))
            }
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) => {
                remove_tree(&dir, name.as_bytes(), 0).map_err(|e| io_error(path, e))
            }
            Err(errno) => Err(io_error(path, errno)),
        }
    }

    /// Creates the directory at `path` (`0755`); with `parents`, the missing directories
    /// above it too. Returns whether it was created (`false`: it existed and `parents` is set).
    pub fn create_dir(&self, path: &VolumePath, parents: bool) -> Result<bool, FileOpError> {
        if path.is_root() {
            return if parents {
                Ok(false)
            } else {
                Err(FileOpError::AlreadyExists(String::new()))
            };
        }
        if !parents {
            let Some((dir, name)) = self.parent(path)? else {
                return Ok(false);
            };
            return match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) => Ok(true),
                Err(rustix::io::Errno::EXIST) => Err(FileOpError::AlreadyExists(path.display())),
                Err(errno) => Err(io_error(path, errno)),
            };
        }
        // Component by component, each looked up beneath the one before.
        let mut current = self.directory(&VolumePath::root())?;
        let mut created = false;
        for name in path.components() {
            let opened = rustix::fs::openat2(
                &current,
                name.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            );
            let next = match opened {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(&current, name.as_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) => created = true,
                        Err(rustix::io::Errno::EXIST) => {} // created meanwhile
                        Err(errno) => return Err(io_error(path, errno)),
                    }
                    rustix::fs::openat2(
                        &current,
                        name.as_str(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                        RESOLVE,
                    )
                    .map_err(|e| io_error(path, e))?
                }
                Err(errno) => return Err(io_error(path, errno)),
            };
            current = next;
        }
        Ok(created)
    }
}

/// Removes `name` in `parent` and everything beneath it, through directory handles opened with
/// `O_NOFOLLOW` (a symlink is unlinked, never entered).
fn remove_tree(parent: &OwnedFd, name: &[u8], depth: usize) -> rustix::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(rustix::io::Errno::NAMETOOLONG);
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(dir) => dir,
        // Replaced by a file or a symlink meanwhile: unlink that instead.
        Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
            return rustix::fs::unlinkat(parent, name, AtFlags::empty());
        }
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(errno) => return Err(errno),
    };
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let child = entry.file_name().to_bytes();
        if child != b"." && child != b".." {
            names.push(child.to_vec());
        }
    }
    for child in names {
        let stat = match rustix::fs::statat(&dir, child.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(errno) => return Err(errno),
        };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            remove_tree(&dir, &child, depth + 1)?;
        } else {
            match rustix::fs::unlinkat(&dir, child.as_slice(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                // Became a directory meanwhile.
                Err(rustix::io::Errno::ISDIR) => remove_tree(&dir, &child, depth + 1)?,
                Err(errno) => return Err(errno),
            }
        }
    }
    match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(errno) => Err(errno),
    }
}

/// A write in progress: a temporary file beside its target, removed unless committed.
#[derive(Debug)]
pub struct PendingWrite {
    dir: OwnedFd,
    name: String,
    path: VolumePath,
    tmp_name: String,
    file: File,
    written: u64,
    done: bool,
}

impl PendingWrite {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FileOpError> {
        self.file.write_all(bytes).map_err(|source| FileOpError::Io {
            path: self.path.display(),
            source,
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes the written file the one at the path (see the module's *Writes*).
    pub fn commit(mut self, conditions: &WriteConditions) -> Result<Written, FileOpError> {
        let path = self.path.display();
        let io = |source: io::Error| FileOpError::Io {
            path: path.clone(),
            source,
        };
        self.file.sync_all().map_err(io)?;
        let existing = {
            let _guard = COMMIT.lock().unwrap_or_else(|p| p.into_inner());
            let existing = match rustix::fs::statat(&self.dir, self.name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => Some(stat),
                Err(rustix::io::Errno::NOENT) => None,
                Err(errno) => return Err(io_error(&self.path, errno)),
            };
            if let Some(expected) = &conditions.if_match {
                let current = existing
                    .as_ref()
                    .filter(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile)
                    .map(etag);
                if current.as_deref() != Some(expected.as_str()) {
                    return Err(FileOpError::EtagMismatch {
                        path,
                        expected: expected.clone(),
                        current: current.unwrap_or_else(|| "absent".into()),
                    });
                }
            }
            let flags = if conditions.create_only {
                RenameFlags::NOREPLACE
            } else {
                RenameFlags::empty()
            };
            match rustix::fs::renameat_with(&self.dir, self.tmp_name.as_str(), &self.dir, self.name.as_str(), flags) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => return Err(FileOpError::AlreadyExists(path)),
                Err(rustix::io::Errno::ISDIR | rustix::io::Errno::NOTEMPTY) => {
                    return Err(FileOpError::NotAFile {
                        path,
                        kind: "directory",
                    });
                }
                Err(errno) => return Err(io_error(&self.path, errno)),
            }
            existing
        };
        self.done = true;
        rustix::fs::fsync(&self.dir).map_err(|e| io(e.into()))?;
        let stat = rustix::fs::fstat(&self.file).map_err(|e| io(e.into()))?;
        let replaced_bytes = existing
            .as_ref()
            .filter(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile)
            .map(size)
            .unwrap_or(0);
        Ok(Written {
            path,
            size: size(&stat),
            etag: etag(&stat),
            mtime: mtime(&stat),
            created: existing.is_none(),
            replaced_bytes,
        })
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.done {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp_name.as_str(), AtFlags::empty());
        }
    }
}

/// Bytes in the regular files of the volume at `root` (apparent sizes; temporary files of
/// writes in progress excluded: they are counted as reservations), walked through directory
/// handles without following symlinks. A missing volume is empty.
pub fn measure(root: &Path) -> io::Result<u64> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_fd = match rustix::fs::open(root, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(0),
        Err(errno) => return Err(errno.into()),
    };
    let mut total = 0u64;
    let mut stack = vec![(root_fd, 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        for entry in rustix::fs::Dir::read_from(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." || bytes.starts_with(TMP_PREFIX.as_bytes()) {
                continue;
            }
            let stat = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(errno) => return Err(errno.into()),
            };
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile => total = total.saturating_add(size(&stat)),
                FileType::Directory if depth < MAX_DEPTH => {
                    match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
                        Ok(fd) => stack.push((fd, depth + 1)),
                        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {}
                        Err(errno) => return Err(errno.into()),
                    }
                }
                _ => {}
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_volume() -> (std::path::PathBuf, std::path::PathBuf) {
        let base = std::env::temp_dir().join(format!("instapod-volume-{}", uuid::Uuid::new_v4().simple()));
        let (volume, outside) = (base.join("volume"), base.join("outside"));
        std::fs::create_dir_all(volume.join("sub")).expect("volume");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(outside.join("secret"), b"secret").expect("secret");
        std::fs::write(volume.join("sub/a.txt"), b"a").expect("file");
        std::os::unix::fs::symlink(&outside, volume.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../../outside", volume.join("sub/up")).expect("symlink");
        std::os::unix::fs::symlink("sub/a.txt", volume.join("inside")).expect("symlink");
        (base, volume)
    }

    fn path(raw: &str) -> VolumePath {
        VolumePath::parse(raw).expect("valid path")
    }

    fn outside<T: std::fmt::Debug>(result: Result<T, FileOpError>) {
        assert!(matches!(result, Err(FileOpError::OutsideVolume(_))), "{result:?}");
    }

    #[test]
    fn symlinks_out_of_the_volume_lead_nowhere() {
        let (base, root) = temp_volume();
        let volume = Volume::open(&root).expect("open");
        for through in ["abs/secret", "sub/up/secret", "abs"] {
            outside(volume.open_file(&path(through)));
        }
        outside(volume.list(&path("abs"), None, 10));
        outside(volume.begin_write(&path("abs/planted")));
        outside(volume.delete(&path("sub/up/secret"), false));
        outside(volume.create_dir(&path("abs/new"), true));
        outside(volume.create_dir(&path("abs/new"), false));
        assert!(!base.join("outside/planted").exists() && !base.join("outside/new").exists());
        assert!(base.join("outside/secret").exists());
        // Inside is fine, and a link is deleted as a link.
        let mut opened = volume.open_file(&path("inside")).expect("inside");
        assert_eq!(Volume::read_range(&mut opened, 0, 10).expect("read"), b"a");
        volume.delete(&path("abs"), true).expect("delete the link");
        assert!(base.join("outside/secret").exists());
        std::fs::remove_dir_all(&base).ok();
    }

    #[test]
    fn writes_are_atomic_and_conditional_and_leave_nothing_when_dropped() {
        let (base, root) = temp_volume();
        let volume = Volume::open(&root).expect("open");
        let target = path("sub/a.txt");
        let before = volume.stat(&target).expect("stat");
        let mut pending = volume.begin_write(&target).expect("begin");
        pending.write(b"new").expect("write");
        drop(pending);
        assert_eq!(std::fs::read(root.join("sub/a.txt")).expect("read"), b"a");
        let stale = WriteConditions {
            create_only: false,
            if_match: Some("0-0-0".into()),
        };
        let mut pending = volume.begin_write(&target).expect("begin");
        pending.write(b"new").expect("write");
        assert!(matches!(pending.commit(&stale), Err(FileOpError::EtagMismatch { .. })));
        let fresh = WriteConditions {
            create_only: false,
            if_match: Some(etag(&before)),
        };
        let mut pending = volume.begin_write(&target).expect("begin");
        pending.write(b"new").expect("write");
        let written = pending.commit(&fresh).expect("commit");
        assert_eq!((written.size, written.created, written.replaced_bytes), (3, false, 1));
        let create_only = WriteConditions {
            create_only: true,
            if_match: None,
        };
        let pending = volume.begin_write(&target).expect("begin");
        assert!(matches!(
            pending.commit(&create_only),
            Err(FileOpError::AlreadyExists(_))
        ));
        assert_eq!(std::fs::read(root.join("sub/a.txt")).expect("read"), b"new");
        let names: Vec<String> = std::fs::read_dir(root.join("sub"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(TMP_PREFIX)), "{names:?}");
        assert!(matches!(
            volume.delete(&VolumePath::root(), true),
            Err(FileOpError::DeleteRoot)
        ));
        std::fs::remove_dir_all(&base).ok();
    }
}
