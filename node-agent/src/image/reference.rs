//! Image references (`busybox`, `registry.example.com:5000/team/app:1.2@sha256:…`): parsing,
//! validation and Docker's normalisation, so that the rest of the agent only ever sees a
//! fully-qualified [`ImageReference`].
//!
//! *Design.* The grammar is the one of the distribution project's `reference` package
//! (`github.com/distribution/reference`), checked by hand rather than with a regular
//! expression:
//!
//! ```text
//! reference      := name [ ":" tag ] [ "@" digest ]
//! name           := [ domain "/" ] path-component ( "/" path-component )*
//! domain         := host [ ":" port ]          host: DNS name, IPv4, or [IPv6]
//! path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag            := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest         := "sha256:" 64 lowercase hex | "sha512:" 128 lowercase hex
//! ```
//!
//! Normalisation follows Docker: the first `/`-separated component names a registry when it
//! contains `.` or `:` or is `localhost`, otherwise the image is on Docker Hub (`docker.io`,
//! also written `index.docker.io`); a Docker Hub repository without a `/` is in `library/`;
//! a reference with neither tag nor digest gets the tag `latest`.
//!
//! *Invariants.* A parsed [`ImageReference`] has a syntactically valid registry, a lowercase
//! repository, a valid tag and a valid digest, so its parts can be put into URLs without
//! escaping; at least one of tag and digest is set; the name as written is at most 255
//! characters. Unlike Docker, a first component with upper-case letters is not taken for a
//! registry host (`Team/app` is rejected as not lowercase rather than sent to a host `Team`).
//!
//! *Limitations.* Only `sha256` and `sha512` digests are accepted, which is what registries
//! produce; a registry host is not resolved or checked for reachability here.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// The registry of images named without one.
pub const DOCKER_HUB: &str = "docker.io";

/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// The tag of a reference written without tag or digest.
pub const DEFAULT_TAG: &str = "latest";

/// The longest name (registry and repository as written) the grammar allows.
pub const NAME_MAX_LEN: usize = 255;

/// The longest tag the grammar allows.
pub const TAG_MAX_LEN: usize = 128;

/// How many characters of a rejected input an error message repeats.
const ECHO_MAX_CHARS: usize = 80;

/// A fully-qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// The registry as written, `host[:port]` (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository within the registry, such as `library/busybox` or `team/app`.
    pub repository: String,
    /// The tag, `None` when the reference names only a digest.
    pub tag: Option<String>,
    /// The manifest digest (`sha256:<hex>`), when the reference pins one.
    pub digest: Option<String>,
}

impl ImageReference {
    /// The host (and port) to send registry API requests to: Docker Hub's API lives on
    /// `registry-1.docker.io`, every other registry on the host it is named by.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest when there is one (it
    /// wins over a tag), else the tag.
    pub fn reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest,
            (None, Some(tag)) => tag,
            // Only reachable for a value built by hand; parsing always sets one of the two.
            (None, None) => DEFAULT_TAG,
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// This image's name with `digest` instead of its tag and digest: how a manifest or blob
    /// fetched by digest is named in messages.
    pub fn with_digest(&self, digest: &str) -> ImageReference {
        ImageReference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        }
    }
}

impl fmt::Display for ImageReference {
    /// The canonical full form: `docker.io/library/busybox:latest`,
    /// `registry.example.com/app:1@sha256:…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {problem}")]
pub struct ReferenceError {
    /// The rejected input, cut to its first 80 characters.
    pub input: String,
    pub problem: ReferenceProblem,
}

/// The part of a reference that breaks the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceProblem {
    #[error("the reference is empty")]
    Empty,
    #[error("the name is longer than {NAME_MAX_LEN} characters")]
    NameTooLong,
    #[error("the repository must be lowercase")]
    Uppercase,
    #[error(
        "the repository has an empty or invalid component (components are lowercase letters and \
         digits, separated by '.', '_', '__' or dashes)"
    )]
    InvalidRepository,
    #[error("the registry host or port is invalid")]
    InvalidRegistry,
    #[error(
        "the tag is invalid (letters, digits, '_', '.' and '-', at most {TAG_MAX_LEN}, not \
         starting with '.' or '-')"
    )]
    InvalidTag,
    #[error("the digest is invalid (expected sha256: with 64 or sha512: with 128 lowercase hex digits)")]
    InvalidDigest,
    #[error("a 64-digit hexadecimal name is an image id, not a repository")]
    HexName,
}

