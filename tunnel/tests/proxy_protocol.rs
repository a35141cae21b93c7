//! PROXY protocol towards local services: a local service that reads the header sees each
//! visitor's real address and port, for v1 and v2, IPv4 and IPv6 visitors, through a labkit
//! client and through a rathole 0.5 client (the server writes the header; any client
//! carries it).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use common::*;
use testkit::{Proc, ProcBuilder, Scratch};
use tunnel::proxy_protocol::{Proxied, decode};

/// A local service that reads a PROXY header, answers `source destination\n` with what it
/// said (or `error ...`), then echoes the visitor's bytes.
fn header_service() -> SocketAddr {
    serve(TcpListener::bind("127.0.0.1:0").unwrap(), |mut stream| {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 4096];
        let mut have = 0;
        let (proxied, len) = loop {
            match decode(&buf[..have]) {
                Ok(Some(found)) => break found,
                Ok(None) => {}
                Err(err) => {
                    let _ = writeln!(stream, "error {err}");
                    return;
                }
            }
            match stream.read(&mut buf[have..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
        };
        let answer = match proxied {
            Proxied::Tcp {
                source,
                destination,
            } => format!("{source} {destination}\n"),
            Proxied::Unknown => "unknown\n".to_owned(),
        };
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
        // Bytes that came with the header belong to the visitor.
        if stream.write_all(&buf[len..have]).is_err() {
            return;
        }
        let _ = std::io::copy(&mut stream.try_clone().unwrap(), &mut stream);
    })
}

/// Services: (name, bind address, the key that turns the header on).
const SERVICES: [(&str, &str, &str); 4] = [
    ("v1ipv4", "127.0.0.1:0", "enable_proxy_protocol = true"),
    ("v2ipv4", "127.0.0.1:0", "proxy_protocol = \"v2\""),
    ("v1ipv6", "[::1]:0", "proxy_protocol = \"v1\""),
    ("v2ipv6", "[::1]:0", "proxy_protocol = \"v2\""),
];

fn start_server(dir: &Scratch) -> Proc {
    let mut text =
        "[server]\nbind_addr = \"127.0.0.1:0\"\ndefault_token = \"pp-token\"\n".to_owned();
    for (name, bind, key) in SERVICES {
        text.push_str(&format!(
            "[server.services.{name}]\nbind_addr = \"{bind}\"\n{key}\n"
        ));
    }
    text.push_str("[server.services.plain]\nbind_addr = \"127.0.0.1:0\"\n");
    server(&write(dir, "server.toml", &text))
}

fn client_toml(dir: &Scratch, server: &Proc) -> std::path::PathBuf {
    let local = header_service();
    let mut text = format!(
        "[client]\nremote_addr = \"{}\"\ndefault_token = \"pp-token\"\n",
        control_addr(server)
    );
    for name in SERVICES.map(|(name, _, _)| name) {
        text.push_str(&format!(
            "[client.services.{name}]\nlocal_addr = \"{local}\"\n"
        ));
    }
    text.push_str(&format!(
        "[client.services.plain]\nlocal_addr = \"{}\"\n",
        echo_service()
    ));
    write(dir, "client.toml", &text)
}

/// Each service's local side sees the visitor's own address and the port it reached, and the
/// visitor's bytes arrive after the header untouched; a service without the key gets none.
fn every_service_sees_its_visitor(server: &Proc) {
    for (name, _, _) in SERVICES {
        let addr = service_addr(server, name);
        for _ in 0..3 {
            let visitor = visit(addr);
            let mut reader = BufReader::new(visitor.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let expected = format!(
                "{} {}\n",
                visitor.local_addr().unwrap(),
                visitor.peer_addr().unwrap()
            );
            assert_eq!(line, expected, "service {name}");
            let mut writer: &TcpStream = &visitor;
            writer.write_all(b"after the header").unwrap();
            let mut back = [0u8; 16];
            reader.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"after the header", "service {name}");
        }
    }
    echo_through(service_addr(server, "plain"), b"no header here");
}

#[test]
fn local_services_see_the_visitors_address_through_a_labkit_client() {
    let dir = Scratch::new("proxy-protocol").unwrap();
    let server = start_server(&dir);
    let _client = client(&client_toml(&dir, &server));
    every_service_sees_its_visitor(&server);
}

#[test]
fn local_services_see_the_visitors_address_through_a_rathole_client() {
    let dir = Scratch::new("proxy-protocol").unwrap();
    let server = start_server(&dir);
    let _rathole = rathole_client(&client_toml(&dir, &server));
    for (name, _, _) in SERVICES {
        server
            .wait_stderr(&format!("control channel open service={name} "), WAIT)
            .unwrap();
    }
    server
        .wait_stderr("control channel open service=plain ", WAIT)
        .unwrap();
    every_service_sees_its_visitor(&server);
}

#[test]
fn both_proxy_protocol_keys_at_once_are_a_config_error() {
    let dir = Scratch::new("proxy-protocol").unwrap();
    let config = write(
        &dir,
        "server.toml",
        "[server]\nbind_addr = \"127.0.0.1:0\"\ndefault_token = \"t-long-enough\"\n\
         [server.services.web]\nbind_addr = \"127.0.0.1:0\"\n\
         proxy_protocol = \"v2\"\nenable_proxy_protocol = true\n",
    );
    let check = ProcBuilder::new(TUNNEL)
        .args(["check", "-c"])
        .arg(&config)
        .spawn()
        .unwrap();
    check.expect_exit(78, WAIT).unwrap();
    assert!(
        check
            .stderr()
            .contains("server.services.web.enable_proxy_protocol"),
        "{}",
        check.stderr()
    );
}
