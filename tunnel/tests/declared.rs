//! Services declared by the client (`[server.declared]` on the server, `[client.declare]` and
//! `bind_port` on the client), on loopback: the client's file alone adds and removes
//! services, and the server's policy refuses what it forbids, with the reason on both sides.
//!
//! The hostile cases speak the wire directly (a client with a valid client token but
//! declarations of its own making): they check what the server answers and logs.
//!
//! Declared ports cannot be port 0 (the client asks for a given port), so the tests take
//! ports outside the ephemeral range that were free a moment ago ([`free_port`]), so the
//! server's own port-0 binds cannot take them first.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;

use common::udp::{udp_echo_service, udp_echo_through, udp_visitor};
use common::*;
use testkit::ports::free_port;
use testkit::{Proc, Scratch};

const HOME_TOKEN: &str = "home-client-token";
const AWAY_TOKEN: &str = "away-client-token";

/// A server allowing declarations on `ports` (TOML array items) from clients `home` and
/// `away`; `extra` goes into `[server.declared]`, `services` after it.
fn declared_server(dir: &Scratch, ports: &str, extra: &str, services: &str) -> (Proc, PathBuf) {
    let text = format!(
        "[server]\nbind_addr = \"127.0.0.1:0\"\nheartbeat_interval = 1\n\
         [server.declared]\nports = [{ports}]\nbind_ip = \"127.0.0.1\"\n{extra}\n\
         [server.declared.clients.home]\ntoken = \"{HOME_TOKEN}\"\n\
         [server.declared.clients.away]\ntoken = \"{AWAY_TOKEN}\"\n{services}"
    );
    let path = write(dir, "server.toml", &text);
    (server(&path), path)
}

/// A client config declaring `(name, local, port)` services as `home`.
fn home_config(control: SocketAddr, services: &[(&str, SocketAddr, u16)]) -> String {
    let mut text = format!(
        "[client]\nremote_addr = \"{control}\"\nheartbeat_timeout = 3\nretry_interval = 1\n\
         [client.declare]\nname = \"home\"\ntoken = \"{HOME_TOKEN}\"\n"
    );
    for (name, local, port) in services {
        text.push_str(&format!(
            "[client.services.{name}]\nlocal_addr = \"{local}\"\nbind_port = {port}\n"
        ));
    }
    text
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether nothing listens at `addr`.
fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr), Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Whether the server closes a control channel (heartbeats before the end are skipped).
fn ends(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) => return err.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    ctx.finish().as_ref().try_into().unwrap()
}

/// What the server answered a hand-made declaration.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The ack's tag when it was not `Ok` (1 no such client, 2 wrong token).
    Ack(u32),
    /// The verdict's code and reason.
    Verdict(u8, String),
}

/// Opens a control channel as declaring `client` with `token` and declares `name` (raw
/// bytes) of `kind` (0 tcp, 1 udp) on `port`; returns the connection and the answer.
fn declare_raw(
    control: SocketAddr,
    client: &str,
    token: &str,
    name: &[u8],
    kind: u8,
    port: u16,
) -> (TcpStream, Answer) {
    let (mut stream, ack) = authenticate_raw(control, client, token);
    if ack != 0 {
        return (stream, Answer::Ack(ack));
    }
    let mut declaration = vec![1, kind];
    declaration.extend_from_slice(&port.to_le_bytes());
    declaration.push(name.len() as u8);
    declaration.extend_from_slice(name);
    stream.write_all(&declaration).unwrap();
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).unwrap();
    let mut reason = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut reason).unwrap();
    (
        stream,
        Answer::Verdict(head[0], String::from_utf8(reason).unwrap()),
    )
}

/// Opens a control channel as declaring `client` with `token`; returns it and the ack's tag.
fn authenticate_raw(control: SocketAddr, client: &str, token: &str) -> (TcpStream, u32) {
    let mut stream = visit(control);
    let mut hello = vec![0, 0, 0, 0, 1];
    hello.extend_from_slice(&sha256(&[b"labkit declaring client\0", client.as_bytes()]));
    stream.write_all(&hello).unwrap();
    let mut answer = [0u8; 37];
    stream.read_exact(&mut answer).unwrap();
    stream
        .write_all(&sha256(&[token.as_bytes(), &answer[5..]]))
        .unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).unwrap();
    (stream, u32::from_le_bytes(ack))
}

