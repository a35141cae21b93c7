//! `header`: changes response headers (set, `+`add, `?`default, `-`delete, `>`deferred,
//! find-and-replace with a regexp), also the parser of `reverse_proxy`'s `header_up` and
//! `header_down` lines.
//!
//! The edge applies every change on the way back, after the handler answered (Caddy's
//! `defer`), so a change always wins over the upstream's own header.

use std::collections::BTreeMap;

use crate::body::ReqBody;
use hyper::http::{Request, Response};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Carry, Dir, Handler, Scope, Step, at};
use crate::body::Body;
use crate::context::{Cx, Req};
use crate::header_ops::HeaderOps;

/// Header operations: set, add, delete, set-if-missing, replace.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeaderOpsToml {
    /// Replace these fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) set: BTreeMap<String, String>,
    /// Append these fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) add: BTreeMap<String, String>,
    /// Set these fields only when absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) default: BTreeMap<String, String>,
    /// Remove these fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) delete: Vec<String>,
    /// Find-and-replace: [field, regexp, replacement].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) replace: Vec<(String, String, String)>,
}

impl HeaderOpsToml {
    /// Whether no operation is given.
    pub(crate) fn is_empty(&self) -> bool {
        *self == HeaderOpsToml::default()
    }

    /// Compiles.
    pub(crate) fn build(&self, env: &labcore::Env) -> Result<HeaderOps, String> {
        HeaderOps::build(
            &self.set,
            &self.add,
            &self.default,
            &self.delete,
            &self.replace,
            env,
        )
    }

    /// One Caddyfile operation: `Name value`, `+Name value`, `?Name value`, `>Name value`,
    /// `-Name`, `Name regexp replacement`.
    pub(crate) fn add_op(&mut self, words: &[String], line: usize) -> Result<(), At> {
        let Some(field) = words.first() else {
            return Err(at(line, "header: a field is needed"));
        };
        let value = || match words {
            [_, v] => Ok(v.clone()),
            [_] => Err(at(line, format!("header {field} needs a value"))),
            _ => Err(at(line, format!("header {field}: too many arguments"))),
        };
        if let Some(name) = field.strip_prefix('-') {
            if words.len() != 1 {
                return Err(at(line, format!("header {field} takes no value")));
            }
            self.delete.push(name.to_owned());
        } else if let Some(name) = field.strip_prefix('+') {
            self.add.insert(name.to_owned(), value()?);
        } else if let Some(name) = field.strip_prefix('?') {
            self.default.insert(name.to_owned(), value()?);
        } else if let [_, search, with] = words {
            let name = field.trim_start_matches('>');
            self.replace
                .push((name.to_owned(), search.clone(), with.clone()));
        } else {
            // `>` defers; the edge defers every change anyway.
            let name = field.trim_start_matches('>');
            self.set.insert(name.to_owned(), value()?);
        }
        Ok(())
    }
}

/// `header` as TOML: response header operations, optionally for matching paths.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Only requests whose path matches (the TOML `[[site.header]]` form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<String>,
    /// The operations.
    #[serde(flatten)]
    pub(crate) ops: HeaderOpsToml,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let mut ops = HeaderOpsToml::default();
    if !d.args.is_empty() {
        ops.add_op(d.args, d.line)?;
    }
    for sub in d.block.unwrap_or_default() {
        if sub.block.is_some() {
            return Err(at(sub.line, "header: nested blocks are not supported"));
        }
        if sub.words.len() == 1 && sub.words[0] == "defer" {
            continue;
        }
        ops.add_op(&sub.words, sub.line)?;
    }
    if ops.is_empty() {
        return Err(d.err("needs a field to change"));
    }
    Ok(Toml { path: None, ops })
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    Ok(Box::new(Header {
        ops: t.ops.build(b.env)?,
    }))
}

#[derive(Debug)]
struct Header {
    ops: HeaderOps,
}

impl Handler for Header {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        Step::Leave(Carry::Values(self.ops.render(Req::of(req), cx)))
    }

    fn leave(&self, carry: Carry, _cx: &Cx, response: &mut Response<Body>) {
        let values = match carry {
            Carry::Values(v) => v,
            _ => Vec::new(),
        };
        self.ops.apply(response.headers_mut(), &values);
    }

    fn describe(&self) -> String {
        "header".into()
    }
}
