//! Carrying one visitor connection's bytes between a tunnel stream and a TCP socket.
//!
//! When the tunnel stream is plain TCP, bytes move socket → pipe → socket with `splice(2)` and
//! never enter user space: no copies, no buffers in the process (the pipe's pages belong to the
//! kernel), so throughput is higher and memory flat however many connections are open. Small
//! chunks (a request, a reply, a keystroke) are copied instead, through one small buffer per
//! thread: a `recv` and a `send` cost the kernel less than two splices, and a read shorter than
//! the buffer proves the socket drained, so no third call is made to find it empty (bytes the
//! destination does not take at once wait in the pipe). A chunk that fills the buffer switches
//! the direction to splicing until a splice moves less than the buffer holds. Other
//! transports copy through two buffers allocated once per connection. Either way nothing is
//! allocated per chunk and no lock is taken. A direction that reaches end of stream half-closes
//! the other side, so protocols that shut down writing (HTTP/1.0, `ssh` exit) work; the
//! direction that ends last leaves its half-close to the close of both sockets that follows
//! at once, which sends the same FIN.
//!
//! A plain TCP tunnel stream opened without TCP keepalive gets it once the connection has lasted
//! a while ([`LateKeepalive`]): most carry one short exchange and never need it.
//!
//! A connection may be given an idle limit: when no byte has moved either way for that long it
//! is closed. Activity costs one relaxed store of a millisecond count per chunk, and the one timer
//! wakes only at the earliest moment the limit could be reached.
//!
//! A pipe starts at the kernel's default size and grows to 1 MiB the first time a splice fills
//! it, so bulk transfers make fewer system calls per megabyte while short connections count
//! only the default against the user's pipe quota.
//!
//! Pipes of connections that ended cleanly (and are empty) are kept, a few per thread, for the
//! next connections: making, sizing and closing two pipes per connection was about 6% of the
//! tunnel's CPU per short connection (perf). A pipe counts the bytes it holds, so emptiness is
//! known without a system call.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::deadline::Deadlines;
use crate::sockopt;
use crate::transport::{TcpTransport, TunnelStream};

/// Buffer size per direction for transports that cannot splice.
const COPY_BUFFER: usize = 64 * 1024;
/// A new pipe's capacity: the kernel's default, which costs no system call to get.
const START_PIPE_SIZE: usize = 64 * 1024;
/// The capacity a direction's pipe grows to once a splice has filled it (the kernel may give
/// less). Only bulk transfers reach it: a pipe's size counts against the user's pipe quota
/// (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default) whether or not it holds bytes, and
/// past that quota the kernel makes 8 KiB pipes, so short connections keep the default and a
/// grown pipe is shrunk back before it is pooled.
const BULK_PIPE_SIZE: i32 = 1024 * 1024;
/// Empty pipes kept per thread for reuse (two descriptors each; an empty pipe holds no pages).
const POOLED_PIPES: usize = 16;
/// Chunks up to this size are copied rather than spliced (less than any pipe's capacity, so
/// what the destination does not take at once always fits in the empty pipe).
pub(crate) const SMALL_CHUNK: usize = 4096;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// The buffer small chunks are copied through; nothing stays in it between calls.
    static SMALL: RefCell<[u8; SMALL_CHUNK]> = const { RefCell::new([0; SMALL_CHUNK]) };
}

/// Bytes carried each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Carried {
    /// From the tunnel to the local socket.
    pub(crate) inbound: u64,
    /// From the local socket to the tunnel.
    pub(crate) outbound: u64,
}

/// Counters the bytes of each direction are added to as they move (for metrics).
#[derive(Clone, Copy)]
pub(crate) struct Meter<'a> {
    /// Bytes from the tunnel to the local socket.
    pub(crate) inbound: &'a AtomicU64,
    /// Bytes from the local socket to the tunnel.
    pub(crate) outbound: &'a AtomicU64,
}

