//! Benchmark: the node agent's ingress, plain HTTP and TLS-terminating, against the same
//! upstream reached directly, in the same run.
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo run --release -p instapod-tests --example bench_ingress_tls   # BENCH_N=<requests per series>, default 20000; BENCH_ROUNDS, default 3
//! ```
//!
//! Set-up (not timed): an upstream on 127.0.0.1 standing in for a pod (HTTP/1.1 keep-alive, a
//! 13-byte answer to every GET; in-process so that its own cost is small and equal for every
//! series), the agent's [`Ingress`] on a plain listener and on its TLS listener (rustls,
//! certificate chosen by SNI among the served custom domains; a self-signed certificate made
//! with the openssl CLI by `instapod_tests::acme::self_signed`), the host routed to the upstream like a custom domain of its pod.
//!
//! The ingress runs on a tokio runtime of its own (two workers, named `ingress`, as in the
//! agent's process on this machine; `BENCH_INGRESS_WORKERS` to try others); the clients on the
//! main one.
//!
//! Series, each `BENCH_N` GET requests from `BENCH_CLIENTS` (16) concurrent clients, run in
//! turn for `BENCH_ROUNDS` rounds; each round's figures are printed, then each series' median
//! of requests per second and of CPU time per request (the whole machine's, from `/proc/stat`,
//! and the ingress threads' own, from `/proc/self/task`; both move much less between rounds
//! than the rates):
//! - **direct**: HTTP keep-alive straight to the upstream;
//! - **ingress http**: HTTP keep-alive through the ingress;
//! - **ingress https (kept)**: HTTPS keep-alive through the TLS ingress (one handshake per
//!   client connection);
//! - **ingress https (resumed)**: a new TLS connection per request, resuming the session
//!   (rustls's client session cache and the ingress's tickets);
//! - **ingress http (new conn)**: a new TCP connection per request through the plain ingress:
//!   the resumed series without TLS, the bound of anything done to the TLS side.
//!
//! The two new-connection series send `Connection: close`, as clients that open a connection
//! per request do (Go's `DisableKeepAlives`, `hey -disable-keepalive`, `ab`): the server then
//! ends each connection with its answer.
//!
//! Each series also counts its requests that took 500 ms or more (`stalled`): what waited for a
//! retransmission rather than for CPU, such as a SYN that a full accept queue dropped, which
//! the kernel sends again only after one second.
//!
//! Then latency: 2000 sequential requests from one client, direct and through the ingress
//! (plain HTTP, keep-alive): p50 and p99, and the added p50.
//!
//! With `BENCH_UPSTREAM=pod` the upstream is a real pod instead: busybox `httpd` serving the
//! same 12 bytes from its image, started by the agent's pod manager on the harness's containerd
//! (runc, CNI bridge) with a CPU limit of 1.75 cores (the most a test node allows), reached at
//! its own IP. busybox `httpd` forks a process per connection and closes it after each answer,
//! so every direct request is a new connection to the pod, and through the ingress every
//! upstream request is one too (the client's connection to the ingress is kept).

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instapod_common::domains::{ServedCertificate, ServedDomain, ServedDomains};
use instapod_node_agent::domains::challenges::ChallengeStore;
use instapod_node_agent::domains::tls::{SniResolver, server_config};
use instapod_node_agent::domains::{IngressDomains, Served};
use instapod_node_agent::ingress::{FixedRoutes, Ingress, RoutingTable, Target};

const HOST: &str = "bench.example.test";
/// A count from the environment variable `name` (at least 1), or `default`: `BENCH_N`,
/// `BENCH_ROUNDS`, `BENCH_CLIENTS` (concurrent clients per series) and `BENCH_INGRESS_WORKERS`
/// (worker threads of the ingress's runtime).
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// A keep-alive upstream answering every request head with `hello, bench`.
async fn upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buffer = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        buffer.drain(..end + 4);
                        let answer =
                            b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-type: text/plain\r\n\r\nhello, bench";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The requests [`throughput`] sends for `n` over `clients` clients: the same number each.
