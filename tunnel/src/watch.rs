//! Watching the config file for changes with inotify.
//!
//! The watch is on the file's folder, not the file, so both ways of saving are seen: writing
//! in place (one `IN_CLOSE_WRITE` once the writer is done, never a half-written file) and
//! writing a new file and renaming it over the old one (`IN_MOVED_TO`), which replaces the
//! inode a watch on the file would hold.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// An inotify instance, as a file descriptor tokio can wait on.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Tells when a file was saved.
pub(crate) struct Watcher {
    inotify: AsyncFd<InotifyFd>,
    name: OsString,
}

impl Watcher {
    /// Watches `path`'s folder for saves of `path`.
    pub(crate) fn new(path: &Path) -> io::Result<Watcher> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::other("the config path names no file"))?
            .to_owned();
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
        )?;
        // SAFETY: the Inotify owns its file descriptor and moves into the AsyncFd, which
        // owns it from here on; nothing else closes or replaces the descriptor while it is
        // registered, which is all `register` asks. (tokio offers no safe way to wait on an
        // inotify descriptor; the workspace otherwise denies unsafe code.)
        #[allow(unsafe_code)]
        let inotify = unsafe { AsyncFd::register(InotifyFd(inotify))? };
        Ok(Watcher { inotify, name })
    }

    /// Resolves at the next save of the file.
    pub(crate) async fn changed(&self) -> io::Result<()> {
        loop {
            let mut ready = self.inotify.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) => {
                    if events.iter().any(|e| e.name.as_ref() == Some(&self.name)) {
                        return Ok(());
                    }
                }
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_in_place_and_by_rename_are_seen_and_other_files_are_not() {
        let dir = testkit::Scratch::new("watch").unwrap();
        let path = dir.join("server.toml");
        std::fs::write(&path, "a").unwrap();
        let watcher = Watcher::new(&path).unwrap();
        std::fs::write(dir.join("other.toml"), "x").unwrap();
        std::fs::write(&path, "b").unwrap();
        watcher.changed().await.unwrap();
        let tmp = dir.join(".server.toml.tmp");
        std::fs::write(&tmp, "c").unwrap();
        // The temporary file's own close is for another name; only the rename counts.
        std::fs::rename(&tmp, &path).unwrap();
        watcher.changed().await.unwrap();
    }
}
