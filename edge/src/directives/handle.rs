//! `handle [matcher] { ... }` and `handle_path PATH { ... }`: a block of directives (sorted
//! in directive order) for the requests its matcher takes. Sibling `handle`/`handle_path`
//! blocks exclude each other: only the first matching runs (the chain's groups).
//! `handle_path` strips its path prefix first.

use crate::body::ReqBody;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, RouteToml, Routes, Scope, Step};
use crate::context::Cx;

/// `handle` and `handle_path` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// For `handle_path`: the prefix taken off the path ("/api").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) strip_prefix: Option<String>,
    /// The block's routes.
    #[serde(default)]
    pub(crate) routes: Vec<RouteToml>,
}

pub(crate) fn parse(d: &Dir<'_>, s: &mut Scope, key: &str) -> Result<Toml, At> {
    if !d.args.is_empty() {
        return Err(d.err("takes a matcher and a block, no arguments"));
    }
    let strip_prefix = if d.name == "handle_path" {
        match d.matcher {
            Some(path) if path.starts_with('/') => {
                Some(path.trim_end_matches('*').trim_end_matches('/').to_owned())
            }
            _ => return Err(d.err("needs a path matcher (/prefix/*)")),
        }
    } else {
        None
    };
    let routes = super::parse_routes(d.block.unwrap_or_default(), s, &format!("{key}.routes"))?;
    Ok(Toml {
        strip_prefix,
        routes,
    })
}

pub(crate) fn build(t: &Toml, b: &mut Build<'_>, key: &str) -> Result<Box<dyn Handler>, BuildFail> {
    let routes =
        Routes::build(&t.routes, &format!("{key}.routes"), true, b).map_err(BuildFail::Nested)?;
    Ok(Box::new(Handle {
        strip: t.strip_prefix.clone(),
        routes,
    }))
}

/// A block of routes, walked in order; also `route`'s handler.
#[derive(Debug)]
pub(crate) struct Handle {
    pub(crate) strip: Option<String>,
    pub(crate) routes: Routes,
}

impl Handler for Handle {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        if let Some(prefix) = &self.strip
            && let Some(rest) = req.uri().path().strip_prefix(prefix.as_str())
        {
            let rest = rest.to_owned();
            let query = req.uri().query().map(str::to_owned);
            if !super::rewrite::set_target(req, cx, &rest, query.as_deref()) {
                return Step::Error(
                    hyper::http::StatusCode::BAD_REQUEST,
                    "handle_path made no valid target".into(),
                );
            }
        }
        Step::Descend(&self.routes)
    }

    fn describe(&self) -> String {
        let name = if self.strip.is_some() {
            "handle_path"
        } else {
            "handle"
        };
        format!("{name} {{ {} }}", self.routes.describe().join("; "))
    }
}
