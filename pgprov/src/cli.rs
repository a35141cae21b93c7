//! The command line: subcommands, their help (which becomes the man page), and dispatch.
//!
//! Names are checked here, before the admin connection is opened, so a bad name exits 65
//! without a single statement reaching the server.

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use labcore::Env;
use labcore::log::LogArgs;
use labcore::pg::PgSettings;
use labcore::signals::Signals;

use crate::Error;
use crate::admin::Admin;
use crate::apply;
use crate::credentials::{Endpoint, Format, Sink};
use crate::grant::{self, Access};
use crate::list;
use crate::name::Name;
use crate::provision::{self, CreateOptions, DropPlan, Outcome};

const AFTER_HELP: &str = "\
EXAMPLES:
    pgprov create metabase                       print a postgresql:// URI for the new service
    pgprov create gitea --format env --out-dir /etc/labkit/db
    pgprov list
    pgprov rotate metabase --format env          new password; the old one stops working
    pgprov grant metabase --on dw --read         let Metabase read the data warehouse
    pgprov check /etc/labkit/lab.toml            is the file valid? (no server needed)
    pgprov apply /etc/labkit/lab.toml --dry-run  what apply would change
    pgprov drop jupyterhub --force --yes

ADMIN CONNECTION:
    pgprov connects like psql, from the libpq environment: PGHOST (a host name, or a Unix
    socket folder), PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSERVICE with pg_service.conf
    (PGSERVICEFILE, PGSYSCONFDIR), PGPASSFILE or ~/.pgpass, PGSSLMODE (disable, allow,
    prefer, require, verify-ca, verify-full) and PGSSLROOTCERT, PGCONNECT_TIMEOUT. The default
    is the local Unix socket as the operating-system user, so `sudo -u postgres pgprov ...`
    works on a stock Debian server. A password is never taken on the command line. The admin
    role must be a superuser, or have CREATEROLE and CREATEDB. Every statement has a 120 s
    time limit.

EXIT STATUS:
    0   success (also: create --if-not-exists found it there, drop found nothing to drop)
    64  usage error, or drop not confirmed
    65  a bad name (refused before any statement is sent), a bad value in the apply file, or a
        database pgprov did not make
    66  a role, database or extension that does not exist
    69  PostgreSQL is down, unreachable or not answering
    73  the role, the database or a credentials file already exists
    74  the credentials could not be written (whatever was made is removed again)
    75  open sessions block drop (use --force), or the server is busy
    77  the admin role lacks a privilege (CREATEROLE, CREATEDB), or the login was refused
    78  a malformed apply file or libpq environment";

