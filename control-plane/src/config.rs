//! The control plane's configuration: one struct, read from a TOML file (`--config` or
//! `INSTAPOD_CONFIG`) with `INSTAPOD_*` environment overrides (`INSTAPOD_MAIL__SMTP_URL` sets
//! `mail.smtp_url`). Every field has a default that suits the local stack.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use instapod_common::config::Secret;
use instapod_common::telemetry::LogFormat;
use serde::Deserialize;

/// Everything the control plane reads at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server binds. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The URL users reach the control plane at, used for links in mail and for the same-origin
    /// check on cookie-authenticated requests. `Secure` cookies are set when it is `https://`.
    /// Default `http://127.0.0.1:8080`.
    pub public_url: String,
    /// Postgres connection URL. Default `postgres://postgres@127.0.0.1:5432/instapod`.
    pub database_url: Secret,
    /// Maximum number of pooled Postgres connections. Default 16.
    pub database_pool_size: usize,
    /// Seconds to wait for a pooled connection before answering 503. Default 5.
    pub database_timeout_secs: u64,
    /// Long-lived connections, besides the pool, that every authenticated request's session
    /// lookup shares (queries are pipelined on them). Default 1, best on a 2-core host; raise it
    /// when one Postgres backend becomes the bottleneck.
    pub session_lookup_connections: usize,
    /// Redis connection URL (rate-limit counters; job queues in later versions).
    /// Default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// Milliseconds a Redis command may take before it counts as Redis being down. Default 1000.
    pub redis_timeout_ms: u64,
    /// Peers whose `X-Forwarded-For` header is believed (your load balancers). Requests from any
    /// other peer are attributed to the socket's address. Default: none.
    pub trusted_proxies: Vec<IpAddr>,
    /// Lifetime of a login session or API token, in hours. Default 720 (30 days).
    pub session_ttl_hours: u32,
    /// `text` or `json`. Default `text`.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax. Default `info`.
    pub log_filter: String,
    /// Outgoing mail.
    pub mail: MailConfig,
    /// The fleet's join token: a node agent sends it as `Authorization: Bearer <token>` to
    /// `POST /internal/nodes/join` and receives its own node token. At least 16 characters
    /// when set (use 32 random ones). Empty (the default) refuses every join with 403
    /// `node_join_disabled`.
    pub node_join_token: Secret,
    /// How often a node sends a heartbeat, in seconds; told to each node in its join answer.
    /// Default 5.
    pub node_heartbeat_interval_secs: u64,
    /// A healthy node whose last heartbeat is older than this many seconds is marked
    /// `unhealthy`; its next heartbeat makes it `healthy` again. Must exceed the interval.
    /// Default 20.
    pub node_heartbeat_timeout_secs: u64,
    /// Image references that replace the catalog's seeded `runtimes.image` in what
    /// `GET /api/runtimes` answers, by runtime id: `{ static = "127.0.0.1:5055/instapod/static:1" }`.
    /// The local stack points `static` at its loopback registry; production leaves it empty
    /// (or points runtimes at public registries). Default: none.
    pub runtime_images: BTreeMap<String, String>,
    /// The domain pods are reached under: a pod `web` of team `acme` answers at
    /// `web-acme.<apps_domain>` through the node ingress. Default `apps.localhost` (browsers and
    /// curl resolve `*.localhost` to loopback).
    pub apps_domain: String,
    /// The port of the node ingress in pod URLs (omitted when 80). Default 80.
    pub apps_http_port: u16,
    /// Seconds pods' raw metric samples are kept (history steps under a minute read them).
    /// Default 7200 (the API promises one hour; the rest is margin).
    pub metrics_raw_retention_secs: i64,
    /// Seconds per-minute metric buckets are kept. Default 90000 (25 hours).
    pub metrics_minute_retention_secs: i64,
    /// Seconds per-hour metric buckets are kept. Default 2678400 (31 days).
    pub metrics_hour_retention_secs: i64,
    /// Seconds between two passes of the metrics retention worker. Default 60.
    pub metrics_retention_interval_secs: u64,
    /// The largest request body of a file upload (`POST /api/pods/{name}/files/upload`), in
    /// bytes; larger uploads are refused with 413 and nothing is kept. The pod's disk limits
    /// uploads too (507). Default 1073741824 (1 GiB).
    pub files_max_upload_bytes: u64,
    /// Custom domains: DNS verification and ACME certificates.
    pub domains: DomainsConfig,
}

