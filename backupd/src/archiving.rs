//! `wal-push` (PostgreSQL's `archive_command`) and `wal-fetch` (its `restore_command`).
//!
//! `wal-push %p` signs the file's header with the WAL key ([`crate::wal`]) and reports success
//! only when the file is stored on the target or durably queued in the bounded spool (see
//! [`crate::spool`] for why that is safe and when it stops being allowed). A retry of a file
//! already stored with the same bytes and this key's signature succeeds; the same bytes stored
//! unsigned or signed by another key are stored again with this signature (nothing is lost:
//! the plain bytes are the same, and the object becomes one a restore trusts); a file whose
//! name the target holds with other bytes is refused (exit 65) and never overwritten.
//!
//! `wal-fetch %f %p` checks the object's signature (unsigned refused unless `--allow-unsigned`;
//! an untrusted key or a signature that does not match always refused) before it
//! decodes anything, writes the decoded file to a temporary name beside `%p`, checks its size
//! and SHA-256 against the header, and only then renames it to `%p`. A file the target lacks
//! (PostgreSQL asks for the next segment and for history files that may not exist) is an
//! ordinary "not found" (exit 66), which ends recovery the way PostgreSQL expects. Any other
//! failure exits 200 (`Exit::AbortRecovery`): PostgreSQL ends the archive at any status below
//! 126, which would end a replay early at a refused or unreachable segment and silently drop
//! the WAL after it; above 125 it aborts recovery instead. `restore` also checks every
//! signature before it lays a base backup out, so a refusal shows before any replay.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio_util::io::SyncIoBridge;

use crate::Error;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::pipeline::{self, Encoding, Hashing};
use crate::signing::{SigningKey, Trust};
use crate::spool::{self, Spool, Upload};
use crate::store::{Store, StoreError};
use crate::wal::{self, Header, WalName};

/// How a push ended well.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// The file is on the target.
    Stored,
    /// The target is unreachable; the file waits in the spool.
    Spooled,
}

/// WAL is compressed with the config's level on one thread per file: files go up in parallel.
pub(crate) fn encoding(config: &Config) -> Encoding {
    Encoding {
        level: config.compression_level,
        threads: 0,
        recipients: config
            .encryption
            .as_ref()
            .map(|e| e.recipients.clone())
            .unwrap_or_default(),
    }
}

/// The store with one attempt per request: PostgreSQL retries a failed push, and the spool
/// absorbs an outage, so the SDK's own retries (seconds of backoff each) only hold the
/// archiver up. Measured: a push against a stopped store took 7 to 10 s with them.
pub(crate) fn fail_fast(store: Store) -> Store {
    match store {
        Store::S3 {
            client,
            bucket,
            prefix,
        } => {
            let config = client
                .config()
                .to_builder()
                .retry_config(
                    aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(1),
                )
                .build();
            Store::S3 {
                client: aws_sdk_s3::Client::from_conf(config),
                bucket,
                prefix,
            }
        }
        other => other,
    }
}

