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
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::http::uri::PathAndQuery;
use hyper::http::{HeaderValue, Method};
use serde::{Serialize, Serializer};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::AccessLog as Target;
use crate::handler::{Body, BoxError};
use crate::proxy::Upstream;
use crate::site::split_host_port;

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
///
/// It holds the request's own values (an address, the parsed method, shared slices of the
/// request's bytes, the upstream's `Arc`) rather than strings made from them: the text is
/// written once, straight into the line, when the response has ended.
#[derive(Debug, Serialize)]
pub struct Record {
    /// Unix time the request arrived, in seconds.
    pub ts: f64,
    /// Client address.
    pub remote: IpAddr,
    /// "HTTP/1.1" or "HTTP/2.0".
    pub proto: &'static str,
    /// Method.
    #[serde(serialize_with = "method")]
    pub method: Method,
    /// Host asked for, as sent; logged lower case without the port (as routed), or "" when
    /// there was none usable.
    #[serde(serialize_with = "host")]
    pub host: Option<HeaderValue>,
    /// Path and query; `None` is logged as "/".
    #[serde(serialize_with = "path")]
    pub path: Option<PathAndQuery>,
    /// Response status.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Time from request to the end of the response body.
    pub duration_ms: f64,
    /// Upstream that answered, if proxied; logged as written in the config.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "upstream")]
    pub upstream: Option<Arc<Upstream>>,
    /// Authenticated user, if basic_auth passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn method<S: Serializer>(method: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(method.as_str())
}

fn host<S: Serializer>(host: &Option<HeaderValue>, s: S) -> Result<S::Ok, S::Error> {
    match host.as_ref().and_then(|h| h.to_str().ok()) {
        Some(text) => s.collect_str(&RoutedHost(text)),
        None => s.serialize_str(""),
    }
}

fn path<S: Serializer>(path: &Option<PathAndQuery>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(path.as_ref().map_or("/", PathAndQuery::as_str))
}

fn upstream<S: Serializer>(upstream: &Option<Arc<Upstream>>, s: S) -> Result<S::Ok, S::Error> {
    match upstream {
        Some(upstream) => s.serialize_str(&upstream.text),
        None => s.serialize_none(),
    }
}

/// A Host header's text shown as [`crate::site::host_of`] makes it (no port, no trailing dot,
/// lower case), without making a `String`.
struct RoutedHost<'a>(&'a str);

