//! Password hashing with Argon2id at OWASP's parameters (19 MiB, 2 iterations, 1 lane), always
//! on the blocking pool so a login never stalls the async runtime.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("password hashing task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("OWASP argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub async fn hash(password: String) -> Result<String, PasswordError> {
    tokio::task::spawn_blocking(move || {
        argon2()
            .hash_password(password.as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|err| PasswordError::Hash(err.to_string()))
    })
    .await?
}

/// Whether `password` matches the PHC string `hash`. A malformed stored hash never matches.
pub async fn verify(password: String, hash: String) -> Result<bool, PasswordError> {
    tokio::task::spawn_blocking(move || {
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return false;
        };
        argon2().verify_password(password.as_bytes(), &parsed).is_ok()
    })
    .await
    .map_err(PasswordError::from)
}

/// A hash of a random password, verified against when a login names an unknown email so that
/// the answer takes as long as for a known one.
pub const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0cWTuqsp8Y1lXRH0YRdgUYL7UdIXVzy3b+6ES7sDb0s";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_long_passwords_are_not_truncated() {
        let long = "x".repeat(200);
        let hash = hash(long.clone()).await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(verify(long.clone(), hash.clone()).await.expect("verify"));
        let mut other = long.clone();
        other.replace_range(150..151, "y");
        assert!(!verify(other, hash).await.expect("verify"));
        assert!(!verify("x".into(), "garbage".into()).await.expect("verify"));
    }

    #[tokio::test]
    async fn dummy_hash_is_well_formed() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
        assert!(!verify("anything".into(), DUMMY_HASH.into()).await.expect("verify"));
    }
}
