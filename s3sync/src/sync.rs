//! Copying and syncing whole trees: a local folder or an S3 prefix to the other kind, or one
//! prefix to another inside the store.
//!
//! A run lists both sides (only the source for `cp -r`), decides per file whether it must be
//! transferred, moves those with at most `--transfers` at once, and deletes extra destination
//! entries last (`--delete`). It is careful in the order that loses nothing:
//!
//! - The deletion limit is checked right after listing, before anything changes.
//! - Nothing is deleted when a listing was incomplete or any transfer failed.
//! - A failure that every transfer would meet (store down, keys refused, bucket gone) stops the
//!   run; one that concerns one file is reported and the rest goes on (exit 1).
//!
//! Deciding "unchanged" by default takes size, then mtime: an S3 object's mtime lives in its
//! metadata, so it costs a `HeadObject`, which is skipped when the state cache ([`cache`])
//! proves the answer from the listing, or when the listing already proves a change (a local
//! file newer than the object's upload). `--checksum` compares MD5s instead. Every transfer
//! and every `HeadObject` that found the same mtime adds a record to the cache.
//! Inside the store, equal ETags mean unchanged; otherwise both objects' metadata decide.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cache::{self, Cache, Record};
use crate::error::Error;
use crate::filter::Filter;
use crate::location::{S3Url, key_to_path};
use crate::meta;
use crate::report::{Action, Report};
use crate::transfer::{ObjectInfo, Transfers, blocking, md5_of_file};
use crate::tree::{Entry, Listing, list_local, list_s3, local_path};

/// One side of a tree transfer.
#[derive(Clone, Debug)]
pub(crate) enum Side {
    /// A local folder.
    Local(PathBuf),
    /// An S3 prefix (empty or ending in `/`).
    S3(S3Url),
}

impl Side {
    /// Where entry `rel` lives on this side, for messages.
    pub(crate) fn display(&self, rel: &str) -> String {
        match self {
            Side::Local(root) => local_path(root, rel).display().to_string(),
            Side::S3(url) => object(url, rel).to_string(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Side::Local(root) => root.display().to_string(),
            Side::S3(url) => url.to_string(),
        }
    }
}

/// The object of entry `rel` under the prefix `url`.
pub(crate) fn object(url: &S3Url, rel: &str) -> S3Url {
    url.with_key(format!("{}{rel}", url.key))
}

/// Which way a tree transfer goes, decided once from its two sides (local to local is refused
/// there): each step matches on it, so none has to ask again which side is in the store.
#[derive(Clone, Debug)]
pub(crate) enum Direction {
    /// A local folder up to an S3 prefix.
    Upload {
        /// The local folder.
        root: PathBuf,
        /// The prefix (empty or ending in `/`).
        to: S3Url,
    },
    /// An S3 prefix down to a local folder.
    Download {
        /// The prefix (empty or ending in `/`).
        from: S3Url,
        /// The local folder.
        root: PathBuf,
    },
    /// One S3 prefix to another: a server-side copy inside one store, streamed through this
    /// process between two.
    Copy {
        /// The source prefix.
        from: S3Url,
        /// The destination prefix.
        to: S3Url,
    },
}

impl Direction {
    /// The direction from `src` to `dst`; two local folders are refused.
    pub(crate) fn new(src: Side, dst: Side) -> Result<Direction, Error> {
        match (src, dst) {
            (Side::Local(root), Side::S3(to)) => Ok(Direction::Upload { root, to }),
            (Side::S3(from), Side::Local(root)) => Ok(Direction::Download { from, root }),
            (Side::S3(from), Side::S3(to)) => Ok(Direction::Copy { from, to }),
            (Side::Local(_), Side::Local(_)) => Err(Error::Usage(
                "both locations are local: s3sync moves data to, from or inside S3".into(),
            )),
        }
    }

    /// The side entries come from.
    pub(crate) fn source(&self) -> Side {
        match self {
            Direction::Upload { root, .. } => Side::Local(root.clone()),
            Direction::Download { from, .. } | Direction::Copy { from, .. } => {
                Side::S3(from.clone())
            }
        }
    }

    /// The side entries go to.
    pub(crate) fn destination(&self) -> Side {
        match self {
            Direction::Upload { to, .. } | Direction::Copy { to, .. } => Side::S3(to.clone()),
            Direction::Download { root, .. } => Side::Local(root.clone()),
        }
    }

