//! Reverse proxying: choosing an upstream (round robin or first, skipping ones that failed
//! recently), rewriting the request (hop-by-hop headers out, `X-Forwarded-*` in, the client's
//! Host kept), streaming both bodies, and joining upgraded connections (WebSocket) end to end.
//!
//! Upstream connections come from [`crate::pool`] (keep-alive, HTTP/1.1, driven on the
//! request's own task; an upgrade gets a connection and a task of its own). A request
//! without a body that fails to connect is retried on the next upstream; one with a body has
//! already given its body away and gets a 502, while the failed upstream is skipped by the
//! requests after it ("passive health", as Caddy's `fail_duration`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use hyper::http::uri::PathAndQuery;
use hyper::http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::Activity;
use crate::body::{Body, UpBody};
use crate::context::{Cx, Req};
use crate::header_ops::HeaderOps;
use crate::health::{Active, Host, InFlight, Passive};
use crate::lb::{Candidate, Choice, Pick, Policy};
use crate::matchers::Cidr;
use crate::pool::{self, Failure, Pool, UpstreamBody};
use crate::transport::Transport;
pub(crate) use crate::transport::Upstream;

/// One `reverse_proxy`: which upstreams, how to choose, reach and check them, and what to
/// rewrite. Its run-time state (health) is `proxy::Balancer`'s.
#[derive(Debug)]
pub(crate) struct Proxy {
    /// The upstreams.
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    /// How to choose (`lb_policy`).
    pub(crate) policy: Policy,
    /// `lb_try_duration`: how long to keep choosing again after failures.
    pub(crate) try_duration: Option<Duration>,
    /// `lb_try_interval`: the pause between choices.
    pub(crate) try_interval: Duration,
    /// `lb_retries`: how many more choices after the first (0: by try_duration only).
    pub(crate) retries: u32,
    /// Passive health.
    pub(crate) passive: Passive,
    /// How to connect.
    pub(crate) transport: Transport,
    /// Peers whose X-Forwarded-* headers are kept (`trusted_proxies`).
    pub(crate) trusted: Vec<Cidr>,
    /// Request header changes.
    pub(crate) header_up: HeaderOps,
    /// Response header changes.
    pub(crate) header_down: HeaderOps,
}

/// A reverse proxy's run-time state: the upstreams it chooses from (the proxy's own, or one
/// DNS answer's for dynamic upstreams), each one's health and load (indexed alike), and the
/// active checker (stopped when this is dropped).
#[derive(Debug)]
pub(crate) struct Balancer {
    upstreams: Arc<[Arc<Upstream>]>,
    hosts: Arc<[Host]>,
    _checks: Option<tokio_util::sync::DropGuard>,
}

/// An upstream as the policy sees it during one choice.
#[derive(Clone, Copy)]
struct View<'a> {
    upstream: &'a Upstream,
    host: &'a Host,
    available: bool,
}

impl Candidate for View<'_> {
    fn dial(&self) -> &str {
        &self.upstream.address.dial
    }
    fn available(&self) -> bool {
        self.available
    }
    fn in_flight(&self) -> usize {
        self.host.in_flight()
    }
}

/// Most upstreams whose views [`Balancer::choose`] keeps on the stack.
const STACK_VIEWS: usize = 8;

impl Balancer {
    /// Fresh state for `proxy`: all upstreams healthy; `active` checks start now when given.
    pub(crate) fn new(proxy: &Proxy, active: Option<Active>) -> Balancer {
        let max_conns = proxy.transport.max_conns_per_host;
        let hosts: Arc<[Host]> = proxy
            .upstreams
            .iter()
            .map(|_| Host::limited(max_conns))
            .collect();
        let passive = proxy.passive.clone();
        crate::metrics::watch_upstreams(
            proxy
                .upstreams
                .iter()
                .map(|u| u.address.dial.clone())
                .collect(),
            &hosts,
            // As Caddy's Healthy(): the active checks' verdict, and passive failures only
            // where the config asked for them (the edge's default never takes one out).
            Arc::new(move |h| h.actively_healthy() && !(passive.strict && passive.down(h))),
        );
        let checks = active.and_then(|a| {
            a.spawn(
                proxy.upstreams.iter().map(|u| u.address.clone()).collect(),
                hosts.clone(),
                proxy.transport.clone(),
            )
        });
        Balancer {
            upstreams: proxy.upstreams.iter().cloned().collect(),
            hosts,
            _checks: checks,
        }
    }

