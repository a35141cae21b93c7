//! Access log lines in Caddy 2.6's shape, for a Caddyfile's `log` blocks: `format json` (one
//! JSON object per line, the field names Caddy writes) and `format console` (time, level,
//! logger and message separated by tabs, then the same fields as spaced JSON, as zap's
//! console encoder writes them).
//!
//! Invariant: credentials never reach a line. `Authorization`, `Proxy-Authorization`,
//! `Cookie` and `Set-Cookie` are written with an empty list of values, as Caddy 2.6 does
//! unless told to log credentials (which the edge does not offer).

use std::io::{self, Write};

use hyper::http::HeaderMap;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::Record;
use crate::config::LogFormat;

/// Headers shown as Go's `http.Header`: canonical names, each with its values in a list.
struct Headers<'a>(&'a HeaderMap);

/// Headers whose values are never logged.
const REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for name in self.0.keys() {
            // Go keeps Host out of a request's header map.
            if name == hyper::http::header::HOST {
                continue;
            }
            let values: Vec<String> = if REDACTED.contains(&name.as_str()) {
                Vec::new()
            } else {
                self.0
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect()
            };
            map.serialize_entry(&canonical(name.as_str()), &values)?;
        }
        map.end()
    }
}

/// Go's canonical header name: each dash-separated word capitalised.
fn canonical(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c });
        upper = c == '-';
    }
    out
}

#[derive(Serialize)]
struct Request<'a> {
    remote_ip: String,
    remote_port: String,
    /// Caddy 2.7's field; written only when trusted proxies are set, so lines keep Caddy
    /// 2.6's shape otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<String>,
    proto: &'static str,
    method: &'a str,
    host: &'a str,
    uri: &'a str,
    headers: Headers<'a>,
}

/// The fields after `msg`.
#[derive(Serialize)]
struct Fields<'a> {
    request: Request<'a>,
    user_id: &'a str,
    duration: f64,
    size: u64,
    status: u16,
    resp_headers: Headers<'a>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    level: &'static str,
    ts: f64,
    logger: &'a str,
    msg: &'static str,
    #[serde(flatten)]
    fields: Fields<'a>,
}

/// Caddy logs a 5xx answer at ERROR, everything else at INFO.
pub(crate) fn is_error(status: u16) -> bool {
    status >= 500
}

fn fields<'a>(record: &'a Record, empty: &'a HeaderMap) -> Fields<'a> {
    Fields {
        request: Request {
            remote_ip: record.remote.to_string(),
            remote_port: record.remote_port.to_string(),
            client_ip: record.client_ip.map(|ip| ip.to_string()),
            proto: record.proto,
            method: record.method.as_str(),
            host: record
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .unwrap_or(""),
            uri: record.path.as_ref().map_or("/", |p| p.as_str()),
            headers: Headers(record.headers.as_ref().unwrap_or(empty)),
        },
        user_id: record.user.as_deref().unwrap_or(""),
        duration: record.duration_ms / 1000.0,
        size: record.bytes,
        status: record.status,
        resp_headers: Headers(record.resp_headers.as_ref().unwrap_or(empty)),
    }
}

/// Appends `record` as one line in `format` (not [`LogFormat::Edge`]) to `out`, as logger
/// `logger`.
pub(crate) fn write_caddy_line(
    record: &Record,
    format: LogFormat,
    logger: &str,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let empty = HeaderMap::new();
    let level = if is_error(record.status) {
        ("error", "ERROR")
    } else {
        ("info", "INFO")
    };
    match format {
        LogFormat::Console => {
            write!(
                out,
                "{}\t{}\t{logger}\thandled request\t",
                console_time(record.ts),
                level.1
            )?;
            let mut ser = serde_json::Serializer::with_formatter(&mut *out, Spaced);
            fields(record, &empty).serialize(&mut ser)?;
        }
        _ => {
            serde_json::to_writer(
                &mut *out,
                &JsonLine {
                    level: level.0,
                    ts: record.ts,
                    logger,
                    msg: "handled request",
                    fields: fields(record, &empty),
                },
            )?;
        }
    }
    out.push(b'\n');
    Ok(())
}

/// zap's console time: `2006/01/02 15:04:05.000` in local time.
fn console_time(ts: f64) -> String {
    let Ok(at) = jiff::Timestamp::from_millisecond((ts * 1000.0) as i64) else {
        return String::new();
    };
    at.to_zoned(jiff::tz::TimeZone::system())
        .strftime("%Y/%m/%d %H:%M:%S.%3f")
        .to_string()
}

/// JSON with a space after each `:` and `,`, as zap's console encoder writes its fields.
struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_gos_and_credentials_are_redacted() {
        assert_eq!(canonical("x-forwarded-for"), "X-Forwarded-For");
        assert_eq!(canonical("user-agent"), "User-Agent");
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Basic c2VjcmV0".parse().unwrap());
        headers.append("cookie", "session=secret".parse().unwrap());
        headers.insert("accept", "*/*".parse().unwrap());
        let text = serde_json::to_string(&Headers(&headers)).unwrap();
        assert!(
            !text.contains("secret") && !text.contains("c2VjcmV0"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["Authorization"], serde_json::json!([]));
        assert_eq!(v["Cookie"], serde_json::json!([]));
        assert_eq!(v["Accept"][0], "*/*");
    }
}
