//! Reading a pod's log for the control plane: the last lines, lines since a time, and
//! following new lines, across the rotated files, as one JSON object per line.
//!
//! *Design.* A pod's output is in `<id>.log.<keep>` … `<id>.log.1`, `<id>.log` (oldest first),
//! in the record format of `log_driver.rs`; lines without that format (written before the
//! agent recorded timestamps) come out with no timestamp or stream and never match `since`.
//! A tail reads the files forward once, keeping only the positions of the last `tail` matching
//! lines (a ring of `tail` × 24 bytes, never the lines themselves), then reads those lines
//! again by position: memory is bounded by `tail` whatever the size of the log, at the cost of
//! reading up to `(keep + 1) × log_max_bytes` per request. Following polls the open live file
//! every [`POLL`]: new complete lines are sent; when the file shrank (a copy-truncate rotation)
//! the lines between the last position and the rotation are read from `<id>.log.1` (the copy
//! has the same offsets) before starting again at 0. It ends when the pod is being deleted on
//! this node (its record says so, or its log is gone) or the client goes away.
//!
//! *Limitations.* Two rotations within one poll lose the lines of the first for a follower
//! (rotation runs every 5 s). Each follower holds one blocking thread while it polls.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use instapod_common::logs::{self, LogLine};
use instapod_common::peer_token::Scope;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::pods::Pods;
use crate::transfer::{PeerBody, plain};

/// How often a follower looks for new lines.
pub const POLL: Duration = Duration::from_millis(200);
/// Bytes gathered before a chunk is sent.
const CHUNK: usize = 64 * 1024;

/// What to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogQuery {
    /// The last this many lines (after `since`).
    pub tail: u32,
    /// Only lines recorded at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Keep sending new lines.
    pub follow: bool,
}

/// One record, parsed.
pub fn parse(raw: &[u8]) -> LogLine {
    let text = String::from_utf8_lossy(raw);
    let mut parts = text.splitn(4, ' ');
    if let (Some(ts), Some(stream @ ("stdout" | "stderr")), Some(tag @ ("F" | "P"))) =
        (parts.next(), parts.next(), parts.next())
        && OffsetDateTime::parse(ts, &Rfc3339).is_ok()
    {
        return LogLine {
            timestamp: Some(ts.to_string()),
            stream: Some(stream.to_string()),
            line: parts.next().unwrap_or_default().to_string(),
            partial: tag == "P",
        };
    }
    LogLine {
        timestamp: None,
        stream: None,
        line: text.into_owned(),
        partial: false,
    }
}

/// When a record was written (`None` for lines without a timestamp).
fn timestamp(raw: &[u8]) -> Option<OffsetDateTime> {
    let end = raw.iter().position(|b| *b == b' ')?;
    let ts = std::str::from_utf8(&raw[..end]).ok()?;
    OffsetDateTime::parse(ts, &Rfc3339).ok()
}

fn matches(raw: &[u8], since: Option<OffsetDateTime>) -> bool {
    match since {
        None => true,
        Some(since) => timestamp(raw).is_some_and(|t| t >= since),
    }
}

fn numbered(log: &Path, n: u32) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Sends JSON lines in chunks; `false` once the receiver is gone.
struct Sender {
    tx: mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
}

impl Sender {
    fn line(&mut self, raw: &[u8]) -> bool {
        // Serialising a struct of strings cannot fail.
        if serde_json::to_writer(&mut self.buffer, &parse(raw)).is_ok() {
            self.buffer.push(b'\n');
        }
        self.buffer.len() < CHUNK || self.flush()
    }

    fn flush(&mut self) -> bool {
        if self.buffer.is_empty() {
            return !self.tx.is_closed();
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buffer));
        self.tx.blocking_send(chunk).is_ok()
    }
}

/// Counts a follower in `instapod_node_agent_log_followers` while it lives.
struct Follower;

impl Follower {
    fn start() -> Follower {
        metrics::gauge!("instapod_node_agent_log_followers").increment(1.0);
        Follower
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        metrics::gauge!("instapod_node_agent_log_followers").decrement(1.0);
    }
}