    /// Fresh state for upstreams found at run time (dynamic upstreams, from DNS): all
    /// healthy, never actively checked (as in Caddy).
    pub(crate) fn of(upstreams: Vec<Arc<Upstream>>) -> Balancer {
        Balancer {
            hosts: upstreams.iter().map(|_| Host::default()).collect(),
            upstreams: upstreams.into(),
            _checks: None,
        }
    }

    /// Chooses an upstream by the proxy's policy among the available ones, leaving out those
    /// in `tried` (a bit each, the first 128). The edge's default passive health only makes a
    /// failed upstream the last choice; Caddy's (`fail_duration` set) leaves it out.
    fn choose(&self, proxy: &Proxy, pick: &Pick<'_>, tried: u128) -> Choice {
        let was_tried = |i: usize| i < 128 && tried & (1 << i) != 0;
        let view = |i: usize, lenient: bool| -> View<'_> {
            let host = &self.hosts[i];
            View {
                upstream: &self.upstreams[i],
                host,
                available: !was_tried(i)
                    && host.actively_healthy()
                    && !proxy.passive.full(host)
                    && (lenient || !proxy.passive.down(host)),
            }
        };
        let select = |lenient: bool| -> Choice {
            let n = self.upstreams.len();
            if n == 0 {
                return proxy.policy.select::<View<'_>>(&[], pick);
            }
            // A few upstreams' views fit on the stack: a Vec was an allocation per request.
            if n <= STACK_VIEWS {
                let mut views = [view(0, lenient); STACK_VIEWS];
                for (i, v) in views.iter_mut().enumerate().take(n).skip(1) {
                    *v = view(i, lenient);
                }
                return proxy.policy.select(&views[..n], pick);
            }
            let views: Vec<View<'_>> = (0..n).map(|i| view(i, lenient)).collect();
            proxy.policy.select(&views, pick)
        };
        if let Some(choice) = select(false) {
            return Some(choice);
        }
        if proxy.passive.strict {
            return None;
        }
        select(true)
    }

    fn failed(&self, proxy: &Proxy, i: usize) {
        if proxy.passive.failed(&self.hosts[i]) {
            tracing::warn!(upstream = %self.upstreams[i].text, skip_for = ?proxy.passive.fail_duration, "upstream marked down");
        }
    }

    #[cfg(test)]
    fn first_choice(&self, proxy: &Proxy) -> Option<usize> {
        let headers = HeaderMap::new();
        let pick = Pick {
            peer: std::net::Ipv4Addr::LOCALHOST.into(),
            client: std::net::Ipv4Addr::LOCALHOST.into(),
            target: "/",
            host: "example.org",
            headers: &headers,
        };
        self.choose(proxy, &pick, 0).map(|(i, _)| i)
    }
}

/// Where an upgraded (WebSocket) connection's task goes: the tracker that owns it, the
/// signal that ends it, and what it keeps alive until it ends (the client connection's place
/// under the connection limit).
#[derive(Debug)]
pub(crate) struct Upgrades<'a, H> {
    /// Owner of the task.
    pub(crate) tasks: &'a TaskTracker,
    /// Cancelled when upgraded connections must end.
    pub(crate) stop: &'a CancellationToken,
    /// Dropped when the upgraded connection ends.
    pub(crate) hold: H,
}

/// The pooled upstream client and its timeouts.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    pool: Arc<Pool>,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// An upgraded connection moving no bytes for this long is closed.
    upgraded_idle: Duration,
}

/// What the client connection looks like to the upstream.
#[derive(Debug)]
pub(crate) struct Forwarded<'a> {
    /// The client's address, as the `X-Forwarded-For` value.
    pub(crate) client_ip: &'a HeaderValue,
    /// "http" or "https".
    pub(crate) proto: &'static str,
    /// The Host the client asked for, as sent.
    pub(crate) host: &'a HeaderValue,
    /// Sent instead of the request's method and target (`reverse_proxy`'s `method` and
    /// `rewrite`, `forward_auth`); placeholders in `header_up` still read the request as the
    /// client sent it, as in Caddy.
    pub(crate) target: Option<(Method, PathAndQuery)>,
}

