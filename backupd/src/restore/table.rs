//! One table out of a database backup: `restore ID --table SCHEMA.NAME --to-db X` (the table
//! under its own name in database X, created if missing) or `--to-table NEW` (beside the
//! original, in the database the backup came from, under a new name).
//!
//! The backup is checked as for any restore ([`Restorer::authenticate`], [`Restorer::spool`]),
//! and the table must be one the signed manifest lists, so a typo is refused before anything
//! is downloaded. Then:
//! 1. `pg_restore -n SCHEMA -t NAME` fills a private scratch database with the table's
//!    definition and rows (what `pg_restore -t` restores: no indexes, constraints other than
//!    NOT NULL and CHECK, triggers or defaults that need other objects);
//! 2. there it is renamed if asked;
//! 3. `pg_dump -t` of it is piped into `pg_restore --single-transaction` into the destination,
//!    so the destination gets the whole table or nothing; an existing table of that name is
//!    refused, or with `--force` dropped and replaced in that same transaction;
//! 4. the scratch database is dropped, whatever happened.
//!
//! Names are matched exactly: `--table` takes SQL's spelling (`public.items`,
//! `"Odd Schema"."odd.name"`; unquoted parts fold to lower case) and every name reaches SQL
//! through [`quote_ident`] and the programs as literal patterns.

use std::io::Read;
use std::process::Stdio;

use labcore::pg::quote_ident;

use super::{Restorer, conninfo_quote, drop_database};
use crate::Error;
use crate::catalog::Content;
use crate::inventory::Listed;
use crate::postgres::{self, PgTools};

/// A schema-qualified table name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// `"schema"."name"`, for SQL and for `pg_dump -t`.
    fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.quoted())
    }
}

impl std::str::FromStr for TableName {
    type Err = String;

    /// `name`, `schema.name`, either part in double quotes (`""` for a quote inside); an
    /// unquoted part folds to lower case, as SQL does. Without a schema, `public`.
    fn from_str(text: &str) -> Result<TableName, String> {
        TableName::parse_in(text, "public")
    }
}

impl TableName {
    /// Parses `text` as [`FromStr`](std::str::FromStr) does, with `schema` for a bare name.
    pub fn parse_in(text: &str, schema: &str) -> Result<TableName, String> {
        let bad = |why: &str| format!("{text:?} is not a table name ({why}): use SCHEMA.NAME");
        let mut parts = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(bad("an unclosed quote")),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' || c == '"' {
                        break;
                    }
                    part.extend(c.to_lowercase());
                    chars.next();
                }
            }
            if part.is_empty() || part.contains('\0') {
                return Err(bad("an empty part"));
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(_) => return Err(bad("a quote inside a name")),
            }
        }
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(TableName { schema, name }),
            Err(parts) if parts.len() == 1 => Ok(TableName {
                schema: schema.to_owned(),
                name: parts.into_iter().next().unwrap_or_default(),
            }),
            Err(_) => Err(bad("more than two parts")),
        }
    }
}

/// Where one table goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableDestination {
    /// This database, under the table's own name.
    Database(String),
    /// The backup's own database, under this name.
    Table(TableName),
}

