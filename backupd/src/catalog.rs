//! What a backup is on a target: its ID, where its objects live, and its manifest.
//!
//! Layout under a target: `SUBJECT/STAMP/data.EXT` then `SUBJECT/STAMP/manifest.json`, and
//! `SUBJECT/STAMP/verify.json` once a restore test ran. The subject is what was backed up
//! (`source` for folders and globals, `source.database` for databases); the stamp is the UTC
//! start time to the millisecond. The manifest is written last: a folder without one is an
//! incomplete backup, which no command restores from or counts.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The verification record's file name.
pub const VERIFY: &str = "verify.json";
/// The manifest format written by this version.
pub const FORMAT: u32 = 1;

const STAMP_FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";

/// A backup's ID: `SUBJECT@STAMP`, e.g. `shop.shop@20261125T031500.123Z`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupId {
    /// What was backed up.
    pub subject: String,
    /// When the backup started (UTC, millisecond precision).
    pub time: Timestamp,
}

impl BackupId {
    /// A new ID at `time`, truncated to milliseconds.
    pub fn new(subject: impl Into<String>, time: Timestamp) -> BackupId {
        let millis = time.as_millisecond();
        BackupId {
            subject: subject.into(),
            time: Timestamp::from_millisecond(millis).unwrap_or(time),
        }
    }

    /// The stamp part.
    pub fn stamp(&self) -> String {
        self.time.strftime(STAMP_FORMAT).to_string()
    }

    /// The folder of this backup relative to the target's root.
    pub fn dir(&self) -> String {
        format!("{}/{}", self.subject, self.stamp())
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.subject, self.stamp())
    }
}

impl FromStr for BackupId {
    type Err = String;

    fn from_str(text: &str) -> Result<BackupId, String> {
        let (subject, stamp) = text.rsplit_once('@').ok_or_else(|| {
            format!("{text:?} is not a backup ID (SUBJECT@STAMP, as `backupd list` prints)")
        })?;
        if !valid_subject(subject) {
            return Err(format!("{subject:?} is not a valid subject"));
        }
        let time =
            parse_stamp(stamp).ok_or_else(|| format!("{stamp:?} is not a backup time stamp"))?;
        Ok(BackupId {
            subject: subject.to_owned(),
            time,
        })
    }
}

/// Parses `20261125T031500.123Z`.
pub fn parse_stamp(stamp: &str) -> Option<Timestamp> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let (hms, millis) = time.split_once('.')?;
    if date.len() != 8
        || hms.len() != 6
        || millis.len() != 3
        || !(date.to_owned() + hms + millis)
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}.{}Z",
        &date[..4],
        &date[4..6],
        &date[6..],
        &hms[..2],
        &hms[2..4],
        &hms[4..],
        millis
    );
    text.parse().ok()
}

/// The subject of a source item: the source name, plus the database for postgres sources.
/// Characters outside `[A-Za-z0-9_.-]` in a database name are written `%XX`.
pub fn subject(source: &str, database: Option<&str>) -> String {
    match database {
        None => source.to_owned(),
        Some(db) => {
            let mut out = format!("{source}.");
            for byte in db.bytes() {
                if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.') {
                    out.push(byte as char);
                } else {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            out
        }
    }
}

/// Whether `subject` could have been made by [`subject`].
pub fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && !subject.starts_with('.')
        && subject
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'%'))
}

/// Everything known about a complete backup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// The backup's ID.
    pub id: String,
    /// What was backed up.
    pub source: SourceInfo,
    /// When the backup started.
    pub started_at: Timestamp,
    /// When the data was stored.
    pub finished_at: Timestamp,
    /// The stored data object.
    pub data: DataInfo,
    /// What the data holds, for checks after a restore.
    pub content: Content,
    /// Versions of the programs that made it.
    pub tools: Tools,
}

