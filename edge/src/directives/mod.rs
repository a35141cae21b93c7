//! The directives, one module each (as Caddy's `modules/caddyhttp/<directive>/`): each holds
//! its Caddyfile parsing (`parse`), its TOML config type (`Toml`, so `edge adapt` prints
//! it and a TOML file can say the same), and its compiled runtime handler (`build` gives a
//! [`Handler`]). The [`registry!`] below lists them in Caddy 2.6's directive order: a new
//! directive is one module and one line there.
//!
//! A site's directives compile into a [`Chain`]: routes (a matcher set and a handler),
//! sorted as Caddy sorts them (directive order, then longer path matchers first, then routes
//! with a matcher before those without; file order otherwise). A request walks the routes:
//! a handler whose matcher matches either changes the request and lets it go on (`rewrite`,
//! `vars`), registers itself for the way back (`header`, `encode`), descends into a nested
//! route list (`handle`, `route`), checks it (`basic_auth`; `forward_auth` and
//! `handle_response` ask an upstream, then let it go on, answer, or descend into routes for
//! the upstream's answer), answers (`respond`, `redir`) or serves it (`reverse_proxy`,
//! `php_fastcgi`, which own the request from then on). `handle` and `handle_path` siblings form a group of
//! which only the first matching runs. A request no handler answers gets Caddy's empty 200.
//! `error` and failures go to the site's `handle_errors` routes.
//!
//! Invariants: every directive not in the registry is refused when the config loads, with
//! the file, line and its name; a chain never re-validates its configuration per request.

mod abort;
mod basic_auth;
mod copy_response;
mod copy_response_headers;
mod encode;
mod error;
mod file_server;
mod forward_auth;
mod handle;
mod header;
pub(crate) mod map;
pub(crate) mod metrics;
mod php_fastcgi;
mod rate_limit;
mod redir;
mod request_body;
mod request_header;
mod respond;
mod reverse_proxy;
mod rewrite;
mod root;
mod route;
mod try_files;
mod uri;
mod vars;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::body::ReqBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::http::{HeaderValue, Request, Response, StatusCode};
use labcore::Env;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::Body;
use crate::context::{Cx, Req};
use crate::encode::Encoding;
use crate::matchers::{MatcherSet, MatcherToml};
use crate::proxy::Client;

pub(crate) use basic_auth::Toml as BasicAuthToml;
pub(crate) use encode::Toml as EncodeToml;
pub(crate) use header::Toml as HeaderToml;
pub(crate) use redir::Toml as RedirToml;
pub(crate) use reverse_proxy::Toml as ProxyToml;

/// One Caddyfile line: its words, its line (a location the Caddyfile front end can name),
/// and the block it opens.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    /// The words, quotes removed.
    pub(crate) words: Vec<String>,
    /// Where it is.
    pub(crate) line: usize,
    /// The lines of its block.
    pub(crate) block: Option<Vec<Line>>,
}

/// A Caddyfile problem at a line.
#[derive(Debug)]
pub(crate) struct At {
    /// Where.
    pub(crate) line: usize,
    /// What.
    pub(crate) message: String,
}

/// An error at `line`.
pub(crate) fn at(line: usize, message: impl Into<String>) -> At {
    At {
        line,
        message: message.into(),
    }
}

/// A directive's line as its parser sees it: the matcher token is already taken off.
#[derive(Debug)]
pub(crate) struct Dir<'a> {
    /// The directive's name.
    pub(crate) name: &'a str,
    /// Its matcher token, if any.
    pub(crate) matcher: Option<&'a str>,
    /// Its arguments after the matcher.
    pub(crate) args: &'a [String],
    /// Its block's lines.
    pub(crate) block: Option<&'a [Line]>,
    /// Where it is.
    pub(crate) line: usize,
}

impl Dir<'_> {
    /// An error at this directive.
    pub(crate) fn err(&self, message: impl fmt::Display) -> At {
        at(self.line, format!("{}: {message}", self.name))
    }

    /// Refuses a block.
    pub(crate) fn no_block(&self) -> Result<(), At> {
        match self.block {
            Some(_) => Err(self.err("takes no block")),
            None => Ok(()),
        }
    }
}

