//! Starting the real `instapod-control-plane` binary against the harness's Postgres and Redis.
//!
//! *Design.* The binary is looked up next to the test executable (tests live in
//! `target/<profile>/deps/`, binaries in `target/<profile>/`), or taken from
//! `INSTAPOD_CONTROL_PLANE_BIN`. `cargo test` does not build another package's binaries, so a
//! missing one, or one older than the sources of `control-plane/`, `common/` or `migrations/`,
//! is a panic telling to run `cargo build --workspace` first. Each control plane gets
//! a fresh database (unless told to use an existing one), its own Redis logical database, a free
//! port, and a log file that is printed when start-up fails or a test panics while it runs.
//! Every inherited `INSTAPOD_*` variable is removed before the harness sets its own.
//!
//! Without an SMTP URL the mail worker is kept idle (`INSTAPOD_MAIL__POLL_INTERVAL_MS` of a
//! day): it would otherwise "deliver" each mail to the log and clear its body, and the outbox
//! rows are where tests read verification and reset codes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::client::Client;
use crate::postgres::PostgresServer;
use crate::process::{self, StopSignal};
use crate::redis::RedisServer;

/// How long a control plane may take to answer `/healthz` and `/readyz`.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// What a control plane is started with; [`Default`] is the common case.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Trust `X-Forwarded-For` from 127.0.0.1 (`INSTAPOD_TRUSTED_PROXIES=["127.0.0.1"]`).
    /// On by default so that every test client has its own rate-limit buckets.
    pub trusted_proxies: bool,
    /// `INSTAPOD_MAIL__SMTP_URL`, when mail should be delivered over SMTP.
    pub smtp_url: Option<String>,
    /// Use this existing database instead of creating a fresh one.
    pub database: Option<String>,
    /// Postgres port of a dedicated [`PostgresServer`]; `None` uses the shared cluster.
    pub postgres_port: Option<u16>,
    /// Redis URL of a dedicated [`RedisServer`]; `None` uses a fresh logical database of the
    /// shared server.
    pub redis_url: Option<String>,
    /// Further environment variables for the control plane.
    pub env: Vec<(String, String)>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            trusted_proxies: true,
            smtp_url: None,
            database: None,
            postgres_port: None,
            redis_url: None,
            env: Vec::new(),
        }
    }
}

impl ControlPlaneOptions {
    /// Do not trust any proxy: `X-Forwarded-For` must be ignored.
    pub fn without_trusted_proxies(mut self) -> Self {
        self.trusted_proxies = false;
        self
    }

    /// Deliver mail to this SMTP URL.
    pub fn smtp_url(mut self, url: &str) -> Self {
        self.smtp_url = Some(url.to_string());
        self
    }

    /// Use an existing database (of the shared cluster unless [`Self::postgres`] is given).
    pub fn database(mut self, name: &str) -> Self {
        self.database = Some(name.to_string());
        self
    }

    /// Use a dedicated Postgres server.
    pub fn postgres(mut self, server: &PostgresServer) -> Self {
        self.postgres_port = Some(server.port());
        self
    }

    /// Use a dedicated Redis server.
    pub fn redis(mut self, server: &RedisServer) -> Self {
        self.redis_url = Some(server.next_url());
        self
    }

    /// Use this Redis URL (e.g. one shared by two control planes acting as replicas).
    pub fn redis_url(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_string());
        self
    }

    /// One more environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A running control plane. Dropping it kills the process.
#[derive(Debug)]
pub struct ControlPlane {
    base_url: String,
    database: String,
    database_url: String,
    log_path: PathBuf,
    child: Option<Child>,
}

/// The control-plane binary next to the test executable.
fn control_plane_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("INSTAPOD_CONTROL_PLANE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/instapod-control-plane
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps");
    let binary = profile_dir.join("instapod-control-plane");
    if !process::is_executable(&binary) {
        panic!(
            "{} does not exist: run `cargo build --workspace` first (cargo test does not build \
             other packages' binaries)",
            binary.display()
        );
    }
    assert_not_stale(&binary);
    binary
}

