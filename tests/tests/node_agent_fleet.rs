//! The `instapod-node-agent` binary in a fleet: it joins a real control plane, heartbeats its
//! capacity and pods, consumes its own apalis queue in Redis (`node:<id>`), reports pod states
//! to `/internal`, serves `/metrics`, keeps its node id across restarts, and converges to
//! exactly one container per pod after being SIGKILLed in the middle of a create.

use std::time::Duration;

use anyhow::{Context, ensure};
use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use instapod_common::node::{NodeJob, PodSpec, node_queue};
use instapod_tests::node::{NodeSettings, pod_spec, spawn_agent, web_image};
use instapod_tests::{ControlPlane, ControlPlaneOptions, eventually, process, redis};
use uuid::Uuid;

const JOIN_TOKEN: &str = "fleet-test-join-token-abcdefghijklmnop";
const WAIT: Duration = Duration::from_secs(60);

async fn push(redis_url: &str, node_id: Uuid, job: NodeJob) {
    let conn = apalis_redis::connect(redis_url).await.expect("redis");
    let mut storage =
        RedisStorage::<NodeJob>::new(conn).with_config(instapod_common::queue::config(node_queue(node_id)));
    storage.push(job).await.expect("push a job");
}

async fn node_row(cp: &ControlPlane, name: &str) -> anyhow::Result<(Uuid, String, i64, serde_json::Value)> {
    let db = cp.db().await;
    let row = db
        .query_opt(
            "SELECT id, status, total_cpu_millis, pods FROM nodes WHERE name = $1",
            &[&name],
        )
        .await?
        .context("no node row yet")?;
    Ok((
        row.get(0),
        row.get(1),
        // NULL between the join and the first heartbeat.
        row.get::<_, Option<i64>>(2).unwrap_or(0),
        row.get::<_, Option<serde_json::Value>>(3).unwrap_or_default(),
    ))
}

async fn latest_state(cp: &ControlPlane, pod: Uuid) -> anyhow::Result<(String, Option<String>, Option<String>)> {
    let db = cp.db().await;
    let row = db
        .query_opt(
            "SELECT state, reason, ip FROM pod_reports WHERE pod_id = $1 ORDER BY id DESC LIMIT 1",
            &[&pod],
        )
        .await?
        .context("no report yet")?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

async fn wait_running(cp: &ControlPlane, pod: Uuid) -> String {
    eventually(WAIT, "a running report", || async move {
        let (state, reason, ip) = latest_state(cp, pod).await?;
        ensure!(state == "running", "state {state}, reason {reason:?}");
        ip.context("a running report carries the IP")
    })
    .await
}

fn containers_named(settings: &NodeSettings, id: Uuid) -> usize {
    let output = instapod_tests::containerd::shared()
        .ctr(&settings.namespace)
        .args(["containers", "ls", "-q"])
        .output()
        .expect("ctr containers ls");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.trim() == id.to_string())
        .count()
}