/// `wal-push PATH`.
pub(crate) async fn push(
    config: &Config,
    cluster: &Cluster,
    store: &Store,
    path: &Path,
) -> Result<Pushed, Error> {
    let name = WalName::of_path(path)?;
    let key = wal_key(config)?;
    let encoding = encoding(config);
    let spool = Spool::open(&cluster.spool_dir, cluster.spool_max)?;
    let pushed_ahead = spool.take_done(&name);
    let queued = spool.header(&name);
    // The usual file is new: read once, hashed while it is encoded. One pushed ahead or queued
    // by an earlier call needs only its hash, to compare; a large one is hashed, then streamed.
    let fresh = pushed_ahead.is_none() && queued.is_none();
    let (source, encoding_copy) = (path.to_owned(), encoding.clone());
    let (size, sha256, body) = tokio::task::spawn_blocking(move || {
        if fresh && let Some(encoded) = wal::read_once(&source, &encoding_copy)? {
            return Ok((encoded.size, encoded.sha256, Some(encoded.body)));
        }
        wal::hash_file(&source).map(|(size, sha256)| (size, sha256, None))
    })
    .await
    .map_err(|e| Error::Internal(format!("reading task: {e}")))??;
    let header = Header::signed(
        key,
        &cluster.name,
        name.clone(),
        size,
        sha256,
        !encoding.recipients.is_empty(),
    );
    if let Some((size, sha256)) = pushed_ahead
        && size == header.size
        && sha256 == header.sha256
    {
        // Pushed ahead by an earlier call, and these are the same bytes.
        return Ok(Pushed::Stored);
    }
    if let Some(first) = spool.rejected().first() {
        return Err(Error::WalConflict {
            name: first.clone(),
            detail: format!(
                "it was set aside in {}/rejected because the target holds other bytes under \
                 its name; archiving stays stopped until an operator resolves it",
                cluster.spool_dir.display()
            ),
        });
    }
    match queued {
        Some(queued) if queued.same_bytes(&header) => {}
        Some(queued) => {
            return Err(Error::WalConflict {
                name: name.to_string(),
                detail: format!(
                    "the spool already holds this name with other bytes (sha256 {}, now {})",
                    queued.sha256, header.sha256
                ),
            });
        }
        None => {
            // The usual case: straight to the store, no local copy.
            let direct = upload_direct(
                store,
                &cluster.name,
                &header,
                path,
                body.as_deref(),
                &encoding,
            );
            let cause = match Box::pin(bounded(cluster, &name, direct)).await {
                Ok(Upload::Stored | Upload::AlreadyStored) => {
                    let ahead = spool_ahead(&spool, path, cluster, key, &encoding);
                    drain_after(&spool, store, cluster, &ahead).await?;
                    return Ok(Pushed::Stored);
                }
                Ok(Upload::Conflict { stored_sha256 }) => {
                    return Err(Error::WalConflict {
                        name: name.to_string(),
                        detail: format!(
                            "the target holds other bytes under this name (sha256 \
                             {stored_sha256}, this file {}): refusing to overwrite",
                            header.sha256
                        ),
                    });
                }
                Ok(Upload::Failed(cause)) | Err(cause) => cause,
            };
            // The spool is locked by this process; the write is blocking file work.
            tokio::task::block_in_place(|| match &body {
                Some(body) => spool.write_encoded(&header, body),
                None => spool.write(&header, path, &encoding),
            })?;
            // The store just failed: trying it again now would only hold the archiver longer.
            return spooled_or_full(&spool, &name, &cause);
        }
    }

    // Queued by an earlier call: our own file first and alone, as the queue is not worth
    // trying if the store is down.
    let draining = spool::drain_one(&spool, store, &cluster.name, &name);
    let own = match Box::pin(bounded(cluster, &name, draining)).await {
        Ok(outcome) => outcome,
        Err(cause) => Upload::Failed(cause),
    };
    match own {
        Upload::Stored | Upload::AlreadyStored => {
            let ahead = spool_ahead(&spool, path, cluster, key, &encoding);
            drain_after(&spool, store, cluster, &ahead).await?;
            Ok(Pushed::Stored)
        }
        Upload::Conflict { stored_sha256 } => Err(Error::WalConflict {
            name: name.to_string(),
            detail: format!(
                "the target holds other bytes under this name (sha256 {stored_sha256}, \
                 this file {}): refusing to overwrite",
                header.sha256
            ),
        }),
        Upload::Failed(cause) => spooled_or_full(&spool, &name, &cause),
    }
}

/// Runs one upload of `name` within the cluster's `upload_timeout`: a store that accepts
/// connections and never answers would otherwise hold PostgreSQL's archiver for the SDK's
/// read timeout (300 s). Running out of time is a failure like a refused connection, and the
/// caller spools the file the same way. A cut-off upload stores nothing: S3 makes an object
/// only when its put completes, and a folder target renames a finished temporary file.
async fn bounded(
    cluster: &Cluster,
    name: &WalName,
    upload: impl Future<Output = Result<Upload, Error>>,
) -> Result<Upload, Error> {
    match tokio::time::timeout(cluster.upload_timeout, upload).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Error::Io {
            what: format!(
                "uploading WAL file {name}: the target did not answer within {} s \
                 (upload_timeout_secs)",
                cluster.upload_timeout.as_secs()
            ),
            source: io::ErrorKind::TimedOut.into(),
        }),
    }
}

/// After a stored push: uploads the queue (and what was spooled ahead) in parallel, within
/// the upload timeout; what is left stays queued for the next push.
async fn drain_after(
    spool: &Spool,
    store: &Store,
    cluster: &Cluster,
    ahead: &[Header],
) -> Result<(), Error> {
    let draining = spool::drain(spool, store, &cluster.name, cluster.parallel, None);
    let Ok(others) = tokio::time::timeout(cluster.upload_timeout, draining).await else {
        tracing::warn!(
            timeout_secs = cluster.upload_timeout.as_secs(),
            "the spooled WAL files were not all stored in time; the next wal-push goes on"
        );
        return Ok(());
    };
    let others = others?;
    for (done, outcome) in &others {
        if matches!(outcome, Upload::Stored | Upload::AlreadyStored)
            && let Some(header) = ahead.iter().find(|h| &h.name == done)
        {
            spool.mark_done(header)?;
        }
    }
    let left = others
        .iter()
        .filter(|(_, o)| matches!(o, Upload::Failed(_)))
        .count();
    if left > 0 {
        tracing::warn!(left, "some spooled WAL files are still not stored");
    }
    Ok(())
}

