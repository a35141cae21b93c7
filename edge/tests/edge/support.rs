//! Test parts for the edge: upstream servers started in the test on port 0, the edge binary
//! with sd_notify readiness, and curl with an explicit environment.

use std::convert::Infallible;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::http::{Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use testkit::{Proc, ProcBuilder, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const EDGE: &str = env!("CARGO_BIN_EXE_edge");
pub const WAIT: Duration = Duration::from_secs(60);

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Servers upstream of the edge, each on its own port, run on a private runtime.
pub struct Upstreams {
    pub runtime: tokio::runtime::Runtime,
    slow: Arc<(std::sync::Mutex<u32>, std::sync::Condvar)>,
}

impl Upstreams {
    pub fn new() -> Upstreams {
        Upstreams {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            slow: Arc::default(),
        }
    }

    /// Waits until `n` requests for `/slow` have reached the upstreams.
    pub fn wait_slow_requests(&self, n: u32) {
        let (count, changed) = &*self.slow;
        let guard = count.lock().unwrap();
        let (guard, timeout) = changed.wait_timeout_while(guard, WAIT, |c| *c < n).unwrap();
        assert!(
            !timeout.timed_out(),
            "only {} slow requests arrived",
            *guard
        );
    }

    /// Listens on a free loopback port and runs `serve` on each accepted connection.
    pub fn serve<F, Fut>(&self, serve: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = self
            .runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        self.runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        });
        addr
    }

    /// An HTTP/1.1 server named `name`:
    /// - `/echo`: reads the whole body (counting, not keeping it) and answers with JSON of
    ///   what it saw: method, path, Host, X-Forwarded-*, header names, body bytes;
    /// - `/big?n=N`: streams N bytes;
    /// - `/text`: 8 KiB of text/html;
    /// - `/slow?ms=N`: answers after N ms;
    /// - anything else: "NAME PATH".
    pub fn http(&self, name: &'static str) -> SocketAddr {
        let slow = self.slow.clone();
        self.serve(move |stream| {
            let slow = slow.clone();
            async move {
                let service = service_fn(move |req| respond(name, req, slow.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            }
        })
    }

    /// An HTTP/1.1 server whose every answer is 200 with the text `answer` makes of the request
    /// head and its whole body.
    pub fn http_with<F>(&self, answer: F) -> SocketAddr
    where
        F: Fn(&hyper::http::request::Parts, &[u8]) -> String + Send + Sync + 'static,
    {
        let answer = Arc::new(answer);
        self.serve(move |stream| {
            let answer = answer.clone();
            async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = match body.collect().await {
                            Ok(collected) => collected.to_bytes(),
                            Err(_) => Bytes::new(),
                        };
                        let text = answer(&parts, &body);
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "text/plain; charset=utf-8")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })
    }

    /// A WebSocket echo server.
    pub fn websocket(&self) -> SocketAddr {
        self.serve(|stream| async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                if message.is_close() || ws.send(message).await.is_err() {
                    break;
                }
            }
        })
    }

    /// A raw server that answers every request with `head` and `body`, then closes the
    /// connection (an upstream that dies mid-response).
    pub fn raw(&self, head: &'static str, body: &'static [u8]) -> SocketAddr {
        self.serve(move |mut stream| async move {
            let mut buf = vec![0u8; 65536];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body).await;
            let _ = stream.shutdown().await;
        })
    }
}

fn query_number(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn respond(
    name: &'static str,
    req: Request<Incoming>,
    slow: Arc<(std::sync::Mutex<u32>, std::sync::Condvar)>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let full = |text: String, kind: &'static str| {
        Response::builder()
            .header("content-type", kind)
            .header("x-upstream", name)
            .body(Full::new(Bytes::from(text)).boxed())
            .unwrap()
    };
    match path.as_str() {
        "/echo" => {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let seen = serde_json::json!({
                "upstream": name,
                "method": req.method().as_str(),
                "path": req.uri().to_string(),
                "host": header("host"),
                "xff": header("x-forwarded-for"),
                "xfp": header("x-forwarded-proto"),
                "xfh": header("x-forwarded-host"),
                "content_length": header("content-length"),
                "transfer_encoding": header("transfer-encoding"),
                "headers": req.headers().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            });
            let mut body = req.into_body();
            let mut bytes = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            let mut seen = seen;
            seen["bytes"] = bytes.into();
            Ok(full(seen.to_string(), "application/json"))
        }
        "/big" => {
            let n = query_number(&req, "n");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len() as u64);
                    let frame = Frame::data(chunk.slice(..take as usize));
                    Some((Ok::<_, Infallible>(frame), left - take))
                }
            });
            Ok(Response::builder()
                .header("content-length", n)
                .header("content-type", "application/octet-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap())
        }
        "/text" => Ok(full(
            "<p>hello, compressible world</p>\n".repeat(256),
            "text/html; charset=utf-8",
        )),
        "/slow" => {
            {
                let (count, changed) = &*slow;
                *count.lock().unwrap() += 1;
                changed.notify_all();
            }
            tokio::time::sleep(Duration::from_millis(query_number(&req, "ms"))).await;
            Ok(full(format!("{name} slow"), "text/plain"))
        }
        _ => Ok(full(format!("{name} {path}"), "text/plain")),
    }
}

