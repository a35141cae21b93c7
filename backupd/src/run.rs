//! One pass: every configured source (or those asked for) into every target, then restore
//! tests if configured, retention only if everything succeeded, hooks and healthchecks.

use jiff::Timestamp;
use labcore::Env;
use labcore::pg::PgSettings;

use crate::backup::{self, Context, Item};
use crate::catalog::Manifest;
use crate::config::{Config, Databases, SourceSpec, TargetUrl};
use crate::copy::{self, Copied};
use crate::hooks::{self, Outcome, Ping};
use crate::inventory::{self, Listed};
use crate::lock::RunLock;
use crate::restore::{self, Restorer};
use crate::store::Store;
use crate::{Error, postgres};

/// What a pass did.
#[derive(Debug, Default)]
pub(crate) struct PassReport {
    /// Backups made (one per item and target).
    pub(crate) made: Vec<Manifest>,
    /// Failures: what failed, and why.
    pub(crate) failures: Vec<(String, Error)>,
    /// Backups deleted by retention.
    pub(crate) pruned: Vec<String>,
    /// Copies to other targets (`copy_to`).
    pub(crate) copies: Vec<Copied>,
}

impl PassReport {
    /// The pass's result as a process outcome: everything made (Ok), some failed (exit 1), or
    /// nothing made (the first failure's own status).
    /// A copy left pending after every backup succeeded is exit status 75: the next pass
    /// continues it.
    pub(crate) fn into_result(mut self) -> Result<PassReport, Error> {
        if self.failures.is_empty() {
            return match self.copies.iter().find(|c| !c.report.complete()) {
                None => Ok(self),
                Some(copy) => Err(Error::CopyPending {
                    from: copy.from.clone(),
                    to: copy.to.clone(),
                    detail: copy.report.why(),
                }),
            };
        }
        if self.made.is_empty() {
            return Err(self.failures.remove(0).1);
        }
        let (what, err) = &self.failures[0];
        Err(Error::Partial {
            failed: self.failures.len(),
            total: self.failures.len() + self.made.len(),
            first: format!("{what}: {}", labcore::exit::chain(err)),
        })
    }
}

/// Opens every target of the config, each S3 one with its own client ([`crate::s3client`]).
pub(crate) async fn open_stores(config: &Config, env: &Env) -> Result<Vec<(String, Store)>, Error> {
    let mut stores = Vec::with_capacity(config.targets.len());
    for target in &config.targets {
        let client = match target.url {
            TargetUrl::S3 { .. } => Some(crate::s3client::client(config, target, env).await?),
            TargetUrl::Dir(_) => None,
        };
        stores.push((
            target.name.clone(),
            Store::open(&target.url, client.as_ref()),
        ));
    }
    Ok(stores)
}

/// Runs one pass under the config's lock.
pub(crate) async fn pass(config: &Config, env: &Env, only: &[String]) -> Result<PassReport, Error> {
    for name in only {
        if config.source(name).is_none() {
            return Err(Error::Usage(format!(
                "no source named {name:?} in {}",
                config.file.path().display()
            )));
        }
    }
    let _lock = RunLock::acquire(&config.lock_file)?;
    hooks::ping(&config.hooks, Ping::Start, "").await;
    let report = Box::pin(pass_locked(config, env, only)).await;
    let outcome = match &report {
        Ok(report) => Outcome {
            success: report.failures.is_empty()
                && report.copies.iter().all(|c| c.report.complete()),
            reason: report
                .failures
                .first()
                .map(|(what, err)| format!("{what}: {}", labcore::exit::chain(err)))
                .or_else(|| {
                    report
                        .copies
                        .iter()
                        .find(|c| !c.report.complete())
                        .map(|c| {
                            format!(
                                "copy from {} to {} pending: {}",
                                c.from,
                                c.to,
                                c.report.why()
                            )
                        })
                }),
            backups: report.made.iter().map(|m| m.id.clone()).collect(),
        },
        Err(err) => Outcome {
            success: false,
            reason: Some(labcore::exit::chain(err)),
            backups: Vec::new(),
        },
    };
    if let Some(reason) = &outcome.reason {
        tracing::error!(%reason, "backup pass failed");
    }
    hooks::run_hook(&config.hooks, &outcome, env).await;
    let ping = if outcome.success {
        Ping::Success
    } else {
        Ping::Fail
    };
    hooks::ping(&config.hooks, ping, outcome.reason.as_deref().unwrap_or("")).await;
    report
}

