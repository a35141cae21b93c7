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
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Incoming};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::Activity;
use crate::body::{Body, UpBody, status_response};
use crate::context::{Cx, Req};
use crate::header_ops::HeaderOps;
use crate::pool::{self, Failure, LeasedBody, Pool};
use crate::site::split_host_port;

/// One upstream server, as configured.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// As written in the config.
    pub(crate) text: String,
    /// Where to connect.
    pub(crate) authority: Authority,
}

impl Upstream {
    /// Parses "host:port", "http://host:port", ":port" (localhost) or "host" (port 80).
    pub(crate) fn parse(text: &str) -> Result<Arc<Upstream>, String> {
        let rest = if let Some(rest) = text.strip_prefix("http://") {
            rest
        } else if text.starts_with("https://") {
            return Err(format!("{text:?}: HTTPS upstreams are not supported yet"));
        } else if text.contains("://") {
            return Err(format!("{text:?}: only http:// upstreams are supported"));
        } else {
            text
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(format!("{text:?}: an upstream cannot hold a path"));
        }
        let (host, port) =
            split_host_port(rest).ok_or_else(|| format!("{text:?} has a bad port"))?;
        let host = if host.is_empty() { "localhost" } else { host };
        let port = port.unwrap_or(80);
        if port == 0 {
            return Err(format!("{text:?}: port 0 is not a port to connect to"));
        }
        let authority: Authority = format!("{host}:{port}")
            .parse()
            .map_err(|_| format!("{text:?} is not a host:port"))?;
        Ok(Arc::new(Upstream {
            text: text.to_owned(),
            authority,
        }))
    }
}

/// One `reverse_proxy`: which upstreams, how to choose and what to rewrite.
/// Its run-time state (round robin, health) is `proxy::Balancer`'s.
#[derive(Clone, Debug)]
pub(crate) struct Proxy {
    /// The upstreams.
    pub(crate) upstreams: Vec<Arc<Upstream>>,
    /// Always prefer the first healthy upstream (`lb_policy first`).
    pub(crate) first: bool,
    /// How long a failed upstream is skipped.
    pub(crate) fail_duration: Duration,
    /// Failures before it is skipped.
    pub(crate) max_fails: u32,
    /// Request header changes.
    pub(crate) header_up: HeaderOps,
    /// Response header changes.
    pub(crate) header_down: HeaderOps,
}

/// A reverse proxy's run-time state: the round-robin position and each upstream's recent
/// failures ("passive health"), indexed like the proxy's upstreams.
#[derive(Debug)]
pub(crate) struct Balancer {
    next: AtomicUsize,
    health: Vec<Health>,
}

/// One upstream's recent failures.
#[derive(Debug, Default)]
struct Health {
    fails: AtomicU32,
    /// Milliseconds since [`epoch_ms`]'s start until which the upstream is skipped.
    down_until: AtomicU64,
}

impl Health {
    fn is_down(&self, now_ms: u64) -> bool {
        self.down_until.load(Ordering::Relaxed) > now_ms
    }
}

