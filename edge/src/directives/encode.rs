//! `encode [matcher] [zstd] [gzip] { minimum_length N }`: compresses responses for clients
//! that accept it, on the way back.

use crate::body::ReqBody;
use hyper::http::{Method, Request, Response, header};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Carry, Dir, Handler, Scope, Step, at};
use crate::body::Body;
use crate::context::Cx;
use crate::encode::{self as codec, Encode, Encoding};

/// `encode` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Encodings in preference order: "zstd", "gzip". Default both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) encodings: Vec<String>,
    /// Responses smaller than this are not compressed. Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) minimum_length: Option<u64>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let mut t = Toml {
        encodings: d.args.to_vec(),
        minimum_length: None,
    };
    for sub in d.block.unwrap_or_default() {
        match sub.words.as_slice() {
            [f] if f == "gzip" || f == "zstd" => t.encodings.push(f.clone()),
            [f, _level] if f == "gzip" || f == "zstd" => t.encodings.push(f.clone()),
            [m, n] if m == "minimum_length" => {
                t.minimum_length = Some(n.parse().map_err(|_| {
                    at(
                        sub.line,
                        format!("encode: minimum_length {n:?} is not a number"),
                    )
                })?);
            }
            [first, ..] => {
                return Err(at(
                    sub.line,
                    format!("encode option {first:?} is not supported"),
                ));
            }
            [] => {}
        }
    }
    Ok(t)
}

/// Compiles the encodings named.
pub(crate) fn encode_of(t: &Toml) -> Result<Encode, String> {
    let mut encodings = Vec::new();
    let names: Vec<&str> = if t.encodings.is_empty() {
        vec!["zstd", "gzip"]
    } else {
        t.encodings.iter().map(String::as_str).collect()
    };
    for name in names {
        let encoding = match name {
            "gzip" => Encoding::Gzip,
            "zstd" => Encoding::Zstd,
            other => {
                return Err(format!(
                    "{other:?} is not a supported encoding (\"zstd\" or \"gzip\")"
                ));
            }
        };
        if !encodings.contains(&encoding) {
            encodings.push(encoding);
        }
    }
    Ok(Encode {
        encodings,
        minimum_length: t.minimum_length.unwrap_or(512),
    })
}

pub(crate) fn build(
    t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    Ok(Box::new(Compress {
        encode: encode_of(t)?,
    }))
}

#[derive(Debug)]
struct Compress {
    encode: Encode,
}

impl Handler for Compress {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, _cx: &mut Cx) -> Step<'s> {
        if req.method() == Method::HEAD {
            return Step::Next;
        }
        match self
            .encode
            .negotiate(req.headers().get(header::ACCEPT_ENCODING))
        {
            Some(encoding) => Step::Leave(Carry::Encoding(encoding)),
            None => Step::Next,
        }
    }

    fn leave(&self, carry: Carry, _cx: &Cx, response: &mut Response<Body>) {
        let Carry::Encoding(encoding) = carry else {
            return;
        };
        // A body of known size without a Content-Length yet (`respond`'s) is small too.
        let small = hyper::body::Body::size_hint(response.body())
            .exact()
            .is_some_and(|len| len < self.encode.minimum_length);
        if !small && self.encode.wants(response.status(), response.headers()) {
            let taken = std::mem::take(response);
            *response = codec::compress(taken, encoding);
        }
    }

    fn describe(&self) -> String {
        let names: Vec<&str> = self.encode.encodings.iter().map(|e| e.token()).collect();
        format!("encode {}", names.join(" "))
    }
}
