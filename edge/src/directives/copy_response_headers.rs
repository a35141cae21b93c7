//! `copy_response_headers { include FIELDS | exclude FIELDS }`, only inside `reverse_proxy`'s
//! `handle_response`: adds the handled upstream response's header fields (all, the included
//! or all but the excluded) to whatever answers the request. It adds, as Caddy does, but
//! not a value the answer has already: with `copy_response`, which copies every field
//! itself, Caddy 2.6 sends each field twice (two Content-Length, two Location), the edge once.

use crate::body::ReqBody;
use hyper::http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Carry, Dir, Handler, Scope, Step, at};
use crate::body::Body;
use crate::context::Cx;

/// `copy_response_headers` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Only these fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) include: Vec<String>,
    /// All but these fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) exclude: Vec<String>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let mut t = Toml::default();
    let mut words: Vec<(String, Vec<String>, usize)> = Vec::new();
    if let Some((first, rest)) = d.args.split_first() {
        words.push((first.clone(), rest.to_vec(), d.line));
    }
    for sub in d.block.unwrap_or_default() {
        if let Some((first, rest)) = sub.words.split_first() {
            words.push((first.clone(), rest.to_vec(), sub.line));
        }
    }
    for (name, fields, line) in words {
        match name.as_str() {
            "include" => t.include.extend(fields),
            "exclude" => t.exclude.extend(fields),
            other => {
                return Err(at(
                    line,
                    format!("copy_response_headers: {other:?} is not include or exclude"),
                ));
            }
        }
    }
    if !t.include.is_empty() && !t.exclude.is_empty() {
        return Err(d.err("include and exclude cannot both be given"));
    }
    Ok(t)
}

pub(crate) fn build(
    t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let names = |list: &[String]| {
        list.iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is no header name"))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(Box::new(CopyHeaders {
        include: names(&t.include)?,
        exclude: names(&t.exclude)?,
    }))
}

#[derive(Debug)]
struct CopyHeaders {
    include: Vec<HeaderName>,
    exclude: Vec<HeaderName>,
}

impl Handler for CopyHeaders {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let Some(proxied) = &cx.proxied else {
            return Step::Error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "copy_response_headers outside reverse_proxy's handle_response".into(),
            );
        };
        let mut copied = HeaderMap::new();
        for (name, value) in &proxied.headers {
            if (!self.include.is_empty() && !self.include.contains(name))
                || self.exclude.contains(name)
            {
                continue;
            }
            copied.append(name.clone(), value.clone());
        }
        Step::Leave(Carry::Headers(copied))
    }

    fn leave(&self, carry: Carry, _cx: &Cx, response: &mut Response<Body>) {
        if let Carry::Headers(copied) = carry {
            for (name, value) in &copied {
                let headers = response.headers_mut();
                if !headers.get_all(name).iter().any(|v| v == value) {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
    }

    fn describe(&self) -> String {
        "copy_response_headers".into()
    }
}
