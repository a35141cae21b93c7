//! Keep-alive HTTP/1.1 connections to upstreams, driven on the task of the request using them.
//!
//! hyper-util's pooled client spawns a task per upstream connection: every proxied request then
//! hands its bytes from the client connection's task to the upstream connection's task and back,
//! and on a multi-threaded runtime those wake-ups cross threads (a profile showed 12-14% of the
//! time in kernel thread switching). Here a request leases an idle connection, polls it itself
//! while it waits for the response, and the response body keeps polling it while it streams;
//! once the body has ended, the connection goes back to the pool. So a proxied request stays on
//! one task from the client's bytes to the upstream's and back.
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
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::http::{HeaderValue, Uri, header};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::body::UpBody;
use crate::transport::{Protocol, Stream, Transport, Upstream};

type Conn = http1::Connection<TokioIo<Stream>, UpBody>;
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
    sender: http1::SendRequest<UpBody>,
    conn: Pin<Box<Conn>>,
    since: Instant,
    /// How long it may stay idle.
    keep: Duration,
    /// How many idle ones its upstream keeps.
    max: usize,
}

/// A connection in use by one request; it goes back to the pool when its response has ended.
pub(crate) struct Lease {
    sender: http1::SendRequest<UpBody>,
    /// `None` once the connection has ended.
    conn: Option<Pin<Box<Conn>>>,
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
    Request(hyper::Error),
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
    /// connection or a new one, and returns the response with the lease its body must keep
    /// polling (none over HTTP/2, whose connection drives itself).
    pub(crate) async fn send(
        self: &Arc<Self>,
        transport: &Transport,
        upstream: &Upstream,
        mut req: Request<UpBody>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
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
            let (mut lease, reused) = match self.take(&upstream.key, any_thread) {
                Some(lease) => (lease, true),
                None => {
                    match Box::pin(self.connect(transport, upstream, keep, connect_timeout)).await {
                        Ok(lease) => (lease, false),
                        Err(err) => return Err(Failure::Connect(err, Some(Box::new(req)))),
                    }
                }
            };
            if reused {
                // The previous response may have left the connection a step from ready.
                if lease.ready().await.is_err() {
                    continue;
                }
            }
            let sent = lease.sender.try_send_request(req);
            match lease.drive(sent).await {
                Ok(response) => return Ok((response, Some(lease))),
                Err(mut err) => match err.take_message() {
                    // An idle connection the upstream had closed: the request never left.
                    Some(back) if reused => req = back,
                    _ => return Err(Failure::Request(err.into_error())),
                },
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
    ) -> Result<(Response<Incoming>, Option<Lease>), Failure> {
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
            return Err(Failure::Request(err));
        }
        sender
            .send_request(req)
            .await
            .map(|r| (r, None))
            .map_err(Failure::Request)
    }

    /// An idle connection to `key` that is still open, if any.
    fn take(self: &Arc<Self>, key: &Arc<str>, any_thread: bool) -> Option<Lease> {
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
            if idle.since.elapsed() > idle.keep || idle.sender.is_closed() {
                continue;
            }
            // One poll reads a close (or anything else) the upstream sent while it sat idle.
            let mut cx = Context::from_waker(Waker::noop());
            if idle.conn.as_mut().poll(&mut cx).is_ready() {
                continue;
            }
            return Some(Lease {
                sender: idle.sender,
                conn: Some(idle.conn),
                key: key.clone(),
                keep: (idle.keep, idle.max),
                pool: self.clone(),
            });
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

    async fn connect(
        self: &Arc<Self>,
        transport: &Transport,
        upstream: &Upstream,
        keep: (Duration, usize),
        timeout: Duration,
    ) -> io::Result<Lease> {
        let (sender, conn) = handshake(transport, upstream, timeout).await?;
        Ok(Lease {
            sender,
            conn: Some(Box::pin(conn)),
            key: upstream.key.clone(),
            keep,
            pool: self.clone(),
        })
    }
}

/// A new connection for an upgrade (WebSocket): the returned future drives it, on a task of
/// its own, since the upgraded stream outlives the request.
pub(crate) async fn connect_upgradeable(
    transport: &Transport,
    upstream: &Upstream,
    timeout: Duration,
) -> io::Result<(
    http1::SendRequest<UpBody>,
    impl Future<Output = ()> + Send + use<>,
)> {
    let (sender, conn) = handshake(transport, upstream, timeout).await?;
    Ok((sender, async move {
        if let Err(err) = conn.with_upgrades().await {
            tracing::debug!(error = %err, "upgraded upstream connection ended");
        }
    }))
}

async fn handshake(
    transport: &Transport,
    upstream: &Upstream,
    timeout: Duration,
) -> io::Result<(http1::SendRequest<UpBody>, Conn)> {
    let stream = transport.connect(&upstream.address, timeout).await?;
    let mut builder = http1::Builder::new();
    if let Some(max) = transport.max_response_header {
        builder.max_buf_size(max);
    }
    builder
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)
}

impl Lease {
    /// Polls `fut` to completion, driving the connection on this task meanwhile.
    async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        poll_fn(|cx| {
            self.poll_conn(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// Waits until the connection can take a request, driving it meanwhile.
    async fn ready(&mut self) -> hyper::Result<()> {
        poll_fn(|cx| {
            self.poll_conn(cx);
            self.sender.poll_ready(cx)
        })
        .await
    }

    /// Lets the connection read and write what it can; drops it once it has ended (which
    /// fails the request in flight, if any).
    fn poll_conn(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn
            && conn.as_mut().poll(cx).is_ready()
        {
            self.conn = None;
        }
    }

    /// The connection's response has ended: back to the pool if it can carry another.
    fn release(self) {
        let (keep, max) = self.keep;
        if let Some(conn) = self.conn
            && !self.sender.is_closed()
            && !keep.is_zero()
        {
            self.pool.put(
                self.key,
                Idle {
                    sender: self.sender,
                    conn,
                    since: Instant::now(),
                    keep,
                    max,
                },
                max,
            );
        }
    }
}

/// An upstream response body that drives its connection while it streams and gives the
/// connection back when it ends.
pub(crate) struct LeasedBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl LeasedBody {
    /// `body`, read over `lease`.
    pub(crate) fn new(body: Incoming, lease: Lease) -> LeasedBody {
        let mut this = LeasedBody {
            body,
            lease: Some(lease),
        };
        if this.body.is_end_stream() {
            this.release();
        }
        this
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

impl HttpBody for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(lease) = &mut this.lease {
            lease.poll_conn(cx);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
