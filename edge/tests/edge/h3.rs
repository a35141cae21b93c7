//! HTTP/3 end to end: a quinn/h3 client over real UDP sockets against the edge binary, next to
//! curl over HTTP/2 for the answers to compare with; headless Chromium forced onto QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::http::{Request, Response};
use nix::sys::signal::Signal;

use crate::support::{Edge, Upstreams, WAIT, client_config, globals, json};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// An HTTP/3 connection to the edge.
struct H3 {
    _endpoint: quinn::Endpoint,
    quic: quinn::Connection,
    send: SendRequest,
}

/// A QUIC client endpoint trusting only the edge's internal root, offering `h3`; a silent
/// server is given up on after 5 s.
fn client_endpoint(edge: &Edge) -> quinn::Endpoint {
    let tls = client_config(&edge.root(), &[b"h3"]);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// Opens an HTTP/3 connection to the edge's HTTPS port (UDP) for TLS name `name`.
async fn connect(edge: &Edge, name: &str) -> Result<H3, String> {
    let endpoint = client_endpoint(edge);
    let to = SocketAddr::from(([127, 0, 0, 1], edge.port("https")));
    let quic = endpoint
        .connect(to, name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(H3 {
        _endpoint: endpoint,
        quic,
        send,
    })
}

type Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Sends a request (its body whole) and returns the stream, response head received.
async fn start(
    send: &mut SendRequest,
    method: &str,
    url: &str,
    body: &[u8],
) -> (Response<()>, Stream) {
    let req = Request::builder().method(method).uri(url).body(()).unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    // A server answering without reading the body (file_server's 405) may stop the upload
    // first: the answer is what counts.
    if !body.is_empty() {
        let _ = stream.send_data(Bytes::copy_from_slice(body)).await;
    }
    let _ = stream.finish().await;
    let head = stream.recv_response().await.unwrap();
    (head, stream)
}

/// Reads the rest of a response body, counting bytes; keeps at most `keep` of them.
async fn read_body(stream: &mut Stream, keep: usize) -> (u64, Vec<u8>) {
    let mut total = 0u64;
    let mut kept = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        total += chunk.remaining() as u64;
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let room = keep.saturating_sub(kept.len()).min(part.len());
            kept.extend_from_slice(&part[..room]);
            let n = part.len();
            chunk.advance(n);
        }
    }
    (total, kept)
}

