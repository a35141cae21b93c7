//! `backupd.toml`: what to back up, where to, how to compress, encrypt and keep it.
//!
//! The serde types mirror the file; [`Config::load`] resolves them into types that cannot hold
//! an invalid state (a parsed target URL, age recipients, a schedule of times of day, secrets
//! read from files or systemd credentials). Every error names the file, line, column and key.
//!
//! ```toml
//! compression = 3                      # zstd level, 1..=19
//! metrics_file = "/var/lib/node_exporter/backupd.prom" # Prometheus textfile, after each pass
//! metrics_addr = "127.0.0.1:9442"      # `backupd daemon` serves /metrics there
//!
//! [[source]]
//! name = "shop"
//! type = "postgres"                    # or "globals", "folder"
//! databases = ["shop"]                 # or "all"
//!
//! [[source]]
//! name = "gitea-data"
//! type = "folder"
//! path = "/srv/gitea"
//! exclude = ["*.tmp", "log/"]
//! pre_hook = "gitea manager flush-queues" # fails: the source is skipped
//! post_hook = ["/usr/local/bin/gitea-resume"] # after its backups, when pre_hook ran
//!
//! [[target]]
//! name = "s3"
//! url = "s3://backups/lab"             # or a local folder path
//! copy_to = ["offsite"]                # after each pass, copy what offsite lacks
//!
//! [[target]]                           # S3 keys of its own, over [s3]'s
//! name = "offsite"
//! url = "s3://lab-offsite/backups"
//! endpoint = "https://s3.example.net"  # also region, path_style, profile, ca_bundle
//! access_key_id = "..."
//! secret_access_key_file = "offsite.key" # or the systemd credential target.offsite.secret_access_key
//! storage_class = "STANDARD_IA"
//! [target.retention]                   # instead of [retention]
//! keep_monthly = 24
//!
//! [encryption]
//! recipients = ["age1..."]             # identity_file is only needed to restore
//!
//! [signing]                            # `backupd keygen -o /etc/labkit/backupd.sign`
//! key_file = "backupd.sign"            # or the systemd credential signing.key
//! public_keys = ["backupd-ed25519:..."] # hosts that only restore or verify
//! wal_key_file = "wal.sign"            # `keygen --wal`, for wal-push (the PostgreSQL user)
//! wal_public_keys = ["backupd-ed25519:..."] # WAL keys restore and wal-fetch trust
//!
//! [retention]
//! keep_last = 3
//! keep_daily = 7                       # also keep_weekly, keep_monthly, keep_yearly
//! keep_within = "14d"                  # every backup within 14 days of the newest
//!
//! [schedule]
//! at = ["03:15"]                       # for `backupd daemon`
//!
//! [hooks]
//! on_failure = "mail -s 'backup failed' root"
//! healthcheck_url = "https://hc-ping.com/UUID"
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use labcore::config::{self, ConfigError, ConfigFile};
use labcore::s3::S3Config;
use labcore::{Env, Secret};
use serde::Deserialize;

use crate::catalog;
use crate::retention::Policy;
use crate::signing::{PublicKey, Signing, SigningKey};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default, rename = "source")]
    sources: Vec<RawSource>,
    #[serde(default, rename = "target")]
    targets: Vec<RawTarget>,
    compression: Option<i32>,
    compression_threads: Option<u32>,
    encryption: Option<RawEncryption>,
    #[serde(default)]
    signing: RawSigning,
    #[serde(default)]
    retention: Policy,
    schedule: Option<RawSchedule>,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    verify: RawVerify,
    postgres: Option<RawPostgres>,
    s3: Option<S3Config>,
    lock_file: Option<PathBuf>,
    #[serde(default, rename = "cluster")]
    clusters: Vec<crate::cluster::RawCluster>,
    metrics_file: Option<PathBuf>,
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    #[serde(rename = "type")]
    kind: SourceKind,
    databases: Option<Databases>,
    path: Option<PathBuf>,
    #[serde(default)]
    exclude: Vec<String>,
    pre_hook: Option<Command>,
    post_hook: Option<Command>,
}

/// What a source backs up.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SourceKind {
    /// PostgreSQL databases, each with `pg_dump -Fc`.
    Postgres,
    /// Roles and tablespaces, with `pg_dumpall --globals-only`.
    Globals,
    /// A folder, as a tar stream.
    Folder,
}

/// Which databases a postgres source dumps.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub(crate) enum Databases {
    /// Exactly these.
    List(Vec<String>),
    /// `"all"`: every database that accepts connections, except templates.
    All(AllKeyword),
}

/// The word `all`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AllKeyword;

