//! HTTP/1.1 exchanges with upstreams, driven by the request's own task.
//!
//! hyper's client connection hands each request through a channel to its dispatcher, the
//! response back through a oneshot and the body through a third channel; even polled on the
//! request's task (`pool`), that machinery and its allocations were about 18,000 of the
//! 53,000 instructions of a proxied request (callgrind, `scripts/bench/edge-cost`). Here the
//! task writes the request head into the connection's own buffer, reads the response into
//! another and hands body bytes straight out of it; a kept-alive connection's buffers are
//! reused, so a small exchange allocates nothing here but its response header map.
//!
//! Scope: one exchange at a time per connection (no pipelining); request bodies framed by
//! Content-Length or chunked, sent while the response is read (an upstream may answer
//! before it has read the body, or stream it back); responses framed by Content-Length,
//! chunked (trailers kept) or the connection's close; interim 1xx responses skipped.
//! Upgrades (WebSocket) and HTTP/2 stay on hyper (`pool`).
//!
//! Framing is never ambiguous upstream: a request carries exactly one of Content-Length and
//! Transfer-Encoding, or neither when it has no body; a response with both is read as
//! chunked, loses its Content-Length and closes its connection (RFC 9112 section 6.3).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::http::{Version, header, request};
use tokio::io::AsyncWrite;

use crate::body::{BoxError, UpBody};
use crate::transport::Stream;

/// hyper's default limit on a response head (its read buffer's largest size).
pub(crate) const DEFAULT_MAX_HEAD: usize = 8192 + 4096 * 100;
/// Header slots tried first; a head with more is parsed again with [`MAX_HEADERS`].
const FEW_HEADERS: usize = 32;
/// Most header fields in one response head, as hyper's client allows.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Read size while a message is small; reads grow to [`MAX_READ`] while they fill.
const MIN_READ: usize = 8192;
const MAX_READ: usize = 64 * 1024;
/// Largest buffer an idle connection keeps.
const IDLE_BUFFER: usize = 16 * 1024;
/// Most bytes of chunk extensions, and of trailers, in one response (hyper's limits).
const MAX_EXTENSIONS: usize = 16 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// An open HTTP/1.1 connection to an upstream, idle or carrying one exchange.
pub(crate) struct Conn {
    io: Stream,
    /// Bytes read and not consumed yet.
    read: BytesMut,
    /// Bytes to write: the request head, then framed body chunks.
    write: Vec<u8>,
    /// How much of `write` is written.
    written: usize,
    /// Largest response head accepted.
    max_head: usize,
    /// Size of the next read (adaptive).
    read_size: usize,
    /// Whether a byte of the current exchange has been written.
    wrote: bool,
}

impl Conn {
    /// A connection over `io`, taking response heads up to `max_head` bytes.
    pub(crate) fn new(io: Stream, max_head: usize) -> Conn {
        Conn {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            written: 0,
            max_head,
            read_size: MIN_READ,
            wrote: false,
        }
    }

    /// Whether an idle connection can carry a request: nothing has arrived on it (an
    /// upstream that closed it, or sent bytes nobody asked for, makes it unusable).
    pub(crate) fn usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.read.reserve(1);
        !matches!(
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read),
            Poll::Ready(_)
        )
    }

    /// Reads what the stream has into `read`: `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < self.read_size / 2 {
            self.read.reserve(self.read_size);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.read
        ))?;
        if n >= self.read_size && self.read_size < MAX_READ {
            self.read_size *= 2;
        } else if n < MIN_READ / 2 {
            self.read_size = MIN_READ;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes out `write`, then flushes.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.write.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.wrote = true;
        }
        self.write.clear();
        self.written = 0;
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

/// How a request body is framed upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    /// This many bytes are still to come.
    Length(u64),
    Chunked,
}

/// The request side of an exchange.
enum Sending {
    /// The body's frames go out as they come.
    Body(UpBody, Out),
    /// All of it is in the write buffer.
    Flushing,
    Done,
    /// A write failed: the response may still come (an upstream that answered early and
    /// closed); the connection will not carry another request.
    Failed(io::Error),
}

/// How the response body is framed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum In {
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes.
    Close,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// What the read buffer held.
enum Parsed {
    Final(Response<()>),
    /// An interim (1xx) response, consumed.
    Interim,
    /// Not a whole head yet.
    Partial,
}

/// Why an exchange failed.
pub(crate) struct Failed {
    pub(crate) error: BoxError,
    /// The request, when another connection may take it: it had no body, the connection had
    /// carried earlier requests and closed before any byte of a response came, and either
    /// nothing of it was written or it may be sent twice ([`replayable`]).
    pub(crate) unsent: Option<Request<UpBody>>,
}

impl std::fmt::Debug for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failed")
            .field("error", &self.error)
            .field("unsent", &self.unsent.is_some())
            .finish()
    }
}

fn failed(error: impl Into<BoxError>) -> Failed {
    Failed {
        error: error.into(),
        unsent: None,
    }
}

