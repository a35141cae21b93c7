//! HTTP/3: the QUIC transport settings of the edge's UDP listeners (quinn) and the serving
//! of one QUIC connection's requests (h3) through the same [`handler::handle`] as HTTP/1.1
//! and HTTP/2, so routing, limits, the access log and reloads behave alike.
//!
//! Invariants: what a client can make the edge hold is bounded by the transport settings
//! (concurrent request streams, the receive windows for uploads, the send window for
//! downloads, the request head size) and the idle and header timeouts, whatever it sends.
//! 0-RTT is never accepted (rustls' `max_early_data_size` stays 0): early data can be
//! replayed. A drain sends GOAWAY, lets the requests already taken finish, then closes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::error::Code;
use h3::server::{RequestResolver, RequestStream};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame};
use hyper::http::{Response, Version, header};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{BoxError, ReqBody};
use crate::config::Limits;
use crate::handler::{self, Conn};

/// The ALPN protocol of HTTP/3.
pub(crate) const ALPN: &[u8] = b"h3";

/// What one request stream may have received and not yet been read: with the connection's
/// window below, what uploads can make the edge buffer per connection.
const STREAM_WINDOW: u32 = 1 << 20;
/// What all of a connection's streams may have received and not yet been read.
const CONN_WINDOW: u32 = 4 << 20;
/// Response bytes sent and not yet acknowledged, per connection: a download streams through
/// this much memory however large it is (2 MiB keeps a 50 ms path at about 300 Mbit/s).
const SEND_WINDOW: u64 = 2 << 20;
/// Unidirectional streams a client may open at once: HTTP/3 needs three (control, QPACK
/// encoder and decoder); the rest leaves room for reserved (grease) stream types.
const UNI_STREAMS: u32 = 8;

type H3Conn = h3::server::Connection<h3_quinn::Connection, Bytes>;
type Resolver = RequestResolver<h3_quinn::Connection, Bytes>;

/// The QUIC server config: TLS 1.3 from `tls` (its ALPN must be `h3`) with the transport
/// bounds of `limits`.
pub(crate) fn server_config(
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
) -> Result<quinn::ServerConfig, String> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| format!("QUIC TLS config: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(limits)));
    Ok(config)
}

fn transport(limits: &Limits) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(limits.h2_max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(UNI_STREAMS))
        .max_idle_timeout(IdleTimeout::try_from(limits.idle_timeout).ok())
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONN_WINDOW))
        .send_window(SEND_WINDOW);
    t
}

/// Serves the requests of `connection` (handshake done) until the client closes it, it is
/// idle for `limits.idle_timeout`, or `drain` asks it to finish.
pub(crate) async fn serve(
    connection: quinn::Connection,
    conn: Arc<Conn>,
    limits: Arc<Limits>,
    drain: CancellationToken,
) {
    let peer = conn.peer;
    let quic = connection.clone();
    let mut h3conn: H3Conn = match h3::server::builder()
        .max_field_section_size(limits.max_header_bytes as u64)
        .build(h3_quinn::Connection::new(connection))
        .await
    {
        Ok(c) => c,
        Err(err) => {
            tracing::info!(%peer, error = %err, "HTTP/3 connection setup failed");
            return;
        }
    };
    let requests = TaskTracker::new();
    let mut ticks = tokio::time::interval(limits.idle_timeout);
    ticks.tick().await;
    let mut seen = conn.requests.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            accepted = h3conn.accept() => match accepted {
                Ok(Some(resolver)) => {
                    requests.spawn(request(resolver, conn.clone(), limits.header_read_timeout));
                }
                Ok(None) => break,
                Err(err) => {
                    if !err.is_h3_no_error() {
                        tracing::debug!(%peer, error = %err, "HTTP/3 connection ended");
                    }
                    break;
                }
            },
            _ = drain.cancelled() => {
                let _ = h3conn.shutdown(0).await;
                break;
            }
            _ = ticks.tick() => {
                let now = conn.requests.load(Ordering::Relaxed);
                if now == seen && conn.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(%peer, "idle HTTP/3 connection closed");
                    let _ = h3conn.shutdown(0).await;
                    break;
                }
                seen = now;
            }
        }
    }
    requests.close();
    requests.wait().await;
    // H3_NO_ERROR: everything taken has been answered.
    quic.close(VarInt::from_u32(0x100), b"");
    drop(h3conn);
}

/// One request stream: its head (within `header_timeout`), the handler, the response.
async fn request(resolver: Resolver, conn: Arc<Conn>, header_timeout: Duration) {
    let (head, stream) =
        match tokio::time::timeout(header_timeout, resolver.resolve_request()).await {
            Ok(Ok(resolved)) => resolved,
            Ok(Err(err)) => {
                tracing::debug!(peer = %conn.peer, error = %err, "unusable HTTP/3 request");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %conn.peer, "HTTP/3 request head timed out");
                return;
            }
        };
    let (mut send, recv) = stream.split();
    let body = RecvBody {
        recv,
        state: Reading::Data,
    };
    let (mut parts, ()) = head.into_parts();
    parts.version = Version::HTTP_3;
    let req = hyper::Request::from_parts(parts, ReqBody::other(body.boxed_unsync()));
    let Ok(response) = handler::handle(req, conn).await else {
        // The abort directive: the stream ends unanswered.
        send.stop_stream(Code::H3_REQUEST_CANCELLED);
        return;
    };
    let (mut parts, body) = response.into_parts();
    // Connection-specific fields are malformed in HTTP/3 (RFC 9114, 4.2).
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        parts.headers.remove(name);
    }
    if send
        .send_response(Response::from_parts(parts, ()))
        .await
        .is_err()
    {
        return;
    }
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) => {
                // The body failed midway (an upstream went away): the client must not take
                // the truncated body for the whole.
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return;
            }
        };
        let sent = match frame.into_data() {
            Ok(data) if data.is_empty() => Ok(()),
            Ok(data) => send.send_data(data).await,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => send.send_trailers(trailers).await,
                Err(_) => Ok(()),
            },
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = send.finish().await;
}

/// A request's body as it arrives on its stream, then its trailers.
struct RecvBody {
    recv: RequestStream<h3_quinn::RecvStream, Bytes>,
    state: Reading,
}

/// Where a [`RecvBody`] is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    Data,
    Trailers,
    Done,
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.state == Reading::Data {
            match this.recv.poll_recv_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => {
                    this.state = Reading::Done;
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Ready(Ok(Some(mut data))) => {
                    let len = data.remaining();
                    return Poll::Ready(Some(Ok(Frame::data(data.copy_to_bytes(len)))));
                }
                Poll::Ready(Ok(None)) => this.state = Reading::Trailers,
            }
        }
        if this.state == Reading::Done {
            return Poll::Ready(None);
        }
        let polled = this.recv.poll_recv_trailers(cx);
        if polled.is_ready() {
            this.state = Reading::Done;
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == Reading::Done
    }
}
