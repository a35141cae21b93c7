//! Copies between targets (`copy_to`): a sweep that makes the destination hold every object of
//! the source target that it lacks or holds with another size, whatever wrote it (backups, WAL
//! segments, base backups), so a destination that was down catches up on the next pass.
//!
//! Invariants:
//! - Manifests go last. Within a backup folder the data, signature and records are copied
//!   before its `manifest.json`; of the other objects, those named like a manifest are copied
//!   after all the rest. So a manifest on the destination never names data not yet there.
//! - A backup of ours (a `manifest.json` that parses as one) is copied only when its manifest
//!   is signed by a trusted key, its restore test (if any) did not fail, and the data stored
//!   on the destination has the size and SHA-256 the manifest gives; that check is the copy's
//!   verification. A folder without a manifest (an unfinished backup) is not copied.
//! - A backup older than the newest one of its subject on the destination is not copied:
//!   the destination's retention pruned it, and copying it again would undo that. Backups
//!   are swept oldest first, so a sweep cut short leaves no gap behind what it copied.
//! - Nothing is ever deleted on the destination by a sweep, and the source is only read.
//!   Retention prunes each side with its own policy, the destination only after a sweep that
//!   left nothing pending ([`CopyReport::complete`]).
//! - A sweep stops at the first store error (the destination is down, say) and reports how
//!   much was left; it never fails the backups of the pass.

use std::collections::BTreeMap;

use crate::Error;
use crate::catalog::{self, BackupId, Manifest, VerifyRecord};
use crate::config::Config;
use crate::signing::{self, Trust};
use crate::store::{Store, StoreError};

/// One `copy_to` of a pass: from which target to which, and how it went.
#[derive(Debug)]
pub(crate) struct Copied {
    /// The target copied from.
    pub(crate) from: String,
    /// The target copied to.
    pub(crate) to: String,
    /// What the sweep did.
    pub(crate) report: CopyReport,
}

/// Sweeps every `copy_to` of the config, in file order, logging each outcome.
pub(crate) async fn copy_all(config: &Config, stores: &[(String, Store)]) -> Vec<Copied> {
    let trust = config.signing.trust(false);
    let store = |name: &str| stores.iter().find(|(n, _)| n == name).map(|(_, s)| s);
    let mut done = Vec::new();
    for target in &config.targets {
        let Some(from) = store(&target.name) else {
            continue;
        };
        for name in &target.copy_to {
            let Some(to) = store(name) else {
                continue;
            };
            let report = sweep(from, to, &trust).await;
            if report.complete() {
                tracing::info!(from = %target.name, to = %name, copied = report.copied, bytes = report.bytes, "copy complete");
            } else {
                tracing::error!(from = %target.name, to = %name, copied = report.copied, pending = report.pending, reason = %report.why(), "copy pending: the next pass continues it");
            }
            done.push(Copied {
                from: target.name.clone(),
                to: name.clone(),
                report,
            });
        }
    }
    done
}

/// What a sweep did.
#[derive(Debug, Default)]
pub(crate) struct CopyReport {
    /// Objects copied.
    pub(crate) copied: usize,
    /// Bytes copied.
    pub(crate) bytes: u64,
    /// Objects still missing or different on the destination when the sweep ended.
    pub(crate) pending: usize,
    /// Backups not copied, and why (an untrusted manifest, data that does not match it).
    pub(crate) refused: Vec<String>,
    /// Backups left out on purpose: their restore test failed.
    pub(crate) skipped: Vec<String>,
    /// The store error that stopped the sweep.
    pub(crate) error: Option<Error>,
}

impl CopyReport {
    /// Whether the destination now holds everything it should.
    pub(crate) fn complete(&self) -> bool {
        self.pending == 0 && self.error.is_none() && self.refused.is_empty()
    }

    /// Why the copy is not complete, for messages.
    pub(crate) fn why(&self) -> String {
        match &self.error {
            Some(err) => format!(
                "{} objects pending: {}",
                self.pending,
                labcore::exit::chain(err)
            ),
            None if !self.refused.is_empty() => self.refused.join("; "),
            None => format!("{} objects pending", self.pending),
        }
    }
}

/// The objects of one backup folder.
#[derive(Default)]
struct Folder {
    /// Every key in it, with its size.
    keys: Vec<(String, u64)>,
}

/// Copies what `to` lacks of `from`.
pub(crate) async fn sweep(from: &Store, to: &Store, trust: &Trust) -> CopyReport {
    let mut report = CopyReport::default();
    if let Err(err) = sweep_into(from, to, trust, &mut report).await {
        report.error = Some(err);
    }
    report
}

