//! `tunnel status`: what a running server or client is doing, read from its metrics endpoint
//! (`metrics_addr`) and printed per service: who is connected, visitors open and carried,
//! bytes, refusals and the last control channel error. The endpoint serves the same figures
//! to Prometheus, so the two never disagree.
//!
//! The endpoint is loopback by default and holds counters only; this reads it with one
//! HTTP/1.0 GET bounded by [`TIMEOUT`], and parses only the `tunnel_*` lines it knows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::Error;

/// How long connecting to and reading the endpoint may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes of an answer read (a few lines per service).
const MAX_ANSWER: u64 = 4 << 20;

/// One service's figures.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ServiceStatus {
    pub(crate) peers: Vec<String>,
    pub(crate) open: u64,
    pub(crate) carried: u64,
    pub(crate) refused: u64,
    pub(crate) to_service: u64,
    pub(crate) to_visitor: u64,
    pub(crate) last_error: Option<String>,
}

/// Fetches `/metrics` from `addr`.
pub(crate) fn fetch(addr: &str) -> Result<String, Error> {
    let failed = |e| Error::io(format!("reading the metrics endpoint {addr}"), e);
    let target = addr
        .to_socket_addrs()
        .map_err(failed)?
        .next()
        .ok_or_else(|| failed(std::io::ErrorKind::NotFound.into()))?;
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT).map_err(failed)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(failed)?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nhost: tunnel\r\n\r\n")
        .map_err(failed)?;
    let mut answer = String::new();
    stream
        .take(MAX_ANSWER)
        .read_to_string(&mut answer)
        .map_err(failed)?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.split_whitespace().nth(1) == Some("200") => Ok(body.to_owned()),
        _ => Err(Error::Unexpected {
            what: "answer from the metrics endpoint",
        }),
    }
}

/// The services in a Prometheus text exposition written by [`crate::metrics`].
pub(crate) fn parse(text: &str) -> BTreeMap<String, ServiceStatus> {
    let mut services: BTreeMap<String, ServiceStatus> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels = labels_of(labels);
        let Some(service) = labels.get("service") else {
            continue;
        };
        let value: u64 = value.trim().parse().unwrap_or(0);
        let entry = services.entry(service.clone()).or_default();
        match (name, labels.get("direction").map(String::as_str)) {
            ("tunnel_connections_open", _) => entry.open = value,
            ("tunnel_connections_total", _) => entry.carried = value,
            ("tunnel_connections_refused_total", _) => entry.refused = value,
            ("tunnel_bytes_total", Some("to_service")) => entry.to_service = value,
            ("tunnel_bytes_total", Some("to_visitor")) => entry.to_visitor = value,
            ("tunnel_peer_connected", _) => {
                if let Some(peer) = labels.get("peer") {
                    entry.peers.push(peer.clone());
                }
            }
            ("tunnel_last_error", _) => entry.last_error = labels.get("error").cloned(),
            _ => {}
        }
    }
    services
}

/// `key="value",…` with `\"`, `\\` and `\n` unescaped.
fn labels_of(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// The table `tunnel status` prints; `peers` names the other side ("clients" or "servers").
pub(crate) fn render(services: &BTreeMap<String, ServiceStatus>, peers: &str) -> String {
    let mut out = String::new();
    if services.is_empty() {
        out.push_str("no services\n");
    }
    for (name, s) in services {
        let connected = if s.peers.is_empty() {
            "none".to_owned()
        } else {
            s.peers.join(", ")
        };
        let _ = writeln!(out, "{name}");
        let _ = writeln!(out, "  {peers} connected: {} ({connected})", s.peers.len());
        let _ = writeln!(
            out,
            "  visitors: {} open, {} carried, {} refused",
            s.open, s.carried, s.refused
        );
        let _ = writeln!(
            out,
            "  bytes: {} to the service, {} to visitors",
            s.to_service, s.to_visitor
        );
        let _ = writeln!(
            out,
            "  last error: {}",
            s.last_error.as_deref().unwrap_or("none")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn status_reads_back_what_the_metrics_render() {
        let metrics = Metrics::default();
        let web = metrics.service("web");
        web.to_service.fetch_add(10, Ordering::Relaxed);
        web.peer_up("198.51.100.7:4000");
        web.peer_up("198.51.100.8:4000");
        web.peer_down(
            "198.51.100.8:4000",
            "reading the control channel: \"timed out\"",
        );
        let _open = web.connection();
        let services = parse(&metrics.render());
        let status = &services["web"];
        assert_eq!(status.peers, ["198.51.100.7:4000"]);
        assert_eq!((status.open, status.carried, status.to_service), (1, 1, 10));
        assert_eq!(
            status.last_error.as_deref(),
            Some("198.51.100.8:4000: reading the control channel: \"timed out\"")
        );
        let text = render(&services, "clients");
        assert!(
            text.contains("clients connected: 1 (198.51.100.7:4000)"),
            "{text}"
        );
        assert!(
            text.contains("visitors: 1 open, 1 carried, 0 refused"),
            "{text}"
        );
    }
}
