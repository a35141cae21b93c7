//! UDP services (`type = "udp"`) end to end: across a real NAT (testkit's network namespaces)
//! a DNS-like query gets its answer, a 10,000-datagram burst loses nothing, and datagrams up
//! to 65,507 bytes arrive whole; on loopback, sessions per visitor, metrics, and a reload that
//! leaves a UDP service's sessions alone.

mod common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::udp::*;
use common::*;
use testkit::{Nat, Proc, Scratch};

const TOKEN: &str = "udp-token";

/// A server on the public host with UDP services `dns` (port 5353) and `echo` (port 7007),
/// and a client on the home host forwarding them to home ports 53 and 7.
fn udp_lab(nat: &Nat, dir: &Scratch) -> (Proc, Proc) {
    let server_toml = write(
        dir,
        "server.toml",
        &format!(
            "[server]\nbind_addr = \"0.0.0.0:7000\"\ndefault_token = \"{TOKEN}\"\n\
             [server.services.dns]\ntype = \"udp\"\nbind_addr = \"0.0.0.0:5353\"\n\
             [server.services.echo]\ntype = \"udp\"\nbind_addr = \"0.0.0.0:7007\"\n"
        ),
    );
    let server = tunnel_in(
        nat.public(),
        "server",
        &server_toml,
        &[("LABKIT_LOG", "info,tunnel=debug")],
    );
    let client_toml = write(
        dir,
        "client.toml",
        &format!(
            "[client]\nremote_addr = \"{}:7000\"\ndefault_token = \"{TOKEN}\"\n\
             [client.services.dns]\ntype = \"udp\"\nlocal_addr = \"127.0.0.1:53\"\n\
             [client.services.echo]\ntype = \"udp\"\nlocal_addr = \"127.0.0.1:7\"\n",
            nat.public().addr()
        ),
    );
    let client = tunnel_in(
        nat.home(),
        "client",
        &client_toml,
        &[("LABKIT_LOG", "info,tunnel=debug")],
    );
    (server, client)
}

/// A socket on the home host's loopback.
fn home_udp(nat: &Nat, port: u16) -> UdpSocket {
    nat.home()
        .enter(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, port)))
        .unwrap()
        .unwrap()
}

/// A DNS query for `name`, type A, class IN, with `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A tiny authoritative answer: every A question gets `addr`, echoing id and question.
fn dns_answer(query: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 17 {
        return None;
    }
    let mut a = Vec::from(&query[..2]);
    a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    a.extend_from_slice(&query[12..]);
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    a.extend_from_slice(&addr.octets());
    Some(a)
}

#[test]
fn a_dns_like_query_from_outside_gets_its_answer_through_the_nat() {
    let nat = Nat::new().unwrap();
    let dir = Scratch::new("udp-nat").unwrap();
    let answer = Ipv4Addr::new(198, 18, 200, 7);
    let (_, asked) = udp_serve(home_udp(&nat, 53), move |q, _| dns_answer(q, answer));
    udp_echo(home_udp(&nat, 7));
    let (server, _client) = udp_lab(&nat, &dir);
    let dns = SocketAddr::from((nat.public().addr(), 5353));
    // Two visitors from outside, each with its own query id.
    let visitors: Vec<UdpSocket> = (0..2)
        .map(|_| udp_visitor(nat.router().udp_bind(0).unwrap()))
        .collect();
    for (i, visitor) in visitors.iter().enumerate() {
        let id = 0x1234 + i as u16;
        let query = dns_query(id, "lab.example.org");
        visitor.send_to(&query, dns).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = visitor.recv_from(&mut buf).unwrap();
        assert_eq!(from, dns);
        let reply = &buf[..n];
        assert_eq!(
            &reply[..2],
            &id.to_be_bytes(),
            "the answer carries the query's id"
        );
        assert_eq!(&reply[2..4], &[0x81, 0x80], "a response, no error");
        assert_eq!(
            &reply[12..query.len()],
            &query[12..],
            "the question comes back"
        );
        assert_eq!(&reply[n - 4..], &answer.octets(), "the A record");
    }
    // The local service told the visitors apart: one session (source port) each.
    let sources: HashSet<SocketAddr> = asked.lock().unwrap().iter().map(|(f, _)| *f).collect();
    assert_eq!(sources.len(), 2, "{sources:?}");
    let line = server
        .wait_stderr("control channel open service=dns ", WAIT)
        .unwrap();
    assert!(
        line.contains(&format!("client={}:", nat.router().addr())),
        "{line}"
    );
}

#[test]
fn a_burst_of_ten_thousand_datagrams_crosses_the_nat_without_loss() {
    let nat = Nat::new().unwrap();
    let dir = Scratch::new("udp-nat").unwrap();
    let (_, echoed) = udp_echo(home_udp(&nat, 7));
    let (_server, _client) = udp_lab(&nat, &dir);
    let echo = SocketAddr::from((nat.public().addr(), 7007));
    let visitor = udp_visitor(nat.router().udp_bind(0).unwrap());
    let burst = udp_burst(&visitor, echo, 10_000, 512, 64, Duration::from_secs(5));
    eprintln!("udp burst through the nat: {burst:?}");
    assert_eq!(burst.sent, 10_000, "{burst:?}");
    assert_eq!(burst.lost, 0, "datagrams lost: {burst:?}");
    assert_eq!(echoed.lock().unwrap().len(), 10_000);
}

