//! A real S3 protocol server per test.
//!
//! Two implementations, so tests are not written against one store's quirks:
//! - `s3s-fs` ([`S3Server::start`]), storing objects in a scratch folder and checking SigV4
//!   signatures with fixed test credentials; it lacks `ListMultipartUploads`.
//! - moto's server ([`S3Server::start_moto`], Python, in memory), which has the whole
//!   multipart API, so tests can prove no upload was left open; it accepts any credentials.
//!
//! Both bind `127.0.0.1:0` themselves and print the port they got, so there is no port race.
//! Tests talk to them only through the S3 API and get a fresh bucket each from
//! [`S3Server::bucket`]. A server can be killed and restarted on the same port to test a store
//! that goes away mid-transfer (moto forgets its objects when restarted).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use labcore::s3::S3Settings;

use crate::Error;
use crate::proc::{Proc, ProcBuilder, which};
use crate::scratch::Scratch;

/// The access key ID the server accepts.
pub const ACCESS_KEY: &str = "testkit-access";
/// The secret access key the server accepts.
pub const SECRET_KEY: &str = "testkit-secret-key";
/// The region tests use.
pub const REGION: &str = "us-east-1";

/// Which S3 implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `s3s-fs` (Rust, objects on disk, signatures checked).
    S3sFs,
    /// moto's server (Python, objects in memory, full multipart API).
    Moto,
}

static BUCKETS: AtomicUsize = AtomicUsize::new(0);

/// A running S3 server, stopped and deleted on drop.
#[derive(Debug)]
pub struct S3Server {
    backend: Backend,
    proc: Option<Proc>,
    port: u16,
    binary: PathBuf,
    root: Scratch,
    /// While killed: a socket bound to the server's port, not listening (see [`hold_port`]).
    held: Option<std::os::fd::OwnedFd>,
}

impl S3Server {
    /// Starts an `s3s-fs` server with an empty store.
    pub fn start() -> Result<S3Server, Error> {
        S3Server::start_backend(Backend::S3sFs)
    }

    /// Starts a moto server with an empty store.
    pub fn start_moto() -> Result<S3Server, Error> {
        S3Server::start_backend(Backend::Moto)
    }

    /// Starts a server of the given kind.
    pub fn start_backend(backend: Backend) -> Result<S3Server, Error> {
        let (name, install) = match backend {
            Backend::S3sFs => (
                "s3s-fs",
                "cargo install s3s-fs --version 0.14.1 --features binary",
            ),
            Backend::Moto => ("moto_server", "pip install 'moto[server]==5.1.4'"),
        };
        let binary =
            which(name).ok_or_else(|| Error::Missing(format!("{name} not found: {install}")))?;
        let root = Scratch::new("s3")?;
        let mut server = S3Server {
            backend,
            proc: None,
            port: 0,
            binary,
            root,
            held: None,
        };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), Error> {
        // The port was held while the server was down; free it for the server.
        self.held = None;
        let port = self.port.to_string();
        let (proc, ready) = match self.backend {
            Backend::S3sFs => (
                ProcBuilder::new(&self.binary)
                    .args(["--host", "127.0.0.1", "--port", &port])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(self.root.path())
                    .env("RUST_LOG", "info")
                    .env("NO_COLOR", "1")
                    .spawn()?,
                "server is running at http://",
            ),
            Backend::Moto => (
                ProcBuilder::new(&self.binary)
                    .args(["-H", "127.0.0.1", "-p", &port])
                    .env("HOME", self.root.path())
                    .env("PYTHONUNBUFFERED", "1")
                    .spawn()?,
                "Running on http://",
            ),
        };
        let line = proc.wait_output(ready, Duration::from_secs(60))?;
        let port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().trim_end_matches('/').parse::<u16>().ok())
            .ok_or_else(|| Error::Setup(format!("cannot read the port from {line:?}")))?;
        self.port = port;
        self.proc = Some(proc);
        Ok(())
    }

    /// Which implementation this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The endpoint URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// labcore settings reaching this server with the test credentials.
    pub fn settings(&self) -> S3Settings {
        S3Settings::new()
            .endpoint(self.endpoint())
            .region(REGION)
            .credentials(ACCESS_KEY, SECRET_KEY.into())
    }

    /// An S3 client for this server.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        self.settings()
            .client()
            .await
            .expect("settings built from constants are valid")
    }

    /// Creates a fresh, empty bucket and returns its name.
    pub async fn bucket(&self) -> Result<String, Error> {
        let n = BUCKETS.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "t{}-{n}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        );
        self.client()
            .await
            .create_bucket()
            .bucket(&name)
            .send()
            .await
            .map_err(|e| {
                Error::Setup(format!(
                    "creating bucket {name}: {}",
                    labcore::exit::chain(&e)
                ))
            })?;
        Ok(name)
    }

    /// `AWS_*` variables that point a tool at this server.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint().into()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), REGION.into()),
            // Keep the SDK from reading this machine's ~/.aws files.
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| format!("{}{}", p.stdout(), p.stderr()))
            .unwrap_or_default()
    }

    /// Multipart uploads still open in `bucket` as `(key, upload ID)` (moto only: s3s-fs does
    /// not implement `ListMultipartUploads`).
    pub async fn open_multipart_uploads(
        &self,
        bucket: &str,
    ) -> Result<Vec<(String, String)>, Error> {
        let listed = self
            .client()
            .await
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| {
                Error::Setup(format!(
                    "listing multipart uploads: {}",
                    labcore::exit::chain(&e)
                ))
            })?;
        Ok(listed
            .uploads()
            .iter()
            .map(|u| {
                (
                    u.key().unwrap_or_default().to_owned(),
                    u.upload_id().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    /// Kills the server, as a crash or a pulled cable would; objects stay on disk.
    pub fn kill(&mut self) -> Result<(), Error> {
        if let Some(proc) = self.proc.take() {
            proc.kill()?;
            self.held = hold_port(self.port);
        }
        Ok(())
    }

    /// Starts a killed server again on the same port, with the same objects.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill()?;
        self.launch()
    }
}

/// Keeps a killed server's port from other tests until the restart: a socket bound to it but
/// not listening, so clients still meet a refused connection, as with a dead server, while no
/// test binding port 0 (nor a client's ephemeral port) can take it. `SO_REUSEADDR` lets the bind
/// pass over the dead server's connections in TIME_WAIT. `None` (nothing held) if it fails.
fn hold_port(port: u16) -> Option<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).ok()?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).ok()?;
    Some(fd)
}
