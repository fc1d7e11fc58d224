//! What the control plane and a node agent share about pod logs: the query limits and the JSON
//! line the agent answers with. The token that authorises one read is a
//! [`peer_token`](crate::peer_token) with scope [`Scope::Logs`](crate::peer_token::Scope).

use serde::{Deserialize, Serialize};

/// The most lines one request returns before following.
pub const MAX_TAIL: u32 = 10_000;
/// Lines returned when the request does not say.
pub const DEFAULT_TAIL: u32 = 100;
/// Longest record the agent writes; longer output lines are split (the pieces but the last are
/// `partial`).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// One line of a pod's output, as the agent streams it (one JSON object per line) and the API
/// returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the agent's log reader received the line (RFC 3339, nanoseconds, UTC); `None` for
    /// lines written before the agent recorded timestamps.
    pub timestamp: Option<String>,
    /// `stdout` or `stderr`; `None` where not recorded.
    pub stream: Option<String>,
    /// The text, without its newline (invalid UTF-8 replaced).
    pub line: String,
    /// The line was longer than [`MAX_LINE_BYTES`]: this piece continues in the next line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}
