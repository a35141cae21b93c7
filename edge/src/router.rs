//! The [`Router`]: finds the site for a request's port and host, with the site's compiled
//! handler chain (which holds what runs: each reverse proxy's round-robin position and its
//! upstreams' recent failures).
//!
//! A router is built from the resolved sites on start and on every reload and swapped in
//! whole, so requests see one config or the other, never a mix; runtime state starts fresh
//! with each config, as the sites it belongs to are new.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::http::HeaderValue;

use crate::access_log::AccessLog;
use crate::client_ip::Policy;
use crate::directives::Chain;
use crate::site::{Host, Scheme, Site};

/// A site being served: its configuration and its handler chain (which holds its run-time
/// state: round robin positions, upstream health).
#[derive(Debug)]
pub(crate) struct Served {
    /// The handlers.
    pub(crate) chain: Arc<Chain>,
    /// The site's own access log (`log` in a Caddyfile), written instead of the edge's.
    pub(crate) log: Option<AccessLog>,
    /// Requests must name the host their TLS handshake named (a `client_auth` site: a client
    /// must not get past its handshake through another name's).
    pub(crate) strict_sni: bool,
    /// Its responses over HTTP/1.1 and HTTP/2 advertise HTTP/3 (`Alt-Svc`): not for a site
    /// whose TLS settings (client certificates, protocols, ciphers) the QUIC handshake does
    /// not apply, whose names HTTP/3 refuses.
    pub(crate) alt_svc: bool,
}

/// Sites reachable on one port.
#[derive(Debug, Default)]
struct PortTable {
    names: HashMap<String, usize>,
    wildcards: Vec<(String, usize)>,
    ips: HashMap<IpAddr, usize>,
    any: Option<usize>,
}

/// Finds the site for a request by port and host.
#[derive(Debug)]
pub(crate) struct Router {
    sites: Vec<Arc<Served>>,
    ports: HashMap<u16, PortTable>,
    /// HTTPS hosts by name, for the redirect from plain HTTP: (host, port).
    https: Vec<(Host, u16)>,
    /// Some site has a log of its own.
    site_logs: bool,
    /// Trusted proxies, when some are.
    client_ip: Option<Arc<Policy>>,
    /// The `Alt-Svc` value of each HTTPS port with an HTTP/3 listener on its UDP twin.
    alt_svc: Vec<(u16, HeaderValue)>,
}

impl Router {
    /// Builds the tables for `sites`. Port 0 in an address stands for the bound port, which
    /// `bound` maps.
    pub(crate) fn new(
        sites: &[Site],
        chains: &[Arc<Chain>],
        bound: &dyn Fn(u16, Scheme) -> u16,
    ) -> Router {
        let mut ports: HashMap<u16, PortTable> = HashMap::new();
        let mut https = Vec::new();
        for (i, site) in sites.iter().enumerate() {
            for address in &site.addresses {
                let port = bound(address.port, address.scheme);
                let table = ports.entry(port).or_default();
                match &address.host {
                    Host::Name(n) => {
                        table.names.insert(n.clone(), i);
                    }
                    Host::Wildcard(s) => table.wildcards.push((s.clone(), i)),
                    Host::Ip(ip) => {
                        table.ips.insert(*ip, i);
                    }
                    Host::Any => table.any = Some(i),
                }
                if address.scheme == Scheme::Https {
                    https.push((address.host.clone(), port));
                }
            }
        }
        for table in ports.values_mut() {
            table
                .wildcards
                .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        }
        Router {
            sites: sites
                .iter()
                .zip(chains)
                .map(|(_, chain)| {
                    Arc::new(Served {
                        chain: chain.clone(),
                        log: None,
                        strict_sni: false,
                        alt_svc: true,
                    })
                })
                .collect(),
            ports,
            https,
            site_logs: false,
            client_ip: None,
            alt_svc: Vec::new(),
        }
    }

    /// Advertises HTTP/3 on each of `ports` (bound HTTPS ports with a QUIC listener), as
    /// Caddy does: `h3=":PORT"; ma=2592000`.
    pub(crate) fn set_http3_ports(&mut self, ports: &[u16]) {
        self.alt_svc = ports
            .iter()
            .map(|port| {
                let value = HeaderValue::from_str(&format!("h3=\":{port}\"; ma=2592000"))
                    .expect("a port number makes a header value");
                (*port, value)
            })
            .collect();
    }

    /// The `Alt-Svc` value for responses on `port`, when HTTP/3 is served there.
    #[inline]
    pub(crate) fn alt_svc(&self, port: u16) -> Option<&HeaderValue> {
        self.alt_svc
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, v)| v)
    }

    /// Marks the sites (by index) that advertise HTTP/3.
    pub(crate) fn set_alt_svc(&mut self, advertise: Vec<bool>) {
        for (served, advertise) in self.sites.iter_mut().zip(advertise) {
            if let Some(served) = Arc::get_mut(served) {
                served.alt_svc = advertise;
            }
        }
    }

    /// Trusts the proxies of `policy` to name clients.
    pub(crate) fn set_client_ip(&mut self, policy: Option<Arc<Policy>>) {
        self.client_ip = policy;
    }

    /// The trusted proxies, if any.
    pub(crate) fn client_ip(&self) -> Option<&Policy> {
        self.client_ip.as_deref()
    }

    /// Gives each site (by index) its own access log.
    pub(crate) fn set_logs(&mut self, logs: Vec<Option<AccessLog>>) {
        for (served, log) in self.sites.iter_mut().zip(logs) {
            if let Some(served) = Arc::get_mut(served) {
                self.site_logs |= log.is_some();
                served.log = log;
            }
        }
    }

    /// Marks the sites (by index) whose requests must match their TLS name.
    pub(crate) fn set_strict_sni(&mut self, strict: Vec<bool>) {
        for (served, strict) in self.sites.iter_mut().zip(strict) {
            if let Some(served) = Arc::get_mut(served) {
                served.strict_sni = strict;
            }
        }
    }

    /// No plain HTTP request is redirected to HTTPS (`auto_https disable_redirects`).
    pub(crate) fn disable_redirects(&mut self) {
        self.https.clear();
    }

    /// Whether some site has a log of its own.
    pub(crate) fn has_site_logs(&self) -> bool {
        self.site_logs
    }

    /// The site serving `host` (lower case, no port) on `port`.
    pub(crate) fn site(&self, port: u16, host: &str) -> Option<&Arc<Served>> {
        let table = self.ports.get(&port)?;
        let index = table
            .names
            .get(host)
            .copied()
            .or_else(|| {
                table
                    .wildcards
                    .iter()
                    .find(|(s, _)| Host::Wildcard(s.clone()).matches(host))
                    .map(|(_, i)| *i)
            })
            .or_else(|| {
                let ip = host.trim_start_matches('[').trim_end_matches(']');
                ip.parse()
                    .ok()
                    .and_then(|ip: IpAddr| table.ips.get(&ip).copied())
            })
            .or(table.any)?;
        self.sites.get(index)
    }

    /// The HTTPS port serving `host`, for redirecting plain HTTP there.
    pub(crate) fn https_port_for(&self, host: &str) -> Option<u16> {
        self.https
            .iter()
            .find(|(h, _)| h.matches(host))
            .map(|(_, port)| *port)
    }
}