impl<'de> Deserialize<'de> for AllKeyword {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AllKeyword, D::Error> {
        let word = String::deserialize(d)?;
        if word == "all" {
            Ok(AllKeyword)
        } else {
            Err(serde::de::Error::custom(format!(
                "expected a list of databases or \"all\", found {word:?}"
            )))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    url: String,
    // S3 settings of this target, each over the same key of [s3].
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    profile: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<Secret>,
    secret_access_key_file: Option<PathBuf>,
    ca_bundle: Option<PathBuf>,
    storage_class: Option<String>,
    #[serde(default)]
    copy_to: Vec<String>,
    retention: Option<Policy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    #[serde(default)]
    recipients: Vec<String>,
    recipients_file: Option<PathBuf>,
    identity: Option<Secret>,
    identity_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    key: Option<Secret>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    public_keys: Vec<String>,
    wal_key: Option<Secret>,
    wal_key_file: Option<PathBuf>,
    #[serde(default)]
    wal_public_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    at: Vec<String>,
    #[serde(default)]
    randomized_delay_secs: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    on_success: Option<Command>,
    on_failure: Option<Command>,
    healthcheck_url: Option<String>,
    timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    #[serde(default)]
    after_run: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    bin_dir: Option<PathBuf>,
}

/// A hook command: a string run by `/bin/sh -c`, or an argument list run directly.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub(crate) enum Command {
    /// `sh -c STRING`.
    Shell(String),
    /// `argv[0] argv[1..]`, no shell.
    Argv(Vec<String>),
}

/// A resolved source.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    /// Its name, unique in the file.
    pub(crate) name: String,
    /// What it backs up.
    pub(crate) kind: SourceSpec,
    /// Run before the source is backed up; when it fails the source is skipped.
    pub(crate) pre_hook: Option<Command>,
    /// Run after the source's backups (whatever their outcome) when `pre_hook` succeeded.
    pub(crate) post_hook: Option<Command>,
}

/// What a resolved source backs up.
#[derive(Clone, Debug)]
pub(crate) enum SourceSpec {
    /// Databases.
    Postgres(Databases),
    /// Cluster-wide objects.
    Globals,
    /// A folder and the globs to leave out.
    Folder {
        /// The folder (absolute).
        path: PathBuf,
        /// Glob patterns matched against paths relative to the folder.
        exclude: Vec<String>,
    },
}

/// Where backups go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TargetUrl {
    /// `s3://bucket/prefix`.
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix without leading or trailing slash (may be empty).
        prefix: String,
    },
    /// A local folder.
    Dir(PathBuf),
}

impl FromStr for TargetUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<TargetUrl, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !bucket_ok {
                return Err(format!("{bucket:?} is not a valid S3 bucket name"));
            }
            let prefix = prefix.trim_matches('/').to_owned();
            if prefix.split('/').any(|part| part == "." || part == "..") {
                return Err("the prefix may not contain . or .. segments".into());
            }
            Ok(TargetUrl::S3 {
                bucket: bucket.to_owned(),
                prefix,
            })
        } else if let Some(path) = url.strip_prefix("file://") {
            Ok(TargetUrl::Dir(PathBuf::from(path)))
        } else if url.contains("://") {
            Err("only s3:// URLs and local folders are supported".into())
        } else if url.is_empty() {
            Err("empty".into())
        } else {
            Ok(TargetUrl::Dir(PathBuf::from(url)))
        }
    }
}

/// A resolved target.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// Its name, unique in the file.
    pub(crate) name: String,
    /// Where it stores.
    pub(crate) url: TargetUrl,
    /// S3 settings of its own, over the `[s3]` table's (empty for folder targets).
    pub(crate) s3: TargetS3,
    /// Targets every object of this one is copied to after each pass (the `copy` module).
    pub(crate) copy_to: Vec<String>,
    /// Its own retention, instead of `[retention]`.
    pub(crate) retention: Option<Policy>,
}

/// A target's own S3 settings: each given key wins over `[s3]`, which wins over `AWS_*`.
#[derive(Clone, Debug, Default)]
pub(crate) struct TargetS3 {
    /// Endpoint, region, profile, addressing and CA bundle, as if given as flags.
    pub(crate) args: labcore::s3::S3Args,
    /// An access key of its own (the secret from the file, the config or the systemd
    /// credential `target.NAME.secret_access_key`).
    pub(crate) credentials: Option<(String, Secret)>,
    /// `x-amz-storage-class` of every object it stores.
    pub(crate) storage_class: Option<String>,
}

/// Encryption settings.
#[derive(Clone)]
pub(crate) struct Encryption {
    /// Recipients every backup is encrypted to.
    pub(crate) recipients: Vec<age::x25519::Recipient>,
    /// The identity that decrypts them (only for restore and verify).
    pub(crate) identity: Option<Secret>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryption")
            .field(
                "recipients",
                &self
                    .recipients
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .field("identity", &self.identity)
            .finish()
    }
}

/// Times of day a daemon runs at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// (hour, minute) pairs, in the system's time zone.
    pub(crate) at: Vec<(u8, u8)>,
    /// Up to this much random delay after each time, to spread load.
    pub(crate) randomized_delay: Duration,
}

/// Hooks run after each pass.
#[derive(Clone, Debug, Default)]
pub(crate) struct Hooks {
    /// Run when every backup of the pass succeeded.
    pub(crate) on_success: Option<Command>,
    /// Run when any failed; gets the reason in `BACKUPD_REASON`.
    pub(crate) on_failure: Option<Command>,
    /// Pinged at start (`/start`), on success, and on failure (`/fail`).
    pub(crate) healthcheck_url: Option<HealthcheckUrl>,
    /// How long a hook may run.
    pub(crate) timeout: Duration,
}

/// A healthcheck URL. Whoever knows its path can ping the check (healthchecks.io's is a UUID,
/// others carry a token), so it is a secret: `Display` and `Debug` show only the scheme and
/// host, and only [`HealthcheckUrl::ping_url`] hands out the whole URL, to send a request.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct HealthcheckUrl {
    url: String,
    /// `scheme://host[:port]`, without any `user:password@`.
    origin: String,
}

