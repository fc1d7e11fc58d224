//! TLS at the ingress: certificates chosen by SNI (custom domains from the served-domains feed,
//! the platform's wildcard certificate from the configuration), and the listener on
//! `ingress_tls_listen` that terminates TLS and hands the decrypted stream to the ingress with
//! [`Scheme::Https`].
//!
//! *Design.* [`SniResolver`] answers each handshake from memory: a custom domain's certificate
//! when the SNI names a served domain that has one, else the platform certificate when it is
//! valid for the name (its own SAN check, wildcards included), else nothing (the handshake
//! fails: this node has no certificate for that name). Certificates change without a restart:
//! the feed replaces [`Served`] and the next handshake sees it. Session resumption uses
//! stateless tickets (one per handshake); the server picks the cipher suite (AES-128-GCM first,
//! see [`server_config`]). Each connection is a [`tls_stream::ServerStream`] (rustls over the
//! socket, the ticket sent with the first answer, a closing connection's last answer sent with
//! its `close_notify` and FIN).
//!
//! *Limitations.* HTTP/1.1 only (ALPN `http/1.1`). No OCSP stapling. A handshake without SNI
//! gets no certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Served;
use super::tls_stream;
use crate::ingress::last_answer::LastAnswer;
use crate::ingress::{Ingress, Scheme, normalize_host};

/// A client has this long to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadCertificateError {
    #[error("the certificate chain is not PEM: {0}")]
    Chain(String),
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the private key is not a PEM private key: {0}")]
    Key(String),
    #[error("the key does not fit the certificate or cannot sign: {0}")]
    Mismatch(String),
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses a PEM chain (leaf first) and PKCS#8/PKCS#1/SEC1 PEM key into what rustls serves;
/// the key must belong to the leaf.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, LoadCertificateError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| LoadCertificateError::Chain(err.to_string()))?;
    if chain.is_empty() {
        return Err(LoadCertificateError::EmptyChain);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|err| LoadCertificateError::Key(err.to_string()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|err| LoadCertificateError::Mismatch(err.to_string()))
}

/// The platform's own certificate (e.g. `*.apps.example.com`), from files.
#[derive(Debug)]
pub struct PlatformCertificate {
    key: Arc<CertifiedKey>,
}

impl PlatformCertificate {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<PlatformCertificate, LoadCertificateError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|error| LoadCertificateError::Read {
                path: path.display().to_string(),
                error,
            })
        };
        let key = certified_key(&read(cert_file)?, &read(key_file)?)?;
        Ok(PlatformCertificate { key: Arc::new(key) })
    }

    /// Whether the certificate names `host` (exactly, or by a wildcard).
    pub fn covers(&self, host: &str) -> bool {
        let Ok(leaf) = self.key.end_entity_cert() else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
            return false;
        };
        let Ok(name) = ServerName::try_from(host) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }
}

/// Chooses the certificate of each handshake by its SNI.
#[derive(Debug)]
pub struct SniResolver {
    served: Arc<Served>,
    platform: Option<PlatformCertificate>,
}

impl SniResolver {
    pub fn new(served: Arc<Served>, platform: Option<PlatformCertificate>) -> SniResolver {
        SniResolver { served, platform }
    }

    /// The certificate for a server name (as the client sent it).
    pub fn for_name(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let host = normalize_host(server_name)?;
        if let Some(key) = self.served.certificate(&host) {
            return Some(key);
        }
        let platform = self.platform.as_ref()?;
        platform.covers(&host).then(|| platform.key.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = client_hello.server_name()?;
        let key = self.for_name(name);
        if key.is_none() {
            tracing::debug!(server_name = name, "no certificate for this server name");
        }
        key
    }
}

/// TLS session tickets sent after each handshake: one, which the client spends on its next
/// connection (rustls's default of two costs a second encryption and record per connection).
const TICKETS_PER_HANDSHAKE: usize = 1;

/// The ingress's TLS configuration around `resolver`.
///
/// The server chooses the cipher suite, AES-128-GCM first: its SHA-256 key schedule runs on the
/// CPU's SHA extensions where AES-256-GCM's SHA-384 does not, which makes a resumed handshake
/// measurably cheaper (`bench_ingress_tls`); both are strong. ChaCha20-Poly1305 comes after the
/// AES suites (servers without AES instructions are not what the platform runs on).
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| suite_rank(suite.suite()));
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}

