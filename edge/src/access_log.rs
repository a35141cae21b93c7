//! JSON access log lines: one per request, written when its response body has been sent
//! (so `bytes` and `duration_ms` are true), by a writer thread of their own.
//!
//! Request handling never waits on the log: lines are appended to a bounded buffer the writer
//! empties; when the writer falls behind (a slow disk, a full pipe) lines are dropped and
//! counted, and the count is reported as a warning.
//!
//! On the edge's worker threads ([`batch_on_this_thread`]) a line is serialized into a buffer
//! of the thread's own, appended to the writer's when the thread is about to sleep (or the
//! buffer fills). Elsewhere a line is appended at once. Appending is a copy under a lock held
//! only for copies; the writer is woken only when it sleeps with nothing to write, and after
//! each write it lingers (`LINGER`) so the lines of many requests go out in one `write`.
//! Waking a writer task (and tokio's blocking thread under it) every time a worker slept cost
//! about a tenth of the edge's CPU under load: 33.8 against 30.2 ms per 1000 requests.

mod log_format;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::http::uri::PathAndQuery;
use hyper::http::{HeaderValue, Method};
use serde::{Serialize, Serializer};
use tokio_util::sync::CancellationToken;

use crate::body::{Body, BoxError};
use crate::config::{AccessLog as Target, LogFormat, LogOutput, LogSpec};
use crate::log_roll::RollingFile;
use crate::proxy::Upstream;
use crate::site::split_host_port;

/// Most bytes waiting for the writer; lines beyond are dropped (and counted).
const MAX_PENDING: usize = 8 << 20;
/// How long the writer waits after a write before it takes what has gathered since.
const LINGER: Duration = Duration::from_millis(20);
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
            log.hand_over(&self.lines, self.count);
        }
        self.lines.clear();
        self.count = 0;
    }
}

/// Makes this thread buffer its lines until [`flush_this_thread`] (the edge's workers call it
/// before they sleep and when they end).
pub(crate) fn batch_on_this_thread() {
    BATCHING.set(true);
}

/// Hands this thread's buffered lines to the writer.
pub(crate) fn flush_this_thread() {
    // try_with: a thread being torn down has no buffer left to flush.
    let _ = BUFFERED.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.flush();
        }
    });
}

/// One request's log record, filled as the request goes. [`write_line`] writes it; its
/// `Serialize` form is the reference the tests hold each line to.
///
/// It holds the request's own values (an address, the parsed method, shared slices of the
/// request's bytes, the upstream's `Arc`) rather than strings made from them: the text is
/// written once, straight into the line, when the response has ended.
#[derive(Debug, Serialize)]
pub(crate) struct Record {
    /// Unix time the request arrived, in seconds.
    pub(crate) ts: f64,
    /// The peer's address.
    pub(crate) remote: IpAddr,
    /// The client's address a trusted proxy named (set only when trusted proxies are).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) client_ip: Option<IpAddr>,
    /// "HTTP/1.1" or "HTTP/2.0".
    pub(crate) proto: &'static str,
    /// Method.
    #[serde(serialize_with = "method")]
    pub(crate) method: Method,
    /// Host asked for, as sent; logged lower case without the port (as routed), or "" when
    /// there was none usable.
    #[serde(serialize_with = "host")]
    pub(crate) host: Option<HeaderValue>,
    /// Path and query; `None` is logged as "/".
    #[serde(serialize_with = "path")]
    pub(crate) path: Option<PathAndQuery>,
    /// Response status.
    pub(crate) status: u16,
    /// Response body bytes sent.
    pub(crate) bytes: u64,
    /// Time from request to the end of the response body.
    pub(crate) duration_ms: f64,
    /// Upstream that answered, if proxied; logged as written in the config.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "upstream")]
    pub(crate) upstream: Option<Arc<Upstream>>,
    /// Authenticated user, if basic_auth passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    /// The client's port (Caddy's shape only).
    #[serde(skip)]
    pub(crate) remote_port: u16,
    /// The request's headers, kept only for a log whose shape shows them.
    #[serde(skip)]
    pub(crate) headers: Option<hyper::http::HeaderMap>,
    /// The response's headers, likewise.
    #[serde(skip)]
    pub(crate) resp_headers: Option<hyper::http::HeaderMap>,
    /// The site's own log, when it has one: the line goes there, not to the edge's log.
    #[serde(skip)]
    pub(crate) to: Option<AccessLog>,
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
pub(crate) struct AccessLog {
    shared: Option<Arc<Shared>>,
}

/// What the request side and the writer thread share.
#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
    /// Shape of the lines.
    format: LogFormat,
    /// Only 5xx answers are written.
    errors_only: bool,
    /// Logger name in Caddy-shaped lines.
    logger: String,
}

