//! Checking a certificate an agent sends (`PUT /internal/nodes/{id}/domains/{domain_id}/
//! certificate`) before it is stored and served by every ingress: the chain parses (PEM, leaf
//! first), the key parses and belongs to the leaf, the leaf covers the domain's host name, and
//! it has not expired. Validity and issuer are read from the leaf itself (the agent's
//! `not_before`/`not_after` are only a hint).
//!
//! *Design.* rustls (aws-lc-rs) parses the key and the leaf and matches the names; the leaf's
//! validity and issuer come from a small DER walk of the `TBSCertificate` (rustls does not
//! expose them), bounded by the input.
//!
//! *Limitations.* The chain is not verified up to a root: the control plane does not know
//! which CA the platform uses (Pebble in tests); the agent got it from the CA over HTTPS.

use instapod_common::domains::IssuedCertificate;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;

/// The largest chain accepted, in bytes of PEM.
const MAX_CHAIN_PEM_BYTES: usize = 64 * 1024;
/// The most certificates in a chain.
const MAX_CHAIN_LEN: usize = 8;
/// The largest key accepted, in bytes of PEM.
const MAX_KEY_PEM_BYTES: usize = 16 * 1024;

/// A certificate that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCertificate {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The issuer's common name, when it has one.
    pub issuer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCertificate {
    #[error("the chain or the key is too large")]
    TooLarge,
    #[error("the chain holds no PEM certificate")]
    NoCertificate,
    #[error("the chain holds more than {MAX_CHAIN_LEN} certificates")]
    TooLong,
    #[error("the chain is not valid PEM")]
    BadPem,
    #[error("the private key is not a PEM key rustls can use")]
    BadKey,
    #[error("the private key does not belong to the leaf certificate")]
    KeyMismatch,
    #[error("the leaf certificate cannot be parsed")]
    BadLeaf,
    #[error("the leaf certificate does not cover {0}")]
    WrongName(String),
    #[error("the leaf certificate expired at {0}")]
    Expired(OffsetDateTime),
}

/// Checks `issued` for `hostname` (normalised) at `now`.
pub fn check(
    issued: &IssuedCertificate,
    hostname: &str,
    now: OffsetDateTime,
) -> Result<CheckedCertificate, InvalidCertificate> {
    if issued.chain_pem.len() > MAX_CHAIN_PEM_BYTES || issued.key_pem.len() > MAX_KEY_PEM_BYTES {
        return Err(InvalidCertificate::TooLarge);
    }
    let mut chain = Vec::new();
    for cert in CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes()) {
        let cert = cert.map_err(|_| InvalidCertificate::BadPem)?;
        chain.push(cert);
        if chain.len() > MAX_CHAIN_LEN {
            return Err(InvalidCertificate::TooLong);
        }
    }
    let Some(leaf) = chain.first().cloned() else {
        return Err(InvalidCertificate::NoCertificate);
    };
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|_| InvalidCertificate::BadKey)?;
    let signing_key =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|_| InvalidCertificate::BadKey)?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(_)) => return Err(InvalidCertificate::KeyMismatch),
        Err(_) => return Err(InvalidCertificate::BadLeaf),
    }
    let parsed = rustls::server::ParsedCertificate::try_from(&leaf).map_err(|_| InvalidCertificate::BadLeaf)?;
    let name =
        ServerName::try_from(hostname.to_string()).map_err(|_| InvalidCertificate::WrongName(hostname.to_string()))?;
    rustls::client::verify_server_name(&parsed, &name)
        .map_err(|_| InvalidCertificate::WrongName(hostname.to_string()))?;
    let details = der::leaf_details(leaf.as_ref()).ok_or(InvalidCertificate::BadLeaf)?;
    if details.not_after <= now {
        return Err(InvalidCertificate::Expired(details.not_after));
    }
    Ok(details)
}

/// The smallest DER reader that finds a certificate's validity and issuer.
mod der {
    use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

    use super::CheckedCertificate;

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    /// 2.5.4.3, commonName.
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

