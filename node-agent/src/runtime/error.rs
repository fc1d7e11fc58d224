//! The runtime's errors: what went wrong talking to containerd, in terms the agent can act on
//! (retry later, report to the user, or treat as a bug), instead of raw gRPC statuses.

use std::path::PathBuf;

use containerd_client::tonic::{Code, Status};

/// A failure of a containerd operation.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The namespace is not one containerd accepts (letters and digits, separated by single
    /// `.`, `_` or `-`, at most 76 characters).
    #[error("invalid containerd namespace {0:?}")]
    InvalidNamespace(String),
    /// The socket could not be opened (missing, permission denied, nobody listening).
    #[error("cannot connect to containerd at {}: {reason}", socket.display())]
    Connect { socket: PathBuf, reason: String },
    /// containerd did not answer (it went away, or is shutting down); worth retrying.
    #[error("containerd is unavailable during {operation}: {message}")]
    Unavailable { operation: &'static str, message: String },
    /// The object the operation names does not exist.
    #[error("containerd {operation}: not found: {message}")]
    NotFound { operation: &'static str, message: String },
    /// The object the operation creates exists already.
    #[error("containerd {operation}: already exists: {message}")]
    AlreadyExists { operation: &'static str, message: String },
    /// What containerd holds or sent is not what it should be (an unparsable manifest in the
    /// content store, a stream that ended early).
    #[error("{0}")]
    Invalid(String),
    /// Any other gRPC failure.
    #[error("containerd {operation} failed ({code:?}): {message}")]
    Rpc {
        operation: &'static str,
        code: Code,
        message: String,
    },
}

impl RuntimeError {
    /// Maps the gRPC status of a failed `operation` (such as `"Version"`).
    pub fn from_status(operation: &'static str, status: &Status) -> RuntimeError {
        if !matches!(status.code(), Code::NotFound | Code::AlreadyExists) {
            metrics::counter!("instapod_node_agent_containerd_errors_total", "operation" => operation).increment(1);
        }
        let message = status.message().to_string();
        match status.code() {
            Code::Unavailable => RuntimeError::Unavailable { operation, message },
            // A status made on our side from a transport failure (containerd died mid-call, the
            // socket went away) is `Unknown` with the cause as its source; statuses containerd
            // itself sends have no source.
            Code::Unknown if std::error::Error::source(status).is_some() => {
                let cause = std::error::Error::source(status)
                    .map(crate::error_chain)
                    .unwrap_or_default();
                let message = if cause.is_empty() || message.ends_with(&cause) {
                    message
                } else {
                    format!("{message}: {cause}")
                };
                RuntimeError::Unavailable { operation, message }
            }
            Code::NotFound => RuntimeError::NotFound { operation, message },
            Code::AlreadyExists => RuntimeError::AlreadyExists { operation, message },
            code => RuntimeError::Rpc {
                operation,
                code,
                message,
            },
        }
    }

    /// Whether trying the same operation again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, RuntimeError::Connect { .. } | RuntimeError::Unavailable { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        let unavailable = RuntimeError::from_status("Version", &Status::unavailable("connection reset"));
        assert!(matches!(
            unavailable,
            RuntimeError::Unavailable {
                operation: "Version",
                ..
            }
        ));
        assert!(unavailable.is_transient());

        let missing = RuntimeError::from_status("Containers.Get", &Status::not_found("container \"x\""));
        assert!(matches!(missing, RuntimeError::NotFound { .. }));
        assert!(!missing.is_transient());
        assert_eq!(
            missing.to_string(),
            "containerd Containers.Get: not found: container \"x\""
        );

        let exists = RuntimeError::from_status("Containers.Create", &Status::already_exists("x"));
        assert!(matches!(exists, RuntimeError::AlreadyExists { .. }));

        let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        let transport = RuntimeError::from_status("Version", &Status::from_error(Box::new(broken)));
        assert!(matches!(transport, RuntimeError::Unavailable { .. }), "{transport:?}");
        assert!(transport.to_string().contains("broken pipe"), "{transport}");

        let sent = RuntimeError::from_status("Version", &Status::unknown("containerd said so"));
        assert!(
            matches!(
                sent,
                RuntimeError::Rpc {
                    code: Code::Unknown,
                    ..
                }
            ),
            "{sent:?}"
        );

        let other = RuntimeError::from_status("Tasks.Start", &Status::failed_precondition("not created"));
        assert!(matches!(
            other,
            RuntimeError::Rpc {
                code: Code::FailedPrecondition,
                ..
            }
        ));
    }

    #[test]
    fn error_chain_includes_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory",
        ));
        assert_eq!(crate::error_chain(&error), "transport error: No such file or directory");
    }
}
