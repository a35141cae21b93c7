//! The WAL spool: a bounded folder on the database host of encoded WAL files not yet stored,
//! and draining it to the target with parallel uploads.
//!
//! Why a spool, and when `wal-push` may return 0. PostgreSQL recycles a WAL file only after
//! `archive_command` returns 0, so success must mean "this file survives without pg_wal". We
//! report it in two cases only:
//! - the object is on the target (the upload finished and the store reported its size), or
//! - the store is unreachable and the encoded file is in the spool: written to a temporary
//!   name, fsync'd, renamed, the folder fsync'd. From then on the spool is the only copy, like
//!   the segment was in pg_wal: on the same host, so the guarantee is the one PostgreSQL had
//!   before archiving, not the off-host one. It holds while the spool stays under its bound.
//!
//! Once the spool is full, `wal-push` stores nothing new locally and fails, so PostgreSQL keeps
//! the file in pg_wal and retries: WAL is never dropped (pgBackRest's `archive-push-queue-max`
//! drops it to save the disk; we prefer a full disk that is noticed to a hole in the chain that
//! is not). pgBackRest's asynchronous push returns 0 only once its background process has the
//! segment in the repository and uses the spool for status files; ours returns 0 after the
//! durable local write, so a store outage of minutes costs PostgreSQL nothing (no failed
//! attempts in `pg_stat_archiver`, no growth of pg_wal), at the price above.
//!
//! Draining: `wal-push` encodes its file straight into the store (a segment read once into
//! memory, see `wal::read_once`) and writes the spool only when that fails (measured: the
//! spool copy's second write and fsyncs cut the push rate from 8.6 to 4.2 segments/s,
//! `scripts/bench/backupd --pitr`). Once its own file is stored, it
//! uploads every queued file and up to `parallel - 1` segments PostgreSQL already marked ready,
//! `parallel` at once; `wal-push --drain` (a timer) uploads the queue without a new file.
//! Whatever depends on the archive drains first: `basebackup` waits until the WAL its backup
//! needs is stored, and `wal-fetch` on this host falls back to the spool for a file the
//! target lacks. A queued file whose name is already taken on the target by different bytes
//! is moved to `rejected/` and every later push fails, loudly, until someone looks.
//!
//! One process works on a spool at a time (an exclusive `flock` on `.lock`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Error;
use crate::pipeline::Encoding;
use crate::store::{Store, StoreError};
use crate::wal::{self, Header, WalName};

/// A locked spool folder.
pub(crate) struct Spool {
    dir: PathBuf,
    max: u64,
    _lock: Flock<File>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!(
            "syncing the spool folder {}",
            dir.display()
        )))
}

