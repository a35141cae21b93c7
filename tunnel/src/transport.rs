//! Transports: how the tunnel's own connections (control and data channels) are made.
//!
//! The server and client are generic over [`Transport`], which binds, accepts and connects and
//! hands back a [`TunnelStream`]. Forwarding never looks inside a transport: it copies between
//! any [`TunnelStream`] and a local TCP socket, and asks [`TunnelStream::plain_tcp`] whether
//! the kernel may move the bytes itself (`splice(2)`). The implementations: [`TcpTransport`]
//! (which also reaches the server through a client's `proxy`, [`proxy`]), [`NoiseTransport`],
//! [`TlsTransport`] and [`WebsocketTransport`] (over TCP or TLS), each over TCP, selected by
//! `transport.type` in [`crate::run`] (and, for each server of a client, in the client).

pub(crate) mod noise;
pub(crate) mod proxy;
mod tcp;
pub(crate) mod tls;
pub(crate) mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use labcore::config::ConfigFile;

use crate::config::{Settings, TransportSettings};
use crate::error::Error;

pub(crate) use noise::NoiseTransport;
pub(crate) use tcp::TcpTransport;
pub(crate) use tls::TlsTransport;
pub(crate) use websocket::WebsocketTransport;

/// Checks that each side's transport in a config loaded from `path` can be built: the Noise
/// pattern parses and the keys it needs are there, the TLS files load and match. A config
/// error naming the key at fault now, rather than a failed connection later.
pub(crate) fn check(settings: &Settings, path: &Path) -> Result<(), Error> {
    match settings {
        Settings::Server(s) => check_one("server", &s.common.transport, path),
        Settings::Client(c) => {
            check_one("client", &c.common.transport, path)?;
            for (i, server) in c.servers.iter().enumerate() {
                if server.transport != c.common.transport {
                    check_one(&format!("client.servers.{i}"), &server.transport, path)?;
                }
            }
            Ok(())
        }
    }
}

/// [`check`] for one transport table, `side` naming where it is.
fn check_one(side: &str, transport: &TransportSettings, path: &Path) -> Result<(), Error> {
    let invalid =
        |key: String, message: String| Error::from(ConfigFile::new(path).invalid(key, message));
    if let Some(noise) = &transport.noise {
        noise::handshake_state(noise, side.starts_with("client")).map_err(|err| {
            let culprit = match err {
                noise::KeyError::Pattern => "pattern",
                noise::KeyError::LocalKey => "local_private_key",
                noise::KeyError::RemoteKey => "remote_public_key",
            };
            invalid(format!("{side}.transport.noise.{culprit}"), err.to_string())
        })?;
    }
    if let Some(tls) = &transport.tls {
        tls::check(tls).map_err(|err| {
            invalid(
                format!("{side}.transport.tls.{}", err.culprit()),
                labcore::exit::chain(&err),
            )
        })?;
    }
    Ok(())
}

/// A connection carrying tunnel traffic.
pub(crate) trait TunnelStream:
    AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static
{
    /// The TCP socket underneath (every transport runs over TCP): for socket options and for
    /// checking whether an idle connection was closed.
    fn tcp(&self) -> &TcpStream;

    /// The socket itself when the stream adds nothing on top of TCP, so bytes can be spliced.
    fn plain_tcp(&self) -> Option<&TcpStream>;

    /// The server calls this once the peer has proved its token or named an open session:
    /// limits that hold only before authentication are lifted.
    fn authenticated(&mut self) {}
}

impl TunnelStream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// A way of making tunnel connections.
pub(crate) trait Transport: Send + Sync + Sized + 'static {
    /// The connections it makes.
    type Stream: TunnelStream;

    /// The transport `[*.transport]` describes.
    fn new(settings: &TransportSettings) -> Result<Self, Error>;

    /// The plain TCP transport underneath: every transport listens and accepts with it, and
    /// adds its handshake on top.
    fn tcp(&self) -> &TcpTransport;

    /// Listens on `addr` (the server's control port).
    fn bind(&self, addr: &str) -> impl Future<Output = Result<TcpListener, Error>> + Send {
        self.tcp().bind(addr)
    }

    /// The address a listener is bound to.
    fn local_addr(listener: &TcpListener) -> Result<SocketAddr, Error> {
        TcpTransport::local_addr(listener)
    }

    /// Accepts the next TCP connection; cancel-safe.
    fn accept(
        &self,
        listener: &TcpListener,
    ) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send {
        self.tcp().accept(listener)
    }

    /// Runs the server side of the transport's handshake on an accepted connection.
    fn handshake(&self, tcp: TcpStream)
    -> impl Future<Output = Result<Self::Stream, Error>> + Send;

    /// Connects to the server at `addr` and runs the client side of the handshake.
    fn connect(&self, addr: &str) -> impl Future<Output = Result<Self::Stream, Error>> + Send;

    /// [`Transport::connect`] for a data channel. A stream that [`TunnelStream::plain_tcp`]
    /// gives may come without TCP keepalive, which the client's forwarding turns on once the
    /// channel outlives a short connection; other streams have it.
    fn connect_data(&self, addr: &str) -> impl Future<Output = Result<Self::Stream, Error>> + Send {
        self.connect(addr)
    }
}
