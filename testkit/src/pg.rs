//! A real PostgreSQL cluster per test.
//!
//! The cluster is copied from a template made once per machine with `initdb` (a copy takes
//! milliseconds, `initdb` a second or two), then `postgres` runs as a child on a free TCP port
//! and a Unix socket in its scratch folder, with `fsync=off`. PostgreSQL refuses to run as
//! root, so under root it runs as `nobody`. Local socket connections are trusted; TCP logins
//! need a SCRAM password, so tests can check authentication for real. The superuser is
//! `postgres` with the password [`PgCluster::superuser_password`]. A cluster built with
//! [`PgClusterBuilder::tls`] also serves TLS, with a certificate for `localhost` from a CA of
//! its own; [`PgClusterBuilder::hba`] replaces `pg_hba.conf`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use labcore::pg::{PgClient, PgError, PgHost, PgSettings, SslMode};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, chown};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::proc::{Proc, ProcBuilder};
use crate::scratch::{self, Scratch};
use crate::{Error, ports};

const SUPERUSER: &str = "postgres";
const SUPERUSER_PASSWORD: &str = "testkit-postgres";
const READY_LINE: &str = "database system is ready to accept connections";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings for a cluster to start.
#[derive(Debug, Default)]
pub struct PgClusterBuilder {
    settings: Vec<(String, String)>,
    tls: bool,
    hba: Option<String>,
}

impl PgClusterBuilder {
    /// Adds a server setting (`-c name=value`), such as `log_statement = all`.
    pub fn setting(mut self, name: &str, value: &str) -> PgClusterBuilder {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Serves TLS (`ssl=on`) with a certificate for `localhost`; the CA's certificate is
    /// [`PgCluster::ca_file`].
    pub fn tls(mut self) -> PgClusterBuilder {
        self.tls = true;
        self
    }

    /// Replaces `pg_hba.conf` with `lines`, such as `host all all 127.0.0.1/32 password`.
    pub fn hba(mut self, lines: &str) -> PgClusterBuilder {
        self.hba = Some(lines.to_owned());
        self
    }

    /// Starts the cluster.
    pub fn start(mut self) -> Result<PgCluster, Error> {
        let bin = bin_dir()?;
        let owner = server_user()?;
        let template = template(&bin, owner)?;
        let scratch = Scratch::new("pg")?;
        let data = scratch.join("data");
        let socket_dir = scratch.join("sock");
        crate::proc::run(
            "cp",
            &["-a".as_ref(), template.as_os_str(), data.as_os_str()],
            &[],
        )?;
        fs::create_dir(&socket_dir)?;
        chown(&socket_dir, Some(owner.0), Some(owner.1)).map_err(std::io::Error::from)?;
        if let Some(lines) = &self.hba {
            fs::write(data.join("pg_hba.conf"), lines)?;
        }
        let ca_file = if self.tls {
            let ca_file = scratch.join("ca.crt");
            write_tls_files(&data, &ca_file, owner)?;
            self.settings.push(("ssl".into(), "on".into()));
            Some(ca_file)
        } else {
            None
        };
        let mut cluster = PgCluster {
            proc: None,
            port: 0,
            bin,
            owner,
            settings: self.settings,
            data,
            socket_dir,
            ca_file,
            scratch,
        };
        ports::retry_on_port_clash(|_| {
            cluster.port = ports::free_port()?;
            cluster.launch()
        })?;
        Ok(cluster)
    }
}

/// A running PostgreSQL cluster, stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    proc: Option<Proc>,
    port: u16,
    bin: PathBuf,
    owner: (Uid, Gid),
    settings: Vec<(String, String)>,
    data: PathBuf,
    socket_dir: PathBuf,
    ca_file: Option<PathBuf>,
    scratch: Scratch,
}

/// Writes a CA (its certificate to `ca_file`) and the server's certificate and key for
/// `localhost` where PostgreSQL looks for them by default (`server.crt`, `server.key` in the
/// data folder), owned by the server's user: it refuses a key others can read.
fn write_tls_files(data: &Path, ca_file: &Path, owner: (Uid, Gid)) -> Result<(), Error> {
    let setup = |e: rcgen::Error| Error::Setup(format!("making PostgreSQL's certificate: {e}"));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(setup)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "testkit PostgreSQL CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(setup)?)
        .map_err(setup)?;
    let key = KeyPair::generate().map_err(setup)?;
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .map_err(setup)?
        .signed_by(&key, &ca)
        .map_err(setup)?;
    fs::write(ca_file, ca.pem())?;
    let cert_file = data.join("server.crt");
    let key_file = data.join("server.key");
    fs::write(&cert_file, cert.pem())?;
    let mut options = fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(options.write(true).create_new(true), 0o600);
    std::io::Write::write_all(
        &mut options.open(&key_file)?,
        key.serialize_pem().as_bytes(),
    )?;
    for file in [&cert_file, &key_file] {
        chown(file, Some(owner.0), Some(owner.1)).map_err(std::io::Error::from)?;
    }
    Ok(())
}

impl PgCluster {
    /// Starts a cluster with default settings.
    pub fn start() -> Result<PgCluster, Error> {
        PgCluster::builder().start()
    }

