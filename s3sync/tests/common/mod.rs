//! Helpers shared by s3sync's integration tests: running the binary against a test S3
//! server, making file trees, and a TCP proxy that plays a store going away.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use testkit::{ProcBuilder, S3Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a finished s3sync run showed.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The JSON lines on stdout.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Asserts the exit code, showing the output otherwise.
    pub fn expect(&self, code: i32) -> &Run {
        assert_eq!(self.code, Some(code), "{self:#?}");
        self
    }
}

/// The s3sync binary with the server's environment and nothing ambient.
pub fn s3sync(server: &S3Server) -> ProcBuilder {
    ProcBuilder::new(env!("CARGO_BIN_EXE_s3sync")).envs(server.env())
}

/// The s3sync binary run as `nobody`, for what it does without root's rights; started from a
/// copy `nobody` can reach wherever the checkout is (testkit's `as_nobody`).
pub fn s3sync_as_nobody(server: &S3Server) -> ProcBuilder {
    ProcBuilder::as_nobody(env!("CARGO_BIN_EXE_s3sync"))
        .unwrap()
        .envs(server.env())
}

/// Runs a built command to its end.
pub fn run(builder: ProcBuilder) -> Run {
    let proc = builder.spawn().unwrap();
    let status = proc.wait_exit(Duration::from_secs(240)).unwrap();
    Run {
        code: status.code(),
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    }
}

/// Runs s3sync with these arguments against `server`.
pub fn s3sync_run(server: &S3Server, args: &[&str]) -> Run {
    run(s3sync(server).args(args))
}

/// Deterministic pseudo-random numbers.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Writes a file with a given mtime.
pub fn write_file(path: &Path, body: &[u8], mtime: SystemTime) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, body).unwrap();
    let file = fs::File::options().write(true).open(path).unwrap();
    file.set_times(fs::FileTimes::new().set_modified(mtime))
        .unwrap();
}

/// A time in the past with nanoseconds.
pub fn past(rng: &mut Rng) -> SystemTime {
    UNIX_EPOCH
        + Duration::new(
            1_500_000_000 + rng.below(100_000_000),
            rng.below(1_000_000_000) as u32,
        )
}

/// Every file under `root` as (relative path, bytes, mtime, mode).
pub fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>, SystemTime, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((
                    entry.path().strip_prefix(root).unwrap().to_owned(),
                    fs::read(entry.path()).unwrap(),
                    meta.modified().unwrap(),
                    meta.permissions().mode() & 0o777,
                ));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every object in a bucket as (key, size, ETag, LastModified).
pub async fn objects(server: &S3Server, bucket: &str) -> Vec<(String, i64, String, String)> {
    let client = server.client().await;
    let mut out = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(bucket)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for o in page.unwrap().contents() {
            out.push((
                o.key().unwrap().to_owned(),
                o.size().unwrap(),
                o.e_tag().unwrap_or_default().to_owned(),
                format!("{:?}", o.last_modified()),
            ));
        }
    }
    out
}

/// A TCP proxy in front of a store that "goes down" once a number of bytes went through in
/// either direction: it then cuts every connection and refuses new ones, except requests
/// aborting a multipart upload (the store coming back in time for the cleanup).
pub struct FaultProxy {
    pub port: u16,
    pub down: Arc<AtomicBool>,
    pub refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    pub async fn start(upstream: u16, cut_after: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let moved = Arc::new(AtomicU64::new(0));
        let (d, r) = (down.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (down, refused, moved) = (d.clone(), r.clone(), moved.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, upstream, cut_after, down, refused, moved).await;
                });
            }
        });
        FaultProxy {
            port,
            down,
            refused,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: u16,
    cut_after: u64,
    down: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    moved: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut head = vec![0u8; 16 * 1024];
    let n = client.read(&mut head).await?;
    let abort =
        head[..n].starts_with(b"DELETE ") && head[..n].windows(9).any(|w| w == b"uploadId=");
    if down.load(Ordering::SeqCst) && !abort {
        refused.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    let mut server = TcpStream::connect(("127.0.0.1", upstream)).await?;
    server.write_all(&head[..n]).await?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                mut to: tokio::net::tcp::OwnedWriteHalf| {
        let (down, moved) = (down.clone(), moved.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = from.read(&mut buf).await?;
                if n == 0 || (down.load(Ordering::SeqCst) && !abort) {
                    return Ok::<_, std::io::Error>(());
                }
                to.write_all(&buf[..n]).await?;
                if moved.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > cut_after {
                    down.store(true, Ordering::SeqCst);
                }
            }
        }
    };
    tokio::select! {
        _ = pump(cr, sw) => {}
        _ = pump(sr, cw) => {}
    }
    Ok(())
}

/// An HTTP/1.1 proxy in front of a store that notes every request line (method and target),
/// so a test can count the requests a run sent: request bodies are skipped by their
/// `Content-Length`, answers pass through untouched.
pub struct CountingProxy {
    pub port: u16,
    requests: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingProxy {
    pub async fn start(upstream: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = relay_counting(conn, upstream, seen).await;
                });
            }
        });
        CountingProxy {
            port,
            requests,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forgets the requests seen so far.
    pub fn reset(&self) {
        self.requests.lock().unwrap().clear();
    }

    /// Requests with this method that name an object (a key below the bucket), not a bucket
    /// or a listing.
    pub fn object_requests(&self, method: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, target)| {
                let path = target.split('?').next().unwrap_or("");
                let mut parts = path.trim_start_matches('/').splitn(2, '/');
                let _bucket = parts.next();
                m == method && parts.next().is_some_and(|key| !key.is_empty())
            })
            .count()
    }

    /// Every request line seen, for failure messages.
    pub fn lines(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|(m, t)| format!("{m} {t}"))
            .collect()
    }
}

async fn relay_counting(
    client: TcpStream,
    upstream: u16,
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(("127.0.0.1", upstream)).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let back = tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    'requests: loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = cr.read(&mut chunk).await?;
            if n == 0 {
                break 'requests;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut words = head.split(' ');
        let method = words.next().unwrap_or("").to_owned();
        let target = words.next().unwrap_or("").to_owned();
        let mut length = 0usize;
        for line in head.lines() {
            let lower = line.to_ascii_lowercase();
            assert!(
                !lower.starts_with("transfer-encoding:"),
                "the counting proxy cannot follow chunked requests: {head}"
            );
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
        }
        seen.lock().unwrap().push((method, target));
        let total = head_end + length;
        while buf.len() < total {
            let n = cr.read(&mut chunk).await?;
            if n == 0 {
                break 'requests;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        sw.write_all(&buf[..total]).await?;
        buf.drain(..total);
    }
    drop(sw);
    let _ = back.await;
    Ok(())
}
