//! Benchmark: uploading and downloading a 256 MiB file through the files API, against a plain
//! file copy on the same disk in the same run (issue 5: at least 40% of the copy's
//! throughput), with the control plane's and the agent's memory sampled during the transfers
//! (it must stay flat: no file-sized buffers).
//!
//! ```sh
//! export CARGO_TARGET_DIR=/var/cache/instapod-target
//! cargo build --release --workspace --bins
//! cargo run --release -p instapod-tests --example bench_files        # as root
//! ```
//!
//! A real fleet (control plane, scheduler, one agent, containerd) and a running busybox pod.
//! The source file (256 MiB of pseudo-random bytes) is written next to the node's volumes, so
//! the copy, the upload and the download all use the same disk. Each measurement is taken
//! [`ROUNDS`] times and the best is kept:
//! - copy: `std::fs::copy` of the source to a new file in the same directory, then `fsync`
//!   (an upload is fsynced before it is renamed into place, so the copy is made as durable);
//!   the copy without the `fsync` is printed too;
//! - upload: `POST /api/pods/{name}/files/upload`, the multipart body streamed from the file
//!   in 256 KiB chunks, until the 201 answer (the file fsynced and renamed in the volume);
//! - download: `GET /api/pods/{name}/files/content` with `Accept: application/octet-stream`,
//!   written to a file and fsynced, checked against the source's SHA-256.
//!
//! `VmRSS` of both processes is sampled every 20 ms during each transfer; the report shows the
//! resident memory before the transfers and the largest sample, plus `VmHWM` at the end.

#![allow(clippy::print_stdout, reason = "the report on stdout is what a benchmark is for")]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::images::ImageBuilder;
use instapod_tests::{eventually, ids, registry, scale_user};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const SIZE: u64 = 256 * 1024 * 1024;
const ROUNDS: usize = 3;
const CHUNK: usize = 256 * 1024;
const BOUNDARY: &str = "instapod-bench-boundary-51f0";

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_field(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading a status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unreadable line {line:?}"))?;
    Ok(kb * 1024)
}

/// Samples `VmRSS` of `pids` every 20 ms until stopped; the largest sample of each.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pids: &[u32]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<Arc<AtomicU64>> = pids.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let task = {
            let (stop, peaks, pids) = (stop.clone(), peaks.clone(), pids.to_vec());
            tokio::spawn(async move {
                // Bounded: at most 10 minutes of samples.
                for _ in 0..30_000 {
                    for (pid, peak) in pids.iter().zip(&peaks) {
                        if let Ok(rss) = status_field(*pid, "VmRSS:") {
                            peak.fetch_max(rss, Ordering::Relaxed);
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        Sampler { stop, peaks, task }
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peaks.iter().map(|p| p.load(Ordering::Relaxed)).collect()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn write_source(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1024 * 1024];
    for _ in 0..SIZE / block.len() as u64 {
        for word in block.chunks_mut(8) {
            // xorshift: incompressible, cheap.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        hasher.update(&block);
        file.write_all(&block)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(hasher.finalize().into())
}

async fn upload(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    source: &Path,
    target: &str,
) -> anyhow::Result<Duration> {
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{target}\r\n--{BOUNDARY}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let file = tokio::fs::File::open(source).await?;
    let body = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buffer = vec![0u8; CHUNK];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buffer)), Some(file)))
            }
            Err(err) => Some((Err(err), None)),
        }
    });
    let stream = futures_util::stream::once(async move { Ok(bytes::Bytes::from(head)) })
        .chain(body)
        .chain(futures_util::stream::once(async move { Ok(bytes::Bytes::from(tail)) }));
    let started = Instant::now();
    let response = http
        .post(format!("{base}/api/pods/bench/files/upload"))
        .bearer_auth(token)
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let elapsed = started.elapsed();
    ensure!(status == 200 || status == 201, "upload answered {status}: {text}");
    Ok(elapsed)
}

