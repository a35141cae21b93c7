//! The command line: `check`, `adapt`, `ca root`, and the exit codes and messages for bad
//! configs.

use std::path::Path;

use testkit::Scratch;

use crate::support::{EDGE, Ran, lab_caddyfile_path, lab_sites, run};

/// Runs the edge binary to completion.
fn edge(args: &[&str]) -> Ran {
    run(EDGE, args)
}

/// Writes `text` as `name` in `dir` and returns its path as a string.
fn write(dir: &Scratch, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The lab's Caddyfile with `tls internal` in each site and storage in `dir`.
fn lab_internal(dir: &Scratch) -> String {
    let lab = lab_sites();
    format!(
        "{{\n\thttp_port 0\n\thttps_port 0\n\tdefault_bind 127.0.0.1\n\tstorage file_system {}\n}}\n\n{}",
        dir.join("storage").display(),
        lab.replace(" {\n", " {\n\ttls internal\n")
    )
}

#[test]
fn check_lists_the_resolved_sites_of_the_lab_caddyfile() {
    let dir = Scratch::new("edge-cli").unwrap();
    let file = write(&dir, "Caddyfile", &lab_internal(&dir));
    let ran = edge(&["check", "--caddyfile", &file]);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", ran.stdout);
    assert!(
        lines[0].starts_with("https://lab.example.org"),
        "{}",
        ran.stdout
    );
    assert!(
        lines[0].contains("reverse_proxy localhost:7001"),
        "{}",
        ran.stdout
    );
    assert!(
        lines[1].starts_with("https://git.example.org"),
        "{}",
        ran.stdout
    );
    assert!(
        lines[1].contains("reverse_proxy localhost:3000"),
        "{}",
        ran.stdout
    );
    assert!(
        !dir.join("storage").exists(),
        "check changes nothing on disk"
    );
}

#[test]
fn every_edge_example_checks_and_adapts() {
    let folder = lab_caddyfile_path().parent().unwrap().to_owned();
    let mut checked = 0;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        let name = path.display().to_string();
        let (check, adapt) = if path.extension().is_some_and(|e| e == "toml") {
            (edge(&["check", "-c", &name]), None)
        } else {
            let adapt = edge(&["adapt", "--caddyfile", &name]);
            (edge(&["check", "--caddyfile", &name]), Some(adapt))
        };
        assert_eq!(check.code, 0, "{name}: {}", check.stderr);
        if let Some(adapt) = adapt {
            assert_eq!(adapt.code, 0, "{name}: {}", adapt.stderr);
            assert!(
                adapt.stdout.contains("[[site]]"),
                "{name}: {}",
                adapt.stdout
            );
        }
        checked += 1;
    }
    assert!(checked >= 1, "the lab's Caddyfile is there");
}

#[test]
fn the_lab_caddyfile_as_it_is_checks_with_acme_for_both_sites() {
    let name = lab_caddyfile_path().display().to_string();
    let ran = edge(&["check", "--caddyfile", &name]);
    assert_eq!(ran.code, 0, "{name}: {}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", ran.stdout);
    for (line, host) in lines.iter().zip(["lab.example.org", "git.example.org"]) {
        assert!(line.starts_with(&format!("https://{host}")), "{line}");
        assert!(line.contains("tls acme"), "{line}");
    }
}

#[test]
fn a_public_wildcard_needs_dns01_and_is_refused_with_exit_78() {
    let dir = Scratch::new("edge-cli").unwrap();
    let file = write(
        &dir,
        "Caddyfile",
        "*.example.org {\n\treverse_proxy :9000\n}\n",
    );
    let ran = edge(&["check", "--caddyfile", &file]);
    assert_eq!(ran.code, 78, "{}", ran.stderr);
    assert!(ran.stderr.contains(&format!("{file}:1")), "{}", ran.stderr);
    assert!(ran.stderr.contains("DNS-01"), "{}", ran.stderr);
}

