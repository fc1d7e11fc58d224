//! The API's error type and its one mapping to HTTP: `{"error": {"code", "message"}}` with the
//! status codes of the spec. Domain errors convert into [`ApiError`] here, exhaustively.

use salvo::http::StatusCode;
use salvo::oapi::{self, Components, EndpointOutRegister, Operation, ToSchema};
use salvo::prelude::*;
use serde::Serialize;

use crate::db::DbError;

/// An error answered to an API client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (rate limits).
    pub retry_after: Option<u64>,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable snake_case `code` for programs and a `message` for people.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn validation(message: impl Into<String>) -> Self {
        Self::bad_request("validation_failed", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authentication required: send a bearer token or the session cookie",
        )
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error")
    }

    /// Writes this error into a response (also used by middleware and the catcher).
    pub fn write_to(&self, res: &mut Response) {
        res.status_code(self.status);
        if let Some(seconds) = self.retry_after
            && let Ok(value) = seconds.to_string().parse()
        {
            res.headers_mut().insert("retry-after", value);
        }
        res.render(Json(ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        }));
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

#[async_trait]
impl Writer for ApiError {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        self.write_to(res);
    }
}

impl EndpointOutRegister for ApiError {
    fn register(components: &mut Components, operation: &mut Operation) {
        let schema = ErrorBody::to_schema(components);
        for (status, description) in [
            ("400", "Bad request: invalid input"),
            ("401", "Unauthorized: missing or invalid token"),
            ("403", "Forbidden"),
            ("404", "Not found"),
            ("409", "Conflict"),
            ("413", "Body too large"),
            ("415", "Body is not JSON"),
            ("429", "Rate limited"),
            ("500", "Internal server error"),
            ("503", "A dependency is unavailable"),
        ] {
            operation.responses.insert(
                status,
                oapi::Response::new(description).add_content("application/json", oapi::Content::new(schema.clone())),
            );
        }
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        if err.is_unavailable() {
            tracing::warn!(error = %err, "database unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable, try again shortly",
            )
        } else {
            tracing::error!(error = %err, "database error");
            ApiError::internal()
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(err: tokio_postgres::Error) -> Self {
        DbError::from(err).into()
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        DbError::from(err).into()
    }
}

impl From<crate::ratelimit::RateLimitError> for ApiError {
    fn from(err: crate::ratelimit::RateLimitError) -> Self {
        use crate::ratelimit::RateLimitError;
        match err {
            RateLimitError::Limited { retry_after_secs } => ApiError {
                retry_after: Some(retry_after_secs),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many requests, retry in {retry_after_secs} s"),
                )
            },
            RateLimitError::Unavailable(reason) => {
                tracing::warn!(error = %reason, "rate limiter unavailable, refusing request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "rate_limiter_unavailable",
                    "the rate limiter is unavailable, try again shortly",
                )
            }
        }
    }
}

impl From<crate::accounts::password::PasswordError> for ApiError {
    fn from(err: crate::accounts::password::PasswordError) -> Self {
        tracing::error!(error = %err, "password hashing failed");
        ApiError::internal()
    }
}

impl From<crate::accounts::users::RegisterError> for ApiError {
    fn from(err: crate::accounts::users::RegisterError) -> Self {
        use crate::accounts::users::RegisterError;
        match err {
            RegisterError::EmailTaken(_) => ApiError::conflict("email_taken", err.to_string()),
            RegisterError::Password(err) => err.into(),
            RegisterError::Db(err) => err.into(),
        }
    }
}

impl From<crate::accounts::users::LoginError> for ApiError {
    fn from(err: crate::accounts::users::LoginError) -> Self {
        use crate::accounts::users::LoginError;
        match err {
            LoginError::InvalidCredentials => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "invalid email or password",
            ),
            LoginError::Password(err) => err.into(),
            LoginError::Db(err) => err.into(),
        }
    }
}

impl From<crate::accounts::users::CodeError> for ApiError {
    fn from(err: crate::accounts::users::CodeError) -> Self {
        use crate::accounts::users::CodeError;
        match err {
            CodeError::Invalid => ApiError::bad_request("invalid_token", err.to_string()),
            CodeError::Password(err) => err.into(),
            CodeError::Db(err) => err.into(),
        }
    }
}

impl From<crate::teams::TeamError> for ApiError {
    fn from(err: crate::teams::TeamError) -> Self {
        use crate::teams::TeamError;
        let message = err.to_string();
        match err {
            TeamError::NotFound(_) | TeamError::UserNotFound(_) | TeamError::MemberNotFound(_) => {
                ApiError::not_found(message)
            }
            TeamError::Forbidden(_) => ApiError::forbidden(message),
            TeamError::SlugTaken(_) => ApiError::conflict("slug_taken", message),
            TeamError::AlreadyMember(_) => ApiError::conflict("already_member", message),
            TeamError::LastOwner => ApiError::conflict("last_owner", message),
            TeamError::PersonalTeam => ApiError::conflict("personal_team", message),
            TeamError::HasResources(_) => ApiError::conflict("team_has_resources", message),
            TeamError::Db(err) => err.into(),
        }
    }
}