impl Spool {
    /// Opens (creating, mode 0700) and locks the spool at `dir`; waits for another holder.
    pub(crate) fn open(dir: &Path, max: u64) -> Result<Spool, Error> {
        for folder in [dir.join("rejected"), dir.join("done")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&folder)
                .map_err(io_err(format!("creating {}", folder.display())))?;
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(".lock"))
            .map_err(io_err(format!(
                "opening the spool lock in {}",
                dir.display()
            )))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| Error::Io {
            what: format!("locking the spool {}", dir.display()),
            source: e.into(),
        })?;
        Ok(Spool {
            dir: dir.to_owned(),
            max,
            _lock: lock,
        })
    }

    /// Where a queued file lives.
    pub(crate) fn path(&self, name: &WalName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    /// Queued files, oldest name first, with their sizes. Anything else in the folder (a
    /// temporary file of a push that died) is ignored.
    pub(crate) fn entries(&self) -> Result<Vec<(WalName, u64)>, Error> {
        let mut entries = Vec::new();
        let listing = fs::read_dir(&self.dir)
            .map_err(io_err(format!("listing the spool {}", self.dir.display())))?;
        for entry in listing.flatten() {
            let Some(name) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Ok(meta) = entry.metadata()
                && meta.is_file()
            {
                entries.push((name, meta.len()));
            }
        }
        entries.sort();
        Ok(entries)
    }

    /// Files set aside because the target holds other bytes under their names.
    pub(crate) fn rejected(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir.join("rejected"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    }

    /// The header of a queued file, if there is one.
    pub(crate) fn header(&self, name: &WalName) -> Option<Header> {
        let mut file = File::open(self.path(name)).ok()?;
        Header::read_from(&mut file).ok()
    }

    /// Encodes the WAL file at `source` into the spool, durably: on return it survives a crash.
    pub(crate) fn write(
        &self,
        header: &Header,
        source: &Path,
        encoding: &Encoding,
    ) -> Result<u64, Error> {
        let input = File::open(source)
            .map_err(io_err(format!("opening the WAL file {}", source.display())))?;
        self.write_with(header, |out| {
            wal::encode(header, input, out, encoding).map(|_| ())
        })
    }

    /// Spools `header` and a `body` encoded already ([`wal::read_once`]), durably.
    pub(crate) fn write_encoded(&self, header: &Header, body: &[u8]) -> Result<u64, Error> {
        self.write_with(header, |out| {
            out.write_all(&header.to_bytes())?;
            out.write_all(body)
        })
    }

    /// Writes a spooled file with `fill` under a temporary name, syncs it, and renames it into
    /// place (syncing the folder): a crash leaves the old state or the whole file.
    fn write_with(
        &self,
        header: &Header,
        fill: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
    ) -> Result<u64, Error> {
        let temp = self.dir.join(format!(
            ".{}.tmp-{:08x}",
            header.name,
            rand::random::<u32>()
        ));
        let written = (|| -> Result<u64, Error> {
            let out = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
                .map_err(io_err(format!("creating {}", temp.display())))?;
            let mut out = io::BufWriter::new(out);
            fill(&mut out).map_err(io_err(format!("spooling {}", header.name)))?;
            out.flush()
                .map_err(io_err(format!("writing {}", temp.display())))?;
            let file = out
                .into_inner()
                .map_err(|e| io_err(format!("writing {}", temp.display()))(e.into_error()))?;
            file.sync_all()
                .map_err(io_err(format!("syncing {}", temp.display())))?;
            let size = file
                .metadata()
                .map_err(io_err(format!("inspecting {}", temp.display())))?
                .len();
            fs::rename(&temp, self.path(&header.name))
                .map_err(io_err(format!("renaming {} into place", temp.display())))?;
            sync_dir(&self.dir)?;
            Ok(size)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }

    /// Removes a queued file once it is stored.
    pub(crate) fn remove(&self, name: &WalName) -> Result<(), Error> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("removing {} from the spool", name))(e)),
        }
    }

    /// Sets a queued file aside: its name is taken on the target by other bytes.
    fn reject(&self, name: &WalName) -> Result<(), Error> {
        fs::rename(
            self.path(name),
            self.dir.join("rejected").join(name.as_str()),
        )
        .map_err(io_err(format!(
            "moving {name} to {}/rejected",
            self.dir.display()
        )))?;
        sync_dir(&self.dir)
    }

    /// Records that `header`'s file, pushed ahead of PostgreSQL's call for it, is stored.
    pub(crate) fn mark_done(&self, header: &Header) -> Result<(), Error> {
        let path = self.dir.join("done").join(header.name.as_str());
        fs::write(&path, format!("{} {}\n", header.size, header.sha256))
            .map_err(io_err(format!("writing {}", path.display())))
    }

    /// Takes the record of a file pushed ahead: its size and SHA-256, if there is one. Records
    /// of files older than `name` are dropped too: PostgreSQL archives in order, so nobody
    /// will ask for them.
    pub(crate) fn take_done(&self, name: &WalName) -> Option<(u64, String)> {
        let done = self.dir.join("done");
        for entry in fs::read_dir(&done).into_iter().flatten().flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n < name.as_str())
            {
                let _ = fs::remove_file(entry.path());
            }
        }
        let path = done.join(name.as_str());
        let text = fs::read_to_string(&path).ok()?;
        let _ = fs::remove_file(&path);
        let (size, sha256) = text.trim().split_once(' ')?;
        Some((size.parse().ok()?, sha256.to_owned()))
    }

    /// Bytes queued.
    pub(crate) fn used(&self) -> Result<u64, Error> {
        Ok(self.entries()?.iter().map(|(_, size)| size).sum())
    }

    /// The bound.
    pub(crate) fn max(&self) -> u64 {
        self.max
    }
}

/// What became of one queued file.
#[derive(Debug)]
pub(crate) enum Upload {
    /// Stored now.
    Stored,
    /// The target already had the same bytes.
    AlreadyStored,
    /// The target has other bytes under this name; the file was set aside.
    Conflict {
        /// The stored object's SHA-256 of its plain bytes.
        stored_sha256: String,
    },
    /// The target could not be reached or refused; the file stays queued.
    Failed(Error),
}

