//! s3sync: copy, sync and stream between local files and S3 buckets.
//!
//! The binary parses its command line ([`cli`]) and hands it to [`run`], which resolves the S3
//! settings through labcore, builds one client and runs the command:
//! single objects and streams in `transfer`, whole trees in `sync` (listed by `tree`,
//! filtered by `filter`, compared with the help of the state `cache`), bucket commands in
//! `bucket`, folder watching in `watch`. What the user sees comes from `report`; every
//! failure is an [`Error`] with its exit status.
//!
//! Only `cli` (xtask builds the man page from it), [`run`] and [`Error`] are public: the
//! integration tests drive the binary, so everything else stays inside the crate, where rustc
//! reports what is unused.

mod bucket;
mod cache;
pub mod cli;
mod error;
mod filter;
mod location;
mod meta;
mod report;
mod sync;
mod transfer;
mod tree;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use labcore::Env;
use labcore::config::{self, ConfigFile};
use labcore::s3::upload::{MAX_PART_SIZE, MIN_PART_SIZE};
use labcore::s3::{S3Config, S3Settings};
use labcore::signals::Signals;
use serde::Deserialize;
use tokio::sync::Semaphore;

pub use error::Error;

use cli::{Cli, Command, TreeArgs};
use filter::Filter;
use location::{Location, S3Url};
use report::{Action, Report};
use sync::{Direction, Side, TreeOptions};
use transfer::Transfers;

/// The labkit config s3sync reads with `--config`: only the `[s3]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct S3syncToml {
    s3: Option<S3Config>,
}

/// Runs a parsed command line to completion.
pub fn run(cli: Cli) -> Result<(), Error> {
    labcore::log::init(&cli.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime {
            what: "starting the async runtime",
            source,
        })?;
    runtime.block_on(run_async(cli, Env::from_process()))
}

async fn run_async(cli: Cli, env: Env) -> Result<(), Error> {
    let part_size = usize::try_from(cli.run.part_size).unwrap_or(usize::MAX);
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
        return Err(Error::Usage(
            "--part-size must be between 5M and 5G (S3's part size limits)".into(),
        ));
    }
    let loaded: Option<(S3syncToml, ConfigFile)> = match &cli.run.config {
        Some(path) => Some(config::load(path)?),
        None => None,
    };
    let table = loaded
        .as_ref()
        .and_then(|(toml, file)| toml.s3.as_ref().map(|t| (t, file)));
    let settings = S3Settings::resolve(&cli.s3, table, &env)?;
    let client = settings.client().await?;
    let signals = Signals::install().map_err(|source| Error::Runtime {
        what: "installing signal handlers",
        source,
    })?;
    let part_concurrency = usize::from(cli.run.part_concurrency);
    let per_large = (part_concurrency as u64 + 1) * cli.run.part_size;
    let large = (cli.run.max_memory / per_large).max(1) as usize;
    let moves_data = matches!(
        cli.command,
        Command::Cp { .. } | Command::Sync { .. } | Command::Watch { .. }
    );
    let mut report = Report::new(cli.run.format, moves_data && !cli.run.no_progress);
    let transfers = Transfers {
        client,
        part_size,
        part_concurrency,
        large: Arc::new(Semaphore::new(large)),
        progress: report.progress(),
        cancel: signals.shutdown(),
        fsync: cli.run.fsync,
    };
    let cache_folder = cache::Cache::folder(&env);
    let endpoint = settings.endpoint_url().unwrap_or("aws").to_owned();
    let tree_options = |tree: &TreeArgs| TreeOptions {
        sync: false,
        delete: false,
        checksum: false,
        max_delete: None,
        force: false,
        dry_run: false,
        refuse_empty_source: false,
        follow_links: tree.follow_links,
        transfers: usize::from(cli.run.transfers),
        cache_folder: cache_folder.clone().filter(|_| !tree.no_cache),
        endpoint: endpoint.clone(),
    };
    let result = match &cli.command {
        Command::Cp {
            src,
            dst,
            recursive,
            dry_run,
            tree,
        } => {
            let options = TreeOptions {
                dry_run: *dry_run,
                ..tree_options(tree)
            };
            let result = cp(&transfers, &mut report, src, dst, *recursive, tree, options).await;
            report.summary();
            result
        }
        Command::Sync {
            src,
            dst,
            delete,
            max_delete,
            force,
            checksum,
            dry_run,
            tree,
        } => {
            let options = TreeOptions {
                sync: true,
                delete: *delete,
                checksum: *checksum,
                max_delete: *max_delete,
                force: *force,
                dry_run: *dry_run,
                ..tree_options(tree)
            };
            let direction = tree_direction(src, dst)?;
            let filter = make_filter(tree)?;
            if let Some(url) = direction.destination_url()
                && !options.dry_run
            {
                bucket::check_bucket(&transfers.client, &url.bucket).await?;
            }
            let result = sync::run(&transfers, &mut report, direction, &filter, options).await;
            report.summary();
            result
        }
        Command::Ls { url, recursive } => {
            let url = url.as_deref().map(s3_url).transpose()?;
            bucket::ls(&transfers.client, url.as_ref(), *recursive, cli.run.format).await
        }
        Command::Cat { url } => {
            let url = object_url(url)?;
            transfers
                .download_stream(&url, tokio::io::stdout())
                .await
                .map(drop)
        }
        Command::Rm {
            url,
            recursive,
            dry_run,
        } => {
            let url = s3_url(url)?;
            let result = bucket::rm(&transfers, &mut report, &url, *recursive, *dry_run).await;
            report.summary();
            result
        }
        Command::Mb { url } => bucket::mb(&transfers.client, &s3_url(url)?).await,
        Command::Watch {
            src,
            dst,
            delete,
            max_delete,
            force,
            debounce,
            max_pending,
            tree,
        } => {
            let options = TreeOptions {
                sync: true,
                delete: *delete,
                max_delete: *max_delete,
                force: *force,
                ..tree_options(tree)
            };
            let Direction::Upload { root, to: url } = tree_direction(src, dst)? else {
                return Err(Error::Usage(
                    "watch takes a local folder and an s3:// destination".into(),
                ));
            };
            bucket::check_bucket(&transfers.client, &url.bucket).await?;
            let filter = make_filter(tree)?;
            let settings = watch::WatchSettings {
                debounce: *debounce,
                max_pending: *max_pending,
            };
            watch::run(
                &transfers,
                &mut report,
                root,
                url,
                filter,
                options,
                settings,
                &env,
            )
            .await
        }
    };
    drop(signals);
    result
}

