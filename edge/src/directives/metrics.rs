//! `metrics [matcher] { disable_openmetrics }`: answers with the Prometheus exposition of
//! `crate::metrics`, as Caddy's `metrics` handler; and the [`Meter`] a chain carries when
//! `servers { metrics }` asks for request metrics.
//!
//! A metered chain counts as Caddy 2.6 does: a site Caddy would wrap in a `subroute` (one
//! with host names, or sharing its listener with other sites) counts every request it gets
//! under `handler="subroute"`; the only site of a listener without host names counts each of
//! its top-level routes that ran, under the name of Caddy's handler module
//! (`static_response`, `reverse_proxy`, `headers`, ...). A handler's histograms get the final
//! status and the whole time to the end of the body, as Caddy's wrapper around it measures.
//!
//! Invariants: a chain without a meter never reaches this module; a metered request only
//! adds to atomics made when the config loaded (the top-level routes it ran are bits in
//! `Cx::metered`), and its body is wrapped once to see where it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::http::{HeaderValue, Request, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::{
    At, Build, BuildFail, Carry, Chain, Checking, Dir, Gating, Handler, Io, Routes, Scope, Serving,
    Step, at,
};
use crate::body::{Body, BoxError, ReqBody, UpstreamFailed};
use crate::context::Cx;
use crate::metrics::{self as m, Observed, Series};

/// `metrics` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Caddy's switch off OpenMetrics negotiation; the edge only speaks the text format.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) disable_openmetrics: bool,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    if !d.args.is_empty() {
        return Err(d.err("takes a matcher only: metrics [matcher]"));
    }
    let mut t = Toml::default();
    for sub in d.block.unwrap_or_default() {
        match sub.words.as_slice() {
            [k] if k == "disable_openmetrics" => t.disable_openmetrics = true,
            _ => return Err(at(sub.line, "metrics: the block takes disable_openmetrics")),
        }
    }
    Ok(t)
}

pub(crate) fn build(
    _t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    Ok(Box::new(Exposition))
}

#[derive(Debug)]
struct Exposition;

/// The exposition as a response.
pub(crate) fn exposition() -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(m::render()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(m::CONTENT_TYPE),
    );
    response
}

impl Handler for Exposition {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, _cx: &mut Cx) -> Step<'s> {
        Step::Respond(exposition())
    }

    fn describe(&self) -> String {
        "metrics (Prometheus exposition)".to_owned()
    }
}

/// Caddy's handler module name for a directive (what its `handler` label says).
fn module(directive: &str) -> &'static str {
    match directive {
        "map" => "map",
        "vars" | "root" => "vars",
        "header" | "request_header" => "headers",
        "copy_response_headers" => "copy_response_headers",
        "request_body" => "request_body",
        "redir" | "respond" | "abort" => "static_response",
        "rewrite" | "uri" | "try_files" => "rewrite",
        "basic_auth" => "authentication",
        "rate_limit" => "rate_limit",
        "forward_auth" | "reverse_proxy" => "reverse_proxy",
        "encode" => "encode",
        "error" => "error",
        "copy_response" => "copy_response",
        "metrics" => "metrics",
        "file_server" => "file_server",
        _ => "subroute",
    }
}

/// Top-level routes a request's bits can name.
const MAX_METERED: usize = 64;

/// A chain's request metrics.
#[derive(Debug)]
pub(crate) struct Meter {
    /// Caddy wraps the site in a subroute: `series[0]` counts every request.
    wrapped: bool,
    /// Wrapped: the subroute's; otherwise one per top-level route (bit `i` of
    /// `Cx::metered`).
    series: Vec<Arc<Series>>,
}

impl Meter {
    /// The series whose bits are set in `mask`.
    fn each(&self, mask: u64) -> impl Iterator<Item = &Series> {
        self.series
            .iter()
            .enumerate()
            .filter(move |(i, _)| mask & (1 << i) != 0)
            .map(|(_, s)| &**s)
    }
}

/// A top-level route's handler, counting the requests that enter it.
#[derive(Debug)]
struct Metered {
    inner: Box<dyn Handler>,
    bit: u64,
    series: Arc<Series>,
}