#[test]
fn a_service_added_to_the_clients_file_is_exposed_on_reload_refused_outside_the_policy_and_closed_when_removed()
 {
    let dir = Scratch::new("declared").unwrap();
    let (p1, p2) = (free_port().unwrap(), free_port().unwrap());
    let (server, _) = declared_server(&dir, &format!("{p1}, \"{p2}-{p2}\""), "", "");
    let control = control_addr(&server);
    let local = echo_service();
    let client_toml = write(
        &dir,
        "client.toml",
        &home_config(control, &[("echo", local, p1)]),
    );
    let client = client(&client_toml);
    echo_through(loopback(p1), b"declared once, on the home side");

    // One edit of the client's own file: a new service, and one on a port the policy forbids.
    std::fs::write(
        &client_toml,
        home_config(
            control,
            &[("echo", local, p1), ("web", local, p2), ("bad", local, 22)],
        ),
    )
    .unwrap();
    client.wait_stderr("config reloaded", WAIT).unwrap();
    server
        .wait_stderr("declared service exposed service=web", WAIT)
        .unwrap();
    client
        .wait_stderr("control channel open service=web", WAIT)
        .unwrap();
    echo_through(loopback(p2), &payload(100_000));

    let reason = format!("port 22 is outside the allowed ports ({p1}, {p2})");
    let on_client = client
        .wait_stderr("the server refused to expose the declared service", WAIT)
        .unwrap();
    assert!(on_client.contains("service=bad"), "{on_client}");
    assert!(on_client.contains(&reason), "{on_client}");
    let on_server = server
        .wait_stderr("server refused declared service", WAIT)
        .unwrap();
    assert!(
        on_server.contains("bad (tcp port 22, client home)"),
        "{on_server}"
    );
    assert!(on_server.contains(&reason), "{on_server}");
    assert!(!server.stderr().contains("service listening service=bad "));

    // Removing it from the file closes its port; the other service is left alone.
    std::fs::write(&client_toml, home_config(control, &[("echo", local, p1)])).unwrap();
    server
        .wait_stderr(
            "declared service removed: its control channel ended service=web",
            WAIT,
        )
        .unwrap();
    assert!(
        refused(loopback(p2)),
        "the removed service's port is closed"
    );
    echo_through(loopback(p1), b"still there");
    assert_eq!(
        server
            .stderr()
            .matches("control channel open service=echo ")
            .count(),
        1,
        "the service that stayed kept its control channel"
    );
    for proc in [&server, &client] {
        assert!(!proc.stderr().contains(HOME_TOKEN), "the token was logged");
    }
}

#[test]
fn a_declared_service_is_removed_when_its_client_goes_away() {
    let dir = Scratch::new("declared").unwrap();
    let port = free_port().unwrap();
    let (server, _) = declared_server(&dir, &port.to_string(), "", "");
    let client_toml = write(
        &dir,
        "client.toml",
        &home_config(control_addr(&server), &[("echo", echo_service(), port)]),
    );
    let client = client(&client_toml);
    echo_through(loopback(port), b"up");
    client.kill().unwrap();
    server
        .wait_stderr(
            "declared service removed: its control channel ended service=echo",
            WAIT,
        )
        .unwrap();
    assert!(refused(loopback(port)));
}

#[test]
fn more_declarations_than_max_services_are_refused() {
    let dir = Scratch::new("declared").unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let (server, _) = declared_server(&dir, &list.join(", "), "max_services = 2", "");
    let control = control_addr(&server);
    let mut held = Vec::new();
    for (i, port) in ports[..2].iter().enumerate() {
        let (stream, answer) = declare_raw(
            control,
            "home",
            HOME_TOKEN,
            format!("s{i}").as_bytes(),
            0,
            *port,
        );
        assert_eq!(answer, Answer::Verdict(0, String::new()));
        held.push(stream);
    }
    let (_, answer) = declare_raw(control, "home", HOME_TOKEN, b"s2", 0, ports[2]);
    assert_eq!(
        answer,
        Answer::Verdict(
            2,
            "client home already has 2 declared services, the most allowed".into()
        )
    );
    assert!(refused(loopback(ports[2])));
    // Another client has a quota of its own.
    let (_, answer) = declare_raw(control, "away", AWAY_TOKEN, b"other", 0, ports[2]);
    assert_eq!(answer, Answer::Verdict(0, String::new()));
}

