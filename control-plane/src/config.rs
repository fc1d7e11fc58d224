//! The control plane's configuration: one struct, read from a TOML file (`--config` or
//! `INSTAPOD_CONFIG`) with `INSTAPOD_*` environment overrides (`INSTAPOD_MAIL__SMTP_URL` sets
//! `mail.smtp_url`). Every field has a default that suits the local stack.

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

impl Config {
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
        if self.session_lookup_connections == 0 {
            problems.push("session_lookup_connections must be at least 1".to_string());
        }
        if self.session_ttl_hours == 0 {
            problems.push("session_ttl_hours must be at least 1".to_string());
        }
        if self.mail.max_attempts < 1 {
            problems.push("mail.max_attempts must be at least 1".to_string());
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Whether users reach us over HTTPS (then cookies are `Secure`).
    pub fn served_over_https(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}