fn bad(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// One request and its response on a [`Conn`]: returned with the response head, it reads the
/// response body (and sends what is left of the request body) as it is polled.
pub(crate) struct Exchange {
    conn: Conn,
    sending: Sending,
    body: In,
    /// The connection may carry another request once this exchange has ended: false from
    /// the start when the request says `Connection: close` (a header_up can).
    keep_alive: bool,
    /// Bytes of chunk extensions read in this response (bounded, as hyper bounds them).
    extensions: usize,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("body", &self.body)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

/// Sends `req` (origin-form URI, Host set) on `conn` and reads the response head.
/// `reused`: the connection carried requests before, so an upstream may have closed it
/// while it was idle.
pub(crate) async fn send(
    conn: Conn,
    req: Request<UpBody>,
    reused: bool,
) -> Result<Response<Exchange>, Failed> {
    let (mut parts, mut body) = req.into_parts();
    let mut conn = conn;
    // A body of unknown length may be empty after all (an HTTP/2 or HTTP/3 GET whose end
    // comes after its head): one poll tells, so it goes without a chunked framing.
    let mut probe = Probe::None;
    if !body.is_end_stream()
        && !parts.headers.contains_key(header::TRANSFER_ENCODING)
        && content_length(&parts.headers).is_none()
        && body.size_hint().exact().is_none()
    {
        probe = match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)))
            .await
        {
            Poll::Ready(None) => {
                body = UpBody::Empty;
                Probe::None
            }
            Poll::Ready(Some(Ok(frame))) => Probe::Data(frame.into_data().unwrap_or_default()),
            Poll::Ready(Some(Err(err))) => return Err(failed(err)),
            Poll::Pending => Probe::Pending,
        };
    }
    let mut out = match frame_request(&mut parts, &body, &probe) {
        Ok(out) => out,
        Err(err) => return Err(failed(err)),
    };
    encode_head(&parts, &mut conn.write);
    conn.wrote = false;
    if let (Probe::Data(data), Some(out)) = (&probe, &mut out)
        && let Err(err) = put_data(&mut conn.write, out, data)
    {
        return Err(failed(err));
    }
    let head_only = out.is_none();
    let asks_close = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"close"));
    let mut ex = Exchange {
        conn,
        sending: match out {
            None | Some(Out::Length(0)) => Sending::Flushing,
            Some(out) => Sending::Body(body, out),
        },
        body: In::Done,
        keep_alive: !asks_close,
        extensions: 0,
    };
    let mut got_any = false;
    let head = std::future::poll_fn(|cx| ex.poll_head(cx, &parts.method, &mut got_any)).await;
    match head {
        Ok(response) => Ok(response.map(|()| ex)),
        Err(error) => {
            // Sent again only if the upstream cannot have acted on it: nothing of it was
            // written, or it is a request that may be repeated (as Go's transport decides).
            let again = reused
                && head_only
                && !got_any
                && (!ex.conn.wrote || replayable(&parts.method, &parts.headers));
            Err(Failed {
                error,
                unsent: again.then(|| Request::from_parts(parts, UpBody::Empty)),
            })
        }
    }
}

/// What one poll of a request body of unknown length gave.
enum Probe {
    /// Not polled (or it had ended: the body is empty now).
    None,
    Pending,
    /// Its first data.
    Data(Bytes),
}

/// Whether a request may be sent twice without harm.
fn replayable(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || headers.contains_key("idempotency-key")
        || headers.contains_key("x-idempotency-key")
}

/// Decides how the request body goes upstream and makes its headers say so. `None`: no body.
fn frame_request(
    parts: &mut request::Parts,
    body: &UpBody,
    probe: &Probe,
) -> Result<Option<Out>, io::Error> {
    let headers = &mut parts.headers;
    if body.is_end_stream() {
        headers.remove(header::TRANSFER_ENCODING);
        if let Some(len) = headers.get(header::CONTENT_LENGTH)
            && len.as_bytes() != b"0"
        {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        return Ok(None);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Only a header_up can have put it there (hop-by-hop headers are stripped); its last
        // coding is made chunked so the upstream reads the body as it is sent.
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        return Ok(Some(Out::Chunked));
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        match content_length(headers) {
            Some(n) => {
                // One value, not a list of equal ones some upstreams refuse.
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                return Ok(Some(Out::Length(n)));
            }
            // Only a header_up can have made it unreadable: the body's own length counts.
            None => {
                headers.remove(header::CONTENT_LENGTH);
            }
        }
    }
    if let Some(n) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        return Ok(Some(Out::Length(n)));
    }
    // A GET, HEAD or CONNECT whose body has not shown any data goes without one, as hyper's
    // client sends it.
    if matches!(probe, Probe::Pending)
        && matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT)
    {
        return Ok(None);
    }
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Ok(Some(Out::Chunked))
}

