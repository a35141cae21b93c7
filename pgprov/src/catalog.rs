//! What the server holds: roles, databases, sessions, read from the system catalogs.
//!
//! A database is *provisioned* when a role of the same name owns it and that role is not a
//! superuser: the shape `pgprov create` makes. Only provisioned databases are listed by
//! default, dropped, or pruned.

use std::time::{Duration, Instant};

use crate::Error;
use crate::admin::Admin;
use crate::name::Name;

/// A role as the catalogs show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RoleInfo {
    /// Superuser.
    pub(crate) superuser: bool,
    /// May log in.
    pub(crate) can_login: bool,
    /// `CONNECTION LIMIT` (-1: none).
    pub(crate) connection_limit: i32,
}

/// A database as the catalogs show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DatabaseInfo {
    /// The owning role's name.
    pub(crate) owner: String,
    /// Whether it accepts connections.
    pub(crate) allow_connections: bool,
}

impl DatabaseInfo {
    /// Whether `pgprov create NAME` would have made this database.
    pub(crate) fn owned_by(&self, name: &Name) -> bool {
        self.owner == name.as_str()
    }
}

/// The role called `name`, if there is one.
pub(crate) async fn role(admin: &Admin, name: &str) -> Result<Option<RoleInfo>, Error> {
    let row = admin
        .query_opt(
            &format!("looking up role {name}"),
            "SELECT rolsuper, rolcanlogin, rolconnlimit FROM pg_roles WHERE rolname = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|row| RoleInfo {
        superuser: row.get(0),
        can_login: row.get(1),
        connection_limit: row.get(2),
    }))
}

/// The database called `name`, if there is one.
pub(crate) async fn database(admin: &Admin, name: &str) -> Result<Option<DatabaseInfo>, Error> {
    let row = admin
        .query_opt(
            &format!("looking up database {name}"),
            "SELECT pg_get_userbyid(datdba)::text, datallowconn FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|row| DatabaseInfo {
        owner: row.get(0),
        allow_connections: row.get(1),
    }))
}

/// Sessions other than pgprov's own in database `name` or logged in as role `name`.
pub(crate) async fn sessions(admin: &Admin, name: &Name) -> Result<i64, Error> {
    let row = admin
        .query_one(
            &format!("counting sessions of {name}"),
            "SELECT count(*) FROM pg_stat_activity \
             WHERE (datname = $1 OR usename = $1) AND pid <> pg_backend_pid()",
            &[&name.as_str()],
        )
        .await?;
    Ok(row.get(0))
}

/// [`sessions`], given up to `grace` to drop to zero: a client that just disconnected leaves
/// its server process behind for a moment, and `DROP DATABASE` itself waits 5 s for such.
pub(crate) async fn sessions_after(
    admin: &Admin,
    name: &Name,
    grace: Duration,
) -> Result<i64, Error> {
    let deadline = Instant::now() + grace;
    loop {
        let count = sessions(admin, name).await?;
        if count == 0 || Instant::now() >= deadline {
            return Ok(count);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The encoding of `template1`: `CREATE DATABASE ... ENCODING 'UTF8'` must copy `template0`
/// instead when it is not UTF8.
pub(crate) async fn template1_is_utf8(admin: &Admin) -> Result<bool, Error> {
    let row = admin
        .query_one(
            "reading template1's encoding",
            "SELECT pg_encoding_to_char(encoding) = 'UTF8' FROM pg_database \
             WHERE datname = 'template1'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The names of the provisioned databases, leaving out the admin role's own, for
/// `apply --prune`.
pub(crate) async fn provisioned(admin: &Admin) -> Result<Vec<String>, Error> {
    let rows = admin
        .query(
            "listing provisioned databases",
            "SELECT d.datname::text FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba \
             WHERE NOT d.datistemplate AND d.datname = r.rolname AND NOT r.rolsuper \
             AND r.rolname <> current_user ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
