//! One request's way through the edge: find the site by port and Host, then (in Caddy's
//! directive order) redirect, authenticate, proxy, compress and set response headers; log it.
//! Every path matcher sees the path as `site::match_path` makes it (decoded, resolved, slashes
//! merged, as Caddy does), never the raw one, so no spelling slips past `basic_auth`; the
//! request goes upstream as sent.
//!
//! On the plain HTTP port, a host served over HTTPS gets a permanent redirect there, except
//! ACME HTTP-01 challenges (`/.well-known/acme-challenge/`), which go to the
//! [`ChallengeResponder`] when one is registered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::http::{HeaderValue, Request, Response, StatusCode, Version, header};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, Logged, Record};
use crate::body::{Body, ReqBody, status_response};
use crate::certs::ChallengeResponder;
use crate::context::Cx;
use crate::directives::Io;
use crate::limit::ConnPermit;
use crate::proxy::Client;
use crate::router::{Router, Served};
use crate::site::{Scheme, host_of};

const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// What every request handler shares; the router and client are swapped on reload.
pub(crate) struct State {
    /// Sites by port and host.
    pub(crate) router: ArcSwap<Router>,
    /// The upstream client (rebuilt when timeouts change).
    pub(crate) client: ArcSwap<Client>,
    /// Access log.
    pub(crate) log: AccessLog,
    /// Owner of upgraded (WebSocket) connections.
    pub(crate) upgraded: TaskTracker,
    /// Cancelled when upgraded connections must end (after the stop grace period).
    pub(crate) stop: CancellationToken,
    /// ACME challenge answers.
    pub(crate) challenges: Option<Arc<dyn ChallengeResponder>>,
}

/// One client connection.
pub(crate) struct Conn {
    /// What every request handler shares. Requests reach it through the connection: a
    /// clone of the process-wide `Arc` per request would move its count's cache line between
    /// the worker threads on every request.
    pub(crate) state: Arc<State>,
    /// The client.
    pub(crate) peer: SocketAddr,
    /// The port it connected to (as bound).
    pub(crate) port: u16,
    /// Plain or TLS.
    pub(crate) scheme: Scheme,
    /// The client's address as an `X-Forwarded-For` value (made once, sent with every
    /// proxied request).
    pub(crate) forwarded_for: HeaderValue,
    /// Requests whose response has not finished yet.
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// Requests started on this connection (the HTTP/2 idle watch's sign of use: its
    /// keep-alive pings move bytes on an idle connection).
    pub(crate) requests: AtomicU64,
    /// The TLS name the client's handshake gave, lower case.
    pub(crate) sni: std::sync::OnceLock<String>,
    /// Its place under `max_connections`: held by the connection and by its upgraded
    /// (WebSocket) continuation, so the place is free only when both have ended.
    pub(crate) _permit: ConnPermit,
}

impl Conn {
    /// A new connection from `peer` on `port`, holding its place under `max_connections`.
    pub(crate) fn new(
        state: Arc<State>,
        peer: SocketAddr,
        port: u16,
        scheme: Scheme,
        permit: ConnPermit,
    ) -> Conn {
        Conn {
            state,
            peer,
            port,
            scheme,
            forwarded_for: HeaderValue::from_str(&peer.ip().to_canonical().to_string())
                .expect("an IP address is a header value"),
            in_flight: Arc::new(AtomicUsize::new(0)),
            requests: AtomicU64::new(0),
            sni: std::sync::OnceLock::new(),
            _permit: permit,
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .field("port", &self.port)
            .field("scheme", &self.scheme)
            .field("in_flight", &self.in_flight)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut response = status_response(status, "");
    match HeaderValue::from_str(location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => status_response(StatusCode::BAD_REQUEST, "bad request: unusable URI\n"),
    }
}

/// Why a connection closes without an answer: the `abort` directive. Returned to hyper as
/// the service's error, which drops an HTTP/1 connection unanswered and resets an HTTP/2
/// stream, as Caddy's abort does.
#[derive(Debug)]
pub(crate) struct AbortConnection;

impl std::fmt::Display for AbortConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("aborted by the abort directive")
    }
}

impl std::error::Error for AbortConnection {}