    /// The prefix written to, when the destination is in the store.
    pub(crate) fn destination_url(&self) -> Option<&S3Url> {
        match self {
            Direction::Upload { to, .. } | Direction::Copy { to, .. } => Some(to),
            Direction::Download { .. } => None,
        }
    }

    fn action(&self) -> Action {
        match self {
            Direction::Upload { .. } => Action::Upload,
            Direction::Download { .. } => Action::Download,
            Direction::Copy { .. } => Action::Copy,
        }
    }

    /// Where entry `rel` comes from and goes to, for messages.
    fn display(&self, rel: &str) -> (String, String) {
        let local = |root: &Path| local_path(root, rel).display().to_string();
        match self {
            Direction::Upload { root, to } => (local(root), object(to, rel).to_string()),
            Direction::Download { from, root } => (object(from, rel).to_string(), local(root)),
            Direction::Copy { from, to } => {
                (object(from, rel).to_string(), object(to, rel).to_string())
            }
        }
    }
}

/// How a tree transfer behaves.
#[derive(Clone, Debug)]
pub(crate) struct TreeOptions {
    /// Compare with the destination and skip what is unchanged (`sync`), or copy all (`cp -r`).
    pub(crate) sync: bool,
    /// Delete destination entries missing from the source.
    pub(crate) delete: bool,
    /// Compare content (MD5) instead of size and mtime.
    pub(crate) checksum: bool,
    /// At most this many deletions.
    pub(crate) max_delete: Option<usize>,
    /// Lift the default share limit on deletions.
    pub(crate) force: bool,
    /// Print the plan, change nothing.
    pub(crate) dry_run: bool,
    /// With `delete`, stop instead of deleting when the source lists nothing while the
    /// destination holds entries (`watch`: an unmounted disk looks like an empty folder).
    pub(crate) refuse_empty_source: bool,
    /// Follow symbolic links in a local source.
    pub(crate) follow_links: bool,
    /// Files moving at once.
    pub(crate) transfers: usize,
    /// Where state caches live; `None` turns the cache off ([`crate::cache`]).
    pub(crate) cache_folder: Option<PathBuf>,
}

/// Share of the destination a sync may delete without `--force` or `--max-delete`.
const DEFAULT_DELETE_SHARE: f64 = 0.5;

/// Lists one side; a missing local destination is an empty one.
pub(crate) async fn list(
    t: &Transfers,
    side: &Side,
    filter: &Filter,
    follow_links: bool,
    is_source: bool,
) -> Result<Listing, Error> {
    match side {
        Side::Local(root) => {
            match tokio::fs::metadata(root).await {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Usage(format!(
                        "{} is a file, not a folder",
                        root.display()
                    )));
                }
                Err(err) if !is_source && err.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Listing::default());
                }
                Err(err) => return Err(Error::local("reading", root, err)),
            }
            let (root, filter) = (root.clone(), filter.clone());
            blocking(move || Ok(list_local(&root, follow_links, &filter))).await
        }
        Side::S3(url) => list_s3(t.client(url), &t.limits, url, &url.key, filter).await,
    }
}

enum Outcome {
    Copied(u64),
    Unchanged,
    Planned,
    Failed(Error),
}

struct Job {
    src: Entry,
    dst: Option<Entry>,
}

struct Context {
    t: Transfers,
    direction: Direction,
    options: TreeOptions,
    /// What earlier runs between this folder and prefix proved (`None` inside the store, with
    /// `--no-cache`, or without a cache folder).
    cache: Option<Cache>,
}

/// Runs a tree copy or sync; per-file failures make it end in [`Error::Partial`].
pub(crate) async fn run(
    t: &Transfers,
    report: &mut Report,
    direction: Direction,
    filter: &Filter,
    options: TreeOptions,
) -> Result<(), Error> {
    run_tracked(t, report, direction, filter, options, &mut Vec::new()).await
}