impl FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<ImageReference, ReferenceError> {
        parse(input).map_err(|problem| ReferenceError {
            input: input.chars().take(ECHO_MAX_CHARS).collect(),
            problem,
        })
    }
}

fn parse(input: &str) -> Result<ImageReference, ReferenceProblem> {
    if input.is_empty() {
        return Err(ReferenceProblem::Empty);
    }
    // A name contains no '@', so the first one starts the digest.
    let (rest, digest) = match input.split_once('@') {
        Some((rest, digest)) => {
            if !is_valid_digest(digest) {
                return Err(ReferenceProblem::InvalidDigest);
            }
            (rest, Some(digest))
        }
        None => (input, None),
    };
    // The tag is after the last ':' of the last path component (a ':' before a '/' is the
    // registry's port).
    let last_component_start = rest.rfind('/').map_or(0, |slash| slash + 1);
    let (name, tag) = match rest[last_component_start..].rfind(':') {
        Some(colon) => {
            let colon = last_component_start + colon;
            let tag = &rest[colon + 1..];
            if !is_valid_tag(tag) {
                return Err(ReferenceProblem::InvalidTag);
            }
            (&rest[..colon], Some(tag))
        }
        None => (rest, None),
    };
    if name.is_empty() {
        return Err(ReferenceProblem::Empty);
    }
    if name.len() > NAME_MAX_LEN {
        return Err(ReferenceProblem::NameTooLong);
    }

    let (registry, path) = match name.split_once('/') {
        Some((first, remainder)) if first.contains(['.', ':']) || first == "localhost" => {
            if !is_valid_registry(first) {
                return Err(ReferenceProblem::InvalidRegistry);
            }
            (first, remainder)
        }
        _ => {
            if name.len() == 64 && name.bytes().all(is_lower_hex) {
                return Err(ReferenceProblem::HexName);
            }
            (DOCKER_HUB, name)
        }
    };
    validate_path(path)?;
    let registry = if registry == "index.docker.io" {
        DOCKER_HUB
    } else {
        registry
    };
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    let tag = match (tag, digest) {
        (None, None) => Some(DEFAULT_TAG.to_string()),
        (tag, _) => tag.map(str::to_string),
    };
    Ok(ImageReference {
        registry: registry.to_string(),
        repository,
        tag,
        digest: digest.map(str::to_string),
    })
}

/// Whether `digest` is `sha256:` with 64, or `sha512:` with 128, lowercase hex digits: the
/// only digests accepted anywhere (in references, and in manifests before a digest is put
/// into a URL).
pub fn is_valid_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let expected_len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == expected_len && hex.bytes().all(is_lower_hex)
}

fn is_lower_hex(byte: u8) -> bool {
    byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            tag.len() <= TAG_MAX_LEN
                && is_word_byte(*first)
                && rest.iter().all(|&b| is_word_byte(b) || b == b'.' || b == b'-')
        }
        None => false,
    }
}

/// Checks `path-component ("/" path-component)*`, telling upper-case letters apart from
/// other mistakes because that is the usual one.
fn validate_path(path: &str) -> Result<(), ReferenceProblem> {
    if path.split('/').all(is_valid_path_component) {
        return Ok(());
    }
    let lowered = path.to_ascii_lowercase();
    if lowered != path && lowered.split('/').all(is_valid_path_component) {
        return Err(ReferenceProblem::Uppercase);
    }
    Err(ReferenceProblem::InvalidRepository)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let is_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !is_alnum(first) || !is_alnum(last) {
        return false;
    }
    // Every run of non-alphanumeric bytes between alphanumeric ones must be a separator.
    let mut index = 0;
    while index < bytes.len() {
        if is_alnum(&bytes[index]) {
            index += 1;
            continue;
        }
        let start = index;
        while index < bytes.len() && !is_alnum(&bytes[index]) {
            index += 1;
        }
        let separator = &bytes[start..index];
        let valid = matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|&b| b == b'-');
        if !valid {
            return false;
        }
    }
    true
}

/// `host [":" port]` where host is a DNS name (components of letters, digits and inner
/// dashes, separated by dots), an IPv4 address (which that covers) or a bracketed IPv6
/// address, and port is a decimal number that fits 16 bits.
fn is_valid_registry(registry: &str) -> bool {
    let (host_ok, port) = if let Some(bracketed) = registry.strip_prefix('[') {
        let Some((address, after)) = bracketed.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        (address.parse::<Ipv6Addr>().is_ok(), port)
    } else {
        let (host, port) = match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        };
        (host.split('.').all(is_valid_domain_component), port)
    };
    let port_ok = port
        .is_none_or(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok());
    host_ok && port_ok
}