/// When bytes last moved on a connection.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last chunk either way.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(millis, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// TCP keepalive for a plain TCP tunnel stream that was opened without it
/// ([`crate::transport::Transport::connect_data`]): turned on once the connection has lasted
/// `after`'s limit. A shorter one ends before a keepalive probe would have been sent, so it
/// loses nothing by never having it; a longer one gets its first probe that much later.
#[derive(Clone, Copy)]
pub(crate) struct LateKeepalive<'a> {
    pub(crate) after: &'a Deadlines,
    /// Whose keepalive timings apply.
    pub(crate) transport: &'a TcpTransport,
}

/// Carries bytes both ways until both sides have finished or one fails, or, with an `idle`
/// limit, until nothing has moved either way for that long (an error of kind `TimedOut`).
pub(crate) async fn forward<S: TunnelStream>(
    tunnel: S,
    local: TcpStream,
    meter: Meter<'_>,
    idle: Option<Duration>,
    late: Option<LateKeepalive<'_>>,
) -> io::Result<Carried> {
    let activity = Activity::new();
    let carry = carry(tunnel, local, meter, &activity, late);
    let Some(limit) = idle else {
        return carry.await;
    };
    tokio::select! {
        carried = carry => carried,
        () = activity.idle_for(limit) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no bytes either way for {}s: closed", limit.as_secs()),
        )),
    }
}

async fn carry<S: TunnelStream>(
    mut tunnel: S,
    local: TcpStream,
    meter: Meter<'_>,
    activity: &Activity,
    late: Option<LateKeepalive<'_>>,
) -> io::Result<Carried> {
    if let Some(tcp) = tunnel.plain_tcp() {
        let both = splice_both(tcp, &local, meter, activity);
        return match late {
            Some(late) => {
                late.after
                    .meanwhile(both, || late.transport.keepalive(tcp))
                    .await
            }
            None => both.await,
        };
    }
    // Copied bytes are counted when the connection ends; encrypted transports that want live
    // counts wrap their stream.
    let mut local = Touching {
        inner: local,
        activity,
    };
    let (inbound, outbound) =
        tokio::io::copy_bidirectional_with_sizes(&mut tunnel, &mut local, COPY_BUFFER, COPY_BUFFER)
            .await?;
    meter.inbound.fetch_add(inbound, Ordering::Relaxed);
    meter.outbound.fetch_add(outbound, Ordering::Relaxed);
    Ok(Carried { inbound, outbound })
}

/// The local socket, noting when bytes move through it (both directions do).
struct Touching<'a> {
    inner: TcpStream,
    activity: &'a Activity,
}

impl AsyncRead for Touching<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Touching<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn splice_both(
    tunnel: &TcpStream,
    local: &TcpStream,
    meter: Meter<'_>,
    activity: &Activity,
) -> io::Result<Carried> {
    let inbound_pipe = Pipe::take()?;
    let outbound_pipe = Pipe::take()?;
    let one_ended = AtomicBool::new(false);
    let (inbound, outbound) = tokio::try_join!(
        splice_one(
            tunnel,
            local,
            &inbound_pipe,
            meter.inbound,
            activity,
            &one_ended
        ),
        splice_one(
            local,
            tunnel,
            &outbound_pipe,
            meter.outbound,
            activity,
            &one_ended
        ),
    )?;
    // Both directions reached end of stream with every byte written: the pipes are empty.
    // (On an error, or if this future is dropped, they are closed instead.)
    inbound_pipe.give_back();
    outbound_pipe.give_back();
    Ok(Carried { inbound, outbound })
}

