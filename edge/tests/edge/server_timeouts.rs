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