/// pgprov: a database, a login role and a password per service on one shared PostgreSQL.
///
/// `pgprov create NAME` makes login role NAME and database NAME owned by it, with a strong
/// random password that reaches the server only as a SCRAM-SHA-256 verifier, and prints what
/// the service needs to connect. `apply` does the same from a file listing every service.
/// Data goes to stdout, diagnostics to stderr.
#[derive(Debug, Parser)]
#[command(name = "pgprov", version, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Where the credentials go and what they say.
#[derive(Debug, Args)]
pub struct Output {
    /// Credentials format
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Write credentials to DIR/NAME.uri (.env, .json, .pgpass) with mode 0600 instead of
    /// stdout; an existing file is never overwritten
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Host services connect to, printed in the credentials [default: the admin connection's
    /// TCP host, or localhost when it uses a Unix socket]
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Port services connect to, printed in the credentials [default: the admin connection's]
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
}

impl Output {
    fn sink(&self) -> Sink {
        match &self.out_dir {
            Some(dir) => Sink::Dir {
                dir: dir.clone(),
                format: self.format,
            },
            None => Sink::Stdout(self.format),
        }
    }
}

/// `list` output formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// Aligned columns for people.
    #[default]
    Text,
    /// One JSON object per line: name, owner, size_bytes, connections, connection_limit.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a login role and a database it owns; print the credentials.
    ///
    /// Makes login role NAME with a new random password (32 bytes from the system CSPRNG,
    /// written as 64 hex digits), then database NAME owned by it (encoding UTF8), then revokes
    /// every privilege on the database from PUBLIC, so no other role can connect to it. Since
    /// PostgreSQL 15 only a database's owner may create tables in its public schema, which is
    /// why the service's role owns its database.
    ///
    /// The password reaches the server only as a SCRAM-SHA-256 verifier computed by pgprov,
    /// so neither log_statement = 'all' nor any statistics view can reveal it. stdout holds
    /// only the credentials. If a step fails after the role was made, pgprov removes what it
    /// made: the server holds all of it or none of it.
    ///
    /// Afterwards pgprov reads pg_hba_file_rules and, when no host line lets NAME log in to
    /// NAME with scram-sha-256, prints a warning on stderr with the line to add (containers
    /// reach the host's PostgreSQL over the Docker bridge, 172.16.0.0/12).
    ///
    /// NAME must match ^[a-z_][a-z0-9_]{0,62}$ and must not be postgres, template0,
    /// template1, public or start with pg_.
    #[command(after_long_help = "\
FORMATS:
    uri     postgresql://NAME:PASSWORD@HOST:PORT/NAME (percent-encoded)
    env     DATABASE_URL, PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE lines, one VAR=value
            each, shell-quoted only where needed, so the file works with `. file` in sh, with
            docker run --env-file and with systemd's EnvironmentFile=
    json    {\"name\", \"user\", \"password\", \"host\", \"port\", \"database\", \"uri\"} on one line
    pgpass  HOST:PORT:NAME:NAME:PASSWORD, with : and \\ escaped, for ~/.pgpass or PGPASSFILE

EXAMPLES:
    pgprov create metabase
        postgresql://metabase:9f2c...e1@localhost:5432/metabase
    pgprov create gitea --host 172.17.0.1 --format env --out-dir /etc/labkit/db
        writes /etc/labkit/db/gitea.env (mode 0600) for docker run --env-file
    pgprov create ci --format json | jq -r .password
    pgprov create jupyterhub --if-not-exists --connection-limit 20
    sudo -u postgres pgprov create metabase --format pgpass >> ~/.pgpass

EXIT STATUS:
    0 made, or already there with --if-not-exists (stdout empty); 65 bad name; 69 server
    down; 73 role or database exists (the message says which); 77 the admin role lacks
    CREATEROLE or CREATEDB. See pgprov --help for the rest.")]
    Create {
        /// Role and database name
        name: String,
        #[command(flatten)]
        output: Output,
        /// Exit 0 with empty stdout, instead of 73, when the role or database exists
        #[arg(long)]
        if_not_exists: bool,
        /// Most sessions the role may hold at once (CONNECTION LIMIT)
        #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..))]
        connection_limit: Option<i32>,
    },
    /// Drop a service's database and role.
    ///
    /// Drops database NAME, then role NAME. What the role owns in other databases is handed
    /// to the admin role (REASSIGN OWNED) and its privileges there are revoked (DROP OWNED)
    /// before the role is dropped. Only a database owned by the role of the same name (the
    /// way pgprov makes them) is dropped; superuser roles never are.
    ///
    /// While any session is connected to the database or logged in as the role, drop refuses
    /// (exit 75) unless --force, which terminates them (DROP DATABASE ... WITH (FORCE)).
    ///
    /// On a terminal, drop shows what it will remove and asks you to type NAME. When stdin is
    /// not a terminal it refuses without --yes. Interrupted, it can be run again.
    #[command(after_long_help = "\
EXAMPLES:
    pgprov drop jupyterhub                 asks: type jupyterhub to confirm
    pgprov drop jupyterhub --yes           from a script
    pgprov drop metabase --force --yes     even while Metabase is connected

EXIT STATUS:
    0 dropped, or nothing to drop; 64 not confirmed; 65 bad name, or a database pgprov did not
    make; 75 open sessions without --force; 77 the admin role lacks CREATEROLE.")]
    Drop {
        /// Role and database name
        name: String,
        /// Terminate sessions in the database and of the role
        #[arg(long)]
        force: bool,
        /// Do not ask; required when stdin is not a terminal
        #[arg(long)]
        yes: bool,
    },
    /// List provisioned databases with owner, size and connection count.
    ///
    /// A database is provisioned when a role of the same name (not a superuser) owns it, as
    /// `pgprov create` makes them. SIZE is shown only for databases the admin may connect to;
    /// CONNECTIONS counts the sessions in the database now; LIMIT is the owner role's
    /// CONNECTION LIMIT (- for none).
    #[command(after_long_help = "\
EXAMPLES:
    pgprov list
        NAME      OWNER       SIZE  CONNECTIONS  LIMIT
        metabase  metabase  7633 kB            2  -
    pgprov list --all                     every database but the templates
    pgprov list --format json | jq -r 'select(.connections == 0) | .name'")]
    List {
        /// Output format
        #[arg(long, value_enum, default_value_t)]
        format: ListFormat,
        /// List every database but the templates, whoever owns it
        #[arg(long)]
        all: bool,
    },
    /// Give a service's role a new password; print the credentials.
    ///
    /// Sets a new random password for login role NAME (sent as a SCRAM-SHA-256 verifier, like
    /// create) and prints the credentials in the same formats as create. The old password
    /// stops working at once for new logins; sessions already open stay open. If the
    /// credentials cannot be written, a superuser admin puts the old password back.
    #[command(after_long_help = "\
EXAMPLES:
    pgprov rotate metabase
    pgprov rotate gitea --format env --out-dir /etc/labkit/db.new
    pgprov rotate ci --format pgpass --host db.lan

EXIT STATUS:
    0 rotated; 65 bad name, or a superuser or NOLOGIN role; 66 no such role; 77 the admin role
    lacks CREATEROLE.")]
    Rotate {
        /// Role name
        name: String,
        #[command(flatten)]
        output: Output,
    },
    /// Give a role read or write access to a database.
    ///
    /// Grants ROLE CONNECT on database DB; USAGE on every schema in DB; on every table, view
    /// and sequence there SELECT (--read), or SELECT, INSERT, UPDATE, DELETE on tables and
    /// SELECT, USAGE, UPDATE on sequences (--write); and the same as default privileges for
    /// tables, sequences and schemas DB's owner creates later. Everything inside DB is granted
    /// in one transaction. Granting again changes nothing.
    #[command(
        group(ArgGroup::new("access").required(true).args(["read", "write"])),
        after_long_help = "\
EXAMPLES:
    pgprov grant metabase --on dw --read      Metabase reads the data warehouse
    pgprov grant ci --on dw --write           CI loads data into it

EXIT STATUS:
    0 granted; 65 bad name; 66 no such role or database; 77 the admin role may not grant on
    DB (it must be a superuser or a member of DB's owner)."
    )]
    Grant {
        /// The role that gets access
        role: String,
        /// The database
        #[arg(long = "on", value_name = "DB")]
        database: String,
        /// Read-only access
        #[arg(long)]
        read: bool,
        /// Read and write access
        #[arg(long)]
        write: bool,
    },
    /// Make the server match a file listing the lab's databases.
    ///
    /// Reads FILE (see FILE FORMAT) and compares it with the server. What is missing is made:
    /// databases with their roles (as create makes them; credentials are printed or written
    /// only for these), read grants, extensions. Everything else that differs is reported on
    /// stderr as drift and left alone: a connection limit, an undeclared grant or extension,
    /// a database owned by another role. Provisioned databases the file does not list are
    /// reported, and dropped only with --prune. With nothing to do, apply says so and changes
    /// nothing; --dry-run reports what it would do and changes nothing.
    ///
    /// Credentials of each new database are published as soon as it exists, so a later
    /// failure loses none. With several databases, stdout holds one credentials block per
    /// database (one line each in the uri, json and pgpass formats); --out-dir writes one
    /// file per database instead.
    #[command(after_long_help = apply::HELP)]
    Apply {
        /// The file listing the databases
        file: PathBuf,
        /// Drop provisioned databases (and their roles) the file does not list
        #[arg(long)]
        prune: bool,
        /// Report what would change; change nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Check an apply file without connecting to PostgreSQL.
    ///
    /// Reads FILE and checks it as apply does before it asks the server anything: the TOML
    /// syntax, unknown keys, names, duplicates and values. Prints `FILE: ok` and the number of
    /// databases; an error names the file, line, column and key. Nothing is read from the
    /// libpq environment, so it runs anywhere, such as in CI before a deploy.
    #[command(after_long_help = "\
EXAMPLES:
    pgprov check /etc/labkit/lab.toml
    pgprov check examples/pgprov/lab.toml && pgprov apply examples/pgprov/lab.toml --dry-run

EXIT STATUS:
    0 the file is valid; 65 a bad name or value in it; 66 no such file; 78 malformed (TOML
    syntax, an unknown key, a value of the wrong type).")]
    Check {
        /// The file listing the databases
        file: PathBuf,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    labcore::log::init(&cli.log)?;
    let env = Env::from_process();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "starting the async runtime".to_owned(),
            source,
        })?;
    runtime.block_on(dispatch(cli.command, &env))
}

async fn dispatch(command: Command, env: &Env) -> Result<(), Error> {
    match command {
        Command::Create {
            name,
            output,
            if_not_exists,
            connection_limit,
        } => {
            let name = Name::parse(&name)?;
            let settings = PgSettings::from_env(env)?;
            let endpoint = Endpoint::for_services(&settings, output.host.clone(), output.port);
            let admin = Admin::connect(&settings).await?;
            let _signals = stop_signals()?;
            let options = CreateOptions {
                if_not_exists,
                connection_limit,
            };
            match provision::create(&admin, &name, options, &endpoint, &output.sink()).await? {
                Outcome::Done(path) => report_written(&name, path),
                Outcome::AlreadyThere(what) => {
                    eprintln!("pgprov: {what}; nothing done (--if-not-exists)")
                }
            }
            Ok(())
        }
        Command::Drop { name, force, yes } => {
            let name = Name::parse(&name)?;
            if !yes && !io::stdin().is_terminal() {
                return Err(Error::NotConfirmed(format!(
                    "refusing to drop {name} without --yes: stdin is not a terminal to ask on"
                )));
            }
            let admin = Admin::connect(&PgSettings::from_env(env)?).await?;
            let confirm = |plan: &DropPlan| if yes { Ok(()) } else { ask(plan) };
            if provision::drop(&admin, &name, force, confirm).await? {
                eprintln!("pgprov: dropped {name}");
            } else {
                eprintln!("pgprov: neither role nor database {name} exists; nothing to drop");
            }
            Ok(())
        }
        Command::List { format, all } => {
            let admin = Admin::connect(&PgSettings::from_env(env)?).await?;
            let listed = list::list(&admin, all).await?;
            let mut stdout = io::stdout().lock();
            match format {
                ListFormat::Text => list::write_text(&mut stdout, &listed),
                ListFormat::Json => list::write_json(&mut stdout, &listed),
            }
            .and_then(|()| stdout.flush())
            .or_else(reader_gone)
            .map_err(|source| Error::Io {
                what: "writing the list to stdout".to_owned(),
                source,
            })
        }
        Command::Rotate { name, output } => {
            let name = Name::parse(&name)?;
            let settings = PgSettings::from_env(env)?;
            let endpoint = Endpoint::for_services(&settings, output.host.clone(), output.port);
            let admin = Admin::connect(&settings).await?;
            let _signals = stop_signals()?;
            if let Outcome::Done(path) =
                provision::rotate(&admin, &name, &endpoint, &output.sink()).await?
            {
                report_written(&name, path);
            }
            Ok(())
        }
        Command::Grant {
            role,
            database,
            read,
            write: _,
        } => {
            let role = Name::parse(&role)?;
            let database = Name::parse(&database)?;
            let access = if read { Access::Read } else { Access::Write };
            let admin = Admin::connect(&PgSettings::from_env(env)?).await?;
            grant::grant(&admin, &role, &database, access).await?;
            eprintln!(
                "pgprov: granted role {role} {} access to database {database}",
                access.as_str()
            );
            Ok(())
        }
        Command::Apply {
            file,
            prune,
            dry_run,
            output,
        } => {
            let lab = apply::load(&file)?;
            let settings = PgSettings::from_env(env)?;
            let endpoint = Endpoint::for_services(
                &settings,
                output.host.clone().or_else(|| lab.host.clone()),
                output.port.or(lab.port),
            );
            let admin = Admin::connect(&settings).await?;
            let plan = apply::plan(&admin, &lab, prune).await?;
            for drift in &plan.drift {
                eprintln!("pgprov: drift: {drift}");
            }
            if plan.actions.is_empty() {
                eprintln!(
                    "pgprov: nothing to change: {} of {} database(s) up to date",
                    plan.up_to_date,
                    lab.databases.len()
                );
                return Ok(());
            }
            if dry_run {
                for action in &plan.actions {
                    eprintln!("pgprov: would {}", action.describe());
                }
                eprintln!("pgprov: dry run: {} change(s) not made", plan.actions.len());
                return Ok(());
            }
            let signals = stop_signals()?;
            let made = apply::execute(
                &admin,
                &plan,
                &endpoint,
                &output.sink(),
                &signals.shutdown(),
            )
            .await?;
            eprintln!("pgprov: {made} change(s) made");
            Ok(())
        }
        Command::Check { file } => {
            let lab = apply::load(&file)?;
            writeln!(
                io::stdout().lock(),
                "{}: ok: {} database(s)",
                lab.path.display(),
                lab.databases.len()
            )
            .or_else(reader_gone)
            .map_err(|source| Error::Io {
                what: "writing to stdout".to_owned(),
                source,
            })
        }
    }
}

/// A reader that closes stdout early (`pgprov list | head`) has all it wants: not an error.
/// Only for output that can be asked for again; credentials are never dropped this way.
fn reader_gone(err: io::Error) -> io::Result<()> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        tracing::debug!("standard output closed early by its reader");
        Ok(())
    } else {
        Err(err)
    }
}