/// What parsing a block of directives shares: the site's named matchers and where each
/// TOML key came from.
#[derive(Debug, Default)]
pub(crate) struct Scope {
    /// Named matchers, without their `@`.
    pub(crate) matchers: BTreeMap<String, MatcherToml>,
    /// TOML key prefix -> line.
    pub(crate) lines: BTreeMap<String, usize>,
}

/// One route as TOML: a directive, and which requests it applies to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RouteToml {
    /// "@name" (a named matcher of the site), or a path ("/api/*", "*.php", "*").
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub(crate) matcher: Option<String>,
    /// The directive and its options.
    #[serde(flatten)]
    pub(crate) directive: DirectiveToml,
}

/// A handler's state carried to the way back.
#[derive(Debug)]
pub(crate) enum Carry {
    /// The encoding negotiated with the client.
    Encoding(Encoding),
    /// Values rendered on the way in.
    Values(Vec<HeaderValue>),
    /// Header fields to add to the response.
    Headers(hyper::http::HeaderMap),
}

/// What a handler does with a request on the way in.
pub(crate) enum Step<'s> {
    /// Go on to the next route.
    Next,
    /// Go on, and call [`Handler::leave`] with this on the way back.
    Leave(Carry),
    /// Answer with this.
    Respond(Response<Body>),
    /// Walk these routes, then go on after this one.
    Descend(&'s Routes),
    /// Hand the request to [`Handler::serve`].
    Serve,
    /// Await [`Handler::gate`]: it answers, or lets the request go on.
    Gate,
    /// Await [`Handler::check`]: it answers, lets the request go on, or descends.
    Check,
    /// Fail with this status (to `handle_errors`).
    Error(StatusCode, String),
    /// Fail with this status, and call [`Handler::leave`] with this on the way back (after
    /// `handle_errors`), as a handler that sets response fields before failing.
    Fail(StatusCode, String, Carry),
    /// Close the connection without answering.
    Abort,
}

/// What serving handlers need besides the request: the upstream client, the owner of
/// upgraded connections, and the access log record.
pub(crate) struct Io<'a> {
    /// The upstream client.
    pub(crate) client: &'a Client,
    /// Owner of upgraded connections' tasks.
    pub(crate) tasks: &'a TaskTracker,
    /// Cancelled when upgraded connections must end.
    pub(crate) stop: &'a CancellationToken,
    /// Kept alive by an upgraded connection (the client connection's permit).
    pub(crate) hold: Arc<dyn Send + Sync>,
    /// The client address as an X-Forwarded-For value.
    pub(crate) forwarded_for: &'a HeaderValue,
    /// Set by `basic_auth`: the user let in, for the access log.
    pub(crate) user: Option<String>,
    /// Set by `reverse_proxy`: the upstream that answered, for the access log.
    pub(crate) upstream: Option<Arc<crate::proxy::Upstream>>,
}

/// A boxed future of a response.
pub(crate) type Serving<'a> = Pin<Box<dyn Future<Output = Response<Body>> + Send + 'a>>;

/// A boxed future of an optional response.
pub(crate) type Gating<'a> = Pin<Box<dyn Future<Output = Option<Response<Body>>> + Send + 'a>>;

/// What [`Handler::check`] decided.
pub(crate) enum Checked<'s> {
    /// Go on to the next route.
    Pass,
    /// Answer with this.
    Respond(Response<Body>),
    /// Walk these routes, then go on after this one.
    Descend(&'s Routes),
}

/// A boxed future of a [`Checked`]; it borrows the request for `'r` only, while what it
/// descends into lives as long as the chain (`'s`).
pub(crate) type Checking<'s, 'r> = Pin<Box<dyn Future<Output = Checked<'s>> + Send + 'r>>;

/// A compiled directive.
pub(crate) trait Handler: fmt::Debug + Send + Sync {
    /// On the way in: change the request or the context, or say how to go on.
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s>;

    /// On the way back (after [`Step::Leave`]).
    fn leave(&self, _carry: Carry, _cx: &Cx, _response: &mut Response<Body>) {}

