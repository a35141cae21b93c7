//! What a site is once resolved: its addresses, the certificate policy of each name, path
//! matchers, header operations, redirects and upstreams.
//!
//! Configuration data only: what runs (routing, upstream health, connections) lives above,
//! in `router`, `proxy` and `server`, and builds on these types.
//! These types hold only valid values (a [`HeaderOps`] holds parsed header names, an
//! [`Upstream`] a parsed authority), so the request path never re-validates configuration.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Plain HTTP or HTTPS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// "http" or "https".
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The host part of a site address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Host {
    /// One DNS name, lower case.
    Name(String),
    /// `*.example.org`: any single label before the suffix (kept with its leading dot).
    Wildcard(String),
    /// An IP address.
    Ip(IpAddr),
    /// Any host (`:8080`, `http://`).
    Any,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Wildcard(suffix) => write!(f, "*{suffix}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Any => Ok(()),
        }
    }
}

impl Host {
    /// Parses a host as written in a site address.
    pub(crate) fn parse(text: &str) -> Result<Host, String> {
        if text.is_empty() {
            return Ok(Host::Any);
        }
        if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            return inner
                .parse()
                .map(Host::Ip)
                .map_err(|_| format!("{text:?} is not an IPv6 address"));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        let lower = text.to_ascii_lowercase();
        let (wild, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if rest.is_empty() || rest.len() > 253 || !rest.split('.').all(valid_label) {
            return Err(format!("{text:?} is not a host name"));
        }
        Ok(if wild {
            Host::Wildcard(format!(".{rest}"))
        } else {
            Host::Name(lower)
        })
    }

    /// Whether the internal CA serves this host unless told otherwise (as Caddy does):
    /// `localhost`, IP addresses, and names under `.localhost`, `.internal`, `.local`,
    /// `.home.arpa`.
    pub(crate) fn internal_by_default(&self) -> bool {
        let name = match self {
            Host::Ip(_) => return true,
            Host::Any => return false,
            Host::Name(name) => name.as_str(),
            Host::Wildcard(suffix) => suffix.as_str(),
        };
        name == "localhost"
            || [".localhost", ".internal", ".local", ".home.arpa"]
                .iter()
                .any(|s| name.ends_with(s))
    }

    /// Whether `name` (lower case, no port) is this host.
    pub(crate) fn matches(&self, name: &str) -> bool {
        match self {
            Host::Name(own) => own == name,
            Host::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            Host::Ip(ip) => name.trim_start_matches('[').trim_end_matches(']').parse() == Ok(*ip),
            Host::Any => true,
        }
    }
}

/// Where a site is served: scheme, host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Address {
    /// Plain or TLS.
    pub(crate) scheme: Scheme,
    /// Which host names.
    pub(crate) host: Host,
    /// The port.
    pub(crate) port: u16,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

impl Address {
    /// Parses `[scheme://]host[:port]` as Caddy does: without a scheme, a site is HTTPS
    /// unless its port is the HTTP port.
    pub(crate) fn parse(text: &str, http_port: u16, https_port: u16) -> Result<Address, String> {
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (Some(Scheme::Https), rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (Some(Scheme::Http), rest)
        } else if text.contains("://") {
            return Err(format!(
                "{text:?}: only http:// and https:// addresses are served"
            ));
        } else {
            (None, text)
        };
        if rest.contains('/') {
            return Err(format!(
                "{text:?}: a site address cannot hold a path (use a path matcher)"
            ));
        }
        let (host, port) =
            split_host_port(rest).ok_or_else(|| format!("{text:?} has a bad port"))?;
        let host = Host::parse(host)?;
        let (scheme, port) = match (scheme, port) {
            (Some(s), Some(p)) => (s, p),
            (Some(Scheme::Http), None) => (Scheme::Http, http_port),
            (Some(Scheme::Https), None) => (Scheme::Https, https_port),
            (None, Some(p)) if p == http_port => (Scheme::Http, p),
            // The HTTPS port is HTTPS even without a host (served with `tls CERT KEY`).
            (None, Some(p)) if p == https_port && p != 0 => (Scheme::Https, p),
            // No host to hold a certificate: Caddy serves `:8080` as plain HTTP.
            (None, Some(p)) if host == Host::Any => (Scheme::Http, p),
            (None, Some(p)) => (Scheme::Https, p),
            (None, None) => (Scheme::Https, https_port),
        };
        if scheme == Scheme::Http && port == https_port && port != 0 {
            return Err(format!("{text:?}: plain HTTP on the HTTPS port"));
        }
        if scheme == Scheme::Https && port == http_port && port != 0 {
            return Err(format!("{text:?}: HTTPS on the HTTP port"));
        }
        Ok(Address { scheme, host, port })
    }
}

/// Splits `host:port`, `[v6]:port`, `host` or `:port`.
pub(crate) fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    if text.starts_with('[') {
        let end = text.find(']')?;
        let (host, rest) = text.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if rest.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match text.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((host, _)) if host.contains(':') => Some((text, None)),
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((text, None)),
    }
}

