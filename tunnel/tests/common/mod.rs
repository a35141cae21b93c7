//! Shared parts of the tunnel's tests: starting the real binary (and rathole), reading the
//! addresses it bound from its log, local services, and visitors.

#![allow(dead_code)]

pub mod udp;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::ports::{free_port, retry_on_port_clash};
use testkit::{Proc, ProcBuilder, Scratch};

pub const TUNNEL: &str = env!("CARGO_BIN_EXE_tunnel");
pub const WAIT: Duration = Duration::from_secs(20);

/// Writes `text` to `name` in `dir` and returns the path.
pub fn write(dir: &Scratch, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces the file at `path` atomically (write a temporary file, rename it over).
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `tunnel ARGS -c CONFIG`, with readiness by sd_notify.
pub fn tunnel(args: &[&str], config: &Path) -> ProcBuilder {
    ProcBuilder::new(TUNNEL)
        .args(args)
        .arg("-c")
        .arg(config)
        .env("LABKIT_LOG", "info,tunnel=debug")
        .notify()
}

/// Starts `tunnel server` and waits until it is ready.
pub fn server(config: &Path) -> Proc {
    let proc = tunnel(&["server"], config).spawn().unwrap();
    proc.wait_ready(WAIT).unwrap();
    proc
}

/// Starts `tunnel client` and waits until every control channel is open.
pub fn client(config: &Path) -> Proc {
    let proc = tunnel(&["client"], config).spawn().unwrap();
    proc.wait_ready(WAIT).unwrap();
    proc
}

/// The `addr=` field of the first log line containing `needle`.
pub fn logged_addr(proc: &Proc, needle: &str) -> SocketAddr {
    let line = proc.wait_stderr(needle, WAIT).unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line:?}"));
    addr.parse().unwrap()
}

/// The control port a server bound.
pub fn control_addr(server: &Proc) -> SocketAddr {
    logged_addr(server, "control port listening")
}

/// The port a server bound for `service`.
pub fn service_addr(server: &Proc, service: &str) -> SocketAddr {
    logged_addr(server, &format!("service listening service={service} "))
}

/// An echo service on a free loopback port: every connection gets its bytes back.
pub fn echo_service() -> SocketAddr {
    serve(TcpListener::bind("127.0.0.1:0").unwrap(), |mut stream| {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// An HTTP service answering every request with `body`, then closing.
pub fn http_service(listener: TcpListener, body: &'static str) -> SocketAddr {
    serve(listener, move |mut stream| {
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    })
}

/// Serves each connection to `listener` on its own thread with `handle`.
pub fn serve(
    listener: TcpListener,
    handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let handle = handle.clone();
            std::thread::spawn(move || handle(stream));
        }
    });
    addr
}

/// Connects a visitor to `addr`, with read and write timeouts so a broken tunnel fails the
/// test instead of hanging it.
pub fn visit(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// Sends `payload` through an echo service at `addr` and checks it comes back whole.
pub fn echo_through(addr: SocketAddr, payload: &[u8]) {
    let mut stream = visit(addr);
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let payload = payload.to_vec();
        std::thread::spawn(move || {
            stream.write_all(&payload).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), payload.len(), "echoed length through {addr}");
    assert!(back == payload, "echoed bytes through {addr} differ");
}

/// Whether the peer closed `stream` (EOF or reset) within the read timeout it was given.
pub fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A patterned payload of `len` bytes.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A server config with one service per `(name, token)`, all on port 0 of loopback.
pub fn server_config(extra: &str, services: &[(&str, &str)]) -> String {
    let mut text = format!("[server]\nbind_addr = \"127.0.0.1:0\"\n{extra}\n");
    for (name, token) in services {
        text.push_str(&format!(
            "[server.services.{name}]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:0\"\n"
        ));
    }
    text
}

/// A client config of `remote` with one service per `(name, token, local)`.
pub fn client_config(
    remote: SocketAddr,
    extra: &str,
    services: &[(&str, &str, SocketAddr)],
) -> String {
    let mut text = format!("[client]\nremote_addr = \"{remote}\"\n{extra}\n");
    for (name, token, local) in services {
        text.push_str(&format!(
            "[client.services.{name}]\ntoken = \"{token}\"\nlocal_addr = \"{local}\"\n"
        ));
    }
    text
}

/// rathole 0.5.0, installed by scripts/test.
pub fn rathole() -> PathBuf {
    testkit::proc::which("rathole").expect("rathole not installed: run scripts/test")
}

/// The tunnel as `mode` ("server" or "client") on `config` inside `host` of a testkit
/// network, with `env` set; returned once it has told sd_notify it is ready.
pub fn tunnel_in(host: &testkit::Host, mode: &str, config: &Path, env: &[(&str, &str)]) -> Proc {
    let mut builder = host.proc(TUNNEL).unwrap().args([mode, "-c"]).arg(config);
    for (key, value) in env {
        builder = builder.env(key, value);
    }
    let proc = builder.notify().spawn().unwrap();
    proc.wait_ready(WAIT).unwrap();
    proc
}

/// rathole 0.5 as a client on `config`.
pub fn rathole_client(config: &Path) -> Proc {
    ProcBuilder::new(rathole())
        .arg("--client")
        .arg(config)
        .spawn()
        .unwrap()
}

/// Waits until `needle` appears `count` times in the process's stderr.
pub fn wait_count(proc: &Proc, needle: &str, count: usize) {
    let deadline = Instant::now() + WAIT;
    while proc.stderr().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not seen {count} times: {}",
            proc.stderr()
        );
        // Polled: a count of log lines has no single event to wait on.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A rathole server with one service `echo` (token `token`) and `extra` config, heartbeats
/// every second; returns it with its control
/// and service ports.
pub fn rathole_server(dir: &Scratch, token: &str, extra: &str) -> (Proc, SocketAddr, SocketAddr) {
    retry_on_port_clash(|_| {
        let control = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let service = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = write(
            dir,
            "rathole-server.toml",
            &format!(
                "[server]\nbind_addr = \"{control}\"\nheartbeat_interval = 1\n\
                 [server.services.echo]\ntoken = \"{token}\"\nbind_addr = \"{service}\"\n{extra}"
            ),
        );
        let proc = ProcBuilder::new(rathole())
            .arg("--server")
            .arg(&config)
            .spawn()?;
        proc.wait_output(&format!("Listening at {control}"), WAIT)?;
        Ok((proc, control, service))
    })
    .unwrap()
}
