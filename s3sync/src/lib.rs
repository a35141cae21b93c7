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
mod check;
pub mod cli;
mod error;
mod filter;
mod limit;
mod location;
mod meta;
mod report;
mod resume;
mod store;
mod sync;
mod transfer;
mod tree;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use labcore::Env;
use labcore::s3::upload::{MAX_PART_SIZE, MIN_PART_SIZE};
use labcore::signals::Signals;
use tokio::sync::Semaphore;

pub use error::Error;

use cli::{Cli, Command, TreeArgs};
use filter::Filter;
use location::{Location, S3Url};
use report::{Action, Report};
use sync::{Direction, Side, TreeOptions};
use transfer::Transfers;

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
    let loaded = store::load(cli.run.config.as_deref(), &env)?;
    let names = store::names(loaded.as_ref());
    let used: Vec<String> = command_urls(&cli.command)
        .into_iter()
        .filter_map(|arg| arg.strip_prefix("s3://"))
        .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned())
        .filter(|first| names.contains(first))
        .collect();
    let stores = store::Stores::build(&cli.s3, loaded.as_ref(), &used, &env).await?;
    let bwlimit = cli
        .run
        .bwlimit
        .as_deref()
        .map(limit::Timetable::parse)
        .transpose()
        .map_err(Error::Usage)?;
    if !(cli.run.tpslimit >= 0.0 && cli.run.tpslimit.is_finite()) {
        return Err(Error::Usage("--tpslimit must be 0 or more".into()));
    }
    let limits = limit::Limits::new(bwlimit.as_ref(), cli.run.tpslimit);
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
    let progress = if cli.run.no_progress {
        cli::ProgressMode::None
    } else {
        cli.run.progress
    };
    let mut report = Report::new(
        cli.run.format,
        if moves_data {
            progress
        } else {
            cli::ProgressMode::None
        },
    );
    let transfers = Transfers {
        stores,
        limits,
        part_size,
        part_concurrency,
        large: Arc::new(Semaphore::new(large)),
        progress: report.progress(),
        files: report.files(),
        cancel: signals.shutdown(),
        fsync: cli.run.fsync,
        resume_folder: resume::folder(&env),
    };
    let cache_folder = cache::Cache::folder(&env);
    let names = &names;
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
            let args = (src.as_str(), dst.as_str());
            let result = cp(
                &transfers,
                &mut report,
                names,
                args,
                *recursive,
                tree,
                options,
            )
            .await;
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
            let direction = tree_direction(src, dst, names)?;
            let filter = make_filter(tree)?;
            if let Some(url) = direction.destination_url()
                && !options.dry_run
            {
                bucket::check_bucket(transfers.client(url), &url.bucket).await?;
            }
            let result = sync::run(&transfers, &mut report, direction, &filter, options).await;
            report.summary();
            result
        }
        Command::Ls { url, recursive } => {
            // `s3://STORE` alone lists that store's buckets.
            let store = url
                .as_deref()
                .and_then(|u| u.strip_prefix("s3://"))
                .map(|rest| rest.trim_end_matches('/'))
                .filter(|name| names.iter().any(|n| n == name) || *name == location::DEFAULT_STORE);
            match store {
                Some(name) => {
                    let client = transfers
                        .stores
                        .client_of(Some(name).filter(|n| *n != location::DEFAULT_STORE));
                    bucket::ls(client, None, *recursive, cli.run.format).await
                }
                None => {
                    let url = url.as_deref().map(|u| s3_url(u, names)).transpose()?;
                    let client = transfers
                        .stores
                        .client_of(url.as_ref().and_then(|u| u.store.as_deref()));
                    bucket::ls(client, url.as_ref(), *recursive, cli.run.format).await
                }
            }
        }
        Command::Cat { url } => {
            let url = object_url(url, names)?;
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
            let url = s3_url(url, names)?;
            let result = bucket::rm(&transfers, &mut report, &url, *recursive, *dry_run).await;
            report.summary();
            result
        }
        Command::Cleanup {
            url,
            older_than,
            dry_run,
        } => {
            let url = s3_url(url, names)?;
            let found = resume::cleanup(
                transfers.client(&url),
                &transfers.limits,
                &url,
                *older_than,
                *dry_run,
                cli.run.format == labcore::Format::Json,
            )
            .await?;
            eprintln!(
                "s3sync: {found} multipart uploads older than {}s {}",
                older_than.as_secs(),
                if *dry_run {
                    "found (dry run)"
                } else {
                    "aborted"
                }
            );
            Ok(())
        }
        Command::Check {
            src,
            dst,
            checksum,
            tree,
        } => {
            let direction = tree_direction(src, dst, names)?;
            let filter = make_filter(tree)?;
            check::run(&transfers, direction, &filter, *checksum, cli.run.format).await
        }
        Command::Mb { url } => {
            let url = s3_url(url, names)?;
            bucket::mb(transfers.client(&url), &url).await
        }
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
            let Direction::Upload { root, to: url } = tree_direction(src, dst, names)? else {
                return Err(Error::Usage(
                    "watch takes a local folder and an s3:// destination".into(),
                ));
            };
            bucket::check_bucket(transfers.client(&url), &url.bucket).await?;
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

