//! Pods end to end: the pods API on a real control plane, the real scheduler, and two real node
//! agents (containerd, runc, CNI) joined to it, sharing one Redis for the queues. Covers the
//! lifecycle (create → running → stop → start → restart → delete, with events), placement by
//! region and capacity (a full fleet leaves a pod `pending` with an event until a delete frees
//! room), the state machine's 409s, quota, validation and tenancy.

use std::time::Duration;

use anyhow::ensure;
use instapod_tests::node::{CleanupGuard, NodeSettings, spawn_agent, web_image};
use instapod_tests::scheduler::Scheduler;
use instapod_tests::{ControlPlane, ControlPlaneOptions, TestUser, eventually, redis, register_and_login, scale_user};
use serde_json::{Value, json};

const JOIN_TOKEN: &str = "pods-test-join-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(90);

/// A control plane, a scheduler and two agents (regions `local` and `eu-central`), each agent
/// offering 600 millicores so that two `starter` pods (500m) cannot share a node.
struct Fleet {
    cp: ControlPlane,
    redis_url: String,
    agent_env: Vec<Vec<(String, String)>>,
    _scheduler: Scheduler,
    agents: Vec<std::process::Child>,
    nodes: Vec<NodeSettings>,
    _cleanup: Vec<CleanupGuard>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            instapod_tests::process::kill_and_reap(agent);
        }
    }
}

async fn fleet() -> Fleet {
    let redis_url = redis::shared().next_url();
    let cp = ControlPlane::start(
        ControlPlaneOptions::default()
            .redis_url(&redis_url)
            .env("INSTAPOD_NODE_JOIN_TOKEN", JOIN_TOKEN)
            .env("INSTAPOD_NODE_HEARTBEAT_INTERVAL_SECS", "1")
            .env("INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS", "5"),
    )
    .await;
    let scheduler = Scheduler::start(cp.database_url(), &redis_url);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64;
    let mut agents = Vec::new();
    let mut nodes = Vec::new();
    let mut agent_env = Vec::new();
    let mut cleanup = Vec::new();
    for region in ["local", "eu-central"] {
        let settings = NodeSettings::new(region);
        cleanup.push(settings.cleanup_guard());
        let env = vec![
            ("INSTAPOD_AGENT_CONTROL_PLANE_URL".to_string(), cp.url().to_string()),
            ("INSTAPOD_AGENT_JOIN_TOKEN".to_string(), JOIN_TOKEN.to_string()),
            ("INSTAPOD_AGENT_REDIS_URL".to_string(), redis_url.clone()),
            ("INSTAPOD_AGENT_NODE_NAME".to_string(), format!("node-{region}")),
            ("INSTAPOD_AGENT_REGION".to_string(), region.to_string()),
            (
                "INSTAPOD_AGENT_RESERVED__CPU_MILLIS".to_string(),
                (cpus * 1000 - 600).to_string(),
            ),
        ];
        let (child, _log) = spawn_agent(&settings, &env);
        agents.push(child);
        agent_env.push(env);
        nodes.push(settings);
    }
    eventually(WAIT, "both nodes healthy with capacity", || async {
        let db = cp.db().await;
        let healthy: i64 = db
            .query_one(
                "SELECT count(*) FROM nodes WHERE status = 'healthy' AND allocatable_cpu_millis = 600",
                &[],
            )
            .await?
            .get(0);
        ensure!(healthy == 2, "{healthy} healthy nodes");
        Ok(())
    })
    .await;
    Fleet {
        cp,
        redis_url,
        agent_env,
        _scheduler: scheduler,
        agents,
        nodes,
        _cleanup: cleanup,
    }
}

async fn pod(user: &TestUser, name: &str) -> Value {
    user.client()
        .get(&format!("/api/pods/{name}"))
        .send()
        .await
        .json_with_status(200)
}

async fn wait_state(user: &TestUser, name: &str, state: &str) -> Value {
    user.wait_pod_state(name, state, WAIT).await
}

async fn events(user: &TestUser, name: &str) -> Vec<Value> {
    let body = user
        .client()
        .get(&format!("/api/pods/{name}/events?limit=200"))
        .send()
        .await
        .json_with_status(200);
    body["events"].as_array().cloned().unwrap_or_default()
}

async fn http_ok(ip: &str) -> anyhow::Result<()> {
    let client = instapod_tests::http_builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()?;
    let status = client.get(format!("http://{ip}:8080/")).send().await?.status();
    ensure!(status.as_u16() == 404 || status.is_success(), "{status}");
    Ok(())
}

