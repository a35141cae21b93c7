//! Logging setup: `tracing` to stderr, as text for people or JSON lines for machines.
//!
//! The filter comes from `--log-level` (a level or full `EnvFilter` syntax), else `LABKIT_LOG`,
//! else `info`. Under journald (`JOURNAL_STREAM` set) lines carry no timestamp: the journal
//! adds its own. Colours only when stderr is a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::env::Env;
use crate::exit::{Exit, ExitStatus};
use crate::format::Format;

/// The logging flags every labkit binary takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log level or filter: error, warn, info, debug, trace, or EnvFilter syntax such as
    /// "info,tunnel=debug" [env: LABKIT_LOG] [default: info]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log line format on stderr
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub log_format: Format,
}

/// The log filter given could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?} (from {origin})")]
pub struct LogError {
    filter: String,
    origin: &'static str,
    source: tracing_subscriber::filter::ParseError,
}

impl ExitStatus for LogError {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

/// Installs the global subscriber from the flags and the process environment.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    init_with(args, &Env::from_process())
}

/// Installs the global subscriber from the flags and `env`. A second call does nothing.
pub fn init_with(args: &LogArgs, env: &Env) -> Result<(), LogError> {
    let filter = filter(args, env)?;
    let journald = env.get("JOURNAL_STREAM").is_some();
    let ansi = args.log_format == Format::Text && !journald && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_span_events(FmtSpan::NONE)
        .with_target(true);
    // try_init fails only when a subscriber is already set (tests): keep that one.
    let _ = match (args.log_format, journald) {
        (Format::Text, false) => builder.try_init(),
        (Format::Text, true) => builder.without_time().try_init(),
        (Format::Json, false) => builder.json().flatten_event(true).try_init(),
        (Format::Json, true) => builder.json().flatten_event(true).without_time().try_init(),
    };
    Ok(())
}

fn filter(args: &LogArgs, env: &Env) -> Result<EnvFilter, LogError> {
    let (filter, origin) = match (&args.log_level, env.get("LABKIT_LOG")) {
        (Some(flag), _) => (flag.clone(), "--log-level"),
        (None, Some(var)) => (var.to_owned(), "LABKIT_LOG"),
        (None, None) => ("info".to_owned(), "the default"),
    };
    EnvFilter::builder()
        .parse(&filter)
        .map_err(|source| LogError {
            filter,
            origin,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_environment_beats_default() {
        let env = Env::from_pairs([("LABKIT_LOG", "debug")]);
        let flag = LogArgs {
            log_level: Some("warn".into()),
            ..LogArgs::default()
        };
        assert_eq!(filter(&flag, &env).unwrap().to_string(), "warn");
        assert_eq!(
            filter(&LogArgs::default(), &env).unwrap().to_string(),
            "debug"
        );
        assert_eq!(
            filter(&LogArgs::default(), &Env::default())
                .unwrap()
                .to_string(),
            "info"
        );
    }

    #[test]
    fn a_bad_filter_is_a_usage_error_naming_its_origin() {
        let env = Env::from_pairs([("LABKIT_LOG", "info,=[")]);
        let err = filter(&LogArgs::default(), &env).unwrap_err();
        assert!(err.to_string().contains("LABKIT_LOG"), "{err}");
        assert_eq!(err.exit(), Exit::Usage);
    }
}
