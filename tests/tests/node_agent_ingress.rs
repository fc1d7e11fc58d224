//! The node ingress against real pods (containerd, runc, CNI): requests routed by host name to
//! a busybox pod, forwarding headers seen by a CGI script in the pod, 20 MiB bodies streamed
//! both ways intact, the 404/502/503 pages, and an upgrade turned into a byte tunnel to a pod
//! that speaks it (busybox `nc -ll -e` running a script from the volume).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use instapod_common::node::{NodeJob, NodePodState, PodSpec};
use instapod_tests::eventually;
use instapod_tests::ids::random_suffix;
use instapod_tests::node::{TestNode, pod_spec, web_image};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(30);
const BIG: usize = 20 << 20;

/// A client that sends `host` to the ingress (the URL keeps the name, so `Host` carries it
/// with the ingress's port, which routing must ignore).
fn client_for(host: &str, ingress: SocketAddr) -> reqwest::Client {
    instapod_tests::http_builder()
        .no_proxy()
        .resolve(host, ingress)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

fn url(host: &str, ingress: SocketAddr, path: &str) -> String {
    format!("http://{host}:{}{path}", ingress.port())
}

/// Starts a pod of `spec` answering to `host`, and waits until its record says running.
async fn start_pod(node: &TestNode, mut spec: PodSpec, host: &str) -> PodSpec {
    spec.hostnames = vec![host.to_string()];
    node.pods
        .handle(&NodeJob::EnsureRunning { spec: spec.clone() })
        .await
        .expect("ensure_running");
    let state = node.pods.record(spec.pod_id).map(|r| r.state);
    assert_eq!(
        state,
        Some(NodePodState::Running),
        "{:?}",
        node.pods.record(spec.pod_id)
    );
    spec
}

fn write_script(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("script directory");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// `len` bytes that are not all alike (a SHA-256 chain), so a reordered or lost chunk shows.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block: [u8; 32] = Sha256::digest(b"instapod ingress").into();
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(block).into();
    }
    out.truncate(len);
    out
}

