//! What a target holds: complete backups (with manifests), their restore-test records, and
//! incomplete leftovers; and pruning by the retention policy.
//!
//! Pruning deletes a backup's manifest first, so an interrupted prune leaves at worst an
//! incomplete backup (invisible to every command, removed by a later prune), never a manifest
//! pointing at missing data.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::Error;
use crate::catalog::{self, BackupId, Manifest, VerifyRecord};
use crate::retention::{self, Candidate, Policy, Reason};
use crate::store::Store;

/// Leftovers of failed or interrupted backups older than this are removed by prune.
const INCOMPLETE_GRACE: SignedDuration = SignedDuration::from_hours(24);

/// A complete backup on a target.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Listed {
    /// Its ID.
    pub(crate) id: String,
    /// Its manifest.
    pub(crate) manifest: Manifest,
    /// Its latest restore test, if any.
    pub(crate) verify: Option<VerifyRecord>,
}

impl Listed {
    /// Whether its latest restore test passed.
    pub(crate) fn verified(&self) -> bool {
        self.verify.as_ref().is_some_and(|v| v.ok)
    }
}

/// Everything on a target.
#[derive(Debug, Default)]
pub(crate) struct Inventory {
    /// Complete backups, oldest first.
    pub(crate) complete: Vec<Listed>,
    /// Backups without a manifest: their IDs and object keys.
    pub(crate) incomplete: Vec<(BackupId, Vec<String>)>,
}

async fn read_json<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &str,
) -> Result<Option<T>, Error> {
    match store.get_bytes(key).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Manifest {
                location: store.location(key),
                source,
            }),
    }
}

/// Reads one backup's manifest and record.
pub(crate) async fn find(store: &Store, id: &BackupId, target: &str) -> Result<Listed, Error> {
    let manifest: Manifest = read_json(store, &format!("{}/{}", id.dir(), catalog::MANIFEST))
        .await?
        .ok_or_else(|| Error::NotFound {
            id: id.to_string(),
            target: target.to_owned(),
        })?;
    let verify = read_json(store, &format!("{}/{}", id.dir(), catalog::VERIFY)).await?;
    Ok(Listed {
        id: id.to_string(),
        manifest,
        verify,
    })
}

/// Lists a target.
pub(crate) async fn inventory(store: &Store) -> Result<Inventory, Error> {
    let mut folders: BTreeMap<BackupId, Vec<String>> = BTreeMap::new();
    for key in store.list().await? {
        let mut parts = key.splitn(3, '/');
        let (Some(subject), Some(stamp), Some(_)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(id) = format!("{subject}@{stamp}").parse::<BackupId>() else {
            continue;
        };
        folders.entry(id).or_default().push(key);
    }
    let mut inventory = Inventory::default();
    for (id, keys) in folders {
        let manifest_key = format!("{}/{}", id.dir(), catalog::MANIFEST);
        if keys.contains(&manifest_key) {
            let target = store.location("");
            match find(store, &id, &target).await {
                Ok(listed) => inventory.complete.push(listed),
                Err(Error::Manifest { location, source }) => {
                    tracing::warn!(%location, error = %source, "skipping a backup with an unreadable manifest");
                }
                Err(err) => return Err(err),
            }
        } else {
            inventory.incomplete.push((id, keys));
        }
    }
    inventory.complete.sort_by_key(|a| a.manifest.started_at);
    Ok(inventory)
}

/// What a prune did (or would do).
#[derive(Debug, Default, Serialize)]
pub(crate) struct PruneReport {
    /// Backups kept, with why.
    pub(crate) kept: Vec<(String, Vec<Reason>)>,
    /// Backups deleted.
    pub(crate) deleted: Vec<String>,
    /// Incomplete leftovers deleted.
    pub(crate) leftovers: Vec<String>,
}

/// Applies `policy` to every subject on the target (or only `subjects`).
pub(crate) async fn prune(
    store: &Store,
    policy: &Policy,
    now: Timestamp,
    subjects: Option<&[String]>,
    dry_run: bool,
) -> Result<PruneReport, Error> {
    let inventory = inventory(store).await?;
    let mut by_subject: BTreeMap<String, Vec<&Listed>> = BTreeMap::new();
    for listed in &inventory.complete {
        let Ok(id) = listed.id.parse::<BackupId>() else {
            continue;
        };
        if subjects.is_none_or(|wanted| wanted.contains(&id.subject)) {
            by_subject.entry(id.subject).or_default().push(listed);
        }
    }
    let mut report = PruneReport::default();
    for backups in by_subject.values() {
        let candidates: Vec<Candidate> = backups
            .iter()
            .map(|b| Candidate {
                id: b.id.clone(),
                time: b.manifest.started_at,
                verified: b.verified(),
            })
            .collect();
        let plan = retention::plan(&candidates, policy, now);
        for (id, reasons) in plan.keep {
            report.kept.push((id, reasons.into_iter().collect()));
        }
        for id in plan.delete {
            if !dry_run {
                let parsed: BackupId = id.parse().map_err(Error::Internal)?;
                let listed = backups
                    .iter()
                    .find(|b| b.id == id)
                    .expect("planned IDs come from the list");
                let dir = parsed.dir();
                // Manifest first: from then on the backup no longer exists for anyone.
                store
                    .delete(&[format!("{dir}/{}", catalog::MANIFEST)])
                    .await?;
                store
                    .delete(&[
                        format!("{dir}/{}", crate::signing::SIGNATURE),
                        format!("{dir}/{}", catalog::VERIFY),
                        format!("{dir}/{}", listed.manifest.data.object),
                    ])
                    .await?;
                tracing::info!(backup = %id, "pruned");
            }
            report.deleted.push(id);
        }
    }
    for (id, keys) in inventory.incomplete {
        if subjects.is_some_and(|wanted| !wanted.contains(&id.subject))
            || now.duration_since(id.time) < INCOMPLETE_GRACE
        {
            continue;
        }
        if !dry_run {
            store.delete(&keys).await?;
            tracing::info!(backup = %id, "removed an incomplete backup");
        }
        report.leftovers.push(id.to_string());
    }
    Ok(report)
}
