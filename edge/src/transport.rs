//! How `reverse_proxy` reaches its upstreams: upstream addresses in Caddy's forms
//! (`host:port`, `http://`, `https://`, `h2c://`, `unix//path`, `unix+h2c//path`) and the
//! `transport http { ... }` options (TLS to the upstream, protocol versions, timeouts,
//! keep-alive), and the byte streams they make (TCP or Unix socket, with or without TLS).
//!
//! Invariants: an upstream's `dial` string is Caddy's own for the same address (the hash and
//! cookie load-balancing policies feed it to their hash, so choices match Caddy's); TLS uses
//! the workspace's one rustls provider (aws-lc-rs); an option the edge cannot honour is
//! refused when the config loads, with its line, never dropped.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::http::uri::Authority;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::site::{parse_duration, split_host_port};

/// A Caddyfile problem at a line: (line, message), made into the directives' error by the
/// `reverse_proxy` parser (this module sits below `directives`).
pub(crate) type At = (usize, String);

/// An error at `line`.
pub(crate) fn at(line: usize, message: impl Into<String>) -> At {
    (line, message.into())
}

/// A Caddyfile line of `reverse_proxy`'s block as the option parsers here see it.
#[derive(Debug)]
pub(crate) struct OptLine<'a> {
    /// Its words.
    pub(crate) words: &'a [String],
    /// Where it is.
    pub(crate) line: usize,
    /// The lines of its block.
    pub(crate) block: Option<Vec<OptLine<'a>>>,
}

/// How the proxy speaks to an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// HTTP/1.1 (over TLS when the transport has TLS).
    Http1,
    /// HTTP/2 over TLS, chosen by ALPN.
    Http2,
    /// HTTP/2 over cleartext, with prior knowledge.
    H2c,
}

/// Where an upstream listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A TCP host and port.
    Tcp(String, u16),
    /// A Unix socket.
    Unix(PathBuf),
}

/// One upstream address, parsed as Caddy parses `reverse_proxy`'s arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Address {
    /// "http", "https", "h2c", or "" when the address named no scheme.
    pub(crate) scheme: &'static str,
    /// Caddy's dial string: "host:port" or "unix//path".
    pub(crate) dial: String,
    /// Where to connect.
    pub(crate) target: Target,
}

impl Address {
    /// Parses `text` (placeholders already rendered).
    pub(crate) fn parse(text: &str) -> Result<Address, String> {
        if text.contains('{') {
            return Err(format!(
                "{text:?}: only {{env.*}} placeholders are supported in upstream addresses"
            ));
        }
        if let Some((scheme, rest)) = text.split_once("://") {
            let scheme = match scheme {
                "http" => "http",
                "https" => "https",
                "h2c" => "h2c",
                other => {
                    return Err(format!(
                        "{text:?}: scheme {other:?} is not http, https or h2c"
                    ));
                }
            };
            // Caddy allows no path, query or fragment; a bare trailing slash is forgiven.
            let rest = rest.strip_suffix('/').unwrap_or(rest);
            if rest.contains(['/', '?', '#']) {
                return Err(format!(
                    "{text:?}: an upstream URL holds only a scheme, host and port"
                ));
            }
            let (host, port) =
                split_host_port(rest).ok_or_else(|| format!("{text:?} has a bad port"))?;
            let clash = match (scheme, port) {
                ("http", Some(443)) => Some("http:// with port 443, the HTTPS port"),
                ("https", Some(80)) => Some("https:// with port 80, the HTTP port"),
                ("h2c", Some(443)) => Some("h2c:// with port 443, the HTTPS port"),
                _ => None,
            };
            if let Some(clash) = clash {
                return Err(format!("{text:?}: {clash}"));
            }
            let port = port.unwrap_or(if scheme == "https" { 443 } else { 80 });
            return tcp(text, scheme, host, port);
        }
        if let Some((network, path)) = text.split_once('/') {
            let scheme = match network.trim().to_ascii_lowercase().as_str() {
                "unix" => "",
                "unix+h2c" => "h2c",
                "tcp" | "tcp4" | "tcp6" => {
                    let (host, port) =
                        split_host_port(path).ok_or_else(|| format!("{text:?} has a bad port"))?;
                    return tcp(text, "", host, port.unwrap_or(80));
                }
                other => return Err(format!("{text:?}: network {other:?} is not supported")),
            };
            if path.is_empty() {
                return Err(format!("{text:?}: a Unix socket needs a path"));
            }
            return Ok(Address {
                scheme,
                dial: format!("unix/{path}"),
                target: Target::Unix(PathBuf::from(path)),
            });
        }
        let (host, port) =
            split_host_port(text).ok_or_else(|| format!("{text:?} has a bad port"))?;
        tcp(text, "", host, port.unwrap_or(80))
    }

