//! Plain TCP, rathole's `type = "tcp"`: no handshake, keepalive and TCP_NODELAY from
//! `[*.transport.tcp]`, and on the client the optional `proxy` ([`super::proxy`]). The other
//! transports run over this one. A client's data channels get keepalive late, if they last
//! ([`Transport::connect_data`]).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::Transport;
use crate::config::{ProxySettings, TcpSettings, TransportSettings};
use crate::error::Error;
use crate::sockopt;

/// The plain TCP transport.
#[derive(Clone, Debug)]
pub(crate) struct TcpTransport {
    settings: TcpSettings,
    proxy: Option<Arc<ProxySettings>>,
}

impl TcpTransport {
    /// Sets the options on a connection, or on a listener: Linux gives each connection it
    /// accepts the listener's TCP_NODELAY and keepalive settings, which spares the server
    /// four system calls per data channel.
    fn tune(&self, socket: &impl AsFd) {
        sockopt::nodelay(socket, self.settings.nodelay);
        self.keepalive(socket);
    }

    /// Turns on TCP keepalive on a connection, with the configured timings.
    pub(crate) fn keepalive(&self, socket: &impl AsFd) {
        sockopt::keepalive(
            socket,
            self.settings.keepalive_time,
            self.settings.keepalive_interval,
        );
    }

    /// Connects to `addr`, directly or through the proxy, with TCP_NODELAY as configured and,
    /// if `keepalive`, TCP keepalive.
    async fn connect_tcp(&self, addr: &str, keepalive: bool) -> Result<TcpStream, Error> {
        let stream = match &self.proxy {
            Some(proxy) => super::proxy::connect(proxy, addr).await?,
            None => TcpStream::connect(addr)
                .await
                .map_err(|e| Error::io(format!("connecting to {addr}"), e))?,
        };
        sockopt::nodelay(&stream, self.settings.nodelay);
        if keepalive {
            self.keepalive(&stream);
        }
        Ok(stream)
    }

    /// Whether the tunnel's connections have TCP_NODELAY set.
    pub(crate) fn nodelay(&self) -> bool {
        self.settings.nodelay
    }

    /// Listens on `addr` (the server's control port), with the options its connections get.
    pub(crate) async fn bind(&self, addr: &str) -> Result<TcpListener, Error> {
        let listener = sockopt::listen(addr).await.map_err(|source| Error::Bind {
            what: "the control channel".into(),
            addr: addr.to_owned(),
            source,
        })?;
        self.tune(&listener);
        // Every client speaks first here (rathole's hello, a TLS ClientHello, Noise's first
        // message, a WebSocket upgrade request): a data channel's connection and its hello
        // then wake the server once, not twice. A peer that connects and says nothing is
        // handed over after about a second, and the handshake timeout runs from then.
        sockopt::defer_accept(&listener, 1);
        Ok(listener)
    }

    /// The address a listener is bound to.
    pub(crate) fn local_addr(listener: &TcpListener) -> Result<SocketAddr, Error> {
        listener
            .local_addr()
            .map_err(|e| Error::io("reading the control port's address", e))
    }

    /// Accepts the next connection (tuned already: [`TcpTransport::bind`] tuned the
    /// listener); cancel-safe.
    pub(crate) async fn accept(
        &self,
        listener: &TcpListener,
    ) -> std::io::Result<(TcpStream, SocketAddr)> {
        listener.accept().await
    }
}

impl Transport for TcpTransport {
    type Stream = TcpStream;

    fn new(settings: &TransportSettings) -> Result<TcpTransport, Error> {
        Ok(TcpTransport {
            settings: settings.tcp,
            proxy: settings.proxy.clone().map(Arc::new),
        })
    }

    fn tcp(&self) -> &TcpTransport {
        self
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<TcpStream, Error> {
        Ok(tcp)
    }

    async fn connect(&self, addr: &str) -> Result<TcpStream, Error> {
        self.connect_tcp(addr, true).await
    }

    /// Without keepalive: most data channels carry one short connection and are closed long
    /// before a keepalive probe would be sent, so the three system calls that turn it on are
    /// made only for one that lasts (by the client's forwarding).
    async fn connect_data(&self, addr: &str) -> Result<TcpStream, Error> {
        self.connect_tcp(addr, false).await
    }
}
