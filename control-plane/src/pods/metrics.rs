//! Pod metrics: storing the samples node agents push, the newest one (`GET
//! /api/pods/{name}/metrics`), aligned history at three resolutions (`…/metrics/history`) and
//! the retention that keeps the tables bounded.
//!
//! *Design.* Each sample is stored raw and, in the same statement, folded into its per-minute
//! and per-hour buckets of `pod_metrics_rollup` (sums, maxima and a sample count, so averages
//! stay exact at every resolution). Only samples that were actually inserted are folded: a
//! batch the agent sends twice (its first answer was lost) changes nothing the second time.
//! A history query reads the finest resolution that is both kept for the whole range and no
//! coarser than the step, and groups it into `step`-wide buckets aligned to multiples of the
//! step since the Unix epoch; empty buckets are `null`.
//!
//! Retention: raw samples are kept [`Retention::raw_secs`] (default 2 hours: the API promises
//! one), minute buckets a day and a bit, hour buckets 31 days. The worker deletes in bounded
//! batches so it never holds long locks.

use std::time::Duration;

use instapod_common::pod_metrics::PodSample;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::db::{self, DbError, Pool};

/// How long each resolution is kept, and how often the worker deletes what is older.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw_secs: i64,
    pub minute_secs: i64,
    pub hour_secs: i64,
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw_secs: 2 * 3_600,
            minute_secs: 25 * 3_600,
            hour_secs: 31 * 86_400,
            interval: Duration::from_secs(60),
        }
    }
}

/// Samples older than this (or this far in the future) are refused: they would land outside
/// the raw table's window and only skew rollups.
const MAX_SAMPLE_AGE_SECS: i64 = 3_600;
const MAX_SAMPLE_AHEAD_SECS: i64 = 300;

/// The most points one history answer has.
pub const MAX_POINTS: i64 = 5_000;

/// Rows deleted per statement by the retention worker.
const DELETE_BATCH: i64 = 10_000;

