//! The queues' shared settings against a real Redis: jobs flow through a consumer built the way
//! the scheduler and the agents build theirs, and sweeping removes everything apalis-redis
//! keeps of finished jobs while leaving queued ones intact.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_redis::RedisStorage;
use instapod_common::node::PodJob;
use instapod_common::queue::{self, POLL_INTERVAL, PollEvery};
use instapod_tests::redis;
use uuid::Uuid;

async fn count(job: PodJob, done: Data<Arc<AtomicUsize>>) -> Result<(), BoxDynError> {
    let _ = job;
    done.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn redis_cli(url: &str, args: &[&str]) -> String {
    let database = url.rsplit('/').next().unwrap_or("0");
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &redis::shared().port().to_string(), "-n", database])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[tokio::test]
async fn finished_jobs_are_swept_and_queued_ones_are_kept() {
    let url = redis::shared().next_url();
    let name = format!("test-{}", Uuid::new_v4().simple());
    let conn = apalis_redis::connect(url.as_str()).await.expect("redis");
    let jobs = |n: usize| {
        (0..n)
            .map(|_| PodJob {
                pod_id: Uuid::new_v4(),
                generation: 1,
            })
            .collect::<Vec<_>>()
    };
    let mut storage = RedisStorage::<PodJob>::new(conn.clone()).with_config(queue::config(&name));
    storage.push_bulk(jobs(20)).await.expect("push");

    let done = Arc::new(AtomicUsize::new(0));
    let consumer = RedisStorage::<PodJob>::new(conn.clone())
        .with_config(queue::config(&name))
        .poll_with_strategy(PollEvery::new(POLL_INTERVAL));
    let worker = WorkerBuilder::new(format!("test-worker-{}", Uuid::new_v4().simple()))
        .backend(consumer)
        .concurrency(4)
        .data(done.clone())
        .build(count);
    let started = Instant::now();
    let finished = done.clone();
    let data_hash = queue::config(&name).job_data_hash();
    tokio::select! {
        ran = worker.run() => panic!("the worker stopped: {ran:?}"),
        () = async {
            // Every job handled, and every acknowledgement written (the done set complete).
            let done_set = queue::config(&name).done_jobs_set();
            while finished.load(Ordering::SeqCst) < 20 || redis_cli(&url, &["SCARD", &done_set]) != "20" {
                assert!(started.elapsed() < Duration::from_secs(30), "jobs not handled in time");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } => {}
    }
    assert_eq!(done.load(Ordering::SeqCst), 20, "each job handled once");
    assert_eq!(
        redis_cli(&url, &["HLEN", &data_hash]),
        "20",
        "apalis keeps finished payloads"
    );

    // One more job, queued with nobody consuming it.
    storage.push_bulk(jobs(1)).await.expect("push");
    let swept = queue::sweep_done(&mut conn.clone(), &name, 7).await.expect("sweep");
    assert_eq!(swept, 20, "every finished job swept, in batches of 7");
    assert_eq!(
        redis_cli(&url, &["HLEN", &data_hash]),
        "1",
        "the queued job's payload stays"
    );
    assert_eq!(redis_cli(&url, &["EXISTS", &queue::config(&name).done_jobs_set()]), "0");
    let meta_keys = redis_cli(
        &url,
        &[
            "--scan",
            "--pattern",
            &format!("{}:*", queue::config(&name).job_meta_hash()),
        ],
    );
    assert_eq!(
        meta_keys.lines().count(),
        1,
        "only the queued job's metadata is left: {meta_keys}"
    );
    assert_eq!(
        queue::sweep_done(&mut conn.clone(), &name, 7).await.expect("sweep"),
        0,
        "nothing left to sweep"
    );
}
