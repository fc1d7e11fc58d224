//! The `domain_feed` worker: keeps [`Served`] (the custom domains every ingress serves, with
//! their certificates) current by long-polling the control plane's
//! `GET /internal/nodes/{id}/domains`, exactly as `ingress::feed` follows the routes.
//!
//! *Invariants.* A failed poll never changes what is served: the last good answer keeps
//! serving while the control plane is away. Polls are retried with a doubling pause (1 s …
//! 30 s) and start at most once a second. The worker ends when shutdown is signalled.
//!
//! *Metrics.* `instapod_node_agent_domain_feed_polls_total{outcome}` (`changed`, `unchanged`,
//! `error`); `instapod_node_agent_domains_served` (custom domains served);
//! `instapod_node_agent_domain_certificate_expiry_seconds` (the earliest `not_after` among the
//! served certificates, Unix time; 0 while none is served).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use instapod_common::domains::ServedDomains;
use tokio::sync::watch;

use super::Served;
use crate::fleet::{Fleet, FleetError};
use crate::ingress::feed::{Poll, Timing, follow};

const POLLS_COUNTER: &str = "instapod_node_agent_domain_feed_polls_total";
const SERVED_GAUGE: &str = "instapod_node_agent_domains_served";
const EXPIRY_GAUGE: &str = "instapod_node_agent_domain_certificate_expiry_seconds";

/// Where the served domains come from.
pub trait DomainFeed: Send + Sync + 'static {
    /// The served domains when they differ from `known_version`; `None` when they are the
    /// same after waiting up to `wait` for a change.
    fn fetch<'a>(
        &'a self,
        known_version: Option<&'a str>,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<ServedDomains>, FleetError>> + Send + 'a;
}

impl DomainFeed for Fleet {
    fn fetch<'a>(
        &'a self,
        known_version: Option<&'a str>,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<ServedDomains>, FleetError>> + Send + 'a {
        self.served_domains(known_version, wait)
    }
}

fn outcome_label(poll: Poll) -> &'static str {
    match poll {
        Poll::Changed => "changed",
        Poll::Unchanged => "unchanged",
        Poll::Failed => "error",
    }
}

/// One poll: asks with the version held and applies a new answer.
pub async fn poll_once<F: DomainFeed>(feed: &F, served: &Served, wait: Duration) -> Poll {
    let known = served.current().version.clone();
    let outcome = match feed.fetch(known.as_deref(), wait).await {
        Ok(Some(answer)) => {
            let table = served.apply(&answer);
            let with_certificate = table.hosts.values().filter(|h| h.certificate.is_some()).count();
            tracing::info!(
                worker = "domain_feed",
                version = %answer.version,
                domains = table.hosts.len(),
                with_certificate,
                "served custom domains updated"
            );
            metrics::gauge!(SERVED_GAUGE).set(table.hosts.len() as f64);
            let earliest = table
                .hosts
                .values()
                .filter_map(|h| h.certificate.as_ref().map(|c| c.not_after))
                .min()
                .unwrap_or(0);
            metrics::gauge!(EXPIRY_GAUGE).set(earliest as f64);
            Poll::Changed
        }
        Ok(None) => Poll::Unchanged,
        Err(err) => {
            tracing::warn!(
                worker = "domain_feed",
                error = %err,
                version = known.as_deref().unwrap_or("none"),
                "cannot fetch the served domains; keeping the last ones"
            );
            Poll::Failed
        }
    };
    metrics::counter!(POLLS_COUNTER, "outcome" => outcome_label(outcome)).increment(1);
    outcome
}

/// The worker: polls until shutdown, pausing with backoff after failures.
pub async fn run<F: DomainFeed>(feed: Arc<F>, served: Arc<Served>, shutdown: watch::Receiver<bool>) {
    run_with(feed, served, shutdown, Timing::DEFAULT).await
}

/// [`run`] at another pace (tests).
pub async fn run_with<F: DomainFeed>(
    feed: Arc<F>,
    served: Arc<Served>,
    shutdown: watch::Receiver<bool>,
    timing: Timing,
) {
    follow(
        "domain_feed",
        || poll_once(feed.as_ref(), &served, timing.wait),
        shutdown,
        timing,
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use instapod_common::domains::ServedDomain;
    use uuid::Uuid;

    use super::*;

    struct ScriptedFeed {
        answers: Mutex<VecDeque<Result<Option<ServedDomains>, FleetError>>>,
        asked_with: Mutex<Vec<Option<String>>>,
    }

    impl DomainFeed for ScriptedFeed {
        fn fetch<'a>(
            &'a self,
            known_version: Option<&'a str>,
            _wait: Duration,
        ) -> impl Future<Output = Result<Option<ServedDomains>, FleetError>> + Send + 'a {
            self.asked_with
                .lock()
                .expect("lock")
                .push(known_version.map(str::to_string));
            let answer = self.answers.lock().expect("lock").pop_front().unwrap_or(Ok(None));
            async move { answer }
        }
    }

    fn answer(version: &str, hosts: &[&str]) -> ServedDomains {
        ServedDomains {
            version: version.into(),
            domains: hosts
                .iter()
                .map(|h| ServedDomain {
                    domain_id: Uuid::new_v4(),
                    pod_id: Uuid::from_u128(7),
                    hostname: h.to_string(),
                    certificate: None,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn polls_name_the_version_held_and_failures_keep_the_last_domains() {
        let feed = ScriptedFeed {
            answers: Mutex::new(VecDeque::from([
                Ok(Some(answer("v1", &["Shop.Example.com.", "www.example.com"]))),
                Ok(None),
                Err(FleetError::Unreachable {
                    url: "http://cp/internal".into(),
                    reason: "connection refused".into(),
                }),
                Ok(Some(answer("v2", &["www.example.com"]))),
            ])),
            asked_with: Mutex::new(Vec::new()),
        };
        let served = Served::default();
        assert_eq!(poll_once(&feed, &served, Duration::ZERO).await, Poll::Changed);
        let first = served.current();
        assert_eq!(first.version.as_deref(), Some("v1"));
        assert_eq!(
            first.hosts.get("shop.example.com").map(|h| h.pod_id),
            Some(Uuid::from_u128(7))
        );
        assert_eq!(poll_once(&feed, &served, Duration::ZERO).await, Poll::Unchanged);
        assert_eq!(poll_once(&feed, &served, Duration::ZERO).await, Poll::Failed);
        assert!(served.current().hosts.contains_key("shop.example.com"));
        assert_eq!(poll_once(&feed, &served, Duration::ZERO).await, Poll::Changed);
        let second = served.current();
        assert!(!second.hosts.contains_key("shop.example.com"));
        assert!(second.hosts.contains_key("www.example.com"));
        assert_eq!(
            *feed.asked_with.lock().expect("lock"),
            vec![None, Some("v1".into()), Some("v1".into()), Some("v1".into())]
        );
    }
}
