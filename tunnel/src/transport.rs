//! Transports: how the tunnel's own connections (control and data channels) are made.
//!
//! The server and client are generic over [`Transport`], which binds, accepts and connects and
//! hands back a [`TunnelStream`]. Forwarding never looks inside a transport: it copies between
//! any [`TunnelStream`] and a local TCP socket, and asks [`TunnelStream::plain_tcp`] whether
//! the kernel may move the bytes itself (`splice(2)`). The implementations: [`TcpTransport`]
//! (which also reaches the server through a client's `proxy`, [`proxy`]), [`NoiseTransport`],
//! [`TlsTransport`] and [`WebsocketTransport`] (over TCP or TLS), each over TCP, selected by
//! `transport.type` in one place ([`crate::run`]).

pub(crate) mod noise;
pub(crate) mod proxy;
mod tcp;
pub(crate) mod tls;
pub(crate) mod websocket;

use std::future::Future;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::config::TransportSettings;
use crate::error::Error;

pub(crate) use noise::NoiseTransport;
pub(crate) use tcp::TcpTransport;
pub(crate) use tls::TlsTransport;
pub(crate) use websocket::WebsocketTransport;

/// A connection carrying tunnel traffic.
pub(crate) trait TunnelStream:
    AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static
{
    /// The TCP socket underneath (every transport runs over TCP): for socket options and for
    /// checking whether an idle connection was closed.
    fn tcp(&self) -> &TcpStream;

    /// The socket itself when the stream adds nothing on top of TCP, so bytes can be spliced.
    fn plain_tcp(&self) -> Option<&TcpStream>;
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
}
