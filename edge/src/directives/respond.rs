//! `respond [matcher] [BODY|STATUS] [STATUS] { body TEXT; close }`: answers with a fixed
//! status and body (placeholders rendered), as Caddy's `static_response`.

use crate::body::ReqBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::http::{HeaderValue, Request, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step, at, status};
use crate::body::Body;
use crate::context::{Cx, Req};
use crate::placeholders::Template;

/// `respond` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Status code. Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<u16>,
    /// Body; may use placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) body: Option<String>,
    /// Close the connection after answering.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) close: bool,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let mut t = Toml::default();
    let is_status = |w: &str| w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit());
    match d.args {
        [] => {}
        [one] if is_status(one) => t.status = Some(status(one).map_err(|m| d.err(m))?.as_u16()),
        [one] => t.body = Some(one.clone()),
        [body, code] => {
            t.body = Some(body.clone());
            t.status = Some(status(code).map_err(|m| d.err(m))?.as_u16());
        }
        _ => return Err(d.err("respond [matcher] [body|status] [status]")),
    }
    for sub in d.block.unwrap_or_default() {
        match sub.words.as_slice() {
            [k, v] if k == "body" => t.body = Some(v.clone()),
            [k] if k == "close" => t.close = true,
            _ => {
                return Err(at(
                    sub.line,
                    "respond: the block takes `body TEXT` and `close`",
                ));
            }
        }
    }
    Ok(t)
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let status = match t.status {
        Some(code) => {
            Some(StatusCode::from_u16(code).map_err(|_| format!("{code} is not a status code"))?)
        }
        None => None,
    };
    let body = match &t.body {
        Some(text) => Some(Template::parse(text, b.env)?),
        None => None,
    };
    Ok(Box::new(Respond {
        status,
        body,
        close: t.close,
    }))
}

#[derive(Debug)]
struct Respond {
    /// None: 200, or the status of the error being handled (as Caddy's).
    status: Option<StatusCode>,
    body: Option<Template>,
    close: bool,
}

/// A response with `body`; a non-empty body gets Caddy's plain-text type.
pub(crate) fn text(status: StatusCode, body: String, close: Option<()>) -> Response<Body> {
    let has_body = !body.is_empty();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    if has_body {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    if close.is_some() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

impl Handler for Respond {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let body = self
            .body
            .as_ref()
            .map(|t| t.render(Req::of(req), cx))
            .unwrap_or_default();
        let status = self.status.unwrap_or_else(|| {
            cx.error
                .as_ref()
                .and_then(|(code, _)| StatusCode::from_u16(*code).ok())
                .unwrap_or(StatusCode::OK)
        });
        Step::Respond(text(status, body, self.close.then_some(())))
    }

    fn describe(&self) -> String {
        format!("respond {}", self.status.unwrap_or(StatusCode::OK).as_u16())
    }
}
