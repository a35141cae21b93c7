//! Point-in-time recovery from a cluster's base backups and archived WAL: what a target holds
//! (`list`), laying a base backup out with recovery settings (`restore --cluster`), replaying
//! it in a scratch server (`--start`, `verify --cluster`), and pruning (`prune`).
//!
//! Invariants:
//! - A base backup is used only after its manifest's signature is checked and its stored tar
//!   matches the manifest's SHA-256 (copied first to an unnamed private file).
//! - A restore or verify refuses a base backup whose WAL chain has a hole between its first
//!   segment and the newest stored one, and names every missing segment.
//! - A restore or verify checks the signature of every WAL file it may replay before it lays
//!   anything out, and names each refused one; `restore_command` carries `--allow-unsigned`
//!   exactly when the restore was given it. PostgreSQL takes a failed `restore_command` as the
//!   end of the archive, so a replay that met a refusal (planted after the check) fails too.
//! - A scratch server never archives (`archive_mode=off` on its command line), listens on no
//!   TCP port, and trusts only its private socket folder; it is stopped before we return.
//! - Pruning keeps every WAL file at or after the first segment of the oldest kept base
//!   backup, and history files always; it deletes a base backup's manifest first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use labcore::Env;
use labcore::pg::{PgHost, PgSettings, SslMode};
use tokio::io::AsyncReadExt;

use crate::basebackup::{self, BaseManifest, Lsn};
use crate::catalog;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::pipeline::{self, hex};
use crate::postgres::PgTools;
use crate::retention::{self, Candidate, Policy};
use crate::signing::{self, Trust};
use crate::store::Store;
use crate::wal::{self, WalKind, WalName};
use crate::{Error, archive};

/// How long a scratch server may take to replay to its target.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(3600);

/// One complete base backup on a target.
#[derive(Clone, Debug)]
pub(crate) struct Base {
    /// Its folder.
    pub(crate) dir: String,
    /// Its manifest.
    pub(crate) manifest: BaseManifest,
    /// The manifest's exact bytes, for the signature check.
    pub(crate) manifest_bytes: Vec<u8>,
    /// Its signature, if any.
    pub(crate) signature: Option<Vec<u8>>,
}

/// A cluster's objects on a target.
#[derive(Debug, Default)]
pub(crate) struct Holdings {
    /// Complete base backups, oldest first.
    pub(crate) bases: Vec<Base>,
    /// Base backup folders without a manifest.
    pub(crate) incomplete: BTreeMap<String, Vec<String>>,
    /// WAL files stored.
    pub(crate) wal: BTreeSet<WalName>,
}

/// Reads what a target holds of `cluster`.
pub(crate) async fn holdings(store: &Store, cluster: &str) -> Result<Holdings, Error> {
    let wal_prefix = wal::wal_prefix(cluster);
    let base_prefix = basebackup::base_prefix(cluster);
    let mut folders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut held = Holdings::default();
    for key in store.list().await? {
        if let Some(name) = key.strip_prefix(&wal_prefix) {
            if let Ok(name) = name.parse::<WalName>() {
                held.wal.insert(name);
            }
        } else if let Some(rest) = key.strip_prefix(&base_prefix)
            && let Some((stamp, _)) = rest.split_once('/')
            && catalog::parse_stamp(stamp).is_some()
        {
            folders
                .entry(format!("{base_prefix}{stamp}"))
                .or_default()
                .push(key);
        }
    }
    for (dir, keys) in folders {
        let manifest_key = format!("{dir}/{}", catalog::MANIFEST);
        if !keys.contains(&manifest_key) {
            held.incomplete.insert(dir, keys);
            continue;
        }
        let Some(bytes) = store.get_bytes(&manifest_key).await? else {
            continue;
        };
        let manifest: BaseManifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(source) => {
                tracing::warn!(location = %store.location(&manifest_key), error = %source, "skipping a base backup with an unreadable manifest");
                continue;
            }
        };
        let signature = store
            .get_bytes(&format!("{dir}/{}", signing::SIGNATURE))
            .await?;
        held.bases.push(Base {
            dir,
            manifest,
            manifest_bytes: bytes,
            signature,
        });
    }
    held.bases.sort_by_key(|b| b.manifest.started_at);
    Ok(held)
}

