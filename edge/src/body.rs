//! The body types every layer shares: what the edge sends to clients ([`Body`]), what it sends
//! to upstreams ([`UpBody`]), and the short plain-text answers it makes itself.
//!
//! A leaf: it uses no other module of the crate, so handler, proxy, pool, encode and the
//! access log can all build on it without depending on each other.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::http::{HeaderValue, Response, StatusCode, header};

/// Errors a response body can end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body the edge sends.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A plain-text response with a short body.
pub(crate) fn status_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Marks a response the edge made because no upstream answered: Caddy's reverse_proxy
/// returns an error there, which request metrics count as one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UpstreamFailed;

/// [`status_response`] marked [`UpstreamFailed`].
pub(crate) fn upstream_failed(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = status_response(status, text);
    response.extensions_mut().insert(UpstreamFailed);
    response
}

/// A client's request body: hyper's (HTTP/1.1 and HTTP/2) or any other (HTTP/3's streams,
/// `crate::h3`). An enum rather than a box so the HTTP/1.1 and HTTP/2 path stays a direct
/// call to hyper's body; errors are boxed, which costs only when a body fails.
pub(crate) enum ReqBody {
    /// From hyper.
    Hyper(Incoming),
    /// From elsewhere (HTTP/3). In a mutex only to be `Sync` as hyper's body is (directives
    /// hold the request across awaits); polling takes `&mut` and never locks.
    Other(std::sync::Mutex<UnsyncBoxBody<Bytes, BoxError>>),
}

impl ReqBody {
    /// `body` as a request body.
    pub(crate) fn other(body: UnsyncBoxBody<Bytes, BoxError>) -> ReqBody {
        ReqBody::Other(std::sync::Mutex::new(body))
    }
}

impl std::fmt::Debug for ReqBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqBody::Hyper(body) => body.fmt(f),
            ReqBody::Other(_) => f.write_str("ReqBody::Other"),
        }
    }
}

impl HttpBody for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Hyper(body) => std::pin::Pin::new(body).poll_frame(cx).map_err(Into::into),
            ReqBody::Other(body) => match body.get_mut() {
                Ok(body) => std::pin::Pin::new(body).poll_frame(cx),
                Err(_) => std::task::Poll::Ready(Some(Err("request body poisoned".into()))),
            },
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(body) => body.is_end_stream(),
            ReqBody::Other(body) => body.lock().map_or(true, |b| b.is_end_stream()),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Hyper(body) => body.size_hint(),
            ReqBody::Other(body) => body
                .lock()
                .map_or_else(|_| SizeHint::new(), |b| b.size_hint()),
        }
    }
}

/// A request body sent upstream: the client's, streamed, or none (so a request without a
/// body can be sent again to the next upstream).
pub(crate) enum UpBody {
    /// The client's body.
    Client(ReqBody),
    /// The client's body under `request_body max_size`.
    Capped(Capped),
    /// No body.
    Empty,
}

/// A client body that fails once more than its limit has come (`request_body max_size`),
/// checked frame by frame as it streams, so nothing past the limit is ever held; the flag
/// tells whoever sent it why the exchange failed.
pub(crate) struct Capped {
    inner: ReqBody,
    left: u64,
    over: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Capped {
    /// `inner`, cut after `limit` bytes; `over` is set when it is.
    pub(crate) fn new(
        inner: ReqBody,
        limit: u64,
        over: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Capped {
        Capped {
            inner,
            left: limit,
            over,
        }
    }
}

/// Whether a request declares a body longer than `limit` (its Content-Length).
pub(crate) fn declares_over(headers: &hyper::http::HeaderMap, limit: u64) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > limit)
}

/// The answer to a body over `request_body max_size`: 413, no body, the connection closed
/// (the rest of the body is never read), as Caddy answers.
pub(crate) fn too_large() -> Response<Body> {
    let mut response = Response::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

impl HttpBody for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        match self.get_mut() {
            UpBody::Client(body) => std::pin::Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpBody::Capped(capped) => {
                let frame = match std::pin::Pin::new(&mut capped.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => frame,
                    other => return other.map_err(Into::into),
                };
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > capped.left {
                        capped.left = 0;
                        capped
                            .over
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        return Poll::Ready(Some(Err("request body too large".into())));
                    }
                    capped.left -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            UpBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Client(body) => body.is_end_stream(),
            UpBody::Capped(capped) => capped.inner.is_end_stream(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Client(body) => body.size_hint(),
            UpBody::Capped(capped) => capped.inner.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}
