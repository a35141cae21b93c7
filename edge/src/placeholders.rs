//! Caddy's placeholders (`{host}`, `{uri}`, `{http.request.header.X}`, `{re.name.1}`...),
//! compiled once when the config loads into a [`Template`] of literal text and variables,
//! and rendered per request from the request and its [`Cx`].
//!
//! Invariant: a `{...}` whose inside looks like a placeholder key (letters, digits, `_`, `.`,
//! `-`) and that the edge does not know is an error at load time, never text sent on: a
//! client or upstream must not see `{remote_host}` where Caddy would send an address. A brace
//! pair holding anything else (JSON in a `respond` body) is literal text, as in Caddy, and so
//! is `\{`. `{env.X}` is read once at load: the process environment does not change.

use std::fmt::Write as _;

use hyper::http::HeaderName;
use labcore::Env;

use crate::context::{Cx, Req};

/// One variable part.
#[derive(Clone, Debug, PartialEq)]
enum Var {
    Host,
    HostPort,
    Uri,
    Path,
    Query,
    Method,
    Scheme,
    Proto,
    Remote,
    RemoteHost,
    ClientIp,
    RemotePort,
    Dir,
    File,
    OrigUri,
    OrigPath,
    OrigQuery,
    Header(HeaderName),
    Cookie(String),
    QueryArg(String),
    PathPart(usize),
    Label(usize),
    Named(String),
    /// `{re.NAME.GROUP}`: NAME may be empty (`{re.1}`).
    Re(String, String),
    Upstream,
    /// `{http.reverse_proxy.header.NAME}`: of the response `handle_response` handles.
    ProxyHeader(HeaderName),
    /// `{http.reverse_proxy.status_code}`.
    ProxyStatus,
    ErrorStatus,
    ErrorMessage,
    /// A `map` destination, looked up when rendered.
    Mapped(String),
    /// `{http.matchers.file.*}`: what the last `file` matcher found.
    FileMatch(FileField),
}

/// What the `file` matcher records of the file it found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum FileField {
    /// The path under the root, starting with `/`.
    Relative,
    /// The path with the root.
    Absolute,
    /// "file" or "directory".
    Type,
    /// What followed a `split_path` extension.
    Remainder,
}

thread_local! {
    /// The `map` destinations of the site being compiled: placeholders known only to it.
    static MAPPED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    /// How deep `map` lookups nest in the render under way (a map whose source reads
    /// another map's destination); bounded so a cycle renders empty instead of looping.
    static MAP_DEPTH: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    /// The environment of the site being compiled.
    static SITE_ENV: std::cell::RefCell<Option<Env>> = const { std::cell::RefCell::new(None) };
}

/// Starts compiling a new site with `env`: no `map` destination is known yet.
pub(crate) fn start_site(env: &Env) {
    MAPPED.with(|m| m.borrow_mut().clear());
    SITE_ENV.with(|e| *e.borrow_mut() = Some(env.clone()));
}

/// Runs `f` with the environment of the site being compiled (for `{env.X}` in matchers,
/// which are built without one at hand); the empty one outside a site's compilation.
pub(crate) fn with_site_env<T>(f: impl FnOnce(&Env) -> T) -> T {
    SITE_ENV.with(|e| match &*e.borrow() {
        Some(env) => f(env),
        None => f(&Env::default()),
    })
}

/// Makes `names` (a `map`'s destinations) known placeholders for the site being compiled.
pub(crate) fn allow_mapped(names: &[String]) {
    MAPPED.with(|m| m.borrow_mut().extend(names.iter().cloned()));
}

/// Whether `key` names a built-in placeholder (one a `map` destination may not shadow).
pub(crate) fn is_builtin(key: &str) -> bool {
    MAPPED.with(|m| {
        let saved = std::mem::take(&mut *m.borrow_mut());
        let known = variable(key, &Env::default()).is_ok();
        *m.borrow_mut() = saved;
        known
    })
}

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    Var(Var),
}

/// A template that is a single placeholder of the kinds [`Template::lone`] names.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Lone {
    /// `{remote_host}`.
    RemoteHost,
    /// `{client_ip}`.
    ClientIp,
    /// `{header.NAME}`.
    Header(HeaderName),
}

/// Text with placeholders, compiled.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

