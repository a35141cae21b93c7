//! Making, dropping and re-keying a service's role and database.
//!
//! `create` makes the login role (in one transaction, with its SCRAM verifier), then the
//! database owned by it (`CREATE DATABASE` cannot run in a transaction), then revokes
//! `PUBLIC`'s access. Any failure after the role exists removes what was made, so the server
//! holds either all of it or none of it. Credentials are prepared before the first statement
//! and published after the last; if publishing fails, the work is undone too, so a password
//! is never lost.
//!
//! `drop` removes the database first (the step that can be refused for open sessions), then
//! hands what the role owns in other databases to the admin, drops its remaining privileges,
//! and drops the role. Interrupted, it can simply be run again.

use std::path::PathBuf;
use std::time::Duration;

use labcore::Secret;
use labcore::pg::quote_ident;

use crate::admin::Admin;
use crate::catalog::{self, DatabaseInfo};
use crate::credentials::{Credentials, Endpoint, Sink};
use crate::name::{Name, quote_literal};
use crate::{Error, hba, password};

/// How `create` behaves.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CreateOptions {
    /// Succeed without doing anything when the role or database exists.
    pub(crate) if_not_exists: bool,
    /// The role's `CONNECTION LIMIT`.
    pub(crate) connection_limit: Option<i32>,
}

/// What `create` or `rotate` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Made; the credentials went to stdout (`None`) or this file.
    Done(Option<PathBuf>),
    /// The role or database was already there (`--if-not-exists`); the message says what.
    AlreadyThere(String),
}

/// Makes role and database `name` and publishes its credentials.
pub(crate) async fn create(
    admin: &Admin,
    name: &Name,
    options: CreateOptions,
    endpoint: &Endpoint,
    sink: &Sink,
) -> Result<Outcome, Error> {
    admin.require(true, true)?;
    if let Some(existing) = existing(admin, name).await? {
        if options.if_not_exists {
            return Ok(Outcome::AlreadyThere(existing));
        }
        return Err(Error::Exists(existing));
    }
    sink.check(name)?;
    let path = make_and_publish(admin, name, options.connection_limit, endpoint, sink).await?;
    Ok(Outcome::Done(path))
}

/// Makes role and database `name` with a new password and publishes its credentials; undoes
/// the work if they cannot be published. Warns when `pg_hba.conf` keeps the role out.
pub(crate) async fn make_and_publish(
    admin: &Admin,
    name: &Name,
    connection_limit: Option<i32>,
    endpoint: &Endpoint,
    sink: &Sink,
) -> Result<Option<PathBuf>, Error> {
    let password = password::generate()?;
    let pending = sink.prepare(&Credentials {
        endpoint,
        name,
        password: &password,
    })?;
    make(admin, name, &password, connection_limit).await?;
    match pending.publish() {
        Ok(path) => {
            hba::warn(name, &hba::check(admin, name).await);
            Ok(path)
        }
        Err(err) => Err(undo(admin, name, err).await),
    }
}

/// What of `name` exists already, as a message; `None` when neither role nor database does.
pub(crate) async fn existing(admin: &Admin, name: &Name) -> Result<Option<String>, Error> {
    let role = catalog::role(admin, name.as_str()).await?;
    let database = catalog::database(admin, name.as_str()).await?;
    Ok(match (role, database) {
        (None, None) => None,
        (Some(_), Some(db)) if db.owned_by(name) => {
            Some(format!("role and database {name} already exist"))
        }
        (Some(_), Some(db)) => Some(format!(
            "role {name} and database {name} already exist (the database is owned by {})",
            db.owner
        )),
        (Some(_), None) => Some(format!(
            "role {name} already exists (without a database {name})"
        )),
        (None, Some(db)) => Some(format!(
            "database {name} already exists (owned by {})",
            db.owner
        )),
    })
}

