//! Proxying: one HTTP/1.1 connection from a client, each request routed by its host name and
//! forwarded to a pod (or another node's ingress), bodies streamed both ways, upgrades
//! (WebSocket) turned into a byte tunnel.
//!
//! *Design.* [`Ingress::serve_connection`] takes any byte stream plus the peer address and the
//! [`Scheme`] it arrived with, so a TLS acceptor can hand it decrypted streams later; the plain
//! listener is [`Ingress::serve`]. Upstream connections come from two pooled hyper clients
//! (keep-alive per address), one for this node's pods and one for other nodes' ingresses,
//! which differ in how a connect is retried (`super::connect`). Request and response bodies
//! are hyper's streaming bodies passed through as they are, never collected. Hop-by-hop
//! headers are dropped in both directions; `X-Forwarded-For` gets the peer appended,
//! `X-Forwarded-Proto` and `X-Forwarded-Host` are set by this ingress (a client's values are
//! replaced, so an app can trust them). A client's `Forwarded` header is dropped: the ingress
//! does not maintain it. The one exception is a request forwarded by another node's ingress with the fleet's hop
//! token in [`HOP_HEADER`]: its `X-Forwarded-*` headers were set by that ingress and are kept.
//!
//! *Limitations.* HTTP/1.1 only (no h2 or h2c, which an upgrade to `h2c` would need). The
//! duration metric ends when the response head is ready, not when a streamed body ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use instapod_common::domains::ACME_CHALLENGE_PREFIX;

use super::body::UpstreamBody;
use super::connect::UpstreamConnector;
use super::last_answer::{self, LastAnswer, MarksEnd};
use super::pages::{self, Page};
use super::routes::{RouteSource, Target, normalize_host};

/// The body of an ingress response: the pod's, streamed (its first frame read ahead when
/// small, see [`UpstreamBody`]), or one of the ingress's pages.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// Marks a request forwarded by another node's ingress (its value is the fleet's hop token);
/// a request carrying it, whatever the value, is never forwarded to a node again (no loops
/// when two nodes disagree where a pod runs). Removed before a pod sees it.
pub const HOP_HEADER: HeaderName = HeaderName::from_static("x-instapod-hop");

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A client that sends nothing within this time after connecting (or between requests on a
/// kept-alive connection) is dropped, so idle or slow-header clients cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle upstream connections are closed after this time.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the client reached the ingress (the value of `X-Forwarded-Proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What became of a request; the `outcome` label of the ingress metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by the pod (whatever its status).
    Proxied,
    /// No route for the host (or no usable host).
    NotFound,
    /// The pod is on this node but not running or without an HTTP port.
    Unavailable,
    /// The pod (or the node it runs on) refused or dropped the connection.
    BadGateway,
    /// The pod switched protocols; the connection became a tunnel.
    Upgraded,
    /// Answered through the ingress of the node the pod runs on.
    Forwarded,
    /// Forwarded here by another node, but this node routes the host to a third node: the
    /// nodes disagree where the pod runs (502, not forwarded again).
    Misrouted,
    /// A plain HTTP request for a custom domain that has a certificate: 308 to HTTPS.
    Redirected,
    /// An ACME HTTP-01 challenge of one of this node's orders, answered by the ingress.
    AcmeChallenge,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Proxied => "proxied",
            Outcome::NotFound => "not_found",
            Outcome::Unavailable => "unavailable",
            Outcome::BadGateway => "bad_gateway",
            Outcome::Upgraded => "upgraded",
            Outcome::Forwarded => "forwarded",
            Outcome::Misrouted => "misrouted",
            Outcome::Redirected => "redirected",
            Outcome::AcmeChallenge => "acme_challenge",
        }
    }
}

/// A custom domain served by the ingress (see `crate::domains`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomHost {
    /// The pod it routes to: the same target as the pod's platform host names.
    pub pod_id: uuid::Uuid,
    /// A certificate is served for it: plain HTTP is redirected to HTTPS.
    pub has_certificate: bool,
}

/// Custom domains and ACME HTTP-01 challenges, as the ingress asks about them (answered from
/// memory: asked once per request).
pub trait CustomDomains: Send + Sync + std::fmt::Debug + 'static {
    /// The custom domain `host` (normalised), when it is served.
    fn custom_host(&self, host: &str) -> Option<CustomHost>;
    /// The key authorization for an HTTP-01 `token` of one of this node's orders in flight.
    fn acme_challenge(&self, token: &str) -> Option<String>;
}

