//! `request_header [matcher] [+|-|?]FIELD [VALUE | FIND REPLACE]`: changes a header of the
//! request as it goes on through the chain (to `reverse_proxy`, `php_fastcgi`), with the same
//! operations as `header`. Caddy's pattern for copying what an auth server answered onto the
//! request: `request_header Remote-User {http.reverse_proxy.header.Remote-User}` inside
//! `handle_response`.

use crate::body::ReqBody;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::header::HeaderOpsToml;
use super::{At, Build, BuildFail, Dir, Handler, Scope, Step};
use crate::context::{Cx, Req};
use crate::header_ops::HeaderOps;

/// `request_header` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The changes.
    #[serde(flatten)]
    pub(crate) ops: HeaderOpsToml,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    if d.args.is_empty() {
        return Err(d.err("request_header [matcher] [+|-]FIELD [VALUE]"));
    }
    let mut ops = HeaderOpsToml::default();
    ops.add_op(d.args, d.line)?;
    Ok(Toml { ops })
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    Ok(Box::new(RequestHeader {
        ops: t.ops.build(b.env)?,
    }))
}

#[derive(Debug)]
struct RequestHeader {
    ops: HeaderOps,
}

impl Handler for RequestHeader {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let rendered = self.ops.render(Req::of(req), cx);
        self.ops.apply(req.headers_mut(), &rendered);
        Step::Next
    }

    fn describe(&self) -> String {
        "request_header".into()
    }
}
