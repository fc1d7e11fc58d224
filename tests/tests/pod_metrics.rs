//! Pod metrics end to end: real agents sample real pods (containerd task metrics, the pod's
//! veth, its volume) every second and push to a real control plane. Covers a pod burning CPU,
//! a pod holding memory, a pod sending traffic and filling its volume — in `GET
//! /api/pods/{name}/metrics` and in the agent's `/metrics` — a stopped pod going stale and
//! leaving `/metrics`, history with the right number of aligned points at each resolution
//! (raw samples, minute and hour buckets with exact averages), retention deleting what is past
//! its time, a re-sent batch not counted twice, tenancy and bad parameters.

use std::time::Duration;

use anyhow::ensure;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::{TestUser, eventually, node, register_and_login, scale_user};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const WAIT: Duration = Duration::from_secs(90);
const MIB: f64 = 1024.0 * 1024.0;

async fn fleet() -> Fleet {
    Fleet::start(
        FleetOptions::regions(["local"])
            .allocatable_cpu_millis(1500)
            .agent_env("INSTAPOD_AGENT_METRICS_SAMPLE_INTERVAL_SECS", "1")
            .agent_env("INSTAPOD_AGENT_DISK_USAGE_INTERVAL_SECS", "1")
            .control_plane_env("INSTAPOD_METRICS_RETENTION_INTERVAL_SECS", "1"),
    )
    .await
}

/// Creates pod `name` (starter plan: 0.5 cores, 512 MiB, 5 GB) running `script`; waits until
/// it runs and returns it.
async fn run_pod(user: &TestUser, name: &str, script: &str) -> Value {
    let image = instapod_tests::node::shell_image().await;
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": name, "image": image, "plan": "starter", "region": "local",
                    "command": ["sh", "-c", script]}),
        )
        .await
        .json_with_status(202);
    user.wait_pod_state(name, "running", WAIT).await
}

