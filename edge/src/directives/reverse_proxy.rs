//! `reverse_proxy [matcher] UPSTREAMS... { to, lb_policy, fail_duration, max_fails,
//! header_up, header_down, method, rewrite, @name status..., handle_response }`: serves the
//! request from upstreams (see `crate::proxy`).
//!
//! `method` and `rewrite` change only what goes upstream (a GET or HEAD sends no body).
//! With `handle_response`, the upstream's answer is not sent as is when a handler's status
//! matcher matches: its routes run instead, with the response at hand
//! (`{http.reverse_proxy.header.*}` placeholders, `copy_response`), and when they answer nothing the request goes on to the
//! directives after this one, as Caddy's `forward_auth` pattern needs. The request the
//! routes see is the client's, so the upstream gets a copy without a body: `handle_response`
//! needs `method GET` or `method HEAD`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::http::uri::PathAndQuery;
use hyper::http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::header::HeaderOpsToml;
use super::{
    At, Build, BuildFail, Checked, Checking, Dir, Handler, Io, RouteToml, Routes, Scope, Serving,
    Step, at, rewrite,
};
use crate::body::UpBody;
use crate::context::{Cx, Proxied, Req};
use crate::placeholders::Template;
use crate::proxy::{Balancer, Forwarded, Proxy, Upgrades, Upstream};
use crate::site::parse_duration;

/// `reverse_proxy` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Only requests whose path matches (the TOML `[[site.reverse_proxy]]` form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<String>,
    /// Upstreams: "localhost:7001", "http://10.0.0.2:3000", ":8080".
    pub(crate) to: Vec<String>,
    /// "round_robin" (default) or "first".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lb_policy: Option<String>,
    /// How long a failed upstream is skipped. Default "30s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fail_duration: Option<String>,
    /// Failures within fail_duration before an upstream is skipped. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_fails: Option<u32>,
    /// Changes to request headers sent upstream.
    #[serde(default, skip_serializing_if = "HeaderOpsToml::is_empty")]
    pub(crate) header_up: HeaderOpsToml,
    /// Changes to response headers from upstream.
    #[serde(default, skip_serializing_if = "HeaderOpsToml::is_empty")]
    pub(crate) header_down: HeaderOpsToml,
    /// The method sent upstream instead of the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) method: Option<String>,
    /// The target sent upstream ("/api/verify?rd=..."); placeholders allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rewrite: Option<String>,
    /// Response matchers for `handle_response`, by name: status codes or classes ("2xx").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) response_matchers: BTreeMap<String, Vec<String>>,
    /// What to do with matching responses instead of sending them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) handle_response: Vec<HandleResponseToml>,
}

/// `handle_response [@name] { routes }` as TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HandleResponseToml {
    /// A response matcher's name (without `@`); none matches every response.
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub(crate) matcher: Option<String>,
    /// The routes run on a matching response.
    pub(crate) routes: Vec<RouteToml>,
}

