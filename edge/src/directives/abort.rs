//! `abort [matcher]`: closes the connection without answering.

use crate::body::ReqBody;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step};
use crate::context::Cx;

/// `abort` as TOML: no options.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    if !d.args.is_empty() {
        return Err(d.err("takes no arguments"));
    }
    Ok(Toml {})
}

pub(crate) fn build(
    _t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    Ok(Box::new(Abort))
}

#[derive(Debug)]
struct Abort;

impl Handler for Abort {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, _cx: &mut Cx) -> Step<'s> {
        Step::Abort
    }

    fn describe(&self) -> String {
        "abort".into()
    }
}
