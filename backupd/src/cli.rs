//! The command line: subcommands, their help (which becomes the man page), and dispatch.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use labcore::log::LogArgs;
use labcore::pg::PgSettings;
use labcore::{Env, Format, Secret};

use crate::catalog::{self, BackupId, Content};
use crate::config::Config;
use crate::inventory::{self, Listed};
use crate::lock::RunLock;
use crate::restore::{self, Destination, Restorer, TableDestination, TableName};
use crate::store::Store;
use crate::{Error, daemon, run};

const AFTER_HELP: &str = "\
EXAMPLES:
    backupd run -c /etc/labkit/backupd.toml          one pass now (cron, backupd.timer)
    backupd list -c backupd.toml                      what the targets hold
    backupd verify -c backupd.toml --latest           restore-test the newest backup of each source
    backupd restore -c backupd.toml metabase.metabase@20261125T031500.123Z --to-db metabase_copy
    backupd restore -c backupd.toml files@20261125T031500.123Z --to-dir /srv/restored
    backupd restore -c backupd.toml lab.gitea@20261125T031500.123Z --table public.issue --to-db scratch
    backupd restore -c backupd.toml lab.gitea@20261125T031500.123Z --table public.issue --to-table issue_old
    backupd prune -c backupd.toml --dry-run           what retention would delete
    backupd keygen -o /etc/labkit/backupd.sign        make the manifest signing key
    backupd keygen --wal -o /etc/labkit/backupd-wal.sign   make the WAL signing key (wal-push)

EXIT STATUS:
    0 success; 1 some backups of a pass failed (others were made); 64 usage; 65 a backup failed
    its verification or a manifest is corrupt; 66 backup or input not found; 69 PostgreSQL or the
    store unavailable, or pg_dump failed; 73 restore target not empty (use --force) or disk full;
    74 I/O error; 75 another run holds the lock, or every backup was made but a copy_to target
    could not be brought up to date (the next run copies what it missed); 77 permission denied
    (credentials, identity), or a backup's manifest or a WAL file is unsigned or not signed by a
    trusted key; 78 bad configuration (also: no signing key to back up with, or no key to check
    a signed backup with). wal-fetch alone: 66 the archive lacks the file (PostgreSQL's end of
    the archive), 200 any other failure, so PostgreSQL aborts the recovery instead of ending it
    early at that segment.