    /// The Host an upstream request carries when nothing else sets one, and the
    /// `{upstream_hostport}` value.
    pub(crate) fn authority(&self) -> Authority {
        match &self.target {
            Target::Tcp(host, port) => {
                let host = if host.is_empty() { "localhost" } else { host };
                let text = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                text.parse()
                    .unwrap_or_else(|_| Authority::from_static("localhost"))
            }
            Target::Unix(_) => Authority::from_static("localhost"),
        }
    }
}

fn tcp(text: &str, scheme: &'static str, host: &str, port: u16) -> Result<Address, String> {
    if port == 0 {
        return Err(format!("{text:?}: port 0 is not a port to connect to"));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    // Checked the way a Host header would be, so the authority below always parses.
    let check = if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!(
            "{}:{port}",
            if bare.is_empty() { "localhost" } else { bare }
        )
    };
    check
        .parse::<Authority>()
        .map_err(|_| format!("{text:?} is not a host:port"))?;
    let dial = if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!("{bare}:{port}")
    };
    Ok(Address {
        scheme,
        dial,
        target: Target::Tcp(bare.to_owned(), port),
    })
}

/// One upstream server, as configured.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// As written in the config.
    pub(crate) text: String,
    /// Where and how to connect.
    pub(crate) address: Address,
    /// The Host sent when the request has none, and `{upstream_hostport}`.
    pub(crate) authority: Authority,
    /// Its connections' key in the pool: the transport's tag and the dial address.
    pub(crate) key: Arc<str>,
}

impl Upstream {
    /// Parses an address in any of Caddy's forms (see [`Address::parse`]), reached over a
    /// transport tagged `tag`.
    pub(crate) fn parse_with(text: &str, tag: &str) -> Result<Arc<Upstream>, String> {
        let address = Address::parse(text)?;
        Ok(Arc::new(Upstream {
            text: text.to_owned(),
            authority: address.authority(),
            key: Arc::from(format!("{tag}{}", address.dial)),
            address,
        }))
    }

    /// Parses an address reached over plain HTTP.
    #[cfg(test)]
    pub(crate) fn parse(text: &str) -> Result<Arc<Upstream>, String> {
        Upstream::parse_with(text, "")
    }
}

