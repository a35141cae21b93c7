//! Spawning children that die with the test process, even after `kill -9`.
//!
//! Each child asks the kernel for a parent-death signal (`PR_SET_PDEATHSIG`). That signal
//! fires when the *thread* that forked the child ends, not the process, and test harnesses run
//! each test on its own short-lived thread. So every child is forked from one spawner thread
//! that lives as long as the process: a server shared between tests survives the test that
//! started it, and nothing survives the process.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

type Request = (Command, mpsc::Sender<io::Result<Child>>);

static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

/// Spawns `command` so that it receives `death_signal` when this process dies, optionally
/// inside the network namespace `netns` (an open `/run/netns/NAME`).
pub fn spawn(
    mut command: Command,
    death_signal: Signal,
    netns: Option<OwnedFd>,
) -> io::Result<Child> {
    let parent = std::process::id();
    let netns_fd = netns.as_ref().map(|fd| fd.as_raw_fd());
    // SAFETY: the hook runs between fork and exec and only makes async-signal-safe system
    // calls (prctl, getppid, setns, kill); it allocates nothing and takes no locks.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(death_signal)?;
            if nix::unistd::getppid().as_raw() as u32 != parent {
                // The parent died before the death signal was armed.
                nix::sys::signal::raise(death_signal)?;
            }
            if let Some(fd) = netns_fd {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                nix::sched::setns(fd, CloneFlags::CLONE_NEWNET)?;
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the testkit spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| io::Error::other("testkit spawner lock poisoned"))?
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("testkit spawner thread is gone"))?;
    let child = reply_rx
        .recv()
        .map_err(|_| io::Error::other("testkit spawner thread is gone"))?;
    drop(netns);
    child
}
