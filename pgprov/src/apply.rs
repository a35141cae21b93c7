//! `pgprov apply`: a declarative file of the lab's databases, made true on the server.
//!
//! The file ([`HELP`] documents it) is read and checked whole before the server is
//! asked anything. [`plan`] compares it with the server: what is missing becomes an
//! [`Action`] (create a database and its role, grant read access, create an extension);
//! everything else that differs is *drift*, reported and left alone. Provisioned databases
//! the file does not name are dropped only with `--prune`. [`execute`] runs the actions in
//! that order (creates first, so read grants can name roles made in the same run; drops last)
//! and publishes each new database's credentials as soon as it exists, so a later failure
//! loses none of them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use labcore::config::{self, ConfigError};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

use crate::Error;
use crate::admin::Admin;
use crate::catalog;
use crate::credentials::{Endpoint, Sink};
use crate::grant::{self, Access};
use crate::name::{ExtensionName, Name};
use crate::provision;

/// The long help of `pgprov apply`: the file format, examples and exit codes.
pub(crate) const HELP: &str = "\
FILE FORMAT:
    A TOML file. Unknown keys are errors; every error names the file, line, column and key.

    host = \"172.17.0.1\"      optional: the host services connect to, printed in their
    port = 5432              credentials (--host and --port win; default: the admin
                             connection's TCP host, or localhost, and its port)

    [[database]]             one table per service: a login role and a database, both NAME
    name = \"dw\"              ^[a-z_][a-z0-9_]{0,62}$, not postgres, template0, template1,
                             public, or pg_anything
    read = [\"metabase\"]      optional: roles given read-only access (CONNECT, USAGE on the
                             schemas, SELECT on every table and on the owner's future tables);
                             each must be declared in the file or exist on the server
    extensions = [\"pg_trgm\"] optional: extensions created in the database when missing
    connection_limit = 20    optional: the role's CONNECTION LIMIT when it is created

    A bad name exits 65 and a malformed file 78, before the server is asked anything.

EXAMPLES:
    pgprov apply lab.toml --dry-run
    pgprov apply lab.toml                                print the new databases' URIs
    pgprov apply lab.toml --format env --out-dir /etc/labkit/db
    pgprov apply lab.toml --prune                        also drop databases not listed

    The reference lab's lab.toml:

    host = \"172.17.0.1\"

    [[database]]
    name = \"ci\"

    [[database]]
    name = \"dw\"
    read = [\"metabase\"]

    [[database]]
    name = \"gitea\"

    [[database]]
    name = \"jupyterhub\"

    [[database]]
    name = \"metabase\"

EXIT STATUS:
    0 the server matches the file (drift is reported, not an error); 65 a bad name or value
    in the file; 66 a read role or extension that does not exist; 73 a credentials file
    exists; 75 --prune met a database in use; 77 the admin role lacks CREATEROLE or
    CREATEDB; 78 a malformed file. See pgprov --help for the rest.";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyToml {
    host: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    database: Vec<DatabaseToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseToml {
    name: Spanned<String>,
    #[serde(default)]
    read: Vec<Spanned<String>>,
    #[serde(default)]
    extensions: Vec<Spanned<String>>,
    connection_limit: Option<Spanned<i32>>,
}

/// The checked contents of an apply file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LabFile {
    /// The file, for messages.
    pub(crate) path: PathBuf,
    /// The host services connect to, if the file says.
    pub(crate) host: Option<String>,
    /// The port services connect to, if the file says.
    pub(crate) port: Option<u16>,
    /// The databases, in file order.
    pub(crate) databases: Vec<Declared>,
}

/// One declared database.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Declared {
    /// Its name, and its role's.
    pub(crate) name: Name,
    /// Roles with read access.
    pub(crate) read: Vec<Name>,
    /// Extensions it has.
    pub(crate) extensions: Vec<ExtensionName>,
    /// The role's connection limit at creation.
    pub(crate) connection_limit: Option<i32>,
}

/// Reads and checks an apply file.
pub(crate) fn load(path: &Path) -> Result<LabFile, Error> {
    let text = fs::read_to_string(path).map_err(|source| {
        Error::ApplyFile(ConfigError::Read {
            path: path.to_owned(),
            source,
        })
    })?;
    let raw: ApplyToml = config::parse_str(path, &text).map_err(Error::ApplyFile)?;
    resolve(path, &text, raw)
}

/// Turns the parsed file into checked names; errors point at the value's line and column.
fn resolve(path: &Path, text: &str, raw: ApplyToml) -> Result<LabFile, Error> {
    let bad = |spanned_at: std::ops::Range<usize>, key: String, message: String| {
        Error::ApplyData(ConfigError::at(
            path,
            text,
            Some(spanned_at),
            Some(key),
            &message,
        ))
    };
    let mut databases: Vec<Declared> = Vec::new();
    for (i, db) in raw.database.into_iter().enumerate() {
        let key = format!("database[{i}]");
        let name = Name::parse(db.name.get_ref())
            .map_err(|e| bad(db.name.span(), format!("{key}.name"), e.to_string()))?;
        if databases.iter().any(|d| d.name == name) {
            return Err(bad(
                db.name.span(),
                format!("{key}.name"),
                format!("database {name} is declared twice"),
            ));
        }
        let mut read = Vec::new();
        for (j, role) in db.read.iter().enumerate() {
            let at = |message: String| bad(role.span(), format!("{key}.read[{j}]"), message);
            let role_name = Name::parse(role.get_ref()).map_err(|e| at(e.to_string()))?;
            if role_name == name {
                return Err(at(format!(
                    "role {name} owns database {name}; it needs no read grant"
                )));
            }
            if !read.contains(&role_name) {
                read.push(role_name);
            }
        }
        let mut extensions = Vec::new();
        for (j, ext) in db.extensions.iter().enumerate() {
            let ext_name = ExtensionName::parse(ext.get_ref())
                .map_err(|e| bad(ext.span(), format!("{key}.extensions[{j}]"), e.to_string()))?;
            if !extensions.contains(&ext_name) {
                extensions.push(ext_name);
            }
        }
        let connection_limit = match db.connection_limit {
            Some(limit) if *limit.get_ref() < -1 => {
                return Err(bad(
                    limit.span(),
                    format!("{key}.connection_limit"),
                    "a connection limit is -1 (none) or more".to_owned(),
                ));
            }
            other => other.map(Spanned::into_inner),
        };
        databases.push(Declared {
            name,
            read,
            extensions,
            connection_limit,
        });
    }
    Ok(LabFile {
        path: path.to_owned(),
        host: raw.host,
        port: raw.port,
        databases,
    })
}

/// A change `apply` makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Make role and database `name`.
    Create {
        /// The name.
        name: Name,
        /// The role's connection limit.
        connection_limit: Option<i32>,
    },
    /// Give `role` read access to `database`.
    GrantRead {
        /// The grantee.
        role: Name,
        /// The database.
        database: Name,
    },
    /// Create `extension` in `database`.
    Extension {
        /// The database.
        database: Name,
        /// The extension.
        extension: ExtensionName,
    },
    /// Drop provisioned database and role `name` (`--prune`).
    Drop {
        /// The name.
        name: Name,
    },
}

impl Action {
    /// What the action does, as a sentence fragment (`create database and role ci`).
    pub(crate) fn describe(&self) -> String {
        match self {
            Action::Create { name, .. } => format!("create database and role {name}"),
            Action::GrantRead { role, database } => {
                format!("grant role {role} read access to database {database}")
            }
            Action::Extension {
                database,
                extension,
            } => format!("create extension {extension} in database {database}"),
            Action::Drop { name } => format!("drop database and role {name}"),
        }
    }
}

/// What `apply` would change, and what differs but is left alone.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Changes, in the order they run.
    pub(crate) actions: Vec<Action>,
    /// Differences reported but not changed.
    pub(crate) drift: Vec<String>,
    /// Declared databases that need nothing and show no drift.
    pub(crate) up_to_date: usize,
}

