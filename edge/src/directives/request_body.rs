//! `request_body [matcher] { max_size SIZE }`: the most body bytes a handler reading the body
//! (`reverse_proxy`) may take from the client; more is answered 413, as Caddy answers.
//!
//! As in Caddy, the limit applies when the body is read: a handler that never reads it
//! (`respond`) answers as usual. Unlike Caddy 2.6, which answers 502 when a declared
//! Content-Length over the limit meets `reverse_proxy`, the edge answers 413 at once without
//! reading the body; a body of unknown length (chunked) is counted frame by frame as it goes
//! upstream and cut, with 413, at the first frame that goes over (see
//! [`crate::body::Capped`]): nothing past the limit is read, let alone buffered.
//!
//! Invariant: the limit only ever lowers (two matching `request_body` keep the smaller).

use crate::body::ReqBody;
use hyper::http::Request;
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step, at};
use crate::context::Cx;

/// `request_body` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Bytes ("10MB", "1MiB", "512k", as Caddy's humanized sizes).
    pub(crate) max_size: String,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    if !d.args.is_empty() {
        return Err(d.err("takes no arguments: request_body [matcher] { max_size SIZE }"));
    }
    let mut max_size = None;
    for sub in d.block.unwrap_or_default() {
        match sub.words.as_slice() {
            [o, size] if o == "max_size" && sub.block.is_none() => {
                parse_size(size).map_err(|m| at(sub.line, format!("request_body: {m}")))?;
                max_size = Some(size.clone());
            }
            [o, ..] => {
                return Err(at(
                    sub.line,
                    format!("request_body: option {o:?} is not supported (max_size SIZE)"),
                ));
            }
            [] => {}
        }
    }
    match max_size {
        Some(max_size) => Ok(Toml { max_size }),
        None => Err(d.err("needs a block with max_size SIZE")),
    }
}

/// A size as Caddy reads it (go-humanize's `ParseBytes`): a number, maybe with a fraction,
/// then a unit in any case: none or `b`, `k`/`kb` (1000), `ki`/`kib` (1024), and so on to `e`.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size (as 10MB or 1MiB)");
    let cleaned = text.replace(',', "");
    let split = cleaned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(cleaned.len());
    let (number, unit) = cleaned.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let (power, binary) = match unit.strip_suffix('i') {
        Some(u) => (u, true),
        None => (unit, false),
    };
    let exp = match power {
        "" if !binary => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        "e" => 6,
        _ => return Err(bad()),
    };
    let base: f64 = if binary { 1024.0 } else { 1000.0 };
    let bytes = number * base.powi(exp);
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    // Whole bytes, as go-humanize rounds.
    Ok(bytes as u64)
}

pub(crate) fn build(
    t: &Toml,
    _b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    Ok(Box::new(RequestBody {
        max: parse_size(&t.max_size)?,
    }))
}

#[derive(Debug)]
struct RequestBody {
    max: u64,
}

impl Handler for RequestBody {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        cx.body_limit = Some(cx.body_limit.map_or(self.max, |l| l.min(self.max)));
        Step::Next
    }

    fn describe(&self) -> String {
        format!("request_body max_size {}", self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_caddy_reads_them() {
        assert_eq!(parse_size("10").unwrap(), 10);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("10mb").unwrap(), 10_000_000);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1500);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10 parsecs").is_err());
    }
}
