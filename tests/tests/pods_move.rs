//! Clones and moves across real nodes: a control plane, the scheduler and two real agents in
//! one region, each offering 600 millicores so that two 500m pods cannot share a node. A file
//! written into a pod's volume survives a clone to the other node and a resize that moves the
//! pod there (the old copy is removed afterwards); a resize no node can take is refused without
//! changing anything; and a transfer with a wrong token, or whose stream was tampered with,
//! fails the pod and leaves nothing on the receiving node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use instapod_common::node::{NodeJob, VolumeSource, node_queue};
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::node::{pod_spec, web_image};
use instapod_tests::{TestUser, eventually, scale_user};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

async fn pod(user: &TestUser, name: &str) -> Value {
    user.client()
        .get(&format!("/api/pods/{name}"))
        .send()
        .await
        .json_with_status(200)
}

async fn wait_state(fleet: &Fleet, user: &TestUser, name: &str, state: &str) -> Value {
    eventually(WAIT, &format!("pod {name} {state}"), || async {
        let body = user.client().get(&format!("/api/pods/{name}")).send().await.json();
        ensure!(
            body["state"] == state,
            "{body}\nagent logs:\n{}\n---\n{}",
            instapod_tests::process::log_tail(&fleet.agent_logs[0], 30),
            instapod_tests::process::log_tail(&fleet.agent_logs[1], 30)
        );
        Ok(body)
    })
    .await
}

