//! Failed SSH authentications per source IP: after `max_failures` within `window`, further
//! attempts from that IP are refused for `block` without asking the control plane.
//!
//! *Bounded memory.* At most [`MAX_TRACKED`] addresses are remembered; when full, expired
//! entries are dropped first, then the unblocked entry with the oldest window (an attacker
//! spraying addresses can neither grow the map nor clear a block).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most source addresses tracked at once.
pub const MAX_TRACKED: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

/// The limiter (shared by every connection of the gateway).
#[derive(Debug)]
pub struct AuthLimiter {
    max_failures: u32,
    window: Duration,
    block: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl AuthLimiter {
    pub fn new(max_failures: u32, window: Duration, block: Duration) -> AuthLimiter {
        AuthLimiter {
            max_failures: max_failures.max(1),
            window,
            block,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Whether attempts from `ip` are refused at `now`.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&ip)
            .and_then(|entry| entry.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Counts a failed authentication from `ip`; returns whether `ip` is now blocked.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !entries.contains_key(&ip) && entries.len() >= MAX_TRACKED {
            self.evict(&mut entries, now);
        }
        let entry = entries.entry(ip).or_insert(Entry {
            window_start: now,
            failures: 0,
            blocked_until: None,
        });
        if entry.blocked_until.is_some_and(|until| now >= until) {
            entry.blocked_until = None;
            entry.failures = 0;
            entry.window_start = now;
        }
        if now.duration_since(entry.window_start) >= self.window {
            entry.window_start = now;
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures >= self.max_failures && entry.blocked_until.is_none() {
            entry.blocked_until = Some(now + self.block);
        }
        entry.blocked_until.is_some()
    }

    fn evict(&self, entries: &mut HashMap<IpAddr, Entry>, now: Instant) {
        entries.retain(|_, entry| match entry.blocked_until {
            Some(until) => now < until,
            None => now.duration_since(entry.window_start) < self.window,
        });
        if entries.len() >= MAX_TRACKED
            && let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, entry)| (entry.blocked_until.is_some(), entry.window_start))
                .map(|(ip, _)| *ip)
        {
            entries.remove(&oldest);
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn blocks_after_max_failures_within_the_window_then_forgives() {
        let limiter = AuthLimiter::new(3, Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        assert!(!limiter.record_failure(ip(1), t0));
        assert!(!limiter.record_failure(ip(1), t0 + Duration::from_secs(1)));
        assert!(!limiter.is_blocked(ip(1), t0 + Duration::from_secs(2)));
        assert!(limiter.record_failure(ip(1), t0 + Duration::from_secs(2)));
        assert!(limiter.is_blocked(ip(1), t0 + Duration::from_secs(3)));
        assert!(!limiter.is_blocked(ip(2), t0 + Duration::from_secs(3)), "per address");
        assert!(limiter.is_blocked(ip(1), t0 + Duration::from_secs(301)));
        assert!(!limiter.is_blocked(ip(1), t0 + Duration::from_secs(303)));
        // After the block, the count starts again.
        assert!(!limiter.record_failure(ip(1), t0 + Duration::from_secs(310)));
    }

    #[test]
    fn failures_spread_over_windows_do_not_block() {
        let limiter = AuthLimiter::new(3, Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        for minute in 0..10 {
            let at = t0 + Duration::from_secs(61 * minute);
            assert!(!limiter.record_failure(ip(1), at));
            assert!(!limiter.record_failure(ip(1), at + Duration::from_secs(1)));
        }
    }

    #[test]
    fn memory_is_bounded() {
        let limiter = AuthLimiter::new(3, Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.record_failure(ip(0), t0);
        }
        for n in 1..(MAX_TRACKED as u32 + 500) {
            limiter.record_failure(ip(n), t0 + Duration::from_millis(u64::from(n)));
        }
        assert!(limiter.tracked() <= MAX_TRACKED);
        assert!(
            limiter.is_blocked(ip(0), t0 + Duration::from_secs(30)),
            "a block survives a spray"
        );
    }
}
