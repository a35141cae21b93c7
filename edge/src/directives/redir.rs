//! `redir [matcher] TO [CODE]`: answers with a redirect. CODE is `temporary` (302, the
//! default), `permanent` (301), any 3xx, or `html` (a 200 page that redirects, as Caddy's).

use crate::body::ReqBody;
use hyper::http::{HeaderValue, Request, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step, empty};
use crate::body::Body;
use crate::context::{Cx, Req};
use crate::placeholders::Template;

/// `redir` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Only requests whose path matches (the TOML `[[site.redir]]` form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<String>,
    /// Target; may use placeholders ({uri}, {path}, {query}, {host}...).
    pub(crate) to: String,
    /// Status code (300-308). Default 302.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) code: Option<u16>,
    /// Answer 200 with an HTML page that redirects instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) html: bool,
}

fn is_code(word: &str) -> bool {
    matches!(word, "permanent" | "temporary" | "html") || word.parse::<u16>().is_ok()
}

/// Whether `args` are TO [CODE] with no matcher (`redir /new`, `redir /new 301`): the edge
/// reads a lone path as the target, where Caddy would read a matcher and refuse.
pub(crate) fn target_only(args: &[String]) -> bool {
    match args {
        [_] => true,
        [_, code] => is_code(code),
        _ => false,
    }
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    let (to, code) = match d.args {
        [to] => (to.clone(), None),
        [to, code] => (to.clone(), Some(code.as_str())),
        _ => return Err(d.err("redir [matcher] TO [code]")),
    };
    let (code, html) = match code {
        None | Some("temporary") => (None, false),
        Some("permanent") => (Some(301), false),
        Some("html") => (None, true),
        Some(n) => (
            Some(
                n.parse()
                    .map_err(|_| d.err(format!("{n:?} is not a redirect code")))?,
            ),
            false,
        ),
    };
    Ok(Toml {
        path: None,
        to,
        code,
        html,
    })
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let code = t.code.unwrap_or(302);
    if !(300..=308).contains(&code) {
        return Err(format!("{code} is not a redirect status (300-308)").into());
    }
    if t.to.is_empty() {
        return Err("the target is empty".to_owned().into());
    }
    let to = Template::parse(&t.to, b.env)?;
    Ok(Box::new(Redir {
        status: StatusCode::from_u16(code).map_err(|e| e.to_string())?,
        html: t.html,
        to,
        text: t.to.clone(),
    }))
}

#[derive(Debug)]
struct Redir {
    to: Template,
    text: String,
    status: StatusCode,
    html: bool,
}

fn html_page(to: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html>\n\t<head>\n\t\t<title>Redirecting...</title>\n\t\t<script>window.location.replace(\"{to}\");</script>\n\t\t<meta http-equiv=\"refresh\" content=\"0; URL='{to}'\">\n\t</head>\n\t<body>Redirecting to <a href=\"{to}\">{to}</a>...</body>\n</html>\n"
    )
}

impl Handler for Redir {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let to = self.to.render(Req::of(req), cx);
        if self.html {
            // Escaped, placeholder values too: a decoded `{path}` may hold `"` or `<`.
            let page = html_page(&crate::files::html_escape(&to));
            return Step::Respond(super::respond::text(StatusCode::OK, page, None));
        }
        let Ok(location) = HeaderValue::from_str(&to) else {
            return Step::Error(StatusCode::BAD_REQUEST, "unusable redirect target".into());
        };
        let mut response: hyper::http::Response<Body> = empty(self.status);
        response.headers_mut().insert(header::LOCATION, location);
        Step::Respond(response)
    }

    fn describe(&self) -> String {
        format!("redir {} ({})", self.text, self.status.as_u16())
    }
}