/// Where a name's certificate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TlsPolicy {
    /// The edge's internal CA.
    Internal,
    /// The configured ACME CA.
    Acme,
    /// The site's own PEM files (`tls CERT KEY`), read on start and on every reload.
    Files,
    /// The ACME CA, ordered at the first handshake naming it (`tls { on_demand }`).
    OnDemand,
}

impl TlsPolicy {
    /// The policy for `host`: internal when asked for or by default for local names, ACME for
    /// the rest. A public wildcard needs DNS-01: `dns01` says a DNS provider is configured.
    pub(crate) fn for_host(
        host: &Host,
        explicit_internal: bool,
        dns01: bool,
    ) -> Result<TlsPolicy, String> {
        if explicit_internal || host.internal_by_default() {
            Ok(TlsPolicy::Internal)
        } else if matches!(host, Host::Wildcard(_)) && !dns01 {
            Err(format!(
                "{host}: a public wildcard certificate needs the ACME DNS-01 challenge, and no \
                 DNS provider is configured: add `tls {{ dns PROVIDER ... }}` to the site or a \
                 global `acme_dns PROVIDER ...` ([acme.dns] or the site's tls_dns in TOML), \
                 list the names, or add `tls internal` to serve it from the edge's own CA"
            ))
        } else {
            Ok(TlsPolicy::Acme)
        }
    }
}

/// A path matcher as Caddy writes it: `/exact`, `/prefix/*`, `*.suffix` or `*`.
/// It is compared with [`match_path`]'s form of the request path, ignoring ASCII case, as
/// Caddy 2.6 compares (it lowers both sides).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PathMatcher {
    /// Every path.
    Any,
    /// This path only.
    Exact(String),
    /// Paths starting with this.
    Prefix(String),
    /// Paths ending with this.
    Suffix(String),
}

impl PathMatcher {
    /// Parses a path matcher.
    pub(crate) fn parse(text: &str) -> Result<PathMatcher, String> {
        if text == "*" {
            return Ok(PathMatcher::Any);
        }
        let stars = text.matches('*').count();
        let matcher = if stars == 0 {
            PathMatcher::Exact(text.to_owned())
        } else if stars == 1 && text.ends_with('*') {
            PathMatcher::Prefix(text.trim_end_matches('*').to_owned())
        } else if stars == 1 && text.starts_with('*') {
            return Ok(PathMatcher::Suffix(text[1..].to_owned()));
        } else {
            return Err(format!(
                "path matcher {text:?}: only one * at the start or the end is supported"
            ));
        };
        if !text.starts_with('/') {
            return Err(format!("path matcher {text:?} must start with /"));
        }
        // Caddy compares such patterns in escaped space, or keeps doubled slashes for them;
        // the edge matches decoded, merged paths only, so it refuses them rather than never
        // matching.
        if text.contains('%') {
            return Err(format!(
                "path matcher {text:?}: percent-escapes are not supported (write the decoded path)"
            ));
        }
        if text.contains("//") {
            return Err(format!(
                "path matcher {text:?}: doubled slashes never match (paths are matched with \
                 repeated slashes merged)"
            ));
        }
        Ok(matcher)
    }

