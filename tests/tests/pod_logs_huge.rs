//! A huge log does not blow memory (issue 6, "Logs"): a real pod writes about 200 MB of output
//! as fast as it can while a client follows its log through the control plane and reads
//! `tail=10000` again and again. The node agent's and the control plane's peak resident memory
//! (`VmHWM`) stays within [`MAX_GROWTH`] of what they used before (`VmRSS`): logs are streamed
//! from the rotated files, never loaded whole, on either side.

use std::time::{Duration, Instant};

use anyhow::ensure;
use futures_util::StreamExt;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::images::ImageBuilder;
use instapod_tests::{eventually, ids, registry, scale_user};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
/// How long the pod may take to write everything (on a busy two-core machine).
const WRITE_WAIT: Duration = Duration::from_secs(300);
/// The bound on memory growth: generous, and still far below the log's size.
const MAX_GROWTH: u64 = 100 * 1024 * 1024;
/// Lines of 1,000 bytes, 50 MB per round, 4 rounds: 200 MB.
const ROUNDS: u32 = 4;
const BYTES_PER_ROUND: u64 = 50_000_000;

/// `VmRSS` and `VmHWM` of process `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_log_is_tailed_and_followed_in_bounded_memory() {
    let fleet = Fleet::start(FleetOptions::regions(["local"]).quiet_logs()).await;
    let user = scale_user(&fleet.cp).await;
    let registry = registry::shared();
    let repository = format!("test/huge-log-{}", &ids::random_suffix()[..8]);
    ImageBuilder::busybox()
        .build()
        .push(&registry.base_url(), &repository, "1")
        .await
        .expect("push an image");
    let name = format!("huge-{}", &ids::random_suffix()[..8]);
    // Waits a little before writing, so the test measures from a quiet start.
    let script = format!(
        "sleep 8; \
         line=$(head -c 999 /dev/zero | tr '\\0' x); i=0; \
         while [ $i -lt {ROUNDS} ]; do yes \"$line\" | head -c {BYTES_PER_ROUND}; i=$((i+1)); done; \
         echo all-written; sleep 3600"
    );
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": name, "image": format!("{}/{repository}:1", registry.host()),
                    "plan": "starter", "region": "local", "command": ["sh", "-c", script]}),
        )
        .await
        .json_with_status(202);
    user.wait_pod_state(&name, "running", WAIT).await;

    let agent_pid = fleet.agent_pid(0);
    let cp_pid = fleet.cp.pid().expect("the control plane runs as a process");
    let (agent_before, _) = memory(agent_pid);
    let (cp_before, _) = memory(cp_pid);
    // The peaks count from now (`5` resets VmHWM to the current RSS: proc(5), clear_refs).
    for pid in [agent_pid, cp_pid] {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
    }

    // A follower that reads as fast as it can, counting lines.
    let http = instapod_tests::http_builder().no_proxy().build().expect("client");
    let response = http
        .get(format!("{}/api/pods/{name}/logs?follow=true&tail=0", fleet.cp.url()))
        .bearer_auth(&user.token)
        .send()
        .await
        .expect("the follow request");
    assert_eq!(response.status().as_u16(), 200);
    let follower = tokio::spawn(async move {
        let mut stream = response.bytes_stream();
        let (mut bytes, mut newlines) = (0u64, 0u64);
        let deadline = Instant::now() + WRITE_WAIT;
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    bytes += chunk.len() as u64;
                    newlines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
                    if chunk.windows(11).any(|w| w == b"all-written") {
                        break;
                    }
                }
                _ => break,
            }
        }
        (bytes, newlines)
    });

    let started = Instant::now();
    let mut tails = 0;
    loop {
        let body: Value = user
            .client()
            .get(&format!("/api/pods/{name}/logs?tail=10000"))
            .send()
            .await
            .json_with_status(200);
        let lines = body["lines"].as_array().expect("lines");
        tails += 1;
        if lines.iter().any(|l| l["line"] == "all-written") {
            assert_eq!(lines.len(), 10000, "a full tail");
            break;
        }
        assert!(
            started.elapsed() < WRITE_WAIT,
            "the pod did not write its 200 MB within {WRITE_WAIT:?} ({tails} tails read)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (followed_bytes, followed_lines) = follower.await.expect("the follower");

    let (_, agent_peak) = memory(agent_pid);
    let (_, cp_peak) = memory(cp_pid);
    let mib = |b: u64| b / (1024 * 1024);
    eprintln!(
        "huge log: {} MB written in {:?}; {tails} tails of 10000 lines; follow read {} MiB ({followed_lines} lines); \
         agent RSS {} MiB -> peak {} MiB; control plane RSS {} MiB -> peak {} MiB",
        u64::from(ROUNDS) * BYTES_PER_ROUND / 1_000_000,
        started.elapsed(),
        mib(followed_bytes),
        mib(agent_before),
        mib(agent_peak),
        mib(cp_before),
        mib(cp_peak),
    );
    assert!(tails >= 2, "tails were read while the pod wrote");
    assert!(followed_lines >= 1000, "the follower received lines: {followed_lines}");
    assert!(
        agent_peak.saturating_sub(agent_before) < MAX_GROWTH,
        "the agent grew from {} MiB to a peak of {} MiB",
        mib(agent_before),
        mib(agent_peak)
    );
    assert!(
        cp_peak.saturating_sub(cp_before) < MAX_GROWTH,
        "the control plane grew from {} MiB to a peak of {} MiB",
        mib(cp_before),
        mib(cp_peak)
    );

    user.client().delete_response(&format!("/api/pods/{name}")).await;
    eventually(WAIT, "the pod is gone", || async {
        let status = user.client().get(&format!("/api/pods/{name}")).send().await.status;
        ensure!(status == 404, "status {status}");
        Ok(())
    })
    .await;
}
