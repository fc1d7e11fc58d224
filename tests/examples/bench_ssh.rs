//! Benchmark: time to first output of a command run in a pod through the node agent's SSH
//! gateway (`ssh <pod> echo x`, the stock OpenSSH client) against `ctr task exec` of the same
//! command in the same pod's container on the same containerd, in the same run.
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo run --release -p instapod-tests --example bench_ssh    # as root; BENCH_N=<rounds>, default 20
//! ```
//!
//! Set-up (not timed): a fleet of one node (control plane, scheduler, agent with its gateway on
//! a loopback port, the harness's containerd and registry), a user, a busybox pod running
//! `sleep`, and an Ed25519 key made with `ssh-keygen` and registered on the pod.
//!
//! Each round measures, in alternating order:
//!
//! - **ssh**: `ssh -p <port> -i <key> <user>@127.0.0.1 echo x` (batch mode, no known-hosts file,
//!   no agent, no connection sharing): a new TCP connection, key exchange, public-key
//!   authentication (the gateway asks the control plane), a session channel, the exec in the
//!   container and the output's way back.
//! - **ctr**: `ctr --address <sock> --namespace <ns> task exec --exec-id <fresh id> <pod id>
//!   echo x`: a process start, one gRPC connection, `Tasks.Exec` + `Start` with FIFOs, the
//!   output's way back.
//!
//! Both are timed from spawning the client to the first byte on its stdout (and, printed too,
//! to its exit). One warm-up round of each is not counted. Prints median, p90 and minimum of
//! each series and the ratio of the medians.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::images::ImageBuilder;
use instapod_tests::{containerd, eventually, ids, process, registry, scale_user, ssh};
use serde_json::json;
use tokio::io::AsyncReadExt;

const DEFAULT_ROUNDS: usize = 20;
const MAX_ROUNDS: usize = 200;
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Time to the first stdout byte and to the exit of `command`, which must print `x`.
async fn time_first_output(mut command: tokio::process::Command) -> anyhow::Result<(Duration, Duration)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let mut child = command.spawn().context("spawning the client")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(STEP_TIMEOUT, stdout.read(&mut first))
        .await
        .context("no output in time")??;
    let first_output = start.elapsed();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).await?;
    let output = tokio::time::timeout(STEP_TIMEOUT, child.wait_with_output())
        .await
        .context("the client did not exit in time")??;
    let total = start.elapsed();
    if n != 1 || first[0] != b'x' || !output.status.success() {
        bail!(
            "unexpected run: status {}, output {:?}{:?}, stderr {}",
            output.status,
            &first[..n],
            String::from_utf8_lossy(&rest),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((first_output, total))
}

fn summary(label: &str, series: &[Duration]) -> Duration {
    let mut sorted = series.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
    println!(
        "{label:<28} median {:>8.1} ms   p90 {:>8.1} ms   min {:>8.1} ms",
        median.as_secs_f64() * 1e3,
        p90.as_secs_f64() * 1e3,
        sorted[0].as_secs_f64() * 1e3
    );
    median
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds = std::env::var("BENCH_N")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(DEFAULT_ROUNDS)
        .clamp(1, MAX_ROUNDS);
    let fleet = Fleet::start(FleetOptions::regions(["local"]).quiet_logs()).await;
    let user = scale_user(&fleet.cp).await;
    let repository = format!("bench/ssh-{}", &ids::random_suffix()[..8]);
    let registry = registry::shared();
    ImageBuilder::busybox()
        .build()
        .push(&registry.base_url(), &repository, "1")
        .await
        .context("pushing the image")?;
    let image = format!("{}/{repository}:1", registry.host());
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": "bench", "image": image, "plan": "starter", "region": "local",
                    "command": ["sh", "-c", "exec sleep 100000"]}),
        )
        .await
        .assert_status(202);
    let pod = eventually(Duration::from_secs(120), "the pod running", || async {
        let body = user.client().get("/api/pods/bench").send().await.json();
        ensure!(body["state"] == "running", "{body}");
        Ok(body)
    })
    .await;
    let pod_id = pod["id"].as_str().context("pod id")?.to_string();
    let dir = process::temp_dir("bench-ssh");
    let key = ssh::keygen(&dir, "bench", "ed25519", None)?;
    user.client()
        .post_json("/api/pods/bench/ssh/keys", &json!({ "public_key": key.public }))
        .await
        .assert_status(201);
    let info = user
        .client()
        .get("/api/pods/bench/ssh")
        .send()
        .await
        .json_with_status(200);
    let username = info["username"].as_str().context("username")?.to_string();
    let port = fleet.nodes[0].ssh_port;
    let namespace = fleet.nodes[0].namespace.clone();

    let ssh_command = || {
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(ssh::base_args(port, &key.path))
            .args(["-o", "ControlMaster=no", "-o", "ControlPath=none"])
            .arg(format!("{username}@127.0.0.1"))
            .args(["echo", "x"])
            .env_remove("SSH_AUTH_SOCK");
        command
    };
    let mut exec_counter = 0u32;
    let mut ctr_command = || {
        exec_counter += 1;
        let mut command = tokio::process::Command::new(containerd::ctr_binary());
        command
            .arg("--address")
            .arg(containerd::shared().socket())
            .args(["--namespace", &namespace, "task", "exec", "--exec-id"])
            .arg(format!("bench-{exec_counter}"))
            .args([pod_id.as_str(), "echo", "x"])
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE");
        command
    };

    // Warm-up (not counted).
    time_first_output(ssh_command()).await.context("warm-up ssh")?;
    time_first_output(ctr_command()).await.context("warm-up ctr")?;
    let (mut ssh_first, mut ssh_total, mut ctr_first, mut ctr_total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for use_ssh in order {
            if use_ssh {
                let (first, total) = time_first_output(ssh_command()).await.context("ssh round")?;
                ssh_first.push(first);
                ssh_total.push(total);
            } else {
                let (first, total) = time_first_output(ctr_command()).await.context("ctr round")?;
                ctr_first.push(first);
                ctr_total.push(total);
            }
        }
    }
    println!("bench_ssh: {rounds} rounds, pod {pod_id}, gateway 127.0.0.1:{port}");
    let ssh_median = summary("ssh: first output", &ssh_first);
    let ctr_median = summary("ctr task exec: first output", &ctr_first);
    summary("ssh: exit", &ssh_total);
    summary("ctr task exec: exit", &ctr_total);
    println!(
        "ratio of medians (ssh / ctr task exec, first output): {:.2}",
        ssh_median.as_secs_f64() / ctr_median.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