/// One request: status, headers and body text.
async fn fetch(
    send: &mut SendRequest,
    method: &str,
    url: &str,
    body: &[u8],
) -> (Response<()>, String) {
    let (head, mut stream) = start(send, method, url, body).await;
    let (_, kept) = read_body(&mut stream, 1 << 20).await;
    (head, String::from_utf8_lossy(&kept).into_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn site(web: &str, files: &std::path::Path) -> String {
    format!(
        "lab.example.org {{\n\ttls internal\n\tlog\n\t@files path /files/*\n\thandle @files {{\n\t\troot * {}\n\t\tfile_server\n\t}}\n\thandle {{\n\t\treverse_proxy {web}\n\t}}\n}}\n",
        files.display()
    )
}

/// An edge serving lab.example.org: /files/* from a folder, the rest from `web`.
fn start_edge(web: &str, extra_globals: &str) -> Edge {
    let dir = testkit::Scratch::new("edge-h3").unwrap();
    let files = dir.join("www");
    std::fs::create_dir_all(files.join("files")).unwrap();
    std::fs::write(files.join("files/hello.txt"), "hello over every protocol\n").unwrap();
    let text = format!("{}{}", globals(&dir, extra_globals), site(web, &files));
    let config = dir.join("Caddyfile");
    std::fs::write(&config, text).unwrap();
    Edge::start(dir, config, "--caddyfile")
}

#[test]
fn http3_answers_get_and_post_through_reverse_proxy_and_file_server_as_http2_does() {
    let ups = Upstreams::new();
    let web = ups.http("web").to_string();
    let edge = start_edge(&web, "");
    let rt = runtime();
    let url = |path: &str| format!("https://lab.example.org:{}{path}", edge.port("https"));
    rt.block_on(async {
        let mut h3 = connect(&edge, "lab.example.org").await.unwrap();
        // GET and POST through reverse_proxy.
        for (method, body) in [("GET", &b""[..]), ("POST", &b"a body of some bytes"[..])] {
            let (head, text) = fetch(&mut h3.send, method, &url("/echo?q=1"), body).await;
            assert_eq!(head.status(), 200, "{text}");
            let seen = json(&text);
            let mut args = vec!["--http2", "-X", method];
            let body_text = String::from_utf8_lossy(body).into_owned();
            if !body.is_empty() {
                args.extend(["--data-binary", body_text.as_str()]);
            }
            let over_h2 = url("/echo?q=1");
            args.push(&over_h2);
            let out = edge.curl(&args);
            assert_eq!(out.code, 0, "{out:?}");
            let h2 = json(&out.stdout);
            for key in [
                "upstream", "method", "path", "host", "xff", "xfp", "xfh", "bytes",
            ] {
                assert_eq!(
                    seen[key], h2[key],
                    "{key} over HTTP/3 {seen} and HTTP/2 {h2}"
                );
            }
            assert_eq!(seen["bytes"], body.len() as u64);
        }
        // GET and POST through file_server, the same way on both. No request body: a server
        // that answers without reading one ends the HTTP/2 stream with RST_STREAM(NO_ERROR),
        // and curl then sometimes drops the answer's body (RFC 9113 8.1 says keep it).
        for method in ["GET", "POST"] {
            let (head, text) = fetch(&mut h3.send, method, &url("/files/hello.txt"), b"").await;
            let out = edge.curl(&[
                "--http2",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                &url("/files/hello.txt"),
            ]);
            let (h2_body, h2_status) = out.stdout.rsplit_once('\n').unwrap();
            assert_eq!(head.status().as_str(), h2_status, "{method} {text}");
            assert_eq!(text, h2_body, "{method}");
        }
        let (head, text) = fetch(&mut h3.send, "GET", &url("/files/hello.txt"), b"").await;
        assert_eq!(head.status(), 200);
        assert_eq!(text, "hello over every protocol\n");
        h3.quic.close(0u32.into(), b"");
    });
    edge.stop();
    let log = edge.proc.stderr();
    assert!(
        log.contains("HTTP/3.0"),
        "the access log names the protocol: {log}"
    );
}

#[test]
fn a_gigabyte_downloads_over_http3_with_the_edges_rss_under_40_mb() {
    const GIB: u64 = 1 << 30;
    let ups = Upstreams::new();
    let web = ups.http("web").to_string();
    let edge = start_edge(&web, "");
    let rt = runtime();
    let url = format!("https://lab.example.org:{}/big?n={GIB}", edge.port("https"));
    let began = Instant::now();
    let total = rt.block_on(async {
        let mut h3 = connect(&edge, "lab.example.org").await.unwrap();
        let (head, mut stream) = start(&mut h3.send, "GET", &url, b"").await;
        assert_eq!(head.status(), 200);
        read_body(&mut stream, 0).await.0
    });
    assert_eq!(total, GIB, "every byte came");
    let peak_kib = edge.vm_hwm_kib();
    eprintln!(
        "1 GiB over HTTP/3 in {:.1} s; edge peak RSS {peak_kib} KiB",
        began.elapsed().as_secs_f64()
    );
    assert!(
        peak_kib < 40 * 1024,
        "edge peak RSS {peak_kib} KiB is over 40 MB"
    );
    edge.stop();
}

#[test]
fn a_reload_keeps_an_http3_connections_streams_and_serves_new_ones_with_the_new_config() {
    let ups = Upstreams::new();
    let web = ups.http("web").to_string();
    let web2 = ups.http("web2").to_string();
    let edge = start_edge(&web, "");
    let rt = runtime();
    let port = edge.port("https");
    rt.block_on(async {
        let mut h3 = connect(&edge, "lab.example.org").await.unwrap();
        // A download started before the reload, read in part.
        const SIZE: u64 = 64 << 20;
        let url = format!("https://lab.example.org:{port}/big?n={SIZE}");
        let (head, mut before) = start(&mut h3.send, "GET", &url, b"").await;
        assert_eq!(head.status(), 200);
        let first = before.recv_data().await.unwrap().unwrap().remaining() as u64;

        let text = std::fs::read_to_string(&edge.config)
            .unwrap()
            .replace(&web, &web2);
        std::fs::write(&edge.config, text).unwrap();
        edge.proc.signal(Signal::SIGHUP).unwrap();
        edge.proc.wait_notification("RELOADING=1", WAIT).unwrap();
        edge.proc.wait_ready(WAIT).unwrap();
        edge.proc.wait_stderr("reloaded", WAIT).unwrap();

        // A new stream on the same connection gets the new config.
        let (head, text) = fetch(
            &mut h3.send,
            "GET",
            &format!("https://lab.example.org:{port}/hi"),
            b"",
        )
        .await;
        assert_eq!(head.status(), 200);
        assert_eq!(text, "web2 /hi");
        // The old stream flows to its end.
        let (rest, _) = read_body(&mut before, 0).await;
        assert_eq!(
            first + rest,
            SIZE,
            "the stream started before the reload finished whole"
        );
        h3.quic.close(0u32.into(), b"");
    });
    edge.stop();
}

#[test]
fn alt_svc_advertises_http3_unless_protocols_leave_it_out() {
    let ups = Upstreams::new();
    let web = ups.http("web").to_string();
    let edge = start_edge(&web, "");
    let port = edge.port("https");
    for flag in ["--http1.1", "--http2"] {
        let out = edge.curl(&[
            flag,
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("https://lab.example.org:{port}/x"),
        ]);
        assert!(
            out.stdout
                .to_ascii_lowercase()
                .contains(&format!("alt-svc: h3=\":{port}\"; ma=2592000")),
            "{flag}: {out:?}"
        );
    }
    let rt = runtime();
    rt.block_on(async {
        let mut h3 = connect(&edge, "lab.example.org").await.unwrap();
        let (head, _) = fetch(
            &mut h3.send,
            "GET",
            &format!("https://lab.example.org:{port}/x"),
            b"",
        )
        .await;
        assert!(
            head.headers().get("alt-svc").is_none(),
            "not over HTTP/3 itself"
        );
        h3.quic.close(0u32.into(), b"");
    });

    // `protocols h1 h2` on reload: no Alt-Svc, and new QUIC connections are refused.
    let text = std::fs::read_to_string(&edge.config).unwrap();
    let text = text.replacen("{\n", "{\n\tservers {\n\t\tprotocols h1 h2\n\t}\n", 1);
    std::fs::write(&edge.config, text).unwrap();
    edge.proc.signal(Signal::SIGHUP).unwrap();
    edge.proc.wait_notification("RELOADING=1", WAIT).unwrap();
    edge.proc.wait_ready(WAIT).unwrap();
    edge.proc.wait_stderr("reloaded", WAIT).unwrap();
    let out = edge.curl(&[
        "--http2",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &format!("https://lab.example.org:{port}/x"),
    ]);
    assert!(out.stdout.starts_with("HTTP/2 200"), "{out:?}");
    assert!(
        !out.stdout.to_ascii_lowercase().contains("alt-svc"),
        "{out:?}"
    );
    let refused = rt.block_on(connect(&edge, "lab.example.org"));
    assert!(refused.is_err(), "HTTP/3 is off");
    edge.stop();
}

/// A QUIC varint.
fn varint(n: u64, out: &mut Vec<u8>) {
    match n {
        0..64 => out.push(n as u8),
        64..16384 => out.extend_from_slice(&(0x4000 | n as u16).to_be_bytes()),
        _ => out.extend_from_slice(&(0x8000_0000 | n as u32).to_be_bytes()),
    }
}

/// A QPACK prefixed integer (RFC 7541, 5.1) with `flags` in the first byte's high bits.
fn prefixed(n: usize, bits: u32, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << bits) - 1;
    if n < max {
        out.push(flags | n as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = n - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

#[test]
fn http3_refuses_oversized_request_headers_and_limits_concurrent_streams() {
    let ups = Upstreams::new();
    let web = ups.http("web").to_string();
    let edge = start_edge(&web, "");
    let rt = runtime();
    rt.block_on(async {
        // Written by hand: a compliant client would not send what the edge said it refuses.
        let endpoint = client_endpoint(&edge);
        let to = SocketAddr::from(([127, 0, 0, 1], edge.port("https")));
        let quic = endpoint
            .connect(to, "lab.example.org")
            .unwrap()
            .await
            .unwrap();
        let mut control = quic.open_uni().await.unwrap();
        control.write_all(&[0x00, 0x04, 0x00]).await.unwrap(); // control stream, empty SETTINGS
        let mut fields = vec![0x00, 0x00]; // no dynamic table
        fields.extend_from_slice(&[0xd1, 0xd7, 0xc1]); // :method GET, :scheme https, :path /
        fields.push(0x50); // :authority from the static table, its value literal
        prefixed(b"lab.example.org".len(), 7, 0, &mut fields);
        fields.extend_from_slice(b"lab.example.org");
        let big = "v".repeat(100 * 1024);
        prefixed(5, 3, 0x20, &mut fields);
        fields.extend_from_slice(b"x-big");
        prefixed(big.len(), 7, 0, &mut fields);
        fields.extend_from_slice(big.as_bytes());
        let mut frame = Vec::new();
        varint(0x01, &mut frame);
        varint(fields.len() as u64, &mut frame);
        frame.extend_from_slice(&fields);
        let (mut send, mut recv) = quic.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        let reply = tokio::time::timeout(WAIT, recv.read_to_end(1 << 16))
            .await
            .unwrap();
        let reply = reply.unwrap_or_default();
        // HEADERS, 8 bytes: no dynamic table, then :status (static name 24) with the
        // Huffman-coded value "431".
        assert_eq!(
            reply,
            [0x01, 0x08, 0x00, 0x00, 0x5f, 0x09, 0x83, 0x69, 0x90, 0xff],
            "a head over 64 KiB gets 431 Request Header Fields Too Large"
        );
        quic.close(0u32.into(), b"");

        // The edge grants 250 concurrent request streams (limits.h2_max_concurrent_streams).
        let h3 = connect(&edge, "lab.example.org").await.unwrap();
        let mut open = Vec::new();
        for _ in 0..250 {
            open.push(h3.quic.open_bi().await.unwrap());
        }
        let more = tokio::time::timeout(Duration::from_millis(300), h3.quic.open_bi()).await;
        assert!(more.is_err(), "a 251st stream waits for one to end");
        // Ending one (with a byte sent, so the edge knows it) makes room.
        let (mut send, mut recv) = open.pop().unwrap();
        send.write_all(&[0x01]).await.unwrap();
        send.reset(0x10cu32.into()).unwrap();
        recv.stop(0x10cu32.into()).unwrap();
        let more = tokio::time::timeout(WAIT, h3.quic.open_bi()).await;
        assert!(more.is_ok(), "a stream ended frees its place");
        h3.quic.close(0u32.into(), b"");
    });
    edge.stop();
}

/// base64(SHA-256(SubjectPublicKeyInfo)) of every certificate under `dir`, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes them.
fn spki_hashes(dir: &std::path::Path) -> Vec<String> {
    use base64::Engine;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut hashes = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "crt") {
                for der in CertificateDer::pem_file_iter(&path).unwrap() {
                    let der = der.unwrap();
                    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
                    let spki = cert.tbs_certificate.subject_pki.raw;
                    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki);
                    hashes.push(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()));
                }
            }
        }
    }
    hashes
}