    /// Serves the request (after [`Step::Serve`]).
    fn serve<'s>(
        &'s self,
        _req: Request<ReqBody>,
        _cx: &'s mut Cx,
        _io: &'s mut Io<'_>,
    ) -> Serving<'s> {
        Box::pin(async { empty(StatusCode::INTERNAL_SERVER_ERROR) })
    }

    /// Checks the request (after [`Step::Gate`]): `Some` answers it.
    fn gate<'s>(
        &'s self,
        _req: &'s Request<ReqBody>,
        _cx: &'s mut Cx,
        _io: &'s mut Io<'_>,
    ) -> Gating<'s> {
        Box::pin(async { None })
    }

    /// Checks and may change the request (after [`Step::Check`]), e.g. by asking another
    /// server about it (`forward_auth`).
    fn check<'s: 'r, 'r>(
        &'s self,
        _req: &'r mut Request<ReqBody>,
        _cx: &'r mut Cx,
        _io: &'r mut Io<'_>,
    ) -> Checking<'s, 'r> {
        Box::pin(async { Checked::Pass })
    }

    /// One line for `edge check`: the directive and what it does.
    fn describe(&self) -> String;
}

/// A response with no body.
pub(crate) fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync());
    *response.status_mut() = status;
    response
}

/// What compiling a site's routes needs.
pub(crate) struct Build<'a> {
    /// Named matchers.
    pub(crate) matchers: &'a BTreeMap<String, MatcherToml>,
    /// The environment, for `{env.X}`.
    pub(crate) env: &'a Env,
    /// The site's addresses, naming it across reloads (`rate_limit` keeps its counters).
    pub(crate) site: String,
    /// Where `order` puts directives.
    pub(crate) order: Order,
    next_group: u32,
}

impl<'a> Build<'a> {
    /// A builder for the site at `site` (its addresses).
    pub(crate) fn new(
        matchers: &'a BTreeMap<String, MatcherToml>,
        env: &'a Env,
        site: String,
        order: Order,
    ) -> Build<'a> {
        crate::placeholders::start_site(env);
        Build {
            matchers,
            env,
            site,
            order,
            next_group: 0,
        }
    }
}

/// The global `order` option: where a directive outside Caddy's standard order sorts. Only
/// `rate_limit` can be placed (Caddy's own directives keep their order); without it,
/// `rate_limit` sorts before `basic_auth`, the plugin's own default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Order {
    /// `rate_limit`'s sort key on [`DirectiveToml::position`]'s scale.
    rate_limit: Option<usize>,
}

impl Order {
    /// Applies one `order NAME before|after OTHER` or `order NAME first|last` (words).
    pub(crate) fn place(&mut self, words: &[&str]) -> Result<(), String> {
        let index = |other: &str| {
            DIRECTIVES
                .iter()
                .position(|n| *n == canonical(other))
                .ok_or_else(|| format!("order: unknown directive {other:?}"))
        };
        let at = match words {
            ["rate_limit", "first"] => 0,
            ["rate_limit", "last"] => 2 * DIRECTIVES.len() + 2,
            ["rate_limit", "before", other] => 2 * index(other)?,
            ["rate_limit", "after", other] => 2 * index(other)? + 2,
            [name, ..] if *name != "rate_limit" && DIRECTIVES.contains(&canonical(name)) => {
                return Err(format!(
                    "order: {name} keeps Caddy 2.6's place; only rate_limit can be ordered"
                ));
            }
            _ => {
                return Err(
                    "order: write order rate_limit before|after DIRECTIVE, or first|last".into(),
                );
            }
        };
        if self.rate_limit.replace(at).is_some() {
            return Err("order: rate_limit is ordered twice".into());
        }
        Ok(())
    }
}

/// A compile error: the TOML key of the route at fault and the message.
#[derive(Debug)]
pub(crate) struct BuildError {
    /// Key relative to the list compiled ("route[3].routes[0]").
    pub(crate) key: String,
    /// What is wrong.
    pub(crate) message: String,
}

struct Route {
    matcher: Option<MatcherSet>,
    group: Option<u32>,
    handler: Box<dyn Handler>,
    /// The directive's name (for the `handler` label of request metrics).
    name: &'static str,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("group", &self.group)
            .field("handler", &self.handler)
            .finish()
    }
}

/// A compiled list of routes.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    routes: Vec<Route>,
}

