//! What the control plane and a node agent share about the files API: its limits. The
//! requests and answers themselves pass through the control plane unchanged (the agent writes
//! the API's JSON and error bodies), so their shapes live with the agent
//! (`node-agent/src/files/`) and in the control plane's OpenAPI types (`api/files.rs`).

/// Entries one list request returns when it does not say.
pub const DEFAULT_LIST_LIMIT: usize = 1_000;
/// The most entries one list request returns.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// The most bytes a JSON read returns (the whole file, or one `offset`/`length` range of it).
/// Larger files are read in ranges or downloaded with `Accept: application/octet-stream`.
pub const MAX_READ_BYTES: u64 = 1024 * 1024;
/// The largest JSON body of a write (`PUT …/files/content`); its content, once decoded, is at
/// most this too. Larger files go through the multipart upload.
pub const MAX_WRITE_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// The longest path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
