//! Benchmark: a custom domain from `POST /api/pods/{name}/domains` to HTTPS served through the
//! node's TLS ingress, with Pebble as the CA and the DNS records already correct (created
//! right after the add, before verify), end to end.
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --workspace --bins
//! cargo run -p instapod-tests --example bench_domain_https   # as root; BENCH_N=<rounds>, default 5
//! ```
//!
//! Set-up (not timed): pebble-challtestsrv and Pebble (`PEBBLE_VA_NOSLEEP=1`), a fleet of one
//! node (control plane with `worker_interval_secs` 1, scheduler, agent), a user and a running
//! busybox web pod. Each round adds a new host name, sets its TXT and CNAME in the DNS server,
//! asks for verification, and polls `https://<host>/` through the TLS ingress (a new client
//! every 50 ms, trusting only Pebble's root) until the pod answers 200 (a file written into its volume). Prints every round,
//! the median and the maximum.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use instapod_tests::acme::{ChallTestSrv, Pebble};
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::{ids, process, scale_user};
use serde_json::json;

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rounds: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let dns = ChallTestSrv::start();
    let ingress_port = process::free_port();
    let pebble = Pebble::start(ingress_port, &dns, 90 * 86_400);
    let fleet = Fleet::start(
        FleetOptions::regions(["local"])
            .quiet_logs()
            .agent_env("INSTAPOD_AGENT_INGRESS_LISTEN", &format!("127.0.0.1:{ingress_port}"))
            .agent_env(
                "INSTAPOD_AGENT_DOMAINS__NAMESERVERS",
                &format!("[\"{}\"]", dns.dns_addr()),
            )
            .agent_env(
                "INSTAPOD_AGENT_ACME__CA_FILE",
                &pebble.tls_ca_file().display().to_string(),
            )
            .control_plane_env("INSTAPOD_DOMAINS__ACME_DIRECTORY_URL", &pebble.directory_url())
            .control_plane_env("INSTAPOD_DOMAINS__WORKER_INTERVAL_SECS", "1"),
    )
    .await;
    let tls = SocketAddr::from(([127, 0, 0, 1], fleet.nodes[0].ingress_tls_port));
    let user = scale_user(&fleet.cp).await;
    let image = instapod_tests::node::web_image().await;
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": "web", "image": image, "plan": "starter", "http_port": 8080}),
        )
        .await
        .json_with_status(202);
    let started = Instant::now();
    loop {
        let body = user.client().get("/api/pods/web").send().await.json();
        if body["state"] == "running" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the pod does not run: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pod = user.client().get("/api/pods/web").send().await.json();
    let pod_id = pod["id"].as_str().expect("pod id");
    std::fs::write(
        fleet.nodes[0].state_dir.join("volumes").join(pod_id).join("hello.txt"),
        "hello",
    )
    .expect("write into the volume");
    let root = reqwest::Certificate::from_pem(pebble.issuing_root_pem().await.as_bytes()).expect("PEM");
    let mut times = Vec::new();
    for round in 0..rounds {
        let host = format!("bench-{round}-{}.example.test", &ids::random_suffix()[..6]);
        let started = Instant::now();
        let added = user
            .client()
            .post_json("/api/pods/web/domains", &json!({"hostname": host}))
            .await
            .json_with_status(201);
        let id = added["id"].as_str().expect("id").to_string();
        for record in added["records"].as_array().expect("records") {
            let (name, value) = (
                record["name"].as_str().expect("name"),
                record["value"].as_str().expect("value"),
            );
            match record["type"].as_str() {
                Some("TXT") => dns.set_txt(name, value).await,
                Some("CNAME") => dns.set_cname(name, value).await,
                other => panic!("unexpected record {other:?}"),
            }
        }
        user.client()
            .post_json(&format!("/api/pods/web/domains/{id}/verify"), &json!({}))
            .await
            .assert_status(202);
        loop {
            let client = instapod_tests::http_builder()
                .no_proxy()
                .tls_built_in_root_certs(false)
                .add_root_certificate(root.clone())
                .resolve(&host, tls)
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let answered = client
                .get(format!("https://{host}:{}/hello.txt", tls.port()))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200);
            if answered {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{host} not served over HTTPS: {}",
                pebble.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = started.elapsed();
        println!("round {round}: {host} add → HTTPS 200 in {:.2} s", took.as_secs_f64());
        times.push(took);
    }
    times.sort();
    println!(
        "add → HTTPS serving, {rounds} rounds: median {:.2} s, max {:.2} s",
        times[times.len() / 2].as_secs_f64(),
        times[times.len() - 1].as_secs_f64()
    );
}
