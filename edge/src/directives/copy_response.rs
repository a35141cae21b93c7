//! `copy_response [STATUS]`, only inside `reverse_proxy`'s `handle_response`: answers with
//! the upstream's response being handled (its status, or STATUS, its headers and body).

use crate::body::ReqBody;
use hyper::http::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step};
use crate::context::Cx;

/// `copy_response` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Answer with this status instead of the upstream's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<u16>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    match d.args {
        [] => Ok(Toml { status: None }),
        [code] => Ok(Toml {
            status: Some(super::status(code).map_err(|m| d.err(m))?.as_u16()),
        }),
        _ => Err(d.err("copy_response [matcher] [STATUS]")),
    }
}

pub(crate) fn build(
    t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let status = t
        .status
        .map(|s| super::status(&s.to_string()))
        .transpose()?;
    Ok(Box::new(CopyResponse { status }))
}

#[derive(Debug)]
struct CopyResponse {
    status: Option<StatusCode>,
}

impl Handler for CopyResponse {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        let Some(proxied) = cx.proxied.as_mut() else {
            return Step::Error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "copy_response outside reverse_proxy's handle_response".into(),
            );
        };
        let Some(body) = proxied.body.take() else {
            return Step::Error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "copy_response: the response was copied already".into(),
            );
        };
        let mut response = Response::new(body);
        *response.status_mut() = self.status.unwrap_or(proxied.status);
        *response.headers_mut() = proxied.headers.clone();
        Step::Respond(response)
    }

    fn describe(&self) -> String {
        "copy_response".into()
    }
}
