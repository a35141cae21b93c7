//! Keep-alive HTTP/1.1 connections to upstreams, driven on the task of the request using them.
//!
//! hyper-util's pooled client spawns a task per upstream connection: every proxied request then
//! hands its bytes from the client connection's task to the upstream connection's task and back,
//! and on a multi-threaded runtime those wake-ups cross threads (a profile showed 12-14% of the
//! time in kernel thread switching). Here a request leases an idle connection and runs its
//! exchange itself ([`h1`]), and the response body keeps reading it while it streams; once the
//! body has ended, the connection goes back to the pool. So a proxied request stays on one
//! task from the client's bytes to the upstream's and back. HTTP/2 upstreams share one hyper
//! connection per thread and upstream, driven by a task of its own.
//!
//! Idle connections are kept per thread: a connection's socket is registered with the runtime
//! of the thread that opened it, so on the edge's one-runtime-per-core workers a request only
//! reuses connections of its own thread.
//!
//! Invariants: an idle connection in the pool has no request in flight and nobody polls it;
//! it is checked (polled once) when leased, and dropped when it has closed, has been idle
//! longer than the idle timeout, or the pool for its upstream is full. A lease dropped before
//! its response has ended closes the connection (HTTP/1.1 cannot abandon a response).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::http::{HeaderValue, Uri, header};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::body::{BoxError, UpBody};
use crate::h1;
use crate::transport::{Protocol, Transport, Upstream};

/// Idle HTTP/1.1 connections of one thread to one upstream (by pool key).
type IdleList = (ThreadId, Arc<str>, Vec<Idle>);
/// The HTTP/2 connection of one thread to one upstream (by pool key).
type H2Conn = (ThreadId, Arc<str>, http2::SendRequest<UpBody>);

/// Idle upstream connections, by thread and upstream.
pub(crate) struct Pool {
    /// A list, not a map: there are a handful of (thread, upstream) pairs, and finding one by
    /// comparing a thread id and a short authority costs less than hashing the authority.
    /// Each list is oldest first (connections are pushed and popped at the end).
    idle: Mutex<Vec<IdleList>>,
    /// HTTP/2 connections (h2c, or TLS with `versions 2`), one per thread and upstream:
    /// requests share it.
    h2: Mutex<Vec<H2Conn>>,
    idle_timeout: Duration,
    max_idle_per_upstream: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

struct Idle {
    conn: h1::Conn,
    since: Instant,
    /// How long it may stay idle.
    keep: Duration,
}

/// Where a connection goes back to when its exchange has ended.
struct Back {
    key: Arc<str>,
    /// How long it may stay idle, and how many idle ones its upstream keeps.
    keep: (Duration, usize),
    pool: Arc<Pool>,
}

/// Why a request got no response.
pub(crate) enum Failure {
    /// No connection could be made; the request, when it can still be sent elsewhere.
    Connect(io::Error, Option<Box<Request<UpBody>>>),
    /// The connection failed during the exchange.
    Request(BoxError),
}

/// An upstream response's body: read over a pooled HTTP/1.1 connection, or hyper's (HTTP/2,
/// upgrades). Not boxed: the large variant is the one nearly every request takes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum UpstreamBody {
    H1(LeasedBody),
    Hyper(Incoming),
}