impl Holdings {
    /// Segments missing between `base`'s first segment and the newest stored segment of its
    /// timeline (at least through its last needed segment).
    pub(crate) fn gaps(&self, base: &BaseManifest) -> Result<Vec<WalName>, Error> {
        let (start, stop) = base.wal_range()?;
        let timeline = start.timeline();
        let first = start.segment_number().unwrap_or(0);
        let newest = self
            .wal
            .iter()
            .filter(|n| n.kind() == WalKind::Segment && n.timeline() == timeline)
            .filter_map(WalName::segment_number)
            .max()
            .unwrap_or(0)
            .max(stop.segment_number().unwrap_or(0));
        Ok((first..=newest)
            .map(|n| WalName::segment(timeline, n))
            .filter(|n| !self.wal.contains(n))
            .collect())
    }

    /// The newest segment stored on `base`'s timeline.
    pub(crate) fn newest_segment(&self, base: &BaseManifest) -> Option<&WalName> {
        self.wal
            .iter()
            .filter(|n| n.kind() == WalKind::Segment && n.timeline() == base.timeline)
            .max()
    }
}

/// Writes missing segments as `A, B..C` (runs shortened).
pub(crate) fn describe_gaps(missing: &[WalName]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < missing.len() {
        let mut j = i;
        while j + 1 < missing.len()
            && missing[j + 1].timeline() == missing[j].timeline()
            && missing[j + 1].segment_number() == missing[j].segment_number().map(|n| n + 1)
        {
            j += 1;
        }
        parts.push(if i == j {
            missing[i].to_string()
        } else {
            format!("{}..{}", missing[i], missing[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// Where recovery should stop.
#[derive(Clone, Debug)]
pub(crate) enum RecoveryTarget {
    /// A moment.
    Time(Timestamp),
    /// A WAL position.
    Lsn(Lsn),
    /// The end of the archive.
    Latest,
}

/// The base backup to restore for `target`: the newest one that was consistent before it.
fn choose<'a>(held: &'a Holdings, target: &RecoveryTarget) -> Option<&'a Base> {
    held.bases.iter().rev().find(|b| match target {
        RecoveryTarget::Latest => true,
        RecoveryTarget::Time(t) => b.manifest.finished_at <= *t,
        RecoveryTarget::Lsn(l) => b.manifest.stop_lsn <= *l,
    })
}

/// What a restore needs besides the cluster and target.
pub(crate) struct RestoreArgs<'a> {
    /// The config (its path goes into `restore_command`).
    pub(crate) config: &'a Config,
    /// Signature trust for base backups' manifests.
    pub(crate) trust: &'a Trust,
    /// Signature trust for WAL (the same `--allow-unsigned`, other keys).
    pub(crate) wal_trust: &'a Trust,
    /// The environment.
    pub(crate) env: &'a Env,
    /// The age identity, for encrypted backups.
    pub(crate) identity: Option<&'a labcore::Secret>,
}

/// `restore --cluster`: lays out a base backup in `to_dir` with recovery settings; with
/// `start`, replays to the target in a scratch server. Returns what it did, for the user.
pub(crate) async fn restore(
    args: &RestoreArgs<'_>,
    cluster: &Cluster,
    store: &Store,
    target: &RecoveryTarget,
    to_dir: &Path,
    start: bool,
) -> Result<String, Error> {
    if start && nix::unistd::Uid::effective().is_root() {
        return Err(Error::Usage(
            "PostgreSQL does not run as root: run `restore --start` as the PostgreSQL user \
             (e.g. sudo -u postgres backupd restore ...)"
                .into(),
        ));
    }
    let held = holdings(store, &cluster.name).await?;
    let base = choose(&held, target).ok_or_else(|| Error::NotFound {
        id: format!(
            "a base backup of cluster {} before {target:?}",
            cluster.name
        ),
        target: cluster.target.clone(),
    })?;
    args.trust.check(
        &base.manifest.id,
        &base.manifest_bytes,
        base.signature.as_deref(),
    )?;
    let missing = held.gaps(&base.manifest)?;
    if !missing.is_empty() {
        return Err(Error::WalGap {
            cluster: cluster.name.clone(),
            missing: format!(
                "{} (after base backup {})",
                describe_gaps(&missing),
                base.manifest.id
            ),
        });
    }
    check_wal_signatures(store, &cluster.name, &held, &base.manifest, args.wal_trust).await?;
    lay_out(args, store, base, to_dir).await?;
    write_recovery_settings(args, cluster, target, to_dir)?;
    let mut report = format!(
        "restored base backup {} of cluster {} to {}; recovery settings written",
        base.manifest.id,
        cluster.name,
        to_dir.display()
    );
    if start {
        let tools = PgTools::find(
            args.config.pg_bin_dir.as_deref(),
            base.manifest.server_version / 10_000,
            args.env,
        )?;
        let reached = replay(&tools, to_dir, target, args.env).await?;
        report.push_str(&format!("; {reached}"));
    }
    Ok(report)
}

/// WAL signature checks at once: each reads only an object's header.
const SIGNATURE_CHECKS: usize = 8;

/// Checks the signature of every WAL file a replay of `base` may fetch (history files, and
/// segments from its first on, on its timeline or later ones); refuses with each bad one named.
async fn check_wal_signatures(
    store: &Store,
    cluster: &str,
    held: &Holdings,
    base: &BaseManifest,
    trust: &Trust,
) -> Result<(), Error> {
    let (start, _) = base.wal_range()?;
    let first = start.segment_number().unwrap_or(0);
    let wanted: Vec<WalName> = held
        .wal
        .iter()
        .filter(|n| {
            n.kind() == WalKind::History
                || (n.timeline() >= base.timeline && n.segment_number().is_some_and(|s| s >= first))
        })
        .cloned()
        .collect();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(SIGNATURE_CHECKS));
    let mut tasks = tokio::task::JoinSet::new();
    for name in wanted {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("the check semaphore closed".into()))?;
        let (store, trust, cluster) = (store.clone(), trust.clone(), cluster.to_owned());
        tasks.spawn(async move {
            let key = wal::object_key(&cluster, &name);
            let location = store.location(&key);
            let verdict = match crate::spool::stored_header(&store, &key).await {
                Ok(Some(header)) if header.name != name => Err(format!("it holds {}", header.name)),
                Ok(Some(header)) => header
                    .check(&trust, &location, &cluster)
                    .map_err(|e| short_reason(&e)),
                Ok(None) => Ok(()), // Gone since the listing: the gap check's business.
                Err(err) => Err(labcore::exit::chain(&err)),
            };
            drop(permit);
            (name, verdict)
        });
    }
    let mut refused = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (name, verdict) =
            joined.map_err(|e| Error::Internal(format!("a signature check failed: {e}")))?;
        if let Err(why) = verdict {
            refused.push((name, why));
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    refused.sort();
    Err(Error::Signature(signing::SignatureError::WalChain {
        cluster: cluster.to_owned(),
        refused: refused
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect::<Vec<_>>()
            .join(", "),
    }))
}

/// Why a WAL object is refused, in a few words for a list of them.
fn short_reason(err: &signing::SignatureError) -> String {
    use signing::SignatureError as S;
    match err {
        S::WalUnsigned { .. } => "unsigned; --allow-unsigned accepts it".into(),
        S::WalUntrusted { key, .. } => format!("signed by untrusted key {key}"),
        S::WalInvalid { .. } => {
            "the signature does not match its cluster, name, size and SHA-256".into()
        }
        S::WalNoTrustedKeys { .. } => {
            "signed, but no WAL key is trusted: set [signing] wal_public_keys".into()
        }
        other => other.to_string(),
    }
}

/// Copies the base backup's tar to a private file, checks it, and extracts it into `to_dir`.
async fn lay_out(
    args: &RestoreArgs<'_>,
    store: &Store,
    base: &Base,
    to_dir: &Path,
) -> Result<(), Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    if to_dir.exists() {
        let mut entries =
            std::fs::read_dir(to_dir).map_err(io(format!("reading {}", to_dir.display())))?;
        if entries.next().is_some() {
            return Err(Error::TargetNotEmpty(to_dir.display().to_string()));
        }
    } else {
        std::fs::create_dir_all(to_dir).map_err(io(format!("creating {}", to_dir.display())))?;
    }
    std::fs::set_permissions(to_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("setting the mode of {}", to_dir.display())))?;
    let parent = to_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut copy = tempfile::tempfile_in(parent).map_err(io(format!(
        "creating a private file in {}",
        parent.display()
    )))?;
    let key = format!("{}/{}", base.dir, base.manifest.data.object);
    let mut stream = store.get_stream(&key).await?;
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(io(format!("reading {}", store.location(&key))))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        copy.write_all(&buf[..n])
            .map_err(io("writing the private copy".into()))?;
    }
    let sha256 = hex(hasher.finish().as_ref());
    if sha256 != base.manifest.data.sha256 {
        return Err(Error::VerifyFailed {
            id: base.manifest.id.clone(),
            detail: format!(
                "the stored tar's SHA-256 is {sha256}, the manifest says {}",
                base.manifest.data.sha256
            ),
        });
    }
    copy.rewind()
        .map_err(io("rewinding the private copy".into()))?;
    let encrypted = base.manifest.data.encrypted();
    let identity = args.identity.cloned();
    let dest = to_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let identities = match &identity {
            Some(text) => Some(pipeline::identities(text.expose())?),
            None => None,
        };
        let plain = pipeline::decoder(
            std::io::BufReader::new(copy),
            encrypted,
            identities.as_deref(),
        )?;
        archive::extract(plain, &dest)?;
        Ok::<_, Error>(())
    })
    .await
    .map_err(|e| Error::Internal(format!("extract task: {e}")))??;
    Ok(())
}