impl HealthcheckUrl {
    /// Parses an `http://` or `https://` URL with a host. Errors never repeat the text.
    pub(crate) fn parse(text: &str) -> Result<HealthcheckUrl, &'static str> {
        let (scheme, rest) = text
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
            .ok_or("not an http:// or https:// URL")?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        if host.is_empty() || host.starts_with(':') {
            return Err("the URL has no host");
        }
        Ok(HealthcheckUrl {
            url: text.to_owned(),
            origin: format!("{scheme}://{host}"),
        })
    }

    /// The whole URL with `suffix` (`/start`, `/fail`) appended to its path, before any
    /// query or fragment.
    pub(crate) fn ping_url(&self, suffix: &str) -> String {
        if suffix.is_empty() {
            return self.url.clone();
        }
        let end = self.url.find(['?', '#']).unwrap_or(self.url.len());
        let (path, rest) = self.url.split_at(end);
        format!("{}{suffix}{rest}", path.trim_end_matches('/'))
    }
}

impl std::fmt::Display for HealthcheckUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/…", self.origin)
    }
}

impl std::fmt::Debug for HealthcheckUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HealthcheckUrl({self})")
    }
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The file it came from.
    pub(crate) file: ConfigFile,
    /// Sources, in file order.
    pub(crate) sources: Vec<Source>,
    /// Targets, in file order (a local folder when the file names none).
    pub(crate) targets: Vec<Target>,
    /// zstd level.
    pub(crate) compression_level: i32,
    /// zstd worker threads (0: one per core, at most 4).
    pub(crate) compression_threads: u32,
    /// Encryption, if configured.
    pub(crate) encryption: Option<Encryption>,
    /// The key manifests are signed with, and the keys restore and verify trust.
    pub(crate) signing: Signing,
    /// What to keep.
    pub(crate) retention: Policy,
    /// When the daemon runs.
    pub(crate) schedule: Option<Schedule>,
    /// Hooks.
    pub(crate) hooks: Hooks,
    /// Verify each new backup by restoring it, after the pass.
    pub(crate) verify_after_run: bool,
    /// Folder of the PostgreSQL client programs, if fixed.
    pub(crate) pg_bin_dir: Option<PathBuf>,
    /// The `[s3]` table.
    pub(crate) s3: Option<S3Config>,
    /// The lock that keeps runs of this config apart.
    pub(crate) lock_file: PathBuf,
    /// Clusters archived for point-in-time recovery.
    pub(crate) clusters: Vec<crate::cluster::Cluster>,
    /// The Prometheus textfile written after each pass.
    pub(crate) metrics_file: Option<PathBuf>,
    /// Where `backupd daemon` serves the same metrics over HTTP.
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