/// The reverse proxy.
#[derive(Debug)]
pub struct Ingress {
    routes: Arc<dyn RouteSource>,
    domains: Option<Arc<dyn CustomDomains>>,
    /// Upstream connections to this node's pods (connects retried quickly: [`super::connect`]).
    pods: Client<UpstreamConnector, Incoming>,
    /// Upstream connections to other nodes' ingresses.
    nodes: Client<UpstreamConnector, Incoming>,
    /// The port clients reach the TLS ingress on, named in HTTP→HTTPS redirects unless 443.
    https_port: u16,
}

/// What the ingress adds to a forwarded request.
#[derive(Debug)]
struct Forwarding {
    peer: SocketAddr,
    scheme: Scheme,
    /// The host as the client sent it (port included), for `X-Forwarded-Host`.
    host: HeaderValue,
    /// Forwarding to another node's ingress: the [`HOP_HEADER`] value to send.
    to_node: Option<HeaderValue>,
    /// The request came from another node's ingress with the fleet's hop token: its
    /// `X-Forwarded-*` headers are that ingress's and are kept.
    from_node: bool,
}

impl Ingress {
    pub fn new(routes: Arc<dyn RouteSource>) -> Ingress {
        let client = |connector| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(UPSTREAM_IDLE_TIMEOUT)
                .build(connector)
        };
        Ingress {
            routes,
            domains: None,
            pods: client(UpstreamConnector::to_pods()),
            nodes: client(UpstreamConnector::to_nodes()),
            https_port: 443,
        }
    }

    /// Redirects plain HTTP for custom domains to HTTPS on `port` (default 443, which the
    /// redirect does not name).
    pub fn with_https_port(mut self, port: u16) -> Ingress {
        self.https_port = port;
        self
    }

    /// Also serves custom domains and answers ACME HTTP-01 challenges.
    pub fn with_domains(mut self, domains: Arc<dyn CustomDomains>) -> Ingress {
        self.domains = Some(domains);
        self
    }

    /// Accepts connections until the listener fails for good; each connection is served on its
    /// own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = super::accept(&listener, "ingress").await;
            tokio::spawn(self.clone().serve_connection(stream, peer, Scheme::Http, None));
        }
    }

    /// Serves one client connection (plain TCP, or a TLS stream). `last`, when the stream
    /// wants it, is marked once the answer to a request that closes the connection has been
    /// handed to hyper in full (see [`LastAnswer`]).
    pub async fn serve_connection<IO>(
        self: Arc<Self>,
        io: IO,
        peer: SocketAddr,
        scheme: Scheme,
        last: Option<Arc<LastAnswer>>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ingress = self.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let ingress = ingress.clone();
            let last = last.as_ref().filter(|_| last_answer::closes(&request)).cloned();
            async move {
                let response = ingress.handle(request, peer, scheme).await;
                Ok::<_, Infallible>(response.map(|body| MarksEnd::new(body, last)))
            }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await;
        if let Err(err) = served {
            tracing::debug!(%peer, error = %crate::error_chain(&err), "ingress connection ended with an error");
        }
    }

    /// Answers one request, and counts it.
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr, scheme: Scheme) -> Response<ResponseBody> {
        let started = Instant::now();
        let (outcome, response) = self.route(request, peer, scheme).await;
        metrics::counter!("instapod_node_agent_ingress_requests_total", "outcome" => outcome.as_str()).increment(1);
        metrics::histogram!("instapod_node_agent_ingress_request_duration_seconds", "outcome" => outcome.as_str())
            .record(started.elapsed().as_secs_f64());
        response
    }

    async fn route(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
        scheme: Scheme,
    ) -> (Outcome, Response<ResponseBody>) {
        // ACME HTTP-01, before routing and whatever the host: only the tokens of this node's
        // orders in flight are answered; any other path under the prefix is routed as usual
        // (a request that reached another node is routed to the pod's node, which placed the
        // order).
        let challenge_path = request.uri().path().starts_with(ACME_CHALLENGE_PREFIX);
        if challenge_path
            && matches!(*request.method(), hyper::Method::GET | hyper::Method::HEAD)
            && let Some(domains) = &self.domains
            && let Some(answer) = request.uri().path()[ACME_CHALLENGE_PREFIX.len()..]
                .split('/')
                .next()
                .and_then(|token| domains.acme_challenge(token))
        {
            return (Outcome::AcmeChallenge, text_response(answer));
        }
        let Some(raw_host) = request_host(&mut request) else {
            return (Outcome::NotFound, page_response(pages::bad_host()));
        };
        let Some(host) = raw_host.to_str().ok().and_then(normalize_host) else {
            return (Outcome::NotFound, page_response(pages::bad_host()));
        };
        // CONNECT and `OPTIONS *` name no path on a pod; the ingress is not a forward proxy.
        if request.method() == hyper::Method::CONNECT || !request.uri().path().starts_with('/') {
            return (Outcome::NotFound, page_response(pages::unsupported_request()));
        }
        let table = self.routes.table();
        let mut target = table.get(&host).cloned();
        let custom = match (&target, &self.domains) {
            (None, Some(domains)) => domains.custom_host(&host),
            _ => None,
        };
        if let Some(custom) = custom {
            target = table.target_of_pod(custom.pod_id).cloned();
        }
        let hop_token = self.routes.hop_token();
        let hop = request.headers().get(HOP_HEADER);
        let is_hop = hop.is_some();
        let from_node = match (hop, &hop_token) {
            (Some(value), Some(token)) => constant_time_eq(value.as_bytes(), token.as_bytes()),
            _ => false,
        };
        // Plain HTTP to a custom domain with a certificate goes to HTTPS, except the ACME
        // path, and except a request another node forwarded (its client may have used HTTPS).
        if scheme == Scheme::Http && !from_node && !challenge_path && custom.is_some_and(|c| c.has_certificate) {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            let port = match self.https_port {
                443 => String::new(),
                port => format!(":{port}"),
            };
            return (
                Outcome::Redirected,
                redirect_response(&format!("https://{host}{port}{path}")),
            );
        }
        let forwarding = |to_node| Forwarding {
            peer,
            scheme,
            host: raw_host.clone(),
            to_node,
            from_node,
        };
        match target {
            None => (Outcome::NotFound, page_response(pages::not_found(&host))),
            Some(Target::Unavailable { why, .. }) => {
                (Outcome::Unavailable, page_response(pages::unavailable(&host, why)))
            }
            Some(Target::Pod { pod_id, addr }) => {
                let answer = self.forward(&self.pods, request, addr, &forwarding(None)).await;
                if let Err(err) = &answer {
                    tracing::info!(pod = %pod_id, %host, upstream = %addr, error = %err, "the pod did not answer");
                }
                answer.unwrap_or_else(|_| (Outcome::BadGateway, page_response(pages::bad_gateway(&host))))
            }
            Some(Target::RemoteNode { addr }) => {
                if is_hop {
                    tracing::warn!(%host, node = %addr, %peer, "a request forwarded by another node would be forwarded again");
                    return (Outcome::Misrouted, page_response(pages::misrouted(&host)));
                }
                let marker = hop_token
                    .and_then(|token| HeaderValue::from_str(&token).ok())
                    .unwrap_or_else(|| HeaderValue::from_static("1"));
                let answer = self
                    .forward(&self.nodes, request, addr, &forwarding(Some(marker)))
                    .await;
                match answer {
                    // The node's answer, whatever it is (its pod's, or its own page).
                    Ok((Outcome::Proxied, response)) => (Outcome::Forwarded, response),
                    Ok(answer) => answer,
                    Err(err) => {
                        tracing::warn!(%host, node = %addr, error = %err, "the pod's node did not answer");
                        (Outcome::BadGateway, page_response(pages::node_did_not_answer(&host)))
                    }
                }
            }
        }
    }

    /// Sends the request to `upstream` and returns its answer (or sets up the tunnel when it
    /// switches protocols). An error means the upstream did not answer.
    async fn forward(
        &self,
        client: &Client<UpstreamConnector, Incoming>,
        mut request: Request<Incoming>,
        upstream: SocketAddr,
        forwarding: &Forwarding,
    ) -> Result<(Outcome, Response<ResponseBody>), ForwardError> {
        let upgrade = requested_upgrade(request.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::try_from(format!("http://{upstream}{path}")).map_err(|_| ForwardError::BadPath)?;
        let mut headers = parts.headers;
        rewrite_request_headers(&mut headers, upgrade, forwarding);
        let mut outgoing = Request::new(body);
        *outgoing.method_mut() = parts.method;
        *outgoing.uri_mut() = uri;
        *outgoing.version_mut() = Version::HTTP_11;
        *outgoing.headers_mut() = headers;

        let mut response = client
            .request(outgoing)
            .await
            .map_err(|err| ForwardError::Upstream(crate::error_chain(&err)))?;

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ForwardError::UnaskedUpgrade);
            };
            let protocol = response.headers().get(header::UPGRADE).cloned();
            let pod_upgrade = hyper::upgrade::on(&mut response);
            let (mut parts, _) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, protocol);
            tokio::spawn(tunnel(client_upgrade, pod_upgrade, upstream));
            return Ok((
                Outcome::Upgraded,
                Response::from_parts(parts, Either::Right(Full::new(Bytes::new()))),
            ));
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, None);
        let body = UpstreamBody::read_ahead(&parts.headers, body)
            .await
            .map_err(|err| ForwardError::Upstream(crate::error_chain(&err)))?;
        Ok((Outcome::Proxied, Response::from_parts(parts, Either::Left(body))))
    }
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("{0}")]
    Upstream(String),
    #[error("the request's path is not a valid URI path")]
    BadPath,
    #[error("the upstream switched protocols without being asked to")]
    UnaskedUpgrade,
}

