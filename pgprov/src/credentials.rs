//! What a service needs to connect, in the format it reads, on stdout or in a 0600 file.
//!
//! Four formats: a `postgresql://` URI, an env file (`DATABASE_URL` and the libpq `PG*`
//! variables), one JSON object, and a `.pgpass` line. Every value is escaped for its format
//! (percent-encoding in the URI, shell quoting in the env file, `\` and `:` in pgpass), though
//! pgprov's names and hex passwords never need it; a host given with `--host` might.
//!
//! Credentials are [`Sink::prepare`]d before anything is made on the server and
//! [`Pending::publish`]ed after: a file is written beside its final name first, so a full
//! disk stops pgprov before it creates a role whose password would be lost; the caller
//! undoes its work when publishing fails.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use labcore::Secret;
use labcore::pg::{PgHost, PgSettings};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::Error;
use crate::name::Name;

/// Characters left alone in URI components: RFC 3986's unreserved set.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How credentials are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// postgresql://NAME:PASSWORD@HOST:PORT/NAME
    #[default]
    Uri,
    /// DATABASE_URL=... and PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE lines
    Env,
    /// One JSON object: name, user, password, host, port, database, uri
    Json,
    /// A .pgpass line: HOST:PORT:NAME:NAME:PASSWORD
    Pgpass,
}

impl Format {
    /// The file name extension for credentials files.
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Format::Uri => "uri",
            Format::Env => "env",
            Format::Json => "json",
            Format::Pgpass => "pgpass",
        }
    }
}

/// Where services reach the server: the host and port printed in credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Host name or address.
    pub(crate) host: String,
    /// TCP port.
    pub(crate) port: u16,
}

impl Endpoint {
    /// The given host and port, defaulting to the admin connection's TCP host and port, or
    /// `localhost` when the admin connects over a Unix socket (services connect over TCP).
    pub(crate) fn for_services(
        admin: &PgSettings,
        host: Option<String>,
        port: Option<u16>,
    ) -> Endpoint {
        let host = host.unwrap_or_else(|| match admin.hosts().first() {
            Some(PgHost::Tcp(name)) => name.clone(),
            _ => "localhost".to_owned(),
        });
        Endpoint {
            host,
            port: port.unwrap_or(admin.port()),
        }
    }

    /// The host as it goes in a URI: IPv6 addresses bracketed, anything else percent-encoded.
    fn uri_host(&self) -> String {
        if self.host.contains(':') && !self.host.contains('/') {
            format!("[{}]", self.host)
        } else {
            utf8_percent_encode(&self.host, COMPONENT).to_string()
        }
    }
}

/// The variables `--format env` writes, in order: what a compose file or unit may read.
pub const ENV_KEYS: [&str; 6] = [
    "DATABASE_URL",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
];

/// One service's login: its role and database are both `name`.
#[derive(Debug)]
pub(crate) struct Credentials<'a> {
    /// Where to connect.
    pub(crate) endpoint: &'a Endpoint,
    /// Role and database.
    pub(crate) name: &'a Name,
    /// The password.
    pub(crate) password: &'a Secret,
}

impl Credentials<'_> {
    /// The connection URI.
    pub(crate) fn uri(&self) -> Secret {
        let encode = |text: &str| utf8_percent_encode(text, COMPONENT).to_string();
        Secret::new(format!(
            "postgresql://{}:{}@{}:{}/{}",
            encode(self.name.as_str()),
            encode(self.password.expose()),
            self.endpoint.uri_host(),
            self.endpoint.port,
            encode(self.name.as_str()),
        ))
    }

    /// The credentials in `format`, ending in a newline.
    pub(crate) fn render(&self, format: Format) -> Secret {
        let name = self.name.as_str();
        let port = self.endpoint.port.to_string();
        let mut out = String::new();
        match format {
            Format::Uri => {
                out.push_str(self.uri().expose());
                out.push('\n');
            }
            Format::Env => {
                let uri = self.uri();
                let values: [&str; 6] = [
                    uri.expose(),
                    &self.endpoint.host,
                    &port,
                    name,
                    self.password.expose(),
                    name,
                ];
                for (key, value) in ENV_KEYS.iter().zip(values) {
                    let _ = writeln!(out, "{key}={}", shell_quote(value));
                }
            }
            Format::Json => {
                let object = serde_json::json!({
                    "name": name,
                    "user": name,
                    "password": self.password.expose(),
                    "host": self.endpoint.host,
                    "port": self.endpoint.port,
                    "database": name,
                    "uri": self.uri().expose(),
                });
                out.push_str(&object.to_string());
                out.push('\n');
            }
            Format::Pgpass => {
                let fields = [
                    self.endpoint.host.as_str(),
                    &port,
                    name,
                    name,
                    self.password.expose(),
                ];
                let escaped: Vec<String> = fields.iter().map(|f| pgpass_escape(f)).collect();
                out.push_str(&escaped.join(":"));
                out.push('\n');
            }
        }
        Secret::new(out)
    }
}

/// `value` as one shell word: bare when it holds only characters no shell treats specially
/// (so Docker's `--env-file`, which does not unquote, reads it the same), else in single
/// quotes.
pub(crate) fn shell_quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b));
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

