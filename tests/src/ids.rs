//! Unique names for parallel tests: emails, slugs, passwords and fake client IP addresses.
//!
//! Tests in one binary share a Postgres cluster, a Redis server and often a rate-limit key
//! space, so every value that could collide is drawn from a random UUID.

use uuid::Uuid;

/// Sixteen random bytes.
fn random_bytes() -> [u8; 16] {
    *Uuid::new_v4().as_bytes()
}

/// A short random lowercase hex string (12 characters, 48 bits).
pub fn random_suffix() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// A fresh email address such as `alice-3f2a9c0d1e2b@example.test`.
pub fn unique_email(label: &str) -> String {
    format!("{label}-{}@example.test", random_suffix())
}

/// A fresh team slug that satisfies the slug rule (`[a-z0-9-]`, 3–30 characters).
pub fn unique_slug(label: &str) -> String {
    let mut slug = format!("{label}-{}", random_suffix());
    slug.truncate(30);
    slug
}

/// A password of the given length, unique to this call.
pub fn password_of_len(len: usize) -> String {
    let seed = Uuid::new_v4().simple().to_string();
    seed.chars().cycle().take(len).collect()
}

/// A random private IPv4 address in 10.0.0.0/8, used only as an `X-Forwarded-For` value so
/// that each test has its own rate-limit buckets. No traffic is ever sent to it.
pub fn random_client_ip() -> String {
    let bytes = random_bytes();
    format!("10.{}.{}.{}", bytes[0], bytes[1], bytes[2].max(1))
}
