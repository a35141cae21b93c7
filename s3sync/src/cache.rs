//! The state cache: what s3sync saw of each object it wrote, read or compared between a local
//! folder and an S3 prefix, so that a re-sync can tell "unchanged" from the listing and a local
//! `stat` alone instead of one `HeadObject` per same-sized file.
//!
//! Without the cache, "unchanged" means: same size, and the object's `x-amz-meta-mtime`
//! (fetched with a `HeadObject`) equals the local file's mtime. A record stands in for that
//! `HeadObject` and for nothing else. It says: the object version with this size, ETag and
//! `LastModified` carried the mtime a local file of this size and mtime has. It is made only
//! where s3sync knew the object's mtime metadata for certain: right after uploading the file
//! (the metadata is what s3sync sent), after downloading the object (the file got the
//! metadata's mtime), or after a `HeadObject` that found the two equal. A record is trusted
//! only when all of these hold:
//!
//! - the local file's size and mtime (to the nanosecond) equal the recorded ones;
//! - the listed object's size equals the recorded one, and so does its ETag when the store
//!   lists ETags;
//! - its listed `LastModified` equals the recorded one. Right after its own `PutObject`
//!   s3sync knows no `LastModified` (the answer carries none), only the server's `Date` of the
//!   answer: the first listing afterwards then accepts a `LastModified` in that second or the
//!   one before, and the record keeps the exact value from then on.
//!
//! Anything else (no record, a record that does not match, a cold or corrupt cache) goes the
//! `HeadObject` way, as without the cache. What the cache cannot see, the `HeadObject` way
//! cannot either: a local edit that keeps size and mtime (use `--checksum`). What only the
//! cache could miss: on a store whose listings carry no ETags, another writer replacing the
//! object with one of the same size within the same second as s3sync's own write; AWS, MinIO,
//! Garage and Ceph all list ETags, which close that gap.
//!
//! Between two stores (a sync streamed from one store's prefix to another's) the same records
//! stand for the two `HeadObject`s that compare the objects' mtime metadata, with the source
//! object's listed size and `LastModified` in place of the local file's size and mtime: made
//! after a copy (dated by the `PutObject` answer) or after the two `HeadObject`s found the same
//! mtime, trusted only while both listings still show those versions.
//!
//! One cache file per endpoint, bucket, prefix and local folder (or source prefix), under
//! `$XDG_CACHE_HOME/labkit/s3sync/` (or `~/.cache/...`), JSON with a format version. It is
//! replaced whole by a rename, so a reader sees the old or the new file, never half of one; a
//! file that does not parse, has another version or describes another pair is ignored with a
//! warning. Records are facts about object versions, so a stale record is never wrong, only
//! useless: concurrent runs that overwrite each other's file cost `HeadObject`s, not errors.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use labcore::Env;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::tree::Entry;

/// The `format` field of every cache file.
const FORMAT: &str = "labkit-s3sync-state";
/// Bumped whenever the meaning of a record changes; other versions are ignored.
const VERSION: u32 = 1;

/// The pair of places a cache file describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Pair {
    endpoint: String,
    bucket: String,
    prefix: String,
    root: String,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: String,
    version: u32,
    pair: Pair,
    records: HashMap<String, Record>,
}

/// What s3sync knew about one file and its object at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Size of the file and of the object.
    #[serde(rename = "s")]
    pub(crate) size: u64,
    /// The local file's mtime, nanoseconds since the epoch.
    #[serde(rename = "m")]
    pub(crate) mtime: i64,
    /// The object's ETag, without quotes.
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub(crate) etag: Option<String>,
    /// The object's `LastModified` as listings show it, nanoseconds since the epoch.
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub(crate) listed: Option<i64>,
    /// Seconds since the epoch of the server's `Date` answering s3sync's own upload, while
    /// `listed` is not known yet.
    #[serde(rename = "w", default, skip_serializing_if = "Option::is_none")]
    pub(crate) written: Option<i64>,
}

