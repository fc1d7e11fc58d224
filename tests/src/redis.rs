//! A private Redis server on a free loopback port, without persistence.
//!
//! The shared server is started with many logical databases so that every control plane can
//! get its own database index ([`RedisServer::next_url`]): job queues and counters of one test
//! never meet another's. Rate-limit isolation between tests additionally comes from random
//! client IPs. Tests that stop Redis start their own [`RedisServer`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::process::{self, ServiceProcess};

/// How many logical databases each server has.
const DATABASES: u32 = 1024;

/// A running Redis server. Dropping it stops the server.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    next_database: AtomicU32,
    process: ServiceProcess,
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
            let mut command = Command::new(&binary);
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--databases", &DATABASES.to_string()])
                .arg("--dir")
                .arg(&dir)
                .current_dir(&dir);
            match process::start_service(
                "redis-server",
                &mut command,
                dir.join(format!("redis-{port}.log")),
                Duration::from_secs(30),
                || ping(port),
            ) {
                Ok(process) => {
                    return RedisServer {
                        port,
                        next_database: AtomicU32::new(0),
                        process,
                    };
                }
                Err(problem) => last_error = problem,
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
        self.process.log_tail()
    }

    /// Stops the server immediately (SIGKILL); later connections are refused.
    pub fn stop(&self) {
        self.process.stop();
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