/// The default local target when the file names none.
pub(crate) fn default_local_target(env: &Env) -> PathBuf {
    env.path("STATE_DIRECTORY")
        .map(|dir| dir.join("backups"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/backupd/backups"))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

impl Config {
    /// Reads and resolves the config at `path`.
    pub(crate) fn load(path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let (raw, file): (Raw, ConfigFile) = config::load(path)?;
        Config::resolve(raw, file, env)
    }

    fn resolve(raw: Raw, file: ConfigFile, env: &Env) -> Result<Config, ConfigError> {
        let mut sources: Vec<Source> = Vec::new();
        for (i, source) in raw.sources.into_iter().enumerate() {
            let key = |k: &str| format!("source[{i}].{k}");
            if !valid_name(&source.name) {
                return Err(file.invalid(
                    key("name"),
                    format!(
                        "{:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                        source.name
                    ),
                ));
            }
            if sources.iter().any(|s| s.name == source.name) {
                return Err(file.invalid(
                    key("name"),
                    format!("source {:?} is defined twice", source.name),
                ));
            }
            let only = |field: &str, present: bool| -> Result<(), ConfigError> {
                if present {
                    Err(file.invalid(
                        key(field),
                        format!("not allowed for type {:?}", source.kind),
                    ))
                } else {
                    Ok(())
                }
            };
            let kind = match source.kind {
                SourceKind::Postgres => {
                    only("path", source.path.is_some())?;
                    only("exclude", !source.exclude.is_empty())?;
                    let databases = source.databases.ok_or_else(|| {
                        file.invalid(
                            key("databases"),
                            "a postgres source needs databases (a list, or \"all\")",
                        )
                    })?;
                    if let Databases::List(list) = &databases {
                        if list.is_empty() {
                            return Err(file.invalid(key("databases"), "the list is empty"));
                        }
                        if let Some(bad) = list
                            .iter()
                            .find(|d| d.is_empty() || d.len() > 63 || d.contains('\0'))
                        {
                            return Err(file.invalid(
                                key("databases"),
                                format!("{bad:?} is not a database name"),
                            ));
                        }
                    }
                    SourceSpec::Postgres(databases)
                }
                SourceKind::Globals => {
                    only("databases", source.databases.is_some())?;
                    only("path", source.path.is_some())?;
                    only("exclude", !source.exclude.is_empty())?;
                    SourceSpec::Globals
                }
                SourceKind::Folder => {
                    only("databases", source.databases.is_some())?;
                    let path = source
                        .path
                        .ok_or_else(|| file.invalid(key("path"), "a folder source needs a path"))?;
                    for pattern in &source.exclude {
                        globset::Glob::new(pattern.trim_end_matches('/')).map_err(|e| {
                            file.invalid(key("exclude"), format!("{pattern:?}: {e}"))
                        })?;
                    }
                    SourceSpec::Folder {
                        path: file.resolve_path(&path),
                        exclude: source.exclude,
                    }
                }
            };
            for (field, command) in [
                ("pre_hook", &source.pre_hook),
                ("post_hook", &source.post_hook),
            ] {
                if command_is_empty(command.as_ref()) {
                    return Err(file.invalid(key(field), "the command is empty"));
                }
            }
            if source.post_hook.is_some() && source.pre_hook.is_none() {
                return Err(file.invalid(
                    key("post_hook"),
                    "post_hook undoes what pre_hook did: give a pre_hook too",
                ));
            }
            sources.push(Source {
                name: source.name,
                kind,
                pre_hook: source.pre_hook,
                post_hook: source.post_hook,
            });
        }
        if sources.is_empty() && raw.clusters.is_empty() {
            return Err(file.invalid("source", "no [[source]] is defined: nothing to back up"));
        }
        check_subjects(&sources, &file)?;

        let mut targets: Vec<Target> = Vec::new();
        for (i, target) in raw.targets.into_iter().enumerate() {
            let key = |k: &str| format!("target[{i}].{k}");
            if !valid_name(&target.name) {
                return Err(file.invalid(
                    key("name"),
                    format!("{:?} is not a valid name", target.name),
                ));
            }
            if targets.iter().any(|t| t.name == target.name) {
                return Err(file.invalid(
                    key("name"),
                    format!("target {:?} is defined twice", target.name),
                ));
            }
            let url = match target.url.parse::<TargetUrl>() {
                Ok(TargetUrl::Dir(dir)) => TargetUrl::Dir(file.resolve_path(&dir)),
                Ok(url) => url,
                Err(why) => {
                    return Err(file.invalid(key("url"), format!("{:?}: {why}", target.url)));
                }
            };
            let s3 = resolve_target_s3(&target, &url, i, &file, env)?;
            targets.push(Target {
                name: target.name,
                url,
                s3,
                copy_to: target.copy_to,
                retention: target.retention,
            });
        }
        check_copies(&targets, &file)?;
        if targets.is_empty() {
            targets.push(Target {
                name: "local".into(),
                url: TargetUrl::Dir(default_local_target(env)),
                s3: TargetS3::default(),
                copy_to: Vec::new(),
                retention: None,
            });
        }

        let compression_level = raw.compression.unwrap_or(3);
        if !(1..=19).contains(&compression_level) {
            return Err(file.invalid(
                "compression",
                format!("zstd level {compression_level} is outside 1..=19"),
            ));
        }

        let encryption = match raw.encryption {
            None => None,
            Some(enc) => Some(resolve_encryption(enc, &file, env)?),
        };

        let signing = resolve_signing(raw.signing, &file, env)?;

        let schedule = match raw.schedule {
            None => None,
            Some(schedule) => {
                let mut at = Vec::new();
                for time in &schedule.at {
                    at.push(parse_time_of_day(time).ok_or_else(|| {
                        file.invalid(
                            "schedule.at",
                            format!("{time:?} is not a time of day like \"03:15\""),
                        )
                    })?);
                }
                if at.is_empty() {
                    return Err(file.invalid("schedule.at", "give at least one time of day"));
                }
                at.sort_unstable();
                at.dedup();
                Some(Schedule {
                    at,
                    randomized_delay: Duration::from_secs(schedule.randomized_delay_secs),
                })
            }
        };

        let healthcheck_url = match &raw.hooks.healthcheck_url {
            None => None,
            // The URL is a secret: the message says what is wrong, never what was written.
            Some(text) => Some(
                HealthcheckUrl::parse(text)
                    .map_err(|why| file.invalid("hooks.healthcheck_url", why))?,
            ),
        };
        for (key, command) in [
            ("hooks.on_success", &raw.hooks.on_success),
            ("hooks.on_failure", &raw.hooks.on_failure),
        ] {
            if command_is_empty(command.as_ref()) {
                return Err(file.invalid(key, "the command is empty"));
            }
        }

        let lock_file = raw
            .lock_file
            .map(|p| file.resolve_path(&p))
            .unwrap_or_else(|| {
                let dir = env
                    .path("RUNTIME_DIRECTORY")
                    .or_else(|| Some(PathBuf::from("/run/lock")).filter(|p| p.is_dir()))
                    .unwrap_or_else(std::env::temp_dir);
                let stem = file
                    .path()
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "backupd".into());
                dir.join(format!("backupd-{stem}.lock"))
            });

        let target_names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
        let clusters = crate::cluster::resolve(raw.clusters, &target_names, &file, env)?;

        Ok(Config {
            clusters,
            sources,
            targets,
            compression_level,
            compression_threads: raw.compression_threads.unwrap_or(0),
            encryption,
            signing,
            retention: raw.retention,
            schedule,
            hooks: Hooks {
                on_success: raw.hooks.on_success,
                on_failure: raw.hooks.on_failure,
                healthcheck_url,
                timeout: Duration::from_secs(raw.hooks.timeout_secs.unwrap_or(300)),
            },
            verify_after_run: raw.verify.after_run,
            pg_bin_dir: raw
                .postgres
                .and_then(|p| p.bin_dir)
                .map(|p| file.resolve_path(&p)),
            s3: raw.s3,
            lock_file,
            metrics_file: raw.metrics_file.map(|p| file.resolve_path(&p)),
            metrics_addr: raw.metrics_addr,
            file,
        })
    }

    /// The source named `name`.
    pub(crate) fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The target named `name`.
    pub(crate) fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The retention of `target`: its own, else `[retention]`.
    pub(crate) fn retention_for(&self, target: &str) -> &Policy {
        self.target(target)
            .and_then(|t| t.retention.as_ref())
            .unwrap_or(&self.retention)
    }

    /// Whether `target` only receives copies (another target's `copy_to` names it): passes
    /// back nothing up into it directly.
    pub(crate) fn is_copy_destination(&self, target: &str) -> bool {
        self.targets
            .iter()
            .any(|t| t.copy_to.iter().any(|c| c == target))
    }
}

fn command_is_empty(command: Option<&Command>) -> bool {
    matches!(command, Some(Command::Argv(argv)) if argv.is_empty())
        || matches!(command, Some(Command::Shell(s)) if s.trim().is_empty())
}

/// Storage classes whose objects cannot be read back without a restore request first: the
/// manifests in them could not be listed, verified or copied.
const ARCHIVE_CLASSES: [&str; 2] = ["GLACIER", "DEEP_ARCHIVE"];

fn resolve_target_s3(
    target: &RawTarget,
    url: &TargetUrl,
    index: usize,
    file: &ConfigFile,
    env: &Env,
) -> Result<TargetS3, ConfigError> {
    let key = |k: &str| format!("target[{index}].{k}");
    let given = [
        ("endpoint", target.endpoint.is_some()),
        ("region", target.region.is_some()),
        ("path_style", target.path_style.is_some()),
        ("profile", target.profile.is_some()),
        ("access_key_id", target.access_key_id.is_some()),
        ("secret_access_key", target.secret_access_key.is_some()),
        (
            "secret_access_key_file",
            target.secret_access_key_file.is_some(),
        ),
        ("ca_bundle", target.ca_bundle.is_some()),
        ("storage_class", target.storage_class.is_some()),
    ];
    if let TargetUrl::Dir(_) = url {
        if let Some((field, _)) = given.iter().find(|(_, present)| *present) {
            return Err(file.invalid(key(field), "only for s3:// targets"));
        }
        return Ok(TargetS3::default());
    }
    // The systemd credential is named after the target, so two stores can have two keys.
    let secret = file.secret(
        env,
        &format!("target.{}.secret_access_key", target.name),
        target.secret_access_key.clone(),
        target.secret_access_key_file.as_deref(),
    )?;
    let credentials = match (&target.access_key_id, secret) {
        (Some(id), Some(secret)) => Some((id.clone(), secret)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(file.invalid(
                key("access_key_id"),
                "give secret_access_key_file (or the systemd credential \
                 target.NAME.secret_access_key) with it",
            ));
        }
        (None, Some(_)) => {
            return Err(file.invalid(key("secret_access_key"), "give access_key_id with it"));
        }
    };
    if let Some(endpoint) = &target.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        return Err(file.invalid(
            key("endpoint"),
            format!("{endpoint:?} is not an http:// or https:// URL"),
        ));
    }
    if let Some(class) = &target.storage_class {
        if class.is_empty() || !class.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
            return Err(file.invalid(
                key("storage_class"),
                format!("{class:?} is not an S3 storage class such as \"STANDARD_IA\""),
            ));
        }
        if ARCHIVE_CLASSES.contains(&class.as_str()) {
            return Err(file.invalid(
                key("storage_class"),
                format!(
                    "{class} objects cannot be read without a restore request, so backupd \
                     could not list, verify or copy them; use a lifecycle rule on the bucket \
                     to move old objects there instead"
                ),
            ));
        }
    }
    Ok(TargetS3 {
        args: labcore::s3::S3Args {
            endpoint: target.endpoint.clone(),
            region: target.region.clone(),
            profile: target.profile.clone(),
            path_style: target.path_style == Some(true),
            virtual_hosted: target.path_style == Some(false),
            ca_bundle: target.ca_bundle.as_ref().map(|p| file.resolve_path(p)),
        },
        credentials,
        storage_class: target.storage_class.clone(),
    })
}

