//! The real client address behind other proxies: `servers { trusted_proxies static CIDR...;
//! client_ip_headers NAME...; trusted_proxies_strict }`, as Caddy 2.7+ defines it.
//!
//! Only a direct peer inside `trusted_proxies` has its client-IP headers (default
//! `X-Forwarded-For`) read; anyone else's are ignored, so a client cannot choose the address the
//! `client_ip` matcher, `{client_ip}`, `client_ip_hash` and the access log's `client_ip` see.
//! The headers' values are joined in the order the names are listed, split on commas, and the
//! leftmost valid address wins (Caddy's default), or with `trusted_proxies_strict` the
//! rightmost one outside `trusted_proxies` (Caddy 2.8's option: the entries a client wrote on
//! the left cannot win past a trusted hop). No valid address: the peer is the client.
//! What Caddy keeps on the peer stays on the peer: `remote_ip`, `{remote_host}`, `ip_hash` and the
//! access log's `remote`. The trust also decides whether `reverse_proxy` keeps an incoming
//! `X-Forwarded-For` (appending the peer) or replaces it.
//!
//! Without `trusted_proxies` nothing here runs per request: the client is the peer.

use std::net::IpAddr;

use hyper::http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

use crate::matchers::Cidr;

/// `[client_ip]` in edge.toml, what `servers { trusted_proxies ... }` becomes.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Peers whose client-IP headers are believed: addresses, CIDR ranges, "private_ranges".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) trusted_proxies: Vec<String>,
    /// Headers read for the client's address, in order. Default `["X-Forwarded-For"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) headers: Vec<String>,
    /// Read right to left, taking the first address outside `trusted_proxies`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) strict: bool,
}

impl Toml {
    /// Nothing set.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Toml::default()
    }
}

/// Who may speak for clients and where they say who the client is.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    trusted: Vec<Cidr>,
    headers: Vec<HeaderName>,
    strict: bool,
}

impl Policy {
    /// Checks `toml`; `None` when no proxy is trusted (the headers then never matter). The
    /// error names the value at fault.
    pub(crate) fn build(toml: &Toml) -> Result<Option<Policy>, String> {
        if toml.trusted_proxies.is_empty() {
            if !toml.headers.is_empty() || toml.strict {
                return Err(
                    "client_ip_headers and trusted_proxies_strict need trusted_proxies".into(),
                );
            }
            return Ok(None);
        }
        let mut trusted = Vec::new();
        for range in &toml.trusted_proxies {
            trusted.extend(Cidr::parse(range).map_err(|m| format!("trusted_proxies: {m}"))?);
        }
        let headers = if toml.headers.is_empty() {
            vec![HeaderName::from_static("x-forwarded-for")]
        } else {
            toml.headers
                .iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| format!("client_ip_headers: {h:?} is not a header name"))
                })
                .collect::<Result<_, _>>()?
        };
        Ok(Some(Policy {
            trusted,
            headers,
            strict: toml.strict,
        }))
    }

    /// Whether `ip` is one of the trusted proxies.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// Whether the peer is trusted, and the client's address: from the headers when the peer
    /// is trusted and they hold a valid one, else the peer's.
    pub(crate) fn client(&self, peer: IpAddr, headers: &HeaderMap) -> (bool, IpAddr) {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return (false, peer);
        }
        let found = if self.strict {
            self.headers.iter().find_map(|name| {
                let values: Vec<&[u8]> =
                    headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
                values
                    .iter()
                    .rev()
                    .flat_map(|v| v.rsplit(|b| *b == b','))
                    .filter_map(address)
                    .find(|ip| !self.trusts(*ip))
            })
        } else {
            self.headers
                .iter()
                .flat_map(|name| headers.get_all(name).iter())
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .find_map(address)
        };
        (true, found.unwrap_or(peer))
    }
}

/// One list entry as Caddy reads it: a port split off as Go's `net.SplitHostPort` does
/// (`1.2.3.4:5`, `[::1]:5`), spaces trimmed, an IPv6 zone (`%eth0`) dropped; `None` unless an
/// address remains.
fn address(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    let host = split_host(text).unwrap_or(text).trim();
    let host = host.split_once('%').map_or(host, |(h, _)| h);
    host.parse().ok()
}