/// The outcome of proxying: the response and the upstream that gave it.
pub(crate) struct Outcome {
    /// The response for the client.
    pub(crate) response: Response<Body>,
    /// The upstream that answered (or was tried last).
    pub(crate) upstream: Option<Arc<Upstream>>,
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // A message has a handful of names and usually one hop-by-hop header (a response's
    // `Connection: keep-alive`) or none: finding them among the names, compared as known
    // names, costs less than nine hashed removals of names that are not there.
    let mut present: [Option<HeaderName>; 9] = [const { None }; 9];
    let mut found = 0;
    let mut connection = false;
    for name in headers.keys() {
        connection |= *name == header::CONNECTION;
        if (*name == header::UPGRADE || HOP_BY_HOP.contains(name)) && found < present.len() {
            present[found] = Some(name.clone());
            found += 1;
        }
    }
    if found == 0 {
        return;
    }
    if connection {
        // Usually the options name no header the message has ("keep-alive", "close"): then
        // nothing is collected (a HeaderName for "keep-alive" would be an allocation).
        let has = |token: &str| {
            headers
                .keys()
                .any(|k| k.as_str().eq_ignore_ascii_case(token.trim()))
        };
        let names_one = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(has);
        if names_one {
            remove_connection_named(headers);
        }
    }
    for name in present.iter_mut().take(found) {
        if let Some(name) = name.take() {
            headers.remove(name);
        }
    }
}

/// Removes the headers the `Connection` header's options name.
pub(crate) fn remove_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// The protocol a request asks to upgrade to (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

impl Client {
    /// A client with these timeouts.
    pub(crate) fn new(
        connect_timeout: Duration,
        response_timeout: Duration,
        upgraded_idle: Duration,
    ) -> Client {
        Client {
            pool: Pool::new(Duration::from_secs(60), 256),
            connect_timeout,
            response_timeout,
            upgraded_idle,
        }
    }

