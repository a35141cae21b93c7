//! `s3sync watch`: a full sync, then incremental uploads as inotify reports changes.
//!
//! The watcher is started before the first sync so no change falls between the two. After
//! that sync, s3sync remembers the size and mtime of every file the destination holds. Each
//! burst of events (once quiet for `--debounce`) triggers a walk of the local tree, which costs
//! no requests: files whose size or mtime differ from what is remembered are uploaded, and with
//! `--delete` remembered files that are gone are deleted. Walking the tree rather than trusting
//! event paths catches files created in a new folder before its watch was set up. When events
//! arrive faster than `--max-pending` can hold, or the kernel's queue overflows, the memory
//! may be stale, so a full sync against a fresh listing runs instead.
//!
//! A watch runs unattended for months, so no pass may empty the bucket on its own: every pass
//! keeps to the deletion limits of `sync` (`--max-delete`, or half of the destination without
//! `--force`), and the watch stops with an error, deleting nothing, when the folder stops being
//! the one it watches: removed, replaced, mounted over or unmounted (inotify follows an inode,
//! not a path), or listing nothing while the destination holds files (an unmounted disk leaves
//! an empty mount point behind).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use labcore::Env;
use labcore::notify::Notifier;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::filter::Filter;
use crate::location::S3Url;
use crate::report::Report;
use crate::sync::{self, Direction, Side, TreeOptions};
use crate::transfer::{Transfers, blocking};
use crate::tree::{Entry, list_local};

/// How `watch` batches events.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WatchSettings {
    /// Quiet time before a batch is synced.
    pub(crate) debounce: Duration,
    /// Events held before falling back to a full sync.
    pub(crate) max_pending: usize,
}

/// What the destination is known to hold: path to (size, mtime).
type Known = HashMap<String, (u64, Option<SystemTime>)>;

/// The watched folder as inotify knows it: the file system and inode the watch follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RootId {
    dev: u64,
    ino: u64,
}

impl RootId {
    fn of(root: &Path) -> Result<RootId, Error> {
        match std::fs::metadata(root) {
            Ok(meta) if meta.is_dir() => Ok(RootId {
                dev: meta.dev(),
                ino: meta.ino(),
            }),
            Ok(_) => Err(source_gone(root, "is no longer a folder")),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Err(source_gone(root, "was removed"))
            }
            Err(err) => Err(Error::local("reading", root, err)),
        }
    }

    /// Errs unless `root` is still the folder this was taken from.
    fn check(self, root: &Path) -> Result<(), Error> {
        if RootId::of(root)? != self {
            return Err(source_gone(
                root,
                "was replaced, or a file system was mounted or unmounted on it",
            ));
        }
        Ok(())
    }
}

fn source_gone(root: &Path, reason: impl Into<String>) -> Error {
    Error::SourceGone {
        root: root.display().to_string(),
        reason: reason.into(),
    }
}

fn remember(known: &mut Known, entries: Vec<Entry>) {
    for entry in entries {
        known.insert(entry.rel, (entry.size, entry.mtime));
    }
}

/// Runs until a stop signal.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    t: &Transfers,
    report: &mut Report,
    root: PathBuf,
    url: S3Url,
    filter: Filter,
    options: TreeOptions,
    settings: WatchSettings,
    env: &Env,
) -> Result<(), Error> {
    let (events, mut pending) = mpsc::channel::<()>(settings.max_pending.max(1));
    let overflow = Arc::new(AtomicBool::new(false));
    let flag = overflow.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let rescan = match &event {
            Ok(event) => event.need_rescan(),
            Err(err) => {
                tracing::warn!(error = %err, "file watcher error: a full sync follows");
                true
            }
        };
        if rescan || events.try_send(()).is_err() {
            flag.store(true, Ordering::SeqCst);
            // Wake the loop even when the queue is full: one slot is enough to be noticed.
            let _ = events.try_send(());
        }
    })
    .map_err(|e| watch_error(&root, e))?;
    watcher
        .watch(&root, RecursiveMode::Recursive)
        .map_err(|e| watch_error(&root, e))?;
    // Taken as the watch starts; a root that is a file or missing is reported by the first sync
    // as in `sync`.
    let root_id = RootId::of(&root);
    // No pass may delete the whole prefix because the folder came up empty.
    let options = TreeOptions {
        refuse_empty_source: true,
        ..options
    };

    let notifier = Notifier::from_env(env).map_err(|source| Error::Runtime {
        what: "opening the systemd notify socket",
        source,
    })?;
    let mut known = Known::new();
    full_sync(t, report, &root, &url, &filter, &options, &mut known).await?;
    let root_id = root_id?;
    notifier.ready();
    tracing::info!(folder = %root.display(), destination = %url, "watching for changes");
    let cancel = t.cancel.clone();
    'outer: loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            got = pending.recv() => if got.is_none() { break },
        }
        // Debounce: wait until no event came for the quiet time.
        loop {
            tokio::select! {
                () = cancel.cancelled() => break 'outer,
                got = pending.recv() => if got.is_none() { break 'outer },
                () = tokio::time::sleep(settings.debounce) => break,
            }
        }
        // Walking a path that is no longer the watched folder would upload and delete by
        // what happens to be there now.
        root_id.check(&root)?;
        let synced = if overflow.swap(false, Ordering::SeqCst) {
            tracing::info!("too many events at once: running a full sync");
            while pending.try_recv().is_ok() {}
            full_sync(t, report, &root, &url, &filter, &options, &mut known).await
        } else {
            incremental(t, report, &root, &url, &filter, &options, &mut known).await
        };
        match synced {
            // A stop signal during a sync is the normal way out: finished uploads are kept.
            Err(Error::Interrupted) => break,
            other => other?,
        }
    }
    notifier.stopping();
    drop(watcher);
    report.summary();
    Ok(())
}

