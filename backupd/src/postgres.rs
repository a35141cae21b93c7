//! PostgreSQL sources: the client programs, consistent dumps, and what a dump is checked with.
//!
//! A database is dumped with `pg_dump -Fc -Z0` (backupd compresses, faster and smaller than
//! pg_dump's zlib) from a snapshot exported by a `REPEATABLE READ` transaction that backupd
//! holds open; in that same snapshot it counts every table's rows, so the counts in the
//! manifest describe exactly the data in the dump. The dump streams through `pg_restore
//! --list` on the way, so an archive whose table of contents does not parse is never
//! recorded as a backup. `pg_dump` must be at least the server's major version.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use labcore::Env;
use labcore::pg::{PgSettings, quote_ident};

use crate::Error;
use crate::catalog::{DatabaseInfo, TableRows};

/// The PostgreSQL client programs of one version.
#[derive(Clone, Debug)]
pub(crate) struct PgTools {
    bin_dir: Option<PathBuf>,
    /// `pg_dump --version` output, trimmed.
    pub(crate) version: String,
}

impl PgTools {
    /// The programs to use against a server of `server_major`: those in `configured` if set,
    /// else the newest `/usr/lib/postgresql/N/bin` with N >= the server's, else `PATH`'s.
    pub(crate) fn find(
        configured: Option<&Path>,
        server_major: u32,
        env: &Env,
    ) -> Result<PgTools, Error> {
        let candidates: Vec<Option<PathBuf>> = match configured {
            Some(dir) => vec![Some(dir.to_owned())],
            None => {
                let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| {
                        let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                        let bin = e.path().join("bin");
                        bin.join("pg_dump").is_file().then_some((major, bin))
                    })
                    .collect();
                dirs.sort();
                let mut found: Vec<Option<PathBuf>> = dirs
                    .into_iter()
                    .rev()
                    .filter(|(major, _)| *major >= server_major)
                    .map(|(_, bin)| Some(bin))
                    .collect();
                found.push(None);
                found
            }
        };
        let mut newest_seen = None;
        for bin_dir in candidates {
            let tools = PgTools {
                bin_dir,
                version: String::new(),
            };
            let Ok((version, major)) = tools.probe_version(env) else {
                continue;
            };
            if major >= server_major {
                return Ok(PgTools { version, ..tools });
            }
            newest_seen = Some(version);
        }
        Err(Error::PgDumpTooOld {
            found: newest_seen.unwrap_or_else(|| "no pg_dump".into()),
            server: server_major,
        })
    }

    fn probe_version(&self, env: &Env) -> Result<(String, u32), Error> {
        let output = self
            .command("pg_dump", env)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                program: self.program("pg_dump").display().to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        // "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let major = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse::<u32>().ok())
            .ok_or_else(|| Error::Child {
                program: "pg_dump --version".into(),
                status: output.status.to_string(),
                stderr: format!("unexpected output {text:?}"),
            })?;
        Ok((text, major))
    }

    /// The path of one of the programs.
    pub(crate) fn program(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    /// A command for `name` with backupd's environment (the libpq variables reach it; the
    /// service manager's notification socket does not).
    pub(crate) fn command(&self, name: &str, env: &Env) -> Command {
        let mut command = Command::new(self.program(name));
        command.env_clear();
        for (key, value) in env.iter() {
            if !matches!(
                key.to_str(),
                Some(
                    "NOTIFY_SOCKET"
                        | "WATCHDOG_USEC"
                        | "WATCHDOG_PID"
                        | "LISTEN_FDS"
                        | "LISTEN_PID"
                )
            ) {
                command.env(key, value);
            }
        }
        command
    }
}

/// The server's version number (`server_version_num`, e.g. 150018).
pub(crate) async fn server_version(
    client: &tokio_postgres::Client,
    database: &str,
) -> Result<u32, Error> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|source| Error::Sql {
            what: "reading the server version".into(),
            database: database.to_owned(),
            source,
        })?;
    Ok(row.get::<_, i32>(0) as u32)
}

