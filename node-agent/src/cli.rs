//! `instapod-node-agent [--config FILE] [run | import-image FILE.tar NAME]`, and
//! `instapod-node-agent log-driver FILE`, which only containerd's shim runs (`log_driver.rs`).
//!
//! The configuration file may also be named by `INSTAPOD_AGENT_CONFIG`; every field can be
//! overridden with `INSTAPOD_AGENT_<FIELD>` (see `config.rs` and the README).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, ENV_PREFIX};

const USAGE: &str = "usage: instapod-node-agent [--config FILE] [run | import-image FILE.tar NAME]";

pub fn main() -> ExitCode {
    // Started by the containerd shim, with only CONTAINER_ID and CONTAINER_NAMESPACE set: no
    // configuration, no telemetry (see `log_driver`).
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some(crate::log_driver::SUBCOMMAND) {
        return crate::log_driver::main(&all[1..]);
    }
    let mut config_path: Option<PathBuf> = std::env::var_os("INSTAPOD_AGENT_CONFIG").map(PathBuf::from);
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => match args.next() {
                Some(path) => config_path = Some(PathBuf::from(path)),
                None => return usage("--config needs a value"),
            },
            "-h" | "--help" => return usage(""),
            _ => positional.push(arg),
        }
    }
    // INSTAPOD_AGENT_CONFIG names the file; it is not a field.
    let env = std::env::vars().filter(|(k, _)| k != "INSTAPOD_AGENT_CONFIG");
    let config: Config = match instapod_common::config::load_from(config_path.as_deref(), ENV_PREFIX, env) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("instapod-node-agent: {err}");
            return ExitCode::from(2);
        }
    };
    if let Err(problems) = config.validate() {
        eprintln!(
            "instapod-node-agent: invalid configuration:\n  - {}",
            problems.join("\n  - ")
        );
        return ExitCode::from(2);
    }
    instapod_common::telemetry::init(config.log_format, &config.log_filter);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("instapod-node-agent: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match positional.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["run"] => runtime.block_on(crate::agent::run(config)),
        ["import-image", file, name] => runtime.block_on(import(config, PathBuf::from(file), name.to_string())),
        _ => return usage("unexpected arguments"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "node agent failed");
            eprintln!("instapod-node-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    if problem.is_empty() {
        eprintln!("{USAGE}");
        ExitCode::SUCCESS
    } else {
        eprintln!("instapod-node-agent: {problem}\n{USAGE}");
        ExitCode::from(2)
    }
}

async fn import(config: Config, file: PathBuf, name: String) -> anyhow::Result<()> {
    let dirs = crate::dirs::Dirs::new(&config.state_dir)?;
    let runtime = crate::agent::connect_runtime(&config, Duration::from_secs(10)).await?;
    let registry = crate::image::registry::RegistryClient::new(config.plain_http_registries.clone())?;
    let store = crate::image::store::ImageStore::new(runtime, registry, dirs.scratch());
    let info = store.import_archive(&file, &name).await?;
    tracing::info!(image = %info.name, chain_id = %info.chain_id, "image imported");
    Ok(())
}
