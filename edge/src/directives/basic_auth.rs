//! `basic_auth [matcher] [bcrypt [REALM]] { USER HASH ... }` (also `basicauth`): HTTP basic
//! authentication against bcrypt hashes; the user goes to the access log.

use std::collections::BTreeMap;

use crate::body::ReqBody;
use hyper::http::{Request, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Io, Scope, Step, at, empty};
use crate::auth::BasicAuth;
use crate::context::Cx;

/// `basic_auth` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Only requests whose path matches (the TOML `[[site.basic_auth]]` form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<String>,
    /// Realm shown by browsers. Default "restricted".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) realm: Option<String>,
    /// User name to bcrypt hash (as `caddy hash-password` prints it, raw or base64).
    pub(crate) users: BTreeMap<String, String>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let realm = match d.args {
        [] => None,
        [alg] if alg == "bcrypt" => None,
        [alg, realm] if alg == "bcrypt" => Some(realm.clone()),
        [alg, ..] => {
            return Err(d.err(format!("hash {alg:?} is not supported (bcrypt only)")));
        }
    };
    let mut users = BTreeMap::new();
    for sub in d.block.unwrap_or_default() {
        match sub.words.as_slice() {
            [user, hash] if sub.block.is_none() => {
                users.insert(user.clone(), hash.clone());
            }
            _ => return Err(at(sub.line, "basic_auth lines are: USER HASH")),
        }
    }
    if users.is_empty() {
        return Err(d.err("needs a block of USER HASH lines"));
    }
    Ok(Toml {
        path: None,
        realm,
        users,
    })
}

pub(crate) fn build(
    t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    if t.users.is_empty() {
        return Err("names no user".to_owned().into());
    }
    Ok(Box::new(Auth {
        auth: BasicAuth::build(t.realm.clone(), &t.users)?,
    }))
}

#[derive(Debug)]
struct Auth {
    auth: BasicAuth,
}

impl Handler for Auth {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, _cx: &mut Cx) -> Step<'s> {
        Step::Gate
    }

    fn gate<'s>(
        &'s self,
        req: &'s Request<ReqBody>,
        _cx: &'s mut Cx,
        io: &'s mut Io<'_>,
    ) -> super::Gating<'s> {
        Box::pin(async move {
            match self
                .auth
                .check(req.headers().get(header::AUTHORIZATION))
                .await
            {
                Some(user) => {
                    io.user = Some(user);
                    None
                }
                None => {
                    let mut response = empty(StatusCode::UNAUTHORIZED);
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, self.auth.challenge());
                    Some(response)
                }
            }
        })
    }

    fn describe(&self) -> String {
        "basic_auth".into()
    }
}
