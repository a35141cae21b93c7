//! A small daemon built only from labcore's parts, so testkit's tests can check them end to
//! end in a real process: config errors and exit codes (`check`), logging with secrets
//! redacted, `READY=1`/`RELOADING=1`/`STOPPING=1`, SIGHUP reload that keeps the old config
//! when the new one is bad, and SIGTERM shutdown (`serve`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use labcore::config::{self, ConfigError};
use labcore::log::{LogArgs, LogError};
use labcore::notify::Notifier;
use labcore::signals::Signals;
use labcore::{Env, Exit, ExitStatus, Secret};
use serde::Deserialize;

/// labkit-fixture: a stand-in daemon for testing labcore.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config and exit.
    Check {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run until SIGTERM, reloading the config on SIGHUP.
    Serve {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureToml {
    server: ServerToml,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerToml {
    bind_addr: String,
    #[serde(default)]
    services: BTreeMap<String, ServiceToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceToml {
    token: Option<Secret>,
    token_file: Option<PathBuf>,
}

/// The resolved config: every service has its token.
#[derive(Debug)]
struct Fixture {
    bind_addr: String,
    tokens: BTreeMap<String, Secret>,
}

#[derive(Debug, thiserror::Error)]
enum FixtureError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("runtime")]
    Io(#[from] std::io::Error),
}

impl ExitStatus for FixtureError {
    fn exit(&self) -> Exit {
        match self {
            FixtureError::Config(e) => e.exit(),
            FixtureError::Log(e) => e.exit(),
            FixtureError::Io(e) => e.exit(),
        }
    }
}

fn load(path: &Path, env: &Env) -> Result<Fixture, ConfigError> {
    let (raw, file): (FixtureToml, _) = config::load(path)?;
    let mut tokens = BTreeMap::new();
    for (name, service) in raw.server.services {
        let key = format!("server.services.{name}.token");
        let token = file
            .secret(env, &key, service.token, service.token_file.as_deref())?
            .ok_or_else(|| file.invalid(&key, "no token given"))?;
        tokens.insert(name, token);
    }
    Ok(Fixture {
        bind_addr: raw.server.bind_addr,
        tokens,
    })
}

fn main() -> ExitCode {
    let cli: Cli = labcore::exit::parse_args();
    labcore::exit::run("labkit-fixture", || run(cli))
}

fn run(cli: Cli) -> Result<(), FixtureError> {
    labcore::log::init(&cli.log)?;
    let env = Env::from_process();
    match cli.command {
        Command::Check { config } => {
            let fixture = load(&config, &env)?;
            println!("{}: {} services", config.display(), fixture.tokens.len());
            Ok(())
        }
        Command::Serve { config } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(&config, &env))
        }
    }
}

async fn serve(path: &Path, env: &Env) -> Result<(), FixtureError> {
    let mut fixture = load(path, env)?;
    tracing::debug!(config = ?fixture, "loaded");
    let mut signals = Signals::install()?;
    let notifier = Notifier::from_env(env)?;
    let shutdown = signals.shutdown();
    tracing::info!(bind_addr = %fixture.bind_addr, services = fixture.tokens.len(), "serving");
    notifier.ready();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = signals.reload() => {
                notifier.reloading();
                match load(path, env) {
                    Ok(new) => {
                        fixture = new;
                        tracing::info!(config = ?fixture, "reloaded");
                    }
                    Err(err) => tracing::warn!(
                        error = %labcore::exit::chain(&err),
                        "new config rejected; keeping the old one"
                    ),
                }
                notifier.ready();
            }
        }
    }
    notifier.stopping();
    tracing::info!("stopped");
    Ok(())
}
