//! Custom domains against a real ACME CA (Pebble) and a real DNS server (pebble-challtestsrv).
//!
//! `the_agent_parts_verify_dns_order_from_pebble_and_serve_https_by_sni` drives the agent's
//! own pieces in-process, without a control plane: hickory checks against the challtestsrv,
//! an HTTP-01 order with instant-acme answered by the agent's ingress, and the issued
//! certificate served by the TLS ingress and validated against Pebble's root.
//!
//! `a_custom_domain_goes_from_dns_records_to_https_with_renewal_and_removal` is the whole
//! platform: a real control plane, scheduler and node agent (containerd, runc, CNI), a pod
//! created through the API, its domain added, verified (wrong TXT first), issued by Pebble,
//! served over HTTPS through the agent's TLS ingress, renewed, and removed.
//!
//! `an_http01_challenge_reaching_another_node_is_answered_by_the_pods_node` is two nodes where
//! the name's DNS points at the node that did not place the order: the challenge is forwarded
//! to the pod's node, and both nodes serve the certificate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure};
use instapod_common::domains::{AcmeAccount, DnsExpectation, ServedCertificate, ServedDomain, ServedDomains};
use instapod_node_agent::domains::acme::{AccountStore, AcmeIssuer};
use instapod_node_agent::domains::challenges::ChallengeStore;
use instapod_node_agent::domains::dns::{self, HickoryLookup};
use instapod_node_agent::domains::tls::{SniResolver, server_config};
use instapod_node_agent::domains::{IngressDomains, Served};
use instapod_node_agent::fleet::FleetError;
use instapod_node_agent::ingress::{FixedRoutes, Ingress, RoutingTable, Target};
use instapod_tests::acme::{ChallTestSrv, Pebble};
use instapod_tests::{eventually, ids, process};

const WAIT: Duration = Duration::from_secs(90);

/// The platform's ACME account kept in memory (the control plane's part in the first test).
#[derive(Default)]
struct MemoryAccounts {
    directory_url: String,
    stored: Mutex<Option<serde_json::Value>>,
    puts: Mutex<usize>,
}

impl AccountStore for MemoryAccounts {
    async fn get_account(&self) -> Result<AcmeAccount, FleetError> {
        Ok(AcmeAccount {
            directory_url: self.directory_url.clone(),
            contact: vec![],
            credentials: self.stored.lock().expect("lock").clone(),
        })
    }

    async fn put_account(&self, account: &AcmeAccount) -> Result<AcmeAccount, FleetError> {
        *self.puts.lock().expect("lock") += 1;
        let mut stored = self.stored.lock().expect("lock");
        if stored.is_none() {
            *stored = account.credentials.clone();
        }
        Ok(AcmeAccount {
            credentials: stored.clone(),
            ..account.clone()
        })
    }
}

