//! Operational endpoints: liveness, readiness, Prometheus metrics, and the error body written
//! for requests no handler answered (unknown paths, wrong methods, extractor failures).

use salvo::http::StatusCode;
use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::Serialize;

use crate::db;
use crate::error::ApiError;
use crate::http::state::app;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ok`, or why Postgres is not reachable.
    pub postgres: String,
    /// `ok`, or why Redis is not reachable.
    pub redis: String,
}

/// Liveness: the process is up
#[endpoint(tags("platform"))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: Postgres and Redis are reachable
#[endpoint(tags("platform"), status_codes(200, 503))]
pub async fn readyz(depot: &mut Depot, res: &mut Response) -> Json<Readiness> {
    let state = app(depot);
    let postgres = async {
        let client = db::connect(&state.db).await.map_err(|err| err.to_string())?;
        client.simple_query("SELECT 1").await.map_err(|err| err.to_string())?;
        Ok::<_, String>(())
    };
    let (postgres, redis) = tokio::join!(postgres, state.rate_limiter.ping());
    if postgres.is_err() || redis.is_err() {
        res.status_code(StatusCode::SERVICE_UNAVAILABLE);
    }
    Json(Readiness {
        postgres: postgres.err().unwrap_or_else(|| "ok".to_string()),
        redis: redis.err().unwrap_or_else(|| "ok".to_string()),
    })
}

/// Prometheus metrics in text format
#[handler]
pub async fn metrics(depot: &mut Depot, res: &mut Response) {
    let state = app(depot);
    crate::observability::refresh_db_pool(&state.db);
    let body = state.metrics.render();
    res.headers_mut().insert(
        "content-type",
        salvo::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res.render(body);
}

/// The catcher's goal: any error response that is not already our JSON becomes
/// `{"error": {...}}` with a code for its status.
#[handler]
pub async fn json_errors(res: &mut Response) {
    let status = res.status_code.unwrap_or(StatusCode::NOT_FOUND);
    let is_json = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json && !res.body_mut().is_none() {
        return;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed on this endpoint"),
        StatusCode::BAD_REQUEST => (
            "bad_request",
            "the request could not be understood (check path parameters)",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "unsupported content type"),
        status if status.is_server_error() => ("internal", "internal server error"),
        _ => ("error", "request failed"),
    };
    let mut error = ApiError::new(status, code, message);
    if status == StatusCode::BAD_REQUEST {
        // Malformed ids in a path name nothing that exists.
        error = ApiError::not_found("no such object (malformed id)");
    }
    res.body(salvo::http::ResBody::None);
    error.write_to(res);
}
