//! edge: a TLS-terminating reverse proxy with an internal CA, configured by TOML or a
//! Caddyfile: the job Caddy does on the lab's public VM.
//!
//! The front ends (`config` for TOML, `caddyfile`) meet in one resolved `config::Config`
//! of `site`s. `server` binds the listeners, does TLS with certificates from `certs`
//! (filled by the internal CA in `ca` and by ACME in `acme`, kept in `storage`: a folder,
//! or a bucket several edges share in `s3_storage`, its objects sealed by `sealed`), and
//! hands each request to
//! `handler`, which finds the site (`router`), redirects, authenticates (`auth`),
//! proxies (`proxy`, over connections from `pool`), compresses (`encode`) and logs
//! (`access_log`). `limit` bounds open connections, `activity` counts their traffic for
//! the idle watches, and `body` holds the body types all of them share. `trust` puts the
//! internal root into the system trust store. [`cli`] is the command line.
//!
//! Modules form layers, never cycles: `body`, `activity`, `limit` and `sealed` use no other
//! module, `storage` only `s3_storage`, which uses only `sealed`; `site` (configuration data) sits below `config` and the runtime (`router`,
//! `proxy`, `handler`, `server`), and `cli` is on top.

mod access_log;
pub mod acme;
mod activity;
mod admin;
mod auth;
mod body;
mod ca;
mod caddyfile;
mod certs;
pub mod cli;
mod client_ip;
mod config;
mod context;
mod directives;
mod dns01;
mod dynamic_upstreams;
mod encode;
mod fastcgi;
mod files;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
mod h1;
mod handler;
mod header_ops;
mod health;
mod http3;
mod issuer;
mod lb;
mod limit;
mod log_roll;
mod matchers;
mod metrics;
mod on_demand;
mod placeholders;
mod pool;
mod proxy;
mod proxy_protocol;
mod router;
mod s3_storage;
mod sealed;
mod server;
mod site;
mod storage;
mod tls_options;
mod transport;
mod trust;

pub use ca::CaError;
pub use caddyfile::CaddyfileError;
pub use certs::CertFileError;

use std::io;
use std::net::SocketAddr;

use labcore::{Exit, ExitStatus};

/// Everything that can go wrong, each with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TOML config is wrong.
    #[error(transparent)]
    Config(#[from] labcore::config::ConfigError),
    /// The Caddyfile is wrong.
    #[error(transparent)]
    Caddyfile(#[from] caddyfile::CaddyfileError),
    /// The log filter is wrong.
    #[error(transparent)]
    Log(#[from] labcore::log::LogError),
    /// The internal CA or its storage failed.
    #[error("internal CA")]
    Ca(#[from] ca::CaError),
    /// A site's certificate or key file cannot be served.
    #[error(transparent)]
    CertFile(#[from] certs::CertFileError),
    /// TLS setup failed.
    #[error("TLS setup")]
    Tls(#[source] rustls::Error),
    /// A listener could not be bound.
    #[error("listening on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// Installing the root into the system store failed.
    #[error("{0}")]
    Trust(String),
    /// An I/O operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: io::Error,
    },
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Config(e) => e.exit(),
            Error::Caddyfile(e) => e.exit(),
            Error::Log(e) => e.exit(),
            Error::Ca(ca::CaError::Io { source, .. }) => Exit::from_io(source),
            Error::Ca(ca::CaError::Corrupt { .. }) => Exit::DataErr,
            Error::Ca(ca::CaError::Sign(_)) => Exit::Software,
            Error::CertFile(e) => match &e.source {
                Some(source) => Exit::from_io(source),
                None => Exit::DataErr,
            },
            Error::Tls(_) => Exit::Software,
            Error::Bind { source, .. } => match source.kind() {
                io::ErrorKind::AddrInUse => Exit::Unavailable,
                io::ErrorKind::PermissionDenied => Exit::NoPerm,
                io::ErrorKind::AddrNotAvailable => Exit::Config,
                _ => Exit::from_io(source),
            },
            Error::Trust(_) => Exit::Unavailable,
            Error::Io { source, .. } => Exit::from_io(source),
            Error::Internal(_) => Exit::Software,
        }
    }
}
