//! Request matchers, all in one place: their TOML form ([`MatcherToml`], which is also what a
//! Caddyfile's named matcher `@name` or inline path becomes), their Caddyfile lines, and the
//! compiled [`MatcherSet`] the chain tests each request with.
//!
//! Semantics are Caddy's: within a set every matcher must match (AND); the values given to
//! one matcher are alternatives (OR); `not` negates a whole set. Paths are compared as
//! [`crate::site::match_path`] makes them (decoded, cleaned, ASCII case ignored), the
//! hardening every matcher builds on. Regexps use RE2-like syntax, as Go's do; what they
//! capture goes to the request's [`Cx`] for `{re.NAME.N}`.

pub(crate) mod expression;
pub(crate) mod file_matcher;

use std::collections::BTreeMap;
use std::net::IpAddr;

use hyper::http::{HeaderName, Method, Version, header};
use regex_lite::Regex;
use serde::{Deserialize, Serialize};

use crate::context::{Captured, Cx, Req};
use crate::placeholders::Template;
use crate::site::{Host, PathMatcher, Scheme};

/// A regexp with an optional capture name, as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegexpToml {
    /// Name for `{re.NAME.N}`; default the matcher's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// The expression.
    pub(crate) pattern: String,
}

/// One matcher set: every key given must match.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatcherToml {
    /// Paths: "/exact", "/prefix/*", "*.suffix", "*/middle/*", "/a/*/b".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) path: Vec<String>,
    /// A regexp on the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path_regexp: Option<RegexpToml>,
    /// Hosts ("example.org", "*.example.org").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) host: Vec<String>,
    /// Methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) method: Vec<String>,
    /// Header fields and accepted values ("*" any; "*x*", "x*", "*x" wildcards; none: the
    /// field is present). A name starting with "!" must be absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) header: BTreeMap<String, Vec<String>>,
    /// Header fields matched by regexps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) header_regexp: BTreeMap<String, RegexpToml>,
    /// Query keys and accepted values ("*" any).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) query: BTreeMap<String, Vec<String>>,
    /// Client addresses or CIDR ranges ("private_ranges" for RFC 1918 and friends).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) remote_ip: Vec<String>,
    /// Like `remote_ip`, for the client a trusted proxy names (`servers { trusted_proxies }`);
    /// the peer when none is trusted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) client_ip: Vec<String>,
    /// "http", "https", "grpc", "http/1.1", "http/2", "http/2+".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) protocol: Option<String>,
    /// Sets that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) not: Vec<MatcherToml>,
    /// Files that must exist (see [`crate::matchers::file_matcher`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) file: Option<crate::matchers::file_matcher::FileToml>,
    /// A CEL expression, in the forms [`crate::matchers::expression`] understands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) expression: Option<String>,
    /// Variables (or `{placeholder}`s) and accepted values; any one matching is enough.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) vars: BTreeMap<String, Vec<String>>,
    /// Variables (or `{placeholder}`s) matched by regexps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) vars_regexp: BTreeMap<String, RegexpToml>,
}

/// Why `remote_ip forwarded` is refused rather than read: Caddy 2.6 takes the first
/// X-Forwarded-For entry, which any client can write.
pub(crate) const FORWARDED: &str = "remote_ip forwarded believes any client's \
    X-Forwarded-For (Caddy 2.6 reads its first entry); name the proxies in servers { \
    trusted_proxies static ... } and match client_ip instead";

impl MatcherToml {
    /// A set matching these paths.
    pub(crate) fn path(path: &str) -> MatcherToml {
        MatcherToml {
            path: vec![path.to_owned()],
            ..MatcherToml::default()
        }
    }