/// The newest modification time of the files under `path` (recursively) that cargo rebuilds
/// the binary for: Rust sources, manifests, SQL migrations and the web pages embedded with
/// `include_str!` (`.html`, `.css`, `.js`). Other files (a README) would not trigger a
/// rebuild, so they must not make the binary look stale.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        let name = path.file_name()?.to_string_lossy();
        let counts = [".rs", ".sql", ".html", ".css", ".js"]
            .iter()
            .any(|ext| name.ends_with(ext))
            || name == "Cargo.toml";
        return if counts { meta.modified().ok() } else { None };
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|entry| newest_mtime(&entry.path()))
        .max()
}

/// Panics when a source the binary is built from is newer than the binary: tests would
/// otherwise pass or fail against old code without saying so.
fn assert_not_stale(binary: &Path) {
    let Ok(built) = std::fs::metadata(binary).and_then(|meta| meta.modified()) else {
        return;
    };
    let Some(root) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() else {
        return;
    };
    for source in ["control-plane", "common", "migrations"] {
        let dir = root.join(source);
        let Some(newest) = newest_mtime(&dir) else {
            continue;
        };
        if newest > built {
            panic!(
                "{} is older than the sources in {}: run `cargo build --workspace` first",
                binary.display(),
                dir.display()
            );
        }
    }
}

/// A spawned but not yet ready control plane.
struct Spawned {
    base_url: String,
    database: String,
    database_url: String,
    log_path: PathBuf,
    child: Child,
}

