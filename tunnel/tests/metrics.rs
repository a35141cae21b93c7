//! The opt-in Prometheus endpoint (`metrics_addr`) on both sides: per-service connections,
//! bytes each way, refused visitors and handshake failures by reason, as a scrape shows them.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::*;
use testkit::{Proc, Scratch};

/// `GET path` on the endpoint: the status line and the body.
fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = visit(addr);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: metrics\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

fn metrics_addr(proc: &Proc) -> SocketAddr {
    logged_addr(proc, "metrics listening")
}

fn assert_line(body: &str, line: &str) {
    assert!(
        body.lines().any(|l| l == line),
        "no line {line:?} in:\n{body}"
    );
}

#[test]
fn both_sides_count_connections_bytes_refusals_and_handshake_failures() {
    let dir = Scratch::new("metrics").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config(
            "metrics_addr = \"127.0.0.1:0\"",
            &[("echo", "m-token-1"), ("idle", "i-token-1")],
        ),
    );
    let server = server(&server_toml);
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "metrics_addr = \"127.0.0.1:0\"",
            &[("echo", "m-token-1", echo_service())],
        ),
    );
    let client = tunnel(&["client"], &client_toml).spawn().unwrap();
    client
        .wait_stderr("control channel open service=echo", WAIT)
        .unwrap();
    let echo = service_addr(&server, "echo");
    for _ in 0..3 {
        echo_through(echo, &payload(100_000));
    }
    wait_count(&server, "visitor connection finished service=echo", 3);
    wait_count(&client, "connection finished service=echo", 3);
    // No client serves `idle`: its visitor is refused.
    let mut refused = visit(service_addr(&server, "idle"));
    assert!(closed_by_peer(&mut refused, WAIT));
    // Garbage on the control port: a handshake failure.
    let mut garbage = TcpStream::connect(control_addr(&server)).unwrap();
    garbage.write_all(&[0xff; 37]).unwrap();
    server.wait_stderr("connection refused", WAIT).unwrap();

    let (status, body) = scrape(metrics_addr(&server), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("# TYPE tunnel_connections_total counter"),
        "{body}"
    );
    assert_line(&body, "tunnel_connections_total{service=\"echo\"} 3");
    assert_line(&body, "tunnel_connections_open{service=\"echo\"} 0");
    assert_line(
        &body,
        "tunnel_bytes_total{service=\"echo\",direction=\"to_service\"} 300000",
    );
    assert_line(
        &body,
        "tunnel_bytes_total{service=\"echo\",direction=\"to_visitor\"} 300000",
    );
    assert_line(&body, "tunnel_control_channel_open{service=\"echo\"} 1");
    assert_line(&body, "tunnel_control_channel_open{service=\"idle\"} 0");
    assert_line(
        &body,
        "tunnel_connections_refused_total{service=\"idle\"} 1",
    );
    assert_line(
        &body,
        "tunnel_handshake_failures_total{reason=\"malformed\"} 1",
    );
    assert!(!body.contains("m-token"), "a token in the metrics");

    let (status, body) = scrape(metrics_addr(&client), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_line(&body, "tunnel_connections_total{service=\"echo\"} 3");
    assert_line(
        &body,
        "tunnel_bytes_total{service=\"echo\",direction=\"to_service\"} 300000",
    );
    assert_line(
        &body,
        "tunnel_bytes_total{service=\"echo\",direction=\"to_visitor\"} 300000",
    );
    assert_line(&body, "tunnel_reconnects_total{service=\"echo\"} 0");

    let (status, _) = scrape(metrics_addr(&server), "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn a_client_counts_its_reconnects_after_the_server_restarts() {
    let dir = Scratch::new("metrics").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("", &[("echo", "token-t1")]),
    );
    let first = server(&server_toml);
    let control = control_addr(&first);
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control,
            "metrics_addr = \"127.0.0.1:0\"",
            &[("echo", "token-t1", echo_service())],
        ),
    );
    let client = client(&client_toml);
    first.stop(WAIT).unwrap();
    client
        .wait_stderr("control channel lost: reconnecting", WAIT)
        .unwrap();
    // The same control port again.
    let again = write(
        &dir,
        "server2.toml",
        &server_config("", &[("echo", "token-t1")]).replacen(
            "127.0.0.1:0",
            &control.to_string(),
            1,
        ),
    );
    let _second = server(&again);
    wait_count(&client, "control channel open service=echo", 2);
    let (_, body) = scrape(metrics_addr(&client), "/metrics");
    assert_line(&body, "tunnel_reconnects_total{service=\"echo\"} 1");
    assert_line(&body, "tunnel_control_channel_open{service=\"echo\"} 1");
}