#[tokio::test]
async fn a_pod_answers_on_its_host_name_with_forwarding_headers_and_large_bodies_both_ways() {
    let node = TestNode::start("ingress-web").await;
    let ingress = node.start_ingress().await;
    let host = format!("web-{}.apps.test", random_suffix());
    let spec = start_pod(&node, pod_spec(&web_image().await, 1), &host).await;
    let volume = node.dirs.volume(spec.pod_id);
    std::fs::write(volume.join("hello.txt"), "served through the ingress").expect("write into the volume");
    let http = client_for(&host, ingress);

    // Host names are matched without case, port or trailing dot. A pod is running once its
    // process started, which can be a moment before it listens: 502 until then.
    let (status, body) = eventually(WAIT, "the pod through the ingress", || async {
        let response = http.get(url(&host, ingress, "/hello.txt")).send().await?;
        anyhow::ensure!(response.status() != 502, "the pod does not listen yet");
        Ok((response.status().as_u16(), response.text().await?))
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "served through the ingress"));
    let shouting = format!("{}.", host.to_uppercase());
    let response = client_for(&shouting, ingress)
        .get(url(&shouting, ingress, "/hello.txt"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);

    // What the pod sees: busybox httpd hands request headers to CGI scripts as HTTP_*.
    let cgi = volume.join("cgi-bin");
    write_script(
        &cgi,
        "env.sh",
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nenv\n",
    );
    write_script(
        &cgi,
        "count.sh",
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nwc -c\n",
    );
    let response = http
        .get(url(&host, ingress, "/cgi-bin/env.sh?x=1&y=two"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-host", "evil.test")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "dropped")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let env = response.text().await.expect("body");
    let has = |line: &str| env.lines().any(|l| l == line);
    let port = ingress.port();
    for line in [
        "HTTP_X_FORWARDED_FOR=203.0.113.9, 127.0.0.1".to_string(),
        "HTTP_X_FORWARDED_PROTO=http".to_string(),
        format!("HTTP_X_FORWARDED_HOST={host}:{port}"),
        format!("HTTP_HOST={host}:{port}"),
        "REQUEST_URI=/cgi-bin/env.sh?x=1&y=two".to_string(),
        "QUERY_STRING=x=1&y=two".to_string(),
    ] {
        assert!(has(&line), "{line:?} missing from the pod's environment:\n{env}");
    }
    assert!(
        !env.contains("HTTP_X_PRIVATE"),
        "a header named by Connection reached the pod:\n{env}"
    );

    // 20 MiB from the pod, streamed, intact.
    let big = pseudo_random(BIG);
    std::fs::write(volume.join("big.bin"), &big).expect("write the big file");
    let mut response = http.get(url(&host, ingress, "/big.bin")).send().await.expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let (mut hasher, mut received) = (Sha256::new(), 0usize);
    while let Some(chunk) = response.chunk().await.expect("body chunk") {
        received += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(received, BIG);
    assert_eq!(hex::encode(hasher.finalize()), hex::encode(Sha256::digest(&big)));

    // 20 MiB to the pod: the script counts what arrives.
    let response = http
        .post(url(&host, ingress, "/cgi-bin/count.sh"))
        .body(big)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.expect("body").trim(), BIG.to_string());
}

#[tokio::test]
async fn unknown_hosts_get_404_stopped_pods_503_naming_the_state_and_silent_pods_502() {
    let node = TestNode::start("ingress-pages").await;
    let ingress = node.start_ingress().await;
    let image = web_image().await;

    let unknown = format!("nobody-{}.apps.test", random_suffix());
    let response = client_for(&unknown, ingress)
        .get(url(&unknown, ingress, "/"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    let page = response.text().await.expect("body");
    assert!(page.contains(&unknown), "{page}");

    let host = format!("stop-{}.apps.test", random_suffix());
    let mut spec = start_pod(&node, pod_spec(&image, 1), &host).await;
    std::fs::write(node.dirs.volume(spec.pod_id).join("index.html"), "up").expect("write");
    let http = client_for(&host, ingress);
    let get = || async {
        let response = http.get(url(&host, ingress, "/index.html")).send().await?;
        let retry_after = response.headers().get("retry-after").cloned();
        anyhow::Ok((response.status().as_u16(), retry_after, response.text().await?))
    };
    eventually(WAIT, "the pod answering", || async {
        match get().await? {
            (200, _, body) if body == "up" => Ok(()),
            other => anyhow::bail!("{other:?}"),
        }
    })
    .await;

    node.pods
        .handle(&NodeJob::Stop {
            pod_id: spec.pod_id,
            generation: 2,
            grace_secs: 1,
        })
        .await
        .expect("stop");
    let (status, retry_after, page) = get().await.expect("request");
    assert_eq!(status, 503, "{page}");
    assert!(page.contains("This pod is stopped"), "{page}");
    assert!(page.contains(&host), "{page}");
    assert_eq!(retry_after, None, "a stopped pod is not coming back by itself");

    // Started again: the route follows the record.
    spec.generation = 3;
    node.pods
        .handle(&NodeJob::EnsureRunning { spec: spec.clone() })
        .await
        .expect("start again");
    eventually(WAIT, "the restarted pod answering", || async {
        match get().await? {
            (200, _, body) if body == "up" => Ok(()),
            other => anyhow::bail!("{other:?}"),
        }
    })
    .await;

    // Running, but nothing listens on its HTTP port.
    let silent_host = format!("silent-{}.apps.test", random_suffix());
    let mut silent = pod_spec(&image, 1);
    silent.http_port = Some(8081);
    start_pod(&node, silent, &silent_host).await;
    let response = client_for(&silent_host, ingress)
        .get(url(&silent_host, ingress, "/"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 502);
    let page = response.text().await.expect("body");
    assert!(page.contains(&silent_host), "{page}");
}

/// Reads an HTTP response head (through the blank line) from `reader`.
async fn read_head(reader: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            anyhow::bail!("connection closed after {head:?}");
        }
        head.push_str(&line);
        if line == "\r\n" {
            return Ok(head);
        }
    }
}

#[tokio::test]
async fn an_upgrade_becomes_a_tunnel_to_the_pod() {
    let node = TestNode::start("ingress-upgrade").await;
    let ingress = node.start_ingress().await;
    let host = format!("ws-{}.apps.test", random_suffix());
    let mut spec = pod_spec(&web_image().await, 1);
    // One shell per connection: read the request head, switch protocols, echo lines.
    spec.entrypoint = Some(
        ["/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/data/upgrade.sh"]
            .map(String::from)
            .to_vec(),
    );
    let spec = start_pod(&node, spec, &host).await;
    write_script(
        &node.dirs.volume(spec.pod_id),
        "upgrade.sh",
        "#!/bin/sh\n\
         while read -r line; do\n\
           line=$(printf '%s' \"$line\" | tr -d '\\r')\n\
           [ -z \"$line\" ] && break\n\
         done\n\
         printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n'\n\
         while read -r line; do echo \"echo:$line\"; done\n",
    );

    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let (mut reader, head) = eventually(WAIT, "the upgrade answered", || async {
        let mut stream = TcpStream::connect(ingress).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut reader = BufReader::new(stream);
        let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut reader)).await??;
        anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "not switched: {head}");
        Ok((reader, head))
    })
    .await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(lower.contains("\r\nconnection: upgrade\r\n"), "{head}");

    for message in ["hello", "a second line, through the same tunnel"] {
        reader
            .get_mut()
            .write_all(format!("{message}\n").as_bytes())
            .await
            .expect("write into the tunnel");
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .expect("an echo within 5 s")
            .expect("read from the tunnel");
        assert_eq!(line, format!("echo:{message}\n"));
    }

    // Closing our side ends the pod's loop, which closes the tunnel.
    reader.get_mut().shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest))
        .await
        .expect("the tunnel closes")
        .expect("read to the end");
    assert!(rest.is_empty(), "{rest:?}");
}
