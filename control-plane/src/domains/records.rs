//! The DNS records that prove a team controls a domain and send its traffic to the platform,
//! as shown to the user and as handed to the agent that checks them ([`DnsExpectation`]).
//!
//! - TXT `_instapod-challenge.<hostname>` = `instapod-verify=<token>`: 256 random bits drawn when
//!   the domain is added (so bound to this team's claim of this name; re-adding the name draws a
//!   new one), stored with the domain.
//! - CNAME `<hostname>` → the pod's platform host name (`<pod>-<team slug>.<apps_domain>`), or,
//!   for an apex domain (exactly two labels: it cannot have a CNAME), A/AAAA records naming the
//!   ingress addresses of `[domains] ingress_addresses`. Verification accepts either when both
//!   are known.

use std::net::IpAddr;

use base64::Engine as _;
use instapod_common::domains::{DnsExpectation, challenge_record_name};
use rand::RngCore as _;
use serde::Serialize;

use super::normalise::is_apex;

/// The prefix of every TXT value.
pub const TXT_PREFIX: &str = "instapod-verify=";

/// A fresh TXT value (256 random bits, base64url).
pub fn new_txt_value() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{TXT_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// One record to create, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, salvo::oapi::ToSchema)]
pub struct DnsRecord {
    /// `TXT`, `CNAME`, `A` or `AAAA`.
    #[serde(rename = "type")]
    pub record_type: String,
    pub name: String,
    pub value: String,
}

/// What a domain's records must be.
pub fn expectation(
    hostname: &str,
    txt_value: &str,
    platform_host: Option<&str>,
    ingress_addresses: &[IpAddr],
) -> DnsExpectation {
    DnsExpectation {
        txt_name: challenge_record_name(hostname),
        txt_value: txt_value.to_string(),
        cname_target: if is_apex(hostname) {
            None
        } else {
            platform_host.map(str::to_string)
        },
        addresses: ingress_addresses.to_vec(),
    }
}

/// The records to create: the TXT record, then the CNAME, or A/AAAA records for an apex.
pub fn records(expected: &DnsExpectation, hostname: &str) -> Vec<DnsRecord> {
    let mut records = vec![DnsRecord {
        record_type: "TXT".into(),
        name: expected.txt_name.clone(),
        value: expected.txt_value.clone(),
    }];
    match &expected.cname_target {
        Some(target) => records.push(DnsRecord {
            record_type: "CNAME".into(),
            name: hostname.to_string(),
            value: target.clone(),
        }),
        None => {
            for address in &expected.addresses {
                records.push(DnsRecord {
                    record_type: if address.is_ipv4() { "A" } else { "AAAA" }.into(),
                    name: hostname.to_string(),
                    value: address.to_string(),
                });
            }
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_values_are_long_and_fresh() {
        let a = new_txt_value();
        assert!(a.starts_with(TXT_PREFIX));
        assert!(a.len() - TXT_PREFIX.len() >= 43, "256 bits in base64url");
        assert_ne!(a, new_txt_value());
    }

    #[test]
    fn subdomains_get_a_cname_and_apexes_addresses() {
        let addresses: Vec<IpAddr> = vec!["192.0.2.1".parse().expect("ip"), "2001:db8::1".parse().expect("ip")];
        let sub = expectation(
            "shop.example.com",
            "instapod-verify=x",
            Some("web-acme.apps.test"),
            &addresses,
        );
        let shown = records(&sub, "shop.example.com");
        let kinds: Vec<(&str, &str, &str)> = shown
            .iter()
            .map(|r| (r.record_type.as_str(), r.name.as_str(), r.value.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("TXT", "_instapod-challenge.shop.example.com", "instapod-verify=x"),
                ("CNAME", "shop.example.com", "web-acme.apps.test"),
            ]
        );
        assert_eq!(sub.addresses, addresses, "A/AAAA to the ingress are accepted too");

        let apex = expectation(
            "example.com",
            "instapod-verify=x",
            Some("web-acme.apps.test"),
            &addresses,
        );
        assert_eq!(apex.cname_target, None);
        let kinds: Vec<(String, String)> = records(&apex, "example.com")
            .into_iter()
            .map(|r| (r.record_type, r.value))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("TXT".to_string(), "instapod-verify=x".to_string()),
                ("A".to_string(), "192.0.2.1".to_string()),
                ("AAAA".to_string(), "2001:db8::1".to_string()),
            ]
        );
    }
}