/// An upstream that answers every request with `hello from the pod`.
async fn tiny_pod() -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut proto = String::from("?");
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("x-forwarded-proto:") {
                        proto = value.trim().to_string();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let body = format!("hello from the pod over {proto}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = reader.get_mut().write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A client that trusts only `root_pem` and sends `host` to `addr`.
fn https_client(root_pem: &str, host: &str, addr: SocketAddr) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(root_pem.as_bytes()).expect("a PEM root");
    instapod_tests::http_builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .resolve(host, addr)
        .tls_info(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTPS client")
}

#[tokio::test]
async fn the_agent_parts_verify_dns_order_from_pebble_and_serve_https_by_sni() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dns_server = ChallTestSrv::start();
    let host = format!("shop-{}.example.test", &ids::random_suffix()[..8]);

    // DNS: hickory against the challtestsrv, uncached (a fix is seen at once).
    let resolver = HickoryLookup::new(
        &[dns_server.dns_addr().parse().expect("an address")],
        Duration::from_secs(2),
    )
    .expect("a resolver");
    let expected = DnsExpectation {
        txt_name: format!("_instapod-challenge.{host}"),
        txt_value: "instapod-verify=right".into(),
        cname_target: Some("web-a.apps.test".into()),
        addresses: vec![],
    };
    dns_server.set_txt(&expected.txt_name, "instapod-verify=wrong").await;
    dns_server.set_cname(&host, "web-a.apps.test").await;
    let report = dns::check(&resolver, &host, &expected).await;
    assert!(!report.verified, "{report:?}");
    assert_eq!(report.checks[0].found, vec!["instapod-verify=wrong".to_string()]);
    assert!(report.checks[0].error.is_none(), "{report:?}");
    assert!(report.checks[1].ok, "{report:?}");
    dns_server.set_txt(&expected.txt_name, "instapod-verify=right").await;
    let report = dns::check(&resolver, &host, &expected).await;
    assert!(report.verified, "{}", dns::summary(&report));
    dns_server.clear_cname(&host).await;
    let report = dns::check(&resolver, &host, &expected).await;
    assert!(!report.verified && report.checks[1].found.is_empty(), "{report:?}");
    // A nameserver that does not answer is a resolver error, not a missing record.
    let silent = HickoryLookup::new(
        &[SocketAddr::from(([127, 0, 0, 1], process::free_port()))],
        Duration::from_millis(300),
    )
    .expect("a resolver");
    let report = dns::check(&silent, &host, &expected).await;
    assert!(report.checks.iter().all(|c| c.error.is_some()), "{report:?}");

    // The ingress: the pod behind its platform name, the domain served for the same pod.
    let pod_id = uuid::Uuid::new_v4();
    let mut table = RoutingTable::default();
    table.insert(
        "web-a.apps.test",
        Target::Pod {
            pod_id,
            addr: tiny_pod().await,
        },
    );
    table.note_pod_host(pod_id, "web-a.apps.test");
    let served = Arc::new(Served::default());
    let challenges = Arc::new(ChallengeStore::default());
    let ingress = Arc::new(
        Ingress::new(Arc::new(FixedRoutes::new(table))).with_domains(Arc::new(IngressDomains {
            served: served.clone(),
            challenges: challenges.clone(),
        })),
    );
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain_addr = plain.local_addr().expect("address");
    tokio::spawn(ingress.clone().serve(plain));
    let tls = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_addr = tls.local_addr().expect("address");
    let config = server_config(Arc::new(SniResolver::new(served.clone(), None))).expect("TLS config");
    tokio::spawn(instapod_node_agent::domains::tls::serve(tls, ingress, config));

    // Pebble validates HTTP-01 on the ingress's port, resolving through the challtestsrv
    // (127.0.0.1 for every name).
    let pebble = Pebble::start(plain_addr.port(), &dns_server, 3600);
    assert!(pebble.directory_answers().await, "{}", pebble.log_tail());
    let accounts = MemoryAccounts {
        directory_url: pebble.directory_url(),
        ..MemoryAccounts::default()
    };
    let issuer = AcmeIssuer::new(Some(pebble.tls_ca_file().to_path_buf()), challenges.clone());
    let issued = issuer
        .issue(&accounts, &host)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", pebble.log_tail()));
    assert!(challenges.is_empty(), "the order's tokens outlived it");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(issued.not_before <= now + 60 && issued.not_after > now, "{issued:?}");
    assert!((issued.not_after - issued.not_before - 3600).abs() <= 120, "{issued:?}");
    // The same account for the next order: created and stored once.
    let again = issuer.issue(&accounts, &host).await.expect("a second certificate");
    assert_ne!(again.chain_pem, issued.chain_pem);
    assert_eq!(*accounts.puts.lock().expect("lock"), 1);

    // Served by SNI and valid for Pebble's root.
    served.apply(&ServedDomains {
        version: "1".into(),
        domains: vec![ServedDomain {
            domain_id: uuid::Uuid::new_v4(),
            pod_id,
            hostname: host.clone(),
            certificate: Some(ServedCertificate {
                chain_pem: issued.chain_pem.clone(),
                key_pem: issued.key_pem.clone(),
                not_after: issued.not_after,
            }),
        }],
    });
    let root = pebble.issuing_root_pem().await;
    let client = https_client(&root, &host, tls_addr);
    let response = client
        .get(format!("https://{host}:{}/", tls_addr.port()))
        .send()
        .await
        .expect("HTTPS through the ingress");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.expect("body"), "hello from the pod over https");
    // Plain HTTP for a domain with a certificate: 308 to HTTPS.
    let response = instapod_tests::http_builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("http://{plain_addr}/cart?x=1"))
        .header("host", &host)
        .send()
        .await
        .expect("plain HTTP");
    assert_eq!(response.status().as_u16(), 308);
    assert_eq!(
        response.headers().get("location").and_then(|v| v.to_str().ok()),
        Some(format!("https://{host}/cart?x=1").as_str())
    );
}

