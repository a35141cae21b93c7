//! Nat is a real NAT: the home host dials out and the public host sees the router's address;
//! a connection from the public side to the home host goes nowhere.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use testkit::Nat;

#[test]
fn home_dials_out_through_the_nat_and_outside_cannot_dial_in() {
    let nat = Nat::new().unwrap();
    let listener = nat.public().tcp_listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
        peer
    });
    let to = SocketAddr::from((nat.public().addr(), port));
    let mut stream = nat.home().tcp_connect(to, Duration::from_secs(5)).unwrap();
    stream.write_all(b"hello").unwrap();
    let mut echo = [0u8; 5];
    stream.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello");
    let peer = server.join().unwrap();
    assert_eq!(
        peer.ip(),
        nat.router().addr(),
        "the public host sees the router, not home"
    );

    let home_listener = nat.home().tcp_listen(0).unwrap();
    let home_port = home_listener.local_addr().unwrap().port();
    let inbound = SocketAddr::from((nat.home().addr(), home_port));
    let err = nat
        .public()
        .tcp_connect(inbound, Duration::from_secs(2))
        .expect_err("the NAT must not let the public host in");
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn processes_run_inside_a_host() {
    let nat = Nat::new().unwrap();
    let proc = nat
        .home()
        .proc("ip")
        .unwrap()
        .args(["-4", "-o", "addr", "show"])
        .spawn()
        .unwrap();
    proc.expect_exit(0, Duration::from_secs(10)).unwrap();
    let out = proc.stdout();
    assert!(out.contains(&nat.home().addr().to_string()), "{out}");
    assert!(!out.contains(&nat.public().addr().to_string()), "{out}");
}