#[test]
fn names_with_odd_bytes_are_refused_and_logged_escaped() {
    let dir = Scratch::new("declared").unwrap();
    let port = free_port().unwrap();
    let (server, _) = declared_server(&dir, &port.to_string(), "", "");
    let control = control_addr(&server);
    let forged = b"x\nINFO tunnel: forged line \x1b[31m";
    let (_, answer) = declare_raw(control, "home", HOME_TOKEN, forged, 0, port);
    assert_eq!(
        answer,
        Answer::Verdict(
            1,
            "the name may hold only ASCII letters, digits, '-', '_' and '.'".into()
        )
    );
    let (_, answer) = declare_raw(control, "home", HOME_TOKEN, &[0xff; 255], 0, port);
    assert!(matches!(answer, Answer::Verdict(1, _)), "{answer:?}");
    let (_, answer) = declare_raw(control, "home", HOME_TOKEN, b"", 0, port);
    assert_eq!(answer, Answer::Verdict(1, "the name is empty".into()));
    let line = server
        .wait_stderr("x\\x0aINFO tunnel: forged line \\x1b[31m", WAIT)
        .unwrap();
    assert!(line.contains("server refused declared service"), "{line}");
    assert!(!server.stderr().contains("\nINFO tunnel: forged"));
    assert!(refused(loopback(port)));
}

#[test]
fn port_zero_privileged_ports_outside_the_ranges_and_taken_ports_are_refused() {
    let dir = Scratch::new("declared").unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (server, _) = declared_server(&dir, &format!("{taken_port}, \"30000-30001\""), "", "");
    let control = control_addr(&server);
    for port in [0, 22, 29999, 30002] {
        let (_, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, port);
        assert_eq!(
            answer,
            Answer::Verdict(
                1,
                format!("port {port} is outside the allowed ports ({taken_port}, 30000-30001)")
            )
        );
    }
    let (_, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, taken_port);
    let Answer::Verdict(2, reason) = answer else {
        panic!("{answer:?}")
    };
    assert!(
        reason.starts_with(&format!("port {taken_port} cannot be bound")),
        "{reason}"
    );
    // Unknown service types are malformed: the connection is closed without a verdict.
    let (mut stream, ack) = authenticate_raw(control, "home", HOME_TOKEN);
    assert_eq!(ack, 0);
    stream
        .write_all(&[1, 7, 0x30, 0x75, 3, b'w', b'e', b'b'])
        .unwrap();
    assert!(closed_by_peer(&mut stream, WAIT));
    server
        .wait_stderr("malformed declaration: unknown service type", WAIT)
        .unwrap();
}

#[test]
fn the_same_client_declaring_a_name_again_takes_it_over_and_another_client_cannot() {
    let dir = Scratch::new("declared").unwrap();
    let (p1, p2) = (free_port().unwrap(), free_port().unwrap());
    let (server, _) = declared_server(&dir, &format!("{p1}, {p2}"), "", "");
    let control = control_addr(&server);
    let (mut first, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, p1);
    assert_eq!(answer, Answer::Verdict(0, String::new()));
    // Another client cannot have the name while home holds it.
    let (_, answer) = declare_raw(control, "away", AWAY_TOKEN, b"web", 0, p2);
    assert_eq!(
        answer,
        Answer::Verdict(2, "another client has declared a service named web".into())
    );
    assert!(refused(loopback(p2)));
    // Home again (a reconnect the server had not noticed): the new channel replaces the old.
    let (_second, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, p1);
    assert_eq!(answer, Answer::Verdict(0, String::new()));
    assert!(ends(&mut first), "the old control channel is closed");
    // Home moving it to another port: the old port closes, the new one opens.
    let (_third, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, p2);
    assert_eq!(answer, Answer::Verdict(0, String::new()));
    server
        .wait_stderr("declared service changed: the old one is stopped", WAIT)
        .unwrap();
    assert!(refused(loopback(p1)));
    assert!(!refused(loopback(p2)));
}

#[test]
fn a_wrong_client_token_an_unknown_client_and_a_configured_name_are_refused() {
    let dir = Scratch::new("declared").unwrap();
    let port = free_port().unwrap();
    let (server, _) = declared_server(
        &dir,
        &port.to_string(),
        "",
        "[server.services.ssh]\ntoken = \"ssh-token-xx\"\nbind_addr = \"127.0.0.1:0\"\n",
    );
    let control = control_addr(&server);
    let (_, answer) = declare_raw(control, "home", AWAY_TOKEN, b"web", 0, port);
    assert_eq!(answer, Answer::Ack(2), "wrong token");
    server
        .wait_stderr("wrong token for service (declaring client home)", WAIT)
        .unwrap();
    let (_, answer) = declare_raw(control, "stranger", HOME_TOKEN, b"web", 0, port);
    assert_eq!(answer, Answer::Ack(1), "no such client");
    let (_, answer) = declare_raw(control, "home", HOME_TOKEN, b"ssh", 0, port);
    assert_eq!(
        answer,
        Answer::Verdict(1, "the server's config has a service named ssh".into())
    );
    // A declared service is not reachable by a plain hello naming its digest.
    let (_held, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, port);
    assert_eq!(answer, Answer::Verdict(0, String::new()));
    let mut stream = visit(control);
    let mut hello = vec![0, 0, 0, 0, 1];
    hello.extend_from_slice(&sha256(&[
        b"labkit declared service\0",
        b"home",
        b"\0",
        b"web",
    ]));
    stream.write_all(&hello).unwrap();
    let mut answer = [0u8; 37];
    stream.read_exact(&mut answer).unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).unwrap();
    assert_eq!(u32::from_le_bytes(ack), 1, "ServiceNotExist");
    for token in [HOME_TOKEN, AWAY_TOKEN, "ssh-token-xx"] {
        assert!(!server.stderr().contains(token), "a token was logged");
    }
}

