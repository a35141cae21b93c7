//! Bad input from the network: each is answered correctly, logged, and the edge keeps
//! serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::support::{Edge, Upstreams, WAIT, client_config};

/// An edge with a plain-HTTP site and a TLS site on one upstream, limits from `limits`
/// (TOML), plus `extra_sites` (TOML).
fn toml_edge(ups: &Upstreams, limits: &str, extra_sites: &str) -> Edge {
    let web = ups.http("web");
    let dir = testkit::Scratch::new("edge").unwrap();
    let text = format!(
        "http_port = 0\nhttps_port = 0\nbind = [\"127.0.0.1\"]\nstorage = {:?}\n\n[limits]\n{limits}\n\n\
         [[site]]\naddresses = [\"http://plain.local\"]\n[[site.reverse_proxy]]\nto = [\"{web}\"]\n\n\
         [[site]]\naddresses = [\"app.local\"]\n[[site.reverse_proxy]]\nto = [\"{web}\"]\n\n{extra_sites}",
        dir.join("storage").display().to_string()
    );
    let config = dir.join("edge.toml");
    std::fs::write(&config, text).unwrap();
    Edge::start(dir, config, "-c")
}

/// A TCP connection to the edge's listener `name` with a read timeout.
fn connect(edge: &Edge, name: &str, read_timeout: Duration) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", edge.port(name))).unwrap();
    stream.set_read_timeout(Some(read_timeout)).unwrap();
    stream
}

/// Sends raw bytes to the plain HTTP port and reads until the edge closes (or 30 s).
fn raw(edge: &Edge, request: &[u8]) -> String {
    let mut stream = connect(edge, "http", Duration::from_secs(30));
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn still_serves(edge: &Edge) {
    let out = edge.curl(&["https://app.local:@HTTPS@/alive"]);
    assert_eq!(out.stdout, "web /alive", "curl: {}", out.stderr);
}

#[test]
fn malformed_request_lines_get_400_and_are_logged() {
    let ups = Upstreams::new();
    let edge = toml_edge(&ups, "", "");
    for bad in [
        &b"NOT A REQUEST\r\n\r\n"[..],
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost plain.local\r\n\r\n",
    ] {
        let answer = raw(&edge, bad);
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad:?} got {answer:?}");
    }
    edge.proc
        .wait_stderr("connection closed on error", WAIT)
        .unwrap();
    let ok = raw(
        &edge,
        b"GET /fine HTTP/1.1\r\nHost: plain.local\r\nConnection: close\r\n\r\n",
    );
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("web /fine"),
        "{ok}"
    );
    still_serves(&edge);
    edge.stop();
}

#[test]
fn oversized_headers_get_431() {
    let ups = Upstreams::new();
    let edge = toml_edge(&ups, "max_header_bytes = 16384", "");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: plain.local\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let answer = raw(&edge, big.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    let fits = format!(
        "GET /fits HTTP/1.1\r\nHost: plain.local\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    assert!(raw(&edge, fits.as_bytes()).starts_with("HTTP/1.1 200"));
    edge.proc
        .wait_stderr("error=message head is too large", WAIT)
        .unwrap();
    still_serves(&edge);
    edge.stop();
}

#[test]
fn a_client_sending_headers_one_byte_at_a_time_is_cut_off() {
    let ups = Upstreams::new();
    let edge = toml_edge(&ups, "header_read_timeout = \"1s\"", "");
    let mut stream = connect(&edge, "http", Duration::from_millis(400));
    let started = Instant::now();
    let request = b"GET / HTTP/1.1\r\nHost: plain.local\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    // The slow client is the stimulus: one byte, then up to 400 ms waiting for the edge to
    // hang up, over and over.
    for byte in request {
        if stream.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match stream.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {
                closed = true;
                break;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let took = started.elapsed();
    assert!(closed, "the edge never cut off the slow client");
    assert!(
        took < Duration::from_secs(10),
        "cut off only after {took:?}"
    );
    edge.proc
        .wait_stderr("connection closed on error", WAIT)
        .unwrap();
    still_serves(&edge);
    edge.stop();
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let ups = Upstreams::new();
    let edge = toml_edge(&ups, "idle_timeout = \"1s\"", "");
    let mut stream = connect(&edge, "http", Duration::from_secs(30));
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: plain.local\r\n\r\n")
        .unwrap();
    // The answer arrives and the connection stays open for more; then, left idle, the edge
    // closes it (read returns 0) well before the 30 s read timeout.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the idle connection was not closed: {e}"),
        }
    }
    let answer = String::from_utf8_lossy(&seen);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("web /first"),
        "{answer}"
    );
    assert!(!answer.contains("connection: close"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        started.elapsed()
    );
    edge.proc
        .wait_stderr("idle connection closed", WAIT)
        .unwrap();
    still_serves(&edge);
    edge.stop();
}

#[test]
fn an_idle_http2_connection_is_closed_despite_keep_alive_pings() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let ups = Upstreams::new();
    // Pings go every half idle timeout; they must not count as use.
    let edge = toml_edge(&ups, "idle_timeout = \"1s\"", "");
    let port = edge.port("https");
    let root = edge.root();
    ups.runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(client_config(&root, &[b"h2"]))
            .connect(ServerName::try_from("app.local").unwrap(), tcp)
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let request = hyper::Request::get(format!("https://app.local:{port}/first"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "web /first");
        let ended = tokio::time::timeout(Duration::from_secs(30), driver).await;
        assert!(
            ended.is_ok(),
            "the idle HTTP/2 connection is still open after 30 s"
        );
    });
    edge.proc
        .wait_stderr("idle connection closed", WAIT)
        .unwrap();
    still_serves(&edge);
    edge.stop();
}

