//! The repository stands alone: no tracked file reaches outside it for the reference material
//! its developers read, every example is checked by a test of the tool that reads it, and
//! ARCHITECTURE.md names every crate and module there is.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tracked files, by `git ls-files` (a checkout without git: every file but `target/`).
fn tracked_files(root: &Path) -> Vec<PathBuf> {
    let listed = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output();
    if let Some(out) = listed.ok().filter(|o| o.status.success()) {
        return out
            .stdout
            .split(|&b| b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| root.join(String::from_utf8_lossy(name).as_ref()))
            .collect();
    }
    let mut found = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn no_tracked_file_names_the_folder_beside_the_checkout() {
    let root = xtask::workspace_root();
    // Spelled in two parts so that this file does not match itself.
    let outside = ["..", "shared"].join("/");
    let mut naming = Vec::new();
    for path in tracked_files(&root) {
        let Ok(bytes) = fs::read(&path) else { continue };
        if String::from_utf8_lossy(&bytes).contains(&outside) {
            naming.push(
                path.strip_prefix(&root)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(naming.is_empty(), "these files name {outside}: {naming:?}");
}

/// Each folder of `examples/`, with the test that checks every file in it by the tool's own
/// command (so a new example cannot rot unchecked: add its folder here and a test there).
const EXAMPLE_FOLDERS: &[(&str, &str)] = &[
    ("tunnel", "tunnel/tests/cli.rs: every_tunnel_example_checks"),
    (
        "edge",
        "edge/tests/edge/cli.rs: every_edge_example_checks_and_adapts",
    ),
    (
        "backupd",
        "backupd/tests/backupd.rs: every_backupd_example_checks",
    ),
    (
        "pgprov",
        "pgprov/tests/pgprov.rs: every_pgprov_example_checks",
    ),
    (
        "compose",
        "xtask/tests/compose.rs: every_compose_file_reads_only_what_pgprov_writes",
    ),
];

#[test]
fn every_example_folder_is_checked_by_its_tools_test() {
    let root = xtask::workspace_root();
    let mut folders: Vec<String> = fs::read_dir(root.join("examples"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let mut known: Vec<&str> = EXAMPLE_FOLDERS.iter().map(|(f, _)| *f).collect();
    known.sort();
    assert_eq!(
        folders, known,
        "a folder of examples/ without a checking test"
    );
    for (_, test) in EXAMPLE_FOLDERS {
        let (file, name) = test.split_once(": ").expect("FILE: TEST");
        let path = root.join(file);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("fn {name}")), "{test} is missing");
    }
}

#[test]
fn architecture_md_names_every_crate_and_module() {
    let root = xtask::workspace_root();
    let text = fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("(ARCHITECTURE.md)"), "the README links it");
    let mut missing = Vec::new();
    for krate in xtask::CRATES {
        if !text.contains(&format!("`{krate}`")) {
            missing.push(krate.to_string());
        }
        let src = root.join(krate).join("src");
        let mut modules = Vec::new();
        let mut pending = vec![src.clone()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let rel = path.strip_prefix(&src).unwrap().with_extension("");
                    let name = rel.to_string_lossy().replace('/', "::");
                    if !matches!(name.as_str(), "lib" | "main") && !name.starts_with("bin::") {
                        modules.push(name);
                    }
                }
            }
        }
        for module in modules {
            if !text.contains(&format!("`{module}`")) {
                missing.push(format!("{krate}::{module}"));
            }
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name: {missing:?}"
    );
}