async fn pass_locked(config: &Config, env: &Env, only: &[String]) -> Result<PassReport, Error> {
    let stores = open_stores(config, env).await?;
    let needs_pg = config
        .sources
        .iter()
        .any(|s| matches!(s.kind, SourceSpec::Postgres(_) | SourceSpec::Globals));
    let pg = if needs_pg {
        Some(PgSettings::from_env(env)?)
    } else {
        None
    };
    let mut report = PassReport::default();

    let mut items = Vec::new();
    for source in config
        .sources
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
    {
        match &source.kind {
            SourceSpec::Postgres(Databases::List(list)) => {
                items.extend(list.iter().map(|db| Item::Database {
                    source: source.name.clone(),
                    database: db.clone(),
                }))
            }
            SourceSpec::Postgres(Databases::All(_)) => {
                let settings = pg
                    .as_ref()
                    .expect("settings are read when a postgres source exists");
                match postgres::all_databases(settings).await {
                    Ok(list) => items.extend(list.into_iter().map(|db| Item::Database {
                        source: source.name.clone(),
                        database: db,
                    })),
                    Err(err) => report
                        .failures
                        .push((format!("source {}", source.name), err)),
                }
            }
            SourceSpec::Globals => items.push(Item::Globals {
                source: source.name.clone(),
            }),
            SourceSpec::Folder { path, exclude } => items.push(Item::Folder {
                source: source.name.clone(),
                path: path.clone(),
                exclude: exclude.clone(),
            }),
        }
    }

    let ctx = Context {
        config,
        env,
        pg: pg.as_ref(),
    };
    let mut subjects: Vec<String> = Vec::new();
    // A source's pre_hook runs right before its first backup; when it fails, the source is
    // skipped (and the failure keeps this pass from pruning anything). Its post_hook runs
    // after its last backup, whatever their outcome.
    let mut current: Option<&str> = None;
    let mut skipping = false;
    for (i, item) in items.iter().enumerate() {
        let name = item_source(item);
        let source = config.source(name);
        if current != Some(name) {
            current = Some(name);
            skipping = false;
            if let Some(command) = source.and_then(|s| s.pre_hook.as_ref())
                && let Err(err) =
                    hooks::source_hook("pre_hook", name, command, &config.hooks, env).await
            {
                tracing::error!(source = name, error = %labcore::exit::chain(&err), "pre_hook failed: the source is skipped");
                report.failures.push((format!("source {name}"), err));
                skipping = true;
            }
        }
        if skipping {
            continue;
        }
        subjects.push(item.subject());
        backup_item(item, &ctx, &stores, &mut report).await;
        let last_of_source = items
            .get(i + 1)
            .is_none_or(|next| item_source(next) != item_source(item));
        if last_of_source
            && let Some(command) = source.and_then(|s| s.post_hook.as_ref())
            && let Err(err) =
                hooks::source_hook("post_hook", name, command, &config.hooks, env).await
        {
            tracing::error!(source = name, error = %labcore::exit::chain(&err), "post_hook failed");
            report.failures.push((format!("source {name}"), err));
        }
    }

    if config.verify_after_run {
        let identity = config.encryption.as_ref().and_then(|e| e.identity.as_ref());
        let trust = config.signing.trust(false);
        for (target, store) in &stores {
            if config.is_copy_destination(target) {
                continue;
            }
            let restorer = Restorer {
                store,
                env,
                pg: pg.as_ref(),
                pg_bin_dir: config.pg_bin_dir.as_deref(),
                identity,
                no_owner: false,
                trust: &trust,
            };
            for manifest in report.made.clone() {
                let Ok(id) = manifest.id.parse() else {
                    continue;
                };
                let listed = match inventory::find(store, &id, target).await {
                    Ok(listed) => listed,
                    Err(_) => continue, // made on another target
                };
                if let Err(err) = restore::verify(&restorer, &listed).await {
                    report
                        .failures
                        .push((format!("verifying {} on {target}", listed.id), err));
                }
            }
        }
    }

    // After the restore tests, so a backup that failed its test is not copied.
    report.copies = copy::copy_all(config, &stores).await;

    let now = Timestamp::now();
    for (target, store) in &stores {
        let policy = config.retention_for(target);
        if !policy.prunes() {
            continue;
        }
        if !report.failures.is_empty() {
            tracing::warn!(target, "a backup failed: nothing is pruned in this pass");
            continue;
        }
        // A destination is pruned only once it holds everything: its newest copies are
        // then verified, so retention never deletes an older one in their favour too early.
        if let Some(copy) = report
            .copies
            .iter()
            .find(|c| c.to == *target && !c.report.complete())
        {
            tracing::warn!(target, from = %copy.from, "the copy is pending: nothing is pruned on this target");
            continue;
        }
        match inventory::prune(store, policy, now, Some(&subjects), false).await {
            Ok(pruned) => report.pruned.extend(pruned.deleted),
            Err(err) => report.failures.push((format!("pruning {target}"), err)),
        }
    }
    Ok(report)
}

/// Finds a backup on the named target, or the first target holding it.
pub(crate) async fn locate(
    config: &Config,
    env: &Env,
    id: &crate::catalog::BackupId,
    target: Option<&str>,
) -> Result<(Listed, Store, String), Error> {
    let stores = open_stores(config, env).await?;
    if let Some(name) = target
        && !stores.iter().any(|(n, _)| n == name)
    {
        return Err(Error::Usage(format!("no target named {name:?}")));
    }
    let mut last = None;
    for (name, store) in stores {
        if target.is_some_and(|t| t != name) {
            continue;
        }
        match inventory::find(&store, id, &name).await {
            Ok(listed) => return Ok((listed, store, name)),
            Err(err @ Error::NotFound { .. }) => last = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last.unwrap_or_else(|| Error::NotFound {
        id: id.to_string(),
        target: target.unwrap_or("any").to_owned(),
    }))
}

/// The source an item belongs to.
fn item_source(item: &Item) -> &str {
    match item {
        Item::Database { source, .. } | Item::Globals { source } | Item::Folder { source, .. } => {
            source
        }
    }
}

/// Backs one item up into every target that is not only a copy destination.
async fn backup_item(
    item: &Item,
    ctx: &Context<'_>,
    stores: &[(String, Store)],
    report: &mut PassReport,
) {
    let config = ctx.config;
    for (target, store) in stores {
        if config.is_copy_destination(target) {
            continue; // filled by copies, after the pass
        }
        match Box::pin(backup::back_up(item, ctx, store)).await {
            Ok(manifest) => report.made.push(manifest),
            Err(err) => {
                tracing::error!(subject = %item.subject(), target, error = %labcore::exit::chain(&err), "backup failed");
                report
                    .failures
                    .push((format!("{} to {target}", item.subject()), err));
            }
        }
    }
}
