//! The HTTP client of the DNS providers' APIs: one JSON request per connection over
//! HTTP/1.1 and rustls (the system's roots), answered with the status and the body.
//!
//! Invariants: the token goes only into the `Authorization` header of the request, never
//! into an error or a log line; http:// is allowed only to loopback addresses (a local test
//! double or a proxy on the same host), so a token never crosses a network in clear; every
//! call has a time limit.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper::http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Time one API call may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an API lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Base {
    tls: bool,
    host: String,
    port: u16,
    /// The path every call's path follows, without a final slash.
    prefix: String,
}

impl Base {
    /// The API base of `provider` ("cloudflare" or "desec"), or `url` instead.
    pub(crate) fn resolve(url: Option<&str>, provider: &str) -> Result<Base, String> {
        let text = url.unwrap_or(match provider {
            "cloudflare" => "https://api.cloudflare.com/client/v4",
            _ => "https://desec.io/api/v1",
        });
        let uri: Uri = text.parse().map_err(|_| format!("{text:?} is not a URL"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("{text:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => {
                let loopback =
                    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(format!(
                        "{text:?}: plain http:// would send the token in clear; use https:// \
                         (http:// only to a loopback address)"
                    ));
                }
                false
            }
            _ => return Err(format!("{text:?} is not an http(s):// URL")),
        };
        if uri.query().is_some() {
            return Err(format!("{text:?}: a base URL takes no query"));
        }
        Ok(Base {
            tls,
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            host,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The base as a URL, for errors.
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}", self.port, self.prefix)
    }
}

/// An API's answer.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The HTTP status.
    pub(crate) status: u16,
    /// The body.
    pub(crate) body: Bytes,
}

impl Answer {
    /// The body as text for an error, cut short.
    pub(crate) fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(400).collect()
    }
}

/// Sends `method` `path` (after the base's path; a query may follow) with `authorization`
/// as the `Authorization` header and `body` as JSON.
pub(crate) async fn call(
    base: &Base,
    method: Method,
    path: &str,
    authorization: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, String> {
    let what = format!("{method} {path}");
    tokio::time::timeout(
        CALL_TIMEOUT,
        call_untimed(base, method, path, authorization, body),
    )
    .await
    .map_err(|_| format!("{what}: no answer within {CALL_TIMEOUT:?}"))?
    .map_err(|e| format!("{what}: {e}"))
}

async fn call_untimed(
    base: &Base,
    method: Method,
    path: &str,
    authorization: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, String> {
    let tcp = TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| format!("connecting to {}: {e}", base.url()))?;
    let payload = match body {
        Some(json) => Bytes::from(json.to_string()),
        None => Bytes::new(),
    };
    let host_header = if base.host.contains(':') {
        format!("[{}]:{}", base.host, base.port)
    } else {
        format!("{}:{}", base.host, base.port)
    };
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", base.prefix))
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "labkit-edge")
        .header(hyper::header::AUTHORIZATION, authorization);
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(payload))
        .map_err(|_| "building the request (a header holds a character HTTP forbids)".to_owned())?;
    if base.tls {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name =
            ServerName::try_from(base.host.clone()).map_err(|e| format!("{}: {e}", base.host))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", base.url()))?;
        send(TokioIo::new(tls), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

async fn send<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<Answer, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok::<Answer, String>(Answer { status, body })
    };
    tokio::pin!(conn);
    tokio::pin!(exchange);
    // The connection is driven here, beside the exchange, and dropped with it.
    tokio::select! {
        answer = &mut exchange => answer,
        closed = &mut conn => match closed {
            Err(e) => Err(format!("connection: {e}")),
            Ok(()) => exchange.await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_goes_over_plain_http_beyond_loopback() {
        let base = Base::resolve(None, "cloudflare").unwrap();
        assert_eq!(base.url(), "https://api.cloudflare.com:443/client/v4");
        let local = Base::resolve(Some("http://127.0.0.1:8080/api/v1/"), "desec").unwrap();
        assert_eq!(local.url(), "http://127.0.0.1:8080/api/v1");
        let err = Base::resolve(Some("http://dns.example.org/api"), "desec").unwrap_err();
        assert!(err.contains("in clear"), "{err}");
        assert!(Base::resolve(Some("ftp://x/"), "desec").is_err());
    }
}

/// A local stand-in for a provider's API, for the providers' tests: it records each request
/// (method, path with query, `Authorization`, JSON body) and answers what the test says.
#[cfg(test)]
pub(crate) mod fake {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use serde_json::Value;
    use tokio::task::JoinSet;

    /// One request as the fake API saw it.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) struct Seen {
        pub(crate) method: String,
        pub(crate) path: String,
        pub(crate) auth: String,
        pub(crate) body: Option<Value>,
    }

    type Answer = dyn Fn(&Seen) -> (u16, Value) + Send + Sync;

    /// The running fake; its tasks end when it is dropped.
    pub(crate) struct FakeApi {
        pub(crate) addr: SocketAddr,
        pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
        _tasks: JoinSet<()>,
    }

    impl FakeApi {
        /// Serves on a free loopback port, answering each request with `answer`.
        pub(crate) async fn start(
            answer: impl Fn(&Seen) -> (u16, Value) + Send + Sync + 'static,
        ) -> FakeApi {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let answer: Arc<Answer> = Arc::new(answer);
            let mut tasks = JoinSet::new();
            let log = seen.clone();
            tasks.spawn(async move {
                let mut conns = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let (log, answer) = (log.clone(), answer.clone());
                    conns.spawn(async move {
                        let service =
                            service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                let (log, answer) = (log.clone(), answer.clone());
                                async move {
                                    let method = req.method().to_string();
                                    let path = req
                                        .uri()
                                        .path_and_query()
                                        .map(|p| p.to_string())
                                        .unwrap_or_default();
                                    let auth = req
                                        .headers()
                                        .get(hyper::header::AUTHORIZATION)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_owned();
                                    let bytes = req.into_body().collect().await?.to_bytes();
                                    let body = serde_json::from_slice(&bytes).ok();
                                    let seen = Seen {
                                        method,
                                        path,
                                        auth,
                                        body,
                                    };
                                    let (status, json) = answer(&seen);
                                    log.lock().unwrap().push(seen);
                                    Ok::<_, hyper::Error>(
                                        hyper::Response::builder()
                                            .status(status)
                                            .header("content-type", "application/json")
                                            .body(Full::new(Bytes::from(json.to_string())))
                                            .unwrap(),
                                    )
                                }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            FakeApi {
                addr,
                seen,
                _tasks: tasks,
            }
        }

        /// The base URL with `prefix` as its path.
        pub(crate) fn url(&self, prefix: &str) -> String {
            format!("http://{}{prefix}", self.addr)
        }

        /// The requests so far.
        pub(crate) fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }
}