    /// Proxies `req` through `proxy`, choosing upstreams by `balancer` (`proxy`'s own).
    pub(crate) async fn forward(
        &self,
        proxy: &Proxy,
        balancer: &Balancer,
        mut req: Request<UpBody>,
        cx: &mut Cx,
        fwd: Forwarded<'_>,
        upgrades: Upgrades<'_, impl Send + 'static>,
    ) -> Outcome {
        // `request_body max_size`: a declared length over it is refused unread.
        if let Some(limit) = cx.body_limit
            && crate::body::declares_over(req.headers(), limit)
        {
            return Outcome {
                response: crate::body::too_large(),
                upstream: None,
            };
        }
        // The clock is read only for the settings that need it (lb_try_duration here,
        // unhealthy_latency below): each read is a visible part of a request's CPU.
        let started = proxy.try_duration.map(|_| Instant::now());
        let upgrade = upgrade_of(&req);
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        // Placeholders read the request as the client sent it, as in Caddy.
        let snapshot = (proxy.header_up.is_dynamic() || proxy.header_down.is_dynamic())
            .then(|| parts.headers.clone());
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        if let Some(protocol) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol.clone());
        }
        let peer = cx.remote.ip();
        // Trusted by `servers { trusted_proxies }` or by this proxy's own, as in Caddy.
        forwarding_headers(
            &mut headers,
            &fwd,
            cx.trusted || proxy.trusted.iter().any(|c| c.contains(peer)),
        );
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, fwd.host.clone());
        }
        let per_upstream = proxy.header_up.uses_upstream();
        let (req_method, req_uri, version) = (&parts.method, &parts.uri, parts.version);
        let seen = |headers| Req {
            method: req_method,
            uri: req_uri,
            headers,
            version,
        };
        let down = match &snapshot {
            Some(h) => proxy.header_down.render(seen(h), cx),
            None => Vec::new(),
        };
        if !per_upstream {
            let up = match &snapshot {
                Some(h) => proxy.header_up.render(seen(h), cx),
                None => Vec::new(),
            };
            proxy.header_up.apply(&mut headers, &up);
        }
        let (method, path) = match fwd.target {
            Some(target) => target,
            None => (
                parts.method.clone(),
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            ),
        };
        // Only the header and cookie policies read headers: the others cost no copy.
        let client_headers = if proxy.policy.reads_headers() {
            headers.clone()
        } else {
            HeaderMap::new()
        };
        let host_value: &HeaderValue = fwd.host;
        let pick = Pick {
            peer,
            client: cx.client,
            target: path.as_str(),
            host: host_value.to_str().unwrap_or(""),
            headers: &client_headers,
        };

        let retryable = body.is_end_stream();
        let over = cx
            .body_limit
            .map(|limit| (limit, Arc::new(std::sync::atomic::AtomicBool::new(false))));
        let body = match (body, &over) {
            (UpBody::Client(inner), Some((limit, flag))) if !retryable => {
                UpBody::Capped(crate::body::Capped::new(inner, *limit, flag.clone()))
            }
            (body, _) => body,
        };
        let mut body = Some(if retryable { UpBody::Empty } else { body });
        // Caddy chooses again only when lb_try_duration or lb_retries ask for it; without
        // them the edge tries each other upstream once after a failed connection.
        let caddy_retries = proxy.try_duration.is_some() || proxy.retries > 0;
        let mut tried: u128 = 0;
        let mut attempts: u32 = 0;
        let mut last: Option<Arc<Upstream>> = None;
        // Made only when no upstream answered.
        let mut failure = (
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable: no upstream available\n",
        );
        loop {
            let choice = balancer.choose(proxy, &pick, if caddy_retries { 0 } else { tried });
            let Some((i, set_cookie)) = choice else {
                if caddy_retries && self.try_again(proxy, started, attempts).await {
                    attempts += 1;
                    continue;
                }
                break;
            };
            let Some(this_body) = body.take() else { break };
            let upstream = &balancer.upstreams[i];
            last = Some(upstream.clone());
            if i < 128 {
                tried |= 1 << i;
            }
            let mut up = Request::new(this_body);
            *up.method_mut() = method.clone();
            // Origin form: the connection is to the upstream already.
            *up.uri_mut() = Uri::from(path.clone());
            *up.version_mut() = Version::HTTP_11;
            // A header_up naming the upstream changes them per upstream: keep the original.
            *up.headers_mut() = if per_upstream {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            if per_upstream && let Some(h) = &snapshot {
                cx.upstream = Some(upstream.authority.to_string());
                let rendered = proxy.header_up.render(seen(h), cx);
                proxy.header_up.apply(up.headers_mut(), &rendered);
            }
            let in_flight = InFlight::start(&balancer.hosts, i).await;
            let sent = proxy.passive.unhealthy_latency.map(|_| Instant::now());
            // Pinned where it is made: `timeout` then holds a pointer, and neither it nor its
            // await moves the whole exchange (the pool's future and the request) again.
            let exchange = std::pin::pin!(async {
                if upgrade.is_some() {
                    // Boxed: a new connection's future is large, and only upgrades need it.
                    Box::pin(self.send_upgrade(proxy, upstream, up, upgrades.tasks, upgrades.stop))
                        .await
                } else {
                    self.pool
                        .send(&proxy.transport, upstream, up, self.connect_timeout)
                        .await
                }
            });
            let timeout = proxy
                .transport
                .response_header_timeout
                .unwrap_or(self.response_timeout);
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(response)) => {
                    if proxy.passive.answered(
                        &balancer.hosts[i],
                        response.status(),
                        sent.map_or(Duration::ZERO, |s| s.elapsed()),
                    ) {
                        tracing::warn!(upstream = %upstream.text, "upstream marked down");
                    }
                    // `{upstream_hostport}` in header_down names the upstream that answered.
                    let down = match &snapshot {
                        Some(h) if proxy.header_down.uses_upstream() => {
                            cx.upstream = Some(upstream.authority.to_string());
                            proxy.header_down.render(seen(h), cx)
                        }
                        _ => down,
                    };
                    let mut response =
                        self.respond(proxy, &down, response, in_flight, client_upgrade, upgrades);
                    if let Some(cookie) = set_cookie {
                        response.headers_mut().append(header::SET_COOKIE, cookie);
                    }
                    return Outcome {
                        response,
                        upstream: last,
                    };
                }
                Ok(Err(Failure::Connect(err, unsent))) => {
                    tracing::warn!(upstream = %upstream.text, error = %labcore::exit::chain(&err), "upstream connect failed");
                    balancer.failed(proxy, i);
                    // The request never left: its body (if any) goes to the next choice.
                    if let Some(unsent) = unsent {
                        let (unsent_parts, unsent_body) = unsent.into_parts();
                        if !per_upstream {
                            headers = unsent_parts.headers;
                        }
                        body = Some(unsent_body);
                    }
                    failure = (
                        StatusCode::BAD_GATEWAY,
                        "bad gateway: upstream unreachable\n",
                    );
                    if caddy_retries && !self.try_again(proxy, started, attempts).await {
                        break;
                    }
                    attempts += 1;
                }
                Ok(Err(Failure::Request(_)))
                    if over
                        .as_ref()
                        .is_some_and(|(_, f)| f.load(std::sync::atomic::Ordering::Relaxed)) =>
                {
                    return Outcome {
                        response: crate::body::too_large(),
                        upstream: last,
                    };
                }
                Ok(Err(Failure::Request(err))) => {
                    tracing::warn!(upstream = %upstream.text, error = %labcore::exit::chain(&*err), "upstream request failed");
                    balancer.failed(proxy, i);
                    // A timeout on the connection (transport http write_timeout) is a 504, as
                    // Caddy answers any timed-out network error.
                    failure = if timed_out(&*err) {
                        (
                            StatusCode::GATEWAY_TIMEOUT,
                            "gateway timeout: upstream did not take the request in time\n",
                        )
                    } else {
                        (StatusCode::BAD_GATEWAY, "bad gateway: upstream failed\n")
                    };
                    break;
                }
                Err(_) => {
                    tracing::warn!(upstream = %upstream.text, ?timeout, "upstream response timed out");
                    balancer.failed(proxy, i);
                    failure = (
                        StatusCode::GATEWAY_TIMEOUT,
                        "gateway timeout: upstream did not answer in time\n",
                    );
                    break;
                }
            }
            if method == Method::CONNECT {
                break;
            }
        }
        Outcome {
            response: crate::body::upstream_failed(failure.0, failure.1),
            upstream: last,
        }
    }

    /// Caddy's tryAgain: whether `lb_try_duration`/`lb_retries` allow another choice, after
    /// waiting `lb_try_interval`.
    async fn try_again(&self, proxy: &Proxy, started: Option<Instant>, attempts: u32) -> bool {
        if let (Some(limit), Some(started)) = (proxy.try_duration, started)
            && started.elapsed() >= limit
        {
            return false;
        }
        if proxy.retries > 0 && attempts >= proxy.retries {
            return false;
        }
        if !proxy.try_interval.is_zero() {
            tokio::time::sleep(proxy.try_interval).await;
        }
        true
    }

    /// Sends an upgrade request on a new connection driven by a task in `tasks`.
    async fn send_upgrade(
        &self,
        proxy: &Proxy,
        upstream: &Upstream,
        up: Request<UpBody>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let (mut sender, conn) =
            match pool::connect_upgradeable(&proxy.transport, upstream, self.connect_timeout).await
            {
                Ok(both) => both,
                Err(err) => return Err(Failure::Connect(err, Some(Box::new(up)))),
            };
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
        sender
            .send_request(up)
            .await
            .map(|r| r.map(UpstreamBody::Hyper))
            .map_err(|err| Failure::Request(err.into()))
    }

    /// The client's response; an upgrade (101) also starts the task joining both ends, which
    /// keeps `upgrades.hold` until it ends.
    fn respond(
        &self,
        proxy: &Proxy,
        down: &[HeaderValue],
        mut response: Response<UpstreamBody>,
        in_flight: InFlight,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        upgrades: Upgrades<'_, impl Send + 'static>,
    ) -> Response<Body> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let Upgrades { tasks, stop, hold } = upgrades;
            let stop = stop.clone();
            let idle = self.upgraded_idle;
            tasks.spawn(async move {
                let _hold = hold;
                let _in_flight = in_flight;
                let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok(both) => both,
                    Err(err) => {
                        tracing::debug!(error = %err, "upgrade did not complete");
                        return;
                    }
                };
                join_upgraded(client, upstream, idle, &stop).await;
            });
            let (mut parts, _) = response.into_parts();
            proxy.header_down.apply(&mut parts.headers, down);
            return Response::from_parts(
                parts,
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            );
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        proxy.header_down.apply(&mut parts.headers, down);
        let body = Counted {
            body,
            _in_flight: in_flight,
        }
        .boxed_unsync();
        Response::from_parts(parts, body)
    }
}

