//! The command line: subcommands, their help (which becomes the man page), and dispatch.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use labcore::log::LogArgs;
use labcore::pg::PgSettings;
use labcore::{Env, Format, Secret};

use crate::catalog::BackupId;
use crate::config::Config;
use crate::inventory;
use crate::restore::{self, Destination, Restorer};
use crate::{Error, daemon, run};

const AFTER_HELP: &str = "\
EXAMPLES:
    backupd run -c /etc/labkit/backupd.toml          one pass now (cron, backupd.timer)
    backupd list -c backupd.toml                      what the targets hold
    backupd verify -c backupd.toml --latest           restore-test the newest backup of each source
    backupd restore -c backupd.toml metabase.metabase@20261125T031500.123Z --to-db metabase_copy
    backupd restore -c backupd.toml files@20261125T031500.123Z --to-dir /srv/restored
    backupd prune -c backupd.toml --dry-run           what retention would delete

EXIT STATUS:
    0 success; 1 some backups of a pass failed (others were made); 64 usage; 65 a backup failed
    its verification or a manifest is corrupt; 66 backup or input not found; 69 PostgreSQL or the
    store unavailable, or pg_dump failed; 73 restore target not empty (use --force) or disk full;
    74 I/O error; 75 another run holds the lock; 77 permission denied (credentials, identity);
    78 bad configuration.";

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
    /// Prints the ID of each backup made. Retention runs only if every backup succeeded.
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
    /// The target is written only when the whole restore succeeded: a database is restored
    /// into a scratch database and renamed, a folder extracted beside the target and renamed.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd restore -c backupd.toml shop.shop@20261125T031500.123Z --to-db shop_copy\n    backupd restore -c backupd.toml files@20261125T031500.123Z --to-dir /srv/files --force\n    backupd restore -c backupd.toml globals@20261125T031500.123Z --to-file globals.sql"
    )]
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup's ID, as `backupd list` prints it
        id: String,
        #[command(flatten)]
        to: RestoreTo,
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
    },
    /// Restore-test a backup into scratch space and compare it with its manifest.
    #[command(
        after_long_help = "EXAMPLES:\n    backupd verify -c backupd.toml --latest\n    backupd verify -c backupd.toml lab.metabase@20261125T031500.123Z --identity /root/backup.key"
    )]
    ///
    /// Databases are restored into a scratch database and every table's row count compared;
    /// folders are extracted into a scratch folder and every file's size, mode, mtime and
    /// SHA-256 compared. The result is recorded next to the backup; retention always keeps the
    /// newest verified backup of each source.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup's ID
        #[arg(required_unless_present = "latest", conflicts_with = "latest")]
        id: Option<String>,
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

fn parse_id(text: &str) -> Result<BackupId, Error> {
    text.parse().map_err(Error::Usage)
}