/// Reads complete lines of `file` from `start`, calling `each(offset, line)`; returns the offset
/// after the last complete line (a line still being written is left for later).
fn scan(file: &File, start: u64, mut each: impl FnMut(u64, &[u8]) -> bool) -> std::io::Result<u64> {
    let mut handle = file;
    handle.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::with_capacity(CHUNK, handle);
    let mut offset = start;
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 || line.last() != Some(&b'\n') {
            return Ok(offset);
        }
        line.pop();
        if !each(offset, &line) {
            return Ok(offset + read as u64);
        }
        offset += read as u64;
    }
}

/// Streams `query` over the log files of `log` (keeping `keep` rotated files) into `tx`, as
/// JSON lines. `present` says whether the pod is still on this node (follow ends when not).
/// Blocking: run on a blocking thread.
pub fn stream(log: &Path, keep: u32, query: LogQuery, present: impl Fn() -> bool, tx: mpsc::Sender<Bytes>) {
    let mut out = Sender { tx, buffer: Vec::new() };
    // Open every file first: a rotation while we read renames paths, not open files.
    let mut files: Vec<File> = (1..=keep)
        .rev()
        .filter_map(|n| File::open(numbered(log, n)).ok())
        .collect();
    let live = File::open(log).ok();
    let live_index = live.as_ref().map(|_| files.len());
    files.extend(live.iter().filter_map(|f| f.try_clone().ok()));

    // Pass 1: where the last `tail` matching lines are.
    let tail = query.tail as usize;
    let mut last: VecDeque<(usize, u64, usize)> = VecDeque::with_capacity(tail.min(1024));
    let mut live_end = 0;
    for (index, file) in files.iter().enumerate() {
        let end = scan(file, 0, |offset, line| {
            if tail > 0 && matches(line, query.since) {
                if last.len() == tail {
                    last.pop_front();
                }
                last.push_back((index, offset, line.len()));
            }
            true
        });
        if Some(index) == live_index {
            live_end = end.unwrap_or(0);
        }
    }
    // Pass 2: those lines, by position.
    let mut line = Vec::new();
    for (index, offset, len) in last {
        line.resize(len, 0);
        if files[index].read_exact_at(&mut line, offset).is_ok() && !out.line(&line) {
            return;
        }
    }
    if !out.flush() || !query.follow {
        return;
    }

    // Follow the live file.
    let _counted = Follower::start();
    let mut live = live;
    let mut position = live_end;
    loop {
        std::thread::sleep(POLL);
        if !present() || out.tx.is_closed() {
            return;
        }
        let Some(file) = live.as_ref() else {
            // The driver had not created the file yet.
            live = File::open(log).ok();
            position = 0;
            continue;
        };
        if !log.exists() {
            return;
        }
        let Ok(len) = file.metadata().map(|m| m.len()) else {
            return;
        };
        if len < position {
            // Rotated: the copy in `.1` holds what came after `position`.
            if let Ok(copy) = File::open(numbered(log, 1)) {
                let mut alive = true;
                let _ = scan(&copy, position, |_, line| {
                    if matches(line, query.since) {
                        alive = out.line(line);
                    }
                    alive
                });
                if !alive {
                    return;
                }
            }
            position = 0;
        }
        let mut alive = true;
        position = scan(file, position, |_, line| {
            if matches(line, query.since) {
                alive = out.line(line);
            }
            alive
        })
        .unwrap_or(position);
        if !alive || !out.flush() {
            return;
        }
    }
}

