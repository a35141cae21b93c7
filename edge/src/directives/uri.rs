//! `uri [matcher] strip_prefix|strip_suffix|replace|path_regexp ...`: edits the request
//! path (and keeps the query).

use crate::body::ReqBody;
use hyper::http::{Request, StatusCode};
use regex_lite::Regex;
use serde::{Deserialize, Serialize};

use super::rewrite::set_target;
use super::{At, Build, BuildFail, Dir, Handler, Scope, Step};
use crate::context::Cx;

/// `uri` as TOML: one operation and its arguments.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// "strip_prefix", "strip_suffix", "replace" or "path_regexp".
    pub(crate) op: String,
    /// Its arguments: a prefix; a suffix; FIND REPLACE [LIMIT]; REGEXP REPLACEMENT.
    pub(crate) args: Vec<String>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    match d.args.split_first() {
        Some((op, args)) => Ok(Toml {
            op: op.clone(),
            args: args.to_vec(),
        }),
        None => Err(d.err("uri [matcher] strip_prefix|strip_suffix|replace|path_regexp ...")),
    }
}

#[derive(Debug)]
enum Op {
    StripPrefix(String),
    StripSuffix(String),
    Replace(String, String, Option<usize>),
    Regexp(Regex, String),
}

pub(crate) fn build(
    t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let op = match (t.op.as_str(), t.args.as_slice()) {
        ("strip_prefix", [p]) => {
            // Caddy adds the leading slash a prefix lacks.
            let p = if p.starts_with('/') {
                p.clone()
            } else {
                format!("/{p}")
            };
            Op::StripPrefix(p)
        }
        ("strip_suffix", [s]) => Op::StripSuffix(s.clone()),
        ("replace", [find, with]) => Op::Replace(find.clone(), with.clone(), None),
        ("replace", [find, with, limit]) => Op::Replace(
            find.clone(),
            with.clone(),
            Some(
                limit
                    .parse()
                    .map_err(|_| format!("{limit:?} is not a limit"))?,
            ),
        ),
        ("path_regexp", [re, with]) => Op::Regexp(
            Regex::new(re).map_err(|e| format!("regexp {re:?}: {e}"))?,
            with.clone(),
        ),
        (op, _) => {
            return Err(format!("{op:?} with these arguments is not supported").into());
        }
    };
    Ok(Box::new(Uri { op }))
}

#[derive(Debug)]
struct Uri {
    op: Op,
}

impl Handler for Uri {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let path = req.uri().path();
        let new = match &self.op {
            Op::StripPrefix(p) => match path.strip_prefix(p.as_str()) {
                Some(rest) => rest.to_owned(),
                None => return Step::Next,
            },
            Op::StripSuffix(s) => match path.strip_suffix(s.as_str()) {
                Some(rest) => rest.to_owned(),
                None => return Step::Next,
            },
            Op::Replace(find, with, limit) => match limit {
                Some(n) if *n > 0 => path.replacen(find.as_str(), with, *n),
                _ => path.replace(find.as_str(), with),
            },
            Op::Regexp(re, with) => re.replace_all(path, with.as_str()).into_owned(),
        };
        let query = req.uri().query().map(str::to_owned);
        if set_target(req, cx, &new, query.as_deref()) {
            Step::Next
        } else {
            Step::Error(StatusCode::BAD_REQUEST, "uri made no valid target".into())
        }
    }

    fn describe(&self) -> String {
        "uri".into()
    }
}
