//! php-fpm (Debian's php8.2-fpm) as a FastCGI peer: one pool on a TCP port and one on a unix
//! socket, run in the foreground as a child of the test, for edge's `php_fastcgi` tests.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::proc::{Proc, ProcBuilder};
use crate::scratch::Scratch;
use crate::{Error, ports};

/// Where Debian installs php-fpm.
pub const PHP_FPM: &str = "/usr/sbin/php-fpm8.2";

/// A running php-fpm; stopped on drop, its workers with it.
pub struct PhpFpm {
    proc: Proc,
    /// The TCP pool's port on 127.0.0.1.
    pub port: u16,
    /// The unix-socket pool's path (`DIR/php.sock`).
    pub socket: PathBuf,
}

impl PhpFpm {
    /// Starts php-fpm with its config, socket and logs in `dir`; the TCP pool has 4 workers
    /// (stderr of scripts captured), the unix one `unix_workers`.
    pub fn start(dir: &Scratch, unix_workers: u32) -> Result<PhpFpm, Error> {
        let socket = dir.join("php.sock");
        ports::retry_on_port_clash(|_| {
            let port = ports::free_port().map_err(Error::Io)?;
            let conf = format!(
                "[global]\nerror_log = /proc/self/fd/2\ndaemonize = no\n\
                 [tcp]\nuser = root\nlisten = 127.0.0.1:{port}\npm = static\npm.max_children = 4\n\
                 catch_workers_output = yes\n\
                 [unix]\nuser = root\nlisten = {}\npm = static\npm.max_children = {unix_workers}\n",
                socket.display()
            );
            let path = dir.join("php-fpm.conf");
            std::fs::write(&path, conf).map_err(Error::Io)?;
            // SIGTERM, not SIGKILL, if the test dies: a killed master leaves its workers
            // running, orphaned, for good.
            let fpm = ProcBuilder::new(PHP_FPM)
                .death_signal(Signal::SIGTERM)
                .args(["-F", "-R", "-n", "-y"])
                .arg(&path)
                .arg("-p")
                .arg(dir.path())
                .spawn()?;
            fpm.wait_stderr("ready to handle connections", Duration::from_secs(20))?;
            Ok(PhpFpm {
                proc: fpm,
                port,
                socket: socket.clone(),
            })
        })
    }
}

impl Drop for PhpFpm {
    fn drop(&mut self) {
        // The master ends its workers on SIGTERM (Proc's own drop would SIGKILL it alone).
        let _ = self.proc.signal(Signal::SIGTERM);
        let _ = self.proc.wait_exit(Duration::from_secs(10));
    }
}