/// Copies bytes both ways between the upgraded client and pod connections until both end.
async fn tunnel(client: hyper::upgrade::OnUpgrade, pod: hyper::upgrade::OnUpgrade, upstream: SocketAddr) {
    let (client, pod) = match tokio::try_join!(client, pod) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(%upstream, error = %err, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut pod = TokioIo::new(pod);
    match tokio::io::copy_bidirectional(&mut client, &mut pod).await {
        Ok((sent, received)) => tracing::debug!(%upstream, sent, received, "upgraded connection closed"),
        Err(err) => tracing::debug!(%upstream, error = %err, "upgraded connection ended with an error"),
    }
}

/// The host a request is for: the authority of an absolute-form target (which RFC 9112 says
/// wins), else the `Host` header. The `Host` header is made to match what routing used.
fn request_host(request: &mut Request<Incoming>) -> Option<HeaderValue> {
    if let Some(authority) = request.uri().authority() {
        let value = HeaderValue::from_str(authority.as_str()).ok()?;
        request.headers_mut().insert(header::HOST, value.clone());
        return Some(value);
    }
    request.headers().get(header::HOST).cloned()
}

/// The protocol a request asks to switch to (`Connection: upgrade` + `Upgrade: x`), if it is
/// one the ingress can tunnel (anything but h2c, which would need HTTP/2 on both sides).
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(header::UPGRADE)?;
    let h2c = protocol.to_str().is_ok_and(|p| p.trim().eq_ignore_ascii_case("h2c"));
    (asks && !h2c).then(|| protocol.clone())
}

