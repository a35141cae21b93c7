//! `vars [matcher] NAME VALUE` or `vars { NAME VALUE ... }`: sets request variables for
//! `{vars.NAME}` placeholders.

use std::collections::BTreeMap;

use crate::body::ReqBody;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step, at};
use crate::context::{Cx, Req};
use crate::placeholders::Template;

/// `vars` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Name -> value (placeholders allowed).
    pub(crate) vars: BTreeMap<String, String>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let mut vars = BTreeMap::new();
    match d.args {
        [] => {}
        [name, value] => {
            vars.insert(name.clone(), value.clone());
        }
        _ => return Err(d.err("vars [matcher] NAME VALUE")),
    }
    for sub in d.block.unwrap_or_default() {
        match sub.words.as_slice() {
            [name, value] if sub.block.is_none() => {
                vars.insert(name.clone(), value.clone());
            }
            _ => return Err(at(sub.line, "vars: lines are NAME VALUE")),
        }
    }
    if vars.is_empty() {
        return Err(d.err("sets no variable"));
    }
    Ok(Toml { vars })
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let vars = t
        .vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), Template::parse(v, b.env)?)))
        .collect::<Result<_, String>>()?;
    Ok(Box::new(Vars { vars }))
}

#[derive(Debug)]
struct Vars {
    vars: Vec<(String, Template)>,
}

impl Handler for Vars {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        for (name, value) in &self.vars {
            let value = value.render(Req::of(req), cx);
            cx.set_var(name, value);
        }
        Step::Next
    }

    fn describe(&self) -> String {
        "vars".into()
    }
}