#[test]
fn a_declaring_client_of_a_rathole_server_is_told_the_server_does_not_know_it() {
    let dir = Scratch::new("declared").unwrap();
    let (rathole, control, _) = rathole_server(&dir, "echo-token-rathole", "");
    let port = free_port().unwrap();
    let client_toml = write(
        &dir,
        "client.toml",
        &home_config(control, &[("web", echo_service(), port)]),
    );
    let client = tunnel(&["client"], &client_toml).spawn().unwrap();
    let line = client
        .wait_stderr("could not open the control channel", WAIT)
        .unwrap();
    assert!(
        line.contains("the server does not know this client"),
        "{line}"
    );
    // rathole saw an unknown service digest and nothing else.
    rathole.wait_output("No such a service", WAIT).unwrap();
}

#[test]
fn a_declared_udp_service_carries_datagrams_and_a_policy_without_udp_refuses_it() {
    let dir = Scratch::new("declared").unwrap();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (server, _) = declared_server(&dir, &port.to_string(), "", "");
    let control = control_addr(&server);
    let text = format!(
        "[client]\nremote_addr = \"{control}\"\n[client.declare]\nname = \"home\"\n\
         token = \"{HOME_TOKEN}\"\n[client.services.dns]\ntype = \"udp\"\n\
         local_addr = \"{}\"\nbind_port = {port}\n",
        udp_echo_service()
    );
    let _client = client(&write(&dir, "client.toml", &text));
    let visitor = udp_visitor(UdpSocket::bind("127.0.0.1:0").unwrap());
    udp_echo_through(&visitor, loopback(port), &payload(1200));
    udp_echo_through(&visitor, loopback(port), b"again");

    let dir = Scratch::new("declared").unwrap();
    let (tcp_only, _) = declared_server(&dir, &port.to_string(), "types = [\"tcp\"]", "");
    let (_, answer) = declare_raw(control_addr(&tcp_only), "home", HOME_TOKEN, b"dns", 1, port);
    assert_eq!(
        answer,
        Answer::Verdict(1, "udp services are not allowed here".into())
    );
}

#[test]
fn a_service_added_to_the_servers_config_takes_its_name_from_a_declared_one() {
    let dir = Scratch::new("declared").unwrap();
    let port = free_port().unwrap();
    let (server, server_toml) = declared_server(&dir, &port.to_string(), "", "");
    let control = control_addr(&server);
    let (mut declared, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, port);
    assert_eq!(answer, Answer::Verdict(0, String::new()));
    let text = std::fs::read_to_string(&server_toml).unwrap();
    replace(
        &server_toml,
        &format!(
            "{text}[server.services.web]\ntoken = \"web-token-xx\"\nbind_addr = \"127.0.0.1:0\"\n"
        ),
    );
    server
        .wait_stderr(
            "declared service stopped: the server's config now has a service of that name",
            WAIT,
        )
        .unwrap();
    server.wait_stderr("config reloaded", WAIT).unwrap();
    assert!(
        ends(&mut declared),
        "the declared service's control channel is closed"
    );
    assert!(refused(loopback(port)));
    // The configured service listens where its config says (its own port 0), not on the
    // declared one's.
    wait_count(&server, "service listening service=web ", 2);
    let stderr = server.stderr();
    let line = stderr
        .lines()
        .rfind(|l| l.contains("service listening service=web "))
        .unwrap();
    assert!(line.contains("declared=false"), "{line}");
    assert!(!line.contains(&format!(":{port} ")), "{line}");
    let (_, answer) = declare_raw(control, "home", HOME_TOKEN, b"web", 0, port);
    assert_eq!(
        answer,
        Answer::Verdict(1, "the server's config has a service named web".into())
    );
}