impl Restorer<'_> {
    /// Restores one table of a database backup.
    pub async fn restore_table(
        &self,
        listed: &Listed,
        table: &TableName,
        destination: &TableDestination,
        force: bool,
    ) -> Result<(), Error> {
        let listed = &self.authenticate(listed).await?;
        let Content::Postgres { tables, .. } = &listed.manifest.content else {
            return Err(Error::Usage(format!(
                "backup {} is not a database backup: --table needs one",
                listed.id
            )));
        };
        let known: Vec<TableName> = tables.iter().filter_map(|t| t.table.parse().ok()).collect();
        if !known.contains(table) {
            let names: Vec<String> = known.iter().take(20).map(ToString::to_string).collect();
            return Err(Error::Usage(format!(
                "table {table} is not in backup {}; it holds {}{}",
                listed.id,
                if names.is_empty() {
                    "no tables".to_owned()
                } else {
                    names.join(", ")
                },
                if known.len() > names.len() {
                    ", ..."
                } else {
                    ""
                }
            )));
        }
        let (database, target) = match destination {
            TableDestination::Database(db) => (db.clone(), table.clone()),
            TableDestination::Table(new) => {
                let database = listed.manifest.source.database.clone().ok_or_else(|| {
                    Error::Internal("a database backup without its database's name".into())
                })?;
                (database, new.clone())
            }
        };
        if matches!(destination, TableDestination::Table(new) if new == table) {
            return Err(Error::Usage(format!(
                "--to-table {table} is the table itself: give a new name (or --to-db)"
            )));
        }
        let pg = self.pg()?;
        let admin = pg.clone().with_dbname("postgres").connect().await?;
        let sql = |what: &str, database: &str| {
            let (what, database) = (what.to_owned(), database.to_owned());
            move |source| Error::Sql {
                what,
                database,
                source,
            }
        };
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await
            .map_err(sql("looking up the target database", "postgres"))?
            .is_some();
        if exists {
            let client = pg.clone().with_dbname(&database).connect().await?;
            let taken = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&target.quoted()])
                .await
                .map_err(sql("looking up the target table", &database))?
                .get::<_, bool>(0);
            if taken && !force {
                return Err(Error::TargetNotEmpty(format!(
                    "table {target} in database {database:?}"
                )));
            }
        } else if matches!(destination, TableDestination::Table(_)) {
            return Err(Error::Usage(format!(
                "the backup's database {database:?} does not exist here: use --to-db"
            )));
        }
        self.check_identity(listed).await?;

        let server_major = postgres::server_version(&admin, "postgres").await? / 10_000;
        let tools = PgTools::find(self.pg_bin_dir, server_major, self.env)?;
        let scratch = super::scratch_name("backupd_table");
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE template0",
                quote_ident(&scratch)
            ))
            .await
            .map_err(sql("creating the scratch database", "postgres"))?;
        let created = !exists;
        let moved = async {
            if created {
                admin
                    .batch_execute(&format!(
                        "CREATE DATABASE {} TEMPLATE template0",
                        quote_ident(&database)
                    ))
                    .await
                    .map_err(sql("creating the target database", "postgres"))?;
            }
            self.fill_scratch(listed, &tools, &scratch, table).await?;
            let client = pg.clone().with_dbname(&scratch).connect().await?;
            let found = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
                .await
                .map_err(sql("looking up the restored table", &scratch))?
                .get::<_, bool>(0);
            if !found {
                return Err(Error::Usage(format!(
                    "table {table} is not in the dump of backup {}",
                    listed.id
                )));
            }
            if target != *table {
                let mut rename = format!(
                    "CREATE SCHEMA IF NOT EXISTS {}; ALTER TABLE {} SET SCHEMA {};",
                    quote_ident(&target.schema),
                    table.quoted(),
                    quote_ident(&target.schema)
                );
                rename.push_str(&format!(
                    "ALTER TABLE {}.{} RENAME TO {}",
                    quote_ident(&target.schema),
                    quote_ident(&table.name),
                    quote_ident(&target.name)
                ));
                client
                    .batch_execute(&rename)
                    .await
                    .map_err(sql("renaming the restored table", &scratch))?;
            }
            drop(client);
            let dest = pg.clone().with_dbname(&database).connect().await?;
            dest.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(&target.schema)
            ))
            .await
            .map_err(sql("creating the table's schema", &database))?;
            self.move_table(&tools, &scratch, &database, &target, force)
                .await
        }
        .await;
        drop_database(&admin, &scratch).await;
        if moved.is_err() && created {
            drop_database(&admin, &database).await;
        }
        moved?;
        tracing::info!(backup = %listed.id, %table, to = %target, %database, "table restored");
        Ok(())
    }

    /// `pg_restore -n SCHEMA -t NAME` of the checked backup into `scratch`.
    async fn fill_scratch(
        &self,
        listed: &Listed,
        tools: &PgTools,
        scratch: &str,
        table: &TableName,
    ) -> Result<(), Error> {
        let client = self.pg()?.clone().with_dbname(scratch).connect().await?;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(&table.schema)
            ))
            .await
            .map_err(|source| Error::Sql {
                what: "creating the table's schema".into(),
                database: scratch.to_owned(),
                source,
            })?;
        drop(client);
        let mut command = tools.command("pg_restore", self.env);
        command
            .args(["--exit-on-error", "--no-password"])
            .args(self.no_owner.then_some("--no-owner"))
            // pg_restore matches these names exactly, not as patterns.
            .arg("--schema")
            .arg(&table.schema)
            .arg("--table")
            .arg(&table.name)
            .arg("--dbname")
            .arg(format!("dbname={}", conninfo_quote(scratch)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            program: "pg_restore".into(),
            source,
        })?;
        let mut stdin = child.stdin.take().expect("pg_restore's stdin is piped");
        let errors = stderr_reader(child.stderr.take());
        let fed = self
            .stream_plain(listed, &self.spool_dir(), move |plain| {
                let copied = std::io::copy(plain, &mut stdin);
                drop(stdin);
                match copied {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::pipeline(e)),
                    _ => Ok(()),
                }
            })
            .await;
        let status = wait(child).await?;
        let errors = errors.join().unwrap_or_default();
        fed?;
        check("pg_restore", status, errors)
    }

    /// `pg_dump -t TABLE scratch | pg_restore --single-transaction -d DATABASE`.
    async fn move_table(
        &self,
        tools: &PgTools,
        scratch: &str,
        database: &str,
        table: &TableName,
        force: bool,
    ) -> Result<(), Error> {
        let mut dump = tools.command("pg_dump", self.env);
        dump.args(["--format=custom", "--no-password", "--strict-names"])
            .args(self.no_owner.then_some("--no-owner"))
            .arg("--table")
            .arg(table.quoted())
            .arg("--dbname")
            .arg(format!("dbname={}", conninfo_quote(scratch)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut dump = dump.spawn().map_err(|source| Error::Spawn {
            program: "pg_dump".into(),
            source,
        })?;
        let dump_errors = stderr_reader(dump.stderr.take());
        let archive = dump.stdout.take().expect("pg_dump's stdout is piped");
        let mut restore = tools.command("pg_restore", self.env);
        restore
            .args(["--exit-on-error", "--no-password", "--single-transaction"])
            .args(self.no_owner.then_some("--no-owner"))
            .args(
                force
                    .then_some(["--clean", "--if-exists"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--dbname")
            .arg(format!("dbname={}", conninfo_quote(database)))
            .stdin(Stdio::from(archive))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut restore = match restore.spawn() {
            Ok(child) => child,
            Err(source) => {
                let _ = dump.kill();
                let _ = wait(dump).await;
                return Err(Error::Spawn {
                    program: "pg_restore".into(),
                    source,
                });
            }
        };
        let restore_errors = stderr_reader(restore.stderr.take());
        let dumped = wait(dump).await?;
        let restored = wait(restore).await?;
        check("pg_dump", dumped, dump_errors.join().unwrap_or_default())?;
        check(
            "pg_restore",
            restored,
            restore_errors.join().unwrap_or_default(),
        )
    }
}

fn stderr_reader(stderr: Option<std::process::ChildStderr>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    })
}

async fn wait(mut child: std::process::Child) -> Result<std::process::ExitStatus, Error> {
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(|e| Error::Internal(format!("waiting for a child: {e}")))?
        .map_err(Error::pipeline)
}

fn check(program: &str, status: std::process::ExitStatus, errors: String) -> Result<(), Error> {
    if status.success() {
        Ok(())
    } else {
        Err(Error::Child {
            program: program.into(),
            status: status.to_string(),
            stderr: errors.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_as_sql_spells_them() {
        let name = |s: &str, n: &str| TableName {
            schema: s.into(),
            name: n.into(),
        };
        assert_eq!("items".parse(), Ok(name("public", "items")));
        assert_eq!("Shop.Items".parse(), Ok(name("shop", "items")));
        assert_eq!(
            r#""Odd Schema"."odd.""name""#.parse(),
            Ok(name("Odd Schema", "odd.\"name"))
        );
        assert_eq!(
            name("Odd Schema", "odd.\"name").to_string(),
            r#""Odd Schema"."odd.""name""#
        );
        for bad in ["", "a.", ".a", "a.b.c", "\"open", "a\"b\"", "\"\".x"] {
            assert!(bad.parse::<TableName>().is_err(), "{bad}");
        }
    }
}
