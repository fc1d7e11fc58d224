//! The pod sampler: every `metrics_sample_interval_secs` it measures each running pod — CPU,
//! memory and pids from containerd's task metrics, network counters from the pod's veth, disk
//! usage of its volume — keeps the newest sample per pod (for `/metrics`) and pushes the round
//! to the control plane, which stores the history.
//!
//! *Design.* A round makes one `Tasks.Metrics` call for the whole namespace and reads two
//! sysfs files per pod; rates (CPU cores, network bytes/s) are differences to the previous
//! sample of the same pod. Walking a volume to add up its size costs far more than the rest, so
//! disk usage is refreshed only every `disk_usage_interval_secs` (off the async runtime) and
//! reused in between. Rounds that cannot be delivered wait in a bounded queue (the oldest are
//! dropped first) and go out with the next push.
//!
//! *Limitations.* The veth's counters are the host side's, seen from the pod: what the host
//! sent is what the pod received. A pod without a network attachment reports zero traffic.
//! Disk usage is measured as the files API measures it (`files::volume::measure`: apparent
//! sizes of regular files, symlinks not followed), so both report the same number.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use instapod_common::node::NodePodState;
use instapod_common::pod_metrics::{MAX_SAMPLES_PER_BATCH, PodSample, SampleBatch};
use tokio::sync::watch;
use uuid::Uuid;

use crate::fleet::Fleet;
use crate::pods::Pods;
use crate::runtime::stats::TaskStats;

/// Rounds kept while the control plane cannot be reached (at the default interval, 10 minutes).
const MAX_PENDING_ROUNDS: usize = 60;

/// What the previous sample of a pod saw, for rates.
#[derive(Debug, Clone, Copy)]
struct Previous {
    at: Instant,
    cpu_ns: u64,
    rx_bytes: u64,
    tx_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    latest: HashMap<Uuid, PodSample>,
    previous: HashMap<Uuid, Previous>,
    /// Volume usage in bytes and when it was measured.
    disk: HashMap<Uuid, (u64, Instant)>,
}

/// The newest samples, shared with `/metrics`. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    state: Arc<StdMutex<State>>,
}

/// One pod as a round sees it.
#[derive(Debug, Clone)]
struct Subject {
    id: Uuid,
    host_veth: Option<String>,
    volume: PathBuf,
    cpu_limit_cores: f64,
    memory_limit_bytes: u64,
    disk_quota_bytes: u64,
}

