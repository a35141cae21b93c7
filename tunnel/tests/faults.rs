//! Bad input and faults on loopback: each bad handshake closes that connection within the
//! handshake timeout with a log line naming the peer and the reason (never the token), and
//! every other service keeps working; visitors are closed promptly when nothing can serve them.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use testkit::{Proc, Scratch};
use tunnel::protocol::{self, Ack, Hello, SessionKey};

const TOKEN: &str = "s3cret-echo-token";

/// A server with services `echo` and `other`, and a client serving both with echo services.
struct Lab {
    _dir: Scratch,
    server: Proc,
    _client: Proc,
    control: SocketAddr,
    echo: SocketAddr,
    other: SocketAddr,
}

fn lab() -> Lab {
    let dir = Scratch::new("faults").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config(
            "handshake_timeout = 1",
            &[("echo", TOKEN), ("other", "other-token")],
        ),
    );
    let server = server(&server_toml);
    let control = control_addr(&server);
    let local = echo_service();
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control,
            "",
            &[("echo", TOKEN, local), ("other", "other-token", local)],
        ),
    );
    let client = client(&client_toml);
    Lab {
        echo: service_addr(&server, "echo"),
        other: service_addr(&server, "other"),
        _dir: dir,
        server,
        _client: client,
        control,
    }
}

/// Opens a control channel for `service` by hand; returns the stream and the server's nonce.
fn control_hello(control: SocketAddr, service: &str) -> (TcpStream, [u8; 32]) {
    let mut stream = visit(control);
    let hello = Hello::Control(protocol::service_digest(service)).encode();
    stream.write_all(&hello).unwrap();
    let mut answer = [0u8; protocol::HELLO_LEN];
    stream.read_exact(&mut answer).unwrap();
    let Hello::Control(nonce) = Hello::decode(&answer).unwrap() else {
        panic!("the server answered with a data hello")
    };
    (stream, nonce)
}

fn read_ack(stream: &mut TcpStream) -> Ack {
    let mut ack = [0u8; protocol::TAG_LEN];
    stream.read_exact(&mut ack).unwrap();
    Ack::decode(&ack).unwrap()
}

/// The refusal log line for the connection from `peer`.
fn refusal(server: &Proc, peer: SocketAddr) -> String {
    server
        .wait_stderr(&format!("connection refused peer={peer}"), WAIT)
        .unwrap()
}

fn others_still_work(lab: &Lab) {
    echo_through(lab.echo, b"still working");
    echo_through(lab.other, b"other still working");
    assert!(
        !lab.server.stderr().contains(TOKEN),
        "the token reached the log"
    );
}

#[test]
fn wrong_token_is_refused_with_a_log_line_naming_the_peer() {
    let lab = lab();
    let (mut stream, nonce) = control_hello(lab.control, "echo");
    let peer = stream.local_addr().unwrap();
    let wrong = SessionKey::prove(b"not-the-token", &nonce);
    stream.write_all(wrong.bytes()).unwrap();
    assert_eq!(read_ack(&mut stream), Ack::AuthFailed);
    assert!(closed_by_peer(&mut stream, WAIT));
    let line = refusal(&lab.server, peer);
    assert!(line.contains("wrong token for service echo"), "{line}");
    others_still_work(&lab);
}

#[test]
fn a_client_with_a_wrong_token_says_the_server_refused_it() {
    let lab = lab();
    let dir = Scratch::new("faults-client").unwrap();
    let config = write(
        &dir,
        "client.toml",
        &client_config(lab.control, "", &[("echo", "wrong-token", echo_service())]),
    );
    let client = tunnel(&["client"], &config).spawn().unwrap();
    let line = client
        .wait_stderr("could not open the control channel", WAIT)
        .unwrap();
    assert!(
        line.contains("server refused service echo: wrong token"),
        "{line}"
    );
    assert!(!client.stderr().contains("wrong-token"));
    others_still_work(&lab);
}

#[test]
fn unknown_service_is_refused_with_a_log_line_naming_the_peer() {
    let lab = lab();
    let (mut stream, _) = control_hello(lab.control, "no-such-service");
    let peer = stream.local_addr().unwrap();
    assert_eq!(read_ack(&mut stream), Ack::ServiceNotExist);
    assert!(closed_by_peer(&mut stream, WAIT));
    let line = refusal(&lab.server, peer);
    assert!(line.contains("unknown service"), "{line}");
    others_still_work(&lab);
}

#[test]
fn a_newer_protocol_version_is_refused() {
    let lab = lab();
    let mut stream = visit(lab.control);
    let peer = stream.local_addr().unwrap();
    let mut hello = Hello::Control(protocol::service_digest("echo")).encode();
    hello[4] = 2;
    stream.write_all(&hello).unwrap();
    assert!(closed_by_peer(&mut stream, WAIT));
    let line = refusal(&lab.server, peer);
    assert!(
        line.contains("protocol version 2 is not supported"),
        "{line}"
    );
    others_still_work(&lab);
}

