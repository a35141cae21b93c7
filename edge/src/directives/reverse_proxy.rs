//! `reverse_proxy [matcher] UPSTREAMS... { to, lb_*, health_*, fail_duration, max_fails,
//! unhealthy_*, transport http {...}, flush_interval, trusted_proxies, header_up,
//! header_down }`: serves the request from upstreams (see `crate::proxy`; the policies are
//! `crate::lb`'s, health `crate::health`'s, upstream addresses and transports
//! `crate::transport`'s).

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::header::HeaderOpsToml;
use super::{At, Build, BuildFail, Dir, Handler, Io, Line, Scope, Serving, Step, at};
use crate::context::Cx;
use crate::health::{Active, HealthToml, Passive};
use crate::lb::Policy;
use crate::matchers::Cidr;
use crate::placeholders::Template;
use crate::proxy::{Balancer, Forwarded, Proxy, Upgrades, Upstream};
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
    pub(crate) to: Vec<String>,
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
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
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
        if name == "transport" {
            if proxy.transport.is_some() {
                return Err(at(sub.line, "transport already specified"));
            }
            proxy.transport = Some(Box::new(
                TransportToml::parse(args, opt.block.as_deref(), sub.line).map_err(located)?,
            ));
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
            "dynamic" => {
                return Err(at(
                    sub.line,
                    "reverse_proxy dynamic upstreams are not supported: list the upstreams (see man edge-caddyfile)",
                ));
            }
            "buffer_requests" | "buffer_responses" | "max_buffer_size" | "lb_retry_match" => {
                return Err(at(
                    sub.line,
                    format!(
                        "reverse_proxy {name} is not supported: the edge streams bodies (see man edge-caddyfile)"
                    ),
                ));
            }
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

pub(crate) fn build(
    p: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    if p.to.is_empty() {
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
    Ok(Box::new(ReverseProxy {
        balancer: Balancer::new(&proxy, active),
        proxy,
    }))
}

#[derive(Debug)]
struct ReverseProxy {
    proxy: Proxy,
    balancer: Balancer,
}

impl Handler for ReverseProxy {
    fn enter<'s>(&'s self, _req: &mut Request<Incoming>, _cx: &mut Cx) -> Step<'s> {
        Step::Serve
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
            let outcome = io
                .client
                .forward(
                    &self.proxy,
                    &self.balancer,
                    req,
                    cx,
                    Forwarded {
                        client_ip: io.forwarded_for,
                        proto,
                        host: &host,
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
