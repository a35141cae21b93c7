//! `php_fastcgi [matcher] UPSTREAMS... { root, split, index, try_files, env,
//! resolve_root_symlink, dial_timeout, read_timeout, write_timeout, capture_stderr }`: PHP
//! through php-fpm (the client is `crate::fastcgi`), expanded as Caddy 2.6 expands it into
//! three routes under the directive's matcher:
//! 1. a directory holding the index script, asked without its slash, is redirected (308) to
//!    `{orig_path}/`;
//! 2. the path is rewritten to the first of `{path} {path}/index.php index.php` (or the
//!    `try_files` given) that exists under the site root, split at `.php` (what follows the
//!    split becomes PATH_INFO);
//! 3. a path ending in a split extension (`*.php`) is served by an upstream; any other goes
//!    on to the next directive (`file_server`).
//!
//! Invariants: the files looked up are under the site's `root` (the `root` option only sets
//! what php-fpm is told, for an upstream that sees the files elsewhere); the script php-fpm
//! runs is the rewritten path joined under the root with `..` cleaned away, so neither a
//! split path (`/uploads/x.jpg/.php`), `..` nor an encoded slash names a file outside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::body::ReqBody;
use hyper::http::{HeaderValue, Request, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Io, Scope, Serving, Step, at, empty};
use crate::context::Cx;
use crate::fastcgi::{FastCgi, FastCgiAddress, FastCgiConfig, FastCgiContext, PhpRoute};
use crate::placeholders::Template;
use crate::site::{Scheme, parse_duration};

/// `php_fastcgi` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// php-fpm: "127.0.0.1:9000", "unix//run/php/php8.2-fpm.sock".
    pub(crate) to: Vec<String>,
    /// The root php-fpm is told (DOCUMENT_ROOT, SCRIPT_FILENAME); default the site's `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) root: Option<String>,
    /// Where a path splits into script and PATH_INFO. Default [".php"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) split: Vec<String>,
    /// The index script, or "off" (no redirect, no rewrite). Default "index.php".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) index: Option<String>,
    /// Candidates replacing `{path} {path}/index.php index.php`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) try_files: Vec<String>,
    /// Extra CGI parameters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) env: BTreeMap<String, String>,
    /// DOCUMENT_ROOT with its symlinks resolved.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) resolve_root_symlink: bool,
    /// Default "3s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dial_timeout: Option<String>,
    /// A deadline for reading the whole response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read_timeout: Option<String>,
    /// A deadline for sending the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) write_timeout: Option<String>,
    /// Accepted for Caddyfiles: the edge always logs what scripts write to STDERR (bounded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) capture_stderr: bool,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let mut t = Toml {
        to: d.args.to_vec(),
        ..Toml::default()
    };
    for sub in d.block.unwrap_or_default() {
        let Some((name, args)) = sub.words.split_first() else {
            continue;
        };
        let fail = |what: &str| at(sub.line, format!("php_fastcgi {name}: {what}"));
        if sub.block.is_some() {
            return Err(fail("takes no block"));
        }
        let one = || match args {
            [v] => Ok(v.clone()),
            _ => Err(fail("takes one value")),
        };
        match name.as_str() {
            "to" if !args.is_empty() => t.to.extend(args.iter().cloned()),
            "root" => t.root = Some(one()?),
            "split" if !args.is_empty() => t.split = args.to_vec(),
            "index" => t.index = Some(one()?),
            "try_files" if !args.is_empty() => t.try_files = args.to_vec(),
            "env" => match args {
                [k, v] => {
                    t.env.insert(k.clone(), v.clone());
                }
                _ => return Err(fail("env KEY VALUE")),
            },
            "resolve_root_symlink" if args.is_empty() => t.resolve_root_symlink = true,
            "capture_stderr" if args.is_empty() => t.capture_stderr = true,
            "dial_timeout" => t.dial_timeout = Some(one()?),
            "read_timeout" => t.read_timeout = Some(one()?),
            "write_timeout" => t.write_timeout = Some(one()?),
            "split" | "try_files" | "to" => return Err(fail("needs a value")),
            "resolve_root_symlink" | "capture_stderr" => return Err(fail("takes no value")),
            other => {
                return Err(at(
                    sub.line,
                    format!(
                        "php_fastcgi option {other:?} is not supported (see man edge-caddyfile)"
                    ),
                ));
            }
        }
    }
    Ok(t)
}

/// A literal text: `{env.X}` and friends would need a request, which a setting has not.
fn literal(text: &str, what: &str, b: &Build<'_>) -> Result<String, String> {
    let template = Template::parse(text, b.env)?;
    template
        .literal()
        .map(str::to_owned)
        .ok_or_else(|| format!("{what} {text:?}: request placeholders are not supported here"))
}

