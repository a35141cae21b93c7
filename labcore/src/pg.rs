//! PostgreSQL connection settings from the libpq environment, and connecting with them.
//!
//! [`PgSettings::from_env`] reads what `psql` reads, with libpq's precedence: values the tool
//! sets explicitly, then the service named by `PGSERVICE` (`~/.pg_service.conf`,
//! `$PGSYSCONFDIR/pg_service.conf`), then `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
//! `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGREQUIREAUTH`, `PGCONNECT_TIMEOUT`,
//! `PGAPPNAME`, then
//! defaults: the Unix socket in `/var/run/postgresql` (or `/tmp`), port 5432, the OS user.
//! A missing password is looked up in `~/.pgpass` (`PGPASSFILE`) as libpq does, so an admin
//! password never needs to be on a command line.
//!
//! TLS uses rustls with libpq's `sslmode` meanings: `disable`, `allow`/`prefer` (TLS if the
//! server offers it, unverified), `require` (TLS, unverified unless a root certificate file
//! exists, then as `verify-ca`), `verify-ca` (chain checked), `verify-full` (chain and host
//! name checked). The verifying modes need a root certificate: the `sslrootcert` file
//! (default `~/.postgresql/root.crt`), or the system's roots with `sslrootcert=system`, which
//! as in libpq implies `verify-full` and refuses weaker modes; a missing file is an error,
//! never a quiet fallback. Over Unix sockets `sslmode` is ignored, as libpq does.
//!
//! The server's authentication requests are checked against `require_auth` (libpq's
//! meaning) before the driver answers them; unset, it refuses to send the password in
//! cleartext (see [`auth`]).

mod auth;
mod pgpass;
mod quote;
mod service;
mod tls;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use self::auth::AuthGuard;
use self::tls::{MakeRustls, Roots};
use crate::env::Env;
use crate::exit::{Exit, ExitStatus};
use crate::secret::Secret;

