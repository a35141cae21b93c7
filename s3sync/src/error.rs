//! The one error type of s3sync and the exit status each error deserves.
//!
//! Errors carry what was being worked on (a path, an `s3://` URL) so the message printed by
//! `labcore::exit::run` names the culprit. [`Error::fatal`] decides whether one failed transfer
//! stops the whole run (the store is down, the credentials are refused, the bucket is gone) or
//! is reported while the other transfers go on (one unreadable file, one odd key).

use std::io;
use std::path::PathBuf;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use labcore::config::ConfigError;
use labcore::log::LogError;
use labcore::s3::S3SettingsError;
use labcore::s3::upload::UploadError;
use labcore::{Exit, ExitStatus};

/// Everything that can go wrong in s3sync.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line makes no sense.
    #[error("{0}")]
    Usage(String),
    /// A location argument is malformed.
    #[error("invalid location {arg:?}: {reason}")]
    Location {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filter pattern is malformed.
    #[error("invalid pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The S3 settings are wrong.
    #[error(transparent)]
    Settings(Box<S3SettingsError>),
    /// The config file is wrong.
    #[error(transparent)]
    Config(Box<ConfigError>),
    /// The log filter is wrong.
    #[error(transparent)]
    Log(#[from] LogError),
    /// An S3 request failed.
    #[error("{operation} {target}: {detail}")]
    S3 {
        /// The S3 operation, such as `GetObject`.
        operation: &'static str,
        /// The bucket or object, as an `s3://` URL.
        target: String,
        /// The store's error code and message, or the transport error.
        detail: String,
        /// The exit status it deserves.
        exit: Exit,
    },
    /// A streaming upload failed (its multipart upload was aborted).
    #[error(transparent)]
    Upload(Box<UploadError>),
    /// A local file or folder could not be read or written.
    #[error("{action} {}", path.display())]
    Local {
        /// What was being done, such as `reading`.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Standard input or output failed.
    #[error("{action} standard {stream}")]
    Stdio {
        /// What was being done.
        action: &'static str,
        /// `input` or `output`.
        stream: &'static str,
        /// What the OS said.
        source: io::Error,
    },
    /// An object key or file name cannot be carried to the other side.
    #[error("{name:?}: {reason}")]
    BadName {
        /// The key or path.
        name: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// Downloaded bytes do not match what the store said it holds.
    #[error("{target}: {reason}; nothing was written under the final name")]
    Verify {
        /// The object.
        target: String,
        /// What did not match.
        reason: String,
    },
    /// A sync would delete more than it is allowed to.
    #[error(
        "refusing to delete {deletes} of {total} objects in {target} (limit {limit}): nothing \
         was changed; {hint}"
    )]
    TooManyDeletes {
        /// The destination.
        target: String,
        /// Deletions planned.
        deletes: usize,
        /// Entries in the destination.
        total: usize,
        /// The limit that applied.
        limit: usize,
        /// How to go ahead anyway.
        hint: &'static str,
    },
    /// The watched folder is gone, replaced or suddenly empty: syncing it would delete what
    /// the destination holds, so the watch stops instead.
    #[error(
        "the watched folder {root} {reason}: stopping the watch rather than deleting what the \
         destination holds"
    )]
    SourceGone {
        /// The watched folder.
        root: String,
        /// What happened to it.
        reason: String,
    },
    /// `check` found differences (each was listed).
    #[error("{0} differences found")]
    Differences(usize),
    /// Some transfers (or entries of a listing) failed; the others were done.
    #[error("{failed} of {total} transfers failed{}", skipped_deletes(*.deletes_skipped))]
    Partial {
        /// Failed transfers (and unreadable entries).
        failed: usize,
        /// All transfers attempted.
        total: usize,
        /// Deletions not done because something failed.
        deletes_skipped: usize,
    },
    /// A stop signal arrived.
    #[error(
        "interrupted by a stop signal; finished transfers are kept, unfinished ones undone \
         (large file uploads keep their stored parts and resume in the next run)"
    )]
    Interrupted,
    /// The async runtime or the file watcher could not start.
    #[error("{what}")]
    Runtime {
        /// What could not start.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

impl From<S3SettingsError> for Error {
    fn from(err: S3SettingsError) -> Error {
        Error::Settings(Box::new(err))
    }
}

impl From<ConfigError> for Error {
    fn from(err: ConfigError) -> Error {
        Error::Config(Box::new(err))
    }
}

impl From<UploadError> for Error {
    fn from(err: UploadError) -> Error {
        Error::Upload(Box::new(err))
    }
}

fn skipped_deletes(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} deletions skipped because of the failures")
    }
}

impl Error {
    /// An S3 request error, with its exit status.
    pub(crate) fn s3<E, R>(
        operation: &'static str,
        target: impl Into<String>,
        err: &SdkError<E, R>,
    ) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        Error::S3 {
            operation,
            target: target.into(),
            detail: labcore::s3::upload::describe(err),
            exit: labcore::s3::exit_for(err),
        }
    }

    /// A local I/O error on `path`.
    pub(crate) fn local(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> Error {
        Error::Local {
            action,
            path: path.into(),
            source,
        }
    }

    /// Whether this error, met by one transfer, must stop the whole run: every other transfer
    /// would fail the same way (store unreachable, credentials refused, bucket missing, disk
    /// full), so going on only repeats it.
    pub(crate) fn fatal(&self) -> bool {
        match self {
            Error::S3 { exit, detail, .. } => is_global(*exit, detail),
            Error::Upload(upload) => match upload.as_ref() {
                UploadError::S3 { exit, detail, .. } => is_global(*exit, detail),
                UploadError::Read { source, .. } => full(source),
                _ => false,
            },
            Error::Local { source, .. } => full(source),
            Error::Stdio { .. } | Error::Interrupted | Error::Runtime { .. } => true,
            _ => false,
        }
    }
}

fn full(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Store-wide failures: unreachable, throttled past retries, refused keys, a missing bucket.
fn is_global(exit: Exit, detail: &str) -> bool {
    match exit {
        Exit::Unavailable | Exit::TempFail => true,
        Exit::NoPerm => !detail.starts_with("AccessDenied"),
        Exit::NoInput => detail.starts_with("NoSuchBucket"),
        _ => false,
    }
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Usage(_) | Error::Location { .. } | Error::Pattern { .. } => Exit::Usage,
            Error::Settings(err) => err.exit(),
            Error::Config(err) => err.exit(),
            Error::Log(err) => err.exit(),
            Error::S3 { exit, .. } => *exit,
            Error::Upload(err) => err.exit(),
            Error::Local { source, .. } | Error::Stdio { source, .. } => Exit::from_io(source),
            Error::BadName { .. } | Error::Verify { .. } => Exit::DataErr,
            Error::TooManyDeletes { .. } => Exit::DataErr,
            Error::SourceGone { .. } => Exit::NoInput,
            Error::Partial { .. } | Error::Differences(_) => Exit::Partial,
            Error::Interrupted => Exit::TempFail,
            Error::Runtime { .. } => Exit::Software,
        }
    }
}
