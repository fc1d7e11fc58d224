//! The control plane's side of fleet membership (`/internal/nodes/…`): joining with the join
//! token (and refusals), node tokens stored only as hashes, rejoining by id and by name (the
//! old token stops working), heartbeats recording capacity and pods, a node token valid only
//! for its own node, health marking after missed heartbeats and recovery, pod reports stored
//! with every field, malformed bodies storing nothing, and the `runtime_images` override of
//! the catalog.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use instapod_tests::checks::assert_uuid;
use instapod_tests::{ControlPlane, ControlPlaneOptions, eventually};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const JOIN_TOKEN: &str = "test-fleet-join-token-0123456789";

/// A control plane that accepts joins with [`JOIN_TOKEN`], plus `env`.
async fn start_fleet(env: &[(&str, &str)]) -> ControlPlane {
    let mut options = ControlPlaneOptions::default().env("INSTAPOD_NODE_JOIN_TOKEN", JOIN_TOKEN);
    for (key, value) in env {
        options = options.env(key, value);
    }
    ControlPlane::start(options).await
}

fn join_body(name: &str, node_id: Option<&str>) -> Value {
    let mut body = json!({
        "name": name,
        "region": "local",
        "labels": {"disk": "ssd", "rack": "r1"},
        "agent_version": "0.1.0-test",
    });
    if let Some(id) = node_id {
        body["node_id"] = json!(id);
    }
    body
}

/// A joined node: its id and token.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    token: String,
}

async fn join(cp: &ControlPlane, name: &str, node_id: Option<&str>) -> Node {
    let body = cp
        .client()
        .with_token(JOIN_TOKEN)
        .post_json("/internal/nodes/join", &join_body(name, node_id))
        .await
        .json_with_status(200);
    let id = assert_uuid(&body["node_id"], "node_id");
    let token = body["node_token"]
        .as_str()
        .unwrap_or_else(|| panic!("node_token in {body}"))
        .to_string();
    assert_eq!(body["queue"], format!("node:{id}"), "{body}");
    Node { id, token }
}

fn heartbeat_body(pods: Value) -> Value {
    json!({
        "total": {"cpu_millis": 8000, "memory_bytes": 17_179_869_184u64, "disk_bytes": 500_000_000_000u64},
        "allocatable": {"cpu_millis": 7500, "memory_bytes": 16_106_127_360u64, "disk_bytes": 450_000_000_000u64},
        "region": "local",
        "labels": {"disk": "nvme"},
        "agent_version": "0.1.1-test",
        "pods": pods,
    })
}

async fn heartbeat(cp: &ControlPlane, node_id: &str, token: &str) -> instapod_tests::Response {
    cp.client()
        .with_token(token)
        .post_json(
            &format!("/internal/nodes/{node_id}/heartbeat"),
            &heartbeat_body(json!([])),
        )
        .await
}

fn node_uuid(node: &Node) -> Uuid {
    Uuid::parse_str(&node.id).expect("node ids are UUIDs")
}

async fn count(cp: &ControlPlane, sql: &str) -> i64 {
    cp.db()
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
        .get(0)
}

async fn node_status(cp: &ControlPlane, node: &Node) -> String {
    cp.db()
        .await
        .query_one("SELECT status FROM nodes WHERE id = $1", &[&node_uuid(node)])
        .await
        .expect("the node row exists")
        .get(0)
}

