//! `reverse_proxy { transport http { read_timeout; max_response_header } }` answer as Caddy
//! 2.6 does on the same Caddyfile (see `differential`): an upstream that never answers, and
//! one whose response head is over the limit; and `max_conns_per_host` against an upstream
//! that counts its connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::Scratch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::differential::Both;
use crate::support::{Edge, Upstreams, WAIT, globals};

/// An upstream that reads the request head and then sends nothing until the proxy gives up
/// and closes: only a timeout on the proxy's side ends the exchange.
fn silent(upstreams: &Upstreams) -> SocketAddr {
    upstreams.serve(|mut stream| async move {
        let mut buf = vec![0u8; 65536];
        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
}

/// An upstream answering 200 with an `X-Big` header of `size` bytes and the body "ok".
fn big_header(upstreams: &Upstreams, size: usize) -> SocketAddr {
    let head: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
            "b".repeat(size)
        )
        .into_boxed_str(),
    );
    upstreams.raw(head, b"ok")
}

#[test]
fn an_upstream_silent_past_read_timeout_gets_the_same_status_as_from_caddy() {
    let upstreams = Upstreams::new();
    let silent = silent(&upstreams);
    let both = Both::start_with(
        upstreams,
        "http://plain.local {\n\treverse_proxy @SILENT@ {\n\t\ttransport http {\n\t\t\tread_timeout 300ms\n\t\t}\n\t}\n}\n",
        &[("@SILENT@", silent.to_string())],
    );
    both.get("/").caddy_status(504).assert_same_head(&[]);
    // The edge gave up at read_timeout, not at its 60 s default.
    let log = both.procs().0.stderr();
    assert!(log.contains("upstream response timed out"), "{log}");
    assert!(log.contains("timeout=300ms"), "{log}");
    both.stop();
}

#[test]
fn a_response_head_over_max_response_header_gets_the_same_status_as_from_caddy() {
    let upstreams = Upstreams::new();
    let big = big_header(&upstreams, 40_000);
    let small = big_header(&upstreams, 1_000);
    let both = Both::start_with(
        upstreams,
        "http://plain.local {\n\treverse_proxy /big @BIG@ {\n\t\ttransport http {\n\t\t\tmax_response_header 16KB\n\t\t}\n\t}\n\
         \treverse_proxy /small @SMALL@ {\n\t\ttransport http {\n\t\t\tmax_response_header 16KB\n\t\t}\n\t}\n}\n",
        &[("@BIG@", big.to_string()), ("@SMALL@", small.to_string())],
    );
    both.get("/big").caddy_status(502).assert_same_head(&[]);
    both.get("/small").caddy_status(200).assert_same(&["x-big"]);
    both.stop();
}

/// Connections an upstream has open now, and the most it had at once.
#[derive(Default)]
struct Counts {
    open: usize,
    most: usize,
}