impl Handler for Metered {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        self.series.enter();
        cx.metered |= self.bit;
        self.inner.enter(req, cx)
    }

    fn leave(&self, carry: Carry, cx: &Cx, response: &mut Response<Body>) {
        self.inner.leave(carry, cx, response);
    }

    fn serve<'s>(
        &'s self,
        req: Request<ReqBody>,
        cx: &'s mut Cx,
        io: &'s mut Io<'_>,
    ) -> Serving<'s> {
        self.inner.serve(req, cx, io)
    }

    fn gate<'s>(
        &'s self,
        req: &'s Request<ReqBody>,
        cx: &'s mut Cx,
        io: &'s mut Io<'_>,
    ) -> Gating<'s> {
        self.inner.gate(req, cx, io)
    }

    fn check<'s: 'r, 'r>(
        &'s self,
        req: &'r mut Request<ReqBody>,
        cx: &'r mut Cx,
        io: &'r mut Io<'_>,
    ) -> Checking<'s, 'r> {
        self.inner.check(req, cx, io)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Meters `chain` as a site on the Caddy server `server`; `wrapped` as Caddy wraps it in a
/// subroute.
pub(crate) fn instrument(chain: &mut Chain, server: &str, wrapped: bool) {
    let series = if wrapped {
        vec![m::series(server, "subroute")]
    } else {
        let mut series = Vec::new();
        meter_routes(&mut chain.routes, server, &mut series);
        series
    };
    chain.metrics = Some(Arc::new(Meter { wrapped, series }));
}

fn meter_routes(list: &mut Routes, server: &str, series: &mut Vec<Arc<Series>>) {
    for route in list.routes.iter_mut().take(MAX_METERED) {
        let s = m::series(server, module(route.name));
        let bit = 1u64 << series.len();
        series.push(s.clone());
        let inner = std::mem::replace(&mut route.handler, Box::new(Exposition));
        route.handler = Box::new(Metered {
            inner,
            bit,
            series: s,
        });
    }
}

/// Caddy's approximate request size: URL, method, protocol, header names and values,
/// Host, and the declared body length.
fn request_size(req: &Request<ReqBody>) -> u64 {
    let proto = match req.version() {
        hyper::Version::HTTP_2 => "HTTP/2.0".len(),
        hyper::Version::HTTP_3 => "HTTP/3.0".len(),
        hyper::Version::HTTP_10 => "HTTP/1.0".len(),
        _ => "HTTP/1.1".len(),
    };
    let mut size = req.uri().to_string().len() + req.method().as_str().len() + proto;
    let mut host = 0;
    for (name, value) in req.headers() {
        if name == header::HOST {
            host = value.len();
            continue;
        }
        size += name.as_str().len() + value.len();
    }
    let body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    (size + host) as u64 + body
}

/// Runs `req` through `chain` under `meter`.
pub(crate) async fn run(
    chain: &Chain,
    meter: &Arc<Meter>,
    req: Request<ReqBody>,
    cx: &mut Cx,
    io: &mut Io<'_>,
) -> Response<Body> {
    let start = Instant::now();
    let method = m::method_index(req.method().as_str());
    let request_size = request_size(&req);
    if meter.wrapped {
        cx.metered = 1;
        meter.series[0].enter();
    }
    let response = chain.run_unmetered(req, cx, io).await;
    let ran = cx.metered;
    if ran == 0 {
        return response;
    }
    // An error the site's own handle_errors did not take is the handler's error in Caddy:
    // counted, without histograms. A subroute's handle_errors takes it inside. A proxy that
    // found no upstream to answer fails as Caddy's does.
    let failed = response.extensions().get::<UpstreamFailed>().is_some();
    if failed || cx.error.is_some() && (!meter.wrapped || chain.errors.is_none()) {
        meter.each(ran).for_each(Series::failed);
        return response;
    }
    let code = response.status();
    let ttfb = start.elapsed();
    for s in meter.each(ran) {
        s.first_byte(method, code.as_u16(), ttfb);
    }
    let (parts, body) = response.into_parts();
    let counted = Counted {
        inner: body,
        pending: Some(Pending {
            meter: meter.clone(),
            ran,
            method,
            code,
            start,
            request_size,
            bytes: 0,
        }),
    };
    Response::from_parts(parts, counted.boxed_unsync())
}

struct Pending {
    meter: Arc<Meter>,
    ran: u64,
    method: usize,
    code: StatusCode,
    start: Instant,
    request_size: u64,
    bytes: u64,
}

/// A response body that reports its size and end to the series that ran.
struct Counted {
    inner: Body,
    pending: Option<Pending>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            let observed = Observed {
                method: p.method,
                code: p.code.as_u16(),
                duration: p.start.elapsed(),
                request_size: p.request_size,
                response_size: p.bytes,
            };
            for s in p.meter.each(p.ran) {
                s.finish(&observed);
            }
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(p)) = (frame.data_ref(), this.pending.as_mut()) {
                    p.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_)) | None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
