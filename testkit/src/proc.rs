//! Child processes under test: explicit environment, captured output, readiness through an
//! sd_notify socket, signals, and exit-status checks with deadlines.
//!
//! A [`Proc`] starts with only the variables the test gives it (plus `PATH`), so nothing
//! ambient (`AWS_*`, `PG*`, proxies) leaks in. Its stdout and stderr are captured in memory by
//! reader threads; its `NOTIFY_SOCKET` messages likewise. Every wait is on an event (a line
//! appears, a notification arrives, the process exits) with a deadline, never a sleep.
//!
//! A program built in the checkout runs as another user only through
//! [`ProcBuilder::as_nobody`], which starts it from a copy outside the checkout: the checkout may
//! sit in a folder only its owner can enter (a clone under `mktemp -d`, or in `/root`).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{Gid, Pid, Uid, User};

use crate::scratch::Scratch;
use crate::{Error, child};

/// What a process has said so far.
#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    notes: Vec<String>,
    notes_seen: usize,
    stdout_closed: bool,
    stderr_closed: bool,
    status: Option<ExitStatus>,
}

struct Shared {
    captured: Mutex<Captured>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A reader thread that panicked leaves valid data behind.
        self.captured.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Captured)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Waits until `done` returns `Some`, or the deadline passes.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&mut Captured) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut captured = self.lock();
        loop {
            if let Some(found) = done(&mut captured) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            captured = self
                .changed
                .wait_timeout(captured, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How to start a process.
pub struct ProcBuilder {
    name: String,
    command: Command,
    notify: bool,
    death_signal: Signal,
    netns: Option<OwnedFd>,
    stdin: Option<Vec<u8>>,
    /// The folder holding the copy of the program [`ProcBuilder::as_nobody`] runs.
    program_copy: Option<Scratch>,
}

impl ProcBuilder {
    /// A process running `program` with an environment of only `PATH`.
    pub fn new(program: impl AsRef<OsStr>) -> ProcBuilder {
        let program = program.as_ref();
        let name = Path::new(program)
            .file_name()
            .map_or_else(|| program.to_string_lossy(), |n| n.to_string_lossy())
            .into_owned();
        let mut command = Command::new(program);
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        ProcBuilder {
            name,
            command,
            notify: false,
            death_signal: Signal::SIGKILL,
            netns: None,
            stdin: None,
            program_copy: None,
        }
    }

    /// A process running `program` (typically a binary built in the checkout) as the
    /// unprivileged user `nobody`, for tests of what a tool does without root's rights.
    ///
    /// `nobody` may not be able to reach the checkout at all (a clone under a 0700 folder), so
    /// the program is linked, or copied when it is not executable by others or lives on another
    /// file system, into a scratch folder open to every user; the process runs there, and the
    /// folder lives as long as the process.
    pub fn as_nobody(program: impl AsRef<Path>) -> Result<ProcBuilder, Error> {
        let (uid, gid) = nobody()?;
        let program = program.as_ref();
        let name = program
            .file_name()
            .ok_or_else(|| Error::Setup(format!("{} names no file", program.display())))?;
        let folder = Scratch::new(&format!("bin-{}", sanitize(&name.to_string_lossy())))?;
        fs::set_permissions(folder.path(), fs::Permissions::from_mode(0o755))?;
        if let Some(closed) = folder
            .path()
            .ancestors()
            .find(|dir| fs::metadata(dir).is_ok_and(|meta| meta.permissions().mode() & 0o001 == 0))
        {
            return Err(Error::Setup(format!(
                "{} is closed to other users, so nobody could start a program below it: \
                 point TMPDIR at a folder every user may enter",
                closed.display()
            )));
        }
        let copy = folder.join(name);
        let open_to_all = fs::metadata(program)?.permissions().mode() & 0o005 == 0o005;
        if !open_to_all || fs::hard_link(program, &copy).is_err() {
            fs::copy(program, &copy)?;
            fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
        }
        let mut builder = ProcBuilder::new(&copy).current_dir(folder.path());
        builder.command.uid(uid.as_raw()).gid(gid.as_raw());
        builder.program_copy = Some(folder);
        Ok(builder)
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> ProcBuilder {
        self.command.arg(arg);
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> ProcBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> ProcBuilder {
        self.command.env(key, value);
        self
    }

    /// Sets environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> ProcBuilder
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.command.envs(vars);
        self
    }

    /// Runs in `dir`.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> ProcBuilder {
        self.command.current_dir(dir);
        self
    }

    /// Gives the process a `NOTIFY_SOCKET` so the test can wait for `READY=1`.
    pub fn notify(mut self) -> ProcBuilder {
        self.notify = true;
        self
    }

    /// Runs as another user (PostgreSQL refuses to run as root). Only for programs installed
    /// on the system: one built in the checkout goes through [`ProcBuilder::as_nobody`].
    pub(crate) fn user(mut self, uid: u32, gid: u32) -> ProcBuilder {
        self.command.uid(uid).gid(gid);
        self
    }

    /// The signal the process gets when the test process dies (default `SIGKILL`).
    pub fn death_signal(mut self, signal: Signal) -> ProcBuilder {
        self.death_signal = signal;
        self
    }

    /// Runs inside a network namespace (an open `/run/netns/NAME`).
    pub fn netns(mut self, fd: OwnedFd) -> ProcBuilder {
        self.netns = Some(fd);
        self
    }

    /// Feeds these bytes on stdin, then closes it (default: stdin is `/dev/null`).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> ProcBuilder {
        self.stdin = Some(bytes.into());
        self
    }

    /// Starts the process.
    pub fn spawn(mut self) -> Result<Proc, Error> {
        let scratch = Scratch::new(&format!("proc-{}", sanitize(&self.name)))?;
        let notify = if self.notify {
            let path = scratch.join("notify");
            let socket = UnixDatagram::bind(&path)?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            // Services that drop privileges (postgres) must be able to write to it.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            self.command.env("NOTIFY_SOCKET", &path);
            Some(socket)
        } else {
            None
        };
        self.command
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let program = self.command.get_program().to_owned();
        let mut child =
            child::spawn(self.command, self.death_signal, self.netns).map_err(|source| {
                Error::Spawn {
                    program: PathBuf::from(&program),
                    source,
                }
            })?;
        let pid = child.id();
        let shared = Arc::new(Shared {
            captured: Mutex::new(Captured::default()),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        if let (Some(bytes), Some(mut stdin)) = (self.stdin, child.stdin.take()) {
            threads.push(std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            }));
        }
        if let Some(out) = child.stdout.take() {
            threads.push(reader(
                out,
                shared.clone(),
                |c| &mut c.stdout,
                |c| c.stdout_closed = true,
            ));
        }
        if let Some(err) = child.stderr.take() {
            threads.push(reader(
                err,
                shared.clone(),
                |c| &mut c.stderr,
                |c| c.stderr_closed = true,
            ));
        }
        // The notify socket is read by its own thread; when the process exits, the waiter takes
        // the socket and drains what is still queued *before* it publishes the exit, so a last
        // STOPPING=1 is never reported after the exit it preceded.
        let notify = notify.map(|socket| Arc::new(Mutex::new(socket)));
        if let Some(socket) = notify.clone() {
            let shared = shared.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(socket) = socket.lock() else { return };
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            let note = String::from_utf8_lossy(&buf[..n]).into_owned();
                            shared.update(|c| c.notes.push(note));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        {
            let shared = shared.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                // Wait without reaping, then reap under the lock: `signal` holds the same lock,
                // so it never sends to a PID that was already freed and reused.
                let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
                let _ = waitid(Id::Pid(Pid::from_raw(pid as i32)), flags);
                let mut late = Vec::new();
                if let Some(socket) = notify {
                    stop.store(true, Ordering::Relaxed);
                    if let Ok(socket) = socket.lock() {
                        let mut buf = vec![0u8; 4096];
                        while let Ok(n) = nix::sys::socket::recv(
                            socket.as_raw_fd(),
                            &mut buf,
                            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                        ) {
                            late.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                        }
                    }
                }
                shared.update(|c| {
                    c.notes.append(&mut late);
                    let status = child.wait();
                    c.status = Some(status.unwrap_or_else(|_| ExitStatus::from_raw(0xff00)));
                });
            }));
        }
        Ok(Proc {
            name: self.name,
            pid,
            shared,
            stop,
            threads,
            _scratch: scratch,
            _program_copy: self.program_copy,
        })
    }
}

