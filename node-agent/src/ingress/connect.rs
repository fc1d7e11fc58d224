//! Connections to the pods of this node: a connect that has not completed within a short
//! timeout is abandoned and tried again, with the timeout doubling, instead of waiting for the
//! kernel's own SYN retransmission one second later.
//!
//! *Why.* A pod on this node is reached over its veth pair: the SYN, the pod's SYN-ACK and the
//! handshake's end are all delivered within the `connect` call's own softirq, so a connect
//! either completes within microseconds or its SYN was dropped. The pod's kernel drops a SYN
//! when the listening socket's accept queue is full — a server with a small `listen` backlog
//! (busybox `httpd` asks for 9) that forks per connection fills it whenever a burst of
//! connections outruns its `accept` loop. The kernel retransmits a dropped SYN after its
//! initial RTO of one second (RFC 6298's conservative default for a path it knows nothing
//! about), and a request through the ingress stalled that long. The first attempt here waits
//! [`FIRST_ATTEMPT`], then each retry twice as long, until [`CONNECT_TIMEOUT`] in all; a
//! refused or unreachable connect fails at once as before. An abandoned attempt's socket is
//! closed while still in `SYN_SENT`: nothing reaches the pod, or, if its SYN-ACK comes after
//! all, the pod's connection is reset before the pod has read from it.
//!
//! Connections to other nodes' ingresses keep a single attempt (their path may be long; the
//! kernel's retransmission is right there). Retries are counted in
//! `instapod_node_agent_ingress_connect_retries_total`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// All attempts of one connect together: a pod that does not accept a connection within this
/// time is reported as not answering.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The first attempt's timeout for a pod of this node: a thousand times a connect's usual time
/// over a veth, a tenth of the kernel's SYN retransmission.
pub const FIRST_ATTEMPT: Duration = Duration::from_millis(100);

const RETRIES: &str = "instapod_node_agent_ingress_connect_retries_total";

/// Shows the retry counter from the start (at zero).
pub fn register_metrics() {
    metrics::counter!(RETRIES).increment(0);
}

/// The ingress's connector: hyper-util's, with the retry schedule above for pods of this node.
#[derive(Debug, Clone)]
pub struct UpstreamConnector {
    inner: HttpConnector,
    /// The first attempt's timeout ([`CONNECT_TIMEOUT`]: a single attempt).
    first_attempt: Duration,
}

impl UpstreamConnector {
    /// For pods of this node: attempts of [`FIRST_ATTEMPT`], doubling.
    pub fn to_pods() -> UpstreamConnector {
        UpstreamConnector::with_first_attempt(FIRST_ATTEMPT)
    }

    /// For other nodes' ingresses: one attempt.
    pub fn to_nodes() -> UpstreamConnector {
        UpstreamConnector::with_first_attempt(CONNECT_TIMEOUT)
    }

    fn with_first_attempt(first_attempt: Duration) -> UpstreamConnector {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        // The timeouts are this connector's; hyper-util's would apply to every attempt.
        inner.set_connect_timeout(None);
        UpstreamConnector { inner, first_attempt }
    }

    /// Connects to `uri`'s address: returns the stream and the number of attempts it took.
    pub async fn connect(mut self, uri: Uri) -> Result<(TokioIo<TcpStream>, u32), ConnectFailed> {
        use tower_service::Service;
        let mut attempt_timeout = self.first_attempt;
        let mut left = CONNECT_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let timeout = attempt_timeout.min(left);
            match tokio::time::timeout(timeout, self.inner.call(uri.clone())).await {
                Ok(Ok(stream)) => return Ok((stream, attempts)),
                Ok(Err(err)) => return Err(ConnectFailed::Error(err.into())),
                Err(_) => {
                    left = left.saturating_sub(timeout);
                    if left.is_zero() {
                        return Err(ConnectFailed::TimedOut { attempts });
                    }
                    metrics::counter!(RETRIES).increment(1);
                    tracing::debug!(%uri, attempts, ?timeout, "connect did not complete; trying again");
                    attempt_timeout *= 2;
                }
            }
        }
    }
}

/// Why a connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailed {
    #[error(transparent)]
    Error(Box<dyn std::error::Error + Send + Sync>),
    #[error("connect timed out after {CONNECT_TIMEOUT:?} ({attempts} attempts)")]
    TimedOut { attempts: u32 },
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectFailed;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // hyper-util's connector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move { connector.connect(uri).await.map(|(stream, _)| stream) })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A listener on loopback whose accept queue is full: its next SYN is dropped. Returns the
    /// listener, its address and the connections that fill its queue.
    pub(crate) async fn full_listener() -> (tokio::net::TcpListener, std::net::SocketAddr, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(([127, 0, 0, 1], 0).into()).expect("bind");
        // Backlog 0: the kernel queues one connection (it is full when more than the backlog).
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("address");
        let mut queued = Vec::new();
        // Bounded: a backlog of 0 holds one or two; 20 ms is a hundred times a loopback connect.
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(20), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(err)) => panic!("connect: {err}"),
                Err(_) => return (listener, addr, queued),
            }
        }
        panic!("the accept queue did not fill after {} connections", queued.len());
    }

    fn uri(addr: std::net::SocketAddr) -> Uri {
        format!("http://{addr}/").parse().expect("a URI")
    }

    #[tokio::test]
    async fn a_dropped_syn_is_retried_before_the_kernel_would() {
        let (listener, addr, queued) = full_listener().await;
        assert!(!queued.is_empty());
        // The server catches up 250 ms later: the attempt of 100 ms and part of the one of
        // 200 ms are lost to the full queue; the kernel's own retransmission comes at 1 s.
        let drain = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let mut accepted = Vec::new();
            // Bounded: the queued connections and the connector's.
            for _ in 0..queued.len() + 1 {
                let next = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()).await;
                accepted.push(
                    next.expect("a connection within the connect timeout")
                        .expect("accept")
                        .0,
                );
            }
            (accepted, queued)
        });
        let started = std::time::Instant::now();
        let (stream, attempts) = UpstreamConnector::to_pods().connect(uri(addr)).await.expect("connects");
        let took = started.elapsed();
        assert!(attempts >= 2, "one attempt: the queue was not full ({took:?})");
        assert!(
            took < Duration::from_millis(900),
            "took {took:?}: the kernel's retransmission, not a retry"
        );
        let (accepted, _queued) = drain.await.expect("drain");
        let local = stream.inner().local_addr().expect("local address");
        assert!(
            accepted.iter().any(|s| s.peer_addr().ok() == Some(local)),
            "the server accepted the connector's connection"
        );
    }

    #[tokio::test]
    async fn a_node_connect_is_one_attempt_and_a_refusal_fails_at_once() {
        let (listener, addr, _queued) = full_listener().await;
        // To another node: no retry, so the kernel's retransmission (1 s) is what completes it.
        let node = tokio::spawn(UpstreamConnector::to_nodes().connect(uri(addr)));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let _first = listener.accept().await.expect("accept");
        let (_, attempts) = node.await.expect("task").expect("connects");
        assert_eq!(attempts, 1);

        // A refused connect is an error at the first attempt (502 upstream), not retried.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address")
        };
        let err = UpstreamConnector::to_pods()
            .connect(uri(closed))
            .await
            .expect_err("refused");
        assert!(matches!(err, ConnectFailed::Error(_)), "{err}");
    }
}