#[tokio::test]
async fn a_pod_goes_through_its_whole_lifecycle_on_real_nodes() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    let image = web_image().await;
    let created = user
        .client()
        .post_json(
            "/api/pods",
            &json!({"name": "web", "image": image, "plan": "starter", "region": "eu-central", "http_port": 8080}),
        )
        .await
        .json_with_status(202);
    assert_eq!(created["state"], "pending");
    assert_eq!(created["generation"], 1);
    assert_eq!(created["resources"]["cpu_millis"], 500);
    assert!(
        created["urls"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("http://web-"),
        "{created}"
    );

    let running = wait_state(&user, "web", "running").await;
    assert_eq!(running["node"], "node-eu-central", "the region decides the node");
    let ip = running["ip"].as_str().expect("a running pod has an IP").to_string();
    eventually(WAIT, "the pod's HTTP server", || http_ok(&ip)).await;

    // Through the node's ingress, by the pod's host name.
    let url = running["urls"][0].as_str().expect("a URL").to_string();
    let host = url
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let ingress = format!("http://127.0.0.1:{}/", fleet.nodes[1].ingress_port);
    let through = eventually(WAIT, "the pod through the ingress", || {
        let (ingress, host) = (ingress.clone(), host.clone());
        async move {
            let client = instapod_tests::http_builder()
                .no_proxy()
                .timeout(Duration::from_secs(3))
                .build()?;
            let response = client.get(&ingress).header("host", &host).send().await?;
            let status = response.status().as_u16();
            ensure!(status == 404 || status == 200, "{status}");
            Ok(response
                .headers()
                .get("server")
                .map(|v| v.to_str().unwrap_or_default().to_string()))
        }
    })
    .await;
    let _ = through;

    let list = user.client().get("/api/pods").send().await.json_with_status(200);
    assert_eq!(list["pods"].as_array().map(Vec::len), Some(1));

    // The state machine: starting a running pod is a conflict naming the state.
    let conflict = user.client().post("/api/pods/web/start").send().await;
    let message = conflict.assert_error(409, "invalid_state");
    assert!(message.contains("running"), "{message}");

    let stopping = user
        .client()
        .post("/api/pods/web/stop")
        .send()
        .await
        .json_with_status(202);
    assert_eq!(stopping["state"], "stopping");
    assert_eq!(stopping["generation"], 2);
    // Stop again while it stops: idempotent.
    let again = user
        .client()
        .post("/api/pods/web/stop")
        .send()
        .await
        .json_with_status(202);
    assert_eq!(again["generation"], 2, "an operation in flight is not repeated");
    wait_state(&user, "web", "stopped").await;
    assert!(http_ok(&ip).await.is_err(), "a stopped pod does not answer");

    user.client()
        .post("/api/pods/web/start")
        .send()
        .await
        .json_with_status(202);
    let running = wait_state(&user, "web", "running").await;
    let ip = running["ip"].as_str().expect("ip").to_string();
    eventually(WAIT, "the started pod", || http_ok(&ip)).await;

    let restarting = user
        .client()
        .post("/api/pods/web/restart")
        .send()
        .await
        .json_with_status(202);
    assert_eq!(restarting["state"], "starting");
    wait_state(&user, "web", "running").await;

    let history = events(&user, "web").await;
    let kinds: Vec<&str> = history.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds.last(), Some(&"created"), "oldest last: {kinds:?}");
    assert!(kinds.contains(&"scheduled"), "{kinds:?}");
    let messages: Vec<&str> = history.iter().filter_map(|e| e["message"].as_str()).collect();
    assert!(messages.iter().any(|m| m.contains("node-eu-central")), "{messages:?}");
    assert!(messages.contains(&"stop requested"), "{messages:?}");
    let ids: Vec<i64> = history.iter().filter_map(|e| e["id"].as_i64()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let page = user
        .client()
        .get("/api/pods/web/events?limit=2")
        .send()
        .await
        .json_with_status(200);
    assert_eq!(page["events"].as_array().map(Vec::len), Some(2));
    let before = page["next_before"].as_i64().expect("a next page");
    let next = user
        .client()
        .get(&format!("/api/pods/web/events?limit=2&before={before}"))
        .send()
        .await
        .json_with_status(200);
    assert!(next["events"][0]["id"].as_i64().unwrap_or(i64::MAX) < before);

    // Resize: refused when the node has no room, live when it has.
    let refused = user
        .client()
        .post_json("/api/pods/web/resize", &json!({"plan": "pro"}))
        .await;
    let message = refused.assert_error(409, "no_room_on_node");
    assert!(message.contains("node-eu-central"), "{message}");
    let resized = user
        .client()
        .post_json(
            "/api/pods/web/resize",
            &json!({"cpu_millis": 550, "memory_bytes": 256 << 20}),
        )
        .await
        .json_with_status(202);
    assert_eq!(resized["resources"]["cpu_millis"], 550);
    let pod_id = resized["id"].as_str().expect("id").to_string();
    let cgroup = std::path::Path::new("/sys/fs/cgroup/memory/instapod-test")
        .join(&pod_id)
        .join("memory.limit_in_bytes");
    eventually(WAIT, "the running task's new memory limit", || {
        let cgroup = cgroup.clone();
        async move {
            let limit = std::fs::read_to_string(&cgroup)?;
            ensure!(limit.trim() == (256u64 << 20).to_string(), "limit {limit}");
            Ok(())
        }
    })
    .await;
    assert_eq!(
        pod(&user, "web").await["state"],
        "running",
        "a live resize does not stop the pod"
    );

    // Another team cannot see it.
    let stranger = register_and_login(&fleet.cp).await;
    stranger
        .client()
        .get("/api/pods/web")
        .send()
        .await
        .assert_error(404, "not_found");
    stranger
        .client()
        .delete("/api/pods/web")
        .send()
        .await
        .assert_error(404, "not_found");

    let deleting = user.client().delete("/api/pods/web").send().await.json_with_status(202);
    assert_eq!(deleting["state"], "deleting");
    eventually(WAIT, "the pod to be gone", || async {
        let response = user.client().get("/api/pods/web").send().await;
        ensure!(response.status == 404, "{}", response.text());
        Ok(())
    })
    .await;
    let pod_id = created["id"].as_str().expect("id").to_string();
    let node = &fleet.nodes[1];
    let volume = node.state_dir.join("volumes").join(&pod_id);
    assert!(!volume.exists(), "the volume is removed with the pod");
}

