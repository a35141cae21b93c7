//! Free TCP ports for servers that cannot bind port 0 themselves (PostgreSQL, Pebble) and for
//! tests that must name a port before anything binds it (a tunnel's declared service).
//!
//! The port is taken outside the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so
//! no `bind(0)` and no outgoing connection, in this process or another, can be handed it between
//! the pick and the use: a port released from `bind(0)` is exactly the port the next `bind(0)`
//! gets, which made a tunnel server's control port collide with the service port a test had
//! picked for it. Another test picking the same port at random remains possible, so callers that
//! start a server on it still run [`retry_on_port_clash`].

use crate::Error;

/// Where ports are picked from when the ephemeral range leaves no room below or above it.
const LOWEST: u16 = 10_000;

/// A port that is free on 127.0.0.1 for both TCP and UDP and lies outside the ephemeral range.
pub fn free_port() -> std::io::Result<u16> {
    let (low, high) = pick_range(ephemeral_range());
    if low > high {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        return Ok(listener.local_addr()?.port());
    }
    let span = u32::from(high - low) + 1;
    let start = rand::random::<u32>() % span;
    for step in 0..span.min(4096) {
        let port = low + ((start + step) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {low}..={high}"),
    ))
}

/// The kernel's ephemeral port range, Linux's default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => (low, high),
        _ => (32_768, 60_999),
    }
}

/// The larger of the gaps below (from [`LOWEST`]) and above the ephemeral range; empty
/// (`low > high`) when neither has room.
fn pick_range((eph_low, eph_high): (u16, u16)) -> (u16, u16) {
    let below = (LOWEST, eph_low.saturating_sub(1));
    let above = match eph_high.checked_add(1) {
        Some(next) => (next.max(LOWEST), u16::MAX),
        None => (1, 0),
    };
    let size = |(low, high): (u16, u16)| (u32::from(high) + 1).saturating_sub(u32::from(low));
    if size(below) >= size(above) {
        below
    } else {
        above
    }
}

/// Runs `start` until it succeeds or fails for a reason other than a port clash (at most five
/// tries). `start` gets the attempt number.
pub fn retry_on_port_clash<T>(mut start: impl FnMut(u32) -> Result<T, Error>) -> Result<T, Error> {
    let mut attempt = 0;
    loop {
        match start(attempt) {
            Err(err) if attempt < 4 && is_port_clash(&err) => attempt += 1,
            other => return other,
        }
    }
}

fn is_port_clash(err: &Error) -> bool {
    let text = err.to_string();
    text.contains("ddress already in use") || text.contains("could not bind")
}

/// Waits until something accepts TCP connections on `addr`, for programs that log "listening"
/// before they listen and offer no other readiness signal (Pebble). Connection attempts back
/// off from 5 ms; each refused one proves the server is not there yet.
pub fn wait_listening(
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match std::net::TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return Ok(()),
            Err(err) if std::time::Instant::now() + pause >= deadline => {
                return Err(Error::Setup(format!(
                    "nothing listens on {addr} after {timeout:?}: {err}"
                )));
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_picked_outside_the_ephemeral_range() {
        assert_eq!(pick_range((32_768, 60_999)), (10_000, 32_767));
        assert_eq!(pick_range((1_024, 50_000)), (50_001, 65_535));
        assert_eq!(pick_range((10_000, 65_535)), (10_000, 9_999));
        let (low, high) = ephemeral_range();
        for _ in 0..20 {
            let port = free_port().unwrap();
            assert!(!(low..=high).contains(&port), "{port} is in {low}..={high}");
        }
    }
}