/// Why metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PodMetricsError {
    #[error("no pod named {0:?} in the team")]
    NotFound(String),
    #[error("{0}")]
    InvalidRange(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Stores the samples of pods placed on `node_id` (samples of other pods are ignored) and
/// folds them into the rollups. Returns how many were new.
pub async fn ingest(pool: &Pool, node_id: Uuid, samples: &[PodSample]) -> Result<u64, DbError> {
    let now_ms = OffsetDateTime::now_utc().unix_timestamp() * 1_000;
    let fresh: Vec<&PodSample> = samples
        .iter()
        .filter(|s| {
            s.at_unix_ms >= now_ms - MAX_SAMPLE_AGE_SECS * 1_000
                && s.at_unix_ms <= now_ms + MAX_SAMPLE_AHEAD_SECS * 1_000
        })
        .collect();
    if fresh.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&PodSample) -> i64| fresh.iter().map(|s| f(s)).collect::<Vec<i64>>();
    let real = |f: fn(&PodSample) -> f64| fresh.iter().map(|s| f(s) as f32).collect::<Vec<f32>>();
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let pod_ids: Vec<Uuid> = fresh.iter().map(|s| s.pod_id).collect();
    let at_ms = col(|s| s.at_unix_ms);
    let cpu_total: Vec<f64> = fresh.iter().map(|s| s.cpu_seconds_total).collect();
    let cpu = real(|s| s.cpu_cores);
    let cpu_limit = real(|s| s.cpu_limit_cores);
    let memory: Vec<i64> = fresh.iter().map(|s| clamp(s.memory_bytes)).collect();
    let memory_limit: Vec<i64> = fresh.iter().map(|s| clamp(s.memory_limit_bytes)).collect();
    let rx: Vec<i64> = fresh.iter().map(|s| clamp(s.rx_bytes)).collect();
    let tx: Vec<i64> = fresh.iter().map(|s| clamp(s.tx_bytes)).collect();
    let rx_rate = real(|s| s.rx_bytes_per_second);
    let tx_rate = real(|s| s.tx_bytes_per_second);
    let disk: Vec<i64> = fresh.iter().map(|s| clamp(s.disk_used_bytes)).collect();
    let disk_quota: Vec<i64> = fresh.iter().map(|s| clamp(s.disk_quota_bytes)).collect();
    let pids: Vec<i64> = fresh.iter().map(|s| clamp(s.pids)).collect();
    let client = db::connect(pool).await?;
    let row = client
        .query_one(
            "WITH incoming AS (
                 SELECT * FROM unnest($2::uuid[], $3::bigint[], $4::float8[], $5::real[], $6::real[],
                                      $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::real[],
                                      $12::real[], $13::bigint[], $14::bigint[], $15::bigint[])
                     AS s(pod_id, at_ms, cpu_total, cpu, cpu_limit, memory, memory_limit, rx, tx, rx_rate,
                          tx_rate, disk, disk_quota, pids)
             ), inserted AS (
                 INSERT INTO pod_metrics_raw (pod_id, at, cpu_seconds_total, cpu_cores, cpu_limit_cores,
                                              memory_bytes, memory_limit_bytes, rx_bytes, tx_bytes,
                                              rx_bytes_per_sec, tx_bytes_per_sec, disk_used_bytes,
                                              disk_quota_bytes, pids)
                 SELECT s.pod_id, to_timestamp(s.at_ms / 1000.0), s.cpu_total, s.cpu, s.cpu_limit, s.memory,
                        s.memory_limit, s.rx, s.tx, s.rx_rate, s.tx_rate, s.disk, s.disk_quota, s.pids
                 FROM incoming s JOIN pods p ON p.id = s.pod_id AND p.node_id = $1
                 ON CONFLICT (pod_id, at) DO NOTHING
                 RETURNING *
             ), buckets AS (
                 SELECT i.*, r.secs AS resolution_secs,
                        to_timestamp(floor(extract(epoch FROM i.at) / r.secs) * r.secs) AS bucket
                 FROM inserted i CROSS JOIN (VALUES (60), (3600)) AS r(secs)
             ), folded AS (
                 INSERT INTO pod_metrics_rollup AS r (pod_id, resolution_secs, bucket, samples, cpu_cores_sum,
                        cpu_cores_max, memory_bytes_sum, memory_bytes_max, rx_bytes_per_sec_sum,
                        tx_bytes_per_sec_sum, disk_used_bytes_max, pids_max, cpu_limit_cores,
                        memory_limit_bytes, disk_quota_bytes)
                 SELECT pod_id, resolution_secs, bucket, count(*), sum(cpu_cores), max(cpu_cores),
                        sum(memory_bytes), max(memory_bytes), sum(rx_bytes_per_sec), sum(tx_bytes_per_sec),
                        max(disk_used_bytes), max(pids), max(cpu_limit_cores), max(memory_limit_bytes),
                        max(disk_quota_bytes)
                 FROM buckets GROUP BY pod_id, resolution_secs, bucket
                 ON CONFLICT (pod_id, resolution_secs, bucket) DO UPDATE SET
                     samples = r.samples + excluded.samples,
                     cpu_cores_sum = r.cpu_cores_sum + excluded.cpu_cores_sum,
                     cpu_cores_max = greatest(r.cpu_cores_max, excluded.cpu_cores_max),
                     memory_bytes_sum = r.memory_bytes_sum + excluded.memory_bytes_sum,
                     memory_bytes_max = greatest(r.memory_bytes_max, excluded.memory_bytes_max),
                     rx_bytes_per_sec_sum = r.rx_bytes_per_sec_sum + excluded.rx_bytes_per_sec_sum,
                     tx_bytes_per_sec_sum = r.tx_bytes_per_sec_sum + excluded.tx_bytes_per_sec_sum,
                     disk_used_bytes_max = greatest(r.disk_used_bytes_max, excluded.disk_used_bytes_max),
                     pids_max = greatest(r.pids_max, excluded.pids_max),
                     cpu_limit_cores = greatest(r.cpu_limit_cores, excluded.cpu_limit_cores),
                     memory_limit_bytes = greatest(r.memory_limit_bytes, excluded.memory_limit_bytes),
                     disk_quota_bytes = greatest(r.disk_quota_bytes, excluded.disk_quota_bytes)
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM folded)",
            &[
                &node_id,
                &pod_ids,
                &at_ms,
                &cpu_total,
                &cpu,
                &cpu_limit,
                &memory,
                &memory_limit,
                &rx,
                &tx,
                &rx_rate,
                &tx_rate,
                &disk,
                &disk_quota,
                &pids,
            ],
        )
        .await?;
    let inserted: i64 = row.get(0);
    Ok(u64::try_from(inserted).unwrap_or(0))
}

/// The newest sample of a pod, as stored.
#[derive(Debug, Clone)]
pub struct CurrentMetrics {
    pub state: String,
    pub sample: Option<StoredSample>,
}

/// One stored raw sample.
#[derive(Debug, Clone)]
pub struct StoredSample {
    pub at: OffsetDateTime,
    pub cpu_seconds_total: f64,
    pub cpu_cores: f64,
    pub cpu_limit_cores: f64,
    pub memory_bytes: i64,
    pub memory_limit_bytes: i64,
    pub rx_bytes: i64,
    pub tx_bytes: i64,
    pub rx_bytes_per_sec: f64,
    pub tx_bytes_per_sec: f64,
    pub disk_used_bytes: i64,
    pub disk_quota_bytes: i64,
    pub pids: i64,
}