/// A pipe used as the kernel-side buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What a splice into it asks for: [`START_PIPE_SIZE`], or what [`Pipe::grow`] got.
    capacity: AtomicUsize,
    /// Whether [`Pipe::grow`] has run (grown or refused): it is tried once per pipe.
    grown: AtomicBool,
    /// Bytes in it now: put in by [`Pipe::fill`] and [`Pipe::put`], taken by [`Pipe::drain`].
    held: AtomicUsize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe {
            read,
            write,
            capacity: AtomicUsize::new(START_PIPE_SIZE),
            grown: AtomicBool::new(false),
            held: AtomicUsize::new(0),
        })
    }

    /// Whether the last splice of `filled` bytes filled the pipe and it has not tried to grow.
    fn wants_growth(&self, filled: usize) -> bool {
        filled >= self.capacity.load(Ordering::Relaxed) && !self.grown.load(Ordering::Relaxed)
    }

    /// Asks the kernel for a [`BULK_PIPE_SIZE`] pipe, once: a bigger pipe means fewer system
    /// calls and wake-ups per megabyte (growing to 1 MiB from 64 KiB, against a fixed 256 KiB:
    /// 0.89x the tunnel's CPU per GB, median of 3 interleaved iperf3 runs).
    /// The capacity stays as it was when the limit (`/proc/sys/fs/pipe-max-size`) or the
    /// user's pipe quota says no.
    fn grow(&self) {
        self.grown.store(true, Ordering::Relaxed);
        if let Ok(size) = fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(BULK_PIPE_SIZE)) {
            let size = usize::try_from(size).unwrap_or(START_PIPE_SIZE);
            self.capacity.store(size, Ordering::Relaxed);
        }
    }

    /// A pipe from this thread's pool, or a new one.
    fn take() -> io::Result<Pipe> {
        match PIPES.with_borrow_mut(Vec::pop) {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Keeps this pipe for another connection if it is empty and the pool has room; a byte
    /// left in it would reach the wrong visitor, so a pipe that holds any is closed. A grown
    /// pipe goes back to the default size first (closed if the kernel says no).
    fn give_back(self) {
        if self.held.load(Ordering::Relaxed) != 0 {
            return;
        }
        if self.grown.swap(false, Ordering::Relaxed)
            && self.capacity.swap(START_PIPE_SIZE, Ordering::Relaxed) != START_PIPE_SIZE
            && fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(START_PIPE_SIZE as i32)).is_err()
        {
            return;
        }
        PIPES.with_borrow_mut(|pool| {
            if pool.len() < POOLED_PIPES {
                pool.push(self);
            }
        });
    }

    /// Splices what `from` has (up to the capacity) into the pipe; `WouldBlock` if nothing.
    fn fill(&self, from: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let n = from.try_io(Interest::READABLE, || {
            let capacity = self.capacity.load(Ordering::Relaxed);
            Ok(splice(from, None, &self.write, None, capacity, flags)?)
        })?;
        self.held.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Writes `bytes` into the pipe, whole: it must be empty and `bytes` no longer than
    /// [`SMALL_CHUNK`], which a pipe always takes at once.
    fn put(&self, bytes: &[u8]) -> io::Result<()> {
        let written = nix::unistd::write(&self.write, bytes)?;
        self.held.fetch_add(written, Ordering::Relaxed);
        if written < bytes.len() {
            return Err(io::Error::other("a pipe took less than a small chunk"));
        }
        Ok(())
    }

    /// Splices up to `len` bytes from the pipe to `to`; `WouldBlock` if it takes none.
    fn drain(&self, to: &TcpStream, len: usize) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let n = to.try_io(Interest::WRITABLE, || {
            Ok(splice(&self.read, None, to, None, len, flags)?)
        })?;
        self.held.fetch_sub(n, Ordering::Relaxed);
        Ok(n)
    }
}