/// Compares the file with the server.
pub(crate) async fn plan(admin: &Admin, lab: &LabFile, prune: bool) -> Result<Plan, Error> {
    let mut creates = Vec::new();
    let mut grants = Vec::new();
    let mut extensions = Vec::new();
    let mut drift = Vec::new();
    let mut up_to_date = 0;
    let declared: BTreeSet<&Name> = lab.databases.iter().map(|d| &d.name).collect();
    for db in &lab.databases {
        let name = &db.name;
        let drift_before = drift.len();
        let actions_before = creates.len() + grants.len() + extensions.len();
        // Read roles not on the server yet: the file must declare them (they are made first).
        let mut to_be_made = Vec::new();
        for role in &db.read {
            if catalog::role(admin, role.as_str()).await?.is_none() {
                if !declared.contains(role) {
                    return Err(Error::Missing(format!(
                        "{}: role {role} (read access to database {name}) does not exist and \
                         the file does not declare it",
                        lab.path.display()
                    )));
                }
                to_be_made.push(role);
            }
        }
        let role = catalog::role(admin, name.as_str()).await?;
        let database = catalog::database(admin, name.as_str()).await?;
        match (role, database) {
            (None, None) => {
                creates.push(Action::Create {
                    name: name.clone(),
                    connection_limit: db.connection_limit,
                });
                grants.extend(db.read.iter().map(|role| Action::GrantRead {
                    role: role.clone(),
                    database: name.clone(),
                }));
                for extension in &db.extensions {
                    check_available(admin, name, extension).await?;
                    extensions.push(Action::Extension {
                        database: name.clone(),
                        extension: extension.clone(),
                    });
                }
            }
            (Some(role), Some(info)) if info.owned_by(name) => {
                if let Some(limit) = db.connection_limit
                    && limit != role.connection_limit
                {
                    drift.push(format!(
                        "role {name} has connection limit {}, the file says {limit} \
                         (ALTER ROLE {name} CONNECTION LIMIT {limit})",
                        role.connection_limit
                    ));
                }
                for grantee in foreign_connect(admin, name).await? {
                    if !db.read.iter().any(|r| r.as_str() == grantee) {
                        drift.push(format!(
                            "{grantee} may connect to database {name}; the file does not grant it"
                        ));
                    }
                }
                if !info.allow_connections {
                    drift.push(format!("database {name} does not allow connections"));
                } else {
                    let inside = admin.database(name.as_str()).await?;
                    for role in &db.read {
                        if to_be_made.contains(&role) || !grant::has_read(&inside, role).await? {
                            grants.push(Action::GrantRead {
                                role: role.clone(),
                                database: name.clone(),
                            });
                        }
                    }
                    let present = installed_extensions(&inside).await?;
                    for extension in &db.extensions {
                        if !present.iter().any(|p| p == extension.as_str()) {
                            check_available(admin, name, extension).await?;
                            extensions.push(Action::Extension {
                                database: name.clone(),
                                extension: extension.clone(),
                            });
                        }
                    }
                    for extra in present
                        .iter()
                        .filter(|p| !db.extensions.iter().any(|e| e.as_str() == p.as_str()))
                    {
                        drift.push(format!(
                            "database {name} has extension {extra}, which the file does not list"
                        ));
                    }
                }
            }
            (Some(_), Some(info)) => drift.push(format!(
                "database {name} is owned by {}, not by role {name}: pgprov leaves it alone \
                 (since PostgreSQL 15 a service must own its database to create tables in \
                 public: ALTER DATABASE {name} OWNER TO {name})",
                info.owner
            )),
            (Some(_), None) => drift.push(format!(
                "role {name} exists but database {name} does not: pgprov leaves it alone"
            )),
            (None, Some(info)) => drift.push(format!(
                "database {name} exists (owned by {}) but role {name} does not: pgprov leaves \
                 it alone",
                info.owner
            )),
        }
        let actions_after = creates.len() + grants.len() + extensions.len();
        if drift.len() == drift_before && actions_after == actions_before {
            up_to_date += 1;
        }
    }
    let mut drops = Vec::new();
    for existing in catalog::provisioned(admin).await? {
        if declared.iter().any(|d| d.as_str() == existing) {
            continue;
        }
        let name = Name::parse(&existing)?;
        if prune {
            drops.push(Action::Drop { name });
        } else {
            drift.push(format!(
                "database {name} is provisioned but not in the file (--prune drops it)"
            ));
        }
    }
    let mut actions = creates;
    actions.extend(grants);
    actions.extend(extensions);
    actions.extend(drops);
    Ok(Plan {
        actions,
        drift,
        up_to_date,
    })
}

