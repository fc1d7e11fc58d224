//! Cross-node HTTP routing: a real control plane, the scheduler and two real agents
//! (containerd, runc, CNI). A pod created through the API is reached through the ingress of
//! the node that does NOT run it — forwarded to its node's ingress over the route feed — with
//! the client's `X-Forwarded-*` headers intact, a POST body streamed through both hops, and a
//! WebSocket-style upgrade tunnelled through both. A stopped pod answers 503 on the other node,
//! a pod waiting for a node 503, a deleted one 404; a stale route pointing at a node that does
//! not have the pod ends in one 502 instead of bouncing between the nodes.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::images::ImageBuilder;
use instapod_tests::node::web_image;
use instapod_tests::{TestUser, eventually, ids, registry, scale_user};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(90);
const BODY: usize = 8 << 20;

async fn create(user: &TestUser, body: Value) -> Value {
    user.client().post_json("/api/pods", &body).await.json_with_status(202)
}

async fn wait_state(user: &TestUser, name: &str, state: &str) -> Value {
    user.wait_pod_state(name, state, WAIT).await
}

/// The host name of a pod's first URL.
fn host_of(pod: &Value) -> String {
    let url = pod["urls"][0].as_str().expect("a pod URL");
    url.trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Which of the fleet's nodes runs `pod`, and the other one.
fn owner_and_other(fleet: &Fleet, pod: &Value) -> (usize, usize) {
    let node = pod["node"].as_str().expect("a running pod has a node");
    let owner = (0..fleet.nodes.len())
        .find(|&index| node == format!("node-{index}-local"))
        .unwrap_or_else(|| panic!("unknown node {node}"));
    (owner, 1 - owner)
}

fn ingress(fleet: &Fleet, index: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], fleet.nodes[index].ingress_port))
}

