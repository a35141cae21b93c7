//! Per-request state the handler chain shares besides the request itself: who asked, on
//! which host and scheme, the path as matchers see it, `vars`, and the groups captured by
//! regexp matchers.
//!
//! Matchers (`matchers`) read it, placeholders (`placeholders`) render from it, directives
//! (`directives`) change it. It owns everything, so no lifetime ties it to the connection;
//! what a request that uses no `vars`, regexps or rewrites costs is the host string the
//! router needed anyway.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version};

use crate::body::Body;

use crate::site::{Scheme, match_path};

/// What matchers and placeholders read of the request: borrowed from a [`Request`] or from
/// its parts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Req<'a> {
    /// The method.
    pub(crate) method: &'a Method,
    /// The target, as rewritten so far.
    pub(crate) uri: &'a Uri,
    /// The headers.
    pub(crate) headers: &'a HeaderMap,
    /// HTTP/1.1, HTTP/2...
    pub(crate) version: Version,
}

impl<'a> Req<'a> {
    /// Borrows `req`.
    pub(crate) fn of<B>(req: &'a Request<B>) -> Req<'a> {
        Req {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            version: req.version(),
        }
    }
}

/// Groups one regexp matcher captured: by number (0 is the whole match) and by name.
#[derive(Clone, Debug, Default)]
pub(crate) struct Captured {
    /// The matcher's name (`path_regexp NAME RE`), or "" for none.
    pub(crate) name: String,
    /// Numbered groups.
    pub(crate) groups: Vec<Option<String>>,
    /// Named groups.
    pub(crate) named: Vec<(String, String)>,
}

/// What the last `file` matcher that matched found, for `{file_match.*}`.
#[derive(Clone, Debug, Default)]
pub(crate) struct FileMatched {
    /// The path under the root, starting with `/`.
    pub(crate) relative: String,
    /// The path with the root.
    pub(crate) absolute: String,
    /// "file" or "directory".
    pub(crate) kind: &'static str,
    /// What followed a `split_path` extension.
    pub(crate) remainder: String,
}

/// An upstream's response held for `handle_response` routes: the
/// `{http.reverse_proxy.header.*}` placeholders read it, `copy_response` sends it.
pub(crate) struct Proxied {
    /// Its status.
    pub(crate) status: StatusCode,
    /// Its headers (hop-by-hop ones already removed).
    pub(crate) headers: HeaderMap,
    /// Its body, until `copy_response` takes it.
    pub(crate) body: Option<Body>,
}

impl std::fmt::Debug for Proxied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxied")
            .field("status", &self.status)
            .field("headers", &self.headers.len())
            .finish()
    }
}

/// The per-request state.
#[derive(Debug)]
pub(crate) struct Cx {
    /// The peer's address (the client, unless it is a trusted proxy).
    pub(crate) remote: SocketAddr,
    /// The client's address: the peer's, or the one a trusted proxy named (`client_ip`).
    pub(crate) client: IpAddr,
    /// The peer is a trusted proxy (`servers { trusted_proxies }`): `reverse_proxy` keeps
    /// its X-Forwarded-* headers.
    pub(crate) trusted: bool,
    /// Plain or TLS.
    pub(crate) scheme: Scheme,
    /// The Host asked for, lower case, without port.
    pub(crate) host: String,
    /// The Host header as sent (host and port).
    pub(crate) host_value: HeaderValue,
    /// The target before the first rewrite; `None` while there was none.
    pub(crate) orig_uri: Option<Uri>,
    /// `vars` set so far, in order (later ones win).
    pub(crate) vars: Vec<(String, String)>,
    /// Groups captured by regexp matchers, latest last.
    pub(crate) captures: Vec<Captured>,
    /// The upstream being tried, as `host:port`, for `{upstream_hostport}`.
    pub(crate) upstream: Option<String>,
    /// The error being handled by `handle_errors`: status and message.
    pub(crate) error: Option<(u16, String)>,
    /// The `map` tables the request passed, in order (the first with a destination decides).
    pub(crate) maps: Vec<Arc<dyn MapTable>>,
    /// What the last `file` matcher that matched found.
    pub(crate) file_match: Option<FileMatched>,
    /// `request_body max_size`: the most body bytes a handler may read.
    pub(crate) body_limit: Option<u64>,
    /// The upstream response `reverse_proxy`'s `handle_response` routes are handling.
    pub(crate) proxied: Option<Proxied>,
    /// Request metrics: the top-level routes that ran, a bit each.
    pub(crate) metered: u64,
    /// The path as matchers see it (see [`match_path`]), for the current target.
    path: Vec<u8>,
}

impl Cx {
    /// State for a request to `uri`; `None` when its path holds a malformed escape.
    pub(crate) fn new(
        remote: SocketAddr,
        scheme: Scheme,
        host: String,
        host_value: HeaderValue,
        uri: &Uri,
    ) -> Option<Cx> {
        let path = match match_path(uri.path())? {
            Cow::Borrowed(b) => b.to_vec(),
            Cow::Owned(v) => v,
        };
        Some(Cx {
            remote,
            client: remote.ip().to_canonical(),
            trusted: false,
            scheme,
            host,
            host_value,
            orig_uri: None,
            vars: Vec::new(),
            captures: Vec::new(),
            upstream: None,
            error: None,
            maps: Vec::new(),
            file_match: None,
            body_limit: None,
            proxied: None,
            metered: 0,
            path,
        })
    }

    /// The path as matchers see it.
    pub(crate) fn match_path(&self) -> &[u8] {
        &self.path
    }

    /// Records a rewrite of the target from `old` to `new`: the original is kept for
    /// `{orig_uri}` and the match path follows the new one. False when the new path does not
    /// decode.
    pub(crate) fn rewritten(&mut self, old: &Uri, new: &Uri) -> bool {
        if self.orig_uri.is_none() {
            self.orig_uri = Some(old.clone());
        }
        match match_path(new.path()) {
            Some(path) => {
                self.path = path.into_owned();
                true
            }
            None => false,
        }
    }

    /// A variable set by `vars` or `map`.
    pub(crate) fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a variable.
    pub(crate) fn set_var(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_owned(), value)),
        }
    }
}

/// A `map` table a request passed (built by the `map` directive). The context holds it behind
/// this trait so that it need not name the directive, which itself builds on the context.
pub(crate) trait MapTable: std::fmt::Debug + Send + Sync {
    /// `None` when `name` is not one of the table's destinations; `Some(None)` when it is and
    /// maps to nothing for this request.
    fn lookup(&self, name: &str, req: Req<'_>, cx: &Cx) -> Option<Option<String>>;
}