/// Whether `key` looks like a placeholder key, so that not knowing it is an error.
fn looks_like_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Caddy's short forms, as their long names.
fn long_name(key: &str) -> String {
    let short = [
        ("host", "http.request.host"),
        ("hostport", "http.request.hostport"),
        ("uri", "http.request.uri"),
        ("path", "http.request.uri.path"),
        ("query", "http.request.uri.query"),
        ("method", "http.request.method"),
        ("scheme", "http.request.scheme"),
        ("remote", "http.request.remote"),
        ("remote_host", "http.request.remote.host"),
        ("remote_port", "http.request.remote.port"),
        ("client_ip", "http.vars.client_ip"),
        ("dir", "http.request.uri.path.dir"),
        ("file", "http.request.uri.path.file"),
        ("orig_uri", "http.request.orig_uri"),
        ("orig_path", "http.request.orig_uri.path"),
        ("orig_query", "http.request.orig_uri.query"),
        ("upstream_hostport", "http.reverse_proxy.upstream.hostport"),
    ];
    if let Some((_, long)) = short.iter().find(|(s, _)| *s == key) {
        return (*long).to_owned();
    }
    for (prefix, long) in [
        ("header.", "http.request.header."),
        ("cookie.", "http.request.cookie."),
        ("query.", "http.request.uri.query."),
        ("path.", "http.request.uri.path."),
        ("labels.", "http.request.host.labels."),
        ("re.", "http.regexp."),
        ("vars.", "http.vars."),
        ("err.", "http.error."),
        ("file_match.", "http.matchers.file."),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return format!("{long}{rest}");
        }
    }
    key.to_owned()
}

fn variable(key: &str, env: &Env) -> Result<Piece, String> {
    let long = long_name(key);
    let var = match long.as_str() {
        "http.request.host" => Var::Host,
        "http.request.hostport" => Var::HostPort,
        "http.request.uri" => Var::Uri,
        "http.request.uri.path" => Var::Path,
        "http.request.uri.query" => Var::Query,
        "http.request.method" => Var::Method,
        "http.request.scheme" => Var::Scheme,
        "http.request.proto" => Var::Proto,
        "http.request.remote" => Var::Remote,
        "http.request.remote.host" => Var::RemoteHost,
        "http.request.remote.port" => Var::RemotePort,
        "http.vars.client_ip" => Var::ClientIp,
        "http.request.uri.path.dir" => Var::Dir,
        "http.request.uri.path.file" => Var::File,
        "http.request.orig_uri" => Var::OrigUri,
        "http.request.orig_uri.path" => Var::OrigPath,
        "http.request.orig_uri.query" => Var::OrigQuery,
        "http.reverse_proxy.upstream.hostport" => Var::Upstream,
        "http.reverse_proxy.status_code" => Var::ProxyStatus,
        "http.error.status_code" => Var::ErrorStatus,
        "http.error.message" => Var::ErrorMessage,
        // Set by `rate_limit` on the request it refuses, as a variable of that name.
        "http.rate_limit.exceeded.name" => Var::Named(long.clone()),
        "http.matchers.file.relative" => Var::FileMatch(FileField::Relative),
        "http.matchers.file.absolute" => Var::FileMatch(FileField::Absolute),
        "http.matchers.file.type" => Var::FileMatch(FileField::Type),
        "http.matchers.file.remainder" => Var::FileMatch(FileField::Remainder),
        _ => {
            if MAPPED.with(|m| m.borrow().iter().any(|n| n == key)) {
                return Ok(Piece::Var(Var::Mapped(key.to_owned())));
            }
            if let Some(name) = long.strip_prefix("env.") {
                return Ok(Piece::Text(env.get(name).unwrap_or("").to_owned()));
            }
            if let Some(name) = long.strip_prefix("http.reverse_proxy.header.") {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{{{key}}}: {name:?} is not a header name"))?;
                Var::ProxyHeader(name)
            } else if let Some(name) = long.strip_prefix("http.request.header.") {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{{{key}}}: {name:?} is not a header name"))?;
                Var::Header(name)
            } else if let Some(name) = long.strip_prefix("http.request.cookie.") {
                Var::Cookie(name.to_owned())
            } else if let Some(name) = long.strip_prefix("http.request.uri.query.") {
                Var::QueryArg(name.to_owned())
            } else if let Some(n) = long.strip_prefix("http.request.uri.path.") {
                Var::PathPart(
                    n.parse()
                        .map_err(|_| format!("unknown placeholder {{{key}}}"))?,
                )
            } else if let Some(n) = long.strip_prefix("http.request.host.labels.") {
                Var::Label(
                    n.parse()
                        .map_err(|_| format!("unknown placeholder {{{key}}}"))?,
                )
            } else if let Some(name) = long.strip_prefix("http.vars.") {
                Var::Named(name.to_owned())
            } else if let Some(rest) = long.strip_prefix("http.regexp.") {
                match rest.rsplit_once('.') {
                    Some((name, group)) => Var::Re(name.to_owned(), group.to_owned()),
                    None => Var::Re(String::new(), rest.to_owned()),
                }
            } else {
                return Err(format!("unknown placeholder {{{key}}}"));
            }
        }
    };
    Ok(Piece::Var(var))
}