#[tokio::test]
async fn joining_needs_the_join_token() {
    let cp = start_fleet(&[]).await;
    let body = join_body("node-a", None);
    cp.client()
        .post_json("/internal/nodes/join", &body)
        .await
        .assert_error(401, "invalid_join_token");
    for wrong in ["wrong-token-0123456789abcdef", &JOIN_TOKEN[..JOIN_TOKEN.len() - 1], ""] {
        cp.client()
            .with_token(wrong)
            .post_json("/internal/nodes/join", &body)
            .await
            .assert_error(401, "invalid_join_token");
    }
    // Another scheme is no bearer token.
    cp.client()
        .post("/internal/nodes/join")
        .header("Authorization", &format!("Basic {JOIN_TOKEN}"))
        .json(&body)
        .send()
        .await
        .assert_error(401, "invalid_join_token");
    assert_eq!(count(&cp, "SELECT count(*) FROM nodes").await, 0);

    // The right token works, also with the scheme in another case.
    let response = cp
        .client()
        .post("/internal/nodes/join")
        .header("Authorization", &format!("bearer {JOIN_TOKEN}"))
        .json(&body)
        .send()
        .await;
    response.assert_status(200);
    assert_eq!(response.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(count(&cp, "SELECT count(*) FROM nodes").await, 1);
}

#[tokio::test]
async fn joining_is_refused_when_no_join_token_is_configured() {
    let cp = ControlPlane::start_default().await;
    for client in [
        cp.client(),
        cp.client().with_token(JOIN_TOKEN),
        cp.client().with_token(""),
    ] {
        client
            .post_json("/internal/nodes/join", &join_body("node-a", None))
            .await
            .assert_error(403, "node_join_disabled");
    }
    assert_eq!(count(&cp, "SELECT count(*) FROM nodes").await, 0);
}

#[tokio::test]
async fn a_join_stores_the_node_and_only_the_hash_of_its_token() {
    let cp = start_fleet(&[("INSTAPOD_NODE_HEARTBEAT_INTERVAL_SECS", "7")]).await;
    let body = cp
        .client()
        .with_token(JOIN_TOKEN)
        .post_json("/internal/nodes/join", &join_body("Node-Alpha", None))
        .await
        .json_with_status(200);
    assert_eq!(body["heartbeat_interval_secs"], 7, "{body}");
    let id = assert_uuid(&body["node_id"], "node_id");
    let token = body["node_token"].as_str().expect("node_token").to_string();
    assert!(token.starts_with("ipn_") && token.len() == 4 + 43, "{token}");
    assert_eq!(body["queue"], format!("node:{id}"));
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(4),
        "exactly four fields: {body}"
    );

    let db = cp.db().await;
    let row = db
        .query_one(
            "SELECT name, region, labels, agent_version, status, token_hash, last_heartbeat_at IS NULL,
                    total_cpu_millis IS NULL, pods
             FROM nodes WHERE id = $1",
            &[&Uuid::parse_str(&id).expect("uuid")],
        )
        .await
        .expect("the node row exists");
    assert_eq!(row.get::<_, String>(0), "node-alpha", "the name is lowercased");
    assert_eq!(row.get::<_, String>(1), "local");
    assert_eq!(row.get::<_, Value>(2), json!({"disk": "ssd", "rack": "r1"}));
    assert_eq!(row.get::<_, String>(3), "0.1.0-test");
    assert_eq!(
        row.get::<_, String>(4),
        "unhealthy",
        "unhealthy until the first heartbeat"
    );
    assert_eq!(row.get::<_, Vec<u8>>(5), Sha256::digest(token.as_bytes()).to_vec());
    assert!(row.get::<_, bool>(6));
    assert!(row.get::<_, bool>(7));
    assert_eq!(row.get::<_, Value>(8), json!([]));

    // The plain token (or its random part, or its hex) appears in no column.
    let random_part = token.trim_start_matches("ipn_").to_string();
    let token_hex = hex::encode(token.as_bytes());
    for needle in [&token, &random_part, &token_hex] {
        let leaked: i64 = db
            .query_one(
                "SELECT count(*) FROM nodes n WHERE n::text LIKE '%' || $1 || '%' \
                 OR encode(n.token_hash, 'escape') LIKE '%' || $1 || '%'",
                &[needle],
            )
            .await
            .expect("search the nodes table")
            .get(0);
        assert_eq!(leaked, 0, "{needle} is stored in nodes");
    }

    // The token works.
    let answer = heartbeat(&cp, &id, &token).await.json_with_status(200);
    assert_eq!(answer, json!({"node_id": id, "status": "healthy"}));
}

#[tokio::test]
async fn rejoining_with_the_node_id_keeps_the_id_and_revokes_the_old_token() {
    let cp = start_fleet(&[]).await;
    let first = join(&cp, "node-b", None).await;
    heartbeat(&cp, &first.id, &first.token).await.assert_status(200);

    // The agent restarts, remembers its id, and was renamed meanwhile.
    let second = join(&cp, "node-b-renamed", Some(&first.id)).await;
    assert_eq!(second.id, first.id);
    assert_ne!(second.token, first.token);
    heartbeat(&cp, &first.id, &first.token)
        .await
        .assert_error(401, "invalid_node_token");
    heartbeat(&cp, &second.id, &second.token).await.assert_status(200);
    assert_eq!(count(&cp, "SELECT count(*) FROM nodes").await, 1);
    let name: String = cp
        .db()
        .await
        .query_one("SELECT name FROM nodes WHERE id = $1", &[&node_uuid(&first)])
        .await
        .expect("row")
        .get(0);
    assert_eq!(name, "node-b-renamed");

    // Taking another node's name by id is a conflict that changes nothing.
    let other = join(&cp, "node-c", None).await;
    cp.client()
        .with_token(JOIN_TOKEN)
        .post_json("/internal/nodes/join", &join_body("node-c", Some(&first.id)))
        .await
        .assert_error(409, "node_name_taken");
    heartbeat(&cp, &first.id, &second.token).await.assert_status(200);
    heartbeat(&cp, &other.id, &other.token).await.assert_status(200);
}

