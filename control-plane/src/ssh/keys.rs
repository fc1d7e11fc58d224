//! Reading a user's SSH public key: one OpenSSH public-key line (`<algorithm> <base64> [comment]`,
//! as in `~/.ssh/id_ed25519.pub`), parsed with the `ssh-key` crate that russh itself uses (through
//! `russh::keys`), so the control plane and the agents' gateway agree on what a key is.
//!
//! Accepted: Ed25519, ECDSA (NIST P-256/384/521) and RSA of at least [`MIN_RSA_BITS`] bits. DSA,
//! shorter RSA, security-key (`sk-…`) types, certificates, `authorized_keys` options and
//! anything malformed are refused with a message naming the rule. A key is identified by its
//! SHA-256 fingerprint in OpenSSH's format (`SHA256:<base64 without padding>`, what
//! `ssh-keygen -lf` prints).

use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PublicKey};

/// The shortest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: u32 = 2048;
/// The longest key line accepted, in bytes (a 16384-bit RSA key is about 2.8 KB).
pub const MAX_KEY_LINE: usize = 8 * 1024;
/// The longest comment kept, in bytes.
pub const MAX_COMMENT: usize = 256;

/// A key that passed the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// The algorithm name, e.g. `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`.
    pub algorithm: String,
    /// `<algorithm> <base64>` without the comment: the key itself.
    pub public_key: String,
    /// `SHA256:…` (OpenSSH's format).
    pub fingerprint: String,
    /// The comment of the line (may be empty).
    pub comment: String,
    /// The key's size in bits (RSA modulus, ECDSA curve, 256 for Ed25519).
    pub bits: u32,
}

/// Why a key line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseKeyError {
    #[error("public_key is empty: paste one OpenSSH public-key line (e.g. the content of ~/.ssh/id_ed25519.pub)")]
    Empty,
    #[error("public_key must be at most {MAX_KEY_LINE} bytes")]
    TooLong,
    #[error("public_key must be a single line")]
    MultipleLines,
    #[error("DSA keys (ssh-dss) are not accepted: use Ed25519, ECDSA or RSA of at least {MIN_RSA_BITS} bits")]
    Dsa,
    #[error("RSA keys must have at least {MIN_RSA_BITS} bits (this one has {0})")]
    RsaTooShort(u32),
    #[error("{0} keys are not accepted: use Ed25519, ECDSA or RSA of at least {MIN_RSA_BITS} bits")]
    Unsupported(String),
    #[error("public_key is not an OpenSSH public-key line (`<algorithm> <base64> [comment]`): {0}")]
    Malformed(String),
    #[error("the comment must be at most {MAX_COMMENT} bytes of UTF-8")]
    BadComment,
}

/// Parses and checks one public-key line.
pub fn parse(line: &str) -> Result<ParsedKey, ParseKeyError> {
    if line.len() > MAX_KEY_LINE {
        return Err(ParseKeyError::TooLong);
    }
    let line = line.trim();
    if line.is_empty() {
        return Err(ParseKeyError::Empty);
    }
    if line.contains(['\n', '\r', '\0']) {
        return Err(ParseKeyError::MultipleLines);
    }
    let first = line.split_ascii_whitespace().next().unwrap_or_default();
    if first == "ssh-dss" {
        return Err(ParseKeyError::Dsa);
    }
    let key = PublicKey::from_openssh(line).map_err(|err| ParseKeyError::Malformed(err.to_string()))?;
    check(key)
}

