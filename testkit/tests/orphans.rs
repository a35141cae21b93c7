//! After `kill -9` of a test process that started a PgCluster and an S3Server, none of their
//! processes is left: each child gets a parent-death signal.
//!
//! The test runs this same test binary again as a "holder" that starts both parts, prints
//! their PIDs and waits; it then kills the holder with SIGKILL and waits (on pidfds, not
//! sleeps) for every one of those processes to end.

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

const HOLDER_ENV: &str = "TESTKIT_ORPHAN_HOLDER";

#[test]
#[ignore = "run only as the child of killing_the_test_process_leaves_no_servers"]
fn holder() {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return;
    }
    let cluster = testkit::PgCluster::start().unwrap();
    let s3 = testkit::S3Server::start().unwrap();
    let pg_pid = cluster.pid().unwrap();
    let mut pids = vec![pg_pid, s3.pid().unwrap()];
    pids.extend(children_of(pg_pid));
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("PIDS {}", list.join(" "));
    // Block until killed.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new file descriptor or -1.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a fresh descriptor that nothing else owns.
    #[allow(unsafe_code)]
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[test]
fn killing_the_test_process_leaves_no_servers() {
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "holder",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let pids: Vec<u32> = loop {
        let line = lines
            .next()
            .expect("holder ended before printing its PIDs")
            .unwrap();
        // libtest may print "test holder ... " on the same line before the test's output.
        if let Some((_, list)) = line.split_once("PIDS ") {
            break list
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
        }
    };
    assert!(
        pids.len() >= 3,
        "postmaster, its children and s3s-fs: {pids:?}"
    );
    // Open the pidfds before the kill, so no PID can be reused in between.
    let fds: Vec<(u32, OwnedFd)> = pids
        .iter()
        .filter_map(|&pid| pidfd(pid).map(|fd| (pid, fd)))
        .collect();
    assert!(!fds.is_empty());

    holder.kill().unwrap();
    holder.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    for (pid, fd) in &fds {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut polls = [PollFd::new(std::os::fd::AsFd::as_fd(fd), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(left.as_millis().min(30_000) as i32).unwrap();
        let ready = poll(&mut polls, timeout).unwrap();
        assert_eq!(ready, 1, "process {pid} outlived the killed test process");
    }
}
