//! `instapod-node-agent log-driver <file>`: the containerd *binary* log driver that writes a
//! pod's stdout and stderr to its log file, one timestamped record per line.
//!
//! *Design.* containerd's `file://` log URI makes the shim append raw bytes from both streams
//! to one file: no timestamps and no way to tell stdout from stderr. With a `binary://` URI the
//! shim instead starts this program (as its own child, so it outlives agent restarts) with the
//! pod's stdout pipe on fd 3, its stderr pipe on fd 4 and a "ready" pipe on fd 5, and waits for
//! one byte (or EOF) on the ready pipe before starting the task. The fds are reached through
//! `/proc/self/fd/N` (no `unsafe`). Each stream is read on its own thread; every line becomes
//! one record in the CRI log format,
//!
//! ```text
//! 2026-11-27T20:03:00.123456789Z stdout F the line
//! ```
//!
//! (`F` a full line, `P` a piece of a line longer than [`MAX_LINE_BYTES`]), written with one
//! `write` to the file opened `O_APPEND`, so the agent's copy-truncate rotation keeps working.
//! When the task ends the shim closes the pipes and sends SIGTERM; the driver drains what is
//! left and exits at EOF (the shim kills it after 12 s).
//!
//! *Cost.* One small process per running pod, and one timestamp and one `write` per line.
//! The timestamp is when the driver read the line, not when the program wrote it (they differ
//! only while the pipe is backed up).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use instapod_common::logs::MAX_LINE_BYTES;

/// The argument containerd passes (from the URI's one query key).
pub const SUBCOMMAND: &str = "log-driver";

/// The `binary://` URI that makes the shim start `driver` as the log driver for `log_file`, or
/// a plain `file://` URI (raw bytes, no timestamps or streams) without a driver.
pub fn log_uri(driver: Option<&Path>, log_file: &Path) -> String {
    match driver {
        Some(driver) => format!(
            "binary://{}?{SUBCOMMAND}={}",
            query_escape(&driver.display().to_string()),
            query_escape(&log_file.display().to_string())
        ),
        None => format!("file://{}", log_file.display()),
    }
}

fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Formats one record (with its newline).
pub fn record(timestamp: &str, stream: &str, partial: bool, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(timestamp.len() + stream.len() + content.len() + 5);
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(content);
    out.push(b'\n');
    out
}

fn now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    )
}

/// Copies one stream into records until EOF.
fn pump(input: impl Read, stream: &'static str, out: &Mutex<std::fs::File>) {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE_BYTES as u64).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let full = line.last() == Some(&b'\n');
        if full {
            line.pop();
        }
        let bytes = record(&now(), stream, !full, &line);
        let mut file = out.lock().unwrap_or_else(|p| p.into_inner());
        // A failed write (disk full) drops the line; the pod must not block on its logs.
        let _ = file.write_all(&bytes);
    }
}

/// Runs the driver; `args` are what follows the subcommand.
pub fn main(args: &[String]) -> ExitCode {
    let [path] = args else {
        eprintln!("usage: instapod-node-agent {SUBCOMMAND} FILE");
        return ExitCode::from(2);
    };
    match run(PathBuf::from(path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("instapod-node-agent {SUBCOMMAND}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let out = Arc::new(Mutex::new(file));
    let stdout = std::fs::File::open("/proc/self/fd/3")?;
    let stderr = std::fs::File::open("/proc/self/fd/4")?;
    // Tell the shim we are ready (it reads one byte).
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/fd/5")?
        .write_all(b"r")?;
    // SIGTERM (sent once the pipes are closed) must not cut the drain short: handling it at
    // all replaces the default action (exit).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _guard = runtime.enter();
    let _terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let threads = [(stdout, "stdout"), (stderr, "stderr")].map(|(input, stream)| {
        let out = out.clone();
        std::thread::spawn(move || pump(input, stream, &out))
    });
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_uris() {
        assert_eq!(record("T", "stderr", false, b"a b"), b"T stderr F a b\n");
        assert_eq!(record("T", "stdout", true, b""), b"T stdout P \n");
        assert_eq!(query_escape("/var/lib/a b&c.log"), "/var/lib/a%20b%26c.log");
        assert_eq!(
            log_uri(Some(Path::new("/usr/bin/agent")), Path::new("/s/logs/p.log")),
            "binary:///usr/bin/agent?log-driver=/s/logs/p.log"
        );
        assert_eq!(log_uri(None, Path::new("/s/p.log")), "file:///s/p.log");
        let stamp = now();
        assert_eq!(stamp.len(), 30, "{stamp}");
        assert!(time::OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339).is_ok());
    }
}
