//! labcore: what every labkit tool shares.
//!
//! Each module is one concern a tool would otherwise write for itself: loading a TOML config
//! with errors that point at the culprit ([`config`]), keeping secrets out of logs
//! ([`secret`]), logging setup ([`log`]), exit codes and the `main` wrapper ([`exit`]), the
//! `--format` choice ([`format`]), shutdown and reload signals ([`signals`]), systemd
//! readiness ([`notify`]), and the connection settings of the two backing services the lab
//! runs: S3 (`s3`, behind the cargo feature `s3`) and PostgreSQL (`pg`, behind the feature
//! `pg`). The features are off by default, so a tool that talks to neither (edge, tunnel)
//! links neither the S3 SDK nor the PostgreSQL driver.
//!
//! Code lands here only when two tools need it today.

pub mod config;
pub mod env;
pub mod exit;
pub mod format;
pub mod log;
pub mod notify;
#[cfg(feature = "pg")]
pub mod pg;
#[cfg(feature = "s3")]
pub mod s3;
pub mod secret;
pub mod signals;

pub use env::Env;
pub use exit::{Exit, ExitStatus};
pub use format::Format;
pub use secret::Secret;