SIGNATURES:
    Anyone who can write the store can write a backup that age decrypts, so `run` signs each
    manifest (which holds the data's SHA-256) with an ed25519 key only the backup host has:
    [signing] key_file, or the systemd credential signing.key; `backupd keygen` makes one.
    restore and verify accept a backup only when its signature is by that key or by one of
    [signing] public_keys, and only then read its data, which must match the manifest before
    any of it is decoded. Backups made before signing existed have no signature and are
    refused unless --allow-unsigned is given.
    WAL is signed too, with a key of its own: wal-push runs as the PostgreSQL user, which must
    not hold the manifest key (a compromised PostgreSQL user can already write the database;
    with the manifest key it could forge base backups and dumps). `backupd keygen --wal` makes
    it; name it in [signing] wal_key_file of the archiver's config, and list its public key in
    [signing] wal_public_keys where restores run (a key in both trusted sets is refused). Each
    WAL object's header is signed over the cluster, the file name, its size and SHA-256, so a
    segment cannot be planted, renamed or moved into another cluster. wal-fetch checks it before
    any byte reaches pg_wal; restore and verify --cluster check every WAL file they would replay
    first and name each refused one (77). --allow-unsigned accepts unsigned WAL (pushed before
    WAL was signed), and restore writes it into restore_command only when given it; a wrong or
    untrusted signature is refused all the same.

SEVERAL STORES:
    Each [[target]] may name its own S3 store with endpoint, region, path_style, profile,
    ca_bundle, access_key_id and secret_access_key_file (or the systemd credential
    target.NAME.secret_access_key), and storage_class; keys it leaves out come from [s3], then
    AWS_*. copy_to = [\"offsite\"] on a target makes the other target a copy destination: passes
    back up into the first only, then (after the restore tests of verify.after_run) copy every
    object the destination lacks or holds with another size, WAL segments included, manifests
    last. A backup is copied only if its manifest is signed by a trusted key, its restore test
    did not fail, and the copied data matches the manifest's size and SHA-256. A destination
    that is down delays only the copy: the pass exits 75, the healthcheck and on_failure hook
    report it, and the next pass catches up. A [target.retention] table gives a target its own
    retention (keep more off-site); a destination is pruned only after a pass that left
    nothing to copy, so its newest copies are in place before older ones go.

RETENTION:
    keep_last, keep_daily, keep_weekly, keep_monthly and keep_yearly keep the newest N backups,
    and the newest of each of the last N days, ISO weeks, months and years (UTC) that have one.
    keep_within = \"1y6m\" (y, m, w, d, h) keeps every backup taken within that span of the
    newest one, as restic's --keep-within does. The newest verified backup is always kept, and
    a pass in which a backup or a pre_hook failed prunes nothing.

HOOKS AND METRICS:
    A source's pre_hook runs before its backups (a string through /bin/sh -c, or an argument
    list), with BACKUPD_SOURCE set; if it fails or outlives [hooks] timeout_secs the source is
    skipped and the pass fails. Its post_hook runs after its backups, whatever they did. Logs
    name the hook and the source, never the command. metrics_file is a Prometheus textfile
    written after each run: per subject and target, backupd_last_success_timestamp_seconds,
    backupd_last_duration_seconds, backupd_last_size_bytes and backupd_last_verified of the
    newest complete backup; backupd_target_up; backupd_pass_* of the last pass;
    backupd_copy_pending and backupd_copy_pending_objects per copy; backupd_wal_lag_seconds per
    cluster. metrics_addr = \"127.0.0.1:9442\" has backupd daemon serve the same on /metrics.";

/// backupd: encrypted, streamed, verified backups of PostgreSQL databases and folders.
///
/// Each backup streams from its source (pg_dump -Fc, pg_dumpall --globals-only, or a tar of a
/// folder) through zstd and optional age encryption into S3 (multipart) or a local folder,
/// never staged whole on disk. A JSON manifest written last records sizes, SHA-256 sums, row
/// counts or file checksums; a backup without one does not exist for any command. Retention
/// never deletes the newest verified backup, and a pass in which any backup failed deletes
/// nothing.
#[derive(Debug, Parser)]
#[command(name = "backupd", version, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The config flag every subcommand takes.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The config file
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "/etc/labkit/backupd.toml"
    )]
    pub config: PathBuf,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Back up every source (or those named) to every target, once, then apply retention.
    ///
    /// Prints the ID of each backup made. Targets named in another target's copy_to get
    /// copies after the backups instead (see SEVERAL STORES in `backupd --help`). Retention
    /// runs only if every backup succeeded.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd run -c /etc/labkit/backupd.toml\n    backupd run -c backupd.toml --source shop"
    )]
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this source (repeatable)
        #[arg(long = "source", value_name = "NAME")]
        sources: Vec<String>,
        /// Output format
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Run passes at the times in [schedule], until SIGTERM (systemd Type=notify).
    ///
    /// SIGHUP reloads the config (a bad new config is logged and the old one kept); a pass in
    /// progress finishes before a stop takes effect only if it ends within systemd's stop timeout.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd daemon -c /etc/labkit/backupd.toml\n    systemctl reload backupd-daemon    # SIGHUP: re-read the config"
    )]
    Daemon {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the complete backups on the targets.
    ///
    /// Text output has one line per backup: ID, target, stored size in bytes and whether its
    /// latest restore test passed. JSON output has one object per line with the whole manifest
    /// and the latest verification record.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd list -c backupd.toml\n    backupd list -c backupd.toml --target s3 --source lab --format json | jq .id"
    )]
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this target
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Only backups of this source
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Output format
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Restore a backup into a new (or, with --force, replaced) database, folder or file.
    ///
    /// The manifest's signature is checked first (see SIGNATURES in `backupd --help`). The
    /// stored object is then copied into an unnamed private file (beside the target for
    /// --to-dir and --to-file, else in $TMPDIR or /var/tmp: it needs free space for the stored,
    /// compressed size) and checked against the manifest's SHA-256 before any of it is decoded.
    /// The target is written only when the whole restore succeeded: a database is restored
    /// into a scratch database and renamed, a folder extracted into a private staging folder
    /// beside the target and renamed. A folder archive is extracted without following any
    /// symlink; entries with absolute paths, `..`, or a way through a symlink are refused.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd restore -c backupd.toml shop.shop@20261125T031500.123Z --to-db shop_copy\n    backupd restore -c backupd.toml files@20261125T031500.123Z --to-dir /srv/files --force\n    backupd restore -c backupd.toml globals@20261125T031500.123Z --to-file globals.sql"
    )]
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup's ID, as `backupd list` prints it
        #[arg(required_unless_present = "cluster")]
        id: Option<BackupId>,
        #[command(flatten)]
        to: RestoreTo,
        #[command(flatten)]
        pitr: PitrArgs,
        /// Restore only this table of a database backup (SCHEMA.NAME, quoted as in SQL), with
        /// --to-db (under its own name) or --to-table
        #[arg(long, value_name = "SCHEMA.NAME", conflicts_with_all = ["to_dir", "to_file"])]
        table: Option<String>,
        /// Replace a non-empty target
        #[arg(long)]
        force: bool,
        /// age identity file, for encrypted backups (default: encryption.identity_file)
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Read the backup from this target (default: the first that has it)
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Do not restore object ownership (when the roles do not exist here)
        #[arg(long)]
        no_owner: bool,
        /// Accept a backup without a signature (made before backups were signed), and with
        /// --cluster unsigned WAL (restore_command then carries it too); a wrong or untrusted
        /// signature is refused all the same
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Restore-test a backup into scratch space and compare it with its manifest.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd verify -c backupd.toml --latest\n    backupd verify -c backupd.toml lab.metabase@20261125T031500.123Z --identity /root/backup.key"
    )]
    ///
    /// Databases are restored into a scratch database and every table's row count compared;
    /// folders are extracted into a scratch folder and every file's size, mode, mtime and
    /// SHA-256 compared. The result is recorded next to the backup; retention always keeps the
    /// newest verified backup of each source. A backup whose signature is missing (without
    /// --allow-unsigned) or not by a trusted key is refused with exit status 77 and no record.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup's ID
        #[arg(required_unless_present_any = ["latest", "cluster"], conflicts_with = "latest")]
        id: Option<BackupId>,
        /// Replay the newest base backup of this [[cluster]] with its WAL in a scratch server
        /// (run as the PostgreSQL user); a hole in the WAL chain is reported by segment name
        #[arg(long, value_name = "NAME", conflicts_with_all = ["id", "latest"])]
        cluster: Option<String>,
        /// Verify the newest backup of every subject (or of --source)
        #[arg(long)]
        latest: bool,
        /// With --latest: only this source
        #[arg(long, value_name = "NAME", requires = "latest")]
        source: Option<String>,
        /// age identity file, for encrypted backups (default: encryption.identity_file)
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Only this target
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Accept backups (and with --cluster, WAL files) without a signature (made before
        /// they were signed)
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Delete backups the retention policy no longer keeps, and old incomplete leftovers.
    ///
    /// The newest verified backup of each subject is always kept; incomplete backups (no
    /// manifest) are removed once a day old. Takes the same lock as `run`.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd prune -c backupd.toml --dry-run\n    backupd prune -c backupd.toml"
    )]
    Prune {
        #[command(flatten)]
        config: ConfigArg,
        /// Print what would be deleted; delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Output format
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Make a manifest (or, with --wal, a WAL) signing key.
    ///
    /// With -o, the key file is created with mode 0600 (an existing file is never replaced) and
    /// the public key printed on stdout; without it, the key file's text goes to stdout (its
    /// comment holds the public key). Put the file on the backup host and name it in [signing]
    /// key_file, or install it as the systemd credential signing.key; list the public key in
    /// [signing] public_keys on every other host that restores or verifies. Keep the public key
    /// off the host too, beside the age identity: a restore elsewhere needs both.
    ///
    /// With --wal, the key is for wal-push instead: give it to the PostgreSQL user only (mode
    /// 0600, owned by postgres) and name it in [signing] wal_key_file of the archiver's config.
    /// It is a key of its own because the archiver runs as the PostgreSQL user, which must
    /// not be able to sign base backups or dumps.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd keygen -o /etc/labkit/backupd.sign\n    backupd keygen -o /etc/labkit/credentials/backupd/signing.key    # for backupd.service\n    backupd keygen --wal -o /etc/labkit/backupd-wal.sign && chown postgres /etc/labkit/backupd-wal.sign"
    )]
    Keygen {
        /// Write the key file here instead of to stdout
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Make a WAL signing key for wal-push (the PostgreSQL user), named in [signing]
        /// wal_key_file; its public key goes in wal_public_keys, never in public_keys
        #[arg(long)]
        wal: bool,
    },
    /// Archive one WAL file (PostgreSQL's archive_command), or drain the spool.
    ///
    /// The file's header is signed with the WAL key ([signing] wal_key_file, made with
    /// `backupd keygen --wal`; without one wal-push exits 78). Exits 0 only once the file is
    /// stored on the cluster's target, or (when the target is unreachable or does not answer
    /// within [[cluster]] upload_timeout_secs) durably queued in the bounded spool, from which
    /// the next wal-push or `wal-push --drain` uploads it. A file already stored with the same
    /// bytes succeeds (stored again with this key's signature if it was unsigned or signed by
    /// another key); one whose name is stored with other bytes is refused (65) and never
    /// overwritten. A full spool fails (75), so PostgreSQL keeps the file and retries: WAL is
    /// never dropped.
    #[command(
        after_long_help = "EXAMPLES:\n    archive_command = 'backupd wal-push -c /etc/labkit/backupd-wal.toml %p'\n    backupd wal-push -c /etc/labkit/backupd-wal.toml --drain    # from a timer"
    )]
    WalPush {
        #[command(flatten)]
        config: ConfigArg,
        /// The [[cluster]] (default: the only one)
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// The WAL file (%p)
        #[arg(required_unless_present = "drain", conflicts_with = "drain")]
        path: Option<PathBuf>,
        /// Upload what the spool holds, archive nothing new
        #[arg(long)]
        drain: bool,
    },
    /// Fetch one WAL file (PostgreSQL's restore_command).
    ///
    /// The object's signature is checked first: it must be by the WAL key ([signing]
    /// wal_key_file) or one of wal_public_keys, and cover this cluster and this file name;
    /// otherwise nothing is written and wal-fetch fails, naming the object and why. The file
    /// is then decoded beside PATH, checked against the SHA-256 recorded at push time, and
    /// renamed to PATH. A file the archive lacks exits 66, which PostgreSQL takes as the end of
    /// the archive. Every other failure (a refused or damaged object, an unreachable store, a
    /// bad config) exits 200: PostgreSQL takes a status above 125 as fatal and aborts the
    /// recovery, where a lower one would end it early at that segment and drop the WAL after.
    #[command(
        after_long_help = "EXAMPLES:\n    restore_command = 'backupd wal-fetch -c /etc/labkit/backupd-wal.toml %f %p'"
    )]
    WalFetch {
        #[command(flatten)]
        config: ConfigArg,
        /// The [[cluster]] (default: the only one)
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// The WAL file's name (%f)
        name: String,
        /// Where to write it (%p)
        path: PathBuf,
        /// Accept a WAL file without a signature (pushed before WAL was signed); a wrong or
        /// untrusted signature is refused all the same. `restore --allow-unsigned` writes it
        /// into restore_command, and only then
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Take a physical base backup of a [[cluster]] (pg_basebackup through zstd and age).
    ///
    /// The manifest (start and stop LSN, timeline, WAL range) is signed and written only once
    /// the WAL the backup needs is archived (up to archive_timeout_secs).
    #[command(after_long_help = "EXAMPLES:\n    backupd basebackup -c /etc/labkit/backupd.toml")]
    Basebackup {
        #[command(flatten)]
        config: ConfigArg,
        /// The [[cluster]] (default: the only one)
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
    },
    /// Validate the config and print what it resolves to.
    #[command(after_long_help = "EXAMPLES:\n    backupd check -c /etc/labkit/backupd.toml")]
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Where `restore` writes.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RestoreTo {
    /// Restore a database backup into this database
    #[arg(long, value_name = "NAME")]
    pub to_db: Option<String>,
    /// Restore a folder backup into this folder
    #[arg(long, value_name = "PATH")]
    pub to_dir: Option<PathBuf>,
    /// Write the decoded data (a pg_dump archive, SQL or tar) to this file
    #[arg(long, value_name = "FILE")]
    pub to_file: Option<PathBuf>,
    /// With --table: restore it beside the original, in the backup's own database, under this
    /// name ([SCHEMA.]NAME; the table's schema when none is given)
    #[arg(long, value_name = "NAME", requires = "table")]
    pub to_table: Option<String>,
}

/// Point-in-time restore of a [[cluster]] (with `restore --cluster`).
#[derive(Debug, Args)]
pub struct PitrArgs {
    /// Restore this [[cluster]]'s base backup and WAL (needs --to-dir and one target)
    #[arg(long, value_name = "NAME", conflicts_with = "id", requires = "to_dir")]
    pub cluster: Option<String>,
    /// Recover to this moment (RFC 3339, e.g. 2026-12-06T14:03:00Z)
    #[arg(long, value_name = "TS", requires = "cluster", conflicts_with_all = ["to_lsn", "latest"])]
    pub to_time: Option<jiff::Timestamp>,
    /// Recover to this WAL position (e.g. 0/3000148)
    #[arg(
        long,
        value_name = "LSN",
        requires = "cluster",
        conflicts_with = "latest"
    )]
    pub to_lsn: Option<String>,
    /// Recover to the end of the archive
    #[arg(long, requires = "cluster")]
    pub latest: bool,
    /// Run a scratch server to the target, check it got there, and stop it (run as the
    /// PostgreSQL user)
    #[arg(long, requires = "cluster")]
    pub start: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    labcore::log::init(&cli.log)?;
    let env = Env::from_process();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "starting the runtime".into(),
            source,
        })?;
    runtime.block_on(dispatch(cli.command, &env))
}