/// The rules on a parsed key, and its stored form.
pub fn check(mut key: PublicKey) -> Result<ParsedKey, ParseKeyError> {
    let bits = match key.key_data() {
        KeyData::Ed25519(_) => 256,
        KeyData::Ecdsa(ecdsa) => match ecdsa.curve() {
            EcdsaCurve::NistP256 => 256,
            EcdsaCurve::NistP384 => 384,
            EcdsaCurve::NistP521 => 521,
        },
        KeyData::Rsa(rsa) => {
            let bits = rsa.key_size();
            if bits < MIN_RSA_BITS {
                return Err(ParseKeyError::RsaTooShort(bits));
            }
            bits
        }
        KeyData::Dsa(_) => return Err(ParseKeyError::Dsa),
        _ => return Err(ParseKeyError::Unsupported(key.algorithm().as_str().to_string())),
    };
    let comment = key
        .comment()
        .as_str()
        .map_err(|_| ParseKeyError::BadComment)?
        .to_string();
    if comment.len() > MAX_COMMENT {
        return Err(ParseKeyError::BadComment);
    }
    let algorithm = match key.algorithm() {
        Algorithm::Rsa { .. } => "ssh-rsa".to_string(),
        other => other.as_str().to_string(),
    };
    key.set_comment("");
    let public_key = key
        .to_openssh()
        .map_err(|err| ParseKeyError::Malformed(err.to_string()))?
        .trim()
        .to_string();
    Ok(ParsedKey {
        algorithm,
        public_key,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        comment,
        bits,
    })
}