/// Nanoseconds since the epoch, if they fit an `i64` (years 1678 to 2262).
pub(crate) fn nanos(time: SystemTime) -> Option<i64> {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).ok(),
        Err(e) => i64::try_from(e.duration().as_nanos()).ok().map(|n| -n),
    }
}

/// An ETag without its quotes, the way records keep it.
pub(crate) fn bare_etag(etag: &str) -> &str {
    etag.trim().trim_matches('"')
}

/// The state of one local folder and S3 prefix pair: the records read at the start of a run,
/// and those made during it.
#[derive(Debug)]
pub(crate) struct Cache {
    path: PathBuf,
    pair: Pair,
    old: HashMap<String, Record>,
    /// Whether `old` came from a readable file (an empty cache is still written once).
    loaded: bool,
    fresh: Mutex<HashMap<String, Record>>,
}

impl Cache {
    /// The cache folder: `$XDG_CACHE_HOME/labkit/s3sync`, else `~/.cache/labkit/s3sync`.
    pub(crate) fn folder(env: &Env) -> Option<PathBuf> {
        let base = env
            .path("XDG_CACHE_HOME")
            .filter(|p| p.is_absolute())
            .or_else(|| env.home().map(|h| h.join(".cache")))?;
        Some(base.join("labkit").join("s3sync"))
    }

    /// Loads the cache of `root` and `s3://bucket/prefix` on `endpoint` from `folder`; a
    /// missing file is an empty cache, an unusable one is ignored with a warning.
    pub(crate) fn load(
        folder: &Path,
        endpoint: &str,
        bucket: &str,
        prefix: &str,
        root: &Path,
    ) -> Cache {
        // A download's folder may not exist yet: then its parent names it.
        let root = std::fs::canonicalize(root)
            .ok()
            .or_else(|| {
                let parent = std::fs::canonicalize(root.parent()?).ok()?;
                Some(parent.join(root.file_name()?))
            })
            .unwrap_or_else(|| root.to_owned());
        Cache::load_pair(
            folder,
            endpoint,
            bucket,
            prefix,
            root.to_string_lossy().into_owned(),
        )
    }

    /// Loads the cache of a copy from another store's prefix (`source`, such as
    /// `ENDPOINT s3://bucket/prefix/`) to `s3://bucket/prefix` on `endpoint`. Its records
    /// stand for the two `HeadObject`s that compare the objects' mtime metadata: the source
    /// object's `LastModified` takes the place of a local file's mtime.
    pub(crate) fn load_for_copy(
        folder: &Path,
        endpoint: &str,
        bucket: &str,
        prefix: &str,
        source: &str,
    ) -> Cache {
        Cache::load_pair(folder, endpoint, bucket, prefix, format!("s3 {source}"))
    }

