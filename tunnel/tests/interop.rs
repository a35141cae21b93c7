//! Interop with the real rathole 0.5.0 (installed by scripts/test): a labkit client works
//! with a rathole server and a rathole client with a labkit server, refusals included, for
//! TCP and for UDP services. One test drives a data channel by hand to check the bytes a
//! rathole client reads when the visitor spoke first.
//!
//! rathole binds the ports in its config itself, so its tests take free ports and retry on
//! a clash; rathole logs (to stdout) when it listens and when a control channel opens.

mod common;

use std::net::SocketAddr;

use common::udp::*;
use common::*;
use testkit::{Proc, ProcBuilder, Scratch};

#[test]
fn a_labkit_client_works_with_a_rathole_server() {
    let dir = Scratch::new("interop").unwrap();
    let (rathole, control, service) = rathole_server(&dir, "shared-token", "");
    let config = write(
        &dir,
        "client.toml",
        &client_config(
            control,
            "heartbeat_timeout = 3",
            &[("echo", "shared-token", echo_service())],
        ),
    );
    let client = tunnel(&["client"], &config)
        .env("LABKIT_LOG", "info,tunnel=trace")
        .spawn()
        .unwrap();
    client.wait_ready(WAIT).unwrap();
    // rathole binds a service's port once its control channel is open.
    rathole
        .wait_output(&format!("Listening at {service}"), WAIT)
        .unwrap();
    for _ in 0..20 {
        echo_through(service, &payload(100_000));
    }
    echo_through(service, &payload(5_000_000));
    // rathole sends a heartbeat every second; the client understands them.
    client.wait_stderr("heartbeat service=echo", WAIT).unwrap();
    assert!(
        !client.stderr().contains("control channel lost"),
        "{}",
        client.stderr()
    );
    client.stop(WAIT).unwrap();
}

#[test]
fn a_rathole_client_works_with_a_labkit_server() {
    let dir = Scratch::new("interop").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("heartbeat_interval = 1", &[("echo", "shared-token")]),
    );
    let server = server(&server_toml);
    let service = service_addr(&server, "echo");
    let client_toml = write(
        &dir,
        "rathole-client.toml",
        &client_config(
            control_addr(&server),
            "heartbeat_timeout = 3",
            &[("echo", "shared-token", echo_service())],
        ),
    );
    let rathole = ProcBuilder::new(rathole())
        .arg("--client")
        .arg(&client_toml)
        .env("RUST_LOG", "info,rathole::client=debug")
        .spawn()
        .unwrap();
    rathole
        .wait_output("Control channel established", WAIT)
        .unwrap();
    server
        .wait_stderr("control channel open service=echo ", WAIT)
        .unwrap();
    for _ in 0..20 {
        echo_through(service, &payload(100_000));
    }
    echo_through(service, &payload(5_000_000));
    rathole.wait_output("Received HeartBeat", WAIT).unwrap();
    assert!(
        !rathole.stdout().contains("Heartbeat timed out"),
        "{}",
        rathole.stdout()
    );
    server.stop(WAIT).unwrap();
}

#[test]
fn a_rathole_server_refuses_a_labkit_client_with_a_wrong_token() {
    let dir = Scratch::new("interop").unwrap();
    let (_rathole, control, _) = rathole_server(&dir, "right-token", "");
    let config = write(
        &dir,
        "client.toml",
        &client_config(control, "", &[("echo", "wrong-token", echo_service())]),
    );
    let client = tunnel(&["client"], &config).spawn().unwrap();
    let line = client
        .wait_stderr("could not open the control channel", WAIT)
        .unwrap();
    assert!(
        line.contains("server refused service echo: wrong token"),
        "{line}"
    );
}

#[test]
fn a_labkit_server_refuses_a_rathole_client_with_a_wrong_token() {
    let dir = Scratch::new("interop").unwrap();
    let server = server(&write(
        &dir,
        "server.toml",
        &server_config("", &[("echo", "right-token")]),
    ));
    let client_toml = write(
        &dir,
        "rathole-client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[("echo", "wrong-token", echo_service())],
        ),
    );
    let rathole = rathole_client(&client_toml);
    let line = server
        .wait_stderr("wrong token for service echo", WAIT)
        .unwrap();
    assert!(
        line.contains("connection refused peer=127.0.0.1:"),
        "{line}"
    );
    rathole.wait_output("Incorrect token", WAIT).unwrap();
    assert!(!server.stderr().contains("wrong-token"));
}

/// The private and public keys `tunnel genkey` prints.
fn genkey() -> (String, String) {
    let genkey = ProcBuilder::new(TUNNEL).arg("genkey").spawn().unwrap();
    genkey.expect_exit(0, WAIT).unwrap();
    let out = genkey.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(
        (lines[0], lines[2], lines[3]),
        ("Private Key:", "", "Public Key:")
    );
    (lines[1].to_owned(), lines[4].to_owned())
}

