//! Several scheduler replicas placing one burst of pods on a small fleet of simulated nodes
//! (rows in `nodes`, no agents behind them): no node is ever over-committed, every pod is
//! placed at most once, and the pods that do not fit stay `pending` with an unschedulable
//! event — with each job delivered twice and the replicas' batches racing for the same nodes.

use std::time::{Duration, Instant};

use apalis::prelude::TaskSink;
use apalis_redis::RedisStorage;
use instapod_common::node::{PODS_QUEUE, PodJob};
use instapod_tests::scheduler::Scheduler;
use instapod_tests::{ControlPlane, ControlPlaneOptions, fleet, ids, redis};
use uuid::Uuid;

const NODES: i64 = 4;
/// Each node takes four pods (1,000 millicores, pods of 250).
const NODE_CPU: i64 = 1000;
const PODS: i64 = 40;
const FIT: i64 = NODES * 4;
const WAIT: Duration = Duration::from_secs(60);

async fn placed(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM pods WHERE node_id IS NOT NULL", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn scheduler_replicas_never_over_commit_a_node_or_place_a_pod_twice() {
    let redis_url = redis::shared().next_url();
    let cp = ControlPlane::start(
        ControlPlaneOptions::default()
            .redis_url(&redis_url)
            .env("INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS", "86400"),
    )
    .await;
    let db = cp.db().await;
    fleet::insert_simulated_nodes(&db, "replica-node", NODES, NODE_CPU)
        .await
        .expect("simulated nodes");
    let team: Uuid = db
        .query_one(
            "INSERT INTO teams (name, slug, plan_id) VALUES ('Replicas', $1, 'scale') RETURNING id",
            &[&ids::unique_slug("replicas")],
        )
        .await
        .expect("team")
        .get(0);
    let jobs: Vec<PodJob> = db
        .query(
            "INSERT INTO pods (team_id, name, state, desired_state, image, plan_id, region, cpu_millis,
                               memory_bytes, disk_bytes)
             SELECT $1, 'burst-' || i, 'pending', 'running', 'registry.invalid/simulated:1', 'free', 'local',
                    250, 268435456, 1073741824
             FROM generate_series(1, $2::int8) i
             RETURNING id, generation",
            &[&team, &PODS],
        )
        .await
        .expect("pods")
        .iter()
        .map(|r| PodJob {
            pod_id: r.get(0),
            generation: r.get(1),
        })
        .collect();

    let env = [
        ("INSTAPOD_SCHEDULER_RECONCILE_INTERVAL_SECS", "1"),
        ("INSTAPOD_SCHEDULER_CONCURRENCY", "16"),
    ];
    let replicas: Vec<Scheduler> = (0..3)
        .map(|_| Scheduler::start_with_env(cp.database_url(), &redis_url, &env))
        .collect();
    let conn = apalis_redis::connect(redis_url.as_str()).await.expect("redis");
    let mut storage = RedisStorage::<PodJob>::new(conn).with_config(instapod_common::queue::config(PODS_QUEUE));
    // Every job twice: duplicates race each other across replicas.
    let mut twice = jobs.clone();
    twice.extend(jobs.iter().cloned());
    storage.push_bulk(twice).await.expect("push");

    let started = Instant::now();
    while placed(&db).await < FIT {
        assert!(
            started.elapsed() < WAIT,
            "{} of {FIT} pods placed after {WAIT:?}; logs:\n{}",
            placed(&db).await,
            replicas
                .iter()
                .map(Scheduler::log_tail)
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the replicas and their reconcilers go on for a while: nothing more may fit.
    let unschedulable_deadline = Instant::now() + WAIT;
    loop {
        let pending: i64 = db
            .query_one(
                "SELECT count(*) FROM pods WHERE node_id IS NULL AND state = 'pending'
                   AND reason LIKE 'unschedulable:%'",
                &[],
            )
            .await
            .expect("pending")
            .get(0);
        if pending == PODS - FIT {
            break;
        }
        assert!(
            Instant::now() < unschedulable_deadline,
            "{pending} of {} pods marked unschedulable",
            PODS - FIT
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(placed(&db).await, FIT, "exactly what fits is placed");

    let per_node = db
        .query(
            "SELECT n.name, count(p.id), COALESCE(sum(p.cpu_millis), 0)::int8, n.allocatable_cpu_millis
             FROM nodes n LEFT JOIN pods p ON p.node_id = n.id GROUP BY n.id ORDER BY n.name",
            &[],
        )
        .await
        .expect("per node");
    for row in &per_node {
        let (name, count, used, allocatable): (String, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert!(
            used <= allocatable,
            "{name} over-committed: {used} of {allocatable} ({count} pods)"
        );
        assert_eq!(count, 4, "{name} is filled exactly");
    }
    let twice_scheduled: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT pod_id FROM pod_events WHERE kind = 'scheduled'
                                   GROUP BY pod_id HAVING count(*) > 1) t",
            &[],
        )
        .await
        .expect("events")
        .get(0);
    assert_eq!(twice_scheduled, 0, "no pod is placed twice");
    let events: i64 = db
        .query_one("SELECT count(*) FROM pod_events WHERE kind = 'scheduled'", &[])
        .await
        .expect("events")
        .get(0);
    assert_eq!(events, FIT, "one `scheduled` event per placed pod");

    // Room appears: deleting two placed pods' rows lets two pending ones in.
    db.execute(
        "DELETE FROM pods WHERE id IN (SELECT id FROM pods WHERE node_id IS NOT NULL ORDER BY name LIMIT 2)",
        &[],
    )
    .await
    .expect("free room");
    let started = Instant::now();
    while placed(&db).await < FIT {
        assert!(started.elapsed() < WAIT, "the freed room was not used");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(placed(&db).await, FIT);
    drop(replicas);
}