#[test]
fn chromium_forced_onto_quic_loads_a_page_that_reports_h3() {
    let ups = Upstreams::new();
    let web = ups.http("web").to_string();
    let edge = start_edge(&web, "");
    let page = "<!doctype html><html><body><p id=proto>none</p><script>\
        document.getElementById('proto').textContent = \
        'protocol=' + performance.getEntries()[0].nextHopProtocol;</script></body></html>\n";
    std::fs::write(edge.dir.join("www/files/proto.html"), page).unwrap();
    let port = edge.port("https");
    let spki = spki_hashes(&edge.dir.join("storage"));
    assert!(
        !spki.is_empty(),
        "the internal CA's certificates are in storage"
    );
    let profile = edge.dir.join("chromium");
    let began = Instant::now();
    let out = crate::support::run(
        "timeout",
        &[
            "60".to_owned(),
            "/usr/bin/chromium".to_owned(),
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--no-first-run".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            "--enable-quic".to_owned(),
            format!("--origin-to-force-quic-on=lab.example.org:{port}"),
            "--host-resolver-rules=MAP lab.example.org 127.0.0.1".to_owned(),
            format!("--ignore-certificate-errors-spki-list={}", spki.join(",")),
            "--dump-dom".to_owned(),
            format!("https://lab.example.org:{port}/files/proto.html"),
        ],
    );
    eprintln!("chromium took {:.1} s", began.elapsed().as_secs_f64());
    assert!(
        out.stdout.contains("protocol=h3"),
        "the page reports HTTP/3: {out:?}"
    );
    edge.stop();
    assert!(
        edge.proc.stderr().contains("HTTP/3.0"),
        "the access log has the request over HTTP/3"
    );
}
