//! Enqueuing [`DomainJob`]s on a node's domain queue (`domains:<node_id>`, apalis on Redis,
//! with the shared settings of `instapod_common::queue`).
//!
//! *Invariant.* Postgres is the truth and Redis carries work: the domain's row is committed
//! before its job is pushed. A push that fails is logged and reported to the caller: a user's
//! verification answers 503, a certificate order is retried by the domain worker (its
//! `next_issue_at` is moved to the first retry).

use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::{ConnectionManager, RedisStorage};
use instapod_common::domains::{DomainJob, domains_queue};
use tokio::sync::Mutex;
use uuid::Uuid;

/// How long a push may take before it is given up.
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The fleet's domain queues, on one lazily opened connection.
#[derive(Debug)]
pub struct DomainQueue {
    url: String,
    conn: Mutex<Option<ConnectionManager>>,
}

impl DomainQueue {
    pub fn new(redis_url: &str) -> DomainQueue {
        DomainQueue {
            url: redis_url.to_string(),
            conn: Mutex::new(None),
        }
    }

    /// Pushes `job` to `node_id`'s domain queue; `kind` is the `kind` label of
    /// `instapod_control_plane_jobs_enqueued_total` (a fixed word). Returns whether it was
    /// pushed.
    pub async fn push(&self, kind: &'static str, node_id: Uuid, job: DomainJob) -> bool {
        let domain_id = job.domain_id();
        let pushed = tokio::time::timeout(PUSH_TIMEOUT, async {
            let conn = {
                let mut guard = self.conn.lock().await;
                match guard.as_ref() {
                    Some(conn) => conn.clone(),
                    None => {
                        let conn = apalis_redis::connect(self.url.as_str()).await?;
                        *guard = Some(conn.clone());
                        conn
                    }
                }
            };
            let mut storage = RedisStorage::<DomainJob>::new(conn)
                .with_config(instapod_common::queue::config(domains_queue(node_id)));
            storage
                .push(job)
                .await
                .map_err(|err| Box::<dyn std::error::Error + Send + Sync>::from(err.to_string()))
        })
        .await;
        let outcome = match pushed {
            Ok(Ok(())) => "ok",
            Ok(Err(err)) => {
                tracing::warn!(domain_id = %domain_id, node_id = %node_id, error = %err, "cannot enqueue the domain job");
                *self.conn.lock().await = None;
                "error"
            }
            Err(_) => {
                tracing::warn!(domain_id = %domain_id, node_id = %node_id, "enqueuing the domain job timed out");
                "timeout"
            }
        };
        crate::observability::job_enqueued("domains", kind, outcome);
        outcome == "ok"
    }
}