/// Groups a route list may hold (a bit each in the walk's mask).
const MAX_GROUPS: u32 = 128;

impl Routes {
    /// Compiles `routes` (keys named from `key`); `sort` applies Caddy's directive order.
    pub(crate) fn build(
        routes: &[RouteToml],
        key: &str,
        sort: bool,
        b: &mut Build<'_>,
    ) -> Result<Routes, BuildError> {
        let mut order: Vec<usize> = (0..routes.len()).collect();
        let mut compiled: Vec<Option<Route>> = Vec::new();
        let mut paths = Vec::new();
        // `map` runs first (directive order), so what it defines is known to all its siblings
        // and what they hold, whatever the file order.
        for route in routes {
            if let DirectiveToml::Map(t) = &route.directive {
                crate::placeholders::allow_mapped(&t.destinations);
            }
        }
        for (i, route) in routes.iter().enumerate() {
            let k = format!("{key}[{i}]");
            let fail = |message: String| BuildError {
                key: k.clone(),
                message,
            };
            let (matcher, name) = match route.matcher.as_deref() {
                None | Some("*") => (None, String::new()),
                Some(m) => match m.strip_prefix('@') {
                    Some(name) => {
                        let toml = b
                            .matchers
                            .get(name)
                            .ok_or_else(|| fail(format!("no matcher named @{name}")))?;
                        (Some(toml.clone()), name.to_owned())
                    }
                    None => (Some(MatcherToml::path(m)), String::new()),
                },
            };
            let matcher = match matcher {
                Some(toml) => Some(MatcherSet::build(&toml, &name).map_err(&fail)?),
                None => None,
            };
            paths.push(matcher.as_ref().map(|m| (m.first_path(), !m.is_empty())));
            let handler = route.directive.build(b, &k).map_err(|e| match e {
                Nested(e) => e,
                Plain(m) => fail(format!("{}: {m}", route.directive.name())),
            })?;
            compiled.push(Some(Route {
                matcher,
                group: None,
                handler,
                name: route.directive.name(),
            }));
        }
        if sort {
            // Stable: equal keys keep file order.
            order.sort_by_key(|&i| {
                let path = paths[i].and_then(|(p, _)| p);
                let has_matcher = paths[i].is_some_and(|(_, m)| m);
                (
                    routes[i].directive.position(&b.order),
                    std::cmp::Reverse(path.unwrap_or(0)),
                    !has_matcher,
                )
            });
            // handle and handle_path blocks at one level are mutually exclusive.
            if routes.iter().any(|r| r.directive.is_exclusive()) {
                let group = b.next_group;
                b.next_group += 1;
                if group >= MAX_GROUPS {
                    return Err(BuildError {
                        key: key.to_owned(),
                        message: format!("more than {MAX_GROUPS} handle groups in one site"),
                    });
                }
                for (i, route) in routes.iter().enumerate() {
                    if route.directive.is_exclusive()
                        && let Some(Some(r)) = compiled.get_mut(i)
                    {
                        r.group = Some(group);
                    }
                }
            }
        }
        Ok(Routes {
            routes: order
                .into_iter()
                .filter_map(|i| compiled[i].take())
                .collect(),
        })
    }

    /// One line per route for `edge check`.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.routes.iter().map(|r| r.handler.describe()).collect()
    }
}

/// A site's compiled handlers: its routes and its `handle_errors` routes.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    /// The routes.
    pub(crate) routes: Routes,
    /// The error routes.
    pub(crate) errors: Option<Routes>,
    /// Request metrics (`servers { metrics }`); `None` costs a request one branch.
    pub(crate) metrics: Option<Arc<metrics::Meter>>,
}

enum Ended<'s> {
    Response(Response<Body>),
    Serve(&'s dyn Handler),
    Error(StatusCode, String),
    Abort,
    Fell,
}

/// Set on a response whose connection must close without an answer (`abort`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Aborted;