impl From<crate::nodes::tokens::JoinTokenError> for ApiError {
    fn from(err: crate::nodes::tokens::JoinTokenError) -> Self {
        use crate::nodes::tokens::JoinTokenError;
        let message = err.to_string();
        match err {
            JoinTokenError::Disabled => ApiError::new(StatusCode::FORBIDDEN, "node_join_disabled", message),
            JoinTokenError::Invalid => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_join_token", message),
        }
    }
}

impl From<crate::nodes::store::JoinError> for ApiError {
    fn from(err: crate::nodes::store::JoinError) -> Self {
        use crate::nodes::store::JoinError;
        match err {
            JoinError::NameTaken(_) => ApiError::conflict("node_name_taken", err.to_string()),
            JoinError::Db(err) => err.into(),
        }
    }
}

/// The one answer for every node-token failure, whether or not the node exists.
fn invalid_node_token() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_node_token",
        "missing or invalid node token for this node id; join again",
    )
}

impl From<crate::nodes::store::NodeAuthError> for ApiError {
    fn from(err: crate::nodes::store::NodeAuthError) -> Self {
        use crate::nodes::store::NodeAuthError;
        match err {
            NodeAuthError::InvalidToken => invalid_node_token(),
            NodeAuthError::Db(err) => err.into(),
        }
    }
}

impl From<crate::nodes::store::HeartbeatError> for ApiError {
    fn from(err: crate::nodes::store::HeartbeatError) -> Self {
        use crate::nodes::store::HeartbeatError;
        match err {
            HeartbeatError::TokenRevoked(_) => invalid_node_token(),
            HeartbeatError::Db(err) => err.into(),
        }
    }
}

impl From<crate::nodes::store::RecordReportsError> for ApiError {
    fn from(err: crate::nodes::store::RecordReportsError) -> Self {
        use crate::nodes::store::RecordReportsError;
        match err {
            RecordReportsError::TokenRevoked(_) => invalid_node_token(),
            RecordReportsError::Db(err) => err.into(),
        }
    }
}

impl From<crate::pods::metrics::PodMetricsError> for ApiError {
    fn from(err: crate::pods::metrics::PodMetricsError) -> Self {
        use crate::pods::metrics::PodMetricsError;
        match err {
            PodMetricsError::NotFound(name) => {
                ApiError::not_found(format!("no pod named {name:?} in your active team"))
            }
            PodMetricsError::InvalidRange(message) => ApiError::validation(message),
            PodMetricsError::Db(err) => err.into(),
        }
    }
}

impl From<crate::pods::logs::OpenLogsError> for ApiError {
    fn from(err: crate::pods::logs::OpenLogsError) -> Self {
        use crate::pods::logs::OpenLogsError;
        match err {
            OpenLogsError::NotFound(name) => ApiError::not_found(format!("no pod named {name:?} in your active team")),
            OpenLogsError::NoPeerAddress { .. } | OpenLogsError::Unreachable { .. } => {
                tracing::warn!(error = %err, "pod logs: node unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node_unavailable",
                    "the pod's node cannot be reached for its logs, try again shortly",
                )
            }
            OpenLogsError::Refused { .. } => {
                tracing::error!(error = %err, "pod logs: the node refused");
                ApiError::internal()
            }
            OpenLogsError::Db(err) => err.into(),
        }
    }
}

impl From<crate::pods::files::ForwardFilesError> for ApiError {
    fn from(err: crate::pods::files::ForwardFilesError) -> Self {
        use crate::pods::files::ForwardFilesError;
        match err {
            ForwardFilesError::NotFound(name) => {
                ApiError::not_found(format!("no pod named {name:?} in your active team"))
            }
            ForwardFilesError::NotPlaced(_) => ApiError::conflict("pod_not_placed", err.to_string()),
            ForwardFilesError::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the upload is larger than the limit of {limit} bytes"),
            ),
            ForwardFilesError::NoPeerAddress { .. } | ForwardFilesError::Unreachable { .. } => {
                tracing::warn!(error = %err, "pod files: node unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node_unavailable",
                    "the pod's node cannot be reached for its files, try again shortly",
                )
            }
            ForwardFilesError::Refused { .. } => {
                tracing::error!(error = %err, "pod files: the node refused");
                ApiError::internal()
            }
            ForwardFilesError::Db(err) => err.into(),
        }
    }
}