#[test]
fn max_conns_per_host_keeps_the_upstreams_busy_connections_at_the_limit_and_the_rest_wait() {
    let upstreams = Upstreams::new();
    let counts = Arc::new(Mutex::new(Counts::default()));
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let upstream = {
        let counts = counts.clone();
        upstreams.serve(move |mut stream| {
            let counts = counts.clone();
            let mut gate = gate_rx.clone();
            async move {
                {
                    let mut c = counts.lock().unwrap();
                    c.open += 1;
                    c.most = c.most.max(c.open);
                }
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                'requests: loop {
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break 'requests,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.clear();
                    // Every answer waits for the test to open the gate.
                    let _ = gate.wait_for(|open| *open).await;
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        break;
                    }
                }
                counts.lock().unwrap().open -= 1;
            }
        })
    };
    let dir = Scratch::new("edge-max-conns").unwrap();
    let caddyfile = dir.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{}http://plain.local {{\n\treverse_proxy {upstream} {{\n\t\ttransport http {{\n\t\t\tmax_conns_per_host 2\n\t\t}}\n\t}}\n}}\n",
            globals(&dir, "")
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, caddyfile, "--caddyfile");
    let port = edge.port("http");
    let clients: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || crate::differential::Req::get("/").send(port).status))
        .collect();
    // Two requests hold the two slots; the other two say they wait for one.
    let deadline = Instant::now() + WAIT;
    while edge.proc.stderr().matches("at max_conns_per_host").count() < 2 {
        assert!(Instant::now() < deadline, "{}", edge.proc.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(counts.lock().unwrap().open, 2, "two busy connections");
    gate.send(true).unwrap();
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
    assert_eq!(
        counts.lock().unwrap().most,
        2,
        "never more than two at once"
    );
    edge.stop();
}

/// The keepalive timers (seconds left) of the established TCP connections to `port` that
/// process `pid` holds, from /proc/net/tcp (timer kind 2 is keepalive, its time in clock
/// ticks of 1/100 s).
fn keepalive_timers(pid: u32, port: u16) -> Vec<f64> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
            let (kind, when) = f.get(5)?.split_once(':')?;
            let inode = *f.get(9)?;
            let mine = inodes.iter().any(|i| i == inode);
            (remote_port == port && *f.get(3)? == "01" && mine && kind == "02")
                .then(|| u64::from_str_radix(when, 16).ok())
                .flatten()
                .map(|ticks| ticks as f64 / 100.0)
        })
        .collect()
}

#[test]
fn keepalive_interval_sets_tcp_keepalive_probes_on_upstream_connections_as_caddy_does() {
    let upstreams = Upstreams::new();
    let web = upstreams.http("web");
    let both = Both::start_with(
        upstreams,
        "http://plain.local {\n\treverse_proxy @WEB@ {\n\t\ttransport http {\n\t\t\tkeepalive_interval 7s\n\t\t}\n\t}\n}\n",
        &[("@WEB@", web.to_string())],
    );
    both.get("/").caddy_status(200).assert_same(&["x-upstream"]);
    // Both keep the upstream connection idle after the answer; its first probe is due
    // within 7 s.
    let (edge, caddy) = both.procs();
    for (who, proc) in [("edge", edge), ("caddy", caddy)] {
        let timers = keepalive_timers(proc.pid(), web.port());
        assert!(
            !timers.is_empty(),
            "{who}: no upstream connection with keepalive"
        );
        assert!(timers.iter().all(|t| *t <= 7.0), "{who}: {timers:?}");
    }
    both.stop();
}

/// An upstream that reads a request's head and then nothing more, keeping the connection
/// open: a proxy writing a large body to it stalls once the socket buffers are full.
fn not_reading(upstreams: &Upstreams) -> SocketAddr {
    upstreams.serve(|mut stream| async move {
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        std::future::pending::<()>().await;
        drop(stream);
    })
}

/// POSTs a `size`-byte body to `port` from a thread of its own while reading the answer;
/// returns the answer's status line (empty if none came within 10 s).
fn post_large(port: u16, size: usize) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let head =
            format!("POST / HTTP/1.1\r\nHost: plain.local\r\nContent-Length: {size}\r\n\r\n");
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        let chunk = vec![b'x'; 1 << 16];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            if writer.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or("").to_owned()
}

#[test]
fn an_upstream_not_reading_a_body_past_write_timeout_gets_the_same_status_as_from_caddy() {
    let upstreams = Upstreams::new();
    let stuck = not_reading(&upstreams);
    let both = Both::start_with(
        upstreams,
        "http://plain.local {\n\treverse_proxy @STUCK@ {\n\t\ttransport http {\n\t\t\twrite_timeout 500ms\n\t\t}\n\t}\n}\n",
        &[("@STUCK@", stuck.to_string())],
    );
    let size = 48 << 20;
    let (edge, caddy) = std::thread::scope(|s| {
        let edge = s.spawn(|| post_large(both.edge_port(), size));
        let caddy = s.spawn(|| post_large(both.caddy_port(), size));
        (edge.join().unwrap(), caddy.join().unwrap())
    });
    assert!(caddy.starts_with("HTTP/1.1 5"), "caddy: {caddy:?}");
    assert_eq!(edge, caddy);
    both.stop();
}
