//! Listing both sides of a transfer: a local folder tree or every object under an S3 prefix,
//! as entries keyed by their `/`-separated path below the root.
//!
//! A listing records what it could not read instead of failing outright, so the transfers
//! that can go ahead do; but a listing with any problem is marked incomplete, and nothing is
//! ever deleted on the strength of an incomplete listing. Symbolic links are followed only
//! when asked (`-L`); otherwise they are skipped and counted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use aws_sdk_s3::Client;
use tokio::task::JoinSet;

use crate::error::Error;
use crate::filter::Filter;
use crate::limit::Limits;
use crate::location::{S3Url, path_to_rel};

/// One file or object.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Path below the root, `/`-separated.
    pub(crate) rel: String,
    /// Size in bytes.
    pub(crate) size: u64,
    /// A local file's modification time.
    pub(crate) mtime: Option<SystemTime>,
    /// An object's upload time (`LastModified`).
    pub(crate) uploaded: Option<SystemTime>,
    /// An object's ETag.
    pub(crate) etag: Option<String>,
}

/// Everything found under a root.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Entries, sorted by `rel`.
    pub(crate) entries: Vec<Entry>,
    /// What could not be listed: each is one failure of the run.
    pub(crate) errors: Vec<Error>,
    /// Symbolic links skipped (no `-L`).
    pub(crate) symlinks_skipped: usize,
}

impl Listing {
    /// Whether every entry under the root was read.
    pub(crate) fn complete(&self) -> bool {
        self.errors.is_empty()
    }

    /// The entries by path.
    pub(crate) fn index(&self) -> HashMap<&str, &Entry> {
        self.entries.iter().map(|e| (e.rel.as_str(), e)).collect()
    }
}

/// Lists the files under a local folder (blocking: run it on a blocking thread).
pub(crate) fn list_local(root: &Path, follow_links: bool, filter: &Filter) -> Listing {
    let mut listing = Listing::default();
    let walker = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(follow_links)
        .into_iter()
        .filter_entry(|entry| {
            !entry.file_type().is_dir()
                || entry
                    .path()
                    .strip_prefix(root)
                    .ok()
                    .and_then(|rel| path_to_rel(rel).ok())
                    .is_none_or(|rel| filter.includes_dir(&rel))
        });
    for item in walker {
        let entry = match item {
            Ok(entry) => entry,
            Err(err) => {
                let path = err.path().unwrap_or(root).to_owned();
                let source = err
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("symbolic link loop"));
                listing.errors.push(Error::local("listing", path, source));
                continue;
            }
        };
        let kind = entry.file_type();
        if kind.is_dir() {
            continue;
        }
        if kind.is_symlink() {
            // Without -L walkdir reports links as links; with -L, a broken link lands here.
            if follow_links {
                listing.errors.push(Error::local(
                    "following symbolic link",
                    entry.path(),
                    std::io::Error::new(std::io::ErrorKind::NotFound, "its target is missing"),
                ));
            } else {
                tracing::debug!(path = %entry.path().display(), "skipping symbolic link (use -L to follow)");
                listing.symlinks_skipped += 1;
            }
            continue;
        }
        if !kind.is_file() {
            tracing::warn!(path = %entry.path().display(), "skipping special file");
            continue;
        }
        let rel_path = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let rel = match path_to_rel(rel_path) {
            Ok(rel) => rel,
            Err(reason) => {
                listing.errors.push(Error::BadName {
                    name: entry.path().display().to_string(),
                    reason,
                });
                continue;
            }
        };
        if !filter.includes(&rel) {
            continue;
        }
        match entry.metadata() {
            Ok(meta) => listing.entries.push(Entry {
                rel,
                size: meta.len(),
                mtime: meta.modified().ok(),
                uploaded: None,
                etag: None,
            }),
            Err(err) => {
                let source = err
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("cannot read metadata"));
                listing
                    .errors
                    .push(Error::local("reading metadata of", entry.path(), source));
            }
        }
    }
    listing.entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    listing
}

/// Folder listings in flight at once.
const LIST_CONCURRENCY: usize = 16;

/// Lists every object under `prefix` (which is empty or ends in `/`). A failed request fails
/// the whole listing: a partial object listing cannot be told from a complete one.
///
/// Folders (common prefixes under `/`) are listed in parallel, each with its own pages,
/// instead of one flat listing whose pages must be fetched one after another: on a large
/// tree the requests overlap, folders the filter excludes are never listed, and stores that
/// walk their whole tree for every flat page (s3s-fs does) answer far less work.
pub(crate) async fn list_s3(
    client: &Client,
    limits: &Limits,
    url: &S3Url,
    prefix: &str,
    filter: &Filter,
) -> Result<Listing, Error> {
    let mut listing = Listing::default();
    let filter = Arc::new(filter.clone());
    let mut folders = vec![prefix.to_owned()];
    let mut tasks: JoinSet<Result<Folder, Error>> = JoinSet::new();
    loop {
        while tasks.len() < LIST_CONCURRENCY
            && let Some(folder) = folders.pop()
        {
            let folder = FolderListing {
                client: client.clone(),
                limits: limits.clone(),
                url: url.clone(),
                root: prefix.to_owned(),
                folder,
                filter: filter.clone(),
            };
            tasks.spawn(folder.run());
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (entries, subfolders) = joined.map_err(|e| Error::Runtime {
            what: "a listing task failed",
            source: std::io::Error::other(e),
        })??;
        listing.entries.extend(entries);
        folders.extend(subfolders);
    }
    listing.entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(listing)
}

/// What one folder holds: its objects and its subfolders' prefixes.
type Folder = (Vec<Entry>, Vec<String>);

/// One folder of an S3 listing.
struct FolderListing {
    client: Client,
    limits: Limits,
    url: S3Url,
    root: String,
    folder: String,
    filter: Arc<Filter>,
}

impl FolderListing {
    async fn run(self) -> Result<Folder, Error> {
        let (mut entries, mut folders) = (Vec::new(), Vec::new());
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.url.bucket)
            .prefix(&self.folder)
            .delimiter("/")
            .into_paginator()
            .send();
        loop {
            // Each page is one request: `--tpslimit` counts it before it goes.
            self.limits.request().await;
            let Some(page) = pages.next().await else {
                break;
            };
            let page = page.map_err(|e| {
                Error::s3(
                    "ListObjectsV2",
                    self.url.with_key(self.folder.as_str()).to_string(),
                    &e,
                )
            })?;
            for sub in page.common_prefixes() {
                let Some(sub) = sub.prefix() else { continue };
                let Some(rel) = sub.strip_prefix(self.root.as_str()) else {
                    continue;
                };
                // A prefix no longer than the folder would list the folder again.
                if sub.len() > self.folder.len()
                    && self.filter.includes_dir(rel.trim_end_matches('/'))
                {
                    folders.push(sub.to_owned());
                }
            }
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let Some(rel) = key.strip_prefix(self.root.as_str()) else {
                    continue;
                };
                // Zero-byte "folder" markers that some tools make hold no file.
                if rel.is_empty() || rel.ends_with('/') || !self.filter.includes(rel) {
                    continue;
                }
                entries.push(Entry {
                    rel: rel.to_owned(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    mtime: None,
                    uploaded: object
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok()),
                    etag: object.e_tag().map(str::to_owned),
                });
            }
        }
        Ok((entries, folders))
    }
}

/// A local root's file for relative path `rel`.
pub(crate) fn local_path(root: &Path, rel: &str) -> PathBuf {
    rel.split('/')
        .fold(root.to_owned(), |path, part| path.join(part))
}
