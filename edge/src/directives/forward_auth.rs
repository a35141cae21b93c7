//! `forward_auth [matcher] UPSTREAMS... { uri URI, copy_headers FIELDS..., ...reverse_proxy
//! options }`: asks an auth server (Authelia, Authentik, tinyauth) about each request before
//! it goes on, as Caddy 2.6 expands it: a `reverse_proxy` to the auth server with `method
//! GET`, `rewrite URI`, `X-Forwarded-Method` and `X-Forwarded-Uri` set to the client's, and a
//! `handle_response` for 2xx answers that copies the `copy_headers` fields (`Name`, or
//! `From>To` to rename) from the auth server's answer onto the request and lets it go on.
//! Any other answer (a 302 to the login page, a 401) goes to the client as the auth server
//! gave it.
//!
//! Invariants: each copied field is first removed from the client's request, so a client
//! cannot forge `Remote-User` (set only when the auth server's answer has it, as newer Caddy
//! does; Caddy 2.6 sends the text `{http.reverse_proxy.header.Remote-User}` then); the auth
//! server gets no request body, and the request
//! with its body goes on unchanged but for the copied fields.

use hyper::http::HeaderName;
use serde::{Deserialize, Serialize};

use super::reverse_proxy::{self, build_with};
use super::{At, Build, BuildFail, Dir, Handler, Line, Scope, at};

/// `forward_auth` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The auth server's endpoint ("/api/authz/forward-auth", "/api/verify?rd=...").
    pub(crate) uri: String,
    /// Fields copied from a 2xx answer onto the request: "Remote-User", "From>To".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) copy_headers: Vec<String>,
    /// Peers whose X-Forwarded-* headers go on to the auth server, as `reverse_proxy`'s
    /// `trusted_proxies` (Caddy passes this option to the reverse proxy under forward_auth).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) trusted_proxies: Vec<String>,
    /// The reverse proxy to the auth server: its upstreams and options.
    pub(crate) proxy: reverse_proxy::Toml,
}

pub(crate) fn parse(d: &Dir<'_>, s: &mut Scope, key: &str) -> Result<Toml, At> {
    let mut t = Toml::default();
    let mut rest: Vec<Line> = Vec::new();
    for sub in d.block.unwrap_or_default() {
        let Some((name, args)) = sub.words.split_first() else {
            continue;
        };
        match name.as_str() {
            "uri" => match args {
                [uri] if sub.block.is_none() => t.uri = uri.clone(),
                _ => return Err(at(sub.line, "forward_auth uri takes one value")),
            },
            "copy_headers" => {
                t.copy_headers.extend(args.iter().cloned());
                for inner in sub.block.as_deref().unwrap_or_default() {
                    t.copy_headers.extend(inner.words.iter().cloned());
                }
                if t.copy_headers.is_empty() {
                    return Err(at(sub.line, "forward_auth copy_headers names no field"));
                }
            }
            "trusted_proxies" => {
                if args.is_empty() {
                    return Err(at(sub.line, "forward_auth trusted_proxies names no range"));
                }
                t.trusted_proxies.extend(args.iter().cloned());
            }
            _ => rest.push(sub.clone()),
        }
    }
    if t.uri.is_empty() {
        return Err(d.err("the uri option is required"));
    }
    for field in &t.copy_headers {
        copy_pair(field).map_err(|m| d.err(m))?;
    }
    t.proxy = reverse_proxy::parse(
        &Dir {
            name: d.name,
            matcher: d.matcher,
            args: d.args,
            block: Some(&rest),
            line: d.line,
        },
        s,
        key,
    )?;
    Ok(t)
}

/// "Name" as (Name, Name), "From>To" as (From, To).
fn copy_pair(field: &str) -> Result<(HeaderName, HeaderName), String> {
    let (from, to) = field.split_once('>').unwrap_or((field, field));
    let name = |n: &str| {
        HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| format!("copy_headers: {n:?} is not a header name"))
    };
    Ok((name(from)?, name(to)?))
}

pub(crate) fn build(t: &Toml, b: &mut Build<'_>, key: &str) -> Result<Box<dyn Handler>, BuildFail> {
    if t.uri.is_empty() {
        return Err("the uri option is required".to_owned().into());
    }
    let mut proxy = t.proxy.clone();
    proxy
        .trusted_proxies
        .extend(t.trusted_proxies.iter().cloned());
    proxy.method = Some("GET".into());
    proxy.rewrite = Some(t.uri.clone());
    // Caddy's own two fields first, so a header_up of the same field replaces them.
    for (field, value) in [
        ("X-Forwarded-Method", "{http.request.method}"),
        ("X-Forwarded-Uri", "{http.request.uri}"),
    ] {
        let user_set = proxy
            .header_up
            .set
            .keys()
            .any(|k| k.eq_ignore_ascii_case(field));
        if !user_set {
            proxy
                .header_up
                .set
                .insert(field.to_owned(), value.to_owned());
        }
    }
    let copy = t
        .copy_headers
        .iter()
        .map(|f| copy_pair(f))
        .collect::<Result<Vec<_>, String>>()?;
    build_with(&proxy, b, key, copy)
}
