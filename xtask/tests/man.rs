//! The committed man pages match the tools' current command lines, and render.

use std::fs;

#[test]
fn committed_man_pages_are_up_to_date() {
    let root = xtask::workspace_root().join("man");
    let mut stale = Vec::new();
    let pages = xtask::man_pages();
    for (name, text) in &pages {
        match fs::read_to_string(root.join(name)) {
            Ok(committed) if committed == *text => {}
            _ => stale.push(name.clone()),
        }
    }
    let expected: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
    for entry in fs::read_dir(&root).expect("man/ exists").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !expected.contains(&name.as_str()) {
            stale.push(format!("{name} (no longer generated)"));
        }
    }
    assert!(
        stale.is_empty(),
        "stale man pages, run `cargo xtask man`: {stale:?}"
    );
}

#[test]
fn every_page_has_the_required_sections_and_renders() {
    for (name, text) in xtask::man_pages() {
        for section in [
            "NAME",
            "SYNOPSIS",
            "EXAMPLES",
            "EXIT STATUS",
            "FILES",
            "ENVIRONMENT",
        ] {
            assert!(
                text.contains(&format!(".SH {section}"))
                    || text.contains(&format!(".SH \"{section}\"")),
                "{name} lacks {section}"
            );
        }
        let out = std::process::Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(text.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success(), "{name}: groff failed");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(warnings.trim().is_empty(), "{name}: {warnings}");
    }
}