/// Custom domains (`[domains]`): the ACME CA, the key that encrypts private keys at rest, what
/// apex domains point at, and the workers' periods.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DomainsConfig {
    /// The ACME directory every node orders certificates from. Default Let's Encrypt's
    /// production directory.
    pub acme_directory_url: String,
    /// Contact e-mail addresses for the platform's ACME account (`ops@example.com` or
    /// `mailto:ops@example.com`). Default: none.
    pub acme_contact: Vec<String>,
    /// 32 random bytes, base64 (`head -c 32 /dev/urandom | base64`): encrypts certificates'
    /// private keys and the ACME account's credentials in Postgres (AES-256-GCM). Required for
    /// custom domains: while it is empty the domain endpoints answer 503
    /// `domains_not_configured`. Changing it makes the stored keys unreadable (domains must be
    /// verified again). Default: empty.
    pub key_encryption_key: Secret,
    /// The addresses of the ingresses (A/AAAA records) that apex domains (`example.com`, which
    /// cannot have a CNAME) must point at; also accepted instead of the CNAME for any domain.
    /// Empty (the default): apex domains are refused.
    pub ingress_addresses: Vec<IpAddr>,
    /// Seconds between re-verifications of a verified domain's DNS records; a domain whose
    /// proof is gone is detached. Default 21600 (6 hours).
    pub reverify_interval_secs: u64,
    /// A certificate is renewed when it expires within this many seconds. Default 2592000
    /// (30 days).
    pub renew_before_secs: u64,
    /// The first wait after a failed certificate order, in seconds; doubled after each further
    /// failure. Default 60.
    pub retry_min_secs: u64,
    /// The longest wait between certificate orders, in seconds (a CA's `Retry-After` may ask
    /// for more). Default 21600 (6 hours).
    pub retry_max_secs: u64,
    /// Seconds between two passes of the domain worker (re-verification, renewal, retries).
    /// Default 30.
    pub worker_interval_secs: u64,
}

impl Default for DomainsConfig {
    fn default() -> Self {
        DomainsConfig {
            acme_directory_url: "https://acme-v02.api.letsencrypt.org/directory".to_string(),
            acme_contact: Vec::new(),
            key_encryption_key: Secret::default(),
            ingress_addresses: Vec::new(),
            reverify_interval_secs: 6 * 3_600,
            renew_before_secs: 30 * 86_400,
            retry_min_secs: 60,
            retry_max_secs: 6 * 3_600,
            worker_interval_secs: 30,
        }
    }
}

/// Outgoing mail: verification and password-reset messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// `smtp://host:port` (plain, for a local relay), `smtp+starttls://user:pass@host:port` or
    /// `smtps://user:pass@host:port`. Empty (the default) means mail is not sent: the delivery
    /// worker logs each message, with its link, and marks it delivered.
    pub smtp_url: Secret,
    /// The `From` header. Default `Instapod <noreply@instapod.localhost>`.
    pub from: String,
    /// How often the delivery worker looks for queued mail, in milliseconds. Default 500.
    pub poll_interval_ms: u64,
    /// Attempts before a message is given up. Default 8.
    pub max_attempts: i32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: "http://127.0.0.1:8080".to_string(),
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/instapod"),
            database_pool_size: 16,
            database_timeout_secs: 5,
            session_lookup_connections: 1,
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            redis_timeout_ms: 1000,
            trusted_proxies: Vec::new(),
            session_ttl_hours: 720,
            log_format: LogFormat::Text,
            log_filter: "info".to_string(),
            mail: MailConfig::default(),
            node_join_token: Secret::default(),
            node_heartbeat_interval_secs: 5,
            node_heartbeat_timeout_secs: 20,
            runtime_images: BTreeMap::new(),
            apps_domain: "apps.localhost".to_string(),
            apps_http_port: 80,
            metrics_raw_retention_secs: 2 * 3_600,
            metrics_minute_retention_secs: 25 * 3_600,
            metrics_hour_retention_secs: 31 * 86_400,
            metrics_retention_interval_secs: 60,
            files_max_upload_bytes: 1024 * 1024 * 1024,
            domains: DomainsConfig::default(),
        }
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            smtp_url: Secret::default(),
            from: "Instapod <noreply@instapod.localhost>".to_string(),
            poll_interval_ms: 500,
            max_attempts: 8,
        }
    }
}

/// The shortest join token accepted, so that it cannot be guessed.
pub const MIN_JOIN_TOKEN_CHARS: usize = 16;

/// The longest heartbeat timeout accepted (a day); longer would hide dead nodes for good.
const MAX_HEARTBEAT_TIMEOUT_SECS: u64 = 86_400;