fn watch_error(root: &Path, err: notify::Error) -> Error {
    let source = match err.kind {
        notify::ErrorKind::Io(io) => io,
        notify::ErrorKind::PathNotFound => std::io::Error::from(std::io::ErrorKind::NotFound),
        other => std::io::Error::other(format!("{other:?}")),
    };
    Error::local("watching", root, source)
}

/// A sync against fresh listings; per-file failures are logged and the watch goes on.
async fn full_sync(
    t: &Transfers,
    report: &mut Report,
    root: &Path,
    url: &S3Url,
    filter: &Filter,
    options: &TreeOptions,
    known: &mut Known,
) -> Result<(), Error> {
    let mut in_sync = Vec::new();
    let direction = Direction::Upload {
        root: root.to_owned(),
        to: url.clone(),
    };
    let result =
        sync::run_tracked(t, report, direction, filter, options.clone(), &mut in_sync).await;
    known.clear();
    remember(known, in_sync);
    keep_going(result)
}

/// Per-file failures are reported and retried with the next change; the rest stops the watch.
fn keep_going(result: Result<(), Error>) -> Result<(), Error> {
    match result {
        Err(Error::Partial { failed, .. }) => {
            tracing::warn!(
                failed,
                "some files could not be synced; they are retried with the next change"
            );
            Ok(())
        }
        other => other,
    }
}

/// Uploads what changed since the last sync and deletes what is gone, within the limits.
async fn incremental(
    t: &Transfers,
    report: &mut Report,
    root: &Path,
    url: &S3Url,
    filter: &Filter,
    options: &TreeOptions,
    known: &mut Known,
) -> Result<(), Error> {
    let (walk_root, walk_filter, follow) = (root.to_owned(), filter.clone(), options.follow_links);
    let listing = blocking(move || Ok(list_local(&walk_root, follow, &walk_filter))).await?;
    for err in &listing.errors {
        report.failed(None, None, "", err);
    }
    // What is gone is decided, and checked against the limits, before anything changes; an
    // incomplete listing proves nothing gone.
    let present: HashSet<&str> = listing.entries.iter().map(|e| e.rel.as_str()).collect();
    let gone: Vec<Entry> = if options.delete && listing.complete() {
        known
            .keys()
            .filter(|rel| !present.contains(rel.as_str()))
            .map(|rel| Entry {
                rel: rel.clone(),
                size: 0,
                mtime: None,
                uploaded: None,
                etag: None,
            })
            .collect()
    } else {
        Vec::new()
    };
    if !gone.is_empty() {
        if present.is_empty() {
            return Err(source_gone(
                root,
                format!("lists nothing while {url} holds {} files", known.len()),
            ));
        }
        let dst = Side::S3(url.clone());
        if let Some(err) = sync::check_deletes(options, &dst, gone.len(), known.len()) {
            return Err(err);
        }
    }
    let changed: Vec<Entry> = listing
        .entries
        .iter()
        .filter(|e| known.get(&e.rel) != Some(&(e.size, e.mtime)))
        .cloned()
        .collect();
    let failed_before = report.failed;
    let mut in_sync = Vec::new();
    let count = changed.len();
    let fatal = sync::upload_entries(t, report, root, url, changed, options, &mut in_sync).await;
    remember(known, in_sync);
    if let Some(err) = fatal {
        return Err(err);
    }
    if !gone.is_empty() && report.failed == failed_before {
        let refs: Vec<&Entry> = gone.iter().collect();
        sync::delete_all(t, report, &Side::S3(url.clone()), &refs).await?;
        for entry in &gone {
            known.remove(&entry.rel);
        }
    }
    tracing::debug!(uploaded = count, "changes synced");
    Ok(())
}
