//! Starting the real `instapod-scheduler` binary on a control plane's database and a Redis URL
//! (the one the control plane and the node agents use for their queues).
//!
//! The binary is `INSTAPOD_SCHEDULER_BIN` when set (benchmarks point it at the release build),
//! else the one next to the test executable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{ids, process};

/// A running scheduler; killed when dropped.
#[derive(Debug)]
pub struct Scheduler {
    child: Child,
    log: PathBuf,
    /// Its `/metrics` is on `127.0.0.1:metrics_port`.
    pub metrics_port: u16,
}

impl Scheduler {
    /// Starts a scheduler (reconcile every second, stops with a 2 s grace period).
    pub fn start(database_url: &str, redis_url: &str) -> Scheduler {
        Scheduler::start_with_env(database_url, redis_url, &[])
    }

    /// Starts a scheduler like [`Scheduler::start`], with `INSTAPOD_SCHEDULER_*` overrides
    /// (later entries win), e.g. another reconcile interval or log filter.
    pub fn start_with_env(database_url: &str, redis_url: &str, env: &[(&str, &str)]) -> Scheduler {
        let binary = scheduler_binary();
        let log = process::temp_dir("scheduler").join(format!("scheduler-{}.log", ids::random_suffix()));
        let (out, err) = process::log_file_stdio(&log);
        let metrics_port = process::free_port();
        let mut command = Command::new(&binary);
        process::clear_instapod_env(&mut command);
        let child = command
            .env("INSTAPOD_SCHEDULER_DATABASE_URL", database_url)
            .env("INSTAPOD_SCHEDULER_REDIS_URL", redis_url)
            .env("INSTAPOD_SCHEDULER_RECONCILE_INTERVAL_SECS", "1")
            .env("INSTAPOD_SCHEDULER_STOP_GRACE_SECS", "2")
            .env("INSTAPOD_SCHEDULER_LOG_FILTER", "info,instapod_scheduler=debug")
            .env("INSTAPOD_SCHEDULER_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        process::register_child(&child, process::StopSignal::Kill);
        Scheduler {
            child,
            log,
            metrics_port,
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        process::log_tail(&self.log, 40)
    }
}

/// `INSTAPOD_SCHEDULER_BIN`, else `instapod-scheduler` next to the test executable (run
/// `cargo build --workspace --bins` first).
pub fn scheduler_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("INSTAPOD_SCHEDULER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("instapod-scheduler");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        binary.display()
    );
    binary
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        process::kill_and_reap(&mut self.child);
    }
}