async fn walk<'s>(
    start: &'s Routes,
    req: &mut Request<ReqBody>,
    cx: &mut Cx,
    io: &mut Io<'_>,
    leaves: &mut Vec<(&'s dyn Handler, Carry)>,
) -> Ended<'s> {
    let mut stack: Vec<(&'s Routes, usize)> = Vec::new();
    let mut current = start;
    let mut i = 0;
    let mut groups: u128 = 0;
    loop {
        let Some(route) = current.routes.get(i) else {
            match stack.pop() {
                Some((routes, next)) => {
                    current = routes;
                    i = next;
                    continue;
                }
                None => return Ended::Fell,
            }
        };
        i += 1;
        if let Some(g) = route.group
            && groups & (1 << g) != 0
        {
            continue;
        }
        if let Some(m) = &route.matcher
            && !m.matches(Req::of(req), cx)
        {
            continue;
        }
        if let Some(g) = route.group {
            groups |= 1 << g;
        }
        match route.handler.enter(req, cx) {
            Step::Next => {}
            Step::Leave(carry) => leaves.push((&*route.handler, carry)),
            Step::Respond(response) => return Ended::Response(response),
            Step::Descend(routes) => {
                stack.push((current, i));
                current = routes;
                i = 0;
            }
            Step::Serve => return Ended::Serve(&*route.handler),
            Step::Gate => {
                if let Some(response) = route.handler.gate(req, cx, io).await {
                    return Ended::Response(response);
                }
            }
            Step::Check => match route.handler.check(req, cx, io).await {
                Checked::Pass => {}
                Checked::Respond(response) => return Ended::Response(response),
                Checked::Descend(routes) => {
                    stack.push((current, i));
                    current = routes;
                    i = 0;
                }
            },
            Step::Error(status, message) => return Ended::Error(status, message),
            Step::Fail(status, message, carry) => {
                leaves.push((&*route.handler, carry));
                return Ended::Error(status, message);
            }
            Step::Abort => return Ended::Abort,
        }
    }
}

impl Chain {
    /// Runs `req` through the chain.
    pub(crate) async fn run(
        &self,
        req: Request<ReqBody>,
        cx: &mut Cx,
        io: &mut Io<'_>,
    ) -> Response<Body> {
        match &self.metrics {
            None => self.run_unmetered(req, cx, io).await,
            Some(meter) => Box::pin(metrics::run(self, meter, req, cx, io)).await,
        }
    }

    /// Runs `req` through the chain without counting it.
    pub(crate) async fn run_unmetered(
        &self,
        mut req: Request<ReqBody>,
        cx: &mut Cx,
        io: &mut Io<'_>,
    ) -> Response<Body> {
        let mut leaves = Vec::new();
        let ended = walk(&self.routes, &mut req, cx, io, &mut leaves).await;
        let mut response = match ended {
            Ended::Response(r) => r,
            Ended::Serve(handler) => handler.serve(req, cx, io).await,
            Ended::Fell => empty(StatusCode::OK),
            Ended::Abort => return aborted(),
            Ended::Error(status, message) => {
                cx.error = Some((status.as_u16(), message));
                match &self.errors {
                    None => empty(status),
                    Some(errors) => {
                        // Error routes answer through what the failed routes set up, as
                        // Caddy's keep the header changes made before the error.
                        match walk(errors, &mut req, cx, io, &mut leaves).await {
                            Ended::Response(r) => r,
                            Ended::Serve(handler) => handler.serve(req, cx, io).await,
                            Ended::Abort => return aborted(),
                            Ended::Fell | Ended::Error(..) => empty(status),
                        }
                    }
                }
            }
        };
        for (handler, carry) in leaves.into_iter().rev() {
            handler.leave(carry, cx, &mut response);
        }
        response
    }

    /// One line per top-level route for `edge check`.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.routes.describe()
    }
}

fn aborted() -> Response<Body> {
    let mut response = empty(StatusCode::BAD_REQUEST);
    response.extensions_mut().insert(Aborted);
    response
}

/// Why a directive did not compile.
pub(crate) enum BuildFail {
    /// A nested route failed (its key is already full).
    Nested(BuildError),
    /// The directive itself.
    Plain(String),
}

use BuildFail::{Nested, Plain};

impl From<String> for BuildFail {
    fn from(message: String) -> BuildFail {
        Plain(message)
    }
}

