//! `reverse_proxy [matcher] UPSTREAMS... { to, lb_*, health_*, fail_duration, max_fails,
//! unhealthy_*, transport http {...}, flush_interval, trusted_proxies, header_up,
//! header_down, method, rewrite, @name status..., handle_response }`: serves the request from
//! upstreams (see `crate::proxy`; the policies are `crate::lb`'s, health `crate::health`'s,
//! upstream addresses and transports `crate::transport`'s).
//!
//! `method` and `rewrite` change only what goes upstream (a GET or HEAD sends no body).
//! With `handle_response`, the upstream's answer is not sent as is when a handler's status
//! matcher matches: its routes run instead, with the response at hand
//! (`{http.reverse_proxy.header.*}` placeholders, `copy_response`), and when they answer
//! nothing the request goes on to the directives after this one, as Caddy's `forward_auth`
//! pattern needs. The request the routes see is the client's, so the upstream gets a copy
//! without a body: `handle_response` needs `method GET` or `method HEAD`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::body::ReqBody;
use hyper::http::uri::PathAndQuery;
use hyper::http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::header::HeaderOpsToml;
use super::{
    At, Build, BuildFail, Checked, Checking, Dir, Handler, Io, Line, RouteToml, Routes, Scope,
    Serving, Step, at, rewrite,
};
use crate::body::UpBody;
use crate::context::{Cx, Proxied, Req};
use crate::dynamic_upstreams::{Dynamic, DynamicToml};
use crate::health::{Active, HealthToml, Passive};
use crate::lb::Policy;
use crate::matchers::Cidr;
use crate::placeholders::Template;
use crate::proxy::{Balancer, Forwarded, Outcome, Proxy, Upgrades, Upstream};
use crate::site::parse_duration;
use crate::transport::{OptLine, Transport, TransportToml};

