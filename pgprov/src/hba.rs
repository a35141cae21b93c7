//! Checking that `pg_hba.conf` lets a new role log in over TCP with its password.
//!
//! Services in containers reach the host's PostgreSQL over the Docker bridge, so a role that
//! only `local` lines admit is useless to them. After `create`, pgprov reads
//! `pg_hba_file_rules` and, when no `host*` line matching the role and its database uses
//! `scram-sha-256` (or `md5`, which runs SCRAM for a SCRAM verifier), warns with the line to
//! add. The check only warns: the role and database are already made, and reading the view
//! needs a superuser.

use crate::admin::Admin;
use crate::name::Name;

/// What `pg_hba.conf` says about a role logging in over TCP.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HbaCheck {
    /// A `host*` line admits the role with a password.
    Allowed,
    /// No line does.
    NoRule,
    /// The rules could not be read (the message says why).
    Unknown(String),
}

/// Whether a `host*` line lets `name` log in to database `name` with SCRAM.
pub(crate) async fn check(admin: &Admin, name: &Name) -> HbaCheck {
    let found = admin
        .query_one(
            "reading pg_hba_file_rules",
            "SELECT EXISTS (\
               SELECT 1 FROM pg_hba_file_rules h \
               WHERE h.error IS NULL AND h.type LIKE 'host%' \
               AND h.auth_method IN ('scram-sha-256', 'md5') \
               AND h.database && ARRAY['all', $1::text, 'sameuser', 'samerole'] \
               AND EXISTS (SELECT 1 FROM unnest(h.user_name) u \
                 WHERE u = 'all' OR u = $1::text OR (u LIKE '+%' AND EXISTS (\
                   SELECT 1 FROM pg_roles g WHERE g.rolname = substr(u, 2) \
                   AND pg_has_role($1::text, g.oid, 'MEMBER')))))",
            &[&name.as_str()],
        )
        .await;
    match found {
        Ok(row) if row.get::<_, bool>(0) => HbaCheck::Allowed,
        Ok(_) => HbaCheck::NoRule,
        Err(err) => HbaCheck::Unknown(labcore::exit::chain(&err)),
    }
}

/// The `pg_hba.conf` line that admits `name` from the Docker bridge networks.
pub(crate) fn suggested_line(name: &Name) -> String {
    format!("host    {name}    {name}    172.16.0.0/12    scram-sha-256")
}

/// Prints the warning for `check`'s answer on stderr, if it needs one.
pub(crate) fn warn(name: &Name, check: &HbaCheck) {
    match check {
        HbaCheck::Allowed => {}
        HbaCheck::NoRule => eprintln!(
            "pgprov: warning: no pg_hba.conf line lets role {name} log in to database {name} \
             over TCP with a password (scram-sha-256); add one for the network your services \
             connect from (172.16.0.0/12 holds Docker's bridge networks), then run \
             SELECT pg_reload_conf():\n{}",
            suggested_line(name)
        ),
        HbaCheck::Unknown(why) => eprintln!(
            "pgprov: warning: cannot check pg_hba.conf ({why}); make sure a line like this \
             admits role {name}:\n{}",
            suggested_line(name)
        ),
    }
}