    fn load_pair(folder: &Path, endpoint: &str, bucket: &str, prefix: &str, root: String) -> Cache {
        let pair = Pair {
            endpoint: endpoint.to_owned(),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            root,
        };
        let id = serde_json::to_vec(&pair).expect("a pair of strings serializes");
        let name: String = Md5::digest(&id)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = folder.join(format!("{name}.json"));
        let old = match std::fs::read(&path) {
            Ok(bytes) => match parse(&bytes, &pair) {
                Ok(records) => Some(records),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), "ignoring the state cache: {reason}; this run compares with HeadObject and rewrites it");
                    None
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => {
                tracing::warn!(path = %path.display(), "ignoring the state cache: {err}");
                None
            }
        };
        Cache {
            path,
            pair,
            loaded: old.is_some(),
            old: old.unwrap_or_default(),
            fresh: Mutex::new(HashMap::new()),
        }
    }

    /// The file this cache is kept in.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the records prove that `object` (from a listing) still holds what the local
    /// file (`size`, `mtime`) holds, without asking the store. A proof is kept for the next run.
    pub(crate) fn proves_unchanged(
        &self,
        rel: &str,
        size: u64,
        mtime: Option<SystemTime>,
        object: &Entry,
    ) -> bool {
        let Some(record) = self.old.get(rel) else {
            return false;
        };
        let (Some(mtime), Some(listed)) = (mtime.and_then(nanos), object.uploaded.and_then(nanos))
        else {
            return false;
        };
        if record.size != size || object.size != size || record.mtime != mtime {
            return false;
        }
        let etag = object.etag.as_deref().map(bare_etag);
        if etag.is_some() && record.etag.as_deref() != etag {
            return false;
        }
        let proven = match (record.listed, record.written) {
            (Some(recorded), _) => recorded == listed,
            (None, Some(date)) => {
                let second = listed.div_euclid(1_000_000_000);
                second == date || second == date - 1
            }
            (None, None) => false,
        };
        if proven {
            self.record(
                rel,
                Record {
                    etag: etag.map(str::to_owned).or_else(|| record.etag.clone()),
                    listed: Some(listed),
                    written: None,
                    ..record.clone()
                },
            );
        }
        proven
    }

    /// Keeps a record made during this run.
    pub(crate) fn record(&self, rel: &str, record: Record) {
        self.fresh
            .lock()
            .expect("the cache lock is never poisoned: nothing panics holding it")
            .insert(rel.to_owned(), record);
    }

    /// Writes the records of this run, and the earlier ones of entries it did not settle
    /// unless `gone` says they no longer exist or `unsettled` says they were tried and
    /// failed; replaces the file atomically. A failure is a warning: the cache only saves time.
    pub(crate) fn save(self, unsettled: &HashSet<String>, gone: impl Fn(&str) -> bool) {
        let mut records = self
            .fresh
            .into_inner()
            .expect("the cache lock is never poisoned: nothing panics holding it");
        for (rel, record) in &self.old {
            if !records.contains_key(rel) && !unsettled.contains(rel) && !gone(rel) {
                records.insert(rel.clone(), record.clone());
            }
        }
        if records == self.old && self.loaded {
            // A run that learned nothing leaves the file as it is.
            return;
        }
        let file = CacheFile {
            format: FORMAT.to_owned(),
            version: VERSION,
            pair: self.pair,
            records,
        };
        if let Err(err) = write_atomically(&self.path, &file) {
            tracing::warn!(path = %self.path.display(), "could not save the state cache: {err}");
        }
    }
}

fn parse(bytes: &[u8], pair: &Pair) -> Result<HashMap<String, Record>, String> {
    #[derive(Deserialize)]
    struct Head {
        format: String,
        version: u32,
    }
    let head: Head =
        serde_json::from_slice(bytes).map_err(|e| format!("it is not a cache file ({e})"))?;
    if head.format != FORMAT {
        return Err(format!("it is not a cache file (format {:?})", head.format));
    }
    if head.version != VERSION {
        return Err(format!(
            "it has format version {}, this s3sync reads {VERSION}",
            head.version
        ));
    }
    let file: CacheFile =
        serde_json::from_slice(bytes).map_err(|e| format!("it is damaged ({e})"))?;
    if &file.pair != pair {
        return Err("it describes another folder and prefix".into());
    }
    Ok(file.records)
}

