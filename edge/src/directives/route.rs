//! `route [matcher] { ... }`: a block of directives run in the order written, not sorted.

use serde::{Deserialize, Serialize};

use super::handle::Handle;
use super::{At, Build, BuildFail, Dir, Handler, RouteToml, Routes, Scope};

/// `route` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The block's routes, in order.
    #[serde(default)]
    pub(crate) routes: Vec<RouteToml>,
}

pub(crate) fn parse(d: &Dir<'_>, s: &mut Scope, key: &str) -> Result<Toml, At> {
    if !d.args.is_empty() {
        return Err(d.err("takes a matcher and a block, no arguments"));
    }
    let routes = super::parse_routes(d.block.unwrap_or_default(), s, &format!("{key}.routes"))?;
    Ok(Toml { routes })
}

pub(crate) fn build(t: &Toml, b: &mut Build<'_>, key: &str) -> Result<Box<dyn Handler>, BuildFail> {
    let routes =
        Routes::build(&t.routes, &format!("{key}.routes"), false, b).map_err(BuildFail::Nested)?;
    Ok(Box::new(Handle {
        strip: None,
        routes,
    }))
}