async fn dispatch(command: Command, env: &Env) -> Result<(), Error> {
    match command {
        Command::Run {
            config,
            sources,
            format,
        } => {
            let config = Config::load(&config.config, env)?;
            let report = Box::pin(run::pass(&config, env, &sources)).await?;
            for manifest in &report.made {
                match format {
                    Format::Text => println!("{}", manifest.id),
                    Format::Json => println!(
                        "{}",
                        serde_json::json!({"id": manifest.id, "size": manifest.data.size, "sha256": manifest.data.sha256})
                    ),
                }
            }
            report.into_result().map(drop)
        }
        Command::Daemon { config } => Box::pin(daemon::daemon(&config.config, env)).await,
        Command::List {
            config,
            target,
            source,
            format,
        } => {
            let config = Config::load(&config.config, env)?;
            if let Some(name) = &target
                && config.target(name).is_none()
            {
                return Err(Error::Usage(format!("no target named {name:?}")));
            }
            if format == Format::Text {
                println!(
                    "{:<52} {:<10} {:>12} {:<8}",
                    "ID", "TARGET", "SIZE", "VERIFIED"
                );
            }
            for (name, store) in run::open_stores(&config, env).await? {
                if target.as_ref().is_some_and(|t| *t != name) {
                    continue;
                }
                for listed in inventory::inventory(&store).await?.complete {
                    if source
                        .as_ref()
                        .is_some_and(|s| *s != listed.manifest.source.name)
                    {
                        continue;
                    }
                    match format {
                        Format::Text => println!(
                            "{:<52} {:<10} {:>12} {:<8}",
                            listed.id,
                            name,
                            listed.manifest.data.size,
                            match &listed.verify {
                                Some(v) if v.ok => "yes",
                                Some(_) => "FAILED",
                                None => "-",
                            }
                        ),
                        Format::Json => println!(
                            "{}",
                            serde_json::json!({"target": name, "id": listed.id, "manifest": listed.manifest, "verify": listed.verify})
                        ),
                    }
                }
            }
            Ok(())
        }
        Command::Restore {
            config,
            id,
            to,
            force,
            identity: flag,
            target,
            no_owner,
        } => {
            let config = Config::load(&config.config, env)?;
            let id = parse_id(&id)?;
            let destination = match (to.to_db, to.to_dir, to.to_file) {
                (Some(db), None, None) => Destination::Database(db),
                (None, Some(dir), None) => Destination::Dir(dir),
                (None, None, Some(file)) => Destination::File(file),
                _ => {
                    return Err(Error::Usage(
                        "give one of --to-db, --to-dir or --to-file".into(),
                    ));
                }
            };
            let identity = identity(flag, &config)?;
            let (listed, store, _) = run::locate(&config, env, &id, target.as_deref()).await?;
            let pg = match destination {
                Destination::Database(_) => Some(PgSettings::from_env(env)?),
                _ => None,
            };
            let restorer = Restorer {
                store: &store,
                env,
                pg: pg.as_ref(),
                pg_bin_dir: config.pg_bin_dir.as_deref(),
                identity: identity.as_ref(),
                no_owner,
            };
            restorer.restore(&listed, &destination, force).await
        }
        Command::Verify {
            config,
            id,
            latest,
            source,
            identity: flag,
            target,
        } => {
            let config = Config::load(&config.config, env)?;
            let identity = identity(flag, &config)?;
            let needs_pg = true;
            let pg = if needs_pg {
                PgSettings::from_env(env).ok()
            } else {
                None
            };
            let mut chosen = Vec::new();
            if let Some(id) = id {
                chosen.push(run::locate(&config, env, &parse_id(&id)?, target.as_deref()).await?);
            } else if latest {
                for (name, store) in run::open_stores(&config, env).await? {
                    if target.as_ref().is_some_and(|t| *t != name) {
                        continue;
                    }
                    let mut newest: std::collections::BTreeMap<String, inventory::Listed> =
                        Default::default();
                    for listed in inventory::inventory(&store).await?.complete {
                        if source
                            .as_ref()
                            .is_some_and(|s| *s != listed.manifest.source.name)
                        {
                            continue;
                        }
                        let subject = listed
                            .id
                            .rsplit_once('@')
                            .map(|(s, _)| s.to_owned())
                            .unwrap_or_default();
                        newest.insert(subject, listed);
                    }
                    chosen.extend(
                        newest
                            .into_values()
                            .map(|l| (l, store.clone(), name.clone())),
                    );
                }
                if chosen.is_empty() {
                    return Err(Error::NotFound {
                        id: "any backup".into(),
                        target: target.unwrap_or_else(|| "any".into()),
                    });
                }
            }
            let mut failures = Vec::new();
            for (listed, store, name) in &chosen {
                let restorer = Restorer {
                    store,
                    env,
                    pg: pg.as_ref(),
                    pg_bin_dir: config.pg_bin_dir.as_deref(),
                    identity: identity.as_ref(),
                    no_owner: false,
                };
                match restore::verify(&restorer, listed).await {
                    Ok(record) => println!("{} on {name}: ok: {}", listed.id, record.detail),
                    Err(err) => {
                        println!(
                            "{} on {name}: FAILED: {}",
                            listed.id,
                            labcore::exit::chain(&err)
                        );
                        failures.push(err);
                    }
                }
            }
            match failures.len() {
                0 => Ok(()),
                _ => Err(failures.remove(0)),
            }
        }
        Command::Prune {
            config,
            dry_run,
            format,
        } => {
            let config = Config::load(&config.config, env)?;
            if !config.retention.prunes() {
                tracing::warn!("no [retention] counts are set: prune keeps everything");
            }
            let _lock = crate::lock::RunLock::acquire(&config.lock_file)?;
            let now = jiff::Timestamp::now();
            for (name, store) in run::open_stores(&config, env).await? {
                let report =
                    inventory::prune(&store, &config.retention, now, None, dry_run).await?;
                let verb = if dry_run { "would delete" } else { "deleted" };
                match format {
                    Format::Text => {
                        for id in &report.deleted {
                            println!("{verb} {id} on {name}");
                        }
                        for id in &report.leftovers {
                            println!("{verb} incomplete {id} on {name}");
                        }
                    }
                    Format::Json => println!(
                        "{}",
                        serde_json::json!({"target": name, "dry_run": dry_run, "deleted": report.deleted, "incomplete": report.leftovers, "kept": report.kept})
                    ),
                }
            }
            Ok(())
        }
        Command::Check { config } => {
            let config = Config::load(&config.config, env)?;
            println!("{}: ok", config.file.path().display());
            for source in &config.sources {
                println!("source {}: {:?}", source.name, source.kind);
            }
            for target in &config.targets {
                println!("target {}: {:?}", target.name, target.url);
            }
            println!("retention: {:?}", config.retention);
            Ok(())
        }
    }
}