/// Checks every `copy_to`: it names another defined target, and a copy destination does not
/// copy on (one hop, so a pass knows every destination is complete after its sweep).
fn check_copies(targets: &[Target], file: &ConfigFile) -> Result<(), ConfigError> {
    for (i, target) in targets.iter().enumerate() {
        let key = format!("target[{i}].copy_to");
        for (j, name) in target.copy_to.iter().enumerate() {
            if name == &target.name {
                return Err(file.invalid(&key, format!("target {name:?} cannot copy to itself")));
            }
            let Some(destination) = targets.iter().find(|t| &t.name == name) else {
                return Err(file.invalid(&key, format!("no target named {name:?}")));
            };
            if !destination.copy_to.is_empty() {
                return Err(file.invalid(
                    &key,
                    format!(
                        "target {name:?} is a copy destination and copies on itself: copy to \
                         every destination from {:?} instead",
                        target.name
                    ),
                ));
            }
            if target.copy_to[..j].contains(name) {
                return Err(file.invalid(&key, format!("{name:?} is named twice")));
            }
        }
    }
    Ok(())
}

fn resolve_encryption(
    enc: RawEncryption,
    file: &ConfigFile,
    env: &Env,
) -> Result<Encryption, ConfigError> {
    let mut texts: Vec<(String, String)> = enc
        .recipients
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("encryption.recipients[{i}]"), r.clone()))
        .collect();
    if let Some(path) = &enc.recipients_file {
        let path = file.resolve_path(path);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::SecretFile {
            path: file.path().to_owned(),
            key: "encryption.recipients_file".into(),
            file: path.clone(),
            source,
        })?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            texts.push(("encryption.recipients_file".into(), line.to_owned()));
        }
    }
    let mut recipients = Vec::new();
    for (key, text) in texts {
        let recipient = text.parse::<age::x25519::Recipient>().map_err(|e| {
            file.invalid(
                &key,
                format!("{text:?} is not an age X25519 recipient (age1...): {e}"),
            )
        })?;
        recipients.push(recipient);
    }
    let identity = file.secret(
        env,
        "encryption.identity",
        enc.identity,
        enc.identity_file.as_deref(),
    )?;
    if recipients.is_empty() {
        return Err(file.invalid(
            "encryption.recipients",
            "encryption needs at least one recipient",
        ));
    }
    Ok(Encryption {
        recipients,
        identity,
    })
}

