//! Connection limits hold for upgraded connections and follow reloads: a WebSocket keeps its
//! place under `max_connections` until it closes and is closed when idle, and a reload that
//! changes `max_connections` applies it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Edge, Upstreams, WAIT};

/// How long a connection over the limit is watched for an answer that must not come. Only
/// the broken edge answers in this window, so a slow machine can hide the defect but never
/// fail a correct edge.
const QUIET: Duration = Duration::from_secs(1);

/// An edge from TOML with `limits`, serving `http://plain.local` from `upstream`.
fn edge(limits: &str, upstream: &str) -> Edge {
    let dir = testkit::Scratch::new("edge-limits").unwrap();
    let config = dir.join("edge.toml");
    std::fs::write(&config, toml(&dir, limits, upstream)).unwrap();
    Edge::start(dir, config, "-c")
}

fn toml(dir: &testkit::Scratch, limits: &str, upstream: &str) -> String {
    format!(
        "http_port = 0\nhttps_port = 0\nbind = [\"127.0.0.1\"]\nstorage = {:?}\n\n[limits]\n{limits}\n\n\
         [[site]]\naddresses = [\"http://plain.local\"]\n[[site.reverse_proxy]]\nto = [\"{upstream}\"]\n",
        dir.join("storage").display().to_string()
    )
}

/// Sends a keep-alive request for `path` on a new connection.
fn request(edge: &Edge, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", edge.port("http"))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: plain.local\r\n\r\n").unwrap();
    stream
}

/// The first bytes of the answer on `stream`, or `None` if nothing came within `wait`.
fn answer(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn websocket(port: u16) -> Ws {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (ws, response) = tokio_tungstenite::client_async("ws://plain.local/ws", tcp)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::text(text));
}

#[test]
fn an_open_websocket_keeps_its_connection_permit_until_it_closes() {
    let ups = Upstreams::new();
    let ws_upstream = ups.websocket().to_string();
    let edge = edge("max_connections = 1", &ws_upstream);
    let port = edge.port("http");
    let mut ws = ups.runtime.block_on(async {
        let mut ws = websocket(port).await;
        echo(&mut ws, "holding the only place").await;
        ws
    });
    let mut waiting = request(&edge, "/next");
    assert_eq!(
        answer(&mut waiting, QUIET),
        None,
        "a second connection was served while the WebSocket held the only place"
    );
    ups.runtime.block_on(async {
        echo(&mut ws, "still open").await;
        ws.close(None).await.unwrap();
        tokio::time::timeout(WAIT, async { while ws.next().await.is_some() {} })
            .await
            .expect("the WebSocket closes");
    });
    // The edge ends the upgraded connection when both sides have closed.
    drop(ws);
    let served = answer(&mut waiting, WAIT).expect("served once the WebSocket closed");
    assert!(served.starts_with("HTTP/1.1 "), "{served}");
    edge.stop();
}

#[test]
fn an_idle_websocket_is_closed_after_the_idle_timeout() {
    let ups = Upstreams::new();
    let ws_upstream = ups.websocket().to_string();
    let edge = edge("idle_timeout = \"1s\"", &ws_upstream);
    let port = edge.port("http");
    ups.runtime.block_on(async {
        let mut ws = websocket(port).await;
        echo(&mut ws, "then silence").await;
        // Nothing is sent: the edge must end the connection on its own.
        let end = tokio::time::timeout(WAIT, async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(
            end.is_ok(),
            "the idle WebSocket was still open after {WAIT:?}"
        );
    });
    edge.stop();
}

#[test]
fn a_reload_lowering_max_connections_applies_to_the_next_connection() {
    let ups = Upstreams::new();
    let web = ups.http("web").to_string();
    // One place more than the edge has worker threads (one per core): under the old limit
    // the second connection would find a place whichever worker the kernel gives it to.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let edge = edge(&format!("max_connections = {}", cores + 1), &web);
    std::fs::write(&edge.config, toml(&edge.dir, "max_connections = 1", &web)).unwrap();
    edge.proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    edge.proc.wait_notification("RELOADING=1", WAIT).unwrap();
    edge.proc.wait_ready(WAIT).unwrap();

    let mut first = request(&edge, "/first");
    let got = answer(&mut first, WAIT).expect("the first connection is served");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // `first` stays open (keep-alive): it holds the only place now.
    let mut second = request(&edge, "/second");
    assert_eq!(
        answer(&mut second, QUIET),
        None,
        "a second connection was served over the reloaded limit of 1"
    );
    drop(first);
    let got = answer(&mut second, WAIT).expect("served once the first connection closed");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    edge.stop();
}
