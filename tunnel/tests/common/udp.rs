//! UDP parts of the tunnel's tests: local UDP services and visitors that count what they lose.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::WAIT;

/// The largest IPv4 UDP payload.
pub const MAX_DATAGRAM: usize = 65_507;

/// What a UDP service received: `(from, length)` per datagram.
pub type Seen = Arc<Mutex<Vec<(SocketAddr, usize)>>>;

/// Answers each datagram on `socket` with `answer(payload, from)` (nothing for `None`), on a
/// thread; returns the socket's address and every `(from, length)` it received.
pub fn udp_serve(
    socket: UdpSocket,
    answer: impl Fn(&[u8], SocketAddr) -> Option<Vec<u8>> + Send + 'static,
) -> (SocketAddr, Seen) {
    let addr = socket.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            log.lock().unwrap().push((from, n));
            if let Some(reply) = answer(&buf[..n], from) {
                let _ = socket.send_to(&reply, from);
            }
        }
    });
    (addr, seen)
}

/// A UDP echo service on `socket`.
pub fn udp_echo(socket: UdpSocket) -> (SocketAddr, Seen) {
    udp_serve(socket, |payload, _| Some(payload.to_vec()))
}

/// A UDP echo service on a free loopback port.
pub fn udp_echo_service() -> SocketAddr {
    udp_echo(UdpSocket::bind("127.0.0.1:0").unwrap()).0
}

/// Gives a visitor's socket a read timeout, so a lost datagram fails the test instead of
/// hanging it.
pub fn udp_visitor(socket: UdpSocket) -> UdpSocket {
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket
}

/// Sends `payload` to an echo service through `addr` and checks the one datagram that comes
/// back is the same, whole.
pub fn udp_echo_through(visitor: &UdpSocket, addr: SocketAddr, payload: &[u8]) {
    visitor.send_to(payload, addr).unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, from) = visitor.recv_from(&mut buf).unwrap();
    assert_eq!(
        from, addr,
        "the answer comes from the service's public port"
    );
    assert_eq!(n, payload.len(), "the echoed datagram's length");
    assert!(buf[..n] == *payload, "the echoed datagram's bytes differ");
}

/// What a burst saw.
#[derive(Debug)]
pub struct Burst {
    /// Datagrams sent.
    pub sent: usize,
    /// Distinct datagrams echoed back.
    pub received: usize,
    /// Sent but never echoed.
    pub lost: usize,
    /// How long it took.
    pub elapsed: Duration,
}

/// Sends `count` numbered datagrams of `size` bytes through an echo service at `addr`, with
/// at most `window` unanswered at once (so socket buffers, not the pace, decide), and counts
/// the ones that never come back: after `quiet` without an answer the rest count as lost.
pub fn udp_burst(
    visitor: &UdpSocket,
    addr: SocketAddr,
    count: u32,
    size: usize,
    window: u32,
    quiet: Duration,
) -> Burst {
    assert!(size >= 4);
    let started = Instant::now();
    visitor.set_read_timeout(Some(quiet)).unwrap();
    let mut seen = vec![false; count as usize];
    let mut datagram = vec![0u8; size];
    let mut buf = vec![0u8; 65_536];
    let (mut next, mut received) = (0u32, 0usize);
    loop {
        while next < count && next - (received as u32).min(next) < window {
            datagram[..4].copy_from_slice(&next.to_le_bytes());
            datagram[4..].fill((next % 251) as u8);
            visitor.send_to(&datagram, addr).unwrap();
            next += 1;
        }
        if received as u32 == count {
            break;
        }
        match visitor.recv_from(&mut buf) {
            Ok((n, _)) => {
                assert_eq!(n, size, "an echoed datagram's length");
                let seq = u32::from_le_bytes(buf[..4].try_into().unwrap());
                assert!(
                    buf[4..n].iter().all(|&b| b == (seq % 251) as u8),
                    "datagram {seq}'s bytes"
                );
                let slot = &mut seen[seq as usize];
                assert!(!*slot, "datagram {seq} came back twice");
                *slot = true;
                received += 1;
            }
            // Nothing for `quiet`: whatever is still out is lost.
            Err(_) => break,
        }
    }
    visitor.set_read_timeout(Some(WAIT)).unwrap();
    Burst {
        sent: next as usize,
        received,
        lost: next as usize - received,
        elapsed: started.elapsed(),
    }
}