pub use auth::{AuthMethod, RequireAuth};
pub use quote::quote_ident;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgHost {
    /// A TCP host name or address.
    Tcp(String),
    /// A folder holding the server's Unix socket.
    Unix(PathBuf),
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS only if the server insists (treated as `prefer`, which also works there).
    Allow,
    /// TLS when offered, unverified.
    #[default]
    Prefer,
    /// TLS always; verified only when a root certificate is available.
    Require,
    /// TLS always, the server's chain verified.
    VerifyCa,
    /// TLS always, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How to reach and log in to a PostgreSQL server.
#[derive(Clone, Debug)]
pub struct PgSettings {
    hosts: Vec<PgHost>,
    port: u16,
    user: String,
    password: Option<Secret>,
    passfile: Option<PathBuf>,
    dbname: Option<String>,
    sslmode: SslMode,
    sslrootcert: Option<PathBuf>,
    require_auth: RequireAuth,
    connect_timeout: Option<Duration>,
    application_name: Option<String>,
}

/// The `sslrootcert` value that names the system's roots.
const SYSTEM_ROOTS: &str = "system";

/// The libpq environment or a service file holds something unusable.
#[derive(Debug, thiserror::Error)]
pub enum PgSettingsError {
    /// A parameter has a value libpq would also refuse.
    #[error("invalid {param} {value:?} (from {origin})")]
    Invalid {
        /// The parameter, such as `port`.
        param: &'static str,
        /// The value given.
        value: String,
        /// Where it came from: a variable name or a service file.
        origin: String,
    },
    /// `PGSERVICE` names a service no service file defines.
    #[error("service {0:?} (PGSERVICE) is not defined in any pg_service.conf")]
    UnknownService(String),
    /// A service file could not be read.
    #[error("reading service file {}", path.display())]
    ServiceFile {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

impl ExitStatus for PgSettingsError {
    fn exit(&self) -> Exit {
        Exit::Config
    }
}

/// Connecting or talking to PostgreSQL failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Connecting failed.
    #[error("connecting to PostgreSQL at {target}")]
    Connect {
        /// The server, as `host:port` or a socket folder.
        target: String,
        /// What the driver said.
        source: tokio_postgres::Error,
    },
    /// The server could not be reached.
    #[error("connecting to PostgreSQL at {target}")]
    Socket {
        /// The server, as `host:port` or a socket path.
        target: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The TLS settings could not be used.
    #[error("setting up TLS for PostgreSQL")]
    Tls(#[source] io::Error),
    /// A verifying `sslmode` has no root certificate to verify with.
    #[error(
        "sslmode {mode} needs a root certificate: {} (set sslrootcert to the CA's file, or \
         sslrootcert=system for the system's roots)",
        missing_roots(path.as_deref())
    )]
    NoRootCert {
        /// The mode that needs it.
        mode: &'static str,
        /// The file looked for.
        path: Option<PathBuf>,
    },
}

impl ExitStatus for PgError {
    fn exit(&self) -> Exit {
        match self {
            PgError::Connect { source, .. } => exit_for(source),
            PgError::Socket { source, .. } => match Exit::from_io(source) {
                Exit::NoInput => Exit::Unavailable, // no socket file: the server is not running
                other => other,
            },
            PgError::Tls(err) => Exit::from_io(err),
            PgError::NoRootCert { .. } => Exit::Config,
        }
    }
}

fn missing_roots(path: Option<&Path>) -> String {
    match path {
        Some(path) => format!("{} does not exist", path.display()),
        None => "none is set, and without HOME there is no ~/.postgresql/root.crt".to_owned(),
    }
}

/// The exit status a PostgreSQL error deserves: refused logins and missing privileges 77, a
/// missing database 66, an unreachable or starting server 69, overload 75.
pub fn exit_for(err: &tokio_postgres::Error) -> Exit {
    use tokio_postgres::error::SqlState;
    if let Some(code) = err.code() {
        return match code {
            c if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *c == SqlState::INSUFFICIENT_PRIVILEGE =>
            {
                Exit::NoPerm
            }
            c if *c == SqlState::INVALID_CATALOG_NAME => Exit::NoInput,
            c if *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE =>
            {
                Exit::TempFail
            }
            c if *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CRASH_SHUTDOWN => {
                Exit::Unavailable
            }
            _ => Exit::Software,
        };
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return match Exit::from_io(io) {
                Exit::NoInput => Exit::Unavailable, // no socket file: the server is not running
                other => other,
            };
        }
        source = cause.source();
    }
    Exit::Unavailable
}

/// A connected client; its connection task ends when this is dropped.
pub struct PgClient {
    client: tokio_postgres::Client,
    connection: JoinHandle<()>,
}

impl std::ops::Deref for PgClient {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl fmt::Debug for PgClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgClient").finish_non_exhaustive()
    }
}

impl PgSettings {
    /// Reads the libpq environment (and the files it names) from `env`.
    pub fn from_env(env: &Env) -> Result<PgSettings, PgSettingsError> {
        let service = match env.get("PGSERVICE") {
            Some(name) => service::find(env, name)?,
            None => service::Params::default(),
        };
        // libpq: a service file's value beats the environment variable's.
        let param = |key: &str, var: &'static str| -> Option<(String, String)> {
            service
                .get(key)
                .map(|v| (v.to_owned(), service.origin().to_owned()))
                .or_else(|| env.get(var).map(|v| (v.to_owned(), var.to_owned())))
        };