/// Lines not yet taken by the writer.
#[derive(Debug, Default)]
struct Pending {
    lines: Vec<u8>,
    /// The writer waits on `wake` for lines (and must be woken).
    sleeping: bool,
    /// The edge is stopping: the writer writes what is left and ends.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only bytes behind: they are still lines.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close(&self) {
        let mut pending = self.lock();
        pending.closed = true;
        self.wake.notify_one();
    }
}

impl AccessLog {
    /// A log that writes nothing.
    pub(crate) fn off() -> AccessLog {
        AccessLog { shared: None }
    }

    /// Whether lines are written.
    pub(crate) fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether lines hold the request's and response's headers.
    pub(crate) fn wants_headers(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.format.wants_headers())
    }

    /// Starts the writer thread for `target`. Once `stop` fires it writes what is left and
    /// ends, and the task returned finishes.
    pub(crate) async fn start(
        target: &Target,
        stop: CancellationToken,
    ) -> std::io::Result<(AccessLog, Option<tokio::task::JoinHandle<()>>)> {
        AccessLog::start_spec(&LogSpec::edge(target), stop).await
    }

    /// Starts the writer thread for `spec`, as [`AccessLog::start`].
    pub(crate) async fn start_spec(
        spec: &LogSpec,
        stop: CancellationToken,
    ) -> std::io::Result<(AccessLog, Option<tokio::task::JoinHandle<()>>)> {
        // Standard output and error are written through duplicates of their descriptors, so
        // nothing else in the process shares a buffer or a lock with the writer.
        let out = match &spec.output {
            LogOutput::Discard => return Ok((AccessLog::off(), None)),
            LogOutput::Stdout => {
                Sink::Plain(File::from(std::io::stdout().as_fd().try_clone_to_owned()?))
            }
            LogOutput::Stderr => {
                Sink::Plain(File::from(std::io::stderr().as_fd().try_clone_to_owned()?))
            }
            LogOutput::File { path, roll: None } => Sink::Plain(open_append(path).await?),
            LogOutput::File {
                path,
                roll: Some(roll),
            } => {
                let (path, roll) = (path.clone(), roll.clone());
                Sink::Rolling(
                    tokio::task::spawn_blocking(move || RollingFile::open(&path, roll))
                        .await
                        .map_err(std::io::Error::other)??,
                )
            }
        };
        let shared = Arc::new(Shared {
            format: spec.format,
            errors_only: spec.errors_only,
            logger: spec.logger.clone(),
            ..Shared::default()
        });
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("edge-access-log".into())
            .spawn(move || {
                write_loop(out, &writer);
                let _ = done_tx.send(());
            })?;
        let closer = shared.clone();
        let task = tokio::spawn(async move {
            stop.cancelled().await;
            closer.close();
            let _ = done_rx.await;
        });
        Ok((
            AccessLog {
                shared: Some(shared),
            },
            Some(task),
        ))
    }

    fn send(&self, record: &Record) {
        let Some(shared) = &self.shared else { return };
        if shared.errors_only && !log_format::is_error(record.status) {
            return;
        }
        if !BATCHING.get() {
            let mut line = Vec::with_capacity(256);
            if write_line_as(shared, record, &mut line) {
                self.hand_over(&line, 1);
            }
            return;
        }
        BUFFERED.with_borrow_mut(|b| {
            let same =
                b.to.as_ref()
                    .and_then(|to| to.shared.as_ref())
                    .is_some_and(|to| Arc::ptr_eq(to, shared));
            if !same {
                b.flush();
                b.to = Some(self.clone());
            }
            if write_line_as(shared, record, &mut b.lines) {
                b.count += 1;
            }
            if b.lines.len() >= FLUSH_AT {
                b.flush();
            }
        });
    }

    /// Appends `chunk` (`lines` whole lines) for the writer, or counts them dropped when the
    /// writer is that far behind.
    fn hand_over(&self, chunk: &[u8], lines: u64) {
        let Some(shared) = &self.shared else { return };
        let mut pending = shared.lock();
        if pending.lines.len() + chunk.len() > MAX_PENDING {
            drop(pending);
            shared.dropped.fetch_add(lines, Ordering::Relaxed);
            return;
        }
        pending.lines.extend_from_slice(chunk);
        if std::mem::take(&mut pending.sleeping) {
            shared.wake.notify_one();
        }
    }
}

