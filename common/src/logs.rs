//! What the control plane and a node agent share about pod logs: the query the control plane
//! forwards, the JSON line the agent answers with, and the short-lived token that authorises
//! one read of one pod's log on one node.
//!
//! *Design.* The control plane stores a node's token only as its SHA-256 (`nodes.token_hash`);
//! the agent holds the plain token and can compute the same hash. That hash is therefore the
//! one secret both sides know, and it keys an HMAC-SHA256 over the node id, the pod id and an
//! expiry. A token is good for one pod on one node for [`TOKEN_TTL_SECS`] and cannot be turned
//! into the node token; a rejoin (new node token) invalidates every token signed before it.
//!
//! *Cost.* Whoever reads `nodes.token_hash` from the database can sign logs tokens for that
//! node (not heartbeats or reports: those need the plain token); the database is trusted with
//! that as it is with everything else it holds. Nothing new has to be provisioned on either
//! side, and a rejoin rotates the key.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Prefix of logs tokens (`ipl_<expires_unix>.<hex hmac>`).
pub const TOKEN_PREFIX: &str = "ipl_";
/// How long a signed token is accepted (the request starts well within it; a follow stream
/// that started may run longer).
pub const TOKEN_TTL_SECS: i64 = 60;
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

/// The SHA-256 of a node token, as the control plane stores it: the HMAC key.
pub fn node_token_hash(node_token: &str) -> [u8; 32] {
    Sha256::digest(node_token.as_bytes()).into()
}

fn mac(key: &[u8], node_id: Uuid, pod_id: Uuid, expires_unix: i64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("instapod-logs-v1\n{node_id}\n{pod_id}\n{expires_unix}").as_bytes());
    mac
}

/// Signs a token for reading `pod_id`'s log on `node_id` until `expires_unix`.
pub fn sign(token_hash: &[u8], node_id: Uuid, pod_id: Uuid, expires_unix: i64) -> String {
    let tag = mac(token_hash, node_id, pod_id, expires_unix).finalize().into_bytes();
    format!("{TOKEN_PREFIX}{expires_unix}.{}", hex::encode(tag))
}

/// Whether `token` was signed with `token_hash` for this node and pod and is not expired at
/// `now_unix`. The tag is compared in constant time.
pub fn verify(token: &str, token_hash: &[u8], node_id: Uuid, pod_id: Uuid, now_unix: i64) -> bool {
    let Some((expires, tag)) = token.strip_prefix(TOKEN_PREFIX).and_then(|t| t.split_once('.')) else {
        return false;
    };
    let (Ok(expires_unix), Ok(tag)) = (expires.parse::<i64>(), hex::decode(tag)) else {
        return false;
    };
    if expires_unix < now_unix || expires_unix > now_unix + 10 * TOKEN_TTL_SECS {
        return false;
    }
    mac(token_hash, node_id, pod_id, expires_unix)
        .verify_slice(&tag)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_key_node_pod_and_time() {
        let key = node_token_hash("ipn_secret");
        let (node, pod) = (Uuid::new_v4(), Uuid::new_v4());
        let token = sign(&key, node, pod, 1_000);
        assert!(verify(&token, &key, node, pod, 990));
        assert!(verify(&token, &key, node, pod, 1_000));
        assert!(!verify(&token, &key, node, pod, 1_001), "expired");
        assert!(
            !verify(&token, &node_token_hash("ipn_other"), node, pod, 990),
            "other key"
        );
        assert!(!verify(&token, &key, Uuid::new_v4(), pod, 990), "other node");
        assert!(!verify(&token, &key, node, Uuid::new_v4(), 990), "other pod");
        let forged = sign(&key, node, pod, 5_000).replace("5000", "1000");
        assert!(!verify(&forged, &key, node, pod, 990), "expiry is signed");
        for bad in ["", "ipl_", "ipl_1000", "ipl_x.00", "ipx_1000.00"] {
            assert!(!verify(bad, &key, node, pod, 990), "{bad:?}");
        }
    }
}