        let hosts = match param("host", "PGHOST") {
            Some((text, origin)) => parse_hosts(&text, &origin)?,
            None => vec![PgHost::Unix(default_socket_dir())],
        };
        let port =
            match param("port", "PGPORT") {
                // A list of ports (one per host) keeps its first: labkit talks to one server.
                Some((text, origin)) => {
                    let first = text.split(',').next().unwrap_or("").trim();
                    first.parse::<u16>().ok().filter(|p| *p != 0).ok_or(
                        PgSettingsError::Invalid {
                            param: "port",
                            value: text.clone(),
                            origin,
                        },
                    )?
                }
                None => 5432,
            };
        let user = match param("user", "PGUSER") {
            Some((user, _)) => user,
            None => os_user_name(env),
        };
        let sslrootcert = param("sslrootcert", "PGSSLROOTCERT").map(|(p, _)| PathBuf::from(p));
        let system_roots = sslrootcert.as_deref() == Some(Path::new(SYSTEM_ROOTS));
        let sslmode = match param("sslmode", "PGSSLMODE") {
            Some((text, origin)) => {
                let mode = SslMode::parse(&text).ok_or(PgSettingsError::Invalid {
                    param: "sslmode",
                    value: text.clone(),
                    origin: origin.clone(),
                })?;
                if system_roots && mode != SslMode::VerifyFull {
                    // libpq: public roots vouch for any name, so only verify-full is safe.
                    return Err(PgSettingsError::Invalid {
                        param: "sslmode",
                        value: text,
                        origin: format!("{origin}; sslrootcert=system needs verify-full"),
                    });
                }
                mode
            }
            None if system_roots => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        let require_auth = match param("require_auth", "PGREQUIREAUTH") {
            Some((text, _)) if text.trim().is_empty() => RequireAuth::default(),
            Some((text, origin)) => {
                RequireAuth::parse(&text).map_err(|reason| PgSettingsError::Invalid {
                    param: "require_auth",
                    value: text.clone(),
                    origin: format!("{origin}: {reason}"),
                })?
            }
            None => RequireAuth::default(),
        };
        let connect_timeout = match param("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some((text, origin)) => match text.trim().parse::<i64>() {
                Ok(secs) if secs > 0 => Some(Duration::from_secs(secs.max(2) as u64)),
                Ok(_) => None,
                Err(_) => {
                    return Err(PgSettingsError::Invalid {
                        param: "connect_timeout",
                        value: text,
                        origin,
                    });
                }
            },
            None => None,
        };
        Ok(PgSettings {
            hosts,
            port,
            user,
            password: param("password", "PGPASSWORD").map(|(p, _)| Secret::new(p)),
            passfile: param("passfile", "PGPASSFILE")
                .map(|(p, _)| PathBuf::from(p))
                .or_else(|| env.home().map(|h| h.join(".pgpass"))),
            dbname: param("dbname", "PGDATABASE").map(|(d, _)| d),
            sslmode,
            sslrootcert: sslrootcert.or_else(|| env.home().map(|h| h.join(".postgresql/root.crt"))),
            require_auth,
            connect_timeout,
            application_name: param("application_name", "PGAPPNAME").map(|(a, _)| a),
        })
    }

    /// Settings for a server on one host and port, as the given user.
    pub fn new(host: PgHost, port: u16, user: impl Into<String>) -> PgSettings {
        PgSettings {
            hosts: vec![host],
            port,
            user: user.into(),
            password: None,
            passfile: None,
            dbname: None,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            require_auth: RequireAuth::default(),
            connect_timeout: None,
            application_name: None,
        }
    }

    /// The same server as another user.
    pub fn with_user(mut self, user: impl Into<String>, password: Option<Secret>) -> PgSettings {
        self.user = user.into();
        self.password = password;
        self
    }

    /// The same server and user, another database.
    pub fn with_dbname(mut self, dbname: impl Into<String>) -> PgSettings {
        self.dbname = Some(dbname.into());
        self
    }

    /// Sets the TLS mode.
    pub fn with_sslmode(mut self, sslmode: SslMode) -> PgSettings {
        self.sslmode = sslmode;
        self
    }

    /// Sets the file of root certificates the verifying modes trust (`system`: the system's).
    pub fn with_sslrootcert(mut self, path: impl Into<PathBuf>) -> PgSettings {
        self.sslrootcert = Some(path.into());
        self
    }

    /// Sets the authentication methods the server may ask for.
    pub fn with_require_auth(mut self, require_auth: RequireAuth) -> PgSettings {
        self.require_auth = require_auth;
        self
    }

    /// Sets the application name the server shows in `pg_stat_activity`.
    pub fn with_application_name(mut self, name: impl Into<String>) -> PgSettings {
        self.application_name = Some(name.into());
        self
    }

    /// The hosts, in the order they are tried.
    pub fn hosts(&self) -> &[PgHost] {
        &self.hosts
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The login role.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The database, defaulting to the user name as libpq does.
    pub fn dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.user)
    }

    /// The TLS mode.
    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }

    /// The password: given explicitly, else from the password file.
    pub fn password(&self) -> Option<Secret> {
        if let Some(password) = &self.password {
            return Some(password.clone());
        }
        let passfile = self.passfile.as_deref()?;
        let host = match self.hosts.first()? {
            PgHost::Tcp(name) => name.clone(),
            PgHost::Unix(dir) if dir == &default_socket_dir() => "localhost".to_owned(),
            PgHost::Unix(dir) => dir.display().to_string(),
        };
        match pgpass::lookup(passfile, &host, self.port, self.dbname(), &self.user) {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(path = %passfile.display(), error = %err, "cannot read password file");
                None
            }
        }
    }

    /// `host:port` of the first host, or its socket folder, for messages.
    pub fn target(&self) -> String {
        match self.hosts.first() {
            Some(PgHost::Tcp(host)) if host.contains(':') => format!("[{host}]:{}", self.port),
            Some(PgHost::Tcp(host)) => format!("{host}:{}", self.port),
            Some(PgHost::Unix(dir)) => format!("{}/.s.PGSQL.{}", dir.display(), self.port),
            None => "(no host)".to_owned(),
        }
    }

    /// The driver's configuration.
    pub fn to_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        for host in &self.hosts {
            match host {
                PgHost::Tcp(name) => config.host(name),
                PgHost::Unix(dir) => config.host_path(dir),
            };
        }
        config
            .port(self.port)
            .user(&self.user)
            .dbname(self.dbname());
        if let Some(password) = self.password() {
            config.password(password.expose());
        }
        if let Some(timeout) = self.connect_timeout {
            config.connect_timeout(timeout);
        }
        if let Some(name) = &self.application_name {
            config.application_name(name);
        }
        config.ssl_mode(match self.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        config
    }

    /// Connects to the first host that answers, with TLS as `sslmode` asks and only the
    /// authentication `require_auth` allows.
    ///
    /// The sockets are opened here rather than by the driver so that every byte the server
    /// sends before authentication passes through an [`AuthGuard`].
    pub async fn connect(&self) -> Result<PgClient, PgError> {
        let config = self.to_config();
        let mut last = None;
        for host in &self.hosts {
            let attempt = match host {
                PgHost::Unix(dir) => self.connect_unix(&config, dir).await,
                PgHost::Tcp(name) => self.connect_tcp(&config, name).await,
            };
            match attempt {
                Ok(client) => return Ok(client),
                Err(err @ (PgError::NoRootCert { .. } | PgError::Tls(_))) => return Err(err),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| PgError::Socket {
            target: self.target(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no host to connect to"),
        }))
    }

    async fn connect_unix(
        &self,
        config: &tokio_postgres::Config,
        dir: &Path,
    ) -> Result<PgClient, PgError> {
        let path = dir.join(format!(".s.PGSQL.{}", self.port));
        let socket = self
            .with_timeout(tokio::net::UnixStream::connect(&path))
            .await
            .map_err(|source| PgError::Socket {
                target: path.display().to_string(),
                source,
            })?;
        // PostgreSQL has no TLS on Unix sockets; libpq ignores sslmode there.
        let mut config = config.clone();
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let guard = AuthGuard::on_socket(socket, self.require_auth);
        let (client, connection) = config
            .connect_raw(guard, tokio_postgres::NoTls)
            .await
            .map_err(|source| PgError::Connect {
                target: path.display().to_string(),
                source,
            })?;
        Ok(PgClient::new(client, connection))
    }

    async fn connect_tcp(
        &self,
        config: &tokio_postgres::Config,
        name: &str,
    ) -> Result<PgClient, PgError> {
        let target = if name.contains(':') {
            format!("[{name}]:{}", self.port)
        } else {
            format!("{name}:{}", self.port)
        };
        let socket_error = |source| PgError::Socket {
            target: target.clone(),
            source,
        };
        // Checked before dialling: a verifying mode without roots is a config error.
        let tls = match self.sslmode {
            SslMode::Disable => None,
            mode => Some(
                MakeRustls::new(mode, self.roots()?.as_ref(), self.require_auth)
                    .map_err(PgError::Tls)?,
            ),
        };
        let addrs: Vec<_> = self
            .with_timeout(tokio::net::lookup_host((name, self.port)))
            .await
            .map_err(socket_error)?
            .collect();
        let mut socket = None;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
        for addr in addrs {
            match self
                .with_timeout(tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(stream) => {
                    socket = Some(stream);
                    break;
                }
                Err(err) => last = err,
            }
        }
        let socket = socket.ok_or_else(|| socket_error(last))?;
        socket.set_nodelay(true).map_err(socket_error)?;
        let guard = AuthGuard::on_socket(socket, self.require_auth);
        let connect_error = |source| PgError::Connect {
            target: target.clone(),
            source,
        };
        match tls {
            None => {
                let (client, connection) = config
                    .connect_raw(guard, tokio_postgres::NoTls)
                    .await
                    .map_err(connect_error)?;
                Ok(PgClient::new(client, connection))
            }
            Some(tls) => {
                let connector = tls.connector(name).map_err(PgError::Tls)?;
                let (client, connection) = config
                    .connect_raw(guard, connector)
                    .await
                    .map_err(connect_error)?;
                Ok(PgClient::new(client, connection))
            }
        }
    }

    /// The roots the chain is checked against, or `None` when `sslmode` checks nothing.
    fn roots(&self) -> Result<Option<Roots>, PgError> {
        let file = self.sslrootcert.as_deref();
        let existing = match file {
            Some(path) if path == Path::new(SYSTEM_ROOTS) => Some(Roots::System),
            Some(path) if path.exists() => Some(Roots::File(path.to_owned())),
            _ => None,
        };
        match self.sslmode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => Ok(None),
            // libpq: a root certificate file makes `require` verify the chain.
            SslMode::Require => Ok(existing),
            SslMode::VerifyCa | SslMode::VerifyFull => match existing {
                Some(roots) => Ok(Some(roots)),
                None => Err(PgError::NoRootCert {
                    mode: self.sslmode.as_str(),
                    path: file.map(Path::to_owned),
                }),
            },
        }
    }

    async fn with_timeout<T>(&self, work: impl Future<Output = io::Result<T>>) -> io::Result<T> {
        match self.connect_timeout {
            None => work.await,
            Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                ))
            }),
        }
    }
}

