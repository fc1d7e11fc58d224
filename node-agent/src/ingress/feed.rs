//! The `ingress_route_feed` worker: keeps [`RemoteRoutes`] (the routes of the other nodes'
//! pods) current by long-polling the control plane's `GET /internal/nodes/{id}/routes`.
//!
//! *Design.* Each poll names the version this node holds (`If-None-Match`); the control plane
//! answers at once when its routes differ, else holds the request up to [`WAIT`] and answers
//! 304, which costs nothing here. A change on the control plane is therefore seen within about
//! two seconds (its one-second refresh, then the answer). The source is the narrow
//! [`RouteFeed`] trait, so the loop is tested against a fake; production uses the
//! [`Fleet`](crate::fleet::Fleet) client.
//!
//! *Invariants.* A failed poll never changes the table: the last good answer keeps serving
//! while the control plane is away (routes can go stale, never empty); polls are retried with
//! a doubling pause (1 s … 30 s), and start at most once a second whatever the control plane
//! answers. The worker ends when shutdown is signalled.
//!
//! *Metrics.* `instapod_node_agent_ingress_route_feed_polls_total{outcome}` with `outcome` one
//! of `changed`, `unchanged`, `error`; `instapod_node_agent_ingress_remote_routes` (host names
//! routed to other nodes); `instapod_node_agent_ingress_route_feed_last_success_timestamp_seconds`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use instapod_common::node::IngressRoutes;
use tokio::sync::watch;
use uuid::Uuid;

use super::routes::{RemoteRoutes, RemoteTable};
use crate::fleet::{Fleet, FleetError};

/// The worker's pace.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the control plane may hold a poll when nothing changed.
    pub wait: Duration,
    /// Polls start at most this often, even if the control plane answers at once every time.
    pub min_poll_interval: Duration,
    /// The pause after a failed poll, doubled after each further failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Timing {
    pub const DEFAULT: Timing = Timing {
        wait: Duration::from_secs(20),
        min_poll_interval: Duration::from_secs(1),
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(30),
    };
}

const POLLS_COUNTER: &str = "instapod_node_agent_ingress_route_feed_polls_total";
const REMOTE_ROUTES_GAUGE: &str = "instapod_node_agent_ingress_remote_routes";
const LAST_SUCCESS_GAUGE: &str = "instapod_node_agent_ingress_route_feed_last_success_timestamp_seconds";

/// Where the routes of the other nodes' pods come from.
pub trait RouteFeed: Send + Sync + 'static {
    /// This node's id (its own pods are never routed elsewhere).
    fn node_id(&self) -> Uuid;

    /// The routes when they differ from `known_version`; `None` when they are the same after
    /// waiting up to `wait` for a change.
    fn fetch<'a>(
        &'a self,
        known_version: Option<&'a str>,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<IngressRoutes>, FleetError>> + Send + 'a;
}

impl RouteFeed for Fleet {
    fn node_id(&self) -> Uuid {
        Fleet::node_id(self)
    }

    fn fetch<'a>(
        &'a self,
        known_version: Option<&'a str>,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<IngressRoutes>, FleetError>> + Send + 'a {
        self.ingress_routes(known_version, wait)
    }
}

/// What one poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// New routes are in use.
    Changed,
    /// The routes held are current.
    Unchanged,
    /// The control plane did not answer; the routes held stay in use.
    Failed,
}

impl Poll {
    fn as_str(self) -> &'static str {
        match self {
            Poll::Changed => "changed",
            Poll::Unchanged => "unchanged",
            Poll::Failed => "error",
        }
    }
}

