//! Response compression (`encode zstd gzip`): negotiation with `Accept-Encoding`, the rules for
//! what is worth compressing, and the streaming encoder.
//!
//! Bodies are compressed as they stream through (async-compression over the body's data
//! stream), never collected; memory per response is the encoder's window plus one buffer.

use bytes::Bytes;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Frame;
use hyper::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::body::{Body, BoxError};

/// An encoding the edge can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// zstd (RFC 8878).
    Zstd,
    /// gzip.
    Gzip,
}

impl Encoding {
    /// The token in `Accept-Encoding` and `Content-Encoding`.
    pub(crate) fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }
}

/// A site's `encode` settings.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Encode {
    /// Encodings in preference order.
    pub(crate) encodings: Vec<Encoding>,
    /// Smaller responses (by Content-Length) stay as they are.
    pub(crate) minimum_length: u64,
}

impl Encode {
    /// The encoding to use for a client sending `accept`: ours in preference order, if the
    /// client accepts it with a non-zero q.
    pub(crate) fn negotiate(&self, accept: Option<&HeaderValue>) -> Option<Encoding> {
        let accept = accept?.to_str().ok()?;
        self.encodings.iter().copied().find(|enc| {
            accept.split(',').any(|item| {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or("").trim();
                let q = parts
                    .find_map(|p| p.trim().strip_prefix("q="))
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0);
                (name.eq_ignore_ascii_case(enc.token()) || name == "*") && q > 0.0
            })
        })
    }

    /// Whether a response is worth compressing: a body-carrying status, not already encoded,
    /// a compressible type, and not known to be small.
    pub(crate) fn wants(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PARTIAL_CONTENT
            || headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
        {
            return false;
        }
        let small = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|len| len < self.minimum_length);
        if small {
            return false;
        }
        let Some(kind) = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let kind = kind
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        kind.starts_with("text/")
            || kind.ends_with("+json")
            || kind.ends_with("+xml")
            || matches!(
                kind.as_str(),
                "application/json"
                    | "application/javascript"
                    | "application/xml"
                    | "application/wasm"
                    | "application/x-javascript"
                    | "application/xhtml+xml"
                    | "image/svg+xml"
            )
    }
}

/// Compresses a response's body with `encoding`, fixing its headers.
pub(crate) fn compress(response: Response<Body>, encoding: Encoding) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::ACCEPT_RANGES);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(encoding.token()),
    );
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    // A strong validator no longer names these bytes.
    if let Some(etag) = parts
        .headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        && !etag.starts_with("W/")
        && let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}"))
    {
        parts.headers.insert(header::ETAG, weak);
    }
    let data = BodyStream::new(body).filter_map_data();
    let reader = StreamReader::new(data);
    let body: Body = match encoding {
        Encoding::Zstd => frames(async_compression::tokio::bufread::ZstdEncoder::new(reader)),
        Encoding::Gzip => frames(async_compression::tokio::bufread::GzipEncoder::new(reader)),
    };
    Response::from_parts(parts, body)
}

fn frames<R: tokio::io::AsyncRead + Send + 'static>(reader: R) -> Body {
    use futures_util::TryStreamExt;
    let stream = ReaderStream::with_capacity(reader, 16 * 1024)
        .map_ok(Frame::data)
        .map_err(|e| Box::new(e) as BoxError);
    StreamBody::new(stream).boxed_unsync()
}

/// Turns a body stream's frames into data chunks for a reader (trailers are dropped).
trait FilterMapData {
    fn filter_map_data(self) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send;
}

impl<S> FilterMapData for S
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send,
{
    fn filter_map_data(self) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
        use futures_util::StreamExt;
        self.filter_map(|frame| async move {
            match frame {
                Ok(frame) => frame.into_data().ok().map(Ok),
                Err(err) => Some(Err(std::io::Error::other(err))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode() -> Encode {
        Encode {
            encodings: vec![Encoding::Zstd, Encoding::Gzip],
            minimum_length: 512,
        }
    }

    #[test]
    fn negotiation_follows_our_preference_and_the_clients_q_values() {
        let e = encode();
        let accept = |v: &'static str| e.negotiate(Some(&HeaderValue::from_static(v)));
        assert_eq!(accept("gzip, deflate, br, zstd"), Some(Encoding::Zstd));
        assert_eq!(accept("gzip"), Some(Encoding::Gzip));
        assert_eq!(accept("zstd;q=0, gzip;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(accept("br"), None);
        assert_eq!(e.negotiate(None), None);
    }

    #[test]
    fn only_sizeable_compressible_unencoded_bodies_are_compressed() {
        let e = encode();
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        assert!(e.wants(StatusCode::OK, &h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        assert!(!e.wants(StatusCode::OK, &h));
        h.remove(header::CONTENT_LENGTH);
        assert!(!e.wants(StatusCode::NOT_MODIFIED, &h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        assert!(!e.wants(StatusCode::OK, &h));
    }

    proptest::proptest! {
        /// Accept-Encoding is untrusted: any value is handled without a panic, and an encoding
        /// the client did not name (nor `*`) is never chosen.
        #[test]
        fn any_accept_encoding_is_handled(text in "[ -~]{0,80}") {
            if let Ok(value) = HeaderValue::from_str(&text) {
                let chosen = encode().negotiate(Some(&value));
                let lower = text.to_ascii_lowercase();
                let named = |e: Encoding| lower.contains('*') || lower.contains(e.token());
                proptest::prop_assert!(chosen.is_none_or(named), "{:?} for {:?}", chosen, text);
            }
        }
    }
}
