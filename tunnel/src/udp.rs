//! UDP services: datagrams carried both ways over one data channel in rathole's framing
//! ([`crate::protocol::UdpHead`]).
//!
//! The server binds the service's UDP port and, once a data channel is started with
//! `StartForwardUdp`, frames every visitor's datagram down it with the visitor's address and
//! sends each frame coming back to the address it names ([`serve_visitors`]). The client keeps
//! a session per visitor address: a UDP socket of its own connected to the local service, so
//! the service tells visitors apart by source port as it would without the tunnel, dropped
//! after 60 s without a datagram either way ([`serve_local`], [`Limits`]).
//!
//! Invariants:
//! - Memory is bounded: at most 4,096 sessions per data channel on the client (and
//!   as many visitors tracked on the server); a new visitor past that takes the place of the
//!   least recently active one (whose session closes), so a burst of addresses (spoofed or
//!   not) cannot lock out the visitors that arrive after it. No queue sits between sockets and the channel: each side reads a socket only
//!   when it can write what it read, so a slow path pushes back into the kernel's socket
//!   buffers, which drop past their size as UDP does.
//! - Nothing is allocated per datagram: frames are read from the channel into one buffer
//!   ([`FrameReader`]) and datagrams received straight into one frame buffer
//!   ([`FrameWriter`]), both allocated when forwarding starts. Datagrams up to 65,535 bytes go
//!   through whole (rathole's own server truncates at 2,048).
//! - Forwarding on a channel stops when the channel breaks; the server then starts the next
//!   idle data channel and asks the client for a replacement.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::error::Error;
use crate::metrics::{OpenConnection, ServiceMetrics};
use crate::protocol::{UDP_FRAME_MAX, UDP_HEAD_MAX, UdpHead};
use crate::transport::TunnelStream;

/// How long sessions last and how many there may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// A visitor's session ends after this long without a datagram either way.
    pub(crate) idle: Duration,
    /// Sessions (client) or tracked visitors (server) per data channel, at most.
    pub(crate) sessions: usize,
}

impl Limits {
    /// What services run with: rathole's 60 s idle timeout, and 4,096 sessions.
    pub(crate) const DEFAULT: Limits = Limits {
        idle: Duration::from_secs(60),
        sessions: 4096,
    };
}
/// The largest UDP payload there is (65,535 less the 8-byte UDP header, IPv6 without
/// jumbograms); IPv4 carries up to 65,507.
const MAX_PAYLOAD: usize = u16::MAX as usize;
/// Frames gathered before one write to the channel.
const WRITE_BUFFER: usize = 4 * UDP_FRAME_MAX;
/// Kernel buffer asked for on each UDP socket (capped by net.core.rmem_max / wmem_max): room
/// for a burst while the other side catches up.
const SOCKET_BUFFER: usize = 4 << 20;

/// Reads UDP frames from a channel through one buffer, allocated once.
///
/// [`FrameReader::next`] is cancel-safe: its only await is one `read` into the buffer, so
/// dropping it loses nothing and a `select!` may race it against timers.
pub(crate) struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for FrameReader {
    fn default() -> FrameReader {
        FrameReader::new()
    }
}

