//! On-demand TLS against a real CA (testkit's Pebble, whose DNS answers 127.0.0.1 for every
//! name) and a small `ask` endpoint in the test that approves some names and counts the
//! questions it is asked.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use testkit::{Pebble, Scratch};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Edge, Upstreams, client_config};

/// The ask endpoint: approves names starting with "ok", refuses the rest, counts each.
struct Ask {
    addr: std::net::SocketAddr,
    asked: Arc<Mutex<HashMap<String, usize>>>,
}

impl Ask {
    fn start(ups: &Upstreams) -> Ask {
        let listener = ups
            .runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let asked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counts = asked.clone();
        ups.runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counts = counts.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let counts = counts.clone();
                        async move {
                            let query = req.uri().query().unwrap_or("").to_owned();
                            let domain = query
                                .split('&')
                                .find_map(|p| p.strip_prefix("domain="))
                                .unwrap_or("")
                                .to_owned();
                            let keeps_token = query.split('&').any(|p| p == "token=t1");
                            *counts.lock().unwrap().entry(domain.clone()).or_default() += 1;
                            let status = if domain.starts_with("ok") && keeps_token {
                                200
                            } else {
                                403
                            };
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
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
        Ask { addr, asked }
    }

    fn times(&self, name: &str) -> usize {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// A TLS handshake for `name` trusting only `root`; the leaf's DER on success.
async fn handshake(port: u16, root: PathBuf, name: &'static str) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(&root, &[b"http/1.1"]));
    let tls = connector
        .connect(ServerName::try_from(name).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[test]
fn on_demand_orders_once_for_fifty_concurrent_handshakes_and_a_refused_name_never_reaches_the_ca() {
    let http_port = testkit::ports::free_port().unwrap();
    let https_port = testkit::ports::free_port().unwrap();
    let pebble = Pebble::builder()
        .http_port(http_port)
        .tls_port(https_port)
        .start()
        .unwrap();
    let ups = Upstreams::new();
    let root = pebble.api_ca_path().with_file_name("issuing-root.pem");
    std::fs::write(
        &root,
        ups.runtime.block_on(pebble.issuing_root_pem()).unwrap(),
    )
    .unwrap();
    let ask = Ask::start(&ups);
    let dir = Scratch::new("edge-on-demand").unwrap();
    let caddyfile = dir.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\thttp_port {http_port}\n\thttps_port {https_port}\n\tdefault_bind 127.0.0.1\n\
             \tstorage file_system {}\n\temail ops@example.org\n\tacme_ca {}\n\tacme_ca_root {}\n\
             \ton_demand_tls {{\n\t\task http://{}/check?token=t1\n\t}}\n}}\n\n\
             https:// {{\n\ttls {{\n\t\ton_demand\n\t}}\n\trespond \"on demand {{host}}\"\n}}\n",
            dir.join("storage").display(),
            pebble.directory_url(),
            pebble.api_ca_path().display(),
            ask.addr,
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, caddyfile, "--caddyfile");
    assert_eq!(pebble.orders(), 0, "nothing is ordered before a handshake");

    // 50 handshakes at once for one new name: all wait on one order and get its certificate,
    // which chains to Pebble's root (the client trusts nothing else).
    let leaves: Vec<Result<Vec<u8>, String>> = ups.runtime.block_on(async {
        let tries =
            (0..50).map(|_| tokio::spawn(handshake(https_port, root.clone(), "ok.example.org")));
        let mut out = Vec::new();
        for t in tries {
            out.push(t.await.unwrap());
        }
        out
    });
    let first = leaves[0]
        .clone()
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.proc.stderr()));
    for leaf in &leaves {
        assert_eq!(leaf.as_ref().unwrap(), &first);
    }
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());
    assert_eq!(ask.times("ok.example.org"), 1);

    // The name is now served like any other: no new question, no new order.
    let again = ups
        .runtime
        .block_on(handshake(https_port, root.clone(), "ok.example.org"))
        .unwrap();
    assert_eq!(again, first);

    // A name the endpoint refuses: the handshake fails, the CA sees no order, and the refusal
    // is remembered, so a second handshake does not ask again.
    for _ in 0..3 {
        let refused = ups
            .runtime
            .block_on(handshake(https_port, root.clone(), "evil.example.org"));
        assert!(refused.is_err(), "{refused:?}");
    }
    assert_eq!(ask.times("evil.example.org"), 1);
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());

    // The site answers over the new certificate.
    let out = crate::support::curl(&[
        "-sS".into(),
        "--cacert".into(),
        root.display().to_string(),
        "--resolve".into(),
        format!("ok.example.org:{https_port}:127.0.0.1"),
        format!("https://ok.example.org:{https_port}/"),
    ]);
    assert_eq!(out.stdout, "on demand ok.example.org", "{out:?}");
    edge.stop();
}