/// One poll: asks with the version held and applies a new answer.
pub async fn poll_once<F: RouteFeed>(feed: &F, remote: &RemoteRoutes, wait: Duration) -> Poll {
    let known = remote.current().version.clone();
    let outcome = match feed.fetch(known.as_deref(), wait).await {
        Ok(Some(answer)) => {
            let table = RemoteTable::from_answer(&answer, Some(feed.node_id()));
            tracing::info!(
                worker = "ingress_route_feed",
                version = %answer.version,
                pods = answer.routes.len(),
                hosts = table.table.len(),
                "routes of the other nodes' pods updated"
            );
            metrics::gauge!(REMOTE_ROUTES_GAUGE).set(table.table.len() as f64);
            remote.replace(table);
            Poll::Changed
        }
        Ok(None) => Poll::Unchanged,
        Err(err) => {
            tracing::warn!(
                worker = "ingress_route_feed",
                error = %err,
                version = known.as_deref().unwrap_or("none"),
                "cannot fetch the routes of the other nodes' pods; keeping the last ones"
            );
            Poll::Failed
        }
    };
    metrics::counter!(POLLS_COUNTER, "outcome" => outcome.as_str()).increment(1);
    if outcome != Poll::Failed {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        metrics::gauge!(LAST_SUCCESS_GAUGE).set(now.as_secs_f64());
    }
    outcome
}

/// The worker: polls until shutdown, pausing with backoff after failures.
pub async fn run<F: RouteFeed>(feed: Arc<F>, remote: Arc<RemoteRoutes>, shutdown: watch::Receiver<bool>) {
    run_with(feed, remote, shutdown, Timing::DEFAULT).await
}

/// [`run`] at another pace (tests).
pub async fn run_with<F: RouteFeed>(
    feed: Arc<F>,
    remote: Arc<RemoteRoutes>,
    shutdown: watch::Receiver<bool>,
    timing: Timing,
) {
    follow(
        "ingress_route_feed",
        || poll_once(feed.as_ref(), &remote, timing.wait),
        shutdown,
        timing,
    )
    .await
}

