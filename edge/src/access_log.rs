//! JSON access log lines: one per request, written when its response body has been sent
//! (so `bytes` and `duration_ms` are true), by a writer task fed through a bounded channel.
//!
//! Request handling never waits on the log: when the writer falls behind (a slow disk, a full
//! pipe) lines are dropped and counted, and the count is reported as a warning.
//!
//! On the edge's worker threads ([`batch_on_this_thread`]) a line is serialized into a buffer
//! of the thread's own, handed to the writer when the thread is about to sleep (or the buffer
//! fills): waking the writer thread for every request cost about a context switch and 10 us of
//! CPU per request. Elsewhere a line goes to the writer at once.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::AccessLog as Target;
use crate::handler::{Body, BoxError};

/// Chunks (of one line or a worker's buffer) queued for the writer.
const QUEUE: usize = 4096;
/// Most chunks written with one write.
const BATCH: usize = 512;
/// A worker hands its buffer over at this size even when busy.
const FLUSH_AT: usize = 64 * 1024;

thread_local! {
    static BATCHING: Cell<bool> = const { Cell::new(false) };
    static BUFFERED: RefCell<Buffered> = const {
        RefCell::new(Buffered { lines: Vec::new(), count: 0, to: None })
    };
}

/// Lines serialized on this thread and not yet handed to the writer of `to`.
struct Buffered {
    lines: Vec<u8>,
    count: u64,
    to: Option<AccessLog>,
}

impl Buffered {
    fn flush(&mut self) {
        if self.lines.is_empty() {
            return;
        }
        if let Some(log) = &self.to {
            let chunk = std::mem::replace(&mut self.lines, Vec::with_capacity(FLUSH_AT + 1024));
            log.hand_over(chunk, self.count);
        }
        self.lines.clear();
        self.count = 0;
    }
}

/// Makes this thread buffer its lines until [`flush_this_thread`] (the edge's workers call it
/// before they sleep and when they end).
pub fn batch_on_this_thread() {
    BATCHING.set(true);
}

/// Hands this thread's buffered lines to the writer.
pub fn flush_this_thread() {
    // try_with: a thread being torn down has no buffer left to flush.
    let _ = BUFFERED.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.flush();
        }
    });
}

/// One request's log record, filled as the request goes.
#[derive(Debug, Serialize)]
pub struct Record {
    /// Unix time the request arrived, in seconds.
    pub ts: f64,
    /// Client address.
    pub remote: String,
    /// "HTTP/1.1" or "HTTP/2.0".
    pub proto: &'static str,
    /// Method.
    pub method: String,
    /// Host asked for.
    pub host: String,
    /// Path and query.
    pub path: String,
    /// Response status.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Time from request to the end of the response body.
    pub duration_ms: f64,
    /// Upstream that answered, if proxied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Authenticated user, if basic_auth passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The sending side of the access log.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether lines are written.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Starts the writer for `target`; it ends when every sender is gone or `stop` fires
    /// (after writing what is queued).
    pub async fn start(
        target: &Target,
        stop: CancellationToken,
    ) -> std::io::Result<(AccessLog, Option<tokio::task::JoinHandle<()>>)> {
        let writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match target {
            Target::Off => return Ok((AccessLog::off(), None)),
            Target::Stdout => Box::new(tokio::io::stdout()),
            Target::Stderr => Box::new(tokio::io::stderr()),
            Target::File(path) => Box::new(open_append(path).await?),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_loop(writer, rx, dropped.clone(), stop));
        Ok((
            AccessLog {
                tx: Some(tx),
                dropped,
            },
            Some(task),
        ))
    }

    fn send(&self, record: &Record) {
        let Some(tx) = &self.tx else { return };
        if !BATCHING.get() {
            let mut line = Vec::with_capacity(256);
            if serde_json::to_writer(&mut line, record).is_ok() {
                line.push(b'\n');
                self.hand_over(line, 1);
            }
            return;
        }
        BUFFERED.with_borrow_mut(|b| {
            let same =
                b.to.as_ref()
                    .and_then(|to| to.tx.as_ref())
                    .is_some_and(|to| to.same_channel(tx));
            if !same {
                b.flush();
                b.to = Some(self.clone());
            }
            if serde_json::to_writer(&mut b.lines, record).is_ok() {
                b.lines.push(b'\n');
                b.count += 1;
            }
            if b.lines.len() >= FLUSH_AT {
                b.flush();
            }
        });
    }

    fn hand_over(&self, chunk: Vec<u8>, lines: u64) {
        if let Some(tx) = &self.tx
            && tx.try_send(chunk).is_err()
        {
            self.dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }
}

async fn open_append(path: &PathBuf) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

async fn write_loop(
    mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    // Everything queued is taken at once and written with one write: under load a write
    // carries hundreds of lines, so the writer keeps up with the requests instead of dropping.
    let mut batch = Vec::with_capacity(BATCH);
    let mut lines = Vec::with_capacity(BATCH * 256);
    let mut reported = 0;
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = stop.cancelled() => { rx.close(); rx.recv_many(&mut batch, BATCH).await }
        };
        if received == 0 {
            break;
        }
        lines.clear();
        for chunk in batch.drain(..) {
            lines.extend_from_slice(&chunk);
        }
        let write = async {
            out.write_all(&lines).await?;
            out.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(10), write).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "writing the access log failed"),
            Err(_) => tracing::warn!("writing the access log timed out"),
        }
        if lines.capacity() > BATCH * 1024 {
            // One burst of long lines does not pin a large buffer for good.
            lines = Vec::with_capacity(BATCH * 256);
        }
        let now_dropped = dropped.load(Ordering::Relaxed);
        if now_dropped > reported {
            tracing::warn!(
                lines = now_dropped - reported,
                "access log fell behind; lines dropped"
            );
            reported = now_dropped;
        }
    }
    let _ = out.flush().await;
}

/// A response body that counts bytes and, when finished or dropped, writes the log record and
/// releases the connection's in-flight count.
pub struct Logged {
    inner: Body,
    bytes: u64,
    record: Option<Record>,
    start: Instant,
    log: AccessLog,
    in_flight: Arc<AtomicUsize>,
}

impl Logged {
    /// Wraps `inner`; `record` is written when the body ends (if the log is on).
    pub fn new(
        inner: Body,
        record: Option<Record>,
        start: Instant,
        log: AccessLog,
        in_flight: Arc<AtomicUsize>,
    ) -> Logged {
        Logged {
            inner,
            bytes: 0,
            record,
            start,
            log,
            in_flight,
        }
    }

    fn finish(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.bytes = self.bytes;
            record.duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
            self.log.send(&record);
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::warn!(error = %err, "response body failed midway; the client gets a truncated response");
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