#[test]
fn random_bytes_are_refused() {
    let lab = lab();
    let mut stream = visit(lab.control);
    let peer = stream.local_addr().unwrap();
    let garbage: Vec<u8> = (0..protocol::HELLO_LEN as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
        .collect();
    stream.write_all(&garbage).unwrap();
    assert!(closed_by_peer(&mut stream, WAIT));
    let line = refusal(&lab.server, peer);
    assert!(line.contains("malformed hello"), "{line}");
    others_still_work(&lab);
}

#[test]
fn a_data_channel_with_a_forged_session_key_is_refused() {
    let lab = lab();
    let mut stream = visit(lab.control);
    let peer = stream.local_addr().unwrap();
    let forged = Hello::Data(SessionKey::from_bytes([0x42; 32])).encode();
    stream.write_all(&forged).unwrap();
    assert!(closed_by_peer(&mut stream, WAIT));
    let line = refusal(&lab.server, peer);
    assert!(
        line.contains("data channel for no open control channel"),
        "{line}"
    );
    others_still_work(&lab);
}

#[test]
fn a_peer_that_sends_nothing_is_closed_after_the_handshake_timeout() {
    let lab = lab();
    let mut stream = visit(lab.control);
    let peer = stream.local_addr().unwrap();
    let start = Instant::now();
    assert!(closed_by_peer(&mut stream, Duration::from_secs(10)));
    let waited = start.elapsed();
    // handshake_timeout = 1 in this lab's config.
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    let line = refusal(&lab.server, peer);
    assert!(line.contains("timed out after 1s"), "{line}");
    others_still_work(&lab);
}

#[test]
fn a_visitor_is_closed_promptly_while_the_client_is_down() {
    let dir = Scratch::new("faults").unwrap();
    let config = write(&dir, "server.toml", &server_config("", &[("echo", TOKEN)]));
    let server = server(&config);
    let mut visitor = visit(service_addr(&server, "echo"));
    let start = Instant::now();
    assert!(closed_by_peer(&mut visitor, Duration::from_secs(5)));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    server
        .wait_stderr("no client serves this service: visitor closed", WAIT)
        .unwrap();
}

#[test]
fn a_refused_local_service_closes_the_visitor_and_the_tunnel_stays_up() {
    let dir = Scratch::new("faults").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("", &[("dead", "token-t1"), ("echo", TOKEN)]),
    );
    let server = server(&server_toml);
    // A port nothing listens on, outside the ephemeral range so no later bind(0) takes it.
    let refused = SocketAddr::from(([127, 0, 0, 1], testkit::ports::free_port().unwrap()));
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[
                ("dead", "token-t1", refused),
                ("echo", TOKEN, echo_service()),
            ],
        ),
    );
    let client = client(&client_toml);
    for _ in 0..3 {
        let mut visitor = visit(service_addr(&server, "dead"));
        visitor.write_all(b"anyone there?").unwrap();
        assert!(closed_by_peer(&mut visitor, Duration::from_secs(5)));
    }
    client
        .wait_stderr("local service unreachable: visitor closed", WAIT)
        .unwrap();
    echo_through(service_addr(&server, "echo"), &payload(100_000));
    assert!(client.try_status().is_none() && server.try_status().is_none());
}

#[test]
fn visitors_past_max_connections_are_closed_at_once_and_a_freed_slot_is_reused() {
    let dir = Scratch::new("faults").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &format!(
            "{}max_connections = 2\n",
            server_config("", &[("echo", TOKEN)])
        ),
    );
    let server = server(&server_toml);
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[("echo", TOKEN, echo_service())],
        ),
    );
    let _client = client(&client_toml);
    let echo = service_addr(&server, "echo");
    let held = |message: &[u8]| {
        let mut visitor = visit(echo);
        visitor.write_all(message).unwrap();
        let mut back = vec![0u8; message.len()];
        visitor.read_exact(&mut back).unwrap();
        assert_eq!(back, message);
        visitor
    };
    let first = held(b"one");
    let _second = held(b"two");
    let mut third = visit(echo);
    let start = Instant::now();
    assert!(closed_by_peer(&mut third, Duration::from_secs(5)));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let line = server
        .wait_stderr("connection limit reached", WAIT)
        .unwrap();
    let third_addr = third.local_addr().unwrap();
    assert!(line.contains(&format!("visitor={third_addr}")), "{line}");
    assert!(line.contains("max_connections=2"), "{line}");

    // The first visitor leaves; once its connection is done, its slot takes a new one.
    drop(first);
    server
        .wait_stderr("visitor connection finished service=echo", WAIT)
        .unwrap();
    let _fourth = held(b"four");
}
