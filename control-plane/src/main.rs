//! `instapod-control-plane [--config FILE] [serve | migrate | bootstrap-user --email E --password P --name N | print-openapi]`
//!
//! The configuration file may also be named by `INSTAPOD_CONFIG`; every field can be overridden
//! with `INSTAPOD_<FIELD>` (see `config.rs` and the README).

use std::path::PathBuf;
use std::process::ExitCode;

use instapod_control_plane::config::Config;

const USAGE: &str = "usage: instapod-control-plane [--config FILE] [serve | migrate | bootstrap-user --email E --password P --name N | print-openapi]";

#[derive(Debug, Default)]
struct Args {
    config: Option<PathBuf>,
    command: String,
    email: Option<String>,
    password: Option<String>,
    name: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        command: "serve".to_string(),
        ..Args::default()
    };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut value = |flag: &str| iter.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--config" => args.config = Some(PathBuf::from(value("--config")?)),
            "--email" => args.email = Some(value("--email")?),
            "--password" => args.password = Some(value("--password")?),
            "--name" => args.name = Some(value("--name")?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            "serve" | "migrate" | "bootstrap-user" | "print-openapi" => args.command = arg,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.config.is_none() {
        args.config = std::env::var_os("INSTAPOD_CONFIG").map(PathBuf::from);
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let config: Config = match instapod_common::config::load(args.config.as_deref(), "INSTAPOD_") {
        Ok(config) => config,
        Err(err) => {
            eprintln!("instapod-control-plane: {err}");
            return ExitCode::from(2);
        }
    };
    if let Err(problems) = config.validate() {
        eprintln!(
            "instapod-control-plane: invalid configuration:\n  - {}",
            problems.join("\n  - ")
        );
        return ExitCode::from(2);
    }
    instapod_common::telemetry::init(config.log_format, &config.log_filter);
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("instapod-control-plane: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match args.command.as_str() {
            "migrate" => {
                let applied = instapod_control_plane::migrate(&config).await?;
                tracing::info!(applied, "migrations applied");
                Ok(())
            }
            "bootstrap-user" => {
                let (Some(email), Some(password), Some(name)) = (&args.email, &args.password, &args.name) else {
                    anyhow::bail!("bootstrap-user needs --email, --password and --name");
                };
                instapod_control_plane::migrate(&config).await?;
                let line = instapod_control_plane::bootstrap_user(&config, email, password, name).await?;
                write_stdout(&line.to_string())
            }
            "print-openapi" => {
                let doc = instapod_control_plane::http::router::openapi();
                write_stdout(&doc.to_pretty_json()?)
            }
            _ => instapod_control_plane::serve(config.clone()).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "fatal");
            eprintln!("instapod-control-plane: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}