/// Catches SIGINT and SIGTERM from here on, so a stop signal cannot cut a create between
/// its statements: the step under way completes or is undone. A second signal still ends
/// pgprov at once.
fn stop_signals() -> Result<Signals, Error> {
    Signals::install().map_err(|source| Error::Io {
        what: "installing signal handlers".to_owned(),
        source,
    })
}

fn report_written(name: &Name, path: Option<PathBuf>) {
    if let Some(path) = path {
        eprintln!(
            "pgprov: credentials for {name} written to {}",
            path.display()
        );
    }
}

/// Asks on the terminal for NAME to be typed.
fn ask(plan: &DropPlan) -> Result<(), Error> {
    let name = &plan.name;
    let mut what = Vec::new();
    if let Some(size) = &plan.database_size {
        what.push(format!("database {name} ({size})"));
    }
    if plan.role {
        what.push(format!("role {name}"));
    }
    let sessions = match plan.sessions {
        0 => String::new(),
        n => format!(", terminating {n} session(s)"),
    };
    eprint!(
        "pgprov: this drops {}{sessions}; it cannot be undone.\nType {name} to confirm: ",
        what.join(" and ")
    );
    let mut answer = String::new();
    io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|source| Error::Io {
            what: "reading the confirmation".to_owned(),
            source,
        })?;
    if answer.trim() == name.as_str() {
        Ok(())
    } else {
        Err(Error::NotConfirmed(format!(
            "not confirmed; nothing dropped ({name} was not typed)"
        )))
    }
}