/// `reverse_proxy` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Only requests whose path matches (the TOML `[[site.reverse_proxy]]` form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<String>,
    /// Upstreams: "localhost:7001", "http://10.0.0.2:3000", ":8080".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) to: Vec<String>,
    /// Upstreams looked up in DNS (`dynamic a|srv`); `to` is the fallback when a lookup fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dynamic: Option<Box<DynamicToml>>,
    /// "random" (default), "round_robin", "first", "least_conn", "random_choose 2",
    /// "ip_hash", "client_ip_hash", "uri_hash", "header NAME", "cookie [NAME [SECRET]]".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lb_policy: Option<String>,
    /// How long to keep choosing another upstream after failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lb_try_duration: Option<String>,
    /// The pause between choices. Default "250ms" with lb_try_duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lb_try_interval: Option<String>,
    /// How many more choices after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lb_retries: Option<u32>,
    /// Active and passive health options.
    #[serde(default, skip_serializing_if = "HealthToml::is_empty")]
    pub(crate) health: Box<HealthToml>,
    /// `transport http { ... }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) transport: Option<Box<TransportToml>>,
    /// Accepted for Caddy's sake: the edge passes every chunk on as it arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) flush_interval: Option<String>,
    /// Peers whose X-Forwarded-* headers are kept ("private_ranges", CIDRs, addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) trusted_proxies: Vec<String>,
    /// How long a failure is remembered; setting it makes passive health Caddy's (an
    /// upstream down is never chosen). Default: "30s", and a down upstream is the last choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fail_duration: Option<String>,
    /// Failures within fail_duration before an upstream is skipped. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_fails: Option<u32>,
    /// Changes to request headers sent upstream.
    #[serde(default, skip_serializing_if = "HeaderOpsToml::is_empty")]
    pub(crate) header_up: Box<HeaderOpsToml>,
    /// Changes to response headers from upstream.
    #[serde(default, skip_serializing_if = "HeaderOpsToml::is_empty")]
    pub(crate) header_down: Box<HeaderOpsToml>,
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
        let opt = opt_line(sub);
        let located = |(line, message): (usize, String)| at(line, message);
        if proxy
            .health
            .parse_option(name, args, &opt)
            .map_err(located)?
        {
            continue;
        }
        if name == "dynamic" {
            if proxy.dynamic.is_some() {
                return Err(at(sub.line, "dynamic upstreams already specified"));
            }
            proxy.dynamic = Some(Box::new(
                DynamicToml::parse(args, opt.block.as_deref(), sub.line).map_err(located)?,
            ));
            continue;
        }
        if name == "transport" {
            if proxy.transport.is_some() {
                return Err(at(sub.line, "transport already specified"));
            }
            proxy.transport = Some(Box::new(
                TransportToml::parse(args, opt.block.as_deref(), sub.line).map_err(located)?,
            ));
            continue;
        }
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
        let duration = || {
            let v = one()?;
            parse_duration(&v)
                .map(|_| v.clone())
                .ok_or_else(|| at(sub.line, format!("{name}: {v:?} is not a duration")))
        };
        match name.as_str() {
            "to" if !args.is_empty() => proxy.to.extend(args.iter().cloned()),
            "lb_policy" if !args.is_empty() => {
                if proxy.lb_policy.is_some() {
                    return Err(at(
                        sub.line,
                        "load balancing selection policy already specified",
                    ));
                }
                let text = args.join(" ");
                Policy::parse(&text).map_err(|m| at(sub.line, m))?;
                proxy.lb_policy = Some(text);
            }
            "lb_try_duration" => proxy.lb_try_duration = Some(duration()?),
            "lb_try_interval" => proxy.lb_try_interval = Some(duration()?),
            "lb_retries" => {
                let text = one()?;
                proxy.lb_retries =
                    Some(text.parse().map_err(|_| {
                        at(sub.line, format!("lb_retries: {text:?} is not a number"))
                    })?);
            }
            "fail_duration" => proxy.fail_duration = Some(duration()?),
            "max_fails" => {
                let text = one()?;
                proxy.max_fails =
                    Some(text.parse().map_err(|_| {
                        at(sub.line, format!("max_fails: {text:?} is not a number"))
                    })?);
            }
            "flush_interval" => {
                let text = one()?;
                if text.parse::<i64>().is_err() && parse_duration(&text).is_none() {
                    return Err(at(
                        sub.line,
                        format!("flush_interval: {text:?} is not a duration or -1"),
                    ));
                }
                proxy.flush_interval = Some(text);
            }
            "trusted_proxies" if !args.is_empty() => {
                for a in args {
                    Cidr::parse(a).map_err(|m| at(sub.line, format!("trusted_proxies: {m}")))?;
                }
                proxy.trusted_proxies.extend(args.iter().cloned());
            }
            "header_up" if !args.is_empty() => proxy.header_up.add_op(args, sub.line)?,
            "header_down" if !args.is_empty() => proxy.header_down.add_op(args, sub.line)?,
            "buffer_requests" | "buffer_responses" | "max_buffer_size" | "lb_retry_match" => {
                return Err(at(
                    sub.line,
                    format!(
                        "reverse_proxy {name} is not supported: the edge streams bodies (see man edge-caddyfile)"
                    ),
                ));
            }
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

/// `line` as the option parsers below `directives` take it.
fn opt_line(line: &Line) -> OptLine<'_> {
    OptLine {
        words: &line.words,
        line: line.line,
        block: line
            .block
            .as_ref()
            .map(|b| b.iter().map(opt_line).collect()),
    }
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
    if p.to.is_empty() && p.dynamic.is_none() {
        return Err("names no upstream".to_owned().into());
    }
    let mut texts = Vec::new();
    for t in &p.to {
        if t.starts_with("srv+") {
            return Err(format!("{t:?}: SRV upstreams are not supported").into());
        }
        // `{env.X}` is read now, as Caddy reads it when the config loads.
        let rendered = Template::parse(t, b.env)
            .ok()
            .and_then(|tpl| tpl.literal().map(str::to_owned))
            .ok_or_else(|| {
                format!("{t:?}: only {{env.*}} placeholders are supported in upstream addresses")
            })?;
        texts.push(rendered);
    }
    let mut scheme = None;
    for t in &texts {
        let s = crate::transport::Address::parse(t)?.scheme;
        match scheme {
            None => scheme = Some(s),
            Some(common) if common != s => {
                return Err(format!(
                    "all upstreams must use the same scheme: {common:?} and {s:?} are mixed"
                )
                .into());
            }
            Some(_) => {}
        }
    }
    static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let transport = Transport::build(p.transport.as_deref(), scheme.unwrap_or(""), id)?;
    let upstreams = texts
        .iter()
        .map(|t| Upstream::parse_with(t, &transport.tag))
        .collect::<Result<Vec<Arc<Upstream>>, String>>()?;
    let dynamic = p
        .dynamic
        .as_deref()
        .map(|d| Dynamic::build(d, &transport.tag, b.env))
        .transpose()?;
    let policy = Policy::parse(p.lb_policy.as_deref().unwrap_or("random"))?;
    let dur = |v: &Option<String>, what: &str| -> Result<Option<Duration>, String> {
        v.as_deref()
            .map(|s| parse_duration(s).ok_or_else(|| format!("{what} {s:?} is not a duration")))
            .transpose()
    };
    let try_duration = dur(&p.lb_try_duration, "lb_try_duration")?.filter(|d| !d.is_zero());
    let try_interval = match dur(&p.lb_try_interval, "lb_try_interval")? {
        Some(d) => d,
        None if try_duration.is_some() => Duration::from_millis(250),
        None => Duration::ZERO,
    };
    let trusted = p
        .trusted_proxies
        .iter()
        .map(|t| Cidr::parse(t))
        .collect::<Result<Vec<Vec<Cidr>>, String>>()?
        .into_iter()
        .flatten()
        .collect();
    let active = Active::build(&p.health)?;
    let proxy = Proxy {
        upstreams,
        policy,
        try_duration,
        try_interval,
        retries: p.lb_retries.unwrap_or(0),
        passive: Passive::build(&p.health, p.fail_duration.as_deref(), p.max_fails)?,
        transport,
        trusted,
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
        balancer: Balancer::new(&proxy, active),
        dynamic,
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
    /// `dynamic`: the upstreams of the latest DNS answer, when there is one, instead of
    /// `balancer`'s (the static ones).
    dynamic: Option<Dynamic>,
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
    /// Sends `up` to this reverse_proxy's upstreams, forwarded for the client of `cx`.
    async fn forward(
        &self,
        up: Request<UpBody>,
        target: Option<(Method, PathAndQuery)>,
        cx: &mut Cx,
        io: &Io<'_>,
    ) -> Outcome {
        let host = cx.host_value.clone();
        let proto = cx.scheme.as_str();
        let fwd = Forwarded {
            client_ip: io.forwarded_for,
            proto,
            host: &host,
            target,
        };
        let upgrades = Upgrades {
            tasks: io.tasks,
            stop: io.stop,
            hold: io.hold.clone(),
        };
        let found = match &self.dynamic {
            Some(dynamic) => dynamic.balancer().await,
            None => None,
        };
        let balancer = found.as_deref().unwrap_or(&self.balancer);
        io.client
            .forward(&self.proxy, balancer, up, cx, fwd, upgrades)
            .await
    }

    fn target(&self, req: &Request<ReqBody>, cx: &Cx) -> Option<(Method, PathAndQuery)> {
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
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, _cx: &mut Cx) -> Step<'s> {
        if self.reactions.is_empty() {
            Step::Serve
        } else {
            Step::Check
        }
    }

    fn check<'s: 'r, 'r>(
        &'s self,
        req: &'r mut Request<ReqBody>,
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
            drop_body_length(&mut up);
            let outcome = self.forward(up, target, cx, io).await;
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
        req: Request<ReqBody>,
        cx: &'s mut Cx,
        io: &'s mut Io<'_>,
    ) -> Serving<'s> {
        Box::pin(async move {
            let target = self.target(&req, cx);
            let up = if self.bodiless {
                let mut up = req.map(|_| UpBody::Empty);
                drop_body_length(&mut up);
                up
            } else {
                req.map(UpBody::Client)
            };
            let outcome = self.forward(up, target, cx, io).await;
            io.upstream = outcome.upstream;
            outcome.response
        })
    }

    fn describe(&self) -> String {
        let mut to: Vec<&str> = self
            .proxy
            .upstreams
            .iter()
            .map(|u| u.text.as_str())
            .collect();
        if self.dynamic.is_some() {
            to.push("(dynamic)");
        }
        format!("reverse_proxy {}", to.join(" "))
    }
}

/// A request sent without its body carries no length of one either (Go sends none).
fn drop_body_length(up: &mut Request<UpBody>) {
    up.headers_mut().remove(header::CONTENT_LENGTH);
    up.headers_mut().remove(header::TRANSFER_ENCODING);
}
