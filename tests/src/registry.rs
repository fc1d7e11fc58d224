//! A private OCI registry on a free loopback port: Debian's `docker-registry` (the CNCF
//! distribution registry) with filesystem storage in the test binary's temporary directory,
//! plain HTTP and no authentication.
//!
//! Images reach it with [`crate::images::OciImage::push`]; containerd pulls from it as
//! `127.0.0.1:<port>/<name>:<tag>` over plain HTTP.
//!
//! [`Registry::start_authenticated`] starts a second server over the same storage that demands
//! HTTP basic credentials (an htpasswd file with a bcrypt hash): what is pushed to the open one
//! can be pulled from it only with the right username and password.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{self, ServiceProcess};

/// Where Debian installs the registry.
const DEBIAN_BINARY: &str = "/usr/bin/docker-registry";

/// A running registry. Dropping it stops the server.
#[derive(Debug)]
pub struct Registry {
    port: u16,
    storage: PathBuf,
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

/// The registry's config: filesystem storage under `storage`, plain HTTP on 127.0.0.1:`port`,
/// and basic authentication against `htpasswd` when given.
fn config_yaml(storage: &Path, port: u16, htpasswd: Option<&Path>) -> String {
    // serde_json's string escaping is valid YAML (YAML is a superset of JSON's scalars).
    let storage = serde_json::to_string(&storage.to_string_lossy()).expect("a string serializes");
    let auth = htpasswd
        .map(|path| {
            let path = serde_json::to_string(&path.to_string_lossy()).expect("a string serializes");
            format!("auth:\n  htpasswd:\n    realm: instapod-test\n    path: {path}\n")
        })
        .unwrap_or_default();
    format!(
        "# A private registry started by the Instapod test harness.\n\
         version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: \"127.0.0.1:{port}\"\n{auth}"
    )
}

impl Registry {
    /// Starts a new registry and waits until `GET /v2/` answers 200. Panics with its log
    /// otherwise.
    pub fn start() -> Registry {
        let dir = process::temp_dir("registry");
        let storage = dir.join("storage");
        fs::create_dir_all(&storage).unwrap_or_else(|err| panic!("cannot create {}: {err}", storage.display()));
        Registry::start_on(&dir, &storage, None)
    }

    /// Starts a registry over the storage of `open` (so it serves the same images) that answers
    /// only requests with `username` and `password`.
    pub fn start_authenticated(open: &Registry, username: &str, password: &str) -> Registry {
        let dir = process::temp_dir("registry-auth");
        let hash = bcrypt::hash(password, 4).expect("bcrypt hash");
        let htpasswd = dir.join("htpasswd");
        fs::write(&htpasswd, format!("{username}:{hash}\n")).expect("write htpasswd");
        Registry::start_on(&dir, &open.storage, Some(&htpasswd))
    }

    fn start_on(dir: &Path, storage: &Path, htpasswd: Option<&Path>) -> Registry {
        let binary = registry_binary();
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = process::free_port();
            let config = dir.join(format!("config-{port}.yml"));
            fs::write(&config, config_yaml(storage, port, htpasswd))
                .unwrap_or_else(|err| panic!("cannot write {}: {err}", config.display()));
            let mut command = Command::new(&binary);
            command.arg("serve").arg(&config).current_dir(dir);
            // The registry reads overrides from REGISTRY_* variables; the config file is the truth.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("REGISTRY_") {
                    command.env_remove(key);
                }
            }
            match process::start_service(
                "docker-registry",
                &mut command,
                dir.join(format!("registry-{port}.log")),
                Duration::from_secs(30),
                || api_answers(port, if htpasswd.is_some() { b"401" } else { b"200" }),
            ) {
                Ok(process) => {
                    return Registry {
                        port,
                        storage: storage.to_path_buf(),
                        process,
                    };
                }
                Err(problem) => last_error = problem,
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

/// Whether `GET /v2/` answers with `expected` (the API version check of the distribution spec:
/// 200, or 401 when credentials are required).
fn api_answers(port: u16, expected: &[u8; 3]) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).is_ok() && status.starts_with(b"HTTP/1.") && &status[9..12] == expected
}
