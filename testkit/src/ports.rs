//! Free TCP ports for servers that cannot bind port 0 themselves (PostgreSQL, Pebble).
//!
//! The port is found by binding `127.0.0.1:0` and releasing it, so another process may take it
//! before the server binds it. Callers therefore start the server in a loop with
//! [`retry_on_port_clash`], which tries again with fresh ports when the server reports the
//! address in use.

use crate::Error;

/// A port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
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
