//! `instapod-scheduler [--config FILE]`: places pods and drives nodes towards each pod's
//! desired state (see `worker/`). The configuration file may also be named by
//! `INSTAPOD_SCHEDULER_CONFIG`; fields are overridden with `INSTAPOD_SCHEDULER_<FIELD>`.

use std::path::PathBuf;
use std::process::ExitCode;

use instapod_scheduler::worker::{Config, config::ENV_PREFIX};

fn main() -> ExitCode {
    let mut path: Option<PathBuf> = std::env::var_os("INSTAPOD_SCHEDULER_CONFIG").map(PathBuf::from);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--config", Some(file)) => path = Some(PathBuf::from(file)),
            _ => {
                eprintln!("usage: instapod-scheduler [--config FILE]");
                return ExitCode::from(2);
            }
        }
    }
    let env = std::env::vars().filter(|(k, _)| k != "INSTAPOD_SCHEDULER_CONFIG");
    let config: Config = match instapod_common::config::load_from(path.as_deref(), ENV_PREFIX, env) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("instapod-scheduler: {err}");
            return ExitCode::from(2);
        }
    };
    instapod_common::telemetry::init(config.log_format, &config.log_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("instapod-scheduler: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(instapod_scheduler::worker::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("instapod-scheduler: {err:#}");
            ExitCode::FAILURE
        }
    }
}