/// `transport http { ... }` as TOML: each field is the Caddyfile option of the same name.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TransportToml {
    /// TLS to the upstream (also implied by `https://` upstreams and the `tls_*` options).
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) tls: bool,
    /// Accept any upstream certificate.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) tls_insecure_skip_verify: bool,
    /// The name sent in SNI and checked against the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_server_name: Option<String>,
    /// PEM files of the CAs upstream certificates must chain to (instead of the system's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tls_trusted_ca_certs: Vec<String>,
    /// A client certificate and its key (PEM files) to present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tls_client_auth: Vec<String>,
    /// Limit on the TLS handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_timeout: Option<String>,
    /// Protocol versions: "1.1", "2", "h2c".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) versions: Vec<String>,
    /// How long an idle connection is kept ("off" keeps none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) keepalive: Option<String>,
    /// Idle connections kept per upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) keepalive_idle_conns: Option<usize>,
    /// Idle connections kept per upstream (same as keepalive_idle_conns here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) keepalive_idle_conns_per_host: Option<usize>,
    /// Limit on connecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dial_timeout: Option<String>,
    /// Limit on waiting for the response head once the request is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) response_header_timeout: Option<String>,
    /// Limit on waiting for the upstream to send (Caddy's per-read deadline); the edge
    /// applies it to the response head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read_timeout: Option<String>,
    /// Limit on each write to the upstream (Caddy's per-write deadline on TCP connections):
    /// an upstream not taking the request's bytes for that long fails the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) write_timeout: Option<String>,
    /// Largest response head accepted from the upstream (a larger one gets 502).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_response_header: Option<String>,
    /// Most connections busy at once per upstream; more requests wait for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_conns_per_host: Option<usize>,
    /// TCP keepalive probes on upstream connections: idle time before the first and the
    /// time between them (Go's Dialer.KeepAlive, as Caddy sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) keepalive_interval: Option<String>,
    /// Accepted, no effect: buffer sizes are the edge's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read_buffer: Option<String>,
    /// Accepted, no effect: buffer sizes are the edge's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) write_buffer: Option<String>,
    /// "off": the edge never asks upstreams for compression, so only "off" is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) compression: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl TransportToml {
    /// Parses `transport http { ... }`'s block.
    pub(crate) fn parse(
        args: &[String],
        block: Option<&[OptLine<'_>]>,
        line: usize,
    ) -> Result<Self, At> {
        match args {
            [p] if p == "http" => {}
            [p] => {
                return Err(at(
                    line,
                    format!("transport {p:?} is not supported (only \"http\")"),
                ));
            }
            _ => return Err(at(line, "transport takes one protocol name: http")),
        }
        let mut t = TransportToml::default();
        for sub in block.unwrap_or_default() {
            let Some((name, args)) = sub.words.split_first() else {
                continue;
            };
            if sub.block.is_some() {
                return Err(at(
                    sub.line,
                    format!("transport option {name} takes no block"),
                ));
            }
            let one = || match args {
                [v] => Ok(v.clone()),
                _ => Err(at(sub.line, format!("transport {name} takes one value"))),
            };
            let none = || match args {
                [] => Ok(()),
                _ => Err(at(sub.line, format!("transport {name} takes no value"))),
            };
            let duration = || {
                let v = one()?;
                parse_duration(&v).map(|_| v.clone()).ok_or_else(|| {
                    at(
                        sub.line,
                        format!("transport {name}: {v:?} is not a duration"),
                    )
                })
            };
            let count = || {
                let v = one()?;
                v.parse::<usize>()
                    .map_err(|_| at(sub.line, format!("transport {name}: {v:?} is not a number")))
            };
            let size = || {
                let v = one()?;
                parse_size(&v)
                    .map(|_| v.clone())
                    .ok_or_else(|| at(sub.line, format!("transport {name}: {v:?} is not a size")))
            };
            match name.as_str() {
                "tls" => {
                    none()?;
                    t.tls = true;
                }
                "tls_insecure_skip_verify" => {
                    none()?;
                    t.tls = true;
                    t.tls_insecure_skip_verify = true;
                }
                "tls_server_name" => {
                    t.tls = true;
                    t.tls_server_name = Some(one()?);
                }
                "tls_trusted_ca_certs" if !args.is_empty() => {
                    t.tls = true;
                    t.tls_trusted_ca_certs = args.to_vec();
                }
                "tls_client_auth" => {
                    t.tls = true;
                    match args {
                        [_, _] => t.tls_client_auth = args.to_vec(),
                        [_] => {
                            return Err(at(
                                sub.line,
                                "tls_client_auth with an automated certificate is not supported: name a certificate file and a key file",
                            ));
                        }
                        _ => {
                            return Err(at(
                                sub.line,
                                "tls_client_auth takes a certificate file and a key file",
                            ));
                        }
                    }
                }
                "tls_timeout" => {
                    t.tls = true;
                    t.tls_timeout = Some(duration()?);
                }
                "tls_renegotiation" => {
                    // rustls never renegotiates: "never" is what it does.
                    t.tls = true;
                    if one()? != "never" {
                        return Err(at(
                            sub.line,
                            "tls_renegotiation: the edge's TLS never renegotiates (only \"never\")",
                        ));
                    }
                }
                "versions" if !args.is_empty() => {
                    for v in args {
                        if !matches!(v.as_str(), "1.1" | "2" | "h2c" | "h1") {
                            return Err(at(
                                sub.line,
                                format!(
                                    "versions: {v:?} is not supported (\"1.1\", \"2\", \"h2c\")"
                                ),
                            ));
                        }
                    }
                    t.versions = args.to_vec();
                }
                "keepalive" => {
                    let v = one()?;
                    if v != "off" && parse_duration(&v).is_none() {
                        return Err(at(
                            sub.line,
                            format!("keepalive: {v:?} is not a duration or off"),
                        ));
                    }
                    t.keepalive = Some(v);
                }
                "keepalive_idle_conns" => t.keepalive_idle_conns = Some(count()?),
                "keepalive_idle_conns_per_host" => t.keepalive_idle_conns_per_host = Some(count()?),
                "dial_timeout" => t.dial_timeout = Some(duration()?),
                "response_header_timeout" => t.response_header_timeout = Some(duration()?),
                "read_timeout" => t.read_timeout = Some(duration()?),
                "write_timeout" => t.write_timeout = Some(duration()?),
                "max_response_header" => t.max_response_header = Some(size()?),
                "keepalive_interval" => t.keepalive_interval = Some(duration()?),
                "max_conns_per_host" => {
                    let n = count()?;
                    // Go's transport reads 0 as no limit.
                    t.max_conns_per_host = (n > 0).then_some(n);
                }
                "read_buffer" => t.read_buffer = Some(size()?),
                "write_buffer" => t.write_buffer = Some(size()?),
                "compression" => {
                    if one()? != "off" {
                        return Err(at(
                            sub.line,
                            "compression: the edge never asks upstreams to compress (only \"off\")",
                        ));
                    }
                    t.compression = Some("off".to_owned());
                }
                "expect_continue_timeout"
                | "dial_fallback_delay"
                | "resolvers"
                | "tls_except_ports" => {
                    return Err(at(
                        sub.line,
                        format!(
                            "transport option {name} is not supported by the edge (see man edge-caddyfile)"
                        ),
                    ));
                }
                other => {
                    return Err(at(sub.line, format!("unknown transport option {other:?}")));
                }
            }
        }
        Ok(t)
    }
}