async fn events(user: &TestUser, name: &str) -> Vec<String> {
    let body = user
        .client()
        .get(&format!("/api/pods/{name}/events?limit=200"))
        .send()
        .await
        .json_with_status(200);
    body["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|e| e["message"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The index in `fleet.nodes` of the node named `name` (`node-<index>-local`).
fn node_index(name: &Value) -> usize {
    let name = name.as_str().expect("a placed pod names its node");
    name.strip_prefix("node-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|index| index.parse().ok())
        .unwrap_or_else(|| panic!("unexpected node name {name}"))
}

fn volume(fleet: &Fleet, node: usize, pod_id: &str) -> PathBuf {
    fleet.nodes[node].state_dir.join("volumes").join(pod_id)
}

/// The file served at `path` by the pod's HTTP server (busybox httpd serving `/data`).
async fn fetch(ip: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let client = instapod_tests::http_builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()?;
    let response = client.get(format!("http://{ip}:8080/{path}")).send().await?;
    ensure!(response.status().is_success(), "{}", response.status());
    Ok(response.bytes().await?.to_vec())
}

/// Checks the copied volume: the same bytes, the mode, the symlinks kept as symlinks.
fn assert_same_volume(dir: &Path, hello: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::read(dir.join("hello.txt")).expect("hello.txt"), hello);
    assert_eq!(std::fs::read(dir.join("sub/nested.txt")).expect("nested"), b"nested\n");
    let mode = std::fs::metadata(dir.join("sub/nested.txt"))
        .expect("nested")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "the mode is kept");
    assert_eq!(
        std::fs::read_link(dir.join("link")).expect("a symlink"),
        Path::new("hello.txt")
    );
    assert_eq!(
        std::fs::read_link(dir.join("outside")).expect("a symlink"),
        Path::new("/etc/hostname"),
        "an absolute symlink stays a symlink (never followed on the host)"
    );
}

fn no_leftovers(fleet: &Fleet, node: usize, pod_id: &str) -> anyhow::Result<()> {
    let volumes = fleet.nodes[node].state_dir.join("volumes");
    for entry in std::fs::read_dir(&volumes)? {
        let name = entry?.file_name().to_string_lossy().to_string();
        ensure!(!name.contains(pod_id), "{name} is left in {}", volumes.display());
    }
    let containers = instapod_tests::containerd::shared()
        .ctr(&fleet.nodes[node].namespace)
        .args(["containers", "ls", "-q"])
        .output()?;
    let listed = String::from_utf8_lossy(&containers.stdout);
    ensure!(!listed.contains(pod_id), "a container is left: {listed}");
    Ok(())
}

async fn push(fleet: &Fleet, node: usize, job: NodeJob) {
    let conn = apalis_redis::connect(fleet.redis_url.as_str()).await.expect("redis");
    let mut storage = RedisStorage::<NodeJob>::new(conn)
        .with_config(instapod_common::queue::config(node_queue(fleet.node_ids[node])));
    storage.push(job).await.expect("push a job");
}

/// The agent's record of a pod (its state file).
fn record(fleet: &Fleet, node: usize, pod_id: Uuid) -> anyhow::Result<Value> {
    let path = fleet.nodes[node].state_dir.join("pods").join(format!("{pod_id}.json"));
    Ok(serde_json::from_slice(&std::fs::read(&path).context("no record yet")?)?)
}

/// A peer that answers every request with a valid archive followed by a wrong checksum.
async fn tampering_peer() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mut archive = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(6);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    archive
        .append_data(&mut header, "evil.txt", &b"forged"[..])
        .expect("append");
    let mut body = archive.into_inner().expect("archive");
    body.extend_from_slice(&[0u8; 32]);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn clones_and_moves_keep_the_volume_across_nodes() {
    let fleet = Fleet::start(FleetOptions::regions(["local", "local"]).allocatable_cpu_millis(600)).await;
    let user = scale_user(&fleet.cp).await;
    let image = web_image().await;
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": "origin", "image": image, "plan": "starter", "http_port": 8080}),
        )
        .await
        .json_with_status(202);
    let origin = wait_state(&fleet, &user, "origin", "running").await;
    let origin_id = origin["id"].as_str().expect("id").to_string();
    let home = node_index(&origin["node"]);
    let other = 1 - home;

    // Content in the volume, as the pod sees it.
    let hello = format!("hello from {}\n", Uuid::new_v4()).into_bytes();
    let dir = volume(&fleet, home, &origin_id);
    std::fs::create_dir_all(dir.join("sub")).expect("sub");
    std::fs::write(dir.join("hello.txt"), &hello).expect("write");
    std::fs::write(dir.join("sub/nested.txt"), b"nested\n").expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("sub/nested.txt"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
    }
    std::os::unix::fs::symlink("hello.txt", dir.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", dir.join("outside")).expect("symlink");
    let origin_ip = origin["ip"].as_str().expect("ip").to_string();
    let served = eventually(WAIT, "the origin serves its file", || fetch(&origin_ip, "hello.txt")).await;
    assert_eq!(served, hello);

    // Clone: the source's node has no room for a second 500m pod, so the copy runs on the other.
    let copy = user
        .client()
        .post_json("/api/pods/origin/clone", &json!({"name": "copy"}))
        .await
        .json_with_status(202);
    assert_eq!(copy["state"], "pending");
    assert_eq!(copy["resources"]["cpu_millis"], 500, "the source's configuration");
    assert_eq!(copy["http_port"], 8080);
    assert_eq!(copy["image"], origin["image"]);
    let copy = wait_state(&fleet, &user, "copy", "running").await;
    assert_eq!(node_index(&copy["node"]), other, "the clone runs on the other node");
    let copy_id = copy["id"].as_str().expect("id").to_string();
    let copy_ip = copy["ip"].as_str().expect("ip").to_string();
    let served = eventually(WAIT, "the clone serves the same file", || fetch(&copy_ip, "hello.txt")).await;
    assert_eq!(served, hello);
    assert_same_volume(&volume(&fleet, other, &copy_id), &hello);
    assert!(
        events(&user, "copy")
            .await
            .iter()
            .any(|m| m.contains("cloned from pod origin")),
        "the clone's events say where it came from"
    );
    assert!(
        events(&user, "origin")
            .await
            .iter()
            .any(|m| m.contains("cloned as pod copy"))
    );
    assert_eq!(
        pod(&user, "origin").await["state"],
        "running",
        "a clone leaves its source running"
    );
    // The same names and quota rules as create.
    user.client()
        .post_json("/api/pods/origin/clone", &json!({"name": "copy"}))
        .await
        .assert_error(409, "pod_name_taken");
    user.client()
        .post_json("/api/pods/origin/clone", &json!({"name": "Bad Name"}))
        .await
        .assert_error(400, "validation_failed");
    user.client()
        .post_json("/api/pods/nothing/clone", &json!({"name": "copy-two"}))
        .await
        .assert_error(404, "not_found");

    // A size no node can take: refused, nothing changes.
    let before = pod(&user, "origin").await;
    let refused = user
        .client()
        .post_json("/api/pods/origin/resize", &json!({"cpu_millis": 650}))
        .await;
    let message = refused.assert_error(409, "no_room_on_node");
    assert!(message.contains(before["node"].as_str().unwrap_or("?")), "{message}");
    let after = pod(&user, "origin").await;
    for field in ["generation", "node", "resources", "state"] {
        assert_eq!(after[field], before[field], "{field} unchanged");
    }

    // Make the origin's node too small for it: shrink it (live), add a 250m pod beside it (the
    // other node, holding the clone, has no room for that), then free the other node.
    user.client()
        .post_json("/api/pods/origin/resize", &json!({"cpu_millis": 300}))
        .await
        .json_with_status(202);
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": "blocker", "image": image, "plan": "free", "http_port": 8080}),
        )
        .await
        .json_with_status(202);
    let blocker = wait_state(&fleet, &user, "blocker", "running").await;
    assert_eq!(node_index(&blocker["node"]), home);
    user.client()
        .delete("/api/pods/copy")
        .send()
        .await
        .json_with_status(202);
    eventually(WAIT, "the clone to be gone", || async {
        let response = user.client().get("/api/pods/copy").send().await;
        ensure!(response.status == 404, "{}", response.text());
        Ok(())
    })
    .await;

    // 500m no longer fits beside the blocker: the pod moves to the other node with its volume.
    let moving = user
        .client()
        .post_json("/api/pods/origin/resize", &json!({"cpu_millis": 500}))
        .await
        .json_with_status(202);
    assert_eq!(moving["state"], "starting");
    assert_eq!(node_index(&moving["node"]), other, "reserved on the new node at once");
    let moved = wait_state(&fleet, &user, "origin", "running").await;
    assert_eq!(node_index(&moved["node"]), other);
    assert_eq!(moved["resources"]["cpu_millis"], 500);
    let moved_ip = moved["ip"].as_str().expect("ip").to_string();
    let served = eventually(WAIT, "the moved pod serves its file", || fetch(&moved_ip, "hello.txt")).await;
    assert_eq!(served, hello);
    assert_same_volume(&volume(&fleet, other, &origin_id), &hello);
    eventually(WAIT, "the old copy removed from the old node", || async {
        no_leftovers(&fleet, home, &origin_id)
    })
    .await;
    let history = events(&user, "origin").await;
    assert!(history.iter().any(|m| m.contains("moves to node")), "{history:?}");
    assert!(history.iter().any(|m| m.contains("old copy")), "{history:?}");

    // The peer endpoint: no token, a wrong token.
    let peer = format!(
        "http://127.0.0.1:{}/v1/volumes/{origin_id}",
        fleet.nodes[other].peer_port
    );
    let http = instapod_tests::http_builder().no_proxy().build().expect("client");
    let status = http.get(&peer).send().await.expect("peer").status();
    assert_eq!(status.as_u16(), 401);
    let status = http
        .get(&peer)
        .bearer_auth("ipx_wrong")
        .send()
        .await
        .expect("peer")
        .status();
    assert_eq!(status.as_u16(), 403);

    // Transfers that must fail: a wrong token at the real source, a forged stream from a peer
    // that lies about the checksum. Each fails its pod and leaves nothing on the node.
    let forger = tampering_peer().await;
    let mut cases = Vec::new();
    for (addr, token, reason) in [
        (
            format!("127.0.0.1:{}", fleet.nodes[other].peer_port),
            "ipx_wrong-token",
            "did not hand out the volume",
        ),
        (forger, "ipx_any", "checksum mismatch"),
    ] {
        let mut spec = pod_spec(&image, 1);
        spec.volume_source = Some(VolumeSource {
            addr,
            pod_id: origin_id.parse().expect("uuid"),
            token: token.to_string(),
        });
        cases.push((spec.pod_id, reason));
        push(&fleet, home, NodeJob::EnsureRunning { spec }).await;
    }
    for (pod_id, reason) in cases {
        let failed = eventually(WAIT, "the transfer refused", || async {
            let record = record(&fleet, home, pod_id)?;
            ensure!(record["state"] == "failed", "{record}");
            Ok(record)
        })
        .await;
        let why = failed["reason"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "{why}");
        no_leftovers(&fleet, home, &pod_id.to_string()).expect("nothing left");
    }

    for name in ["origin", "blocker"] {
        user.client()
            .delete(&format!("/api/pods/{name}"))
            .send()
            .await
            .json_with_status(202);
    }
    eventually(WAIT, "every pod gone", || async {
        let list = user.client().get("/api/pods").send().await.json();
        ensure!(list["pods"].as_array().is_some_and(Vec::is_empty), "{list}");
        Ok(())
    })
    .await;
}
