//! `reverse_proxy` in full, against Caddy 2.6 on the same Caddyfile: load-balancing policies
//! (which upstream answers, where the choice is deterministic; cookies Caddy set are followed
//! by the edge), active health checks leaving out a failing upstream, `lb_try_duration`
//! with passive health, HTTPS upstreams with a private CA, h2c and Unix socket upstreams, and
//! `flush_interval -1` streaming.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::http::{Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::differential::{Both, Req};
use crate::support::{Upstreams, WAIT};

/// Answers "NAME VERSION PATH" (and the Host it saw) to every request.
fn named(
    name: &'static str,
) -> impl Fn(Request<Incoming>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> + Clone
{
    move |req: Request<Incoming>| {
        let host = req
            .headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .or(req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("-")
            .to_owned();
        let text = format!(
            "{name} {:?} {} host={host}",
            req.version(),
            req.uri().path()
        );
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(text)))))
    }
}

fn dead_port() -> SocketAddr {
    // Free, and outside the ephemeral range, so no later bind(0) takes it.
    SocketAddr::from(([127, 0, 0, 1], testkit::ports::free_port().unwrap()))
}

#[test]
fn first_and_round_robin_choose_the_upstream_caddy_chooses() {
    let ups = Upstreams::new();
    let (a, b, c) = (ups.http("a"), ups.http("b"), ups.http("c"));
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\thandle /first* {\n\t\treverse_proxy @A@ @B@ @C@ {\n\t\t\tlb_policy first\n\t\t}\n\t}\n\thandle /rr* {\n\t\treverse_proxy @A@ @B@ @C@ {\n\t\t\tlb_policy round_robin\n\t\t}\n\t}\n}\n",
        &[
            ("@A@", a.to_string()),
            ("@B@", b.to_string()),
            ("@C@", c.to_string()),
        ],
    );
    for _ in 0..3 {
        both.get("/first").assert_same(&[]).caddy_status(200);
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        let pair = both.get("/rr");
        pair.assert_same(&[]);
        seen.push(pair.caddy.text());
    }
    assert_eq!(seen, ["b /rr", "c /rr", "a /rr", "b /rr"], "Caddy's order");
    both.stop();
}