impl Template {
    /// Compiles `text`; an unknown placeholder is an error naming it.
    pub(crate) fn parse(text: &str, env: &Env) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '\\']) {
            literal.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(escaped) = tail.strip_prefix("\\{") {
                literal.push('{');
                rest = escaped;
                continue;
            }
            if let Some(after) = tail.strip_prefix('\\') {
                literal.push('\\');
                rest = after;
                continue;
            }
            let key = tail[1..].find('}').map(|end| &tail[1..1 + end]);
            match key {
                Some(key) if looks_like_key(key) => {
                    match variable(key, env)? {
                        Piece::Text(t) => literal.push_str(&t),
                        var => {
                            if !literal.is_empty() {
                                pieces.push(Piece::Text(std::mem::take(&mut literal)));
                            }
                            pieces.push(var);
                        }
                    }
                    rest = &tail[key.len() + 2..];
                }
                _ => {
                    literal.push('{');
                    rest = &tail[1..];
                }
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template { pieces })
    }

    /// The destination's name, when the whole text is one `map` destination.
    pub(crate) fn mapped_name(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [Piece::Var(Var::Mapped(name))] => Some(name),
            _ => None,
        }
    }

    /// The text, when it holds no placeholder.
    pub(crate) fn literal(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Text(t)] => Some(t),
            _ => None,
        }
    }

    /// What the template is when it is one client address or one header and nothing else
    /// (`rate_limit` hashes these without rendering them).
    pub(crate) fn lone(&self) -> Option<Lone> {
        match self.pieces.as_slice() {
            [Piece::Var(Var::RemoteHost)] => Some(Lone::RemoteHost),
            [Piece::Var(Var::ClientIp)] => Some(Lone::ClientIp),
            [Piece::Var(Var::Header(name))] => Some(Lone::Header(name.clone())),
            _ => None,
        }
    }

    /// Whether it names the chosen upstream (rendered per upstream tried).
    pub(crate) fn uses_upstream(&self) -> bool {
        self.pieces.contains(&Piece::Var(Var::Upstream))
    }

    /// Renders for `req` in `cx`, each placeholder's value passed through `value` (the `file`
    /// matcher escapes glob characters in them, as Caddy does).
    pub(crate) fn render_with(
        &self,
        req: Req<'_>,
        cx: &Cx,
        value: impl Fn(&str) -> String,
    ) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => {
                    let mut one = String::new();
                    render_var(&mut one, v, req, cx);
                    out.push_str(&value(&one));
                }
            }
        }
        out
    }

    /// Renders for `req` in `cx`. `{path}`, `{dir}`, `{file}`, `{path.N}` and `{orig_path}`
    /// are percent-decoded, as Caddy gives them; `{uri}`, `{query}` and `{orig_uri}` are as
    /// sent.
    pub(crate) fn render(&self, req: Req<'_>, cx: &Cx) -> String {
        self.render_as(req, cx, PathForm::Decoded)
    }

    /// Renders a request target (`rewrite`'s path): as [`Template::render`], but the path
    /// placeholders keep the request's escapes. Their decoded values could hold `?`, `#` or
    /// a `%` that the target would read a second time (`%252e` as `.`), letting the
    /// rewritten path say what the sent one did not.
    pub(crate) fn render_target(&self, req: Req<'_>, cx: &Cx) -> String {
        self.render_as(req, cx, PathForm::Raw)
    }

    fn render_as(&self, req: Req<'_>, cx: &Cx, path: PathForm) -> String {
        if let Some(text) = self.literal() {
            return text.to_owned();
        }
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => render_var_as(&mut out, v, req, cx, path),
            }
        }
        out
    }
}

/// How the path placeholders render.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PathForm {
    /// Percent-decoded (lossily to UTF-8), as Go's `URL.Path`.
    Decoded,
    /// As the request spelled it.
    Raw,
}

fn render_var(out: &mut String, var: &Var, req: Req<'_>, cx: &Cx) {
    render_var_as(out, var, req, cx, PathForm::Decoded);
}

