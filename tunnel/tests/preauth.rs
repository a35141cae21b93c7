//! What an unauthenticated peer can cost `tunnel server`: connections that never say a word
//! are counted per source address, so they cannot lock real clients out, and a WebSocket
//! peer is read only a few KiB before it authenticates.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use testkit::Scratch;

/// A TCP connection to `to` from the address `source`.
fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let SocketAddr::V4(to) = to else {
        panic!("an IPv4 address expected: {to}")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )
    .unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
    TcpStream::from(fd)
}

/// Lifts this process's soft open-file limit to the hard one, for a thousand sockets.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
fn a_thousand_silent_connections_from_one_address_do_not_lock_out_a_real_client() {
    raise_fd_limit();
    let dir = Scratch::new("preauth").unwrap();
    // The flood comes from 127.0.0.3, the real client from 127.0.0.1 (loopback's source).
    // The handshake timeout outlasts the test, so no silent connection times out.
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("handshake_timeout = 120", &[("echo", "echo-token")]),
    );
    let server = server(&server_toml);
    let control = control_addr(&server);
    let silent: Vec<TcpStream> = (0..1024)
        .map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 3), control))
        .collect();
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(control, "", &[("echo", "echo-token", echo_service())]),
    );
    let started = Instant::now();
    let _client = client(&client_toml);
    echo_through(service_addr(&server, "echo"), &payload(10_000));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the client got in only after {:?}",
        started.elapsed()
    );
    drop(silent);
}

#[test]
fn a_websocket_peer_announcing_a_huge_frame_is_cut_off_before_it_authenticates() {
    let dir = Scratch::new("preauth").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &format!(
            "{}[server.transport]\ntype = \"websocket\"\n[server.transport.websocket]\ntls = false\n",
            server_config("handshake_timeout = 120", &[("echo", "echo-token")])
        ),
    );
    let server = server(&server_toml);
    let mut peer = TcpStream::connect(control_addr(&server)).unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    peer.set_write_timeout(Some(WAIT)).unwrap();
    peer.write_all(
        b"GET / HTTP/1.1\r\nHost: tunnel\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        assert_eq!(peer.read(&mut byte).unwrap(), 1, "the upgrade was answered");
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"), "{response:?}");
    // A binary frame of 8 MiB (within the library's default 16 MiB), masked with a zero key,
    // of which 4 MiB are sent: a server that buffers the frame waits for the rest until the
    // handshake timeout; one that caps what it reads before authentication closes at once.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(8u64 << 20).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    peer.write_all(&header).unwrap();
    let chunk = [0u8; 16 * 1024];
    let mut sent = 0usize;
    while sent < 4 << 20 {
        match peer.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let mut rest = [0u8; 64];
    match peer.read(&mut rest) {
        Ok(0) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the server kept the connection open after {sent} bytes: {other:?}"),
    }
    server
        .wait_stderr("more than 8192 bytes before authentication", WAIT)
        .unwrap();
}