/// [`run`], also collecting the source entries the destination now matches (copied or found
/// unchanged), for callers that keep syncing incrementally.
pub(crate) async fn run_tracked(
    t: &Transfers,
    report: &mut Report,
    direction: Direction,
    filter: &Filter,
    options: TreeOptions,
    in_sync: &mut Vec<Entry>,
) -> Result<(), Error> {
    let (src, dst) = (direction.source(), direction.destination());
    let source = list(t, &src, filter, options.follow_links, true);
    let (source, destination) = if options.sync {
        let destination = list(t, &dst, filter, false, false);
        let (s, d) = tokio::join!(source, destination);
        (s?, d?)
    } else {
        (source.await?, Listing::default())
    };
    if source.symlinks_skipped > 0 {
        tracing::info!(
            count = source.symlinks_skipped,
            "symbolic links skipped (use -L to follow them)"
        );
    }
    for err in &source.errors {
        report.failed(None, None, "", err);
    }
    for err in &destination.errors {
        report.failed(None, None, "", err);
    }

    let in_source: HashSet<&str> = source.entries.iter().map(|e| e.rel.as_str()).collect();
    let deletes: Vec<&Entry> = if options.delete {
        destination
            .entries
            .iter()
            .filter(|e| !in_source.contains(e.rel.as_str()))
            .collect()
    } else {
        Vec::new()
    };
    let complete = source.complete() && destination.complete();
    if options.refuse_empty_source
        && options.delete
        && complete
        && source.entries.is_empty()
        && !destination.entries.is_empty()
    {
        return Err(Error::SourceGone {
            root: src.describe(),
            reason: format!(
                "lists nothing while {} holds {} entries",
                dst.describe(),
                destination.entries.len()
            ),
        });
    }
    let refusal = check_deletes(&options, &dst, deletes.len(), destination.entries.len());
    if let Some(err) = refusal
        && !options.dry_run
    {
        return Err(err);
    }

    let index = destination.index();
    let jobs: Vec<Job> = source
        .entries
        .iter()
        .map(|e| Job {
            src: e.clone(),
            dst: index.get(e.rel.as_str()).map(|d| (*d).clone()),
        })
        .collect();
    drop(index);
    let cache = open_cache(t, &options, &direction);
    let mut context = Arc::new(Context {
        t: t.clone(),
        direction,
        options: options.clone(),
        cache,
    });
    let mut unsettled = HashSet::new();
    let fatal = transfer_all(&context, report, jobs, in_sync, &mut unsettled).await;
    if let Some(cache) = Arc::get_mut(&mut context).and_then(|c| c.cache.take())
        && !options.dry_run
    {
        // Records of objects the listing no longer shows are dropped; without a listing
        // (cp -r) or after a failed one, they are kept: they can only save a HeadObject.
        let listed = destination.complete().then(|| destination.index());
        let gone = |rel: &str| {
            options.sync
                && listed.as_ref().is_some_and(|l| !l.contains_key(rel))
                && !in_source.contains(rel)
        };
        cache.save(&unsettled, gone);
    }
    if let Some(err) = fatal {
        return Err(err);
    }

    let mut deletes_skipped = 0;
    if !deletes.is_empty() {
        if !complete {
            tracing::warn!(
                count = deletes.len(),
                "not deleting anything: a listing was incomplete"
            );
            deletes_skipped = deletes.len();
        } else if report.failed > 0 {
            tracing::warn!(
                count = deletes.len(),
                "not deleting anything: some transfers failed"
            );
            deletes_skipped = deletes.len();
        } else if options.dry_run {
            for entry in &deletes {
                report.plan(Action::Delete, None, &dst.display(&entry.rel), None);
            }
        } else {
            delete_all(t, report, &dst, &deletes).await?;
        }
    }
    if let Some(err) = check_deletes(&options, &dst, deletes.len(), destination.entries.len()) {
        // A dry run lists its plan first, then says the real run would be refused.
        return Err(err);
    }
    if report.failed > 0 {
        return Err(Error::Partial {
            failed: report.failed,
            total: report.copied + report.failed,
            deletes_skipped,
        });
    }
    Ok(())
}

/// The refusal a run deleting `deletes` of the destination's `total` entries meets, if any.
pub(crate) fn check_deletes(
    options: &TreeOptions,
    dst: &Side,
    deletes: usize,
    total: usize,
) -> Option<Error> {
    let (limit, hint) = match options.max_delete {
        Some(n) => (n, "raise --max-delete to allow more"),
        None if options.force => return None,
        None => (
            (total as f64 * DEFAULT_DELETE_SHARE).floor() as usize,
            "more than half of the destination would go: check the source, then add --force or --max-delete N",
        ),
    };
    (deletes > limit).then(|| Error::TooManyDeletes {
        target: dst.describe(),
        deletes,
        total,
        limit,
        hint,
    })
}