impl Config {
    /// The pod metrics retention, from the four `metrics_*` settings.
    pub fn metrics_retention(&self) -> crate::pods::metrics::Retention {
        crate::pods::metrics::Retention {
            raw_secs: self.metrics_raw_retention_secs,
            minute_secs: self.metrics_minute_retention_secs,
            hour_secs: self.metrics_hour_retention_secs,
            interval: std::time::Duration::from_secs(self.metrics_retention_interval_secs.max(1)),
        }
    }

    /// Checks what serde cannot; returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            problems.push(format!(
                "public_url {:?} must start with http:// or https://",
                self.public_url
            ));
        }
        if self.public_url.ends_with('/') {
            problems.push(format!("public_url {:?} must not end with /", self.public_url));
        }
        if self.database_pool_size == 0 {
            problems.push("database_pool_size must be at least 1".to_string());
        }
        if self.metrics_raw_retention_secs < 3_600 {
            problems.push(
                "metrics_raw_retention_secs must be at least 3600 (the API serves the last hour raw)".to_string(),
            );
        }
        if self.metrics_minute_retention_secs < 86_400 || self.metrics_hour_retention_secs < 30 * 86_400 {
            problems.push(
                "metrics_minute_retention_secs must be at least 86400 and metrics_hour_retention_secs at least 2592000"
                    .to_string(),
            );
        }
        if self.session_lookup_connections == 0 {
            problems.push("session_lookup_connections must be at least 1".to_string());
        }
        if self.files_max_upload_bytes == 0 {
            problems.push("files_max_upload_bytes must be at least 1".to_string());
        }
        if self.session_ttl_hours == 0 {
            problems.push("session_ttl_hours must be at least 1".to_string());
        }
        if self.mail.max_attempts < 1 {
            problems.push("mail.max_attempts must be at least 1".to_string());
        }
        let join_token = self.node_join_token.expose();
        if !join_token.is_empty() && join_token.chars().count() < MIN_JOIN_TOKEN_CHARS {
            problems.push(format!(
                "node_join_token must be empty (joining disabled) or at least {MIN_JOIN_TOKEN_CHARS} characters"
            ));
        }
        if join_token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            problems.push("node_join_token must not contain whitespace or control characters".to_string());
        }
        if self.node_heartbeat_interval_secs == 0 {
            problems.push("node_heartbeat_interval_secs must be at least 1".to_string());
        }
        if self.node_heartbeat_timeout_secs <= self.node_heartbeat_interval_secs {
            problems.push(format!(
                "node_heartbeat_timeout_secs ({}) must be greater than node_heartbeat_interval_secs ({})",
                self.node_heartbeat_timeout_secs, self.node_heartbeat_interval_secs
            ));
        }
        if self.node_heartbeat_timeout_secs > MAX_HEARTBEAT_TIMEOUT_SECS {
            problems.push(format!(
                "node_heartbeat_timeout_secs must be at most {MAX_HEARTBEAT_TIMEOUT_SECS} (a day)"
            ));
        }
        for (runtime, image) in &self.runtime_images {
            if runtime.is_empty() || runtime.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(format!(
                    "runtime_images: runtime id {runtime:?} must be non-empty without whitespace"
                ));
            }
            if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(format!(
                    "runtime_images.{runtime}: image reference {image:?} must be non-empty without whitespace"
                ));
            }
        }
        self.domains.validate(&mut problems);
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// The host name of `public_url` (lowercase, without port), when it has one.
    pub fn public_host(&self) -> Option<String> {
        let rest = self.public_url.split_once("://")?.1;
        let authority = rest.split(['/', '?', '#']).next()?;
        let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
        let host = if let Some(v6) = authority.strip_prefix('[') {
            v6.split(']').next()?
        } else {
            authority.split(':').next()?
        };
        (!host.is_empty()).then(|| host.trim_end_matches('.').to_ascii_lowercase())
    }

    /// Whether users reach us over HTTPS (then cookies are `Secure`).
    pub fn served_over_https(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}