async fn sweep_into(
    from: &Store,
    to: &Store,
    trust: &Trust,
    report: &mut CopyReport,
) -> Result<(), Error> {
    let source = sizes(from).await?;
    let destination = sizes(to).await?;
    let differs = |key: &str, size: u64| destination.get(key) != Some(&size);

    // Backup folders (SUBJECT/STAMP/...) by ID; everything else is copied as it is.
    let mut folders: BTreeMap<BackupId, Folder> = BTreeMap::new();
    let mut loose: Vec<(String, u64)> = Vec::new();
    for (key, size) in &source {
        match backup_of(key) {
            Some(id) => folders
                .entry(id)
                .or_default()
                .keys
                .push((key.clone(), *size)),
            None => loose.push((key.clone(), *size)),
        }
    }
    // The newest complete backup of each subject already on the destination: older ones it
    // lacks were pruned by its own retention (or predate it) and are not copied again.
    let mut newest_there: BTreeMap<String, jiff::Timestamp> = BTreeMap::new();
    for key in destination.keys() {
        if let Some(id) = backup_of(key)
            && key.ends_with(&format!("/{}", catalog::MANIFEST))
        {
            let newest = newest_there.entry(id.subject).or_insert(id.time);
            *newest = (*newest).max(id.time);
        }
    }
    // Count up front, so a sweep stopped by an error reports what is left.
    let mut plan: Vec<Step> = Vec::new();
    for (id, folder) in folders {
        if newest_there.get(&id.subject).is_some_and(|t| *t > id.time) {
            continue;
        }
        let manifest_key = format!("{}/{}", id.dir(), catalog::MANIFEST);
        let Some(manifest_size) = folder
            .keys
            .iter()
            .find(|(k, _)| *k == manifest_key)
            .map(|(_, s)| *s)
        else {
            continue; // unfinished: never copied
        };
        let verify_key = format!("{}/{}", id.dir(), catalog::VERIFY);
        let rest: Vec<(String, u64)> = folder
            .keys
            .into_iter()
            .filter(|(k, s)| *k != manifest_key && (differs(k, *s) || *k == verify_key))
            .collect();
        if rest.iter().any(|(k, _)| *k != verify_key) || differs(&manifest_key, manifest_size) {
            report.pending += rest.len() + 1;
            plan.push(Step::Backup { id, rest });
        } else if !rest.is_empty() {
            // Only the restore-test record may have changed: compare it byte for byte.
            plan.push(Step::Record { key: verify_key });
        }
    }
    let (manifests, others): (Vec<_>, Vec<_>) = loose
        .into_iter()
        .filter(|(k, s)| differs(k, *s))
        .partition(|(k, _)| looks_like_manifest(k));
    report.pending += manifests.len() + others.len();
    // Loose objects (WAL segments) first: a backup's manifest may rely on them.
    for (key, size) in others.into_iter().chain(manifests) {
        copy_object(from, to, &key, size, report).await?;
    }
    for step in plan {
        match step {
            Step::Backup { id, rest } => copy_backup(from, to, trust, &id, rest, report).await?,
            Step::Record { key } => {
                let (ours, theirs) = (from.get_bytes(&key).await?, to.get_bytes(&key).await?);
                if let Some(bytes) = ours
                    && Some(&bytes) != theirs.as_ref()
                {
                    to.put_bytes(&key, bytes).await?;
                    report.copied += 1;
                }
            }
        }
    }
    Ok(())
}

enum Step {
    /// A backup to copy: the objects other than its manifest that differ (and its record).
    Backup {
        id: BackupId,
        rest: Vec<(String, u64)>,
    },
    /// Only a backup's restore-test record may differ.
    Record { key: String },
}

/// Copies one backup of ours: checks its manifest, copies the rest, checks the data, then
/// writes the manifest. A backup that fails a check is reported and left out; a store error
/// ends the sweep.
async fn copy_backup(
    from: &Store,
    to: &Store,
    trust: &Trust,
    id: &BackupId,
    rest: Vec<(String, u64)>,
    report: &mut CopyReport,
) -> Result<(), Error> {
    let dir = id.dir();
    let manifest_key = format!("{dir}/{}", catalog::MANIFEST);
    let Some(bytes) = from.get_bytes(&manifest_key).await? else {
        return Ok(()); // pruned since the listing
    };
    let manifest: Option<Manifest> = serde_json::from_slice(&bytes).ok();
    let Some(manifest) = manifest else {
        // Not a backup of this kind (a base backup, say): copied as it is, manifest last.
        for (key, size) in rest {
            copy_object(from, to, &key, size, report).await?;
        }
        copy_bytes(to, &manifest_key, bytes, report).await?;
        return Ok(());
    };
    let signature = from
        .get_bytes(&format!("{dir}/{}", signing::SIGNATURE))
        .await?;
    if let Err(err) = trust.check(&id.to_string(), &bytes, signature.as_deref()) {
        tracing::error!(backup = %id, error = %err, "not copied: its manifest is not trusted");
        report.refused.push(format!("{id}: {err}"));
        report.pending = report.pending.saturating_sub(rest.len() + 1);
        return Ok(());
    }
    let verify_key = format!("{dir}/{}", catalog::VERIFY);
    if let Some(record) = from.get_bytes(&verify_key).await?
        && serde_json::from_slice::<VerifyRecord>(&record).is_ok_and(|r| !r.ok)
    {
        tracing::warn!(backup = %id, "not copied: its restore test failed");
        report.skipped.push(id.to_string());
        report.pending = report.pending.saturating_sub(rest.len() + 1);
        return Ok(());
    }
    let data_key = format!("{dir}/{}", manifest.data.object);
    for (key, size) in rest {
        if key == data_key {
            let stored = copy_object(from, to, &key, size, report).await?;
            if (stored.size, stored.sha256.as_str())
                != (manifest.data.size, manifest.data.sha256.as_str())
            {
                to.delete(std::slice::from_ref(&key)).await?;
                tracing::error!(backup = %id, "not copied: its data does not match its manifest");
                report.refused.push(format!(
                    "{id}: the data read from the source has {} bytes, sha256 {}; the manifest \
                     says {} bytes, sha256 {}",
                    stored.size, stored.sha256, manifest.data.size, manifest.data.sha256
                ));
                report.pending = report.pending.saturating_sub(1);
                return Ok(());
            }
        } else {
            copy_object(from, to, &key, size, report).await?;
        }
    }
    copy_bytes(to, &manifest_key, bytes, report).await?;
    tracing::info!(backup = %id, to = %to.location(""), "copied");
    Ok(())
}

