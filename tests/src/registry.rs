//! A private OCI registry on a free loopback port: Debian's `docker-registry` (the CNCF
//! distribution registry) with filesystem storage in the test binary's temporary directory,
//! plain HTTP and no authentication.
//!
//! Images reach it with [`crate::images::OciImage::push`]; containerd pulls from it as
//! `127.0.0.1:<port>/<name>:<tag>` over plain HTTP.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{self, ServiceProcess, StopSignal};

/// Where Debian installs the registry.
const DEBIAN_BINARY: &str = "/usr/bin/docker-registry";

/// A running registry. Dropping it stops the server.
#[derive(Debug)]
pub struct Registry {
    port: u16,
    process: ServiceProcess,
}

/// The registry shared by every test of this binary, started on first use.
pub fn shared() -> &'static Registry {
    static SHARED: OnceLock<Registry> = OnceLock::new();
    SHARED.get_or_init(Registry::start)
}

fn registry_binary() -> PathBuf {
    let debian = Path::new(DEBIAN_BINARY);
    if process::is_executable(debian) {
        return debian.to_path_buf();
    }
    process::find_in_path("docker-registry").unwrap_or_else(|| {
        panic!("`docker-registry` not found ({DEBIAN_BINARY} or PATH); install it (Debian: `apt-get install docker-registry`)")
    })
}

/// The registry's config: filesystem storage under `storage`, plain HTTP on 127.0.0.1:`port`.
fn config_yaml(storage: &Path, port: u16) -> String {
    // serde_json's string escaping is valid YAML (YAML is a superset of JSON's scalars).
    let storage = serde_json::to_string(&storage.to_string_lossy()).expect("a string serializes");
    format!(
        "# A private registry started by the Instapod test harness.\n\
         version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: \"127.0.0.1:{port}\"\n"
    )
}

impl Registry {
    /// Starts a new registry and waits until `GET /v2/` answers 200. Panics with its log
    /// otherwise.
    pub fn start() -> Registry {
        let binary = registry_binary();
        let dir = process::temp_dir("registry");
        let storage = dir.join("storage");
        fs::create_dir_all(&storage).unwrap_or_else(|err| panic!("cannot create {}: {err}", storage.display()));
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = process::free_port();
            let config = dir.join(format!("config-{port}.yml"));
            fs::write(&config, config_yaml(&storage, port))
                .unwrap_or_else(|err| panic!("cannot write {}: {err}", config.display()));
            let log_path = dir.join(format!("registry-{port}.log"));
            let (stdout, stderr) = process::log_file_stdio(&log_path);
            let mut command = Command::new(&binary);
            command
                .arg("serve")
                .arg(&config)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            // The registry reads overrides from REGISTRY_* variables; the config file is the truth.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("REGISTRY_") {
                    command.env_remove(key);
                }
            }
            let mut child = command
                .spawn()
                .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
            process::register_child(&child, StopSignal::Kill);
            match process::wait_ready("docker-registry", &mut child, Duration::from_secs(30), || {
                api_answers(port)
            }) {
                Ok(()) => {
                    return Registry {
                        port,
                        process: ServiceProcess::new(child, log_path),
                    };
                }
                Err(problem) => {
                    process::kill_and_reap(&mut child);
                    last_error = format!("{problem}\n{}", process::log_tail(&log_path, 50));
                }
            }
        }
        panic!("the registry did not start: {last_error}");
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, the host part of image references (`<host>/<name>:<tag>`).
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port>`, the base of the distribution API (`/v2/...`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Stops the server immediately (SIGKILL).
    pub fn stop(&self) {
        self.process.stop();
    }
}

/// Whether `GET /v2/` answers 200 (the API version check of the distribution spec).
fn api_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).is_ok() && status.starts_with(b"HTTP/1.") && &status[9..12] == b"200"
}
