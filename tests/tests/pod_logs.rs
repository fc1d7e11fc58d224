//! Pod logs end to end: `GET /api/pods/{name}/logs` on a real control plane, reading from real
//! node agents (two, as in `pods.rs`) whose pods write through the agent's containerd log
//! driver. Covers tail (default and explicit) in order with streams and timestamps, `since`, a
//! log larger than the rotation size read across the rotated file, lines from before an agent
//! restart and a pod restart, tenancy (404), bad parameters (400 with the error body), and
//! follow mode (JSON lines written after the request started; a client that leaves stops the
//! node's reader; the stream ends when the pod is deleted).

use std::time::Duration;

use anyhow::ensure;
use futures_util::StreamExt;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::{TestUser, eventually, scale_user};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const WAIT: Duration = Duration::from_secs(90);
/// Small enough that the first burst of output is rotated.
const LOG_MAX_BYTES: &str = "4096";

async fn fleet() -> Fleet {
    Fleet::start(
        FleetOptions::regions(["local", "eu-central"])
            .allocatable_cpu_millis(600)
            .agent_env("INSTAPOD_AGENT_LOG_MAX_BYTES", LOG_MAX_BYTES)
            .agent_env("INSTAPOD_AGENT_LOG_KEEP", "3"),
    )
    .await
}

/// Creates pod `name` in region `local` running `script` and waits until it runs.
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

async fn lines(user: &TestUser, path: &str) -> Vec<Value> {
    let body = user.client().get(path).send().await.json_with_status(200);
    body["lines"].as_array().cloned().expect("a lines array")
}

fn text(line: &Value) -> &str {
    line["line"].as_str().unwrap_or_default()
}

fn time_of(line: &Value) -> OffsetDateTime {
    let stamp = line["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("no timestamp: {line}"));
    OffsetDateTime::parse(stamp, &Rfc3339).unwrap_or_else(|err| panic!("{stamp}: {err}"))
}

/// The numbers of the lines `<prefix> N` of `stream`, in order.
fn numbers(lines: &[Value], prefix: &str, stream: &str) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|l| text(l).strip_prefix(prefix).map(|n| (l, n)))
        .map(|(l, n)| {
            assert_eq!(l["stream"], stream, "{l}");
            n.trim().parse().expect("a number")
        })
        .collect()
}

#[tokio::test]
async fn tail_and_since_read_stdout_and_stderr_across_rotation() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    // 400 lines (~16 KiB, rotated within 5 s), then after a pause 20 more in the fresh file.
    let script = "i=1; while [ $i -le 200 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done; \
                  sleep 12; i=1; while [ $i -le 20 ]; do echo \"late $i\"; i=$((i+1)); done; \
                  exec sleep 100000";
    let pod = run_pod(&user, "printer", script).await;
    let pod_id = pod["id"].as_str().expect("id").to_string();
    assert_eq!(pod["node"], "node-0-local");

    let all = eventually(WAIT, "every line readable", || async {
        let all = lines(&user, "/api/pods/printer/logs?tail=10000").await;
        ensure!(all.len() == 420, "{} lines so far", all.len());
        Ok(all)
    })
    .await;
    // The burst was rotated into `.log.1`; the late lines are in the live file.
    let logs = fleet.nodes[0].state_dir.join("logs");
    let rotated = std::fs::read_to_string(logs.join(format!("{pod_id}.log.1"))).expect("the rotated file");
    assert!(rotated.contains(" stdout F out 200\n"), "{rotated}");
    let live = std::fs::read_to_string(logs.join(format!("{pod_id}.log"))).expect("the live file");
    assert!(
        live.contains(" stdout F late 20\n") && !live.contains("out 200"),
        "{live}"
    );

    // Everything, in order per stream, each line with its stream and timestamp.
    assert_eq!(numbers(&all, "out ", "stdout"), (1..=200).collect::<Vec<_>>());
    assert_eq!(numbers(&all, "err ", "stderr"), (1..=200).collect::<Vec<_>>());
    assert_eq!(numbers(&all, "late ", "stdout"), (1..=20).collect::<Vec<_>>());
    for stream in ["stdout", "stderr"] {
        let times: Vec<OffsetDateTime> = all.iter().filter(|l| l["stream"] == stream).map(time_of).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{stream} timestamps in order");
    }

    // Default tail: the last 100.
    let default = lines(&user, "/api/pods/printer/logs").await;
    assert_eq!(default.len(), 100);
    assert_eq!(default, all[320..].to_vec());

    // tail=30 spans the rotated file (10 lines) and the live one (20).
    let tail = lines(&user, "/api/pods/printer/logs?tail=30").await;
    assert_eq!(tail, all[390..].to_vec());
    assert_eq!(numbers(&tail, "late ", "stdout"), (1..=20).collect::<Vec<_>>());
    // The two streams reach the file in bursts, so which of them ends the burst varies; both
    // end at 200 and only the burst's lines come before the late ones.
    let burst: Vec<&str> = tail[..10].iter().map(text).collect();
    assert!(
        burst.iter().all(|l| l.starts_with("out ") || l.starts_with("err ")),
        "{burst:?}"
    );
    assert!(burst.contains(&"out 200") || burst.contains(&"err 200"), "{burst:?}");

    // since: from the first late line on.
    let late_1 = all.iter().find(|l| text(l) == "late 1").expect("late 1");
    let since = late_1["timestamp"].as_str().expect("timestamp");
    let since_url = since.replace(':', "%3A");
    let after = lines(&user, &format!("/api/pods/printer/logs?since={since_url}&tail=10000")).await;
    assert_eq!(after, all[400..].to_vec(), "since {since}");
    let limited = lines(&user, &format!("/api/pods/printer/logs?since={since_url}&tail=5")).await;
    assert_eq!(numbers(&limited, "late ", "stdout"), (16..=20).collect::<Vec<_>>());
    assert!(
        lines(&user, "/api/pods/printer/logs?since=2999-01-01T00:00:00Z")
            .await
            .is_empty()
    );
    assert!(lines(&user, "/api/pods/printer/logs?tail=0").await.is_empty());

    // Another team's user, and a pod that does not exist: 404.
    let stranger = scale_user(&fleet.cp).await;
    stranger
        .client()
        .get("/api/pods/printer/logs")
        .send()
        .await
        .assert_error(404, "not_found");
    user.client()
        .get("/api/pods/nothing-here/logs")
        .send()
        .await
        .assert_error(404, "not_found");
    user.client()
        .without_token()
        .get("/api/pods/printer/logs")
        .send()
        .await
        .assert_error(401, "unauthorized");

    // Bad parameters: 400 with the error body.
    for query in [
        "tail=-1",
        "tail=10001",
        "tail=many",
        "since=yesterday",
        "since=2026-01-01",
        "follow=maybe",
    ] {
        let response = user
            .client()
            .get(&format!("/api/pods/printer/logs?{query}"))
            .send()
            .await;
        let message = response.assert_error(400, "validation_failed");
        assert!(!message.is_empty(), "{query}");
    }

    // The agent restarts (and rejoins with a new node token): the same lines, through it.
    let mut fleet = fleet;
    fleet.restart_agent(0);
    eventually(WAIT, "the logs through the restarted agent", || async {
        let response = user.client().get("/api/pods/printer/logs?tail=10000").send().await;
        ensure!(response.status == 200, "{}", response.text());
        ensure!(response.json()["lines"] == Value::Array(all.clone()), "different lines");
        Ok(())
    })
    .await;

    // The pod restarts: its new output follows what it wrote before.
    user.client()
        .post("/api/pods/printer/restart")
        .send()
        .await
        .assert_status(202);
    let again = eventually(WAIT, "the restarted pod's first burst", || async {
        let got = lines(&user, "/api/pods/printer/logs?tail=10000").await;
        ensure!(got.len() >= 820, "{} lines so far", got.len());
        Ok(got)
    })
    .await;
    assert_eq!(again[..420], all[..], "the lines from before the restart");
    assert_eq!(numbers(&again[420..], "out ", "stdout"), (1..=200).collect::<Vec<_>>());

    user.client()
        .delete("/api/pods/printer")
        .send()
        .await
        .assert_status(202);
}