/// The source a backup came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    /// The source's name in the config.
    pub name: String,
    /// `postgres`, `globals` or `folder`.
    pub kind: String,
    /// The database, for postgres sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The folder, for folder sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The stored object and how it was encoded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DataInfo {
    /// Object name inside the backup's folder.
    pub object: String,
    /// Bytes stored.
    pub size: u64,
    /// SHA-256 of the bytes stored (hex).
    pub sha256: String,
    /// Bytes before compression.
    pub raw_size: u64,
    /// SHA-256 of the bytes before compression (hex), for globals and folders; database dumps
    /// are checked by restoring them instead, which keeps hashing off the dump's hot path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_sha256: Option<String>,
    /// `zstd`.
    pub compression: String,
    /// zstd level.
    pub compression_level: i32,
    /// age recipients it is encrypted to (empty: not encrypted).
    #[serde(default)]
    pub encrypted_to: Vec<String>,
}

impl DataInfo {
    /// Whether the data is age-encrypted.
    pub fn encrypted(&self) -> bool {
        !self.encrypted_to.is_empty()
    }
}

/// What a backup holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Content {
    /// A `pg_dump -Fc` archive.
    Postgres {
        /// Server version (`server_version_num`).
        server_version: u32,
        /// The database's owner, encoding, locale and access privileges, re-applied on restore
        /// (`pg_dump` keeps them only for `--create`, which restores under the old name).
        database: DatabaseInfo,
        /// Rows per table, counted in the snapshot the dump was taken from.
        tables: Vec<TableRows>,
        /// Entries in the archive's table of contents (`pg_restore --list`).
        toc_entries: u64,
    },
    /// `pg_dumpall --globals-only` SQL.
    Globals {
        /// Server version.
        server_version: u32,
    },
    /// A tar archive of a folder.
    Folder {
        /// Every entry, in archive order.
        entries: Vec<FileEntry>,
    },
}

/// Database-level properties.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseInfo {
    /// Owner role.
    pub owner: String,
    /// Encoding name.
    pub encoding: String,
    /// `LC_COLLATE`.
    pub collate: String,
    /// `LC_CTYPE`.
    pub ctype: String,
    /// `datacl` items (`grantee=privileges/grantor`); `None` means the defaults.
    pub acl: Option<Vec<String>>,
}

/// A table's row count.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TableRows {
    /// `schema.table`, quoted as needed.
    pub table: String,
    /// Rows.
    pub rows: i64,
}

/// One entry of a folder backup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the folder.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (seconds since the epoch).
    pub mtime: i64,
    /// Size in bytes (files).
    #[serde(default)]
    pub size: u64,
    /// SHA-256 (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Link target (symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// Program versions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tools {
    /// backupd's version.
    pub backupd: String,
    /// `pg_dump --version` (or `pg_dumpall`), for database backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_dump: Option<String>,
}

/// The outcome of a restore test.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerifyRecord {
    /// When the test ran.
    pub verified_at: Timestamp,
    /// Whether everything matched.
    pub ok: bool,
    /// What was checked, or what did not match.
    pub detail: String,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let time: Timestamp = "2026-11-25T03:15:00.123456Z".parse().unwrap();
        let id = BackupId::new("shop.shop", time);
        assert_eq!(id.to_string(), "shop.shop@20261125T031500.123Z");
        assert_eq!(id.dir(), "shop.shop/20261125T031500.123Z");
        assert_eq!(id.to_string().parse::<BackupId>().unwrap(), id);
        for bad in [
            "shop",
            "shop@2026",
            "@20261125T031500.123Z",
            "a/b@20261125T031500.123Z",
            "x@20261125T031500Z",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn odd_database_names_make_safe_subjects() {
        assert_eq!(subject("pg", Some("shop")), "pg.shop");
        assert_eq!(subject("pg", Some("my db/ü")), "pg.my%20db%2F%C3%BC");
        assert!(valid_subject(&subject("pg", Some("../etc"))));
        assert_eq!(subject("files", None), "files");
    }
}
