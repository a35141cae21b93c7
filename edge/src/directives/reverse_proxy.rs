//! `reverse_proxy [matcher] UPSTREAMS... { to, lb_policy, fail_duration, max_fails,
//! header_up, header_down }`: serves the request from upstreams (see `crate::proxy`).

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::header::HeaderOpsToml;
use super::{At, Build, BuildFail, Dir, Handler, Io, Scope, Serving, Step, at};
use crate::context::Cx;
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

pub(crate) fn build(
    p: &Toml,
    b: &mut Build<'_>,
    _key: &str,
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
    Ok(Box::new(ReverseProxy {
        balancer: Balancer::new(&proxy),
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
