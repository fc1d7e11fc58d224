//! Turning what a user typed into the one spelling of a host name that is stored, compared and
//! served: lowercase ASCII, internationalised names in punycode (UTS 46, IDNA2008 rules with
//! STD3 ASCII and DNS length checks), no trailing dot — and refusing what may not be claimed.
//!
//! *Refused:* empty or over-long input, IP addresses, wildcards (`*.example.com`), single
//! labels (`localhost`, `com`), labels that are empty, longer than 63 bytes, start or end with
//! a hyphen, or hold anything but letters, digits and hyphens (underscores included), names
//! longer than 253 bytes, an all-numeric top-level label, `localhost` and its subdomains, and
//! the platform's own names: the apps domain and its subdomains, and the control plane's host.
//!
//! *Limitations.* There is no public-suffix list: `co.uk` is accepted as a name (nobody can
//! prove control of it through DNS, so it never verifies), and "apex" means exactly two labels.

use std::borrow::Cow;
use std::net::IpAddr;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

/// The longest input looked at, in bytes (a DNS name is at most 253; IDN input may be longer).
const MAX_INPUT_BYTES: usize = 1024;

/// The platform's own names, which no team may claim.
#[derive(Debug, Clone, Default)]
pub struct PlatformNames {
    /// Normalised; its subdomains are refused too.
    pub apps_domain: String,
    /// Normalised host names of the control plane (its public URL's host).
    pub control_plane_hosts: Vec<String>,
}

/// Why a host name is refused (the message is shown to the user).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHostname {
    #[error("hostname is empty")]
    Empty,
    #[error("hostname is longer than {MAX_INPUT_BYTES} bytes")]
    TooLongInput,
    #[error("{0:?} is an IP address; give a domain name")]
    IpAddress(String),
    #[error("{0:?} is a wildcard; add each name separately")]
    Wildcard(String),
    #[error("{0:?} is not a valid domain name: {1}")]
    Malformed(String, &'static str),
    #[error("{0:?} has a single label; give a full domain name such as www.example.com")]
    SingleLabel(String),
    #[error("{0:?} is a name of the platform and cannot be added")]
    PlatformOwned(String),
}

impl InvalidHostname {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidHostname::PlatformOwned(_) => "hostname_reserved",
            _ => "invalid_hostname",
        }
    }
}

/// The normalised form of `input`, or why it is refused.
pub fn normalise(input: &str, platform: &PlatformNames) -> Result<String, InvalidHostname> {
    if input.len() > MAX_INPUT_BYTES {
        return Err(InvalidHostname::TooLongInput);
    }
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(InvalidHostname::Empty);
    }
    let shown = trimmed.to_string();
    if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidHostname::Malformed(
            shown,
            "it contains spaces or control characters",
        ));
    }
    // One trailing dot (the root) is the same name.
    let without_root = trimmed.strip_suffix('.').unwrap_or(trimmed);
    let bare = without_root
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(without_root);
    if bare.parse::<IpAddr>().is_ok() {
        return Err(InvalidHostname::IpAddress(shown));
    }
    if without_root.contains('*') {
        return Err(InvalidHostname::Wildcard(shown));
    }
    if without_root.contains(['/', ':', '@', '?', '#']) {
        return Err(InvalidHostname::Malformed(
            shown,
            "give the host name only, without scheme, port or path",
        ));
    }
    if without_root.is_empty() || without_root.starts_with('.') || without_root.contains("..") {
        return Err(InvalidHostname::Malformed(shown, "it has an empty label"));
    }
    let ascii: Cow<'_, str> = Uts46::new()
        .to_ascii(
            without_root.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::CheckFirstLast,
            DnsLength::Verify,
        )
        .map_err(|_| {
            InvalidHostname::Malformed(
                shown.clone(),
                "labels are 1 to 63 letters, digits or hyphens (not first or last), the whole name at most 253 bytes",
            )
        })?;
    let name = ascii.into_owned();
    // UTS 46 maps some characters to dots (`。`) and may leave an empty label at the end.
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err(InvalidHostname::Malformed(shown, "it has an empty label"));
    }
    if name.len() > 253 || name.split('.').any(|label| label.len() > 63) {
        return Err(InvalidHostname::Malformed(
            shown,
            "labels are at most 63 bytes and the whole name at most 253",
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(InvalidHostname::Malformed(
            shown,
            "only letters, digits and hyphens are allowed",
        ));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err(InvalidHostname::SingleLabel(shown));
    }
    if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(InvalidHostname::Malformed(shown, "the top-level label is all digits"));
    }
    if is_within(&name, "localhost") {
        return Err(InvalidHostname::PlatformOwned(shown));
    }
    if !platform.apps_domain.is_empty() && is_within(&name, &platform.apps_domain) {
        return Err(InvalidHostname::PlatformOwned(shown));
    }
    if platform.control_plane_hosts.contains(&name) {
        return Err(InvalidHostname::PlatformOwned(shown));
    }
    Ok(name)
}

