//! Checking a domain's DNS records: the TXT proof of ownership, and the CNAME (or, for apex
//! domains, A/AAAA records) that bring its traffic to the platform.
//!
//! *Design.* [`check`] is the whole rule, over the narrow [`DnsLookup`] seam, so it is tested
//! against a fake; [`HickoryLookup`] is the real resolver (hickory-resolver against the
//! configured nameservers, or the system's resolv.conf when none are configured), built with
//! no cache: a user fixing their records is seen at the next check. A lookup that finds no
//! record (NXDOMAIN or an empty answer) is an answer, `found: []`; anything else (timeout,
//! SERVFAIL, refused) is a resolver error, reported as such so that the control plane does not
//! mistake an outage for a proof that disappeared.
//!
//! *Rule.* Verified when one TXT record at `_instapod-challenge.<host>` equals the token
//! exactly (its strings concatenated), and either the host is a CNAME to the expected target,
//! or its A/AAAA records are all among the expected ingress addresses (at least one).
//!
//! *Limitations.* No DNSSEC validation. The CNAME is compared with the expected target only
//! (not chased further).

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use instapod_common::domains::{DnsExpectation, RecordCheck, VerificationReport};

/// The record types checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Txt,
    Cname,
    A,
    Aaaa,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Txt => "TXT",
            Kind::Cname => "CNAME",
            Kind::A => "A",
            Kind::Aaaa => "AAAA",
        }
    }
}

/// A lookup failed for another reason than "no such record".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// Where records come from.
pub trait DnsLookup: Send + Sync {
    /// The records of `kind` at `name`, as text (TXT strings concatenated, names without the
    /// trailing dot, lowercase; addresses in their usual form); empty when there are none.
    fn lookup<'a>(
        &'a self,
        name: &'a str,
        kind: Kind,
    ) -> impl Future<Output = Result<Vec<String>, LookupError>> + Send + 'a;
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildResolverError {
    #[error("cannot build the DNS resolver: {0}")]
    Build(String),
}

/// hickory-resolver, uncached.
#[derive(Debug, Clone)]
pub struct HickoryLookup {
    resolver: TokioResolver,
}

impl HickoryLookup {
    /// A resolver asking `nameservers` (the system's when empty), `timeout` per attempt.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<HickoryLookup, BuildResolverError> {
        let mut builder = if nameservers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                // The agent runs on without it: every check then reports a resolver error
                // (never a missing record), so no domain is failed or detached for it.
                Err(err) => {
                    tracing::error!(error = %err, "cannot read the system's DNS configuration; domain checks will fail until domains.nameservers is set");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_parts(None, vec![], vec![]),
                        TokioRuntimeProvider::default(),
                    )
                }
            }
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut options = ResolverOpts::default();
        options.cache_size = 0;
        options.timeout = timeout;
        options.attempts = 2;
        builder = builder.with_options(options);
        let resolver = builder
            .build()
            .map_err(|err| BuildResolverError::Build(err.to_string()))?;
        Ok(HickoryLookup { resolver })
    }
}

/// A DNS name as compared: lowercase, without the trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

impl DnsLookup for HickoryLookup {
    async fn lookup(&self, name: &str, kind: Kind) -> Result<Vec<String>, LookupError> {
        {
            let record_type = match kind {
                Kind::Txt => RecordType::TXT,
                Kind::Cname => RecordType::CNAME,
                Kind::A => RecordType::A,
                Kind::Aaaa => RecordType::AAAA,
            };
            // A fully qualified name: no search domains appended.
            let fqdn = format!("{}.", name.trim_end_matches('.'));
            let lookup = match self.resolver.lookup(fqdn.as_str(), record_type).await {
                Ok(lookup) => lookup,
                Err(err) if err.is_no_records_found() || err.is_nx_domain() => return Ok(Vec::new()),
                Err(err) => return Err(LookupError(err.to_string())),
            };
            let mut found = Vec::new();
            for record in lookup.answers() {
                match (&record.data, kind) {
                    (RData::TXT(txt), Kind::Txt) => {
                        let text: Vec<u8> = txt.txt_data.iter().flat_map(|part| part.iter().copied()).collect();
                        found.push(String::from_utf8_lossy(&text).into_owned());
                    }
                    (RData::CNAME(target), Kind::Cname) => found.push(normalize_name(&target.0.to_string())),
                    (RData::A(address), Kind::A) => found.push(address.0.to_string()),
                    (RData::AAAA(address), Kind::Aaaa) => found.push(address.0.to_string()),
                    _ => {}
                }
            }
            Ok(found)
        }
    }
}

