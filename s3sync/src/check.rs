//! `s3sync check`: compares two trees without changing either and lists every difference.
//!
//! Both sides are listed (in parallel); an entry on one side only, or of another size, is a
//! difference. With `--checksum`, entries of the same size are also compared by MD5: a local
//! file is read, an object's MD5 comes from its plain ETag or, failing that, from a HeadObject
//! (the `md5chksum` metadata). An object whose MD5 nothing tells is reported as unverifiable
//! rather than taken as equal. Differences are printed in path order; any of them, or an
//! incomplete listing, makes the command exit 1.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use labcore::Format;
use tokio::task::JoinSet;

use crate::error::Error;
use crate::filter::Filter;
use crate::meta;
use crate::sync::{Direction, Side, list, object};
use crate::transfer::{Transfers, blocking, md5_of_file};
use crate::tree::{Entry, local_path};

/// What differs about one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Difference {
    MissingInDestination,
    MissingInSource,
    SizeDiffers,
    ContentDiffers,
    Unverifiable,
}

impl Difference {
    fn name(self) -> &'static str {
        match self {
            Difference::MissingInDestination => "missing-in-destination",
            Difference::MissingInSource => "missing-in-source",
            Difference::SizeDiffers => "size-differs",
            Difference::ContentDiffers => "content-differs",
            Difference::Unverifiable => "unverifiable",
        }
    }
}

/// The MD5 of an entry on `side`, if anything tells it.
async fn md5_of(t: &Transfers, side: &Side, entry: &Entry) -> Result<Option<[u8; 16]>, Error> {
    match side {
        Side::Local(root) => {
            let path = local_path(root, &entry.rel);
            blocking(move || md5_of_file(&path)).await.map(Some)
        }
        Side::S3(url) => match entry.etag.as_deref().and_then(meta::etag_md5) {
            Some(md5) => Ok(Some(md5)),
            None => Ok(t.head(&object(url, &entry.rel)).await?.md5),
        },
    }
}

/// Runs `check`; `Err(Differences)` when anything differs.
pub(crate) async fn run(
    t: &Transfers,
    direction: Direction,
    filter: &Filter,
    checksum: bool,
    format: Format,
) -> Result<(), Error> {
    let (src, dst) = (direction.source(), direction.destination());
    let (a, b) = tokio::join!(
        list(t, &src, filter, false, true),
        list(t, &dst, filter, false, false)
    );
    let (a, b) = (a?, b?);
    let mut failed = 0;
    for err in a.errors.iter().chain(&b.errors) {
        tracing::error!("{}", labcore::exit::chain(err));
        failed += 1;
    }
    let mut found: BTreeMap<String, Difference> = BTreeMap::new();
    let index = b.index();
    let mut same_size = Vec::new();
    for entry in &a.entries {
        match index.get(entry.rel.as_str()) {
            None => {
                found.insert(entry.rel.clone(), Difference::MissingInDestination);
            }
            Some(other) if other.size != entry.size => {
                found.insert(entry.rel.clone(), Difference::SizeDiffers);
            }
            Some(other) => same_size.push((entry.clone(), (*other).clone())),
        }
    }
    let in_source = a.index();
    for entry in &b.entries {
        if !in_source.contains_key(entry.rel.as_str()) {
            found.insert(entry.rel.clone(), Difference::MissingInSource);
        }
    }
    if checksum {
        let sides = Arc::new((src.clone(), dst.clone()));
        let mut tasks: JoinSet<(String, Result<Option<Difference>, Error>)> = JoinSet::new();
        let mut pairs = same_size.into_iter();
        let limit = 32;
        loop {
            while tasks.len() < limit
                && let Some((x, y)) = pairs.next()
            {
                let (t, sides) = (t.clone(), sides.clone());
                tasks.spawn(async move {
                    let compared = async {
                        let (m, n) =
                            tokio::try_join!(md5_of(&t, &sides.0, &x), md5_of(&t, &sides.1, &y))?;
                        Ok(match (m, n) {
                            (Some(m), Some(n)) if m == n => None,
                            (Some(_), Some(_)) => Some(Difference::ContentDiffers),
                            _ => Some(Difference::Unverifiable),
                        })
                    };
                    (x.rel.clone(), compared.await)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (rel, outcome) = joined.map_err(|e| Error::Runtime {
                what: "a comparison task failed",
                source: std::io::Error::other(e),
            })?;
            match outcome {
                Ok(Some(difference)) => {
                    found.insert(rel, difference);
                }
                Ok(None) => {}
                Err(err) if err.fatal() => return Err(err),
                Err(err) => {
                    tracing::error!("{}", labcore::exit::chain(&err));
                    failed += 1;
                }
            }
        }
    }
    let mut out = std::io::stdout().lock();
    for (rel, difference) in &found {
        let line = match format {
            Format::Json => serde_json::json!({
                "difference": difference.name(),
                "path": rel,
                "source": src.display(rel),
                "destination": dst.display(rel),
            })
            .to_string(),
            Format::Text => format!("{} {rel}", difference.name()),
        };
        let _ = writeln!(out, "{line}");
    }
    drop(out);
    eprintln!(
        "s3sync: {} entries compared, {} differences{}",
        a.entries.len().max(b.entries.len()),
        found.len(),
        if failed > 0 {
            format!(", {failed} could not be compared")
        } else {
            String::new()
        }
    );
    if !found.is_empty() {
        return Err(Error::Differences(found.len()));
    }
    if failed > 0 {
        return Err(Error::Partial {
            failed,
            total: a.entries.len(),
            deletes_skipped: 0,
        });
    }
    Ok(())
}