async fn dispatch(command: Command, env: &Env) -> Result<(), Error> {
    let mut out = Stdout::default();
    match command {
        Command::Run {
            config,
            sources,
            format,
        } => run_pass(&config.config, &sources, format, env, &mut out).await,
        Command::Daemon { config } => Box::pin(daemon::daemon(&config.config, env)).await,
        Command::List {
            config,
            target,
            source,
            format,
        } => {
            let filter = Filter { target, source };
            list(&config.config, &filter, format, env, &mut out).await
        }
        Command::Restore {
            config,
            id: None,
            to,
            pitr,
            identity,
            allow_unsigned,
            ..
        } => {
            let line =
                restore_cluster(&config.config, pitr, to, identity, allow_unsigned, env).await?;
            out.line(line)
        }
        Command::Restore {
            config,
            id: Some(id),
            to,
            pitr: _,
            table,
            force,
            identity,
            target,
            no_owner,
            allow_unsigned,
        } => {
            let restore = RestoreArgs {
                id,
                to,
                table,
                force,
                identity,
                target,
                no_owner,
                allow_unsigned,
            };
            restore_backup(&config.config, restore, env).await
        }
        Command::Verify {
            config,
            cluster: Some(cluster),
            identity,
            allow_unsigned,
            ..
        } => {
            let line =
                verify_cluster(&config.config, &cluster, identity, allow_unsigned, env).await;
            match line {
                Ok(line) => out.line(line),
                Err(err) => {
                    out.line(format_args!(
                        "cluster {cluster}: FAILED: {}",
                        labcore::exit::chain(&err)
                    ))?;
                    Err(err)
                }
            }
        }
        Command::Verify {
            config,
            id,
            cluster: None,
            latest: _,
            source,
            identity,
            target,
            allow_unsigned,
        } => {
            let filter = Filter { target, source };
            let args = VerifyArgs {
                id,
                identity,
                allow_unsigned,
            };
            verify(&config.config, args, &filter, env, &mut out).await
        }
        Command::Prune {
            config,
            dry_run,
            format,
        } => prune(&config.config, dry_run, format, env, &mut out).await,
        Command::Check { config } => check(&config.config, env, &mut out),
        Command::WalPush {
            config,
            cluster,
            path,
            drain,
        } => {
            let config = Config::load(&config.config, env)?;
            let cluster = crate::cluster::pick(&config.clusters, cluster.as_deref())?;
            let store = crate::archiving::fail_fast(cluster_store(&config, cluster, env).await?);
            match (path, drain) {
                (Some(path), false) => {
                    Box::pin(crate::archiving::push(&config, cluster, &store, &path)).await?;
                }
                _ => {
                    let (stored, queued) = crate::archiving::drain(cluster, &store).await?;
                    out.line(format_args!("stored {stored}, still queued {queued}"))?;
                }
            }
            Ok(())
        }
        Command::WalFetch {
            config,
            cluster,
            name,
            path,
            allow_unsigned,
        } => {
            // PostgreSQL takes any status below 126 as the end of the archive and ends
            // recovery there: only a missing file may say so, every other failure aborts.
            let fetched = async {
                let config = Config::load(&config.config, env)?;
                let cluster = crate::cluster::pick(&config.clusters, cluster.as_deref())?;
                let name: crate::wal::WalName = name.parse().map_err(Error::Usage)?;
                let store = cluster_store(&config, cluster, env).await?;
                let trust = config.signing.wal_trust(allow_unsigned);
                crate::archiving::fetch(&config, cluster, &store, &trust, &name, &path).await
            };
            match fetched.await {
                Err(err @ Error::NotFound { .. }) | Err(err @ Error::FetchFailed(_)) => Err(err),
                Err(err) => Err(Error::FetchFailed(Box::new(err))),
                Ok(()) => Ok(()),
            }
        }
        Command::Basebackup { config, cluster } => {
            let config = Config::load(&config.config, env)?;
            let cluster = crate::cluster::pick(&config.clusters, cluster.as_deref())?;
            let store = cluster_store(&config, cluster, env).await?;
            let manifest = crate::basebackup::take(&config, cluster, &store, env).await?;
            out.line(format_args!(
                "{} {}..{}",
                manifest.id, manifest.wal_start, manifest.wal_stop
            ))
        }
        Command::Keygen { output, wal } => {
            let role = if wal {
                crate::signing::KeyRole::Wal
            } else {
                crate::signing::KeyRole::Manifest
            };
            let public = crate::signing::keygen(output.as_deref(), role)?;
            if output.is_some() {
                out.line(public)?;
            }
            Ok(())
        }
    }
}

