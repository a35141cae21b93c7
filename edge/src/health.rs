//! Upstream health for `reverse_proxy`, as Caddy 2.6 keeps it: active checks (`health_uri`,
//! `health_port`, `health_interval`, `health_timeout`, `health_status`, `health_body`,
//! `health_headers`: a GET to every upstream each interval, from a task of the proxy's own)
//! and passive ones (`fail_duration`, `max_fails`, `unhealthy_status`, `unhealthy_latency`,
//! `unhealthy_request_count`: failures of real requests, each remembered for
//! `fail_duration`).
//!
//! Invariants: an upstream's answer to a health check is untrusted, so at most
//! [`MAX_HEALTH_BODY`] bytes of it are read and a check never outlives `health_timeout`; the
//! checker task ends when its proxy is dropped (a reload) or the edge stops; state is atomics
//! (and a short list of failure times), never held across an await.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::http::uri::PathAndQuery;
use hyper::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::site::parse_duration;
use crate::transport::{Address, At, OptLine, Protocol, Target, Transport, at};

/// The most of a health check's body that is read.
pub(crate) const MAX_HEALTH_BODY: usize = 1 << 20;

/// The health options as TOML: each field is the Caddyfile option of the same name.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthToml {
    /// Path (and query) of the active check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_uri: Option<String>,
    /// Path of the active check (Caddy's older spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_path: Option<String>,
    /// Port of the active check, instead of the upstream's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_port: Option<u16>,
    /// Time between checks. Default "30s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_interval: Option<String>,
    /// Limit on one check. Default "5s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_timeout: Option<String>,
    /// Expected status: "200", or a class "2xx". Default: any 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_status: Option<String>,
    /// A regular expression the body must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_body: Option<String>,
    /// Headers of the check request (a Host here sets the Host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) health_headers: Vec<(String, String)>,
    /// Statuses of real responses that count as failures ("500", "5xx").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) unhealthy_status: Vec<String>,
    /// A response slower than this counts as a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) unhealthy_latency: Option<String>,
    /// Requests in flight at which an upstream takes no more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) unhealthy_request_count: Option<usize>,
}

impl HealthToml {
    /// Whether nothing is set.
    pub(crate) fn is_empty(&self) -> bool {
        *self == HealthToml::default()
    }