#[tokio::test]
async fn a_full_fleet_leaves_a_pod_pending_until_a_delete_frees_room() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    let image = web_image().await;
    for name in ["one", "two"] {
        user.client()
            .post_json("/api/pods", &json!({"name": name, "image": image, "plan": "starter"}))
            .await
            .json_with_status(202);
    }
    // `local` region has one node with 600m: only one starter pod fits; either may win.
    let (winner, loser) = eventually(WAIT, "one pod running and the other unschedulable", || async {
        let one = pod(&user, "one").await;
        let two = pod(&user, "two").await;
        let unschedulable =
            |p: &Value| p["state"] == "pending" && p["reason"].as_str().unwrap_or_default().contains("unschedulable");
        if one["state"] == "running" && unschedulable(&two) {
            return Ok(("one", two));
        }
        if two["state"] == "running" && unschedulable(&one) {
            return Ok(("two", one));
        }
        anyhow::bail!("one: {} / two: {}", one["state"], two["state"])
    })
    .await;
    assert_eq!(pod(&user, winner).await["node"], "node-local");
    let loser_name = loser["name"].as_str().expect("name").to_string();
    let reason = loser["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cpu"),
        "the reason names the missing resource: {reason}"
    );
    let history = events(&user, &loser_name).await;
    assert!(history.iter().any(|e| e["kind"] == "unschedulable"), "{history:?}");

    user.client()
        .delete(&format!("/api/pods/{winner}"))
        .send()
        .await
        .json_with_status(202);
    let second = wait_state(&user, &loser_name, "running").await;
    assert_eq!(second["node"], "node-local", "the freed room is used");

    // The node goes silent: its pods become `unknown` with an event; when it is back, its
    // heartbeat decides.
    let mut fleet = fleet;
    instapod_tests::process::kill_and_reap(&mut fleet.agents[0]);
    wait_state(&user, &loser_name, "unknown").await;
    let history = events(&user, &loser_name).await;
    assert!(
        history.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stopped heartbeating")),
        "{history:?}"
    );
    let (child, _log) = spawn_agent(&fleet.nodes[0], &fleet.agent_env[0]);
    fleet.agents[0] = child;
    wait_state(&user, &loser_name, "running").await;
}