fn noise_server(private: &str) -> String {
    format!(
        "[server.transport]\ntype = \"noise\"\n\
         [server.transport.noise]\nlocal_private_key = \"{private}\"\n"
    )
}

fn noise_client(public: &str) -> String {
    format!(
        "[client.transport]\ntype = \"noise\"\n\
         [client.transport.noise]\nremote_public_key = \"{public}\"\n"
    )
}

#[test]
fn a_labkit_noise_client_works_with_a_rathole_noise_server_on_genkey_keys() {
    let dir = Scratch::new("interop").unwrap();
    let (private, public) = genkey();
    assert_eq!(
        tunnel::keys::public_of(&private).as_deref(),
        Some(public.as_str())
    );
    let (rathole, control, service) = rathole_server(&dir, "noise-token", &noise_server(&private));
    let mut config = client_config(control, "", &[("echo", "noise-token", echo_service())]);
    config.push_str(&noise_client(&public));
    let _client = client(&write(&dir, "client.toml", &config));
    rathole
        .wait_output(&format!("Listening at {service}"), WAIT)
        .unwrap();
    echo_some(service);
}

/// Echoes a few payloads through `service`, one of them a few megabytes.
fn echo_some(service: SocketAddr) {
    for _ in 0..5 {
        echo_through(service, &payload(100_000));
    }
    echo_through(service, &payload(3_000_000));
}

/// A labkit Noise server holding `private`, and a rathole client config that trusts
/// `public`; returns the server, the client config and the rathole client.
fn labkit_noise_server_and_rathole_client(
    dir: &Scratch,
    private: &str,
    public: &str,
) -> (Proc, std::path::PathBuf, Proc) {
    let mut config = server_config("", &[("echo", "noise-token")]);
    config.push_str(&noise_server(private));
    let server = server(&write(dir, "server.toml", &config));
    let mut client_toml = client_config(
        control_addr(&server),
        "",
        &[("echo", "noise-token", echo_service())],
    );
    client_toml.push_str(&noise_client(public));
    let client_toml = write(dir, "rathole-client.toml", &client_toml);
    let rathole = rathole_client(&client_toml);
    (server, client_toml, rathole)
}

#[test]
fn a_rathole_noise_client_works_with_a_labkit_noise_server() {
    let dir = Scratch::new("interop").unwrap();
    let (private, public) = genkey();
    let (server, _, _rathole) = labkit_noise_server_and_rathole_client(&dir, &private, &public);
    server
        .wait_stderr("control channel open service=echo ", WAIT)
        .unwrap();
    echo_some(service_addr(&server, "echo"));
}

#[test]
fn a_wrong_noise_key_is_refused_with_a_log_line_and_serves_nothing() {
    let dir = Scratch::new("interop").unwrap();
    let (private, _) = genkey();
    let (_, wrong_public) = genkey();
    // Both a rathole client and a labkit client holding the wrong server key.
    let (server, client_toml, _rathole) =
        labkit_noise_server_and_rathole_client(&dir, &private, &wrong_public);
    let line = server
        .wait_stderr("connection refused peer=127.0.0.1:", WAIT)
        .unwrap();
    assert!(line.contains("key does not match"), "{line}");
    let client = tunnel(&["client"], &client_toml).spawn().unwrap();
    let line = client
        .wait_stderr("could not open the control channel", WAIT)
        .unwrap();
    assert!(line.contains("Noise"), "{line}");
    // No control channel opened, so the service's visitors are turned away.
    let mut visitor = visit(service_addr(&server, "echo"));
    assert!(closed_by_peer(&mut visitor, WAIT));
    assert!(!server.stderr().contains("control channel open"));
    assert!(!server.stderr().contains(&private));
}

/// A few datagrams of sizes up to rathole's 2,048-byte buffer, from two visitors, through an
/// echo service behind `public`.
fn udp_echo_some(public: SocketAddr) {
    let any: SocketAddr = match public {
        SocketAddr::V4(_) => "127.0.0.1:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::1]:0".parse().unwrap(),
    };
    for _ in 0..2 {
        let visitor = udp_visitor(std::net::UdpSocket::bind(any).unwrap());
        for size in [1, 100, 512, 1_400, 2_048] {
            udp_echo_through(&visitor, public, &payload(size));
        }
    }
}