/// The host part of `host:port` by Go's rules (the port is not checked), or `None` where Go
/// fails (no port, too many colons, stray brackets).
fn split_host(text: &str) -> Option<&str> {
    if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']')?;
        let (host, after) = (&rest[..end], &rest[end + 1..]);
        if !after.starts_with(':') || rest.contains('[') || after.contains(']') {
            return None;
        }
        return Some(host);
    }
    let (host, _) = text.rsplit_once(':')?;
    if host.contains(':') || text.contains('[') || text.contains(']') {
        return None;
    }
    Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::http::HeaderValue;

    fn policy(trusted: &[&str], headers: &[&str], strict: bool) -> Policy {
        Policy::build(&Toml {
            trusted_proxies: trusted.iter().map(|s| (*s).to_owned()).collect(),
            headers: headers.iter().map(|s| (*s).to_owned()).collect(),
            strict,
        })
        .unwrap()
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_its_headers_say() {
        let p = policy(&["10.0.0.0/8"], &[], false);
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(p.client(ip("192.0.2.9"), &h), (false, ip("192.0.2.9")));
    }

    #[test]
    fn a_trusted_peer_gives_the_leftmost_valid_address_as_caddy_does() {
        let p = policy(&["10.0.0.0/8"], &[], false);
        let h = headers(&[
            ("x-forwarded-for", "junk, 203.0.113.5:4431 , 10.0.0.2"),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(p.client(ip("10.1.1.1"), &h), (true, ip("203.0.113.5")));
    }

    #[test]
    fn strict_mode_takes_the_rightmost_address_outside_the_trusted_ranges() {
        let p = policy(&["10.0.0.0/8"], &[], true);
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.5"),
            ("x-forwarded-for", "10.0.0.3, garbage"),
        ]);
        assert_eq!(p.client(ip("10.1.1.1"), &h), (true, ip("203.0.113.5")));
    }

    #[test]
    fn client_ip_headers_are_read_in_the_order_listed() {
        let p = policy(
            &["private_ranges"],
            &["X-Real-IP", "X-Forwarded-For"],
            false,
        );
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-real-ip", "[2001:db8::7]:80"),
        ]);
        assert_eq!(p.client(ip("127.0.0.1"), &h), (true, ip("2001:db8::7")));
    }

    #[test]
    fn a_trusted_peer_without_a_valid_address_is_the_client() {
        let p = policy(&["127.0.0.1"], &[], false);
        let h = headers(&[("x-forwarded-for", "unknown, , fe80::1%eth0x")]);
        assert_eq!(p.client(ip("127.0.0.1"), &h), (true, ip("fe80::1")));
        let h = headers(&[("x-forwarded-for", "unknown")]);
        assert_eq!(p.client(ip("127.0.0.1"), &h), (true, ip("127.0.0.1")));
    }

    #[test]
    fn an_ipv4_mapped_peer_is_matched_as_ipv4() {
        let p = policy(&["10.0.0.0/8"], &[], false);
        let h = headers(&[("x-forwarded-for", "203.0.113.5")]);
        assert_eq!(
            p.client(ip("::ffff:10.0.0.1"), &h),
            (true, ip("203.0.113.5"))
        );
    }

    #[test]
    fn headers_without_trusted_proxies_are_refused() {
        let err = Policy::build(&Toml {
            headers: vec!["X-Real-IP".into()],
            ..Toml::default()
        })
        .unwrap_err();
        assert!(err.contains("need trusted_proxies"), "{err}");
        let err = Policy::build(&Toml {
            trusted_proxies: vec!["10.0.0.0/33".into()],
            ..Toml::default()
        })
        .unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
    }

    proptest::proptest! {
        /// Client-IP headers are untrusted bytes: any value gives an address, never a panic.
        #[test]
        fn any_header_value_gives_an_address(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), strict in proptest::prelude::any::<bool>()) {
            let p = policy(&["0.0.0.0/0"], &[], strict);
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                h.insert("x-forwarded-for", v);
            }
            let _ = p.client(ip("10.0.0.1"), &h);
        }
    }
}