/// A `.pgpass` field: `\` and `:` escaped with a backslash.
pub(crate) fn pgpass_escape(field: &str) -> String {
    field.replace('\\', "\\\\").replace(':', "\\:")
}

/// Where credentials go.
#[derive(Clone, Debug)]
pub(crate) enum Sink {
    /// Standard output, in one format.
    Stdout(Format),
    /// One file per service, `DIR/NAME.EXT`, mode 0600.
    Dir {
        /// The folder.
        dir: PathBuf,
        /// The format.
        format: Format,
    },
}

/// Credentials ready to be published once the role and database exist.
#[derive(Debug)]
pub(crate) struct Pending {
    text: Secret,
    file: Option<(PathBuf, PathBuf)>,
}

impl Sink {
    /// The file credentials for `name` would be written to, if they go to a file.
    pub(crate) fn path(&self, name: &Name) -> Option<PathBuf> {
        match self {
            Sink::Stdout(_) => None,
            Sink::Dir { dir, format } => Some(dir.join(format!("{name}.{}", format.extension()))),
        }
    }

    /// Fails (exit 73) if credentials for `name` would overwrite a file.
    pub(crate) fn check(&self, name: &Name) -> Result<(), Error> {
        match self.path(name) {
            Some(path) if path.exists() => Err(Error::Exists(format!(
                "credentials file {} already exists; move it away first",
                path.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Renders the credentials and, for a file, writes them beside its final name.
    pub(crate) fn prepare(&self, credentials: &Credentials<'_>) -> Result<Pending, Error> {
        match self {
            Sink::Stdout(format) => Ok(Pending {
                text: credentials.render(*format),
                file: None,
            }),
            Sink::Dir { dir, format } => {
                let text = credentials.render(*format);
                let path = dir.join(format!("{}.{}", credentials.name, format.extension()));
                let temp = dir.join(format!(
                    ".{}.{}.{}.tmp",
                    credentials.name,
                    format.extension(),
                    std::process::id()
                ));
                let output = |source| Error::Io {
                    what: format!("writing credentials to {}", temp.display()),
                    source,
                };
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(output)?;
                let pending = Pending {
                    text,
                    file: Some((temp.clone(), path)),
                };
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&temp)
                    .map_err(output)?;
                file.write_all(pending.text.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(output)?;
                Ok(pending)
            }
        }
    }
}

impl Pending {
    /// Writes the credentials to stdout, or moves the file to its final name (never over an
    /// existing file); returns the file's path.
    pub(crate) fn publish(mut self) -> Result<Option<PathBuf>, Error> {
        let Some((temp, path)) = self.file.take() else {
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(self.text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|source| Error::Io {
                    what: "writing credentials to stdout".to_owned(),
                    source,
                })?;
            return Ok(None);
        };
        let linked = fs::hard_link(&temp, &path);
        let _ = fs::remove_file(&temp);
        linked.map_err(|source| Error::Io {
            what: format!("writing credentials to {}", path.display()),
            source,
        })?;
        if let Some(dir) = path.parent() {
            // Make the new name durable; the file's contents already are.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(Some(path))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((temp, _)) = &self.file {
            let _ = fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<T>(host: &str, f: impl FnOnce(&Credentials<'_>) -> T) -> T {
        let endpoint = Endpoint {
            host: host.to_owned(),
            port: 5432,
        };
        let name = Name::parse("metabase").unwrap();
        let password = Secret::from("p4ss");
        f(&Credentials {
            endpoint: &endpoint,
            name: &name,
            password: &password,
        })
    }

    #[test]
    fn uri_holds_every_part() {
        let uri = with("db.lan", |c| c.uri());
        assert_eq!(
            uri.expose(),
            "postgresql://metabase:p4ss@db.lan:5432/metabase"
        );
        let v6 = with("::1", |c| c.uri());
        assert_eq!(
            v6.expose(),
            "postgresql://metabase:p4ss@[::1]:5432/metabase"
        );
        let socket = with("/run/postgresql", |c| c.uri());
        assert!(socket.expose().contains("@%2Frun%2Fpostgresql:5432/"));
    }

    #[test]
    fn env_quotes_only_what_a_shell_would_split() {
        let env = with("db.lan", |c| c.render(Format::Env));
        assert!(env.expose().contains("PGHOST=db.lan\n"), "{}", env.expose());
        assert!(
            env.expose()
                .starts_with("DATABASE_URL=postgresql://metabase:p4ss@db.lan:5432/metabase\n")
        );
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn pgpass_escapes_colons_and_backslashes() {
        let line = with("fe80::1", |c| c.render(Format::Pgpass));
        assert_eq!(line.expose(), "fe80\\:\\:1:5432:metabase:metabase:p4ss\n");
        assert_eq!(pgpass_escape("a\\b:c"), "a\\\\b\\:c");
    }

    #[test]
    fn json_is_one_object_on_one_line() {
        let json = with("db.lan", |c| c.render(Format::Json));
        let value: serde_json::Value = serde_json::from_str(json.expose()).unwrap();
        assert_eq!(value["password"], "p4ss");
        assert_eq!(value["port"], 5432);
        assert_eq!(json.expose().lines().count(), 1);
    }

    #[test]
    fn debug_output_hides_the_password() {
        let shown = with("db.lan", |c| format!("{c:?}"));
        assert!(!shown.contains("p4ss"), "{shown}");
    }
}