pub(crate) fn parse(d: &Dir<'_>, s: &mut Scope, key: &str) -> Result<Toml, At> {
    let mut proxy = Toml {
        to: d.args.to_vec(),
        ..Toml::default()
    };
    for sub in d.block.unwrap_or_default() {
        let Some((name, args)) = sub.words.split_first() else {
            continue;
        };
        if let Some(matcher) = name.strip_prefix('@') {
            let codes = response_matcher(matcher, args, sub.block.as_deref(), sub.line)?;
            proxy.response_matchers.insert(matcher.to_owned(), codes);
            continue;
        }
        if name == "handle_response" {
            let matcher = match args {
                [] => None,
                [m] if m.starts_with('@') => Some(m[1..].to_owned()),
                _ => {
                    return Err(at(
                        sub.line,
                        "handle_response takes a response matcher (@name) and a block",
                    ));
                }
            };
            let k = format!(
                "{key}.handle_response[{}].routes",
                proxy.handle_response.len()
            );
            let routes = super::parse_routes(sub.block.as_deref().unwrap_or_default(), s, &k)?;
            proxy
                .handle_response
                .push(HandleResponseToml { matcher, routes });
            continue;
        }
        if sub.block.is_some() {
            return Err(at(
                sub.line,
                format!("reverse_proxy option {name:?} with a block is not supported"),
            ));
        }
        let one = || match args {
            [v] => Ok(v.clone()),
            _ => Err(at(
                sub.line,
                format!("reverse_proxy {name} takes one value"),
            )),
        };
        match name.as_str() {
            "to" if !args.is_empty() => proxy.to.extend(args.iter().cloned()),
            "lb_policy" => proxy.lb_policy = Some(one()?),
            "fail_duration" => proxy.fail_duration = Some(one()?),
            "max_fails" => {
                let text = one()?;
                proxy.max_fails =
                    Some(text.parse().map_err(|_| {
                        at(sub.line, format!("max_fails: {text:?} is not a number"))
                    })?);
            }
            "header_up" if !args.is_empty() => proxy.header_up.add_op(args, sub.line)?,
            "header_down" if !args.is_empty() => proxy.header_down.add_op(args, sub.line)?,
            "method" => proxy.method = Some(one()?),
            "rewrite" => proxy.rewrite = Some(one()?),
            other => {
                return Err(at(
                    sub.line,
                    format!("reverse_proxy option {other:?} is not supported"),
                ));
            }
        }
    }
    Ok(proxy)
}

/// A response matcher: `@name status CODES...`, or a block of `status` lines.
fn response_matcher(
    name: &str,
    args: &[String],
    block: Option<&[super::Line]>,
    line: usize,
) -> Result<Vec<String>, At> {
    let mut lines: Vec<(&[String], usize)> = Vec::new();
    if !args.is_empty() {
        lines.push((args, line));
    }
    for sub in block.unwrap_or_default() {
        lines.push((&sub.words, sub.line));
    }
    let mut codes = Vec::new();
    for (words, line) in lines {
        match words.split_first() {
            Some((kind, list)) if kind == "status" && !list.is_empty() => {
                for code in list {
                    status_class(code).map_err(|m| at(line, format!("@{name}: {m}")))?;
                    codes.push(code.clone());
                }
            }
            Some((kind, _)) => {
                return Err(at(
                    line,
                    format!("response matcher @{name}: {kind:?} is not supported (status CODES)"),
                ));
            }
            None => {}
        }
    }
    if codes.is_empty() {
        return Err(at(
            line,
            format!("response matcher @{name} matches nothing"),
        ));
    }
    Ok(codes)
}

/// "2xx" as (2, true): a class; "404" as (404, false).
fn status_class(code: &str) -> Result<(u16, bool), String> {
    let bad = || format!("{code:?} is not a status code or class (2xx)");
    match code.strip_suffix("xx") {
        Some(class) => match class.parse::<u16>() {
            Ok(n @ 1..=5) => Ok((n, true)),
            _ => Err(bad()),
        },
        None => match code.parse::<u16>() {
            Ok(n @ 100..=599) => Ok((n, false)),
            _ => Err(bad()),
        },
    }
}

pub(crate) fn build(p: &Toml, b: &mut Build<'_>, key: &str) -> Result<Box<dyn Handler>, BuildFail> {
    build_with(p, b, key, Vec::new())
}