/// Appends `data` to `write`, framed for `out`.
fn put_data(write: &mut Vec<u8>, out: &mut Out, data: &[u8]) -> Result<(), BoxError> {
    if data.is_empty() {
        return Ok(());
    }
    match out {
        Out::Length(left) => {
            let len = data.len() as u64;
            if len > *left {
                return Err("the request body is longer than its Content-Length".into());
            }
            *left -= len;
            write.extend_from_slice(data);
        }
        Out::Chunked => {
            use std::io::Write as _;
            let _ = write!(write, "{:x}\r\n", data.len());
            write.extend_from_slice(data);
            write.extend_from_slice(b"\r\n");
        }
    }
    Ok(())
}

/// The one length every Content-Length field (and comma-separated value) gives, if they agree.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut found = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(m) if m != n => return None,
                _ => found = Some(n),
            }
        }
    }
    found
}

fn encode_head(parts: &request::Parts, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

impl Exchange {
    /// Sends what it can of the request. `Ready(Err)` only for a request body that failed
    /// (the exchange cannot go on); a failed write is kept in `sending`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.sending {
                Sending::Done | Sending::Failed(_) => return Poll::Ready(Ok(())),
                Sending::Flushing => {
                    return match self.conn.poll_write_out(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Ok(())) => {
                            self.sending = Sending::Done;
                            Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Err(err)) => {
                            self.sending = Sending::Failed(err);
                            Poll::Ready(Ok(()))
                        }
                    };
                }
                Sending::Body(body, out) => {
                    // Write out what is buffered before taking more.
                    if !self.conn.write.is_empty() {
                        match self.conn.poll_write_out(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(err)) => {
                                self.sending = Sending::Failed(err);
                                return Poll::Ready(Ok(()));
                            }
                        }
                    }
                    let frame = match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Err(err))) => {
                            self.sending = Sending::Failed(io::Error::other("request body failed"));
                            return Poll::Ready(Err(err));
                        }
                        Poll::Ready(Some(Ok(frame))) => frame,
                        Poll::Ready(None) => {
                            // A body of known length left this state at its last byte.
                            match *out {
                                Out::Length(_) => {
                                    self.sending = Sending::Failed(io::Error::other(
                                        "request body shorter than its Content-Length",
                                    ));
                                    return Poll::Ready(Err(
                                        "the request body ended before its Content-Length".into(),
                                    ));
                                }
                                Out::Chunked => self.conn.write.extend_from_slice(b"0\r\n\r\n"),
                            }
                            self.sending = Sending::Flushing;
                            continue;
                        }
                    };
                    // Trailers of a request are not sent (nor by hyper's client).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if let Err(err) = put_data(&mut self.conn.write, out, &data) {
                        self.sending =
                            Sending::Failed(io::Error::other("request body longer than declared"));
                        return Poll::Ready(Err(err));
                    }
                    // A body of known length is all sent when its last byte is, whether or
                    // not its end has been seen yet.
                    if *out == Out::Length(0) {
                        self.sending = Sending::Flushing;
                    }
                }
            }
        }
    }

    /// Sends the request and reads until a final response head.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        got_any: &mut bool,
    ) -> Poll<Result<Response<()>, BoxError>> {
        if let Poll::Ready(Err(err)) = self.poll_send(cx) {
            return Poll::Ready(Err(err));
        }
        // A write that timed out (`write_timeout`) ends the exchange; after any other failed
        // write the response may still be there to read.
        if matches!(&self.sending, Sending::Failed(err) if err.kind() == io::ErrorKind::TimedOut)
            && let Sending::Failed(err) = std::mem::replace(&mut self.sending, Sending::Done)
        {
            return Poll::Ready(Err(err.into()));
        }
        loop {
            while !self.conn.read.is_empty() {
                *got_any = true;
                match self.parse_head(method)? {
                    Parsed::Final(response) => return Poll::Ready(Ok(response)),
                    Parsed::Interim => {}
                    Parsed::Partial if self.conn.read.len() >= self.conn.max_head => {
                        return Poll::Ready(Err(bad("the response head is too large").into()));
                    }
                    Parsed::Partial => break,
                }
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(
                        match std::mem::replace(&mut self.sending, Sending::Done) {
                            Sending::Failed(err) => err.into(),
                            _ => io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the upstream closed the connection before a response",
                            )
                            .into(),
                        },
                    ));
                }
                Ok(_) => {}
                Err(err) => return Poll::Ready(Err(err.into())),
            }
        }
    }

    /// Parses a response head from the read buffer.
    fn parse_head(&mut self, method: &Method) -> Result<Parsed, BoxError> {
        let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
        let mut many;
        let mut parsed = httparse::Response::new(&mut few);
        let status = match parsed.parse(&self.conn.read) {
            Err(httparse::Error::TooManyHeaders) => {
                many = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
                parsed = httparse::Response::new(&mut many);
                parsed.parse(&self.conn.read)
            }
            other => other,
        };
        let len = match status {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(err) => return Err(bad_head(err).into()),
        };
        if len > self.conn.max_head {
            return Err(bad("the response head is too large").into());
        }
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| bad("a bad response status"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(bad("a 101 response to a request that asked for no upgrade").into());
            }
            self.conn.read.advance(len);
            return Ok(Parsed::Interim);
        }
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let mut headers = HeaderMap::with_capacity(parsed.headers.len());
        let (mut close, mut keep) = (false, false);
        let mut chunked = None;
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| bad("a bad response header name"))?;
            let value =
                HeaderValue::from_bytes(h.value).map_err(|_| bad("a bad response header value"))?;
            if name == header::CONNECTION {
                close |= has_token(h.value, b"close");
                keep |= has_token(h.value, b"keep-alive");
            } else if name == header::TRANSFER_ENCODING {
                chunked = Some(last_token_is(h.value, b"chunked"));
            }
            headers.append(name, value);
        }
        self.conn.read.advance(len);
        // HTTP/1.1 keeps the connection unless told to close it, HTTP/1.0 only when asked to;
        // a CONNECT's connection becomes a tunnel (or is refused): never pooled.
        let mut close =
            close || (version != Version::HTTP_11 && !keep) || *method == Method::CONNECT;
        let no_body = *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || (*method == Method::CONNECT && status.is_success());
        self.body = if no_body {
            In::Done
        } else if let Some(chunked) = chunked {
            if headers.remove(header::CONTENT_LENGTH).is_some() {
                close = true;
            }
            if version != Version::HTTP_11 {
                return Err(bad("an HTTP/1.0 response with a Transfer-Encoding").into());
            }
            if chunked {
                In::Chunked(Chunk::Size)
            } else {
                close = true;
                In::Close
            }
        } else if headers.contains_key(header::CONTENT_LENGTH) {
            match content_length(&headers) {
                Some(n) => In::Length(n),
                None => return Err(bad("the response's Content-Length is not one number").into()),
            }
        } else {
            close = true;
            In::Close
        };
        if self.body == In::Length(0) {
            self.body = In::Done;
        }
        self.keep_alive &= !close;
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(Parsed::Final(response))
    }

    /// The connection, when the exchange has ended cleanly and it can carry another.
    pub(crate) fn into_conn(self) -> Option<Conn> {
        if !(self.keep_alive
            && self.body == In::Done
            && matches!(self.sending, Sending::Done)
            && self.conn.read.is_empty())
        {
            return None;
        }
        let mut conn = self.conn;
        // An idle connection keeps no more than a small exchange needs.
        if conn.write.capacity() > IDLE_BUFFER {
            conn.write = Vec::new();
        }
        if conn.read.capacity() > IDLE_BUFFER {
            conn.read = BytesMut::new();
        }
        conn.read_size = MIN_READ;
        Some(conn)
    }

    /// Finishes sending the request once the response has ended (an upstream may answer
    /// before it has read all of a body): whether it is all sent, without waiting.
    fn finish_sending(&mut self, cx: &mut Context<'_>) {
        if !matches!(self.sending, Sending::Done | Sending::Failed(_)) {
            let _ = self.poll_send(cx);
        }
    }

    /// The next piece of the response body, reading (and sending) as needed.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(Err(err)) = self.poll_send(cx) {
            return self.fail(err);
        }
        loop {
            match self.take_frame() {
                Ok(None) if self.body != In::Done => {}
                Ok(frame) => {
                    if self.body == In::Done {
                        self.finish_sending(cx);
                    }
                    return Poll::Ready(frame.map(Ok));
                }
                Err(err) => return self.fail(err.into()),
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) if self.body == In::Close => {
                    self.body = In::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return self.fail(
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upstream closed the connection before the end of the response body",
                        )
                        .into(),
                    );
                }
                Ok(_) => {}
                Err(err) => return self.fail(err.into()),
            }
        }
    }

    /// Ends the body with `err`; the connection carries nothing more.
    fn fail(&mut self, err: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.body = In::Done;
        self.keep_alive = false;
        Poll::Ready(Some(Err(err)))
    }

    /// A frame from what is buffered: `Ok(None)` when more must be read first (or the body has
    /// ended: `self.body` is then `Done`).
    fn take_frame(&mut self) -> io::Result<Option<Frame<Bytes>>> {
        let read = &mut self.conn.read;
        loop {
            match self.body {
                In::Done => return Ok(None),
                In::Close => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Frame::data(read.split().freeze())));
                }
                In::Length(left) => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    let (data, left) = split_upto(read, left);
                    self.body = if left == 0 {
                        In::Done
                    } else {
                        In::Length(left)
                    };
                    return Ok(Some(Frame::data(data)));
                }
                In::Chunked(Chunk::Size) => {
                    let Some(end) = read.iter().position(|&b| b == b'\n') else {
                        if read.len() > MAX_CHUNK_LINE {
                            return Err(bad("a chunk-size line is too long"));
                        }
                        return Ok(None);
                    };
                    if end > MAX_CHUNK_LINE || end == 0 || read[end - 1] != b'\r' {
                        return Err(bad("a bad chunk-size line"));
                    }
                    let (size, extension) = chunk_size(&read[..end - 1])?;
                    self.extensions += extension;
                    if self.extensions > MAX_EXTENSIONS {
                        return Err(bad("too many chunk extensions"));
                    }
                    read.advance(end + 1);
                    self.body = In::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                In::Chunked(Chunk::Data(left)) => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    let (data, left) = split_upto(read, left);
                    self.body = In::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Some(Frame::data(data)));
                }
                In::Chunked(Chunk::DataEnd) => {
                    if read.len() < 2 {
                        return Ok(None);
                    }
                    if &read[..2] != b"\r\n" {
                        return Err(bad("a chunk's data does not end with CRLF"));
                    }
                    read.advance(2);
                    self.body = In::Chunked(Chunk::Size);
                }
                In::Chunked(Chunk::Trailers) => {
                    if read.starts_with(b"\r\n") {
                        read.advance(2);
                        self.body = In::Done;
                        return Ok(None);
                    }
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(read, &mut slots) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| bad("a bad trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| bad("a bad trailer value"))?;
                                trailers.append(name, value);
                            }
                            read.advance(len);
                            self.body = In::Done;
                            return Ok(Some(Frame::trailers(trailers)));
                        }
                        Ok(httparse::Status::Partial) => {
                            if read.len() > MAX_TRAILERS {
                                return Err(bad("the response trailers are too large"));
                            }
                            return Ok(None);
                        }
                        Err(err) => return Err(bad_head(err)),
                    }
                }
            }
        }
    }
}