/// Standard output for the lines a command prints. A reader that closes the pipe early
/// (`backupd list | head`) has all it wants: that is not an error, so the rest of the output is
/// dropped and the command exits as its work went. Other write errors are errors.
#[derive(Default)]
struct Stdout {
    closed: bool,
}

impl Stdout {
    fn line(&mut self, line: impl std::fmt::Display) -> Result<(), Error> {
        if self.closed {
            return Ok(());
        }
        match writeln!(io::stdout().lock(), "{line}") {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
                tracing::debug!("standard output closed early by its reader");
                self.closed = true;
                Ok(())
            }
            Err(source) => Err(Error::Io {
                what: "writing to standard output".into(),
                source,
            }),
        }
    }

    /// Whether the reader is gone, so read-only commands can stop early.
    fn closed(&self) -> bool {
        self.closed
    }
}

/// `--target` and `--source` restrictions.
struct Filter {
    target: Option<String>,
    source: Option<String>,
}

impl Filter {
    fn target(&self, name: &str) -> bool {
        self.target.as_ref().is_none_or(|t| t == name)
    }

    fn source(&self, listed: &Listed) -> bool {
        self.source
            .as_ref()
            .is_none_or(|s| *s == listed.manifest.source.name)
    }

    /// The stores to read, refusing a `--target` the config does not define.
    async fn stores(&self, config: &Config, env: &Env) -> Result<Vec<(String, Store)>, Error> {
        if let Some(name) = &self.target
            && config.target(name).is_none()
        {
            return Err(Error::Usage(format!("no target named {name:?}")));
        }
        let mut stores = run::open_stores(config, env).await?;
        stores.retain(|(name, _)| self.target(name));
        Ok(stores)
    }
}