/// Parses a size as Caddy's humanize does: "4096", "4KB", "4KiB", "1MB".
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "ki" | "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mi" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let n = number * factor;
    (0.0..1e18).contains(&n).then_some(n as u64)
}

/// A compiled transport: how to connect and which protocol to speak.
#[derive(Clone)]
pub(crate) struct Transport {
    /// TLS client config, when the upstreams speak TLS.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// The SNI name, when set (otherwise the upstream's host).
    pub(crate) server_name: Option<ServerName<'static>>,
    /// The protocol.
    pub(crate) protocol: Protocol,
    /// Limit on connecting (and the TLS handshake).
    pub(crate) dial_timeout: Option<Duration>,
    /// Limit on the response head: the shorter of `response_header_timeout` and
    /// `read_timeout`.
    pub(crate) response_header_timeout: Option<Duration>,
    /// The largest response head read (at least 8 KiB, as hyper reads heads on upgrades).
    pub(crate) max_response_header: Option<usize>,
    /// Most requests (so connections) busy at once per upstream.
    pub(crate) max_conns_per_host: Option<usize>,
    /// TCP keepalive probe time and interval on upstream TCP connections.
    pub(crate) keepalive_interval: Option<Duration>,
    /// Limit on each write to an upstream TCP connection.
    pub(crate) write_timeout: Option<Duration>,
    /// How long idle connections are kept; zero keeps none.
    pub(crate) keepalive: Option<Duration>,
    /// Idle connections per upstream.
    pub(crate) idle_conns: Option<usize>,
    /// A short text saying what differs from plain HTTP, part of pool keys.
    pub(crate) tag: Arc<str>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls", &self.tls.is_some())
            .field("protocol", &self.protocol)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Plain HTTP/1.1 with the client's defaults.
    #[cfg(test)]
    pub(crate) fn plain() -> Transport {
        Transport {
            tls: None,
            server_name: None,
            protocol: Protocol::Http1,
            dial_timeout: None,
            response_header_timeout: None,
            max_response_header: None,
            max_conns_per_host: None,
            keepalive_interval: None,
            write_timeout: None,
            keepalive: None,
            idle_conns: None,
            tag: Arc::from(""),
        }
    }