/// The fingerprint of a key line the agent's gateway sends (`<algorithm> <base64>`), without the
/// acceptance rules (a key that was registered passed them; anything else matches nothing).
pub fn fingerprint_of(line: &str) -> Option<String> {
    if line.len() > MAX_KEY_LINE {
        return None;
    }
    let key = PublicKey::from_openssh(line.trim()).ok()?;
    Some(key.fingerprint(HashAlg::Sha256).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with ssh-keygen; fingerprints from `ssh-keygen -lf`.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKUx9TbvKyDG5Y7WEXP1erElWmf8jEMC2ILJWnpDVODM alice@laptop";
    const ED25519_FP: &str = "SHA256:9Ll43B3cb8DXqs7+cH0/r57UAYEVwpKVlixmV+T+Ac8";

    fn check_err(line: &str, expected: fn(&ParseKeyError) -> bool) {
        match parse(line) {
            Ok(key) => panic!("{line:?} was accepted as {key:?}"),
            Err(err) => assert!(expected(&err), "{line:?}: unexpected {err:?}"),
        }
    }

    #[test]
    fn garbage_is_malformed() {
        check_err("", |e| *e == ParseKeyError::Empty);
        check_err("   ", |e| *e == ParseKeyError::Empty);
        check_err("hello", |e| matches!(e, ParseKeyError::Malformed(_)));
        check_err("ssh-ed25519 not-base64!!", |e| matches!(e, ParseKeyError::Malformed(_)));
        check_err("ssh-ed25519 AAAA", |e| matches!(e, ParseKeyError::Malformed(_)));
        check_err(&format!("{ED25519}\n{ED25519}"), |e| *e == ParseKeyError::MultipleLines);
        check_err(&format!("command=\"ls\" {ED25519}"), |e| {
            matches!(e, ParseKeyError::Malformed(_))
        });
        check_err(&"A".repeat(MAX_KEY_LINE + 1), |e| *e == ParseKeyError::TooLong);
        // The algorithm named on the line must be the one inside the blob.
        let swapped = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
        check_err(&swapped, |e| matches!(e, ParseKeyError::Malformed(_)));
    }

    #[test]
    fn dsa_is_refused_by_name() {
        check_err(
            "ssh-dss AAAAB3NzaC1kc3MAAACBAOuIa/QSMJV8Gb2tqnOKFzB2Q8b+iaw85SRu+y/rAWMH6f+aGlyP8m/l8BPeLQLX0IvO/Ox569v/uo0kNyOW0HaOidg190sy/49vhfbQZYhqDeSvrrC2p/ssEK6VrUH2fzzajNwrKWaQ7lOkcUj8L4Xlyys1G5WDI5s59v+yIglnAAAAFQCmONpAYKowgz40NIKEv8ycRN8c9QAAAIAEvDfdGe7Q7N8MN6AutH4octnvpuyb1e0hDr7fPKziCx258FzO1x7Bq/mqsjtJdJyEVjiYhWTqQzjIlCH9bwXkPvSUT215/jXFKmfM7VAxCJZd3nuj581PfNU7tSBlm9aVoH2Zzyt3G/k+4BajeeLJ4UQ/828fNgXacr0vxeKZVQAAAIEAjJONHKgKmtDP7N2U20NoUOXI3TO2w9xCmAPrz4FafoZ8A43NoBL6rG+Ia4Ay4Nu0PX+mZvHSTfB5+NROrgcrbyYYQbErU4DL5V4RwPigUAAo7jVDvUf6GtTuPxtqa13WP34HGQ2TGMegFzXIOfPod9RuaFs+DDRuMzErxK5YdMI= root@vm",
            |e| *e == ParseKeyError::Dsa,
        );
    }

    #[test]
    fn ed25519_is_accepted_with_fingerprint_and_comment() {
        let key = parse(&format!("  {ED25519}  ")).expect("a valid key");
        assert_eq!(key.algorithm, "ssh-ed25519");
        assert_eq!(key.comment, "alice@laptop");
        assert_eq!(key.bits, 256);
        assert_eq!(key.fingerprint, ED25519_FP);
        assert!(!key.public_key.contains("alice"), "{}", key.public_key);
        assert_eq!(fingerprint_of(&key.public_key).as_deref(), Some(ED25519_FP));
        // The comment does not change the key.
        let other = parse(&ED25519.replace("alice@laptop", "another comment")).expect("valid");
        assert_eq!(other.fingerprint, key.fingerprint);
        assert_eq!(other.comment, "another comment");
    }

    #[test]
    fn ecdsa_and_rsa_by_size() {
        let ecdsa = parse(ECDSA_384).expect("ECDSA P-384 is accepted");
        assert_eq!(ecdsa.algorithm, "ecdsa-sha2-nistp384");
        assert_eq!(ecdsa.bits, 384);
        assert_eq!(ecdsa.fingerprint, "SHA256:kTXnpd7eXXxNCj7mPWcg/AtoZUrKN83RV4l231Sa0tM");
        let rsa = parse(RSA_2048).expect("RSA 2048 is accepted");
        assert_eq!((rsa.algorithm.as_str(), rsa.bits), ("ssh-rsa", 2048));
        assert_eq!(rsa.fingerprint, "SHA256:jj8ry6LLHza+Oq2kf6s2TxCMgga4SSE81zpPPzICUwU");
        check_err(RSA_1024, |e| *e == ParseKeyError::RsaTooShort(1024));
    }

    const ECDSA_384: &str = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBOTv2/h8zVJoYt7b1ff4mIgziuJzpwuNcL2KYwZBqUMOhnLKYNfAuZGo2f8FgA/wRvOC1B1GFGMCQtPbvVAwZ/ShSwXS6jSqSzq3uRYvhYwXn+Q38tD6vtCxSvrLw33CAg== ec";
    const RSA_2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCzz2MZjm0d5kU9hyQ3+6oqdUc58fHG5W4+P7RpRxrvzwVC8rpTPo36JR/3YOsDMo5t5SADuFH4efbg5uayxfkpQYFvplrMust7ZuPRSfik+fYmEeDeNXsupuvv4m0Ap8M7RfXrPAODoY9y4RO2n91z/vZJxVtpMSrEB0zghVcQy2NJ+Myl8wbcTZs/gVIAYzKHRVL4Ch/jgCVytfRrcwQ3Zboh9hMeHBGhoG6PKj/jpE6SOImHHNtR9+Yz8WFzQorw6uixqmVR/L18MtgHZiRuuCnCxqTY2X7TyQGhoFYuBv6eb6d6gXs6b4mLxKDgJj9w0IhsdqSXVPpajyR+Y2rd ok";
    const RSA_1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC6kh+tYgvjjmjxwGMrCCsF2uJkHTS3i8LCtqsleUs9ZDzEdt7isXqLBV/Eh8QAvtr+9Zh5C2ObkQwRdFrKbvLOVIFXjmkVff+l4O0d2JZcC/9oQ41Wb2zVjnDwfRbBIGTjGPlo6jCavXzK4QKdHrz95rBEdwT0qX9ykhCuLE78MQ== small";
}
