//! `pgprov list`: the provisioned databases with owner, size and connection count.

use std::io::{self, Write};

use serde::Serialize;

use crate::Error;
use crate::admin::Admin;

/// One database in the listing.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Listed {
    /// The database.
    pub(crate) name: String,
    /// Its owner.
    pub(crate) owner: String,
    /// Its size in bytes (absent when the admin may not connect to it).
    pub(crate) size_bytes: Option<i64>,
    /// Its size for people (`7633 kB`).
    #[serde(skip)]
    pub(crate) size: Option<String>,
    /// Sessions connected to it now.
    pub(crate) connections: i64,
    /// The owner role's `CONNECTION LIMIT` (-1: none).
    pub(crate) connection_limit: i32,
}

/// The provisioned databases (a role of the same name owns them), or with `all` every
/// database but the templates.
pub(crate) async fn list(admin: &Admin, all: bool) -> Result<Vec<Listed>, Error> {
    let rows = admin
        .query(
            "listing databases",
            "SELECT d.datname::text, r.rolname::text, s.size, pg_size_pretty(s.size), \
                 (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid), \
                 r.rolconnlimit \
             FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba \
             CROSS JOIN LATERAL (SELECT CASE WHEN has_database_privilege(d.oid, 'CONNECT') \
                 THEN pg_database_size(d.oid) END AS size) s \
             WHERE NOT d.datistemplate AND ($1 OR (d.datname = r.rolname AND NOT r.rolsuper)) \
             ORDER BY 1",
            &[&all],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Listed {
            name: row.get(0),
            owner: row.get(1),
            size_bytes: row.get(2),
            size: row.get(3),
            connections: row.get(4),
            connection_limit: row.get(5),
        })
        .collect())
}

/// Aligned columns with a header line.
pub(crate) fn write_text(out: &mut impl Write, listed: &[Listed]) -> io::Result<()> {
    let width = |f: fn(&Listed) -> usize, header: &str| {
        listed
            .iter()
            .map(f)
            .chain([header.len()])
            .max()
            .unwrap_or(0)
    };
    let name_w = width(|l| l.name.len(), "NAME");
    let owner_w = width(|l| l.owner.len(), "OWNER");
    let size_w = width(|l| l.size.as_deref().map_or(1, str::len), "SIZE");
    writeln!(
        out,
        "{:name_w$}  {:owner_w$}  {:>size_w$}  {:>11}  LIMIT",
        "NAME", "OWNER", "SIZE", "CONNECTIONS"
    )?;
    for l in listed {
        let limit = match l.connection_limit {
            -1 => "-".to_owned(),
            n => n.to_string(),
        };
        writeln!(
            out,
            "{:name_w$}  {:owner_w$}  {:>size_w$}  {:>11}  {limit}",
            l.name,
            l.owner,
            l.size.as_deref().unwrap_or("-"),
            l.connections,
        )?;
    }
    Ok(())
}

/// One JSON object per line.
pub(crate) fn write_json(out: &mut impl Write, listed: &[Listed]) -> io::Result<()> {
    for l in listed {
        serde_json::to_writer(&mut *out, l)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Listed> {
        vec![Listed {
            name: "metabase".into(),
            owner: "metabase".into(),
            size_bytes: Some(7_816_000),
            size: Some("7633 kB".into()),
            connections: 2,
            connection_limit: -1,
        }]
    }

    #[test]
    fn text_has_a_header_and_aligned_rows() {
        let mut out = Vec::new();
        write_text(&mut out, &sample()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "NAME      OWNER        SIZE  CONNECTIONS  LIMIT\n\
             metabase  metabase  7633 kB            2  -\n"
        );
    }

    #[test]
    fn json_is_one_object_per_line() {
        let mut out = Vec::new();
        write_json(&mut out, &sample()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["size_bytes"], 7_816_000);
        assert_eq!(value["connection_limit"], -1);
        assert!(value.get("size").is_none());
    }
}