fn identity(flag: Option<PathBuf>, config: &Config) -> Result<Option<Secret>, Error> {
    match flag {
        Some(path) => labcore::secret::read_file(&path)
            .map(Some)
            .map_err(|source| Error::Io {
                what: format!("reading the identity file {}", path.display()),
                source,
            }),
        None => Ok(config.encryption.as_ref().and_then(|e| e.identity.clone())),
    }
}

async fn run_pass(
    path: &Path,
    sources: &[String],
    format: Format,
    env: &Env,
    out: &mut Stdout,
) -> Result<(), Error> {
    let config = Config::load(path, env)?;
    let started = std::time::Instant::now();
    let report = Box::pin(run::pass(&config, env, sources)).await;
    let snapshot = crate::metrics::Snapshot::of(&report, started.elapsed());
    crate::metrics::publish(&config, env, &snapshot).await;
    let report = report?;
    for manifest in &report.made {
        match format {
            Format::Text => out.line(&manifest.id)?,
            Format::Json => out.line(serde_json::json!({
                "id": manifest.id,
                "size": manifest.data.size,
                "sha256": manifest.data.sha256,
            }))?,
        }
    }
    report.into_result().map(drop)
}

async fn list(
    path: &Path,
    filter: &Filter,
    format: Format,
    env: &Env,
    out: &mut Stdout,
) -> Result<(), Error> {
    let config = Config::load(path, env)?;
    let stores = filter.stores(&config, env).await?;
    if format == Format::Text {
        out.line(format_args!(
            "{:<52} {:<10} {:>12} {:<8}",
            "ID", "TARGET", "SIZE", "VERIFIED"
        ))?;
    }
    for (name, store) in stores {
        for listed in inventory::inventory(&store).await?.complete {
            if out.closed() {
                return Ok(());
            }
            if !filter.source(&listed) {
                continue;
            }
            match format {
                Format::Text => out.line(format_args!(
                    "{:<52} {:<10} {:>12} {:<8}",
                    listed.id,
                    name,
                    listed.manifest.data.size,
                    match &listed.verify {
                        Some(v) if v.ok => "yes",
                        Some(_) => "FAILED",
                        None => "-",
                    }
                ))?,
                Format::Json => out.line(serde_json::json!({
                    "target": name,
                    "id": listed.id,
                    "manifest": listed.manifest,
                    "verify": listed.verify,
                }))?,
            }
        }
    }
    for cluster in &config.clusters {
        if filter.target(&cluster.target) {
            let store = cluster_store(&config, cluster, env).await?;
            let window = crate::pitr::window(&store, &cluster.name).await?;
            match format {
                Format::Text => out.line(format_args!("{window} (target {})", cluster.target))?,
                Format::Json => out.line(serde_json::json!({
                    "target": cluster.target,
                    "cluster": window,
                }))?,
            }
        }
    }
    Ok(())
}