/// A pod through the API, running on the fleet's node.
async fn create_running_pod(user: &instapod_tests::TestUser, name: &str, image: &str) -> serde_json::Value {
    user.client()
        .post_json(
            "/api/pods",
            &serde_json::json!({"name": name, "image": image, "plan": "starter", "http_port": 8080}),
        )
        .await
        .json_with_status(202);
    user.wait_pod_state(name, "running", WAIT).await
}

/// The domain `id` of pod `pod` as the API lists it.
async fn domain(user: &instapod_tests::TestUser, pod: &str, id: &str) -> anyhow::Result<serde_json::Value> {
    let list = user.client().get(&format!("/api/pods/{pod}/domains")).send().await;
    ensure!(list.status == 200, "{}: {}", list.status, list.text());
    let body = list.json();
    let Some(found) = body["domains"]
        .as_array()
        .and_then(|all| all.iter().find(|d| d["id"] == id))
    else {
        bail!("domain {id} not listed: {body}");
    };
    Ok(found.clone())
}

/// Asks for domain `id` of pod `pod` to be verified, and waits until it is active with a
/// certificate (Pebble's log in the failure).
async fn verify_until_active(
    user: &instapod_tests::TestUser,
    pod: &str,
    id: &str,
    pebble: &Pebble,
) -> serde_json::Value {
    user.client()
        .post_json(&format!("/api/pods/{pod}/domains/{id}/verify"), &serde_json::json!({}))
        .await
        .assert_status(202);
    eventually(WAIT, "the domain active with a certificate", || async {
        let found = domain(user, pod, id).await?;
        ensure!(
            found["status"] == "active" && found["certificate"].is_object(),
            "{found}\npebble:\n{}",
            pebble.log_tail()
        );
        Ok(found)
    })
    .await
}

/// The DER of the leaf an HTTPS response came with.
fn peer_leaf(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("TLS info with the peer's certificate")
        .to_vec()
}