/// The store failed: the file stays spooled if the spool has room, else PostgreSQL retries.
fn spooled_or_full(spool: &Spool, name: &WalName, cause: &Error) -> Result<Pushed, Error> {
    let used = spool.used()?;
    if used <= spool.max() {
        tracing::warn!(
            wal = %name,
            spool_bytes = used,
            error = %labcore::exit::chain(cause),
            "the target is unavailable: the WAL file is kept in the spool and will be \
             uploaded by the next wal-push"
        );
        Ok(Pushed::Spooled)
    } else {
        spool.remove(name)?;
        Err(Error::SpoolFull {
            name: name.to_string(),
            used,
            max: spool.max(),
            cause: labcore::exit::chain(cause),
        })
    }
}

/// The key `wal-push` signs with.
fn wal_key(config: &Config) -> Result<&SigningKey, Error> {
    config.signing.wal_key.as_ref().ok_or_else(|| {
        Error::Config(config.file.invalid(
            "signing.wal_key_file",
            "WAL is signed, and no WAL signing key is configured: make one with \
             `backupd keygen --wal -o /etc/labkit/backupd-wal.sign` (readable by the PostgreSQL \
             user only), set wal_key_file in [signing] of this config, and list its public key \
             in wal_public_keys where restores run",
        ))
    })
}

/// Spools up to `parallel - 1` segments PostgreSQL has marked ready after `path`'s (its
/// `archive_status/*.ready` beside `path`), so they go up in parallel with the queue, as
/// pgBackRest's asynchronous push does; PostgreSQL's later call for each then only checks its
/// bytes against the record left by [`Spool::mark_done`]. Anything unreadable is left to that
/// later call.
fn spool_ahead(
    spool: &Spool,
    path: &Path,
    cluster: &Cluster,
    key: &SigningKey,
    encoding: &Encoding,
) -> Vec<Header> {
    let (Some(dir), Ok(own)) = (path.parent(), WalName::of_path(path)) else {
        return Vec::new();
    };
    let own = &own;
    let n = cluster.parallel - 1;
    let mut ready: Vec<WalName> = std::fs::read_dir(dir.join("archive_status"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e
                .file_name()
                .to_str()?
                .strip_suffix(".ready")?
                .parse::<WalName>()
                .ok()?;
            (name.kind() == crate::wal::WalKind::Segment && name > *own).then_some(name)
        })
        .collect();
    ready.sort();
    ready.truncate(n);
    let mut spooled = Vec::new();
    for name in ready {
        let file = dir.join(name.as_str());
        let Ok((size, sha256)) = wal::hash_file(&file) else {
            continue;
        };
        let header = Header::signed(
            key,
            &cluster.name,
            name,
            size,
            sha256,
            !encoding.recipients.is_empty(),
        );
        if spool.header(&header.name).is_none()
            && tokio::task::block_in_place(|| spool.write(&header, &file, encoding)).is_err()
        {
            continue;
        }
        spooled.push(header);
    }
    spooled
}

/// Stores the file, after checking the name is free: its `body` encoded by [`wal::read_once`],
/// or, without one, the file encoded on the way.
async fn upload_direct(
    store: &Store,
    cluster: &str,
    header: &Header,
    path: &Path,
    body: Option<&[u8]>,
    encoding: &Encoding,
) -> Result<Upload, Error> {
    let key = wal::object_key(cluster, &header.name);
    if let Some(stored) = spool::stored_header(store, &key).await? {
        // `None`: the same bytes without this signature, stored again below, signed.
        if let Some(done) = spool::compare(header, &stored, &store.location(&key)) {
            return Ok(done);
        }
    }
    if let Some(body) = body {
        let head = header.to_bytes();
        return match store.put_stream(&key, head.as_slice().chain(body)).await {
            Ok(_) => Ok(Upload::Stored),
            Err(err) => Ok(Upload::Failed(err.into())),
        };
    }
    let (writer, reader) = pipeline::channel();
    let (source, header, encoding) = (path.to_owned(), header.clone(), encoding.clone());
    let pump = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let input = std::fs::File::open(&source)?;
        wal::encode(&header, input, writer, &encoding)?.close()
    });
    let stored = store.put_stream(&key, reader).await;
    let pumped = pump
        .await
        .map_err(|e| Error::Internal(format!("encoding task: {e}")))?;
    match (pumped, stored) {
        (Ok(()), Ok(_)) => Ok(Upload::Stored),
        (Err(err), _) => Err(Error::pipeline(err)),
        (_, Err(err)) => Ok(Upload::Failed(err.into())),
    }
}