#[test]
fn hash_policies_send_each_key_to_the_upstream_caddy_sends_it_to() {
    let ups = Upstreams::new();
    let (a, b, c) = (ups.http("a"), ups.http("b"), ups.http("c"));
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\thandle /uri/* {\n\t\treverse_proxy @A@ @B@ @C@ {\n\t\t\tlb_policy uri_hash\n\t\t}\n\t}\n\thandle /hdr/* {\n\t\treverse_proxy @A@ @B@ @C@ {\n\t\t\tlb_policy header X-User\n\t\t}\n\t}\n\thandle /ip/* {\n\t\treverse_proxy @A@ @B@ @C@ {\n\t\t\tlb_policy ip_hash\n\t\t}\n\t}\n\thandle /host/* {\n\t\treverse_proxy @A@ @B@ @C@ {\n\t\t\tlb_policy header Host\n\t\t}\n\t}\n}\n",
        &[
            ("@A@", a.to_string()),
            ("@B@", b.to_string()),
            ("@C@", c.to_string()),
        ],
    );
    let mut upstreams = std::collections::BTreeSet::new();
    for n in 0..24 {
        let pair = both.get(&format!("/uri/item-{n}?page={n}"));
        pair.assert_same(&[]).caddy_status(200);
        upstreams.insert(pair.caddy.text().chars().next());
    }
    assert_eq!(
        upstreams.len(),
        3,
        "uri_hash spreads keys over all upstreams"
    );
    for user in ["alice", "bob", "carol", "dave", "erin", "frank", "x"] {
        both.request(&Req::get("/hdr/x").header("X-User", user))
            .assert_same(&[])
            .caddy_status(200);
    }
    // Without the header the choice is random on both: any upstream, but an answer.
    let pair = both.get("/hdr/none");
    assert_eq!((pair.edge.status, pair.caddy.status), (200, 200));
    both.get("/ip/x").assert_same(&[]);
    for host in ["plain.local", "plain.local:80"] {
        both.request(&Req::get("/host/x").host(Some(host)))
            .assert_same(&[]);
    }
    both.stop();
}

#[test]
fn a_cookie_caddy_set_leads_the_edge_to_the_same_upstream() {
    let ups = Upstreams::new();
    let (a, b, c) = (ups.http("a"), ups.http("b"), ups.http("c"));
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\treverse_proxy @A@ @B@ @C@ {\n\t\tlb_policy cookie srv t0ps3cret\n\t}\n}\n",
        &[
            ("@A@", a.to_string()),
            ("@B@", b.to_string()),
            ("@C@", c.to_string()),
        ],
    );
    let mut followed = 0;
    for _ in 0..8 {
        let first = both.get("/x");
        let set = first
            .caddy
            .header("set-cookie")
            .expect("caddy sets the cookie");
        let edge_set = first
            .edge
            .header("set-cookie")
            .expect("the edge sets the cookie");
        assert!(
            set.starts_with("srv=") && set.ends_with("; Path=/"),
            "{set}"
        );
        assert!(
            edge_set.starts_with("srv=") && edge_set.ends_with("; Path=/"),
            "{edge_set}"
        );
        let cookie = set.trim_end_matches("; Path=/");
        let again = both.request(&Req::get("/x").header("Cookie", &format!("other=1; {cookie}")));
        again.assert_same(&["set-cookie"]);
        assert_eq!(
            again.caddy.text(),
            first.caddy.text(),
            "caddy follows its cookie"
        );
        assert_eq!(again.edge.header("set-cookie"), None);
        followed += 1;
    }
    assert_eq!(followed, 8);
    // A forged value is no upstream's: a new choice and a new cookie on both.
    let forged = both.request(&Req::get("/x").header("Cookie", "srv=00ff"));
    assert!(forged.edge.header("set-cookie").is_some());
    assert!(forged.caddy.header("set-cookie").is_some());
    both.stop();
}

#[test]
fn an_upstream_failing_its_health_check_gets_no_requests_and_all_failing_is_503() {
    let ups = Upstreams::new();
    let (a, b) = (ups.http("a"), ups.http("b"));
    // /health answers "a /health" or "b /health": the body test passes only a.
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\thandle /some/* {\n\t\treverse_proxy @A@ @B@ {\n\t\t\tlb_policy round_robin\n\t\t\thealth_uri /health\n\t\t\thealth_interval 200ms\n\t\t\thealth_timeout 2s\n\t\t\thealth_status 2xx\n\t\t\thealth_body \"^a /\"\n\t\t\thealth_headers {\n\t\t\t\tX-Check yes\n\t\t\t}\n\t\t}\n\t}\n\thandle /none/* {\n\t\treverse_proxy @A@ @B@ {\n\t\t\thealth_uri /health\n\t\t\thealth_interval 200ms\n\t\t\thealth_body \"^nobody\"\n\t\t}\n\t}\n}\n",
        &[("@A@", a.to_string()), ("@B@", b.to_string())],
    );
    // Both run the first check at start; wait (bounded) until each has left b out.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let answers: Vec<(String, String)> = (0..4)
            .map(|_| {
                let pair = both.get("/some/x");
                (pair.edge.text(), pair.caddy.text())
            })
            .collect();
        if answers
            .iter()
            .all(|(e, c)| e == "a /some/x" && c == "a /some/x")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b was never left out: {answers:?}"
        );
    }
    for _ in 0..6 {
        both.get("/some/y").assert_same(&[]).caddy_status(200);
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let pair = both.get("/none/x");
        if pair.edge.status == 503 && pair.caddy.status == 503 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never 503:\n{}{}",
            pair.edge,
            pair.caddy
        );
    }
    both.get("/none/y").assert_same_head(&[]).caddy_status(503);
    both.stop();
}

#[test]
fn lb_try_duration_with_passive_health_gets_past_a_dead_upstream_as_caddy_does() {
    let ups = Upstreams::new();
    let live = ups.http("live");
    let dead = dead_port();
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\treverse_proxy @DEAD@ @LIVE@ {\n\t\tlb_policy first\n\t\tlb_try_duration 3s\n\t\tlb_try_interval 50ms\n\t\tfail_duration 1m\n\t}\n}\n",
        &[("@DEAD@", dead.to_string()), ("@LIVE@", live.to_string())],
    );
    for _ in 0..3 {
        both.get("/x").assert_same(&[]).caddy_status(200);
    }
    // A body is not lost to the failed connection.
    both.request(&Req::new("POST", "/echo").body("payload"))
        .caddy_status(200);
    both.stop();
}

/// A CA, and a certificate for 127.0.0.1 it signed, as PEM files in `dir`; returns the CA's
/// path and the server's TLS config.
fn test_ca(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge test upstream CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca_path = dir.join("upstream-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca_path, Arc::new(config))
}

/// An HTTPS upstream (HTTP/1.1 or HTTP/2 by ALPN) answering as [`named`] does.
fn tls_upstream(ups: &Upstreams, config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = ups
        .runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    ups.runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service_fn(named("tls")))
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service_fn(named("tls")))
                        .await;
                }
            });
        }
    });
    addr
}

#[test]
fn https_upstreams_are_verified_against_the_configured_ca_as_caddy_does() {
    let dir = testkit::Scratch::new("edge-tls-upstream").unwrap();
    let ups = Upstreams::new();
    let (ca, config) = test_ca(dir.path());
    let up = tls_upstream(&ups, config);
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\thandle /ca/* {\n\t\treverse_proxy https://@UP@ {\n\t\t\ttransport http {\n\t\t\t\ttls_trusted_ca_certs @CA@\n\t\t\t}\n\t\t}\n\t}\n\thandle /named/* {\n\t\treverse_proxy https://@UP@ {\n\t\t\ttransport http {\n\t\t\t\ttls_trusted_ca_certs @CA@\n\t\t\t\ttls_server_name localhost\n\t\t\t\tversions 1.1\n\t\t\t}\n\t\t}\n\t}\n\thandle /skip/* {\n\t\treverse_proxy @UP@ {\n\t\t\ttransport http {\n\t\t\t\ttls_insecure_skip_verify\n\t\t\t}\n\t\t}\n\t}\n\thandle /h2/* {\n\t\treverse_proxy https://@UP@ {\n\t\t\ttransport http {\n\t\t\t\ttls_trusted_ca_certs @CA@\n\t\t\t\tversions 2\n\t\t\t}\n\t\t}\n\t}\n\thandle /untrusted/* {\n\t\treverse_proxy https://@UP@\n\t}\n}\n",
        &[("@UP@", up.to_string()), ("@CA@", ca.display().to_string())],
    );
    for target in ["/ca/x", "/named/x", "/skip/x", "/h2/x"] {
        let pair = both.get(target);
        pair.caddy_status(200);
        assert!(pair.edge.text().starts_with("tls HTTP/"), "{}", pair.edge);
        // Caddy speaks HTTP/2 when ALPN allows; with versions 1.1 or 2 alone both agree.
        if target != "/ca/x" && target != "/skip/x" {
            pair.assert_same(&[]);
        }
    }
    let pair = both.get("/untrusted/x");
    pair.assert_same_head(&[]).caddy_status(502);
    both.stop();
}

#[test]
fn h2c_and_unix_socket_upstreams_are_reached_as_caddy_reaches_them() {
    let dir = testkit::Scratch::new("edge-h2c-unix").unwrap();
    let ups = Upstreams::new();
    let h2c = {
        let listener = ups
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        ups.runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service_fn(named("h2c"))),
                );
            }
        });
        addr
    };
    let socket = dir.path().join("up.sock");
    {
        let _guard = ups.runtime.enter();
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        ups.runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(named("unix"))),
                );
            }
        });
    }
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\thandle /h2c/* {\n\t\treverse_proxy h2c://@H2C@\n\t}\n\thandle /versions/* {\n\t\treverse_proxy @H2C@ {\n\t\t\ttransport http {\n\t\t\t\tversions h2c 2\n\t\t\t}\n\t\t}\n\t}\n\thandle /unix/* {\n\t\treverse_proxy unix/@SOCK@\n\t}\n}\n",
        &[
            ("@H2C@", h2c.to_string()),
            ("@SOCK@", socket.display().to_string()),
        ],
    );
    for target in ["/h2c/x", "/versions/x", "/unix/x"] {
        both.get(target).assert_same(&[]).caddy_status(200);
    }
    assert!(
        both.get("/h2c/x")
            .edge
            .text()
            .starts_with("h2c HTTP/2.0 /h2c/x")
    );
    both.stop();
}

#[test]
fn flush_interval_minus_one_passes_each_chunk_on_before_the_response_ends() {
    let ups = Upstreams::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let up = {
        let listener = ups
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = gate.clone();
        ups.runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let gate = gate.clone();
                let service = service_fn(move |_req: Request<Incoming>| {
                    let gate = gate.clone();
                    async move {
                        // "first", then "second" only once the test has seen "first".
                        let chunks = futures_util::stream::unfold(0, move |n| {
                            let gate = gate.clone();
                            async move {
                                match n {
                                    0 => Some((
                                        Ok::<_, Infallible>(Frame::data(Bytes::from("first\n"))),
                                        1,
                                    )),
                                    1 => {
                                        gate.acquire().await.ok()?.forget();
                                        Some((Ok(Frame::data(Bytes::from("second\n"))), 2))
                                    }
                                    _ => None,
                                }
                            }
                        });
                        Ok::<_, Infallible>(Response::new(StreamBody::new(chunks).boxed()))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    };
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\treverse_proxy @UP@ {\n\t\tflush_interval -1\n\t}\n}\n",
        &[("@UP@", up.to_string())],
    );
    for port in [both.edge_port(), both.caddy_port()] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(b"GET /stream HTTP/1.1\r\nHost: plain.local\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("first") {
            let n = stream
                .read(&mut buf)
                .expect("the first chunk arrives while the response is open");
            assert!(n > 0, "closed before the first chunk");
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(!String::from_utf8_lossy(&seen).contains("second"));
        gate.add_permits(1);
        let _ = stream.read_to_end(&mut seen);
        assert!(
            String::from_utf8_lossy(&seen).contains("second"),
            "port {port}"
        );
    }
    both.stop();
}

#[test]
fn header_up_and_header_down_in_every_form_change_what_caddy_changes() {
    let ups = Upstreams::new();
    let named = ups.http("n");
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\thandle /echo* {\n\t\treverse_proxy @ECHO@ {\n\t\t\theader_up +X-Add added\n\t\t\theader_up -X-Drop\n\t\t\theader_up X-Set set-{method}\n\t\t\theader_up X-Rep \"^v-(.*)$\" \"w-$1\"\n\t\t\theader_up Host upstream.example\n\t\t}\n\t}\n\thandle /down* {\n\t\treverse_proxy @N@ {\n\t\t\theader_down -X-Upstream\n\t\t\theader_down +X-Down one\n\t\t\theader_down Content-Type \"text/(.*)\" \"application/$1\"\n\t\t\theader_down X-Set \"{path}\"\n\t\t}\n\t}\n}\n",
        &[("@N@", named.to_string())],
    );
    both.request(
        &Req::get("/echo")
            .header("X-Add", "client")
            .header("X-Drop", "gone")
            .header("X-Rep", "v-1")
            .header("X-Set", "client"),
    )
    .assert_same(&[])
    .caddy_status(200);
    both.get("/down/x")
        .assert_same(&["x-upstream", "x-down", "content-type", "x-set"])
        .caddy_status(200);
    both.stop();
}