    /// Adds one Caddyfile matcher line (`path /a /b`, `header Connection *Upgrade*`,
    /// `not path /x`); `block` holds the lines of `not { ... }`.
    pub(crate) fn add_line(
        &mut self,
        words: &[String],
        block: Option<&[Vec<String>]>,
    ) -> Result<(), String> {
        let Some((kind, args)) = words.split_first() else {
            return Err("a matcher line needs a matcher".into());
        };
        let need_args = |n: usize| {
            if args.len() < n {
                Err(format!("matcher {kind} needs more arguments"))
            } else {
                Ok(())
            }
        };
        if block.is_some() && kind != "not" && kind != "file" {
            return Err(format!("matcher {kind} takes no block"));
        }
        match kind.as_str() {
            "path" => {
                need_args(1)?;
                self.path.extend(args.iter().cloned());
            }
            "path_regexp" => {
                need_args(1)?;
                let (name, pattern) = match args {
                    [pattern] => (None, pattern),
                    [name, pattern] => (Some(name.clone()), pattern),
                    _ => return Err("path_regexp [NAME] REGEXP".into()),
                };
                if self.path_regexp.is_some() {
                    return Err("one path_regexp per matcher set".into());
                }
                self.path_regexp = Some(RegexpToml {
                    name,
                    pattern: pattern.clone(),
                });
            }
            "host" => {
                need_args(1)?;
                self.host.extend(args.iter().cloned());
            }
            "method" => {
                need_args(1)?;
                self.method.extend(args.iter().cloned());
            }
            "header" => {
                need_args(1)?;
                self.header
                    .entry(args[0].clone())
                    .or_default()
                    .extend(args[1..].iter().cloned());
            }
            "header_regexp" => {
                let (name, field, pattern) = match args {
                    [field, pattern] => (None, field, pattern),
                    [name, field, pattern] => (Some(name.clone()), field, pattern),
                    _ => return Err("header_regexp [NAME] FIELD REGEXP".into()),
                };
                self.header_regexp.insert(
                    field.clone(),
                    RegexpToml {
                        name,
                        pattern: pattern.clone(),
                    },
                );
            }
            "query" => {
                need_args(1)?;
                for pair in args {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, "*"));
                    self.query
                        .entry(k.to_owned())
                        .or_default()
                        .push(v.to_owned());
                }
            }
            "remote_ip" => {
                need_args(1)?;
                if args.iter().any(|a| a == "forwarded") {
                    return Err(FORWARDED.into());
                }
                self.remote_ip.extend(args.iter().cloned());
            }
            "client_ip" => {
                need_args(1)?;
                self.client_ip.extend(args.iter().cloned());
            }
            "protocol" => match args {
                [p] => self.protocol = Some(p.clone()),
                _ => return Err("protocol takes one protocol".into()),
            },
            "not" => {
                let mut inner = MatcherToml::default();
                match (args, block) {
                    ([], Some(lines)) => {
                        for line in lines {
                            inner.add_line(line, None)?;
                        }
                    }
                    ([_, ..], None) => inner.add_line(args, None)?,
                    _ => return Err("not takes a matcher on its line or a block".into()),
                }
                self.not.push(inner);
            }
            "file" => self
                .file
                .get_or_insert_with(Default::default)
                .add_line(args, block)?,
            "expression" => {
                need_args(1)?;
                if self.expression.is_some() {
                    return Err("one expression per matcher set (join them with &&)".into());
                }
                self.expression = Some(args.join(" "));
            }
            "vars" => {
                need_args(2)?;
                self.vars
                    .entry(args[0].clone())
                    .or_default()
                    .extend(args[1..].iter().cloned());
            }
            "vars_regexp" => {
                let (name, key, pattern) = match args {
                    [key, pattern] => (None, key, pattern),
                    [name, key, pattern] => (Some(name.clone()), key, pattern),
                    _ => return Err("vars_regexp [NAME] VARIABLE REGEXP".into()),
                };
                self.vars_regexp.insert(
                    key.clone(),
                    RegexpToml {
                        name,
                        pattern: pattern.clone(),
                    },
                );
            }
            other => {
                return Err(format!(
                    "matcher {other:?} is not supported (see man edge-caddyfile)"
                ));
            }
        }
        Ok(())
    }
}