/// Serves one request.
pub(crate) async fn handle(
    req: Request<ReqBody>,
    conn: Arc<Conn>,
) -> Result<Response<Logged>, AbortConnection> {
    let state = &*conn.state;
    let start = Instant::now();
    conn.in_flight.fetch_add(1, Ordering::Relaxed);
    conn.requests.fetch_add(1, Ordering::Relaxed);
    let logged = state.log.enabled() || state.router.load().has_site_logs();
    let mut record = logged.then(|| Record {
        ts: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        remote: conn.peer.ip(),
        client_ip: None,
        proto: match req.version() {
            Version::HTTP_2 => "HTTP/2.0",
            Version::HTTP_3 => "HTTP/3.0",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        method: req.method().clone(),
        host: None,
        path: req.uri().path_and_query().cloned(),
        status: 0,
        bytes: 0,
        duration_ms: 0.0,
        upstream: None,
        user: None,
        remote_port: conn.peer.port(),
        headers: None,
        resp_headers: None,
        to: None,
    });
    let routed = route(req, &conn, state, record.as_mut()).await;
    if let Some(record) = record.as_mut() {
        record.status = routed.status().as_u16();
        if record.to.as_ref().is_some_and(AccessLog::wants_headers) {
            record.resp_headers = Some(routed.headers().clone());
        }
    }
    let aborted = routed
        .extensions()
        .get::<crate::directives::Aborted>()
        .is_some();
    // A site with a log of its own writes there instead of the edge's log.
    let log = record
        .as_mut()
        .and_then(|r| r.to.take())
        .unwrap_or_else(|| state.log.clone());
    let (parts, body) = routed.into_parts();
    let body = Logged::new(body, record, start, log, conn.in_flight.clone());
    if aborted {
        // Dropping the body logs the request and counts it done.
        drop(body);
        return Err(AbortConnection);
    }
    Ok(Response::from_parts(parts, body))
}

async fn route(
    req: Request<ReqBody>,
    conn: &Arc<Conn>,
    state: &State,
    record: Option<&mut Record>,
) -> Response<Body> {
    let host_value = match req.headers().get(header::HOST) {
        Some(v) => v.clone(),
        None => match req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            Some(v) => v,
            None => return status_response(StatusCode::BAD_REQUEST, "bad request: no Host\n"),
        },
    };
    let Ok(host_text) = host_value.to_str() else {
        return status_response(StatusCode::BAD_REQUEST, "bad request: unreadable Host\n");
    };
    let host = host_of(host_text);
    let router = state.router.load_full();
    let mut record = record;
    if let Some(r) = record.as_deref_mut() {
        r.host = Some(host_value.clone());
    }
    match conn.scheme {
        Scheme::Http => {
            if let Some(token) = req.uri().path().strip_prefix(ACME_CHALLENGE) {
                return match state
                    .challenges
                    .as_ref()
                    .and_then(|c| c.http01(&host, token))
                {
                    Some(answer) => {
                        let mut response = status_response(StatusCode::OK, "");
                        *response.body_mut() = Full::new(Bytes::from(answer))
                            .map_err(|e| match e {})
                            .boxed_unsync();
                        response
                    }
                    None => status_response(StatusCode::NOT_FOUND, "no such ACME challenge\n"),
                };
            }
            if let Some(site) = router.site(conn.port, &host) {
                return serve_site(site, &router, req, conn, state, host, host_value, record).await;
            }
            if let Some(port) = router.https_port_for(&host) {
                let authority = if port == 443 {
                    host.clone()
                } else {
                    format!("{}:{port}", bracket(&host))
                };
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                return redirect(
                    StatusCode::PERMANENT_REDIRECT,
                    &format!("https://{authority}{path}"),
                );
            }
            status_response(
                StatusCode::NOT_FOUND,
                "not found: no site serves this host\n",
            )
        }
        Scheme::Https => match router.site(conn.port, &host) {
            Some(site) if site.strict_sni && conn.sni.get() != Some(&host) => status_response(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request: the Host differs from the TLS name\n",
            ),
            Some(site) => {
                // HTTP/1.1 and HTTP/2 answers point the client at HTTP/3 (as Caddy's do).
                let alt_svc = match req.version() {
                    Version::HTTP_3 => None,
                    _ if site.alt_svc => router.alt_svc(conn.port).cloned(),
                    _ => None,
                };
                let mut response =
                    serve_site(site, &router, req, conn, state, host, host_value, record).await;
                if let Some(value) = alt_svc {
                    response.headers_mut().insert(header::ALT_SVC, value);
                }
                response
            }
            None => status_response(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request: no site serves this host here\n",
            ),
        },
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_site(
    served: &Arc<Served>,
    router: &Router,
    req: Request<ReqBody>,
    conn: &Arc<Conn>,
    state: &State,
    host: String,
    host_value: HeaderValue,
    record: Option<&mut Record>,
) -> Response<Body> {
    let mut record = record;
    if let (Some(r), Some(log)) = (record.as_deref_mut(), &served.log) {
        if log.wants_headers() {
            r.headers = Some(req.headers().clone());
        }
        r.to = Some(log.clone());
    }
    let Some(mut cx) = Cx::new(conn.peer, conn.scheme, host, host_value, req.uri()) else {
        return status_response(
            StatusCode::BAD_REQUEST,
            "bad request: malformed percent-escape in the path\n",
        );
    };
    if let Some(policy) = router.client_ip() {
        (cx.trusted, cx.client) = policy.client(conn.peer.ip(), req.headers());
        if let Some(r) = record.as_deref_mut() {
            r.client_ip = Some(cx.client);
        }
    }
    let client = state.client.load_full();
    let mut io = Io {
        client: &client,
        tasks: &state.upgraded,
        stop: &state.stop,
        hold: conn.clone(),
        forwarded_for: &conn.forwarded_for,
        user: None,
        upstream: None,
    };
    let response = served.chain.run(req, &mut cx, &mut io).await;
    if let Some(r) = record {
        r.user = io.user;
        r.upstream = io.upstream;
    }
    response
}