#[tokio::test]
async fn the_agent_joins_heartbeats_runs_queued_pods_and_survives_sigkill_mid_create() {
    let cp = ControlPlane::start(
        ControlPlaneOptions::default()
            .env("INSTAPOD_NODE_JOIN_TOKEN", JOIN_TOKEN)
            .env("INSTAPOD_NODE_HEARTBEAT_INTERVAL_SECS", "1")
            .env("INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS", "4"),
    )
    .await;
    let redis_url = redis::shared().next_url();
    let image = web_image().await;
    let settings = NodeSettings::new("fleet");
    let _cleanup = settings.cleanup_guard();
    let name = format!("node-{}", &instapod_tests::ids::random_suffix()[..8]);
    let env = vec![
        ("INSTAPOD_AGENT_CONTROL_PLANE_URL".to_string(), cp.url().to_string()),
        ("INSTAPOD_AGENT_JOIN_TOKEN".to_string(), JOIN_TOKEN.to_string()),
        ("INSTAPOD_AGENT_REDIS_URL".to_string(), redis_url.clone()),
        ("INSTAPOD_AGENT_NODE_NAME".to_string(), name.clone()),
        ("INSTAPOD_AGENT_REGION".to_string(), "test-region".to_string()),
    ];
    let (mut agent, log) = spawn_agent(&settings, &env);

    let (node_id, _, cpu, _) = eventually(WAIT, "the node to join and heartbeat", || async {
        let row = node_row(&cp, &name).await?;
        ensure!(
            row.1 == "healthy" && row.2 > 0,
            "row {row:?}\nagent log:\n{}",
            process::log_tail(&log, 30)
        );
        Ok(row)
    })
    .await;
    assert!(cpu >= 1000, "capacity in millicores: {cpu}");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(settings.state_dir.join("node.json")).expect("node.json")).expect("json");
    assert_eq!(saved["node_id"], node_id.to_string());

    // A pod through the queue.
    let first: PodSpec = pod_spec(&image, 1);
    push(&redis_url, node_id, NodeJob::EnsureRunning { spec: first.clone() }).await;
    push(&redis_url, node_id, NodeJob::EnsureRunning { spec: first.clone() }).await;
    let ip = wait_running(&cp, first.pod_id).await;
    let client = instapod_tests::http_builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    eventually(WAIT, "the pod's server", || {
        let url = format!("http://{ip}:8080/");
        let client = client.clone();
        async move {
            let status = client.get(url).send().await?.status();
            ensure!(status.as_u16() == 404 || status.is_success(), "{status}");
            Ok(())
        }
    })
    .await;
    assert_eq!(
        containers_named(&settings, first.pod_id),
        1,
        "a job delivered twice makes one container"
    );

    // Heartbeats carry the pod; metrics count it.
    eventually(WAIT, "the pod in a heartbeat", || async {
        let (_, _, _, pods) = node_row(&cp, &name).await?;
        ensure!(pods.to_string().contains(&first.pod_id.to_string()), "{pods}");
        Ok(())
    })
    .await;
    let metrics = client
        .get(format!("http://127.0.0.1:{}/metrics", settings.metrics_port))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("instapod_node_agent_pods{state=\"running\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("instapod_node_agent_image_pulls_total 1"), "{metrics}");
    assert!(
        metrics.contains("instapod_node_agent_operation_duration_seconds_bucket"),
        "{metrics}"
    );

    // A stale job is acknowledged and ignored.
    push(
        &redis_url,
        node_id,
        NodeJob::Stop {
            pod_id: first.pod_id,
            generation: 0,
            grace_secs: 1,
        },
    )
    .await;

    // SIGKILL while a create is in flight, then start again.
    let second = pod_spec(&image, 1);
    push(&redis_url, node_id, NodeJob::EnsureRunning { spec: second.clone() }).await;
    eventually(WAIT, "the second pod's record", || {
        let path = settings.state_dir.join("pods").join(format!("{}.json", second.pod_id));
        async move {
            ensure!(path.exists(), "not yet");
            Ok(())
        }
    })
    .await;
    process::kill_and_reap(&mut agent);
    let (mut agent, log) = spawn_agent(&settings, &env);
    wait_running(&cp, second.pod_id).await;
    assert_eq!(
        containers_named(&settings, second.pod_id),
        1,
        "exactly one container after the crash"
    );
    assert_eq!(containers_named(&settings, first.pod_id), 1);
    let (state, _, _) = latest_state(&cp, first.pod_id).await.expect("state");
    assert_eq!(state, "running", "the stale stop was ignored");
    let (again, status, _, _) = node_row(&cp, &name).await.expect("row");
    assert_eq!(again, node_id, "the node keeps its id across restarts");
    assert_eq!(status, "healthy");
    let db = cp.db().await;
    let count: i64 = db
        .query_one("SELECT count(*) FROM nodes", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 1, "no second node row");

    // Missed heartbeats make the node unhealthy; a new agent makes it healthy again.
    process::kill_and_reap(&mut agent);
    eventually(Duration::from_secs(20), "the node to turn unhealthy", || async {
        let (_, status, _, _) = node_row(&cp, &name).await?;
        ensure!(status == "unhealthy", "{status}");
        Ok(())
    })
    .await;
    let (mut agent, _log) = spawn_agent(&settings, &env);
    eventually(WAIT, "the node to be healthy again", || async {
        let (_, status, _, _) = node_row(&cp, &name).await?;
        ensure!(status == "healthy", "{status}");
        Ok(())
    })
    .await;
    // Another join under the node's name replaces its token: the agent joins again by id.
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(settings.state_dir.join("node.json")).expect("node.json")).expect("json");
    let replaced = client
        .post(format!("{}/internal/nodes/join", cp.url()))
        .bearer_auth(JOIN_TOKEN)
        .json(&serde_json::json!({"name": name, "region": "test-region", "agent_version": "x"}))
        .send()
        .await
        .expect("join");
    assert_eq!(replaced.status().as_u16(), 200);
    let path = settings.state_dir.join("node.json");
    eventually(WAIT, "the agent to join again with a new token", || {
        let path = path.clone();
        let before = before.clone();
        async move {
            let now: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            ensure!(now["node_token"] != before["node_token"], "same token");
            ensure!(now["node_id"] == before["node_id"], "the id changed: {now}");
            Ok(())
        }
    })
    .await;
    let rejoined_at = std::time::SystemTime::now();
    eventually(WAIT, "heartbeats accepted again", || async {
        let db = cp.db().await;
        let row = db
            .query_one("SELECT last_heartbeat_at FROM nodes WHERE name = $1", &[&name])
            .await?;
        let at: std::time::SystemTime = row.get(0);
        ensure!(at > rejoined_at, "no newer heartbeat");
        Ok(())
    })
    .await;

    for pod in [first.pod_id, second.pod_id] {
        push(
            &redis_url,
            node_id,
            NodeJob::Delete {
                pod_id: pod,
                generation: 5,
                retain_volume: false,
            },
        )
        .await;
    }
    eventually(WAIT, "both pods deleted", || async {
        for pod in [first.pod_id, second.pod_id] {
            let (state, _, _) = latest_state(&cp, pod).await?;
            ensure!(state == "deleted", "{pod}: {state}");
        }
        Ok(())
    })
    .await;
    assert_eq!(
        containers_named(&settings, first.pod_id) + containers_named(&settings, second.pod_id),
        0
    );
    process::kill_and_reap(&mut agent);
    drop(log);
}