/// Appends `record` as one line in the log's shape to `out`; on failure `out` is left as it
/// was.
fn write_line_as(shared: &Shared, record: &Record, out: &mut Vec<u8>) -> bool {
    if shared.format == LogFormat::Edge {
        return write_line(record, out);
    }
    let start = out.len();
    let written = log_format::write_caddy_line(record, shared.format, &shared.logger, out);
    if written.is_err() {
        out.truncate(start);
    }
    written.is_ok()
}

/// Where the writer thread writes.
enum Sink {
    /// A descriptor written as it is.
    Plain(File),
    /// A file that rolls by size.
    Rolling(RollingFile),
}

impl Sink {
    fn write_lines(&mut self, lines: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(file) => file.write_all(lines),
            Sink::Rolling(file) => file.write_lines(lines),
        }
    }
}

/// Appends `record` as one JSON line to `out`: the bytes `serde_json` makes of the record
/// (field order, escapes, numbers), written field by field. Text that needs no escape (nearly
/// all of it) is copied as it is, and numbers are written without `fmt`: serializing through
/// serde cost about three times as much, on every request.
fn write_line(record: &Record, out: &mut Vec<u8>) -> bool {
    out.extend_from_slice(b"{\"ts\":");
    json_f64(record.ts, out);
    out.extend_from_slice(b",\"remote\":\"");
    // An address's text needs no escape. IPv4 (nearly every client) is written as Display
    // writes it, without its fmt machinery.
    match record.remote {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                json_u64(u64::from(octet), out);
            }
        }
        IpAddr::V6(ip) => {
            let _ = write!(out, "{ip}");
        }
    }
    if let Some(ip) = record.client_ip {
        let _ = write!(out, "\",\"client_ip\":\"{ip}");
    }
    out.extend_from_slice(b"\",\"proto\":");
    json_str(record.proto, out);
    out.extend_from_slice(b",\"method\":");
    json_str(record.method.as_str(), out);
    out.extend_from_slice(b",\"host\":");
    match record.host.as_ref().and_then(|h| h.to_str().ok()) {
        Some(text) => {
            let host = split_host_port(text).map_or(text, |(host, _)| host);
            let host = host.trim_end_matches('.');
            let at = out.len();
            json_str(host, out);
            // Lower-casing ASCII letters changes no escape.
            out[at..].make_ascii_lowercase();
        }
        None => out.extend_from_slice(b"\"\""),
    }
    out.extend_from_slice(b",\"path\":");
    json_str(record.path.as_ref().map_or("/", PathAndQuery::as_str), out);
    out.extend_from_slice(b",\"status\":");
    json_u64(u64::from(record.status), out);
    out.extend_from_slice(b",\"bytes\":");
    json_u64(record.bytes, out);
    out.extend_from_slice(b",\"duration_ms\":");
    json_f64(record.duration_ms, out);
    if let Some(upstream) = &record.upstream {
        out.extend_from_slice(b",\"upstream\":");
        json_str(&upstream.text, out);
    }
    if let Some(user) = &record.user {
        out.extend_from_slice(b",\"user\":");
        json_str(user, out);
    }
    out.extend_from_slice(b"}\n");
    true
}

/// `text` as a JSON string.
fn json_str(text: &str, out: &mut Vec<u8>) {
    if text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // serde_json's escapes, byte for byte; writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
        return;
    }
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// `n` in decimal.
fn json_u64(mut n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `x` as serde_json writes it (shortest round-trip form; `null` when not finite).
fn json_f64(x: f64, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &x);
}

async fn open_append(path: &PathBuf) -> std::io::Result<File> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    Ok(file.into_std().await)
}

