//! testkit: real parts for labkit's tests.
//!
//! Every part is the real thing, started on free ports and torn down on drop; children die
//! with the test process even after `kill -9` ([`child`]), and scratch folders left by killed
//! runs are swept ([`scratch`]):
//!
//! - [`PgCluster`]: a PostgreSQL cluster (initdb + postgres) run as an unprivileged user.
//! - [`S3Server`]: an S3 protocol server (`s3s-fs`) with test credentials.
//! - [`Pebble`]: Let's Encrypt's ACME test CA with its DNS test server.
//! - [`Named`]: BIND 9's `named`, authoritative for a test zone updated with a TSIG key.
//! - [`Nat`]: network namespaces joined by veth pairs: a public host, a NAT router and a home
//!   host that can only dial out.
//! - [`Named`]: BIND serving one DNS zone that tests change with dynamic updates.
//! - [`Proc`]: a child process with captured output, sd_notify readiness and signals.

pub mod acme;
pub mod child;
pub mod http;
pub mod named;
pub mod netns;
pub mod pg;
pub mod php;
pub mod ports;
pub mod proc;
pub mod s3;
pub mod scratch;

use std::io;
use std::path::PathBuf;

pub use acme::Pebble;
pub use named::Named;
pub use netns::{Host, Nat};
pub use pg::PgCluster;
pub use proc::{Proc, ProcBuilder};
pub use s3::S3Server;
pub use scratch::Scratch;

/// Why a test part could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program could not be started.
    #[error("starting {}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A process did something other than expected.
    #[error(
        "{name} (pid {pid}) {what}\n--- stdout (tail) ---\n{stdout}\n--- stderr (tail) ---\n{stderr}"
    )]
    Process {
        /// The program's name.
        name: String,
        /// Its PID.
        pid: u32,
        /// What went wrong.
        what: String,
        /// The end of its stdout.
        stdout: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// A part needs something this machine lacks.
    #[error("{0}")]
    Missing(String),
    /// Setting a part up failed.
    #[error("{0}")]
    Setup(String),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The result of testkit calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