impl DomainsConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if !self.acme_directory_url.starts_with("https://") && !self.acme_directory_url.starts_with("http://") {
            problems.push(format!(
                "domains.acme_directory_url {:?} must be an http(s) URL",
                self.acme_directory_url
            ));
        }
        if !self.key_encryption_key.expose().is_empty()
            && let Err(err) = crate::domains::crypto::KeyEncryptionKey::from_base64(self.key_encryption_key.expose())
        {
            problems.push(format!("domains.key_encryption_key: {err}"));
        }
        for contact in &self.acme_contact {
            let address = contact.strip_prefix("mailto:").unwrap_or(contact);
            if !address.contains('@') || address.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(format!("domains.acme_contact: {contact:?} is not an e-mail address"));
            }
        }
        if self.reverify_interval_secs == 0 {
            problems.push("domains.reverify_interval_secs must be at least 1".to_string());
        }
        if self.retry_min_secs == 0 || self.retry_max_secs < self.retry_min_secs {
            problems.push("domains.retry_min_secs must be at least 1 and at most domains.retry_max_secs".to_string());
        }
        if self.worker_interval_secs == 0 {
            problems.push("domains.worker_interval_secs must be at least 1".to_string());
        }
    }

    /// The contact URLs for a new ACME account (`mailto:` added where missing).
    pub fn acme_contact_urls(&self) -> Vec<String> {
        self.acme_contact
            .iter()
            .map(|c| {
                if c.starts_with("mailto:") {
                    c.clone()
                } else {
                    format!("mailto:{c}")
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(config: Config, expected_problem: Option<&str>) {
        match (config.validate(), expected_problem) {
            (Ok(()), None) => {}
            (Err(problems), Some(expected)) => assert!(
                problems.iter().any(|problem| problem.contains(expected)),
                "expected a problem containing {expected:?}, got {problems:?}"
            ),
            (outcome, expected) => panic!("expected {expected:?}, got {outcome:?}"),
        }
    }

    #[test]
    fn node_settings_are_validated() {
        check(Config::default(), None);
        check(
            Config {
                node_join_token: Secret::new("a-long-enough-join-token"),
                ..Config::default()
            },
            None,
        );
        check(
            Config {
                node_join_token: Secret::new("short"),
                ..Config::default()
            },
            Some("at least 16 characters"),
        );
        check(
            Config {
                node_join_token: Secret::new("a long enough join token"),
                ..Config::default()
            },
            Some("whitespace"),
        );
        check(
            Config {
                node_heartbeat_interval_secs: 5,
                node_heartbeat_timeout_secs: 5,
                ..Config::default()
            },
            Some("must be greater than node_heartbeat_interval_secs"),
        );
        check(
            Config {
                node_heartbeat_interval_secs: 0,
                ..Config::default()
            },
            Some("node_heartbeat_interval_secs must be at least 1"),
        );
        check(
            Config {
                runtime_images: BTreeMap::from([("static".to_string(), String::new())]),
                ..Config::default()
            },
            Some("runtime_images.static"),
        );
    }

    #[test]
    fn domain_settings_are_validated() {
        let with = |domains: DomainsConfig| Config {
            domains,
            ..Config::default()
        };
        check(
            with(DomainsConfig {
                key_encryption_key: Secret::new("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="),
                acme_contact: vec!["ops@example.com".into(), "mailto:sec@example.com".into()],
                ..DomainsConfig::default()
            }),
            None,
        );
        check(
            with(DomainsConfig {
                key_encryption_key: Secret::new("c2hvcnQ="),
                ..DomainsConfig::default()
            }),
            Some("domains.key_encryption_key: must be 32 bytes"),
        );
        check(
            with(DomainsConfig {
                acme_contact: vec!["not an address".into()],
                ..DomainsConfig::default()
            }),
            Some("domains.acme_contact"),
        );
        check(
            with(DomainsConfig {
                retry_min_secs: 600,
                retry_max_secs: 60,
                ..DomainsConfig::default()
            }),
            Some("domains.retry_min_secs"),
        );
        let contacts = DomainsConfig {
            acme_contact: vec!["ops@example.com".into(), "mailto:sec@example.com".into()],
            ..DomainsConfig::default()
        }
        .acme_contact_urls();
        assert_eq!(contacts, vec!["mailto:ops@example.com", "mailto:sec@example.com"]);
    }

    #[test]
    fn the_public_host_is_read_from_the_public_url() {
        let host = |url: &str| {
            Config {
                public_url: url.to_string(),
                ..Config::default()
            }
            .public_host()
        };
        assert_eq!(host("https://Console.Example.com"), Some("console.example.com".into()));
        assert_eq!(host("http://127.0.0.1:8080"), Some("127.0.0.1".into()));
        assert_eq!(host("https://[2001:db8::1]:443/x"), Some("2001:db8::1".into()));
        assert_eq!(host("https://user@host.example:8443/path"), Some("host.example".into()));
    }
}