/// What `restore` was asked for.
struct RestoreArgs {
    id: BackupId,
    to: RestoreTo,
    table: Option<String>,
    force: bool,
    identity: Option<PathBuf>,
    target: Option<String>,
    no_owner: bool,
    allow_unsigned: bool,
}

/// What `verify` was asked for, besides the filter.
struct VerifyArgs {
    id: Option<BackupId>,
    identity: Option<PathBuf>,
    allow_unsigned: bool,
}

async fn restore_backup(path: &Path, args: RestoreArgs, env: &Env) -> Result<(), Error> {
    let config = Config::load(path, env)?;
    if let Some(table) = args.table.clone() {
        return restore_table(&config, &table, args, env).await;
    }
    let destination = match (args.to.to_db, args.to.to_dir, args.to.to_file) {
        (Some(db), None, None) => Destination::Database(db),
        (None, Some(dir), None) => Destination::Dir(dir),
        (None, None, Some(file)) => Destination::File(file),
        _ => {
            return Err(Error::Usage(
                "give one of --to-db, --to-dir or --to-file".into(),
            ));
        }
    };
    let identity = identity(args.identity, &config)?;
    let (listed, store, _) = run::locate(&config, env, &args.id, args.target.as_deref()).await?;
    let pg = match destination {
        Destination::Database(_) => Some(PgSettings::from_env(env)?),
        _ => None,
    };
    let trust = config.signing.trust(args.allow_unsigned);
    let restorer = Restorer {
        store: &store,
        env,
        pg: pg.as_ref(),
        pg_bin_dir: config.pg_bin_dir.as_deref(),
        identity: identity.as_ref(),
        no_owner: args.no_owner,
        trust: &trust,
    };
    restorer.restore(&listed, &destination, args.force).await
}