async fn look<L: DnsLookup>(
    dns: &L,
    name: &str,
    kind: Kind,
    expected: Vec<String>,
) -> (RecordCheck, Result<Vec<String>, LookupError>) {
    let answer = dns.lookup(name, kind).await;
    let check = RecordCheck {
        record_type: kind.as_str().to_string(),
        name: name.to_string(),
        expected,
        found: answer.clone().unwrap_or_default(),
        ok: false,
        error: answer.as_ref().err().map(|e| e.to_string()),
    };
    (check, answer)
}

/// Checks `hostname`'s records against `expected`.
pub async fn check<L: DnsLookup>(dns: &L, hostname: &str, expected: &DnsExpectation) -> VerificationReport {
    let mut checks = Vec::new();

    let (mut txt, _) = look(dns, &expected.txt_name, Kind::Txt, vec![expected.txt_value.clone()]).await;
    txt.ok = txt.error.is_none() && txt.found.iter().any(|value| value == &expected.txt_value);
    let txt_ok = txt.ok;
    checks.push(txt);

    let mut route_ok = false;
    if let Some(target) = &expected.cname_target {
        let target = normalize_name(target);
        let (mut cname, _) = look(dns, hostname, Kind::Cname, vec![target.clone()]).await;
        cname.ok = cname.error.is_none() && cname.found.iter().any(|found| normalize_name(found) == target);
        route_ok = cname.ok;
        checks.push(cname);
    }
    if !route_ok && !expected.addresses.is_empty() {
        let allowed: BTreeSet<IpAddr> = expected.addresses.iter().copied().collect();
        let of_family = |v4: bool| -> Vec<String> {
            expected
                .addresses
                .iter()
                .filter(|a| a.is_ipv4() == v4)
                .map(IpAddr::to_string)
                .collect()
        };
        let (mut a, _) = look(dns, hostname, Kind::A, of_family(true)).await;
        let (mut aaaa, _) = look(dns, hostname, Kind::Aaaa, of_family(false)).await;
        let within = |check: &RecordCheck| {
            check.error.is_none()
                && check
                    .found
                    .iter()
                    .all(|found| found.parse::<IpAddr>().is_ok_and(|ip| allowed.contains(&ip)))
        };
        let any_found = !a.found.is_empty() || !aaaa.found.is_empty();
        a.ok = any_found && within(&a);
        aaaa.ok = any_found && within(&aaaa);
        route_ok = a.ok && aaaa.ok;
        checks.push(a);
        checks.push(aaaa);
    }
    if expected.cname_target.is_none() && expected.addresses.is_empty() {
        // Nothing to route by was asked for: the TXT proof alone decides.
        route_ok = true;
    }
    VerificationReport {
        verified: txt_ok && route_ok,
        checks,
    }
}

