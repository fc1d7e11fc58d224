//! The raw-containerd baseline of the pod benchmarks: `ctr run -d` of an image on the harness's
//! containerd, in a namespace of its own, with a pod's memory and CPU limits, a cgroup under the
//! agents' parent, a `file://` log and a bind-mounted `/data` (what the busybox `httpd` test
//! image serves). `ctr` gives each container a fresh, empty network namespace (no CNI).
//!
//! *Clean-up.* [`CtrBaseline::remove`] kills and deletes one container (its snapshot goes with
//! it); [`CtrBaseline::clean_up`] removes whatever is left in the namespace, then the image,
//! the namespace and runc's state directory for it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::{containerd, ids, process, registry};

/// The longest one `ctr` start or clean-up may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// A namespace holding the pulled image, and the limits every container gets.
#[derive(Debug)]
pub struct CtrBaseline {
    pub namespace: String,
    pub image: String,
    log_dir: PathBuf,
    memory_bytes: u64,
    cpus: f64,
}

/// Runs a `ctr` command in `namespace`, failing with its output unless it succeeds.
pub fn ctr_ok(namespace: &str, args: &[&str]) -> anyhow::Result<String> {
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

impl CtrBaseline {
    /// A fresh namespace with `image` pulled from the harness registry (`ctr images pull`).
    pub fn pull(image: &str, memory_bytes: u64, cpu_millis: u32) -> anyhow::Result<CtrBaseline> {
        let baseline = CtrBaseline {
            namespace: format!("bench-ctr-{}", &ids::random_suffix()[..8]),
            image: image.to_string(),
            log_dir: process::temp_dir("bench-ctr-logs"),
            memory_bytes,
            cpus: f64::from(cpu_millis) / 1000.0,
        };
        ctr_ok(&baseline.namespace, &["images", "pull", "--plain-http", image]).with_context(|| {
            format!(
                "ctr images pull from the harness registry\n{}",
                registry::shared().log_tail()
            )
        })?;
        Ok(baseline)
    }

    /// `ctr run -d` of the image as container `id`; returns the `ctr` process's run time (with
    /// `-d` it exits once the task has started). Does not check the task afterwards: see
    /// [`CtrBaseline::running`].
    pub async fn run(&self, id: &str) -> anyhow::Result<Duration> {
        self.run_in(id, None).await
    }

    /// [`CtrBaseline::run`], joining the network namespace `netns` when given
    /// (`--with-ns network:<netns>`) instead of getting an empty one.
    pub async fn run_in(&self, id: &str, netns: Option<&Path>) -> anyhow::Result<Duration> {
        let log_uri = format!("file://{}", self.log_dir.join(format!("{id}.log")).display());
        let memory = self.memory_bytes.to_string();
        let cpus = self.cpus.to_string();
        let cgroup = format!("/instapod-test/{id}");
        let volume = self.log_dir.join(id);
        std::fs::create_dir_all(&volume).context("the baseline's volume")?;
        let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", volume.display());
        let mut command = containerd::shared().ctr(&self.namespace);
        command
            .args(["run", "-d", "--log-uri", &log_uri, "--memory-limit", &memory])
            .args(["--cpus", &cpus, "--cgroup", &cgroup, "--mount", &mount]);
        if let Some(netns) = netns {
            command.arg("--with-ns").arg(format!("network:{}", netns.display()));
        }
        command.args([&self.image, id]);
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let started = Instant::now();
        let output = tokio::time::timeout(STEP_TIMEOUT, command.output())
            .await
            .context("ctr run -d timed out")?
            .context("running ctr run")?;
        let elapsed = started.elapsed();
        ensure!(
            output.status.success(),
            "ctr run -d failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(elapsed)
    }

    /// The ids of the namespace's tasks that are `RUNNING` (one `ctr task ls`).
    pub fn running(&self) -> anyhow::Result<Vec<String>> {
        let tasks = ctr_ok(&self.namespace, &["task", "ls"])?;
        Ok(tasks
            .lines()
            .filter(|line| line.contains("RUNNING"))
            .filter_map(|line| line.split_whitespace().next().map(str::to_string))
            .collect())
    }

    /// Fails unless container `id`'s task is running (with its log in the message).
    pub fn ensure_running(&self, id: &str) -> anyhow::Result<()> {
        ensure!(
            self.running()?.iter().any(|t| t == id),
            "ctr task ls does not show {id} RUNNING; its log: {}",
            std::fs::read_to_string(self.log_dir.join(format!("{id}.log"))).unwrap_or_default()
        );
        Ok(())
    }

    /// Kills and removes container `id` (its snapshot goes with it); missing is fine.
    pub async fn remove(&self, id: &str) -> anyhow::Result<()> {
        let _ = ctr_ok(&self.namespace, &["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let tasks = ctr_ok(&self.namespace, &["task", "ls"])?;
            let line = tasks.lines().find(|line| line.split_whitespace().next() == Some(id));
            match line {
                None => break,
                Some(line) if line.contains("STOPPED") => {
                    ctr_ok(&self.namespace, &["task", "delete", id])?;
                    break;
                }
                Some(_) => {}
            }
            ensure!(Instant::now() < deadline, "the ctr task {id} did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let containers = ctr_ok(&self.namespace, &["containers", "ls", "-q"])?;
        if containers.lines().any(|line| line.trim() == id) {
            ctr_ok(&self.namespace, &["containers", "delete", id])?;
        }
        let _ = std::fs::remove_dir_all(self.log_dir.join(id));
        Ok(())
    }

    /// Removes every container left in the namespace, then the image, the namespace and
    /// runc's state directory for it. Errors are printed, not returned.
    pub async fn clean_up(&self) {
        let left = ctr_ok(&self.namespace, &["containers", "ls", "-q"]).unwrap_or_default();
        for id in left.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Err(err) = self.remove(id).await {
                eprintln!("clean-up: ctr container {id}: {err:#}");
            }
        }
        if let Err(err) = ctr_ok(&self.namespace, &["images", "rm", "--sync", &self.image]) {
            eprintln!("clean-up: {err:#}");
        }
        if let Err(err) = ctr_ok(&self.namespace, &["namespaces", "rm", &self.namespace]) {
            eprintln!("clean-up: {err:#}");
        }
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.namespace));
    }
}