/// Creates the role, its database and the `PUBLIC` revoke; on failure removes what it made.
async fn make(
    admin: &Admin,
    name: &Name,
    password: &Secret,
    connection_limit: Option<i32>,
) -> Result<(), Error> {
    let ident = name.ident();
    let template = if catalog::template1_is_utf8(admin).await? {
        "template1"
    } else {
        "template0"
    };
    // The verifier goes inline (there is no bind parameter in CREATE ROLE); the server may
    // log it, never the password.
    let mut sql = format!(
        "CREATE ROLE {ident} LOGIN PASSWORD {}",
        quote_literal(&password::verifier(password))
    );
    if let Some(limit) = connection_limit {
        sql.push_str(&format!(" CONNECTION LIMIT {limit}"));
    }
    if !admin.role().superuser {
        // A non-superuser may only create a database owned by a role it is a member of; the
        // membership also lets it drop, rotate and grant later.
        sql.push_str(&format!(
            "; GRANT {ident} TO {}",
            quote_ident(&admin.role().name)
        ));
    }
    tracing::debug!("creating role {name}");
    admin.batch(&format!("creating role {name}"), &sql).await?;
    let steps = [
        (
            format!("creating database {name}"),
            format!("CREATE DATABASE {ident} OWNER {ident} ENCODING 'UTF8' TEMPLATE {template}"),
        ),
        (
            format!("revoking PUBLIC's access to database {name}"),
            format!("REVOKE ALL ON DATABASE {ident} FROM PUBLIC"),
        ),
    ];
    for (what, sql) in steps {
        tracing::debug!("{what}");
        if let Err(err) = admin.batch(&what, &sql).await {
            return Err(undo(admin, name, err).await);
        }
    }
    Ok(())
}

/// Removes role `name` and, if the role owns it, database `name`, after `err`; returns the
/// error to report (with the undo's own failure, if any).
async fn undo(admin: &Admin, name: &Name, err: Error) -> Error {
    tracing::debug!(%name, "undoing a partial create");
    let ident = name.ident();
    let result = async {
        // A database of that name owned by someone else is theirs: never drop it.
        let ours = catalog::database(admin, name.as_str())
            .await?
            .is_some_and(|db| db.owned_by(name));
        if ours {
            admin
                .batch(
                    &format!("dropping database {name}"),
                    &format!("DROP DATABASE {ident} WITH (FORCE)"),
                )
                .await?;
        }
        admin
            .batch(
                &format!("dropping role {name}"),
                &format!("DROP ROLE IF EXISTS {ident}"),
            )
            .await
    }
    .await;
    match result {
        Ok(()) => err,
        Err(undo) => Error::Undo {
            error: Box::new(err),
            left: format!("role {name} (and maybe its database)"),
            undo: Box::new(undo),
        },
    }
}

/// How long `drop` without `--force` waits for sessions to end, as `DROP DATABASE` does.
const SESSION_GRACE: Duration = Duration::from_secs(5);

/// What `drop` is about to remove, for the confirmation prompt.
#[derive(Debug)]
pub(crate) struct DropPlan {
    /// The name.
    pub(crate) name: Name,
    /// Whether the role exists.
    pub(crate) role: bool,
    /// The database's size (`pg_size_pretty`), if it exists.
    pub(crate) database_size: Option<String>,
    /// Sessions in the database or as the role.
    pub(crate) sessions: i64,
}

/// Drops database `name` and role `name`. `confirm` sees what will go and may refuse.
/// Returns `false` when neither existed.
pub(crate) async fn drop(
    admin: &Admin,
    name: &Name,
    force: bool,
    confirm: impl FnOnce(&DropPlan) -> Result<(), Error>,
) -> Result<bool, Error> {
    admin.require(true, false)?;
    let role = catalog::role(admin, name.as_str()).await?;
    let database = catalog::database(admin, name.as_str()).await?;
    if role.is_none() && database.is_none() {
        return Ok(false);
    }
    if let Some(db) = &database {
        refuse_foreign(name, db)?;
    }
    if role.as_ref().is_some_and(|r| r.superuser) {
        return Err(Error::Refused(format!(
            "role {name} is a superuser: pgprov does not drop superusers"
        )));
    }
    let sessions = if force {
        catalog::sessions(admin, name).await?
    } else {
        catalog::sessions_after(admin, name, SESSION_GRACE).await?
    };
    if sessions > 0 && !force {
        return Err(Error::Busy {
            what: format!("{name} (database or role)"),
            sessions,
        });
    }
    let database_size = match database {
        Some(_) => Some(
            admin
                .query_one(
                    &format!("measuring database {name}"),
                    "SELECT pg_size_pretty(pg_database_size($1))",
                    &[&name.as_str()],
                )
                .await?
                .get(0),
        ),
        None => None,
    };
    confirm(&DropPlan {
        name: name.clone(),
        role: role.is_some(),
        database_size,
        sessions,
    })?;
    let ident = name.ident();
    if force && role.is_some() {
        admin
            .query(
                &format!("terminating the sessions of role {name}"),
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE usename = $1 AND pid <> pg_backend_pid()",
                &[&name.as_str()],
            )
            .await?;
    }
    if database.is_some() {
        let with = if force { " WITH (FORCE)" } else { "" };
        admin
            .batch(
                &format!("dropping database {name}"),
                &format!("DROP DATABASE {ident}{with}"),
            )
            .await?;
    }
    if role.is_some() {
        drop_role(admin, name).await?;
    }
    Ok(true)
}