/// `restore ID --table SCHEMA.NAME --to-db X | --to-table NEW`.
async fn restore_table(
    config: &Config,
    table: &str,
    args: RestoreArgs,
    env: &Env,
) -> Result<(), Error> {
    let table: TableName = table
        .parse()
        .map_err(|why: String| Error::Usage(format!("--table: {why}")))?;
    let destination = match (args.to.to_db, args.to.to_table) {
        (Some(db), None) => TableDestination::Database(db),
        (None, Some(new)) => TableDestination::Table(
            TableName::parse_in(&new, &table.schema)
                .map_err(|why| Error::Usage(format!("--to-table: {why}")))?,
        ),
        _ => {
            return Err(Error::Usage(
                "--table restores into --to-db DATABASE or --to-table NEW".into(),
            ));
        }
    };
    let identity = identity(args.identity, config)?;
    let (listed, store, _) = run::locate(config, env, &args.id, args.target.as_deref()).await?;
    let pg = PgSettings::from_env(env)?;
    let trust = config.signing.trust(args.allow_unsigned);
    let restorer = Restorer {
        store: &store,
        env,
        pg: Some(&pg),
        pg_bin_dir: config.pg_bin_dir.as_deref(),
        identity: identity.as_ref(),
        no_owner: args.no_owner,
        trust: &trust,
    };
    restorer
        .restore_table(&listed, &table, &destination, args.force)
        .await
}