fn write_atomically(path: &Path, file: &CacheFile) -> std::io::Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder)?;
    let temp = folder.join(format!(
        ".{}.{:08x}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&temp)?);
        serde_json::to_writer(&mut out, file)?;
        out.flush()?;
        drop(out);
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn object(size: u64, etag: Option<&str>, listed: SystemTime) -> Entry {
        Entry {
            rel: "a".into(),
            size,
            mtime: None,
            uploaded: Some(listed),
            etag: etag.map(str::to_owned),
        }
    }

    fn cache_with(record: Record) -> Cache {
        Cache {
            path: PathBuf::from("/nonexistent/cache.json"),
            pair: Pair {
                endpoint: "e".into(),
                bucket: "b".into(),
                prefix: String::new(),
                root: "/r".into(),
            },
            old: HashMap::from([("a".to_owned(), record)]),
            loaded: true,
            fresh: Mutex::new(HashMap::new()),
        }
    }

    const MTIME: i64 = 1_700_000_000_123_456_789;

    fn local() -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(MTIME as u64)
    }

    #[test]
    fn a_record_proves_only_the_exact_file_and_object_version() {
        let listed = UNIX_EPOCH + Duration::from_millis(1_800_000_000_250);
        let cache = cache_with(Record {
            size: 10,
            mtime: MTIME,
            etag: Some("abc".into()),
            listed: nanos(listed),
            written: None,
        });
        assert!(cache.proves_unchanged(
            "a",
            10,
            Some(local()),
            &object(10, Some("\"abc\""), listed)
        ));
        // Not listing ETags is fine; listing another one is not.
        assert!(cache.proves_unchanged("a", 10, Some(local()), &object(10, None, listed)));
        assert!(!cache.proves_unchanged(
            "a",
            10,
            Some(local()),
            &object(10, Some("\"abd\""), listed)
        ));
        let later = listed + Duration::from_millis(1);
        assert!(!cache.proves_unchanged("a", 10, Some(local()), &object(10, None, later)));
        assert!(!cache.proves_unchanged("a", 11, Some(local()), &object(11, None, listed)));
        let touched = local() + Duration::from_nanos(1);
        assert!(!cache.proves_unchanged("a", 10, Some(touched), &object(10, None, listed)));
        assert!(!cache.proves_unchanged("b", 10, Some(local()), &object(10, None, listed)));
    }

    #[test]
    fn an_upload_is_proven_by_a_last_modified_in_its_answers_second_and_then_pinned() {
        let date = 1_800_000_000;
        let cache = cache_with(Record {
            size: 10,
            mtime: MTIME,
            etag: Some("abc".into()),
            listed: None,
            written: Some(date),
        });
        let at = |ms: u64| object(10, None, UNIX_EPOCH + Duration::from_millis(ms));
        assert!(cache.proves_unchanged("a", 10, Some(local()), &at(1_800_000_000_999)));
        assert!(cache.proves_unchanged("a", 10, Some(local()), &at(1_799_999_999_000)));
        assert!(!cache.proves_unchanged("a", 10, Some(local()), &at(1_800_000_001_000)));
        assert!(!cache.proves_unchanged("a", 10, Some(local()), &at(1_799_999_998_999)));
        let fresh = cache.fresh.lock().unwrap();
        assert_eq!(fresh["a"].listed, Some(1_799_999_999_000_000_000));
        assert_eq!(fresh["a"].written, None);
    }

    #[test]
    fn damaged_foreign_and_newer_files_are_refused() {
        let pair = Pair {
            endpoint: "e".into(),
            bucket: "b".into(),
            prefix: "p/".into(),
            root: "/r".into(),
        };
        assert!(parse(b"{\"format\":", &pair).is_err());
        assert!(parse(b"[]", &pair).is_err());
        let newer = format!("{{\"format\":\"{FORMAT}\",\"version\":99}}");
        assert!(
            parse(newer.as_bytes(), &pair)
                .unwrap_err()
                .contains("version 99")
        );
        let file = CacheFile {
            format: FORMAT.into(),
            version: VERSION,
            pair: Pair {
                bucket: "other".into(),
                ..pair.clone()
            },
            records: HashMap::new(),
        };
        let bytes = serde_json::to_vec(&file).unwrap();
        assert!(parse(&bytes, &pair).unwrap_err().contains("another"));
        let file = CacheFile {
            pair: pair.clone(),
            ..file
        };
        assert!(parse(&serde_json::to_vec(&file).unwrap(), &pair).is_ok());
    }
}
