//! `GET /api/pods/{name}/logs`: a pod's output, read from the node that hosts it.
//!
//! Query parameters:
//! - `tail`: the last N lines, 0 to 10,000 (default 100). With `follow`, the lines sent before
//!   the new ones.
//! - `since`: an RFC 3339 time; only lines recorded at or after it.
//! - `follow`: `true` or `false` (default). When true the response is chunked JSON lines
//!   (`application/x-ndjson`, one object per line) that stays open and carries new lines until
//!   the client leaves or the pod is deleted; otherwise it is one JSON object `{"lines": [...]}`.
//!
//! Each line is `{"timestamp", "stream", "line"}` (plus `"partial": true` for a piece of a line
//! longer than 16 KiB), oldest first; `timestamp` and `stream` are null for lines written
//! before the node recorded them. A pod that was never placed has no lines. Both forms are
//! streamed from the node as they arrive, never held whole.

use bytes::Bytes;
use futures_util::StreamExt;
use instapod_common::logs::{DEFAULT_TAIL, MAX_TAIL};
use salvo::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use salvo::oapi::ToSchema;
use salvo::oapi::extract::{PathParam, QueryParam};
use salvo::prelude::*;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::ApiError;
use crate::http::auth::caller;
use crate::http::state::app;
use crate::pods::logs::{LogsQuery, OpenedLogs, open};

/// A pod's log lines (without `follow`).
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLines {
    pub lines: Vec<LogLineView>,
}

/// One line of output (the agent's `instapod_common::logs::LogLine`, passed through).
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLineView {
    /// When the node recorded the line (RFC 3339, UTC, nanoseconds); null where not recorded.
    pub timestamp: Option<String>,
    /// `stdout` or `stderr`; null where not recorded.
    pub stream: Option<String>,
    /// The text without its newline.
    pub line: String,
    /// Present and true when the line continues in the next one (lines over 16 KiB).
    pub partial: Option<bool>,
}

fn parse_query(tail: Option<&str>, since: Option<&str>, follow: Option<&str>) -> Result<LogsQuery, ApiError> {
    let tail = match tail {
        None => DEFAULT_TAIL,
        Some(tail) => tail
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_TAIL)
            .ok_or_else(|| ApiError::validation(format!("tail must be 0 to {MAX_TAIL}, not {tail:?}")))?,
    };
    let since = since
        .map(|since| {
            OffsetDateTime::parse(since, &Rfc3339)
                .map_err(|_| ApiError::validation(format!("since must be an RFC 3339 time, not {since:?}")))
        })
        .transpose()?;
    let follow = match follow {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError::validation(format!(
                "follow must be true or false, not {other:?}"
            )));
        }
    };
    Ok(LogsQuery { tail, since, follow })
}

/// Turns the agent's JSON lines into `{"lines":[...]}`, chunk by chunk (a chunk may end inside
/// a line: the rest waits for the next one).
#[derive(Debug)]
struct ToArray {
    carry: Vec<u8>,
    first: bool,
}

impl ToArray {
    fn chunk(&mut self, chunk: &[u8]) -> Bytes {
        self.carry.extend_from_slice(chunk);
        let Some(end) = self.carry.iter().rposition(|b| *b == b'\n') else {
            return Bytes::new();
        };
        let mut out = Vec::with_capacity(end + 1);
        for line in self.carry[..end].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if !std::mem::take(&mut self.first) {
                out.push(b',');
            }
            out.extend_from_slice(line);
        }
        self.carry.drain(..=end);
        Bytes::from(out)
    }
}

/// Get a pod's logs: the last `tail` lines, `since` a time, or `follow` new lines
#[endpoint(tags("pods"), responses((status_code = 200, description = "The lines (`follow`: JSON lines, one object per line)", body = LogLines)))]
pub async fn logs(
    name: PathParam<String>,
    tail: QueryParam<String, false>,
    since: QueryParam<String, false>,
    follow: QueryParam<String, false>,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let query = parse_query(tail.as_deref(), since.as_deref(), follow.as_deref())?;
    let name = name.into_inner();
    let opened = open(&state.db, &state.node_http, me.team_id, &name, query).await?;
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let upstream = match opened {
        OpenedLogs::Stream(response) => Some(response.bytes_stream()),
        OpenedLogs::NotPlaced => None,
    };
    let upstream = futures_util::stream::iter(upstream).flatten();
    if query.follow {
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        res.stream(upstream);
    } else {
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut array = ToArray {
            carry: Vec::new(),
            first: true,
        };
        let body = futures_util::stream::once(async { Ok(Bytes::from_static(b"{\"lines\":[")) })
            .chain(upstream.map(move |chunk| chunk.map(|chunk| array.chunk(&chunk))))
            .chain(futures_util::stream::once(async { Ok(Bytes::from_static(b"]}")) }));
        res.stream(body);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_one_array_whatever_the_chunks() {
        let mut array = ToArray {
            carry: Vec::new(),
            first: true,
        };
        let mut out = Vec::new();
        for chunk in [&b"{\"a\":1}\n{\"a\""[..], b":2}", b"\n", b"{\"a\":3}\n"] {
            out.extend_from_slice(&array.chunk(chunk));
        }
        assert_eq!(out, b"{\"a\":1},{\"a\":2},{\"a\":3}");
    }

    #[test]
    fn parameters_are_checked() {
        let ok = parse_query(None, None, None).expect("defaults");
        assert_eq!((ok.tail, ok.since, ok.follow), (DEFAULT_TAIL, None, false));
        let ok = parse_query(Some("0"), Some("2026-01-01T00:00:00Z"), Some("true")).expect("valid");
        assert!(ok.follow && ok.tail == 0 && ok.since.is_some());
        for (tail, since, follow) in [
            (Some("-1"), None, None),
            (Some("10001"), None, None),
            (Some("ten"), None, None),
            (None, Some("yesterday"), None),
            (None, None, Some("yes")),
        ] {
            let err = parse_query(tail, since, follow).expect_err("invalid");
            assert_eq!((err.status.as_u16(), err.code), (400, "validation_failed"));
        }
    }
}