/// Copies one chunk of at most [`SMALL_CHUNK`] bytes `from` → `to` through this thread's
/// buffer: returns the bytes read (0 at end of stream) and how many of them `to` did not take
/// at once, which are put in `pipe` (empty before) for the caller to drain. `WouldBlock` when
/// `from` has nothing. A read shorter than the buffer drained the socket, so it clears
/// `from`'s readiness (as tokio's own reads do) and the next read waits for new bytes.
fn copy_small(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<(usize, usize)> {
    SMALL.with_borrow_mut(|buf| {
        let n = recv_drained(from, &mut buf[..])?;
        if n == 0 {
            return Ok((0, 0));
        }
        let sent = match to.try_write(&buf[..n]) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if sent < n {
            pipe.put(&buf[sent..n])?;
        }
        Ok((n, n - sent))
    })
}

/// One `recv` from `from` into `buf`: the bytes read (0 at end of stream), `WouldBlock` when
/// it has none. A read shorter than `buf` drained the socket, so it clears `from`'s
/// readiness (as tokio's own reads do) and the next read waits for new bytes.
fn recv_drained(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = None;
    let read = from.try_io(Interest::READABLE, || {
        let n = nix::sys::socket::recv(from.as_raw_fd(), buf, nix::sys::socket::MsgFlags::empty())?;
        if n > 0 && n < buf.len() {
            // Reported as WouldBlock so tokio clears the readiness; the count is kept.
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, short) {
        (_, Some(n)) => Ok(n),
        (read, None) => read,
    }
}

/// The bytes a visitor just accepted has sent already, read into `buf` without waiting: 0 if
/// none are there yet (or it closed, or failed: its forwarding finds that out again). The
/// server sends them in the same write as the command that starts the data channel; the
/// forwarding carries the rest.
pub(crate) fn early_bytes(visitor: &TcpStream, buf: &mut [u8]) -> usize {
    recv_drained(visitor, buf).unwrap_or(0)
}

/// Moves bytes `from` → `to` until `from` ends, then half-closes `to`: small chunks copied,
/// big ones through the pipe; adds each chunk to `counter` once it is written.
///
/// `one_ended` is shared with the other direction: the direction that ends second leaves
/// `to` as it is. Both sockets are closed as soon as both directions have ended (they are
/// owned by [`forward`]'s caller, and dropped with it), and closing a socket whose reading
/// reached its end sends the same FIN a half-close would: one system call fewer per
/// connection on each side of the tunnel.
async fn splice_one(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &AtomicU64,
    activity: &Activity,
    one_ended: &AtomicBool,
) -> io::Result<u64> {
    let mut total = 0u64;
    // Whether the last chunk filled the small buffer (or a splice moved at least that much):
    // then more is likely waiting, and it is spliced.
    let mut big = false;
    loop {
        // The pipe is empty here: every chunk is written out before the next is read.
        let (filled, mut left) = loop {
            from.readable().await?;
            let chunk = if big {
                pipe.fill(from).map(|n| (n, n))
            } else {
                copy_small(from, to, pipe)
            };
            match chunk {
                Ok(chunk) => break chunk,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            if !one_ended.swap(true, Ordering::Relaxed) {
                sockopt::shutdown_write(to);
            }
            return Ok(total);
        }
        big = filled >= SMALL_CHUNK;
        while left > 0 {
            to.writable().await?;
            match pipe.drain(to, left) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        // A splice that filled the pipe: bulk data, which a bigger pipe carries for less.
        if pipe.wants_growth(filled) {
            pipe.grow();
        }
        total += filled as u64;
        counter.fetch_add(filled as u64, Ordering::Relaxed);
        activity.touch();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Two ends of a loopback TCP connection.
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Writes `len` patterned bytes from `near` and half-closes it; checks `far` reads them
    /// whole and in order to the end, then that its reply reaches `near` the same way.
    pub(crate) async fn round_trip<A, B>(mut near: A, mut far: B, len: u32)
    where
        A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                near.write_all(&sent).await.unwrap();
                near.shutdown().await.unwrap();
                let mut back = Vec::new();
                near.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert!(got == sent, "bytes arrive whole and in order");
        far.write_all(b"reply").await.unwrap();
        far.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
    }

    /// Fresh counters that outlive the spawned forwarding task.
    fn counters() -> Meter<'static> {
        Meter {
            inbound: Box::leak(Box::new(AtomicU64::new(0))),
            outbound: Box::leak(Box::new(AtomicU64::new(0))),
        }
    }

    #[tokio::test]
    async fn splice_carries_bytes_both_ways_in_order_and_half_closes() {
        let (visitor, tunnel) = pair().await;
        let (local, service) = pair().await;
        let meter = counters();
        let task = tokio::spawn(forward(tunnel, local, meter, None, None));
        round_trip(visitor, service, 3_000_000).await;
        let carried = task.await.unwrap().unwrap();
        assert_eq!(carried.inbound, 3_000_000);
        assert_eq!(carried.outbound, 5);
        assert_eq!(meter.inbound.load(Ordering::Relaxed), 3_000_000);
        assert_eq!(meter.outbound.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn a_connection_that_ended_cleanly_leaves_its_pipes_to_the_next_one() {
        PIPES.with_borrow_mut(Vec::clear);
        let meter = counters();
        for round in 0..2 {
            let (visitor, tunnel) = pair().await;
            let (local, service) = pair().await;
            // The test runtime is single-threaded: the task runs on this thread's pool.
            let task = tokio::spawn(forward(tunnel, local, meter, None, None));
            round_trip(visitor, service, 1_000_000 + round).await;
            task.await.unwrap().unwrap();
            assert_eq!(
                PIPES.with_borrow(Vec::len),
                2,
                "round {round}: both pipes kept"
            );
        }
    }

    #[tokio::test]
    async fn a_pipe_a_splice_fills_grows_once_and_is_pooled_back_at_the_default_size() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SENT: usize = 8 << 20;
        PIPES.with_borrow_mut(Vec::clear);
        let (mut writer, from) = pair().await;
        let (to, mut reader) = pair().await;
        let write = tokio::spawn(async move { writer.write_all(&vec![7; SENT]).await });
        let read = tokio::spawn(async move {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).await.map(|_| all.len())
        });
        let pipe = Pipe::take().unwrap();
        let kernel_size =
            |pipe: &Pipe| fcntl(&pipe.write, FcntlArg::F_GETPIPE_SZ).unwrap() as usize;
        assert_eq!(
            kernel_size(&pipe),
            START_PIPE_SIZE,
            "a new pipe is the default size"
        );
        assert!(
            !pipe.wants_growth(START_PIPE_SIZE - 1),
            "only a full splice"
        );
        assert!(pipe.wants_growth(START_PIPE_SIZE));

        let (counter, activity, one_ended) =
            (AtomicU64::new(0), Activity::new(), AtomicBool::new(false));
        let carried = splice_one(&from, &to, &pipe, &counter, &activity, &one_ended);
        assert_eq!(carried.await.unwrap(), SENT as u64);
        write.await.unwrap().unwrap();
        assert_eq!(read.await.unwrap().unwrap(), SENT, "every byte arrived");
        let grown = pipe.capacity.load(Ordering::Relaxed);
        assert!(grown > START_PIPE_SIZE, "the kernel gave {grown}");
        assert_eq!(kernel_size(&pipe), grown);
        assert!(!pipe.wants_growth(grown), "a pipe asks to grow once");

        pipe.give_back();
        let pooled = Pipe::take().unwrap();
        assert_eq!(
            kernel_size(&pooled),
            START_PIPE_SIZE,
            "shrunk before it was pooled"
        );
        assert_eq!(pooled.capacity.load(Ordering::Relaxed), START_PIPE_SIZE);
        assert!(
            pooled.wants_growth(START_PIPE_SIZE),
            "a pooled pipe may grow again"
        );
    }

    #[test]
    fn a_pipe_that_still_holds_a_byte_is_closed_not_kept() {
        PIPES.with_borrow_mut(Vec::clear);
        Pipe::new().unwrap().give_back();
        assert_eq!(PIPES.with_borrow(Vec::len), 1);
        let reused = Pipe::take().unwrap();
        assert_eq!(PIPES.with_borrow(Vec::len), 0);
        reused.put(b"x").unwrap();
        reused.give_back();
        assert_eq!(PIPES.with_borrow(Vec::len), 0);
    }
}