impl PgClient {
    fn new<S, T>(
        client: tokio_postgres::Client,
        connection: tokio_postgres::Connection<S, T>,
    ) -> PgClient
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        PgClient {
            client,
            connection: tokio::spawn(drive(connection)),
        }
    }
}

async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(err) = connection.await {
        tracing::debug!(error = %err, "PostgreSQL connection ended");
    }
}

fn parse_hosts(text: &str, origin: &str) -> Result<Vec<PgHost>, PgSettingsError> {
    let mut hosts = Vec::new();
    for host in text.split(',').map(str::trim) {
        if host.is_empty() {
            hosts.push(PgHost::Unix(default_socket_dir()));
        } else if host.starts_with('/') {
            hosts.push(PgHost::Unix(PathBuf::from(host)));
        } else if host.starts_with('@') {
            return Err(PgSettingsError::Invalid {
                param: "host",
                value: host.to_owned(),
                origin: format!("{origin}: abstract Unix sockets are not supported"),
            });
        } else {
            hosts.push(PgHost::Tcp(host.to_owned()));
        }
    }
    Ok(hosts)
}

/// libpq's compiled-in socket folder on Debian, else the upstream default.
fn default_socket_dir() -> PathBuf {
    let debian = Path::new("/var/run/postgresql");
    if debian.is_dir() {
        debian.to_owned()
    } else {
        PathBuf::from("/tmp")
    }
}