#[test]
fn a_reload_onto_a_taken_port_keeps_the_old_listener_and_counts_the_failure() {
    let dir = Scratch::new("metrics").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("metrics_addr = \"127.0.0.1:0\"", &[("echo", "echo-token")]),
    );
    let server = server(&server_toml);
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[("echo", "echo-token", echo_service())],
        ),
    );
    let _client = client(&client_toml);
    let echo = service_addr(&server, "echo");
    echo_through(echo, b"before");
    // The service moves to a port something else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let moved = server_config("metrics_addr = \"127.0.0.1:0\"", &[("echo", "echo-token")]).replace(
        "[server.services.echo]\ntoken = \"echo-token\"\nbind_addr = \"127.0.0.1:0\"",
        &format!(
            "[server.services.echo]\ntoken = \"echo-token\"\nbind_addr = \"{}\"",
            taken.local_addr().unwrap()
        ),
    );
    replace(&server_toml, &moved);
    server.wait_notification("RELOADING=1", WAIT).unwrap();
    server.wait_ready(WAIT).unwrap();
    let line = server
        .wait_stderr("reload not applied: the service runs on as it was", WAIT)
        .unwrap();
    assert!(line.contains("service echo"), "{line}");
    echo_through(echo, b"after: the old listener still serves");
    let (_, body) = scrape(metrics_addr(&server), "/metrics");
    assert_line(&body, "tunnel_reload_failures_total 1");
    // The control port moving onto a taken port keeps the whole server as it was.
    let control_moved = moved.replace(
        "[server]\nbind_addr = \"127.0.0.1:0\"",
        &format!("[server]\nbind_addr = \"{}\"", taken.local_addr().unwrap()),
    );
    assert_ne!(control_moved, moved);
    replace(&server_toml, &control_moved);
    server.wait_notification("RELOADING=1", WAIT).unwrap();
    server
        .wait_stderr("reload not applied: the running server is kept", WAIT)
        .unwrap();
    echo_through(echo, b"after the control port could not move");
    let (_, body) = scrape(metrics_addr(&server), "/metrics");
    assert_line(&body, "tunnel_reload_failures_total 2");
}

#[test]
fn tunnel_status_lists_each_service_with_its_clients_visitors_bytes_and_last_error() {
    let dir = Scratch::new("status").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config(
            "metrics_addr = \"127.0.0.1:0\"",
            &[("echo", "s-token-1"), ("idle", "s-token-2")],
        ),
    );
    let server = server(&server_toml);
    let metrics = metrics_addr(&server);
    // `tunnel status` reads the metrics_addr of the file: here the bound port.
    let status_toml = write(
        &dir,
        "status.toml",
        &server_config(&format!("metrics_addr = \"{metrics}\""), &[]),
    );
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[("echo", "s-token-1", echo_service())],
        ),
    );
    let _client = client(&client_toml);
    echo_through(service_addr(&server, "echo"), b"hello");
    let output = std::process::Command::new(TUNNEL)
        .args(["status", "-c"])
        .arg(&status_toml)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text} {:?}", output.stderr);
    assert!(
        text.contains("echo\n  clients connected: 1 (127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains("visitors: 0 open, 1 carried, 0 refused"),
        "{text}"
    );
    assert!(
        text.contains("bytes: 5 to the service, 5 to visitors"),
        "{text}"
    );
    assert!(
        text.contains("idle\n  clients connected: 0 (none)"),
        "{text}"
    );

    // A config without metrics_addr: a config error, exit status 78.
    let bare = write(&dir, "bare.toml", &server_config("", &[]));
    let output = std::process::Command::new(TUNNEL)
        .args(["status", "-c"])
        .arg(&bare)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("has no metrics_addr"));
}
