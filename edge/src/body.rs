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

/// A request body sent upstream: the client's, streamed, or none (so a request without a
/// body can be sent again to the next upstream).
pub(crate) enum UpBody {
    /// The client's body.
    Client(Incoming),
    /// No body.
    Empty,
}

impl HttpBody for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Client(body) => std::pin::Pin::new(body).poll_frame(cx),
            UpBody::Empty => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Client(body) => body.is_end_stream(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Client(body) => body.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}
