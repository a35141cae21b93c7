//! The Debian package: `scripts/package` builds it, `dpkg -i` installs it on this machine with
//! every tool runnable from /usr/bin and the services' users made, and `dpkg --purge` leaves
//! nothing behind. It uses the debug binaries the workspace build already made.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const USERS: [&str; 3] = ["labkit-edge", "labkit-tunnel", "labkit-backupd"];

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .unwrap()
        .status
        .success()
}

/// The cargo target folder this test was built in (CARGO_TARGET_TMPDIR is its `tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "labkit"]).output();
    }
}

#[test]
fn the_deb_installs_every_tool_into_usr_bin_and_purges_without_leftovers() {
    let root = xtask::workspace_root();
    let target = target_dir();
    let tools = xtask::tools();
    for tool in &tools {
        let bin = target.join("debug").join(tool.command.get_name());
        assert!(
            bin.exists(),
            "{} is missing: build the workspace first",
            bin.display()
        );
    }
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(root.join("scripts/package"))
        .args(["--profile", "dev", "--no-build", "--fast", "--out"])
        .arg(out.path())
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/package failed: {status}");
    let deb = fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("scripts/package wrote a .deb");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("labkit_"), "{name}");

    // A package left by an earlier run that died must not hide what this one does.
    let _ = Command::new("dpkg").args(["--purge", "labkit"]).output();
    let installed = Installed;
    run("dpkg", &["-i", deb.to_str().unwrap()]);

    for tool in &tools {
        let name = tool.command.get_name();
        let out = run(&format!("/usr/bin/{name}"), &["--version"]);
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            version.starts_with(&format!("{name} ")),
            "{name} --version printed {version:?}"
        );
        let page = format!("/usr/share/man/man1/{name}.1.gz");
        assert!(Path::new(&page).exists(), "{page} is missing");
    }
    for user in USERS {
        assert!(user_exists(user), "postinst did not create {user}");
    }
    assert!(Path::new("/lib/systemd/system/backupd.timer").exists());
    let mode = fs::metadata("/etc/labkit/credentials").unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o700
    );
    let listed = run("dpkg", &["-L", "labkit"]);
    let files: Vec<PathBuf> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    assert!(files.len() > tools.len(), "dpkg -L listed {files:?}");

    run("dpkg", &["--purge", "labkit"]);
    drop(installed);
    let left: Vec<_> = files.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    for user in USERS {
        assert!(!user_exists(user), "purge left the user {user}");
    }
    assert!(!Path::new("/etc/labkit").exists(), "purge left /etc/labkit");
    let status = Command::new("dpkg")
        .args(["-s", "labkit"])
        .output()
        .unwrap();
    assert!(!status.status.success(), "dpkg still knows labkit");
}
