//! Benchmark: how long the node agent takes to start a pod whose image is already on the node,
//! against a raw containerd start of the same image on the same containerd (issue 3: median
//! ≤ 1.3× the raw time).
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo run --release --example bench_pod_start          # as root; BENCH_N=<rounds>, default 15
//! ```
//!
//! Set-up (not timed): the harness's private containerd and registry, a pod manager in this
//! process ([`TestNode`], the agent's own code, on its own bridge and subnet), the busybox
//! `httpd` image pushed to the registry and pulled once by the agent, and pulled once with
//! `ctr images pull` into a separate namespace for the baselines.
//!
//! Each round measures, in alternating order, with a fresh pod or container id each time:
//!
//! - **agent**: the call `pods.handle(&NodeJob::EnsureRunning { spec })` until it returns. The
//!   handler returns after `Tasks.Start`, so this covers the record, the image lookup, the
//!   volume and pod files, the network namespace + CNI bridge plugin + port isolation, the OCI
//!   spec, the snapshot, the container, the task and its start. The task is then checked to be
//!   `Running` (not timed).
//! - **ctr**: `ctr run -d` of the same image with the same memory and CPU limits, the same
//!   cgroup parent, a log file and a bind-mounted `/data` directory, measured as the `ctr`
//!   process's run time (with `-d` it exits once the task has started); the task is then
//!   checked to be `RUNNING` in `ctr task ls`. `ctr` gives the container a new, empty network
//!   namespace (no CNI): this is the primary baseline. It includes starting the `ctr` process
//!   and connecting, which the in-process agent does not pay; `ctr version` (process start, one
//!   RPC) is timed in each round and printed as a reference.
//! - **ctr+CNI**: the agent's network set-up (the same `ip netns add`, CNI `bridge` plugin and
//!   `bridge link set … isolated on`, on the same bridge) followed by `ctr run -d --with-ns
//!   network:<netns>`: what a raw start costs with the same networking. The network set-up
//!   alone is printed too.
//!
//! One warm-up round of each is run first and not counted. After every measurement the pod is
//! deleted with a `Delete` job (task, container, snapshot, network namespace, volume) and the
//! `ctr` container is killed and removed with its snapshot; none of that is timed. At the end
//! the baseline namespace's image and the namespace itself are removed, and the bridge goes with
//! the node. The containerd, registry and their directories are the harness's and go when this
//! process exits.
//!
//! Prints median, p90 and minimum of each series and the ratio of the medians.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use instapod_common::node::{NodeJob, PodSpec};
use instapod_node_agent::network::{Network, netns_path};
use instapod_node_agent::runtime::containers::TaskState;
use instapod_tests::containerd;
use instapod_tests::node::{TestNode, pod_spec, web_image};
use instapod_tests::{ids, process, registry};
use uuid::Uuid;

/// Rounds when `BENCH_N` is not set, and the most it may ask for.
const DEFAULT_ROUNDS: usize = 15;
const MAX_ROUNDS: usize = 200;
/// The longest one start (or one clean-up) may take before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the baselines run: the same command the pods run (the image's entrypoint), with the
/// same limits as [`pod_spec`].
struct Baseline {
    namespace: String,
    image: String,
    log_dir: PathBuf,
    memory_bytes: u64,
    cpus: f64,
}

#[derive(Default)]
struct Series(Vec<Duration>);

