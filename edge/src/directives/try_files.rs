//! `try_files FILES...`: rewrites the request to the first of FILES that exists under the
//! site root (Caddy's `file` matcher with `first_exist`, then a rewrite); `=CODE` answers
//! with that status. A candidate's `?query` replaces the query.

use std::path::PathBuf;

use crate::body::ReqBody;
use hyper::http::{Request, StatusCode};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step};
use crate::context::{Cx, Req};
use crate::files::{TryFiles, try_files};
use crate::placeholders::{QueryTemplate, Template};

/// `try_files` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Candidates, in order ("{path}", "{path}/", "/index.php?{query}", "=404").
    pub(crate) files: Vec<String>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    if d.args.is_empty() {
        return Err(d.err("try_files FILES..."));
    }
    if d.block.is_some_and(|b| !b.is_empty()) {
        return Err(d.err("options in a block are not supported"));
    }
    Ok(Toml {
        files: d.args.to_vec(),
    })
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    // Each candidate is cut at its `?` before placeholders are rendered, as Caddy does; the
    // query part is rendered with its values escaped.
    let files = t
        .files
        .iter()
        .map(|f| {
            Ok(match f.split_once('?') {
                Some((p, q)) => (
                    Template::parse(p, b.env)?,
                    Some(QueryTemplate::parse(q, b.env)?),
                ),
                None => (Template::parse(f, b.env)?, None),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Box::new(Try { files }))
}

#[derive(Debug)]
struct Try {
    files: Vec<(Template, Option<QueryTemplate>)>,
}

/// Escapes glob characters coming from the request, as Caddy does.
fn escape_glob(text: &str) -> String {
    text.replace('*', "\\*")
        .replace('?', "\\?")
        .replace('[', "\\[")
}

impl Handler for Try {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let mut paths = Vec::new();
        let mut queries = Vec::new();
        for (path, query) in &self.files {
            let path = path.render(Req::of(req), cx);
            paths.push(if path.starts_with('=') {
                path
            } else {
                escape_glob(&path)
            });
            queries.push(query.as_ref().map(|q| q.render(Req::of(req), cx)));
        }
        let root = PathBuf::from(cx.var("root").unwrap_or("."));
        // The candidates are rendered already; the request path only fills what is left of
        // `{dir}`/`{file}` (none, unless the request itself spelled them, and then with its
        // own cleaned path, which stays under root).
        let request_path = String::from_utf8_lossy(cx.match_path()).into_owned();
        // One candidate at a time, to know whose query applies.
        for (path, query) in paths.iter().zip(&queries) {
            match try_files(&root, std::slice::from_ref(path), &request_path, &[]) {
                TryFiles::Found { relative, .. } => {
                    let query = match query {
                        Some(q) => Some(q.clone()),
                        None => req.uri().query().map(str::to_owned),
                    };
                    // A file's name, not a target: its `%` is a character (a file named
                    // `%2e%2e` must not read as `..` once the target is decoded).
                    let relative = relative.replace('%', "%25");
                    return if super::rewrite::set_target(req, cx, &relative, query.as_deref()) {
                        Step::Next
                    } else {
                        Step::Error(
                            StatusCode::BAD_REQUEST,
                            "try_files made no valid target".into(),
                        )
                    };
                }
                TryFiles::Status(status) => return Step::Error(status, String::new()),
                TryFiles::None => {}
            }
        }
        Step::Next
    }

    fn describe(&self) -> String {
        "try_files".into()
    }
}