#[test]
fn datagrams_of_60000_and_65507_bytes_cross_the_nat_whole_both_ways() {
    let nat = Nat::new().unwrap();
    let dir = Scratch::new("udp-nat").unwrap();
    let (_, echoed) = udp_echo(home_udp(&nat, 7));
    let (_server, _client) = udp_lab(&nat, &dir);
    let echo = SocketAddr::from((nat.public().addr(), 7007));
    let visitor = udp_visitor(nat.router().udp_bind(0).unwrap());
    for size in [60_000, MAX_DATAGRAM, 1, 2_049] {
        udp_echo_through(&visitor, echo, &payload(size));
    }
    let sizes: Vec<usize> = echoed.lock().unwrap().iter().map(|(_, n)| *n).collect();
    assert_eq!(
        sizes,
        [60_000, MAX_DATAGRAM, 1, 2_049],
        "what the home service got"
    );
}

/// A server and a client on loopback with one UDP service `u` (and `extra` services) to a
/// local echo service; returns them, the service's public address and the echo's log.
fn loopback(
    dir: &Scratch,
    server_extra: &str,
    client_extra: &str,
) -> (Proc, Proc, SocketAddr, common::udp::Seen) {
    let (local, seen) = udp_echo(UdpSocket::bind("127.0.0.1:0").unwrap());
    let server_toml = write(
        dir,
        "server.toml",
        &format!(
            "[server]\nbind_addr = \"127.0.0.1:0\"\ndefault_token = \"{TOKEN}\"\n{server_extra}\n\
             [server.services.u]\ntype = \"udp\"\nbind_addr = \"127.0.0.1:0\"\n"
        ),
    );
    let server = server(&server_toml);
    let client_toml = write(
        dir,
        "client.toml",
        &format!(
            "[client]\nremote_addr = \"{}\"\ndefault_token = \"{TOKEN}\"\n{client_extra}\n\
             [client.services.u]\ntype = \"udp\"\nlocal_addr = \"{local}\"\n",
            control_addr(&server)
        ),
    );
    let client = client(&client_toml);
    let public = service_addr(&server, "u");
    (server, client, public, seen)
}

#[test]
fn metrics_count_udp_sessions_datagrams_and_bytes_on_both_sides() {
    let dir = Scratch::new("udp").unwrap();
    let (server, client, public, _) = loopback(
        &dir,
        "metrics_addr = \"127.0.0.1:0\"",
        "metrics_addr = \"127.0.0.1:0\"",
    );
    let visitors: Vec<UdpSocket> = (0..3)
        .map(|_| udp_visitor(UdpSocket::bind("127.0.0.1:0").unwrap()))
        .collect();
    for visitor in &visitors {
        udp_echo_through(visitor, public, &payload(1_000));
        udp_echo_through(visitor, public, &payload(500));
    }
    for proc in [&server, &client] {
        let body = scrape(logged_addr(proc, "metrics listening"));
        for line in [
            "tunnel_connections_total{service=\"u\"} 3",
            "tunnel_connections_open{service=\"u\"} 3",
            "tunnel_datagrams_total{service=\"u\",direction=\"to_service\"} 6",
            "tunnel_datagrams_total{service=\"u\",direction=\"to_visitor\"} 6",
            "tunnel_bytes_total{service=\"u\",direction=\"to_service\"} 4500",
            "tunnel_bytes_total{service=\"u\",direction=\"to_visitor\"} 4500",
            "tunnel_datagrams_dropped_total{service=\"u\"} 0",
            "tunnel_control_channel_open{service=\"u\"} 1",
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
        }
    }
}

/// `GET /metrics` on `addr`: the body.
fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = visit(addr);
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

#[test]
fn a_reload_that_adds_a_service_keeps_the_udp_sessions_open() {
    let dir = Scratch::new("udp").unwrap();
    let (server, _client, public, seen) = loopback(&dir, "", "");
    let visitor = udp_visitor(UdpSocket::bind("127.0.0.1:0").unwrap());
    udp_echo_through(&visitor, public, b"before");
    // A TCP service joins the server's config; the UDP service is untouched.
    let server_toml = dir.join("server.toml");
    let mut text = std::fs::read_to_string(&server_toml).unwrap();
    text.push_str("[server.services.t]\nbind_addr = \"127.0.0.1:0\"\n");
    replace(&server_toml, &text);
    server.wait_notification("RELOADING=1", WAIT).unwrap();
    server.wait_ready(WAIT).unwrap();
    service_addr(&server, "t");
    udp_echo_through(&visitor, public, b"after");
    // The same session on the client: the local service saw one source port.
    let sources: HashSet<SocketAddr> = seen.lock().unwrap().iter().map(|(f, _)| *f).collect();
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert!(!server.stderr().contains("service stopped service=u"));
    assert_eq!(
        server.stderr().matches("udp data channel started").count(),
        1
    );
}

#[test]
fn a_udp_service_with_no_client_drops_datagrams_and_serves_once_one_connects() {
    let dir = Scratch::new("udp").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &format!(
            "[server]\nbind_addr = \"127.0.0.1:0\"\ndefault_token = \"{TOKEN}\"\n\
             [server.services.u]\ntype = \"udp\"\nbind_addr = \"127.0.0.1:0\"\n"
        ),
    );
    let server = server(&server_toml);
    let public = service_addr(&server, "u");
    let visitor = udp_visitor(UdpSocket::bind("127.0.0.1:0").unwrap());
    visitor.send_to(b"nobody home", public).unwrap();
    server
        .wait_stderr("no client serves this service: datagrams dropped", WAIT)
        .unwrap();
    let local = udp_echo_service();
    let client_toml = write(
        &dir,
        "client.toml",
        &format!(
            "[client]\nremote_addr = \"{}\"\ndefault_token = \"{TOKEN}\"\n\
             [client.services.u]\ntype = \"udp\"\nlocal_addr = \"{local}\"\n",
            control_addr(&server)
        ),
    );
    let _client = client(&client_toml);
    // The first answer is this one's: the dropped datagram never reaches the service.
    udp_echo_through(&visitor, public, b"now served");
}
