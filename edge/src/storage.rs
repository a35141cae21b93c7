//! The storage: where the internal CA, certificates and (with ACME) account keys live, in a
//! folder or in an S3 bucket several edges share (the `s3_storage` module).
//!
//! Invariants: folders are created 0700 and key files 0600; every file is written to a
//! temporary name in the same folder, synced, then renamed into place, so a reader (or a
//! crash) never sees half a file; [`Storage::lock`] takes an exclusive `flock` on a lock file
//! (or a lease on a lock object in the bucket) so two edges sharing the storage never create
//! or issue the same thing at once.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::s3_storage::{Lease, S3StorageConfig, S3Store};

/// File mode for private keys.
pub(crate) const KEY_MODE: u32 = 0o600;
/// File mode for certificates (public).
pub(crate) const CERT_MODE: u32 = 0o644;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A storage folder or bucket.
#[derive(Clone, Debug)]
pub(crate) struct Storage {
    root: PathBuf,
    /// The bucket, when the storage is one; `root` is then its `s3://` URL, for messages.
    s3: Option<Arc<S3Store>>,
}

/// An exclusive lock on a name in the storage; released on drop.
#[derive(Debug)]
pub(crate) struct StorageLock {
    /// A `flock` on a file in the folder.
    _file: Option<Flock<File>>,
    /// A lease on an object in the bucket.
    lease: Option<Lease>,
}

impl Storage {
    /// Opens (creating, 0700) the storage folder.
    pub(crate) fn open(root: &Path) -> io::Result<Storage> {
        make_dirs(root)?;
        let mode = fs::metadata(root)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %root.display(),
                mode = format_args!("{:04o}", mode & 0o7777),
                "storage folder is open to group or others; chmod 700 it"
            );
        }
        Ok(Storage {
            root: root.to_owned(),
            s3: None,
        })
    }

    /// Opens the storage in a bucket, probing it once (see the `s3_storage` module).
    pub(crate) fn open_s3(config: &S3StorageConfig) -> io::Result<Storage> {
        Ok(Storage {
            root: PathBuf::from(config.url()),
            s3: Some(S3Store::open(config)?),
        })
    }

    /// How often to look for certificates another edge stored: only a shared bucket has any.
    pub(crate) fn poll_interval(&self) -> Option<Duration> {
        self.s3.as_ref().map(|s3| s3.poll_interval())
    }

    /// Whether `rel` exists.
    pub(crate) fn exists(&self, rel: &str) -> bool {
        match &self.s3 {
            Some(s3) => !matches!(s3.read(rel), Ok(None)),
            None => self.path(rel).exists(),
        }
    }

    /// Removes `rel`; absent is fine.
    pub(crate) fn remove(&self, rel: &str) -> io::Result<()> {
        if let Some(s3) = &self.s3 {
            return s3.remove(rel);
        }
        match fs::remove_file(self.path(rel)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The storage folder.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `rel` inside the storage (its `s3://` URL in a bucket).
    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        match &self.s3 {
            Some(s3) => PathBuf::from(s3.describe(rel)),
            None => self.root.join(rel),
        }
    }

    /// Reads `rel`, or `None` when it does not exist.
    pub(crate) fn read(&self, rel: &str) -> io::Result<Option<Vec<u8>>> {
        if let Some(s3) = &self.s3 {
            return s3.read(rel);
        }
        match fs::read(self.path(rel)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `rel` atomically with `mode`: temporary file, fsync, rename, fsync the folder.
    /// In a bucket, every object is sealed whatever its mode.
    pub(crate) fn write(&self, rel: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        if let Some(s3) = &self.s3 {
            return s3.write(rel, bytes);
        }
        let path = self.path(rel);
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        make_dirs(&dir)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Takes the exclusive lock named `name`, waiting for another holder to let go.
    pub(crate) fn lock(&self, name: &str) -> io::Result<StorageLock> {
        if let Some(s3) = &self.s3 {
            return s3.lock(name).map(|lease| StorageLock {
                _file: None,
                lease: Some(lease),
            });
        }
        let dir = self.path("locks");
        make_dirs(&dir)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(KEY_MODE)
            .open(dir.join(format!("{name}.lock")))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
        Ok(StorageLock {
            _file: Some(lock),
            lease: None,
        })
    }
}

impl StorageLock {
    /// Whether the lock is still ours: a `flock` always is; a bucket's lease is not once
    /// another edge took it over (this edge's refreshes failed for a whole lease).
    pub(crate) fn held(&self) -> bool {
        self.lease.as_ref().is_none_or(Lease::held)
    }
}

/// Creates `dir` and its missing parents with mode 0700.
fn make_dirs(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_whole_with_their_modes_in_private_folders() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&dir.path().join("edge")).unwrap();
        storage
            .write("pki/a/root.key", b"secret", KEY_MODE)
            .unwrap();
        storage
            .write("pki/a/root.key", b"secret2", KEY_MODE)
            .unwrap();
        assert_eq!(storage.read("pki/a/root.key").unwrap().unwrap(), b"secret2");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&storage.path("pki/a/root.key")), 0o600);
        assert_eq!(mode(&storage.path("pki/a")), 0o700);
        assert_eq!(mode(storage.root()), 0o700);
        let leftovers: Vec<_> = fs::read_dir(storage.path("pki/a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        assert!(storage.read("absent").unwrap().is_none());
    }

    #[test]
    fn a_lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let held = storage.lock("ca").unwrap();
        let file = File::open(storage.path("locks/ca.lock")).unwrap();
        let second = Flock::lock(file, FlockArg::LockExclusiveNonblock);
        assert!(second.is_err());
        drop(held);
        let file = File::open(storage.path("locks/ca.lock")).unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok());
    }
}