/// `wal-push --drain`: uploads whatever the spool holds. Returns (stored, still queued).
pub(crate) async fn drain(cluster: &Cluster, store: &Store) -> Result<(usize, usize), Error> {
    let spool = Spool::open(&cluster.spool_dir, cluster.spool_max)?;
    let results = spool::drain(&spool, store, &cluster.name, cluster.parallel, None).await?;
    let stored = results
        .iter()
        .filter(|(_, o)| matches!(o, Upload::Stored | Upload::AlreadyStored))
        .count();
    let queued = spool.entries()?.len();
    if let Some(first) = spool.rejected().first() {
        return Err(Error::WalConflict {
            name: first.clone(),
            detail: "set aside: the target holds other bytes under its name".into(),
        });
    }
    Ok((stored, queued))
}

/// `wal-fetch NAME PATH`: `trust` decides which signatures are accepted.
pub(crate) async fn fetch(
    config: &Config,
    cluster: &Cluster,
    store: &Store,
    trust: &Trust,
    name: &WalName,
    dest: &Path,
) -> Result<(), Error> {
    let key = wal::object_key(&cluster.name, name);
    let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match store.get_stream(&key).await {
        Ok(reader) => reader,
        Err(StoreError::NotFound(location)) => {
            // On the database host, a file the store has not received yet is in the spool.
            let queued = cluster.spool_dir.join(name.as_str());
            match tokio::fs::File::open(&queued).await {
                Ok(file) => {
                    tracing::info!(wal = %name, "taking the WAL file from the local spool");
                    Box::new(file)
                }
                Err(_) => {
                    return Err(Error::NotFound {
                        id: format!("WAL file {name}"),
                        target: location,
                    });
                }
            }
        }
        Err(err) => return Err(err.into()),
    };
    let identity = config.encryption.as_ref().and_then(|e| e.identity.clone());
    let name = name.clone();
    let dest = dest.to_owned();
    let location = store.location(&key);
    let (trust, cluster_name) = (trust.clone(), cluster.name.clone());
    tokio::task::spawn_blocking(move || {
        let mut input = SyncIoBridge::new(reader);
        let header = Header::read_from(&mut input).map_err(|source| Error::Io {
            what: format!("reading the header of {location}"),
            source,
        })?;
        if header.name != name {
            return Err(Error::WalConflict {
                name: name.to_string(),
                detail: format!("the object {location} holds {}", header.name),
            });
        }
        // Before a byte is decoded: nothing unsigned or forged reaches pg_wal.
        header.check(&trust, &location, &cluster_name)?;
        let identities = match &identity {
            Some(text) => Some(pipeline::identities(text.expose())?),
            None => None,
        };
        let plain = pipeline::decoder(input, header.encrypted, identities.as_deref())?;
        write_checked(plain, &header, &dest)
    })
    .await
    .map_err(|e| Error::Internal(format!("fetch task: {e}")))?
}

/// Writes `plain` beside `dest`, checks it against `header`, then renames it to `dest`.
fn write_checked(plain: impl io::Read, header: &Header, dest: &Path) -> Result<(), Error> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".backupd-wal-")
        .tempfile_in(&dir)
        .map_err(|source| Error::Io {
            what: format!("creating a temporary file in {}", dir.display()),
            source,
        })?;
    let mut hashing = Hashing::new(plain);
    io::copy(&mut hashing, temp.as_file_mut()).map_err(|source| Error::Io {
        what: format!("decoding WAL file {}", header.name),
        source,
    })?;
    let (size, sha256) = hashing.finish();
    if size != header.size || sha256 != header.sha256 {
        return Err(Error::WalConflict {
            name: header.name.to_string(),
            detail: format!(
                "the decoded file does not match its header ({size} bytes, sha256 {sha256}; \
                 expected {} bytes, sha256 {})",
                header.size, header.sha256
            ),
        });
    }
    temp.as_file_mut()
        .flush()
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|source| Error::Io {
            what: format!("syncing WAL file {}", header.name),
            source,
        })?;
    temp.persist(dest).map_err(|e| Error::Io {
        what: format!("renaming WAL file {} to {}", header.name, dest.display()),
        source: e.error,
    })?;
    Ok(())
}