/// A path pattern.
#[derive(Debug, Clone)]
enum PathPattern {
    Simple(PathMatcher),
    /// `*x*`: contains.
    Contains(Vec<u8>),
    /// Several stars: `*` matches within one segment.
    Glob(Vec<u8>),
    /// A pattern starting with neither `/` nor `*` (`'/.htaccess`, a quote the Caddyfile kept):
    /// no request path can match it, in Caddy as here.
    Never,
}

impl PathPattern {
    fn parse(text: &str) -> Result<PathPattern, String> {
        // Caddy takes any such word and compares it as it is; a path always starts with `/`
        // (or is `*`), so it never matches. Glob syntax the edge lacks stays refused.
        if !text.starts_with(['/', '*', '?', '[', '\\']) && !text.is_empty() {
            tracing::warn!(
                pattern = text,
                "a path matcher starting with neither / nor * never matches (as in Caddy)"
            );
            return Ok(PathPattern::Never);
        }
        let stars = text.matches('*').count();
        if stars == 2 && text.len() > 2 && text.starts_with('*') && text.ends_with('*') {
            return Ok(PathPattern::Contains(
                text[1..text.len() - 1].to_ascii_lowercase().into_bytes(),
            ));
        }
        if stars >= 2 || (stars == 1 && !text.starts_with('*') && !text.ends_with('*')) {
            if !text.starts_with('/') && !text.starts_with('*') {
                return Err(format!("path matcher {text:?} must start with /"));
            }
            return Ok(PathPattern::Glob(text.to_ascii_lowercase().into_bytes()));
        }
        PathMatcher::parse(text).map(PathPattern::Simple)
    }

    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathPattern::Simple(m) => m.matches(path),
            PathPattern::Contains(needle) => {
                let lower = path.to_ascii_lowercase();
                lower.windows(needle.len()).any(|w| w == needle.as_slice())
            }
            PathPattern::Glob(pattern) => glob(pattern, &path.to_ascii_lowercase()),
            PathPattern::Never => false,
        }
    }
}

/// Go's `path.Match` for `*` only: a star matches any run of bytes but `/`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => {
            let mut i = 0;
            loop {
                if glob(rest, &text[i..]) {
                    return true;
                }
                if i == text.len() || text[i] == b'/' {
                    return false;
                }
                i += 1;
            }
        }
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

