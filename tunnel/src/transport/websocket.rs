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
//! Before the peer authenticates, the server reads at most [`PRE_AUTH_BYTES`] from it, the
//! HTTP upgrade and the hello and auth messages included (they take a few hundred bytes):
//! so no frame or message an unauthenticated peer announces, up to the library's 16 MiB
//! frames, is ever buffered past that. After the handshake the limit is lifted.
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

/// The most bytes the server reads from a peer before it authenticates: the HTTP upgrade
/// request (a few hundred bytes, more through a proxy that adds headers), the hello and the
/// auth in their frames (under a hundred).
pub(crate) const PRE_AUTH_BYTES: usize = 8 * 1024;

/// What a WebSocket runs over, and what may still be read from it before authentication.
pub(crate) struct Carrier {
    io: CarrierIo,
    /// `Some(n)`: n more bytes may be read before the peer authenticates.
    before_auth: Option<usize>,
}

/// The connection itself.
enum CarrierIo {
    /// `tls = false`.
    Plain(TcpStream),
    /// `tls = true`.
    Tls(Box<TlsStream>),
}

impl Carrier {
    fn tcp(&self) -> &TcpStream {
        match &self.io {
            CarrierIo::Plain(tcp) => tcp,
            CarrierIo::Tls(tls) => tls.tcp(),
        }
    }

    fn poll_read_io(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            CarrierIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            CarrierIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for Carrier {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(left) = this.before_auth else {
            return this.poll_read_io(cx, buf);
        };
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("WebSocket: more than {PRE_AUTH_BYTES} bytes before authentication"),
            )));
        }
        // Read through a small buffer so no more than `left` bytes are taken; this is only
        // the few hundred bytes of the handshake.
        let mut small = [0u8; 1024];
        let want = left.min(buf.remaining()).min(small.len());
        let mut limited = ReadBuf::new(&mut small[..want]);
        ready!(this.poll_read_io(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.put_slice(limited.filled());
        this.before_auth = Some(left - n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Carrier {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            CarrierIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            CarrierIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            CarrierIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            CarrierIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            CarrierIo::Plain(s) => s.is_write_vectored(),
            CarrierIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            CarrierIo::Plain(s) => Pin::new(s).poll_flush(cx),
            CarrierIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            CarrierIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            CarrierIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
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

    fn authenticated(&mut self) {
        self.ws.get_mut().before_auth = None;
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
        let io = match &self.tls {
            Some(tls) => CarrierIo::Tls(Box::new(tls.accept_tls(tcp).await?)),
            None => CarrierIo::Plain(tcp),
        };
        let carrier = Carrier {
            io,
            before_auth: Some(PRE_AUTH_BYTES),
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
        let io = match &self.tls {
            Some(tls) => CarrierIo::Tls(Box::new(tls.connect_tls(addr).await?)),
            None => CarrierIo::Plain(self.tcp.connect(addr).await?),
        };
        // The client trusts the server it chose: no limit on what it reads.
        let carrier = Carrier {
            io,
            before_auth: None,
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
