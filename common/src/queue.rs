//! How every Instapod process configures its apalis-redis queues: one place for the queue
//! settings and the poll strategy, so producers and consumers of a queue agree.
//!
//! *Why these settings.*
//! - `lock_tasks` off: with it on, apalis-redis 1.0 "acquires a lease" for every fetched job
//!   with `LREM` on the queue's list — O(queue length) per job (the fetch has already taken
//!   the job off the list, so the scan finds nothing) and quadratic under a backlog: with
//!   20,000 pods queued Redis spent most of its CPU there. Jobs a dead worker held are still
//!   put back: that uses the worker's in-flight set, which the fetch fills either way.
//! - `emit_events` off: nobody subscribes to the per-job pub/sub messages.
//! - [`PollEvery`]: apalis-redis fetches from an empty queue only on its heartbeat (30 s)
//!   unless told to poll, and apalis-core 1.0's `IntervalStrategy` can leave no timer armed
//!   after an empty fetch; this strategy always does.

use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy};

/// How often consumers look for new jobs. 20 ms keeps create → running within the issue's
/// budget (BENCHMARKS.md, "Pods end to end"); an empty poll costs Redis about 13 µs, so 50
/// polls a second per consumer are ~0.06% of Redis's core each (a large fleet wants a wake-up
/// on push instead).
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The settings of queue `name` (see the module documentation).
pub fn config(name: impl AsRef<str>) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(name)
        .lock_tasks(false)
        .emit_events(false)
}

/// Wakes the consumer every `period` and always leaves a timer armed. apalis-core 1.0's
/// `IntervalStrategy` (`poll_with_interval`) replaces its timer when it fires without polling
/// the new one; when the fetch that follows completes within the same poll (an empty queue),
/// no timer is registered and the consumer sleeps until its heartbeat, 30 s later.
#[derive(Debug)]
pub struct PollEvery(tokio::time::Interval);

impl PollEvery {
    pub fn new(period: Duration) -> PollEvery {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        PollEvery(interval)
    }
}

impl PollStrategy for PollEvery {
    fn poll_drive(&mut self, cx: &mut std::task::Context<'_>, _: &PollSnapshot) -> std::task::Poll<Option<()>> {
        // Tick until the interval is pending: that registers the waker for the next tick.
        let mut ticked = false;
        while self.0.poll_tick(cx).is_ready() {
            ticked = true;
        }
        if ticked {
            std::task::Poll::Ready(Some(()))
        } else {
            std::task::Poll::Pending
        }
    }
}

/// Removes up to `batch` finished jobs' leftovers at a time from queue `name`, until none are
/// left; returns how many jobs it swept.
///
/// apalis-redis keeps every finished job's payload (in the queue's data hash), its metadata
/// (one hash per job) and its id (in the "done" set, read only by its statistics) for ever:
/// Redis would grow with every job the platform ever ran. Only jobs in the done set are swept
/// — they finished successfully and nothing reads them again; failed jobs waiting for a retry
/// and dead jobs are left alone (apalis-redis's own `vacuum` also deletes `Failed` jobs, whose
/// retries would then find no payload).
pub async fn sweep_done(
    conn: &mut impl apalis_redis::ConnectionLike,
    name: &str,
    batch: usize,
) -> Result<usize, apalis_redis::RedisError> {
    let config = config(name);
    let script = redis::Script::new(
        r"
        local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
        for _, id in ipairs(ids) do
            redis.call('HDEL', KEYS[2], id)
            redis.call('DEL', KEYS[3] .. ':' .. id)
        end
        return #ids",
    );
    let batch = batch.max(1);
    let mut swept = 0;
    loop {
        let n: usize = script
            .key(config.done_jobs_set())
            .key(config.job_data_hash())
            .key(config.job_meta_hash())
            .arg(batch)
            .invoke_async(conn)
            .await?;
        swept += n;
        if n < batch {
            return Ok(swept);
        }
    }
}

/// How many jobs wait to be fetched in each of `names` (the length of each queue's active
/// list; jobs scheduled for a later retry are not counted), in one round trip.
pub async fn waiting(
    conn: &mut impl apalis_redis::ConnectionLike,
    names: &[String],
) -> Result<Vec<u64>, apalis_redis::RedisError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for name in names {
        pipe.cmd("LLEN").arg(config(name).active_jobs_list());
    }
    pipe.query_async(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_skip_the_per_job_lease_scan_and_events() {
        let config = config("node:abc");
        assert_eq!(config.queue.as_ref(), "node:abc");
        assert!(!config.lock_tasks);
        assert!(!config.emit_events);
    }
}