/// Uploads local files under `root` to the prefix `url` without comparing (they are known to
/// have changed); returns the first run-stopping error. Entries uploaded join `in_sync`.
pub(crate) async fn upload_entries(
    t: &Transfers,
    report: &mut Report,
    root: &Path,
    url: &S3Url,
    entries: Vec<Entry>,
    options: &TreeOptions,
    in_sync: &mut Vec<Entry>,
) -> Option<Error> {
    let context = Arc::new(Context {
        t: t.clone(),
        direction: Direction::Upload {
            root: root.to_owned(),
            to: url.clone(),
        },
        options: TreeOptions {
            sync: false,
            ..options.clone()
        },
        cache: None,
    });
    let jobs = entries
        .into_iter()
        .map(|src| Job { src, dst: None })
        .collect();
    transfer_all(&context, report, jobs, in_sync, &mut HashSet::new()).await
}

/// Runs every job, `--transfers` at a time; returns the first run-stopping error.
async fn transfer_all(
    context: &Arc<Context>,
    report: &mut Report,
    jobs: Vec<Job>,
    in_sync: &mut Vec<Entry>,
    unsettled: &mut HashSet<String>,
) -> Option<Error> {
    let slots = Arc::new(Semaphore::new(context.options.transfers.max(1)));
    let mut tasks: JoinSet<(Job, Outcome)> = JoinSet::new();
    let mut fatal: Option<Error> = None;
    let cancel = context.t.cancel.clone();
    let action = context.direction.action();
    let mut handle = |joined: Result<(Job, Outcome), tokio::task::JoinError>,
                      report: &mut Report,
                      fatal: &mut Option<Error>,
                      unsettled: &mut HashSet<String>| {
        let (job, outcome) = match joined {
            Ok(done) => done,
            Err(err) => {
                *fatal = fatal.take().or(Some(Error::Runtime {
                    what: "a transfer task failed",
                    source: std::io::Error::other(err),
                }));
                return;
            }
        };
        let (source, destination) = context.direction.display(&job.src.rel);
        if matches!(outcome, Outcome::Failed(_)) {
            unsettled.insert(job.src.rel.clone());
        }
        match outcome {
            Outcome::Copied(size) => {
                report.done(action, Some(&source), &destination, Some(size));
                in_sync.push(job.src);
            }
            Outcome::Unchanged => {
                report.unchanged += 1;
                in_sync.push(job.src);
            }
            Outcome::Planned => {
                report.plan(action, Some(&source), &destination, Some(job.src.size))
            }
            Outcome::Failed(err) if fatal.is_some() => {
                // The run is stopping already; its cause is reported once.
                drop(err);
                report.failed += 1;
            }
            Outcome::Failed(err) if err.fatal() => {
                report.failed += 1;
                *fatal = Some(err);
            }
            Outcome::Failed(err) => report.failed(Some(action), Some(&source), &destination, &err),
        }
    };
    for job in jobs {
        while let Some(joined) = tasks.try_join_next() {
            handle(joined, report, &mut fatal, unsettled);
        }
        if fatal.is_some() || cancel.is_cancelled() {
            break;
        }
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the transfer semaphore is never closed"),
            () = cancel.cancelled() => break,
        };
        let context = context.clone();
        tasks.spawn(async move {
            let outcome = process(&context, &job).await;
            drop(permit);
            (job, outcome)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        handle(joined, report, &mut fatal, unsettled);
    }
    if fatal.is_none() && cancel.is_cancelled() {
        return Some(Error::Interrupted);
    }
    fatal
}

async fn process(context: &Context, job: &Job) -> Outcome {
    let copy = match needs_copy(context, job).await {
        Ok(copy) => copy,
        Err(err) => return Outcome::Failed(err),
    };
    if !copy.0 {
        return Outcome::Unchanged;
    }
    if context.options.dry_run {
        return Outcome::Planned;
    }
    context.t.queue(job.src.size);
    match copy_one(context, job, copy.1).await {
        Ok(size) => Outcome::Copied(size),
        Err(err) => Outcome::Failed(err),
    }
}

/// Whether the source entry must be transferred, and the local file's MD5 if it was computed.
async fn needs_copy(context: &Context, job: &Job) -> Result<(bool, Option<[u8; 16]>), Error> {
    let t = &context.t;
    let rel = job.src.rel.as_str();
    let local_md5 = |root: &Path| {
        let path = local_path(root, rel);
        blocking(move || md5_of_file(&path))
    };
    let Some(dst) = &job.dst else {
        // A new upload in --checksum mode records the MD5 of multipart objects.
        return match &context.direction {
            Direction::Upload { root, .. }
                if context.options.checksum
                    && !context.options.dry_run
                    && job.src.size > t.part_size as u64 =>
            {
                Ok((true, Some(local_md5(root).await?)))
            }
            _ => Ok((true, None)),
        };
    };
    if dst.size != job.src.size {
        return Ok((true, None));
    }
    match &context.direction {
        Direction::Upload { root, to } => {
            let url = object(to, rel);
            if context.options.checksum {
                let local = local_md5(root).await?;
                let remote = match dst.etag.as_deref().and_then(meta::etag_md5) {
                    Some(md5) => Some(md5),
                    None => t.head(&url).await?.md5,
                };
                return Ok((remote != Some(local), Some(local)));
            }
            if let Some(cache) = &context.cache
                && cache.proves_unchanged(rel, job.src.size, job.src.mtime, dst)
            {
                return Ok((false, None));
            }
            // A file changed after the object was uploaded needs no HeadObject to tell.
            if let (Some(mtime), Some(uploaded)) = (job.src.mtime, dst.uploaded)
                && mtime > uploaded + Duration::from_secs(2)
            {
                return Ok((true, None));
            }
            let info = t.head(&url).await?;
            match (job.src.mtime, info.mtime) {
                (Some(a), Some(b)) => {
                    let same = meta::same_mtime(a, b);
                    if same && a == b {
                        remember_head(context, rel, &job.src, dst, &info);
                    }
                    Ok((!same, None))
                }
                // Uploaded by another tool without an mtime: compare content if we can.
                _ => match info.md5 {
                    Some(remote) => {
                        let local = local_md5(root).await?;
                        Ok((remote != local, Some(local)))
                    }
                    None => Ok((true, None)),
                },
            }
        }
        Direction::Download { from, root } => {
            let url = object(from, rel);
            if context.options.checksum {
                let remote = match job.src.etag.as_deref().and_then(meta::etag_md5) {
                    Some(md5) => Some(md5),
                    None => t.head(&url).await?.md5,
                };
                let local = local_md5(root).await?;
                return Ok((remote != Some(local), None));
            }
            if let Some(cache) = &context.cache
                && cache.proves_unchanged(rel, dst.size, dst.mtime, &job.src)
            {
                return Ok((false, None));
            }
            let info = t.head(&url).await?;
            let same = dst
                .mtime
                .zip(info.file_time())
                .is_some_and(|(a, b)| meta::same_mtime(a, b));
            if same && info.mtime.is_some() && dst.mtime == info.mtime {
                remember_head(context, rel, dst, &job.src, &info);
            }
            Ok((!same, None))
        }
        Direction::Copy { from, to } => {
            if job.src.etag.is_some() && job.src.etag == dst.etag {
                return Ok((false, None));
            }
            // Between stores, a record of an earlier copy or comparison proves it from both
            // listings (the source's LastModified stands for a file's mtime).
            if let Some(cache) = &context.cache
                && !context.options.checksum
                && cache.proves_unchanged(rel, job.src.size, job.src.uploaded, dst)
            {
                return Ok((false, None));
            }
            // ETags differ or were not listed (some stores list none; a multipart copy gets
            // a new one): ask both objects what they hold.
            let (from, to) = (object(from, rel), object(to, rel));
            let (a, b) = tokio::try_join!(t.head(&from), t.head(&to))?;
            let same = if a.etag.is_some() && a.etag == b.etag {
                true
            } else if context.options.checksum {
                a.md5.is_some() && a.md5 == b.md5
            } else {
                a.mtime
                    .zip(b.mtime)
                    .is_some_and(|(x, y)| meta::same_mtime(x, y))
            };
            if same && !context.options.checksum {
                remember_copy(context, rel, &job.src, dst, &a, &b);
            }
            Ok((!same, None))
        }
    }
}

async fn copy_one(context: &Context, job: &Job, md5: Option<[u8; 16]>) -> Result<u64, Error> {
    let t = &context.t;
    let rel = job.src.rel.as_str();
    match &context.direction {
        Direction::Upload { root, to } => {
            let url = object(to, rel);
            let stored = t.upload_file(&local_path(root, rel), &url, md5).await?;
            if let Some(cache) = &context.cache
                && let Some(mtime) = stored.mtime.and_then(cache::nanos)
                && stored.date.is_some()
            {
                // The object now carries this mtime; its LastModified is pinned by the first
                // listing that shows it ([`cache`]).
                cache.record(
                    rel,
                    Record {
                        size: stored.size,
                        mtime,
                        etag: stored
                            .etag
                            .as_deref()
                            .map(|e| cache::bare_etag(e).to_owned()),
                        listed: None,
                        written: stored.date,
                    },
                );
            }
            Ok(stored.size)
        }
        Direction::Download { from, root } => {
            let url = object(from, rel);
            let path = key_to_path(rel).map_err(|reason| Error::BadName {
                name: url.to_string(),
                reason,
            })?;
            let got = t
                .download_file(&url, &root.join(path), Some(job.src.size))
                .await?;
            // Only an object whose mtime metadata the file now has stands for the HeadObject
            // comparison; the listing's LastModified is kept if the answer was that version.
            if got.info.mtime.is_some() && got.mtime == got.info.mtime {
                remember_head(context, rel, &job.src, &job.src, &got.info);
            }
            Ok(got.size)
        }
        Direction::Copy { from, to } if from.same_store(to) => {
            t.copy_object(&object(from, rel), &object(to, rel), job.src.size)
                .await
        }
        Direction::Copy { from, to } => {
            let relayed = t
                .relay(&object(from, rel), &object(to, rel), job.src.size)
                .await?;
            if let Some(cache) = &context.cache
                && let Some(mtime) = job.src.uploaded.and_then(cache::nanos)
                && relayed.date.is_some()
            {
                // As after an upload: the first listing pins the copy's LastModified.
                cache.record(
                    rel,
                    Record {
                        size: relayed.size,
                        mtime,
                        etag: relayed
                            .etag
                            .as_deref()
                            .map(|e| cache::bare_etag(e).to_owned()),
                        listed: None,
                        written: relayed.date,
                    },
                );
            }
            Ok(relayed.size)
        }
    }
}

/// Records that the object (as `listed`) carries the mtime of the local file (`local`), once
/// an answer (`info`: a HeadObject or a GET) showed it: the listed version is the one answered
/// when the sizes, the ETags (where listed) and the second of LastModified agree.
fn remember_head(context: &Context, rel: &str, local: &Entry, listed: &Entry, info: &ObjectInfo) {
    let Some(cache) = &context.cache else { return };
    let (Some(mtime), Some(at), Some(answered)) = (
        local.mtime.or(info.mtime).and_then(cache::nanos),
        listed.uploaded.and_then(cache::nanos),
        info.uploaded.and_then(cache::nanos),
    ) else {
        return;
    };
    let listed_etag = listed.etag.as_deref().map(cache::bare_etag);
    let answered_etag = info.etag.as_deref().map(cache::bare_etag);
    let same_version = listed.size == info.size
        && at.div_euclid(1_000_000_000) == answered.div_euclid(1_000_000_000)
        && (listed_etag.is_none() || listed_etag == answered_etag);
    if same_version {
        cache.record(
            rel,
            Record {
                size: info.size,
                mtime,
                etag: answered_etag.map(str::to_owned),
                listed: Some(at),
                written: None,
            },
        );
    }
}

/// Records that the copy `dst` of `src` (on another store) carries the same mtime, once both
/// `HeadObject`s answered the versions the listings showed.
fn remember_copy(
    context: &Context,
    rel: &str,
    src: &Entry,
    dst: &Entry,
    a: &ObjectInfo,
    b: &ObjectInfo,
) {
    let Some(cache) = &context.cache else { return };
    let second = |t: Option<std::time::SystemTime>| {
        t.and_then(cache::nanos)
            .map(|n| n.div_euclid(1_000_000_000))
    };
    let (Some(mtime), Some(listed)) = (
        src.uploaded.and_then(cache::nanos),
        dst.uploaded.and_then(cache::nanos),
    ) else {
        return;
    };
    let same_versions = a.size == src.size
        && b.size == dst.size
        && second(src.uploaded) == second(a.uploaded)
        && second(dst.uploaded) == second(b.uploaded);
    if same_versions {
        cache.record(
            rel,
            Record {
                size: dst.size,
                mtime,
                etag: b.etag.as_deref().map(|e| cache::bare_etag(e).to_owned()),
                listed: Some(listed),
                written: None,
            },
        );
    }
}

/// The state cache of a folder and prefix pair, when the run moves data between them.
fn open_cache(t: &Transfers, options: &TreeOptions, direction: &Direction) -> Option<Cache> {
    let folder = options.cache_folder.as_ref()?;
    let (root, url) = match direction {
        Direction::Upload { root, to: url } | Direction::Download { from: url, root } => {
            (root, url)
        }
        Direction::Copy { from, to } if !from.same_store(to) => {
            let source = format!("{} {from}", t.stores.endpoint(from));
            let cache =
                Cache::load_for_copy(folder, t.stores.endpoint(to), &to.bucket, &to.key, &source);
            tracing::debug!(path = %cache.path().display(), "state cache");
            return Some(cache);
        }
        Direction::Copy { .. } => return None,
    };
    let cache = Cache::load(folder, t.stores.endpoint(url), &url.bucket, &url.key, root);
    tracing::debug!(path = %cache.path().display(), "state cache");
    Some(cache)
}

/// Deletes destination entries, 1,000 keys per `DeleteObjects` request.
pub(crate) async fn delete_all(
    t: &Transfers,
    report: &mut Report,
    dst: &Side,
    entries: &[&Entry],
) -> Result<(), Error> {
    match dst {
        Side::Local(root) => {
            for entry in entries {
                let path = local_path(root, &entry.rel);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {
                        report.done(Action::Delete, None, &path.display().to_string(), None);
                        remove_empty_parents(root, &path).await;
                    }
                    Err(err) => {
                        let err = Error::local("deleting", &path, err);
                        report.failed(
                            Some(Action::Delete),
                            None,
                            &path.display().to_string(),
                            &err,
                        );
                    }
                }
            }
            Ok(())
        }
        Side::S3(url) => {
            let urls: Vec<S3Url> = entries.iter().map(|e| object(url, &e.rel)).collect();
            delete_objects(t, report, &urls).await
        }
    }
}