fn os_user_name(env: &Env) -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| env.get("USER").map(str::to_owned))
        .unwrap_or_else(|| "postgres".to_owned())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn environment_variables_fill_every_parameter() {
        let env = Env::from_pairs([
            ("PGHOST", "db.lan"),
            ("PGPORT", "6543"),
            ("PGUSER", "admin"),
            ("PGPASSWORD", "pw"),
            ("PGDATABASE", "postgres"),
            ("PGSSLMODE", "verify-full"),
            ("PGAPPNAME", "pgprov"),
        ]);
        let s = PgSettings::from_env(&env).unwrap();
        assert_eq!(s.hosts(), &[PgHost::Tcp("db.lan".into())]);
        assert_eq!(s.port(), 6543);
        assert_eq!(s.user(), "admin");
        assert_eq!(s.password().unwrap().expose(), "pw");
        assert_eq!(s.dbname(), "postgres");
        assert_eq!(s.sslmode(), SslMode::VerifyFull);
        assert_eq!(s.target(), "db.lan:6543");
        assert!(!format!("{s:?}").contains("pw\""));
    }

    #[test]
    fn defaults_are_the_local_socket_and_the_os_user() {
        let s = PgSettings::from_env(&Env::default()).unwrap();
        assert!(matches!(s.hosts(), [PgHost::Unix(_)]));
        assert_eq!(s.port(), 5432);
        assert_eq!(s.dbname(), s.user());
        assert_eq!(s.sslmode(), SslMode::Prefer);
    }

    #[test]
    fn socket_folders_and_lists_parse_like_libpq() {
        let env = Env::from_pairs([("PGHOST", "/run/pg,db2"), ("PGPORT", "5433,5434")]);
        let s = PgSettings::from_env(&env).unwrap();
        assert_eq!(
            s.hosts(),
            &[PgHost::Unix("/run/pg".into()), PgHost::Tcp("db2".into())]
        );
        assert_eq!(s.port(), 5433);
        assert_eq!(s.target(), "/run/pg/.s.PGSQL.5433");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let err = PgSettings::from_env(&Env::from_pairs([("PGPORT", "x")])).unwrap_err();
        assert!(err.to_string().contains("PGPORT"), "{err}");
        let err = PgSettings::from_env(&Env::from_pairs([("PGSSLMODE", "on")])).unwrap_err();
        assert!(err.to_string().contains("sslmode"), "{err}");
        assert_eq!(err.exit(), Exit::Config);
    }

    #[test]
    fn system_roots_imply_verify_full_and_refuse_weaker_modes_as_libpq_does() {
        let s = PgSettings::from_env(&Env::from_pairs([("PGSSLROOTCERT", "system")])).unwrap();
        assert_eq!(s.sslmode(), SslMode::VerifyFull);
        let err = PgSettings::from_env(&Env::from_pairs([
            ("PGSSLROOTCERT", "system"),
            ("PGSSLMODE", "verify-ca"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("needs verify-full"), "{err}");
    }

    #[test]
    fn require_auth_comes_from_pgrequireauth_and_bad_lists_name_it() {
        let s = PgSettings::from_env(&Env::from_pairs([("PGREQUIREAUTH", "password")])).unwrap();
        assert!(s.require_auth.allows(AuthMethod::Password));
        let s = PgSettings::from_env(&Env::default()).unwrap();
        assert!(!s.require_auth.allows(AuthMethod::Password));
        let err =
            PgSettings::from_env(&Env::from_pairs([("PGREQUIREAUTH", "md5,!none")])).unwrap_err();
        assert!(err.to_string().contains("require_auth"), "{err}");
        assert!(err.to_string().contains("PGREQUIREAUTH"), "{err}");
    }

    #[test]
    fn service_file_beats_environment_and_pgpass_supplies_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let services = dir.path().join("pg_service.conf");
        fs::write(
            &services,
            "# lab\n[lab]\nhost=10.0.0.5\nport=5444\nuser=admin\n\n[other]\nhost=x\n",
        )
        .unwrap();
        let pgpass = dir.path().join("pgpass");
        fs::write(&pgpass, "10.0.0.5:5444:*:admin:from\\:pgpass\n").unwrap();
        fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600)).unwrap();
        let env = Env::from_pairs([
            ("PGSERVICE", "lab"),
            ("PGSERVICEFILE", services.to_str().unwrap()),
            ("PGHOST", "ignored"),
            ("PGDATABASE", "metabase"),
            ("PGPASSFILE", pgpass.to_str().unwrap()),
        ]);
        let s = PgSettings::from_env(&env).unwrap();
        assert_eq!(s.hosts(), &[PgHost::Tcp("10.0.0.5".into())]);
        assert_eq!(s.port(), 5444);
        assert_eq!(s.dbname(), "metabase");
        assert_eq!(s.password().unwrap().expose(), "from:pgpass");

        let missing = Env::from_pairs([
            ("PGSERVICE", "nope"),
            ("PGSERVICEFILE", services.to_str().unwrap()),
            ("PGSYSCONFDIR", dir.path().join("none").to_str().unwrap()),
        ]);
        let err = PgSettings::from_env(&missing).unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }
}
