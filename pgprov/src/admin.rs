//! The admin connection: who pgprov is on the server, what it may do, and statements run with
//! a time limit and an error naming what was being done.
//!
//! Every round trip to the server goes through [`Admin`], so each one has a deadline
//! ([`TIMEOUT`]) and each failure says which role or database it was about.

use std::future::Future;
use std::time::Duration;

use labcore::pg::{PgClient, PgSettings};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::Error;

/// How long one statement (or connecting) may take before pgprov gives up. Generous:
/// `CREATE DATABASE` copies a template and `DROP DATABASE` removes files.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(120);

/// What the admin role may do.
#[derive(Clone, Debug)]
pub(crate) struct AdminRole {
    /// The role's name (`current_user`).
    pub(crate) name: String,
    /// Superuser: may do everything.
    pub(crate) superuser: bool,
    /// May create, alter and drop roles.
    pub(crate) createrole: bool,
    /// May create databases.
    pub(crate) createdb: bool,
}

/// A connection as the admin role to one database.
#[derive(Debug)]
pub(crate) struct Admin {
    settings: PgSettings,
    client: PgClient,
    role: AdminRole,
    database: String,
}

impl Admin {
    /// Connects with the admin settings and learns the admin role's privileges.
    pub(crate) async fn connect(settings: &PgSettings) -> Result<Admin, Error> {
        let what = format!("connecting to PostgreSQL at {}", settings.target());
        let client = match tokio::time::timeout(TIMEOUT, settings.connect()).await {
            Ok(client) => client?,
            Err(_) => {
                return Err(Error::Timeout {
                    what,
                    secs: TIMEOUT.as_secs(),
                });
            }
        };
        let row = timed(
            "reading the admin role's privileges",
            client.query_one(
                "SELECT current_user::text, r.rolsuper, r.rolcreaterole, r.rolcreatedb, \
                 current_database()::text \
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            ),
        )
        .await?;
        Ok(Admin {
            settings: settings.clone(),
            client,
            role: AdminRole {
                name: row.get(0),
                superuser: row.get(1),
                createrole: row.get(2),
                createdb: row.get(3),
            },
            database: row.get(4),
        })
    }

    /// The same admin, connected to database `name`.
    pub(crate) async fn database(&self, name: &str) -> Result<Admin, Error> {
        Admin::connect(&self.settings.clone().with_dbname(name)).await
    }

    /// The admin role.
    pub(crate) fn role(&self) -> &AdminRole {
        &self.role
    }

    /// The database this connection is in.
    pub(crate) fn current_database(&self) -> &str {
        &self.database
    }

    /// Fails with exit 77 unless the admin role is a superuser or holds the privileges asked
    /// for.
    pub(crate) fn require(&self, createrole: bool, createdb: bool) -> Result<(), Error> {
        if self.role.superuser {
            return Ok(());
        }
        let mut missing = Vec::new();
        if createrole && !self.role.createrole {
            missing.push("CREATEROLE");
        }
        if createdb && !self.role.createdb {
            missing.push("CREATEDB");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::NoPrivilege {
                role: self.role.name.clone(),
                missing: missing.join(" and "),
            })
        }
    }

    /// Runs a query with bind parameters; `what` names the work for the error message.
    pub(crate) async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        timed(what, self.client.query(sql, params)).await
    }

    /// Runs a query that returns exactly one row.
    pub(crate) async fn query_one(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        timed(what, self.client.query_one(sql, params)).await
    }

    /// Runs a query that returns at most one row.
    pub(crate) async fn query_opt(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        timed(what, self.client.query_opt(sql, params)).await
    }

    /// Runs statements over the simple query protocol. Several statements in one call run as
    /// one transaction; `CREATE DATABASE` and `DROP DATABASE` must be sent alone.
    pub(crate) async fn batch(&self, what: &str, sql: &str) -> Result<(), Error> {
        timed(what, self.client.batch_execute(sql)).await
    }
}

/// Awaits a driver call with [`TIMEOUT`].
async fn timed<T>(
    what: &str,
    call: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::Sql {
            what: what.to_owned(),
            source,
        }),
        Err(_) => Err(Error::Timeout {
            what: what.to_owned(),
            secs: TIMEOUT.as_secs(),
        }),
    }
}