/// Deletes objects (all in one bucket) in batches; per-key failures are reported.
pub(crate) async fn delete_objects(
    t: &Transfers,
    report: &mut Report,
    urls: &[S3Url],
) -> Result<(), Error> {
    let Some(first) = urls.first() else {
        return Ok(());
    };
    for batch in urls.chunks(1000) {
        let objects = batch
            .iter()
            .map(|u| ObjectIdentifier::builder().key(&u.key).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Usage(format!("building a delete request: {e}")))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| Error::Usage(format!("building a delete request: {e}")))?;
        t.limits.request().await;
        let out = t
            .client(first)
            .delete_objects()
            .bucket(&first.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| Error::s3("DeleteObjects", first.with_key("").to_string(), &e))?;
        let mut failed: HashSet<&str> = HashSet::new();
        for error in out.errors() {
            let key = error.key().unwrap_or_default();
            failed.insert(key);
            let url = first.with_key(key);
            let err = Error::S3 {
                operation: "DeleteObjects",
                target: url.to_string(),
                detail: format!(
                    "{}: {}",
                    error.code().unwrap_or("error"),
                    error.message().unwrap_or("")
                ),
                exit: labcore::s3::exit_for_code(error.code()),
            };
            report.failed(Some(Action::Delete), None, &url.to_string(), &err);
        }
        for url in batch {
            if !failed.contains(url.key.as_str()) {
                report.done(Action::Delete, None, &url.to_string(), None);
            }
        }
    }
    Ok(())
}

/// Removes folders left empty by deletions, up to (not including) the root.
async fn remove_empty_parents(root: &Path, file: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) || tokio::fs::remove_dir(d).await.is_err() {
            break;
        }
        dir = d.parent();
    }
}
