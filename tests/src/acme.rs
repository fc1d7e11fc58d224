//! A private ACME CA and DNS server for tests: Pebble (Let's Encrypt's test CA) and
//! pebble-challtestsrv (its programmable DNS server), both from Debian's `pebble` package.
//!
//! *Design.* [`ChallTestSrv::start`] runs the DNS server on 127.0.0.1 with free ports (DNS and
//! its management API), answering A queries with 127.0.0.1 by default and AAAA with nothing
//! (`-defaultIPv6 ""`: otherwise `::1`, where nothing listens); [`ChallTestSrv::set_txt`] and
//! friends change its records. [`Pebble::start`] makes Pebble's own HTTPS certificate (a CA
//! and a `localhost`/`127.0.0.1` leaf, with the openssl CLI) in a fresh state directory,
//! writes its configuration (HTTP-01 validated on `http_port`, the agent's ingress port;
//! certificates valid for `validity_secs`) and resolves names through the challtestsrv;
//! [`Pebble::issuing_root_pem`] is the root its certificates chain to (fetched from its
//! management API), for the clients that must trust them. `PEBBLE_VA_NOSLEEP=1` (validation at
//! once) and `PEBBLE_WFE_NONCEREJECT=0` (no random bad-nonce errors).
//!
//! *Invariants.* Everything listens on 127.0.0.1 only; processes are stopped on drop and by the
//! harness's watchdog. A missing binary panics with what to install: tests never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{self, ServiceProcess};

/// Where the binaries are (`apt-get install pebble`).
fn binary(name: &str) -> PathBuf {
    process::find_in_path(name).unwrap_or_else(|| {
        panic!("`{name}` not found in PATH; install it (Debian: `apt-get install pebble`, or scripts/install-deps)")
    })
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// pebble-challtestsrv: DNS on 127.0.0.1, records set through its management API.
#[derive(Debug)]
pub struct ChallTestSrv {
    dns_port: u16,
    management_port: u16,
    http: reqwest::Client,
    process: ServiceProcess,
}

impl ChallTestSrv {
    /// Starts it and waits until its management API accepts connections.
    pub fn start() -> ChallTestSrv {
        let binary = binary("pebble-challtestsrv");
        let dir = process::temp_dir("challtestsrv");
        let mut last_error = String::new();
        for _ in 0..3 {
            let dns_port = process::free_port();
            let management_port = process::free_port();
            let mut command = Command::new(&binary);
            command
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-management", &format!("127.0.0.1:{management_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .current_dir(&dir);
            match process::start_service(
                "pebble-challtestsrv",
                &mut command,
                dir.join(format!("challtestsrv-{dns_port}.log")),
                Duration::from_secs(20),
                || port_open(management_port),
            ) {
                Ok(process) => {
                    return ChallTestSrv {
                        dns_port,
                        management_port,
                        http: crate::http_builder()
                            .timeout(Duration::from_secs(10))
                            .build()
                            .expect("an HTTP client"),
                        process,
                    };
                }
                Err(problem) => last_error = problem,
            }
        }
        panic!("pebble-challtestsrv did not start: {last_error}");
    }

    /// The DNS server's address (UDP and TCP), for resolvers and Pebble.
    pub fn dns_addr(&self) -> String {
        format!("127.0.0.1:{}", self.dns_port)
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    async fn call(&self, path: &str, body: serde_json::Value) {
        let url = format!("http://127.0.0.1:{}/{path}", self.management_port);
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|err| panic!("challtestsrv {path}: {err}"));
        assert!(
            response.status().is_success(),
            "challtestsrv {path} {body}: {}",
            response.status()
        );
    }

    /// Sets the TXT record of `name` (one value).
    pub async fn set_txt(&self, name: &str, value: &str) {
        self.call("set-txt", serde_json::json!({"host": fqdn(name), "value": value}))
            .await;
    }

    pub async fn clear_txt(&self, name: &str) {
        self.call("clear-txt", serde_json::json!({"host": fqdn(name)})).await;
    }

    /// Sets the CNAME of `name`.
    pub async fn set_cname(&self, name: &str, target: &str) {
        self.call(
            "set-cname",
            serde_json::json!({"host": fqdn(name), "target": fqdn(target)}),
        )
        .await;
    }

    pub async fn clear_cname(&self, name: &str) {
        self.call("clear-cname", serde_json::json!({"host": fqdn(name)})).await;
    }

    /// Adds A records to `name` (instead of the default 127.0.0.1).
    pub async fn add_a(&self, name: &str, addresses: &[&str]) {
        self.call("add-a", serde_json::json!({"host": fqdn(name), "addresses": addresses}))
            .await;
    }

    pub async fn clear_a(&self, name: &str) {
        self.call("clear-a", serde_json::json!({"host": fqdn(name)})).await;
    }
}

fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// Pebble, a test ACME CA.
#[derive(Debug)]
pub struct Pebble {
    port: u16,
    management_port: u16,
    /// The CA of Pebble's own HTTPS certificate (not of the certificates it issues).
    tls_ca_file: PathBuf,
    http: reqwest::Client,
    process: ServiceProcess,
}

/// Runs the openssl CLI; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|err| panic!("cannot run openssl (apt-get install openssl): {err}"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A self-signed P-256 certificate for `hostname`, valid for `days`, made with the openssl
/// CLI: (certificate PEM, PKCS#8 key PEM). For serving a custom domain without a CA.
pub fn self_signed(hostname: &str, days: u32) -> (String, String) {
    let dir = process::temp_dir("self-signed");
    let days = days.to_string();
    let subject = format!("/CN={hostname}");
    let names = format!("subjectAltName=DNS:{hostname}");
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            &days,
            "-subj",
            &subject,
            "-addext",
            &names,
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ],
    );
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).expect("openssl's output");
    let pair = (read("cert.pem"), read("key.pem"));
    let _ = std::fs::remove_dir_all(&dir);
    pair
}