impl HttpBody for Exchange {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().poll_body(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body == In::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.body {
            In::Done => SizeHint::with_exact(0),
            In::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Up to `left` bytes off the front of `read`, and how many are left to come after them.
fn split_upto(read: &mut BytesMut, left: u64) -> (Bytes, u64) {
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(read.len());
    (read.split_to(n).freeze(), left - n as u64)
}

fn bad_head(err: httparse::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a malformed response from the upstream: {err}"),
    )
}

/// A chunk-size line's size, and the length of its extensions (after `;`, ignored but checked
/// to be visible text).
fn chunk_size(line: &[u8]) -> io::Result<(u64, usize)> {
    let digits = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(bad("a bad chunk size"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(rest.len())..];
    if !(rest.is_empty() || rest[0] == b';')
        || rest.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f))
    {
        return Err(bad("a bad chunk size"));
    }
    let mut n = 0u64;
    for &b in &line[..digits] {
        n = n << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
    }
    Ok((n, rest.len()))
}

/// Whether a comma-separated header value has `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a comma-separated header value's last token is `token`.
fn last_token_is(value: &[u8], token: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::ReqBody;
    use crate::transport::Plain;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connection to a scripted upstream: `script` gets the accepted socket.
    async fn upstream<F, Fut>(script: F) -> (Conn, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            script(socket).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        (
            Conn::new(Stream::Plain(Plain::Tcp(stream)), DEFAULT_MAX_HEAD),
            task,
        )
    }

    /// Reads a request head (through its blank line), and `body` bytes after it.
    async fn read_request(socket: &mut TcpStream, body: usize) -> String {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            if socket.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            got.push(byte[0]);
        }
        let mut rest = vec![0u8; body];
        socket.read_exact(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        String::from_utf8(got).unwrap()
    }

    /// A GET to an upstream that answers it with `answer`.
    async fn answered(answer: &'static [u8]) -> Result<Response<Exchange>, Failed> {
        let (conn, _task) = upstream(move |mut s| async move {
            read_request(&mut s, 0).await;
            s.write_all(answer).await.unwrap();
        })
        .await;
        send(conn, get("/"), false).await
    }

    fn get(path: &str) -> Request<UpBody> {
        Request::builder()
            .uri(path)
            .header("host", "up.local")
            .body(UpBody::Empty)
            .unwrap()
    }

    /// A request body sent in `chunks`, of unknown length.
    fn streamed(chunks: tokio::sync::mpsc::Receiver<Bytes>) -> UpBody {
        let stream = futures_util::stream::unfold(chunks, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        UpBody::Client(ReqBody::other(
            http_body_util::StreamBody::new(stream).boxed_unsync(),
        ))
    }

    async fn body_of(ex: &mut Exchange) -> Result<(Bytes, Option<HeaderMap>), BoxError> {
        let collected = Pin::new(ex).collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn a_kept_alive_connection_carries_one_exchange_after_another() {
        let (conn, task) = upstream(|mut s| async move {
            for body in ["one", "two"] {
                let req = read_request(&mut s, 0).await;
                assert!(
                    req.starts_with("GET /x HTTP/1.1\r\nhost: up.local\r\n"),
                    "{req}"
                );
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{body}");
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        })
        .await;
        let mut response = send(conn, get("/x"), false).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_of(response.body_mut()).await.unwrap().0, "one");
        let conn = response.into_body().into_conn().expect("reusable");
        let mut response = send(conn, get("/x"), true).await.unwrap();
        assert_eq!(body_of(response.body_mut()).await.unwrap().0, "two");
        assert!(response.into_body().into_conn().is_some());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_chunked_response_is_decoded_with_its_extensions_skipped_and_trailers_kept() {
        let (conn, _task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
            s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n",
            )
            .await
            .unwrap();
            s.write_all(b"5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Sum: 9\r\n\r\n")
                .await
                .unwrap();
        })
        .await;
        let mut response = send(conn, get("/"), false).await.unwrap();
        let (body, trailers) = body_of(response.body_mut()).await.unwrap();
        assert_eq!(body, "wikipedia in\r\n\r\nchunks.");
        assert_eq!(trailers.unwrap()["x-sum"], "9");
        assert!(response.into_body().into_conn().is_some());
    }

    #[tokio::test]
    async fn a_response_without_length_ends_with_the_connection_which_is_not_reused() {
        let mut response = answered(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            .await
            .unwrap();
        assert_eq!(
            body_of(response.body_mut()).await.unwrap().0,
            "until the end"
        );
        assert!(response.into_body().into_conn().is_none());
    }

    #[tokio::test]
    async fn head_204_and_304_responses_have_no_body_whatever_their_length_says() {
        let (conn, _task) = upstream(|mut s| async move {
            for answer in [
                "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ] {
                read_request(&mut s, 0).await;
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        })
        .await;
        let mut head = get("/");
        *head.method_mut() = Method::HEAD;
        let mut response = send(conn, head, false).await.unwrap();
        assert_eq!(response.headers()["content-length"], "100");
        assert!(response.body().is_end_stream());
        assert_eq!(body_of(response.body_mut()).await.unwrap().0, "");
        let mut conn = response.into_body().into_conn().unwrap();
        for status in [204, 304] {
            let response = send(conn, get("/"), true).await.unwrap();
            assert_eq!(response.status(), status);
            conn = response.into_body().into_conn().unwrap();
        }
        let mut response = send(conn, get("/"), true).await.unwrap();
        assert_eq!(body_of(response.body_mut()).await.unwrap().0, "ok");
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (conn, _task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
            s.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
            )
            .await
            .unwrap();
            s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        })
        .await;
        let response = send(conn, get("/"), false).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!response.headers().contains_key("link"));
        assert!(response.into_body().into_conn().is_some());
    }

    #[tokio::test]
    async fn a_response_with_both_framings_is_read_as_chunked_and_ends_its_connection() {
        let mut response = answered(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsmuggl\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(!response.headers().contains_key("content-length"));
        assert_eq!(body_of(response.body_mut()).await.unwrap().0, "smuggl");
        assert!(response.into_body().into_conn().is_none());
    }

    #[tokio::test]
    async fn malformed_responses_fail_the_exchange() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            let failed = answered(answer).await.unwrap_err();
            assert!(failed.unsent.is_none());
            let text = failed.error.to_string();
            assert!(!text.is_empty(), "{}", String::from_utf8_lossy(answer));
        }
    }

