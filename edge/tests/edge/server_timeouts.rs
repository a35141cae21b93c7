//! `servers { timeouts { ... } }` on client connections, the edge and Caddy 2.6 side by side
//! (see `differential`): what a connection that idles, trickles its head, trickles its body or
//! never reads its response sees from each. Each test runs the two servers' clients on threads
//! of their own, so a test takes its timeouts once.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::differential::Both;

/// A keep-alive `GET /` for plain.local.
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: plain.local\r\n\r\n";

/// Reads one response with a Content-Length body; returns its status.
fn response(stream: &mut TcpStream) -> u16 {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("reading a response");
        assert!(n > 0, "closed before a whole response: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text[9..12].parse().expect("a status code");
            }
        }
    }
}

/// How the peer's side of a connection stands after waiting up to `wait` for it to say
/// something: `Some(bytes)` when it closed (with what it sent first), `None` when it is still
/// open and silent.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(got.is_empty(), "a half answer: {got:?}");
                return None;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(got),
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// Runs `client` against the edge and Caddy at once; returns (edge's, caddy's) results.
fn on_both<T: Send>(both: &Both, client: impl Fn(u16) -> T + Sync) -> (T, T) {
    std::thread::scope(|s| {
        let edge = s.spawn(|| client(both.edge_port()));
        let caddy = s.spawn(|| client(both.caddy_port()));
        (edge.join().unwrap(), caddy.join().unwrap())
    })
}

const TIMEOUTS: &str = "{\n\tservers {\n\t\ttimeouts {\n\t\t\tread_header 500ms\n\t\t\tidle 2s\n\t\t}\n\t}\n}\nhttp://plain.local {\n\trespond \"ok\"\n}\n";

#[test]
fn a_kept_alive_connection_idles_past_read_header_until_the_idle_timeout_as_in_caddy() {
    let both = Both::start(TIMEOUTS);
    let (edge, caddy) = on_both(&both, |port| {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(GET).unwrap();
        let first = response(&mut stream);
        // Three read_header timeouts of idling: the connection stays.
        let early = closed_within(&mut stream, Duration::from_millis(1500));
        let second = early.is_none().then(|| {
            stream.write_all(GET).unwrap();
            response(&mut stream)
        });
        // Then, idle for the idle timeout, it is closed (unanswered).
        let idled = Instant::now();
        let late = closed_within(&mut stream, Duration::from_secs(8));
        (first, early, second, late, idled.elapsed())
    });
    for (who, (first, early, second, late, idled)) in [("edge", edge), ("caddy", caddy)] {
        assert_eq!(first, 200, "{who}");
        assert_eq!(
            early, None,
            "{who} closed an idle keep-alive connection early"
        );
        assert_eq!(second, Some(200), "{who}");
        assert_eq!(
            late,
            Some(Vec::new()),
            "{who} kept the connection past idle"
        );
        assert!(
            idled >= Duration::from_millis(1900),
            "{who} closed after {idled:?}"
        );
    }
    both.stop();
}

#[test]
fn a_request_head_trickled_past_read_header_is_cut_on_a_kept_alive_connection_as_in_caddy() {
    let both = Both::start(
        "{\n\tservers {\n\t\ttimeouts {\n\t\t\tread_header 1s\n\t\t\tidle 30s\n\t\t}\n\t}\n}\nhttp://plain.local {\n\trespond \"ok\"\n}\n",
    );
    let (edge, caddy) = on_both(&both, |port| {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(GET).unwrap();
        let first = response(&mut stream);
        let started = Instant::now();
        stream.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        // A header line every 200 ms, each within the idle timeout of the last.
        for i in 0.. {
            if let Some(said) = closed_within(&mut stream, Duration::from_millis(200)) {
                return (first, said, started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
            if stream
                .write_all(format!("X-Slow-{i}: x\r\n").as_bytes())
                .is_err()
            {
                return (first, Vec::new(), started.elapsed());
            }
        }
        (first, b"still open".to_vec(), started.elapsed())
    });
    for (who, (first, said, took)) in [("edge", edge), ("caddy", caddy)] {
        assert_eq!(first, 200, "{who}");
        assert_eq!(said, b"", "{who} answered the trickled head: {said:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{who} cut the trickled head after {took:?}"
        );
    }
    both.stop();
}

/// What a client trickling a 1000-byte body, a byte every 100 ms, sees: the status of the
/// answer (if one came), and how long until the connection closed (None: still open after
/// 10 s, the body done by then).
fn trickle_body(port: u16, path: &str) -> (Option<u16>, Option<Duration>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(
            format!("POST {path} HTTP/1.1\r\nHost: plain.local\r\nContent-Length: 1000\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let started = Instant::now();
    let mut said = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        // The 100 ms wait for an answer paces the trickle.
        match closed_within_keeping(&mut stream, Duration::from_millis(100), &mut said) {
            true => {
                let status = (said.len() >= 12)
                    .then(|| String::from_utf8_lossy(&said[9..12]).parse().ok())
                    .flatten();
                return (status, Some(started.elapsed()));
            }
            false => {
                let _ = stream.write_all(b"x");
            }
        }
    }
    (None, None)
}

/// Reads what comes within `wait` into `said`; whether the peer closed.
fn closed_within_keeping(stream: &mut TcpStream, wait: Duration, said: &mut Vec<u8>) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_request_body_trickled_past_read_body_closes_the_connection_as_in_caddy() {
    let both = Both::start(
        "{\n\tservers {\n\t\ttimeouts {\n\t\t\tread_body 1s\n\t\t\tidle 30s\n\t\t}\n\t}\n}\nhttp://plain.local {\n\treverse_proxy @ECHO@\n}\n",
    );
    let (edge, caddy) = on_both(&both, |port| trickle_body(port, "/"));
    // Both give up on the body at read_body and close. Caddy's reverse_proxy first passes on
    // what arrived and answers as the upstream does; the edge closes unanswered (a
    // difference the man page lists).
    assert_eq!(edge.0, None, "the edge answered a body it never had whole");
    for (who, (_, closed)) in [("edge", edge), ("caddy", caddy)] {
        let closed = closed.unwrap_or_else(|| panic!("{who} kept reading the body"));
        assert!(
            closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
            "{who} closed after {closed:?}"
        );
    }
    both.stop();
}

#[test]
fn a_client_not_reading_a_large_response_is_cut_at_write_as_in_caddy() {
    const SIZE: usize = 48 << 20;
    let upstreams = crate::support::Upstreams::new();
    let big = upstreams.raw(
        Box::leak(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n")
                .into_boxed_str(),
        ),
        Box::leak(vec![b'x'; SIZE].into_boxed_slice()),
    );
    let both = Both::start_with(
        upstreams,
        "{\n\tservers {\n\t\ttimeouts {\n\t\t\twrite 1s\n\t\t}\n\t}\n}\nhttp://plain.local {\n\treverse_proxy @BIG@\n}\n",
        &[("@BIG@", big.to_string())],
    );
    let (edge, caddy) = on_both(&both, |port| {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(GET).unwrap();
        // The stimulus: a client that reads nothing for twice the write timeout.
        std::thread::sleep(Duration::from_secs(2));
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    });
    for (who, got) in [("edge", edge), ("caddy", caddy)] {
        assert!(got > 0 && got < SIZE, "{who} sent {got} of {SIZE} bytes");
    }
    both.stop();
}
