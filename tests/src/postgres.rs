//! A private Postgres cluster on a free loopback port, with trust authentication for the
//! `postgres` role, and fresh databases on it.
//!
//! *Design.* `initdb -A trust -U postgres` into a temporary directory, then `postgres` listening
//! on 127.0.0.1 only with its unix socket in that directory, durability switched off for speed.
//! Postgres refuses to run as root, so when the harness is root both commands run as the
//! `postgres` system user (uid/gid looked up in /etc/passwd) and the directory is handed to it.
//! Readiness is read from `postmaster.pid`, whose status line says `ready` once the server
//! accepts connections.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{self, StopSignal};

/// A running Postgres cluster. Dropping it stops the server.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    /// The temporary directory: socket, logs, and `data/`.
    dir: PathBuf,
    data_dir: PathBuf,
    log_path: Mutex<PathBuf>,
    child: Mutex<Option<Child>>,
}

/// The cluster shared by every test of this binary, started on first use.
pub fn shared() -> &'static PostgresServer {
    static SHARED: OnceLock<PostgresServer> = OnceLock::new();
    SHARED.get_or_init(PostgresServer::start)
}

/// The directory holding `initdb` and `postgres`: `PATH` first, then the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn postgres_bin_dir() -> PathBuf {
    if let (Some(initdb), Some(_)) = (process::find_in_path("initdb"), process::find_in_path("postgres")) {
        let initdb = fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = initdb.parent()
            && process::is_executable(&dir.join("postgres"))
        {
            return dir.to_path_buf();
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (process::is_executable(&bin.join("initdb")) && process::is_executable(&bin.join("postgres")))
                .then_some((version, bin))
        })
        .collect();
    candidates.sort();
    match candidates.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "Postgres server binaries not found: neither `initdb`/`postgres` in PATH nor \
             /usr/lib/postgresql/*/bin; install them (Debian: `apt-get install postgresql`)"
        ),
    }
}

/// The uid and gid of the `postgres` system user, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("/etc/passwd is readable");
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4 && fields[0] == "postgres" {
                Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
            } else {
                None
            }
        })
        .unwrap_or_else(|| {
            panic!(
                "running as root, Postgres must run as another user, but there is no `postgres` \
                 user in /etc/passwd (Debian's postgresql package creates it)"
            )
        })
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the effective uid; this avoids `libc::geteuid` (unsafe).
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map(|meta| meta.uid() == 0).unwrap_or(false)
}

/// Makes `command` run as the `postgres` user when the harness is root.
fn as_postgres_user(command: &mut Command, dir: &Path) {
    use std::os::unix::process::CommandExt;
    if running_as_root() {
        let (uid, gid) = postgres_user();
        command.uid(uid).gid(gid);
        command.env("HOME", dir).env("USER", "postgres");
    }
    command.current_dir(dir);
}

impl PostgresServer {
    /// Initialises and starts a new cluster, waiting until it accepts connections. Panics with
    /// the server log when that fails.
    pub fn start() -> PostgresServer {
        let bin = postgres_bin_dir();
        let dir = process::temp_dir("pg");
        if running_as_root() {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|err| panic!("cannot chown {} to postgres: {err}", dir.display()));
        }
        let data_dir = dir.join("data");
        let init_log = dir.join("initdb.log");
        let (stdout, stderr) = process::log_file_stdio(&init_log);
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
            .args(["--no-sync", "--locale=C"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        as_postgres_user(&mut initdb, &dir);
        let status = initdb
            .status()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", bin.join("initdb").display()));
        if !status.success() {
            panic!("initdb failed ({status}):\n{}", process::log_tail(&init_log, 50));
        }

        // A port taken in the meantime is the likeliest failure; try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = process::free_port();
            match spawn_server(&dir, &data_dir, port) {
                Ok((child, log_path)) => {
                    return PostgresServer {
                        port,
                        dir,
                        data_dir,
                        log_path: Mutex::new(log_path),
                        child: Mutex::new(Some(child)),
                    };
                }
                Err(problem) => last_error = problem,
            }
        }
        panic!("Postgres did not start: {last_error}");
    }

    /// Starts the server again on the same port and data directory after [`stop`](Self::stop)
    /// (an outage that ends). Retries while the killed server's backends are still exiting.
    pub fn restart(&self) {
        let mut last_error = String::new();
        for _ in 0..20 {
            match spawn_server(&self.dir, &self.data_dir, self.port) {
                Ok((child, log_path)) => {
                    *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                    *self.log_path.lock().unwrap_or_else(|p| p.into_inner()) = log_path;
                    return;
                }
                Err(problem) => {
                    last_error = problem;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        panic!("Postgres did not restart on port {}: {last_error}", self.port);
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the `postgres` role (trust authentication).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        process::log_tail(&self.log_path.lock().unwrap_or_else(|p| p.into_inner()), 50)
    }

    /// Creates a database with a random name `cp_<hex>` and returns the name.
    pub async fn create_database(&self) -> String {
        let name = format!("cp_{}", crate::ids::random_suffix());
        let client = self.connect("postgres").await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|err| panic!("CREATE DATABASE {name} failed: {err}"));
        name
    }

    /// A new connection to `database`, driven by a task on the current Tokio runtime.
    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        connect_url(&self.url(database)).await
    }

    /// Stops the server immediately (SIGKILL); later connections fail.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut child) = child.take() {
            process::kill_and_reap(&mut child);
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns `postgres` on `port` and waits until it accepts connections; the error carries the
/// log's tail.
fn spawn_server(dir: &Path, data_dir: &Path, port: u16) -> Result<(Child, PathBuf), String> {
    let bin = postgres_bin_dir();
    let log_path = dir.join(format!("postgres-{port}-{}.log", crate::ids::random_suffix()));
    let (stdout, stderr) = process::log_file_stdio(&log_path);
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(data_dir)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "max_connections=400"])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    as_postgres_user(&mut postgres, dir);
    let mut child = postgres
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", bin.join("postgres").display()));
    process::register_child(&child, StopSignal::Quit);
    match wait_ready(data_dir, &mut child, Duration::from_secs(60)) {
        Ok(()) => Ok((child, log_path)),
        Err(problem) => {
            process::kill_and_reap(&mut child);
            Err(format!("{problem}\n{}", process::log_tail(&log_path, 50)))
        }
    }
}

/// Connects to `url` and spawns the connection task on the current runtime.
pub async fn connect_url(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"));
    tokio::spawn(async move {
        // The connection ends with an error when the server stops; tests that stop it expect that.
        let _ = connection.await;
    });
    client
}

/// Waits until `postmaster.pid` reports `ready` (Postgres 10+ writes the status on its 8th
/// line once it accepts connections).
fn wait_ready(data_dir: &Path, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let pid_file = data_dir.join("postmaster.pid");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("postgres exited early ({status})"));
        }
        if let Ok(text) = fs::read_to_string(&pid_file)
            && text.lines().nth(7).map(str::trim) == Some("ready")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("postgres not ready after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
