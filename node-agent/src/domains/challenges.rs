//! The HTTP-01 challenges of this node's ACME orders in flight: token → key authorization,
//! answered by the ingress at `/.well-known/acme-challenge/<token>` on any host.
//!
//! *Invariants.* Only tokens of orders this node placed are answered (an order adds its tokens
//! and the [`ChallengeGuard`] removes them when the order ends, whatever its outcome), so the
//! ingress never vouches for a domain it is not ordering a certificate for. A token is answered
//! only while its entry is younger than [`MAX_AGE`], even if a guard were leaked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest an order keeps its tokens answered.
pub const MAX_AGE: Duration = Duration::from_secs(15 * 60);

/// The tokens answered now.
#[derive(Debug, Default)]
pub struct ChallengeStore {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    key_authorization: String,
    hostname: String,
    added: Instant,
}

/// Removes its tokens from the store when dropped (the order ended).
#[derive(Debug)]
pub struct ChallengeGuard {
    store: Arc<ChallengeStore>,
    tokens: Vec<String>,
}

impl ChallengeGuard {
    /// Answers `token` with `key_authorization` until this guard is dropped.
    pub fn add(&mut self, token: &str, key_authorization: &str, hostname: &str) {
        if !is_token(token) {
            tracing::warn!(
                hostname,
                "an ACME challenge token with unexpected characters was ignored"
            );
            return;
        }
        self.store.lock().insert(
            token.to_string(),
            Entry {
                key_authorization: key_authorization.to_string(),
                hostname: hostname.to_string(),
                added: Instant::now(),
            },
        );
        self.tokens.push(token.to_string());
    }
}

impl Drop for ChallengeGuard {
    fn drop(&mut self) {
        let mut entries = self.store.lock();
        for token in &self.tokens {
            entries.remove(token);
        }
    }
}

impl ChallengeStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guard for one order's tokens.
    pub fn order(self: &Arc<Self>) -> ChallengeGuard {
        ChallengeGuard {
            store: self.clone(),
            tokens: Vec::new(),
        }
    }

    /// The key authorization to answer for `token`, while its order is in flight.
    pub fn key_authorization(&self, token: &str) -> Option<String> {
        let entries = self.lock();
        let entry = entries.get(token)?;
        if entry.added.elapsed() > MAX_AGE {
            return None;
        }
        tracing::debug!(hostname = %entry.hostname, "answering an ACME HTTP-01 challenge");
        Some(entry.key_authorization.clone())
    }

    /// Tokens answered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// ACME tokens are base64url (RFC 8555 §8.3).
fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_answered_only_while_their_order_runs() {
        let store = Arc::new(ChallengeStore::default());
        assert_eq!(store.key_authorization("tok-1"), None);
        {
            let mut order = store.order();
            order.add("tok-1", "tok-1.thumbprint", "shop.example.com");
            order.add("tok_2", "tok_2.thumbprint", "www.example.com");
            // Not a token: never stored, so a path like this can never be answered.
            order.add("../etc/passwd", "x", "evil.example.com");
            assert_eq!(store.key_authorization("tok-1").as_deref(), Some("tok-1.thumbprint"));
            assert_eq!(store.key_authorization("tok_2").as_deref(), Some("tok_2.thumbprint"));
            assert_eq!(store.key_authorization("../etc/passwd"), None);
            assert_eq!(store.key_authorization("unknown"), None);
            assert_eq!(store.len(), 2);

            // A second order's guard does not remove the first one's tokens.
            let mut other = store.order();
            other.add("tok-3", "tok-3.thumbprint", "other.example.com");
            drop(other);
            assert_eq!(store.key_authorization("tok-3"), None);
            assert_eq!(store.key_authorization("tok-1").as_deref(), Some("tok-1.thumbprint"));
        }
        assert!(store.is_empty());
        assert_eq!(store.key_authorization("tok-1"), None);
    }
}
