//! `file_server [matcher] [browse] { root, index, browse, hide, precompressed, status,
//! pass_thru, disable_canonical_uris }`: serves static files from the site root (see
//! `crate::files`, which does the serving).

use std::path::PathBuf;

use crate::body::ReqBody;
use hyper::http::{Request, StatusCode};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Io, Scope, Serving, Step, at};
use crate::context::Cx;
use crate::files::{FileServer, FileServerConfig, Precompressed};

/// `file_server` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The root; default the site's `root` (`{vars.root}`), else the working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) root: Option<String>,
    /// Index file names. Default "index.html", "index.txt".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) index: Vec<String>,
    /// List folders without an index.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) browse: bool,
    /// Files and folders to pretend do not exist (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) hide: Vec<String>,
    /// Sidecars to serve: "zstd", "br", "gzip".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) precompressed: Vec<String>,
    /// Status of every answer from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<u16>,
    /// A missing file goes on to the next handler.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) pass_thru: bool,
    /// No redirects to or away from a trailing slash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) disable_canonical_uris: bool,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let mut t = Toml::default();
    match d.args {
        [] => {}
        [b] if b == "browse" => t.browse = true,
        _ => return Err(d.err("file_server [matcher] [browse]")),
    }
    for sub in d.block.unwrap_or_default() {
        let Some((name, args)) = sub.words.split_first() else {
            continue;
        };
        if sub.block.is_some() {
            return Err(at(sub.line, format!("file_server: {name} takes no block")));
        }
        match (name.as_str(), args) {
            ("root", [r]) => t.root = Some(r.clone()),
            ("index", names) if !names.is_empty() => t.index = names.to_vec(),
            ("browse", []) => t.browse = true,
            ("hide", names) if !names.is_empty() => t.hide.extend(names.iter().cloned()),
            ("precompressed", names) => {
                t.precompressed = if names.is_empty() {
                    vec!["br".into(), "zstd".into(), "gzip".into()]
                } else {
                    names.to_vec()
                };
            }
            ("status", [code]) => {
                t.status = Some(
                    super::status(code)
                        .map_err(|m| at(sub.line, format!("file_server: {m}")))?
                        .as_u16(),
                );
            }
            ("pass_thru", []) => t.pass_thru = true,
            ("disable_canonical_uris", []) => t.disable_canonical_uris = true,
            _ => {
                return Err(at(
                    sub.line,
                    format!("file_server option {name:?} is not supported"),
                ));
            }
        }
    }
    Ok(t)
}

pub(crate) fn build(
    t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let mut base = FileServerConfig::new(PathBuf::from(t.root.as_deref().unwrap_or(".")));
    if !t.index.is_empty() {
        base.index = t.index.clone();
    }
    base.browse = t.browse;
    base.hide = t.hide.clone();
    base.precompressed = t
        .precompressed
        .iter()
        .map(|p| Precompressed::parse(p).ok_or_else(|| format!("precompressed {p:?} is not known")))
        .collect::<Result<_, _>>()?;
    base.status = match t.status {
        Some(code) => Some(StatusCode::from_u16(code).map_err(|e| e.to_string())?),
        None => None,
    };
    base.pass_thru = t.pass_thru;
    base.canonical_uris = !t.disable_canonical_uris;
    let fixed = t.root.is_some().then(|| FileServer::new(base.clone()));
    Ok(Box::new(Files { base, fixed }))
}

#[derive(Debug)]
struct Files {
    base: FileServerConfig,
    /// The server when the root is the directive's own.
    fixed: Option<FileServer>,
}

impl Handler for Files {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, _cx: &mut Cx) -> Step<'s> {
        Step::Serve
    }

    fn serve<'s>(
        &'s self,
        req: Request<ReqBody>,
        cx: &'s mut Cx,
        _io: &'s mut Io<'_>,
    ) -> Serving<'s> {
        Box::pin(async move {
            let (parts, _) = req.into_parts();
            let path = String::from_utf8_lossy(cx.match_path()).into_owned();
            if let Some(server) = &self.fixed {
                return server.serve(&parts, &path).await;
            }
            // The root is the site's `root` variable, set per request.
            let mut config = self.base.clone();
            config.root = PathBuf::from(cx.var("root").unwrap_or("."));
            FileServer::new(config).serve(&parts, &path).await
        })
    }

    fn describe(&self) -> String {
        "file_server".into()
    }
}