async fn current(user: &TestUser, name: &str) -> Value {
    user.client()
        .get(&format!("/api/pods/{name}/metrics"))
        .send()
        .await
        .json_with_status(200)
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

#[tokio::test]
async fn current_metrics_show_cpu_memory_network_and_disk() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    let burner = run_pod(&user, "burner", "while :; do :; done").await;
    // ~64 MiB held in a shell variable; the loop keeps the shell (busybox `sh -c` would
    // otherwise exec its last command, dropping the variable).
    run_pod(
        &user,
        "hog",
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo held; while :; do sleep 1000; done",
    )
    .await;
    // A 6 MiB file in the volume, served over HTTP.
    let web = run_pod(
        &user,
        "web",
        "head -c 6291456 /dev/urandom > /data/blob; exec httpd -f -p 8080 -h /data",
    )
    .await;

    let busy = eventually(WAIT, "the burner's CPU", || async {
        let m = current(&user, "burner").await;
        ensure!(f(&m["cpu"]["cores"]) >= 0.3, "{m}");
        Ok(m)
    })
    .await;
    assert_eq!(busy["state"], "running");
    assert_eq!(busy["stale"], false, "{busy}");
    assert!((f(&busy["cpu"]["limit_cores"]) - 0.5).abs() < 1e-6, "{busy}");
    assert!(f(&busy["cpu"]["percent_of_limit"]) >= 60.0, "{busy}");
    assert!(f(&busy["cpu"]["cores"]) <= 0.6, "throttled to its limit: {busy}");
    assert!(f(&busy["cpu"]["seconds_total"]) > 0.0);
    assert!(busy["pids"].as_i64().unwrap_or(0) >= 1, "{busy}");
    let sampled = OffsetDateTime::parse(busy["sampled_at"].as_str().expect("sampled_at"), &Rfc3339).expect("time");
    assert!((OffsetDateTime::now_utc() - sampled).whole_seconds() < 30);

    // Held: the memory stays while the pod idles (filling it took CPU).
    let hog = eventually(WAIT, "the hog's memory, held while idle", || async {
        let m = current(&user, "hog").await;
        ensure!(f(&m["memory"]["used_bytes"]) >= 60.0 * MIB, "{m}");
        ensure!(f(&m["cpu"]["cores"]) < 0.2, "{m}");
        Ok(m)
    })
    .await;
    assert_eq!(hog["memory"]["limit_bytes"].as_i64(), Some(512 * 1024 * 1024), "{hog}");

    // Traffic: fetch the blob three times straight from the pod's address.
    let ip = web["ip"].as_str().expect("an IP").to_string();
    let http = instapod_tests::http_builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    eventually(WAIT, "the web pod serving its blob", || async {
        let body = http.get(format!("http://{ip}:8080/blob")).send().await?.bytes().await?;
        ensure!(body.len() == 6 * 1024 * 1024, "{} bytes", body.len());
        Ok(())
    })
    .await;
    for _ in 0..2 {
        let body = http
            .get(format!("http://{ip}:8080/blob"))
            .send()
            .await
            .expect("GET")
            .bytes()
            .await
            .expect("body");
        assert_eq!(body.len(), 6 * 1024 * 1024);
    }
    let web_metrics = eventually(WAIT, "the web pod's traffic and disk", || async {
        let m = current(&user, "web").await;
        ensure!(f(&m["network"]["tx_bytes"]) >= 18.0 * MIB, "{m}");
        ensure!(f(&m["disk"]["used_bytes"]) >= 6.0 * MIB, "{m}");
        Ok(m)
    })
    .await;
    assert!(
        f(&web_metrics["network"]["rx_bytes"]) > 0.0,
        "requests came in: {web_metrics}"
    );
    assert!(
        f(&web_metrics["network"]["rx_bytes"]) < 4.0 * MIB,
        "rx is what the pod received: {web_metrics}"
    );
    assert_eq!(
        web_metrics["disk"]["quota_bytes"].as_i64(),
        Some(5 * 1024 * 1024 * 1024)
    );
    assert!(f(&web_metrics["disk"]["used_bytes"]) < 8.0 * MIB, "{web_metrics}");

    // The agent's /metrics has the same, per pod id.
    let burner_id = burner["id"].as_str().expect("id").to_string();
    let text = node::agent_metrics(fleet.nodes[0].metrics_port)
        .await
        .expect("agent metrics");
    let series = format!("instapod_node_agent_pod_cpu_seconds_total{{pod_id=\"{burner_id}\"}}");
    assert!(text.contains(&series), "{series} missing");
    assert!(text.contains("# TYPE instapod_node_agent_pod_memory_bytes gauge"));
    assert!(text.contains("instapod_node_agent_sampling_duration_seconds_count"));

    // Another team sees nothing.
    let stranger = register_and_login(&fleet.cp).await;
    for path in ["/api/pods/burner/metrics", "/api/pods/burner/metrics/history"] {
        let body = stranger.client().get(path).send().await.json_with_status(404);
        assert_eq!(body["error"]["code"], "not_found", "{path}: {body}");
    }

    // A stopped pod: its last numbers are stale and it leaves the agent's /metrics.
    user.client()
        .post("/api/pods/burner/stop")
        .send()
        .await
        .json_with_status(202);
    let stopped = eventually(WAIT, "the burner stopped and stale", || async {
        let m = current(&user, "burner").await;
        ensure!(m["state"] == "stopped" && m["stale"] == true, "{m}");
        Ok(m)
    })
    .await;
    assert!(
        stopped["cpu"]["cores"].is_number(),
        "the last sample stays readable: {stopped}"
    );
    eventually(WAIT, "the burner gone from the agent's /metrics", || async {
        let text = node::agent_metrics(fleet.nodes[0].metrics_port).await?;
        ensure!(!text.contains(&series));
        Ok(())
    })
    .await;
}

async fn history(user: &TestUser, name: &str, query: &str) -> Value {
    user.client()
        .get(&format!("/api/pods/{name}/metrics/history?{query}"))
        .send()
        .await
        .json_with_status(200)
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).expect("format")
}

fn series_len(body: &Value) -> usize {
    let n = body["timestamps"].as_array().map_or(0, Vec::len);
    for (key, values) in body["series"].as_object().expect("series") {
        assert_eq!(values.as_array().map_or(0, Vec::len), n, "{key} has one value per step");
    }
    n
}

