//! Socket options and probes the tunnel sets on TCP sockets: keepalive, TCP_NODELAY, and a
//! non-blocking check that an idle connection is still open.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, setsockopt, sockopt};
use tokio::net::TcpStream;

/// Pending connections a listener queues before the kernel drops new ones (capped by
/// `net.core.somaxconn`); tokio's default of 1,024 overflows when a thousand visitors arrive
/// at once.
const BACKLOG: u32 = 4096;

/// Listens on `addr` (`HOST:PORT`; the first address the host resolves to) with a deep
/// accept queue.
pub(crate) async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for resolved in tokio::net::lookup_host(addr).await? {
        let socket = match resolved {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(resolved).and_then(|()| socket.listen(BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the host resolves to no address",
        )
    }))
}

/// Turns on TCP keepalive with these timings, on a connection or on a listener (whose
/// accepted connections inherit them); failures are logged, never fatal (the heartbeat still
/// finds dead peers).
pub(crate) fn keepalive(stream: &impl AsFd, idle: Duration, interval: Duration) {
    let idle = u32::try_from(idle.as_secs()).unwrap_or(u32::MAX);
    let interval = u32::try_from(interval.as_secs()).unwrap_or(u32::MAX);
    let result = setsockopt(stream, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepIdle, &idle))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepInterval, &interval));
    if let Err(err) = result {
        tracing::debug!(error = %err, "could not set TCP keepalive");
    }
}

/// Closes the connection when sent data stays unacknowledged for `limit` (TCP_USER_TIMEOUT),
/// which finds a peer that vanished without a FIN while heartbeats are being written.
pub(crate) fn user_timeout(stream: &TcpStream, limit: Duration) {
    let millis = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
    if let Err(err) = setsockopt(stream, sockopt::TcpUserTimeout, &millis) {
        tracing::debug!(error = %err, "could not set TCP_USER_TIMEOUT");
    }
}

/// Sets TCP_NODELAY, on a connection or on a listener (whose accepted connections inherit
/// it); a failure is logged, never fatal.
pub(crate) fn nodelay(stream: &impl AsFd, on: bool) {
    if let Err(err) = setsockopt(stream, sockopt::TcpNoDelay, &on) {
        tracing::debug!(error = %err, "could not set TCP_NODELAY");
    }
}

/// Has a listener hand over a connection only once the peer's first bytes have arrived
/// (TCP_DEFER_ACCEPT), or, if none come, after about `secs` seconds (Linux counts it in SYN-ACK
/// retransmissions, the first after a second): on a port where the peer always speaks first,
/// the process then wakes once for the connection and its first message instead of twice. A
/// failure is logged, never fatal (connections are then handed over at once, as before).
pub(crate) fn defer_accept(listener: &impl AsRawFd, secs: u32) {
    use nix::libc;
    let value = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: setsockopt reads `len` bytes from a pointer to a live c_int of that size; an
    // invalid descriptor makes it fail with EBADF, nothing worse. (nix has no safe wrapper for
    // this option; the workspace otherwise denies unsafe code.)
    #[allow(unsafe_code)]
    let result = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&value).cast(),
            len,
        )
    };
    if result != 0 {
        let err = std::io::Error::last_os_error();
        tracing::debug!(error = %err, "could not set TCP_DEFER_ACCEPT");
    }
}

/// Whether an idle connection, on which the peer must not have sent anything yet, was closed
/// (or broke the protocol by sending early). Never blocks.
///
/// tokio's read readiness answers first, with no system call: the read that took the hello
/// ended short and so cleared it, and a FIN or an early byte sets it again from the next
/// `epoll_wait` on. Only a stream that is read-ready (or that some transport's handshake
/// left so) is probed with `MSG_PEEK`. A FIN that arrived since the runtime's last
/// `epoll_wait` is missed, as one arriving just after the probe always was: the command
/// written then finds the channel closed and the visitor's forwarding ends at once.
pub(crate) fn is_closed(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // Nothing reads an idle channel, so the waker this leaves in place wakes no one.
    if stream.poll_read_ready(&mut cx).is_pending() {
        return false;
    }
    let mut probe = [0u8; 1];
    match nix::sys::socket::recv(
        stream.as_raw_fd(),
        &mut probe,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Err(Errno::EAGAIN) => false,
        Err(Errno::EINTR) => false,
        // 0: the peer closed; 1: bytes before the command, which the protocol never sends.
        Ok(_) | Err(_) => true,
    }
}

/// Closes the sending half, telling the peer no more bytes come.
pub(crate) fn shutdown_write(stream: &TcpStream) {
    // The peer may already be gone; the read side reports that.
    let _ = nix::sys::socket::shutdown(stream.as_raw_fd(), nix::sys::socket::Shutdown::Write);
}