fn s3_url(arg: &str) -> Result<S3Url, Error> {
    match Location::parse(arg)? {
        Location::S3(url) => Ok(url),
        _ => Err(Error::Location {
            arg: arg.to_owned(),
            reason: "an s3://bucket/key URL is needed here".into(),
        }),
    }
}

fn object_url(arg: &str) -> Result<S3Url, Error> {
    let url = s3_url(arg)?;
    if url.is_folder() {
        return Err(Error::Location {
            arg: arg.to_owned(),
            reason: "it names a bucket or prefix, not an object".into(),
        });
    }
    Ok(url)
}

fn make_filter(tree: &TreeArgs) -> Result<Filter, Error> {
    Filter::new(&tree.include, &tree.exclude, &tree.exclude_from)
}

/// Which way a tree command goes between local folders and S3 prefixes (never stdin/stdout).
fn tree_direction(src: &str, dst: &str) -> Result<Direction, Error> {
    let side = |arg: &str| match Location::parse(arg)? {
        Location::Stdio => Err(Error::Usage(
            "- (a stream) cannot be a folder: use cp for streams".into(),
        )),
        Location::Local(path) => Ok(Side::Local(path)),
        Location::S3(url) => Ok(Side::S3(url.with_key(url.as_prefix()))),
    };
    let (src, dst) = (side(src)?, side(dst)?);
    Direction::new(src, dst)
}

