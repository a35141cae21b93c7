//! `rewrite [matcher] TO`: changes the request's target inside the edge (the upstream and
//! later matchers see the new one; `{orig_uri}` keeps the old). As in Caddy, TO's part
//! before `?` replaces the path when not empty, and a `?` replaces the query.

use crate::body::ReqBody;
use hyper::http::uri::PathAndQuery;
use hyper::http::{Request, StatusCode, Uri};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step};
use crate::context::{Cx, Req};
use crate::files::OriginalUri;
use crate::placeholders::{QueryTemplate, Template};

/// `rewrite` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The new target ("/index.php?{query}"); placeholders allowed.
    pub(crate) to: String,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    match d.args {
        [to] => Ok(Toml { to: to.clone() }),
        _ => Err(d.err("rewrite [matcher] TO")),
    }
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    // As Caddy, the target is cut at its `?` before placeholders are rendered: a value
    // holding `?` stays in the path, and the query's values are escaped.
    let (path, query) = match t.to.split_once('?') {
        Some((p, q)) => (p, Some(QueryTemplate::parse(q, b.env)?)),
        None => (t.to.as_str(), None),
    };
    Ok(Box::new(Rewrite {
        path: Template::parse(path, b.env)?,
        query,
        text: t.to.clone(),
    }))
}

#[derive(Debug)]
struct Rewrite {
    path: Template,
    /// `None`: the query is kept.
    query: Option<QueryTemplate>,
    text: String,
}

/// Escapes what a request target cannot hold as is.
fn escape(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The target `to` renders to for `req`, as `rewrite` makes it: the part before `?` replaces
/// the path when not empty, a `?` replaces the query. For `reverse_proxy`'s `rewrite`, which
/// changes only what goes upstream.
pub(crate) fn target_of(to: &Template, req: Req<'_>, cx: &Cx) -> Option<PathAndQuery> {
    let to = to.render_target(req, cx);
    let (path, query) = match to.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (to.as_str(), req.uri.query()),
    };
    let path = if path.is_empty() {
        req.uri.path()
    } else {
        path
    };
    let mut target = escape(path, b"");
    if !target.starts_with('/') {
        target.insert(0, '/');
    }
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        target.push('?');
        target.push_str(&escape(q, b"?"));
    }
    target.parse().ok()
}

/// Sets the request's target to `path` and `query` (escaped as needed), keeping scheme and
/// authority. False when the result is no target.
pub(crate) fn set_target(
    req: &mut Request<ReqBody>,
    cx: &mut Cx,
    path: &str,
    query: Option<&str>,
) -> bool {
    let mut target = escape(path, b"");
    if !target.starts_with('/') {
        target.insert(0, '/');
    }
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        target.push('?');
        target.push_str(&escape(q, b"?"));
    }
    let Ok(pq) = target.parse::<PathAndQuery>() else {
        return false;
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq);
    let Ok(new) = Uri::from_parts(parts) else {
        return false;
    };
    let old = std::mem::replace(req.uri_mut(), new);
    if req.extensions().get::<OriginalUri>().is_none() {
        req.extensions_mut().insert(OriginalUri(old.clone()));
    }
    cx.rewritten(&old, req.uri())
}

impl Handler for Rewrite {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let path = self.path.render_target(Req::of(req), cx);
        let query = match &self.query {
            Some(q) => Some(q.render(Req::of(req), cx)),
            None => req.uri().query().map(str::to_owned),
        };
        let path = if path.is_empty() {
            req.uri().path().to_owned()
        } else {
            path
        };
        if set_target(req, cx, &path, query.as_deref()) {
            Step::Next
        } else {
            Step::Error(
                StatusCode::BAD_REQUEST,
                "rewrite made no valid target".into(),
            )
        }
    }

    fn describe(&self) -> String {
        format!("rewrite {}", self.text)
    }
}