#[derive(Debug, Clone)]
enum HeaderValueMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl HeaderValueMatch {
    fn parse(text: &str) -> HeaderValueMatch {
        if text == "*" {
            HeaderValueMatch::Any
        } else if text.len() > 1 && text.starts_with('*') && text.ends_with('*') {
            HeaderValueMatch::Contains(text[1..text.len() - 1].to_owned())
        } else if let Some(rest) = text.strip_prefix('*') {
            HeaderValueMatch::Suffix(rest.to_owned())
        } else if let Some(rest) = text.strip_suffix('*') {
            HeaderValueMatch::Prefix(rest.to_owned())
        } else {
            HeaderValueMatch::Exact(text.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            HeaderValueMatch::Any => true,
            HeaderValueMatch::Exact(e) => value == e,
            HeaderValueMatch::Prefix(p) => value.starts_with(p.as_str()),
            HeaderValueMatch::Suffix(s) => value.ends_with(s.as_str()),
            HeaderValueMatch::Contains(c) => value.contains(c.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
struct NamedRegex {
    name: String,
    re: Regex,
}

impl NamedRegex {
    fn build(toml: &RegexpToml, default_name: &str) -> Result<NamedRegex, String> {
        let re =
            Regex::new(&toml.pattern).map_err(|e| format!("regexp {:?}: {e}", toml.pattern))?;
        Ok(NamedRegex {
            name: toml.name.clone().unwrap_or_else(|| default_name.to_owned()),
            re,
        })
    }

    fn capture(&self, text: &str, cx: &mut Cx) -> bool {
        let Some(caps) = self.re.captures(text) else {
            return false;
        };
        let groups = caps
            .iter()
            .map(|g| g.map(|m| m.as_str().to_owned()))
            .collect();
        let named = self
            .re
            .capture_names()
            .flatten()
            .filter_map(|n| caps.name(n).map(|m| (n.to_owned(), m.as_str().to_owned())))
            .collect();
        cx.captures.push(Captured {
            name: self.name.clone(),
            groups,
            named,
        });
        true
    }
}

/// An IP range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub(crate) fn parse(text: &str) -> Result<Vec<Cidr>, String> {
        if text == "private_ranges" {
            return [
                "192.168.0.0/16",
                "172.16.0.0/12",
                "10.0.0.0/8",
                "127.0.0.1/8",
                "fd00::/8",
                "::1/128",
            ]
            .iter()
            .map(|r| Cidr::parse(r).map(|mut v| v.remove(0)))
            .collect();
        }
        let bad = || format!("{text:?} is not an IP address or CIDR range");
        let (ip, bits) = match text.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        Ok(vec![Cidr { net, bits }])
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Protocol {
    Http,
    Https,
    Grpc,
    Http1,
    Http2,
    Http2Up,
    Http3,
}

#[derive(Debug, Clone)]
enum Matcher {
    Path(Vec<PathPattern>),
    PathRegexp(NamedRegex),
    Host(Vec<Host>),
    Method(Vec<Method>),
    Header(HeaderName, Option<Vec<HeaderValueMatch>>),
    HeaderAbsent(HeaderName),
    HeaderRegexp(HeaderName, NamedRegex),
    Query(String, Vec<String>),
    RemoteIp(Vec<Cidr>),
    ClientIp(Vec<Cidr>),
    Protocol(Protocol),
    Not(MatcherSet),
    File(Box<crate::matchers::file_matcher::FileMatcher>),
    Expression(Box<crate::matchers::expression::Expression>),
    /// Any of the (variable, accepted values) pairs.
    Vars(Vec<(VarKey, Vec<Template>)>),
    VarsRegexp(Vec<(VarKey, NamedRegex)>),
}

/// What a `vars` matcher reads: a variable, or a `{placeholder}`.
#[derive(Debug, Clone)]
enum VarKey {
    Var(String),
    Placeholder(Template),
}

impl VarKey {
    fn build(key: &str) -> Result<VarKey, String> {
        if key.starts_with('{') && key.ends_with('}') && key.matches('{').count() == 1 {
            Ok(VarKey::Placeholder(Template::parse(
                key,
                &labcore::Env::default(),
            )?))
        } else {
            Ok(VarKey::Var(key.to_owned()))
        }
    }

    /// The value as Caddy compares it: a variable never set is Go's `<nil>`, and so is a
    /// `map` destination that maps to nothing.
    fn value(&self, req: Req<'_>, cx: &Cx) -> String {
        match self {
            VarKey::Var(name) => cx.var(name).unwrap_or("<nil>").to_owned(),
            VarKey::Placeholder(t) => match t.mapped_name() {
                Some(name) => {
                    crate::placeholders::mapped(name, req, cx).unwrap_or_else(|| "<nil>".to_owned())
                }
                None => t.render(req, cx),
            },
        }
    }
}

/// A compiled matcher set.
#[derive(Debug, Clone, Default)]
pub(crate) struct MatcherSet {
    matchers: Vec<Matcher>,
    /// The first path pattern's length, for Caddy's sorting of routes (longer first).
    first_path: Option<usize>,
}

impl MatcherSet {
    /// Compiles `toml`; `name` is the matcher's own name (default capture name).
    pub(crate) fn build(toml: &MatcherToml, name: &str) -> Result<MatcherSet, String> {
        let resolved = crate::placeholders::with_site_env(|env| static_values(toml, env))?;
        let toml = &resolved;
        let mut matchers = Vec::new();
        if !toml.path.is_empty() {
            let patterns = toml
                .path
                .iter()
                .map(|p| PathPattern::parse(p))
                .collect::<Result<_, _>>()?;
            matchers.push(Matcher::Path(patterns));
        }
        if let Some(re) = &toml.path_regexp {
            matchers.push(Matcher::PathRegexp(NamedRegex::build(re, name)?));
        }
        if !toml.host.is_empty() {
            let hosts = toml
                .host
                .iter()
                .map(|h| Host::parse(h))
                .collect::<Result<_, _>>()?;
            matchers.push(Matcher::Host(hosts));
        }
        if !toml.method.is_empty() {
            let methods = toml
                .method
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("{m:?} is not a method"))
                })
                .collect::<Result<_, _>>()?;
            matchers.push(Matcher::Method(methods));
        }
        for (field, values) in &toml.header {
            let (absent, field) = match field.strip_prefix('!') {
                Some(f) => (true, f),
                None => (false, field.as_str()),
            };
            let name = HeaderName::from_bytes(field.as_bytes())
                .map_err(|_| format!("{field:?} is not a header name"))?;
            if absent {
                matchers.push(Matcher::HeaderAbsent(name));
            } else if values.is_empty() {
                matchers.push(Matcher::Header(name, None));
            } else {
                let values = values.iter().map(|v| HeaderValueMatch::parse(v)).collect();
                matchers.push(Matcher::Header(name, Some(values)));
            }
        }
        for (field, re) in &toml.header_regexp {
            let header = HeaderName::from_bytes(field.as_bytes())
                .map_err(|_| format!("{field:?} is not a header name"))?;
            matchers.push(Matcher::HeaderRegexp(header, NamedRegex::build(re, name)?));
        }
        for (key, values) in &toml.query {
            matchers.push(Matcher::Query(key.clone(), values.clone()));
        }
        if !toml.remote_ip.is_empty() {
            let mut ranges = Vec::new();
            for r in &toml.remote_ip {
                ranges.extend(Cidr::parse(r)?);
            }
            matchers.push(Matcher::RemoteIp(ranges));
        }
        if !toml.client_ip.is_empty() {
            let mut ranges = Vec::new();
            for r in &toml.client_ip {
                ranges.extend(Cidr::parse(r)?);
            }
            matchers.push(Matcher::ClientIp(ranges));
        }
        if let Some(p) = &toml.protocol {
            let protocol = match p.as_str() {
                "http" => Protocol::Http,
                "https" => Protocol::Https,
                "grpc" => Protocol::Grpc,
                "http/1.0" | "http/1.1" | "http/1" => Protocol::Http1,
                "http/2" => Protocol::Http2,
                "http/2+" => Protocol::Http2Up,
                "http/3" | "http/3+" => Protocol::Http3,
                other => return Err(format!("protocol {other:?} is not known")),
            };
            matchers.push(Matcher::Protocol(protocol));
        }
        for inner in &toml.not {
            matchers.push(Matcher::Not(MatcherSet::build(inner, name)?));
        }
        crate::placeholders::with_site_env(|env| {
            build_placeholder_matchers(toml, name, env, &mut matchers)
        })?;
        Ok(MatcherSet {
            first_path: toml.path.first().map(|p| p.len()),
            matchers,
        })
    }
}

/// `toml` with the placeholders Caddy renders in path, host, header and query matcher values
/// resolved when they are static (`{env.X}`, read at load); a placeholder whose value depends
/// on the request is refused there (the `vars` and `expression` matchers take those), so none
/// is ever compared as text.
fn static_values(toml: &MatcherToml, env: &labcore::Env) -> Result<MatcherToml, String> {
    let fix = |kind: &str, value: &str| -> Result<String, String> {
        if !value.contains('{') {
            return Ok(value.to_owned());
        }
        let template = Template::parse(value, env)?;
        match template.literal() {
            Some(text) => Ok(text.to_owned()),
            None => Err(format!(
                "{kind} matcher value {value:?}: only {{env.X}} placeholders are supported \
                 here (match request values with a vars or expression matcher)"
            )),
        }
    };
    let mut out = toml.clone();
    for p in &mut out.path {
        *p = fix("path", p)?;
    }
    for h in &mut out.host {
        *h = fix("host", h)?;
    }
    for values in out.header.values_mut() {
        for v in values {
            *v = fix("header", v)?;
        }
    }
    let mut query = BTreeMap::new();
    for (k, values) in &toml.query {
        let values = values
            .iter()
            .map(|v| fix("query", v))
            .collect::<Result<Vec<_>, _>>()?;
        query.insert(fix("query", k)?, values);
    }
    out.query = query;
    Ok(out)
}

/// The matchers that hold placeholders (`file`, `expression`, `vars`, `vars_regexp`), compiled
/// with the site's environment.
fn build_placeholder_matchers(
    toml: &MatcherToml,
    name: &str,
    env: &labcore::Env,
    matchers: &mut Vec<Matcher>,
) -> Result<(), String> {
    if let Some(file) = &toml.file {
        matchers.push(Matcher::File(Box::new(
            crate::matchers::file_matcher::FileMatcher::build(file, env)?,
        )));
    }
    if let Some(text) = &toml.expression {
        matchers.push(Matcher::Expression(Box::new(
            crate::matchers::expression::Expression::parse(text, env)?,
        )));
    }
    if !toml.vars.is_empty() {
        let mut pairs = Vec::new();
        for (key, values) in &toml.vars {
            let values = values
                .iter()
                .map(|v| Template::parse(v, env))
                .collect::<Result<_, _>>()?;
            pairs.push((VarKey::build(key)?, values));
        }
        matchers.push(Matcher::Vars(pairs));
    }
    if !toml.vars_regexp.is_empty() {
        let mut pairs = Vec::new();
        for (key, re) in &toml.vars_regexp {
            pairs.push((VarKey::build(key)?, NamedRegex::build(re, name)?));
        }
        matchers.push(Matcher::VarsRegexp(pairs));
    }
    Ok(())
}

impl MatcherSet {
    /// Whether the set is empty (matches everything).
    pub(crate) fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }

    /// The first path pattern's length, when the set has a path matcher.
    pub(crate) fn first_path(&self) -> Option<usize> {
        self.first_path
    }

    /// Whether the request matches every matcher of the set.
    pub(crate) fn matches(&self, req: Req<'_>, cx: &mut Cx) -> bool {
        self.matchers.iter().all(|m| m.matches(req, cx))
    }
}

impl Matcher {
    fn matches(&self, req: Req<'_>, cx: &mut Cx) -> bool {
        match self {
            Matcher::Path(patterns) => {
                let path = cx.match_path();
                patterns.iter().any(|p| p.matches(path))
            }
            Matcher::PathRegexp(re) => {
                // Caddy matches path regexps against the cleaned path.
                let path = String::from_utf8_lossy(cx.match_path()).into_owned();
                re.capture(&path, cx)
            }
            Matcher::Host(hosts) => hosts.iter().any(|h| h.matches(&cx.host)),
            Matcher::Method(methods) => methods.contains(req.method),
            Matcher::Header(name, values) => {
                let mut present = req.headers.get_all(name).iter().peekable();
                match values {
                    None => present.peek().is_some(),
                    Some(values) => present
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| values.iter().any(|m| m.matches(v))),
                }
            }
            Matcher::HeaderAbsent(name) => !req.headers.contains_key(name),
            Matcher::HeaderRegexp(name, re) => {
                let value = match name {
                    n if n == header::HOST => Some(cx.host_value.to_str().unwrap_or("").to_owned()),
                    _ => req
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                };
                value.is_some_and(|v| re.capture(&v, cx))
            }
            Matcher::Query(key, values) => req.uri.query().unwrap_or("").split('&').any(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                crate::placeholders::decode(k) == *key
                    && values
                        .iter()
                        .any(|want| want == "*" || *want == crate::placeholders::decode(v))
            }),
            Matcher::RemoteIp(ranges) => ranges.iter().any(|r| r.contains(cx.remote.ip())),
            Matcher::ClientIp(ranges) => ranges.iter().any(|r| r.contains(cx.client)),
            Matcher::Protocol(p) => match p {
                Protocol::Http => cx.scheme == Scheme::Http,
                Protocol::Https => cx.scheme == Scheme::Https,
                Protocol::Grpc => req
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/grpc")),
                Protocol::Http1 => req.version <= Version::HTTP_11,
                Protocol::Http2 => req.version == Version::HTTP_2,
                Protocol::Http2Up => req.version >= Version::HTTP_2,
                Protocol::Http3 => req.version == Version::HTTP_3,
            },
            Matcher::Not(set) => !set.matches(req, cx),
            Matcher::File(file) => file.matches(req, cx),
            Matcher::Expression(expression) => expression.matches(req, cx),
            Matcher::Vars(pairs) => pairs.iter().any(|(key, values)| {
                let value = key.value(req, cx);
                values.iter().any(|v| v.render(req, cx) == value)
            }),
            Matcher::VarsRegexp(pairs) => pairs.iter().any(|(key, re)| {
                // Caddy tries the variable, then the key itself as a placeholder.
                let value = match key {
                    VarKey::Var(name) => cx.var(name).unwrap_or("<nil>").to_owned(),
                    VarKey::Placeholder(_) => "<nil>".to_owned(),
                };
                if re.capture(&value, cx) {
                    return true;
                }
                match key {
                    VarKey::Placeholder(t) => {
                        let rendered = t.render(req, cx);
                        re.capture(&rendered, cx)
                    }
                    VarKey::Var(name) => re.capture(name, cx),
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_within_segments_and_cidrs_contain_their_addresses() {
        assert!(glob(b"/a/*/c", b"/a/b/c"));
        assert!(!glob(b"/a/*/c", b"/a/b/x/c"));
        let private = Cidr::parse("private_ranges").unwrap();
        assert!(
            private
                .iter()
                .any(|c| c.contains("10.1.2.3".parse().unwrap()))
        );
        assert!(
            !private
                .iter()
                .any(|c| c.contains("8.8.8.8".parse().unwrap()))
        );
        let one = Cidr::parse("192.168.1.0/24").unwrap();
        assert!(one[0].contains("::ffff:192.168.1.9".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
    }

    #[test]
    fn remote_ip_forwarded_is_refused_not_silently_dropped() {
        // Dropping the word would turn `remote_ip forwarded 10.0.0.0/8` into a check of the
        // peer, which answers differently from Caddy without a word; believing the header
        // would let any client pick its address.
        let mut toml = MatcherToml::default();
        let line = ["remote_ip".into(), "forwarded".into(), "10.0.0.0/8".into()];
        let err = toml.add_line(&line, None).unwrap_err();
        assert!(err.contains("trusted_proxies"), "{err}");
        let err = expression::Expression::parse(
            r#"remote_ip("forwarded", "10.0.0.0/8")"#,
            &labcore::Env::default(),
        )
        .unwrap_err();
        assert!(err.contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn a_request_placeholder_in_a_header_matcher_value_is_refused_not_compared_as_text() {
        let mut toml = MatcherToml::default();
        toml.add_line(&["header".into(), "X-Tenant".into(), "{path}".into()], None)
            .unwrap();
        let err = MatcherSet::build(&toml, "t").unwrap_err();
        assert!(err.contains("only {env.X}"), "{err}");
        let mut toml = MatcherToml::default();
        toml.add_line(&["path".into(), "/{vars.x}/*".into()], None)
            .unwrap();
        assert!(MatcherSet::build(&toml, "t").is_err());
        let mut toml = MatcherToml::default();
        toml.add_line(&["header".into(), "X-A".into(), "{\"json\"}".into()], None)
            .unwrap();
        assert!(MatcherSet::build(&toml, "t").is_ok());
    }
}