/// A response body that counts its request as in flight until it ends or is dropped
/// (`least_conn` and `unhealthy_request_count` read the count).
struct Counted<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: HttpBody + Unpin> HttpBody for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Sets X-Forwarded-For, -Proto and -Host as Caddy does: a peer in `trusted_proxies` has its
/// earlier X-Forwarded-For kept (the client's address appended) and its -Proto and -Host
/// believed; anyone else's are replaced.
fn forwarding_headers(headers: &mut HeaderMap, fwd: &Forwarded<'_>, trusted: bool) {
    let prior = |headers: &HeaderMap, name: &HeaderName| -> Option<HeaderValue> {
        headers
            .get_all(name)
            .iter()
            .next_back()
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let xff = if trusted {
        let all: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if all.is_empty() || all.iter().all(|v| v.is_empty()) {
            fwd.client_ip.clone()
        } else {
            let mut joined = all.join(&b", "[..]);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(fwd.client_ip.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| fwd.client_ip.clone())
        }
    } else {
        fwd.client_ip.clone()
    };
    let proto = match trusted
        .then(|| prior(headers, &X_FORWARDED_PROTO))
        .flatten()
    {
        Some(p) => p,
        None => HeaderValue::from_static(fwd.proto),
    };
    let host = match trusted.then(|| prior(headers, &X_FORWARDED_HOST)).flatten() {
        Some(h) => h,
        None => fwd.host.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_FORWARDED_PROTO.clone(), proto);
    headers.insert(X_FORWARDED_HOST.clone(), host);
}

/// Copies both ways until either end closes, the edge stops, or no byte has moved for
/// `idle` (checked every `idle`, so an idle connection ends within twice that).
async fn join_upgraded(
    client: hyper::upgrade::Upgraded,
    upstream: hyper::upgrade::Upgraded,
    idle: Duration,
    stop: &CancellationToken,
) {
    // Every byte either way passes the client's side, so counting there sees all traffic.
    let moved = Arc::new(AtomicU64::new(0));
    let mut client = Activity::new(TokioIo::new(client), moved.clone());
    let mut upstream = TokioIo::new(upstream);
    let mut copy = std::pin::pin!(tokio::io::copy_bidirectional(&mut client, &mut upstream));
    let mut ticks = tokio::time::interval(idle);
    ticks.tick().await;
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            result = &mut copy => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "upgraded connection ended");
                }
                return;
            }
            _ = ticks.tick() => {
                let now = moved.load(Ordering::Relaxed);
                if now == seen {
                    tracing::debug!(?idle, "idle upgraded connection closed");
                    return;
                }
                seen = now;
            }
        }
    }
}