/// A CA and a `localhost`/`127.0.0.1` certificate signed by it, in `dir`: `ca.pem`,
/// `cert.pem`, `key.pem`.
fn make_tls_files(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "7",
            "-subj",
            "/CN=instapod test pebble CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write the extensions file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "7",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ],
    );
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on 127.0.0.1:`http_port`, resolving names with `dns`,
    /// issuing certificates valid for `validity_secs`.
    pub fn start(http_port: u16, dns: &ChallTestSrv, validity_secs: u64) -> Pebble {
        let binary = binary("pebble");
        let dir = process::temp_dir("pebble");
        make_tls_files(&dir);
        let tls_ca_file = dir.join("ca.pem");
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = process::free_port();
            let management_port = process::free_port();
            let config = serde_json::json!({
                "pebble": {
                    "listenAddress": format!("127.0.0.1:{port}"),
                    "managementListenAddress": format!("127.0.0.1:{management_port}"),
                    "certificate": dir.join("cert.pem"),
                    "privateKey": dir.join("key.pem"),
                    "httpPort": http_port,
                    "tlsPort": process::free_port(),
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": false,
                    "certificateValidityPeriod": validity_secs,
                }
            });
            let config_path = dir.join(format!("pebble-{port}.json"));
            std::fs::write(&config_path, config.to_string()).expect("write the Pebble configuration");
            let mut command = Command::new(&binary);
            command
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &dns.dns_addr()])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .current_dir(&dir);
            match process::start_service(
                "pebble",
                &mut command,
                dir.join(format!("pebble-{port}.log")),
                Duration::from_secs(30),
                || port_open(port) && port_open(management_port),
            ) {
                Ok(process) => {
                    let root =
                        reqwest::Certificate::from_pem(&std::fs::read(&tls_ca_file).expect("read the Pebble TLS CA"))
                            .expect("a PEM certificate");
                    let http = crate::http_builder()
                        .add_root_certificate(root)
                        .timeout(Duration::from_secs(10))
                        .build()
                        .expect("an HTTP client");
                    return Pebble {
                        port,
                        management_port,
                        tls_ca_file,
                        http,
                        process,
                    };
                }
                Err(problem) => last_error = problem,
            }
        }
        panic!("pebble did not start: {last_error}");
    }

    /// The ACME directory URL.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The CA file for Pebble's HTTPS (the agent's `acme.ca_file`).
    pub fn tls_ca_file(&self) -> &Path {
        &self.tls_ca_file
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// The root (PEM) of the certificates Pebble issues; it makes a new one at every start.
    pub async fn issuing_root_pem(&self) -> String {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management_port);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {url}: {err}"));
        assert!(response.status().is_success(), "GET {url}: {}", response.status());
        response.text().await.expect("the root's PEM")
    }

    /// Whether Pebble's directory answers.
    pub async fn directory_answers(&self) -> bool {
        self.http
            .get(self.directory_url())
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}
