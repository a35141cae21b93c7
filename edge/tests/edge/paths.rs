//! Path matchers see the path the way Caddy 2.6 does: percent-decoded, `.` and `..` resolved,
//! repeated slashes merged, trailing dots and spaces dropped, letters compared without regard
//! to ASCII case. The same Caddyfile is served by the edge and by Debian's `caddy`, and every
//! spelling of a protected path must get the same status from both. Requests go over a raw
//! socket, so no client tidies the path first.

use std::io::{Read, Write};
use std::net::TcpStream;

use testkit::{ProcBuilder, Scratch};

use crate::support::{EDGE, Upstreams, WAIT};

const CADDY: &str = "/usr/bin/caddy";

/// bcrypt of "hunter2" (`caddy hash-password`): requests carry no credentials, so it is never
/// computed; the test compares 401 with 200.
const HASH: &str = "$2a$14$jR7gOMLOFxeRcmzx.kmFVepFplxiH9ZBha7huZ4sGAuqy59ie9IY2";

/// Request targets spelling `/admin…` (protected) or something else in the ways a client can.
const TARGETS: &[&str] = &[
    "/admin/secret",
    "/admin",
    "/adminx",
    "/admi",
    "/public",
    "/%61dmin/secret",
    "/ad%6Din",
    "/%41dmin/secret",
    "/ADMIN/secret",
    "/Admin/secret",
    "//admin/secret",
    "///admin/secret",
    "/./admin/secret",
    "/x/../admin/secret",
    "/../admin/secret",
    "/%2e/admin/secret",
    "/%2e%2e/admin",
    "/x/%2e%2e/admin",
    "/x/.%2E/admin",
    "/x/..%2fadmin/secret",
    "/x/%2e%2e%2fadmin",
    "/%2fadmin/secret",
    "/%2Fadmin/secret",
    "/admin%2fsecret",
    "/admin%2f..%2fpublic",
    "/admin/../public",
    "/admin/secret/.",
    "/admin/..",
    "/x/..",
    "/admin.",
    "/admin./secret",
    "/admin%20",
    "/%20admin",
    "/.admin",
    "/admin;x",
    "/admin%00",
    "/%00admin",
    "/admin%ff",
    "/%C0%AFadmin",
    "/%5cadmin",
    "/%zzadmin/secret",
    "/admin%",
    "/admin/secret?x=/../public",
    "*",
    "http://plain.local/%61dmin/secret",
];

/// The status line's code of `GET target` on `port`.
fn status(port: u16, target: &str) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: plain.local\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    // The server may close hard after answering; what arrived is enough.
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {target}: {text:?}"))
}

fn statuses(port: u16) -> Vec<u16> {
    TARGETS.iter().map(|t| status(port, t)).collect()
}

#[test]
fn every_spelling_of_a_protected_path_gets_the_same_status_from_edge_and_caddy() {
    let upstreams = Upstreams::new();
    let web = upstreams.http("web");
    let dir = Scratch::new("edge-paths").unwrap();
    let http = testkit::ports::free_port().unwrap();
    let https = testkit::ports::free_port().unwrap();
    let caddyfile = dir.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tadmin off\n\thttp_port {http}\n\thttps_port {https}\n\tdefault_bind 127.0.0.1\n\tstorage file_system {}\n}}\n\nhttp://plain.local {{\n\tbasicauth /admin* {{\n\t\talice {HASH}\n\t}}\n\treverse_proxy {web}\n}}\n",
            dir.join("storage").display()
        ),
    )
    .unwrap();

    let edge = ProcBuilder::new(EDGE)
        .args([
            "run".as_ref(),
            "--caddyfile".as_ref(),
            caddyfile.as_os_str(),
        ])
        .notify()
        .spawn()
        .unwrap();
    edge.wait_ready(WAIT).unwrap();
    let from_edge = statuses(http);
    // Matching sees the cleaned path; the upstream gets the request line as sent.
    let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(
            b"GET /x/..%2fpublic//a HTTP/1.1\r\nHost: plain.local\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut forwarded = String::new();
    let _ = stream.read_to_string(&mut forwarded);
    assert!(forwarded.ends_with("web /x/..%2fpublic//a"), "{forwarded}");
    edge.stop(WAIT).unwrap();

    let caddy = ProcBuilder::new(CADDY)
        .args([
            "run".as_ref(),
            "--config".as_ref(),
            caddyfile.as_os_str(),
            "--adapter".as_ref(),
            "caddyfile".as_ref(),
        ])
        .env("HOME", dir.join("home"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .notify()
        .spawn()
        .unwrap();
    caddy.wait_ready(WAIT).unwrap();
    let from_caddy = statuses(http);
    caddy.stop(WAIT).unwrap();

    // Caddy itself protects the plain spelling and leaves the rest alone, so a mismatch below
    // is the edge's.
    assert_eq!((from_caddy[0], from_caddy[4]), (401, 200), "{from_caddy:?}");
    let differ: Vec<String> = TARGETS
        .iter()
        .zip(from_edge.iter().zip(&from_caddy))
        .filter(|(_, (e, c))| e != c)
        .map(|(t, (e, c))| format!("{t}: edge {e}, caddy {c}"))
        .collect();
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