/// Whether an exchange failed on an I/O timeout somewhere in its error's chain.
fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header_ops::HeaderOps;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    fn proxy(policy: &str, fail_duration: Option<&str>) -> Proxy {
        Proxy {
            upstreams: vec![
                Upstream::parse(":1").unwrap(),
                Upstream::parse(":2").unwrap(),
            ],
            policy: Policy::parse(policy).unwrap(),
            try_duration: None,
            try_interval: Duration::ZERO,
            retries: 0,
            passive: Passive::build(&Default::default(), fail_duration, None).unwrap(),
            transport: Transport::plain(),
            trusted: Vec::new(),
            header_up: HeaderOps::default(),
            header_down: HeaderOps::default(),
        }
    }

    #[test]
    fn round_robin_skips_upstreams_that_are_down() {
        let proxy = proxy("round_robin", None);
        let balancer = Balancer::new(&proxy, None);
        let first = |balancer: &Balancer| {
            let i = balancer.first_choice(&proxy).unwrap();
            balancer.upstreams[i].text.clone()
        };
        let firsts: Vec<String> = (0..4).map(|_| first(&balancer)).collect();
        assert_eq!(firsts, [":2", ":1", ":2", ":1"], "Caddy's order");
        balancer.failed(&proxy, 0);
        let firsts: Vec<String> = (0..4).map(|_| first(&balancer)).collect();
        assert_eq!(firsts, [":2", ":2", ":2", ":2"]);
        balancer.failed(&proxy, 1);
        assert!(
            balancer.first_choice(&proxy).is_some(),
            "without fail_duration set, a down upstream is still tried"
        );
    }

    #[test]
    fn with_fail_duration_set_a_down_upstream_is_never_chosen() {
        let proxy = proxy("first", Some("1m"));
        let balancer = Balancer::new(&proxy, None);
        assert_eq!(balancer.first_choice(&proxy), Some(0));
        balancer.failed(&proxy, 0);
        assert_eq!(balancer.first_choice(&proxy), Some(1));
        balancer.failed(&proxy, 1);
        assert_eq!(balancer.first_choice(&proxy), None, "all down: 503");
    }

    #[test]
    fn trusted_proxies_keep_forwarded_headers_and_others_lose_them() {
        let client = HeaderValue::from_static("10.0.0.9");
        let host = HeaderValue::from_static("app.example");
        let fwd = Forwarded {
            client_ip: &client,
            proto: "http",
            host: &host,
            target: None,
        };
        let sent = || {
            let mut h = HeaderMap::new();
            h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
            h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
            h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("front.example"));
            h
        };
        let mut h = sent();
        forwarding_headers(&mut h, &fwd, true);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "front.example");
        let mut h = sent();
        forwarding_headers(&mut h, &fwd, false);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "app.example");
    }
}
