//! The body of a pod's answer as the ingress forwards it: streamed, with its first frame read
//! ahead when the answer is small.
//!
//! *Why.* hyper writes an answer's head as soon as the handler returns it and its body as the
//! frames arrive from the upstream connection's task, which is a moment later even when the pod
//! sent both in one segment: two writes, two TCP segments (two TLS records) and two wake-ups of
//! the client for a 12-byte page. [`UpstreamBody::read_ahead`] waits, briefly, for the first
//! frame of an answer whose `Content-Length` is small, so that head and body leave in one write.
//!
//! *Invariants.* Nothing is buffered beyond that one frame (the rest streams as before); the
//! wait is bounded by [`READ_AHEAD_WAIT`] (a pod that sends its head and then stalls gets its
//! head forwarded after that, and the frame streams when it comes); answers without a length
//! (chunked, server-sent events) or larger than [`READ_AHEAD_MAX`] are not waited for at all.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_LENGTH, HeaderMap};

/// Answers up to this length have their first frame read ahead.
pub const READ_AHEAD_MAX: u64 = 64 * 1024;
/// The longest the ingress waits for that frame before forwarding the head alone.
pub const READ_AHEAD_WAIT: Duration = Duration::from_millis(100);

/// A pod's answer body: an optional first frame already read, then the rest of the stream.
#[derive(Debug)]
pub struct UpstreamBody {
    first: Option<Frame<Bytes>>,
    rest: Incoming,
}

impl UpstreamBody {
    /// Streams `body` as it comes.
    pub fn streamed(body: Incoming) -> UpstreamBody {
        UpstreamBody {
            first: None,
            rest: body,
        }
    }

    /// Reads the first frame of `body` ahead when `headers` give it a length of 1 to
    /// [`READ_AHEAD_MAX`] bytes, waiting at most [`READ_AHEAD_WAIT`]. An error reading that
    /// frame is the upstream's, and nothing has been sent to the client yet: the ingress
    /// answers 502 (without the read-ahead the client could get the head and then a cut
    /// connection, or nothing at all).
    pub async fn read_ahead(headers: &HeaderMap, mut body: Incoming) -> Result<UpstreamBody, hyper::Error> {
        let small = headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
            .is_some_and(|length| (1..=READ_AHEAD_MAX).contains(&length));
        if !small || body.is_end_stream() {
            return Ok(UpstreamBody::streamed(body));
        }
        let first = {
            let mut next = std::pin::pin!(body.frame());
            // Usually the frame is already in: no timer is set then. Cancelling `frame()` on
            // timeout consumes nothing: the frame streams later.
            match next.as_mut().now_or_never() {
                Some(first) => first,
                None => tokio::time::timeout(READ_AHEAD_WAIT, next).await.ok().flatten(),
            }
        };
        match first {
            Some(Ok(frame)) => Ok(UpstreamBody {
                first: Some(frame),
                rest: body,
            }),
            Some(Err(err)) => Err(err),
            None => Ok(UpstreamBody::streamed(body)),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |data| data.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}
