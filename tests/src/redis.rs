//! A private Redis server on a free loopback port, without persistence.
//!
//! The shared server is started with many logical databases so that every control plane can
//! get its own database index ([`RedisServer::next_url`]): job queues and counters of one test
//! never meet another's. Rate-limit isolation between tests additionally comes from random
//! client IPs. Tests that stop Redis start their own [`RedisServer`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{self, StopSignal};

/// How many logical databases each server has.
const DATABASES: u32 = 1024;

/// A running Redis server. Dropping it stops the server.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    log_path: PathBuf,
    next_database: AtomicU32,
    child: Mutex<Option<Child>>,
}

/// The server shared by every test of this binary, started on first use.
pub fn shared() -> &'static RedisServer {
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    SHARED.get_or_init(RedisServer::start)
}

impl RedisServer {
    /// Starts a new server and waits until it answers `PING`. Panics with its log otherwise.
    pub fn start() -> RedisServer {
        let binary = process::find_in_path("redis-server").unwrap_or_else(|| {
            panic!("`redis-server` not found in PATH; install it (Debian: `apt-get install redis-server`)")
        });
        let dir = process::temp_dir("redis");
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = process::free_port();
            let log_path = dir.join(format!("redis-{port}.log"));
            let (stdout, stderr) = process::log_file_stdio(&log_path);
            let mut child = Command::new(&binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--databases", &DATABASES.to_string()])
                .arg("--dir")
                .arg(&dir)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
            process::register_child(&child, StopSignal::Kill);
            match wait_ready(port, &mut child, Duration::from_secs(30)) {
                Ok(()) => {
                    return RedisServer {
                        port,
                        log_path,
                        next_database: AtomicU32::new(0),
                        child: Mutex::new(Some(child)),
                    };
                }
                Err(problem) => {
                    process::kill_and_reap(&mut child);
                    last_error = format!("{problem}\n{}", process::log_tail(&log_path, 50));
                }
            }
        }
        panic!("Redis did not start: {last_error}");
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the next unused logical database (wrapping after [`DATABASES`]).
    pub fn next_url(&self) -> String {
        let database = self.next_database.fetch_add(1, Ordering::Relaxed) % DATABASES;
        format!("redis://127.0.0.1:{}/{database}", self.port)
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        process::log_tail(&self.log_path, 50)
    }

    /// Stops the server immediately (SIGKILL); later connections are refused.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut child) = child.take() {
            process::kill_and_reap(&mut child);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends an inline `PING` and expects `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

fn wait_ready(port: u16, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited early ({status})"));
        }
        if ping(port) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("redis-server not ready after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