/// Refuses sources whose backups would be filed under the same subject: a postgres source
/// `pg` with database `app` and a folder source `pg.app` would both write `pg.app/STAMP/`, so
/// listing, restore and retention would mix them up and one could prune the other's backups.
/// A `databases = "all"` source `pg` claims every subject `pg.*`, since any database may
/// appear later.
fn check_subjects(sources: &[Source], file: &ConfigFile) -> Result<(), ConfigError> {
    struct Claim {
        /// The source's index in the file.
        index: usize,
        /// Who claims it, for the message.
        who: String,
        /// The subject, or with `all` the prefix every subject of the source starts with.
        subject: String,
        all: bool,
    }
    let mut claims: Vec<Claim> = Vec::new();
    for (index, source) in sources.iter().enumerate() {
        let name = &source.name;
        match &source.kind {
            SourceSpec::Postgres(Databases::List(list)) => {
                claims.extend(list.iter().map(|db| Claim {
                    index,
                    who: format!("source {name:?} (database {db:?})"),
                    subject: catalog::subject(name, Some(db)),
                    all: false,
                }));
            }
            SourceSpec::Postgres(Databases::All(_)) => claims.push(Claim {
                index,
                who: format!("source {name:?} (every database)"),
                subject: format!("{name}."),
                all: true,
            }),
            SourceSpec::Globals | SourceSpec::Folder { .. } => claims.push(Claim {
                index,
                who: format!("source {name:?}"),
                subject: name.clone(),
                all: false,
            }),
        }
    }
    for (i, later) in claims.iter().enumerate() {
        for earlier in &claims[..i] {
            let clash = match (earlier.all, later.all) {
                (false, false) => earlier.subject == later.subject,
                (true, false) => later.subject.starts_with(&earlier.subject),
                (false, true) => earlier.subject.starts_with(&later.subject),
                (true, true) => {
                    earlier.subject.starts_with(&later.subject)
                        || later.subject.starts_with(&earlier.subject)
                }
            };
            if clash {
                let shown = if earlier.all {
                    &later.subject
                } else {
                    &earlier.subject
                };
                return Err(file.invalid(
                    format!("source[{}].name", later.index),
                    format!(
                        "{} and {} would file their backups under the same subject {:?}: \
                         rename one of the sources",
                        earlier.who,
                        later.who,
                        shown.trim_end_matches('.')
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn resolve_signing(raw: RawSigning, file: &ConfigFile, env: &Env) -> Result<Signing, ConfigError> {
    let read_key = |credential: &str, inline: Option<Secret>, path: Option<&Path>| {
        let text = file.secret(env, credential, inline, path)?;
        text.map(|text| {
            let key = if path.is_some() {
                format!("{credential}_file")
            } else {
                credential.to_owned()
            };
            SigningKey::parse(text.expose()).map_err(|why| file.invalid(key, why))
        })
        .transpose()
    };
    let key = read_key("signing.key", raw.key, raw.key_file.as_deref())?;
    let wal_key = read_key("signing.wal_key", raw.wal_key, raw.wal_key_file.as_deref())?;
    let parse_keys = |texts: &[String], name: &str| {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse::<PublicKey>()
                    .map_err(|why| file.invalid(format!("signing.{name}[{i}]"), why))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let public_keys = parse_keys(&raw.public_keys, "public_keys")?;
    let wal_public_keys = parse_keys(&raw.wal_public_keys, "wal_public_keys")?;
    // The archiver (the PostgreSQL user) holds the WAL key: a key trusted for manifests too
    // would let it forge base backups, which is what keeping the keys apart prevents.
    let manifest_trusted: Vec<PublicKey> = public_keys
        .iter()
        .copied()
        .chain(key.as_ref().map(SigningKey::public))
        .collect();
    let wal_trusted = wal_public_keys
        .iter()
        .copied()
        .chain(wal_key.as_ref().map(SigningKey::public));
    for wal in wal_trusted {
        if manifest_trusted.contains(&wal) {
            return Err(file.invalid(
                "signing.wal_public_keys",
                format!(
                    "{wal} is trusted for manifests too (key_file or public_keys): the WAL key \
                     must be a key of its own (`backupd keygen --wal`), since the PostgreSQL \
                     user holds it"
                ),
            ));
        }
    }
    Ok(Signing {
        key,
        public_keys,
        wal_key,
        wal_public_keys,
    })
}

/// `HH:MM` (24-hour clock).
fn parse_time_of_day(text: &str) -> Option<(u8, u8)> {
    let (h, m) = text.trim().split_once(':')?;
    let (h, m) = (h.parse::<u8>().ok()?, m.parse::<u8>().ok()?);
    (h < 24 && m < 60 && text.trim().len() == 5).then_some((h, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = config::parse_str(Path::new("/etc/labkit/backupd.toml"), text)?;
        Config::resolve(
            raw,
            ConfigFile::new(Path::new("/etc/labkit/backupd.toml")),
            &Env::default(),
        )
    }

    const ISSUE_EXAMPLE: &str = r#"
[[source]]
name = "shop"
type = "postgres"          # or "globals", "folder" (with path = ..., exclude = [...])
databases = ["shop"]       # or "all"

[[target]]
name = "s3"
url = "s3://bucket/backups" # or a local folder path

[retention]
keep_last = 3
keep_daily = 7
"#;

    #[test]
    fn the_issue_example_parses() {
        let config = parse(ISSUE_EXAMPLE).unwrap();
        assert_eq!(config.sources[0].name, "shop");
        assert!(
            matches!(&config.sources[0].kind, SourceSpec::Postgres(Databases::List(l)) if l == &["shop"])
        );
        assert_eq!(
            config.targets[0].url,
            TargetUrl::S3 {
                bucket: "bucket".into(),
                prefix: "backups".into()
            }
        );
        assert_eq!(config.retention.keep_last, 3);
        assert_eq!(config.retention.keep_daily, 7);
        assert_eq!(config.compression_level, 3);
    }

    #[test]
    fn targets_carry_their_own_store_copies_and_retention() {
        let config = parse(
            "[[source]]\nname = \"a\"\ntype = \"globals\"\n\
             [[target]]\nname = \"home\"\nurl = \"s3://lab/nightly\"\ncopy_to = [\"offsite\"]\n\
             [[target]]\nname = \"offsite\"\nurl = \"s3://far/lab\"\n\
             endpoint = \"https://s3.example.net\"\nregion = \"eu-central-1\"\n\
             path_style = false\naccess_key_id = \"AKIA\"\nsecret_access_key = \"SECRET\"\n\
             storage_class = \"STANDARD_IA\"\n\
             [target.retention]\nkeep_monthly = 24\nkeep_yearly = 5\nkeep_within = \"30d\"\n\
             [retention]\nkeep_daily = 7\n",
        )
        .unwrap();
        let offsite = config.target("offsite").unwrap();
        assert_eq!(
            offsite.s3.args.endpoint.as_deref(),
            Some("https://s3.example.net")
        );
        assert!(offsite.s3.args.virtual_hosted && !offsite.s3.args.path_style);
        assert_eq!(offsite.s3.storage_class.as_deref(), Some("STANDARD_IA"));
        assert!(!format!("{config:?}").contains("SECRET"));
        assert_eq!(config.retention_for("offsite").keep_yearly, 5);
        assert_eq!(config.retention_for("home").keep_daily, 7);
        assert!(config.is_copy_destination("offsite"));
        assert!(!config.is_copy_destination("home"));
        let base = "[[source]]\nname = \"a\"\ntype = \"globals\"\n";
        let cases = [
            (
                "[[target]]\nname = \"t\"\nurl = \"s3://lab/x\"\ncopy_to = [\"nowhere\"]\n",
                "target[0].copy_to",
                "nowhere",
            ),
            (
                "[[target]]\nname = \"t\"\nurl = \"s3://lab/x\"\ncopy_to = [\"t\"]\n",
                "target[0].copy_to",
                "itself",
            ),
            (
                "[[target]]\nname = \"t\"\nurl = \"backups\"\nendpoint = \"http://x\"\n",
                "target[0].endpoint",
                "only for s3://",
            ),
            (
                "[[target]]\nname = \"t\"\nurl = \"s3://lab/x\"\nstorage_class = \"GLACIER\"\n",
                "target[0].storage_class",
                "restore request",
            ),
            (
                "[[target]]\nname = \"t\"\nurl = \"s3://lab/x\"\naccess_key_id = \"A\"\n",
                "target[0].access_key_id",
                "secret_access_key_file",
            ),
            (
                "[[target]]\nname = \"t\"\nurl = \"s3://lab/x\"\ncopy_to = [\"u\"]\n\
                 [[target]]\nname = \"u\"\nurl = \"s3://lab/y\"\ncopy_to = [\"t\"]\n",
                "target[0].copy_to",
                "copies on itself",
            ),
            (
                "[retention]\nkeep_within = \"2 weeks\"\n",
                "retention.keep_within",
                "not a span",
            ),
        ];
        for (text, key, says) in cases {
            let err = parse(&format!("{base}{text}")).unwrap_err().to_string();
            assert!(err.contains(&format!("\"{key}")), "{key}: {err}");
            assert!(err.contains(says), "{key}: {err}");
        }
    }

    #[test]
    fn all_databases_and_folders_parse() {
        let config = parse(
            "[[source]]\nname = \"pg\"\ntype = \"postgres\"\ndatabases = \"all\"\n\
             [[source]]\nname = \"files\"\ntype = \"folder\"\npath = \"data\"\nexclude = [\"*.tmp\"]\n\
             [[target]]\nname = \"disk\"\nurl = \"backups\"\n",
        )
        .unwrap();
        assert!(matches!(
            config.sources[0].kind,
            SourceSpec::Postgres(Databases::All(_))
        ));
        assert!(
            matches!(&config.sources[1].kind, SourceSpec::Folder { path, .. } if path == Path::new("/etc/labkit/data"))
        );
        assert_eq!(
            config.targets[0].url,
            TargetUrl::Dir("/etc/labkit/backups".into())
        );
    }

    #[test]
    fn mistakes_name_their_key() {
        let cases = [
            (
                "[[source]]\nname = \"a\"\ntype = \"postgres\"\n",
                "source[0].databases",
            ),
            (
                "[[source]]\nname = \"a\"\ntype = \"postgres\"\ndatabases = \"some\"\n",
                "source[0].databases",
            ),
            (
                "[[source]]\nname = \"a b\"\ntype = \"globals\"\n",
                "source[0].name",
            ),
            (
                "[[source]]\nname = \"a\"\ntype = \"globals\"\npath = \"/x\"\n",
                "source[0].path",
            ),
            (
                "[[source]]\nname = \"a\"\ntype = \"globals\"\n[[target]]\nname = \"t\"\nurl = \"ftp://x\"\n",
                "target[0].url",
            ),
            (
                "[[source]]\nname = \"a\"\ntype = \"globals\"\n[[target]]\nname = \"t\"\nurl = \"s3://B\"\n",
                "target[0].url",
            ),
            (
                "compression = 25\n[[source]]\nname = \"a\"\ntype = \"globals\"\n",
                "compression",
            ),
            (
                "[[source]]\nname = \"a\"\ntype = \"globals\"\n[encryption]\nrecipients = [\"nope\"]\n",
                "encryption.recipients[0]",
            ),
            (
                "[[source]]\nname = \"a\"\ntype = \"globals\"\n[schedule]\nat = [\"25:00\"]\n",
                "schedule.at",
            ),
            (
                "[[source]]\nname = \"a\"\ntype = \"globals\"\n[[source]]\nname = \"a\"\ntype = \"globals\"\n",
                "source[1].name",
            ),
            ("", "source"),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(&format!("\"{key}")), "{key}: {err}");
        }
        let err = parse("[[source]]\nname = \"a\"\ntype = \"tape\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/labkit/backupd.toml:3:8"), "{err}");
    }

    #[test]
    fn without_targets_backups_go_to_the_state_directory() {
        let raw: Raw = config::parse_str(
            Path::new("b.toml"),
            "[[source]]\nname = \"a\"\ntype = \"globals\"\n",
        )
        .unwrap();
        let env = Env::from_pairs([("STATE_DIRECTORY", "/var/lib/backupd")]);
        let config = Config::resolve(raw, ConfigFile::new(Path::new("b.toml")), &env).unwrap();
        assert_eq!(
            config.targets[0].url,
            TargetUrl::Dir("/var/lib/backupd/backups".into())
        );
    }

    #[test]
    fn a_healthcheck_url_shows_only_its_scheme_and_host() {
        let text = "https://user:pw@hc.example:8443/ping/SECRET/?rid=1";
        let url = HealthcheckUrl::parse(text).unwrap();
        assert_eq!(url.to_string(), "https://hc.example:8443/…");
        assert_eq!(
            format!("{url:?}"),
            "HealthcheckUrl(https://hc.example:8443/…)"
        );
        assert_eq!(url.ping_url(""), text);
        assert_eq!(
            url.ping_url("/fail"),
            "https://user:pw@hc.example:8443/ping/SECRET/fail?rid=1"
        );
        for bad in [
            "ftp://x/SECRET",
            "https:///SECRET",
            "hc.example/SECRET",
            "http://:80/",
        ] {
            assert!(HealthcheckUrl::parse(bad).is_err(), "{bad}");
        }
        let config = parse(&format!(
            "[[source]]\nname = \"a\"\ntype = \"globals\"\n[hooks]\nhealthcheck_url = \"{text}\"\n"
        ))
        .unwrap();
        assert!(!format!("{config:?}").contains("SECRET"));
        let err = parse(
            "[[source]]\nname = \"a\"\ntype = \"globals\"\n[hooks]\nhealthcheck_url = \"ftp://h/SECRET\"\n",
        )
        .unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn times_of_day_parse_strictly() {
        assert_eq!(parse_time_of_day("03:15"), Some((3, 15)));
        assert_eq!(parse_time_of_day("23:59"), Some((23, 59)));
        assert_eq!(parse_time_of_day("3:15"), None);
        assert_eq!(parse_time_of_day("24:00"), None);
    }
}