impl Pool {
    /// An empty pool.
    pub(crate) fn new(idle_timeout: Duration, max_idle_per_upstream: usize) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(Vec::new()),
            idle_timeout,
            max_idle_per_upstream,
        })
    }

    /// Sends `req` (origin-form URI, Host set) to `upstream` over `transport`, on an idle
    /// connection or a new one, and returns the response.
    pub(crate) async fn send(
        self: &Arc<Self>,
        transport: &Transport,
        upstream: &Upstream,
        mut req: Request<UpBody>,
        connect_timeout: Duration,
    ) -> Result<Response<UpstreamBody>, Failure> {
        // The rare paths (HTTP/2, a new connection: TCP, TLS and handshake futures of several
        // KiB) are boxed, so the future of every request, itself boxed and moved, stays small.
        if transport.protocol != Protocol::Http1 {
            return Box::pin(self.send_h2(transport, upstream, req, connect_timeout)).await;
        }
        let keep = (
            transport.keepalive.unwrap_or(self.idle_timeout),
            transport.idle_conns.unwrap_or(self.max_idle_per_upstream),
        );
        loop {
            // With max_conns_per_host the request holds a slot, and the idle connection a
            // slot freed may sit in another thread's list: take it from any, so the
            // upstream's connections stay within the limit.
            let any_thread = transport.max_conns_per_host.is_some();
            let (conn, reused) = match self.take(&upstream.key, any_thread) {
                Some(conn) => (conn, true),
                None => match Box::pin(connect(transport, upstream, connect_timeout)).await {
                    Ok(conn) => (conn, false),
                    Err(err) => return Err(Failure::Connect(err, Some(Box::new(req)))),
                },
            };
            match h1::send(conn, req, reused).await {
                Ok(response) => {
                    let back = Back {
                        key: upstream.key.clone(),
                        keep,
                        pool: self.clone(),
                    };
                    return Ok(response.map(|ex| UpstreamBody::H1(LeasedBody::new(ex, back))));
                }
                // An idle connection the upstream had closed: the request can go again.
                Err(h1::Failed {
                    unsent: Some(back), ..
                }) => req = back,
                Err(failed) => return Err(Failure::Request(failed.error)),
            }
        }
    }

    /// Sends `req` over this thread's HTTP/2 connection to `upstream`, made if need be.
    async fn send_h2(
        self: &Arc<Self>,
        transport: &Transport,
        upstream: &Upstream,
        mut req: Request<UpBody>,
        connect_timeout: Duration,
    ) -> Result<Response<UpstreamBody>, Failure> {
        // HTTP/2 names the host in :authority (from the URI), not in a Host header.
        let host = req
            .headers_mut()
            .remove(header::HOST)
            .unwrap_or_else(|| HeaderValue::from_static("localhost"));
        let scheme = if transport.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        match format!("{scheme}://{}{path}", host.to_str().unwrap_or("localhost")).parse::<Uri>() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                return Err(Failure::Connect(
                    io::Error::other("the Host is not an authority"),
                    None,
                ));
            }
        }
        let thread = std::thread::current().id();
        let cached = {
            let mut h2 = self.h2.lock().expect("the pool lock is never poisoned");
            h2.retain(|(_, _, s)| !s.is_closed());
            h2.iter()
                .find(|(t, k, _)| *t == thread && *k == upstream.key)
                .map(|(_, _, s)| s.clone())
        };
        let mut sender = match cached {
            Some(sender) => sender,
            None => {
                let stream = match transport.connect(&upstream.address, connect_timeout).await {
                    Ok(stream) => stream,
                    Err(err) => return Err(Failure::Connect(err, Some(Box::new(req)))),
                };
                let (sender, conn) =
                    match http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await {
                        Ok(both) => both,
                        Err(err) => {
                            return Err(Failure::Connect(
                                io::Error::other(err),
                                Some(Box::new(req)),
                            ));
                        }
                    };
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(error = %err, "HTTP/2 upstream connection ended");
                    }
                });
                let mut h2 = self.h2.lock().expect("the pool lock is never poisoned");
                h2.push((thread, upstream.key.clone(), sender.clone()));
                sender
            }
        };
        if let Err(err) = poll_fn(|cx| sender.poll_ready(cx)).await {
            return Err(Failure::Request(err.into()));
        }
        sender
            .send_request(req)
            .await
            .map(|r| r.map(UpstreamBody::Hyper))
            .map_err(|err| Failure::Request(err.into()))
    }

    /// An idle connection to `key` that is still open, if any.
    fn take(&self, key: &Arc<str>, any_thread: bool) -> Option<h1::Conn> {
        let thread = std::thread::current().id();
        loop {
            let mut idle = {
                let mut pool = self.idle.lock().expect("the pool lock is never poisoned");
                pool.iter_mut()
                    .find(|(t, k, c)| {
                        k == key
                            && if any_thread {
                                !c.is_empty()
                            } else {
                                *t == thread
                            }
                    })?
                    .2
                    .pop()?
            };
            if idle.since.elapsed() > idle.keep || !idle.conn.usable() {
                continue;
            }
            return Some(idle.conn);
        }
    }

    fn put(&self, key: Arc<str>, idle: Idle, max: usize) {
        let thread = std::thread::current().id();
        let now = idle.since;
        let mut pool = self.idle.lock().expect("the pool lock is never poisoned");
        let at = match pool.iter().position(|(t, k, _)| *t == thread && *k == key) {
            Some(at) => at,
            None => {
                pool.push((thread, key, Vec::new()));
                pool.len() - 1
            }
        };
        let conns = &mut pool[at].2;
        // Stale ones sit at the bottom (oldest first): drop them while here.
        let stale = conns.partition_point(|c| now.duration_since(c.since) > c.keep);
        conns.drain(..stale);
        if conns.len() < max {
            conns.push(idle);
        }
    }
}