impl FrameReader {
    /// A reader with room for two whole frames of the largest size.
    pub(crate) fn new() -> FrameReader {
        FrameReader {
            buf: vec![0u8; 2 * UDP_FRAME_MAX].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next frame's address and payload; `None` at a clean end of stream (between
    /// frames).
    pub(crate) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        channel: &mut R,
    ) -> Result<Option<(SocketAddr, &[u8])>, Error> {
        loop {
            if let Some((from, at, len)) = self.parse()? {
                return Ok(Some((from, &self.buf[at..at + len])));
            }
            if self.buf.len() - self.end < UDP_FRAME_MAX {
                // Make room for a whole frame: move the partial one to the front.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = channel
                .read(&mut self.buf[self.end..])
                .await
                .map_err(|e| Error::io("reading a udp frame", e))?;
            if n == 0 {
                if self.start == self.end {
                    return Ok(None);
                }
                return Err(Error::Closed {
                    what: "the rest of a udp frame",
                });
            }
            self.end += n;
        }
    }

    /// Takes one whole frame off the buffer: its address, and where its payload is.
    fn parse(&mut self) -> Result<Option<(SocketAddr, usize, usize)>, Error> {
        let pending = &self.buf[self.start..self.end];
        let Some(&head_len) = pending.first() else {
            return Ok(None);
        };
        let head_end = 1 + usize::from(head_len);
        let Some(head) = pending.get(1..head_end) else {
            return Ok(None);
        };
        let head = UdpHead::decode(head)?;
        let total = head_end + usize::from(head.len);
        if pending.len() < total {
            return Ok(None);
        }
        let at = self.start + head_end;
        self.start += total;
        if self.start == self.end {
            // Empty again: later reads start at the front. The payload's bytes stay put.
            self.start = 0;
            self.end = 0;
        }
        Ok(Some((head.from, at, usize::from(head.len))))
    }
}

/// Gathers frames in one buffer, allocated once, for one write to the channel.
pub(crate) struct FrameWriter {
    buf: Box<[u8]>,
    len: usize,
}

impl Default for FrameWriter {
    fn default() -> FrameWriter {
        FrameWriter::new()
    }
}

impl FrameWriter {
    /// An empty writer.
    pub(crate) fn new() -> FrameWriter {
        FrameWriter {
            buf: vec![0u8; WRITE_BUFFER].into_boxed_slice(),
            len: 0,
        }
    }

    /// Whether a datagram of any size still fits.
    fn has_room(&self) -> bool {
        self.buf.len() - self.len >= UDP_HEAD_MAX + MAX_PAYLOAD
    }

    /// Where the next datagram is received, leaving `head` bytes before it for its header.
    fn payload_room(&mut self, head: usize) -> &mut [u8] {
        let at = self.len + head;
        &mut self.buf[at..at + MAX_PAYLOAD]
    }

    /// Frames the `n` bytes just received at [`FrameWriter::payload_room`]`(guessed)`.
    fn commit(&mut self, from: SocketAddr, n: usize, guessed: usize) {
        let mut head = [0u8; UDP_HEAD_MAX];
        let len = u16::try_from(n).expect("a UDP payload fits a u16");
        let head_len = UdpHead { from, len }.encode(&mut head);
        let payload = self.len + guessed;
        if head_len != guessed {
            // Only when an address's family is not the socket's: move the payload once.
            self.buf
                .copy_within(payload..payload + n, self.len + head_len);
        }
        self.buf[self.len..self.len + head_len].copy_from_slice(&head[..head_len]);
        self.len += head_len + n;
    }

    /// Appends one frame.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn push(&mut self, from: SocketAddr, payload: &[u8]) {
        let guessed = head_len_of(from);
        self.payload_room(guessed)[..payload.len()].copy_from_slice(payload);
        self.commit(from, payload.len(), guessed);
    }

    /// Writes what was gathered and empties the buffer.
    pub(crate) async fn flush<W: AsyncWrite + Unpin>(&mut self, channel: &mut W) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let len = std::mem::take(&mut self.len);
        channel.write_all(&self.buf[..len]).await?;
        channel.flush().await
    }
}

/// The header bytes (with the length byte) a frame from `from` takes.
fn head_len_of(from: SocketAddr) -> usize {
    match from {
        SocketAddr::V4(_) => 13,
        SocketAddr::V6(_) => UDP_HEAD_MAX,
    }
}

/// Asks for big kernel buffers on a UDP socket: past net.core.rmem_max / wmem_max when the
/// process may (CAP_NET_ADMIN), else up to them. Failures are logged, never fatal.
fn size_buffers(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let receive = setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER)
        .or_else(|_| setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER));
    let send = setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER)
        .or_else(|_| setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER));
    if let Err(err) = receive.and(send) {
        tracing::debug!(error = %err, "could not size a udp socket's buffers");
    }
}

/// Binds a service's UDP port (the first address `addr` resolves to that binds).
pub(crate) async fn bind(addr: &str) -> io::Result<UdpSocket> {
    let mut last = None;
    for resolved in tokio::net::lookup_host(addr).await? {
        match UdpSocket::bind(resolved).await {
            Ok(socket) => {
                size_buffers(&socket);
                return Ok(socket);
            }
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "the host resolves to no address")
    }))
}