    /// Compiles `t` for upstreams of `scheme` ("" when they named none); `id` makes the pool
    /// key of a transport with TLS settings distinct from every other's.
    pub(crate) fn build(
        t: Option<&TransportToml>,
        scheme: &str,
        id: usize,
    ) -> Result<Transport, String> {
        let default = TransportToml::default();
        let t = t.unwrap_or(&default);
        let tls_on = t.tls || scheme == "https";
        if scheme == "http" && t.tls {
            return Err(
                "upstream address scheme is http:// but the transport is configured for TLS".into(),
            );
        }
        let has = |v: &str| t.versions.iter().any(|x| x == v);
        let protocol = if scheme == "h2c" || (has("h2c") && !tls_on) {
            Protocol::H2c
        } else if tls_on && has("2") && !has("1.1") && !has("h1") {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        if !t.versions.is_empty() && !has("1.1") && !has("h1") && protocol == Protocol::Http1 {
            return Err(format!(
                "versions {:?} cannot be spoken to these upstreams (h2c needs cleartext, 2 needs TLS)",
                t.versions
            ));
        }
        let dur = |v: &Option<String>, what: &str| -> Result<Option<Duration>, String> {
            v.as_deref()
                .map(|s| {
                    parse_duration(s).ok_or_else(|| format!("{what}: {s:?} is not a duration"))
                })
                .transpose()
        };
        let mut dial_timeout = dur(&t.dial_timeout, "dial_timeout")?;
        if let Some(tls_timeout) = dur(&t.tls_timeout, "tls_timeout")? {
            dial_timeout = Some(dial_timeout.unwrap_or(Duration::ZERO) + tls_timeout);
        }
        let keepalive = match t.keepalive.as_deref() {
            Some("off") => Some(Duration::ZERO),
            other => dur(&other.map(str::to_owned), "keepalive")?,
        };
        let tls = if tls_on {
            Some(client_config(t, protocol)?)
        } else {
            None
        };
        let server_name = t
            .tls_server_name
            .as_deref()
            .map(|n| {
                ServerName::try_from(n.to_owned())
                    .map_err(|_| format!("tls_server_name {n:?} is not a DNS name or IP address"))
            })
            .transpose()?;
        let mut tag = match (&tls, protocol) {
            (None, Protocol::Http1) => String::new(),
            (None, _) => "h2c ".to_owned(),
            (Some(_), _) => format!("tls#{id} "),
        };
        let max_response_header = match t.max_response_header.as_deref() {
            None => None,
            Some(text) => {
                let n = parse_size(text)
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("max_response_header: {text:?} is not a size"))?;
                // hyper refuses a read buffer under 8 KiB.
                let n = usize::try_from(n).unwrap_or(usize::MAX).max(8192);
                // Connections made with another limit are never shared with this one.
                tag.push_str(&format!("mrh{n} "));
                Some(n)
            }
        };
        let response_header_timeout = [
            dur(&t.response_header_timeout, "response_header_timeout")?,
            dur(&t.read_timeout, "read_timeout")?,
        ]
        .into_iter()
        .flatten()
        .min();
        let write_timeout = dur(&t.write_timeout, "write_timeout")?.filter(|d| !d.is_zero());
        if let Some(d) = write_timeout {
            // Connections with another limit are never shared with this one.
            tag.push_str(&format!("wt{} ", d.as_millis()));
        }
        Ok(Transport {
            write_timeout,
            tls,
            server_name,
            protocol,
            dial_timeout,
            response_header_timeout,
            max_response_header,
            max_conns_per_host: t.max_conns_per_host.filter(|n| *n > 0),
            keepalive_interval: dur(&t.keepalive_interval, "keepalive_interval")?
                .filter(|d| !d.is_zero()),
            keepalive,
            idle_conns: t.keepalive_idle_conns_per_host.or(t.keepalive_idle_conns),
            tag: Arc::from(tag),
        })
    }

    /// Connects to `address`: TCP or Unix, then TLS if configured.
    pub(crate) async fn connect(&self, address: &Address, timeout: Duration) -> io::Result<Stream> {
        let timeout = self.dial_timeout.unwrap_or(timeout);
        let dial = async {
            let plain = match &address.target {
                Target::Tcp(host, port) => {
                    let host = if host.is_empty() {
                        "localhost"
                    } else {
                        host.as_str()
                    };
                    let mut last = None;
                    let mut found = None;
                    for addr in tokio::net::lookup_host((host, *port)).await? {
                        match TcpStream::connect(addr).await {
                            Ok(stream) => {
                                found = Some(stream);
                                break;
                            }
                            Err(err) => last = Some(err),
                        }
                    }
                    let stream = match found {
                        Some(s) => s,
                        None => {
                            return Err(last.unwrap_or_else(|| {
                                io::Error::new(
                                    io::ErrorKind::NotFound,
                                    format!("{host} has no address"),
                                )
                            }));
                        }
                    };
                    stream.set_nodelay(true)?;
                    if let Some(every) = self.keepalive_interval {
                        let probes = socket2::TcpKeepalive::new()
                            .with_time(every)
                            .with_interval(every);
                        socket2::SockRef::from(&stream).set_tcp_keepalive(&probes)?;
                    }
                    match self.write_timeout {
                        None => Plain::Tcp(stream),
                        Some(limit) => Plain::TimedTcp(TimedWrite {
                            inner: stream,
                            limit,
                            stalled: None,
                        }),
                    }
                }
                Target::Unix(path) => Plain::Unix(UnixStream::connect(path).await?),
            };
            let Some(tls) = &self.tls else {
                return Ok(Stream::Plain(plain));
            };
            let name = match (&self.server_name, &address.target) {
                (Some(n), _) => n.clone(),
                (None, Target::Tcp(host, _)) => ServerName::try_from(host.clone())
                    .map_err(|_| io::Error::other(format!("{host} is not a TLS server name")))?,
                (None, Target::Unix(_)) => ServerName::try_from("localhost")
                    .map_err(|_| io::Error::other("localhost is not a TLS server name"))?,
            };
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            let stream = connector.connect(name, plain).await?;
            Ok(Stream::Tls(Box::new(stream)))
        };
        tokio::time::timeout(timeout, dial).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {} timed out", address.dial),
            )
        })?
    }
}