async fn pod_of_team(client: &db::Client, team_id: Uuid, name: &str) -> Result<(Uuid, String), PodMetricsError> {
    let row = client
        .query_opt(
            "SELECT id, state FROM pods WHERE team_id = $1 AND name = $2",
            &[&team_id, &name],
        )
        .await
        .map_err(DbError::from)?
        .ok_or_else(|| PodMetricsError::NotFound(name.to_string()))?;
    Ok((row.get(0), row.get(1)))
}

/// The team's pod `name` and its newest sample (from the raw table: no agent is asked).
pub async fn current(pool: &Pool, team_id: Uuid, name: &str) -> Result<CurrentMetrics, PodMetricsError> {
    let client = db::connect(pool).await?;
    let (pod_id, state) = pod_of_team(&client, team_id, name).await?;
    let row = client
        .query_opt(
            "SELECT at, cpu_seconds_total, cpu_cores, cpu_limit_cores, memory_bytes, memory_limit_bytes,
                    rx_bytes, tx_bytes, rx_bytes_per_sec, tx_bytes_per_sec, disk_used_bytes,
                    disk_quota_bytes, pids
             FROM pod_metrics_raw WHERE pod_id = $1 ORDER BY at DESC LIMIT 1",
            &[&pod_id],
        )
        .await
        .map_err(DbError::from)?;
    let sample = row.map(|row| StoredSample {
        at: row.get(0),
        cpu_seconds_total: row.get(1),
        cpu_cores: f64::from(row.get::<_, f32>(2)),
        cpu_limit_cores: f64::from(row.get::<_, f32>(3)),
        memory_bytes: row.get(4),
        memory_limit_bytes: row.get(5),
        rx_bytes: row.get(6),
        tx_bytes: row.get(7),
        rx_bytes_per_sec: f64::from(row.get::<_, f32>(8)),
        tx_bytes_per_sec: f64::from(row.get::<_, f32>(9)),
        disk_used_bytes: row.get(10),
        disk_quota_bytes: row.get(11),
        pids: row.get(12),
    });
    Ok(CurrentMetrics { state, sample })
}

/// Where a history query reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Raw,
    Minute,
    Hour,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Raw => "raw",
            Resolution::Minute => "1m",
            Resolution::Hour => "1h",
        }
    }

    fn width_secs(self) -> i64 {
        match self {
            Resolution::Raw => 0,
            Resolution::Minute => 60,
            Resolution::Hour => 3_600,
        }
    }
}

/// A validated history query: `[start, end)` in Unix seconds, aligned to `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRange {
    pub start: i64,
    pub end: i64,
    pub step: i64,
    pub resolution: Resolution,
}

impl HistoryRange {
    pub fn points(&self) -> i64 {
        (self.end - self.start) / self.step
    }
}

/// Checks a range and step and picks the resolution: the finest that is kept back to `start`
/// and not coarser than `step`. `start` is rounded down and `end` up to multiples of `step`.
pub fn plan(start: i64, end: i64, step: i64, now: i64, retention: &Retention) -> Result<HistoryRange, String> {
    if step < 1 {
        return Err(format!("step must be at least 1 second, not {step}"));
    }
    if end <= start {
        return Err("end must be after start".to_string());
    }
    let start = start.div_euclid(step) * step;
    let end = (end + step - 1).div_euclid(step) * step;
    let points = (end - start) / step;
    if points > MAX_POINTS {
        return Err(format!(
            "the range holds {points} steps of {step} s; at most {MAX_POINTS} (use a larger step)"
        ));
    }
    let kept = |secs: i64| start >= now - secs;
    let resolution = if kept(retention.raw_secs) && step < 60 {
        Resolution::Raw
    } else if kept(retention.minute_secs) && step < 3_600 {
        Resolution::Minute
    } else {
        Resolution::Hour
    };
    if resolution != Resolution::Raw && step < resolution.width_secs() {
        return Err(format!(
            "samples older than {} are kept at {} resolution: use a step of at least {} s for this range",
            if resolution == Resolution::Minute {
                "2 hours"
            } else {
                "a day"
            },
            resolution.as_str(),
            resolution.width_secs()
        ));
    }
    if resolution == Resolution::Hour && step % 3_600 != 0 {
        return Err(format!(
            "samples older than a day are kept per hour: the step must be a whole number of hours, not {step} s"
        ));
    }
    if resolution == Resolution::Minute && step % 60 != 0 {
        return Err(format!(
            "samples older than 2 hours are kept per minute: the step must be a whole number of minutes, not {step} s"
        ));
    }
    Ok(HistoryRange {
        start,
        end,
        step,
        resolution,
    })
}

