//! `GET /api/pods/{name}/metrics` (the newest sample) and `GET /api/pods/{name}/metrics/history`
//! (aligned series over a range). Both read what the pod's node pushed (see `pods::metrics`);
//! no node is asked on the request path.
//!
//! History query parameters:
//! - `start`, `end`: RFC 3339 times; default the last hour (`end` = now).
//! - `step`: seconds (`60`) or a duration with a unit (`30s`, `5m`, `1h`, `1d`); default `60s`.
//!   At most 5,000 steps per range. Samples are kept raw for 2 hours (steps under a minute),
//!   per minute for a day (steps of whole minutes), per hour for 30 days (whole hours).
//!
//! The answer has `timestamps` (Unix seconds, the start of each step, aligned to multiples of
//! the step) and one array per series with a value or `null` per step.

use salvo::oapi::ToSchema;
use salvo::oapi::extract::{PathParam, QueryParam};
use salvo::prelude::*;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::ApiError;
use crate::http::auth::caller;
use crate::http::state::app;
use crate::pods::metrics::{self, Retention};

/// A sample older than this is reported as `stale`.
const STALE_AFTER_SECS: i64 = 60;

/// A pod's newest resource sample.
#[derive(Debug, Serialize, ToSchema)]
pub struct PodMetricsView {
    pub pod: String,
    /// The pod's state.
    pub state: String,
    /// When the node measured it (RFC 3339); null when the pod has never been measured.
    pub sampled_at: Option<String>,
    /// The sample is older than a minute, or the pod is not running: the numbers are the last
    /// ones seen, not the present.
    pub stale: bool,
    pub cpu: Option<CpuView>,
    pub memory: Option<MemoryView>,
    pub network: Option<NetworkView>,
    pub disk: Option<DiskView>,
    /// Processes and threads.
    pub pids: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CpuView {
    /// Cores in use (averaged since the previous sample).
    pub cores: f64,
    pub limit_cores: f64,
    pub percent_of_limit: f64,
    /// CPU time since the container started, in seconds.
    pub seconds_total: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemoryView {
    /// Working set: usage without inactive page cache.
    pub used_bytes: i64,
    pub limit_bytes: i64,
    pub percent_of_limit: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NetworkView {
    pub rx_bytes: i64,
    pub tx_bytes: i64,
    pub rx_bytes_per_second: f64,
    pub tx_bytes_per_second: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DiskView {
    pub used_bytes: i64,
    pub quota_bytes: i64,
    pub percent_of_quota: f64,
}

/// Aligned series of a pod's samples.
#[derive(Debug, Serialize, ToSchema)]
pub struct PodMetricsHistoryView {
    pub pod: String,
    /// The first step's start (RFC 3339).
    pub start: String,
    /// The end of the last step (RFC 3339).
    pub end: String,
    pub step_seconds: i64,
    /// What the values were computed from: `raw`, `1m` or `1h`.
    pub resolution: String,
    /// Unix seconds: the start of each step.
    pub timestamps: Vec<i64>,
    pub series: SeriesView,
}

/// One value per step, `null` where the pod has no sample.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesView {
    pub cpu_cores: Vec<Option<f64>>,
    pub cpu_cores_max: Vec<Option<f64>>,
    pub cpu_limit_cores: Vec<Option<f64>>,
    pub memory_bytes: Vec<Option<f64>>,
    pub memory_bytes_max: Vec<Option<i64>>,
    pub memory_limit_bytes: Vec<Option<i64>>,
    pub network_rx_bytes_per_second: Vec<Option<f64>>,
    pub network_tx_bytes_per_second: Vec<Option<f64>>,
    pub disk_used_bytes: Vec<Option<i64>>,
    pub disk_quota_bytes: Vec<Option<i64>>,
    pub pids: Vec<Option<i64>>,
    /// Samples behind each value.
    pub samples: Vec<i64>,
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole * 100.0 } else { 0.0 }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// Get a pod's current CPU, memory, network and disk usage
#[endpoint(tags("pods"), responses((status_code = 200, description = "The newest sample", body = PodMetricsView)))]
pub async fn current(name: PathParam<String>, depot: &mut Depot) -> Result<Json<PodMetricsView>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let name = name.into_inner();
    let found = metrics::current(&state.db, me.team_id, &name).await?;
    let now = OffsetDateTime::now_utc();
    let Some(s) = found.sample else {
        return Ok(Json(PodMetricsView {
            pod: name,
            state: found.state,
            sampled_at: None,
            stale: true,
            cpu: None,
            memory: None,
            network: None,
            disk: None,
            pids: None,
        }));
    };
    let stale = found.state != "running" || (now - s.at).whole_seconds() > STALE_AFTER_SECS;
    Ok(Json(PodMetricsView {
        pod: name,
        state: found.state,
        sampled_at: Some(rfc3339(s.at)),
        stale,
        cpu: Some(CpuView {
            cores: s.cpu_cores,
            limit_cores: s.cpu_limit_cores,
            percent_of_limit: percent(s.cpu_cores, s.cpu_limit_cores),
            seconds_total: s.cpu_seconds_total,
        }),
        memory: Some(MemoryView {
            used_bytes: s.memory_bytes,
            limit_bytes: s.memory_limit_bytes,
            percent_of_limit: percent(s.memory_bytes as f64, s.memory_limit_bytes as f64),
        }),
        network: Some(NetworkView {
            rx_bytes: s.rx_bytes,
            tx_bytes: s.tx_bytes,
            rx_bytes_per_second: s.rx_bytes_per_sec,
            tx_bytes_per_second: s.tx_bytes_per_sec,
        }),
        disk: Some(DiskView {
            used_bytes: s.disk_used_bytes,
            quota_bytes: s.disk_quota_bytes,
            percent_of_quota: percent(s.disk_used_bytes as f64, s.disk_quota_bytes as f64),
        }),
        pids: Some(s.pids),
    }))
}

/// Parses `60`, `60s`, `5m`, `1h` or `1d` into seconds.
fn parse_step(step: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::validation(format!(
            "step must be seconds or a duration like 30s, 5m, 1h, 1d; not {step:?}"
        ))
    };
    let (digits, unit) = match step.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => step.split_at(at),
        None => (step, "s"),
    };
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).filter(|s| *s > 0).ok_or_else(bad)
}