#[tokio::test]
async fn rejoining_by_name_keeps_the_id() {
    let cp = start_fleet(&[]).await;
    let first = join(&cp, "node-d", None).await;
    // Re-installed: no state directory, same name.
    let second = join(&cp, "node-d", None).await;
    assert_eq!(second.id, first.id);
    assert_ne!(second.token, first.token);
    heartbeat(&cp, &first.id, &first.token)
        .await
        .assert_error(401, "invalid_node_token");
    heartbeat(&cp, &second.id, &second.token).await.assert_status(200);

    // An id the database does not know (a restored backup) falls back to the name…
    let unknown = Uuid::new_v4().to_string();
    let third = join(&cp, "node-d", Some(&unknown)).await;
    assert_eq!(third.id, first.id);
    // …or, for a new name, to a fresh id: the unknown id is not taken over.
    let fourth = join(&cp, "node-e", Some(&unknown)).await;
    assert_ne!(fourth.id, unknown);
    assert_ne!(fourth.id, first.id);
    assert_eq!(count(&cp, "SELECT count(*) FROM nodes").await, 2);
    eventually(Duration::from_secs(5), "the fallback to be logged", || async {
        ensure!(
            cp.log_tail(200)
                .lines()
                .any(|line| line.contains("unknown node id") && line.contains(&unknown)),
            "not logged yet"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn heartbeats_store_capacity_labels_and_pods() {
    let cp = start_fleet(&[]).await;
    let node = join(&cp, "node-f", None).await;
    let pod_a = Uuid::new_v4();
    let pod_b = Uuid::new_v4();
    let pods = json!([
        {"pod_id": pod_a, "generation": 3, "state": "running", "ip": "10.88.0.7"},
        {"pod_id": pod_b, "generation": 1, "state": "starting"},
    ]);
    let body = heartbeat_body(pods);
    let answer = cp
        .client()
        .with_token(&node.token)
        .post_json(&format!("/internal/nodes/{}/heartbeat", node.id), &body)
        .await
        .json_with_status(200);
    assert_eq!(answer, json!({"node_id": node.id, "status": "healthy"}));

    let row = cp
        .db()
        .await
        .query_one(
            "SELECT total_cpu_millis, total_memory_bytes, total_disk_bytes,
                    allocatable_cpu_millis, allocatable_memory_bytes, allocatable_disk_bytes,
                    labels, agent_version, pods, status,
                    extract(epoch FROM now() - last_heartbeat_at)::float8
             FROM nodes WHERE id = $1",
            &[&node_uuid(&node)],
        )
        .await
        .expect("row");
    let capacity: Vec<i64> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(
        capacity,
        vec![
            8000,
            17_179_869_184,
            500_000_000_000,
            7500,
            16_106_127_360,
            450_000_000_000
        ]
    );
    assert_eq!(
        row.get::<_, Value>(6),
        json!({"disk": "nvme"}),
        "labels follow the heartbeat"
    );
    assert_eq!(row.get::<_, String>(7), "0.1.1-test");
    let stored_pods = row.get::<_, Value>(8);
    assert_eq!(
        stored_pods[0],
        json!({"pod_id": pod_a, "generation": 3, "state": "running", "ip": "10.88.0.7"})
    );
    assert_eq!(stored_pods[1]["pod_id"], json!(pod_b));
    assert_eq!(stored_pods[1]["state"], "starting");
    assert_eq!(stored_pods.as_array().map(Vec::len), Some(2));
    assert_eq!(row.get::<_, String>(9), "healthy");
    let age: f64 = row.get(10);
    assert!((0.0..30.0).contains(&age), "last_heartbeat_at is now, not {age} s ago");

    // The next heartbeat replaces the pod list.
    heartbeat(&cp, &node.id, &node.token).await.assert_status(200);
    let pods_after: Value = cp
        .db()
        .await
        .query_one("SELECT pods FROM nodes WHERE id = $1", &[&node_uuid(&node)])
        .await
        .expect("row")
        .get(0);
    assert_eq!(pods_after, json!([]));
}

#[tokio::test]
async fn a_node_token_is_valid_only_for_its_own_node() {
    let cp = start_fleet(&[]).await;
    let a = join(&cp, "node-g", None).await;
    let b = join(&cp, "node-h", None).await;

    let with_b_for_a = heartbeat(&cp, &a.id, &b.token).await;
    let message = with_b_for_a.assert_error(401, "invalid_node_token");
    // The same answer for a node that does not exist, a malformed id, no token and junk.
    let unknown = heartbeat(&cp, &Uuid::new_v4().to_string(), &b.token).await;
    assert_eq!(unknown.assert_error(401, "invalid_node_token"), message);
    heartbeat(&cp, "not-a-uuid", &b.token)
        .await
        .assert_error(401, "invalid_node_token");
    cp.client()
        .post_json(
            &format!("/internal/nodes/{}/heartbeat", a.id),
            &heartbeat_body(json!([])),
        )
        .await
        .assert_error(401, "invalid_node_token");
    heartbeat(&cp, &a.id, JOIN_TOKEN)
        .await
        .assert_error(401, "invalid_node_token");
    heartbeat(&cp, &a.id, &format!("{}x", a.token))
        .await
        .assert_error(401, "invalid_node_token");

    // Reports, too: nothing is stored for A with B's token.
    let report = json!({"reports": [{
        "pod_id": Uuid::new_v4(), "generation": 1, "state": "running", "at": "2025-01-01T00:00:00Z"
    }]});
    cp.client()
        .with_token(&b.token)
        .post_json(&format!("/internal/nodes/{}/reports", a.id), &report)
        .await
        .assert_error(401, "invalid_node_token");
    assert_eq!(count(&cp, "SELECT count(*) FROM pod_reports").await, 0);

    // A's row was not touched; B's own heartbeat works.
    let row = cp
        .db()
        .await
        .query_one(
            "SELECT status, last_heartbeat_at IS NULL, total_cpu_millis IS NULL FROM nodes WHERE id = $1",
            &[&node_uuid(&a)],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "unhealthy");
    assert!(row.get::<_, bool>(1) && row.get::<_, bool>(2));
    heartbeat(&cp, &b.id, &b.token).await.assert_status(200);
    assert_eq!(node_status(&cp, &a).await, "unhealthy");
    assert_eq!(node_status(&cp, &b).await, "healthy");
}

/// The value of the metric line that starts with `series` (name and labels).
fn gauge(page: &str, series: &str) -> anyhow::Result<f64> {
    let line = page
        .lines()
        .find(|line| line.starts_with(series))
        .ok_or_else(|| anyhow!("no {series} in the metrics page"))?;
    let value = line[series.len()..].trim();
    value.parse().map_err(|err| anyhow!("{line}: {err}"))
}

#[tokio::test]
async fn missed_heartbeats_make_a_node_unhealthy_and_one_heartbeat_heals_it() {
    let cp = start_fleet(&[
        ("INSTAPOD_NODE_HEARTBEAT_INTERVAL_SECS", "1"),
        ("INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS", "2"),
    ])
    .await;
    let node = join(&cp, "node-i", None).await;
    let steady = join(&cp, "node-j", None).await;

    // Heartbeats every half second keep a node healthy well past the timeout.
    heartbeat(&cp, &node.id, &node.token).await.assert_status(200);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        heartbeat(&cp, &steady.id, &steady.token).await.assert_status(200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(node_status(&cp, &steady).await, "healthy");
    let healthy_for: f64 = cp
        .db()
        .await
        .query_one(
            "SELECT extract(epoch FROM now() - status_changed_at)::float8 FROM nodes WHERE id = $1",
            &[&node_uuid(&steady)],
        )
        .await
        .expect("row")
        .get(0);
    assert!(
        healthy_for >= 3.5,
        "node-j was healthy throughout (no flapping), but its status changed {healthy_for} s ago"
    );

    // The node that stopped is marked, after the timeout and not before.
    eventually(Duration::from_secs(15), "node-i to become unhealthy", || async {
        let status = node_status(&cp, &node).await;
        ensure!(status == "unhealthy", "status is {status}");
        Ok(())
    })
    .await;
    let silence: f64 = cp
        .db()
        .await
        .query_one(
            "SELECT extract(epoch FROM status_changed_at - last_heartbeat_at)::float8 FROM nodes WHERE id = $1",
            &[&node_uuid(&node)],
        )
        .await
        .expect("row")
        .get(0);
    assert!(
        silence >= 2.0,
        "marked after {silence} s of silence, before the 2 s timeout"
    );
    eventually(Duration::from_secs(5), "the marking to be logged", || async {
        let log = cp.log_tail(400);
        ensure!(
            log.lines()
                .any(|line| line.contains("node unhealthy") && line.contains(&node.id)),
            "not logged yet"
        );
        Ok(())
    })
    .await;
    // node-j, heartbeating, was never marked (it may be by now: its heartbeats stopped).
    let log = cp.log_tail(400);
    let marked_at = log
        .lines()
        .position(|line| line.contains("node unhealthy") && line.contains(&node.id));
    let steady_marked_at = log
        .lines()
        .position(|line| line.contains("node unhealthy") && line.contains(&steady.id));
    assert!(
        steady_marked_at.is_none() || steady_marked_at > marked_at,
        "node-j was marked while it sent heartbeats:\n{log}"
    );

    eventually(Duration::from_secs(10), "the nodes gauge", || async {
        let page = cp.client().get_response("/metrics").await.text();
        let unhealthy = gauge(&page, r#"instapod_control_plane_nodes{status="unhealthy"}"#)?;
        let healthy = gauge(&page, r#"instapod_control_plane_nodes{status="healthy"}"#)?;
        ensure!(unhealthy >= 1.0, "unhealthy gauge is {unhealthy}");
        ensure!(
            healthy + unhealthy == 2.0,
            "two nodes in all, got {healthy} + {unhealthy}"
        );
        Ok(())
    })
    .await;

    // One heartbeat heals it, in the answer and in the row.
    let answer = heartbeat(&cp, &node.id, &node.token).await.json_with_status(200);
    assert_eq!(answer["status"], "healthy");
    assert_eq!(node_status(&cp, &node).await, "healthy");
    let changed_recently: bool = cp
        .db()
        .await
        .query_one(
            "SELECT status_changed_at = last_heartbeat_at FROM nodes WHERE id = $1",
            &[&node_uuid(&node)],
        )
        .await
        .expect("row")
        .get(0);
    assert!(changed_recently, "status_changed_at is the healing heartbeat's time");
    eventually(Duration::from_secs(5), "the recovery log line", || async {
        let log = cp.log_tail(400);
        ensure!(log.contains("node healthy again"), "not logged yet");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn reports_are_stored_with_every_field() {
    let cp = start_fleet(&[]).await;
    let node = join(&cp, "node-k", None).await;
    let other = join(&cp, "node-l", None).await;
    let pod = Uuid::new_v4();
    let reports = json!({"reports": [
        {"pod_id": pod, "generation": 4, "state": "failed", "reason": "out of memory",
         "exit_code": 137, "ip": "10.88.0.9", "at": "2025-03-04T05:06:07.250Z"},
        {"pod_id": pod, "generation": 5, "state": "starting", "at": "2025-03-04T05:06:08+02:00"},
    ]});
    let path = format!("/internal/nodes/{}/reports", node.id);
    let answer = cp
        .client()
        .with_token(&node.token)
        .post_json(&path, &reports)
        .await
        .json_with_status(200);
    assert_eq!(answer, json!({"accepted": 2}));

    let rows = cp
        .db()
        .await
        .query(
            "SELECT node_id, generation, state, reason, exit_code, ip,
                    extract(epoch FROM observed_at)::float8, received_at > now() - interval '1 minute'
             FROM pod_reports WHERE pod_id = $1 ORDER BY id",
            &[&pod],
        )
        .await
        .expect("read reports");
    assert_eq!(rows.len(), 2);
    let first = &rows[0];
    assert_eq!(
        first.get::<_, Uuid>(0),
        node_uuid(&node),
        "stored under the path's node"
    );
    assert_eq!(first.get::<_, i64>(1), 4);
    assert_eq!(first.get::<_, String>(2), "failed");
    assert_eq!(first.get::<_, Option<String>>(3).as_deref(), Some("out of memory"));
    assert_eq!(first.get::<_, Option<i32>>(4), Some(137));
    assert_eq!(first.get::<_, Option<String>>(5).as_deref(), Some("10.88.0.9"));
    assert_eq!(first.get::<_, f64>(6), 1_741_064_767.25);
    assert!(first.get::<_, bool>(7));
    let second = &rows[1];
    assert_eq!(second.get::<_, i64>(1), 5);
    assert_eq!(second.get::<_, String>(2), "starting");
    assert_eq!(second.get::<_, Option<String>>(3), None);
    assert_eq!(second.get::<_, Option<i32>>(4), None);
    assert_eq!(second.get::<_, Option<String>>(5), None);
    assert_eq!(second.get::<_, f64>(6), 1_741_057_568.0, "offsets are honoured");

    // An empty batch is fine; more than 1000 reports is refused whole.
    let empty = cp
        .client()
        .with_token(&node.token)
        .post_json(&path, &json!({"reports": []}))
        .await
        .json_with_status(200);
    assert_eq!(empty, json!({"accepted": 0}));
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"pod_id": Uuid::new_v4(), "generation": i, "state": "running", "at": "2025-01-01T00:00:00Z"}))
        .collect();
    cp.client()
        .with_token(&node.token)
        .post_json(&path, &json!({"reports": many}))
        .await
        .assert_error(413, "too_many_reports");
    let exactly: Vec<Value> = many.into_iter().take(1000).collect();
    let answer = cp
        .client()
        .with_token(&other.token)
        .post_json(
            &format!("/internal/nodes/{}/reports", other.id),
            &json!({"reports": exactly}),
        )
        .await
        .json_with_status(200);
    assert_eq!(answer, json!({"accepted": 1000}));
    assert_eq!(count(&cp, "SELECT count(*) FROM pod_reports").await, 1002);
    let by_node: i64 = cp
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM pod_reports WHERE node_id = $1",
            &[&node_uuid(&node)],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(by_node, 2, "the other node's batch is stored under the other node");
}

#[tokio::test]
async fn malformed_bodies_are_refused_and_store_nothing() {
    let cp = start_fleet(&[]).await;
    let joiner = cp.client().with_token(JOIN_TOKEN);
    for (body, code) in [
        (join_body("bad_name!", None), "validation_failed"),
        (join_body(&"n".repeat(64), None), "validation_failed"),
        (
            json!({"name": "node-m", "region": "", "agent_version": "1"}),
            "validation_failed",
        ),
        (
            json!({"name": "node-m", "region": "local", "agent_version": "1",
                   "labels": (0..33).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            "validation_failed",
        ),
        (json!({"name": "node-m", "agent_version": "1"}), "invalid_json"),
        (
            json!({"name": "node-m", "region": "local", "agent_version": "1", "node_id": "nope"}),
            "invalid_json",
        ),
    ] {
        joiner
            .post_json("/internal/nodes/join", &body)
            .await
            .assert_error(400, code);
    }
    joiner
        .post("/internal/nodes/join")
        .raw_body("application/json", "{not json")
        .send()
        .await
        .assert_error(400, "invalid_json");
    joiner
        .post("/internal/nodes/join")
        .raw_body("text/plain", "name=node-m")
        .send()
        .await
        .assert_error(415, "unsupported_media_type");
    assert_eq!(count(&cp, "SELECT count(*) FROM nodes").await, 0);

    let node = join(&cp, "node-m", None).await;
    let client = cp.client().with_token(&node.token);
    let heartbeat_path = format!("/internal/nodes/{}/heartbeat", node.id);
    let mut over_allocated = heartbeat_body(json!([]));
    over_allocated["allocatable"]["cpu_millis"] = json!(9000);
    let mut missing_total = heartbeat_body(json!([]));
    if let Some(object) = missing_total.as_object_mut() {
        object.remove("total");
    }
    let cidr_pod =
        heartbeat_body(json!([{"pod_id": Uuid::new_v4(), "generation": 1, "state": "running", "ip": "10.88.0.2/16"}]));
    let unknown_state = heartbeat_body(json!([{"pod_id": Uuid::new_v4(), "generation": 1, "state": "dancing"}]));
    for (body, code) in [
        (over_allocated, "validation_failed"),
        (missing_total, "invalid_json"),
        (cidr_pod, "validation_failed"),
        (unknown_state, "invalid_json"),
    ] {
        client.post_json(&heartbeat_path, &body).await.assert_error(400, code);
    }
    let row = cp
        .db()
        .await
        .query_one(
            "SELECT status, last_heartbeat_at IS NULL, total_cpu_millis IS NULL, pods FROM nodes WHERE id = $1",
            &[&node_uuid(&node)],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "unhealthy", "no refused heartbeat counts");
    assert!(row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert_eq!(row.get::<_, Value>(3), json!([]));

    // One bad report refuses the whole batch.
    let reports_path = format!("/internal/nodes/{}/reports", node.id);
    let good = json!({"pod_id": Uuid::new_v4(), "generation": 1, "state": "running", "at": "2025-01-01T00:00:00Z"});
    for (bad, code) in [
        (
            json!({"pod_id": Uuid::new_v4(), "generation": 1, "state": "running", "at": "yesterday"}),
            "validation_failed",
        ),
        (
            json!({"pod_id": Uuid::new_v4(), "generation": -1, "state": "running", "at": "2025-01-01T00:00:00Z"}),
            "validation_failed",
        ),
        (
            json!({"pod_id": Uuid::new_v4(), "generation": 1, "state": "running", "ip": "a.b.c.d", "at": "2025-01-01T00:00:00Z"}),
            "validation_failed",
        ),
        (
            json!({"pod_id": Uuid::new_v4(), "generation": 1, "state": "sleeping", "at": "2025-01-01T00:00:00Z"}),
            "invalid_json",
        ),
        (
            json!({"pod_id": "not-a-uuid", "generation": 1, "state": "running", "at": "2025-01-01T00:00:00Z"}),
            "invalid_json",
        ),
    ] {
        let message = client
            .post_json(&reports_path, &json!({"reports": [good.clone(), bad]}))
            .await
            .assert_error(400, code);
        if code == "validation_failed" {
            assert!(
                message.contains("reports[1]"),
                "the message names the report: {message}"
            );
        }
    }
    client
        .post_json(&reports_path, &json!([good]))
        .await
        .assert_error(400, "invalid_json");
    assert_eq!(count(&cp, "SELECT count(*) FROM pod_reports").await, 0);
}

#[tokio::test]
async fn runtime_images_override_the_catalog() {
    let local_image = "127.0.0.1:5055/instapod/static:1";
    let cp = ControlPlane::start(
        ControlPlaneOptions::default().env("INSTAPOD_RUNTIME_IMAGES", &format!(r#"{{ static = "{local_image}" }}"#)),
    )
    .await;
    let plain = ControlPlane::start_default().await;

    let image_of = |body: &Value, id: &str| -> anyhow::Result<String> {
        body["runtimes"]
            .as_array()
            .and_then(|list| list.iter().find(|runtime| runtime["id"] == id))
            .and_then(|runtime| runtime["image"].as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no runtime {id} in {body}"))
    };
    let overridden = cp.client().get_response("/api/runtimes").await.json_with_status(200);
    let seeded = plain.client().get_response("/api/runtimes").await.json_with_status(200);
    assert_eq!(image_of(&overridden, "static").expect("static"), local_image);
    let seeded_static = image_of(&seeded, "static").expect("static");
    assert_ne!(seeded_static, local_image, "the seeded image differs");
    // Runtimes without an override keep the catalog's image.
    assert_eq!(
        image_of(&overridden, "node").expect("node"),
        image_of(&seeded, "node").expect("node")
    );
    // The override is configuration only: the catalog row is unchanged.
    let stored: String = cp
        .db()
        .await
        .query_one("SELECT image FROM runtimes WHERE id = 'static'", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(stored, seeded_static);
}

#[tokio::test]
async fn invalid_node_settings_refuse_to_start() {
    for (key, value, expected) in [
        (
            "INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS",
            "5",
            "must be greater than node_heartbeat_interval_secs",
        ),
        ("INSTAPOD_NODE_JOIN_TOKEN", "short", "at least 16 characters"),
    ] {
        let (status, log) = ControlPlane::start_expecting_exit(ControlPlaneOptions::default().env(key, value)).await;
        assert_eq!(status.code(), Some(2), "{key}={value} must be refused; log:\n{log}");
        assert!(
            log.contains(expected),
            "{key}={value}: the log must say {expected:?}:\n{log}"
        );
        assert!(!log.contains("listening"), "it must not serve:\n{log}");
    }
}