    /// Takes one `reverse_proxy` option if it is a health option: `Ok(false)` when not.
    pub(crate) fn parse_option(
        &mut self,
        name: &str,
        args: &[String],
        sub: &OptLine<'_>,
    ) -> Result<bool, At> {
        let line = sub.line;
        let one = || match args {
            [v] => Ok(v.clone()),
            _ => Err(at(line, format!("reverse_proxy {name} takes one value"))),
        };
        let duration = || {
            let v = one()?;
            parse_duration(&v)
                .map(|_| v.clone())
                .ok_or_else(|| at(line, format!("{name}: {v:?} is not a duration")))
        };
        let known = name.starts_with("health_") || name.starts_with("unhealthy_");
        if !known {
            return Ok(false);
        }
        if name != "health_headers" && sub.block.is_some() {
            return Err(at(line, format!("reverse_proxy {name} takes no block")));
        }
        match name {
            "health_uri" => {
                let v = one()?;
                v.parse::<PathAndQuery>()
                    .ok()
                    .filter(|_| v.starts_with('/'))
                    .ok_or_else(|| at(line, format!("health_uri: {v:?} is not a path")))?;
                self.health_uri = Some(v);
            }
            "health_path" => {
                let v = one()?;
                if !v.starts_with('/') || v.parse::<PathAndQuery>().is_err() {
                    return Err(at(line, format!("health_path: {v:?} is not a path")));
                }
                self.health_path = Some(v);
            }
            "health_port" => {
                let v = one()?;
                self.health_port = Some(
                    v.parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| at(line, format!("health_port: {v:?} is not a port")))?,
                );
            }
            "health_interval" => self.health_interval = Some(duration()?),
            "health_timeout" => self.health_timeout = Some(duration()?),
            "health_status" => {
                let v = one()?;
                status_code(&v).map_err(|m| at(line, format!("health_status: {m}")))?;
                self.health_status = Some(v);
            }
            "health_body" => {
                let v = one()?;
                regex_lite::Regex::new(&v).map_err(|e| {
                    at(
                        line,
                        format!("health_body: {v:?} is not a regular expression: {e}"),
                    )
                })?;
                self.health_body = Some(v);
            }
            "health_headers" => {
                if !args.is_empty() {
                    return Err(at(line, "health_headers takes a block of header lines"));
                }
                for h in sub.block.as_deref().unwrap_or_default() {
                    let Some((field, values)) = h.words.split_first() else {
                        continue;
                    };
                    HeaderName::from_bytes(field.as_bytes()).map_err(|_| {
                        at(
                            h.line,
                            format!("health_headers: {field:?} is not a header name"),
                        )
                    })?;
                    let values = if values.is_empty() {
                        vec![String::new()]
                    } else {
                        values.to_vec()
                    };
                    for v in values {
                        HeaderValue::from_str(&v).map_err(|_| {
                            at(
                                h.line,
                                format!("health_headers {field}: {v:?} is not a header value"),
                            )
                        })?;
                        self.health_headers.push((field.clone(), v));
                    }
                }
            }
            "unhealthy_status" if !args.is_empty() => {
                for v in args {
                    status_code(v).map_err(|m| at(line, format!("unhealthy_status: {m}")))?;
                }
                self.unhealthy_status.extend(args.iter().cloned());
            }
            "unhealthy_latency" => self.unhealthy_latency = Some(duration()?),
            "unhealthy_request_count" => {
                let v = one()?;
                self.unhealthy_request_count = Some(v.parse().map_err(|_| {
                    at(
                        line,
                        format!("unhealthy_request_count: {v:?} is not a number"),
                    )
                })?);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// "200" or a class "2xx" (kept as 2), as Caddy reads `health_status`.
fn status_code(text: &str) -> Result<u16, String> {
    let digits = match text.strip_suffix("xx") {
        Some(class) if text.len() == 3 => class,
        _ => text,
    };
    match digits.parse::<u16>() {
        Ok(n) if (1..=5).contains(&n) || (100..=999).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a status code or class")),
    }
}

/// Caddy's StatusCodeMatches: a one-digit code is a class.
fn status_matches(actual: u16, want: u16) -> bool {
    if want < 100 {
        actual / 100 == want
    } else {
        actual == want
    }
}

/// One upstream's health.
#[derive(Debug, Default)]
pub(crate) struct Host {
    /// Requests in flight.
    in_flight: AtomicUsize,
    /// Set by the active checker.
    unhealthy: AtomicBool,
    /// How many entries `fails` holds, read without the lock.
    fail_count: AtomicU32,
    /// When each remembered failure is forgotten.
    fails: Mutex<Vec<Instant>>,
    /// `max_conns_per_host`: a permit per connection the upstream may have busy.
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Host {
    /// A host whose busy connections are at most `max` (`transport http
    /// { max_conns_per_host }`); `None`: unlimited.
    pub(crate) fn limited(max: Option<usize>) -> Host {
        Host {
            slots: max.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            ..Host::default()
        }
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the active checker let it be.
    pub(crate) fn actively_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// Failures remembered now.
    fn fails(&self) -> u32 {
        if self.fail_count.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let now = Instant::now();
        let mut fails = self.fails.lock().unwrap_or_else(|p| p.into_inner());
        fails.retain(|until| *until > now);
        self.fail_count.store(fails.len() as u32, Ordering::Relaxed);
        fails.len() as u32
    }

    fn count_fail(&self, remember: Duration) {
        let mut fails = self.fails.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        fails.retain(|until| *until > now);
        // Bounded: past a few thousand failures in one window, more add nothing.
        if fails.len() < 4096 {
            fails.push(now + remember);
        }
        self.fail_count.store(fails.len() as u32, Ordering::Relaxed);
    }
}

/// Counts a request in flight until dropped, holding its connection slot when the host
/// has `max_conns_per_host`.
#[derive(Debug)]
pub(crate) struct InFlight {
    hosts: Arc<[Host]>,
    i: usize,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl InFlight {
    /// Counts one more request on `hosts[i]`; with `max_conns_per_host`, first waits for a
    /// free slot (as Go's transport waits for a connection), which the request keeps until
    /// its response ends, so the upstream never has more busy connections than that.
    pub(crate) async fn start(hosts: &Arc<[Host]>, i: usize) -> InFlight {
        let permit = match &hosts[i].slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    tracing::debug!(upstream = i, "at max_conns_per_host; waiting for a slot");
                    slots.clone().acquire_owned().await.ok()
                }
            },
        };
        hosts[i].in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            hosts: hosts.clone(),
            i,
            _slot: permit,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.hosts[self.i].in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Passive health, compiled.
#[derive(Clone, Debug)]
pub(crate) struct Passive {
    /// How long a failure is remembered.
    pub(crate) fail_duration: Duration,
    /// Failures at which an upstream is down.
    pub(crate) max_fails: u32,
    /// Whether the configuration asked for it: then a down upstream is not chosen. The
    /// edge's own default only makes it the last choice.
    pub(crate) strict: bool,
    /// Statuses that count as failures.
    pub(crate) unhealthy_status: Vec<u16>,
    /// Latency that counts as a failure.
    pub(crate) unhealthy_latency: Option<Duration>,
    /// Requests in flight that make an upstream full (0: no limit).
    pub(crate) max_requests: usize,
}

impl Passive {
    /// Compiles the passive options (`fail_duration` and `max_fails` are `reverse_proxy`'s).
    pub(crate) fn build(
        t: &HealthToml,
        fail_duration: Option<&str>,
        max_fails: Option<u32>,
    ) -> Result<Passive, String> {
        let explicit = match fail_duration {
            Some(text) => Some(
                parse_duration(text)
                    .ok_or_else(|| format!("fail_duration {text:?} is not a duration"))?,
            ),
            None => None,
        };
        let unhealthy_latency = t
            .unhealthy_latency
            .as_deref()
            .map(|s| {
                parse_duration(s)
                    .ok_or_else(|| format!("unhealthy_latency {s:?} is not a duration"))
            })
            .transpose()?;
        let unhealthy_status = t
            .unhealthy_status
            .iter()
            .map(|s| status_code(s))
            .collect::<Result<Vec<u16>, String>>()?;
        Ok(Passive {
            // Without fail_duration the edge remembers a failure 30 s, as it always has.
            fail_duration: explicit.unwrap_or(Duration::from_secs(30)),
            max_fails: max_fails.unwrap_or(1).max(1),
            strict: explicit.is_some_and(|d| !d.is_zero()),
            unhealthy_status,
            unhealthy_latency,
            max_requests: t.unhealthy_request_count.unwrap_or(0),
        })
    }

    /// Whether `host` is down by passive health.
    pub(crate) fn down(&self, host: &Host) -> bool {
        !self.fail_duration.is_zero() && host.fails() >= self.max_fails
    }

    /// Whether `host` takes no more requests.
    pub(crate) fn full(&self, host: &Host) -> bool {
        self.max_requests > 0 && host.in_flight() >= self.max_requests
    }

    /// Counts a failure of `host`; true when that made it down.
    pub(crate) fn failed(&self, host: &Host) -> bool {
        if self.fail_duration.is_zero() {
            return false;
        }
        let was = self.down(host);
        host.count_fail(self.fail_duration);
        !was && self.down(host)
    }

    /// Counts a response's status and latency; true when that made it down.
    pub(crate) fn answered(&self, host: &Host, status: StatusCode, latency: Duration) -> bool {
        let mut down = false;
        for want in &self.unhealthy_status {
            if status_matches(status.as_u16(), *want) {
                down |= self.failed(host);
            }
        }
        if self.unhealthy_latency.is_some_and(|l| latency >= l) {
            down |= self.failed(host);
        }
        down
    }
}

/// Active health checks, compiled.
#[derive(Clone, Debug)]
pub(crate) struct Active {
    uri: PathAndQuery,
    port: Option<u16>,
    interval: Duration,
    timeout: Duration,
    status: Option<u16>,
    body: Option<regex_lite::Regex>,
    headers: Vec<(HeaderName, HeaderValue)>,
    host: Option<HeaderValue>,
}

impl Active {
    /// Compiles the active options; `None` when no check is asked for (Caddy checks when a
    /// URI, path or port is set).
    pub(crate) fn build(t: &HealthToml) -> Result<Option<Active>, String> {
        let uri = t.health_uri.as_deref().or(t.health_path.as_deref());
        if uri.is_none() && t.health_port.is_none() {
            for (set, name) in [
                (t.health_interval.is_some(), "health_interval"),
                (t.health_timeout.is_some(), "health_timeout"),
                (t.health_status.is_some(), "health_status"),
                (t.health_body.is_some(), "health_body"),
                (!t.health_headers.is_empty(), "health_headers"),
            ] {
                if set {
                    // Caddy accepts and never checks; saying so beats a check that never runs.
                    return Err(format!(
                        "{name} needs health_uri (or health_port): without one no check runs"
                    ));
                }
            }
            return Ok(None);
        }
        let uri: PathAndQuery = uri
            .unwrap_or("/")
            .parse()
            .map_err(|_| "health_uri is not a path".to_owned())?;
        let dur = |v: &Option<String>, default: u64, what: &str| -> Result<Duration, String> {
            match v {
                None => Ok(Duration::from_secs(default)),
                Some(s) => parse_duration(s)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("{what} {s:?} is not a positive duration")),
            }
        };
        let mut headers = Vec::new();
        let mut host = None;
        for (name, value) in &t.health_headers {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("health_headers: {name:?} is not a header name"))?;
            let v = HeaderValue::from_str(value)
                .map_err(|_| format!("health_headers {name}: {value:?} is not a header value"))?;
            if n == header::HOST {
                host.get_or_insert(v);
            } else {
                headers.push((n, v));
            }
        }
        Ok(Some(Active {
            uri,
            port: t.health_port,
            interval: dur(&t.health_interval, 30, "health_interval")?,
            timeout: dur(&t.health_timeout, 5, "health_timeout")?,
            status: t.health_status.as_deref().map(status_code).transpose()?,
            body: t
                .health_body
                .as_deref()
                .map(|b| regex_lite::Regex::new(b).map_err(|e| format!("health_body: {e}")))
                .transpose()?,
            headers,
            host,
        }))
    }

    /// Starts checking `upstreams` (whose state is `hosts`) now and every interval, on the
    /// current runtime; the checks stop when the guard is dropped. `None` outside a runtime
    /// (`edge check`).
    pub(crate) fn spawn(
        self,
        upstreams: Vec<Address>,
        hosts: Arc<[Host]>,
        transport: Transport,
    ) -> Option<DropGuard> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let stop = CancellationToken::new();
        let this = Arc::new(self);
        let transport = Arc::new(transport);
        let ended = stop.clone();
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(this.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ended.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let rounds = upstreams.iter().enumerate().map(|(i, address)| {
                    let (this, transport, hosts) = (this.clone(), transport.clone(), hosts.clone());
                    async move {
                        let healthy = match tokio::time::timeout(this.timeout, this.check(address, &transport)).await {
                            Ok(Ok(())) => true,
                            Ok(Err(why)) => {
                                tracing::info!(upstream = %address.dial, %why, "active health check failed");
                                false
                            }
                            Err(_) => {
                                tracing::info!(upstream = %address.dial, timeout = ?this.timeout, "active health check timed out");
                                false
                            }
                        };
                        let was = hosts[i].unhealthy.swap(!healthy, Ordering::Relaxed);
                        if was == healthy {
                            tracing::warn!(upstream = %address.dial, healthy, "upstream health changed");
                        }
                    }
                });
                tokio::select! {
                    _ = ended.cancelled() => return,
                    _ = futures_util::future::join_all(rounds) => {}
                }
            }
        });
        Some(stop.drop_guard())
    }

