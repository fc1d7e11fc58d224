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
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Whether users reach us over HTTPS (then cookies are `Secure`).
    pub fn served_over_https(&self) -> bool {
        self.public_url.starts_with("https://")
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
}
