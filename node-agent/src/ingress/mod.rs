//! The node's HTTP ingress: a reverse proxy on `ingress_listen` (`0.0.0.0:80` in production)
//! that sends each request to the pod whose host names include the request's `Host`.
//!
//! Code map: [`body`] (a pod's answer body, its first frame read ahead when small) ·
//! [`last_answer`] (the mark that a closing connection's last answer is in hyper's hands) ·
//! [`connect`] (upstream connects: to this node's pods, a dropped SYN retried after 100 ms,
//! doubling, rather than after the kernel's one second) ·
//! [`routes`] (the routing table, host normalisation, the [`RouteSource`] seam,
//! [`LocalRoutes`] built from the pod manager's records, [`RemoteRoutes`] from the control
//! plane, [`FleetRoutes`] merging both, and [`FixedRoutes`], a given table for tests) · [`feed`] (the worker that keeps [`RemoteRoutes`]
//! current) · [`proxy`] (connections, forwarding, headers, upgrades, metrics) · [`pages`] (the
//! 404/502/503 pages).
//!
//! *Behaviour.* A host is normalised (lowercase, port and trailing dot dropped) and looked up:
//! a running pod on this node with an address and an `http_port` gets the request at
//! `http://<pod ip>:<http_port>` with the original path, query and `Host`, streamed both ways,
//! with `X-Forwarded-For` (peer appended), `X-Forwarded-Proto` and `X-Forwarded-Host` (an
//! answer with a `Content-Length` up to 64 KiB waits, at most 100 ms, for its first body frame
//! so that head and body reach the client in one write: [`body`]);
//! `Connection: upgrade` requests (WebSocket) become a byte tunnel when the pod answers 101. A
//! pod of this node that is not running answers 503 with its state (and `Retry-After` when it
//! is starting or restarting), an unknown host 404, a pod that refuses the connection 502.
//!
//! *Pods on other nodes.* The control plane publishes where every pod runs ([`feed`]); a host
//! whose pod runs on another node is forwarded to that node's advertised ingress address
//! ([`Target::RemoteNode`]) with [`proxy::HOP_HEADER`] set to the fleet's hop token. The second
//! node routes it again among its own pods only: a request carrying the header is never
//! forwarded to a node again (502 "the nodes do not agree" instead), so stale routes cannot
//! loop. When the header carries the right token, the second node keeps the `X-Forwarded-*`
//! headers the first one set (the pod sees the client, not the first node). A pod waiting for
//! a node, or on an unhealthy node, answers 503 on every other node.
//!
//! *Metrics.* `instapod_node_agent_ingress_requests_total{outcome}` and
//! `instapod_node_agent_ingress_request_duration_seconds{outcome}` (to the response head), with
//! `outcome` one of `proxied`, `forwarded`, `not_found`, `unavailable`, `bad_gateway`,
//! `misrouted`, `upgraded`, `redirected`, `acme_challenge`; the feed's metrics are in [`feed`].
//!
//! *Custom domains and TLS.* The ingress also serves users' own host names
//! ([`CustomDomains`], filled by `crate::domains` from the control plane's served-domains
//! feed): a custom host that is not a pod's host name is routed to the target of its pod's
//! first host name ([`RoutingTable::target_of_pod`]), so it follows the pod wherever it runs.
//! Before routing, `/.well-known/acme-challenge/<token>` is answered for the tokens of this
//! node's ACME orders in flight (any host, any scheme); plain HTTP to a custom domain that has a
//! certificate answers 308 to HTTPS (except that path, and except a request another node
//! forwarded). The TLS listener (`crate::domains::tls`: rustls, certificate chosen by SNI)
//! terminates TLS and hands the decrypted stream to [`Ingress::serve_connection`] with
//! [`Scheme::Https`]; the routing is the same. Outcomes `redirected` and `acme_challenge` are
//! added to the metrics' labels.
//!
//! *Not done yet.* Traffic between nodes is plain HTTP (hop token included, like the requests
//! themselves), also for requests that arrived over TLS; HTTP/1.1 only. A client may send the hop header with any other value:
//! that only stops its own request from being forwarded between nodes.

pub mod body;
pub mod connect;
pub mod feed;
pub mod last_answer;
pub mod pages;
pub mod proxy;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use proxy::{CustomDomains, CustomHost, Ingress, Outcome, Scheme};
pub use routes::{
    FixedRoutes, FleetRoutes, LocalRoutes, RemoteRoutes, RemoteTable, RouteSource, RoutingTable, Target, Unavailable,
    normalize_host,
};

use crate::pods::Pods;

/// The longest pause between two attempts to bind the listener.
const MAX_BIND_BACKOFF: Duration = Duration::from_secs(30);

/// The ingress of this node's pods.
pub fn local(pods: Pods) -> Arc<Ingress> {
    Arc::new(Ingress::new(Arc::new(LocalRoutes::new(pods))))
}

/// The ingress of the whole fleet's pods: this node's merged with `remote` (the other nodes'
/// pods, kept current by [`feed::run`]), and the custom `domains` of those pods.
/// Plain HTTP to a custom domain with a certificate is redirected to HTTPS on `https_port`.
pub fn fleet_wide(
    pods: Pods,
    remote: Arc<RemoteRoutes>,
    domains: Arc<dyn CustomDomains>,
    https_port: u16,
) -> Arc<Ingress> {
    let local = Arc::new(LocalRoutes::new(pods));
    Arc::new(
        Ingress::new(Arc::new(FleetRoutes::new(local, remote)))
            .with_domains(domains)
            .with_https_port(https_port),
    )
}

/// The `ingress` worker: binds `listen` (retrying with backoff, so the rest of the agent runs
/// meanwhile) and serves until the process ends.
pub async fn run(listen: SocketAddr, ingress: Arc<Ingress>) {
    loop {
        let listener = bind_with_backoff(listen, "ingress").await;
        ingress.clone().serve(listener).await;
    }
}

/// Binds `listen` for the listener named `what`, retrying while the address is taken or
/// refused with a doubling pause (1 s up to 30 s, `MAX_BIND_BACKOFF`). Shared by the plain and the
/// TLS ingress.
pub async fn bind_with_backoff(listen: SocketAddr, what: &'static str) -> tokio::net::TcpListener {
    let mut backoff = Duration::from_secs(1);
    loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => {
                tracing::info!(%listen, "{what} listening");
                return listener;
            }
            Err(err) => {
                tracing::error!(%listen, error = %err, retry_in = ?backoff, "{what} cannot listen");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BIND_BACKOFF);
            }
        }
    }
}

/// The next connection on `listener` (named `what` in logs), with `TCP_NODELAY` set. A failed
/// accept (out of file descriptors and the like) pauses 100 ms instead of spinning.
pub async fn accept(listener: &tokio::net::TcpListener, what: &'static str) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(err) => {
                tracing::warn!(error = %err, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
