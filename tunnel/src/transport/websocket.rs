//! WebSocket, rathole's `type = "websocket"`: the tunnel's bytes in binary WebSocket messages,
//! over plain TCP (`[transport.websocket] tls = false`) or over the TLS transport (`tls =
//! true`, with the `[transport.tls]` settings), for networks that let only web traffic out.
//!
//! Wire behaviour, as rathole 0.5 has it: the client asks for `ws://REMOTE_ADDR/` (path `/`,
//! `Host` the server's `HOST:PORT`, the scheme `ws` even under TLS), the server accepts any
//! path; each write is one binary message and reads join messages back into a byte stream.
//! rathole refuses every other kind of message, so none is sent: no pings (TCP keepalive
//! still runs underneath). Ending a stream sends a Close frame. The WebSocket library is
//! tungstenite (the one the edge uses too).
//!
//! A WebSocket close ends both directions: after one side's Close, the other may not send
//! more, so a visitor that half-closes its connection gets no reply through this transport
//! (as with rathole's).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::tls::{TlsStream, TlsTransport};
use super::{TcpTransport, Transport, TunnelStream};
use crate::config::TransportSettings;
use crate::error::Error;

/// What a WebSocket runs over.
pub(crate) enum Carrier {
    /// `tls = false`.
    Plain(TcpStream),
    /// `tls = true`.
    Tls(Box<TlsStream>),
}

impl Carrier {
    fn tcp(&self) -> &TcpStream {
        match self {
            Carrier::Plain(tcp) => tcp,
            Carrier::Tls(tls) => tls.tcp(),
        }
    }
}

impl AsyncRead for Carrier {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Carrier::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Carrier::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Carrier {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Carrier::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Carrier::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Carrier::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Carrier::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Carrier::Plain(s) => s.is_write_vectored(),
            Carrier::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Carrier::Plain(s) => Pin::new(s).poll_flush(cx),
            Carrier::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Carrier::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Carrier::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A tunnel connection carried in WebSocket messages.
pub(crate) struct WebsocketStream {
    ws: WebSocketStream<Carrier>,
    /// The rest of the message being read.
    reading: Bytes,
    /// The peer's Close arrived (or the connection ended): reads return end of stream.
    ended: bool,
}

fn ws_error(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(err) => err,
        other => io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {other}")),
    }
}

impl AsyncRead for WebsocketStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.reading.is_empty() {
                let n = this.reading.len().min(buf.remaining());
                buf.put_slice(&this.reading[..n]);
                this.reading.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.reading = bytes,
                // The library answers pings itself; pongs need no answer.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.ended = true,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket: a text message where the tunnel sends only binary ones",
                    )));
                }
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => this.ended = true,
                Some(Err(err)) => return Poll::Ready(Err(ws_error(err))),
            }
        }
    }
}

impl AsyncWrite for WebsocketStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(err) => Poll::Ready(Err(ws_error(err))),
        }
    }
}

impl TunnelStream for WebsocketStream {
    fn tcp(&self) -> &TcpStream {
        self.ws.get_ref().tcp()
    }

    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// The WebSocket transport.
pub(crate) struct WebsocketTransport {
    tcp: TcpTransport,
    tls: Option<TlsTransport>,
}

fn config() -> WebSocketConfig {
    // Each message goes out as it is written, as rathole has it; forwarding writes 64 KiB
    // chunks, so that is one frame per chunk.
    WebSocketConfig::default().write_buffer_size(0)
}

fn handshake_failed(err: tungstenite::Error) -> Error {
    Error::Websocket {
        reason: format!("handshake failed: {err}"),
    }
}

impl Transport for WebsocketTransport {
    type Stream = WebsocketStream;

    fn new(settings: &TransportSettings) -> Result<WebsocketTransport, Error> {
        let websocket = settings.websocket.ok_or(Error::Unsupported {
            what: "type = \"websocket\" without [transport.websocket]".into(),
        })?;
        let tls = match (websocket.tls, &settings.tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(TlsTransport::with(TcpTransport::new(settings)?, tls)?),
            (true, None) => {
                return Err(Error::Unsupported {
                    what: "[transport.websocket] tls = true without [transport.tls]".into(),
                });
            }
        };
        Ok(WebsocketTransport {
            tcp: TcpTransport::new(settings)?,
            tls,
        })
    }

    fn tcp(&self) -> &TcpTransport {
        &self.tcp
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<WebsocketStream, Error> {
        let carrier = match &self.tls {
            Some(tls) => Carrier::Tls(Box::new(tls.accept_tls(tcp).await?)),
            None => Carrier::Plain(tcp),
        };
        let ws = tokio_tungstenite::accept_async_with_config(carrier, Some(config()))
            .await
            .map_err(handshake_failed)?;
        Ok(WebsocketStream {
            ws,
            reading: Bytes::new(),
            ended: false,
        })
    }

    async fn connect(&self, addr: &str) -> Result<WebsocketStream, Error> {
        let carrier = match &self.tls {
            Some(tls) => Carrier::Tls(Box::new(tls.connect_tls(addr).await?)),
            None => Carrier::Plain(self.tcp.connect(addr).await?),
        };
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            format!("ws://{addr}/"),
            carrier,
            Some(config()),
        )
        .await
        .map_err(handshake_failed)?;
        Ok(WebsocketStream {
            ws,
            reading: Bytes::new(),
            ended: false,
        })
    }
}