/// Answers `GET /v1/logs/{pod_id}?tail=N[&since_ns=UNIX_NANOS][&follow=1]` on the peer
/// endpoint, authorised by a logs token the control plane signed for this node and pod
/// (`Authorization: Bearer ipl_…`, see `instapod_common::peer_token`). The body is JSON lines.
pub async fn answer(pods: &Pods, pod_id: Uuid, request: &Request<Incoming>) -> Response<PeerBody> {
    if request.method() != hyper::Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    if let Err(refused) = crate::transfer::authorise(pods, request, Scope::Logs, pod_id) {
        return *refused;
    }
    let Some(query) = parse_query(request.uri().query().unwrap_or_default()) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "expected tail=N, since_ns=UNIX_NANOS and follow=0|1",
        );
    };
    if !pods.hosts(pod_id) {
        return plain(StatusCode::NOT_FOUND, "no such pod on this node");
    }
    let log = pods.dirs().log(pod_id);
    let keep = pods.log_keep();
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let present = {
        let pods = pods.clone();
        move || pods.hosts(pod_id)
    };
    tokio::task::spawn_blocking(move || stream(&log, keep, query, present, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(Frame::data(chunk)), rx))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(body)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn parse_query(query: &str) -> Option<LogQuery> {
    let mut parsed = LogQuery {
        tail: logs::DEFAULT_TAIL,
        since: None,
        follow: false,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=')?;
        match key {
            "tail" => parsed.tail = value.parse().ok().filter(|n| *n <= logs::MAX_TAIL)?,
            "since_ns" => {
                let nanos = value.parse::<i128>().ok()?;
                parsed.since = Some(OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?);
            }
            "follow" => parsed.follow = value == "1",
            _ => return None,
        }
    }
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, timestamp: Option<&str>, stream: Option<&str>, line: &str, partial: bool) {
        let parsed = parse(raw.as_bytes());
        assert_eq!(
            parsed,
            LogLine {
                timestamp: timestamp.map(str::to_string),
                stream: stream.map(str::to_string),
                line: line.to_string(),
                partial,
            },
            "{raw:?}"
        );
    }

    #[test]
    fn records_parse_and_raw_lines_pass_through() {
        let ts = "2026-11-27T20:03:00.123456789Z";
        check(
            &format!("{ts} stdout F hello world"),
            Some(ts),
            Some("stdout"),
            "hello world",
            false,
        );
        check(&format!("{ts} stderr P "), Some(ts), Some("stderr"), "", true);
        check(
            &format!("{ts} stdin F x"),
            None,
            None,
            &format!("{ts} stdin F x"),
            false,
        );
        check("plain output", None, None, "plain output", false);
        check("not-a-time stdout F x", None, None, "not-a-time stdout F x", false);
    }

    fn collect(log: &Path, keep: u32, query: LogQuery) -> Vec<LogLine> {
        let (tx, mut rx) = mpsc::channel(64);
        stream(log, keep, query, || true, tx);
        let mut bytes = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            bytes.extend_from_slice(&chunk);
        }
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a JSON line"))
            .collect()
    }

    #[test]
    fn queries_parse_strictly() {
        let parsed = parse_query("tail=5&since_ns=1000000000&follow=1").expect("valid");
        assert_eq!(parsed.tail, 5);
        assert_eq!(parsed.since.map(|t| t.unix_timestamp()), Some(1));
        assert!(parsed.follow);
        assert_eq!(
            parse_query("").map(|q| (q.tail, q.follow)),
            Some((logs::DEFAULT_TAIL, false))
        );
        for bad in ["tail=10001", "tail=-1", "since_ns=x", "other=1", "tail"] {
            assert!(parse_query(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn tail_and_since_read_across_rotated_files() {
        let dir = std::env::temp_dir().join(format!("instapod-logread-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("p.log");
        let record = |i: u32| format!("2026-01-01T00:00:{:02}.000000000Z stdout F line {i}\n", i % 60);
        let lines = |range: std::ops::Range<u32>| range.map(record).collect::<String>();
        std::fs::write(numbered(&log, 2), lines(0..10)).expect(".2");
        std::fs::write(numbered(&log, 1), lines(10..20)).expect(".1");
        std::fs::write(&log, lines(20..25) + "2026-01-01T00:00:25.0Z stdout F unfinished").expect("log");
        let all = LogQuery {
            tail: 100,
            since: None,
            follow: false,
        };
        let got = collect(&log, 2, all);
        assert_eq!(got.len(), 25, "the unfinished line waits");
        assert_eq!(got[0].line, "line 0");
        assert_eq!(got[24].line, "line 24");
        let got = collect(&log, 2, LogQuery { tail: 12, ..all });
        let texts: Vec<&str> = got.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, (13..25).map(|i| format!("line {i}")).collect::<Vec<_>>());
        let since = OffsetDateTime::parse("2026-01-01T00:00:18Z", &Rfc3339).expect("time");
        let got = collect(
            &log,
            2,
            LogQuery {
                since: Some(since),
                ..all
            },
        );
        assert_eq!(got.first().map(|l| l.line.as_str()), Some("line 18"));
        assert_eq!(got.len(), 7);
        assert!(collect(&log, 1, all).len() == 15, "only `keep` rotated files are read");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