    /// One element: tag, content, what follows.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (length, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let length = rest[..count].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (length, &rest[count..])
        };
        if rest.len() < length {
            return None;
        }
        Some((tag, &rest[..length], &rest[length..]))
    }

    fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (found, content, rest) = element(input)?;
        (found == tag).then_some((content, rest))
    }

    pub(super) fn leaf_details(der: &[u8]) -> Option<CheckedCertificate> {
        let (certificate, _) = expect(der, SEQUENCE)?;
        let (tbs, _) = expect(certificate, SEQUENCE)?;
        let mut rest = tbs;
        // [0] EXPLICIT version, when present.
        if rest.first() == Some(&0xa0) {
            rest = element(rest)?.2;
        }
        let (_serial, _, after_serial) = element(rest)?;
        let (_signature, after_signature) = expect(after_serial, SEQUENCE)?;
        let (issuer, after_issuer) = expect(after_signature, SEQUENCE)?;
        let (validity, _) = expect(after_issuer, SEQUENCE)?;
        let (not_before, after_not_before) = time_value(validity)?;
        let (not_after, _) = time_value(after_not_before)?;
        Some(CheckedCertificate {
            not_before,
            not_after,
            issuer: common_name(issuer),
        })
    }

    fn time_value(input: &[u8]) -> Option<(OffsetDateTime, &[u8])> {
        let (tag, content, rest) = element(input)?;
        let text = std::str::from_utf8(content).ok()?;
        let text = text.strip_suffix('Z')?;
        let digits = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| s.parse::<i32>().ok())
                .flatten()
        };
        let (year, tail) = match tag {
            UTC_TIME if text.len() == 12 => {
                let yy = digits(&text[..2])?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
            }
            GENERALIZED_TIME if text.len() == 14 => (digits(&text[..4])?, &text[4..]),
            _ => return None,
        };
        let field = |i: usize| digits(&tail[i..i + 2]);
        let month = Month::try_from(u8::try_from(field(0)?).ok()?).ok()?;
        let date = Date::from_calendar_date(year, month, u8::try_from(field(2)?).ok()?).ok()?;
        let time = Time::from_hms(
            u8::try_from(field(4)?).ok()?,
            u8::try_from(field(6)?).ok()?,
            u8::try_from(field(8)?).ok()?,
        )
        .ok()?;
        Some((PrimitiveDateTime::new(date, time).assume_utc(), rest))
    }

    /// The first common name of a `Name`.
    fn common_name(name: &[u8]) -> Option<String> {
        let mut sets = name;
        while !sets.is_empty() {
            let (set, rest) = expect(sets, SET)?;
            sets = rest;
            let mut attributes = set;
            while !attributes.is_empty() {
                let (attribute, rest) = expect(attributes, SEQUENCE)?;
                attributes = rest;
                let (oid, value) = expect(attribute, OID)?;
                if oid == COMMON_NAME {
                    let (_, text, _) = element(value)?;
                    return Some(String::from_utf8_lossy(text).chars().take(200).collect());
                }
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn lengths_past_the_input_are_refused() {
            assert_eq!(element(&[0x30, 0x05, 1, 2]), None);
            assert_eq!(element(&[0x30, 0x85, 0, 0, 0, 0, 1]), None);
            assert_eq!(element(&[0x30, 0x81]), None);
            assert_eq!(element(&[0x30, 0x02, 1, 2, 3]), Some((0x30, &[1u8, 2][..], &[3u8][..])));
            assert_eq!(leaf_details(&[0x30, 0x00]), None);
            assert_eq!(leaf_details(&[]), None);
        }

        #[test]
        fn times_parse_in_both_forms() {
            let utc = [
                UTC_TIME, 13, b'2', b'6', b'1', b'1', b'2', b'8', b'0', b'1', b'0', b'2', b'0', b'3', b'Z',
            ];
            let (at, _) = time_value(&utc).expect("a UTC time");
            assert_eq!(at.unix_timestamp(), 1_795_827_723);
            let generalized = [
                GENERALIZED_TIME,
                15,
                b'2',
                b'0',
                b'5',
                b'0',
                b'0',
                b'1',
                b'0',
                b'1',
                b'0',
                b'0',
                b'0',
                b'0',
                b'0',
                b'0',
                b'Z',
            ];
            let (at, _) = time_value(&generalized).expect("a generalized time");
            assert_eq!(at.year(), 2050);
            let bad = [
                UTC_TIME, 13, b'2', b'6', b'1', b'3', b'2', b'8', b'0', b'1', b'0', b'2', b'0', b'3', b'Z',
            ];
            assert_eq!(time_value(&bad), None, "month 13");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Self-signed (CN "Test CA a") for shop.example.com and www.example.com, valid from
    /// 2026-11-28 01:11:12 UTC to 2126-11-04 (a GeneralizedTime), made with openssl.
    const CHAIN: &str = "-----BEGIN CERTIFICATE-----\nMIIBrzCCAVSgAwIBAgIUT5F+Tb6qmJERSg0zx9Jj1zgScLQwCgYIKoZIzj0EAwIw\nFDESMBAGA1UEAwwJVGVzdCBDQSBhMCAXDTI2MTEyODAxMTExMloYDzIxMjYxMTA0\nMDExMTEyWjAUMRIwEAYDVQQDDAlUZXN0IENBIGEwWTATBgcqhkjOPQIBBggqhkjO\nPQMBBwNCAAQkqz9QT+futXQajzlsUoCble9HaZBAhogO0HC7IAYLi4DQmrWr84li\nO3E8yjKkl/ZQvcp55tvEqPTUAP9PcsHko4GBMH8wHQYDVR0OBBYEFCYficCrk9ps\n+nOJeLsymriCIQ9YMB8GA1UdIwQYMBaAFCYficCrk9ps+nOJeLsymriCIQ9YMA8G\nA1UdEwEB/wQFMAMBAf8wLAYDVR0RBCUwI4IQc2hvcC5leGFtcGxlLmNvbYIPd3d3\nLmV4YW1wbGUuY29tMAoGCCqGSM49BAMCA0kAMEYCIQDDwJxBcUJ4kucWm3rzhxi9\njPfbb4Ul+hT4uX3sx4s77AIhAOkwR+w5cXNI1LcEImGm3AZT693ozlsc0gA6AEbr\nI6Sq\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNhrllu4Wc7LC/H0Y\nLYq3LaWL+gC3MeI1Wrij3yR7+k6hRANCAAQkqz9QT+futXQajzlsUoCble9HaZBA\nhogO0HC7IAYLi4DQmrWr84liO3E8yjKkl/ZQvcp55tvEqPTUAP9PcsHk\n-----END PRIVATE KEY-----\n";
    /// Another key.
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgChzEeXTFeSMTilpC\nMqQ6AiXCJ2hy5Gtd6rl4OJ34lxihRANCAAQrU4qvxg9VReI08SK0/Vkd49mt6cA4\nVkVUaj81kSZYwzMa2UUwVeIZWPVbxaeMePEwyg3wnfehVb414YvlJ3pG\n-----END PRIVATE KEY-----\n";

    fn issued(chain: &str, key: &str) -> IssuedCertificate {
        IssuedCertificate {
            chain_pem: chain.to_string(),
            key_pem: key.to_string(),
            not_before: 0,
            not_after: 0,
        }
    }

    #[test]
    fn a_good_certificate_is_read_from_its_der() {
        let now = OffsetDateTime::now_utc();
        let checked = check(&issued(CHAIN, KEY), "shop.example.com", now).expect("valid");
        assert_eq!(checked.not_before.unix_timestamp(), 1_795_828_272);
        assert_eq!(checked.not_after.year(), 2126);
        assert_eq!(checked.issuer.as_deref(), Some("Test CA a"));
        assert!(check(&issued(CHAIN, KEY), "www.example.com", now).is_ok());
    }

    #[test]
    fn bad_certificates_are_refused() {
        let now = OffsetDateTime::now_utc();
        let refused =
            |chain: &str, key: &str, name: &str, at: OffsetDateTime| check(&issued(chain, key), name, at).err();
        assert_eq!(
            refused(CHAIN, KEY, "other.example.com", now),
            Some(InvalidCertificate::WrongName("other.example.com".into()))
        );
        assert_eq!(
            refused(CHAIN, OTHER_KEY, "shop.example.com", now),
            Some(InvalidCertificate::KeyMismatch)
        );
        assert_eq!(
            refused("", KEY, "shop.example.com", now),
            Some(InvalidCertificate::NoCertificate)
        );
        assert_eq!(
            refused("not pem at all", KEY, "shop.example.com", now),
            Some(InvalidCertificate::NoCertificate)
        );
        assert_eq!(
            refused(CHAIN, "", "shop.example.com", now),
            Some(InvalidCertificate::BadKey)
        );
        assert_eq!(
            refused(KEY, KEY, "shop.example.com", now),
            Some(InvalidCertificate::NoCertificate)
        );
        let later = OffsetDateTime::from_unix_timestamp(5_000_000_000).expect("a time");
        assert!(matches!(
            refused(CHAIN, KEY, "shop.example.com", later),
            Some(InvalidCertificate::Expired(_))
        ));
        let nine = CHAIN.repeat(9);
        assert_eq!(
            refused(&nine, KEY, "shop.example.com", now),
            Some(InvalidCertificate::TooLong)
        );
        let huge = "x".repeat(MAX_CHAIN_PEM_BYTES + 1);
        assert_eq!(
            refused(&huge, KEY, "shop.example.com", now),
            Some(InvalidCertificate::TooLarge)
        );
    }
}
