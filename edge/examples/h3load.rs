//! A small HTTP/3 load generator for `scripts/bench/edge` (Debian's h2load has no QUIC): a
//! fixed number of connections, each with a fixed number of request loops, for a fixed time;
//! prints requests/s and the 99th percentile latency.
//!
//!   h3load --cacert ROOT.crt --connect 127.0.0.1:PORT --conns 8 --streams 8 --secs 8 URL
//!
//! The TLS name and `:authority` come from URL; `--connect` is where the UDP packets go.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

struct Args {
    cacert: String,
    connect: SocketAddr,
    conns: usize,
    streams: usize,
    secs: u64,
    url: hyper::http::Uri,
}

fn parse() -> Result<Args, String> {
    let mut cacert = None;
    let mut connect = None;
    let mut conns = 8;
    let mut streams = 8;
    let mut secs = 8;
    let mut url = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--cacert" => cacert = Some(value()?),
            "--connect" => connect = Some(value()?.parse().map_err(|e| format!("--connect: {e}"))?),
            "--conns" => conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "--streams" => streams = value()?.parse().map_err(|e| format!("--streams: {e}"))?,
            "--secs" => secs = value()?.parse().map_err(|e| format!("--secs: {e}"))?,
            other => url = Some(other.parse().map_err(|e| format!("URL {other:?}: {e}"))?),
        }
    }
    Ok(Args {
        cacert: cacert.ok_or("--cacert is required")?,
        connect: connect.ok_or("--connect is required")?,
        conns,
        streams,
        secs,
        url: url.ok_or("a URL is required")?,
    })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(why) => {
            eprintln!("h3load: {why}");
            return ExitCode::from(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("h3load: {why}");
            ExitCode::from(69)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&args.cacert).map_err(|e| format!("{}: {e}", args.cacert))?
    {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", args.cacert))?)
            .map_err(|e| format!("{}: {e}", args.cacert))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| e.to_string())?;
    let client = quinn::ClientConfig::new(Arc::new(crypto));
    let name = args.url.host().ok_or("the URL has no host")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let mut loops = Vec::new();
    for _ in 0..args.conns {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(client.clone());
        let quic = endpoint
            .connect(args.connect, &name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            drop(endpoint);
        });
        for _ in 0..args.streams {
            let mut send = send.clone();
            let url = args.url.clone();
            loops.push(tokio::spawn(async move {
                let mut times = Vec::new();
                let mut failed = 0u64;
                while Instant::now() < deadline {
                    let start = Instant::now();
                    if one(&mut send, &url).await.is_ok() {
                        times.push(start.elapsed().as_micros() as u64);
                    } else {
                        failed += 1;
                    }
                }
                (times, failed)
            }));
        }
    }
    let began = Instant::now();
    let mut times = Vec::new();
    let mut failed = 0;
    for task in loops {
        let (t, f) = task.await.map_err(|e| e.to_string())?;
        times.extend(t);
        failed += f;
    }
    let elapsed = began.elapsed().as_secs_f64();
    times.sort_unstable();
    let p99 = times.get(times.len() * 99 / 100).copied().unwrap_or(0);
    println!(
        "requests/s {:.0} p99_ms {:.2} ok {} failed {failed}",
        times.len() as f64 / elapsed,
        p99 as f64 / 1000.0,
        times.len()
    );
    Ok(())
}

/// One GET, its body read whole.
async fn one(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    url: &hyper::http::Uri,
) -> Result<(), String> {
    let req = hyper::http::Request::get(url.clone())
        .body(())
        .map_err(|e| e.to_string())?;
    let mut stream = send.send_request(req).await.map_err(|e| e.to_string())?;
    stream.finish().await.map_err(|e| e.to_string())?;
    let head = stream.recv_response().await.map_err(|e| e.to_string())?;
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        let n = chunk.remaining();
        chunk.advance(n);
    }
    if head.status() != 200 {
        return Err(format!("status {}", head.status()));
    }
    Ok(())
}
