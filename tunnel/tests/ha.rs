//! A front door that survives losing a VM or a home server, across real NATs (testkit's
//! network namespaces): one client serving through two servers, and two clients serving one
//! service. Heartbeats are short (1 s, dead after 2 s) so each test takes seconds.
//!
//! Two of testkit's NATs make the hosts; a veth from one NAT's router to the other's public
//! host (masqueraded, as the router's own public side is) gives a home a second VM, or a VM a
//! second home. A cut drops everything the router forwards over one link: no FIN, no RST.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use testkit::{Host, Nat, Proc, Scratch};

const CONTROL: u16 = 7000;
const SERVICE: u16 = 2222;
const HOME_PORT: u16 = 8022;
const TOKEN: &str = "echo-token-ha";

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?}");
}

/// A link from `router` to `public` masqueraded on the router's side; returns the address
/// `public` has on it and the router's interface name (for [`cut`]).
fn link(router: &Host, public: &Host) -> (IpAddr, String) {
    let (outer, inner) = (format!("{}v", router.name()), format!("{}w", router.name()));
    let (r, p) = (router.name(), public.name());
    run(&[
        "ip", "link", "add", &outer, "netns", r, "type", "veth", "peer", "name", &inner, "netns", p,
    ]);
    run(&["ip", "-n", r, "addr", "add", "10.77.0.1/24", "dev", &outer]);
    run(&["ip", "-n", p, "addr", "add", "10.77.0.2/24", "dev", &inner]);
    run(&["ip", "-n", r, "link", "set", &outer, "up"]);
    run(&["ip", "-n", p, "link", "set", &inner, "up"]);
    let masquerade = format!("add rule ip nat postrouting oifname \"{outer}\" masquerade");
    run(&["ip", "netns", "exec", r, "nft", &masquerade]);
    (IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)), outer)
}

/// Drops everything `router` forwards in or out of `dev` (all of it without `dev`).
fn cut(router: &Host, dev: Option<&str>) {
    let r = router.name();
    run(&["ip", "netns", "exec", r, "nft", "add table inet cut"]);
    run(&[
        "ip",
        "netns",
        "exec",
        r,
        "nft",
        "add chain inet cut forward { type filter hook forward priority -10; policy accept; }",
    ]);
    let rules = match dev {
        Some(dev) => vec![
            format!("iifname \"{dev}\" drop"),
            format!("oifname \"{dev}\" drop"),
        ],
        None => vec!["drop".to_owned()],
    };
    for rule in rules {
        run(&[
            "ip",
            "netns",
            "exec",
            r,
            "nft",
            &format!("add rule inet cut forward {rule}"),
        ]);
    }
}

/// Undoes [`cut`].
fn mend(router: &Host) {
    run(&[
        "ip",
        "netns",
        "exec",
        router.name(),
        "nft",
        "delete table inet cut",
    ]);
}

/// A server on `vm` with the service `echo` on [`SERVICE`]; `extra` goes under `[server]`,
/// `service_extra` under the service.
fn vm_server(vm: &Host, dir: &Scratch, name: &str, service_extra: &str) -> Proc {
    let text = format!(
        "[server]\nbind_addr = \"0.0.0.0:{CONTROL}\"\nheartbeat_interval = 1\nheartbeat_timeout = 2\n\
         handshake_timeout = 3\n\
         [server.services.echo]\nbind_addr = \"0.0.0.0:{SERVICE}\"\ntoken = \"{TOKEN}\"\n{service_extra}\n"
    );
    tunnel_in(
        vm,
        "server",
        &write(dir, name, &text),
        &[("LABKIT_LOG", "info,tunnel=debug")],
    )
}

/// A client on `home` of the servers at `remotes`, serving `echo` from [`HOME_PORT`].
fn home_client(home: &Host, dir: &Scratch, name: &str, remotes: &[IpAddr], extra: &str) -> Proc {
    let remotes: Vec<String> = remotes
        .iter()
        .map(|ip| format!("\"{ip}:{CONTROL}\""))
        .collect();
    let text = format!(
        "[client]\nremote_addr = [{}]\nheartbeat_timeout = 2\nretry_interval = 1\n{extra}\n\
         [client.services.echo]\ntoken = \"{TOKEN}\"\nlocal_addr = \"127.0.0.1:{HOME_PORT}\"\n",
        remotes.join(", ")
    );
    tunnel_in(home, "client", &write(dir, name, &text), &[])
}

/// An echo service on `home` that answers each read with `NAME:` and the bytes: which home
/// answered shows in the reply, and it never speaks first.
fn tagged_echo(home: &Host, name: &'static str) {
    serve(home.tcp_listen(HOME_PORT).unwrap(), move |mut stream| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            let mut reply = format!("{name}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            if n == 0 || stream.write_all(&reply).is_err() {
                return;
            }
        }
    });
}

