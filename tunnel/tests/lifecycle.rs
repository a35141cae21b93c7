//! The daemon's life on loopback: hot reload by file save and SIGHUP, graceful SIGTERM,
//! reconnection after a server restart, many concurrent visitors without leaks.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use testkit::{Proc, Scratch};

/// A stream through service `addr` that keeps writing a numbered pattern and checks the echo
/// arrives in order; `stop` ends it and returns how many bytes came back intact.
struct Flow {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<TcpStream>,
    reader: std::thread::JoinHandle<Result<u64, String>>,
}

impl Flow {
    fn start(addr: SocketAddr) -> Flow {
        let stream = visit(addr);
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut chunk = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    for byte in chunk.iter_mut() {
                        *byte = (n % 251) as u8;
                        n += 1;
                    }
                    stream
                        .write_all(&chunk)
                        .expect("the stream through A broke");
                }
                stream
            })
        };
        let reader = {
            let mut stream = stream;
            let received = received.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut buf = [0u8; 16 * 1024];
                loop {
                    let got = match stream.read(&mut buf) {
                        Ok(0) => return Ok(n),
                        Ok(got) => got,
                        Err(err) => return Err(format!("after {n} bytes: {err}")),
                    };
                    for byte in &buf[..got] {
                        if *byte != (n % 251) as u8 {
                            return Err(format!("byte {n} out of order"));
                        }
                        n += 1;
                    }
                    received.store(n, Ordering::Relaxed);
                }
            })
        };
        Flow {
            stop,
            received,
            writer,
            reader,
        }
    }

    /// Waits until `more` further bytes came back in order.
    fn advance(&self, more: u64) {
        let target = self.received.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + WAIT;
        // Polled: the reader thread has no event to wait on short of every read.
        while self.received.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the stream through A stalled");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let stream = self.writer.join().unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        self.reader.join().unwrap().unwrap()
    }
}

fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, WAIT),
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn wait_reloaded(proc: &Proc) {
    proc.wait_notification("RELOADING=1", WAIT).unwrap();
    proc.wait_ready(WAIT).unwrap();
}

#[test]
fn reload_adds_and_removes_services_while_another_keeps_flowing() {
    let dir = Scratch::new("reload").unwrap();
    let local = echo_service();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("", &[("a", "token-ta"), ("c", "token-tc")]),
    );
    let server = server(&server_toml);
    let control = control_addr(&server);
    let (a, c) = (service_addr(&server, "a"), service_addr(&server, "c"));
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control,
            "",
            &[("a", "token-ta", local), ("c", "token-tc", local)],
        ),
    );
    let client = client(&client_toml);
    echo_through(c, b"c works before the reload");

    let flow = Flow::start(a);
    flow.advance(1 << 20);

    // The server's file is replaced atomically, the client's rewritten in place.
    replace(
        &server_toml,
        &server_config("", &[("a", "token-ta"), ("b", "token-tb")]),
    );
    wait_reloaded(&server);
    server.wait_stderr("service stopped", WAIT).unwrap();
    assert!(refused(c), "the removed service's port is closed");
    let b = service_addr(&server, "b");
    flow.advance(1 << 20);

    std::fs::write(
        &client_toml,
        client_config(
            control,
            "",
            &[("a", "token-ta", local), ("b", "token-tb", local)],
        ),
    )
    .unwrap();
    wait_reloaded(&client);
    echo_through(b, &payload(200_000));
    flow.advance(1 << 20);

    let carried = flow.finish();
    assert!(carried >= 3 << 20, "{carried} bytes came back");
    // Service A's control channel was never reopened on either side.
    assert_eq!(
        server
            .stderr()
            .matches("control channel open service=a ")
            .count(),
        1
    );
    assert_eq!(
        client
            .stderr()
            .matches("control channel open service=a ")
            .count(),
        1
    );
}