#[tokio::test]
async fn history_is_aligned_at_every_resolution_and_retention_deletes_old_samples() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    let pod = run_pod(&user, "steady", "exec sleep 100000").await;
    let pod_id: uuid::Uuid = pod["id"].as_str().expect("id").parse().expect("uuid");

    // Raw samples, 10-second steps over the last minute.
    let raw = eventually(WAIT, "a few raw samples", || async {
        let now = OffsetDateTime::now_utc();
        let body = history(
            &user,
            "steady",
            &format!(
                "start={}&end={}&step=10s",
                rfc3339(now - time::Duration::seconds(60)),
                rfc3339(now)
            ),
        )
        .await;
        let samples: i64 = body["series"]["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .filter_map(Value::as_i64)
            .sum();
        ensure!(samples >= 4, "{body}");
        Ok(body)
    })
    .await;
    assert_eq!(raw["resolution"], "raw");
    assert_eq!(raw["step_seconds"], 10);
    let n = series_len(&raw);
    assert!((6..=7).contains(&n), "60 s in 10 s steps, aligned: {n}");
    let stamps: Vec<i64> = raw["timestamps"]
        .as_array()
        .expect("timestamps")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(stamps.iter().all(|t| t % 10 == 0), "aligned to the step: {stamps:?}");
    assert!(stamps.windows(2).all(|w| w[1] - w[0] == 10));
    let memory = raw["series"]["memory_bytes"].as_array().expect("memory");
    assert!(memory.iter().any(|v| v.as_f64().is_some_and(|m| m > 0.0)), "{raw}");
    assert!(memory.first().is_some_and(Value::is_null), "before the pod ran: null");

    // Minute buckets over the last hour (the default range), folded from the same samples.
    let minutes = history(&user, "steady", "step=1m").await;
    assert_eq!(minutes["resolution"], "1m");
    let n = series_len(&minutes);
    assert!((60..=61).contains(&n), "{n}");
    let last = minutes["series"]["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .rev()
        .find_map(Value::as_i64)
        .filter(|n| *n > 0);
    assert!(last.is_some(), "the newest minute has samples: {minutes}");

    // 30 days at one-hour steps: hour buckets written directly, with known averages.
    let db = fleet.cp.db().await;
    db.execute(
        "INSERT INTO pod_metrics_rollup (pod_id, resolution_secs, bucket, samples, cpu_cores_sum, cpu_cores_max,
             memory_bytes_sum, memory_bytes_max, rx_bytes_per_sec_sum, tx_bytes_per_sec_sum, disk_used_bytes_max,
             pids_max, cpu_limit_cores, memory_limit_bytes, disk_quota_bytes)
         SELECT $1, 3600, date_trunc('hour', now()) - make_interval(hours => h), 4, h * 0.01 * 4, h * 0.01,
                4 * 1000 * h, 1000 * h, 0, 0, 0, 1, 0.5, 536870912, 5368709120
         FROM generate_series(1, 700) AS h",
        &[&pod_id],
    )
    .await
    .expect("insert hour buckets");
    let now = OffsetDateTime::now_utc();
    let month_query = format!(
        "start={}&end={}&step=1h",
        rfc3339(now - time::Duration::days(30)),
        rfc3339(now)
    );
    let month = history(&user, "steady", &month_query).await;
    assert_eq!(month["resolution"], "1h");
    let n = series_len(&month);
    assert!((720..=721).contains(&n), "{n}");
    let stamps: Vec<i64> = month["timestamps"]
        .as_array()
        .expect("timestamps")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let this_hour = OffsetDateTime::now_utc().unix_timestamp() / 3_600 * 3_600;
    for h in [1i64, 5, 100, 700] {
        let i = stamps
            .iter()
            .position(|t| *t == this_hour - h * 3_600)
            .expect("the bucket's step");
        let memory = month["series"]["memory_bytes"][i].as_f64().expect("a value");
        assert!((memory - 1000.0 * h as f64).abs() < 1e-6, "hour -{h}: {memory}");
        let cpu = month["series"]["cpu_cores"][i].as_f64().expect("a value");
        assert!((cpu - 0.01 * h as f64).abs() < 1e-6, "hour -{h}: {cpu}");
        assert_eq!(month["series"]["samples"][i], 4);
    }
    let empty = stamps
        .iter()
        .position(|t| *t == this_hour - 710 * 3_600)
        .expect("a step before the buckets");
    assert!(month["series"]["cpu_cores"][empty].is_null());

    // A batch re-sent by the node is stored once and counted once.
    let credentials: Value =
        serde_json::from_slice(&std::fs::read(fleet.nodes[0].state_dir.join("node.json")).expect("node credentials"))
            .expect("json");
    let at_unix_ms = (OffsetDateTime::now_utc().unix_timestamp() - 3_500) * 1_000 + 123;
    let batch = json!({"samples": [{
        "pod_id": pod_id, "at_unix_ms": at_unix_ms, "cpu_seconds_total": 1.0, "cpu_cores": 0.25,
        "cpu_limit_cores": 0.5, "memory_bytes": 1000, "memory_limit_bytes": 536870912, "rx_bytes": 1,
        "tx_bytes": 2, "rx_bytes_per_second": 0.0, "tx_bytes_per_second": 0.0, "disk_used_bytes": 0,
        "disk_quota_bytes": 5368709120u64, "pids": 1
    }]});
    let node_client = fleet
        .cp
        .client()
        .with_token(credentials["node_token"].as_str().expect("node_token"));
    let path = format!(
        "/internal/nodes/{}/metrics",
        credentials["node_id"].as_str().expect("node_id")
    );
    let first = node_client.post_json(&path, &batch).await.json_with_status(200);
    assert_eq!(first["accepted"], 1);
    let again = node_client.post_json(&path, &batch).await.json_with_status(200);
    assert_eq!(again["accepted"], 0, "the same sample twice is stored once");
    let minute_samples: i32 = db
        .query_one(
            "SELECT samples FROM pod_metrics_rollup WHERE pod_id = $1 AND resolution_secs = 60
               AND bucket = to_timestamp(floor($2::float8 / 60000) * 60)",
            &[&pod_id, &(at_unix_ms as f64)],
        )
        .await
        .expect("the minute bucket")
        .get(0);
    assert_eq!(minute_samples, 1, "folded once");
    let wrong = node_client
        .post_json(
            &path,
            &json!({"samples": [{"pod_id": pod_id, "at_unix_ms": at_unix_ms, "cpu_seconds_total": -1.0,
            "cpu_cores": 0.0, "cpu_limit_cores": 0.5, "memory_bytes": 0, "memory_limit_bytes": 0, "rx_bytes": 0,
            "tx_bytes": 0, "rx_bytes_per_second": 0.0, "tx_bytes_per_second": 0.0, "disk_used_bytes": 0,
            "disk_quota_bytes": 0, "pids": 0}]}),
        )
        .await
        .json_with_status(400);
    assert_eq!(wrong["error"]["code"], "validation_failed");

    // Retention: raw samples older than 2 hours, minute buckets older than 25 hours and hour
    // buckets older than 31 days go; newer ones stay.
    db.execute(
        "INSERT INTO pod_metrics_raw (pod_id, at, cpu_seconds_total, cpu_cores, cpu_limit_cores, memory_bytes,
             memory_limit_bytes, rx_bytes, tx_bytes, rx_bytes_per_sec, tx_bytes_per_sec, disk_used_bytes,
             disk_quota_bytes, pids)
         SELECT $1, now() - make_interval(mins => m), 0, 0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0
         FROM unnest(ARRAY[90, 150, 600]) AS m",
        &[&pod_id],
    )
    .await
    .expect("old raw samples");
    db.execute(
        "INSERT INTO pod_metrics_rollup (pod_id, resolution_secs, bucket, samples, cpu_cores_sum, cpu_cores_max,
             memory_bytes_sum, memory_bytes_max, rx_bytes_per_sec_sum, tx_bytes_per_sec_sum, disk_used_bytes_max,
             pids_max, cpu_limit_cores, memory_limit_bytes, disk_quota_bytes)
         VALUES ($1, 60, date_trunc('minute', now()) - interval '2 days', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                ($1, 3600, date_trunc('hour', now()) - interval '40 days', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)",
        &[&pod_id],
    )
    .await
    .expect("old buckets");
    eventually(WAIT, "retention deleting what is past its time", || async {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM pod_metrics_raw WHERE pod_id = $1 AND at < now() - interval '2 hours'),
                        (SELECT count(*) FROM pod_metrics_raw WHERE pod_id = $1 AND at < now() - interval '80 minutes'),
                        (SELECT count(*) FROM pod_metrics_rollup WHERE pod_id = $1 AND resolution_secs = 60
                           AND bucket < now() - interval '25 hours'),
                        (SELECT count(*) FROM pod_metrics_rollup WHERE pod_id = $1 AND resolution_secs = 3600
                           AND bucket < now() - interval '31 days'),
                        (SELECT count(*) FROM pod_metrics_rollup WHERE pod_id = $1 AND resolution_secs = 3600)",
                &[&pod_id],
            )
            .await?;
        let (old_raw, kept_raw, old_minutes, old_hours, hours): (i64, i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        ensure!(
            old_raw == 0 && old_minutes == 0 && old_hours == 0,
            "{old_raw} {old_minutes} {old_hours}"
        );
        ensure!(kept_raw == 1, "the 90-minute-old sample stays: {kept_raw}");
        ensure!(hours >= 700, "recent hour buckets stay: {hours}");
        Ok(())
    })
    .await;

    // Bad parameters: 400 with a message, nothing else.
    let now = OffsetDateTime::now_utc();
    for query in [
        "step=0".to_string(),
        "step=fast".to_string(),
        "start=yesterday".to_string(),
        format!("start={}&end={}", rfc3339(now), rfc3339(now - time::Duration::hours(1))),
        format!("start={}&step=1m", rfc3339(now - time::Duration::days(7))),
        format!("start={}&step=10s", rfc3339(now - time::Duration::hours(5))),
    ] {
        let body = user
            .client()
            .get(&format!("/api/pods/steady/metrics/history?{query}"))
            .send()
            .await
            .json_with_status(400);
        assert_eq!(body["error"]["code"], "validation_failed", "{query}: {body}");
    }
}