/// Reads the header of the object at `key`, or `None` if there is none.
pub(crate) async fn stored_header(store: &Store, key: &str) -> Result<Option<Header>, Error> {
    let mut stream = match store.get_stream(key).await {
        Ok(stream) => stream,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(2).any(|w| w == b"\n\n") && buf.len() < 512 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(io_err(format!("reading {}", store.location(key))))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Header::read_from(&mut &buf[..])
        .map(Some)
        .map_err(io_err(format!(
            "reading the header of {}",
            store.location(key)
        )))
}

/// What to do about `header`'s file when the target already holds `stored` under its name:
/// nothing (the same bytes, signed the same), refuse (other bytes), or `None`: store it again,
/// since the target has the same plain bytes unsigned or signed by another key, and this copy
/// carries the signature a restore trusts. Nothing is lost by that overwrite.
pub(crate) fn compare(header: &Header, stored: &Header, location: &str) -> Option<Upload> {
    if header.same_signed(stored) {
        Some(Upload::AlreadyStored)
    } else if header.same_bytes(stored) {
        tracing::info!(
            object = location,
            "the target holds these bytes without this key's signature: storing them again, signed"
        );
        None
    } else {
        Some(Upload::Conflict {
            stored_sha256: stored.sha256.clone(),
        })
    }
}

async fn upload_one(store: &Store, cluster: &str, path: PathBuf, header: Header) -> Upload {
    let key = wal::object_key(cluster, &header.name);
    let result = async {
        if let Some(stored) = stored_header(store, &key).await?
            && let Some(done) = compare(&header, &stored, &store.location(&key))
        {
            return Ok(done);
        }
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(io_err(format!("opening {}", path.display())))?;
        let expected = file
            .metadata()
            .await
            .map_err(io_err(format!("inspecting {}", path.display())))?
            .len();
        let stored = store.put_stream(&key, file).await?;
        if stored.size != expected {
            return Err(Error::Io {
                what: format!("storing {}", store.location(&key)),
                source: io::Error::other(format!("stored {} bytes of {expected}", stored.size)),
            });
        }
        Ok::<_, Error>(Upload::Stored)
    }
    .await;
    result.unwrap_or_else(Upload::Failed)
}

/// Uploads queued files, `first` (if queued) before the rest, up to `parallel` at once; removes
/// each stored one and sets conflicting ones aside. Returns what became of each.
pub(crate) async fn drain(
    spool: &Spool,
    store: &Store,
    cluster: &str,
    parallel: usize,
    first: Option<&WalName>,
) -> Result<Vec<(WalName, Upload)>, Error> {
    let mut queue: Vec<WalName> = spool.entries()?.into_iter().map(|(n, _)| n).collect();
    if let Some(first) = first
        && let Some(i) = queue.iter().position(|n| n == first)
    {
        let name = queue.remove(i);
        queue.insert(0, name);
    }
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = JoinSet::new();
    let mut results = Vec::new();
    for name in queue {
        let Some(header) = spool.header(&name) else {
            tracing::warn!(wal = %name, "a spooled file has no readable header; leaving it");
            continue;
        };
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("the upload semaphore closed".into()))?;
        let store = store.clone();
        let cluster = cluster.to_owned();
        let path = spool.path(&name);
        tasks.spawn(async move {
            let outcome = upload_one(&store, &cluster, path, header).await;
            drop(permit);
            (name, outcome)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (name, outcome) =
            joined.map_err(|e| Error::Internal(format!("an upload task failed: {e}")))?;
        settle(spool, &name, &outcome)?;
        results.push((name, outcome));
    }
    Ok(results)
}

/// Uploads one queued file now.
pub(crate) async fn drain_one(
    spool: &Spool,
    store: &Store,
    cluster: &str,
    name: &WalName,
) -> Result<Upload, Error> {
    let header = spool
        .header(name)
        .ok_or_else(|| Error::Internal(format!("{name} vanished from the spool")))?;
    let outcome = upload_one(store, cluster, spool.path(name), header).await;
    settle(spool, name, &outcome)?;
    Ok(outcome)
}

/// Removes a stored file from the spool, sets a conflicting one aside, logs a failure.
fn settle(spool: &Spool, name: &WalName, outcome: &Upload) -> Result<(), Error> {
    match outcome {
        Upload::Stored | Upload::AlreadyStored => spool.remove(name),
        Upload::Conflict { stored_sha256 } => {
            tracing::error!(
                wal = %name,
                stored_sha256,
                "the target holds different bytes under this WAL name: refusing to \
                 overwrite; the spooled file is set aside in rejected/"
            );
            spool.reject(name)
        }
        Upload::Failed(err) => {
            tracing::debug!(wal = %name, error = %labcore::exit::chain(err), "upload failed; the file stays in the spool");
            Ok(())
        }
    }
}