/// The unprivileged user `nobody`.
pub(crate) fn nobody() -> Result<(Uid, Gid), Error> {
    let nobody = User::from_name("nobody")
        .map_err(io::Error::from)?
        .ok_or_else(|| Error::Missing("no user \"nobody\" to run a program as".into()))?;
    Ok((nobody.uid, nobody.gid))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(32)
        .collect()
}

fn reader(
    mut stream: impl Read + Send + 'static,
    shared: Arc<Shared>,
    buffer: fn(&mut Captured) -> &mut Vec<u8>,
    closed: fn(&mut Captured),
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => shared.update(|c| buffer(c).extend_from_slice(&chunk[..n])),
            }
        }
        shared.update(closed);
    })
}

/// A running (or finished) child process.
pub struct Proc {
    name: String,
    pid: u32,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    _scratch: Scratch,
    _program_copy: Option<Scratch>,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Proc {
    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().stdout).into_owned()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().stderr).into_owned()
    }

    /// Every sd_notify message received so far.
    pub fn notifications(&self) -> Vec<String> {
        self.shared.lock().notes.clone()
    }

    /// The exit status, if the process has ended.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.shared.lock().status
    }

    /// Waits for `READY=1`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        self.wait_notification("READY=1", timeout).map(|_| ())
    }

    /// Waits for the next sd_notify message containing a line starting with `prefix`
    /// (messages already consumed by an earlier wait do not count); returns the message.
    pub fn wait_notification(&self, prefix: &str, timeout: Duration) -> Result<String, Error> {
        let found = self.shared.wait_for(timeout, |c| {
            while c.notes_seen < c.notes.len() {
                let note = &c.notes[c.notes_seen];
                c.notes_seen += 1;
                if note.lines().any(|l| l.starts_with(prefix)) {
                    return Some(Ok(note.clone()));
                }
            }
            c.status.map(Err)
        });
        match found {
            Some(Ok(note)) => Ok(note),
            Some(Err(status)) => {
                Err(self.failure(format!("exited with {status} before sending {prefix}")))
            }
            None => Err(self.failure(format!("sent no {prefix} within {timeout:?}"))),
        }
    }

    /// Waits until stderr holds a line containing `needle`; returns that line.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> Result<String, Error> {
        self.wait_line(needle, timeout, |c| (&c.stderr, c.stderr_closed), "stderr")
    }

    /// Waits until stdout holds a line containing `needle`; returns that line.
    pub fn wait_stdout(&self, needle: &str, timeout: Duration) -> Result<String, Error> {
        self.wait_line(needle, timeout, |c| (&c.stdout, c.stdout_closed), "stdout")
    }

    /// Waits until stdout or stderr holds a line containing `needle`; returns that line.
    pub fn wait_output(&self, needle: &str, timeout: Duration) -> Result<String, Error> {
        let found = self.shared.wait_for(timeout, |c| {
            let in_stdout = find_line(&c.stdout, needle);
            let found = in_stdout.or_else(|| find_line(&c.stderr, needle));
            match found {
                Some(line) => Some(Some(line)),
                None => (c.stdout_closed && c.stderr_closed).then_some(None),
            }
        });
        self.line_result(found, needle, timeout, "its output")
    }

    fn wait_line(
        &self,
        needle: &str,
        timeout: Duration,
        stream: fn(&Captured) -> (&Vec<u8>, bool),
        what: &str,
    ) -> Result<String, Error> {
        let found = self.shared.wait_for(timeout, |c| {
            let (bytes, closed) = stream(c);
            match find_line(bytes, needle) {
                Some(line) => Some(Some(line)),
                None => closed.then_some(None),
            }
        });
        self.line_result(found, needle, timeout, what)
    }

    fn line_result(
        &self,
        found: Option<Option<String>>,
        needle: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<String, Error> {
        match found {
            Some(Some(line)) => Ok(line),
            Some(None) => Err(self.failure(format!("closed {what} without printing {needle:?}"))),
            None => Err(self.failure(format!(
                "printed no {needle:?} on {what} within {timeout:?}"
            ))),
        }
    }

    /// Sends a signal (nothing happens if the process already ended).
    pub fn signal(&self, sig: Signal) -> Result<(), Error> {
        let captured = self.shared.lock();
        if captured.status.is_some() {
            return Ok(());
        }
        // The lock is held so the waiter thread cannot reap the PID while we signal it.
        signal::kill(Pid::from_raw(self.pid as i32), sig).map_err(|e| Error::Io(e.into()))
    }

    /// Waits for the process to end and its output to be fully read.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, Error> {
        self.shared
            .wait_for(timeout, |c| {
                c.status.filter(|_| c.stdout_closed && c.stderr_closed)
            })
            .ok_or_else(|| self.failure(format!("did not exit within {timeout:?}")))
    }

    /// Waits for the process to exit with `code`; the error shows its stderr otherwise.
    pub fn expect_exit(&self, code: i32, timeout: Duration) -> Result<(), Error> {
        let status = self.wait_exit(timeout)?;
        if status.code() == Some(code) {
            Ok(())
        } else {
            Err(self.failure(format!("exited with {status}, expected code {code}")))
        }
    }

    /// `SIGTERM`, then waits for a clean exit (code 0) within `timeout`.
    pub fn stop(&self, timeout: Duration) -> Result<(), Error> {
        self.signal(Signal::SIGTERM)?;
        self.expect_exit(0, timeout)
    }

    /// `SIGKILL`, then waits for the process to be gone.
    pub fn kill(&self) -> Result<(), Error> {
        self.signal(Signal::SIGKILL)?;
        self.shared
            .wait_for(Duration::from_secs(30), |c| c.status)
            .map(|_| ())
            .ok_or_else(|| self.failure("survived SIGKILL".to_owned()))
    }

    fn failure(&self, what: String) -> Error {
        let captured = self.shared.lock();
        Error::Process {
            name: self.name.clone(),
            pid: self.pid,
            what,
            stdout: tail(&captured.stdout),
            stderr: tail(&captured.stderr),
        }
    }
}