/// The directive registry, in Caddy 2.6's directive order: name, TOML variant, module.
macro_rules! registry {
    ($($name:literal => $variant:ident($module:ident) $(exclusive $ex:literal)?),* $(,)?) => {
        /// A directive and its options, as TOML (`directive = "NAME"`).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "directive")]
        pub(crate) enum DirectiveToml {
            $(
                #[doc = concat!("`", $name, "`")]
                #[serde(rename = $name)]
                $variant($module::Toml),
            )*
        }

        impl DirectiveToml {
            /// Its Caddyfile name.
            pub(crate) fn name(&self) -> &'static str {
                match self { $(DirectiveToml::$variant(_) => $name,)* }
            }

            /// Its place in the directive order: twice its index plus one, so that `order`
            /// can put `rate_limit` between two others.
            fn position(&self, order: &Order) -> usize {
                let name = self.name();
                if let ("rate_limit", Some(at)) = (name, order.rate_limit) {
                    return at;
                }
                // handle_path sorts with handle: they form one group.
                let name = if name == "handle_path" { "handle" } else { name };
                DIRECTIVES
                    .iter()
                    .position(|n| *n == name)
                    .map_or(usize::MAX, |i| 2 * i + 1)
            }

            /// Whether siblings of this kind exclude each other (handle, handle_path).
            fn is_exclusive(&self) -> bool {
                match self { $(DirectiveToml::$variant(_) => false $(|| $ex)?,)* }
            }

            fn build(&self, b: &mut Build<'_>, key: &str) -> Result<Box<dyn Handler>, BuildFail> {
                match self { $(DirectiveToml::$variant(t) => $module::build(t, b, key),)* }
            }
        }

        /// The names, in order.
        pub(crate) const DIRECTIVES: &[&str] = &[$($name),*];

        /// Parses a directive by name; `None` when there is no such directive.
        fn parse_named(
            name: &str,
            d: &Dir<'_>,
            s: &mut Scope,
            key: &str,
        ) -> Option<Result<DirectiveToml, At>> {
            match name {
                $($name => Some($module::parse(d, s, key).map(DirectiveToml::$variant)),)*
                _ => None,
            }
        }
    };
}

registry! {
    "map" => Map(map),
    "vars" => Vars(vars),
    "root" => Root(root),
    "header" => Header(header),
    "copy_response_headers" => CopyResponseHeaders(copy_response_headers),
    "request_body" => RequestBody(request_body),
    "redir" => Redir(redir),
    "rewrite" => Rewrite(rewrite),
    "uri" => Uri(uri),
    "try_files" => TryFiles(try_files),
    "rate_limit" => RateLimit(rate_limit),
    "basic_auth" => BasicAuth(basic_auth),
    "forward_auth" => ForwardAuth(forward_auth),
    "request_header" => RequestHeader(request_header),
    "encode" => Encode(encode),
    "handle" => Handle(handle) exclusive true,
    "handle_path" => HandlePath(handle) exclusive true,
    "route" => Route(route),
    "abort" => Abort(abort),
    "error" => Error(error),
    "copy_response" => CopyResponse(copy_response),
    "respond" => Respond(respond),
    "metrics" => Metrics(metrics),
    "reverse_proxy" => ReverseProxy(reverse_proxy),
    "php_fastcgi" => PhpFastcgi(php_fastcgi),
    "file_server" => FileServer(file_server),
}

/// Caddy's other names for directives.
fn canonical(name: &str) -> &str {
    match name {
        "basicauth" => "basic_auth",
        other => other,
    }
}

/// Whether a token is a matcher: `@name`, a path, or `*`.
pub(crate) fn is_matcher(word: &str) -> bool {
    word.starts_with('@') || word.starts_with('/') || word == "*"
}