/// Streams one object across; checks the size arrived whole.
async fn copy_object(
    from: &Store,
    to: &Store,
    key: &str,
    size: u64,
    report: &mut CopyReport,
) -> Result<crate::store::Stored, Error> {
    let reader = from.get_stream(key).await?;
    let stored = to.put_stream(key, reader).await?;
    if stored.size != size {
        to.delete(&[key.to_owned()]).await?;
        return Err(StoreError::SizeMismatch {
            location: from.location(key),
            stored: stored.size,
            sent: size,
        }
        .into());
    }
    report.copied += 1;
    report.bytes += size;
    report.pending = report.pending.saturating_sub(1);
    Ok(stored)
}

async fn copy_bytes(
    to: &Store,
    key: &str,
    bytes: Vec<u8>,
    report: &mut CopyReport,
) -> Result<(), Error> {
    let size = bytes.len() as u64;
    to.put_bytes(key, bytes).await?;
    report.copied += 1;
    report.bytes += size;
    report.pending = report.pending.saturating_sub(1);
    Ok(())
}

/// The backup a key belongs to, if it lies in a backup folder (`SUBJECT/STAMP/NAME`).
fn backup_of(key: &str) -> Option<BackupId> {
    let mut parts = key.splitn(3, '/');
    let (subject, stamp, _) = (parts.next()?, parts.next()?, parts.next()?);
    format!("{subject}@{stamp}").parse().ok()
}

/// Whether a loose object is a manifest of something (copied after everything else).
fn looks_like_manifest(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|name| name.contains("manifest"))
}

/// Every object of a store with its size.
async fn sizes(store: &Store) -> Result<BTreeMap<String, u64>, Error> {
    let mut sizes = BTreeMap::new();
    match store {
        Store::S3 {
            client,
            bucket,
            prefix,
        } => {
            let mut pages = client
                .list_objects_v2()
                .bucket(bucket)
                .set_prefix((!prefix.is_empty()).then(|| format!("{prefix}/")))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| StoreError::S3 {
                    operation: "ListObjectsV2",
                    location: store.location(""),
                    detail: labcore::s3::upload::describe(&e),
                    exit: labcore::s3::exit_for(&e),
                })?;
                for object in page.contents() {
                    let Some(key) = object.key() else { continue };
                    let relative = match prefix.as_str() {
                        "" => Some(key),
                        p => key.strip_prefix(p).and_then(|k| k.strip_prefix('/')),
                    };
                    if let Some(relative) = relative {
                        let size = object.size().unwrap_or(0).max(0) as u64;
                        sizes.insert(relative.to_owned(), size);
                    }
                }
            }
        }
        Store::Dir(dir) => {
            for key in store.list().await? {
                // Temporary files of a write in progress are not objects.
                if key.rsplit('/').next().is_some_and(|n| n.starts_with('.')) {
                    continue;
                }
                let path = dir.join(&key);
                match tokio::fs::metadata(&path).await {
                    Ok(meta) => {
                        sizes.insert(key, meta.len());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(StoreError::Io {
                            what: "inspecting",
                            path,
                            source,
                        }
                        .into());
                    }
                }
            }
        }
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_into_backups_and_loose_objects() {
        assert_eq!(
            backup_of("shop.shop/20261125T031500.123Z/data.pgdump.zst")
                .map(|id| id.to_string())
                .as_deref(),
            Some("shop.shop@20261125T031500.123Z")
        );
        assert!(backup_of("wal/main/000000010000000000000001.zst").is_none());
        assert!(backup_of("shop.shop/20261125T031500.123Z").is_none());
        assert!(looks_like_manifest("base/main/backup_manifest.json"));
        assert!(!looks_like_manifest(
            "wal/main/000000010000000000000001.zst"
        ));
    }
}