/// One line about a failed report, naming the records that are missing or wrong and what was
/// found (for logs; the control plane writes its own message from the checks).
pub fn summary(report: &VerificationReport) -> String {
    let problems: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| match &c.error {
            Some(err) => format!("{} {}: {err}", c.record_type, c.name),
            None => format!(
                "{} {} expected {:?} found {:?}",
                c.record_type, c.name, c.expected, c.found
            ),
        })
        .collect();
    if problems.is_empty() {
        "verified".into()
    } else {
        problems.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Records from a table; a name listed under `failing` answers a resolver error.
    #[derive(Default)]
    struct FakeDns {
        records: HashMap<(String, &'static str), Vec<String>>,
        failing: Vec<String>,
    }

    impl FakeDns {
        fn with(mut self, name: &str, kind: Kind, values: &[&str]) -> FakeDns {
            self.records.insert(
                (name.to_string(), kind.as_str()),
                values.iter().map(|v| v.to_string()).collect(),
            );
            self
        }
    }

    impl DnsLookup for FakeDns {
        fn lookup<'a>(
            &'a self,
            name: &'a str,
            kind: Kind,
        ) -> impl Future<Output = Result<Vec<String>, LookupError>> + Send + 'a {
            let answer = if self.failing.iter().any(|n| n == name) {
                Err(LookupError("request timed out".into()))
            } else {
                Ok(self
                    .records
                    .get(&(name.to_string(), kind.as_str()))
                    .cloned()
                    .unwrap_or_default())
            };
            async move { answer }
        }
    }

    const HOST: &str = "shop.example.com";
    const TXT: &str = "_instapod-challenge.shop.example.com";

    fn expectation(cname: Option<&str>, addresses: &[&str]) -> DnsExpectation {
        DnsExpectation {
            txt_name: TXT.into(),
            txt_value: "instapod-verify=abc".into(),
            cname_target: cname.map(str::to_string),
            addresses: addresses.iter().map(|a| a.parse().expect("address")).collect(),
        }
    }

    /// Checks `dns` against `expected` and compares (verified, [(type, ok, found)]).
    async fn check_case(dns: FakeDns, expected: &DnsExpectation, verified: bool, checks: &[(&str, bool, &[&str])]) {
        let report = check(&dns, HOST, expected).await;
        let got: Vec<(String, bool, Vec<String>)> = report
            .checks
            .iter()
            .map(|c| (c.record_type.clone(), c.ok, c.found.clone()))
            .collect();
        let want: Vec<(String, bool, Vec<String>)> = checks
            .iter()
            .map(|(t, ok, found)| (t.to_string(), *ok, found.iter().map(|f| f.to_string()).collect()))
            .collect();
        assert_eq!((report.verified, got), (verified, want), "{}", summary(&report));
    }

    #[tokio::test]
    async fn txt_must_match_exactly_and_the_cname_must_name_the_target() {
        let cname = expectation(Some("web-a.apps.test"), &[]);
        check_case(
            FakeDns::default()
                .with(TXT, Kind::Txt, &["other", "instapod-verify=abc"])
                .with(HOST, Kind::Cname, &["web-a.apps.test"]),
            &cname,
            true,
            &[
                ("TXT", true, &["other", "instapod-verify=abc"]),
                ("CNAME", true, &["web-a.apps.test"]),
            ],
        )
        .await;
        // A prefix or a differently cased token is not the token.
        check_case(
            FakeDns::default()
                .with(TXT, Kind::Txt, &["instapod-verify=ab", "INSTAPOD-VERIFY=ABC"])
                .with(HOST, Kind::Cname, &["WEB-A.apps.test."]),
            &cname,
            false,
            &[
                ("TXT", false, &["instapod-verify=ab", "INSTAPOD-VERIFY=ABC"]),
                ("CNAME", true, &["WEB-A.apps.test."]),
            ],
        )
        .await;
        // Nothing there at all.
        check_case(
            FakeDns::default(),
            &cname,
            false,
            &[("TXT", false, &[]), ("CNAME", false, &[])],
        )
        .await;
    }

    #[tokio::test]
    async fn apex_addresses_must_all_be_ingress_addresses() {
        let apex = expectation(None, &["192.0.2.10", "2001:db8::10"]);
        check_case(
            FakeDns::default()
                .with(TXT, Kind::Txt, &["instapod-verify=abc"])
                .with(HOST, Kind::A, &["192.0.2.10"]),
            &apex,
            true,
            &[
                ("TXT", true, &["instapod-verify=abc"]),
                ("A", true, &["192.0.2.10"]),
                ("AAAA", true, &[]),
            ],
        )
        .await;
        // One address elsewhere: traffic would not always reach the platform.
        check_case(
            FakeDns::default().with(TXT, Kind::Txt, &["instapod-verify=abc"]).with(
                HOST,
                Kind::A,
                &["192.0.2.10", "198.51.100.7"],
            ),
            &apex,
            false,
            &[
                ("TXT", true, &["instapod-verify=abc"]),
                ("A", false, &["192.0.2.10", "198.51.100.7"]),
                ("AAAA", true, &[]),
            ],
        )
        .await;
        // No address at all.
        check_case(
            FakeDns::default().with(TXT, Kind::Txt, &["instapod-verify=abc"]),
            &apex,
            false,
            &[
                ("TXT", true, &["instapod-verify=abc"]),
                ("A", false, &[]),
                ("AAAA", false, &[]),
            ],
        )
        .await;
        // Both offered: a wrong CNAME falls back to the addresses.
        let both = expectation(Some("web-a.apps.test"), &["192.0.2.10"]);
        check_case(
            FakeDns::default()
                .with(TXT, Kind::Txt, &["instapod-verify=abc"])
                .with(HOST, Kind::Cname, &["elsewhere.example.net"])
                .with(HOST, Kind::A, &["192.0.2.10"]),
            &both,
            true,
            &[
                ("TXT", true, &["instapod-verify=abc"]),
                ("CNAME", false, &["elsewhere.example.net"]),
                ("A", true, &["192.0.2.10"]),
                ("AAAA", true, &[]),
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn resolver_errors_are_told_apart_from_missing_records() {
        let dns = FakeDns {
            failing: vec![TXT.to_string()],
            ..FakeDns::default()
        }
        .with(HOST, Kind::Cname, &["web-a.apps.test"]);
        let report = check(&dns, HOST, &expectation(Some("web-a.apps.test"), &[])).await;
        assert!(!report.verified);
        assert_eq!(report.checks[0].error.as_deref(), Some("request timed out"));
        assert!(report.checks[0].found.is_empty());
        assert!(report.checks[1].ok && report.checks[1].error.is_none());
        assert!(summary(&report).contains("request timed out"), "{}", summary(&report));
        let missing = check(&FakeDns::default(), HOST, &expectation(Some("web-a.apps.test"), &[])).await;
        assert!(missing.checks.iter().all(|c| c.error.is_none()));
        assert!(
            summary(&missing)
                .contains("TXT _instapod-challenge.shop.example.com expected [\"instapod-verify=abc\"] found []"),
            "{}",
            summary(&missing)
        );
    }
}
