//! [`Activity`]: a stream wrapper that counts reads and writes, so an idle watch can tell a
//! connection in use from an idle one without timers per read. A leaf, shared by the client
//! connections' watch in `server` and the upgraded connections' in `proxy`.
//!
//! One counter holds both: a read adds [`READ`], a write [`WRITE`], so any change means the
//! stream moved and the low half alone counts reads (the HTTP/1.1 header timer in `server`
//! waits for the first byte of a request head). Equality is all anyone asks of it, so
//! wrapping is harmless.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a read that moved bytes adds to the counter.
const READ: u64 = 1;
/// What a write that moved bytes adds to the counter.
const WRITE: u64 = 1 << 32;

/// The reads part of a counter's value.
pub(crate) fn reads(count: u64) -> u32 {
    count as u32
}

/// A stream that counts reads and writes that moved bytes.
pub(crate) struct Activity<T> {
    inner: T,
    count: Arc<AtomicU64>,
}

impl<T> Activity<T> {
    /// Wraps `inner`, counting into `count`.
    pub(crate) fn new(inner: T, count: Arc<AtomicU64>) -> Activity<T> {
        Activity { inner, count }
    }
}
impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.count.fetch_add(READ, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.count.fetch_add(WRITE, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.count.fetch_add(WRITE, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
