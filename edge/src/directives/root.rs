//! `root [matcher] PATH`: the site root later directives (`file_server`, `try_files`) use;
//! as in Caddy, it is the variable `root` (`{vars.root}`).

use hyper::body::Incoming;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step};
use crate::context::{Cx, Req};
use crate::placeholders::Template;

/// `root` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The folder; placeholders allowed.
    pub(crate) path: String,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    match d.args {
        [path] => Ok(Toml { path: path.clone() }),
        _ => Err(d.err("root [matcher] PATH")),
    }
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    Ok(Box::new(Root {
        path: Template::parse(&t.path, b.env)?,
    }))
}

#[derive(Debug)]
struct Root {
    path: Template,
}

impl Handler for Root {
    fn enter<'s>(&'s self, req: &mut Request<Incoming>, cx: &mut Cx) -> Step<'s> {
        let path = self.path.render(Req::of(req), cx);
        cx.set_var("root", path);
        Step::Next
    }

    fn describe(&self) -> String {
        "root".into()
    }
}
