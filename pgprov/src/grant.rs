//! Giving one service's role read or write access to another service's database.
//!
//! Access means: `CONNECT` on the database; `USAGE` on every schema in it; on every table,
//! view and sequence there, `SELECT` (read) or `SELECT, INSERT, UPDATE, DELETE` and sequence
//! `USAGE, UPDATE` (write); and default privileges, so tables, sequences and schemas the
//! database's owner creates later get the same grants. Everything inside the database is
//! granted in one transaction. Granting twice changes nothing.

use labcore::pg::quote_ident;

use crate::Error;
use crate::admin::Admin;
use crate::catalog;
use crate::name::Name;

/// Read-only or read-write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `SELECT` on tables, views and sequences.
    Read,
    /// Read, plus `INSERT`, `UPDATE`, `DELETE` on tables and `USAGE`, `UPDATE` on sequences.
    Write,
}

impl Access {
    fn table_privileges(self) -> &'static str {
        match self {
            Access::Read => "SELECT",
            Access::Write => "SELECT, INSERT, UPDATE, DELETE",
        }
    }

    fn sequence_privileges(self) -> &'static str {
        match self {
            Access::Read => "SELECT",
            Access::Write => "SELECT, USAGE, UPDATE",
        }
    }

    /// `read` or `write`, for messages.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// The schemas a grant covers: every schema but PostgreSQL's own.
const USER_SCHEMAS: &str = "SELECT nspname::text FROM pg_namespace WHERE nspname !~ '^pg_' AND nspname <> 'information_schema' ORDER BY 1";

/// Grants `role` `access` to database `database`.
pub(crate) async fn grant(
    admin: &Admin,
    role: &Name,
    database: &Name,
    access: Access,
) -> Result<(), Error> {
    if catalog::role(admin, role.as_str()).await?.is_none() {
        return Err(Error::Missing(format!("role {role} does not exist")));
    }
    let Some(db) = catalog::database(admin, database.as_str()).await? else {
        return Err(Error::Missing(format!(
            "database {database} does not exist"
        )));
    };
    let grantee = role.ident();
    admin
        .batch(
            &format!("granting role {role} CONNECT on database {database}"),
            &format!(
                "GRANT CONNECT ON DATABASE {} TO {grantee}",
                database.ident()
            ),
        )
        .await?;
    let inside = admin.database(database.as_str()).await?;
    let schemas = inside
        .query(
            &format!("listing the schemas of database {database}"),
            USER_SCHEMAS,
            &[],
        )
        .await?;
    let tables = access.table_privileges();
    let sequences = access.sequence_privileges();
    let owner = quote_ident(&db.owner);
    let mut sql = String::from("BEGIN");
    for row in schemas {
        let schema = quote_ident(row.get::<_, &str>(0));
        sql.push_str(&format!(
            "; GRANT USAGE ON SCHEMA {schema} TO {grantee}\
             ; GRANT {tables} ON ALL TABLES IN SCHEMA {schema} TO {grantee}\
             ; GRANT {sequences} ON ALL SEQUENCES IN SCHEMA {schema} TO {grantee}"
        ));
    }
    sql.push_str(&format!(
        "; ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT {tables} ON TABLES TO {grantee}\
         ; ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT {sequences} ON SEQUENCES TO {grantee}\
         ; ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT USAGE ON SCHEMAS TO {grantee}\
         ; COMMIT"
    ));
    inside
        .batch(
            &format!(
                "granting role {role} {} access in database {database}",
                access.as_str()
            ),
            &sql,
        )
        .await
}

/// Whether `role` already has read access to the database `inside` is connected to: it may
/// connect, use every schema, read every table, and the owner's future tables.
pub(crate) async fn has_read(inside: &Admin, role: &Name) -> Result<bool, Error> {
    let row = inside
        .query_one(
            &format!(
                "checking role {role}'s access to database {}",
                inside.current_database()
            ),
            "WITH s AS (SELECT oid FROM pg_namespace \
                 WHERE nspname !~ '^pg_' AND nspname <> 'information_schema') \
             SELECT has_database_privilege($1::text, current_database(), 'CONNECT') \
             AND NOT EXISTS (SELECT 1 FROM s WHERE NOT has_schema_privilege($1::text, s.oid, 'USAGE')) \
             AND NOT EXISTS (SELECT 1 FROM pg_class c JOIN s ON s.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') \
                 AND NOT has_table_privilege($1::text, c.oid, 'SELECT')) \
             AND EXISTS (SELECT 1 FROM pg_default_acl a, aclexplode(a.defaclacl) x \
                 WHERE a.defaclrole = (SELECT datdba FROM pg_database WHERE datname = current_database()) \
                 AND a.defaclnamespace = 0 AND a.defaclobjtype = 'r' \
                 AND x.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1::text) \
                 AND x.privilege_type = 'SELECT')",
            &[&role.as_str()],
        )
        .await?;
    Ok(row.get(0))
}