fn requests_sent(n: usize, clients: usize) -> usize {
    n / clients * clients
}

/// A request slower than this waited for a retransmission (a SYN dropped by a full accept queue
/// is sent again by the kernel after one second), not for CPU.
const STALLED: Duration = Duration::from_millis(500);

/// `n` GETs from concurrent tasks, one per client: requests per second, and how many took
/// [`STALLED`] or longer.
async fn throughput(clients: Vec<reqwest::Client>, url: String, n: usize) -> (f64, usize) {
    let started = Instant::now();
    let sent = requests_sent(n, clients.len());
    let per_client = n / clients.len();
    let mut tasks = Vec::new();
    for client in clients {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut stalled = 0;
            for _ in 0..per_client {
                let asked = Instant::now();
                let response = client.get(&url).send().await.expect("a response");
                assert_eq!(response.status().as_u16(), 200);
                let body = response.bytes().await.expect("body");
                assert_eq!(&body[..], b"hello, bench");
                stalled += usize::from(asked.elapsed() >= STALLED);
            }
            stalled
        }));
    }
    let mut stalled = 0;
    for task in tasks {
        stalled += task.await.expect("a client task");
    }
    (sent as f64 / started.elapsed().as_secs_f64(), stalled)
}

/// One series' figures: requests per second, and CPU microseconds per request of the whole
/// machine and of the ingress's threads.
#[derive(Debug, Clone, Copy)]
struct Measured {
    rate: f64,
    machine_us: f64,
    ingress_us: f64,
    /// Requests that took [`STALLED`] or longer.
    stalled: usize,
}

/// [`throughput`], with the CPU time the machine and the ingress's threads spent meanwhile.
async fn measure(clients: Vec<reqwest::Client>, url: String, n: usize) -> Measured {
    use instapod_tests::cpu::{machine_busy_seconds, own_threads_seconds};
    let (machine, ingress) = (machine_busy_seconds(), own_threads_seconds("ingress"));
    let requests = requests_sent(n, clients.len()) as f64;
    let (rate, stalled) = throughput(clients, url, n).await;
    Measured {
        rate,
        stalled,
        machine_us: (machine_busy_seconds() - machine) * 1e6 / requests,
        ingress_us: (own_threads_seconds("ingress") - ingress) * 1e6 / requests,
    }
}

/// Sequential GETs from one client: sorted latencies.
async fn latencies(client: &reqwest::Client, url: &str, n: usize) -> Vec<Duration> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let response = client.get(url).send().await.expect("a response");
        let _ = response.bytes().await.expect("body");
        all.push(started.elapsed());
    }
    all.sort();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A running busybox `httpd` pod answering `hello, bench`: the node (kept alive by the caller),