#[test]
fn tls_garbage_is_refused_and_logged() {
    let ups = Upstreams::new();
    let edge = toml_edge(&ups, "", "");
    let mut stream = connect(&edge, "https", Duration::from_secs(30));
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.local\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 200"));
    let mut stream = connect(&edge, "https", Duration::from_secs(30));
    stream
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef])
        .unwrap();
    stream.write_all(&[0xff; 64]).unwrap();
    let _ = stream.read_to_end(&mut Vec::new());
    edge.proc.wait_stderr("TLS handshake failed", WAIT).unwrap();
    still_serves(&edge);
    edge.stop();
}

/// Records every certificate a server presents and accepts none.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<CertificateDer<'static>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.lock().unwrap().push(end_entity.clone().into_owned());
        Err(rustls::Error::General("recorded".into()))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Handshakes with SNI `name` (or none) and returns the certificates the edge presented.
fn presented(edge: &Edge, name: Option<&str>) -> Vec<CertificateDer<'static>> {
    let recorder = Arc::new(Recorder::default());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.enable_sni = name.is_some();
    let server = ServerName::try_from(name.unwrap_or("ignored.invalid").to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut tcp = connect(edge, "https", Duration::from_secs(30));
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            break;
        }
    }
    recorder.0.lock().unwrap().clone()
}

#[test]
fn an_unknown_sni_name_is_refused_without_showing_another_sites_certificate() {
    let ups = Upstreams::new();
    let edge = toml_edge(&ups, "", "");
    assert_eq!(
        presented(&edge, Some("app.local")).len(),
        1,
        "a served name gets its certificate"
    );
    assert!(presented(&edge, Some("other.example.org")).is_empty());
    assert!(
        presented(&edge, None).is_empty(),
        "no SNI and no IP site: refused"
    );
    edge.proc
        .wait_stderr("sni=\"other.example.org\"", WAIT)
        .unwrap();
    let out = edge.curl(&["https://other.example.org:@HTTPS@/"]);
    assert_ne!(out.code, 0, "{out:?}");
    still_serves(&edge);
    edge.stop();
}

#[test]
fn an_ip_address_site_is_served_to_clients_without_sni() {
    let ups = Upstreams::new();
    let edge = toml_edge(
        &ups,
        "",
        "[[site]]\naddresses = [\"127.0.0.1\"]\n[[site.reverse_proxy]]\nto = [\"127.0.0.1:1\"]\n",
    );
    assert_eq!(presented(&edge, None).len(), 1);
    edge.stop();
}