    /// Whether `path` (as [`match_path`] gives it) matches.
    pub(crate) fn matches(&self, path: &[u8]) -> bool {
        let p = path;
        match self {
            PathMatcher::Any => true,
            PathMatcher::Exact(m) => path.eq_ignore_ascii_case(m.as_bytes()),
            PathMatcher::Prefix(m) => {
                p.len() >= m.len() && p[..m.len()].eq_ignore_ascii_case(m.as_bytes())
            }
            PathMatcher::Suffix(m) => {
                p.len() >= m.len() && p[p.len() - m.len()..].eq_ignore_ascii_case(m.as_bytes())
            }
        }
    }
}

/// The request path as path matchers see it, the way Caddy 2.6 makes it: percent-decoded
/// (`%2F` too), trailing dots and spaces dropped (Windows ignores them when opening a file),
/// then `.` and `..` segments resolved and repeated slashes merged, keeping a trailing slash.
/// So `/%61dmin`, `//admin`, `/./admin` and `/x/../admin` all match `/admin`, as the upstream
/// that decodes and resolves the path would read them. What is forwarded stays as sent.
///
/// `None` when a percent-escape is malformed (Caddy answers 400). Borrows the path when it
/// holds nothing to decode or resolve, which is nearly always.
pub(crate) fn match_path(raw: &str) -> Option<Cow<'_, [u8]>> {
    let bytes = raw.as_bytes();
    let plain = !bytes.contains(&b'%')
        && !raw.contains("//")
        && !raw.contains("/.")
        && !matches!(bytes.last(), Some(b'.' | b' '));
    if plain {
        return Some(Cow::Borrowed(bytes));
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            let hi = bytes.get(i + 1).copied().and_then(hex)?;
            let lo = bytes.get(i + 2).copied().and_then(hex)?;
            decoded.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    while matches!(decoded.last(), Some(b'.' | b' ')) {
        decoded.pop();
    }
    Some(Cow::Owned(clean_path(&decoded)))
}

/// Go's `path.Clean` (slashes merged, `.` dropped, `..` taking the segment before it, none
/// above the root), keeping a trailing slash as Caddy does.
fn clean_path(path: &[u8]) -> Vec<u8> {
    let rooted = path.first() == Some(&b'/');
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in path.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                if segments.last().is_some_and(|s| *s != b"..") {
                    segments.pop();
                } else if !rooted {
                    segments.push(segment);
                }
            }
            _ => segments.push(segment),
        }
    }
    let mut clean = Vec::with_capacity(path.len() + 1);
    for (n, segment) in segments.iter().enumerate() {
        if rooted || n > 0 {
            clean.push(b'/');
        }
        clean.extend_from_slice(segment);
    }
    if clean.is_empty() {
        clean.push(if rooted { b'/' } else { b'.' });
    }
    if clean != b"/" && path.ends_with(b"/") {
        clean.push(b'/');
    }
    clean
}

/// A resolved site.
#[derive(Clone, Debug)]
pub(crate) struct Site {
    /// Where it is served.
    pub(crate) addresses: Vec<Address>,
    /// `tls internal`: every name from the internal CA.
    pub(crate) tls_internal: bool,
    /// The ACME account email for this site's names (`tls EMAIL`), over the global one.
    pub(crate) tls_email: Option<String>,
    /// `tls CERT KEY`: the certificate chain and key files served for every name of the site.
    pub(crate) cert_files: Option<CertFiles>,
    /// `tls { client_auth }`: client certificates asked for in handshakes for its names.
    pub(crate) client_auth: Option<ClientAuth>,
    /// `tls { on_demand }`: certificates for its public names are ordered at the first
    /// handshake naming them.
    pub(crate) on_demand: bool,
    /// `tls { protocols ciphers curves alpn }`, when any is given.
    pub(crate) tls_options: Option<std::sync::Arc<crate::tls_options::TlsOptions>>,
    /// A DNS provider publishes its ACME challenges (DNS-01), so its wildcards are public
    /// certificates too.
    pub(crate) dns01: bool,
}

/// Which client certificates a site asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientAuth {
    /// A handshake without a certificate fails (`require_and_verify`); else one given must
    /// verify (`verify_if_given`).
    pub(crate) require: bool,
    /// PEM files of the CAs a client certificate must chain to.
    pub(crate) cas: Vec<PathBuf>,
}

