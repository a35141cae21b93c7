//! Scratch folders for test parts, removed on drop and swept after a killed test process.
//!
//! Every folder lives under `$TMPDIR/labkit-testkit/` and is named `PID-N-what`. A test
//! process killed with `kill -9` cannot clean up; the next testkit user removes folders whose
//! PID is no longer running. Two test runs in parallel never share a folder.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

/// The folder all testkit scratch folders live in.
pub fn root() -> PathBuf {
    std::env::temp_dir().join("labkit-testkit")
}

/// A folder that is removed with everything in it when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Makes a fresh folder whose name ends in `what`.
    pub fn new(what: &str) -> io::Result<Scratch> {
        let root = root();
        fs::create_dir_all(&root)?;
        SWEEP.call_once(|| sweep(&root));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{}-{n}-{what}", std::process::id()));
        fs::create_dir(&path)?;
        Ok(Scratch { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the folder.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Whether a process with this PID exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes folders left by test processes that no longer run.
fn sweep(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
