//! Exit codes (sysexits) and the `main` wrapper every labkit binary uses.
//!
//! Tools map their error enum onto [`Exit`] in one place (an `impl ExitStatus`) and hand the
//! body of `main` to [`run`], which prints the error chain on stderr and exits with that code.
//! Command-line parsing goes through [`parse_args`] so that usage errors exit 64, not clap's 2.

use std::error::Error;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;

/// A process exit status, following `sysexits.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Exit {
    /// Everything worked.
    Ok = 0,
    /// Some of the work failed and the tool says which (only where a tool defines it).
    Partial = 1,
    /// The command line was wrong.
    Usage = 64,
    /// Input data was malformed (a name, a file's contents, bytes from the network).
    DataErr = 65,
    /// An input file or object does not exist.
    NoInput = 66,
    /// A service the tool needs is down or unreachable.
    Unavailable = 69,
    /// A bug: an invariant did not hold.
    Software = 70,
    /// An output cannot be created (it exists, or the place is not writable).
    CantCreate = 73,
    /// Reading or writing failed.
    IoErr = 74,
    /// A temporary failure: retrying later may work (a lock is held, a server is busy).
    TempFail = 75,
    /// Permission denied (file modes, database privileges, S3 credentials).
    NoPerm = 77,
    /// The configuration is wrong.
    Config = 78,
    /// PostgreSQL must abort recovery: it takes a `restore_command` status above 125 as fatal
    /// and any lower one as "the archive ends here" (backupd's `wal-fetch` on every failure but
    /// a missing file, so a refused, damaged or unreachable segment never ends a replay early).
    AbortRecovery = 200,
}

impl Exit {
    /// The numeric status handed to the operating system.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The usual status for an I/O error: missing input, permission, or plain I/O.
    pub fn from_io(err: &io::Error) -> Exit {
        match err.kind() {
            io::ErrorKind::NotFound => Exit::NoInput,
            io::ErrorKind::PermissionDenied => Exit::NoPerm,
            io::ErrorKind::AlreadyExists => Exit::CantCreate,
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::TimedOut => Exit::Unavailable,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Exit::CantCreate,
            _ => Exit::IoErr,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// Errors that know which exit status they deserve.
pub trait ExitStatus {
    /// The status a process ending with this error exits with.
    fn exit(&self) -> Exit;
}

impl ExitStatus for io::Error {
    fn exit(&self) -> Exit {
        Exit::from_io(self)
    }
}

/// Runs the body of `main`: on error prints `TOOL: error: chain` on stderr and returns its code;
/// a panic (already reported by the panic hook) becomes exit 70.
pub fn run<E>(tool: &str, body: impl FnOnce() -> Result<(), E>) -> ExitCode
where
    E: Error + ExitStatus,
{
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) => {
            eprintln!("{tool}: error: {}", chain(&err));
            err.exit().into()
        }
        Err(_) => {
            eprintln!("{tool}: internal error (a bug): see the panic message above");
            Exit::Software.into()
        }
    }
}

/// An error and its sources joined by ": ", the way every labkit tool prints them.
pub fn chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some libraries repeat their source's text in their own message; print it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Parses the command line; `--help` and `--version` exit 0, usage errors exit 64.
pub fn parse_args<T: clap::Parser>() -> T {
    parse_args_from(std::env::args_os())
}

/// [`parse_args`] over explicit arguments (the first one is the program name).
pub fn parse_args_from<T, I, A>(args: I) -> T
where
    T: clap::Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    match T::try_parse_from(args) {
        Ok(parsed) => parsed,
        Err(err) => {
            let code = if err.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
            // Printing can only fail when stdout/stderr are gone; the exit code still tells.
            let _ = err.print();
            std::process::exit(i32::from(code.code()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}")]
    struct Outer {
        path: String,
        source: io::Error,
    }

    #[test]
    fn chain_joins_sources_with_colons() {
        let err = Outer {
            path: "/etc/x.toml".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(chain(&err), "reading /etc/x.toml: no such file");
    }

    #[test]
    fn io_errors_map_to_sysexits() {
        let not_found = io::Error::from(io::ErrorKind::NotFound);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Exit::from_io(&not_found).code(), 66);
        assert_eq!(Exit::from_io(&denied).code(), 77);
        assert_eq!(Exit::from_io(&refused).code(), 69);
        assert_eq!(Exit::from_io(&io::Error::other("x")).code(), 74);
    }
}
