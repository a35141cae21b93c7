//! Visitor limits a server applies without being asked: a default `max_connections` from the
//! process's open file limit, and an `idle_timeout` for connections that carry nothing.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use testkit::{ProcBuilder, Scratch};

/// Sends a line through `stream` (an echo service behind the tunnel) and reads it back.
fn echo_line(stream: &mut std::net::TcpStream) {
    stream.write_all(b"hello\n").unwrap();
    let mut back = [0u8; 6];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello\n");
}

#[test]
fn visitors_past_what_the_file_limit_allows_are_closed_on_arrival_by_default() {
    let dir = Scratch::new("limits").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &server_config("", &[("echo", "echo-token")]),
    );
    // 128 open files: three quarters of them at six per connection make 16 connections.
    let server = ProcBuilder::new("prlimit")
        .args(["--nofile=128:128", "--", TUNNEL, "server", "-c"])
        .arg(&server_toml)
        .env("LABKIT_LOG", "info,tunnel=debug")
        .notify()
        .spawn()
        .unwrap();
    server.wait_ready(WAIT).unwrap();
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
    let service = service_addr(&server, "echo");
    let mut open: Vec<_> = (0..16).map(|_| visit(service)).collect();
    for stream in &mut open {
        echo_line(stream);
    }
    let mut past = visit(service);
    let _ = past.write_all(b"hello\n");
    let mut byte = [0u8; 1];
    match past.read(&mut byte) {
        Ok(0) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the 17th visitor was carried: {other:?}"),
    }
    server
        .wait_stderr(
            "connection limit reached: visitor closed service=echo",
            WAIT,
        )
        .unwrap();
    // The open ones still work.
    echo_line(&mut open[0]);
}

#[test]
fn a_visitor_connection_that_carries_nothing_for_the_idle_timeout_is_closed() {
    let dir = Scratch::new("limits").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &format!(
            "{}idle_timeout = 1\n[server.services.forever]\ntoken = \"forever-token\"\n\
             bind_addr = \"127.0.0.1:0\"\nidle_timeout = 0\n",
            server_config("", &[("echo", "echo-token")])
        ),
    );
    let server = server(&server_toml);
    let echo = echo_service();
    let client_toml = write(
        &dir,
        "client.toml",
        &client_config(
            control_addr(&server),
            "",
            &[
                ("echo", "echo-token", echo),
                ("forever", "forever-token", echo),
            ],
        ),
    );
    let _client = client(&client_toml);
    let mut idle = visit(service_addr(&server, "echo"));
    let mut forever = visit(service_addr(&server, "forever"));
    echo_line(&mut idle);
    echo_line(&mut forever);
    let started = Instant::now();
    let mut byte = [0u8; 1];
    match idle.read(&mut byte) {
        Ok(0) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the idle visitor was not closed: {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    // The service with idle_timeout = 0 kept its connection through the same idle second.
    echo_line(&mut forever);
}