#[tokio::test]
async fn a_custom_domain_goes_from_dns_records_to_https_with_renewal_and_removal() {
    use instapod_tests::fleet::{Fleet, FleetOptions};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dns_server = ChallTestSrv::start();
    // Pebble validates on the agent's ingress port, so the port is chosen first. Certificates
    // live 120 s and are renewed when they have less than 90 s left: the first one is renewed
    // about 30 s after it was issued.
    let ingress_port = process::free_port();
    let pebble = Pebble::start(ingress_port, &dns_server, 120);
    let fleet = Fleet::start(
        domains_fleet(FleetOptions::regions(["local"]), &dns_server, &pebble)
            .agent_env("INSTAPOD_AGENT_INGRESS_LISTEN", &format!("127.0.0.1:{ingress_port}"))
            .control_plane_env("INSTAPOD_DOMAINS__RENEW_BEFORE_SECS", "90"),
    )
    .await;
    let plain = SocketAddr::from(([127, 0, 0, 1], ingress_port));
    let tls = SocketAddr::from(([127, 0, 0, 1], fleet.nodes[0].ingress_tls_port));
    let user = instapod_tests::scale_user(&fleet.cp).await;
    let image = instapod_tests::node::web_image().await;
    let pod = create_running_pod(&user, "web", &image).await;
    let pod_id = pod["id"].as_str().expect("pod id").to_string();
    let volume = fleet.nodes[0].state_dir.join("volumes").join(&pod_id);
    std::fs::write(volume.join("hello.txt"), "served on a custom domain").expect("write into the volume");
    let cgi = volume.join("cgi-bin");
    std::fs::create_dir_all(&cgi).expect("cgi-bin");
    std::fs::write(
        cgi.join("env.sh"),
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nenv\n",
    )
    .expect("write the script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(cgi.join("env.sh"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    // Added: the records to create.
    let host = format!("shop-{}.example.test", &ids::random_suffix()[..8]);
    let added = user
        .client()
        .post_json("/api/pods/web/domains", &serde_json::json!({"hostname": host}))
        .await
        .json_with_status(201);
    let id = added["id"].as_str().expect("domain id").to_string();
    assert_eq!(added["status"], "pending_dns", "{added}");
    let records = added["records"].as_array().expect("records").clone();
    let record = |kind: &str| {
        records
            .iter()
            .find(|r| r["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} record in {added}"))
            .clone()
    };
    let (txt, cname) = (record("TXT"), record("CNAME"));
    let txt_name = txt["name"].as_str().expect("name").to_string();
    let txt_value = txt["value"].as_str().expect("value").to_string();
    assert_eq!(txt_name, format!("_instapod-challenge.{host}"));
    assert_eq!(cname["name"], host.as_str());
    let cname_target = cname["value"].as_str().expect("value").to_string();

    // Another team cannot claim it, in any spelling.
    let other = instapod_tests::scale_user(&fleet.cp).await;
    other
        .client()
        .post_json(
            "/api/pods",
            &serde_json::json!({"name": "other", "image": image, "plan": "starter", "http_port": 8080}),
        )
        .await
        .json_with_status(202);
    for spelling in [host.clone(), host.to_uppercase(), format!("{host}.")] {
        other
            .client()
            .post_json("/api/pods/other/domains", &serde_json::json!({"hostname": spelling}))
            .await
            .assert_error(409, "domain_taken");
    }

    // A wrong TXT value: failed, and the message names what was found.
    dns_server.set_txt(&txt_name, "instapod-verify=not-the-token").await;
    dns_server.set_cname(&host, &cname_target).await;
    user.client()
        .post_json(&format!("/api/pods/web/domains/{id}/verify"), &serde_json::json!({}))
        .await
        .assert_status(202);
    let failed = eventually(WAIT, "the wrong TXT reported", || async {
        let found = domain(&user, "web", &id).await?;
        ensure!(found["status"] == "failed", "{found}");
        Ok(found)
    })
    .await;
    let message = failed["status_message"].as_str().unwrap_or_default();
    assert!(message.contains("instapod-verify=not-the-token"), "{failed}");
    assert!(message.contains(&txt_name), "{failed}");

    // Fixed: verified, then a certificate from Pebble, then active.
    dns_server.set_txt(&txt_name, &txt_value).await;
    let active = verify_until_active(&user, "web", &id, &pebble).await;
    assert!(active["verified_at"].is_string(), "{active}");

    // HTTPS with SNI through the agent's TLS ingress reaches the pod, valid for Pebble's root.
    let root = pebble.issuing_root_pem().await;
    let client = https_client(&root, &host, tls);
    let https = |path: &str| format!("https://{host}:{}{path}", tls.port());
    let first_leaf = eventually(WAIT, "the pod over HTTPS on its custom domain", || async {
        let response = client.get(https("/hello.txt")).send().await?;
        let leaf = peer_leaf(&response);
        let status = response.status().as_u16();
        let body = response.text().await?;
        ensure!(status == 200 && body == "served on a custom domain", "{status}: {body}");
        Ok(leaf)
    })
    .await;
    let env = client
        .get(https("/cgi-bin/env.sh"))
        .send()
        .await
        .expect("HTTPS")
        .text()
        .await
        .expect("body");
    assert!(env.lines().any(|l| l == "HTTP_X_FORWARDED_PROTO=https"), "{env}");
    assert!(
        env.lines().any(|l| l == format!("HTTP_HOST={host}:{}", tls.port())),
        "{env}"
    );

    // Plain HTTP redirects to HTTPS (308) on the TLS ingress's port, keeping the path.
    let plain_client = instapod_tests::http_builder()
        .no_proxy()
        .resolve(&host, plain)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let response = plain_client
        .get(format!("http://{host}:{ingress_port}/hello.txt?x=1"))
        .send()
        .await
        .expect("plain HTTP");
    assert_eq!(response.status().as_u16(), 308);
    assert_eq!(
        response.headers().get("location").and_then(|v| v.to_str().ok()),
        Some(format!("https://{host}:{}/hello.txt?x=1", tls.port()).as_str()),
        "the redirect names the TLS ingress's port (not 443 here)"
    );

    // Renewal: a second certificate replaces the first before it expires, and is served.
    let first_not_after = active["certificate"]["not_after"].clone();
    eventually(Duration::from_secs(150), "a renewed certificate served", || async {
        // A new client each time: a kept-alive connection or a resumed session would show the
        // certificate of its first handshake.
        let response = https_client(&root, &host, tls).get(https("/hello.txt")).send().await?;
        ensure!(response.status().as_u16() == 200, "{}", response.status());
        ensure!(peer_leaf(&response) != first_leaf, "still the first certificate");
        Ok(())
    })
    .await;
    let renewed = domain(&user, "web", &id).await.expect("the domain");
    assert_eq!(renewed["status"], "active", "{renewed}");
    assert_ne!(renewed["certificate"]["not_after"], first_not_after, "{renewed}");

    // Removed: no certificate for the name any more, and plain HTTP is 404.
    user.client()
        .delete_response(&format!("/api/pods/web/domains/{id}"))
        .await
        .assert_status(204);
    eventually(WAIT, "the domain no longer served", || async {
        // A new client: no kept-alive connection, no resumed session.
        let fresh = https_client(&root, &host, tls);
        ensure!(
            fresh.get(https("/hello.txt")).send().await.is_err(),
            "HTTPS still answers"
        );
        let status = plain_client
            .get(format!("http://{host}:{ingress_port}/hello.txt"))
            .send()
            .await?
            .status()
            .as_u16();
        ensure!(status == 404, "plain HTTP answers {status}");
        Ok(())
    })
    .await;
    drop(fleet);
    drop(pebble);
}

/// `options` with custom domains on: the agents resolve with `dns`, trust Pebble's HTTPS, and
/// the control plane orders from Pebble with a fresh key encryption key, its worker every
/// second and retries within 1–5 s.
fn domains_fleet(
    options: instapod_tests::fleet::FleetOptions,
    dns: &ChallTestSrv,
    pebble: &Pebble,
) -> instapod_tests::fleet::FleetOptions {
    let key = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(rand_bytes())
    };
    options
        .agent_env(
            "INSTAPOD_AGENT_DOMAINS__NAMESERVERS",
            &format!("[\"{}\"]", dns.dns_addr()),
        )
        .agent_env("INSTAPOD_AGENT_DOMAINS__RESOLVER_TIMEOUT_SECS", "2")
        .agent_env(
            "INSTAPOD_AGENT_ACME__CA_FILE",
            &pebble.tls_ca_file().display().to_string(),
        )
        .control_plane_env("INSTAPOD_DOMAINS__ACME_DIRECTORY_URL", &pebble.directory_url())
        .control_plane_env("INSTAPOD_DOMAINS__KEY_ENCRYPTION_KEY", &key)
        .control_plane_env("INSTAPOD_DOMAINS__WORKER_INTERVAL_SECS", "1")
        .control_plane_env("INSTAPOD_DOMAINS__RETRY_MIN_SECS", "1")
        .control_plane_env("INSTAPOD_DOMAINS__RETRY_MAX_SECS", "5")
}