fn duration(text: &Option<String>, what: &str) -> Result<Option<Duration>, String> {
    text.as_ref()
        .map(|t| parse_duration(t).ok_or_else(|| format!("{what} {t:?} is not a duration")))
        .transpose()
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    if t.to.is_empty() {
        return Err("names no upstream".to_owned().into());
    }
    let root = t
        .root
        .as_deref()
        .map(|r| literal(r, "root", b))
        .transpose()?;
    let env = t
        .env
        .iter()
        .map(|(k, v)| Ok((k.clone(), literal(v, &format!("env {k}"), b)?)))
        .collect::<Result<Vec<_>, String>>()?;
    let split = if t.split.is_empty() {
        vec![".php".to_owned()]
    } else {
        t.split.clone()
    };
    let index = match t.index.as_deref() {
        None => Some("index.php".to_owned()),
        Some("off") => None,
        Some(other) => Some(other.to_owned()),
    };
    let dial = duration(&t.dial_timeout, "dial_timeout")?;
    let read = duration(&t.read_timeout, "read_timeout")?;
    let write = duration(&t.write_timeout, "write_timeout")?;
    let mut upstreams = Vec::new();
    for to in &t.to {
        let address = FastCgiAddress::parse(to)?;
        let mut config = FastCgiConfig::new(address, root.as_deref().unwrap_or("."));
        config.split_path = split.clone();
        config.index = index.clone();
        config.try_files = (!t.try_files.is_empty()).then(|| t.try_files.clone());
        config.env = env.clone();
        config.resolve_root_symlink = t.resolve_root_symlink;
        if let Some(dial) = dial {
            config.dial_timeout = dial;
        }
        config.read_timeout = read;
        config.write_timeout = write;
        upstreams.push(FastCgi::new(config));
    }
    Ok(Box::new(PhpFastCgi {
        upstreams,
        own_root: root.is_some(),
        next: AtomicUsize::new(0),
        text: t.to.join(" "),
    }))
}

#[derive(Debug)]
struct PhpFastCgi {
    /// One client per upstream, all with the same settings; taken in turn.
    upstreams: Vec<FastCgi>,
    /// The `root` option was given: php-fpm is told that root, not the site's.
    own_root: bool,
    next: AtomicUsize,
    text: String,
}

/// What followed the split extension in the file `try_files` found, for PATH_INFO.
#[derive(Clone, Debug)]
struct Remainder(String);

/// The site root (`root`), which the file lookups use; "." as in Caddy when none is set.
fn site_root(cx: &Cx) -> &Path {
    Path::new(cx.var("root").unwrap_or("."))
}

impl Handler for PhpFastCgi {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let first = &self.upstreams[0];
        let path = String::from_utf8_lossy(cx.match_path()).into_owned();
        match first.route_in(site_root(cx), &path) {
            PhpRoute::Redirect(_) => {
                // Caddy's `{http.request.orig_uri.path}/`: the path as the client sent it.
                let original = cx.orig_uri.as_ref().unwrap_or(req.uri()).path();
                let mut response = empty(StatusCode::PERMANENT_REDIRECT);
                match HeaderValue::from_str(&format!("{original}/")) {
                    Ok(location) => {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    Err(_) => {
                        return Step::Error(StatusCode::BAD_REQUEST, "bad redirect target".into());
                    }
                }
                return Step::Respond(response);
            }
            PhpRoute::Rewrite { path, remainder } => {
                let query = req.uri().query().map(str::to_owned);
                if !super::rewrite::set_target(req, cx, &path, query.as_deref()) {
                    return Step::Error(
                        StatusCode::BAD_REQUEST,
                        "php_fastcgi made no valid target".into(),
                    );
                }
                req.extensions_mut().insert(Remainder(remainder));
            }
            PhpRoute::AsIs => {}
        }
        let path = String::from_utf8_lossy(cx.match_path());
        if first.is_script(&path) {
            Step::Serve
        } else {
            Step::Next
        }
    }

    fn serve<'s>(
        &'s self,
        mut req: Request<ReqBody>,
        cx: &'s mut Cx,
        io: &'s mut Io<'_>,
    ) -> Serving<'s> {
        let remainder = req.extensions_mut().remove::<Remainder>().map(|r| r.0);
        let ctx = FastCgiContext {
            remote_addr: cx.remote,
            https: matches!(cx.scheme, Scheme::Https),
            ssl_protocol: None,
            ssl_cipher: None,
            remote_user: io.user.clone(),
            file_remainder: remainder,
            root: (!self.own_root).then(|| PathBuf::from(site_root(cx))),
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        Box::pin(async move { self.upstreams[i].serve(req, &ctx).await })
    }

    fn describe(&self) -> String {
        format!("php_fastcgi {}", self.text)
    }
}
