//! instant-acme's HTTP client, on reqwest, keeping the CA's `Retry-After`.
//!
//! instant-acme parses an error answer into a problem document and drops the response, so its
//! own client cannot tell how long a rate limit lasts. [`AcmeHttp`] sends its requests with
//! reqwest (the system's web roots, plus the configured extra root such as Pebble's) and, on an
//! answer `429 Too Many Requests` or `503 Service Unavailable` that carries `Retry-After`
//! (seconds or an HTTP date), keeps that moment in a [`RetryAfter`] shared by every account
//! client of the node. [`RetryAfter::take_fresh`] then tells the failure report how long the CA
//! asked to wait.
//!
//! *Limitations.* One slot per node, not per order: two orders failing at the same moment share
//! the later `Retry-After` (a CA's rate limits are per account anyway). A value older than
//! [`FRESH_FOR`] is ignored.

use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::RETRY_AFTER;
use hyper::{Request, Response, StatusCode};
use instant_acme::{BodyWrapper, BytesBody, BytesResponse, HttpClient};

/// A `Retry-After` seen longer ago than this belongs to an earlier failure.
pub const FRESH_FOR: Duration = Duration::from_secs(60);
/// How long one request to the CA may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The last `Retry-After` the CA sent with a 429 or 503: when it was seen, and until when.
#[derive(Debug, Default)]
pub struct RetryAfter(Mutex<Option<(Instant, SystemTime)>>);

impl RetryAfter {
    fn set(&self, until: SystemTime) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), until));
    }

    /// The seconds still to wait, when the CA asked within [`FRESH_FOR`]; clears the slot.
    pub fn take_fresh(&self) -> Option<u64> {
        let (seen, until) = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        if seen.elapsed() > FRESH_FOR {
            return None;
        }
        let left = until.duration_since(SystemTime::now()).unwrap_or_default();
        Some(left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return SystemTime::now().checked_add(Duration::from_secs(seconds));
    }
    httpdate::parse_http_date(value).ok()
}

/// instant-acme's HTTP client (see the module documentation).
#[derive(Debug, Clone)]
pub struct AcmeHttp {
    client: reqwest::Client,
    retry_after: Arc<RetryAfter>,
}

impl AcmeHttp {
    /// A client trusting the web's roots and, when given, the PEM root in `ca_file`.
    pub fn new(ca_file: Option<&Path>, retry_after: Arc<RetryAfter>) -> Result<AcmeHttp, instant_acme::Error> {
        let other = |err: Box<dyn StdError + Send + Sync>| instant_acme::Error::Other(err);
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|err| other(format!("{}: {err}", path.display()).into()))?;
            let root = reqwest::Certificate::from_pem(&pem).map_err(|err| other(err.into()))?;
            builder = builder.add_root_certificate(root);
        }
        let client = builder.build().map_err(|err| other(err.into()))?;
        Ok(AcmeHttp { client, retry_after })
    }

    async fn send(self, request: Request<BodyWrapper<Bytes>>) -> Result<BytesResponse, instant_acme::Error> {
        let (parts, body) = request.into_parts();
        let Ok(body) = body.collect().await;
        let body = body.to_bytes();
        let answer = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|err| instant_acme::Error::Other(err.into()))?;
        let status = answer.status();
        if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
            && let Some(until) = answer
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(parse_retry_after)
        {
            self.retry_after.set(until);
        }
        let mut head = Response::new(());
        *head.status_mut() = status;
        *head.version_mut() = answer.version();
        *head.headers_mut() = answer.headers().clone();
        let bytes = answer
            .bytes()
            .await
            .map_err(|err| instant_acme::Error::Other(err.into()))?;
        Ok(BytesResponse {
            parts: head.into_parts().0,
            body: Box::new(Collected(Some(bytes))),
        })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        request: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        Box::pin(self.clone().send(request))
    }
}

/// A body already read.
struct Collected(Option<Bytes>);

impl BytesBody for Collected {
    fn into_bytes<'body, 'future>(
        &'body mut self,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, Box<dyn StdError + Send + Sync + 'static>>> + Send + 'future>>
    where
        'body: 'future,
        Self: 'future,
    {
        let bytes = self.0.take().unwrap_or_default();
        Box::pin(async move { Ok(bytes) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::now();
        let in_an_hour = parse_retry_after(" 3600 ").expect("seconds");
        let ahead = in_an_hour.duration_since(now).expect("ahead");
        assert!((3599..=3601).contains(&ahead.as_secs()), "{ahead:?}");
        let date = parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT").expect("an HTTP date");
        assert_eq!(
            date.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
            784_111_777
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn a_retry_after_is_taken_once_and_only_while_fresh() {
        let slot = RetryAfter::default();
        assert_eq!(slot.take_fresh(), None);
        slot.set(SystemTime::now() + Duration::from_secs(120));
        let left = slot.take_fresh().expect("fresh");
        assert!((119..=120).contains(&left), "{left}");
        assert_eq!(slot.take_fresh(), None, "taken");
        // A moment already past: nothing left to wait.
        slot.set(SystemTime::now() - Duration::from_secs(5));
        assert_eq!(slot.take_fresh(), Some(0));
        // Seen long ago: stale.
        *slot.0.lock().expect("lock") = Some((
            Instant::now()
                .checked_sub(FRESH_FOR + Duration::from_secs(1))
                .expect("a minute of uptime"),
            SystemTime::now() + Duration::from_secs(600),
        ));
        assert_eq!(slot.take_fresh(), None);
    }
}
