//! Encryption at rest of certificates' private keys and the ACME account's credentials:
//! AES-256-GCM (aws-lc-rs) with the control plane's `[domains] key_encryption_key`.
//!
//! *Format.* `1 (version) || nonce (12 bytes, random per value) || ciphertext || tag (16)`.
//! The additional data names the row a value belongs to (`domain-key:<id>`,
//! `acme-account:<url>`), so a value copied into another row does not decrypt.
//!
//! *Limitations.* One key, no rotation: changing it makes every stored value unreadable (the
//! feed then serves those domains without a certificate and they are issued again).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;

const VERSION: u8 = 1;

/// The key, ready to seal and open.
pub struct KeyEncryptionKey {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadKeyError {
    #[error("not base64")]
    NotBase64,
    #[error("must be 32 bytes (base64 of 32 random bytes), got {0}")]
    WrongLength(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("no random nonce could be drawn")]
    Random,
    #[error("encryption failed")]
    Encrypt,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the stored value is truncated or of an unknown version")]
    Format,
    #[error("the stored value does not decrypt with this key (another key, or another row's value)")]
    Decrypt,
}

impl KeyEncryptionKey {
    /// The key from its configured form: base64 (standard or URL-safe, padded or not) of 32
    /// bytes.
    pub fn from_base64(text: &str) -> Result<KeyEncryptionKey, LoadKeyError> {
        let text = text.trim();
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        let bytes = engines
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or(LoadKeyError::NotBase64)?;
        KeyEncryptionKey::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<KeyEncryptionKey, LoadKeyError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| LoadKeyError::WrongLength(bytes.len()))?;
        Ok(KeyEncryptionKey {
            key: LessSafeKey::new(unbound),
            random: SystemRandom::new(),
        })
    }

    /// Encrypts `plaintext`, bound to `context` (the row it is stored in).
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce_bytes).map_err(|_| SealError::Random)?;
        let mut in_out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(context.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| SealError::Encrypt)?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + in_out.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce_bytes);
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    /// Decrypts what [`Self::seal`] produced for the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let (&version, rest) = sealed.split_first().ok_or(OpenError::Format)?;
        if version != VERSION || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(OpenError::Format);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Format)?;
        let mut in_out = ciphertext.to_vec();
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut in_out)
            .map_err(|_| OpenError::Decrypt)?;
        Ok(plaintext.to_vec())
    }
}

/// The additional data of a domain's certificate key.
pub fn domain_key_context(domain_id: uuid::Uuid) -> String {
    format!("domain-key:{domain_id}")
}

/// The additional data of the ACME account's credentials.
pub fn acme_account_context(directory_url: &str) -> String {
    format!("acme-account:{directory_url}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> KeyEncryptionKey {
        KeyEncryptionKey::from_bytes(&[byte; 32]).expect("32 bytes")
    }

    #[test]
    fn values_round_trip_and_stay_secret() {
        let key = key(7);
        let secret = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n";
        let sealed = key.seal("domain-key:a", secret).expect("seals");
        assert_eq!(sealed.len(), 1 + 12 + secret.len() + 16);
        assert!(
            !sealed.windows(11).any(|w| w == b"PRIVATE KEY"),
            "ciphertext hides the text"
        );
        assert_eq!(key.open("domain-key:a", &sealed).expect("opens"), secret);
        // A fresh nonce every time.
        assert_ne!(key.seal("domain-key:a", secret).expect("seals"), sealed);
    }

    #[test]
    fn the_wrong_key_context_or_a_tampered_value_does_not_open() {
        let sealed = key(7).seal("domain-key:a", b"secret").expect("seals");
        assert_eq!(key(8).open("domain-key:a", &sealed), Err(OpenError::Decrypt));
        assert_eq!(key(7).open("domain-key:b", &sealed), Err(OpenError::Decrypt));
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(key(7).open("domain-key:a", &tampered), Err(OpenError::Decrypt));
        assert_eq!(key(7).open("domain-key:a", &sealed[..10]), Err(OpenError::Format));
        assert_eq!(key(7).open("domain-key:a", &[]), Err(OpenError::Format));
        let mut other_version = sealed;
        other_version[0] = 2;
        assert_eq!(key(7).open("domain-key:a", &other_version), Err(OpenError::Format));
    }

    #[test]
    fn keys_load_from_base64_of_32_bytes() {
        let standard = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(KeyEncryptionKey::from_base64(&standard).is_ok());
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 32]);
        assert!(KeyEncryptionKey::from_base64(&url_safe).is_ok());
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        assert_eq!(
            KeyEncryptionKey::from_base64(&short).err(),
            Some(LoadKeyError::WrongLength(16))
        );
        assert_eq!(
            KeyEncryptionKey::from_base64("not base64!").err(),
            Some(LoadKeyError::NotBase64)
        );
        assert!(!format!("{:?}", key(1)).contains('1'));
    }
}