/// The writer thread: takes everything pending at once and writes it with one `write_all`,
/// then lingers so the next write carries many lines; ends once closed and emptied.
fn write_loop(mut out: Sink, shared: &Shared) {
    let mut lines = Vec::new();
    let mut reported = 0;
    let mut warned: Option<Instant> = None;
    loop {
        let closed = {
            let mut pending = shared.lock();
            while pending.lines.is_empty() && !pending.closed {
                pending.sleeping = true;
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            pending.sleeping = false;
            std::mem::swap(&mut pending.lines, &mut lines);
            pending.closed
        };
        if closed && lines.is_empty() {
            return;
        }
        if !lines.is_empty()
            && let Err(err) = out.write_lines(&lines)
            && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            // A log that cannot be written says so every 10 s, not for every batch.
            tracing::warn!(error = %err, "writing the access log failed");
            warned = Some(Instant::now());
        }
        lines.clear();
        if lines.capacity() > 2 * FLUSH_AT {
            // One burst does not pin a large buffer for good.
            lines = Vec::new();
        }
        let now_dropped = shared.dropped.load(Ordering::Relaxed);
        if now_dropped > reported {
            tracing::warn!(
                lines = now_dropped - reported,
                "access log fell behind; lines dropped"
            );
            reported = now_dropped;
        }
        if !closed {
            std::thread::sleep(LINGER);
        }
    }
}

/// A response body that counts bytes and, when finished or dropped, writes the log record and
/// releases the connection's in-flight count.
pub(crate) struct Logged {
    inner: Body,
    bytes: u64,
    record: Option<Record>,
    start: Instant,
    log: AccessLog,
    in_flight: Arc<AtomicUsize>,
}

impl Logged {
    /// Wraps `inner`; `record` is written when the body ends (if the log is on).
    pub(crate) fn new(
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
        #[serde(skip_serializing_if = "Option::is_none")]
        client_ip: Option<String>,
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
            remote_port: 50_000,
            client_ip: None,
            headers: None,
            resp_headers: None,
            to: None,
        }
    }

    fn strings(r: &Record) -> Strings {
        Strings {
            ts: r.ts,
            remote: r.remote.to_string(),
            client_ip: r.client_ip.map(|ip| ip.to_string()),
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
        let mut serialized = serde_json::to_string(r).unwrap();
        serialized.push('\n');
        assert_eq!(line, serialized, "the line is the record's serde_json form");
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
    fn client_addresses_are_written_as_displayed() {
        for remote in [
            "0.0.0.0",
            "10.1.2.3",
            "255.255.255.255",
            "192.168.100.9",
            "::1",
            "::ffff:10.1.2.3",
            "2001:db8::7",
        ] {
            let mut r = record(b"x", "/", None, None);
            r.remote = remote.parse().unwrap();
            let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
            assert_eq!(v["remote"], remote);
        }
    }

    #[test]
    fn a_client_named_by_a_trusted_proxy_is_written_after_the_peer() {
        for client in ["203.0.113.9", "2001:db8::7"] {
            let mut r = record(b"x", "/", None, None);
            r.client_ip = Some(client.parse().unwrap());
            let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
            assert_eq!(v["client_ip"], client);
        }
        let r = record(b"x", "/", None, None);
        assert!(!line(&r).contains("client_ip"));
    }

    #[test]
    fn counts_are_written_whole_from_zero_to_the_largest() {
        for (status, bytes) in [(0, 0), (9, 10), (100, 99_999), (u16::MAX, u64::MAX)] {
            let mut r = record(b"x", "/", None, None);
            r.status = status;
            r.bytes = bytes;
            let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
            assert_eq!(
                (v["status"].as_u64(), v["bytes"].as_u64()),
                (Some(u64::from(status)), Some(bytes))
            );
        }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_line_handed_over_is_written_in_order_by_the_time_the_writer_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let stop = CancellationToken::new();
        let (log, task) = AccessLog::start(&Target::File(path.clone()), stop.clone())
            .await
            .unwrap();
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        log.hand_over(format!("{t} {i}\n").as_bytes(), 1);
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().unwrap();
        }
        stop.cancel();
        task.unwrap().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 8000);
        for t in 0..4 {
            let prefix = format!("{t} ");
            let mine: Vec<u32> = text
                .lines()
                .filter_map(|l| l.strip_prefix(prefix.as_str()))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..2000).collect::<Vec<_>>(),
                "thread {t}'s lines in order"
            );
        }
        let shared = log.shared.as_ref().unwrap();
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn lines_beyond_what_the_writer_can_hold_are_dropped_and_counted_never_cut() {
        // No writer thread: nothing is taken, as with a writer stuck on a full pipe.
        let shared = Arc::new(Shared::default());
        let log = AccessLog {
            shared: Some(shared.clone()),
        };
        let chunk = vec![b'x'; 1000];
        let fits = MAX_PENDING / chunk.len();
        for _ in 0..fits + 5 {
            log.hand_over(&chunk, 10);
        }
        assert_eq!(shared.lock().lines.len(), fits * chunk.len());
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 50);
    }
}
