//! The `[[cluster]]` table: a PostgreSQL cluster whose WAL is archived and whose physical base
//! backups are taken, for point-in-time recovery.
//!
//! ```toml
//! [[cluster]]
//! name = "main"                         # objects go under cluster/main/ on the target
//! target = "s3"                         # default: the first [[target]]
//! spool_dir = "/var/lib/postgresql/backupd-spool"   # writable by the postgres user
//! spool_max_mb = 1024                   # beyond this wal-push fails and PostgreSQL retries
//! parallel = 4                          # uploads at once when segments queue up
//! archive_timeout_secs = 60             # how long basebackup waits for its last segment
//! upload_timeout_secs = 10              # a store that does not answer: spool the segment
//! ```
//!
//! Base backups are kept by the file's `[retention]` counts, like dumps; WAL older than the
//! oldest kept base backup's first segment is pruned with them.
//!
//! Invariants: a resolved [`Cluster`] has a valid name (it is a path part of object keys), a
//! target that exists in the file, a spool bound above one segment, and at least one upload at
//! a time.

use std::path::PathBuf;
use std::time::Duration;

use labcore::Env;
use labcore::config::{ConfigError, ConfigFile};
use serde::Deserialize;

/// The table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    name: String,
    target: Option<String>,
    spool_dir: Option<PathBuf>,
    spool_max_mb: Option<u64>,
    parallel: Option<usize>,
    archive_timeout_secs: Option<u64>,
    upload_timeout_secs: Option<u64>,
}

/// A resolved cluster.
#[derive(Clone, Debug)]
pub(crate) struct Cluster {
    /// Its name, unique in the file.
    pub(crate) name: String,
    /// The target its WAL and base backups go to.
    pub(crate) target: String,
    /// The local spool of segments not yet stored.
    pub(crate) spool_dir: PathBuf,
    /// The spool's bound in bytes.
    pub(crate) spool_max: u64,
    /// Uploads at once.
    pub(crate) parallel: usize,
    /// How long a base backup waits for the WAL it needs to be archived.
    pub(crate) archive_timeout: Duration,
    /// How long wal-push waits on the store before it spools the file instead.
    pub(crate) upload_timeout: Duration,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Resolves the `[[cluster]]` tables; `targets` are the names of the file's targets, in order.
pub(crate) fn resolve(
    raw: Vec<RawCluster>,
    targets: &[String],
    file: &ConfigFile,
    env: &Env,
) -> Result<Vec<Cluster>, ConfigError> {
    let mut clusters: Vec<Cluster> = Vec::new();
    for (i, cluster) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("cluster[{i}].{k}");
        if !valid_name(&cluster.name) {
            return Err(file.invalid(
                key("name"),
                format!(
                    "{:?}: use 1 to 64 letters, digits, '-' or '_'",
                    cluster.name
                ),
            ));
        }
        if clusters.iter().any(|c| c.name == cluster.name) {
            return Err(file.invalid(
                key("name"),
                format!("cluster {:?} is defined twice", cluster.name),
            ));
        }
        let target = match cluster.target {
            Some(name) if targets.contains(&name) => name,
            Some(name) => {
                return Err(file.invalid(key("target"), format!("no target named {name:?}")));
            }
            None => targets
                .first()
                .cloned()
                .ok_or_else(|| file.invalid(key("target"), "no target is defined"))?,
        };
        let spool_dir = match cluster.spool_dir {
            Some(dir) => file.resolve_path(&dir),
            None => env
                .path("STATE_DIRECTORY")
                .unwrap_or_else(|| PathBuf::from("/var/lib/backupd"))
                .join("spool")
                .join(&cluster.name),
        };
        let spool_max_mb = cluster.spool_max_mb.unwrap_or(1024);
        if spool_max_mb < 64 {
            return Err(file.invalid(
                key("spool_max_mb"),
                format!("{spool_max_mb} MB holds too few segments: give at least 64"),
            ));
        }
        let parallel = cluster.parallel.unwrap_or(4);
        if !(1..=32).contains(&parallel) {
            return Err(file.invalid(key("parallel"), format!("{parallel} is outside 1..=32")));
        }
        let upload_timeout = cluster.upload_timeout_secs.unwrap_or(10);
        if !(1..=3600).contains(&upload_timeout) {
            return Err(file.invalid(
                key("upload_timeout_secs"),
                format!("{upload_timeout} is outside 1..=3600"),
            ));
        }
        clusters.push(Cluster {
            name: cluster.name,
            target,
            spool_dir,
            spool_max: spool_max_mb * 1024 * 1024,
            parallel,
            archive_timeout: Duration::from_secs(cluster.archive_timeout_secs.unwrap_or(60)),
            upload_timeout: Duration::from_secs(upload_timeout),
        });
    }
    Ok(clusters)
}

/// The cluster a command means: the one named, or the only one.
pub(crate) fn pick<'a>(
    clusters: &'a [Cluster],
    name: Option<&str>,
) -> Result<&'a Cluster, crate::Error> {
    match name {
        Some(name) => clusters
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| crate::Error::Usage(format!("no [[cluster]] named {name:?}"))),
        None => match clusters {
            [only] => Ok(only),
            [] => Err(crate::Error::Usage(
                "the config defines no [[cluster]]".into(),
            )),
            _ => Err(crate::Error::Usage(
                "the config defines several clusters: give --cluster NAME".into(),
            )),
        },
    }
}