fn render_var_as(out: &mut String, var: &Var, req: Req<'_>, cx: &Cx, mode: PathForm) {
    let uri = req.uri;
    let orig = cx.orig_uri.as_ref().unwrap_or(uri);
    let path_of = |raw: &str| -> String {
        match mode {
            PathForm::Raw => raw.to_owned(),
            PathForm::Decoded => percent_decode(raw),
        }
    };
    // Writing to a String cannot fail.
    let _ = match var {
        Var::Host => write!(
            out,
            "{}",
            host_as_sent(cx.host_value.to_str().unwrap_or(""))
        ),
        Var::HostPort => write!(out, "{}", cx.host_value.to_str().unwrap_or("")),
        Var::Uri => write!(out, "{}", uri.path_and_query().map_or("/", |p| p.as_str())),
        Var::Path => write!(out, "{}", path_of(uri.path())),
        Var::Query => write!(out, "{}", uri.query().unwrap_or("")),
        Var::Method => write!(out, "{}", req.method),
        Var::Scheme => write!(out, "{}", cx.scheme.as_str()),
        Var::Proto => write!(out, "{:?}", req.version),
        Var::Remote => write!(out, "{}", cx.remote),
        Var::RemoteHost => write!(out, "{}", cx.remote.ip()),
        Var::ClientIp => write!(out, "{}", cx.client),
        Var::RemotePort => write!(out, "{}", cx.remote.port()),
        Var::Dir => {
            let path = path_of(uri.path());
            write!(out, "{}", &path[..path.rfind('/').map_or(0, |i| i + 1)])
        }
        Var::File => {
            let path = path_of(uri.path());
            write!(out, "{}", &path[path.rfind('/').map_or(0, |i| i + 1)..])
        }
        Var::OrigUri => write!(out, "{}", orig.path_and_query().map_or("/", |p| p.as_str())),
        Var::OrigPath => write!(out, "{}", path_of(orig.path())),
        Var::OrigQuery => write!(out, "{}", orig.query().unwrap_or("")),
        Var::Header(name) => {
            let values: Vec<&str> = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            write!(out, "{}", values.join(","))
        }
        Var::ProxyHeader(name) => {
            let values: Vec<&str> = cx
                .proxied
                .iter()
                .flat_map(|p| p.headers.get_all(name))
                .filter_map(|v| v.to_str().ok())
                .collect();
            write!(out, "{}", values.join(","))
        }
        Var::ProxyStatus => match &cx.proxied {
            Some(p) => write!(out, "{}", p.status.as_u16()),
            None => Ok(()),
        },
        Var::Cookie(name) => {
            let found = req
                .headers
                .get_all(hyper::http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(n, _)| n == name)
                .map(|(_, v)| v);
            write!(out, "{}", found.unwrap_or(""))
        }
        Var::QueryArg(name) => {
            // Every value of a repeated key, joined by commas, as Caddy gives them.
            let found: Vec<String> = uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (decode(k) == *name).then(|| decode(v))
                })
                .collect();
            write!(out, "{}", found.join(","))
        }
        Var::PathPart(n) => {
            // Caddy's split: only the empty part before the leading slash is dropped, so
            // `/a//b` has parts "a", "" and "b"; a decoded `%2F` splits too.
            let path = path_of(uri.path());
            let part = path.strip_prefix('/').unwrap_or(&path).split('/').nth(*n);
            write!(out, "{}", part.unwrap_or(""))
        }
        Var::Label(n) => {
            // Caddy counts labels from the right: 0 is the top-level domain.
            let label = host_as_sent(cx.host_value.to_str().unwrap_or(""))
                .rsplit('.')
                .nth(*n);
            write!(out, "{}", label.unwrap_or(""))
        }
        Var::Named(name) => write!(out, "{}", cx.var(name).unwrap_or("")),
        Var::Re(name, group) => {
            let captured = cx.captures.iter().rev().find(|c| c.name == *name);
            let value = captured.and_then(|c| match group.parse::<usize>() {
                Ok(n) => c.groups.get(n).cloned().flatten(),
                Err(_) => c
                    .named
                    .iter()
                    .find(|(g, _)| g == group)
                    .map(|(_, v)| v.clone()),
            });
            write!(out, "{}", value.unwrap_or_default())
        }
        Var::Upstream => write!(out, "{}", cx.upstream.as_deref().unwrap_or("")),
        Var::ErrorStatus => match &cx.error {
            Some((status, _)) => write!(out, "{status}"),
            None => Ok(()),
        },
        Var::ErrorMessage => match &cx.error {
            Some((_, message)) => write!(out, "{message}"),
            None => Ok(()),
        },
        Var::Mapped(name) => {
            out.push_str(&mapped(name, req, cx).unwrap_or_default());
            Ok(())
        }
        Var::FileMatch(field) => {
            if let Some(found) = &cx.file_match {
                out.push_str(match field {
                    FileField::Relative => &found.relative,
                    FileField::Absolute => &found.absolute,
                    FileField::Type => found.kind,
                    FileField::Remainder => &found.remainder,
                });
            }
            Ok(())
        }
    };
}