fn echo_json(answer: &str) -> serde_json::Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let body = body.lines().find(|l| l.starts_with('{')).unwrap_or(body);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[test]
fn request_smuggling_shapes_are_refused_or_reframed() {
    let ups = Upstreams::new();
    let edge = toml_edge(&ups, "", "");
    // Content-Length with Transfer-Encoding: the edge goes by chunked (RFC 9112 section 6.3),
    // forwards one consistently framed request without Content-Length, then closes the
    // connection (section 6.1), so the bytes after it are never read as a request.
    let answer = raw(
        &edge,
        b"POST /echo HTTP/1.1\r\nHost: plain.local\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /second HTTP/1.1\r\nHost: plain.local\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = echo_json(&answer);
    assert_eq!(seen["bytes"], 0, "{seen}");
    assert!(
        seen["content_length"].is_null(),
        "both framings never reach the upstream: {seen}"
    );
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        !answer.contains("/second"),
        "nothing after such a request is served: {answer}"
    );

    for bad in [
        &b"POST /echo HTTP/1.1\r\nHost: plain.local\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
        b"POST /echo HTTP/1.1\r\nHost: plain.local\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"POST /echo HTTP/1.0\r\nHost: plain.local\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: plain.local\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ] {
        let answer = raw(&edge, bad);
        assert!(answer.starts_with("HTTP/1.1 400"), "{} got {answer:?}", String::from_utf8_lossy(bad));
    }
    for logged in [
        "error=invalid content-length parsed",
        "error=unexpected transfer-encoding parsed",
        "error=invalid transfer-encoding parsed",
    ] {
        edge.proc.wait_stderr(logged, WAIT).unwrap();
    }
    still_serves(&edge);
    edge.stop();
}

#[test]
fn an_upstream_closing_mid_response_truncates_it_visibly() {
    let ups = Upstreams::new();
    let broken = ups.raw(
        "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: text/plain\r\n\r\n",
        b"0123456789",
    );
    let edge = toml_edge(
        &ups,
        "",
        &format!(
            "[[site]]\naddresses = [\"other.example.org\"]\ntls = \"internal\"\n[[site.reverse_proxy]]\nto = [\"{broken}\"]\n"
        ),
    );
    for flag in ["--http1.1", "--http2"] {
        let out = edge.curl(&[flag, "https://other.example.org:@HTTPS@/file"]);
        assert_ne!(out.code, 0, "curl must see the truncation: {out:?}");
        assert!(out.stdout.len() <= 10, "{out:?}");
    }
    edge.proc
        .wait_stderr("response body failed midway", WAIT)
        .unwrap();
    still_serves(&edge);
    edge.stop();
}

#[test]
fn an_upstream_closing_its_idle_keep_alive_connections_fails_no_request() {
    let ups = Upstreams::new();
    // Answers one request per connection as keep-alive, then closes: every pooled
    // connection is dead by the time the next request wants it.
    let once = ups.raw(
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n",
        b"hello",
    );
    let edge = toml_edge(
        &ups,
        "",
        &format!(
            "[[site]]\naddresses = [\"other.example.org\"]\ntls = \"internal\"\n[[site.reverse_proxy]]\nto = [\"{once}\"]\n"
        ),
    );
    for _ in 0..5 {
        let out = edge.curl(&[
            "-w",
            "\n%{http_code}",
            "https://other.example.org:@HTTPS@/again",
        ]);
        assert_eq!(out.stdout, "hello\n200", "{out:?}");
    }
    edge.stop();
}

#[test]
fn unreachable_and_slow_upstreams_get_502_and_504_with_short_bodies() {
    let ups = Upstreams::new();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let web = ups.http("slow");
    let edge = toml_edge(
        &ups,
        "upstream_response_timeout = \"1s\"",
        &format!(
            "[[site]]\naddresses = [\"other.example.org\"]\ntls = \"internal\"\n[[site.reverse_proxy]]\npath = \"/dead*\"\nto = [\"{dead}\"]\n[[site.reverse_proxy]]\nto = [\"{web}\"]\n"
        ),
    );
    let out = edge.curl(&[
        "-w",
        "\n%{http_code}",
        "https://other.example.org:@HTTPS@/dead",
    ]);
    let (body, code) = out.stdout.rsplit_once('\n').unwrap();
    assert_eq!(code, "502", "{out:?}");
    assert!(body.len() < 100 && body.contains("bad gateway"), "{out:?}");
    let out = edge.curl(&[
        "-w",
        "\n%{http_code}",
        "https://other.example.org:@HTTPS@/slow?ms=5000",
    ]);
    let (body, code) = out.stdout.rsplit_once('\n').unwrap();
    assert_eq!(code, "504", "{out:?}");
    assert!(
        body.len() < 100 && body.contains("gateway timeout"),
        "{out:?}"
    );
    edge.proc
        .wait_stderr("upstream response timed out", WAIT)
        .unwrap();
    still_serves(&edge);
    edge.stop();
}