fn parse_time(what: &str, value: &str) -> Result<i64, ApiError> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp)
        .map_err(|_| ApiError::validation(format!("{what} must be an RFC 3339 time, not {value:?}")))
}

/// Get a pod's CPU, memory, network and disk usage over a time range
#[endpoint(tags("pods"), responses((status_code = 200, description = "Aligned series", body = PodMetricsHistoryView)))]
pub async fn history(
    name: PathParam<String>,
    start: QueryParam<String, false>,
    end: QueryParam<String, false>,
    step: QueryParam<String, false>,
    depot: &mut Depot,
) -> Result<Json<PodMetricsHistoryView>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let end = end.as_deref().map(|v| parse_time("end", v)).transpose()?.unwrap_or(now);
    let start = start
        .as_deref()
        .map(|v| parse_time("start", v))
        .transpose()?
        .unwrap_or(end - 3_600);
    let step = step.as_deref().map(parse_step).transpose()?.unwrap_or(60);
    let retention: Retention = state.config.metrics_retention();
    let range = metrics::plan(start, end, step, now, &retention).map_err(ApiError::validation)?;
    let name = name.into_inner();
    let aligned = metrics::history(&state.db, me.team_id, &name, range).await?;
    let at = |secs: i64| {
        OffsetDateTime::from_unix_timestamp(secs)
            .map(rfc3339)
            .unwrap_or_default()
    };
    Ok(Json(PodMetricsHistoryView {
        pod: name,
        start: at(range.start),
        end: at(range.end),
        step_seconds: range.step,
        resolution: range.resolution.as_str().to_string(),
        timestamps: aligned.timestamps,
        series: SeriesView {
            cpu_cores: aligned.cpu_cores,
            cpu_cores_max: aligned.cpu_cores_max,
            cpu_limit_cores: aligned.cpu_limit_cores,
            memory_bytes: aligned.memory_bytes,
            memory_bytes_max: aligned.memory_bytes_max,
            memory_limit_bytes: aligned.memory_limit_bytes,
            network_rx_bytes_per_second: aligned.rx_bytes_per_second,
            network_tx_bytes_per_second: aligned.tx_bytes_per_second,
            disk_used_bytes: aligned.disk_used_bytes,
            disk_quota_bytes: aligned.disk_quota_bytes,
            pids: aligned.pids,
            samples: aligned.samples,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_take_seconds_or_a_unit() {
        for (input, secs) in [("60", 60), ("30s", 30), ("5m", 300), ("1h", 3_600), ("2d", 172_800)] {
            assert_eq!(parse_step(input).expect(input), secs);
        }
        for bad in ["", "0", "-5", "5x", "m", "1.5h", "99999999999999999999d", "1 h"] {
            let err = parse_step(bad).expect_err(bad);
            assert_eq!((err.status.as_u16(), err.code), (400, "validation_failed"), "{bad}");
        }
    }
}