/// The location arguments of a command, to see which named stores it uses.
fn command_urls(command: &Command) -> Vec<&str> {
    match command {
        Command::Cp { src, dst, .. }
        | Command::Sync { src, dst, .. }
        | Command::Watch { src, dst, .. } => vec![src, dst],
        Command::Ls { url, .. } => url.iter().map(String::as_str).collect(),
        Command::Cat { url }
        | Command::Rm { url, .. }
        | Command::Mb { url }
        | Command::Cleanup { url, .. } => vec![url],
        Command::Check { src, dst, .. } => vec![src, dst],
    }
}

/// Parses a location argument, knowing the configured store names.
fn parse(arg: &str, names: &[String]) -> Result<Location, Error> {
    Location::parse_with(arg, &|first| names.iter().any(|n| n == first))
}

fn s3_url(arg: &str, names: &[String]) -> Result<S3Url, Error> {
    match parse(arg, names)? {
        Location::S3(url) => Ok(url),
        _ => Err(Error::Location {
            arg: arg.to_owned(),
            reason: "an s3://bucket/key URL is needed here".into(),
        }),
    }
}

fn object_url(arg: &str, names: &[String]) -> Result<S3Url, Error> {
    let url = s3_url(arg, names)?;
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
fn tree_direction(src: &str, dst: &str, names: &[String]) -> Result<Direction, Error> {
    let side = |arg: &str| match parse(arg, names)? {
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
    names: &[String],
    (src_arg, dst_arg): (&str, &str),
    recursive: bool,
    tree: &TreeArgs,
    options: TreeOptions,
) -> Result<(), Error> {
    let src = parse(src_arg, names)?;
    let dst = parse(dst_arg, names)?;
    if recursive {
        let direction = tree_direction(src_arg, dst_arg, names)?;
        if let Some(url) = direction.destination_url()
            && !options.dry_run
        {
            bucket::check_bucket(t.client(url), &url.bucket).await?;
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
            bucket::check_bucket(t.client(&url), &url.bucket).await?;
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
            let url = object_url(&url.to_string(), names)?;
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
            bucket::check_bucket(t.client(&url), &url.bucket).await?;
            t.queue(meta.len());
            let size = t.upload_file(&path, &url, None).await?.size;
            report.done(Action::Upload, Some(&source), &destination, Some(size));
            Ok(())
        }
        (Location::S3(url), Location::Local(path)) => {
            let url = object_url(&url.to_string(), names)?;
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
            let from = object_url(&from.to_string(), names)?;
            let to = named_key(to, from.file_name(), dst_arg)?;
            if options.dry_run {
                report.plan(Action::Copy, Some(&from.to_string()), &to.to_string(), None);
                return Ok(());
            }
            let info = t.head(&from).await?;
            bucket::check_bucket(t.client(&to), &to.bucket).await?;
            let size = if from.same_store(&to) {
                t.copy_object(&from, &to, info.size).await?
            } else {
                t.queue(info.size);
                t.relay(&from, &to, info.size).await?.size
            };
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
