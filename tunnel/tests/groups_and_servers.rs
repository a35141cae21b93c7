//! The front door's other labkit keys, on loopback: a group of clients serving one service
//! with the group's token (`[server.groups.NAME]` and a service's `group`), and a client whose
//! servers each have their own token and transport, one plain TCP and one Noise
//! (`[[client.servers]]`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use common::*;
use testkit::{ProcBuilder, Scratch};

/// A service on loopback that answers each read with `NAME:` and the bytes.
fn tagged(name: &'static str) -> SocketAddr {
    serve(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        move |mut stream| {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                let mut reply = format!("{name}:").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                if n == 0 || stream.write_all(&reply).is_err() {
                    return;
                }
            }
        },
    )
}

/// Sends `message` to `addr` and returns the reply.
fn ask(addr: SocketAddr, message: &str) -> String {
    let mut stream = visit(addr);
    stream.write_all(message.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn clients_with_the_group_token_share_a_service_and_one_with_a_wrong_token_is_refused() {
    let dir = Scratch::new("groups").unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        "[server]\nbind_addr = \"127.0.0.1:0\"\n\
         [server.groups.farm]\ntoken = \"farm-group-token\"\n\
         [server.services.web]\nbind_addr = \"127.0.0.1:0\"\ngroup = \"farm\"\n",
    );
    let server = server(&server_toml);
    let (control, web) = (control_addr(&server), service_addr(&server, "web"));
    let one = write(
        &dir,
        "one.toml",
        &client_config(control, "", &[("web", "farm-group-token", tagged("one"))]),
    );
    let two = write(
        &dir,
        "two.toml",
        &client_config(control, "", &[("web", "farm-group-token", tagged("two"))]),
    );
    let _one = client(&one);
    let _two = client(&two);
    wait_count(&server, "control channel open service=web", 2);
    let answers: Vec<String> = (0..8).map(|i| ask(web, &i.to_string())).collect();
    for home in ["one:", "two:"] {
        assert!(
            answers.iter().any(|a| a.starts_with(home)),
            "both members serve: {answers:?}"
        );
    }

    // A client with the service's name but not the group's token is refused.
    let stranger = write(
        &dir,
        "stranger.toml",
        &client_config(
            control,
            "",
            &[("web", "not-the-farm-token", tagged("stranger"))],
        ),
    );
    let stranger = tunnel(&["client"], &stranger).spawn().unwrap();
    let line = stranger
        .wait_stderr("could not open the control channel", WAIT)
        .unwrap();
    assert!(
        line.contains("server refused service web: wrong token"),
        "{line}"
    );
    server
        .wait_stderr("wrong token for service web (group farm)", WAIT)
        .unwrap();
    for _ in 0..6 {
        assert!(!ask(web, "x").starts_with("stranger:"));
    }
    assert!(!server.stderr().contains("farm-group-token"));
}

/// The private and public keys `tunnel genkey` prints.
fn genkey() -> (String, String) {
    let genkey = ProcBuilder::new(TUNNEL).arg("genkey").spawn().unwrap();
    genkey.expect_exit(0, WAIT).unwrap();
    let out = genkey.stdout();
    let lines: Vec<&str> = out.lines().collect();
    (lines[1].to_owned(), lines[4].to_owned())
}

#[test]
fn a_client_proves_each_servers_own_token_over_each_servers_own_transport() {
    let dir = Scratch::new("servers").unwrap();
    let (private, public) = genkey();
    let server_a = server(&write(
        &dir,
        "a.toml",
        &server_config("", &[("echo", "token-of-server-a")]),
    ));
    let server_b = server(&write(
        &dir,
        "b.toml",
        &server_config(
            &format!(
                "[server.transport]\ntype = \"noise\"\n\
                 [server.transport.noise]\nlocal_private_key = \"{private}\"\n"
            ),
            &[("echo", "token-of-server-b")],
        ),
    ));
    let client_toml = write(
        &dir,
        "client.toml",
        &format!(
            "[client]\n\
             [[client.servers]]\nremote_addr = \"{}\"\ntoken = \"token-of-server-a\"\n\
             [[client.servers]]\nremote_addr = \"{}\"\ntoken = \"token-of-server-b\"\n\
             [client.servers.transport]\ntype = \"noise\"\n\
             [client.servers.transport.noise]\nremote_public_key = \"{public}\"\n\
             [client.servers.transport.tcp]\nnodelay = false\nkeepalive_secs = 5\n\
             [client.services.echo]\nlocal_addr = \"{}\"\n",
            control_addr(&server_a),
            control_addr(&server_b),
            tagged("home")
        ),
    );
    let client = client(&client_toml);
    wait_count(&client, "control channel open service=echo", 2);
    assert_eq!(ask(service_addr(&server_a, "echo"), "a"), "home:a");
    assert_eq!(ask(service_addr(&server_b, "echo"), "b"), "home:b");
    for server in [&server_a, &server_b] {
        assert!(
            !server.stderr().contains("wrong token"),
            "{}",
            server.stderr()
        );
    }
}