#[test]
fn an_unsupported_directive_is_an_error_naming_file_line_and_directive() {
    let dir = Scratch::new("edge-cli").unwrap();
    let file = write(
        &dir,
        "Caddyfile",
        "app.local {\n\treverse_proxy 127.0.0.1:9000\n\tacme_server\n}\n",
    );
    for command in ["check", "run"] {
        let ran = edge(&[command, "--caddyfile", &file]);
        assert_eq!(ran.code, 78, "{command}: {}", ran.stderr);
        assert!(
            ran.stderr.contains(&format!("{file}:3")),
            "{command}: {}",
            ran.stderr
        );
        assert!(
            ran.stderr.contains("acme_server"),
            "{command}: {}",
            ran.stderr
        );
    }
}

#[test]
fn a_missing_config_file_exits_66_naming_it() {
    let ran = edge(&["check", "-c", "/nonexistent/edge.toml"]);
    assert_eq!(ran.code, 66, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("/nonexistent/edge.toml"),
        "{}",
        ran.stderr
    );
}

#[test]
fn adapt_prints_toml_that_resolves_to_the_same_sites() {
    let dir = Scratch::new("edge-cli").unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let caddyfile = write(
        &dir,
        "Caddyfile",
        &format!(
            "{}\napp.local, 127.0.0.1 {{\n\tencode gzip zstd\n\tredir /old /new 301\n\theader X-Frame-Options DENY\n\tbasic_auth /admin* {{\n\t\talice {hash}\n\t}}\n\treverse_proxy /api* 127.0.0.1:9001 127.0.0.1:9002\n\treverse_proxy 127.0.0.1:9000\n}}\n",
            lab_internal(&dir)
        ),
    );
    let adapted = edge(&["adapt", "--caddyfile", &caddyfile]);
    assert_eq!(adapted.code, 0, "{}", adapted.stderr);
    let toml = write(&dir, "edge.toml", &adapted.stdout);
    let from_caddyfile = edge(&["check", "--caddyfile", &caddyfile, "--format", "json"]);
    let from_toml = edge(&["check", "-c", &toml, "--format", "json"]);
    assert_eq!(from_caddyfile.code, 0, "{}", from_caddyfile.stderr);
    assert_eq!(
        from_toml.code, 0,
        "{}\n{}",
        from_toml.stderr, adapted.stdout
    );
    assert_eq!(from_caddyfile.stdout, from_toml.stdout);
    assert_eq!(from_toml.stdout.lines().count(), 4, "{}", from_toml.stdout);
    assert!(
        from_toml.stdout.contains("127.0.0.1:9002"),
        "{}",
        from_toml.stdout
    );
}

#[test]
fn ca_root_prints_the_stored_root_and_keeps_it_across_runs() {
    let dir = Scratch::new("edge-cli").unwrap();
    let file = write(&dir, "Caddyfile", &lab_internal(&dir));
    let first = edge(&["ca", "root", "--caddyfile", &file]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stdout.starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        first.stdout
    );
    let stored = Path::new(&dir.join("storage/pki/authorities/local/root.crt")).to_owned();
    assert_eq!(std::fs::read_to_string(stored).unwrap(), first.stdout);
    let second = edge(&["ca", "root", "--caddyfile", &file]);
    assert_eq!(second.stdout, first.stdout, "the root is made once");
}

#[test]
fn a_corrupt_stored_root_key_exits_65_naming_the_file() {
    let dir = Scratch::new("edge-cli").unwrap();
    let file = write(&dir, "Caddyfile", &lab_internal(&dir));
    assert_eq!(edge(&["ca", "root", "--caddyfile", &file]).code, 0);
    let key = dir.join("storage/pki/authorities/local/root.key");
    std::fs::write(&key, "not a key\n").unwrap();
    let ran = edge(&["run", "--caddyfile", &file]);
    assert_eq!(ran.code, 65, "{}", ran.stderr);
    assert!(ran.stderr.contains("root.key"), "{}", ran.stderr);
}