/// Parses a block of directives and matcher definitions into routes; TOML keys are named
/// from `key` ("site[0].route"). `handle_errors` is the caller's.
pub(crate) fn parse_routes(lines: &[Line], s: &mut Scope, key: &str) -> Result<Vec<RouteToml>, At> {
    let mut routes = Vec::new();
    for line in lines {
        let Some(first) = line.words.first() else {
            return Err(at(
                line.line,
                "a block must open at the end of a directive's line",
            ));
        };
        if let Some(name) = first.strip_prefix('@') {
            define_matcher(name, line, s)?;
            continue;
        }
        let name = canonical(first);
        let rest = &line.words[1..];
        let (matcher, args) = match rest.first() {
            // Caddy's try_files takes no matcher: a first file `/index.html` is a file.
            Some(m)
                if is_matcher(m)
                    && name != "try_files"
                    && !(name == "redir" && redir::target_only(rest)) =>
            {
                (Some(m.clone()), &rest[1..])
            }
            _ => (None, rest),
        };
        let k = format!("{key}[{}]", routes.len());
        s.lines.insert(k.clone(), line.line);
        let d = Dir {
            name,
            matcher: matcher.as_deref(),
            args,
            block: line.block.as_deref(),
            line: line.line,
        };
        let directive = match parse_named(name, &d, s, &k) {
            Some(parsed) => parsed?,
            None if name == "templates" => {
                return Err(at(
                    line.line,
                    "templates is not supported: it runs Go's text/template language, with \
                     Caddy's functions, over responses; serve pages rendered ahead of time \
                     (see man edge-caddyfile)",
                ));
            }
            None => {
                return Err(at(
                    line.line,
                    format!("unsupported directive {first:?} (see man edge-caddyfile)"),
                ));
            }
        };
        routes.push(RouteToml { matcher, directive });
    }
    Ok(routes)
}

/// `@name matcher args` or `@name { matcher lines }`.
fn define_matcher(name: &str, line: &Line, s: &mut Scope) -> Result<(), At> {
    if name.is_empty() {
        return Err(at(line.line, "a named matcher needs a name after @"));
    }
    let mut toml = MatcherToml::default();
    let words = &line.words[1..];
    match (&line.block, words) {
        (None, []) => return Err(at(line.line, format!("matcher @{name} matches nothing"))),
        (None, words) => {
            // `@name /path` and `@name *.php` are path matchers, as in Caddy.
            let words: Vec<String> = if is_matcher(&words[0]) || words[0].starts_with('*') {
                std::iter::once("path".to_owned())
                    .chain(words.iter().cloned())
                    .collect()
            } else if words.len() == 1 && !is_known_matcher(&words[0]) {
                // `@name `CEL`` is short for `@name expression CEL`.
                vec!["expression".to_owned(), words[0].clone()]
            } else {
                words.to_vec()
            };
            toml.add_line(&words, None)
                .map_err(|m| at(line.line, format!("matcher @{name}: {m}")))?;
        }
        (Some(block), []) => {
            for sub in block {
                let inner: Option<Vec<Vec<String>>> = sub
                    .block
                    .as_ref()
                    .map(|b| b.iter().map(|l| l.words.clone()).collect());
                toml.add_line(&sub.words, inner.as_deref())
                    .map_err(|m| at(sub.line, format!("matcher @{name}: {m}")))?;
            }
        }
        (Some(block), words) if is_known_matcher(&words[0]) => {
            // `@name file { ... }`, `@name not { ... }`: one matcher with its block.
            let inner: Vec<Vec<String>> = block.iter().map(|l| l.words.clone()).collect();
            toml.add_line(words, Some(&inner))
                .map_err(|m| at(line.line, format!("matcher @{name}: {m}")))?;
        }
        (Some(_), _) => {
            return Err(at(
                line.line,
                format!("matcher @{name}: a block or arguments, not both"),
            ));
        }
    }
    if s.matchers.contains_key(name) {
        return Err(at(line.line, format!("matcher @{name} is defined twice")));
    }
    s.matchers.insert(name.to_owned(), toml);
    Ok(())
}

fn is_known_matcher(word: &str) -> bool {
    matches!(
        word,
        "path"
            | "path_regexp"
            | "host"
            | "method"
            | "header"
            | "header_regexp"
            | "query"
            | "remote_ip"
            | "client_ip"
            | "protocol"
            | "not"
            | "expression"
            | "file"
            | "vars"
            | "vars_regexp"
    )
}

/// Parses a status code.
pub(crate) fn status(text: &str) -> Result<StatusCode, String> {
    text.parse::<u16>()
        .ok()
        .and_then(|n| StatusCode::from_u16(n).ok())
        .ok_or_else(|| format!("{text:?} is not a status code"))
}