/// the pod's address and id.
async fn pod_upstream() -> (instapod_tests::node::TestNode, SocketAddr, uuid::Uuid) {
    use instapod_common::node::NodeJob;
    let registry = instapod_tests::registry::shared();
    let repository = format!("bench/ingress-{}", &instapod_tests::ids::random_suffix()[..8]);
    instapod_tests::images::ImageBuilder::busybox()
        .file("/www/index.html", "hello, bench", 0o644)
        .entrypoint(["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"])
        .build()
        .push(&registry.base_url(), &repository, "1")
        .await
        .expect("push the pod's image");
    let node = instapod_tests::node::TestNode::start("bench-ingress").await;
    let mut spec = instapod_tests::node::pod_spec(&format!("{}/{repository}:1", registry.host()), 1);
    spec.resources.cpu_millis = 1750;
    spec.resources.pids = 1024;
    node.pods
        .handle(&NodeJob::EnsureRunning { spec: spec.clone() })
        .await
        .expect("the pod starts");
    let client = instapod_tests::http_builder().no_proxy().build().expect("client");
    // Bounded: 30 s for the pod to get its address and answer.
    for _ in 0..300 {
        let ip = node.pods.record(spec.pod_id).and_then(|r| r.attachment).map(|a| a.ip);
        if let Some(ip) = ip {
            let addr: SocketAddr = format!("{ip}:8080").parse().expect("an address");
            if client.get(format!("http://{addr}/")).send().await.is_ok() {
                return (node, addr, spec.pod_id);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the pod did not answer within 30 s: {:?}",
        node.pods.record(spec.pod_id)
    );
}

/// `net.ipv4.tcp_tw_reuse` set to 1 while it lives, restored when dropped.
///
/// busybox `httpd` answers `Connection: close`, and whoever reads that answer (the bench's
/// client in the direct series, the ingress in the others) closes first, so each request leaves
/// a TIME_WAIT socket from the host's bridge address to the pod's `ip:8080` for 60 s. At a few
/// thousand requests per second the 28,000 ephemeral ports to that one destination run out
/// within a round, and `connect` spends whole seconds of system time searching for a free port
/// (the kernel's default, 2, reuses TIME_WAIT ports on loopback only). With 1 a port in
/// TIME_WAIT is reused for a new outgoing connection when TCP timestamps make it safe: what a
/// node that proxies to pods closing their connections needs anyway (docs/node-agent.md).
struct TimeWaitReuse(Option<String>);

impl TimeWaitReuse {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";

    fn enable() -> TimeWaitReuse {
        let before = std::fs::read_to_string(Self::PATH).ok().map(|v| v.trim().to_string());
        if before.as_deref() != Some("1") {
            std::fs::write(Self::PATH, "1").expect("set net.ipv4.tcp_tw_reuse (as root)");
            println!(
                "net.ipv4.tcp_tw_reuse = 1 for this run (was {})",
                before.as_deref().unwrap_or("?")
            );
            return TimeWaitReuse(before);
        }
        TimeWaitReuse(None)
    }
}

impl Drop for TimeWaitReuse {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            let _ = std::fs::write(Self::PATH, before);
        }
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let n = env_count("BENCH_N", 20_000);
    let rounds = env_count("BENCH_ROUNDS", 3);
    let concurrency = env_count("BENCH_CLIENTS", 16);
    let real_pod = std::env::var("BENCH_UPSTREAM").is_ok_and(|v| v == "pod");
    let _reuse = real_pod.then(TimeWaitReuse::enable);
    let (node, pod, pod_id) = if real_pod {
        let (node, addr, id) = pod_upstream().await;
        (Some(node), addr, id)
    } else {
        (None, upstream().await, uuid::Uuid::new_v4())
    };
    println!(
        "upstream: {}",
        if real_pod {
            "a busybox httpd pod (containerd, runc, CNI) at its own IP"
        } else {
            "in-process keep-alive server"
        }
    );
    let mut table = RoutingTable::default();
    table.insert("web-a.apps.test", Target::Pod { pod_id, addr: pod });
    table.note_pod_host(pod_id, "web-a.apps.test");
    let (chain_pem, key_pem) = instapod_tests::acme::self_signed(HOST, 1);
    let served = Arc::new(Served::default());
    served.apply(&ServedDomains {
        version: "1".into(),
        domains: vec![ServedDomain {
            domain_id: uuid::Uuid::new_v4(),
            pod_id,
            hostname: HOST.into(),
            certificate: Some(ServedCertificate {
                chain_pem: chain_pem.clone(),
                key_pem,
                not_after: i64::MAX,
            }),
        }],
    });
    let ingress = Arc::new(
        Ingress::new(Arc::new(FixedRoutes::new(table))).with_domains(Arc::new(IngressDomains {
            served: served.clone(),
            challenges: Arc::new(ChallengeStore::default()),
        })),
    );
    // The ingress on a runtime of its own, as in the agent's process (two workers: the
    // agent's default on this machine), so that it does not share worker threads with the
    // clients.
    let ingress_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_count("BENCH_INGRESS_WORKERS", 2))
        .thread_name("ingress")
        .enable_all()
        .build()
        .expect("the ingress's runtime");
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain_addr = plain.local_addr().expect("address");
    ingress_runtime.spawn(ingress.clone().serve(plain));
    let tls = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_addr = tls.local_addr().expect("address");
    let config = server_config(Arc::new(SniResolver::new(served, None))).expect("TLS config");
    ingress_runtime.spawn(instapod_node_agent::domains::tls::serve(tls, ingress, config));

    // Redirects are off: plain HTTP to a domain with a certificate answers 308, so the plain
    // series uses the pod's platform name, routed the same way.
    // Without keep-alive, a new connection per request.
    // A client that opens a connection per request says so (`Connection: close`, as Go's
    // clients, `ab` and `hey -disable-keepalive` do), so the server ends the connection.
    let closing = || {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::CONNECTION,
            reqwest::header::HeaderValue::from_static("close"),
        );
        headers
    };
    let plain_client = |resolve: SocketAddr, host: &str, keep_alive: bool| {
        let mut builder = instapod_tests::http_builder().no_proxy().resolve(host, resolve);
        if !keep_alive {
            builder = builder.pool_max_idle_per_host(0).default_headers(closing());
        }
        builder.build().expect("client")
    };
    let root = reqwest::Certificate::from_pem(chain_pem.as_bytes()).expect("PEM");
    let tls_client = |keep_alive: bool| {
        let mut builder = instapod_tests::http_builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root.clone())
            .resolve(HOST, tls_addr);
        if !keep_alive {
            builder = builder.pool_max_idle_per_host(0).default_headers(closing());
        }
        builder.build().expect("client")
    };
    let direct_url = format!("http://{pod}/");
    let plain_url = format!("http://web-a.apps.test:{}/", plain_addr.port());
    let tls_url = format!("https://{HOST}:{}/", tls_addr.port());

    // Warm-up: connections, TLS session caches, the allocator.
    let warm = n / 10;
    let _ = throughput(
        (0..concurrency).map(|_| plain_client(pod, "x", true)).collect(),
        direct_url.clone(),
        warm,
    )
    .await;
    let _ = throughput(
        (0..concurrency)
            .map(|_| plain_client(plain_addr, "web-a.apps.test", true))
            .collect(),
        plain_url.clone(),
        warm,
    )
    .await;
    let _ = throughput(
        (0..concurrency).map(|_| tls_client(true)).collect(),
        tls_url.clone(),
        warm,
    )
    .await;

    // Rounds of the four series in turn; the medians are reported (one round's figures move
    // by ±15% on this 2-core machine). Each series also reports CPU time per request: the
    // machine's (everything: clients, ingress, upstream, kernel) and the ingress threads' own,
    // which move much less from round to round than the rates.
    const NAMES: [&str; 5] = ["direct", "http", "https kept", "https resumed", "http new conn"];
    let mut series: [Vec<Measured>; 5] = Default::default();
    for round in 1..=rounds {
        let direct = measure(
            (0..concurrency).map(|_| plain_client(pod, "x", true)).collect(),
            direct_url.clone(),
            n,
        )
        .await;
        let via_http = measure(
            (0..concurrency)
                .map(|_| plain_client(plain_addr, "web-a.apps.test", true))
                .collect(),
            plain_url.clone(),
            n,
        )
        .await;
        let via_https = measure((0..concurrency).map(|_| tls_client(true)).collect(), tls_url.clone(), n).await;
        let resumed_clients: Vec<reqwest::Client> = (0..concurrency).map(|_| tls_client(false)).collect();
        // One request per client first, so that every later connection resumes a session.
        let _ = throughput(resumed_clients.clone(), tls_url.clone(), concurrency).await;
        let via_https_resumed = measure(resumed_clients, tls_url.clone(), n / 4).await;
        // A new connection per request through the plain ingress: what the resumed series
        // costs without TLS (the bound of anything done to the TLS side).
        let via_http_per_request = measure(
            (0..concurrency)
                .map(|_| plain_client(plain_addr, "web-a.apps.test", false))
                .collect(),
            plain_url.clone(),
            n / 4,
        )
        .await;
        let all = [direct, via_http, via_https, via_https_resumed, via_http_per_request];
        let line: Vec<String> = NAMES
            .iter()
            .zip(&all)
            .map(|(name, m)| {
                format!(
                    "{name} {:.0} ({:.2}; {:.0}/{:.0} µs; {} stalled)",
                    m.rate,
                    m.rate / direct.rate,
                    m.machine_us,
                    m.ingress_us,
                    m.stalled
                )
            })
            .collect();
        println!("round {round}: {}", line.join(", "));
        for (all, value) in series.iter_mut().zip(all) {
            all.push(value);
        }
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let medians = series.clone().map(|all| Measured {
        rate: median(&mut all.iter().map(|m| m.rate).collect()),
        machine_us: median(&mut all.iter().map(|m| m.machine_us).collect()),
        ingress_us: median(&mut all.iter().map(|m| m.ingress_us).collect()),
        stalled: all.iter().map(|m| m.stalled).sum(),
    });
    // Each round's ratio pairs series measured a minute apart; their median is steadier than
    // the ratio of the medians when the machine drifts between rounds.
    let round_ratios: Vec<f64> = series
        .iter()
        .map(|all| median(&mut all.iter().zip(&series[0]).map(|(m, d)| m.rate / d.rate).collect()))
        .collect();

    println!(
        "medians of {rounds} rounds, {} concurrent clients, {n} requests per series (new conn: {}):",
        concurrency,
        n / 4
    );
    println!(
        "  series                             requests/s  round ratio  machine CPU µs/req  ingress CPU µs/req  stalled ≥ {} ms (all rounds)",
        STALLED.as_millis()
    );
    let labels = [
        "direct",
        "ingress http (keep-alive)",
        "ingress https (keep-alive)",
        "ingress https (new conn, resumed)",
        "ingress http (new conn)",
    ];
    for ((label, m), ratio) in labels.iter().zip(&medians).zip(&round_ratios) {
        println!(
            "  {label:<34} {:>10.0}  {:>11.2}  {:>18.0}  {:>18.0}  {:>8}",
            m.rate, ratio, m.machine_us, m.ingress_us, m.stalled
        );
    }
    println!(
        "  CPU per request, direct / resumed: {:.2} (the ratio the rates would have on a machine kept busy)",
        medians[0].machine_us / medians[3].machine_us
    );

    let one_direct = plain_client(pod, "x", true);
    let one_ingress = plain_client(plain_addr, "web-a.apps.test", true);
    latencies(&one_direct, &direct_url, 200).await;
    latencies(&one_ingress, &plain_url, 200).await;
    let direct_lat = latencies(&one_direct, &direct_url, 2000).await;
    let ingress_lat = latencies(&one_ingress, &plain_url, 2000).await;
    let p50_direct = percentile(&direct_lat, 0.5);
    let p50_ingress = percentile(&ingress_lat, 0.5);
    println!("latency, one client, 2000 sequential requests:");
    println!(
        "  direct   p50 {:>8.3} ms  p99 {:>8.3} ms",
        p50_direct.as_secs_f64() * 1e3,
        percentile(&direct_lat, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  ingress  p50 {:>8.3} ms  p99 {:>8.3} ms",
        p50_ingress.as_secs_f64() * 1e3,
        percentile(&ingress_lat, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  added p50 {:.3} ms",
        (p50_ingress.as_secs_f64() - p50_direct.as_secs_f64()) * 1e3
    );
    if let Some(node) = node {
        node.pods
            .handle(&instapod_common::node::NodeJob::Delete {
                pod_id,
                generation: 2,
                retain_volume: false,
            })
            .await
            .expect("the pod is deleted");
    }
    ingress_runtime.shutdown_background();
}