/// The value of `map` destination `name` for this request: the first `map` the request
/// passed that has it decides, as in Caddy (`None`: it maps to nothing, or no `map` ran).
pub(crate) fn mapped(name: &str, req: Req<'_>, cx: &Cx) -> Option<String> {
    let depth = MAP_DEPTH.with(std::cell::Cell::get);
    if depth >= 8 {
        return None;
    }
    MAP_DEPTH.with(|d| d.set(depth + 1));
    let value = cx.maps.iter().find_map(|m| m.lookup(name, req, cx));
    MAP_DEPTH.with(|d| d.set(depth));
    value.flatten()
}

/// The query part of a rewrite target (`rewrite`, `try_files`), compiled as Caddy's
/// `buildQueryString` reads it: split at `&` and `=` before any placeholder is rendered, each
/// placeholder's value query-escaped, so a value cannot add parameters (`{path}` holding
/// `&admin=1` stays one value); `{query}` in a key's place is already a query and is kept.
#[derive(Clone, Debug)]
pub(crate) struct QueryTemplate {
    /// Each component and whether `&` (not `=` or the end) followed it.
    components: Vec<(Template, bool)>,
}

impl QueryTemplate {
    /// Compiles `text` (after the `?`).
    pub(crate) fn parse(text: &str, env: &Env) -> Result<QueryTemplate, String> {
        let mut components = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let end = rest.find(['=', '&']).unwrap_or(rest.len());
            let amp = rest[end..].starts_with('&');
            components.push((Template::parse(&rest[..end], env)?, amp));
            rest = rest.get(end + 1..).unwrap_or("");
        }
        Ok(QueryTemplate { components })
    }

    /// Renders for `req` in `cx`.
    pub(crate) fn render(&self, req: Req<'_>, cx: &Cx) -> String {
        let mut out = String::new();
        let mut wrote_value = true;
        for (template, amp) in &self.components {
            let mut component = String::new();
            for piece in &template.pieces {
                match piece {
                    Piece::Text(t) => component.push_str(t),
                    Piece::Var(Var::Query) if wrote_value => {
                        render_var(&mut component, &Var::Query, req, cx)
                    }
                    Piece::Var(v) => {
                        let mut value = String::new();
                        render_var(&mut value, v, req, cx);
                        component.push_str(&query_escape(&value));
                    }
                }
            }
            if wrote_value {
                if !out.is_empty() && !component.is_empty() {
                    out.push('&');
                }
            } else {
                out.push('=');
            }
            out.push_str(&component);
            wrote_value = *amp;
        }
        out
    }
}

/// Go's `url.QueryEscape`: all but letters, digits and `-_.~` escaped, a space as `+`.
fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The host part of a Host header as the client wrote it (case kept), as Go's
/// `net.SplitHostPort` leaves it for Caddy's `{host}`: the whole value when it has no port.
fn host_as_sent(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return match rest.split_once("]:") {
            Some((host, _)) => host,
            None => value,
        };
    }
    match value.split_once(':') {
        Some((host, port)) if !port.contains(':') => host,
        _ => value,
    }
}

/// Percent-decodes a query component (`+` is a space), lossily.
pub(crate) fn decode(text: &str) -> String {
    percent_decode(&text.replace('+', " "))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_placeholders_are_errors_and_json_is_text() {
        let env = Env::default();
        let err = Template::parse("x {remote_hots}", &env).unwrap_err();
        assert_eq!(err, "unknown placeholder {remote_hots}");
        let json = Template::parse("{\"ok\": true}", &env).unwrap();
        assert_eq!(json.literal(), Some("{\"ok\": true}"));
        assert_eq!(
            Template::parse("\\{host}", &env).unwrap().literal(),
            Some("{host}")
        );
        assert_eq!(host_as_sent("Example.ORG:8443"), "Example.ORG");
        assert_eq!(host_as_sent("[::1]:80"), "::1");
        assert_eq!(host_as_sent("[::1]"), "[::1]");
        assert_eq!(host_as_sent("plain.local"), "plain.local");
        let env = Env::from_pairs([("SECRET_PATH", "/s")]);
        assert_eq!(
            Template::parse("{env.SECRET_PATH}/x", &env)
                .unwrap()
                .literal(),
            Some("/s/x")
        );
        assert!(
            Template::parse("{remote_host}", &env)
                .unwrap()
                .literal()
                .is_none()
        );
    }
}