/// `name` is `parent` or one of its subdomains.
fn is_within(name: &str, parent: &str) -> bool {
    name == parent || name.strip_suffix(parent).is_some_and(|head| head.ends_with('.'))
}

/// Whether a normalised name is an apex (exactly two labels: it cannot have a CNAME).
pub fn is_apex(hostname: &str) -> bool {
    hostname.split('.').count() == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform() -> PlatformNames {
        PlatformNames {
            apps_domain: "apps.example.net".into(),
            control_plane_hosts: vec!["console.example.net".into()],
        }
    }

    fn check(input: &str, expected: Result<&str, &str>) {
        let outcome = normalise(input, &platform());
        match (&outcome, expected) {
            (Ok(name), Ok(want)) => assert_eq!(name, want, "{input:?}"),
            (Err(err), Err(code)) => assert_eq!(format!("{err:?}").split('(').next(), Some(code), "{input:?}: {err}"),
            _ => panic!("{input:?}: expected {expected:?}, got {outcome:?}"),
        }
    }

    #[test]
    fn names_are_normalised() {
        check("shop.example.com", Ok("shop.example.com"));
        check("Shop.EXAMPLE.com", Ok("shop.example.com"));
        check("shop.example.com.", Ok("shop.example.com"));
        check("  shop.example.com  ", Ok("shop.example.com"));
        check("bücher.example", Ok("xn--bcher-kva.example"));
        check("BÜCHER.example.", Ok("xn--bcher-kva.example"));
        check("xn--bcher-kva.example", Ok("xn--bcher-kva.example"));
        check("例え.テスト", Ok("xn--r8jz45g.xn--zckzah"));
        check("a-b.example.com", Ok("a-b.example.com"));
        check("1.example.com", Ok("1.example.com"));
        check("example.com", Ok("example.com"));
        let label63 = "a".repeat(63);
        check(&format!("{label63}.example.com"), Ok(&format!("{label63}.example.com")));
    }

    #[test]
    fn bad_names_are_refused() {
        check("", Err("Empty"));
        check("   ", Err("Empty"));
        check(&"a".repeat(2000), Err("TooLongInput"));
        check("127.0.0.1", Err("IpAddress"));
        check("::1", Err("IpAddress"));
        check("[2001:db8::1]", Err("IpAddress"));
        check("10.0.0.1.", Err("IpAddress"));
        check("*.example.com", Err("Wildcard"));
        check("shop.*.example.com", Err("Wildcard"));
        check("localhost", Err("SingleLabel"));
        check("com", Err("SingleLabel"));
        check("com.", Err("SingleLabel"));
        check("-shop.example.com", Err("Malformed"));
        check("shop-.example.com", Err("Malformed"));
        check("sh_op.example.com", Err("Malformed"));
        check("_dmarc.example.com", Err("Malformed"));
        check("shop..example.com", Err("Malformed"));
        check(".example.com", Err("Malformed"));
        check("shop.example.com..", Err("Malformed"));
        check(".", Err("Malformed"));
        check("shop example.com", Err("Malformed"));
        check("https://shop.example.com", Err("Malformed"));
        check("shop.example.com:443", Err("Malformed"));
        check("shop.example.com/path", Err("Malformed"));
        check(&format!("{}.example.com", "a".repeat(64)), Err("Malformed"));
        let long = format!("{}.com", ["abcdefghi"; 26].join("."));
        assert!(long.len() > 253);
        check(&long, Err("Malformed"));
        check("shop.example.123", Err("Malformed"));
        check("shop\u{0}.example.com", Err("Malformed"));
    }

    #[test]
    fn platform_names_are_reserved() {
        check("apps.example.net", Err("PlatformOwned"));
        check("web-team.apps.example.net", Err("PlatformOwned"));
        check("WEB-team.Apps.Example.Net.", Err("PlatformOwned"));
        check("console.example.net", Err("PlatformOwned"));
        check("foo.localhost", Err("PlatformOwned"));
        // Only the apps domain's subtree and the console's own name are reserved.
        check("evilapps.example.net", Ok("evilapps.example.net"));
        check("other.example.net", Ok("other.example.net"));
        check("example.net", Ok("example.net"));
    }

    #[test]
    fn apex_means_two_labels() {
        assert!(is_apex("example.com"));
        assert!(!is_apex("www.example.com"));
    }
}