/// Refuses to touch a database that a role of its own name does not own.
pub(crate) fn refuse_foreign(name: &Name, db: &DatabaseInfo) -> Result<(), Error> {
    if db.owned_by(name) {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "database {name} is owned by role {}, not by {name}: pgprov did not make it and \
             leaves it alone",
            db.owner
        )))
    }
}

/// Hands what role `name` owns in every database to the admin, revokes its privileges, and
/// drops it.
async fn drop_role(admin: &Admin, name: &Name) -> Result<(), Error> {
    let ident = name.ident();
    let cleanup = format!("REASSIGN OWNED BY {ident} TO CURRENT_USER; DROP OWNED BY {ident}");
    // Only databases holding something that depends on the role need a visit.
    let rows = admin
        .query(
            &format!("finding what role {name} owns or may use"),
            "SELECT DISTINCT d.datname::text FROM pg_shdepend s \
             JOIN pg_database d ON d.oid = s.dbid \
             WHERE s.refclassid = 'pg_authid'::regclass \
             AND s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = $1) \
             AND d.datname <> current_database() AND d.datallowconn",
            &[&name.as_str()],
        )
        .await?;
    for row in rows {
        let database: String = row.get(0);
        let there = admin.database(&database).await?;
        there
            .batch(
                &format!("handing what role {name} owns in database {database} to the admin"),
                &cleanup,
            )
            .await?;
    }
    admin
        .batch(
            &format!("dropping role {name}"),
            &format!("{cleanup}; DROP ROLE {ident}"),
        )
        .await
}

/// Gives role `name` a new password; the old one stops working at once.
pub(crate) async fn rotate(
    admin: &Admin,
    name: &Name,
    endpoint: &Endpoint,
    sink: &Sink,
) -> Result<Outcome, Error> {
    admin.require(true, false)?;
    let Some(role) = catalog::role(admin, name.as_str()).await? else {
        return Err(Error::Missing(format!("role {name} does not exist")));
    };
    if role.superuser || !role.can_login {
        return Err(Error::Refused(format!(
            "role {name} is {}: pgprov rotates only service login roles",
            if role.superuser {
                "a superuser"
            } else {
                "not a login role"
            }
        )));
    }
    sink.check(name)?;
    // A superuser can read the current verifier, so a failure to publish the new password
    // can put the old one back.
    let old: Option<Secret> = if admin.role().superuser {
        admin
            .query_opt(
                &format!("reading role {name}'s verifier"),
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&name.as_str()],
            )
            .await?
            .and_then(|row| row.get::<_, Option<String>>(0))
            .map(Secret::new)
    } else {
        None
    };
    let password = password::generate()?;
    let pending = sink.prepare(&Credentials {
        endpoint,
        name,
        password: &password,
    })?;
    let set_verifier = |verifier: &str| {
        format!(
            "ALTER ROLE {} PASSWORD {}",
            name.ident(),
            quote_literal(verifier)
        )
    };
    admin
        .batch(
            &format!("setting role {name}'s password"),
            &set_verifier(&password::verifier(&password)),
        )
        .await?;
    match pending.publish() {
        Ok(path) => Ok(Outcome::Done(path)),
        Err(err) => {
            let Some(old) = old else {
                return Err(Error::Undo {
                    error: Box::new(err),
                    left: format!("role {name} with a password nobody has"),
                    undo: Box::new(Error::Refused(
                        "the old password cannot be restored without a superuser; run \
                         pgprov rotate again"
                            .to_owned(),
                    )),
                });
            };
            match admin
                .batch(
                    &format!("restoring role {name}'s old password"),
                    &set_verifier(old.expose()),
                )
                .await
            {
                Ok(()) => Err(err),
                Err(undo) => Err(Error::Undo {
                    error: Box::new(err),
                    left: format!("role {name} with a password nobody has"),
                    undo: Box::new(undo),
                }),
            }
        }
    }
}