async fn verify(
    path: &Path,
    args: VerifyArgs,
    filter: &Filter,
    env: &Env,
    out: &mut Stdout,
) -> Result<(), Error> {
    let config = Config::load(path, env)?;
    let identity = identity(args.identity, &config)?;
    let trust = config.signing.trust(args.allow_unsigned);
    let chosen = match args.id {
        Some(id) => vec![run::locate(&config, env, &id, filter.target.as_deref()).await?],
        None => newest_of_each_subject(&config, filter, env).await?,
    };
    // Only database backups need a server; a folder's restore test must not fail because
    // the libpq environment is unset.
    let pg = if chosen
        .iter()
        .any(|(listed, _, _)| matches!(listed.manifest.content, Content::Postgres { .. }))
    {
        Some(PgSettings::from_env(env)?)
    } else {
        None
    };
    let mut failures = Vec::new();
    for (listed, store, name) in &chosen {
        let restorer = Restorer {
            store,
            env,
            pg: pg.as_ref(),
            pg_bin_dir: config.pg_bin_dir.as_deref(),
            identity: identity.as_ref(),
            no_owner: false,
            trust: &trust,
        };
        match restore::verify(&restorer, listed).await {
            Ok(record) => out.line(format_args!(
                "{} on {name}: ok: {}",
                listed.id, record.detail
            ))?,
            Err(err) => {
                out.line(format_args!(
                    "{} on {name}: FAILED: {}",
                    listed.id,
                    labcore::exit::chain(&err)
                ))?;
                failures.push(err);
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        _ => Err(failures.remove(0)),
    }
}

/// `verify --latest`: the newest complete backup of each subject on each target.
async fn newest_of_each_subject(
    config: &Config,
    filter: &Filter,
    env: &Env,
) -> Result<Vec<(Listed, Store, String)>, Error> {
    let mut chosen = Vec::new();
    for (name, store) in filter.stores(config, env).await? {
        // Oldest first, so the last one kept for a subject is its newest.
        let mut newest: BTreeMap<String, Listed> = BTreeMap::new();
        for listed in inventory::inventory(&store).await?.complete {
            if filter.source(&listed) {
                let source = &listed.manifest.source;
                let subject = catalog::subject(&source.name, source.database.as_deref());
                newest.insert(subject, listed);
            }
        }
        chosen.extend(
            newest
                .into_values()
                .map(|listed| (listed, store.clone(), name.clone())),
        );
    }
    if chosen.is_empty() {
        return Err(Error::NotFound {
            id: "any backup".into(),
            target: filter.target.clone().unwrap_or_else(|| "any".into()),
        });
    }
    Ok(chosen)
}

async fn prune(
    path: &Path,
    dry_run: bool,
    format: Format,
    env: &Env,
    out: &mut Stdout,
) -> Result<(), Error> {
    let config = Config::load(path, env)?;
    if !config.retention.prunes() && config.targets.iter().all(|t| t.retention.is_none()) {
        tracing::warn!("no [retention] counts are set: prune keeps everything");
    }
    let _lock = RunLock::acquire(&config.lock_file)?;
    let now = jiff::Timestamp::now();
    let verb = if dry_run { "would delete" } else { "deleted" };
    // Every target is pruned even when the reader of the output has gone.
    for (name, store) in run::open_stores(&config, env).await? {
        let policy = config.retention_for(&name);
        let report = inventory::prune(&store, policy, now, None, dry_run).await?;
        match format {
            Format::Text => {
                for id in &report.deleted {
                    out.line(format_args!("{verb} {id} on {name}"))?;
                }
                for id in &report.leftovers {
                    out.line(format_args!("{verb} incomplete {id} on {name}"))?;
                }
            }
            Format::Json => out.line(serde_json::json!({
                "target": name,
                "dry_run": dry_run,
                "deleted": report.deleted,
                "incomplete": report.leftovers,
                "kept": report.kept,
            }))?,
        }
    }
    for cluster in &config.clusters {
        let store = cluster_store(&config, cluster, env).await?;
        let planned =
            crate::pitr::prune(&store, &cluster.name, &config.retention, now, dry_run).await?;
        for id in &planned.bases {
            out.line(format_args!(
                "{verb} base backup {id} on {}",
                cluster.target
            ))?;
        }
        if !planned.wal.is_empty() {
            out.line(format_args!(
                "{verb} {} WAL files of cluster {} on {} ({}..{})",
                planned.wal.len(),
                cluster.name,
                cluster.target,
                planned.wal[0],
                planned.wal[planned.wal.len() - 1]
            ))?;
        }
    }
    Ok(())
}

/// Loads the config (reading the secret and recipient files it names, nothing else: no
/// PostgreSQL, no S3) and prints what it resolves to.
fn check(path: &Path, env: &Env, out: &mut Stdout) -> Result<(), Error> {
    let config = Config::load(path, env)?;
    out.line(format_args!("{}: ok", config.file.path().display()))?;
    for source in &config.sources {
        out.line(format_args!("source {}: {:?}", source.name, source.kind))?;
    }
    for target in &config.targets {
        out.line(format_args!("target {}: {:?}", target.name, target.url))?;
        if !target.copy_to.is_empty() {
            out.line(format_args!(
                "target {}: copies to {}",
                target.name,
                target.copy_to.join(", ")
            ))?;
        }
        if let Some(retention) = &target.retention {
            out.line(format_args!(
                "target {}: retention {retention:?}",
                target.name
            ))?;
        }
    }
    out.line(format_args!("retention: {:?}", config.retention))?;
    match &config.signing.key {
        Some(key) => out.line(format_args!("signing key: {}", key.public()))?,
        None => out.line("signing key: none (run refuses to back up)")?,
    }
    for key in &config.signing.public_keys {
        out.line(format_args!("trusted key: {key}"))?;
    }
    match &config.signing.wal_key {
        Some(key) => out.line(format_args!("WAL signing key: {}", key.public()))?,
        None if config.clusters.is_empty() => {}
        None => out.line("WAL signing key: none (wal-push refuses to archive)")?,
    }
    for key in &config.signing.wal_public_keys {
        out.line(format_args!("trusted WAL key: {key}"))?;
    }
    Ok(())
}

/// The store a cluster's WAL and base backups live on.
async fn cluster_store(
    config: &Config,
    cluster: &crate::cluster::Cluster,
    env: &Env,
) -> Result<Store, Error> {
    run::open_stores(config, env)
        .await?
        .into_iter()
        .find(|(name, _)| *name == cluster.target)
        .map(|(_, store)| store)
        .ok_or_else(|| Error::Usage(format!("no target named {:?}", cluster.target)))
}

async fn restore_cluster(
    path: &Path,
    pitr: PitrArgs,
    to: RestoreTo,
    identity_flag: Option<PathBuf>,
    allow_unsigned: bool,
    env: &Env,
) -> Result<String, Error> {
    let config = Config::load(path, env)?;
    let cluster = crate::cluster::pick(&config.clusters, pitr.cluster.as_deref())?;
    let to_dir = to
        .to_dir
        .ok_or_else(|| Error::Usage("restore --cluster needs --to-dir PGDATA".into()))?;
    let target = match (pitr.to_time, pitr.to_lsn, pitr.latest) {
        (Some(time), None, false) => crate::pitr::RecoveryTarget::Time(time),
        (None, Some(lsn), false) => {
            crate::pitr::RecoveryTarget::Lsn(lsn.parse().map_err(Error::Usage)?)
        }
        (None, None, true) => crate::pitr::RecoveryTarget::Latest,
        _ => {
            return Err(Error::Usage(
                "restore --cluster needs one of --to-time, --to-lsn or --latest".into(),
            ));
        }
    };
    let identity = identity(identity_flag, &config)?;
    let trust = config.signing.trust(allow_unsigned);
    let wal_trust = config.signing.wal_trust(allow_unsigned);
    let store = cluster_store(&config, cluster, env).await?;
    let args = crate::pitr::RestoreArgs {
        config: &config,
        trust: &trust,
        wal_trust: &wal_trust,
        env,
        identity: identity.as_ref(),
    };
    crate::pitr::restore(&args, cluster, &store, &target, &to_dir, pitr.start).await
}

async fn verify_cluster(
    path: &Path,
    name: &str,
    identity_flag: Option<PathBuf>,
    allow_unsigned: bool,
    env: &Env,
) -> Result<String, Error> {
    let config = Config::load(path, env)?;
    let cluster = crate::cluster::pick(&config.clusters, Some(name))?;
    let identity = identity(identity_flag, &config)?;
    let trust = config.signing.trust(allow_unsigned);
    let wal_trust = config.signing.wal_trust(allow_unsigned);
    let store = cluster_store(&config, cluster, env).await?;
    let args = crate::pitr::RestoreArgs {
        config: &config,
        trust: &trust,
        wal_trust: &wal_trust,
        env,
        identity: identity.as_ref(),
    };
    let done = crate::pitr::verify(&args, cluster, &store).await?;
    Ok(format!("cluster {name}: ok: {done}"))
}
