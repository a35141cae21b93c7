//! The admin endpoint (Caddy's `admin localhost:2019` or `admin unix//PATH`): `GET /config/`
//! shows the running configuration as JSON, `GET /metrics` the Prometheus exposition (see
//! the metrics module), `POST /load` with a Caddyfile
//! (`Content-Type: text/caddyfile`) replaces it as a reload does, `POST /stop` stops the edge.
//!
//! Invariants:
//! - It listens on loopback or a unix socket only, unless the config explicitly allows more
//!   (`admin_allow_remote` in TOML): whoever reaches it can replace the configuration.
//! - As Caddy does against DNS rebinding and cross-site requests, a TCP request whose `Host`
//!   is not a loopback name with the admin port, or any request whose `Origin` is not such a
//!   name, gets 403 before anything else is read.
//! - `/config/` never shows a secret: basic_auth hashes, credential headers and keys named for
//!   secrets are replaced with `REDACTED`.
//! - A `/load` goes through the same validation and swap as a SIGHUP reload, on the main loop:
//!   it is applied whole or not at all, and a refusal answers 400 naming the file and line.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::http::{Method, Request, Response, StatusCode, header};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AdminListen, EdgeToml};

/// Largest Caddyfile `/load` takes.
const MAX_LOAD: usize = 1 << 20;

/// A `/load` for the main loop: the Caddyfile text and where to answer.
#[derive(Debug)]
pub(crate) struct Load {
    /// The Caddyfile.
    pub(crate) text: String,
    /// `Err` holds the refusal, shown to the client.
    pub(crate) reply: oneshot::Sender<Result<(), String>>,
}

/// What the request handlers share.
struct Admin {
    /// The running config as redacted JSON, replaced on every (re)load.
    config: Arc<ArcSwap<serde_json::Value>>,
    loads: mpsc::Sender<Load>,
    stop: CancellationToken,
    /// The TCP port, for the Host and Origin checks (`None` on a unix socket).
    port: Option<u16>,
}

/// The running config as JSON with its secrets replaced.
pub(crate) fn redacted(toml: &EdgeToml) -> serde_json::Value {
    let mut value = serde_json::to_value(toml).unwrap_or(serde_json::Value::Null);
    redact(&mut value, None);
    value
}

const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
];

fn redact(value: &mut serde_json::Value, key: Option<&str>) {
    let secret_key = key.is_some_and(|k| {
        let k = k.to_ascii_lowercase();
        SECRET_HEADERS.contains(&k.as_str())
            || ["password", "secret", "token", "hash"]
                .iter()
                .any(|s| k.contains(s))
    });
    match value {
        serde_json::Value::Object(map) => {
            let users = key == Some("users");
            for (k, v) in map.iter_mut() {
                if users {
                    *v = "REDACTED".into();
                } else {
                    redact(v, Some(k));
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                redact(item, key);
            }
        }
        serde_json::Value::String(text) => {
            let lower = text.to_ascii_lowercase();
            if secret_key
                || ["$2a$", "$2b$", "$2y$"].iter().any(|p| text.contains(p))
                || SECRET_HEADERS
                    .iter()
                    .any(|h| lower.starts_with(&format!("{h} ")))
            {
                *text = "REDACTED".into();
            }
        }
        _ => {}
    }
}

/// Binds the admin listener; the returned task serves it until `stop_serving`.
pub(crate) async fn start(
    listen: &AdminListen,
    config: Arc<ArcSwap<serde_json::Value>>,
    loads: mpsc::Sender<Load>,
    stop_edge: CancellationToken,
    stop_serving: CancellationToken,
) -> std::io::Result<(String, tokio::task::JoinHandle<()>)> {
    let tasks = TaskTracker::new();
    match listen {
        AdminListen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            let admin = Arc::new(Admin {
                config,
                loads,
                stop: stop_edge,
                port: Some(bound.port()),
            });
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop_serving.cancelled() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => {
                                tasks.spawn(serve(stream, admin.clone(), stop_serving.clone()));
                            }
                            Err(err) => tracing::warn!(error = %err, "admin accept failed"),
                        },
                    }
                }
                tasks.close();
                tasks.wait().await;
            });
            Ok((bound.to_string(), task))
        }
        AdminListen::Unix(path) => {
            // A socket left by an earlier run is replaced; anything else there is an error.
            if let Ok(meta) = std::fs::symlink_metadata(path)
                && std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
            {
                std::fs::remove_file(path)?;
            }
            let listener = tokio::net::UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            let admin = Arc::new(Admin {
                config,
                loads,
                stop: stop_edge,
                port: None,
            });
            let path = path.clone();
            let shown = format!("unix/{}", path.display());
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop_serving.cancelled() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => {
                                tasks.spawn(serve(stream, admin.clone(), stop_serving.clone()));
                            }
                            Err(err) => tracing::warn!(error = %err, "admin accept failed"),
                        },
                    }
                }
                tasks.close();
                tasks.wait().await;
                let _ = std::fs::remove_file(&path);
            });
            Ok((shown, task))
        }
    }
}

