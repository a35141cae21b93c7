//! The crate's one error type and its mapping onto exit codes.
//!
//! Errors that end the process (bad config, a port that cannot be bound) and errors that end
//! one connection (a wrong token, garbage bytes, a timeout) share this enum; the latter are
//! logged with the peer's address by whoever handled the connection. No variant carries a
//! token, a nonce or a session key.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use labcore::config::ConfigError;
use labcore::log::LogError;
use labcore::{Exit, ExitStatus};

/// What went wrong in the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read or is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log filter is wrong.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The command line lacks something clap cannot require on its own.
    #[error("{0}")]
    Usage(String),
    /// The config has no table for the mode asked for, or two when none was asked for.
    #[error("{}: {message}", path.display())]
    Mode {
        /// The config file.
        path: PathBuf,
        /// What is missing or ambiguous.
        message: String,
    },
    /// A listening socket could not be opened.
    #[error("listening on {addr} for {what}")]
    Bind {
        /// What the socket is for (`the control channel`, `service ssh`).
        what: String,
        /// The address from the config.
        addr: String,
        /// What the OS said.
        source: io::Error,
    },
    /// A message carried an unknown enum tag.
    #[error("malformed {what}: unknown tag {tag}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// The tag found.
        tag: u32,
    },
    /// A UDP frame's header is too short for the address it names.
    #[error("malformed udp header: {len} bytes is too short")]
    UdpHeader {
        /// The header length the frame gave.
        len: usize,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version {got} is not supported (this tunnel speaks version 1)")]
    Version {
        /// The version the peer sent.
        got: u8,
    },
    /// A control channel asked for a service the server does not have.
    #[error("unknown service (name digest {digest_prefix}…)")]
    UnknownService {
        /// The first bytes of the digest, in hex, to tell services apart in logs.
        digest_prefix: String,
    },
    /// A control channel's token proof was wrong.
    #[error("wrong token for service {service}")]
    AuthFailed {
        /// The service.
        service: String,
    },
    /// A data channel named no open control channel.
    #[error("data channel for no open control channel (stale or forged session key)")]
    UnknownSession,
    /// The server refused the client's control channel.
    #[error("server refused service {service}: {reason}")]
    Refused {
        /// The service.
        service: String,
        /// The server's answer, in words.
        reason: &'static str,
    },
    /// A declared service's declaration could not be read.
    #[error("malformed declaration: {0}")]
    BadDeclaration(&'static str),
    /// The server would not expose a declared service.
    #[error("server refused declared service {service}: {reason}")]
    Declined {
        /// The service.
        service: String,
        /// The server's reason (escaped), or the policy's.
        reason: String,
        /// Whether asking again later may succeed (the port was taken, the name held).
        retry: bool,
    },
    /// The peer sent a message that does not belong at this point.
    #[error("unexpected {what}")]
    Unexpected {
        /// What arrived.
        what: &'static str,
    },
    /// The peer took too long.
    #[error("timed out after {}s waiting for {what}", after.as_secs_f32())]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The peer closed the connection.
    #[error("connection closed while waiting for {what}")]
    Closed {
        /// What was awaited.
        what: &'static str,
    },
    /// A network or file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The config asks for something this build cannot do yet.
    #[error("{what} is not supported by this version of tunnel")]
    Unsupported {
        /// What was asked for.
        what: String,
    },
    /// A Noise handshake or message failed.
    #[error("Noise: {reason}")]
    Noise {
        /// What failed.
        reason: String,
    },
    /// A TLS handshake failed, or the TLS settings cannot be used.
    #[error("TLS: {reason}")]
    Tls {
        /// What failed.
        reason: String,
    },
    /// A WebSocket handshake or message failed.
    #[error("WebSocket: {reason}")]
    Websocket {
        /// What failed.
        reason: String,
    },
    /// The proxy in `[client.transport.tcp] proxy` refused or failed.
    #[error("proxy {addr}: {reason}")]
    Proxy {
        /// The proxy's address (never its credentials).
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

impl Error {
    /// An I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Config(e) => e.exit(),
            Error::Log(e) => e.exit(),
            Error::Usage(_) => Exit::Usage,
            Error::Mode { .. } | Error::Unsupported { .. } => Exit::Config,
            Error::Bind { source, .. } => match source.kind() {
                io::ErrorKind::PermissionDenied => Exit::NoPerm,
                _ => Exit::Unavailable,
            },
            Error::Malformed { .. }
            | Error::UdpHeader { .. }
            | Error::Version { .. }
            | Error::Unexpected { .. }
            | Error::UnknownSession
            | Error::BadDeclaration(_) => Exit::DataErr,
            Error::UnknownService { .. }
            | Error::AuthFailed { .. }
            | Error::Refused { .. }
            | Error::Declined { .. } => Exit::NoPerm,
            Error::Timeout { .. } | Error::Closed { .. } => Exit::Unavailable,
            Error::Io { source, .. } => Exit::from_io(source),
            Error::Noise { .. } | Error::Tls { .. } => Exit::NoPerm,
            Error::Websocket { .. } => Exit::DataErr,
            Error::Proxy { .. } => Exit::Unavailable,
            Error::Random => Exit::Software,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_failures_map_to_unavailable_or_permission() {
        let in_use = Error::Bind {
            what: "service ssh".into(),
            addr: "0.0.0.0:22".into(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        assert_eq!(in_use.exit(), Exit::Unavailable);
        let denied = Error::Bind {
            what: "service ssh".into(),
            addr: "0.0.0.0:22".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert_eq!(denied.exit(), Exit::NoPerm);
        assert_eq!(Error::Usage("x".into()).exit(), Exit::Usage);
    }
}
