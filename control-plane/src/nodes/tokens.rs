//! The two credentials of fleet membership: the fleet-wide join token (configuration) and each
//! node's own token (`ipn_` + 43 base64url characters, 256 random bits, stored only as its
//! SHA-256 hash in `nodes.token_hash`).
//!
//! *Design.* The join token is compared in constant time: both sides are hashed with SHA-256
//! first (so their lengths never matter), then the digests are compared without an early exit.
//! Node tokens need no such care: they are looked up by the hash of a 256-bit random value.

use sha2::{Digest, Sha256};

use crate::accounts::tokens::{self, NewToken, TokenKind};

/// Why a join token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    /// The control plane has no join token configured: nothing may join.
    #[error("joining is disabled: the control plane has no node_join_token configured")]
    Disabled,
    /// Missing, or not the configured one.
    #[error("missing or invalid join token")]
    Invalid,
}

/// Checks the join token a node presented against the configured one (empty = disabled).
pub fn check_join_token(configured: &str, presented: Option<&str>) -> Result<(), JoinTokenError> {
    if configured.is_empty() {
        return Err(JoinTokenError::Disabled);
    }
    let presented = presented.ok_or(JoinTokenError::Invalid)?;
    if constant_time_eq(
        &Sha256::digest(configured.as_bytes()),
        &Sha256::digest(presented.as_bytes()),
    ) {
        Ok(())
    } else {
        Err(JoinTokenError::Invalid)
    }
}

/// Equality of two byte strings whose running time depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// A fresh node token: the plain text for the join answer and the hash to store.
pub fn generate_node_token() -> NewToken {
    tokens::generate(TokenKind::Node)
}

/// The hash of a presented node token, or `None` when it cannot be one (saves a query).
pub fn node_token_hash(plain: &str) -> Option<Vec<u8>> {
    tokens::looks_like(TokenKind::Node, plain).then(|| tokens::hash(plain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens() {
        let configured = "fleet-join-token-0123456789";
        assert_eq!(check_join_token(configured, Some(configured)), Ok(()));
        for presented in [None, Some(""), Some("fleet-join-token-012345678"), Some("x")] {
            assert_eq!(
                check_join_token(configured, presented),
                Err(JoinTokenError::Invalid),
                "{presented:?}"
            );
        }
        assert_eq!(check_join_token("", Some("")), Err(JoinTokenError::Disabled));
        assert_eq!(check_join_token("", None), Err(JoinTokenError::Disabled));
    }

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn node_tokens_are_prefixed_and_hashed() {
        let token = generate_node_token();
        assert!(token.plain.starts_with("ipn_"), "{}", token.plain);
        assert_eq!(node_token_hash(&token.plain), Some(token.hash));
        assert_eq!(node_token_hash("ipd_not-a-node-token"), None);
        let session = tokens::generate(TokenKind::Session);
        assert_eq!(node_token_hash(&session.plain), None);
    }
}