#[test]
fn an_invalid_new_config_is_rejected_and_the_old_one_keeps_running() {
    let dir = Scratch::new("reload").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("", &[("a", "token-ta")]),
    );
    let server = server(&server_toml);
    let a = service_addr(&server, "a");
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[("a", "token-ta", echo_service())],
        ),
    );
    let _client = client(&client_toml);
    let flow = Flow::start(a);
    flow.advance(1 << 16);
    replace(
        &server_toml,
        "[server]\nbind_addr = \"127.0.0.1:0\"\nbogus = 1\n",
    );
    wait_reloaded(&server);
    let line = server
        .wait_stderr("new config rejected; keeping the old one", WAIT)
        .unwrap();
    assert!(line.contains("server.bogus"), "{line}");
    flow.advance(1 << 20);
    echo_through(a, b"a still works");
    assert!(flow.finish() > 1 << 20);
}

#[test]
fn a_changed_service_restarts_and_sighup_reloads_too() {
    let dir = Scratch::new("reload").unwrap();
    let local = echo_service();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("", &[("a", "token-ta"), ("d", "token-old")]),
    );
    let server = server(&server_toml);
    let control = control_addr(&server);
    let a = service_addr(&server, "a");
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control,
            "",
            &[("a", "token-ta", local), ("d", "token-new", local)],
        ),
    );
    let client = tunnel(&["client"], &client_toml).spawn().unwrap();
    client
        .wait_stderr("server refused service d: wrong token", WAIT)
        .unwrap();
    server
        .wait_stderr("control channel open service=a ", WAIT)
        .unwrap();
    let flow = Flow::start(a);
    flow.advance(1 << 16);
    // d's token changes to the one the client has: saving the file reloads.
    std::fs::write(
        &server_toml,
        server_config("", &[("a", "token-ta"), ("d", "token-new")]),
    )
    .unwrap();
    wait_reloaded(&server);
    server
        .wait_stderr("control channel open service=d ", WAIT)
        .unwrap();
    echo_through(
        service_addr_after_reload(&server, "d"),
        b"d with its new token",
    );
    flow.advance(1 << 20);
    // SIGHUP reloads as well; nothing changed, so nothing restarts.
    server.signal(Signal::SIGHUP).unwrap();
    wait_reloaded(&server);
    server.wait_stderr("reloading cause=SIGHUP", WAIT).unwrap();
    flow.advance(1 << 20);
    assert!(flow.finish() > 2 << 20);
    assert_eq!(server.stderr().matches("service stopped").count(), 1);
}

/// The last address logged for `service` (a restarted service logs again).
fn service_addr_after_reload(server: &Proc, service: &str) -> SocketAddr {
    let needle = format!("service listening service={service} ");
    let stderr = server.stderr();
    let line = stderr.lines().rev().find(|l| l.contains(&needle)).unwrap();
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn sigterm_stops_accepting_and_lets_open_connections_finish() {
    let dir = Scratch::new("stop").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("", &[("a", "token-ta")]),
    );
    let server = server(&server_toml);
    let a = service_addr(&server, "a");
    let control = control_addr(&server);
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(control, "", &[("a", "token-ta", echo_service())]),
    );
    let client = client(&client_toml);
    let mut open = visit(a);
    open.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).unwrap();

    server.signal(Signal::SIGTERM).unwrap();
    server.wait_notification("STOPPING=1", WAIT).unwrap();
    server
        .wait_stderr("waiting for open connections", WAIT)
        .unwrap();
    assert!(refused(a), "no new visitors after SIGTERM");
    assert!(refused(control), "no new clients after SIGTERM");
    open.write_all(b"after!").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    assert!(
        server.try_status().is_none(),
        "the server waits for the open connection"
    );
    drop(open);
    server.expect_exit(0, WAIT).unwrap();
    client.stop(WAIT).unwrap();
}

#[test]
fn sigterm_closes_connections_left_open_after_the_grace_period() {
    let dir = Scratch::new("stop").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("grace_period = 1", &[("a", "token-ta")]),
    );
    let server = server(&server_toml);
    let a = service_addr(&server, "a");
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[("a", "token-ta", echo_service())],
        ),
    );
    let _client = client(&client_toml);
    let mut open = visit(a);
    open.write_all(b"x").unwrap();
    let mut buf = [0u8; 1];
    open.read_exact(&mut buf).unwrap();
    server.signal(Signal::SIGTERM).unwrap();
    server.expect_exit(0, WAIT).unwrap();
    assert!(server.stderr().contains("grace period over"));
    assert!(closed_by_peer(&mut open, WAIT));
}