/// Builds `p`; `copy_headers` (forward_auth's, [from, to]) is a first `handle_response` for
/// 2xx answers that copies those fields onto the request and lets it go on.
pub(super) fn build_with(
    p: &Toml,
    b: &mut Build<'_>,
    key: &str,
    copy_headers: Vec<(HeaderName, HeaderName)>,
) -> Result<Box<dyn Handler>, BuildFail> {
    if p.to.is_empty() {
        return Err("names no upstream".to_owned().into());
    }
    let upstreams =
        p.to.iter()
            .map(|t| Upstream::parse(t))
            .collect::<Result<Vec<Arc<Upstream>>, String>>()?;
    let first = match p.lb_policy.as_deref() {
        None | Some("round_robin") => false,
        Some("first") => true,
        Some(other) => {
            return Err(format!(
                "lb_policy {other:?} is not supported (\"round_robin\" or \"first\")"
            )
            .into());
        }
    };
    let fail_duration = match &p.fail_duration {
        None => Duration::from_secs(30),
        Some(text) => parse_duration(text)
            .ok_or_else(|| format!("fail_duration {text:?} is not a duration"))?,
    };
    let proxy = Proxy {
        upstreams,
        first,
        fail_duration,
        max_fails: p.max_fails.unwrap_or(1).max(1),
        header_up: p
            .header_up
            .build(b.env)
            .map_err(|m| format!("header_up: {m}"))?,
        header_down: p
            .header_down
            .build(b.env)
            .map_err(|m| format!("header_down: {m}"))?,
    };
    let method = p
        .method
        .as_deref()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("method {m:?} is not a method"))
        })
        .transpose()?;
    let rewrite = p
        .rewrite
        .as_deref()
        .map(|r| Template::parse(r, b.env).map_err(|m| format!("rewrite: {m}")))
        .transpose()?;
    let mut reactions = Vec::new();
    if !copy_headers.is_empty() {
        reactions.push(Reaction {
            statuses: Some(vec![(2, true)]),
            action: Action::CopyHeaders(copy_headers),
        });
    }
    for (i, h) in p.handle_response.iter().enumerate() {
        let statuses = match &h.matcher {
            None => None,
            Some(name) => {
                let codes = p
                    .response_matchers
                    .get(name)
                    .ok_or_else(|| format!("no response matcher named @{name}"))?;
                Some(
                    codes
                        .iter()
                        .map(|c| status_class(c))
                        .collect::<Result<Vec<_>, String>>()?,
                )
            }
        };
        let routes = Routes::build(
            &h.routes,
            &format!("{key}.handle_response[{i}].routes"),
            true,
            b,
        )
        .map_err(BuildFail::Nested)?;
        reactions.push(Reaction {
            statuses,
            action: Action::Routes(routes),
        });
    }
    let bodiless = matches!(method, Some(Method::GET | Method::HEAD));
    if !reactions.is_empty() && !bodiless {
        return Err(
            "handle_response needs `method GET` (or HEAD): the edge sends the upstream a copy \
             of the request without its body and keeps the request for the routes after it"
                .to_owned()
                .into(),
        );
    }
    Ok(Box::new(ReverseProxy {
        balancer: Balancer::new(&proxy),
        proxy,
        method,
        rewrite,
        bodiless,
        reactions,
    }))
}

/// A `handle_response`: which statuses (`None`: all; (code, is a class)) and what to do.
#[derive(Debug)]
struct Reaction {
    statuses: Option<Vec<(u16, bool)>>,
    action: Action,
}

#[derive(Debug)]
enum Action {
    /// forward_auth's: copy these response fields onto the request ([from, to]), go on.
    CopyHeaders(Vec<(HeaderName, HeaderName)>),
    /// Run these routes with the response at hand.
    Routes(Routes),
}

impl Reaction {
    fn matches(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.statuses.as_ref().is_none_or(|list| {
            list.iter().any(
                |&(n, class)| {
                    if class { code / 100 == n } else { code == n }
                },
            )
        })
    }
}

#[derive(Debug)]
struct ReverseProxy {
    proxy: Proxy,
    balancer: Balancer,
    /// `method`.
    method: Option<Method>,
    /// `rewrite`.
    rewrite: Option<Template>,
    /// The method sent is GET or HEAD: no body goes upstream.
    bodiless: bool,
    /// `handle_response`s (and forward_auth's header copy), in order.
    reactions: Vec<Reaction>,
}

impl ReverseProxy {
    /// What goes upstream instead of the request's method and target, if anything.
    fn target(&self, req: &Request<Incoming>, cx: &Cx) -> Option<(Method, PathAndQuery)> {
        if self.method.is_none() && self.rewrite.is_none() {
            return None;
        }
        let method = self.method.clone().unwrap_or_else(|| req.method().clone());
        let path = match &self.rewrite {
            Some(to) => rewrite::target_of(to, Req::of(req), cx)?,
            None => req.uri().path_and_query().cloned()?,
        };
        Some((method, path))
    }
}