/// A client that sends `host` (with the ingress's port, as browsers do) to `ingress`.
fn client_for(host: &str, ingress: SocketAddr) -> reqwest::Client {
    instapod_tests::http_builder()
        .no_proxy()
        .resolve(host, ingress)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

fn url(host: &str, ingress: SocketAddr, path: &str) -> String {
    format!("http://{host}:{}{path}", ingress.port())
}

fn write_script(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("script directory");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// GET `path` for `host` at `ingress`: status, `Retry-After` and body.
async fn get(host: &str, ingress: SocketAddr, path: &str) -> anyhow::Result<(u16, Option<String>, String)> {
    let response = client_for(host, ingress).get(url(host, ingress, path)).send().await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((status, retry_after, response.text().await?))
}

/// Waits until `host` answers `status` at `ingress` with a body containing `text`.
async fn wait_for(host: &str, ingress: SocketAddr, path: &str, status: u16, text: &str) -> (Option<String>, String) {
    eventually(
        WAIT,
        &format!("{host}{path} answering {status} at {ingress}"),
        || async {
            let (got, retry_after, body) = get(host, ingress, path).await?;
            ensure!(got == status && body.contains(text), "{got}: {body}");
            Ok((retry_after, body))
        },
    )
    .await
}

/// Reads an HTTP response head (through the blank line).
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

/// A busybox image whose command answers each connection on :8080 with `/data/upgrade.sh`.
async fn upgrade_image() -> String {
    let registry = registry::shared();
    let repository = format!("test/upgrade-{}", &ids::random_suffix()[..8]);
    ImageBuilder::busybox()
        .entrypoint(["/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/data/upgrade.sh"])
        .build()
        .push(&registry.base_url(), &repository, "1")
        .await
        .expect("push the upgrade image");
    format!("{}/{repository}:1", registry.host())
}

#[tokio::test]
async fn any_node_serves_every_pod_and_stale_routes_do_not_loop() {
    let fleet = Fleet::start(FleetOptions::regions(["local", "local"])).await;
    let user = scale_user(&fleet.cp).await;
    let (image, ws_image) = tokio::join!(web_image(), upgrade_image());
    create(
        &user,
        json!({"name": "web", "image": image, "plan": "starter", "http_port": 8080}),
    )
    .await;
    create(
        &user,
        json!({"name": "chat", "image": ws_image, "plan": "starter", "http_port": 8080}),
    )
    .await;
    let web = wait_state(&user, "web", "running").await;
    let ws = wait_state(&user, "chat", "running").await;

    // The web pod's volume: a file, and CGI scripts that show what the pod receives.
    let (owner, other) = owner_and_other(&fleet, &web);
    let pod_id = web["id"].as_str().expect("pod id");
    let volume = fleet.nodes[owner].state_dir.join("volumes").join(pod_id);
    std::fs::write(volume.join("hello.txt"), "served by the pod's node").expect("write into the volume");
    let cgi = volume.join("cgi-bin");
    write_script(
        &cgi,
        "env.sh",
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nenv\n",
    );
    write_script(
        &cgi,
        "sum.sh",
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nsha256sum\n",
    );
    let host = host_of(&web);
    let (at_owner, at_other) = (ingress(&fleet, owner), ingress(&fleet, other));

    // The pod's own node serves it; so does the other one, once its route feed has it.
    wait_for(&host, at_owner, "/hello.txt", 200, "served by the pod's node").await;
    let (_, body) = wait_for(&host, at_other, "/hello.txt", 200, "served by the pod's node").await;
    assert_eq!(body, "served by the pod's node");
    assert!(fleet.ingress_requests(other, "forwarded").await >= 1.0);

    // What the pod sees through two ingresses: the client, not the first node.
    let response = client_for(&host, at_other)
        .get(url(&host, at_other, "/cgi-bin/env.sh?x=1"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-host", "evil.test")
        .header("x-instapod-hop-test", "kept")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let env = response.text().await.expect("body");
    let port = at_other.port();
    for line in [
        "HTTP_X_FORWARDED_FOR=203.0.113.9, 127.0.0.1".to_string(),
        "HTTP_X_FORWARDED_PROTO=http".to_string(),
        format!("HTTP_X_FORWARDED_HOST={host}:{port}"),
        format!("HTTP_HOST={host}:{port}"),
        "HTTP_X_INSTAPOD_HOP_TEST=kept".to_string(),
        "QUERY_STRING=x=1".to_string(),
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line:?} missing from the pod's environment:\n{env}"
        );
    }
    assert!(
        !env.contains("HTTP_X_INSTAPOD_HOP="),
        "the hop token reached the pod:\n{env}"
    );

    // 8 MiB posted to the other node, streamed through both hops, intact.
    let payload: Vec<u8> = (0..BODY).map(|i| (i * 7 % 251) as u8).collect();
    let expected = hex::encode(Sha256::digest(&payload));
    let response = client_for(&host, at_other)
        .post(url(&host, at_other, "/cgi-bin/sum.sh"))
        .body(payload)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status().as_u16(), 200);
    let sum = response.text().await.expect("body");
    assert!(sum.starts_with(&expected), "{sum} is not {expected}");

    // An upgrade through the node that does not run the `ws` pod.
    let (ws_owner, ws_other) = owner_and_other(&fleet, &ws);
    let ws_id = ws["id"].as_str().expect("pod id");
    write_script(
        &fleet.nodes[ws_owner].state_dir.join("volumes").join(ws_id),
        "upgrade.sh",
        "#!/bin/sh\n\
         while read -r line; do\n\
           line=$(printf '%s' \"$line\" | tr -d '\\r')\n\
           [ -z \"$line\" ] && break\n\
         done\n\
         printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n'\n\
         while read -r line; do echo \"echo:$line\"; done\n",
    );
    let ws_host = host_of(&ws);
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: {ws_host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let through = ingress(&fleet, ws_other);
    let mut reader = eventually(WAIT, "the upgrade through the other node", || async {
        let mut stream = TcpStream::connect(through).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut reader = BufReader::new(stream);
        let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut reader)).await??;
        ensure!(head.starts_with("HTTP/1.1 101"), "not switched: {head}");
        Ok(reader)
    })
    .await;
    for message in ["hello", "across two nodes"] {
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
    reader.get_mut().shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest))
        .await
        .expect("the tunnel closes")
        .expect("read to the end");
    assert!(rest.is_empty(), "{rest:?}");

    // A pod waiting for a node (no node serves its region) answers 503 everywhere.
    let waiting = create(
        &user,
        json!({"name": "waiting", "image": image, "plan": "starter", "region": "us-east", "http_port": 8080}),
    )
    .await;
    let waiting_host = host_of(&waiting);
    for index in [0, 1] {
        let (retry_after, page) = wait_for(&waiting_host, ingress(&fleet, index), "/", 503, "waiting for a node").await;
        assert_eq!(retry_after.as_deref(), Some("5"));
        assert!(page.contains(&waiting_host), "{page}");
    }

    // A stale route: the control plane places the pod on a node whose advertised ingress is
    // really the other node's, which does not have the pod. The first node forwards once; the
    // second refuses to forward a forwarded request again: one 502, no loop.
    let db = fleet.cp.db().await;
    let ghost: uuid::Uuid = db
        .query_one(
            "INSERT INTO nodes (name, region, token_hash, agent_version, status, ingress_addr,
                                last_heartbeat_at, total_cpu_millis, total_memory_bytes, total_disk_bytes,
                                allocatable_cpu_millis, allocatable_memory_bytes, allocatable_disk_bytes)
             VALUES ($1, 'eu-central', $2, 'test', 'healthy', $3, now() + interval '1 hour', 0, 0, 0, 0, 0, 0)
             RETURNING id",
            &[
                &format!("ghost-{}", &ids::random_suffix()[..8]),
                &Sha256::digest(ids::random_suffix().as_bytes()).to_vec(),
                &ingress(&fleet, 1).to_string(),
            ],
        )
        .await
        .expect("insert the ghost node")
        .get(0);
    db.execute(
        "UPDATE pods SET node_id = $2, state = 'running' WHERE id = $1::text::uuid",
        &[&waiting["id"].as_str().expect("pod id"), &ghost],
    )
    .await
    .expect("place the pod on the ghost node");
    let misrouted_before = fleet.ingress_requests(1, "misrouted").await;
    let (retry_after, page) = wait_for(&waiting_host, ingress(&fleet, 0), "/", 502, "do not agree").await;
    assert_eq!(retry_after.as_deref(), Some("5"));
    let misrouted = fleet.ingress_requests(1, "misrouted").await - misrouted_before;
    assert!(misrouted >= 1.0, "the second node did not refuse: {page}");
    // Every request the first node forwarded came back as exactly one refusal.
    let forwarded_by_first = fleet.ingress_requests(0, "misrouted").await;
    assert_eq!(forwarded_by_first, 0.0, "the first node never saw the request again");

    // Stopped: the other node answers with the owner's 503 page.
    user.client()
        .post("/api/pods/web/stop")
        .send()
        .await
        .json_with_status(202);
    wait_state(&user, "web", "stopped").await;
    let (retry_after, page) = wait_for(&host, at_other, "/hello.txt", 503, "This pod is stopped").await;
    assert_eq!(retry_after, None, "a stopped pod is not coming back by itself");
    assert!(page.contains(&host), "{page}");

    // Deleted: 404 on both nodes.
    user.client().delete("/api/pods/web").send().await.json_with_status(202);
    for index in [owner, other] {
        wait_for(&host, ingress(&fleet, index), "/hello.txt", 404, "No pod answers").await;
    }
    for name in ["chat", "waiting"] {
        user.client()
            .delete(&format!("/api/pods/{name}"))
            .send()
            .await
            .json_with_status(202);
    }
    eventually(WAIT, "the chat pod gone", || async {
        let status = user.client().get("/api/pods/chat").send().await.status;
        ensure!(status == 404, "{status}");
        Ok(())
    })
    .await;
}