/// The loop of a long-polling worker (`worker` names it in logs): calls `poll` until shutdown,
/// at most once per `timing.min_poll_interval`, pausing with a doubling backoff (from
/// `min_backoff` to `max_backoff`) after each failed poll. Shared by the routes feed and the
/// served-domains feed (`crate::domains::feed`).
pub async fn follow<P, Fut>(worker: &'static str, mut poll: P, mut shutdown: watch::Receiver<bool>, timing: Timing)
where
    P: FnMut() -> Fut,
    Fut: std::future::Future<Output = Poll>,
{
    tracing::info!(worker, "worker started");
    let mut backoff = timing.min_backoff;
    loop {
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            outcome = poll() => outcome,
            _ = shutdown.changed() => break,
        };
        let pause = if outcome == Poll::Failed {
            let pause = backoff;
            backoff = (backoff * 2).min(timing.max_backoff);
            pause
        } else {
            backoff = timing.min_backoff;
            timing.min_poll_interval.saturating_sub(started.elapsed())
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(worker, "worker stopped");
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use instapod_common::node::{IngressRoute, IngressTarget};

    use super::*;
    use crate::ingress::routes::Target;

    /// Answers from a script, and records the versions it was asked with.
    struct ScriptedFeed {
        node_id: Uuid,
        answers: Mutex<VecDeque<Result<Option<IngressRoutes>, FleetError>>>,
        asked_with: Mutex<Vec<Option<String>>>,
    }

    impl RouteFeed for ScriptedFeed {
        fn node_id(&self) -> Uuid {
            self.node_id
        }

        fn fetch<'a>(
            &'a self,
            known_version: Option<&'a str>,
            _wait: Duration,
        ) -> impl Future<Output = Result<Option<IngressRoutes>, FleetError>> + Send + 'a {
            self.asked_with
                .lock()
                .expect("lock")
                .push(known_version.map(str::to_string));
            let answer = self.answers.lock().expect("lock").pop_front().unwrap_or(Ok(None));
            async move { answer }
        }
    }

    fn answer(version: &str, routes: Vec<IngressRoute>) -> IngressRoutes {
        IngressRoutes {
            version: version.into(),
            hop_token: "hop".into(),
            routes,
        }
    }

    fn route(n: u128, host: &str, target: IngressTarget) -> IngressRoute {
        IngressRoute {
            pod_id: Uuid::from_u128(n),
            hostnames: vec![host.into()],
            target,
        }
    }

    #[tokio::test]
    async fn polls_name_the_version_held_and_failures_keep_the_last_routes() {
        let own = Uuid::from_u128(1);
        let other = Uuid::from_u128(2);
        let on_other = |addr: &str| IngressTarget::Node {
            node_id: other,
            addr: addr.into(),
        };
        let unreachable = || FleetError::Unreachable {
            url: "http://cp/internal".into(),
            reason: "connection refused".into(),
        };
        let feed = ScriptedFeed {
            node_id: own,
            answers: Mutex::new(VecDeque::from([
                Ok(Some(answer(
                    "v1",
                    vec![
                        route(10, "web-a.apps.test", on_other("10.0.0.2:80")),
                        // Never followed: a route to this node itself.
                        route(
                            11,
                            "self-a.apps.test",
                            IngressTarget::Node {
                                node_id: own,
                                addr: "10.0.0.1:80".into(),
                            },
                        ),
                        route(12, "wait-a.apps.test", IngressTarget::Unplaced),
                    ],
                ))),
                Ok(None),
                Err(unreachable()),
                Ok(Some(answer(
                    "v2",
                    vec![route(10, "web-a.apps.test", on_other("10.0.0.3:80"))],
                ))),
            ])),
            asked_with: Mutex::new(Vec::new()),
        };
        let remote = RemoteRoutes::default();
        let wait = Duration::ZERO;

        assert_eq!(poll_once(&feed, &remote, wait).await, Poll::Changed);
        let first = remote.current();
        assert_eq!(first.version.as_deref(), Some("v1"));
        assert_eq!(first.hop_token.as_deref(), Some("hop"));
        assert_eq!(
            first.table.get("web-a.apps.test"),
            Some(&Target::RemoteNode {
                addr: "10.0.0.2:80".parse().expect("address")
            })
        );
        assert_eq!(first.table.get("self-a.apps.test"), None);
        assert!(matches!(
            first.table.get("wait-a.apps.test"),
            Some(Target::Unavailable {
                why: crate::ingress::Unavailable::NotPlaced,
                ..
            })
        ));

        // Unchanged (304) and a failure: the same table object stays in use.
        assert_eq!(poll_once(&feed, &remote, wait).await, Poll::Unchanged);
        assert_eq!(poll_once(&feed, &remote, wait).await, Poll::Failed);
        assert!(Arc::ptr_eq(&first, &remote.current()));

        assert_eq!(poll_once(&feed, &remote, wait).await, Poll::Changed);
        let second = remote.current();
        assert_eq!(second.version.as_deref(), Some("v2"));
        assert_eq!(
            second.table.get("web-a.apps.test"),
            Some(&Target::RemoteNode {
                addr: "10.0.0.3:80".parse().expect("address")
            })
        );
        assert_eq!(second.table.get("wait-a.apps.test"), None, "gone from the answer");

        let asked = feed.asked_with.lock().expect("lock").clone();
        let v1 = Some("v1".to_string());
        assert_eq!(asked, vec![None, v1.clone(), v1.clone(), v1]);
    }

    #[tokio::test]
    async fn the_worker_backs_off_after_failures_paces_its_polls_and_stops_on_shutdown() {
        let failures = (0..4)
            .map(|_| {
                Err(FleetError::Unreachable {
                    url: "http://cp".into(),
                    reason: "down".into(),
                })
            })
            .collect::<VecDeque<_>>();
        let feed = Arc::new(ScriptedFeed {
            node_id: Uuid::from_u128(1),
            answers: Mutex::new(failures),
            asked_with: Mutex::new(Vec::new()),
        });
        let remote = Arc::new(RemoteRoutes::default());
        let (stop, shutdown) = watch::channel(false);
        let ms = Duration::from_millis;
        let timing = Timing {
            wait: Duration::ZERO,
            min_poll_interval: ms(200),
            min_backoff: ms(100),
            max_backoff: ms(250),
        };
        let worker = tokio::spawn(run_with(feed.clone(), remote.clone(), shutdown, timing));
        // Failures at 0, 100, 300 and 550 ms (pauses 100, 200, 250 capped, 250), then answers
        // at once from 800 ms, polled every 200 ms: 1000, 1200, 1400.
        tokio::time::sleep(ms(1_500)).await;
        let polls = feed.asked_with.lock().expect("lock").len();
        assert!((7..=9).contains(&polls), "{polls} polls");
        stop.send(true).expect("the worker listens");
        tokio::time::timeout(Duration::from_secs(1), worker)
            .await
            .expect("the worker stops")
            .expect("no panic");
        assert_eq!(remote.current().version, None, "failures never install a table");
    }
}