impl Handler for ReverseProxy {
    fn enter<'s>(&'s self, _req: &mut Request<Incoming>, _cx: &mut Cx) -> Step<'s> {
        if self.reactions.is_empty() {
            Step::Serve
        } else {
            Step::Check
        }
    }

    fn check<'s: 'r, 'r>(
        &'s self,
        req: &'r mut Request<Incoming>,
        cx: &'r mut Cx,
        io: &'r mut Io<'_>,
    ) -> Checking<'s, 'r> {
        Box::pin(async move {
            // The upstream gets a copy without the body; the request itself goes on.
            let target = self.target(req, cx);
            let mut up = Request::new(UpBody::Empty);
            *up.method_mut() = req.method().clone();
            *up.uri_mut() = req.uri().clone();
            *up.version_mut() = req.version();
            *up.headers_mut() = req.headers().clone();
            // Not an upgrade: the client's upgrade is for the routes after this one.
            up.headers_mut().remove(header::UPGRADE);
            // No body, so no length of one (Go sends none either).
            up.headers_mut().remove(header::CONTENT_LENGTH);
            up.headers_mut().remove(header::TRANSFER_ENCODING);
            let host = cx.host_value.clone();
            let proto = cx.scheme.as_str();
            let outcome = io
                .client
                .forward(
                    &self.proxy,
                    &self.balancer,
                    up,
                    cx,
                    Forwarded {
                        client_ip: io.forwarded_for,
                        proto,
                        host: &host,
                        target,
                    },
                    Upgrades {
                        tasks: io.tasks,
                        stop: io.stop,
                        hold: io.hold.clone(),
                    },
                )
                .await;
            let response = outcome.response;
            for reaction in &self.reactions {
                if !reaction.matches(response.status()) {
                    continue;
                }
                match &reaction.action {
                    Action::CopyHeaders(fields) => {
                        for (from, to) in fields {
                            // The client's own value never passes (a forged Remote-User).
                            req.headers_mut().remove(to);
                            let values: Vec<&[u8]> = response
                                .headers()
                                .get_all(from)
                                .iter()
                                .map(|v| v.as_bytes())
                                .collect();
                            if let Ok(value) = HeaderValue::from_bytes(&values.join(&b","[..]))
                                && !value.is_empty()
                            {
                                req.headers_mut().insert(to.clone(), value);
                            }
                        }
                        return Checked::Pass;
                    }
                    Action::Routes(routes) => {
                        let (parts, body) = response.into_parts();
                        cx.proxied = Some(Proxied {
                            status: parts.status,
                            headers: parts.headers,
                            body: Some(body),
                        });
                        return Checked::Descend(routes);
                    }
                }
            }
            io.upstream = outcome.upstream;
            Checked::Respond(response)
        })
    }

    fn serve<'s>(
        &'s self,
        req: Request<Incoming>,
        cx: &'s mut Cx,
        io: &'s mut Io<'_>,
    ) -> Serving<'s> {
        Box::pin(async move {
            let host = cx.host_value.clone();
            let proto = cx.scheme.as_str();
            let target = self.target(&req, cx);
            let outcome = io
                .client
                .forward(
                    &self.proxy,
                    &self.balancer,
                    if self.bodiless {
                        let mut up = req.map(|_| UpBody::Empty);
                        up.headers_mut().remove(header::CONTENT_LENGTH);
                        up.headers_mut().remove(header::TRANSFER_ENCODING);
                        up
                    } else {
                        req.map(UpBody::Client)
                    },
                    cx,
                    Forwarded {
                        client_ip: io.forwarded_for,
                        proto,
                        host: &host,
                        target,
                    },
                    Upgrades {
                        tasks: io.tasks,
                        stop: io.stop,
                        hold: io.hold.clone(),
                    },
                )
                .await;
            io.upstream = outcome.upstream;
            outcome.response
        })
    }

    fn describe(&self) -> String {
        let to: Vec<&str> = self
            .proxy
            .upstreams
            .iter()
            .map(|u| u.text.as_str())
            .collect();
        format!("reverse_proxy {}", to.join(" "))
    }
}
