//! A real S3 protocol server per test: `s3s-fs`, storing objects in a scratch folder.
//!
//! It binds `127.0.0.1:0` itself and prints the port it got, so there is no port race. Tests
//! talk to it only through the S3 API (they must pass against any S3 store), with fixed test
//! credentials, and get a fresh bucket each from [`S3Server::bucket`]. It can be stopped and
//! restarted on the same port to test a store that goes away mid-transfer.

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

const READY_LINE: &str = "server is running at http://";

static BUCKETS: AtomicUsize = AtomicUsize::new(0);

/// A running S3 server, stopped and deleted on drop.
#[derive(Debug)]
pub struct S3Server {
    proc: Option<Proc>,
    port: u16,
    binary: PathBuf,
    root: Scratch,
}

impl S3Server {
    /// Starts a server with an empty store.
    pub fn start() -> Result<S3Server, Error> {
        let binary = which("s3s-fs").ok_or_else(|| {
            Error::Missing(
                "s3s-fs not found: cargo install s3s-fs --version 0.14.1 --features binary".into(),
            )
        })?;
        let root = Scratch::new("s3")?;
        let mut server = S3Server {
            proc: None,
            port: 0,
            binary,
            root,
        };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), Error> {
        let proc = ProcBuilder::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .spawn()?;
        let line = proc.wait_output(READY_LINE, Duration::from_secs(30))?;
        let port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse::<u16>().ok())
            .ok_or_else(|| Error::Setup(format!("cannot read the port from s3s-fs: {line:?}")))?;
        self.port = port;
        self.proc = Some(proc);
        Ok(())
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
        self.proc.as_ref().map(Proc::stdout).unwrap_or_default()
    }

    /// Kills the server, as a crash or a pulled cable would; objects stay on disk.
    pub fn kill(&mut self) -> Result<(), Error> {
        if let Some(proc) = self.proc.take() {
            proc.kill()?;
        }
        Ok(())
    }

    /// Starts a killed server again on the same port, with the same objects.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill()?;
        self.launch()
    }
}