/// Aligned series: `timestamps[i]` is the start of bucket `i`; every series has one value per
/// bucket, `None` where the pod has no sample.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub timestamps: Vec<i64>,
    pub cpu_cores: Vec<Option<f64>>,
    pub cpu_cores_max: Vec<Option<f64>>,
    pub cpu_limit_cores: Vec<Option<f64>>,
    pub memory_bytes: Vec<Option<f64>>,
    pub memory_bytes_max: Vec<Option<i64>>,
    pub memory_limit_bytes: Vec<Option<i64>>,
    pub rx_bytes_per_second: Vec<Option<f64>>,
    pub tx_bytes_per_second: Vec<Option<f64>>,
    pub disk_used_bytes: Vec<Option<i64>>,
    pub disk_quota_bytes: Vec<Option<i64>>,
    pub pids: Vec<Option<i64>>,
    pub samples: Vec<i64>,
}

/// The team's pod `name` over `range`.
pub async fn history(pool: &Pool, team_id: Uuid, name: &str, range: HistoryRange) -> Result<History, PodMetricsError> {
    let client = db::connect(pool).await?;
    let (pod_id, _) = pod_of_team(&client, team_id, name).await?;
    let (start, end, step) = (range.start as f64, range.end as f64, range.step as f64);
    let rows = match range.resolution {
        Resolution::Raw => {
            client
                .query(
                    "SELECT floor((extract(epoch FROM at)::float8 - $2::float8) / $4::float8)::bigint, count(*)::bigint,
                            sum(cpu_cores)::float8, max(cpu_cores)::float8, max(cpu_limit_cores)::float8,
                            sum(memory_bytes)::float8, max(memory_bytes), max(memory_limit_bytes),
                            sum(rx_bytes_per_sec)::float8, sum(tx_bytes_per_sec)::float8,
                            max(disk_used_bytes), max(disk_quota_bytes), max(pids)
                     FROM pod_metrics_raw
                     WHERE pod_id = $1 AND at >= to_timestamp($2::float8) AND at < to_timestamp($3::float8)
                     GROUP BY 1 ORDER BY 1",
                    &[&pod_id, &start, &end, &step],
                )
                .await
        }
        Resolution::Minute | Resolution::Hour => {
            client
                .query(
                    "SELECT floor((extract(epoch FROM bucket)::float8 - $2::float8) / $4::float8)::bigint, sum(samples)::bigint,
                            sum(cpu_cores_sum), max(cpu_cores_max)::float8, max(cpu_limit_cores)::float8,
                            sum(memory_bytes_sum), max(memory_bytes_max), max(memory_limit_bytes),
                            sum(rx_bytes_per_sec_sum), sum(tx_bytes_per_sec_sum),
                            max(disk_used_bytes_max), max(disk_quota_bytes), max(pids_max)
                     FROM pod_metrics_rollup
                     WHERE pod_id = $1 AND resolution_secs = $5
                       AND bucket >= to_timestamp($2::float8) AND bucket < to_timestamp($3::float8)
                     GROUP BY 1 ORDER BY 1",
                    &[
                        &pod_id,
                        &start,
                        &end,
                        &step,
                        &(range.resolution.width_secs() as i32),
                    ],
                )
                .await
        }
    }
    .map_err(DbError::from)?;
    let points = usize::try_from(range.points()).unwrap_or(0);
    let mut history = History {
        timestamps: (0..points as i64).map(|i| range.start + i * range.step).collect(),
        cpu_cores: vec![None; points],
        cpu_cores_max: vec![None; points],
        cpu_limit_cores: vec![None; points],
        memory_bytes: vec![None; points],
        memory_bytes_max: vec![None; points],
        memory_limit_bytes: vec![None; points],
        rx_bytes_per_second: vec![None; points],
        tx_bytes_per_second: vec![None; points],
        disk_used_bytes: vec![None; points],
        disk_quota_bytes: vec![None; points],
        pids: vec![None; points],
        samples: vec![0; points],
    };
    for row in rows {
        let Ok(i) = usize::try_from(row.get::<_, i64>(0)) else {
            continue;
        };
        if i >= points {
            continue;
        }
        let n: i64 = row.get(1);
        if n == 0 {
            continue;
        }
        let avg = |sum: f64| sum / n as f64;
        history.samples[i] = n;
        history.cpu_cores[i] = Some(avg(row.get(2)));
        history.cpu_cores_max[i] = row.get(3);
        history.cpu_limit_cores[i] = row.get(4);
        history.memory_bytes[i] = Some(avg(row.get(5)));
        history.memory_bytes_max[i] = row.get(6);
        history.memory_limit_bytes[i] = row.get(7);
        history.rx_bytes_per_second[i] = Some(avg(row.get(8)));
        history.tx_bytes_per_second[i] = Some(avg(row.get(9)));
        history.disk_used_bytes[i] = row.get(10);
        history.disk_quota_bytes[i] = row.get(11);
        history.pids[i] = row.get(12);
    }
    Ok(history)
}

