//! The short-lived tokens with which the control plane calls a node agent's peer endpoint on a
//! user's behalf: one scope (reading logs, or working on files), one pod, one node, a minute.
//!
//! *Design.* The control plane stores a node's token only as its SHA-256 (`nodes.token_hash`);
//! the agent holds the plain token and can compute the same hash. That hash is therefore the
//! one secret both sides know, and it keys an HMAC-SHA256 over the scope, the node id, the pod
//! id and an expiry. A token is good for one scope on one pod on one node for
//! [`TOKEN_TTL_SECS`] and cannot be turned into the node token; a logs token does not open the
//! files API (the scope is signed, not only written in the prefix); a rejoin (new node token)
//! invalidates every token signed before it.
//!
//! *Cost.* Whoever reads `nodes.token_hash` from the database can sign peer tokens for that
//! node (not heartbeats or reports: those need the plain token); the database is trusted with
//! that as it is with everything else it holds. Nothing new has to be provisioned on either
//! side, and a rejoin rotates the key.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How long a signed token is accepted (the request starts well within it; a follow stream or
/// a large upload that started may run longer).
pub const TOKEN_TTL_SECS: i64 = 60;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reading the pod's log (`/v1/logs/{pod_id}`).
    Logs,
    /// Listing, reading and changing files in the pod's volume (`/v1/files/{pod_id}/…`).
    Files,
}

impl Scope {
    /// The token's prefix (`<prefix><expires_unix>.<hex hmac>`), for people reading logs; the
    /// scope that counts is the one under the HMAC.
    pub fn prefix(self) -> &'static str {
        match self {
            Scope::Logs => "ipl_",
            Scope::Files => "ipf_",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Scope::Logs => "logs",
            Scope::Files => "files",
        }
    }
}

/// The SHA-256 of a node token, as the control plane stores it: the HMAC key.
pub fn node_token_hash(node_token: &str) -> [u8; 32] {
    Sha256::digest(node_token.as_bytes()).into()
}

fn mac(key: &[u8], scope: Scope, node_id: Uuid, pod_id: Uuid, expires_unix: i64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(
        format!(
            "instapod-peer-v2\n{}\n{node_id}\n{pod_id}\n{expires_unix}",
            scope.label()
        )
        .as_bytes(),
    );
    mac
}

/// Signs a token for `scope` on `pod_id` on `node_id` until `expires_unix`.
pub fn sign(token_hash: &[u8], scope: Scope, node_id: Uuid, pod_id: Uuid, expires_unix: i64) -> String {
    let tag = mac(token_hash, scope, node_id, pod_id, expires_unix)
        .finalize()
        .into_bytes();
    format!("{}{expires_unix}.{}", scope.prefix(), hex::encode(tag))
}

/// Whether `token` was signed with `token_hash` for this scope, node and pod and is not expired
/// at `now_unix`. The tag is compared in constant time.
pub fn verify(token: &str, token_hash: &[u8], scope: Scope, node_id: Uuid, pod_id: Uuid, now_unix: i64) -> bool {
    let Some((expires, tag)) = token.strip_prefix(scope.prefix()).and_then(|t| t.split_once('.')) else {
        return false;
    };
    let (Ok(expires_unix), Ok(tag)) = (expires.parse::<i64>(), hex::decode(tag)) else {
        return false;
    };
    if expires_unix < now_unix || expires_unix > now_unix + 10 * TOKEN_TTL_SECS {
        return false;
    }
    mac(token_hash, scope, node_id, pod_id, expires_unix)
        .verify_slice(&tag)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_key_scope_node_pod_and_time() {
        let key = node_token_hash("ipn_secret");
        let (node, pod) = (Uuid::new_v4(), Uuid::new_v4());
        let token = sign(&key, Scope::Logs, node, pod, 1_000);
        assert!(verify(&token, &key, Scope::Logs, node, pod, 990));
        assert!(verify(&token, &key, Scope::Logs, node, pod, 1_000));
        assert!(!verify(&token, &key, Scope::Logs, node, pod, 1_001), "expired");
        assert!(
            !verify(&token, &node_token_hash("ipn_other"), Scope::Logs, node, pod, 990),
            "other key"
        );
        assert!(
            !verify(&token, &key, Scope::Logs, Uuid::new_v4(), pod, 990),
            "other node"
        );
        assert!(
            !verify(&token, &key, Scope::Logs, node, Uuid::new_v4(), 990),
            "other pod"
        );
        let forged = sign(&key, Scope::Logs, node, pod, 5_000).replace("5000", "1000");
        assert!(!verify(&forged, &key, Scope::Logs, node, pod, 990), "expiry is signed");
        for bad in ["", "ipl_", "ipl_1000", "ipl_x.00", "ipx_1000.00"] {
            assert!(!verify(bad, &key, Scope::Logs, node, pod, 990), "{bad:?}");
        }
    }

    #[test]
    fn a_logs_token_does_not_open_the_files_api() {
        let key = node_token_hash("ipn_secret");
        let (node, pod) = (Uuid::new_v4(), Uuid::new_v4());
        let logs = sign(&key, Scope::Logs, node, pod, 1_000);
        assert!(!verify(&logs, &key, Scope::Files, node, pod, 990));
        // Not only the prefix: the scope is under the HMAC.
        let relabelled = logs.replacen(Scope::Logs.prefix(), Scope::Files.prefix(), 1);
        assert!(!verify(&relabelled, &key, Scope::Files, node, pod, 990));
        let files = sign(&key, Scope::Files, node, pod, 1_000);
        assert!(verify(&files, &key, Scope::Files, node, pod, 990));
        assert!(!verify(&files, &key, Scope::Logs, node, pod, 990));
    }
}