fn find_line(bytes: &[u8], needle: &str) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    text.lines().find(|l| l.contains(needle)).map(str::to_owned)
}

fn tail(bytes: &[u8]) -> String {
    const KEEP: usize = 8 * 1024;
    let start = bytes.len().saturating_sub(KEEP);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.signal(Signal::SIGKILL);
        self.stop.store(true, Ordering::Relaxed);
        // The waiter and readers end once the process is gone; a grandchild holding the pipes
        // open would keep a reader blocked, so those are left to finish on their own.
        let _ = self.shared.wait_for(Duration::from_secs(10), |c| c.status);
        for thread in self.threads.drain(..) {
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// The path of a binary on `PATH` or in `~/.cargo/bin`.
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs a command to completion with an explicit environment; returns its stdout, or an error
/// carrying its stderr when it fails.
pub fn run(
    program: impl AsRef<OsStr>,
    args: &[&OsStr],
    env: &[(OsString, OsString)],
) -> Result<String, Error> {
    let program = program.as_ref();
    let mut command = Command::new(program);
    command
        .env_clear()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    let output = command.output().map_err(|source| Error::Spawn {
        program: PathBuf::from(program),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Process {
            name: Path::new(program).display().to_string(),
            pid: 0,
            what: format!(
                "{} {:?} exited with {}",
                Path::new(program).display(),
                args,
                output.status
            ),
            stdout: tail(&output.stdout),
            stderr: tail(&output.stderr),
        })
    }
}
