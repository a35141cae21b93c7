//! One run at a time per config: an exclusive `flock` on a lock file that also says who holds
//! it, so a second run can exit 75 naming the holder. The kernel drops the lock when the
//! holder dies, so a crashed run never blocks the next.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::Error;

/// A held lock; released on drop.
#[derive(Debug)]
pub struct RunLock {
    _lock: Flock<File>,
}

impl RunLock {
    /// Takes the lock at `path` or fails with [`Error::Locked`] at once.
    pub fn acquire(path: &Path) -> Result<RunLock, Error> {
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| Error::Io { what, source }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io("creating the folder of the lock file"))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("opening the lock file"))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::Locked {
                    path: path.display().to_string(),
                    holder: if holder.is_empty() {
                        "holder unknown".into()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err((_, errno)) => return Err(io("locking")(std::io::Error::from(errno))),
        };
        let note = format!(
            "pid {} since {}\n",
            std::process::id(),
            jiff::Timestamp::now()
        );
        lock.set_len(0).map_err(io("writing the lock file"))?;
        lock.write_all(note.as_bytes())
            .map_err(io("writing the lock file"))?;
        Ok(RunLock { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/backupd.lock");
        let first = RunLock::acquire(&path).unwrap();
        let err = RunLock::acquire(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::TempFail);
        drop(first);
        RunLock::acquire(&path).unwrap();
    }
}