impl Samples {
    /// The newest sample of every pod measured in the last round.
    pub fn latest(&self) -> Vec<PodSample> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut samples: Vec<PodSample> = state.latest.values().cloned().collect();
        samples.sort_by_key(|s| s.pod_id);
        samples
    }

    /// Measures every running pod once; returns the round's samples (also kept as the newest).
    pub async fn round(&self, pods: &Pods, disk_every: Duration) -> Vec<PodSample> {
        let started = Instant::now();
        let mut subjects = Vec::new();
        pods.visit_records(|record| {
            if matches!(record.state, NodePodState::Running | NodePodState::Starting) {
                let resources = &record.spec.resources;
                subjects.push(Subject {
                    id: record.spec.pod_id,
                    host_veth: record.attachment.as_ref().map(|a| a.host_veth.clone()),
                    volume: pods.dirs().volume(record.spec.pod_id),
                    cpu_limit_cores: f64::from(resources.cpu_millis) / 1000.0,
                    memory_limit_bytes: resources.memory_bytes,
                    disk_quota_bytes: resources.disk_bytes,
                });
            }
        });
        let stats = match pods.runtime().task_stats().await {
            Ok(stats) => stats,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read task metrics; round skipped");
                return Vec::new();
            }
        };
        self.refresh_disk_usage(&subjects, disk_every).await;
        let now = Instant::now();
        let at_unix_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut samples = Vec::with_capacity(subjects.len());
        for subject in &subjects {
            let Some(task) = stats.get(&subject.id.to_string()) else {
                continue;
            };
            let (rx_bytes, tx_bytes) = subject.host_veth.as_deref().map_or((0, 0), veth_counters);
            let disk_used_bytes = state.disk.get(&subject.id).map_or(0, |(bytes, _)| *bytes);
            let previous = state.previous.insert(
                subject.id,
                Previous {
                    at: now,
                    cpu_ns: task.cpu_ns,
                    rx_bytes,
                    tx_bytes,
                },
            );
            let sample = sample(
                subject,
                task,
                previous,
                now,
                at_unix_ms,
                rx_bytes,
                tx_bytes,
                disk_used_bytes,
            );
            state.latest.insert(subject.id, sample.clone());
            samples.push(sample);
        }
        // Pods that left (stopped, deleted, moved) stop being reported at once.
        let measured: std::collections::HashSet<Uuid> = samples.iter().map(|s| s.pod_id).collect();
        state.latest.retain(|id, _| measured.contains(id));
        state.previous.retain(|id, _| measured.contains(id));
        let known: std::collections::HashSet<Uuid> = subjects.iter().map(|s| s.id).collect();
        state.disk.retain(|id, _| known.contains(id));
        drop(state);
        metrics::histogram!("instapod_node_agent_sampling_duration_seconds").record(started.elapsed().as_secs_f64());
        samples
    }

    /// Measures the volumes whose usage is older than `every` (all at the first round).
    async fn refresh_disk_usage(&self, subjects: &[Subject], every: Duration) {
        let due: Vec<(Uuid, PathBuf)> = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            subjects
                .iter()
                .filter(|s| state.disk.get(&s.id).is_none_or(|(_, at)| at.elapsed() >= every))
                .map(|s| (s.id, s.volume.clone()))
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let measured = tokio::task::spawn_blocking(move || {
            due.into_iter()
                .map(|(id, volume)| (id, crate::files::volume::measure(&volume).unwrap_or(0)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (id, bytes) in measured {
            state.disk.insert(id, (bytes, now));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sample(
    subject: &Subject,
    task: &TaskStats,
    previous: Option<Previous>,
    now: Instant,
    at_unix_ms: i64,
    rx_bytes: u64,
    tx_bytes: u64,
    disk_used_bytes: u64,
) -> PodSample {
    // A counter that went down belongs to a new container (or a new veth): no rate this time.
    let rate = |current: u64, before: Option<u64>, seconds: f64| match before {
        Some(before) if current >= before && seconds > 0.0 => (current - before) as f64 / seconds,
        _ => 0.0,
    };
    let seconds = previous.map_or(0.0, |p| now.duration_since(p.at).as_secs_f64());
    PodSample {
        pod_id: subject.id,
        at_unix_ms,
        cpu_seconds_total: task.cpu_ns as f64 / 1e9,
        cpu_cores: rate(task.cpu_ns, previous.map(|p| p.cpu_ns), seconds) / 1e9,
        cpu_limit_cores: subject.cpu_limit_cores,
        memory_bytes: task.memory_working_set_bytes,
        memory_limit_bytes: task.memory_limit_bytes.map_or(subject.memory_limit_bytes, |cgroup| {
            if subject.memory_limit_bytes == 0 {
                cgroup
            } else {
                cgroup.min(subject.memory_limit_bytes)
            }
        }),
        rx_bytes,
        tx_bytes,
        rx_bytes_per_second: rate(rx_bytes, previous.map(|p| p.rx_bytes), seconds),
        tx_bytes_per_second: rate(tx_bytes, previous.map(|p| p.tx_bytes), seconds),
        disk_used_bytes,
        disk_quota_bytes: subject.disk_quota_bytes,
        pids: task.pids,
    }
}

/// The pod's received and sent bytes: the host side's counters, crossed.
fn veth_counters(host_veth: &str) -> (u64, u64) {
    let read = |name: &str| -> u64 {
        let path = Path::new("/sys/class/net")
            .join(host_veth)
            .join("statistics")
            .join(name);
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    (read("tx_bytes"), read("rx_bytes"))
}

/// The per-pod families in Prometheus' text format, one series per pod labelled `pod_id`.
pub fn render_prometheus(samples: &[PodSample]) -> String {
    type Value = fn(&PodSample) -> f64;
    const FAMILIES: [(&str, &str, &str, Value); 9] = [
        (
            "instapod_node_agent_pod_cpu_seconds_total",
            "counter",
            "CPU time the pod used since its container started",
            |s| s.cpu_seconds_total,
        ),
        (
            "instapod_node_agent_pod_cpu_limit_cores",
            "gauge",
            "The pod's CPU limit in cores",
            |s| s.cpu_limit_cores,
        ),
        (
            "instapod_node_agent_pod_memory_bytes",
            "gauge",
            "Memory the pod uses (working set)",
            |s| s.memory_bytes as f64,
        ),
        (
            "instapod_node_agent_pod_memory_limit_bytes",
            "gauge",
            "The pod's memory limit",
            |s| s.memory_limit_bytes as f64,
        ),
        (
            "instapod_node_agent_pod_network_receive_bytes_total",
            "counter",
            "Bytes the pod received",
            |s| s.rx_bytes as f64,
        ),
        (
            "instapod_node_agent_pod_network_transmit_bytes_total",
            "counter",
            "Bytes the pod sent",
            |s| s.tx_bytes as f64,
        ),
        (
            "instapod_node_agent_pod_disk_used_bytes",
            "gauge",
            "Space the pod's volume takes",
            |s| s.disk_used_bytes as f64,
        ),
        (
            "instapod_node_agent_pod_disk_quota_bytes",
            "gauge",
            "The pod's disk quota",
            |s| s.disk_quota_bytes as f64,
        ),
        (
            "instapod_node_agent_pod_pids",
            "gauge",
            "Processes and threads in the pod",
            |s| s.pids as f64,
        ),
    ];
    use std::fmt::Write as _;
    let mut out = String::new();
    for (name, kind, help, value) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for sample in samples {
            let _ = writeln!(out, "{name}{{pod_id=\"{}\"}} {}", sample.pod_id, value(sample));
        }
    }
    out
}

/// Samples every `interval` and pushes the rounds to the control plane until shutdown.
pub async fn run(
    samples: Samples,
    pods: Pods,
    fleet: Arc<Fleet>,
    interval: Duration,
    disk_every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(
        worker = "sampler",
        interval_ms = interval.as_millis() as u64,
        "worker started"
    );
    let mut pending: VecDeque<PodSample> = VecDeque::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => break,
        }
        let round = samples.round(&pods, disk_every).await;
        pending.extend(round);
        let limit = MAX_PENDING_ROUNDS * pods.counts().values().sum::<usize>().max(1);
        while pending.len() > limit {
            pending.pop_front();
        }
        while !pending.is_empty() {
            let batch: Vec<PodSample> = pending.iter().take(MAX_SAMPLES_PER_BATCH).cloned().collect();
            match fleet.push_samples(&SampleBatch { samples: batch.clone() }).await {
                Ok(()) => {
                    pending.drain(..batch.len());
                }
                Err(err) if err.is_rejected() => {
                    tracing::warn!(error = %err, dropped = batch.len(), "the control plane refused pod samples; dropped");
                    pending.drain(..batch.len());
                }
                Err(err) => {
                    tracing::debug!(error = %err, pending = pending.len(), "pod samples not delivered; kept for the next round");
                    break;
                }
            }
        }
    }
    tracing::info!(worker = "sampler", "worker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            id: Uuid::new_v4(),
            host_veth: None,
            volume: PathBuf::new(),
            cpu_limit_cores: 0.5,
            memory_limit_bytes: 256 << 20,
            disk_quota_bytes: 1 << 30,
        }
    }

    #[test]
    fn rates_come_from_the_previous_sample_and_never_go_negative() {
        let subject = subject();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let task = TaskStats {
            cpu_ns: 3_000_000_000,
            memory_working_set_bytes: 10 << 20,
            memory_limit_bytes: Some(512 << 20),
            pids: 4,
        };
        let previous = Previous {
            at: t0,
            cpu_ns: 2_000_000_000,
            rx_bytes: 1_000,
            tx_bytes: 500,
        };
        let s = sample(&subject, &task, Some(previous), t1, 1, 5_000, 100, 42);
        assert!((s.cpu_cores - 0.5).abs() < 1e-9, "{}", s.cpu_cores);
        assert!((s.rx_bytes_per_second - 2_000.0).abs() < 1e-9);
        assert_eq!(s.tx_bytes_per_second, 0.0, "a counter that went down gives no rate");
        assert_eq!(
            s.memory_limit_bytes,
            256 << 20,
            "the smaller of the spec and the cgroup"
        );
        assert_eq!((s.disk_used_bytes, s.disk_quota_bytes, s.pids), (42, 1 << 30, 4));
        let first = sample(&subject, &task, None, t1, 1, 5_000, 100, 0);
        assert_eq!((first.cpu_cores, first.rx_bytes_per_second), (0.0, 0.0));
        assert!((first.cpu_seconds_total - 3.0).abs() < 1e-9);
    }

    #[test]
    fn prometheus_text_has_every_family_and_one_series_per_pod() {
        let subject = subject();
        let task = TaskStats {
            cpu_ns: 1_500_000_000,
            ..Default::default()
        };
        let one = sample(&subject, &task, None, Instant::now(), 1, 10, 20, 0);
        let text = render_prometheus(std::slice::from_ref(&one));
        assert_eq!(text.matches("# TYPE ").count(), 9);
        let series = format!(
            "instapod_node_agent_pod_cpu_seconds_total{{pod_id=\"{}\"}} 1.5",
            subject.id
        );
        assert!(text.contains(&series), "{text}");
        assert!(text.contains(&format!(
            "instapod_node_agent_pod_network_transmit_bytes_total{{pod_id=\"{}\"}} 20",
            subject.id
        )));
        assert_eq!(
            render_prometheus(&[]).lines().filter(|l| !l.starts_with('#')).count(),
            0
        );
    }
}