/// Removes hop-by-hop headers: the standard ones, every `Proxy-*`, and the ones `Connection`
/// names. With `upgrade`, the message is an upgrade: `Connection: upgrade` and `Upgrade` are
/// set again.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Equality of two byte strings whose running time depends only on their lengths (the hop
/// token is a credential).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The headers a forwarded request carries: hop-by-hop ones removed, `X-Forwarded-*` set (or
/// kept, when another node's ingress set them).
fn rewrite_request_headers(headers: &mut HeaderMap, upgrade: Option<HeaderValue>, forwarding: &Forwarding) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(HOP_HEADER);
    headers.remove(FORWARDED);
    if let Some(marker) = &forwarding.to_node {
        headers.insert(HOP_HEADER, marker.clone());
    }
    if forwarding.from_node && headers.contains_key(&X_FORWARDED_FOR) {
        // Set by the node that forwarded the request; what it saw is the client, this peer is
        // only that node.
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(forwarding.scheme.as_str()));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST, forwarding.host.clone());
        }
        return;
    }
    let peer = forwarding.peer.ip().to_canonical().to_string();
    let mut chain: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    chain.push(&peer);
    let chain = HeaderValue::from_str(&chain.join(", "))
        .or_else(|_| HeaderValue::from_str(&peer))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    headers.insert(X_FORWARDED_FOR, chain);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(forwarding.scheme.as_str()));
    headers.insert(X_FORWARDED_HOST, forwarding.host.clone());
}