fn client_config(
    t: &TransportToml,
    protocol: Protocol,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = if t.tls_insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if t.tls_trusted_ca_certs.is_empty() {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        } else {
            for file in &t.tls_trusted_ca_certs {
                let pem = std::fs::read(file)
                    .map_err(|e| format!("tls_trusted_ca_certs: reading {file}: {e}"))?;
                let mut any = false;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| format!("tls_trusted_ca_certs: {file}: {e:?}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("tls_trusted_ca_certs: {file}: {e}"))?;
                    any = true;
                }
                if !any {
                    return Err(format!(
                        "tls_trusted_ca_certs: {file} holds no PEM certificate"
                    ));
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match t.tls_client_auth.as_slice() {
        [cert, key] => {
            let pem =
                std::fs::read(cert).map_err(|e| format!("tls_client_auth: reading {cert}: {e}"))?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls_client_auth: {cert}: {e:?}"))?;
            // The key's contents never reach an error message.
            let pem =
                std::fs::read(key).map_err(|e| format!("tls_client_auth: reading {key}: {e}"))?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .ok()
                .ok_or_else(|| format!("tls_client_auth: {key} holds no PEM private key"))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("tls_client_auth: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match protocol {
        Protocol::Http2 => vec![b"h2".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    Ok(Arc::new(config))
}

/// `tls_insecure_skip_verify`: any certificate is accepted, signatures are still checked.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection without TLS.
pub(crate) enum Plain {
    /// TCP.
    Tcp(TcpStream),
    /// TCP with `write_timeout`.
    TimedTcp(TimedWrite),
    /// A Unix socket.
    Unix(UnixStream),
}

/// A connection to an upstream.
pub(crate) enum Stream {
    /// Without TLS.
    Plain(Plain),
    /// With TLS.
    Tls(Box<tokio_rustls::client::TlsStream<Plain>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Plain::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Plain::TimedTcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Plain::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

/// A TCP stream whose writes each must progress within `limit`, as Caddy sets a write
/// deadline before each write: a write pending that long fails with `TimedOut`. The timer
/// runs only while a write is pending.
pub(crate) struct TimedWrite {
    inner: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TimedWrite {
    /// Tracks a write's outcome: pending starts (or checks) the timer, anything else stops it.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("writing to the upstream timed out (write_timeout {limit:?})"),
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for TimedWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TimedWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl AsyncRead for Plain {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Plain {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Plain::Tcp(s) => s.is_write_vectored(),
            Plain::TimedTcp(s) => s.is_write_vectored(),
            Plain::Unix(s) => s.is_write_vectored(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_addresses_dial_as_caddys() {
        let dial = |t: &str| Address::parse(t).map(|a| (a.scheme, a.dial));
        assert_eq!(
            dial("localhost:8080").unwrap(),
            ("", "localhost:8080".into())
        );
        assert_eq!(dial(":8080").unwrap(), ("", ":8080".into()));
        assert_eq!(dial("web").unwrap(), ("", "web:80".into()));
        assert_eq!(dial("http://web").unwrap(), ("http", "web:80".into()));
        assert_eq!(dial("https://web").unwrap(), ("https", "web:443".into()));
        assert_eq!(dial("h2c://web:81").unwrap(), ("h2c", "web:81".into()));
        assert_eq!(
            dial("unix//run/a.sock").unwrap(),
            ("", "unix//run/a.sock".into())
        );
        assert_eq!(
            dial("unix+h2c//run/a.sock").unwrap(),
            ("h2c", "unix//run/a.sock".into())
        );
        assert_eq!(dial("[::1]:9").unwrap(), ("", "[::1]:9".into()));
        for bad in [
            "http://web:443",
            "https://web:80",
            "http://web/path",
            "ftp://web",
            "{http.request.host}:80",
            "web:0",
            "unix/",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_parse_as_humanize_does() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4KB"), Some(4000));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("1MB"), Some(1_000_000));
        assert_eq!(parse_size("lots"), None);
    }
}