/// Roles (or `PUBLIC`) other than the owner that may connect to database `name`.
async fn foreign_connect(admin: &Admin, name: &Name) -> Result<Vec<String>, Error> {
    let rows = admin
        .query(
            &format!("reading who may connect to database {name}"),
            "SELECT COALESCE(r.rolname::text, 'PUBLIC') FROM pg_database d \
             CROSS JOIN LATERAL aclexplode(COALESCE(d.datacl, acldefault('d', d.datdba))) x \
             LEFT JOIN pg_roles r ON r.oid = x.grantee \
             WHERE d.datname = $1 AND x.privilege_type = 'CONNECT' AND x.grantee <> d.datdba \
             ORDER BY 1",
            &[&name.as_str()],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// The extensions installed in the database `inside` is connected to, but `plpgsql`.
async fn installed_extensions(inside: &Admin) -> Result<Vec<String>, Error> {
    let rows = inside
        .query(
            &format!(
                "listing the extensions in database {}",
                inside.current_database()
            ),
            "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Fails (exit 66) when the server cannot install `extension`.
async fn check_available(
    admin: &Admin,
    database: &Name,
    extension: &ExtensionName,
) -> Result<(), Error> {
    let found = admin
        .query_opt(
            &format!("looking up extension {extension}"),
            "SELECT 1 FROM pg_available_extensions WHERE name = $1",
            &[&extension.as_str()],
        )
        .await?;
    match found {
        Some(_) => Ok(()),
        None => Err(Error::Missing(format!(
            "extension {extension} (for database {database}) is not available on the server \
             (is its package, such as postgresql-contrib, installed?)"
        ))),
    }
}

/// Runs the plan's actions, reporting each on stderr; returns how many ran. Once `stop` is
/// cancelled (SIGINT, SIGTERM), the action under way finishes or is undone, and no other
/// starts.
pub(crate) async fn execute(
    admin: &Admin,
    plan: &Plan,
    endpoint: &Endpoint,
    sink: &Sink,
    stop: &CancellationToken,
) -> Result<usize, Error> {
    let changes_roles = plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::Create { .. } | Action::Drop { .. }));
    if changes_roles {
        admin.require(true, true)?;
    }
    for action in &plan.actions {
        if let Action::Create { name, .. } = action {
            sink.check(name)?;
        }
    }
    for (done, action) in plan.actions.iter().enumerate() {
        if stop.is_cancelled() {
            return Err(Error::Interrupted {
                done,
                planned: plan.actions.len(),
            });
        }
        match action {
            Action::Create {
                name,
                connection_limit,
            } => {
                let path =
                    provision::make_and_publish(admin, name, *connection_limit, endpoint, sink)
                        .await?;
                match path {
                    Some(path) => eprintln!(
                        "pgprov: created database and role {name} (credentials in {})",
                        path.display()
                    ),
                    None => eprintln!("pgprov: created database and role {name}"),
                }
            }
            Action::GrantRead { role, database } => {
                grant::grant(admin, role, database, Access::Read).await?;
                eprintln!("pgprov: granted role {role} read access to database {database}");
            }
            Action::Extension {
                database,
                extension,
            } => {
                let inside = admin.database(database.as_str()).await?;
                inside
                    .batch(
                        &format!("creating extension {extension} in database {database}"),
                        &format!("CREATE EXTENSION IF NOT EXISTS {}", extension.ident()),
                    )
                    .await?;
                eprintln!("pgprov: created extension {extension} in database {database}");
            }
            Action::Drop { name } => {
                provision::drop(admin, name, false, |_| Ok(())).await?;
                eprintln!("pgprov: dropped database and role {name}");
            }
        }
    }
    Ok(plan.actions.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LabFile, Error> {
        let path = Path::new("lab.toml");
        let raw: ApplyToml = config::parse_str(path, text).map_err(Error::ApplyFile)?;
        resolve(path, text, raw)
    }

    #[test]
    fn the_lab_file_parses() {
        let lab = parse(
            "host = \"172.17.0.1\"\n\
             [[database]]\nname = \"ci\"\n\
             [[database]]\nname = \"dw\"\nread = [\"metabase\"]\nextensions = [\"pg_trgm\"]\n\
             connection_limit = 20\n\
             [[database]]\nname = \"metabase\"\n",
        )
        .unwrap();
        assert_eq!(lab.host.as_deref(), Some("172.17.0.1"));
        assert_eq!(lab.databases.len(), 3);
        let dw = &lab.databases[1];
        assert_eq!(dw.read, vec![Name::parse("metabase").unwrap()]);
        assert_eq!(dw.extensions[0].as_str(), "pg_trgm");
        assert_eq!(dw.connection_limit, Some(20));
    }

    #[test]
    fn a_bad_name_points_at_its_line_and_column() {
        let err =
            parse("[[database]]\nname = \"ci\"\n[[database]]\nname = \"Meta base\"\n").unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with("lab.toml:4:8: key \"database[1].name\": invalid name"),
            "{shown}"
        );
        assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::DataErr);
        let read = parse("[[database]]\nname = \"dw\"\nread = [\"ok\", \"pg_x\"]\n").unwrap_err();
        assert!(
            read.to_string()
                .contains("lab.toml:3:15: key \"database[0].read[1]\""),
            "{read}"
        );
    }

    #[test]
    fn duplicates_and_unknown_keys_are_refused() {
        let dup = parse("[[database]]\nname = \"ci\"\n[[database]]\nname = \"ci\"\n").unwrap_err();
        assert!(dup.to_string().contains("declared twice"), "{dup}");
        let unknown = parse("[[database]]\nname = \"ci\"\nowner = \"x\"\n").unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `owner`"),
            "{unknown}"
        );
        assert_eq!(labcore::ExitStatus::exit(&unknown), labcore::Exit::Config);
    }
}
