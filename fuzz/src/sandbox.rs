//! The empty root every target runs in: a private mount namespace with a fresh tmpfs as `/`.
//!
//! Targets extract archives and resolve configs that name files, and the archive target runs
//! as root: in the real root a bad input could chmod `/etc` or read `/dev/zero` forever. Here
//! only the tmpfs exists, so nothing an input names can reach the machine's files, and the
//! archive target's check sees every write outside its folder. As root the process unshares
//! the mount namespace alone; otherwise it first becomes root of a new user namespace, which
//! must happen while the process has one thread (call [`enter`] first thing in `main`).
//! Inputs are read before entering: afterwards the host's files are out of reach.

use std::fs;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, chdir, chroot};

/// Where the new root is mounted before `chroot`; /tmp exists everywhere, and the mount is
/// seen only inside the new namespace.
const MOUNT_POINT: &str = "/tmp";

/// Moves the process into its own empty root; the error says which step failed.
pub fn enter() -> Result<(), String> {
    let step = |what: &'static str| move |e: nix::Error| format!("{what}: {e}");
    if Uid::effective().is_root() {
        unshare(CloneFlags::CLONE_NEWNS).map_err(step("unsharing the mount namespace"))?;
    } else {
        let (uid, gid) = (Uid::current(), Gid::current());
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
            .map_err(step("unsharing the user and mount namespaces"))?;
        let write = |path: &str, text: String| {
            fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
        };
        write("/proc/self/setgroups", "deny".into())?;
        write("/proc/self/uid_map", format!("0 {uid} 1"))?;
        write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    }
    // Private, so the tmpfs below never shows in the machine's own mount table.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("making mounts private"))?;
    mount(
        Some("tmpfs"),
        MOUNT_POINT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=64m,mode=0755"),
    )
    .map_err(step("mounting a tmpfs"))?;
    chroot(MOUNT_POINT).map_err(step("changing root"))?;
    chdir("/").map_err(step("entering the new root"))?;
    Ok(())
}