/// The server's preference among cipher suites (lower first; ties keep the provider's order).
fn suite_rank(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

/// The `ingress_tls` worker: binds `listen` (retrying with backoff, like the plain listener)
/// and serves TLS connections until the process ends.
pub async fn run(listen: SocketAddr, ingress: Arc<Ingress>, config: Arc<ServerConfig>) {
    loop {
        let listener = crate::ingress::bind_with_backoff(listen, "TLS ingress").await;
        serve(listener, ingress.clone(), config.clone()).await;
    }
}

/// Accepts connections on `listener`; each handshake and connection runs on its own task.
pub async fn serve(listener: tokio::net::TcpListener, ingress: Arc<Ingress>, config: Arc<ServerConfig>) {
    loop {
        let (stream, peer) = crate::ingress::accept(&listener, "TLS ingress").await;
        let config = config.clone();
        let ingress = ingress.clone();
        tokio::spawn(async move {
            let last = Arc::new(LastAnswer::default());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls_stream::accept(config, stream, last.clone())).await {
                Ok(Ok(tls)) => ingress.serve_connection(tls, peer, Scheme::Https, Some(last)).await,
                Ok(Err(err)) => {
                    metrics::counter!(HANDSHAKE_FAILURES, "reason" => "handshake").increment(1);
                    tracing::debug!(%peer, error = %err, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!(HANDSHAKE_FAILURES, "reason" => "timeout").increment(1);
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

const HANDSHAKE_FAILURES: &str = "instapod_node_agent_ingress_tls_handshake_failures_total";

/// A DER certificate's validity (`notBefore`, `notAfter`) in Unix seconds.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (tag, certificate, _) = der_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_tlv(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    let (tag, _, after) = der_tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        let (_, _, after) = der_tlv(rest)?;
        rest = after;
    }
    let (tag, validity, _) = der_tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag_before, before, after) = der_tlv(validity)?;
    let (tag_after, not_after, _) = der_tlv(after)?;
    Some((der_time(tag_before, before)?, der_time(tag_after, not_after)?))
}

/// The validity of the first certificate of a PEM chain.
pub fn chain_validity(chain_pem: &str) -> Option<(i64, i64)> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()?.ok()?;
    validity(leaf.as_ref())
}

/// One DER element: (tag, contents, what follows).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) in Unix seconds.
fn der_time(tag: u8, contents: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(contents).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (text.get(..4)?.parse().ok()?, &text[4..]),
        _ => return None,
    };
    let number = |range: std::ops::Range<usize>| rest.get(range)?.parse::<u8>().ok();
    let month = time::Month::try_from(number(0..2)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, number(2..4)?).ok()?;
    let time = time::Time::from_hms(number(4..6)?, number(6..8)?, number(8..10)?).ok()?;
    Some(time::PrimitiveDateTime::new(date, time).assume_utc().unix_timestamp())
}

#[cfg(test)]
pub(crate) mod tests {
    use instapod_common::domains::{ServedCertificate, ServedDomain, ServedDomains};
    use uuid::Uuid;

    use super::*;

    /// A self-signed certificate for `names` made with the openssl CLI: (chain PEM, key PEM).
    pub(crate) fn self_signed(names: &[&str]) -> (String, String) {
        let dir = std::env::temp_dir().join(format!("instapod-tls-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let san = names.iter().map(|n| format!("DNS:{n}")).collect::<Vec<_>>().join(",");
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "30",
            ])
            .args([
                "-subj",
                &format!("/CN={}", names[0]),
                "-addext",
                &format!("subjectAltName={san}"),
            ])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs (it is a test dependency: scripts/install-deps)");
        assert!(status.success());
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read");
        let pair = (read("cert.pem"), read("key.pem"));
        let _ = std::fs::remove_dir_all(&dir);
        pair
    }

    pub(crate) fn served(hosts: &[(&str, Option<&(String, String)>)]) -> ServedDomains {
        ServedDomains {
            version: "v1".into(),
            domains: hosts
                .iter()
                .map(|(host, cert)| ServedDomain {
                    domain_id: Uuid::new_v4(),
                    pod_id: Uuid::new_v4(),
                    hostname: host.to_string(),
                    certificate: cert.map(|(chain, key)| ServedCertificate {
                        chain_pem: chain.clone(),
                        key_pem: key.clone(),
                        not_after: 0,
                    }),
                })
                .collect(),
        }
    }

    #[test]
    fn the_certificate_follows_the_sni() {
        let shop = self_signed(&["shop.example.com"]);
        let wildcard = self_signed(&["*.apps.test"]);
        let dir = std::env::temp_dir().join(format!("instapod-tls-platform-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("cert.pem"), &wildcard.0).expect("write");
        std::fs::write(dir.join("key.pem"), &wildcard.1).expect("write");
        let platform = PlatformCertificate::load(&dir.join("cert.pem"), &dir.join("key.pem")).expect("loads");
        let _ = std::fs::remove_dir_all(&dir);

        let served_domains = Arc::new(Served::default());
        served_domains.apply(&served(&[
            ("shop.example.com", Some(&shop)),
            ("plain.example.com", None),
        ]));
        let resolver = SniResolver::new(served_domains.clone(), Some(platform));
        let leaf_of = |key: Option<Arc<CertifiedKey>>| key.map(|k| k.cert[0].as_ref().to_vec());
        let shop_leaf = CertificateDer::pem_slice_iter(shop.0.as_bytes())
            .next()
            .expect("one")
            .expect("pem");
        let wildcard_leaf = CertificateDer::pem_slice_iter(wildcard.0.as_bytes())
            .next()
            .expect("one")
            .expect("pem");

        assert_eq!(
            leaf_of(resolver.for_name("shop.example.com")),
            Some(shop_leaf.as_ref().to_vec())
        );
        assert_eq!(
            leaf_of(resolver.for_name("SHOP.example.com.")),
            Some(shop_leaf.as_ref().to_vec())
        );
        assert_eq!(
            leaf_of(resolver.for_name("web-a.apps.test")),
            Some(wildcard_leaf.as_ref().to_vec())
        );
        // The wildcard covers one label only, not the apex, not another domain.
        assert!(resolver.for_name("a.b.apps.test").is_none());
        assert!(resolver.for_name("apps.test").is_none());
        assert!(resolver.for_name("plain.example.com").is_none());
        assert!(resolver.for_name("other.example.com").is_none());

        // A removed domain's certificate is gone at the next handshake.
        served_domains.apply(&served(&[]));
        assert!(resolver.for_name("shop.example.com").is_none());
    }

    /// An upstream on 127.0.0.1 that reads each connection's request head (its lines, the
    /// blank one excluded) and leaves the answer to `answer`, with the connection.
    async fn head_upstream<F, Fut>(answer: F) -> SocketAddr
    where
        F: Fn(String, tokio::net::TcpStream) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    answer(head, reader.into_inner()).await;
                });
            }
        });
        addr
    }

    /// An upstream that answers every request with its request head.
    async fn echo_upstream() -> SocketAddr {
        use tokio::io::AsyncWriteExt;
        head_upstream(|head, mut stream| async move {
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                head.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        })
        .await
    }

    /// The TLS listener, serving `shop.example.com` for a pod at `pod` (its platform name
    /// `web-a.apps.test`): the listener's address, a client trusting the domain's self-signed
    /// certificate, and the served domains.
    async fn tls_ingress(pod: SocketAddr) -> (SocketAddr, Arc<rustls::ClientConfig>, Arc<Served>) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let shop = self_signed(&["shop.example.com"]);
        let pod_id = Uuid::new_v4();
        let mut table = crate::ingress::RoutingTable::default();
        table.insert("web-a.apps.test", crate::ingress::Target::Pod { pod_id, addr: pod });
        table.note_pod_host(pod_id, "web-a.apps.test");
        let served_domains = Arc::new(Served::default());
        let mut answer = served(&[("shop.example.com", Some(&shop))]);
        answer.domains[0].pod_id = pod_id;
        served_domains.apply(&answer);
        let challenges = Arc::new(crate::domains::challenges::ChallengeStore::default());
        let ingress = Arc::new(
            Ingress::new(Arc::new(crate::ingress::FixedRoutes::new(table))).with_domains(Arc::new(
                crate::domains::IngressDomains {
                    served: served_domains.clone(),
                    challenges,
                },
            )),
        );
        let config = server_config(Arc::new(SniResolver::new(served_domains.clone(), None))).expect("config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(serve(listener, ingress, config));

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(shop.0.as_bytes()) {
            roots.add(cert.expect("pem")).expect("a root");
        }
        let client = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        (addr, client, served_domains)
    }

    #[tokio::test]
    async fn the_tls_listener_serves_the_domain_by_sni_and_tells_the_pod_it_was_https() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, client, served_domains) = tls_ingress(echo_upstream().await).await;
        let connector = tokio_rustls::TlsConnector::from(client);
        let connect = async |name: &str| {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            connector
                .connect(ServerName::try_from(name.to_string()).expect("a name"), tcp)
                .await
        };
        let mut tls = connect("shop.example.com").await.expect("handshake");
        tls.write_all(b"GET /cart HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        tls.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("x-forwarded-proto: https"), "{response}");
        assert!(response.contains("GET /cart HTTP/1.1"), "{response}");
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
        // The server's choice of suite, although rustls's client lists AES-256 first.
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );

        // Every later connection of the same client resumes its session (no certificate sent
        // or signed again): each handshake issues the ticket the next one spends.
        for _ in 0..3 {
            let mut again = connect("shop.example.com").await.expect("handshake");
            again
                .write_all(b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut response = String::new();
            again.read_to_string(&mut response).await.expect("read");
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            assert_eq!(again.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        }

        // No certificate for another name: the handshake fails.
        assert!(connect("other.example.com").await.is_err());
        // Once the domain is removed, neither.
        served_domains.apply(&served(&[]));
        assert!(connect("shop.example.com").await.is_err());
    }

    /// An upstream whose answer depends on the path: `/split` (a length, the body in two
    /// writes 30 ms apart), `/late` (the body 150 ms after the head, past the read-ahead's
    /// wait), `/chunked` (two chunks 30 ms apart), `/big` (300,000 bytes); it closes after it.
    async fn shaped_upstream() -> SocketAddr {
        use tokio::io::AsyncWriteExt;
        head_upstream(|head, mut stream| async move {
            let path = head.split(' ').nth(1).unwrap_or("/").to_string();
            let answer_head = |extra: &str| format!("HTTP/1.1 200 OK\r\nconnection: close\r\n{extra}\r\n");
            // Each part, then how long to wait before the next.
            let parts: Vec<(Vec<u8>, u64)> = match path.as_str() {
                "/split" => vec![
                    (
                        format!("{}01234", answer_head("content-length: 10\r\n")).into_bytes(),
                        30,
                    ),
                    (b"56789".to_vec(), 0),
                ],
                "/late" => vec![
                    (answer_head("content-length: 4\r\n").into_bytes(), 150),
                    (b"late".to_vec(), 0),
                ],
                "/chunked" => vec![
                    (
                        format!("{}3\r\none\r\n", answer_head("transfer-encoding: chunked\r\n")).into_bytes(),
                        30,
                    ),
                    (b"3\r\ntwo\r\n0\r\n\r\n".to_vec(), 0),
                ],
                _ => {
                    let mut all = answer_head("content-length: 300000\r\n").into_bytes();
                    all.extend((0..300_000u32).map(|i| b'a' + (i % 26) as u8));
                    vec![(all, 0)]
                }
            };
            for (bytes, pause_ms) in parts {
                let _ = stream.write_all(&bytes).await;
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            }
        })
        .await
    }

    /// A request with `Connection: close` has the connection end with its answer's last
    /// bytes (see `ingress::last_answer`): whatever the shape of the pod's answer, the client
    /// gets all of it and then a clean TLS end.
    #[tokio::test]
    async fn a_closing_request_gets_its_whole_answer_over_tls_however_the_pod_sends_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, client, _served) = tls_ingress(shaped_upstream().await).await;
        let connector = tokio_rustls::TlsConnector::from(client);
        let big: String = (0..300_000u32).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let cases = [
            ("/split", "0123456789".to_string()),
            ("/late", "late".to_string()),
            ("/chunked", "3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n".to_string()),
            ("/big", big),
        ];
        for (path, body) in cases {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from("shop.example.com").expect("a name");
            let mut tls = connector.connect(name, tcp).await.expect("handshake");
            let request = format!("GET {path} HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n");
            tls.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut response))
                .await
                .expect("the connection ends")
                .expect("a clean TLS end");
            assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
            let (_, got) = response.split_once("\r\n\r\n").expect("a head");
            assert!(got == body, "{path}: {} bytes, expected {}", got.len(), body.len());
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_and_validity_is_read_from_the_leaf() {
        let one = self_signed(&["one.example.com"]);
        let two = self_signed(&["two.example.com"]);
        assert!(certified_key(&one.0, &one.1).is_ok());
        assert!(matches!(
            certified_key(&one.0, &two.1),
            Err(LoadCertificateError::Mismatch(_))
        ));
        assert!(matches!(
            certified_key("", &one.1),
            Err(LoadCertificateError::EmptyChain)
        ));
        assert!(matches!(
            certified_key(&one.0, "nope"),
            Err(LoadCertificateError::Key(_))
        ));

        let (not_before, not_after) = chain_validity(&one.0).expect("validity");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((now - 300..=now + 300).contains(&not_before), "{not_before} vs {now}");
        assert_eq!(not_after - not_before, 30 * 86_400);
        assert_eq!(chain_validity("garbage"), None);
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(0x18, b"19700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"701301000000Z"), None);
    }
}