async fn download(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    target: &str,
    into: &Path,
) -> anyhow::Result<(Duration, [u8; 32])> {
    let started = Instant::now();
    let response = http
        .get(format!("{base}/api/pods/bench/files/content?path={target}"))
        .bearer_auth(token)
        .header("Accept", "application/octet-stream")
        .send()
        .await?;
    ensure!(
        response.status().as_u16() == 200,
        "download answered {}",
        response.status()
    );
    let mut file = tokio::io::BufWriter::with_capacity(CHUNK, tokio::fs::File::create(into).await?);
    let mut hasher = Sha256::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    file.into_inner().sync_all().await?;
    Ok((started.elapsed(), hasher.finalize().into()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let fleet = Fleet::start(FleetOptions::regions(["local"]).quiet_logs()).await;
    let user = scale_user(&fleet.cp).await;
    let registry = registry::shared();
    let repository = format!("bench/files-{}", &ids::random_suffix()[..8]);
    ImageBuilder::busybox()
        .build()
        .push(&registry.base_url(), &repository, "1")
        .await
        .context("push the image")?;
    let image = format!("{}/{repository}:1", registry.host());
    let created = user
        .client()
        .post_json(
            "/api/pods",
            &json!({"name": "bench", "image": image, "plan": "starter", "region": "local",
                    "command": ["sh", "-c", "exec sleep 100000"]}),
        )
        .await;
    ensure!(created.status == 202, "create: {}", created.text());
    let pod = eventually(Duration::from_secs(120), "the pod running", || async {
        let body = user.client().get("/api/pods/bench").send().await.json();
        ensure!(body["state"] == "running", "{body}");
        Ok(body)
    })
    .await;
    let pod_id = pod["id"].as_str().context("pod id")?.to_string();
    let volumes = fleet.nodes[0].state_dir.join("volumes");
    let scratch = volumes.join(format!("bench-scratch-{}", ids::random_suffix()));
    std::fs::create_dir_all(&scratch)?;
    let source = scratch.join("source.bin");
    let source_hash = write_source(&source)?;

    let cp_pid = fleet.cp.pid().context("control plane pid")?;
    let agent_pid = fleet.agent_pid(0);
    let rss_before = (status_field(cp_pid, "VmRSS:")?, status_field(agent_pid, "VmRSS:")?);
    let http = instapod_tests::http_builder().no_proxy().build()?;
    let base = fleet.cp.url().to_string();

    let mut copy_best = Duration::MAX;
    let mut copy_nosync_best = Duration::MAX;
    let mut upload_best = Duration::MAX;
    let mut download_best = Duration::MAX;
    let mut peaks = [0u64; 2];
    for round in 0..ROUNDS {
        // The baseline: a copy on the same disk (fsynced, like an upload), and without fsync.
        let copy = scratch.join(format!("copy-{round}.bin"));
        let started = Instant::now();
        std::fs::copy(&source, &copy)?;
        let nosync = started.elapsed();
        std::fs::File::open(&copy)?.sync_all()?;
        copy_best = copy_best.min(started.elapsed());
        copy_nosync_best = copy_nosync_best.min(nosync);
        std::fs::remove_file(&copy)?;

        let sampler = Sampler::start(&[cp_pid, agent_pid]);
        let target = format!("upload-{round}.bin");
        let uploaded_in = upload(&http, &base, &user.token, &source, &target).await?;
        upload_best = upload_best.min(uploaded_in);
        let uploaded = volumes.join(&pod_id).join(&target);
        ensure!(std::fs::metadata(&uploaded)?.len() == SIZE, "the uploaded file's size");

        let into = scratch.join(format!("download-{round}.bin"));
        let (took, hash) = download(&http, &base, &user.token, &target, &into).await?;
        download_best = download_best.min(took);
        if hash != source_hash {
            bail!("the downloaded file differs from the source");
        }
        let sampled = sampler.finish().await;
        peaks[0] = peaks[0].max(sampled[0]);
        peaks[1] = peaks[1].max(sampled[1]);
        std::fs::remove_file(&into)?;
        let deleted = user
            .client()
            .delete(&format!("/api/pods/bench/files?path={target}"))
            .send()
            .await;
        ensure!(deleted.status == 200, "delete: {}", deleted.text());
        println!(
            "round {round}: copy {:.0} ms, upload {:.0} ms, download {:.0} ms",
            nosync.as_secs_f64() * 1000.0,
            uploaded_in.as_secs_f64() * 1000.0,
            took.as_secs_f64() * 1000.0
        );
    }
    let hwm = (status_field(cp_pid, "VmHWM:")?, status_field(agent_pid, "VmHWM:")?);
    std::fs::remove_dir_all(&scratch).ok();

    let rate = |d: Duration| mib(SIZE) / d.as_secs_f64();
    println!("file: {} MiB, best of {ROUNDS} rounds", SIZE / (1024 * 1024));
    println!("copy (std::fs::copy + fsync): {:.0} MiB/s", rate(copy_best));
    println!("copy without fsync:           {:.0} MiB/s", rate(copy_nosync_best));
    println!(
        "upload:   {:.0} MiB/s = {:.0}% of the fsynced copy, {:.0}% of the copy without fsync",
        rate(upload_best),
        100.0 * rate(upload_best) / rate(copy_best),
        100.0 * rate(upload_best) / rate(copy_nosync_best)
    );
    println!(
        "download: {:.0} MiB/s = {:.0}% of the fsynced copy, {:.0}% of the copy without fsync",
        rate(download_best),
        100.0 * rate(download_best) / rate(copy_best),
        100.0 * rate(download_best) / rate(copy_nosync_best)
    );
    println!(
        "control plane RSS: {:.1} MiB before, {:.1} MiB peak during transfers (VmHWM {:.1} MiB)",
        mib(rss_before.0),
        mib(peaks[0]),
        mib(hwm.0)
    );
    println!(
        "agent RSS:         {:.1} MiB before, {:.1} MiB peak during transfers (VmHWM {:.1} MiB)",
        mib(rss_before.1),
        mib(peaks[1]),
        mib(hwm.1)
    );
    Ok(())
}
