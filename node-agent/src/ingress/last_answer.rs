//! The end of a connection's last answer, as the ingress tells the client's stream.
//!
//! *Why.* A client that sends `Connection: close` (every request of a client that opens a
//! connection per request) gets its answer and then the end of the connection. Written the way
//! hyper asks for it — flush the answer, then shut the stream down — over TLS that is three
//! segments and three wake-ups of the client: the answer's records, the `close_notify` alert,
//! the FIN. [`LastAnswer`] tells the TLS stream (`domains::tls_stream`) that the answer it is
//! flushing is the connection's last, whole, so it sends answer, `close_notify` and FIN as one.
//!
//! *Invariants.* [`LastAnswer`] is marked only for a request whose client asked to close
//! ([`closes`], the same rule hyper applies, so hyper shuts the connection down after it), and
//! only when the body's final frame has been handed to hyper — the body reports its end
//! together with that frame, and hyper buffers it before its next flush — so the flush that sees
//! the mark holds all of the answer. A body that ends without a final data frame (an empty or
//! chunked one, whose terminator hyper writes later) never marks it: the connection ends the
//! ordinary way.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap};
use hyper::{Request, Version};

/// Set once the last answer of a connection has been handed to hyper in full.
#[derive(Debug, Default)]
pub struct LastAnswer(AtomicBool);

impl LastAnswer {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_marked(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Whether the client asked to close the connection after this request: `Connection: close`,
/// or HTTP/1.0 without `Connection: keep-alive`.
pub fn closes<B>(request: &Request<B>) -> bool {
    let has = |token: &str| connection_has(request.headers(), token);
    match request.version() {
        Version::HTTP_10 => !has("keep-alive"),
        _ => has("close"),
    }
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// A response body that marks `last` when it yields its final data frame.
#[derive(Debug)]
pub struct MarksEnd<B> {
    inner: B,
    last: Option<Arc<LastAnswer>>,
}

impl<B> MarksEnd<B> {
    /// `body`, marking `last` at its end (`None`: the answer is not the connection's last, or
    /// the stream has no use for the mark).
    pub fn new(body: B, last: Option<Arc<LastAnswer>>) -> MarksEnd<B> {
        MarksEnd { inner: body, last }
    }
}

impl<B: Body + Unpin> Body for MarksEnd<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && frame.is_data()
            && self.inner.is_end_stream()
            && let Some(last) = self.last.take()
        {
            last.mark();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn request(version: Version, connection: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().version(version);
        if let Some(value) = connection {
            builder = builder.header(header::CONNECTION, value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn a_client_closes_with_connection_close_or_plain_http_1_0() {
        assert!(closes(&request(Version::HTTP_11, Some("close"))));
        assert!(closes(&request(Version::HTTP_11, Some("Upgrade, CLOSE"))));
        assert!(!closes(&request(Version::HTTP_11, None)));
        assert!(!closes(&request(Version::HTTP_11, Some("keep-alive"))));
        assert!(!closes(&request(Version::HTTP_11, Some("closed"))));
        assert!(closes(&request(Version::HTTP_10, None)));
        assert!(!closes(&request(Version::HTTP_10, Some("Keep-Alive"))));
    }

    #[tokio::test]
    async fn the_mark_comes_with_the_final_data_frame_and_not_before() {
        let last = Arc::new(LastAnswer::default());
        let mut body = MarksEnd::new(Full::new(Bytes::from_static(b"hello")), Some(last.clone()));
        assert!(!last.is_marked());
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "hello");
        assert!(last.is_marked(), "marked with the frame that ends the body");

        // A streamed body that cannot tell its end with its last frame (chunked) never marks.
        let last = Arc::new(LastAnswer::default());
        let frames =
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"a")))]);
        let mut body = MarksEnd::new(StreamBody::new(frames), Some(last.clone()));
        body.frame().await.expect("a frame").expect("data");
        assert!(body.frame().await.is_none());
        assert!(!last.is_marked());

        // An empty body has no final frame to carry the mark.
        let last = Arc::new(LastAnswer::default());
        let mut body = MarksEnd::new(http_body_util::Empty::<Bytes>::new(), Some(last.clone()));
        assert!(body.frame().await.is_none());
        assert!(!last.is_marked());
    }
}
