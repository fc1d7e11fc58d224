//! Per-client-IP rate limits, counted in Redis so they hold across control-plane replicas.
//!
//! *Design.* A sliding window log: one sorted set per (rule, IP) holding the timestamps of the
//! requests inside the window, maintained by a Lua script that runs atomically in Redis and
//! reads Redis's own clock, so replicas with skewed clocks agree. A request over the limit is
//! not recorded, and the answer says when the oldest counted request leaves the window
//! (`Retry-After`).
//!
//! *Failure.* When Redis cannot be reached within the configured timeout the limiter answers
//! [`RateLimitError::Unavailable`]: callers fail closed (503) instead of going unlimited.

use std::net::IpAddr;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::Config;

/// A limit from the spec's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Short, fixed name used in the Redis key (never user data).
    pub name: &'static str,
    pub max_requests: u32,
    pub window: Duration,
}

pub const LOGIN: Rule = Rule {
    name: "login",
    max_requests: 5,
    window: Duration::from_secs(60),
};
pub const REGISTER: Rule = Rule {
    name: "register",
    max_requests: 3,
    window: Duration::from_secs(60),
};
pub const FORGOT_PASSWORD: Rule = Rule {
    name: "forgot_password",
    max_requests: 3,
    window: Duration::from_secs(60),
};
pub const CREATE_POD: Rule = Rule {
    name: "create_pod",
    max_requests: 50,
    window: Duration::from_secs(3600),
};

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate limit exceeded, retry after {retry_after_secs} s")]
    Limited { retry_after_secs: u64 },
    #[error("rate limiter unavailable: {0}")]
    Unavailable(String),
}

/// Adds the request if the window has room. Returns 0 when allowed, else the milliseconds until
/// a slot frees up. KEYS[1] = the set; ARGV = limit, window in ms, a unique member suffix.
const SCRIPT: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, now .. '-' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return wait
";

/// The address a client is counted under: IPv4 addresses as they are, IPv6 addresses by their
/// /64 prefix, since one subscriber usually holds a whole /64 and could rotate through it.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// The Redis-backed limiter; cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    connection: ConnectionManager,
    script: std::sync::Arc<redis::Script>,
    timeout: Duration,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Connects lazily: the control plane starts while Redis is down and recovers when it
    /// returns.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        let client = redis::Client::open(config.redis_url.expose())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(RateLimiter {
            connection,
            script: std::sync::Arc::new(redis::Script::new(SCRIPT)),
            timeout,
        })
    }

    /// Counts one request of `ip` against `rule`.
    pub async fn check(&self, rule: Rule, ip: IpAddr) -> Result<(), RateLimitError> {
        let key = format!("instapod:ratelimit:{}:{}", rule.name, bucket(ip));
        let member: u64 = rand::random();
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(key);
        invocation
            .arg(rule.max_requests)
            .arg(u64::try_from(rule.window.as_millis()).unwrap_or(u64::MAX))
            .arg(member);
        let wait_ms: u64 = tokio::time::timeout(self.timeout * 2, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| RateLimitError::Unavailable("redis did not answer in time".to_string()))?
            .map_err(|err| RateLimitError::Unavailable(err.to_string()))?;
        if wait_ms == 0 {
            Ok(())
        } else {
            Err(RateLimitError::Limited {
                retry_after_secs: wait_ms.div_ceil(1000),
            })
        }
    }

    /// Whether Redis answers a PING (for `/readyz`).
    pub async fn ping(&self) -> Result<(), String> {
        let mut connection = self.connection.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(self.timeout * 2, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("redis did not answer in time".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        for (ip, expected) in [
            ("192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(bucket(ip), expected.parse::<IpAddr>().expect("ip"), "{ip}");
        }
    }
}