#[tokio::test]
async fn follow_streams_new_lines_until_the_pod_is_deleted() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    run_pod(
        &user,
        "ticker",
        "i=1; while true; do echo \"tick $i\"; i=$((i+1)); sleep 1; done",
    )
    .await;
    eventually(WAIT, "the first ticks", || async {
        let got = lines(&user, "/api/pods/ticker/logs").await;
        ensure!(got.len() >= 2, "{got:?}");
        Ok(())
    })
    .await;

    let started = OffsetDateTime::now_utc();
    let mut body = follow(&fleet, &user).await;
    let received = next_lines(&mut body, 3).await;
    let ticks = numbers(&received, "tick ", "stdout");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "consecutive: {ticks:?}");
    for line in &received {
        assert!(time_of(line) >= started, "written after the request started: {line}");
    }
    let metrics_port = fleet.nodes[0].metrics_port;
    assert_eq!(followers(metrics_port).await, 1);

    // A second follower that leaves: its reader on the node stops, the first goes on.
    let mut second = follow(&fleet, &user).await;
    next_lines(&mut second, 1).await;
    assert_eq!(followers(metrics_port).await, 2);
    drop(second);
    eventually(WAIT, "the node's reader of the client that left to stop", || async {
        let now = followers(metrics_port).await;
        ensure!(now == 1, "{now} followers");
        Ok(())
    })
    .await;
    let more = next_lines(&mut body, 1).await;
    assert_eq!(
        numbers(&more, "tick ", "stdout"),
        vec![ticks[2] + 1],
        "nothing lost meanwhile"
    );

    // Deleting the pod ends the stream.
    user.client().delete("/api/pods/ticker").send().await.assert_status(202);
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = body.0.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the follow stream ends when the pod is deleted");
    assert_eq!(followers(metrics_port).await, 0);
}

type Body = std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Starts following the ticker's log (new lines only) and checks the answer's type.
async fn follow(fleet: &Fleet, user: &TestUser) -> (Body, Vec<u8>) {
    let http = instapod_tests::http_builder().no_proxy().build().expect("client");
    let response = http
        .get(format!("{}/api/pods/ticker/logs?follow=true&tail=0", fleet.cp.url()))
        .bearer_auth(&user.token)
        .send()
        .await
        .expect("the follow request");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok());
    assert_eq!(content_type, Some("application/x-ndjson"));
    (Box::pin(response.bytes_stream()), Vec::new())
}

/// The next `n` JSON lines of a follow stream (each within 30 s).
async fn next_lines((body, buffer): &mut (Body, Vec<u8>), n: usize) -> Vec<Value> {
    let mut received = Vec::new();
    loop {
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            received.push(serde_json::from_slice(&line[..end]).expect("a JSON line"));
            if received.len() == n {
                return received;
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .expect("a new line within 30 s")
            .expect("the stream stays open")
            .expect("a chunk");
        buffer.extend_from_slice(&chunk);
    }
}

/// The node's `instapod_node_agent_log_followers` gauge.
async fn followers(metrics_port: u16) -> u64 {
    let text = instapod_tests::node::agent_metrics(metrics_port)
        .await
        .expect("the agent's metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("instapod_node_agent_log_followers "))
        .map(|v| v.trim().parse::<f64>().expect("a number") as u64)
        .unwrap_or(0)
}
