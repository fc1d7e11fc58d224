//! Checking the paths the files API is given, before anything touches the disk.
//!
//! A path names a file in the pod's volume, relative to its root: `notes/todo.txt`. The empty
//! path and `.` name the root itself. Refused with 400 `invalid_path`: a leading `/` (paths are
//! relative; the root is `""`), a `..` component, NUL bytes, backslashes (never a separator
//! here, refused so no client can believe otherwise), components over 255 bytes and paths over
//! [`MAX_PATH_BYTES`]. `.` and empty components (`a//b`, `a/./b`, a trailing `/`) are dropped.
//!
//! This is a first filter for clear error messages, not the confinement: every path is then
//! resolved beneath the volume's directory handle by the kernel (`volume.rs`), which is what
//! keeps symlinks and races from leading out.

use instapod_common::files::MAX_PATH_BYTES;

/// The longest file name Linux accepts.
const MAX_NAME_BYTES: usize = 255;

/// A checked path: normal components only, each a valid file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePath {
    parts: Vec<String>,
}

impl VolumePath {
    /// Checks `raw` (already percent-decoded once, by the query string or JSON parser).
    pub fn parse(raw: &str) -> Result<VolumePath, String> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(format!("path is longer than {MAX_PATH_BYTES} bytes"));
        }
        if raw.contains('\0') {
            return Err("path contains a NUL byte".into());
        }
        if raw.contains('\\') {
            return Err(format!("path {raw:?} contains a backslash; separate components with /"));
        }
        if raw.starts_with('/') {
            return Err(format!(
                "path {raw:?} is absolute; paths are relative to the volume's root (the root is \"\")"
            ));
        }
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(format!("path {raw:?} contains a .. component")),
                name if name.len() > MAX_NAME_BYTES => {
                    return Err(format!("a component of {raw:?} is longer than {MAX_NAME_BYTES} bytes"));
                }
                name => parts.push(name.to_string()),
            }
        }
        Ok(VolumePath { parts })
    }

    /// The volume's root.
    pub fn root() -> VolumePath {
        VolumePath { parts: Vec::new() }
    }

    /// Whether this is the volume's root.
    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    /// The path relative to the root, `.` for the root (what `openat2` is given).
    pub fn relative(&self) -> String {
        if self.parts.is_empty() {
            ".".into()
        } else {
            self.parts.join("/")
        }
    }

    /// The parent directory and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(VolumePath, &str)> {
        let (last, parent) = self.parts.split_last()?;
        Some((VolumePath { parts: parent.to_vec() }, last.as_str()))
    }

    pub fn components(&self) -> &[String] {
        &self.parts
    }

    /// The normalised form, as answers show it (`""` for the root).
    pub fn display(&self) -> String {
        self.parts.join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<&[&str], &str>) {
        let got = VolumePath::parse(raw);
        match (got, expected) {
            (Ok(path), Ok(parts)) => assert_eq!(path.components(), parts, "{raw:?}"),
            (Err(message), Err(fragment)) => assert!(message.contains(fragment), "{raw:?}: {message}"),
            (got, expected) => panic!("{raw:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn paths_are_relative_normal_components() {
        check("", Ok(&[]));
        check(".", Ok(&[]));
        check("./", Ok(&[]));
        check("a", Ok(&["a"]));
        check("a/b.txt", Ok(&["a", "b.txt"]));
        check("a//b/./c/", Ok(&["a", "b", "c"]));
        check("..a/b..", Ok(&["..a", "b.."]));
        check("%2e%2e%2f", Ok(&["%2e%2e%2f"])); // double-encoded: a harmless file name
        check("with space/ünï", Ok(&["with space", "ünï"]));
    }

    #[test]
    fn hostile_paths_are_refused() {
        check("..", Err(".. component"));
        check("../etc/passwd", Err(".. component"));
        check("a/../../b", Err(".. component"));
        check("a/..", Err(".. component"));
        check("/etc/passwd", Err("absolute"));
        check("/", Err("absolute"));
        check("a\0b", Err("NUL"));
        check("..\\..\\etc", Err("backslash"));
        check("a\\b", Err("backslash"));
        check(&"x".repeat(256), Err("longer than 255"));
        check(&"a/".repeat(3000), Err("longer than 4096"));
    }

    #[test]
    fn parent_and_name() {
        let path = VolumePath::parse("a/b/c.txt").expect("valid");
        let (parent, name) = path.split_last().expect("not the root");
        assert_eq!((parent.relative().as_str(), name), ("a/b", "c.txt"));
        let top = VolumePath::parse("top").expect("valid");
        let (parent, name) = top.split_last().expect("not root");
        assert_eq!((parent.relative().as_str(), name), (".", "top"));
        assert!(VolumePath::parse("").expect("root").split_last().is_none());
    }
}