/// Deletes samples and buckets past their retention; returns the rows deleted.
pub async fn sweep(pool: &Pool, retention: &Retention) -> Result<u64, DbError> {
    let client = db::connect(pool).await?;
    let mut deleted = 0;
    loop {
        let n = client
            .execute(
                "DELETE FROM pod_metrics_raw WHERE ctid IN (
                     SELECT ctid FROM pod_metrics_raw WHERE at < now() - make_interval(secs => $1) LIMIT $2)",
                &[&(retention.raw_secs as f64), &DELETE_BATCH],
            )
            .await?;
        deleted += n;
        if n < DELETE_BATCH as u64 {
            break;
        }
    }
    for (resolution, keep) in [(60i32, retention.minute_secs), (3_600, retention.hour_secs)] {
        loop {
            let n = client
                .execute(
                    "DELETE FROM pod_metrics_rollup WHERE ctid IN (
                         SELECT ctid FROM pod_metrics_rollup
                         WHERE resolution_secs = $1 AND bucket < now() - make_interval(secs => $2) LIMIT $3)",
                    &[&resolution, &(keep as f64), &DELETE_BATCH],
                )
                .await?;
            deleted += n;
            if n < DELETE_BATCH as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}

/// The retention worker: a sweep every `retention.interval` until shutdown.
pub async fn run_retention(pool: Pool, retention: Retention, mut shutdown: watch::Receiver<bool>) {
    tracing::info!(worker = "metrics_retention", "worker started");
    loop {
        match sweep(&pool, &retention).await {
            Ok(deleted) if deleted > 0 => {
                tracing::debug!(worker = "metrics_retention", deleted, "old pod metrics deleted")
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(worker = "metrics_retention", error = %err, "sweep failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retention.interval) => {}
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(worker = "metrics_retention", "worker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn plans_pick_the_finest_kept_resolution_and_align_to_the_step() {
        let retention = Retention::default();
        let hour_ago = plan(NOW - 3_600 + 7, NOW + 3, 10, NOW, &retention).expect("raw");
        assert_eq!(hour_ago.resolution, Resolution::Raw);
        assert_eq!(hour_ago.start % 10, 0);
        assert_eq!(hour_ago.end % 10, 0);
        assert!(hour_ago.start <= NOW - 3_600 + 7 && hour_ago.end >= NOW + 3);
        assert_eq!(hour_ago.points(), (hour_ago.end - hour_ago.start) / 10);
        let day = plan(NOW - 86_400, NOW, 300, NOW, &retention).expect("minutes");
        assert_eq!((day.resolution, day.points()), (Resolution::Minute, 288));
        let month = plan(NOW - 30 * 86_400, NOW, 3_600, NOW, &retention).expect("hours");
        assert_eq!(month.resolution, Resolution::Hour);
        assert!((720..=721).contains(&month.points()), "{}", month.points());
        // A one-minute step over the last hour reads minute buckets, not raw samples.
        assert_eq!(
            plan(NOW - 3_600, NOW, 60, NOW, &retention).expect("1m").resolution,
            Resolution::Minute
        );
    }

    #[test]
    fn impossible_plans_say_why() {
        let retention = Retention::default();
        for (start, end, step, needle) in [
            (NOW, NOW - 1, 60, "after start"),
            (NOW - 60, NOW, 0, "at least 1 second"),
            (NOW - 86_400, NOW, 1, "at most 5000"),
            (NOW - 5 * 3_600, NOW, 10, "at least 60 s"),
            (NOW - 5 * 86_400, NOW, 600, "at least 3600 s"),
            (NOW - 5 * 86_400, NOW, 5_400, "whole number of hours"),
            (NOW - 5 * 3_600, NOW, 90, "whole number of minutes"),
        ] {
            let err = plan(start, end, step, NOW, &retention).expect_err(needle);
            assert!(err.contains(needle), "{err:?} should say {needle:?}");
        }
    }
}