/// A visitor on `vm` to its own service port.
fn visitor(vm: &Host) -> TcpStream {
    let stream = vm
        .tcp_connect(SocketAddr::from((vm.addr(), SERVICE)), WAIT)
        .unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

/// Sends `message` and returns the reply (one read: the replies here are small).
fn ask(stream: &mut TcpStream, message: &str) -> String {
    stream.write_all(message.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn control_port(ip: IpAddr) -> String {
    format!("server={ip}:{CONTROL}")
}

/// Waits until `server` has logged its client's control channel for `echo`.
fn wait_open(server: &Proc) {
    server
        .wait_stderr("control channel open service=echo", WAIT)
        .unwrap();
}

/// One home with a tagged echo and two VMs: the first lab's public host, and the second
/// lab's, linked to the first lab's router.
struct TwoVms {
    nat: Nat,
    other: Nat,
    dir: Scratch,
    vm1_ip: IpAddr,
    vm2_ip: IpAddr,
    /// The router's side of the link to VM 2 (to cut that link alone).
    vm2_link: String,
}

impl TwoVms {
    fn new() -> TwoVms {
        let (nat, other) = (Nat::new().unwrap(), Nat::new().unwrap());
        let dir = Scratch::new("ha").unwrap();
        let (vm2_ip, vm2_link) = link(nat.router(), other.public());
        let vm1_ip = IpAddr::V4(nat.public().addr());
        tagged_echo(nat.home(), "home");
        TwoVms {
            nat,
            other,
            dir,
            vm1_ip,
            vm2_ip,
            vm2_link,
        }
    }

    fn vm1(&self) -> &Host {
        self.nat.public()
    }

    fn vm2(&self) -> &Host {
        self.other.public()
    }

    /// VM 1's (`index` 1) or VM 2's server.
    fn server(&self, index: u8) -> Proc {
        let vm = if index == 1 { self.vm1() } else { self.vm2() };
        vm_server(vm, &self.dir, &format!("vm{index}.toml"), "")
    }

    /// The home's client of both servers, VM 1's first; `extra` goes under `[client]`.
    fn client(&self, extra: &str) -> Proc {
        home_client(
            self.nat.home(),
            &self.dir,
            "client.toml",
            &[self.vm1_ip, self.vm2_ip],
            extra,
        )
    }
}

#[test]
fn one_client_serves_through_two_vms_and_keeps_serving_while_either_is_killed_or_cut_off() {
    let lab = TwoVms::new();
    let (vm1, vm2, vm1_ip, vm2_ip) = (lab.vm1(), lab.vm2(), lab.vm1_ip, lab.vm2_ip);
    let server1 = lab.server(1);
    let server2 = lab.server(2);
    let client = lab.client("");
    wait_open(&server1);
    wait_open(&server2);
    assert_eq!(ask(&mut visitor(vm1), "a"), "home:a");
    assert_eq!(ask(&mut visitor(vm2), "b"), "home:b");

    // VM 1's server is killed: a visitor open on VM 2 goes on, new ones still come in there.
    let mut open = visitor(vm2);
    assert_eq!(ask(&mut open, "before kill"), "home:before kill");
    server1.kill().unwrap();
    wait_count(&client, "control channel lost", 1);
    assert_eq!(ask(&mut open, "after kill"), "home:after kill");
    assert_eq!(ask(&mut visitor(vm2), "c"), "home:c");
    // It comes back on the same port: the client reconnects and serves through it again.
    let server1 = lab.server(1);
    wait_open(&server1);
    wait_count(
        &client,
        &format!("control channel open service=echo {}", control_port(vm1_ip)),
        2,
    );
    assert_eq!(ask(&mut visitor(vm1), "d"), "home:d");

    // VM 2's link is cut without a FIN: visitors on VM 1, open and new, are not lost.
    let mut open = visitor(vm1);
    assert_eq!(ask(&mut open, "before cut"), "home:before cut");
    let since = Instant::now();
    cut(lab.nat.router(), Some(&lab.vm2_link));
    wait_count(&client, "control channel lost", 2);
    eprintln!("client found VM 2 gone after {:?}", since.elapsed());
    assert!(
        since.elapsed() < Duration::from_secs(6),
        "{:?}",
        since.elapsed()
    );
    assert_eq!(ask(&mut open, "after cut"), "home:after cut");
    for i in 0..5 {
        let message = format!("new {i}");
        assert_eq!(ask(&mut visitor(vm1), &message), format!("home:{message}"));
    }
    mend(lab.nat.router());
    wait_count(
        &client,
        &format!("control channel open service=echo {}", control_port(vm2_ip)),
        2,
    );
    assert_eq!(ask(&mut visitor(vm2), "e"), "home:e");
}

#[test]
fn in_failover_mode_only_the_first_server_up_gets_visitors() {
    let lab = TwoVms::new();
    let (vm1, vm2) = (lab.vm1(), lab.vm2());
    let server1 = lab.server(1);
    let server2 = lab.server(2);
    let client = lab.client("mode = \"failover\"");
    wait_open(&server1);
    wait_open(&server2);
    assert_eq!(ask(&mut visitor(vm1), "a"), "home:a");
    // The standby holds its control channel but opens no data channel: its visitor waits,
    // and is closed after the server's handshake timeout.
    let mut standby = visitor(vm2);
    assert!(closed_by_peer(&mut standby, WAIT));
    server2
        .wait_stderr("no data channel from the client in time", WAIT)
        .unwrap();
    server1.kill().unwrap();
    wait_count(&client, "control channel lost", 1);
    assert_eq!(ask(&mut visitor(vm2), "b"), "home:b");
}

#[test]
fn in_failover_mode_a_standby_that_served_while_the_first_server_was_down_stops_when_it_returns() {
    let lab = TwoVms::new();
    let (vm1, vm2, vm1_ip) = (lab.vm1(), lab.vm2(), lab.vm1_ip);
    // Only the standby is up: it serves, with the data channels its server asked for.
    let server2 = lab.server(2);
    let client = lab.client("mode = \"failover\"");
    wait_open(&server2);
    assert_eq!(ask(&mut visitor(vm2), "a"), "home:a");
    // The first server comes up: it gets the visitors, and the standby's idle data channels,
    // opened while it had the turn, carry none of its visitors any more.
    let _server1 = lab.server(1);
    wait_count(
        &client,
        &format!("control channel open service=echo {}", control_port(vm1_ip)),
        1,
    );
    assert_eq!(ask(&mut visitor(vm1), "b"), "home:b");
    let mut standby = visitor(vm2);
    assert!(closed_by_peer(&mut standby, WAIT));
    server2
        .wait_stderr("no data channel from the client in time", WAIT)
        .unwrap();
}

#[test]
fn two_homes_share_a_service_and_a_home_cut_off_loses_no_visitor_that_had_not_begun() {
    let (nat, other) = (Nat::new().unwrap(), Nat::new().unwrap());
    let dir = Scratch::new("ha").unwrap();
    let vm = nat.public();
    let (home1, home2) = (nat.home(), other.home());
    // The second home reaches the VM through its own router.
    let (vm_ip2, _) = link(other.router(), vm);
    tagged_echo(home1, "home1");
    tagged_echo(home2, "home2");
    let server = vm_server(vm, &dir, "vm.toml", "clients = \"many\"");
    let _client1 = home_client(home1, &dir, "home1.toml", &[IpAddr::V4(vm.addr())], "");
    let _client2 = home_client(home2, &dir, "home2.toml", &[vm_ip2], "");
    wait_count(&server, "control channel open service=echo", 2);

    // Visitors are spread over both homes (the first ones may all find only one home's data
    // channels ready).
    let answers: Vec<String> = (0..8)
        .map(|i| ask(&mut visitor(vm), &i.to_string()))
        .collect();
    let home2_share = answers.iter().filter(|a| a.starts_with("home2:")).count();
    assert!((3..=5).contains(&home2_share), "round robin: {answers:?}");

    // Two visitors that have not sent a byte yet: round robin puts one on each home.
    let mut waiting = [visitor(vm), visitor(vm)];
    // Both are paired once the server has logged them; nothing has moved on either.
    wait_count(&server, "visitor connected", 10);
    let since = Instant::now();
    cut(other.router(), None);
    server
        .wait_stderr("control channel closed service=echo", WAIT)
        .unwrap();
    let found = since.elapsed();
    eprintln!("server found home 2 gone after {found:?}");
    // heartbeat_timeout 2 s after the first heartbeat left unacknowledged (1 s period).
    assert!(found < Duration::from_secs(5), "{found:?}");
    server
        .wait_stderr("visitor retried on another client", WAIT)
        .unwrap();
    for (i, stream) in waiting.iter_mut().enumerate() {
        let message = format!("waited {i}");
        assert_eq!(ask(stream, &message), format!("home1:{message}"));
    }
    // From now on every new visitor goes to home 1.
    for i in 0..6 {
        let message = format!("after {i}");
        assert_eq!(ask(&mut visitor(vm), &message), format!("home1:{message}"));
    }
}
