//! Counters per service and per handshake failure, and the opt-in Prometheus endpoint that
//! shows them (`metrics_addr` in `[server]` or `[client]`).
//!
//! Counters are atomics: the data path adds each chunk's bytes with one relaxed add and takes
//! no lock. The map from service name to counters is locked only when a service starts or
//! stops and when the endpoint is scraped. A service's counters outlive its restarts on
//! reload, so a scrape never sees a counter go backwards while the service exists.
//!
//! The text exposition format is written here (a dozen `writeln!`s) rather than through a
//! metrics crate: there is one registry, fixed metric names and no histograms.
//!
//! Besides counters, each service keeps who is connected (the clients' addresses on a server,
//! the servers' on a client) and the last error of its control channels, for `tunnel status`;
//! they change only when a control channel opens or ends, behind a lock of their own.
//!
//! UDP services count the same families: a visitor address with a live session is an open
//! connection (the client's sessions; the server's visitors seen within the idle timeout),
//! bytes are payload bytes, plus datagrams carried and dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::sockopt;

/// How long a scrape connection may stay open.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// One service's counters.
#[derive(Debug, Default)]
pub(crate) struct ServiceMetrics {
    /// Visitor connections carried, ever.
    pub(crate) connections: AtomicU64,
    /// Visitor connections open now.
    pub(crate) open: AtomicU64,
    /// Bytes from visitors to the service.
    pub(crate) to_service: AtomicU64,
    /// Bytes from the service to visitors.
    pub(crate) to_visitor: AtomicU64,
    /// Visitors closed without being carried (no client, limit reached, service unreachable).
    pub(crate) refused: AtomicU64,
    /// Control channels opened after the first (client: reconnects; server: a client
    /// replacing its channel).
    pub(crate) reconnects: AtomicU64,
    /// Open control channels of the service: its connected clients (server) or servers (client).
    pub(crate) control_open: AtomicU64,
    /// UDP datagrams from visitors to the service.
    pub(crate) datagrams_to_service: AtomicU64,
    /// UDP datagrams from the service to visitors.
    pub(crate) datagrams_to_visitor: AtomicU64,
    /// Who is connected and what went wrong last.
    state: Mutex<PeerState>,
    /// UDP datagrams dropped: no client, or a socket refused them.
    pub(crate) datagrams_dropped: AtomicU64,
}

impl ServiceMetrics {
    /// Counts a connection open until the guard drops.
    pub(crate) fn connection(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }
}

/// An open connection, counted in [`ServiceMetrics::open`] while it lives.
pub(crate) struct OpenConnection(Arc<ServiceMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a handshake failed, as a metric label.
pub(crate) fn failure_reason(err: &Error) -> &'static str {
    match err {
        Error::AuthFailed { .. } => "wrong_token",
        Error::UnknownService { .. } => "unknown_service",
        Error::Version { .. } => "version",
        Error::Malformed { .. } | Error::Unexpected { .. } => "malformed",
        Error::UnknownSession => "unknown_session",
        Error::Refused { .. } => "refused_by_server",
        Error::Declined { .. } => "declaration_refused",
        Error::BadDeclaration(_) => "malformed",
        Error::Timeout { .. } => "timeout",
        Error::Closed { .. } => "closed",
        Error::Noise { .. } => "noise",
        Error::Tls { .. } => "tls",
        Error::Websocket { .. } => "websocket",
        Error::Proxy { .. } => "proxy",
        _ => "io",
    }
}

/// The peers of a service's open control channels and its last error.
#[derive(Debug, Default)]
struct PeerState {
    peers: Vec<String>,
    last_error: Option<String>,
}

impl ServiceMetrics {
    fn state(&self) -> std::sync::MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A control channel with `peer` opened.
    pub(crate) fn peer_up(&self, peer: &str) {
        self.state().peers.push(peer.to_owned());
    }

    /// The control channel with `peer` ended, for `reason`.
    pub(crate) fn peer_down(&self, peer: &str, reason: &str) {
        self.peer_left(peer);
        self.state().last_error = Some(format!("{peer}: {reason}"));
    }

    /// The control channel with `peer` was closed on purpose (a stop, a reload).
    pub(crate) fn peer_left(&self, peer: &str) {
        let mut state = self.state();
        if let Some(at) = state.peers.iter().position(|p| p == peer) {
            state.peers.remove(at);
        }
    }

    /// A control channel could not be opened.
    pub(crate) fn failed(&self, peer: &str, reason: &str) {
        self.state().last_error = Some(format!("{peer}: {reason}"));
    }
}

/// Every counter of one side.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    services: Mutex<BTreeMap<String, Arc<ServiceMetrics>>>,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Reloads that could not be applied (whole or in part) and left the old setup running.
    pub(crate) reload_failures: AtomicU64,
}

impl Metrics {
    /// The counters of service `name`, made on first use.
    pub(crate) fn service(&self, name: &str) -> Arc<ServiceMetrics> {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.entry(name.to_owned()).or_default().clone()
    }