/// Every database a `databases = "all"` source dumps: those accepting connections, except
/// templates.
pub(crate) async fn all_databases(settings: &PgSettings) -> Result<Vec<String>, Error> {
    let client = settings.clone().with_dbname("postgres").connect().await?;
    let rows = client
        .query(
            "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await
        .map_err(|source| Error::Sql {
            what: "listing databases".into(),
            database: "postgres".into(),
            source,
        })?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A transaction holding the snapshot a dump is taken from.
pub(crate) struct Snapshot {
    client: labcore::pg::PgClient,
    /// The exported snapshot's name, for `pg_dump --snapshot`.
    pub(crate) name: String,
    /// The server's version number.
    pub(crate) server_version: u32,
    database: String,
}

impl Snapshot {
    /// Opens a `REPEATABLE READ` transaction in `database` and exports its snapshot.
    pub(crate) async fn open(settings: &PgSettings, database: &str) -> Result<Snapshot, Error> {
        let client = settings
            .clone()
            .with_dbname(database)
            .with_application_name("backupd")
            .connect()
            .await?;
        let sql = |what: &str| {
            let what = what.to_owned();
            let database = database.to_owned();
            move |source| Error::Sql {
                what,
                database,
                source,
            }
        };
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(sql("starting the snapshot transaction"))?;
        let name: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(sql("exporting a snapshot"))?
            .get(0);
        let server_version = server_version(&client, database).await?;
        Ok(Snapshot {
            client,
            name,
            server_version,
            database: database.to_owned(),
        })
    }

    fn sql_error(&self, what: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + use<> {
        let what = what.to_owned();
        let database = self.database.clone();
        move |source| Error::Sql {
            what,
            database,
            source,
        }
    }

    /// The database's owner, encoding, locale and privileges.
    pub(crate) async fn database_info(&self) -> Result<DatabaseInfo, Error> {
        let row = self
            .client
            .query_one(
                "SELECT pg_get_userbyid(datdba)::text, pg_encoding_to_char(encoding)::text, \
                 datcollate::text, datctype::text, datacl::text[] \
                 FROM pg_database WHERE datname = current_database()",
                &[],
            )
            .await
            .map_err(self.sql_error("reading the database's properties"))?;
        Ok(DatabaseInfo {
            owner: row.get(0),
            encoding: row.get(1),
            collate: row.get(2),
            ctype: row.get(3),
            acl: row.get(4),
        })
    }

    /// Rows of every ordinary table, counted in the snapshot.
    pub(crate) async fn table_rows(&self) -> Result<Vec<TableRows>, Error> {
        count_rows(&self.client, &self.database).await
    }

    /// Ends the transaction.
    pub(crate) async fn close(self) -> Result<(), Error> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(self.sql_error("ending the snapshot transaction"))
    }
}

/// Rows of every ordinary table of the database `client` is connected to.
pub(crate) async fn count_rows(
    client: &tokio_postgres::Client,
    database: &str,
) -> Result<Vec<TableRows>, Error> {
    let sql = |what: &str| {
        let what = what.to_owned();
        let database = database.to_owned();
        move |source| Error::Sql {
            what,
            database,
            source,
        }
    };
    let tables = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(sql("listing tables"))?;
    let mut counts = Vec::with_capacity(tables.len());
    for row in tables {
        let table: String = row.get(0);
        // The name comes from format('%I.%I'), so it is a correctly quoted identifier.
        let rows: i64 = client
            .query_one(&format!("SELECT count(*) FROM ONLY {table}"), &[])
            .await
            .map_err(sql(&format!("counting rows of {table}")))?
            .get(0);
        counts.push(TableRows { table, rows });
    }
    Ok(counts)
}

/// SQL that gives a restored database its recorded owner and privileges (run as an admin in
/// another database). Roles that no longer exist are skipped with a warning by the caller.
pub(crate) fn database_acl_sql(database: &str, info: &DatabaseInfo) -> Vec<String> {
    let db = quote_ident(database);
    let mut statements = vec![format!(
        "ALTER DATABASE {db} OWNER TO {}",
        quote_ident(&info.owner)
    )];
    let Some(acl) = &info.acl else {
        return statements;
    };
    statements.push(format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"));
    for text in acl {
        let Some(item) = AclItem::parse(text) else {
            tracing::warn!(item = %text, "skipping a database privilege that does not parse");
            continue;
        };
        let grantee = match &item.grantee {
            None => "PUBLIC".to_owned(),
            Some(role) => quote_ident(role),
        };
        for with_grant_option in [false, true] {
            let names: Vec<&str> = [('C', "CREATE"), ('c', "CONNECT"), ('T', "TEMPORARY")]
                .into_iter()
                .filter(|(letter, _)| item.privileges.contains(&(*letter, with_grant_option)))
                .map(|(_, name)| name)
                .collect();
            if !names.is_empty() {
                let option = if with_grant_option {
                    " WITH GRANT OPTION"
                } else {
                    ""
                };
                statements.push(format!(
                    "GRANT {} ON DATABASE {db} TO {grantee}{option}",
                    names.join(", ")
                ));
            }
        }
    }
    statements
}

/// One `aclitem` as PostgreSQL prints it: `grantee=privileges/grantor`. A role name holding
/// anything but letters, digits and `_` is double-quoted with inner quotes doubled, so a name
/// may itself contain `=`, `/` or `"`: the text is read name by name, never split on them.
#[derive(Debug, PartialEq, Eq)]
struct AclItem {
    /// The role granted to; `None` is PUBLIC (an empty grantee).
    grantee: Option<String>,
    /// Privilege letters, each with whether it carries the grant option (`*`).
    privileges: Vec<(char, bool)>,
}

impl AclItem {
    fn parse(text: &str) -> Option<AclItem> {
        let (grantee, rest) = acl_role(text)?;
        let rest = rest.strip_prefix('=')?;
        let (letters, rest) = rest.split_once('/')?;
        let mut privileges: Vec<(char, bool)> = Vec::new();
        let mut letters = letters.chars().peekable();
        while let Some(letter) = letters.next() {
            if !letter.is_ascii_alphabetic() {
                return None;
            }
            let grant_option = letters.next_if_eq(&'*').is_some();
            privileges.push((letter, grant_option));
        }
        let (grantor, rest) = acl_role(rest)?;
        if !rest.is_empty() || grantor.is_empty() {
            return None;
        }
        // The grantor is read only to check the item: a restore grants as its own admin.
        Some(AclItem {
            grantee: Some(grantee).filter(|g| !g.is_empty()),
            privileges,
        })
    }
}

/// A role name at the start of `text`, quoted or bare, and the text after it.
fn acl_role(text: &str) -> Option<(String, &str)> {
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text.find(['=', '/']).unwrap_or(text.len());
        return Some((text[..end].to_owned(), &text[end..]));
    };
    let mut name = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            name.push(c);
        } else if quoted[i + 1..].starts_with('"') {
            name.push('"');
            chars.next();
        } else {
            return Some((name, &quoted[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_privileges_become_grants() {
        let info = DatabaseInfo {
            owner: "metabase".into(),
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C".into(),
            acl: Some(vec![
                "metabase=CTc/metabase".into(),
                "=T/metabase".into(),
                "reader=c/metabase".into(),
            ]),
        };
        let sql = database_acl_sql("metabase", &info);
        assert_eq!(
            sql,
            [
                "ALTER DATABASE \"metabase\" OWNER TO \"metabase\"",
                "REVOKE ALL ON DATABASE \"metabase\" FROM PUBLIC",
                "GRANT CREATE, CONNECT, TEMPORARY ON DATABASE \"metabase\" TO \"metabase\"",
                "GRANT TEMPORARY ON DATABASE \"metabase\" TO PUBLIC",
                "GRANT CONNECT ON DATABASE \"metabase\" TO \"reader\"",
            ]
        );
        let default = DatabaseInfo {
            acl: None,
            ..info.clone()
        };
        assert_eq!(database_acl_sql("x", &default).len(), 1);
    }

    #[test]
    fn acl_items_with_equals_slashes_and_quotes_in_role_names_parse() {
        let item = |grantee: Option<&str>, privileges: &[(char, bool)], _grantor: &str| AclItem {
            grantee: grantee.map(str::to_owned),
            privileges: privileges.to_vec(),
        };
        let cases = [
            ("a=c/b", item(Some("a"), &[('c', false)], "b")),
            (
                "=Tc/postgres",
                item(None, &[('T', false), ('c', false)], "postgres"),
            ),
            (
                "\"we=ird\"=C*c/\"own/er\"",
                item(Some("we=ird"), &[('C', true), ('c', false)], "own/er"),
            ),
            (
                "\"quo\"\"te\"=T/\"x\"\"=y\"",
                item(Some("quo\"te"), &[('T', false)], "x\"=y"),
            ),
            ("\"\"\"\"=c/p", item(Some("\""), &[('c', false)], "p")),
        ];
        for (text, expected) in cases {
            assert_eq!(AclItem::parse(text), Some(expected), "{text}");
        }
        for bad in ["", "a", "a=c", "\"a=c/b", "a=c/", "a=c/b/c", "a=1/b"] {
            assert_eq!(AclItem::parse(bad), None, "{bad}");
        }
        let info = DatabaseInfo {
            owner: "o".into(),
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C".into(),
            acl: Some(vec!["\"we=ird\"=C*c/o".into()]),
        };
        assert_eq!(
            database_acl_sql("d", &info)[2..],
            [
                "GRANT CONNECT ON DATABASE \"d\" TO \"we=ird\"",
                "GRANT CREATE ON DATABASE \"d\" TO \"we=ird\" WITH GRANT OPTION",
            ]
        );
    }
}
