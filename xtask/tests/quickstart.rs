//! `cargo xtask quickstart` (what `scripts/quickstart` runs after building) brings the whole
//! lab up from the tools' binaries, every command it prints works, and SIGINT leaves no
//! process, no listening port and no folder behind. It uses the workspace's debug binaries.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use testkit::ProcBuilder;

const WAIT: Duration = Duration::from_secs(240);

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

#[test]
fn the_quickstart_brings_the_lab_up_every_printed_command_works_and_sigint_leaves_nothing() {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let bin_dir = target.join("debug");
    let mut builder = ProcBuilder::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["quickstart", "--bin-dir"])
        .arg(&bin_dir);
    if let Some(home) = std::env::var_os("HOME") {
        builder = builder.env("HOME", home);
    }
    let quickstart = builder.spawn().unwrap();
    quickstart
        .wait_stdout("Ctrl-C stops the lab", WAIT)
        .unwrap();
    let summary = quickstart.stdout();

    let folder = summary
        .split("(its folder: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap()
        .to_owned();
    assert!(Path::new(&folder).is_dir(), "{summary}");
    let ports: Vec<u16> = summary
        .split("127.0.0.1:")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    assert!(ports.len() >= 8, "ports in {summary}");

    let commands: Vec<&str> = summary
        .lines()
        .filter_map(|l| l.strip_prefix("  $ "))
        .collect();
    assert!(commands.len() >= 6, "{summary}");
    let expected = [
        "the home lab's web service",
        "the home lab's git service",
        "metabase",
        "jupyterhub",
        "examples/",
        "lab.dw@",
    ];
    for (command, expect) in commands.iter().zip(expected) {
        let out = Command::new("sh").args(["-c", command]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}\nexited {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(expect), "{command}\nprinted {stdout}");
    }

    quickstart.signal(Signal::SIGINT).unwrap();
    quickstart.expect_exit(0, WAIT).unwrap();
    assert!(
        quickstart.stderr().contains("nothing is left running"),
        "{}",
        quickstart.stderr()
    );
    let prefix = format!("/labkit-testkit/{}-", quickstart.pid());
    let left = processes_mentioning(&prefix);
    assert!(left.is_empty(), "still running: {left:?}");
    for port in ports {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "127.0.0.1:{port} still listens"
        );
    }
    assert!(!Path::new(&folder).exists(), "{folder} is left");
}