    /// Drops a removed service's counters.
    pub(crate) fn forget(&self, name: &str) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.remove(name);
    }

    /// Counts a failed handshake (never on the data path).
    pub(crate) fn handshake_failed(&self, err: &Error) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        *failures.entry(failure_reason(err)).or_default() += 1;
    }

    /// The Prometheus text exposition of every counter.
    pub(crate) fn render(&self) -> String {
        let services: Vec<(String, Arc<ServiceMetrics>)> = {
            let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
            services
                .iter()
                .map(|(name, m)| (name.clone(), m.clone()))
                .collect()
        };
        let mut out = String::new();
        type Field = fn(&ServiceMetrics) -> &AtomicU64;
        let families: [(&str, &str, &str, Field); 6] = [
            (
                "tunnel_connections_total",
                "counter",
                "Visitor connections carried.",
                |m| &m.connections,
            ),
            (
                "tunnel_connections_open",
                "gauge",
                "Visitor connections open now.",
                |m| &m.open,
            ),
            (
                "tunnel_connections_refused_total",
                "counter",
                "Visitors closed without being carried.",
                |m| &m.refused,
            ),
            (
                "tunnel_reconnects_total",
                "counter",
                "Control channels opened after a service's first.",
                |m| &m.reconnects,
            ),
            (
                "tunnel_control_channel_open",
                "gauge",
                "Open control channels of the service: connected clients on a server, connected servers on a client.",
                |m| &m.control_open,
            ),
            (
                "tunnel_datagrams_dropped_total",
                "counter",
                "UDP datagrams dropped (no client, refused by a socket).",
                |m| &m.datagrams_dropped,
            ),
        ];
        for (name, kind, help, field) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (service, m) in &services {
                let value = field(m).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{service=\"{}\"}} {value}", escape(service));
            }
        }
        let name = "tunnel_reload_failures_total";
        let _ = writeln!(
            out,
            "# HELP {name} Reloads that left (part of) the old setup running because the new one \
             could not start.\n# TYPE {name} counter\n{name} {}",
            self.reload_failures.load(Ordering::Relaxed)
        );
        let name = "tunnel_bytes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Bytes carried, by direction.\n# TYPE {name} counter"
        );
        for (service, m) in &services {
            for (direction, value) in [("to_service", &m.to_service), ("to_visitor", &m.to_visitor)]
            {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",direction=\"{direction}\"}} {}",
                    escape(service),
                    value.load(Ordering::Relaxed)
                );
            }
        }
        let name = "tunnel_datagrams_total";
        let _ = writeln!(
            out,
            "# HELP {name} UDP datagrams carried, by direction.\n# TYPE {name} counter"
        );
        for (service, m) in &services {
            for (direction, value) in [
                ("to_service", &m.datagrams_to_service),
                ("to_visitor", &m.datagrams_to_visitor),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",direction=\"{direction}\"}} {}",
                    escape(service),
                    value.load(Ordering::Relaxed)
                );
            }
        }
        let name = "tunnel_peer_connected";
        let _ = writeln!(
            out,
            "# HELP {name} 1 for each peer with an open control channel: clients on a server, \
             servers on a client.\n# TYPE {name} gauge"
        );
        for (service, m) in &services {
            for peer in &m.state().peers {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",peer=\"{}\"}} 1",
                    escape(service),
                    escape(peer)
                );
            }
        }
        let name = "tunnel_last_error";
        let _ = writeln!(
            out,
            "# HELP {name} The last control channel error of a service, as a label.\n# TYPE {name} gauge"
        );
        for (service, m) in &services {
            if let Some(error) = &m.state().last_error {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",error=\"{}\"}} 1",
                    escape(service),
                    escape(error)
                );
            }
        }
        let name = "tunnel_handshake_failures_total";
        let _ = writeln!(
            out,
            "# HELP {name} Control and data channel handshakes that failed, by reason.\n# TYPE {name} counter"
        );
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        for (reason, count) in failures.iter() {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The running endpoint.
pub(crate) struct Endpoint {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Endpoint {
    /// Binds `addr` and serves `GET /metrics` from `metrics`.
    pub(crate) async fn start(addr: &str, metrics: Arc<Metrics>) -> Result<Endpoint, Error> {
        let listener = sockopt::listen(addr).await.map_err(|source| Error::Bind {
            what: "the metrics endpoint".into(),
            addr: addr.to_owned(),
            source,
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io("reading the metrics port's address", e))?;
        tracing::info!(addr = %bound, "metrics listening");
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, metrics, stop.clone()));
        Ok(Endpoint { stop, task })
    }

    /// Closes the port and every scrape in progress.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    let scrapes = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        let stop = stop.clone();
        scrapes.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&request, &metrics)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(SCRAPE_TIMEOUT, connection) => {}
            }
        });
    }
    scrapes.close();
    scrapes.wait().await;
}

fn answer(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".to_owned(),
        )
    } else if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        )
    } else {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text_with_every_family() {
        let metrics = Metrics::default();
        let web = metrics.service("web");
        {
            let _open = web.connection();
            web.to_service.fetch_add(100, Ordering::Relaxed);
            web.to_visitor.fetch_add(2_000, Ordering::Relaxed);
            let text = metrics.render();
            assert!(
                text.contains("tunnel_connections_open{service=\"web\"} 1\n"),
                "{text}"
            );
        }
        metrics.handshake_failed(&Error::UnknownSession);
        metrics.handshake_failed(&Error::UnknownSession);
        let text = metrics.render();
        assert!(text.contains("# TYPE tunnel_connections_total counter\n"));
        assert!(
            text.contains("tunnel_connections_total{service=\"web\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tunnel_connections_open{service=\"web\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tunnel_bytes_total{service=\"web\",direction=\"to_service\"} 100\n")
        );
        assert!(
            text.contains("tunnel_bytes_total{service=\"web\",direction=\"to_visitor\"} 2000\n")
        );
        assert!(text.contains("tunnel_handshake_failures_total{reason=\"unknown_session\"} 2\n"));
        web.datagrams_to_service.fetch_add(3, Ordering::Relaxed);
        web.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
        let text = metrics.render();
        assert!(
            text.contains("tunnel_datagrams_total{service=\"web\",direction=\"to_service\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("tunnel_datagrams_dropped_total{service=\"web\"} 1\n"));
        metrics.forget("web");
        assert!(!metrics.render().contains("service=\"web\""));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