async fn serve<S>(stream: S, admin: Arc<Admin>, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let admin = admin.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(req, &admin).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {}
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether `host` (a Host header, or an Origin's host and port) names loopback on `port`.
fn loopback_host(host: &str, port: Option<u16>) -> bool {
    let (name, given) = match crate::site::split_host_port(host) {
        Some(split) => split,
        None => return false,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback && (port.is_none() || given == port)
}

/// Why a request is refused before it is read, if it is: DNS rebinding (a foreign Host) or a
/// cross-site request (a foreign Origin).
fn forbidden(req: &Request<Incoming>, port: Option<u16>) -> Option<String> {
    if port.is_some() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !loopback_host(host, port) {
            return Some(format!("host not allowed: {host:?}\n"));
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let text = origin.to_str().unwrap_or("");
        let host = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .unwrap_or("");
        if host.contains('/') || !loopback_host(host, port) {
            return Some(format!("origin not allowed: {text:?}\n"));
        }
    }
    None
}

async fn answer(req: Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    if let Some(why) = forbidden(&req, admin.port) {
        return text(StatusCode::FORBIDDEN, why);
    }
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/config" | "/config/") => {
            let body = serde_json::to_vec(&**admin.config.load()).unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        (Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(crate::metrics::render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        (Method::POST, "/load") => load(req, admin).await,
        (Method::POST, "/stop") => {
            admin.stop.cancel();
            text(StatusCode::OK, "")
        }
        (_, "/config" | "/config/" | "/load" | "/stop") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn load(req: Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    let kind = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !kind.starts_with("text/caddyfile") {
        return text(
            StatusCode::BAD_REQUEST,
            "only a Caddyfile loads here: send Content-Type: text/caddyfile\n",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_LOAD).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a Caddyfile of at most {MAX_LOAD} bytes\n"),
            );
        }
    };
    let Ok(caddyfile) = String::from_utf8(body.to_vec()) else {
        return text(StatusCode::BAD_REQUEST, "the Caddyfile is not UTF-8\n");
    };
    let (reply, answer) = oneshot::channel();
    if admin
        .loads
        .send(Load {
            text: caddyfile,
            reply,
        })
        .await
        .is_err()
    {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the edge is stopping\n");
    }
    match answer.await {
        Ok(Ok(())) => text(StatusCode::OK, ""),
        Ok(Err(why)) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "the edge is stopping\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_on_the_admin_port_pass() {
        assert!(loopback_host("localhost:2019", Some(2019)));
        assert!(loopback_host("127.0.0.1:2019", Some(2019)));
        assert!(loopback_host("[::1]:2019", Some(2019)));
        assert!(!loopback_host("localhost:2020", Some(2019)));
        assert!(!loopback_host("localhost", Some(2019)));
        assert!(!loopback_host("evil.example:2019", Some(2019)));
        assert!(!loopback_host("10.0.0.1:2019", Some(2019)));
    }

    #[test]
    fn secrets_never_reach_the_config_json() {
        let value = serde_json::json!({
            "site": [{
                "basic_auth": [{"users": {"alice": "$2a$14$abcdefghijklmnopqrstuv"}}],
                "route": [{"header_up": {"set": {"Authorization": "Bearer s3cret"}}}],
                "api_token": "t0ken",
                "header": ["Authorization Bearer other"],
            }]
        });
        let mut value = value;
        redact(&mut value, None);
        let text = value.to_string();
        for secret in ["$2a$", "s3cret", "t0ken", "other"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("alice"), "user names stay: {text}");
    }
}