async fn cp(
    t: &Transfers,
    report: &mut Report,
    src_arg: &str,
    dst_arg: &str,
    recursive: bool,
    tree: &TreeArgs,
    options: TreeOptions,
) -> Result<(), Error> {
    let src = Location::parse(src_arg)?;
    let dst = Location::parse(dst_arg)?;
    if recursive {
        let direction = tree_direction(src_arg, dst_arg)?;
        if let Some(url) = direction.destination_url()
            && !options.dry_run
        {
            bucket::check_bucket(&t.client, &url.bucket).await?;
        }
        let filter = make_filter(tree)?;
        return sync::run(t, report, direction, &filter, options).await;
    }
    match (src, dst) {
        (Location::Stdio, Location::S3(url)) => {
            let url = named_key(url, None, dst_arg)?;
            if options.dry_run {
                report.plan(Action::Upload, Some("-"), &url.to_string(), None);
                return Ok(());
            }
            bucket::check_bucket(&t.client, &url.bucket).await?;
            let stored = t.upload_stream(tokio::io::stdin(), &url).await?;
            report.done(
                Action::Upload,
                Some("-"),
                &url.to_string(),
                Some(stored.size),
            );
            Ok(())
        }
        (Location::S3(url), Location::Stdio) => {
            let url = object_url(&url.to_string())?;
            let size = t.download_stream(&url, tokio::io::stdout()).await?;
            report.done(Action::Download, Some(&url.to_string()), "-", Some(size));
            Ok(())
        }
        (Location::Local(path), Location::S3(url)) => {
            let meta = tokio::fs::metadata(&path)
                .await
                .map_err(|e| Error::local("reading", &path, e))?;
            if meta.is_dir() {
                return Err(Error::Usage(format!(
                    "{} is a folder: use cp -r",
                    path.display()
                )));
            }
            let name = path.file_name().and_then(|n| n.to_str());
            let url = named_key(url, name, dst_arg)?;
            let (source, destination) = (path.display().to_string(), url.to_string());
            if options.dry_run {
                report.plan(
                    Action::Upload,
                    Some(&source),
                    &destination,
                    Some(meta.len()),
                );
                return Ok(());
            }
            bucket::check_bucket(&t.client, &url.bucket).await?;
            t.progress.inc_length(meta.len());
            let size = t.upload_file(&path, &url, None).await?.size;
            report.done(Action::Upload, Some(&source), &destination, Some(size));
            Ok(())
        }
        (Location::S3(url), Location::Local(path)) => {
            let url = object_url(&url.to_string())?;
            let dest = into_folder(&path, url.file_name());
            let source = url.to_string();
            if options.dry_run {
                report.plan(
                    Action::Download,
                    Some(&source),
                    &dest.display().to_string(),
                    None,
                );
                return Ok(());
            }
            let size = t.download_file(&url, &dest, None).await?.size;
            report.done(
                Action::Download,
                Some(&source),
                &dest.display().to_string(),
                Some(size),
            );
            Ok(())
        }
        (Location::S3(from), Location::S3(to)) => {
            let from = object_url(&from.to_string())?;
            let to = named_key(to, from.file_name(), dst_arg)?;
            if options.dry_run {
                report.plan(Action::Copy, Some(&from.to_string()), &to.to_string(), None);
                return Ok(());
            }
            let info = t.head(&from).await?;
            bucket::check_bucket(&t.client, &to.bucket).await?;
            let size = t.copy_object(&from, &to, info.size).await?;
            report.done(
                Action::Copy,
                Some(&from.to_string()),
                &to.to_string(),
                Some(size),
            );
            Ok(())
        }
        (Location::Stdio, _) | (_, Location::Stdio) => Err(Error::Usage(
            "- (standard input or output) pairs with an s3:// location".into(),
        )),
        (Location::Local(_), Location::Local(_)) => Err(Error::Usage(
            "both locations are local: s3sync moves data to, from or inside S3".into(),
        )),
    }
}

/// The object a single-file copy writes: the key as given, or the source's name appended
/// when the key is a folder (empty or ending in `/`).
fn named_key(url: S3Url, name: Option<&str>, arg: &str) -> Result<S3Url, Error> {
    if !url.is_folder() {
        return Ok(url);
    }
    match name {
        Some(name) => {
            let key = format!("{}{name}", url.key);
            location::check_key(&key).map_err(|reason| Error::Location {
                arg: arg.to_owned(),
                reason: reason.to_owned(),
            })?;
            Ok(url.with_key(key))
        }
        None => Err(Error::Location {
            arg: arg.to_owned(),
            reason: "name the object: s3://bucket/key (a stream has no file name)".into(),
        }),
    }
}

/// A download's file: `path` itself, or `path/NAME` when it is a folder or ends in `/`.
fn into_folder(path: &Path, name: Option<&str>) -> PathBuf {
    let is_dir = path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/');
    match name {
        Some(name) if is_dir => path.join(name),
        _ => path.to_owned(),
    }
}