/// A certificate chain and its key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertFiles {
    /// The chain, leaf first.
    pub(crate) cert: PathBuf,
    /// The private key.
    pub(crate) key: PathBuf,
}

impl Site {
    /// The names this site needs certificates for.
    pub(crate) fn tls_hosts(&self) -> impl Iterator<Item = &Host> {
        self.addresses
            .iter()
            .filter(|a| a.scheme == Scheme::Https)
            .map(|a| &a.host)
    }

    /// Where the certificate of `host` (one of [`Site::tls_hosts`]) comes from.
    pub(crate) fn tls_policy(&self, host: &Host) -> TlsPolicy {
        if self.cert_files.is_some() {
            return TlsPolicy::Files;
        }
        if self.on_demand && !host.internal_by_default() {
            return TlsPolicy::OnDemand;
        }
        TlsPolicy::for_host(host, self.tls_internal, self.dns01).unwrap_or(TlsPolicy::Internal)
    }
}

/// Parses a duration written as "10s", "1m30s", "500ms" or "2h".
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let parsed: jiff::SignedDuration = text.trim().parse().ok()?;
    Duration::try_from(parsed).ok()
}

/// Lower-cased host without port from a Host header or URI authority.
pub(crate) fn host_of(authority: &str) -> String {
    let host = match split_host_port(authority) {
        Some((host, _)) => host,
        None => authority,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Upstream;

    #[test]
    fn addresses_parse_like_caddys() {
        let a = Address::parse("lab.example.org", 80, 443).unwrap();
        assert_eq!((a.scheme, a.port), (Scheme::Https, 443));
        let a = Address::parse("http://intranet.local", 80, 443).unwrap();
        assert_eq!((a.scheme, a.port), (Scheme::Http, 80));
        let a = Address::parse("localhost:8443", 80, 443).unwrap();
        assert_eq!((a.scheme, a.port), (Scheme::Https, 8443));
        let a = Address::parse("[::1]:8443", 80, 443).unwrap();
        assert_eq!(a.host, Host::Ip("::1".parse().unwrap()));
        let a = Address::parse("*.Example.org", 80, 443).unwrap();
        assert_eq!(a.host, Host::Wildcard(".example.org".into()));
        assert!(Address::parse("example.org/path", 80, 443).is_err());
        // A port alone has no name for a certificate: plain HTTP, as Caddy serves it.
        let a = Address::parse(":8443", 80, 443).unwrap();
        assert_eq!((a.scheme, a.port, a.host), (Scheme::Http, 8443, Host::Any));
        let a = Address::parse(":443", 80, 443).unwrap();
        assert_eq!((a.scheme, a.port, a.host), (Scheme::Https, 443, Host::Any));
        assert!(Address::parse("ftp://x", 80, 443).is_err());
        assert!(Address::parse("bad host", 80, 443).is_err());
    }

    #[test]
    fn local_names_default_to_the_internal_ca() {
        for local in [
            "localhost",
            "127.0.0.1",
            "nas.home.arpa",
            "pi.local",
            "db.internal",
        ] {
            assert!(Host::parse(local).unwrap().internal_by_default(), "{local}");
        }
        assert!(
            !Host::parse("lab.example.org")
                .unwrap()
                .internal_by_default()
        );
    }

    #[test]
    fn wildcards_match_one_label() {
        let w = Host::parse("*.example.org").unwrap();
        assert!(w.matches("a.example.org"));
        assert!(!w.matches("a.b.example.org"));
        assert!(!w.matches("example.org"));
    }

    #[test]
    fn path_matchers_match_exact_prefix_and_suffix() {
        let p = PathMatcher::parse("/api/*").unwrap();
        assert!(p.matches(b"/api/x") && p.matches(b"/API/x") && !p.matches(b"/api"));
        let e = PathMatcher::parse("/health").unwrap();
        assert!(e.matches(b"/health") && !e.matches(b"/health/x"));
        let s = PathMatcher::parse("*.php").unwrap();
        assert!(s.matches(b"/index.php") && !s.matches(b"/index.html"));
        assert!(PathMatcher::parse("/a*b*").is_err());
        assert!(PathMatcher::parse("api").is_err());
        assert!(PathMatcher::parse("/%61dmin*").is_err());
        assert!(PathMatcher::parse("/a//b").is_err());
    }

    #[test]
    fn matched_paths_are_decoded_resolved_and_merged_like_caddys() {
        let seen = |raw: &str| match_path(raw).map(|p| String::from_utf8_lossy(&p).into_owned());
        for (raw, clean) in [
            ("/admin/secret", "/admin/secret"),
            ("/%61dmin/secret", "/admin/secret"),
            ("//admin//secret", "/admin/secret"),
            ("/./admin/./secret", "/admin/secret"),
            ("/x/../admin/secret", "/admin/secret"),
            ("/../../admin", "/admin"),
            ("/%2fadmin%2Fsecret", "/admin/secret"),
            ("/x/%2e%2e/admin", "/admin"),
            ("/admin/", "/admin/"),
            ("/admin/secret/.", "/admin/secret/"),
            ("/admin.. ", "/admin"),
            ("/x/..", "/x/"),
            ("/", "/"),
            ("*", "*"),
        ] {
            assert_eq!(seen(raw).as_deref(), Some(clean), "{raw}");
        }
        assert_eq!(seen("/%zzadmin"), None);
        assert_eq!(seen("/admin%"), None);
        assert_eq!(seen("/admin%2"), None);
    }

    #[test]
    fn upstreams_parse_like_caddys() {
        assert_eq!(
            Upstream::parse("localhost:7001").unwrap().authority,
            "localhost:7001"
        );
        assert_eq!(
            Upstream::parse(":8080").unwrap().authority,
            "localhost:8080"
        );
        assert_eq!(
            Upstream::parse("http://10.0.0.2").unwrap().authority,
            "10.0.0.2:80"
        );
        assert_eq!(Upstream::parse("[::1]:9").unwrap().authority, "[::1]:9");
        assert_eq!(
            Upstream::parse("https://x:1").unwrap().address.scheme,
            "https"
        );
        assert!(Upstream::parse("ftp://x:1").is_err());
        assert!(Upstream::parse("x:1/path").is_err());
        assert!(Upstream::parse("x:port").is_err());
    }

    #[test]
    fn host_port_splits_ipv6_and_names() {
        assert_eq!(split_host_port("a:1"), Some(("a", Some(1))));
        assert_eq!(split_host_port("[::1]:8"), Some(("[::1]", Some(8))));
        assert_eq!(split_host_port("::1"), Some(("::1", None)));
        assert_eq!(split_host_port("a:x"), None);
        assert_eq!(host_of("Lab.Example.org.:443"), "lab.example.org");
    }

    proptest::proptest! {
        /// Host headers are untrusted bytes: any text is handled without a panic.
        /// Request paths are untrusted bytes: any is decoded or refused, never a panic, and
        /// what comes out has no `.` or `..` segment and no doubled slash.
        #[test]
        fn any_request_path_is_handled(text in "/[a-z./%0-9A-F]{0,40}") {
            if let Some(clean) = match_path(&text) {
                let clean = String::from_utf8_lossy(&clean).into_owned();
                proptest::prop_assert!(!clean.contains("//"), "{clean}");
                proptest::prop_assert!(!clean.split('/').any(|s| s == "." || s == ".."), "{clean}");
            }
        }

        #[test]
        fn any_host_header_is_handled(text in ".{0,64}") {
            let _ = split_host_port(&text);
            let _ = host_of(&text);
        }

        /// A name with a port always gives back the lowercase name and the port.
        #[test]
        fn a_name_and_port_split_back(name in "[a-zA-Z0-9][a-zA-Z0-9.-]{0,30}", port: u16) {
            let authority = format!("{name}:{port}");
            proptest::prop_assert_eq!(split_host_port(&authority), Some((name.as_str(), Some(port))));
            proptest::prop_assert_eq!(host_of(&authority), name.trim_end_matches('.').to_ascii_lowercase());
        }

        /// A bracketed IPv6 address with a port splits at the bracket.
        #[test]
        fn a_bracketed_ipv6_address_and_port_split_back(ip: std::net::Ipv6Addr, port: u16) {
            let authority = format!("[{ip}]:{port}");
            let host = format!("[{ip}]");
            proptest::prop_assert_eq!(split_host_port(&authority), Some((host.as_str(), Some(port))));
        }
    }
}
