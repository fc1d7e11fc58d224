//! Enqueuing [`PodJob`]s for the scheduler (apalis on Redis, queue [`PODS_QUEUE`]).
//!
//! *Invariant.* Postgres is the truth and Redis carries work: a pod's row is committed before
//! its job is pushed, and a push that fails (Redis down) is only logged — the scheduler's
//! reconciler finds every pod that is not in its desired state and enqueues it again.

use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use instapod_common::node::{PODS_QUEUE, PodJob};
use tokio::sync::Mutex;
use uuid::Uuid;

/// How long a push may take before it is given up (the reconciler catches up).
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The scheduler's queue, connected lazily.
#[derive(Debug)]
pub struct PodQueue {
    url: String,
    storage: Mutex<Option<RedisStorage<PodJob>>>,
}

impl PodQueue {
    pub fn new(redis_url: &str) -> PodQueue {
        PodQueue {
            url: redis_url.to_string(),
            storage: Mutex::new(None),
        }
    }

    /// Pushes a job; failures are logged, never returned. `kind` says what caused it (the
    /// `kind` label of `instapod_control_plane_jobs_enqueued_total`: a fixed word).
    pub async fn push(&self, kind: &'static str, pod_id: Uuid, generation: i64) {
        let pushed = tokio::time::timeout(PUSH_TIMEOUT, async {
            let mut guard = self.storage.lock().await;
            if guard.is_none() {
                let conn = apalis_redis::connect(self.url.as_str()).await?;
                *guard = Some(RedisStorage::new(conn).with_config(instapod_common::queue::config(PODS_QUEUE)));
            }
            let Some(storage) = guard.as_mut() else {
                return Ok(());
            };
            let pushed = storage.push(PodJob { pod_id, generation }).await;
            if pushed.is_err() {
                *guard = None;
            }
            pushed.map_err(|err| std::io::Error::other(err.to_string()).into())
        })
        .await;
        let outcome = match pushed {
            Ok(Ok(())) => "ok",
            Ok(Err::<(), Box<dyn std::error::Error + Send + Sync>>(err)) => {
                tracing::warn!(pod = %pod_id, error = %err, "cannot enqueue the pod's job; the reconciler will");
                "error"
            }
            Err(_) => {
                tracing::warn!(pod = %pod_id, "enqueuing the pod's job timed out; the reconciler will");
                "timeout"
            }
        };
        crate::observability::job_enqueued(PODS_QUEUE, kind, outcome);
    }
}
