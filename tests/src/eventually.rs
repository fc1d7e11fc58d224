//! Waiting for a condition instead of sleeping for a fixed time.

use std::future::Future;
use std::time::Duration;

/// How long to pause between two checks.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` until it returns `Ok`, and returns that value. Panics with `what` and the last
/// error when `timeout` passes first.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let error = match check().await {
            Ok(value) => return value,
            Err(error) => error,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}: {error:#}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