/// A new HTTP/1.1 connection to `upstream`.
async fn connect(
    transport: &Transport,
    upstream: &Upstream,
    timeout: Duration,
) -> io::Result<h1::Conn> {
    let stream = transport.connect(&upstream.address, timeout).await?;
    // As hyper's read buffer, the limit is never below 8 KiB.
    let max_head = transport
        .max_response_header
        .map_or(h1::DEFAULT_MAX_HEAD, |max| max.max(8192));
    Ok(h1::Conn::new(stream, max_head))
}

/// A new connection for an upgrade (WebSocket), on hyper: the returned future drives it, on
/// a task of its own, since the upgraded stream outlives the request.
pub(crate) async fn connect_upgradeable(
    transport: &Transport,
    upstream: &Upstream,
    timeout: Duration,
) -> io::Result<(
    http1::SendRequest<UpBody>,
    impl Future<Output = ()> + Send + use<>,
)> {
    let stream = transport.connect(&upstream.address, timeout).await?;
    let mut builder = http1::Builder::new();
    if let Some(max) = transport.max_response_header {
        builder.max_buf_size(max);
    }
    let (sender, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    Ok((sender, async move {
        if let Err(err) = conn.with_upgrades().await {
            tracing::debug!(error = %err, "upgraded upstream connection ended");
        }
    }))
}

/// An upstream response body read over a pooled connection, which goes back to the pool
/// when the body has ended (and is closed if it is dropped before).
pub(crate) struct LeasedBody {
    /// `None` once ended.
    ex: Option<h1::Exchange>,
    back: Back,
}

impl LeasedBody {
    fn new(ex: h1::Exchange, back: Back) -> LeasedBody {
        let mut this = LeasedBody { ex: Some(ex), back };
        if this.ex.as_ref().is_some_and(HttpBody::is_end_stream) {
            this.release();
        }
        this
    }

    /// The exchange has ended: its connection back to the pool if it can carry another.
    fn release(&mut self) {
        let Some(ex) = self.ex.take() else { return };
        let (keep, max) = self.back.keep;
        if keep.is_zero() {
            return;
        }
        if let Some(conn) = ex.into_conn() {
            self.back.pool.put(
                self.back.key.clone(),
                Idle {
                    conn,
                    since: Instant::now(),
                    keep,
                },
                max,
            );
        }
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        if self.ex.as_ref().is_some_and(HttpBody::is_end_stream) {
            self.release();
        }
    }
}

impl HttpBody for LeasedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(ex) = &mut this.ex else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *ex).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => this.ex = None,
            Poll::Ready(_) if ex.is_end_stream() => this.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ex.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.ex
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.is_end_stream(),
            UpstreamBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(body) => body.size_hint(),
            UpstreamBody::Hyper(body) => body.size_hint(),
        }
    }
}