/// The records the API asked for when `added` was added: the TXT's name and value and the
/// CNAME's target.
fn asked_records(added: &serde_json::Value) -> (String, String, String) {
    let records = added["records"].as_array().expect("records");
    let record = |kind: &str| {
        records
            .iter()
            .find(|r| r["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} record in {added}"))
    };
    let (txt, cname) = (record("TXT"), record("CNAME"));
    let text = |value: &serde_json::Value| value.as_str().expect("a string").to_string();
    (text(&txt["name"]), text(&txt["value"]), text(&cname["value"]))
}

/// Two nodes on 127.0.0.2 and 127.0.0.3, the same ingress port (the one Pebble validates on).
/// The name's DNS points at the node the pod does not run on: Pebble's HTTP-01 request reaches
/// that node, which does not know the token and forwards the request to the pod's node (the
/// one that placed the order), which answers it. Then both nodes serve the certificate.
#[tokio::test]
async fn an_http01_challenge_reaching_another_node_is_answered_by_the_pods_node() {
    use instapod_tests::fleet::{Fleet, FleetOptions};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dns_server = ChallTestSrv::start();
    let ingress_port = process::free_port();
    let pebble = Pebble::start(ingress_port, &dns_server, 3600);
    let address = |index: usize| format!("127.0.0.{}", index + 2);
    let listen = |index: usize| format!("{}:{ingress_port}", address(index));
    let fleet = Fleet::start(
        domains_fleet(FleetOptions::regions(["local", "local"]), &dns_server, &pebble)
            .node_agent_env(0, "INSTAPOD_AGENT_INGRESS_LISTEN", &listen(0))
            .node_agent_env(1, "INSTAPOD_AGENT_INGRESS_LISTEN", &listen(1)),
    )
    .await;
    let user = instapod_tests::scale_user(&fleet.cp).await;
    let image = instapod_tests::node::web_image().await;
    let pod = create_running_pod(&user, "web", &image).await;
    let pod_id = pod["id"].as_str().expect("pod id").to_string();
    let node = pod["node"].as_str().expect("a running pod has a node");
    let owner = (0..2)
        .find(|&index| node == format!("node-{index}-local"))
        .unwrap_or_else(|| panic!("unknown node {node}"));
    let other = 1 - owner;
    let volume = fleet.nodes[owner].state_dir.join("volumes").join(&pod_id);
    std::fs::write(volume.join("hello.txt"), "one pod, two nodes").expect("write into the volume");

    let host = format!("multi-{}.example.test", &ids::random_suffix()[..8]);
    let added = user
        .client()
        .post_json("/api/pods/web/domains", &serde_json::json!({"hostname": host}))
        .await
        .json_with_status(201);
    let id = added["id"].as_str().expect("domain id").to_string();
    let (txt_name, txt_value, cname_target) = asked_records(&added);
    dns_server.set_txt(&txt_name, &txt_value).await;
    dns_server.set_cname(&host, &cname_target).await;
    // The pod's platform name resolves to the other node (challtestsrv follows the CNAME).
    dns_server.add_a(&cname_target, &[&address(other)]).await;
    let active = verify_until_active(&user, "web", &id, &pebble).await;
    assert!(active["verified_at"].is_string(), "{active}");
    // The validation went through the other node to the pod's node.
    assert!(
        fleet.ingress_requests(other, "forwarded").await >= 1.0,
        "the other node forwarded nothing"
    );
    assert_eq!(fleet.ingress_requests(other, "acme_challenge").await, 0.0);
    assert!(
        fleet.ingress_requests(owner, "acme_challenge").await >= 1.0,
        "the pod's node answered no challenge"
    );

    // Every node's TLS ingress serves the certificate and reaches the pod.
    let root = pebble.issuing_root_pem().await;
    for index in [owner, other] {
        let tls = SocketAddr::from(([127, 0, 0, 1], fleet.nodes[index].ingress_tls_port));
        let client = https_client(&root, &host, tls);
        let url = format!("https://{host}:{}/hello.txt", tls.port());
        eventually(WAIT, &format!("HTTPS through node {index}"), || async {
            let response = client.get(&url).send().await?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            ensure!(status == 200 && body == "one pod, two nodes", "{status}: {body}");
            Ok(())
        })
        .await;
    }
    user.client().delete_response("/api/pods/web").await.assert_status(202);
    eventually(WAIT, "the pod deleted", || async {
        let status = user.client().get("/api/pods/web").send().await.status;
        ensure!(status == 404, "still {status}");
        Ok(())
    })
    .await;
    drop(fleet);
    drop(pebble);
}

/// 32 random bytes (the control plane's key encryption key).
fn rand_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(16) {
        chunk.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    bytes
}
