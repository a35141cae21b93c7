//! backupd: encrypted, streamed, verified backups of PostgreSQL databases and folders to S3 or
//! a local folder, with retention.
//!
//! A pass ([`run`]) takes each configured source through [`backup`] (source program ->
//! zstd -> age -> [`store`]), writes a manifest last ([`catalog`]), then prunes by
//! [`retention`] only if every backup of the pass succeeded. [`restore`] and its restore test
//! ([`restore::verify`]) read them back. [`daemon`] runs passes on a schedule.

mod archive;
mod archiving;
mod backup;
mod basebackup;
mod catalog;
pub mod cli;
mod cluster;
mod config;
mod copy;
mod daemon;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
mod hooks;
mod inventory;
mod lock;
mod metrics;
mod pipeline;
mod pitr;
mod postgres;
mod restore;
mod retention;
mod run;
mod s3client;
// Public for the tests that play a forger holding (or lacking) the trusted key.
pub mod signing;
mod spool;
mod store;
mod wal;

use std::io;

use labcore::{Exit, ExitStatus};

/// backupd's version, recorded in every manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything that can go wrong, each with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config is wrong.
    #[error(transparent)]
    Config(#[from] labcore::config::ConfigError),
    /// The log filter is wrong.
    #[error(transparent)]
    Log(#[from] labcore::log::LogError),
    /// The S3 settings are wrong.
    #[error(transparent)]
    S3Settings(#[from] labcore::s3::S3SettingsError),
    /// The libpq environment is wrong.
    #[error(transparent)]
    PgSettings(#[from] labcore::pg::PgSettingsError),
    /// Connecting to PostgreSQL failed.
    #[error(transparent)]
    Pg(#[from] labcore::pg::PgError),
    /// A query failed.
    #[error("{what} in database {database:?}")]
    Sql {
        /// What was being done.
        what: String,
        /// The database.
        database: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// A target operation failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Stored data could not be decoded.
    #[error(transparent)]
    Decode(#[from] pipeline::DecodeError),
    /// Archiving or extracting a folder failed.
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    /// A manifest is unsigned or not signed by a trusted key.
    #[error(transparent)]
    Signature(#[from] signing::SignatureError),
    /// A program backupd ran failed.
    #[error("{program} failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Child {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// A program could not be started.
    #[error("starting {program}")]
    Spawn {
        /// The program.
        program: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The only `pg_dump` found is older than the server.
    #[error(
        "pg_dump must be at least the server's major version {server}, found {found}: install \
         postgresql-client-{server} or set bin_dir in [postgres]"
    )]
    PgDumpTooOld {
        /// What was found.
        found: String,
        /// The server's major version.
        server: u32,
    },
    /// The byte pipeline failed.
    #[error("backup data stream")]
    Pipeline(#[source] io::Error),
    /// A backup ID names nothing on the target.
    #[error("backup {id} not found on target {target}")]
    NotFound {
        /// The ID.
        id: String,
        /// The target searched.
        target: String,
    },
    /// A manifest could not be read.
    #[error("manifest {location} is unreadable")]
    Manifest {
        /// Where it is.
        location: String,
        /// What is wrong with it.
        source: serde_json::Error,
    },
    /// Another run of the same config is going on.
    #[error("another backupd run holds the lock {path} ({holder}); try again later")]
    Locked {
        /// The lock file.
        path: String,
        /// Who holds it.
        holder: String,
    },
    /// A restore target already holds data.
    #[error("{0} is not empty: give --force to replace it")]
    TargetNotEmpty(String),
    /// A restore test found differences.
    #[error("verification of {id} failed: {detail}")]
    VerifyFailed {
        /// The backup.
        id: String,
        /// What did not match.
        detail: String,
    },
    /// Some backups of a pass failed, others succeeded.
    #[error("{failed} of {total} backups failed: {first}")]
    Partial {
        /// Failures.
        failed: usize,
        /// Attempts.
        total: usize,
        /// The first failure's message.
        first: String,
    },
    /// Backups were made, but their copy to another target is not finished.
    #[error("the copy from target {from} to {to} is pending: {detail}")]
    CopyPending {
        /// The target copied from.
        from: String,
        /// The target copied to.
        to: String,
        /// Why, and how much is left.
        detail: String,
    },
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// A local file operation failed.
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
    /// `wal-fetch` failed for another reason than a missing file: PostgreSQL must abort its
    /// recovery rather than take it as the end of the archive.
    #[error(transparent)]
    FetchFailed(Box<Error>),
    /// A WAL file's name is taken by other bytes, or its bytes do not match their record.
    #[error("WAL file {name}: {detail}")]
    WalConflict {
        /// The WAL file.
        name: String,
        /// What does not match.
        detail: String,
    },
    /// The store is unavailable and the spool is full: PostgreSQL keeps the file and retries.
    #[error(
        "WAL file {name} could not be stored ({cause}) and the spool is full ({used} of {max} \
         bytes): PostgreSQL keeps it and retries"
    )]
    SpoolFull {
        /// The WAL file.
        name: String,
        /// Bytes spooled.
        used: u64,
        /// The bound.
        max: u64,
        /// Why the store refused.
        cause: String,
    },
    /// The WAL a restore needs has a hole.
    #[error("the WAL chain of cluster {cluster} is broken: missing {missing}")]
    WalGap {
        /// The cluster.
        cluster: String,
        /// The missing segment names (a range as FIRST..LAST).
        missing: String,
    },
}

impl Error {
    /// An I/O error inside the byte pipeline.
    pub(crate) fn pipeline(err: io::Error) -> Error {
        Error::Pipeline(err)
    }
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Config(e) => e.exit(),
            Error::Log(e) => e.exit(),
            Error::S3Settings(e) => e.exit(),
            Error::PgSettings(e) => e.exit(),
            Error::Pg(e) => e.exit(),
            Error::Sql { source, .. } => labcore::pg::exit_for(source),
            Error::Store(e) => e.exit(),
            Error::Decode(pipeline::DecodeError::Io(e)) => Exit::from_io(e),
            Error::Decode(pipeline::DecodeError::NoIdentity) => Exit::Usage,
            Error::Decode(
                pipeline::DecodeError::WrongIdentity | pipeline::DecodeError::BadIdentity(_),
            ) => Exit::NoPerm,
            Error::Decode(pipeline::DecodeError::Header(_)) => Exit::DataErr,
            Error::Archive(e) => e.exit(),
            Error::Signature(e) => e.exit(),
            Error::Child { .. } => Exit::Unavailable,
            Error::Spawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => Exit::Unavailable,
                _ => Exit::from_io(source),
            },
            Error::PgDumpTooOld { .. } => Exit::Unavailable,
            Error::Pipeline(e) => Exit::from_io(e),
            Error::NotFound { .. } => Exit::NoInput,
            Error::Manifest { .. } => Exit::DataErr,
            Error::Locked { .. } => Exit::TempFail,
            Error::TargetNotEmpty(_) => Exit::CantCreate,
            Error::VerifyFailed { .. } => Exit::DataErr,
            Error::Partial { .. } => Exit::Partial,
            Error::CopyPending { .. } => Exit::TempFail,
            Error::Usage(_) => Exit::Usage,
            Error::Io { source, .. } => Exit::from_io(source),
            Error::Internal(_) => Exit::Software,
            Error::FetchFailed(_) => Exit::AbortRecovery,
            Error::WalConflict { .. } | Error::WalGap { .. } => Exit::DataErr,
            Error::SpoolFull { .. } => Exit::TempFail,
        }
    }
}