fn epoch_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Balancer {
    /// Fresh state for `proxy`: all upstreams healthy, round robin from the first.
    pub(crate) fn new(proxy: &Proxy) -> Balancer {
        Balancer {
            next: AtomicUsize::new(0),
            health: proxy.upstreams.iter().map(|_| Health::default()).collect(),
        }
    }

    /// Indexes of `proxy`'s upstreams in the order to try them: healthy ones first, in
    /// policy order, then the rest (when all are down, trying beats refusing).
    fn order(&self, proxy: &Proxy) -> impl Iterator<Item = usize> + use<> {
        let n = proxy.upstreams.len();
        let start = if proxy.first || n == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        // Health is read once, so an upstream failing during this request is not tried twice.
        let now = epoch_ms();
        let down: u128 = self
            .health
            .iter()
            .take(128)
            .enumerate()
            .filter(|(_, h)| h.is_down(now))
            .fold(0, |mask, (i, _)| mask | 1 << i);
        let is_down = move |i: usize| i < 128 && down & (1 << i) != 0;
        let rotated = move || (0..n).map(move |i| (start + i) % n);
        rotated()
            .filter(move |&i| !is_down(i))
            .chain(rotated().filter(move |&i| is_down(i)))
    }

    /// Counts a failure of upstream `i`; at `max_fails` it is skipped for `fail_duration`.
    fn failed(&self, proxy: &Proxy, i: usize) {
        let health = &self.health[i];
        let fails = health.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= proxy.max_fails {
            let until = epoch_ms() + proxy.fail_duration.as_millis() as u64;
            health.down_until.store(until, Ordering::Relaxed);
            health.fails.store(0, Ordering::Relaxed);
            tracing::warn!(upstream = %proxy.upstreams[i].text, skip_for = ?proxy.fail_duration, "upstream marked down");
        }
    }

    fn succeeded(&self, i: usize) {
        let health = &self.health[i];
        if health.fails.load(Ordering::Relaxed) != 0 {
            health.fails.store(0, Ordering::Relaxed);
        }
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

const HOP_BY_HOP: [HeaderName; 8] = [
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
    // Usually the options name no header the message has ("keep-alive", "close"): then
    // nothing is collected (a HeaderName for "keep-alive" would be an allocation).
    let names_one = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| headers.contains_key(n.trim()));
    if names_one {
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
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
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
        // The edge is the front door: forwarding headers from clients are not trusted.
        headers.insert(X_FORWARDED_FOR.clone(), fwd.client_ip.clone());
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(fwd.proto),
        );
        headers.insert(X_FORWARDED_HOST.clone(), fwd.host.clone());
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

        let retryable = body.is_end_stream();
        let mut body = Some(if retryable { UpBody::Empty } else { body });
        let mut last: Option<Arc<Upstream>> = None;
        // Made only when no upstream answered.
        let mut failure = (
            StatusCode::BAD_GATEWAY,
            "bad gateway: no upstream answered\n",
        );
        let mut order = balancer.order(proxy).peekable();
        while let Some(i) = order.next() {
            let upstream = &proxy.upstreams[i];
            let Some(this_body) = body.take() else { break };
            last = Some(upstream.clone());
            // Origin form: the connection is to the upstream already.
            let uri = Uri::from(path.clone());
            let mut up = Request::new(this_body);
            *up.method_mut() = method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = Version::HTTP_11;
            // Only a retry needs the headers again.
            *up.headers_mut() = if retryable && order.peek().is_some() {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            if per_upstream && let Some(h) = &snapshot {
                cx.upstream = Some(upstream.authority.to_string());
                let rendered = proxy.header_up.render(seen(h), cx);
                proxy.header_up.apply(up.headers_mut(), &rendered);
            }
            let exchange = async {
                if upgrade.is_some() {
                    self.send_upgrade(&upstream.authority, up, upgrades.tasks, upgrades.stop)
                        .await
                        .map(|response| (response, None))
                } else {
                    self.pool
                        .send(&upstream.authority, up, self.connect_timeout)
                        .await
                        .map(|(response, lease)| (response, Some(lease)))
                }
            };
            match tokio::time::timeout(self.response_timeout, exchange).await {
                Ok(Ok((response, lease))) => {
                    balancer.succeeded(i);
                    let response =
                        self.respond(proxy, &down, response, lease, client_upgrade, upgrades);
                    return Outcome {
                        response,
                        upstream: last,
                    };
                }
                Ok(Err(Failure::Connect(err))) => {
                    tracing::warn!(upstream = %upstream.text, error = %labcore::exit::chain(&err), "upstream connect failed");
                    balancer.failed(proxy, i);
                    if retryable {
                        body = Some(UpBody::Empty);
                    }
                    failure = (
                        StatusCode::BAD_GATEWAY,
                        "bad gateway: upstream unreachable\n",
                    );
                }
                Ok(Err(Failure::Request(err))) => {
                    tracing::warn!(upstream = %upstream.text, error = %labcore::exit::chain(&err), "upstream request failed");
                    failure = (StatusCode::BAD_GATEWAY, "bad gateway: upstream failed\n");
                    break;
                }
                Err(_) => {
                    tracing::warn!(upstream = %upstream.text, timeout = ?self.response_timeout, "upstream response timed out");
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
            response: status_response(failure.0, failure.1),
            upstream: last,
        }
    }

    /// Sends an upgrade request on a new connection driven by a task in `tasks`.
    async fn send_upgrade(
        &self,
        authority: &Authority,
        up: Request<UpBody>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Response<Incoming>, Failure> {
        let (mut sender, conn) = pool::connect_upgradeable(authority, self.connect_timeout)
            .await
            .map_err(Failure::Connect)?;
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
        sender.send_request(up).await.map_err(Failure::Request)
    }

    /// The client's response; an upgrade (101) also starts the task joining both ends, which
    /// keeps `upgrades.hold` until it ends.
    fn respond(
        &self,
        proxy: &Proxy,
        down: &[HeaderValue],
        mut response: Response<Incoming>,
        lease: Option<pool::Lease>,
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
        let body = match lease {
            Some(lease) => LeasedBody::new(body, lease)
                .map_err(Into::into)
                .boxed_unsync(),
            None => body.map_err(Into::into).boxed_unsync(),
        };
        Response::from_parts(parts, body)
    }
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

    #[test]
    fn round_robin_skips_upstreams_that_are_down() {
        let proxy = Proxy {
            upstreams: vec![
                Upstream::parse(":1").unwrap(),
                Upstream::parse(":2").unwrap(),
            ],
            first: false,
            fail_duration: Duration::from_secs(60),
            max_fails: 1,
            header_up: HeaderOps::default(),
            header_down: HeaderOps::default(),
        };
        let balancer = Balancer::new(&proxy);
        let first = |balancer: &Balancer| {
            let i = balancer.order(&proxy).next().unwrap();
            proxy.upstreams[i].text.clone()
        };
        let firsts: Vec<String> = (0..4).map(|_| first(&balancer)).collect();
        assert_eq!(firsts, [":1", ":2", ":1", ":2"]);
        balancer.failed(&proxy, 0);
        let firsts: Vec<String> = (0..4).map(|_| first(&balancer)).collect();
        assert_eq!(firsts, [":2", ":2", ":2", ":2"]);
        assert_eq!(
            balancer.order(&proxy).count(),
            2,
            "a down upstream is still tried last"
        );
    }
}