/// `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`
fn is_valid_domain_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// The host part of a registry written `host[:port]` (`[::1]:5000` → `::1`), for deciding
/// whether it is a loopback or listed host.
pub(crate) fn registry_host(registry: &str) -> &str {
    if let Some(bracketed) = registry.strip_prefix('[') {
        return bracketed.split_once(']').map_or(bracketed, |(address, _)| address);
    }
    registry.split_once(':').map_or(registry, |(host, _)| host)
}

/// Whether a registry (`host[:port]`) is on this machine: `localhost` or a loopback address.
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = registry_host(registry);
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Parses `input` and compares the canonical form, or the problem when `expected` starts
    /// with `!`.
    fn check(input: &str, expected: &str) {
        let parsed = input.parse::<ImageReference>();
        match (parsed, expected.strip_prefix('!')) {
            (Ok(reference), None) => assert_eq!(reference.to_string(), expected, "input {input:?}"),
            (Err(err), Some(problem)) => {
                assert_eq!(format!("{:?}", err.problem), problem, "input {input:?}: {err}")
            }
            (Ok(reference), Some(problem)) => {
                panic!("input {input:?} parsed as {reference}, expected error {problem}")
            }
            (Err(err), None) => panic!("input {input:?} failed: {err}, expected {expected}"),
        }
    }

    #[test]
    fn docker_normalisation() {
        check("busybox", "docker.io/library/busybox:latest");
        check("busybox:1.36", "docker.io/library/busybox:1.36");
        check("user/app", "docker.io/user/app:latest");
        check("user/team/app:v1", "docker.io/user/team/app:v1");
        check("docker.io/busybox", "docker.io/library/busybox:latest");
        check("index.docker.io/user/app", "docker.io/user/app:latest");
        check("docker.io/library/busybox:latest", "docker.io/library/busybox:latest");
        check("localhost/app", "localhost/app:latest");
        check("localhost:5000/app:1", "localhost:5000/app:1");
        check("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest");
        check("[::1]:5000/app", "[::1]:5000/app:latest");
        check("[fd00::1]/app", "[fd00::1]/app:latest");
        check("registry.example.com/app", "registry.example.com/app:latest");
        check("Registry.Example.com:443/app", "Registry.Example.com:443/app:latest");
        // A single name with a ':' is a tag, as in Docker.
        check("localhost:5000", "docker.io/library/localhost:5000");
        check("a.b-c/x__y---z.w_v", "a.b-c/x__y---z.w_v:latest");
        check("a.b_c/x", "!InvalidRegistry");
    }

    #[test]
    fn digests() {
        let digest = format!("sha256:{HEX64}");
        check(
            &format!("busybox@{digest}"),
            &format!("docker.io/library/busybox@{digest}"),
        );
        check(
            &format!("busybox:1@{digest}"),
            &format!("docker.io/library/busybox:1@{digest}"),
        );
        check(
            &format!("localhost:5000/app@sha512:{HEX64}{HEX64}"),
            &format!("localhost:5000/app@sha512:{HEX64}{HEX64}"),
        );
        let reference: ImageReference = format!("busybox:1@{digest}").parse().expect("valid");
        assert_eq!(reference.reference(), digest);
        assert_eq!(reference.tag.as_deref(), Some("1"));
        check(&format!("busybox@sha256:{}", &HEX64[1..]), "!InvalidDigest");
        check(&format!("busybox@sha256:{}", HEX64.to_uppercase()), "!InvalidDigest");
        check(&format!("busybox@md5:{HEX64}"), "!InvalidDigest");
        check(&format!("busybox@sha256:{HEX64}@sha256:{HEX64}"), "!InvalidDigest");
        check("busybox@", "!InvalidDigest");
        check(&format!("@sha256:{HEX64}"), "!Empty");
        check(HEX64, "!HexName");
    }

    #[test]
    fn parts() {
        let reference: ImageReference = "busybox".parse().expect("valid");
        assert_eq!(reference.registry, "docker.io");
        assert_eq!(reference.repository, "library/busybox");
        assert_eq!(reference.tag.as_deref(), Some("latest"));
        assert_eq!(reference.digest, None);
        assert_eq!(reference.api_host(), "registry-1.docker.io");
        assert_eq!(reference.reference(), "latest");
        assert_eq!(reference.name(), "docker.io/library/busybox");

        let reference: ImageReference = "127.0.0.1:5000/team/app:v2".parse().expect("valid");
        assert_eq!(reference.api_host(), "127.0.0.1:5000");
        assert_eq!(reference.repository, "team/app");
        assert_eq!(reference.reference(), "v2");
        let pinned = reference.with_digest(&format!("sha256:{HEX64}"));
        assert_eq!(pinned.to_string(), format!("127.0.0.1:5000/team/app@sha256:{HEX64}"));
    }

    #[test]
    fn hostile_inputs() {
        check("", "!Empty");
        check(":latest", "!Empty");
        check("Busybox", "!Uppercase");
        check("user/App", "!Uppercase");
        check("Team/app", "!Uppercase");
        check("registry.example.com/Team/app", "!Uppercase");
        check("a..b", "!InvalidRepository");
        check("a/../b", "!InvalidRepository");
        check("../etc/passwd", "!InvalidRegistry");
        check("localhost/../../v2", "!InvalidRepository");
        check("a//b", "!InvalidRepository");
        check("/busybox", "!InvalidRepository");
        check("busybox/", "!InvalidRepository");
        check("registry.example.com/", "!InvalidRepository");
        check("-app", "!InvalidRepository");
        check("app-", "!InvalidRepository");
        check("a___b", "!InvalidRepository");
        check("a.-b", "!InvalidRepository");
        check("bus box", "!InvalidRepository");
        check("busybox ", "!InvalidRepository");
        check(" busybox", "!InvalidRepository");
        check("busybox\n", "!InvalidRepository");
        check("busybox\r\nHost: evil", "!InvalidTag");
        check("busy%2fbox", "!InvalidRepository");
        check("busybox?x=1", "!InvalidRepository");
        check("bü", "!InvalidRepository");
        check("busybox:", "!InvalidTag");
        check("busybox:.hidden", "!InvalidTag");
        check("busybox:-x", "!InvalidTag");
        check("busybox:a b", "!InvalidTag");
        check("busybox:a\nb", "!InvalidTag");
        check("busybox:a/b", "!InvalidRegistry");
        check(
            &format!("busybox:{}", "t".repeat(128)),
            &format!("docker.io/library/busybox:{}", "t".repeat(128)),
        );
        check(&format!("busybox:{}", "t".repeat(129)), "!InvalidTag");
        check("reg..example.com/app", "!InvalidRegistry");
        check("-reg.example.com/app", "!InvalidRegistry");
        check("reg.example.com:/app", "!InvalidRegistry");
        check("reg.example.com:99999/app", "!InvalidRegistry");
        check("reg.example.com:50a/app", "!InvalidRegistry");
        check("reg_x.example.com/app", "!InvalidRegistry");
        check("[::1/app", "!InvalidRegistry");
        check("[not-ipv6]:5000/app", "!InvalidRegistry");
        check("[::1]x/app", "!InvalidRegistry");
        check("user:pass@reg.example.com/app", "!InvalidDigest");

        // 255 characters of name are allowed, 256 are not, and a long input is cut in the
        // error message.
        let name = format!("reg.example.com/{}", "a".repeat(255 - 16));
        assert_eq!(name.len(), 255);
        check(&name, &format!("{name}:latest"));
        let long = format!("reg.example.com/{}", "a".repeat(10_000));
        check(&long, "!NameTooLong");
        let err = long.parse::<ImageReference>().expect_err("too long");
        assert!(err.to_string().len() < 300, "{err}");
        let many_components = "a/".repeat(200) + "a";
        check(&many_components, "!NameTooLong");
    }

    #[test]
    fn error_messages() {
        let err = "Busybox".parse::<ImageReference>().expect_err("uppercase");
        assert_eq!(
            err.to_string(),
            "invalid image reference \"Busybox\": the repository must be lowercase"
        );
        let err = "a\nb".parse::<ImageReference>().expect_err("newline");
        assert!(
            err.to_string().starts_with("invalid image reference \"a\\nb\""),
            "{err}"
        );
    }

    #[test]
    fn registry_hosts() {
        assert_eq!(registry_host("[::1]:5000"), "::1");
        assert_eq!(registry_host("localhost:5000"), "localhost");
        assert_eq!(registry_host("reg.example.com"), "reg.example.com");
        for registry in [
            "localhost",
            "LOCALHOST:1",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback_registry(registry), "{registry}");
        }
        for registry in ["docker.io", "10.0.0.1:5000", "[fd00::1]", "localhost.example.com"] {
            assert!(!is_loopback_registry(registry), "{registry}");
        }
    }
}
