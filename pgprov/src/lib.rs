//! pgprov: a database, a login role and a password per service on one shared PostgreSQL.
//!
//! The command line ([`cli`]) connects as an admin role ([`admin`]) with labcore's libpq
//! settings and runs one of the operations: [`provision`] (create, drop, rotate), [`grant`],
//! [`list`] or [`apply`] (a declarative file). Names are checked ([`name`]) before any
//! statement is built; passwords are made and turned into SCRAM verifiers client-side
//! ([`password`]); what a service needs to connect is written by [`credentials`]; [`hba`]
//! warns when `pg_hba.conf` would keep the new role out.
//!
//! Every failure is one [`Error`], mapped onto an exit status in one place.

mod admin;
mod apply;
mod catalog;
pub mod cli;
pub mod credentials;
mod grant;
mod hba;
mod list;
mod name;
mod password;
mod provision;

use std::io;

use labcore::config::ConfigError;
use labcore::exit::chain;
use labcore::{Exit, ExitStatus};
use tokio_postgres::error::SqlState;

/// Everything that can go wrong, each with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log filter is wrong.
    #[error(transparent)]
    Log(#[from] labcore::log::LogError),
    /// The libpq environment is wrong.
    #[error(transparent)]
    PgSettings(#[from] labcore::pg::PgSettingsError),
    /// Connecting to PostgreSQL failed.
    #[error(transparent)]
    Connect(#[from] labcore::pg::PgError),
    /// A role, database or extension name is not acceptable.
    #[error(transparent)]
    Name(#[from] name::NameError),
    /// The apply file cannot be read or does not parse.
    #[error(transparent)]
    ApplyFile(ConfigError),
    /// The apply file parses but holds a bad name or a duplicate.
    #[error(transparent)]
    ApplyData(ConfigError),
    /// The admin role lacks a privilege pgprov needs.
    #[error(
        "admin role {role:?} lacks {missing}: pgprov needs a superuser or a role with CREATEROLE \
         and CREATEDB (ALTER ROLE {role} CREATEROLE CREATEDB)"
    )]
    NoPrivilege {
        /// The admin role.
        role: String,
        /// The missing privileges, such as `CREATEROLE and CREATEDB`.
        missing: String,
    },
    /// Something to be made already exists.
    #[error("{0}")]
    Exists(String),
    /// Something to be changed does not exist.
    #[error("{0}")]
    Missing(String),
    /// pgprov will not touch this, such as a database it did not make.
    #[error("{0}")]
    Refused(String),
    /// A database or role has open sessions and `--force` was not given.
    #[error(
        "{what} has {sessions} open session(s); stop the service first or pass --force to \
         terminate them"
    )]
    Busy {
        /// The database or role.
        what: String,
        /// How many sessions.
        sessions: i64,
    },
    /// A destructive command was not confirmed.
    #[error("{0}")]
    NotConfirmed(String),
    /// A statement failed.
    #[error("{what}")]
    Sql {
        /// What was being done, naming the role or database.
        what: String,
        /// The server's or the driver's error.
        source: tokio_postgres::Error,
    },
    /// The server did not answer in time.
    #[error("{what}: no answer from PostgreSQL within {secs} s")]
    Timeout {
        /// What was being done.
        what: String,
        /// The time limit.
        secs: u64,
    },
    /// Local I/O failed: writing credentials, reading the terminal, setting up the runtime.
    #[error("{what}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// What the OS said.
        source: io::Error,
    },
    /// A stop signal ended `apply` between two changes.
    #[error("stopped by a signal after {done} of {planned} change(s); run apply again to finish")]
    Interrupted {
        /// Changes made.
        done: usize,
        /// Changes planned.
        planned: usize,
    },
    /// The system's random number generator failed.
    #[error("generating a password: the system random number generator failed")]
    Random,
    /// A step failed and undoing the earlier steps failed too.
    #[error(
        "{}; undoing it failed too, so {left} is left behind: {}",
        chain(error),
        chain(undo)
    )]
    Undo {
        /// The failure that started the undo.
        error: Box<Error>,
        /// What remains on the server.
        left: String,
        /// Why the undo failed.
        undo: Box<Error>,
    },
}

impl From<aws_lc_rs::error::Unspecified> for Error {
    fn from(_: aws_lc_rs::error::Unspecified) -> Error {
        Error::Random
    }
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Log(e) => e.exit(),
            Error::PgSettings(e) => e.exit(),
            Error::Connect(e) => e.exit(),
            Error::ApplyFile(e) => e.exit(),
            Error::Name(_) | Error::ApplyData(_) | Error::Refused(_) => Exit::DataErr,
            Error::NoPrivilege { .. } => Exit::NoPerm,
            Error::Exists(_) => Exit::CantCreate,
            Error::Missing(_) => Exit::NoInput,
            Error::Busy { .. } | Error::Interrupted { .. } => Exit::TempFail,
            Error::NotConfirmed(_) => Exit::Usage,
            Error::Sql { source, .. } => sql_exit(source),
            Error::Timeout { .. } => Exit::Unavailable,
            Error::Io { source, .. } => Exit::from_io(source),
            Error::Random => Exit::Software,
            Error::Undo { error, .. } => error.exit(),
        }
    }
}

/// labcore's mapping, plus the states pgprov meets: a name already taken (73), an object in
/// use (75), an unknown role (66), objects still depending on a role (65).
fn sql_exit(err: &tokio_postgres::Error) -> Exit {
    match err.code() {
        Some(c) if *c == SqlState::DUPLICATE_OBJECT || *c == SqlState::DUPLICATE_DATABASE => {
            Exit::CantCreate
        }
        Some(c) if *c == SqlState::OBJECT_IN_USE => Exit::TempFail,
        Some(c) if *c == SqlState::UNDEFINED_OBJECT => Exit::NoInput,
        Some(c) if *c == SqlState::DEPENDENT_OBJECTS_STILL_EXIST => Exit::DataErr,
        _ => labcore::pg::exit_for(err),
    }
}