/// A running edge and its scratch folder.
pub struct Edge {
    pub proc: Proc,
    pub dir: Scratch,
    pub config: PathBuf,
}

/// The global options every test Caddyfile starts with: free ports, loopback, scratch storage.
pub fn globals(dir: &Scratch, extra: &str) -> String {
    format!(
        "{{\n\thttp_port 0\n\thttps_port 0\n\tdefault_bind 127.0.0.1\n\tstorage file_system {}\n{extra}}}\n\n",
        dir.join("storage").display()
    )
}

impl Edge {
    /// Starts `edge run` on a prepared config.
    pub fn start(dir: Scratch, config: PathBuf, flag: &str) -> Edge {
        let proc = ProcBuilder::new(EDGE)
            .args([OsStr::new("run"), OsStr::new(flag), config.as_os_str()])
            .env(
                "LABKIT_LOG",
                std::env::var("EDGE_TEST_LOG").unwrap_or("info,edge=debug".into()),
            )
            .notify()
            .spawn()
            .unwrap();
        proc.wait_ready(WAIT).unwrap();
        Edge { proc, dir, config }
    }

    /// The address of the listener named `name` ("http" or "https") from the STATUS line.
    pub fn port(&self, name: &str) -> u16 {
        let notes = self.proc.notifications();
        let status = notes
            .iter()
            .rev()
            .flat_map(|n| n.lines())
            .find_map(|l| l.strip_prefix("STATUS="))
            .unwrap_or_else(|| panic!("no STATUS line in {notes:?}"));
        status
            .split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|addr| addr.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("no {name} listener in {status}"))
    }

    /// The internal root certificate's path.
    pub fn root(&self) -> PathBuf {
        self.dir.join("storage/pki/authorities/local/root.crt")
    }

    /// curl against the edge: `--resolve` maps `host` on the edge's ports to 127.0.0.1 and the
    /// internal root is the only trusted CA.
    pub fn curl(&self, args: &[&str]) -> Ran {
        let mut all: Vec<String> = vec!["-sS".into(), "--max-time".into(), "120".into()];
        all.push("--cacert".into());
        all.push(self.root().display().to_string());
        for port in [self.port("http"), self.port("https")] {
            for host in [
                "lab.example.org",
                "git.example.org",
                "new.example.org",
                "plain.local",
                "app.local",
                "other.example.org",
            ] {
                all.push("--resolve".into());
                all.push(format!("{host}:{port}:127.0.0.1"));
            }
        }
        all.extend(args.iter().map(|a| {
            a.replace("@HTTPS@", &self.port("https").to_string())
                .replace("@HTTP@", &self.port("http").to_string())
        }));
        curl(&all)
    }

    /// Peak resident memory of the edge process, in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&self) {
        self.proc.stop(WAIT).unwrap();
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// An HTTP/1.1 request to 127.0.0.1:`port` (Host `localhost:PORT` unless given); returns
/// (status, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: localhost:{port}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Runs `program` with `args`, no stdin and only PATH in its environment.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Ran {
    let output = Command::new(program)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs curl with `args` and only PATH in its environment.
pub fn curl(args: &[String]) -> Ran {
    run("curl", args)
}

/// A rustls client config trusting only `root`.
pub fn client_config(root: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The reference lab's Caddyfile, `examples/edge/Caddyfile` in the repository.
pub fn lab_caddyfile_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/edge/Caddyfile")
}

/// The reference lab's site blocks: its Caddyfile without the comments and the global options
/// block, so a test can put its own global options in front.
pub fn lab_sites() -> String {
    let text = std::fs::read_to_string(lab_caddyfile_path()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let text = lines.join("\n");
    let sites = match text.trim_start().strip_prefix("{\n") {
        Some(rest) => &rest[rest.find("\n}").expect("the global block closes") + 2..],
        None => text.as_str(),
    };
    format!("{}\n", sites.trim())
}

/// `text` as JSON, or a panic that shows it.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}