async fn spawn(options: &ControlPlaneOptions) -> Spawned {
    let binary = control_plane_binary();
    let database = match &options.database {
        Some(name) => name.clone(),
        None => match options.postgres_port {
            Some(port) => {
                let name = format!("cp_{}", crate::ids::random_suffix());
                let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                crate::postgres::connect_url(&url)
                    .await
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap_or_else(|err| panic!("CREATE DATABASE {name} failed: {err}"));
                name
            }
            None => crate::postgres::shared().create_database().await,
        },
    };
    let postgres_port = options
        .postgres_port
        .unwrap_or_else(|| crate::postgres::shared().port());
    let database_url = format!("postgres://postgres@127.0.0.1:{postgres_port}/{database}");
    let redis_url = options
        .redis_url
        .clone()
        .unwrap_or_else(|| crate::redis::shared().next_url());
    let port = process::free_port();
    let base_url = format!("http://127.0.0.1:{port}");
    let dir = process::temp_dir("control-plane");
    let log_path = dir.join("control-plane.log");
    let (stdout, stderr) = process::log_file_stdio(&log_path);

    let mut command = Command::new(&binary);
    process::clear_instapod_env(&mut command);
    command
        .env("INSTAPOD_LISTEN", format!("127.0.0.1:{port}"))
        .env("INSTAPOD_PUBLIC_URL", &base_url)
        .env("INSTAPOD_DATABASE_URL", &database_url)
        .env("INSTAPOD_REDIS_URL", &redis_url)
        .env("INSTAPOD_LOG_FORMAT", "text")
        // Custom domains need a key to seal certificate keys at rest: a fresh one per process.
        .env("INSTAPOD_DOMAINS__KEY_ENCRYPTION_KEY", domains_key())
        .env("RUST_BACKTRACE", "1")
        // The log goes to a file that is printed on failure: no colour escapes.
        .env("NO_COLOR", "1");
    if options.trusted_proxies {
        command.env("INSTAPOD_TRUSTED_PROXIES", r#"["127.0.0.1"]"#);
    }
    match &options.smtp_url {
        Some(url) => {
            command.env("INSTAPOD_MAIL__SMTP_URL", url);
        }
        None => {
            // Without SMTP the delivery worker logs each mail and then clears its body, taking
            // the code with it. The outbox is the tests' mailbox, so the worker is kept idle:
            // it runs once at start-up and then only after a day.
            command.env("INSTAPOD_MAIL__POLL_INTERVAL_MS", "86400000");
        }
    }
    for (key, value) in &options.env {
        command.env(key, value);
    }
    let child = command
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
    process::register_child(&child, StopSignal::Kill);
    Spawned {
        base_url,
        database,
        database_url,
        log_path,
        child,
    }
}

/// A random `[domains] key_encryption_key` (base64 of 32 bytes).
fn domains_key() -> String {
    use base64::Engine as _;
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl ControlPlane {
    /// Starts a control plane and waits until `/healthz` and `/readyz` answer 200. Panics with
    /// the process log when it exits or does not become ready in time.
    pub async fn start(options: ControlPlaneOptions) -> ControlPlane {
        let spawned = spawn(&options).await;
        let mut control_plane = ControlPlane {
            base_url: spawned.base_url,
            database: spawned.database,
            database_url: spawned.database_url,
            log_path: spawned.log_path,
            child: Some(spawned.child),
        };
        control_plane.wait_ready().await;
        control_plane
    }

    /// Starts a control plane with the default options.
    pub async fn start_default() -> ControlPlane {
        ControlPlane::start(ControlPlaneOptions::default()).await
    }

    /// Starts a control plane that is expected to refuse to start; returns its exit status
    /// and log. Panics if it is still running after the start timeout.
    pub async fn start_expecting_exit(options: ControlPlaneOptions) -> (ExitStatus, String) {
        let mut spawned = spawn(&options).await;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawned.child.try_wait() {
                Ok(Some(status)) => {
                    process::unregister_child(spawned.child.id());
                    let log = std::fs::read_to_string(&spawned.log_path).unwrap_or_default();
                    return (status, log);
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => {
                    process::kill_and_reap(&mut spawned.child);
                    panic!(
                        "the control plane was expected to exit but is still running; log:\n{}",
                        process::log_tail(&spawned.log_path, 80)
                    );
                }
            }
        }
    }

    async fn wait_ready(&mut self) {
        let http = crate::http_builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a reqwest client without TLS always builds");
        let deadline = Instant::now() + START_TIMEOUT;
        for path in ["/healthz", "/readyz"] {
            let url = format!("{}{path}", self.base_url);
            loop {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    process::unregister_child(child.id());
                    self.child = None;
                    panic!(
                        "the control plane exited during start-up ({status}); log:\n{}",
                        self.log_tail(80)
                    );
                }
                let last = match http.get(&url).send().await {
                    Ok(response) if response.status().as_u16() == 200 => break,
                    Ok(response) => {
                        let status = response.status();
                        let body = response.text().await.unwrap_or_default();
                        format!("{status}: {body}")
                    }
                    Err(err) => err.to_string(),
                };
                if Instant::now() > deadline {
                    panic!(
                        "the control plane did not answer 200 on {path} within {START_TIMEOUT:?} \
                         (last: {last}); log:\n{}",
                        self.log_tail(80)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The control plane's process id (for memory measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The base URL, e.g. `http://127.0.0.1:40123` (also its public URL and origin).
    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// The name of its database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A new API client (no token, no cookies, random client IP).
    pub fn client(&self) -> Client {
        Client::new(&self.base_url)
    }

    /// A new API client with a cookie jar.
    pub fn cookie_client(&self) -> Client {
        Client::with_cookie_jar(&self.base_url)
    }

    /// Its database URL (for other processes sharing the database, like the scheduler).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// A new connection to its database, for direct reads and writes in tests.
    pub async fn db(&self) -> tokio_postgres::Client {
        crate::postgres::connect_url(&self.database_url).await
    }

    /// The last `max_lines` lines of its log.
    pub fn log_tail(&self, max_lines: usize) -> String {
        process::log_tail(&self.log_path, max_lines)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill_and_reap(&mut child);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- control plane {} log (last 60 lines) ----\n{}\n---- end of log ----",
                self.base_url,
                self.log_tail(60)
            );
        }
    }
}