impl Series {
    fn sorted(&self) -> Vec<Duration> {
        let mut all = self.0.clone();
        all.sort();
        all
    }
    fn median(&self) -> Duration {
        let all = self.sorted();
        let n = all.len();
        if n % 2 == 1 {
            all[n / 2]
        } else {
            (all[n / 2 - 1] + all[n / 2]) / 2
        }
    }
    /// The nearest-rank 90th percentile.
    fn p90(&self) -> Duration {
        let all = self.sorted();
        let rank = (all.len() * 9).div_ceil(10).max(1);
        all[rank - 1]
    }
    fn min(&self) -> Duration {
        self.sorted()[0]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn rounds() -> anyhow::Result<usize> {
    match std::env::var("BENCH_N") {
        Ok(value) => {
            let n: usize = value.trim().parse().context("BENCH_N must be a number")?;
            ensure!((1..=MAX_ROUNDS).contains(&n), "BENCH_N must be in 1..={MAX_ROUNDS}");
            Ok(n)
        }
        Err(_) => Ok(DEFAULT_ROUNDS),
    }
}

/// Runs a `ctr` command, failing with its output unless it succeeds.
fn ctr_ok(namespace: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = containerd::shared()
        .ctr(namespace)
        .args(args)
        .output()
        .with_context(|| format!("running ctr {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "ctr {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Starts a pod through the agent's handler; returns the handler's duration.
async fn agent_start(node: &TestNode, spec: &PodSpec) -> anyhow::Result<Duration> {
    let job = NodeJob::EnsureRunning { spec: spec.clone() };
    let started = Instant::now();
    tokio::time::timeout(STEP_TIMEOUT, node.pods.handle(&job))
        .await
        .context("EnsureRunning timed out")?
        .context("EnsureRunning")?;
    let elapsed = started.elapsed();
    let state = node.pods.runtime().task_state(&spec.pod_id.to_string()).await?;
    ensure!(
        state == Some(TaskState::Running),
        "the pod's task is {state:?} right after EnsureRunning returned; record: {:?}",
        node.pods.record(spec.pod_id)
    );
    Ok(elapsed)
}

async fn agent_delete(node: &TestNode, pod_id: Uuid) -> anyhow::Result<()> {
    let job = NodeJob::Delete {
        pod_id,
        generation: 2,
        retain_volume: false,
    };
    tokio::time::timeout(STEP_TIMEOUT, node.pods.handle(&job))
        .await
        .context("Delete timed out")?
        .context("Delete")?;
    Ok(())
}

/// `ctr run -d` of the baseline image as container `id`, optionally joining `netns`; returns
/// the `ctr` process's run time.
async fn ctr_start(baseline: &Baseline, id: &str, netns: Option<&Path>) -> anyhow::Result<Duration> {
    let log_uri = format!("file://{}", baseline.log_dir.join(format!("{id}.log")).display());
    let memory = baseline.memory_bytes.to_string();
    let cpus = baseline.cpus.to_string();
    let cgroup = format!("/instapod-test/{id}");
    // The image's httpd serves /data, which the agent bind-mounts from the pod's volume.
    let volume = baseline.log_dir.join(id);
    std::fs::create_dir_all(&volume).context("the baseline's volume")?;
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", volume.display());
    let mut command = containerd::shared().ctr(&baseline.namespace);
    command
        .args(["run", "-d", "--log-uri", &log_uri, "--memory-limit", &memory])
        .args(["--cpus", &cpus, "--cgroup", &cgroup, "--mount", &mount]);
    if let Some(netns) = netns {
        command.arg("--with-ns").arg(format!("network:{}", netns.display()));
    }
    command.args([&baseline.image, id]);
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .context("ctr run thread")?
        .context("running ctr run")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "ctr run -d failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let tasks = ctr_ok(&baseline.namespace, &["task", "ls"])?;
    ensure!(
        tasks
            .lines()
            .any(|line| line.split_whitespace().next() == Some(id) && line.contains("RUNNING")),
        "ctr task ls does not show {id} RUNNING:\n{tasks}\nits log: {}",
        std::fs::read_to_string(baseline.log_dir.join(format!("{id}.log"))).unwrap_or_default()
    );
    Ok(elapsed)
}

/// Kills and removes the `ctr` container `id` (its snapshot goes with it); missing is fine.
async fn ctr_remove(baseline: &Baseline, id: &str) -> anyhow::Result<()> {
    let _ = ctr_ok(&baseline.namespace, &["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let tasks = ctr_ok(&baseline.namespace, &["task", "ls"])?;
        let line = tasks.lines().find(|line| line.split_whitespace().next() == Some(id));
        match line {
            None => break,
            Some(line) if line.contains("STOPPED") => {
                ctr_ok(&baseline.namespace, &["task", "delete", id])?;
                break;
            }
            Some(_) => {}
        }
        ensure!(Instant::now() < deadline, "the ctr task {id} did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let containers = ctr_ok(&baseline.namespace, &["containers", "ls", "-q"])?;
    if containers.lines().any(|line| line.trim() == id) {
        ctr_ok(&baseline.namespace, &["containers", "delete", id])?;
    }
    let _ = std::fs::remove_dir_all(baseline.log_dir.join(id));
    Ok(())
}

/// What one round created, so that clean-up can find it whatever failed.
#[derive(Default)]
struct Created {
    pods: Vec<Uuid>,
    ctr: Vec<String>,
    netns: Vec<Uuid>,
}

#[derive(Default)]
struct Results {
    agent: Series,
    ctr: Series,
    ctr_cni: Series,
    /// The network set-up part of `ctr_cni`.
    cni: Series,
    /// `ctr version`: what any `ctr` command costs before it does anything.
    ctr_version: Series,
}

#[derive(Clone, Copy)]
enum Kind {
    Agent,
    Ctr,
    CtrCni,
}

/// Measures one start of `kind`; returns its time and, for ctr+CNI, the network set-up's part.
async fn measure(
    kind: Kind,
    node: &TestNode,
    network: &Network,
    baseline: &Baseline,
    image: &str,
    created: &mut Created,
) -> anyhow::Result<(Duration, Option<Duration>)> {
    match kind {
        Kind::Agent => {
            let spec = pod_spec(image, 1);
            created.pods.push(spec.pod_id);
            let elapsed = agent_start(node, &spec).await?;
            agent_delete(node, spec.pod_id).await?;
            created.pods.pop();
            Ok((elapsed, None))
        }
        Kind::Ctr => {
            let id = format!("bench-ctr-{}", ids::random_suffix());
            created.ctr.push(id.clone());
            let elapsed = ctr_start(baseline, &id, None).await?;
            ctr_remove(baseline, &id).await?;
            created.ctr.pop();
            Ok((elapsed, None))
        }
        Kind::CtrCni => {
            let pod_id = Uuid::new_v4();
            let id = format!("bench-cni-{}", pod_id.simple());
            created.netns.push(pod_id);
            created.ctr.push(id.clone());
            let started = Instant::now();
            let attachment = network.setup(pod_id, None).await.context("CNI set-up")?;
            let setup = started.elapsed();
            let run = ctr_start(baseline, &id, Some(&attachment.netns)).await?;
            ctr_remove(baseline, &id).await?;
            created.ctr.pop();
            network.teardown(pod_id).await.context("CNI teardown")?;
            created.netns.pop();
            Ok((setup + run, Some(setup)))
        }
    }
}

async fn run(
    node: &TestNode,
    baseline: &Baseline,
    image: &str,
    n: usize,
    created: &mut Created,
) -> anyhow::Result<Results> {
    let config = node.settings.config();
    let network = Network::new(
        config.network.bridge.clone(),
        config.network.subnet.clone(),
        config.network.cni_bin_dir.clone(),
        node.dirs.ipam(),
    );
    let mut results = Results::default();
    for kind in [Kind::Agent, Kind::Ctr, Kind::CtrCni] {
        measure(kind, node, &network, baseline, image, created)
            .await
            .context("warm-up")?;
    }
    for round in 0..n {
        // Alternate who goes first, so neither always runs right after a clean-up.
        let order = if round % 2 == 0 {
            [Kind::Agent, Kind::Ctr, Kind::CtrCni]
        } else {
            [Kind::Ctr, Kind::CtrCni, Kind::Agent]
        };
        for kind in order {
            let (elapsed, setup) = measure(kind, node, &network, baseline, image, created)
                .await
                .with_context(|| format!("round {}", round + 1))?;
            match kind {
                Kind::Agent => results.agent.0.push(elapsed),
                Kind::Ctr => results.ctr.0.push(elapsed),
                Kind::CtrCni => results.ctr_cni.0.push(elapsed),
            }
            results.cni.0.extend(setup);
        }
        let started = Instant::now();
        ctr_ok(&baseline.namespace, &["version"])?;
        results.ctr_version.0.push(started.elapsed());
    }
    Ok(results)
}

/// Removes whatever a failed round left, then the baseline namespace's image and the namespace.
async fn clean_up(node: &TestNode, baseline: &Baseline, created: &Created) {
    for pod in &created.pods {
        if let Err(err) = agent_delete(node, *pod).await {
            eprintln!("clean-up: pod {pod}: {err:#}");
        }
    }
    for id in &created.ctr {
        if let Err(err) = ctr_remove(baseline, id).await {
            eprintln!("clean-up: ctr container {id}: {err:#}");
        }
    }
    let config = node.settings.config();
    let network = Network::new(
        config.network.bridge.clone(),
        config.network.subnet.clone(),
        config.network.cni_bin_dir.clone(),
        node.dirs.ipam(),
    );
    for pod in &created.netns {
        if netns_path(*pod).exists()
            && let Err(err) = network.teardown(*pod).await
        {
            eprintln!("clean-up: network namespace of {pod}: {err}");
        }
    }
    if let Err(err) = ctr_ok(&baseline.namespace, &["images", "rm", "--sync", &baseline.image]) {
        eprintln!("clean-up: {err:#}");
    }
    if let Err(err) = ctr_ok(&baseline.namespace, &["namespaces", "rm", &baseline.namespace]) {
        eprintln!("clean-up: {err:#}");
    }
    // runc keeps one state directory per namespace outside the harness's directory; it is
    // empty now (remove_dir refuses otherwise).
    for namespace in [&baseline.namespace, &node.settings.namespace] {
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(namespace));
    }
}

fn row(name: &str, series: &Series) {
    println!(
        "{name:<11} median {:>9}   p90 {:>9}   min {:>9}   (n={})",
        ms(series.median()),
        ms(series.p90()),
        ms(series.min()),
        series.0.len()
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = rounds()?;
    let node = TestNode::start("bench-start").await;
    let image = web_image().await;
    node.pods
        .images()
        .ensure(&image, None)
        .await
        .context("the agent's pull of the image")?;
    let spec = pod_spec(&image, 1);
    let baseline = Baseline {
        namespace: format!("bench-ctr-{}", &ids::random_suffix()[..8]),
        image: image.clone(),
        log_dir: process::temp_dir("bench-ctr-logs"),
        memory_bytes: spec.resources.memory_bytes,
        cpus: f64::from(spec.resources.cpu_millis) / 1000.0,
    };
    ctr_ok(&baseline.namespace, &["images", "pull", "--plain-http", &image]).with_context(|| {
        format!(
            "ctr images pull from the harness registry\n{}",
            registry::shared().log_tail()
        )
    })?;

    let mut created = Created::default();
    let result = run(&node, &baseline, &image, n, &mut created).await;
    clean_up(&node, &baseline, &created).await;
    let results = result?;

    let versions = ["containerd", "runc"]
        .map(|bin| {
            Command::new(bin)
                .arg("--version")
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
                .unwrap_or_default()
        })
        .join("; ");
    println!(
        "pod start, image present, {n} rounds (+1 warm-up), {} cores; {versions}",
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0)
    );
    row("agent", &results.agent);
    row("ctr", &results.ctr);
    row("ctr+CNI", &results.ctr_cni);
    println!("for reference:");
    row("CNI alone", &results.cni);
    row("ctr version", &results.ctr_version);
    let ratio = |a: &Series, b: &Series| a.median().as_secs_f64() / b.median().as_secs_f64();
    println!(
        "ratio of medians: agent / ctr = {:.2} (target <= 1.30), agent / ctr+CNI = {:.2}",
        ratio(&results.agent, &results.ctr),
        ratio(&results.agent, &results.ctr_cni)
    );
    Ok(())
}