impl fmt::Display for RoutedHost<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = split_host_port(self.0).map_or(self.0, |(host, _)| host);
        let host = host.trim_end_matches('.');
        if !host.bytes().any(|b| b.is_ascii_uppercase()) {
            return f.write_str(host);
        }
        let mut buf = [0u8; 64];
        for chunk in host.as_bytes().chunks(buf.len()) {
            let lower = &mut buf[..chunk.len()];
            lower.copy_from_slice(chunk);
            lower.make_ascii_lowercase();
            // Lower-casing ASCII letters keeps the bytes UTF-8, and chunks of an ASCII-only
            // string (a HeaderValue's to_str) split no character.
            f.write_str(std::str::from_utf8(lower).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
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
            if write_line(record, &mut line) {
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
            if write_line(record, &mut b.lines) {
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

/// Appends `record` as one JSON line to `out`; on failure `out` is left as it was.
fn write_line(record: &Record, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    match serde_json::to_writer(&mut *out, record) {
        Ok(()) => {
            out.push(b'\n');
            true
        }
        Err(_) => {
            out.truncate(start);
            false
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::host_of;

    /// The record as the edge logged it when its fields were strings: the reference each
    /// line must match byte for byte.
    #[derive(Serialize)]
    struct Strings {
        ts: f64,
        remote: String,
        proto: &'static str,
        method: String,
        host: String,
        path: String,
        status: u16,
        bytes: u64,
        duration_ms: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    }

    fn record(host: &[u8], path: &str, user: Option<&str>, upstream: Option<&str>) -> Record {
        Record {
            ts: 1_764_770_000.123_456,
            remote: "::ffff:10.1.2.3".parse().unwrap(),
            proto: "HTTP/1.1",
            method: Method::from_bytes(b"PROPFIND").unwrap(),
            host: HeaderValue::from_bytes(host).ok(),
            path: (path != "-").then(|| path.parse().unwrap()),
            status: 207,
            bytes: 12_345,
            duration_ms: 0.25,
            upstream: upstream.map(|u| Upstream::parse(u).unwrap()),
            user: user.map(str::to_owned),
        }
    }

    fn strings(r: &Record) -> Strings {
        Strings {
            ts: r.ts,
            remote: r.remote.to_string(),
            proto: r.proto,
            method: r.method.to_string(),
            host: r
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .map(host_of)
                .unwrap_or_default(),
            path: r.path.as_ref().map_or("/", |p| p.as_str()).to_owned(),
            status: r.status,
            bytes: r.bytes,
            duration_ms: r.duration_ms,
            upstream: r.upstream.as_ref().map(|u| u.text.clone()),
            user: r.user.clone(),
        }
    }

    fn line(r: &Record) -> String {
        let mut out = b"earlier line\n".to_vec();
        assert!(write_line(r, &mut out));
        let text = String::from_utf8(out).expect("a log line is UTF-8");
        let line = text.strip_prefix("earlier line\n").expect("appended");
        let mut expected = serde_json::to_string(&strings(r)).unwrap();
        expected.push('\n');
        assert_eq!(line, expected);
        line.to_owned()
    }

    #[test]
    fn a_line_holds_every_field_as_json() {
        let r = record(
            b"Lab.Example.ORG.:8443",
            "/a/b?c=d",
            None,
            Some("127.0.0.1:7001"),
        );
        let text = line(&r);
        assert!(text.ends_with("}\n") && !text[..text.len() - 1].contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["remote"], "::ffff:10.1.2.3");
        assert_eq!(v["method"], "PROPFIND");
        assert_eq!(v["host"], "lab.example.org");
        assert_eq!(v["path"], "/a/b?c=d");
        assert_eq!(v["status"], 207);
        assert_eq!(v["bytes"], 12_345);
        assert_eq!(v["duration_ms"], 0.25);
        assert_eq!(v["upstream"], "127.0.0.1:7001");
        assert!(
            v.get("user").is_none(),
            "no user without basic_auth: {text}"
        );
        let r = record(b"localhost", "-", Some("alice"), None);
        let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
        assert_eq!(v["path"], "/", "a request without a path logs /");
        assert_eq!(v["user"], "alice");
        assert!(v.get("upstream").is_none());
    }

    #[test]
    fn quotes_backslashes_and_control_characters_are_escaped() {
        let r = record(
            br#"a"b\c:1"#,
            r#"/q"uo{t}e\back/ünï?x=\y&z="#,
            Some("ev\"il\\\u{1}\t\n\u{7f}\u{2028}ünï"),
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
        assert_eq!(v["host"], r#"a"b\c"#);
        assert_eq!(v["path"], r#"/q"uo{t}e\back/ünï?x=\y&z="#);
        assert_eq!(v["user"], "ev\"il\\\u{1}\t\n\u{7f}\u{2028}ünï");
    }

    #[test]
    fn a_host_that_is_not_text_is_logged_empty() {
        // Bytes past ASCII are a valid header value but no host the edge routes (a 400).
        let r = record(b"caf\xc3\xa9.example", "/", None, None);
        let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
        assert_eq!(v["host"], "");
        let mut r = record(b"x", "/", None, None);
        r.host = None;
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line(&r)).unwrap()["host"],
            ""
        );
    }

    #[test]
    fn a_path_that_is_not_utf8_never_reaches_a_record() {
        // The log relies on this: hyper's URI parsing refuses such a request line (400).
        assert!(PathAndQuery::try_from(&b"/caf\xe9"[..]).is_err());
        assert!(PathAndQuery::try_from(&b"/a?\xff"[..]).is_err());
        assert!(PathAndQuery::try_from(&b"/\x01"[..]).is_err());
    }

    #[test]
    fn times_that_are_not_numbers_are_logged_as_null() {
        let mut r = record(b"x", "/", None, None);
        r.duration_ms = f64::NAN;
        r.ts = f64::INFINITY;
        let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
        assert!(v["duration_ms"].is_null() && v["ts"].is_null());
    }

    proptest::proptest! {
        /// Whatever a client sends as Host and path, and whatever user name it authenticates
        /// as, the line is the one the string fields made, and parses back to them.
        #[test]
        fn any_request_logs_the_same_line_as_string_fields(
            host in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            path in "/[!-~]{0,80}",
            user in proptest::option::of(".{0,40}"),
        ) {
            let Ok(path) = path.parse::<PathAndQuery>() else { return Ok(()) };
            let r = record(&host, path.as_str(), user.as_deref(), Some(":9"));
            let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
            proptest::prop_assert_eq!(v["path"].as_str(), Some(path.as_str()));
            proptest::prop_assert_eq!(v["user"].as_str(), user.as_deref());
        }
    }
}