#[test]
fn clients_reconnect_by_themselves_after_the_server_restarts() {
    let dir = Scratch::new("restart").unwrap();
    let local = echo_service();
    let first = server(&write(
        &dir,
        "server.toml",
        &server_config("", &[("a", "token-ta"), ("b", "token-tb")]),
    ));
    let control = control_addr(&first);
    let (a, b) = (service_addr(&first, "a"), service_addr(&first, "b"));
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control,
            "",
            &[("a", "token-ta", local), ("b", "token-tb", local)],
        ),
    );
    let client = client(&client_toml);
    echo_through(a, b"first life");
    first.stop(WAIT).unwrap();
    client
        .wait_stderr("control channel lost: reconnecting", WAIT)
        .unwrap();

    // The same ports again, as a restarted server would bind them.
    let again = format!(
        "[server]\nbind_addr = \"{control}\"\n[server.services.a]\ntoken = \"token-ta\"\nbind_addr = \"{a}\"\n\
         [server.services.b]\ntoken = \"token-tb\"\nbind_addr = \"{b}\"\n"
    );
    let second = server(&write(&dir, "server2.toml", &again));
    second
        .wait_stderr("control channel open service=a ", WAIT)
        .unwrap();
    second
        .wait_stderr("control channel open service=b ", WAIT)
        .unwrap();
    echo_through(a, b"second life");
    echo_through(b, &payload(300_000));
}

#[test]
fn a_thousand_concurrent_visitors_complete_and_leave_no_descriptors_behind() {
    let dir = Scratch::new("many").unwrap();
    let server = server(&write(
        &dir,
        "server.toml",
        &server_config("", &[("a", "token-ta")]),
    ));
    let a = service_addr(&server, "a");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.listen(4096).unwrap()
    });
    let local_addr = local.local_addr().unwrap();
    runtime.spawn(async move {
        while let Ok((mut stream, _)) = local.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let client = client(&write(
        &dir,
        "client.toml",
        &client_config(control_addr(&server), "", &[("a", "token-ta", local_addr)]),
    ));
    echo_through(a, b"warm up");
    // Either count may catch the pool of idle data channels (8) refilling, and each process
    // keeps up to 16 empty pipes (32 descriptors) for the next connections' splicing: that
    // many descriptors more are not a leak; a leak would scale with the 1,000 visitors.
    const POOL: usize = 8 + 32;
    let settled = |proc: &Proc, baseline: usize| {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = fd_count(proc.pid());
            if now <= baseline + POOL || Instant::now() > deadline {
                return now;
            }
            // Polled: closing sockets gives no event a test can wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let server_before = fd_count(server.pid());
    let client_before = fd_count(client.pid());

    let done = runtime.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000u32 {
            tasks.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut stream = tokio::net::TcpStream::connect(a).await?;
                let message = format!("visitor {i} says hello");
                stream.write_all(message.as_bytes()).await?;
                stream.shutdown().await?;
                let mut back = Vec::new();
                stream.read_to_end(&mut back).await?;
                Ok::<bool, std::io::Error>(back == message.as_bytes())
            });
        }
        let mut ok = 0;
        let timed = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(result) = tasks.join_next().await {
                match result {
                    Ok(Ok(true)) => ok += 1,
                    other => eprintln!("visitor failed: {other:?}"),
                }
            }
        })
        .await;
        assert!(timed.is_ok(), "visitors did not finish");
        ok
    });
    if done != 1000 {
        let stderr = server.stderr();
        eprintln!(
            "connected {} finished {} closed {}",
            stderr.matches("visitor connected").count(),
            stderr.matches("visitor connection finished").count(),
            stderr.matches("visitor closed").count()
        );
        let stderr = client.stderr();
        eprintln!(
            "client finished {}",
            stderr.matches("connection finished").count()
        );
        for line in server.stderr().lines().chain(client.stderr().lines()) {
            if line.contains("WARN") || line.contains("ERROR") || line.contains("ended") {
                eprintln!("{line}");
            }
        }
    }
    assert_eq!(done, 1000, "every visitor got its bytes back");
    let server_after = settled(&server, server_before);
    let client_after = settled(&client, client_before);
    assert!(
        server_after <= server_before + POOL,
        "server fds {server_before} -> {server_after}"
    );
    assert!(
        client_after <= client_before + POOL,
        "client fds {client_before} -> {client_after}"
    );
}
