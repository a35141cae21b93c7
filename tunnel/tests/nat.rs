//! End to end across a real NAT (testkit's network namespaces): the reference lab's configs,
//! unchanged but for the server's host name, carry a public visitor to four home services;
//! and a peer cut off without a FIN is found dead by heartbeat on both sides.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use testkit::{Nat, Proc, Scratch};

const LAB_SERVER: &str = include_str!("../../examples/tunnel/server.toml");
const LAB_CLIENT: &str = include_str!("../../examples/tunnel/client.toml");

fn http_get(mut stream: TcpStream, host: &str) -> String {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn echo(mut stream: TcpStream, message: &[u8]) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
}

/// Starts the lab's server on the public host and its client on the home host.
fn lab(nat: &Nat, dir: &Scratch, server_extra: &str, client_extra: &str) -> (Proc, Proc) {
    let server_toml = write(
        dir,
        "server.toml",
        &LAB_SERVER.replace("[server]\n", &format!("[server]\n{server_extra}\n")),
    );
    let server = tunnel_in(nat.public(), "server", &server_toml, &[]);
    let remote = format!("{}:7000", nat.public().addr());
    let client_toml = write(
        dir,
        "client.toml",
        &LAB_CLIENT
            .replace("lab.example.org:7000", &remote)
            .replace("[client]\n", &format!("[client]\n{client_extra}\n")),
    );
    let client = tunnel_in(nat.home(), "client", &client_toml, &[]);
    (server, client)
}

/// The four home services of the lab, on the home host's loopback ports from client.toml.
fn home_services(nat: &Nat) {
    let echo_on = |port| {
        serve(nat.home().tcp_listen(port).unwrap(), |mut stream| {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        })
    };
    echo_on(22);
    echo_on(222);
    http_service(nat.home().tcp_listen(8000).unwrap(), "the lab's web");
    http_service(nat.home().tcp_listen(3000).unwrap(), "gitea");
}

#[test]
fn a_public_visitor_reaches_all_four_home_services_through_the_nat() {
    let nat = Nat::new().unwrap();
    let dir = Scratch::new("nat").unwrap();
    home_services(&nat);
    let (server, _client) = lab(&nat, &dir, "", "");
    let public = nat.public().addr();
    // ssh and git ssh face the Internet: a visitor from outside (the router's side).
    let outside = nat.router();
    echo(
        outside
            .tcp_connect(SocketAddr::from((public, 3389)), WAIT)
            .unwrap(),
        b"SSH-2.0-OpenSSH_9.2\r\n",
    );
    echo(
        outside
            .tcp_connect(SocketAddr::from((public, 222)), WAIT)
            .unwrap(),
        b"SSH-2.0-git\r\n",
    );
    // web and git listen on the VM's loopback, for the edge proxy on the same host.
    let web = nat
        .public()
        .tcp_connect("127.0.0.1:7001".parse().unwrap(), WAIT)
        .unwrap();
    let response = http_get(web, "lab.example.org");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("the lab's web"), "{response}");
    let git = nat
        .public()
        .tcp_connect("127.0.0.1:3000".parse().unwrap(), WAIT)
        .unwrap();
    assert!(http_get(git, "git.example.org").ends_with("gitea"));
    // The server sees the client only through the router's address.
    let router = nat.router().addr().to_string();
    let line = server
        .wait_stderr("control channel open service=ssh ", WAIT)
        .unwrap();
    assert!(line.contains(&format!("client={router}:")), "{line}");
}

#[test]
fn a_peer_cut_off_without_a_fin_is_found_dead_by_heartbeat_on_both_sides() {
    let nat = Nat::new().unwrap();
    let dir = Scratch::new("nat").unwrap();
    home_services(&nat);
    let (server, client) = lab(
        &nat,
        &dir,
        "heartbeat_interval = 1\nheartbeat_timeout = 2",
        "heartbeat_timeout = 2",
    );
    let public = nat.public().addr();
    let ssh = SocketAddr::from((public, 3389));
    echo(nat.router().tcp_connect(ssh, WAIT).unwrap(), b"before");

    // The home router drops everything, as a pulled cable would: no FIN, no RST.
    let router = nat.router().name().to_owned();
    let nft = |script: &str| {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &router, "nft", script])
            .status()
            .unwrap();
        assert!(status.success(), "nft {script}");
    };
    let cut = Instant::now();
    nft("add table inet cut");
    nft("add chain inet cut forward { type filter hook forward priority -10; policy drop; }");
    wait_count(&client, "control channel lost", 4);
    let client_saw = cut.elapsed();
    let line = client.stderr();
    assert!(
        line.contains("timed out after 2s waiting for a heartbeat"),
        "{line}"
    );
    wait_count(&server, "control channel closed", 4);
    let server_saw = cut.elapsed();
    // heartbeat_timeout 2 s (+ one heartbeat interval on the server, whose timer starts at
    // the first unacknowledged heartbeat), far below TCP keepalive's 20 s + probes.
    eprintln!("dead peer found after: client {client_saw:?}, server {server_saw:?}");
    assert!(
        client_saw < Duration::from_secs(6),
        "client: {client_saw:?}"
    );
    assert!(
        server_saw < Duration::from_secs(8),
        "server: {server_saw:?}"
    );

    nft("delete table inet cut");
    wait_count(&server, "control channel open service=ssh ", 2);
    echo(nat.router().tcp_connect(ssh, WAIT).unwrap(), b"after");
}