/// Reads and drops whatever datagrams are queued on `socket` (a service with no client);
/// returns how many.
pub(crate) fn discard(socket: &UdpSocket, scratch: &mut [u8]) -> u64 {
    let mut dropped = 0;
    while socket.try_recv_from(scratch).is_ok() {
        dropped += 1;
    }
    dropped
}

/// The visitors a server's UDP service has heard from lately: counted as open connections,
/// capped at [`Limits::sessions`], the least recently seen making room for a new one.
struct Visitors {
    /// When each visitor was last seen, and the stamp of its newest entry in `order`.
    seen: HashMap<SocketAddr, (Instant, u64)>,
    /// Visitors from least to most recently seen, with the stamp they were seen at; an entry
    /// whose stamp is no longer the visitor's is stale and skipped. Compacted when it holds
    /// twice as many entries as there are visitors, so it stays bounded and each datagram
    /// costs amortised O(1).
    order: VecDeque<(SocketAddr, u64)>,
    stamp: u64,
    metrics: Arc<ServiceMetrics>,
    limits: Limits,
}

impl Visitors {
    fn new(metrics: Arc<ServiceMetrics>, limits: Limits) -> Visitors {
        Visitors {
            seen: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
            metrics,
            limits,
        }
    }

    /// Notes a datagram from `from`; a new visitor past the cap takes the place of the least
    /// recently seen one.
    fn admit(&mut self, from: SocketAddr, now: Instant) {
        self.stamp += 1;
        let stamp = self.stamp;
        if let Some(entry) = self.seen.get_mut(&from) {
            *entry = (now, stamp);
        } else {
            if self.seen.len() >= self.limits.sessions {
                self.evict_oldest();
            }
            self.seen.insert(from, (now, stamp));
            self.metrics.connections.fetch_add(1, Ordering::Relaxed);
            self.metrics.open.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(visitor = %from, "udp visitor seen");
        }
        self.order.push_back((from, stamp));
        if self.order.len() > 2 * self.seen.len() + 64 {
            let seen = &self.seen;
            self.order
                .retain(|(addr, stamp)| seen.get(addr).is_some_and(|(_, s)| s == stamp));
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((addr, stamp)) = self.order.pop_front() {
            if self.seen.get(&addr).is_some_and(|(_, s)| *s == stamp) {
                self.seen.remove(&addr);
                self.metrics.open.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(visitor = %addr, "udp visitor table full: least recently seen visitor forgotten");
                return;
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let before = self.seen.len();
        let idle = self.limits.idle;
        self.seen
            .retain(|_, (last, _)| now.duration_since(*last) < idle);
        let gone = (before - self.seen.len()) as u64;
        self.metrics.open.fetch_sub(gone, Ordering::Relaxed);
    }
}

impl Drop for Visitors {
    fn drop(&mut self) {
        let open = self.seen.len() as u64;
        self.metrics.open.fetch_sub(open, Ordering::Relaxed);
    }
}

/// How often idle sessions are looked for.
fn sweep_period(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
}

/// The server's half: carries datagrams between the service's socket and a started data
/// channel until the channel ends or breaks (returned as the error).
pub(crate) async fn serve_visitors<S: TunnelStream>(
    channel: S,
    socket: &UdpSocket,
    metrics: &Arc<ServiceMetrics>,
    limits: Limits,
) -> Error {
    let guessed = match socket.local_addr() {
        Ok(SocketAddr::V6(_)) => UDP_HEAD_MAX,
        _ => 13,
    };
    let (mut rd, mut wr) = tokio::io::split(channel);
    let visitors = Mutex::new(Visitors::new(metrics.clone(), limits));
    let lock = || visitors.lock().unwrap_or_else(|e| e.into_inner());
    let up = async {
        let mut frames = FrameWriter::new();
        let mut sweep = tokio::time::interval(sweep_period(limits.idle));
        loop {
            tokio::select! {
                ready = socket.readable() => {
                    ready.map_err(|e| Error::io("waiting for visitors' datagrams", e))?;
                }
                _ = sweep.tick() => {
                    lock().expire(Instant::now());
                    continue;
                }
            }
            {
                let now = Instant::now();
                let mut visitors = lock();
                while frames.has_room() {
                    match socket.try_recv_from(frames.payload_room(guessed)) {
                        Ok((n, from)) => {
                            visitors.admit(from, now);
                            frames.commit(from, n, guessed);
                            metrics.datagrams_to_service.fetch_add(1, Ordering::Relaxed);
                            metrics.to_service.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "receiving a visitor's datagram failed");
                            break;
                        }
                    }
                }
            }
            frames
                .flush(&mut wr)
                .await
                .map_err(|e| Error::io("writing udp frames to the data channel", e))?;
        }
    };
    let down = async {
        let mut reader = FrameReader::new();
        loop {
            let Some((to, payload)) = reader.next(&mut rd).await? else {
                return Err(Error::Closed {
                    what: "udp frames (data channel closed)",
                });
            };
            match socket.send_to(payload, to).await {
                Ok(_) => {
                    metrics.datagrams_to_visitor.fetch_add(1, Ordering::Relaxed);
                    metrics
                        .to_visitor
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    metrics.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(visitor = %to, error = %e, "sending a datagram to a visitor failed");
                }
            }
        }
    };
    let ended: Result<(), Error> = tokio::select! {
        ended = up => ended,
        ended = down => ended,
    };
    match ended {
        Err(err) => err,
        Ok(()) => Error::Closed { what: "udp frames" },
    }
}

/// One visitor's session on the client.
struct Session {
    socket: Arc<UdpSocket>,
    /// Milliseconds since forwarding started, at the last datagram either way.
    last: Arc<AtomicU64>,
    /// The number of the last datagram from the visitor: orders sessions active in the
    /// same millisecond.
    sent: u64,
    task: AbortHandle,
    _open: OpenConnection,
}

/// The channel's sending half and its frame buffer, shared by the sessions.
type Outbound<S> = Arc<tokio::sync::Mutex<(tokio::io::WriteHalf<S>, FrameWriter)>>;

/// The client's half: carries datagrams between a started data channel and a session per
/// visitor on the local service at `local`, until the channel ends (`Ok`) or breaks.
pub(crate) async fn serve_local<S: TunnelStream>(
    channel: S,
    local: SocketAddr,
    metrics: &Arc<ServiceMetrics>,
    limits: Limits,
) -> Result<(), Error> {
    let (mut rd, wr) = tokio::io::split(channel);
    let outbound: Outbound<S> = Arc::new(tokio::sync::Mutex::new((wr, FrameWriter::new())));
    let started = Instant::now();
    let millis = move || started.elapsed().as_millis() as u64;
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut datagrams = 0u64;
    let mut tasks = JoinSet::new();
    let mut reader = FrameReader::new();
    let mut sweep = tokio::time::interval(sweep_period(limits.idle));
    let idle_ms = limits.idle.as_millis() as u64;
    loop {
        let frame = tokio::select! {
            frame = reader.next(&mut rd) => frame?,
            _ = sweep.tick() => {
                let now = millis();
                sessions.retain(|from, session| {
                    let alive = now.saturating_sub(session.last.load(Ordering::Relaxed)) < idle_ms
                        && !session.task.is_finished();
                    if !alive {
                        session.task.abort();
                        tracing::debug!(visitor = %from, "udp session closed");
                    }
                    alive
                });
                while tasks.try_join_next().is_some() {}
                continue;
            }
        };
        let Some((from, payload)) = frame else {
            return Ok(());
        };
        if !sessions.contains_key(&from) {
            {
                if sessions.len() >= limits.sessions {
                    // The least recently active session makes room. A scan, but only when a
                    // new visitor finds the table full (the server's table evicts in
                    // step, so that is rare).
                    let oldest = sessions
                        .iter()
                        .min_by_key(|(_, session)| {
                            (session.last.load(Ordering::Relaxed), session.sent)
                        })
                        .map(|(addr, _)| *addr);
                    if let Some(addr) = oldest
                        && let Some(session) = sessions.remove(&addr)
                    {
                        session.task.abort();
                        tracing::debug!(visitor = %addr, "too many udp sessions: least recently active one closed");
                    }
                }
                let socket = match connect(local) {
                    Ok(socket) => Arc::new(socket),
                    Err(err) => {
                        metrics.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                        metrics.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(visitor = %from, local_addr = %local, error = %err, "could not open a udp socket to the local service: datagram dropped");
                        continue;
                    }
                };
                let last = Arc::new(AtomicU64::new(millis()));
                let task = tasks.spawn(session_replies(
                    socket.clone(),
                    from,
                    outbound.clone(),
                    last.clone(),
                    millis,
                    metrics.clone(),
                ));
                tracing::debug!(visitor = %from, "udp session opened");
                sessions.insert(
                    from,
                    Session {
                        socket,
                        last,
                        sent: 0,
                        task,
                        _open: metrics.connection(),
                    },
                );
            }
        }
        let Some(session) = sessions.get_mut(&from) else {
            continue;
        };
        datagrams += 1;
        session.sent = datagrams;
        session.last.store(millis(), Ordering::Relaxed);
        match session.socket.send(payload).await {
            Ok(_) => {
                metrics.datagrams_to_service.fetch_add(1, Ordering::Relaxed);
                metrics
                    .to_service
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            Err(err) => {
                // A refused earlier datagram (ICMP port unreachable) surfaces here once.
                metrics.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(visitor = %from, error = %err, "sending a datagram to the local service failed");
            }
        }
    }
}

/// A UDP socket of its own for one visitor, connected to the local service.
fn connect(local: SocketAddr) -> io::Result<UdpSocket> {
    let any: IpAddr = match local {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = std::net::UdpSocket::bind((any, 0))?;
    socket.set_nonblocking(true)?;
    // Connecting a UDP socket only records the peer: it never waits.
    socket.connect(local)?;
    let socket = UdpSocket::from_std(socket)?;
    size_buffers(&socket);
    Ok(socket)
}

/// Carries the local service's answers to one visitor into the channel.
async fn session_replies<S: TunnelStream>(
    socket: Arc<UdpSocket>,
    from: SocketAddr,
    outbound: Outbound<S>,
    last: Arc<AtomicU64>,
    millis: impl Fn() -> u64,
    metrics: Arc<ServiceMetrics>,
) {
    let guessed = head_len_of(from);
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut guard = outbound.lock().await;
        let (wr, frames) = &mut *guard;
        while frames.has_room() {
            match socket.try_recv(frames.payload_room(guessed)) {
                Ok(n) => {
                    frames.commit(from, n, guessed);
                    metrics.datagrams_to_visitor.fetch_add(1, Ordering::Relaxed);
                    metrics.to_visitor.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP port unreachable from an earlier send: the service is not there.
                    tracing::debug!(visitor = %from, error = %e, "receiving from the local service failed");
                    break;
                }
            }
        }
        last.store(millis(), Ordering::Relaxed);
        if let Err(err) = frames.flush(wr).await {
            tracing::debug!(visitor = %from, error = %err, "writing udp frames to the data channel failed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frames(list: &[(SocketAddr, Vec<u8>)]) -> Vec<u8> {
        let mut writer = FrameWriter::new();
        let mut wire = Vec::new();
        for (from, payload) in list {
            writer.push(*from, payload);
            wire.extend_from_slice(&writer.buf[..writer.len]);
            writer.len = 0;
        }
        wire
    }

    async fn read_all(mut wire: &[u8]) -> Result<Vec<(SocketAddr, Vec<u8>)>, Error> {
        let mut reader = FrameReader::new();
        let mut out = Vec::new();
        while let Some((from, payload)) = reader.next(&mut wire).await? {
            out.push((from, payload.to_vec()));
        }
        Ok(out)
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[tokio::test]
    async fn frames_round_trip_whole_up_to_the_largest_datagram() {
        let list = vec![
            ("10.0.0.1:53".parse().unwrap(), b"query".to_vec()),
            ("[2001:db8::2]:4000".parse().unwrap(), vec![7u8; 65_507]),
            ("10.0.0.1:53".parse().unwrap(), Vec::new()),
            ("10.0.0.3:9".parse().unwrap(), vec![1u8; u16::MAX as usize]),
        ];
        let wire = frames(&list);
        assert_eq!(
            &wire[..14],
            &[12, 0, 0, 0, 0, 10, 0, 0, 1, 53, 0, 5, 0, b'q']
        );
        assert_eq!(read_all(&wire).await.unwrap(), list);
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_error_naming_it() {
        let wire = frames(&[("10.0.0.1:53".parse().unwrap(), b"query".to_vec())]);
        let err = read_all(&wire[..wire.len() - 1]).await.unwrap_err();
        assert!(err.to_string().contains("the rest of a udp frame"), "{err}");
    }

    #[test]
    fn a_v4_datagram_on_a_v6_socket_is_framed_in_place() {
        let mut writer = FrameWriter::new();
        let from: SocketAddr = "10.0.0.1:53".parse().unwrap();
        writer.payload_room(UDP_HEAD_MAX)[..3].copy_from_slice(b"abc");
        writer.commit(from, 3, UDP_HEAD_MAX);
        let wire = writer.buf[..writer.len].to_vec();
        assert_eq!(
            block_on(read_all(&wire)).unwrap(),
            vec![(from, b"abc".to_vec())]
        );
    }

    /// A data channel's two ends on loopback, the client's end served by [`serve_local`]
    /// towards a UDP echo service that records each datagram's source.
    async fn client_side(
        limits: Limits,
    ) -> (
        tokio::net::TcpStream,
        Arc<ServiceMetrics>,
        Arc<Mutex<Vec<SocketAddr>>>,
    ) {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = echo.local_addr().unwrap();
        let sources = Arc::new(Mutex::new(Vec::new()));
        let seen = sources.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                seen.lock().unwrap().push(from);
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let (near, far) = crate::forward::tests::pair().await;
        let metrics = Arc::new(ServiceMetrics::default());
        let served = metrics.clone();
        tokio::spawn(async move { serve_local(far, local, &served, limits).await });
        (near, metrics, sources)
    }

    /// Sends `payload` as a frame from `from` and reads the frame that comes back.
    async fn ask(
        near: &mut tokio::net::TcpStream,
        reader: &mut FrameReader,
        from: SocketAddr,
        payload: &[u8],
    ) -> (SocketAddr, Vec<u8>) {
        let mut writer = FrameWriter::new();
        writer.push(from, payload);
        writer.flush(near).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), reader.next(near));
        let (to, back) = answer.await.unwrap().unwrap().unwrap();
        (to, back.to_vec())
    }

    #[tokio::test]
    async fn each_visitor_gets_a_session_that_closes_when_idle() {
        let limits = Limits {
            idle: Duration::from_millis(300),
            sessions: 8,
        };
        let (mut near, metrics, sources) = client_side(limits).await;
        let mut reader = FrameReader::new();
        let a: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let b: SocketAddr = "[2001:db8::9]:4000".parse().unwrap();
        assert_eq!(
            ask(&mut near, &mut reader, a, b"one").await,
            (a, b"one".to_vec())
        );
        assert_eq!(
            ask(&mut near, &mut reader, b, b"two").await,
            (b, b"two".to_vec())
        );
        assert_eq!(
            ask(&mut near, &mut reader, a, b"three").await,
            (a, b"three".to_vec())
        );
        assert_eq!(metrics.open.load(Ordering::Relaxed), 2);
        {
            let sources = sources.lock().unwrap();
            assert_eq!(sources[0], sources[2], "a's datagrams share a's session");
            assert_ne!(sources[0], sources[1], "b has a session of its own");
        }
        // Polled: expiry is a timer inside the forwarder, with no event to wait on.
        let deadline = Instant::now() + Duration::from_secs(10);
        while metrics.open.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "idle sessions were not closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            ask(&mut near, &mut reader, a, b"four").await,
            (a, b"four".to_vec())
        );
        let sources = sources.lock().unwrap();
        assert_ne!(sources[3], sources[0], "a new session after expiry");
        assert_eq!(metrics.connections.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_new_visitor_past_the_session_cap_replaces_the_least_recently_active_one() {
        let limits = Limits {
            idle: Duration::from_secs(60),
            sessions: 2,
        };
        let (mut near, metrics, sources) = client_side(limits).await;
        let mut reader = FrameReader::new();
        let visitor = |i: u8| SocketAddr::from(([198, 51, 100, i], 53));
        ask(&mut near, &mut reader, visitor(1), b"a").await;
        ask(&mut near, &mut reader, visitor(2), b"b").await;
        ask(&mut near, &mut reader, visitor(1), b"c").await;
        // A table full of earlier visitors does not lock the third out: visitor 2, the least
        // recently active, makes room.
        assert_eq!(
            ask(&mut near, &mut reader, visitor(3), b"d").await,
            (visitor(3), b"d".to_vec())
        );
        assert_eq!(
            ask(&mut near, &mut reader, visitor(1), b"e").await,
            (visitor(1), b"e".to_vec())
        );
        let sources = sources.lock().unwrap().clone();
        assert_eq!(sources[4], sources[0], "visitor 1 kept its session");
        assert_eq!(metrics.datagrams_dropped.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.open.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.connections.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_servers_visitor_table_forgets_the_least_recently_seen_when_full() {
        let metrics = Arc::new(ServiceMetrics::default());
        let limits = Limits {
            idle: Duration::from_secs(60),
            sessions: 2,
        };
        let mut visitors = Visitors::new(metrics.clone(), limits);
        let visitor = |i: u8| SocketAddr::from(([198, 51, 100, i], 53));
        let now = Instant::now();
        visitors.admit(visitor(1), now);
        visitors.admit(visitor(2), now);
        visitors.admit(visitor(1), now);
        visitors.admit(visitor(3), now);
        let mut seen: Vec<SocketAddr> = visitors.seen.keys().copied().collect();
        seen.sort();
        assert_eq!(seen, [visitor(1), visitor(3)]);
        assert_eq!(metrics.open.load(Ordering::Relaxed), 2);
        // Many datagrams from the same visitors leave the order queue bounded.
        for _ in 0..10_000 {
            visitors.admit(visitor(1), now);
        }
        assert!(visitors.order.len() <= 2 * visitors.seen.len() + 65);
    }

    proptest! {
        #[test]
        fn frame_reading_never_panics_and_buffers_at_most_two_frames(bytes in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..64) {
            block_on(async {
                let mut reader = FrameReader::new();
                let capacity = reader.buf.len();
                // Fed in small reads, so frames straddle reads.
                let (mut near, mut far) = tokio::io::duplex(chunk);
                let feed = async move {
                    let _ = near.write_all(&bytes).await;
                    drop(near);
                };
                let reading = &mut reader;
                let read = async move {
                    while let Ok(Some((_, payload))) = reading.next(&mut far).await {
                        assert!(payload.len() <= u16::MAX as usize);
                    }
                    // A reader that gave up closes its end, so the feed never waits on it.
                    drop(far);
                };
                tokio::join!(feed, read);
                assert_eq!(reader.buf.len(), capacity, "the buffer never grows");
            });
        }

        #[test]
        fn frames_survive_any_split_into_reads(sizes in proptest::collection::vec(0usize..3000, 1..20), chunk in 1usize..5000) {
            let list: Vec<(SocketAddr, Vec<u8>)> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let from = if i % 2 == 0 {
                        SocketAddr::from(([192, 0, 2, i as u8], 1000 + i as u16))
                    } else {
                        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16], 53))
                    };
                    (from, (0..n).map(|b| (b * 31 + i) as u8).collect())
                })
                .collect();
            let wire = frames(&list);
            let got = block_on(async {
                let (mut near, mut far) = tokio::io::duplex(chunk);
                let feed = async move {
                    near.write_all(&wire).await.unwrap();
                    drop(near);
                };
                let (_, got) = tokio::join!(feed, async {
                    let mut reader = FrameReader::new();
                    let mut out = Vec::new();
                    while let Some((from, payload)) = reader.next(&mut far).await.unwrap() {
                        out.push((from, payload.to_vec()));
                    }
                    out
                });
                got
            });
            prop_assert_eq!(got, list);
        }
    }
}