    #[tokio::test]
    async fn malformed_or_cut_bodies_end_in_an_error() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ] {
            let mut response = answered(answer).await.unwrap();
            assert!(
                body_of(response.body_mut()).await.is_err(),
                "{}",
                String::from_utf8_lossy(answer)
            );
            assert!(response.into_body().into_conn().is_none());
        }
    }

    #[tokio::test]
    async fn a_head_over_the_limit_fails_the_exchange() {
        let (mut conn, _task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
            let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
            let _ = s.write_all(big.as_bytes()).await;
        })
        .await;
        conn.max_head = 8192;
        let failed = send(conn, get("/"), false).await.unwrap_err();
        assert!(
            failed.error.to_string().contains("too large"),
            "{}",
            failed.error
        );
    }

    #[tokio::test]
    async fn request_bodies_carry_one_framing_the_upstream_can_read() {
        let (conn, task) = upstream(|mut s| async move {
            // Known length: Content-Length.
            let req = read_request(&mut s, 5).await;
            assert!(
                req.contains("content-length: 5\r\n") && req.ends_with("\r\n\r\nhello"),
                "{req}"
            );
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            // Unknown length: chunked.
            let req = read_request(&mut s, 0).await;
            assert!(req.contains("transfer-encoding: chunked\r\n"), "{req}");
            assert!(!req.contains("content-length"), "{req}");
            let mut rest = vec![0u8; b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n".len()];
            s.read_exact(&mut rest).await.unwrap();
            assert_eq!(rest, b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n");
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            // No body but a Content-Length that says otherwise: zero.
            let req = read_request(&mut s, 0).await;
            assert!(req.contains("content-length: 0\r\n"), "{req}");
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        })
        .await;
        let post = Request::builder()
            .method(Method::POST)
            .uri("/")
            .header("host", "up.local")
            .header("content-length", "5")
            .body(UpBody::Client(ReqBody::other(
                http_body_util::Full::new(Bytes::from_static(b"hello"))
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )))
            .unwrap();
        let response = send(conn, post, false).await.unwrap();
        let conn = response.into_body().into_conn().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(Bytes::from_static(b"ab")).await.unwrap();
        tx.send(Bytes::from_static(b"cde")).await.unwrap();
        drop(tx);
        let post = Request::builder()
            .method(Method::POST)
            .uri("/")
            .header("host", "up.local")
            .body(streamed(rx))
            .unwrap();
        let response = send(conn, post, true).await.unwrap();
        let conn = response.into_body().into_conn().unwrap();
        let mut empty = get("/");
        empty
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("5"));
        let response = send(conn, empty, true).await.unwrap();
        assert!(response.into_body().into_conn().is_some());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_upstream_may_answer_while_the_body_streams_and_echo_it_piece_by_piece() {
        let (conn, task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            // Echo each incoming chunk (size line, data, CRLF) as a chunk of the response.
            for _ in 0..3 {
                let mut piece = [0u8; 3 + 1 + 2];
                s.read_exact(&mut piece).await.unwrap();
                s.write_all(&piece).await.unwrap();
            }
            let mut end = [0u8; 5];
            s.read_exact(&mut end).await.unwrap();
            assert_eq!(&end, b"0\r\n\r\n");
            s.write_all(b"0\r\n\r\n").await.unwrap();
        })
        .await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let post = Request::builder()
            .method(Method::PUT)
            .uri("/echo")
            .header("host", "up.local")
            .body(streamed(rx))
            .unwrap();
        let mut response = send(conn, post, false).await.unwrap();
        // Each piece goes up only after the previous one came back.
        for piece in ["a", "b", "c"] {
            tx.send(Bytes::from(piece)).await.unwrap();
            let frame = response.body_mut().frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), piece);
        }
        drop(tx);
        assert!(response.body_mut().frame().await.is_none());
        assert!(response.into_body().into_conn().is_some());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_reused_connection_the_upstream_closed_gives_a_bodyless_request_back() {
        let (conn, _task) = upstream(|s| async move { drop(s) }).await;
        let failed = send(conn, get("/again"), true).await.unwrap_err();
        let back = failed.unsent.expect("the request comes back");
        assert_eq!(back.uri(), "/again");
        assert_eq!(back.headers()["host"], "up.local");
        // A POST the upstream may have acted on is not sent again.
        let (conn, _task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
        })
        .await;
        let mut post = get("/pay");
        *post.method_mut() = Method::POST;
        assert!(send(conn, post, true).await.unwrap_err().unsent.is_none());
        // On a new connection, the same failure is the upstream's answer.
        let (conn, _task) = upstream(|s| async move { drop(s) }).await;
        assert!(
            send(conn, get("/"), false)
                .await
                .unwrap_err()
                .unsent
                .is_none()
        );
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_usable() {
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        let (conn, task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            let _ = closing.await;
        })
        .await;
        let response = send(conn, get("/"), false).await.unwrap();
        let mut conn = response.into_body().into_conn().unwrap();
        assert!(conn.usable());
        close.send(()).unwrap();
        task.await.unwrap();
        // The upstream's socket is closed now; its FIN arrives at once on loopback.
        let mut tries = 0;
        while conn.usable() {
            tries += 1;
            assert!(tries < 1000, "the close was never seen");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn connect_and_requests_asking_to_close_leave_their_connection_out_of_the_pool() {
        let (conn, _task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        })
        .await;
        let mut connect = get("up.local:443");
        *connect.method_mut() = Method::CONNECT;
        let response = send(conn, connect, false).await.unwrap();
        assert!(response.body().is_end_stream());
        assert!(response.into_body().into_conn().is_none());

        let (conn, _task) = upstream(|mut s| async move {
            read_request(&mut s, 0).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        })
        .await;
        let mut closing = get("/");
        closing
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let response = send(conn, closing, false).await.unwrap();
        assert!(response.into_body().into_conn().is_none());
    }

    #[tokio::test]
    async fn http_1_0_responses_keep_their_connection_only_when_they_ask_to() {
        for (answer, method, pooled) in [
            (
                &b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"[..],
                Method::GET,
                true,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                Method::GET,
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
                Method::GET,
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
                Method::CONNECT,
                false,
            ),
        ] {
            let (conn, _task) = upstream(move |mut s| async move {
                read_request(&mut s, 0).await;
                s.write_all(answer).await.unwrap();
            })
            .await;
            let mut req = get("/");
            *req.method_mut() = method;
            let response = send(conn, req, false).await.unwrap();
            assert_eq!(
                response.into_body().into_conn().is_some(),
                pooled,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_that_turns_out_empty_goes_without_framing() {
        let (conn, task) = upstream(|mut s| async move {
            for _ in 0..2 {
                let req = read_request(&mut s, 0).await;
                assert!(
                    !req.contains("transfer-encoding") && !req.contains("content-length"),
                    "{req}"
                );
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .unwrap();
            }
        })
        .await;
        // Ended by the time it is sent (an HTTP/3 stream's FIN after its head).
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        let mut req = get("/");
        *req.body_mut() = streamed(rx);
        let response = send(conn, req, false).await.unwrap();
        let conn = response.into_body().into_conn().unwrap();
        // Not ended yet, on a GET: sent without a body, as hyper's client does.
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let mut req = get("/");
        *req.body_mut() = streamed(rx);
        let response = send(conn, req, true).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        task.await.unwrap();
    }

    /// Runs one GET against an upstream that writes `pieces` one after another, and returns
    /// the body and trailers.
    fn exchange_in_pieces(pieces: Vec<Vec<u8>>) -> Result<(Bytes, Option<HeaderMap>), BoxError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (conn, _task) = upstream(move |mut s| async move {
                read_request(&mut s, 0).await;
                for piece in pieces {
                    if s.write_all(&piece).await.is_err() {
                        return;
                    }
                }
            })
            .await;
            let mut response = send(conn, get("/"), false).await.map_err(|f| f.error)?;
            body_of(response.body_mut()).await
        })
    }

    /// Feeds `pieces` to an exchange's parser one at a time, as reads that each brought one
    /// would: the head, then the body's frames. Returns the body and trailers, or the error.
    fn parse_in_pieces(pieces: &[Vec<u8>]) -> io::Result<(Vec<u8>, Option<HeaderMap>)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (conn, _task) = rt.block_on(upstream(|s| async move {
            let _keep = s;
            std::future::pending::<()>().await;
        }));
        let _guard = rt.enter();
        let mut ex = Exchange {
            conn,
            sending: Sending::Done,
            body: In::Done,
            keep_alive: false,
            extensions: 0,
        };
        let (mut head, mut body, mut trailers) = (false, Vec::new(), None);
        for piece in pieces {
            ex.conn.read.extend_from_slice(piece);
            if !head {
                match ex.parse_head(&Method::GET).map_err(io::Error::other)? {
                    Parsed::Final(_) => head = true,
                    Parsed::Interim | Parsed::Partial => continue,
                }
            }
            while let Some(frame) = ex.take_frame()? {
                match frame.into_data() {
                    Ok(data) => body.extend_from_slice(&data),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
        }
        if !head || ex.body != In::Done || !ex.conn.read.is_empty() {
            return Err(bad("the response did not end where it should"));
        }
        Ok((body, trailers))
    }

    /// `bytes` cut at `cuts` (positions taken modulo its length).
    fn cut(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// However a chunked response is cut into reads, the body and trailers come out whole
        /// and the exchange ends exactly at its last byte.
        #[test]
        fn a_chunked_response_decodes_the_same_however_it_is_cut(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..12),
            cuts in proptest::collection::vec(0usize..100_000, 0..40),
            trailer in proptest::bool::ANY,
        ) {
            let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            let mut rest = &body[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes[i % sizes.len()].min(rest.len());
                wire.extend_from_slice(format!("{n:X};i={i}\r\n").as_bytes());
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
                i += 1;
            }
            wire.extend_from_slice(if trailer { &b"0\r\nX-T: 1\r\n\r\n"[..] } else { b"0\r\n\r\n" });
            let (got, trailers) = parse_in_pieces(&cut(&wire, &cuts)).unwrap();
            proptest::prop_assert_eq!(&got[..], &body[..]);
            proptest::prop_assert_eq!(trailers.is_some(), trailer);
        }

        /// Whatever bytes an upstream answers with, the exchange ends (in a response or an
        /// error) without a panic.
        #[test]
        fn any_answer_ends_the_exchange(
            head in "HTTP/1\\.[01] [0-9]{3} [ -~]{0,8}\r\n([A-Za-z-]{1,12}: [ -~]{0,12}\r\n){0,4}\r\n",
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let mut wire = head.into_bytes();
            wire.extend_from_slice(&tail);
            let _ = exchange_in_pieces(cut(&wire, &cuts));
        }
    }

    #[test]
    fn chunk_size_lines_are_read_strictly() {
        assert_eq!(chunk_size(b"1a").unwrap(), (26, 0));
        assert_eq!(chunk_size(b"1A ;name=\"v\"").unwrap(), (26, 9));
        for bad in [
            &b""[..],
            b";x",
            b"1a\r",
            b"1a;a\rb",
            b"1a x",
            b"-1",
            b"11111111111111111",
        ] {
            assert!(chunk_size(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_lengths_must_agree() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(content_length(&headers), Some(5));
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(content_length(&headers), None);
        for bad in ["", "+5", "5 5", "0x5", "99999999999999999999"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_str(bad).unwrap());
            assert_eq!(content_length(&headers), None, "{bad:?}");
        }
    }
}