    /// A cluster with chosen settings.
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    fn launch(&mut self) -> Result<(), Error> {
        let mut builder = ProcBuilder::new(self.bin.join("postgres"))
            .args(["-D".as_ref(), self.data.as_os_str()])
            .args(["-k".as_ref(), self.socket_dir.as_os_str()])
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "shared_buffers=32MB"])
            .args([
                "-c",
                "unix_socket_permissions=0777",
                "-c",
                "max_connections=100",
            ])
            .args(["-c", "log_line_prefix=%m [%p] %q%u@%d "])
            .env("LC_ALL", "C")
            .user(self.owner.0.as_raw(), self.owner.1.as_raw())
            // SIGQUIT is PostgreSQL's immediate shutdown: it takes its children down too.
            .death_signal(Signal::SIGQUIT);
        for (name, value) in &self.settings {
            builder = builder.args(["-c", &format!("{name}={value}")]);
        }
        let proc = builder.spawn()?;
        proc.wait_stderr(READY_LINE, START_TIMEOUT)?;
        self.proc = Some(proc);
        Ok(())
    }

    /// The CA certificate (PEM) the server's certificate chains to, if it serves TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The TCP port (the server listens on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCP host.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The folder holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The folder of this server version's programs (`pg_dump`, `psql`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The path of one of this server version's programs.
    pub fn bin(&self, program: &str) -> PathBuf {
        self.bin.join(program)
    }

    /// A scratch folder that lives as long as the cluster.
    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// The superuser's name.
    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    /// The superuser's password (needed over TCP).
    pub fn superuser_password(&self) -> &'static str {
        SUPERUSER_PASSWORD
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Superuser settings over TCP with the password, TLS off, database `postgres`.
    pub fn settings(&self) -> PgSettings {
        PgSettings::new(PgHost::Tcp(self.host().to_owned()), self.port, SUPERUSER)
            .with_user(SUPERUSER, Some(SUPERUSER_PASSWORD.into()))
            .with_dbname("postgres")
            .with_sslmode(SslMode::Disable)
    }

    /// Superuser settings over the Unix socket (trusted, no password).
    pub fn socket_settings(&self) -> PgSettings {
        PgSettings::new(PgHost::Unix(self.socket_dir.clone()), self.port, SUPERUSER)
            .with_dbname("postgres")
            .with_sslmode(SslMode::Disable)
    }

    /// libpq variables that make a tool connect as superuser over the Unix socket.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("PGHOST".into(), self.socket_dir.clone().into()),
            ("PGPORT".into(), self.port.to_string().into()),
            ("PGUSER".into(), SUPERUSER.into()),
            ("PGDATABASE".into(), "postgres".into()),
        ]
    }

    /// A superuser connection URI over TCP to database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@{}:{}/{db}?sslmode=disable",
            self.host(),
            self.port
        )
    }

    /// Connects as superuser to database `db` over the Unix socket.
    pub async fn connect(&self, db: &str) -> Result<PgClient, PgError> {
        self.socket_settings().with_dbname(db).connect().await
    }

    /// Runs SQL with `psql` as superuser in database `db`; returns unaligned tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, Error> {
        let port = self.port.to_string();
        crate::proc::run(
            self.bin("psql"),
            &[
                "-X".as_ref(),
                "-q".as_ref(),
                "-A".as_ref(),
                "-t".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-h".as_ref(),
                self.socket_dir.as_os_str(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-d".as_ref(),
                db.as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
            &[],
        )
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// Stops the server (fast shutdown), as when an admin stops it.
    pub fn stop(&mut self) -> Result<(), Error> {
        if let Some(proc) = self.proc.take() {
            proc.signal(Signal::SIGINT)?;
            proc.wait_exit(START_TIMEOUT)?;
        }
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop()?;
        self.launch()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(proc) = self.proc.take() {
            let _ = proc.signal(Signal::SIGQUIT);
            let _ = proc.wait_exit(Duration::from_secs(10));
        }
    }
}

/// The newest installed server's `bin` folder.
pub fn bin_dir() -> Result<PathBuf, Error> {
    let mut majors: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            Error::Missing("PostgreSQL server not installed: apt-get install postgresql".into())
        })?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| Error::Missing("no /usr/lib/postgresql/*/bin/postgres".into()))
}

/// The user the server runs as: `nobody` under root, else ourselves.
fn server_user() -> Result<(Uid, Gid), Error> {
    if !Uid::effective().is_root() {
        return Ok((Uid::effective(), Gid::effective()));
    }
    crate::proc::nobody()
}

/// The initdb'd template for this server version and owner, made once under a file lock.
fn template(bin: &Path, owner: (Uid, Gid)) -> Result<PathBuf, Error> {
    let root = scratch::root();
    fs::create_dir_all(&root)?;
    let version = bin
        .parent()
        .and_then(Path::file_name)
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = format!("pg-template-{version}-{}", owner.0);
    let template = root.join(&name);
    let lock = File::create(root.join(format!("{name}.lock")))?;
    let _lock =
        Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| std::io::Error::from(e))?;
    if template.join("testkit-ready").exists() {
        return Ok(template);
    }
    let _ = fs::remove_dir_all(&template);
    let work = Scratch::new("pg-initdb")?;
    let data = work.join("data");
    let pwfile = work.join("pwfile");
    fs::write(&pwfile, SUPERUSER_PASSWORD)?;
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o644))?;
    fs::create_dir(&data)?;
    chown(&data, Some(owner.0), Some(owner.1)).map_err(std::io::Error::from)?;
    let initdb = ProcBuilder::new(bin.join("initdb"))
        .args(["-D".as_ref(), data.as_os_str()])
        .args(["-U", SUPERUSER, "-E", "UTF8", "--no-locale", "--no-sync"])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .env("LC_ALL", "C")
        .user(owner.0.as_raw(), owner.1.as_raw())
        .spawn()?;
    initdb.expect_exit(0, Duration::from_secs(120))?;
    fs::write(data.join("testkit-ready"), "")?;
    fs::rename(&data, &template)?;
    Ok(template)
}