    /// One check of `address`.
    async fn check(&self, address: &Address, transport: &Transport) -> Result<(), String> {
        let (address, host) = match (self.port, &address.target) {
            (Some(port), Target::Tcp(h, _)) => {
                let a = Address {
                    target: Target::Tcp(h.clone(), port),
                    ..address.clone()
                };
                let host = a.authority().to_string();
                (a, host)
            }
            (Some(port), Target::Unix(_)) => (
                Address {
                    scheme: address.scheme,
                    dial: format!("localhost:{port}"),
                    target: Target::Tcp("localhost".into(), port),
                },
                format!("localhost:{port}"),
            ),
            (None, Target::Tcp(..)) => (address.clone(), address.authority().to_string()),
            (None, Target::Unix(_)) => (address.clone(), "localhost".to_owned()),
        };
        let stream = transport
            .connect(&address, self.timeout)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let mut req = Request::get(self.uri.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let host = match &self.host {
            Some(h) => h.clone(),
            None => HeaderValue::from_str(&host).map_err(|_| "bad host".to_owned())?,
        };
        for (n, v) in &self.headers {
            req.headers_mut().append(n.clone(), v.clone());
        }
        let response = if transport.protocol == Protocol::Http1 {
            req.headers_mut().insert(header::HOST, host);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| e.to_string())?
        } else {
            let scheme = if transport.tls.is_some() {
                "https"
            } else {
                "http"
            };
            *req.uri_mut() = format!(
                "{scheme}://{}{}",
                host.to_str().unwrap_or("localhost"),
                self.uri
            )
            .parse()
            .map_err(|_| "bad check URI".to_owned())?;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| e.to_string())?
        };
        let status = response.status().as_u16();
        let ok = match self.status {
            Some(want) => status_matches(status, want),
            None => (200..400).contains(&status),
        };
        if !ok {
            return Err(format!("status {status}"));
        }
        if let Some(re) = &self.body {
            // Untrusted: read at most MAX_HEALTH_BODY bytes, then match what came.
            let mut body = response.into_body();
            let mut seen = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    let room = MAX_HEALTH_BODY - seen.len();
                    seen.extend_from_slice(&data[..data.len().min(room)]);
                    if seen.len() >= MAX_HEALTH_BODY {
                        break;
                    }
                }
            }
            if !re.is_match(&String::from_utf8_lossy(&seen)) {
                return Err("the body does not match health_body".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_read_as_caddy_reads_them() {
        assert_eq!(status_code("2xx"), Ok(2));
        assert_eq!(status_code("200"), Ok(200));
        assert!(status_code("abc").is_err());
        assert!(status_matches(204, 2));
        assert!(!status_matches(301, 2));
        assert!(status_matches(503, 503));
    }

    #[test]
    fn failures_are_forgotten_after_fail_duration() {
        let p = Passive::build(&HealthToml::default(), Some("50ms"), Some(2)).unwrap();
        let host = Host::default();
        assert!(!p.failed(&host));
        assert!(p.failed(&host), "the second failure makes it down");
        assert!(p.down(&host));
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.down(&host) {
            assert!(Instant::now() < deadline, "never forgotten");
            std::thread::yield_now();
        }
    }

    #[test]
    fn unhealthy_status_counts_as_a_failure() {
        let t = HealthToml {
            unhealthy_status: vec!["5xx".into()],
            ..HealthToml::default()
        };
        let p = Passive::build(&t, Some("1m"), None).unwrap();
        let host = Host::default();
        assert!(!p.answered(&host, StatusCode::OK, Duration::ZERO));
        assert!(p.answered(&host, StatusCode::BAD_GATEWAY, Duration::ZERO));
    }

    #[test]
    fn health_options_without_a_uri_are_refused() {
        let t = HealthToml {
            health_interval: Some("10s".into()),
            ..HealthToml::default()
        };
        assert!(Active::build(&t).is_err());
    }
}
