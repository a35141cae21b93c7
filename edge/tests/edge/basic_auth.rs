//! basic_auth under attack: a flood of wrong passwords on one site is bounded (a few bcrypt
//! checks at a time, not one thread each) and leaves the edge's other sites served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::{Edge, Upstreams, WAIT, globals};

/// A bcrypt hash at cost 10 (about 50 ms a check): every password tried here is wrong.
const HASH: &str = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";
/// `alice:wrong`.
const WRONG: &str = "Basic YWxpY2U6d3Jvbmc=";

/// `GET /` for `host` on `port`, with `authorization` if given; the status line's code.
fn status(port: u16, host: &str, authorization: Option<&str>) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    text.split(' ').nth(1).unwrap_or("none").to_owned()
}

/// Threads of process `pid` now.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

#[test]
fn a_flood_of_wrong_passwords_is_bounded_and_other_sites_stay_served() {
    let ups = Upstreams::new();
    let web = ups.http("web");
    let dir = testkit::Scratch::new("edge-auth").unwrap();
    let config = dir.join("Caddyfile");
    std::fs::write(
        &config,
        format!(
            "{}http://locked.local {{\n\tbasicauth {{\n\t\talice {HASH}\n\t}}\n\treverse_proxy {web}\n}}\n\nhttp://open.local {{\n\treverse_proxy {web}\n}}\n",
            globals(&dir, "")
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");
    let port = edge.port("http");
    let pid = edge.proc.pid();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // bcrypt runs on the blocking pools of the edge's per-core runtimes, at most `cores` at once.
    let bound = cores * cores + 2;
    let flood = (2 * bound + 40).max(50);
    let before = threads(pid);

    let answered = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..flood)
        .map(|_| {
            let answered = answered.clone();
            std::thread::spawn(move || {
                let got = status(port, "locked.local", Some(WRONG));
                answered.fetch_add(1, Ordering::SeqCst);
                got
            })
        })
        .collect();
    let open = status(port, "open.local", None);
    let flood_answered_by_then = answered.load(Ordering::SeqCst);
    for attacker in attackers {
        assert_eq!(attacker.join().unwrap(), "401");
    }
    // Idle blocking threads live on for seconds, so the count after the flood shows how many
    // ran bcrypt at once: about one per wrong password unbounded, at most `bound` bounded. The
    // edge makes a few threads of its own besides (the access log's writer, blocking file
    // reads), so the test allows half the flood rather than the exact bound.
    let after = threads(pid);

    assert_eq!(
        open, "200",
        "the other site's request failed during the flood"
    );
    assert!(
        flood_answered_by_then < flood,
        "the other site was answered only after all {flood} wrong passwords"
    );
    assert!(
        after < before + flood / 2,
        "{before} threads before the flood of {flood}, {after} after: bcrypt ran unbounded"
    );
    edge.stop();
}