#[test]
fn a_labkit_client_carries_udp_for_a_rathole_server() {
    let dir = Scratch::new("interop").unwrap();
    let (rathole, control, service) = rathole_server(&dir, "udp-token", "type = \"udp\"\n");
    let (local, seen) = udp_echo(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    let mut config = client_config(control, "", &[("echo", "udp-token", local)]);
    config.push_str("type = \"udp\"\n");
    let labkit = client(&write(&dir, "client.toml", &config));
    rathole
        .wait_output(&format!("Listening at {service}"), WAIT)
        .unwrap();
    udp_echo_some(service);
    // Two visitors, two sessions: the local service saw two source ports.
    let sources: std::collections::HashSet<SocketAddr> =
        seen.lock().unwrap().iter().map(|(f, _)| *f).collect();
    assert_eq!(sources.len(), 2, "{sources:?}");
    assert!(!labkit.stderr().contains("udp data channel failed"));
}

#[test]
fn a_rathole_client_carries_udp_for_a_labkit_server_over_ipv4_and_ipv6() {
    let dir = Scratch::new("interop").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        "[server]\nbind_addr = \"127.0.0.1:0\"\ndefault_token = \"udp-token\"\n\
         [server.services.echo]\ntype = \"udp\"\nbind_addr = \"127.0.0.1:0\"\n\
         [server.services.echo6]\ntype = \"udp\"\nbind_addr = \"[::1]:0\"\n",
    );
    let server = server(&server_toml);
    let local = udp_echo_service();
    let client_toml = write(
        &dir,
        "rathole-client.toml",
        &format!(
            "[client]\nremote_addr = \"{}\"\ndefault_token = \"udp-token\"\n\
             [client.services.echo]\ntype = \"udp\"\nlocal_addr = \"{local}\"\n\
             [client.services.echo6]\ntype = \"udp\"\nlocal_addr = \"{local}\"\n",
            control_addr(&server)
        ),
    );
    let _rathole = rathole_client(&client_toml);
    for name in ["echo", "echo6"] {
        server
            .wait_stderr(&format!("control channel open service={name} "), WAIT)
            .unwrap();
    }
    // rathole reads our V4 and V6 frames and answers with its own: bincode's exact bytes.
    udp_echo_some(service_addr(&server, "echo"));
    let v6 = service_addr(&server, "echo6");
    assert!(v6.is_ipv6());
    udp_echo_some(v6);
    assert!(!server.stderr().contains("udp data channel ended"));
}

/// What a rathole client reads on a data channel when the visitor spoke first: the 4-byte
/// `StartForwardTcp` and then the visitor's bytes, whole and in order (labkit's server puts
/// those that are there already in the same write), and the reply and the end of stream
/// reach the visitor. Driven by hand, as rathole 0.5's client would: hello, proof, ack, then
/// a data channel opened only after the visitor wrote.
#[test]
fn a_visitors_first_bytes_follow_the_start_command_on_the_data_channel_as_rathole_reads_them() {
    use std::io::{Read, Write};
    use tunnel::protocol::{self, Ack, Hello, SessionKey};

    let dir = Scratch::new("interop-first-bytes").unwrap();
    let token = "first-bytes-token";
    let config = write(&dir, "server.toml", &server_config("", &[("solo", token)]));
    let server = server(&config);
    let control_addr = control_addr(&server);
    let mut control = visit(control_addr);
    control
        .write_all(&Hello::Control(protocol::service_digest("solo")).encode())
        .unwrap();
    let mut answer = [0u8; protocol::HELLO_LEN];
    control.read_exact(&mut answer).unwrap();
    let Hello::Control(nonce) = Hello::decode(&answer).unwrap() else {
        panic!("the server answered with a data hello")
    };
    let key = SessionKey::prove(token.as_bytes(), &nonce);
    control.write_all(key.bytes()).unwrap();
    let mut ack = [0u8; protocol::TAG_LEN];
    control.read_exact(&mut ack).unwrap();
    assert_eq!(Ack::decode(&ack).unwrap(), Ack::Ok);

    // The visitor speaks before any data channel exists, so its bytes are there when the
    // server pairs it with the first one.
    let mut visitor = visit(service_addr(&server, "solo"));
    let first = b"GET / HTTP/1.0\r\nHost: first-bytes\r\n\r\n";
    visitor.write_all(first).unwrap();
    let mut channel = visit(control_addr);
    channel.write_all(&Hello::Data(key).encode()).unwrap();
    let mut start = [0u8; protocol::TAG_LEN];
    channel.read_exact(&mut start).unwrap();
    assert_eq!(start, [0, 0, 0, 0], "StartForwardTcp as rathole encodes it");
    let mut carried = vec![0u8; first.len()];
    channel.read_exact(&mut carried).unwrap();
    assert_eq!(
        carried, first,
        "the visitor's first bytes, right after the command"
    );

    channel
        .write_all(b"HTTP/1.0 204 No Content\r\n\r\n")
        .unwrap();
    channel.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    visitor.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"HTTP/1.0 204 No Content\r\n\r\n");
    visitor.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        closed_by_peer(&mut channel, WAIT),
        "the visitor's end reaches the channel"
    );
}
