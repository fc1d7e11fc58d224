//! Opaque secrets: session tokens, one-time codes and node tokens. 256 random bits, base64url,
//! with a prefix saying what they are (`ipd_` session, `ipv_` verify email, `ipr_` reset
//! password, `ipn_` a node agent's token, see `nodes::tokens`).
//! Only the SHA-256 of a token is ever stored, so a database leak yields no usable token.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// What a token is for; its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Session,
    VerifyEmail,
    ResetPassword,
    /// A node agent's credential for the `/internal` API.
    Node,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Session => "ipd_",
            TokenKind::VerifyEmail => "ipv_",
            TokenKind::ResetPassword => "ipr_",
            TokenKind::Node => "ipn_",
        }
    }
}

/// A freshly generated token: the plain text to hand out once, and the hash to store.
#[derive(Debug)]
pub struct NewToken {
    pub plain: String,
    pub hash: Vec<u8>,
}

pub fn generate(kind: TokenKind) -> NewToken {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let plain = format!("{}{}", kind.prefix(), URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&plain);
    NewToken { plain, hash }
}

pub fn hash(plain: &str) -> Vec<u8> {
    Sha256::digest(plain.as_bytes()).to_vec()
}

/// Whether `plain` has the shape of a token of `kind` (cheap check before a database lookup).
pub fn looks_like(kind: TokenKind, plain: &str) -> bool {
    plain.len() == kind.prefix().len() + 43
        && plain.starts_with(kind.prefix())
        && plain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_prefixed_and_hashed() {
        let a = generate(TokenKind::Session);
        let b = generate(TokenKind::Session);
        assert_ne!(a.plain, b.plain);
        assert!(looks_like(TokenKind::Session, &a.plain), "{}", a.plain);
        assert!(!looks_like(TokenKind::VerifyEmail, &a.plain));
        assert_eq!(a.hash, hash(&a.plain));
        assert_eq!(a.hash.len(), 32);
        assert!(!looks_like(TokenKind::Session, "ipd_short"));
    }
}
