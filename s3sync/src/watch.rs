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

use std::collections::HashMap;
use std::path::PathBuf;
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

    let notifier = Notifier::from_env(env).map_err(|source| Error::Runtime {
        what: "opening the systemd notify socket",
        source,
    })?;
    let mut known = Known::new();
    full_sync(t, report, &root, &url, &filter, &options, &mut known).await?;
    notifier.ready();
    tracing::info!(folder = %root.display(), destination = %url, "watching for changes");
    let cancel = t.cancel.clone();
    // Deletions after the first sync are of files seen gone, not guesses: no share limit.
    let options = TreeOptions {
        force: true,
        max_delete: None,
        ..options
    };
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

fn watch_error(root: &std::path::Path, err: notify::Error) -> Error {
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
    root: &std::path::Path,
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

/// Uploads what changed since the last sync and deletes what is gone.
async fn incremental(
    t: &Transfers,
    report: &mut Report,
    root: &std::path::Path,
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
    if options.delete && listing.complete() && report.failed == failed_before {
        let present: std::collections::HashSet<&str> =
            listing.entries.iter().map(|e| e.rel.as_str()).collect();
        let gone: Vec<Entry> = known
            .keys()
            .filter(|rel| !present.contains(rel.as_str()))
            .map(|rel| Entry {
                rel: rel.clone(),
                size: 0,
                mtime: None,
                uploaded: None,
                etag: None,
            })
            .collect();
        if !gone.is_empty() {
            let refs: Vec<&Entry> = gone.iter().collect();
            sync::delete_all(t, report, &Side::S3(url.clone()), &refs).await?;
            for entry in &gone {
                known.remove(&entry.rel);
            }
        }
    }
    tracing::debug!(uploaded = count, "changes synced");
    Ok(())
}
