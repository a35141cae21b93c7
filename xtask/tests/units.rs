//! The systemd units in `systemd/` pass `systemd-analyze verify`, and each is more tightly
//! confined than Debian's caddy.service by `systemd-analyze security`'s exposure score.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Copies the units into a scratch folder with their binaries pointing at stubs there:
/// `verify` checks that ExecStart names an executable, and the tools need not be installed.
fn staged_units() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let mut units = Vec::new();
    for entry in fs::read_dir(xtask::workspace_root().join("systemd"))
        .unwrap()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let text = fs::read_to_string(entry.path()).unwrap();
        for line in text
            .lines()
            .filter(|l| l.starts_with("ExecStart=/usr/bin/"))
        {
            let program = line["ExecStart=/usr/bin/".len()..]
                .split_whitespace()
                .next()
                .unwrap();
            let stub = bin.join(program);
            fs::write(&stub, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = dir.path().join(&name);
        fs::write(
            &path,
            text.replace("/usr/bin/", &format!("{}/", bin.display())),
        )
        .unwrap();
        units.push(path);
    }
    units.sort();
    (dir, units)
}

/// A scratch folder removed on drop (kept tiny to avoid a dependency for one test).
fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze runs (apt-get install systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score for {}: {text}", unit.display()));
    line.split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap()
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let (_dir, units) = staged_units();
    let expected = [
        "backupd-daemon.service",
        "backupd.service",
        "backupd.timer",
        "edge.service",
        "tunnel-client.service",
        "tunnel-server.service",
    ];
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, expected);
    // Documentation= points at man pages that are installed only with the package.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn every_service_is_more_confined_than_debians_caddy() {
    let caddy = Path::new("/lib/systemd/system/caddy.service");
    assert!(
        caddy.exists(),
        "Debian's caddy package provides the reference unit: apt-get install caddy"
    );
    let reference = exposure(caddy);
    let (_dir, units) = staged_units();
    for unit in units
        .iter()
        .filter(|u| u.extension().is_some_and(|e| e == "service"))
    {
        let score = exposure(unit);
        println!(
            "{}: {score} (caddy.service: {reference})",
            unit.file_name().unwrap().to_string_lossy()
        );
        assert!(
            score < reference,
            "{}: exposure {score} is not below caddy.service's {reference}",
            unit.display()
        );
        assert!(
            score <= 2.0,
            "{}: exposure {score} should stay at 2.0 or below",
            unit.display()
        );
    }
}