#[tokio::test]
async fn bad_requests_are_refused_with_clear_errors_and_quota_holds() {
    let redis_url = redis::shared().next_url();
    let cp = ControlPlane::start(ControlPlaneOptions::default().redis_url(&redis_url)).await;
    let user = register_and_login(&cp).await;
    let client = user.client();
    for (body, code) in [
        (json!({"name": "x", "image": "busybox"}), "validation_failed"),
        (json!({"name": "Bad_Name", "image": "busybox"}), "validation_failed"),
        (json!({"name": "web"}), "validation_failed"),
        (json!({"name": "web", "runtime": "cobol"}), "unknown_runtime"),
        (json!({"name": "web", "preset": "nope"}), "unknown_preset"),
        (
            json!({"name": "web", "image": "busybox", "plan": "gold"}),
            "unknown_plan",
        ),
        (
            json!({"name": "web", "image": "busybox", "region": "mars"}),
            "unknown_region",
        ),
        (
            json!({"name": "web", "image": "busybox", "env": {"1BAD": "x"}}),
            "validation_failed",
        ),
        (
            json!({"name": "web", "image": "busybox", "command": []}),
            "validation_failed",
        ),
        (json!({"name": "web", "image": "busy box"}), "validation_failed"),
        (
            json!({"name": "web", "image": "busybox", "restart_policy": "sometimes"}),
            "validation_failed",
        ),
    ] {
        client.post_json("/api/pods", &body).await.assert_error(400, code);
    }
    let list = client.get("/api/pods").send().await.json_with_status(200);
    assert_eq!(list["pods"], json!([]), "nothing is left behind by refused requests");

    // The free plan allows one pod: the preset fills in runtime, port and env.
    let created = client
        .post_json("/api/pods", &json!({"name": "site", "preset": "static-site"}))
        .await
        .json_with_status(202);
    assert_eq!(created["runtime"], "static");
    assert_eq!(created["http_port"], 8080);
    assert_eq!(created["plan"], "free");
    let preset = client.get("/api/pods/site/preset").send().await.json_with_status(200);
    assert_eq!(preset["id"], "static-site");
    client
        .post_json("/api/pods", &json!({"name": "site", "image": "busybox"}))
        .await
        .assert_error(409, "pod_name_taken");
    let refused = client
        .post_json("/api/pods", &json!({"name": "second", "image": "busybox"}))
        .await;
    let message = refused.assert_error(403, "quota_exceeded");
    assert!(message.contains("free"), "{message}");
    let plain = client
        .post_json("/api/pods", &json!({"name": "plain", "image": "busybox"}))
        .await;
    plain.assert_error(403, "quota_exceeded");
    client
        .get("/api/pods/nope/preset")
        .send()
        .await
        .assert_error(404, "not_found");
    client.get("/api/pods/nope").send().await.assert_error(404, "not_found");
    client
        .post("/api/pods/nope/stop")
        .send()
        .await
        .assert_error(404, "not_found");
    client.get("/api/pods/site/events").send().await.json_with_status(200);
}

#[tokio::test]
async fn fifty_parallel_actions_on_one_pod_leave_one_consistent_state_and_a_redis_flush_loses_nothing() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    let image = web_image().await;
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": "busy", "image": image, "plan": "starter", "region": "eu-central"}),
        )
        .await
        .json_with_status(202);
    wait_state(&user, "busy", "running").await;

    let mut calls = Vec::new();
    for i in 0..50 {
        let client = user.client();
        calls.push(tokio::spawn(async move {
            let path = match i % 3 {
                0 => "/api/pods/busy/stop",
                1 => "/api/pods/busy/start",
                _ => "/api/pods/busy/restart",
            };
            client.post(path).send().await.status
        }));
    }
    for call in calls {
        let status = call.await.expect("call");
        assert!(
            status == 202 || status == 409,
            "every answer is 202 or 409, got {status}"
        );
    }
    // Whatever won last, the pod settles in its desired state with at most one container.
    let settled = eventually(WAIT, "the pod to settle", || async {
        let body = pod(&user, "busy").await;
        let settled = (body["desired_state"] == "running" && body["state"] == "running")
            || (body["desired_state"] == "stopped" && body["state"] == "stopped");
        ensure!(settled, "{body}");
        Ok(body)
    })
    .await;
    let node = &fleet.nodes[1];
    let containers = instapod_tests::containerd::shared()
        .ctr(&node.namespace)
        .args(["containers", "ls", "-q"])
        .output()
        .expect("ctr");
    let ids: Vec<String> = String::from_utf8_lossy(&containers.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(ids.len() <= 1, "at most one container: {ids:?}");
    if settled["state"] == "running" {
        assert_eq!(ids, vec![settled["id"].as_str().unwrap_or_default().to_string()]);
    }

    // Redis loses every queued job: the reconciler rebuilds the work from Postgres.
    for name in ["after-a", "after-b"] {
        user.client()
            .post_json(
                "/api/pods",
                &json!({"name": name, "image": image, "plan": "free", "region": "local"}),
            )
            .await
            .json_with_status(202);
    }
    let db = fleet.redis_url.rsplit('/').next().unwrap_or("0").to_string();
    let flushed = std::process::Command::new("redis-cli")
        .args(["-p", &redis::shared().port().to_string(), "-n", &db, "FLUSHDB"])
        .output()
        .expect("redis-cli");
    assert!(
        String::from_utf8_lossy(&flushed.stdout).contains("OK"),
        "FLUSHDB: {flushed:?}"
    );
    for name in ["after-a", "after-b"] {
        wait_state(&user, name, "running").await;
    }
    user.client()
        .delete("/api/pods/busy")
        .send()
        .await
        .json_with_status(202);
    eventually(WAIT, "the busy pod gone", || async {
        ensure!(
            user.client().get("/api/pods/busy").send().await.status == 404,
            "still there"
        );
        Ok(())
    })
    .await;
}
