//! A real browser for end-to-end tests of the web pages: Debian's headless Chromium driven
//! through chromedriver (WebDriver) with `fantoccini`, plus [`StaticPage`], a tiny server for a
//! page on another origin.
//!
//! *Design.* One chromedriver per test binary ([`driver`]), started on first use on a free
//! port and stopped by the watchdog ([`crate::process`]) like Postgres and Redis. Each
//! [`Browser`] is its own WebDriver session, i.e. its own Chromium process with a fresh profile
//! directory, so cookies never leak between tests. That Chromium is a child of chromedriver,
//! not of the harness: its pid (the `goog:processID` capability) is registered with the
//! watchdog too, and killing it takes its helper processes along. chromedriver and Chromium get
//! `HOME` and the XDG directories inside the harness's temporary directory, so nothing (crash
//! database, dconf) lands in the real home directory. The WebDriver connection is plain HTTP on
//! loopback: no TLS stack is linked. A missing `/usr/bin/chromium` or `chromedriver` is a
//! panic that says how to install them; a test never skips.
//!
//! *Limitations.* [`Browser::close`] ends the session cleanly; a `Browser` dropped without it
//! (a failing test) kills its Chromium with `kill -KILL` after checking that the pid still
//! belongs to a Chromium process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Deref;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::process::{self, ServiceProcess, StopSignal};

/// The Chromium binary (Debian's `chromium` package).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long a page may take to reach the state a test waits for.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long chromedriver may take to answer `/status`.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How to install what the browser tests need.
const INSTALL_HINT: &str = "run `scripts/install-deps` (Debian: `apt-get install chromium chromium-driver`)";

/// The chromedriver shared by every [`Browser`] of this test binary.
#[derive(Debug)]
pub struct Driver {
    port: u16,
    /// Held for the life of the test binary; the watchdog stops the process at exit.
    process: ServiceProcess,
}

/// The chromedriver of this test binary, started on first use. Panics when Chromium or
/// chromedriver is not installed, or when chromedriver does not start.
pub fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(Driver::start)
}

impl Driver {
    fn start() -> Driver {
        if !process::is_executable(Path::new(CHROMIUM)) {
            panic!("{CHROMIUM} not found: the browser tests need Chromium; {INSTALL_HINT}");
        }
        let Some(binary) = process::find_in_path("chromedriver") else {
            panic!("`chromedriver` not found in PATH: the browser tests need it; {INSTALL_HINT}");
        };
        let dir = process::temp_dir("chromedriver");
        let home = dir.join("home");
        for sub in ["", ".config", ".cache", ".local/share"] {
            std::fs::create_dir_all(home.join(sub))
                .unwrap_or_else(|err| panic!("cannot create {}: {err}", home.display()));
        }
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = process::free_port();
            let mut command = Command::new(&binary);
            command
                .arg(format!("--port={port}"))
                .env("HOME", &home)
                .env("XDG_CONFIG_HOME", home.join(".config"))
                .env("XDG_CACHE_HOME", home.join(".cache"))
                .env("XDG_DATA_HOME", home.join(".local/share"))
                .current_dir(&dir);
            match process::start_service(
                "chromedriver",
                &mut command,
                dir.join(format!("chromedriver-{port}.log")),
                DRIVER_START_TIMEOUT,
                || driver_ready(port),
            ) {
                Ok(process) => return Driver { port, process },
                Err(problem) => last_error = problem,
            }
        }
        panic!("chromedriver did not start: {last_error}");
    }

    /// The WebDriver URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last lines of chromedriver's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// Whether chromedriver answers `GET /status` with `"ready": true`. It keeps the connection
/// open after answering, so the answer is read only until that appears.
fn driver_ready(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while answer.len() < 65536 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        let compact: String = String::from_utf8_lossy(&answer)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if compact.contains("\"ready\":true") {
            return true;
        }
    }
    false
}

/// One headless Chromium with a fresh profile, as a WebDriver session. Derefs to the
/// `fantoccini` [`Client`]; the helpers below panic with the current URL and page text when a
/// page does not get where a test expects.
#[derive(Debug)]
pub struct Browser {
    client: Client,
    chromium_pid: Option<u32>,
    closed: bool,
}

