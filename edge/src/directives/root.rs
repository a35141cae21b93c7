//! `root [matcher] PATH`: the site root later directives (`file_server`, `try_files`) use;
//! as in Caddy, it is the variable `root` (`{vars.root}`).
//!
//! Invariant: a placeholder's value adds no `..` segment to the root, so a request never
//! moves the root above the folder the Caddyfile names.

use crate::body::ReqBody;
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
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        // A value from the request (`{path.0}` of `/%2e%2e/etc`, decoded to `..`) never
        // climbs out of where the template put it: each is cleaned as if rooted first.
        let path = self.path.render_with(Req::of(req), cx, contained);
        cx.set_var("root", path);
        Step::Next
    }

    fn describe(&self) -> String {
        "root".into()
    }
}

/// `value` with its `.` and `..` segments resolved as if it started at `/`, so none is left
/// to climb above its place in the root (its leading and trailing slashes kept).
fn contained(value: &str) -> String {
    if !value.split('/').any(|s| s == ".." || s == ".") {
        return value.to_owned();
    }
    let cleaned = crate::files::clean(&format!("/{value}"));
    let mut out = if value.starts_with('/') {
        cleaned
    } else {
        cleaned.trim_start_matches('/').to_owned()
    };
    if value.ends_with('/') && !out.ends_with('/') {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::contained;

    #[test]
    fn a_placeholder_value_in_root_cannot_climb_above_its_place() {
        assert_eq!(contained(".."), "");
        assert_eq!(contained("../../etc"), "etc");
        assert_eq!(contained("/a/../../etc/"), "/etc/");
        assert_eq!(contained("site.example"), "site.example");
        assert_eq!(contained("a/./b"), "a/b");
    }
}
