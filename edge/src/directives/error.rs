//! `error [matcher] [MESSAGE] [STATUS]`: fails the request with a status (default 500),
//! which the site's `handle_errors` routes may answer; without them, an empty response.

use crate::body::ReqBody;
use hyper::http::{Request, StatusCode};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step, status};
use crate::context::{Cx, Req};
use crate::placeholders::Template;

/// `error` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The message, for `{err.message}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
    /// Status. Default 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<u16>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    d.no_block()?;
    let code = |w: &String| status(w).map(|s| s.as_u16()).map_err(|m| d.err(m));
    let is_status = |w: &str| w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit());
    Ok(match d.args {
        [] => Toml::default(),
        [one] if is_status(one) => Toml {
            message: None,
            status: Some(code(one)?),
        },
        [one] => Toml {
            message: Some(one.clone()),
            status: None,
        },
        [message, s] => Toml {
            message: Some(message.clone()),
            status: Some(code(s)?),
        },
        _ => return Err(d.err("error [matcher] [message] [status]")),
    })
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let status = StatusCode::from_u16(t.status.unwrap_or(500))
        .map_err(|_| format!("{:?} is not a status code", t.status))?;
    let message = Template::parse(t.message.as_deref().unwrap_or(""), b.env)?;
    Ok(Box::new(Error { status, message }))
}

#[derive(Debug)]
struct Error {
    status: StatusCode,
    message: Template,
}

impl Handler for Error {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        Step::Error(self.status, self.message.render(Req::of(req), cx))
    }

    fn describe(&self) -> String {
        format!("error {}", self.status.as_u16())
    }
}