impl Deref for Browser {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Browser {
    /// Starts a new Chromium session (through the shared [`driver`]).
    pub async fn open() -> Browser {
        let driver = driver();
        let profile = process::temp_dir("chromium-profile");
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("json!({{...}}) is an object");
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url())
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start a Chromium session through chromedriver at {}: {err}\n\
                     chromedriver log:\n{}",
                    driver.url(),
                    driver.log_tail()
                )
            });
        let chromium_pid = client
            .capabilities()
            .and_then(|caps| caps.get("goog:processID"))
            .and_then(Value::as_u64)
            .and_then(|pid| u32::try_from(pid).ok());
        if let Some(pid) = chromium_pid {
            process::register_pid(pid, StopSignal::Kill);
        }
        Browser {
            client,
            chromium_pid,
            closed: false,
        }
    }

    /// Ends the session: chromedriver quits this Chromium.
    pub async fn close(mut self) {
        self.client
            .clone()
            .close()
            .await
            .unwrap_or_else(|err| panic!("closing the browser session failed: {err}"));
        self.closed = true;
        if let Some(pid) = self.chromium_pid {
            process::unregister_child(pid);
        }
    }

    /// Opens `url` and waits until it has loaded.
    pub async fn open_url(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|err| panic!("cannot open {url}: {err}"));
    }

    /// The URL the browser shows now.
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .unwrap_or_else(|err| panic!("cannot read the current URL: {err}"))
            .to_string()
    }

    /// The visible text of the page's `<body>`, for failure messages.
    pub async fn page_text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_else(|err| format!("({err})")),
            Err(err) => format!("(no body: {err})"),
        }
    }

    /// Waits until an element matching the CSS selector exists and returns it. Any error is
    /// retried until [`PAGE_TIMEOUT`]: not only "no such element" but also chromedriver's
    /// "aborted by navigation", which a lookup gets when the page navigates under it.
    pub async fn wait_for(&self, css: &str) -> Element {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let err = match self.client.find(Locator::Css(css)).await {
                Ok(element) => return element,
                Err(err) => err,
            };
            if Instant::now() > deadline {
                panic!(
                    "no element `{css}` after {PAGE_TIMEOUT:?} ({err}); at {}, page text:\n{}",
                    self.url().await,
                    self.page_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the browser shows `url` (compared as a string, fragment included).
    pub async fn wait_for_url(&self, url: &str) {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let now = self.url().await;
            if now == url {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the browser is at {now}, not {url}, after {PAGE_TIMEOUT:?}; page text:\n{}",
                    self.page_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element matching the CSS selector (waiting for it to exist).
    pub async fn text_of(&self, css: &str) -> String {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            // The element found can go stale if the page navigates before its text is read.
            match self.wait_for(css).await.text().await {
                Ok(text) => return text,
                Err(err) if Instant::now() > deadline => panic!("cannot read the text of `{css}`: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The current `value` property of an input.
    pub async fn value_of(&self, css: &str) -> String {
        self.wait_for(css)
            .await
            .prop("value")
            .await
            .unwrap_or_else(|err| panic!("cannot read the value of `{css}`: {err}"))
            .unwrap_or_default()
    }

    /// Types `text` into the input matching the CSS selector.
    pub async fn fill(&self, css: &str, text: &str) {
        self.wait_for(css)
            .await
            .send_keys(text)
            .await
            .unwrap_or_else(|err| panic!("cannot type into `{css}`: {err}"));
    }

    /// Clicks the element matching the CSS selector.
    pub async fn click(&self, css: &str) {
        self.wait_for(css)
            .await
            .click()
            .await
            .unwrap_or_else(|err| panic!("cannot click `{css}`: {err}"));
    }

    /// Runs `script` in the page (WebDriver "Execute Script"; use `return` for a value).
    pub async fn script(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|err| panic!("script failed: {err}\n{script}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let Some(pid) = self.chromium_pid else {
            return;
        };
        // Only a pid that is still a Chromium process is killed (it might have exited and
        // been reused in the meantime).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("chromium") {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        process::unregister_child(pid);
    }
}

/// A tiny HTTP server on its own loopback port that answers every request with one fixed HTML
/// page: an origin other than any control plane's, for cross-origin checks. It runs on the
/// test's Tokio runtime and stops when dropped.
#[derive(Debug)]
pub struct StaticPage {
    url: String,
    task: JoinHandle<()>,
}

impl StaticPage {
    /// Starts serving `html` on a fresh port of 127.0.0.1.
    pub async fn serve(html: String) -> StaticPage {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0 never fails");
        let port = listener.local_addr().expect("a bound listener has an address").port();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
             Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{html}",
            html.len()
        );
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let response = response.clone();
                tokio::spawn(async move {
                    // Read the request head (bodies are ignored), then answer and close.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        StaticPage {
            url: format!("http://127.0.0.1:{port}/"),
            task,
        }
    }

    /// The page's URL, e.g. `http://127.0.0.1:40123/`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for StaticPage {
    fn drop(&mut self) {
        self.task.abort();
    }
}