/// A permanent redirect that keeps the method and body (308).
fn redirect_response(location: &str) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A plain-text answer (the ACME key authorization).
fn text_response(text: String) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(text))));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn page_response(page: Page) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(page.html))));
    *response.status_mut() = StatusCode::from_u16(page.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(seconds) = page.retry_after_secs {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::routes::{FixedRoutes, RoutingTable};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn sorted(map: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = map
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().expect("text").to_string()))
            .collect();
        pairs.sort();
        pairs
    }

    fn check_request(incoming: &[(&str, &str)], to_node: bool, expected: &[(&str, &str)]) {
        check_forwarding(incoming, to_node, false, expected);
    }

    fn check_forwarding(incoming: &[(&str, &str)], to_node: bool, from_node: bool, expected: &[(&str, &str)]) {
        let mut map = headers(incoming);
        let upgrade = requested_upgrade(&map);
        let forwarding = Forwarding {
            peer: "[::ffff:192.0.2.7]:40000".parse().expect("peer"),
            scheme: Scheme::Http,
            host: HeaderValue::from_static("web.apps.test:8088"),
            to_node: to_node.then(|| HeaderValue::from_static("1")),
            from_node,
        };
        rewrite_request_headers(&mut map, upgrade, &forwarding);
        assert_eq!(sorted(&map), sorted(&headers(expected)), "from {incoming:?}");
    }

    #[test]
    fn forwarded_requests_lose_hop_by_hop_headers_and_gain_forwarding_ones() {
        let forwarded = [
            ("x-forwarded-for", "192.0.2.7"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "web.apps.test:8088"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
            let mut all = forwarded.to_vec();
            all.extend_from_slice(extra);
            all
        };
        check_request(
            &[("host", "web.apps.test:8088"), ("accept", "*/*")],
            false,
            &with(&[("host", "web.apps.test:8088"), ("accept", "*/*")]),
        );
        check_request(
            &[
                ("host", "web.apps.test"),
                ("connection", "keep-alive, X-Secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("trailer", "x-sum"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("proxy-authorization", "Basic eA=="),
                ("proxy-connection", "keep-alive"),
                ("forwarded", "for=1.2.3.4"),
                ("x-instapod-hop", "1"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.test"),
            ],
            false,
            &with(&[("host", "web.apps.test")]),
        );
        // A client's X-Forwarded-For chain is kept and the peer appended.
        let mut chain = with(&[("host", "h")]);
        chain[0] = ("x-forwarded-for", "203.0.113.1, 198.51.100.2, 192.0.2.7");
        check_request(
            &[
                ("host", "h"),
                ("x-forwarded-for", "203.0.113.1"),
                ("x-forwarded-for", "198.51.100.2"),
            ],
            false,
            &chain,
        );
        // Upgrades keep Connection: upgrade and Upgrade; h2c is not an upgrade the ingress does.
        check_request(
            &[
                ("host", "h"),
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ],
            false,
            &with(&[
                ("host", "h"),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ]),
        );
        check_request(
            &[("host", "h"), ("connection", "upgrade"), ("upgrade", "h2c")],
            false,
            &with(&[("host", "h")]),
        );
        // To another node: the hop marker.
        check_request(&[("host", "h")], true, &with(&[("host", "h"), ("x-instapod-hop", "1")]));
        // From another node (trusted hop): its X-Forwarded-* are kept, the marker is not.
        let first_hop = [
            ("host", "h"),
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "h:443"),
        ];
        let mut with_marker = first_hop.to_vec();
        with_marker.push(("x-instapod-hop", "token"));
        check_forwarding(&with_marker, false, true, &first_hop);
        // A trusted hop without forwarding headers gets this ingress's.
        check_forwarding(&[("host", "h")], false, true, &with(&[("host", "h")]));
    }

    /// An upstream that answers every request with its method, path and headers, one per line.
    async fn echo_upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let mut text = format!("{} {}\n", request.method(), request.uri());
                    for (name, value) in request.headers() {
                        text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    async fn start_ingress(table: RoutingTable) -> SocketAddr {
        start_ingress_with_token(table, None).await
    }

    async fn start_ingress_with_token(table: RoutingTable, hop_token: Option<&str>) -> SocketAddr {
        let routes = FixedRoutes::new(table).with_hop_token(hop_token);
        let ingress = Arc::new(Ingress::new(Arc::new(routes)));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(ingress.serve(listener));
        addr
    }

    #[tokio::test]
    async fn a_pod_whose_accept_queue_was_full_answers_before_the_kernel_retransmits() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, pod, queued) = crate::ingress::connect::tests::full_listener().await;
        // The pod's server catches up 250 ms later, and answers the ingress's connection.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(queued);
            // Bounded: the queued connections, then the ingress's.
            for _ in 0..16 {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut head = [0u8; 1024];
                if matches!(stream.read(&mut head).await, Ok(n) if n > 0) {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                    let _ = stream.write_all(answer).await;
                }
            }
        });
        let ingress = ingress_to(pod).await;
        let started = Instant::now();
        let (status, body) = get(ingress, "web-a.apps.test", &[]).await;
        let took = started.elapsed();
        assert_eq!((status, body.as_str()), (200, "ok"));
        // The kernel would send the dropped SYN again after 1 s; the ingress tried again sooner.
        assert!(took < Duration::from_millis(900), "took {took:?}");
    }

    async fn get(ingress: SocketAddr, host: &str, extra: &[(&str, &str)]) -> (u16, String) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = reqwest::Client::builder().no_proxy().build().expect("client");
        let mut request = client
            .get(format!("http://{ingress}/some/path?q=1"))
            .header("host", host);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the ingress answers");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    /// Custom domains for tests: host → (pod, has certificate), and one challenge token.
    #[derive(Debug)]
    struct FixedDomains(Vec<(&'static str, CustomHost)>);

    impl CustomDomains for FixedDomains {
        fn custom_host(&self, host: &str) -> Option<CustomHost> {
            self.0.iter().find(|(h, _)| *h == host).map(|(_, c)| *c)
        }

        fn acme_challenge(&self, token: &str) -> Option<String> {
            (token == "tok-123").then(|| "tok-123.thumb".to_string())
        }
    }

    #[tokio::test]
    async fn custom_domains_route_like_their_pod_answer_challenges_and_redirect_to_https() {
        let pod = echo_upstream().await;
        let pod_id = uuid::Uuid::new_v4();
        let mut table = RoutingTable::default();
        table.insert("web-a.apps.test", Target::Pod { pod_id, addr: pod });
        table.note_pod_host(pod_id, "web-a.apps.test");
        let domains = FixedDomains(vec![
            (
                "shop.example.com",
                CustomHost {
                    pod_id,
                    has_certificate: true,
                },
            ),
            (
                "plain.example.com",
                CustomHost {
                    pod_id,
                    has_certificate: false,
                },
            ),
            (
                "orphan.example.com",
                CustomHost {
                    pod_id: uuid::Uuid::new_v4(),
                    has_certificate: false,
                },
            ),
        ]);
        let table = Arc::new(table);
        let domains = Arc::new(domains);
        let ingress = Arc::new(
            Ingress::new(Arc::new(FixedRoutes::new(table.clone()).with_hop_token(Some("hop"))))
                .with_domains(domains.clone()),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(ingress.serve(listener));
        // The same, with its TLS ingress on another port than 443.
        let on_8443 = Arc::new(
            Ingress::new(Arc::new(FixedRoutes::new(table).with_hop_token(Some("hop"))))
                .with_domains(domains)
                .with_https_port(8443),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr_8443 = listener.local_addr().expect("address");
        tokio::spawn(on_8443.serve(listener));
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let fetch = async |host: &str, path: &str, extra: Option<(&str, &str)>| {
            let mut request = client.get(format!("http://{addr}{path}")).header("host", host);
            if let Some((name, value)) = extra {
                request = request.header(name, value);
            }
            let response = request.send().await.expect("the ingress answers");
            let location = response
                .headers()
                .get("location")
                .map(|v| v.to_str().expect("ascii").to_string());
            (
                response.status().as_u16(),
                location,
                response.text().await.expect("body"),
            )
        };

        // Without a certificate: routed to the pod over plain HTTP, with the custom Host.
        let (status, _, body) = fetch("Plain.Example.com", "/x?y=1", None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("GET /x?y=1\n"), "{body}");
        assert!(body.lines().any(|l| l == "host: Plain.Example.com"), "{body}");

        // With a certificate: plain HTTP is redirected, path and query kept.
        let (status, location, _) = fetch("shop.example.com:8080", "/cart?id=2", None).await;
        assert_eq!(
            (status, location.as_deref()),
            (308, Some("https://shop.example.com/cart?id=2"))
        );
        let response = client
            .get(format!("http://{addr_8443}/cart?id=2"))
            .header("host", "shop.example.com")
            .send()
            .await
            .expect("the ingress answers");
        assert_eq!(response.status().as_u16(), 308);
        assert_eq!(
            response.headers().get("location").and_then(|v| v.to_str().ok()),
            Some("https://shop.example.com:8443/cart?id=2")
        );
        // ... unless another node forwarded it (its client may have come over HTTPS).
        let (status, _, body) = fetch("shop.example.com", "/cart", Some(("x-instapod-hop", "hop"))).await;
        assert_eq!(status, 200, "{body}");

        // The ACME path: this node's token is answered on any host, never redirected; other
        // tokens are routed as usual.
        for host in ["shop.example.com", "unknown.example.org"] {
            let (status, _, body) = fetch(host, "/.well-known/acme-challenge/tok-123", None).await;
            assert_eq!((status, body.as_str()), (200, "tok-123.thumb"), "{host}");
        }
        let (status, _, body) = fetch("plain.example.com", "/.well-known/acme-challenge/other", None).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("GET /.well-known/acme-challenge/other\n"), "{body}");
        let (status, _, _) = fetch("shop.example.com", "/.well-known/acme-challenge/other", None).await;
        assert_eq!(status, 200);
        let (status, _, _) = fetch("unknown.example.org", "/.well-known/acme-challenge/other", None).await;
        assert_eq!(status, 404);

        // A domain whose pod has no route, and a host that is no domain: 404.
        assert_eq!(fetch("orphan.example.com", "/", None).await.0, 404);
        assert_eq!(fetch("nobody.example.com", "/", None).await.0, 404);
    }

    #[tokio::test]
    async fn remote_routes_forward_to_the_node_once_and_refused_pods_answer_502() {
        let node = echo_upstream().await;
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            listener.local_addr().expect("address")
        };
        let mut table = RoutingTable::default();
        table.insert("remote.apps.test", Target::RemoteNode { addr: node });
        table.insert(
            "refusing.apps.test",
            Target::Pod {
                pod_id: uuid::Uuid::new_v4(),
                addr: closed,
            },
        );
        let ingress = start_ingress(table).await;

        let (status, body) = get(ingress, "Remote.Apps.Test.", &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("GET /some/path?q=1\n"), "{body}");
        for line in [
            "host: Remote.Apps.Test.",
            "x-instapod-hop: 1",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: Remote.Apps.Test.",
        ] {
            assert!(body.lines().any(|l| l == line), "{line:?} missing in {body}");
        }

        // Already forwarded once: not again.
        let (status, body) = get(ingress, "remote.apps.test", &[("x-instapod-hop", "1")]).await;
        assert_eq!(status, 502);
        assert!(body.contains("do not agree"), "{body}");

        let (status, body) = get(ingress, "refusing.apps.test", &[]).await;
        assert_eq!(status, 502);
        assert!(body.contains("refused or dropped"), "{body}");

        // A node that does not answer: a page that says so.
        let mut table = RoutingTable::default();
        table.insert("far.apps.test", Target::RemoteNode { addr: closed });
        let (status, body) = get(start_ingress(table).await, "far.apps.test", &[]).await;
        assert_eq!(status, 502);
        assert!(body.contains("runs on another node"), "{body}");

        let (status, body) = get(ingress, "nobody.apps.test", &[]).await;
        assert_eq!(status, 404);
        assert!(body.contains("nobody.apps.test"), "{body}");

        // Not a forward proxy: CONNECT is refused even for a routed host.
        for head in [
            "CONNECT remote.apps.test:80 HTTP/1.1\r\nHost: remote.apps.test:80\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: remote.apps.test\r\n\r\n",
        ] {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(ingress).await.expect("connect");
            stream.write_all(head.as_bytes()).await.expect("write");
            let mut answer = [0u8; 12];
            stream.read_exact(&mut answer).await.expect("read");
            assert_eq!(&answer, b"HTTP/1.1 400", "{head:?}");
        }
    }

    /// Two ingresses in a row, as on two nodes: `first` routes the host to `second`, which
    /// routes it to `upstream`. Both know the hop token `token`.
    async fn two_hops(host: &str, upstream: SocketAddr, token: &str) -> SocketAddr {
        let mut second = RoutingTable::default();
        second.insert(
            host,
            Target::Pod {
                pod_id: uuid::Uuid::new_v4(),
                addr: upstream,
            },
        );
        let second = start_ingress_with_token(second, Some(token)).await;
        let mut first = RoutingTable::default();
        first.insert(host, Target::RemoteNode { addr: second });
        start_ingress_with_token(first, Some(token)).await
    }

    #[tokio::test]
    async fn through_two_nodes_the_pod_sees_the_client_and_the_hop_token_stays_between_nodes() {
        let pod = echo_upstream().await;
        let first = two_hops("web.apps.test", pod, "fleet-hop-token").await;
        let (status, body) = get(first, "web.apps.test:8088", &[("x-forwarded-for", "203.0.113.9")]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("GET /some/path?q=1\n"), "{body}");
        for line in [
            "host: web.apps.test:8088",
            "x-forwarded-for: 203.0.113.9, 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: web.apps.test:8088",
        ] {
            assert!(body.lines().any(|l| l == line), "{line:?} missing in {body}");
        }
        assert!(!body.contains("x-instapod-hop"), "{body}");

        // A client that sends the header itself, with a wrong token, is neither trusted nor
        // forwarded again: straight to the second node, its own X-Forwarded-For is extended.
        let pod_direct = {
            let mut table = RoutingTable::default();
            table.insert(
                "web.apps.test",
                Target::Pod {
                    pod_id: uuid::Uuid::new_v4(),
                    addr: pod,
                },
            );
            start_ingress_with_token(table, Some("fleet-hop-token")).await
        };
        let (status, body) = get(
            pod_direct,
            "web.apps.test",
            &[("x-instapod-hop", "guess"), ("x-forwarded-for", "198.51.100.1")],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.lines().any(|l| l == "x-forwarded-for: 198.51.100.1, 127.0.0.1"),
            "{body}"
        );
    }

    /// An upstream that answers one upgrade per connection with 101 and then echoes bytes.
    async fn upgrade_upstream() -> SocketAddr {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let asked = head.to_ascii_lowercase().contains("\r\nupgrade: websocket\r\n");
                    let answer = if asked {
                        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                    } else {
                        "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
                    };
                    let mut stream = reader.into_inner();
                    if stream.write_all(answer.as_bytes()).await.is_err() || !asked {
                        return;
                    }
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_upgrade_becomes_a_tunnel_through_two_nodes() {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let pod = upgrade_upstream().await;
        let first = two_hops("ws.apps.test", pod, "fleet-hop-token").await;
        let stream = tokio::net::TcpStream::connect(first).await.expect("connect");
        let mut reader = BufReader::new(stream);
        reader
            .get_mut()
            .write_all(b"GET /chat HTTP/1.1\r\nHost: ws.apps.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .expect("write");
        let mut head = String::new();
        loop {
            let mut line = String::new();
            tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
                .await
                .expect("a head within 5 s")
                .expect("read");
            assert!(!line.is_empty(), "closed after {head:?}");
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("\r\nupgrade: websocket\r\n"),
            "{head}"
        );
        for message in ["hello\n", "through two nodes\n"] {
            reader.get_mut().write_all(message.as_bytes()).await.expect("write");
            let mut echoed = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(5), reader.read_exact(&mut echoed))
                .await
                .expect("an echo within 5 s")
                .expect("read");
            assert_eq!(echoed, message.as_bytes());
        }
        reader.get_mut().shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest))
            .await
            .expect("the tunnel closes")
            .expect("read to the end");
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// An upstream that answers the first request of each connection with `head`, then, after
    /// `pause`, with `body`, and closes.
    async fn paused_body_upstream(head: &'static str, body: &'static str, pause: Duration) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = stream.write_all(head.as_bytes()).await;
                    tokio::time::sleep(pause).await;
                    let _ = stream.write_all(body.as_bytes()).await;
                });
            }
        });
        addr
    }

    /// Sends a GET for `host` to the ingress on a raw connection: what the first read returned,
    /// and everything up to the close.
    async fn first_read_and_all(ingress: SocketAddr, host: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(ingress).await.expect("connect");
        let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut first = vec![0u8; 4096];
        let n = stream.read(&mut first).await.expect("read");
        first.truncate(n);
        let mut all = first.clone();
        // An answer cut short may end in a reset: what came before it is what counts.
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all))
            .await
            .expect("the answer ends");
        (
            String::from_utf8_lossy(&first).into_owned(),
            String::from_utf8_lossy(&all).into_owned(),
        )
    }

    /// An ingress whose only host, `web-a.apps.test`, is a pod at `upstream`.
    async fn ingress_to(upstream: SocketAddr) -> SocketAddr {
        let mut table = RoutingTable::default();
        table.insert(
            "web-a.apps.test",
            Target::Pod {
                pod_id: uuid::Uuid::new_v4(),
                addr: upstream,
            },
        );
        start_ingress(table).await
    }

    /// A small answer's head and body reach the client in one write, even when the pod sent
    /// them apart; a body that does not come within `READ_AHEAD_WAIT`, or one without a length,
    /// does not hold the head back.
    #[tokio::test]
    async fn a_small_answer_leaves_in_one_write_and_nothing_waits_long() {
        use crate::ingress::body::READ_AHEAD_WAIT;
        let sized = "HTTP/1.1 200 OK\r\ncontent-length: 12\r\nconnection: close\r\n\r\n";
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
        let cases = [
            // (head, body, pause, whether the first read holds the body)
            (sized, "hello, bench", Duration::from_millis(30), true),
            (sized, "hello, bench", READ_AHEAD_WAIT * 4, false),
            (
                chunked,
                "c\r\nhello, bench\r\n0\r\n\r\n",
                Duration::from_millis(200),
                false,
            ),
        ];
        for (head, body, pause, together) in cases {
            let ingress = ingress_to(paused_body_upstream(head, body, pause).await).await;
            let (first, all) = first_read_and_all(ingress, "web-a.apps.test").await;
            assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first:?}");
            assert_eq!(
                first.contains("hello, bench"),
                together,
                "pause {pause:?}: first read {first:?}"
            );
            assert!(all.contains("hello, bench"), "{all:?}");
        }
    }

    /// A pod that closes after its head, before any of its body: nothing has left for the
    /// client yet (the read-ahead holds the head), so the client gets the 502 page rather than a
    /// head and a cut connection.
    #[tokio::test]
    async fn a_small_answer_whose_body_fails_before_its_first_byte_is_a_502() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 12\r\nconnection: close\r\n\r\n";
        let ingress = ingress_to(paused_body_upstream(head, "", Duration::ZERO).await).await;
        let (_, all) = first_read_and_all(ingress, "web-a.apps.test").await;
        assert!(all.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{all:?}");
        assert!(all.contains("The pod did not answer"), "{all:?}");
    }
}
