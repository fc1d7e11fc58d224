//! HTTP metrics, recorded by a service-wide hoop:
//! `instapod_control_plane_http_requests_total{method, route, status}` and
//! `instapod_control_plane_http_request_duration_seconds{method, route, status}`, where `route` is
//! the matched route template (`/api/teams/{id}`, never a raw path; `unmatched` for 404s of
//! unknown paths) and `status` the class (`2xx` … `5xx`), so label values stay bounded.

use std::time::Instant;

use salvo::prelude::*;

pub const HTTP_REQUESTS_TOTAL: &str = "instapod_control_plane_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "instapod_control_plane_http_request_duration_seconds";

/// Histogram buckets for request latency, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn method_label(method: &salvo::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

#[handler]
pub async fn record(req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
    let started = Instant::now();
    ctrl.call_next(req, depot, res).await;
    let status = res.status_code.map_or(200, |code| code.as_u16());
    let matched = req.matched_path();
    let route = if matched.is_empty() {
        "unmatched".to_string()
    } else {
        format!("/{}", matched.trim_start_matches('/'))
    };
    let labels = [
        ("method", method_label(req.method()).to_string()),
        ("route", route),
        ("status", status_class(status).to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, &labels).record(started.elapsed().as_secs_f64());
}