/// Quotes a word for `/bin/sh`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Quotes a value for postgresql.conf.
fn conf_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Writes `recovery.signal` and appends the restore settings to `postgresql.auto.conf`.
fn write_recovery_settings(
    args: &RestoreArgs<'_>,
    cluster: &Cluster,
    target: &RecoveryTarget,
    to_dir: &Path,
) -> Result<(), Error> {
    let config = args.config;
    let io = |what: String| move |source| Error::Io { what, source };
    let exe = std::env::current_exe().map_err(io("finding backupd's own path".into()))?;
    let config_path =
        std::fs::canonicalize(config.file.path()).unwrap_or_else(|_| config.file.path().to_owned());
    // Unsigned WAL is accepted during the replay exactly when this restore accepted it.
    let command = format!(
        "{} wal-fetch -c {} --cluster {}{} %f %p",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&config_path.to_string_lossy()),
        shell_quote(&cluster.name),
        if args.wal_trust.allow_unsigned {
            " --allow-unsigned"
        } else {
            ""
        }
    );
    let mut settings = format!(
        "\n# Written by backupd restore --cluster {}\nrestore_command = {}\n\
         recovery_target_timeline = 'latest'\nrecovery_target_action = 'promote'\n",
        cluster.name,
        conf_quote(&command)
    );
    match target {
        RecoveryTarget::Time(t) => settings.push_str(&format!(
            "recovery_target_time = {}\n",
            conf_quote(&t.strftime("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        )),
        RecoveryTarget::Lsn(l) => {
            settings.push_str(&format!(
                "recovery_target_lsn = {}\n",
                conf_quote(&l.to_string())
            ));
        }
        RecoveryTarget::Latest => {}
    }
    let auto = to_dir.join("postgresql.auto.conf");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&auto)
        .map_err(io(format!("opening {}", auto.display())))?;
    file.write_all(settings.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(format!("writing {}", auto.display())))?;
    let signal = to_dir.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(io(format!("writing {}", signal.display())))?;
    Ok(())
}

/// Runs a scratch server on `data` until it has replayed to its target and promoted; checks
/// it, stops it. Returns what was reached.
async fn replay(
    tools: &PgTools,
    data: &Path,
    target: &RecoveryTarget,
    env: &Env,
) -> Result<String, Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    let sockets = tempfile::Builder::new()
        .prefix("backupd-replay-")
        .tempdir()
        .map_err(io("creating a socket folder".into()))?;
    let hba = sockets.path().join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\n").map_err(io("writing pg_hba.conf".into()))?;
    let log_path = sockets.path().join("postgres.log");
    let log = std::fs::File::create(&log_path).map_err(io("creating the server log".into()))?;
    let log_err = log
        .try_clone()
        .map_err(io("opening the server log".into()))?;
    let mut command = tools.command("postgres", env);
    command
        .arg("-D")
        .arg(data)
        .args(["-c", "listen_addresses=", "-c", "port=5432"])
        .arg("-c")
        .arg(format!(
            "unix_socket_directories={}",
            sockets.path().display()
        ))
        .arg("-c")
        .arg(format!("hba_file={}", hba.display()))
        .args(["-c", "archive_mode=off"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let mut child = crate::backup::spawn(command, "postgres")?;
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let user = env.get("PGUSER").unwrap_or("postgres").to_owned();
    let settings = PgSettings::new(PgHost::Unix(sockets.path().to_owned()), 5432, &user)
        .with_dbname("postgres")
        .with_sslmode(SslMode::Disable);
    let deadline = Instant::now() + REPLAY_TIMEOUT;
    let result = async {
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(io("waiting for postgres".into()))?
            {
                return Err(Error::Child {
                    program: "postgres (recovery)".into(),
                    status: status.to_string(),
                    stderr: log_tail(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Child {
                    program: "postgres (recovery)".into(),
                    status: "still replaying after an hour".into(),
                    stderr: log_tail(),
                });
            }
            if let Ok(client) = settings.connect().await
                && let Ok(row) = client
                    .query_one(
                        "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
                         (SELECT timeline_id FROM pg_control_checkpoint())",
                        &[],
                    )
                    .await
            {
                let in_recovery: bool = row.get(0);
                if !in_recovery {
                    let replayed: Option<String> = row.get(1);
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    // A refused WAL file ended the archive for PostgreSQL: the replay stopped
                    // short of what the store holds, so it is no success.
                    if let Some(line) = log.lines().find(|l| l.contains(signing::WAL_REFUSED)) {
                        return Err(Error::Signature(signing::SignatureError::WalReplay {
                            line: line.trim().to_owned(),
                        }));
                    }
                    let stop = log
                        .lines()
                        .find(|l| l.contains("recovery stopping"))
                        .map(|l| l.split("LOG:").last().unwrap_or(l).trim().to_owned());
                    if let (RecoveryTarget::Lsn(want), Some(got)) = (target, &replayed)
                        && got.parse::<Lsn>().is_ok_and(|got| got < *want)
                    {
                        return Err(Error::VerifyFailed {
                            id: data.display().to_string(),
                            detail: format!("replay ended at {got}, before {want}"),
                        });
                    }
                    return Ok(format!(
                        "replayed to {}{}",
                        replayed.as_deref().unwrap_or("?"),
                        stop.map(|s| format!(" ({s})")).unwrap_or_default()
                    ));
                }
            }
            // The server says when it is done only through its state; ask again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    // A fast shutdown leaves a clean, promoted cluster behind.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    result
}

/// `verify --cluster`: the base backup's WAL chain has no hole, and a scratch server replays
/// it to the end of the archive.
pub(crate) async fn verify(
    args: &RestoreArgs<'_>,
    cluster: &Cluster,
    store: &Store,
) -> Result<String, Error> {
    let scratch = tempfile::Builder::new()
        .prefix("backupd-verify-")
        .tempdir_in(
            std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from),
        )
        .map_err(|source| Error::Io {
            what: "creating a scratch folder".into(),
            source,
        })?;
    let data = scratch.path().join("data");
    restore(args, cluster, store, &RecoveryTarget::Latest, &data, true).await
}

/// A cluster's recoverable window on a target, as `list` shows it (a line, or JSON).
#[derive(Debug, serde::Serialize)]
pub(crate) struct Window {
    /// The cluster.
    pub(crate) cluster: String,
    /// Complete base backups stored.
    pub(crate) base_backups: usize,
    /// WAL files stored.
    pub(crate) wal_files: usize,
    /// The earliest moment a restore can reach: the oldest base backup's end.
    pub(crate) from: Option<Timestamp>,
    /// The last WAL segment a restore can replay to the end of.
    pub(crate) to_end_of: Option<String>,
    /// Missing segments after the oldest base backup (runs as FIRST..LAST).
    pub(crate) missing: Vec<String>,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Some(from), Some(end)) = (&self.from, &self.to_end_of) else {
            return write!(
                f,
                "cluster {}: no base backup, {} WAL files",
                self.cluster, self.wal_files
            );
        };
        write!(
            f,
            "cluster {}: {} base backups, {} WAL files; recoverable from {from} to the end of \
             {end}",
            self.cluster, self.base_backups, self.wal_files
        )?;
        if !self.missing.is_empty() {
            write!(f, "; MISSING {}", self.missing.join(", "))?;
        }
        Ok(())
    }
}

/// A cluster's base backups, the recoverable window, and gaps.
pub(crate) async fn window(store: &Store, cluster: &str) -> Result<Window, Error> {
    let held = holdings(store, cluster).await?;
    let mut window = Window {
        cluster: cluster.to_owned(),
        base_backups: held.bases.len(),
        wal_files: held.wal.len(),
        from: None,
        to_end_of: None,
        missing: Vec::new(),
    };
    let (Some(oldest), Some(newest)) = (held.bases.first(), held.bases.last()) else {
        return Ok(window);
    };
    window.to_end_of = Some(
        held.newest_segment(&newest.manifest)
            .map_or_else(|| newest.manifest.wal_stop.clone(), ToString::to_string),
    );
    window.from = Some(oldest.manifest.finished_at);
    let gaps = held.gaps(&oldest.manifest)?;
    if !gaps.is_empty() {
        window.missing = describe_gaps(&gaps)
            .split(", ")
            .map(str::to_owned)
            .collect();
    }
    Ok(window)
}

/// What retention deletes of a cluster: base backup folders and WAL files.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ClusterPlan {
    /// Base backup IDs to delete.
    pub(crate) bases: Vec<String>,
    /// WAL files to delete.
    pub(crate) wal: Vec<WalName>,
}

/// Plans retention for base backups `(id, started, first WAL segment)` and the stored `wal`:
/// the policy picks base backups; WAL before the oldest kept one's first segment goes.
pub(crate) fn plan(
    bases: &[(String, Timestamp, WalName)],
    wal: &BTreeSet<WalName>,
    policy: &Policy,
    now: Timestamp,
) -> ClusterPlan {
    if !policy.prunes() {
        // Pruning is opt-in, for WAL as for backups.
        return ClusterPlan::default();
    }
    let candidates: Vec<Candidate> = bases
        .iter()
        .map(|(id, time, _)| Candidate {
            id: id.clone(),
            time: *time,
            verified: false,
        })
        .collect();
    let decided = retention::plan(&candidates, policy, now);
    let kept: BTreeSet<&String> = decided.keep.iter().map(|(id, _)| id).collect();
    let Some(oldest_needed) = bases
        .iter()
        .filter(|(id, _, _)| kept.contains(id))
        .filter_map(|(_, _, start)| start.segment_number())
        .min()
    else {
        // No base backup kept (or none at all): WAL alone restores nothing, but deleting it
        // without a policy's say is not ours to do.
        return ClusterPlan {
            bases: decided.delete,
            wal: Vec::new(),
        };
    };
    let wal = wal
        .iter()
        .filter(|n| n.kind() != WalKind::History)
        .filter(|n| n.segment_number().is_some_and(|s| s < oldest_needed))
        .cloned()
        .collect();
    ClusterPlan {
        bases: decided.delete,
        wal,
    }
}

/// Applies retention to one cluster on one target. Returns what was (or would be) deleted.
pub(crate) async fn prune(
    store: &Store,
    cluster: &str,
    policy: &Policy,
    now: Timestamp,
    dry_run: bool,
) -> Result<ClusterPlan, Error> {
    let held = holdings(store, cluster).await?;
    let mut bases = Vec::new();
    for base in &held.bases {
        let (start, _) = base.manifest.wal_range()?;
        bases.push((base.manifest.id.clone(), base.manifest.started_at, start));
    }
    let planned = plan(&bases, &held.wal, policy, now);
    if dry_run {
        return Ok(planned);
    }
    for id in &planned.bases {
        if let Some(base) = held.bases.iter().find(|b| &b.manifest.id == id) {
            // The manifest first: an interrupted prune leaves an incomplete folder, never a
            // manifest naming missing data.
            store
                .delete(&[format!("{}/{}", base.dir, catalog::MANIFEST)])
                .await?;
            store
                .delete(&[
                    format!("{}/{}", base.dir, signing::SIGNATURE),
                    format!("{}/{}", base.dir, base.manifest.data.object),
                ])
                .await?;
        }
    }
    let keys: Vec<String> = planned
        .wal
        .iter()
        .map(|n| wal::object_key(cluster, n))
        .collect();
    store.delete(&keys).await?;
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(n: u64) -> WalName {
        WalName::segment(1, n)
    }

    #[test]
    fn retention_over_simulated_weeks_keeps_the_wal_of_kept_base_backups_and_nothing_older() {
        // Six weeks of nightly base backups, eight segments of WAL a day.
        let start: Timestamp = "2026-10-01T03:00:00Z".parse().unwrap();
        let mut bases = Vec::new();
        let mut wal = BTreeSet::new();
        for day in 0..42u64 {
            let time = start
                .checked_add(jiff::SignedDuration::from_hours(24 * day as i64))
                .unwrap();
            bases.push((format!("main@{day}"), time, seg(day * 8 + 2)));
            for n in day * 8..day * 8 + 8 {
                wal.insert(seg(n));
            }
        }
        wal.insert("00000002.history".parse().unwrap());
        let now = start
            .checked_add(jiff::SignedDuration::from_hours(24 * 42))
            .unwrap();
        let policy = Policy {
            keep_daily: 7,
            ..Policy::default()
        };
        let planned = plan(&bases, &wal, &policy, now);
        assert_eq!(planned.bases.len(), 35, "{:?}", planned.bases);
        // The oldest kept is day 35, whose WAL starts at segment 35 * 8 + 2.
        let first_kept = 35 * 8 + 2;
        let deleted: BTreeSet<u64> = planned
            .wal
            .iter()
            .filter_map(|n| n.segment_number())
            .collect();
        assert_eq!(deleted, (0..first_kept).collect());
        assert!(
            !planned.wal.iter().any(|n| n.kind() == WalKind::History),
            "history files stay"
        );

        let none = plan(&bases, &wal, &Policy::default(), now);
        assert_eq!(none, ClusterPlan::default(), "no policy deletes nothing");
    }

    #[test]
    fn gaps_are_named_and_runs_shortened() {
        let names = [seg(3), seg(5), seg(6), seg(7)];
        assert_eq!(
            describe_gaps(&names),
            "000000010000000000000003, 000000010000000000000005..000000010000000000000007"
        );
    }
}
