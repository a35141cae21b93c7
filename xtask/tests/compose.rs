//! The compose files in `examples/compose/` parse, reach the host's PostgreSQL through
//! `host.docker.internal`, and read no variable that `pgprov create NAME --format env` does not
//! write (no Docker engine needed: YAML is parsed with Python's yaml module).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `pgprov create NAME --format env` writes.
const PGPROV_ENV: [&str; 6] = pgprov::credentials::ENV_KEYS;

fn compose_files() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![xtask::workspace_root().join("examples/compose")];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n == "compose.yml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn parse(path: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Names substituted by compose: `${NAME}`, `${NAME:?...}`, `${NAME:-...}`, `$NAME` (not `$$`).
fn interpolated(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            if bytes.get(i + 1) == Some(&b'$') {
                i += 2;
                continue;
            }
            let start = if bytes.get(i + 1) == Some(&b'{') {
                i + 2
            } else {
                i + 1
            };
            let end = (start..bytes.len())
                .find(|&j| !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_'))
                .unwrap_or(bytes.len());
            if end > start {
                names.insert(text[start..end].to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn the_four_services_are_split_gitops_first() {
    let root = xtask::workspace_root().join("examples/compose");
    let relative: Vec<String> = compose_files()
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert_eq!(
        relative,
        [
            "apps/jupyterhub/compose.yml",
            "apps/metabase/compose.yml",
            "gitops/gitea/compose.yml",
            "gitops/woodpecker/compose.yml"
        ]
    );
}

#[test]
fn every_compose_file_reads_only_what_pgprov_writes() {
    for path in compose_files() {
        let text = fs::read_to_string(&path).unwrap();
        let names = interpolated(&text);
        for name in &names {
            assert!(
                PGPROV_ENV.contains(&name.as_str()),
                "{} reads ${name}, which pgprov does not write",
                path.display()
            );
        }
        for needed in ["PGUSER", "PGPASSWORD", "PGDATABASE", "PGPORT"] {
            assert!(
                names.contains(needed),
                "{} does not use {needed}",
                path.display()
            );
        }
        let parsed = parse(&path);
        let services = parsed["services"]
            .as_object()
            .unwrap_or_else(|| panic!("{}: no services", path.display()));
        for (name, service) in services {
            let service_text = service.to_string();
            if !service_text.contains("${PG") && !service_text.contains("$PG") {
                continue;
            }
            let hosts: Vec<&str> = service["extra_hosts"]
                .as_array()
                .map(|a| a.iter().filter_map(|h| h.as_str()).collect())
                .unwrap_or_default();
            assert!(
                hosts.contains(&"host.docker.internal:host-gateway"),
                "{}: {name} cannot reach the host",
                path.display()
            );
            assert!(
                service_text.contains("host.docker.internal"),
                "{}: {name} does not connect to host.docker.internal",
                path.display()
            );
        }
    }
}

#[test]
fn each_image_gets_its_own_database_variables() {
    let expect = [
        (
            "gitops/gitea/compose.yml",
            &[
                "GITEA__database__DB_TYPE",
                "GITEA__database__HOST",
                "GITEA__database__NAME",
                "GITEA__database__USER",
                "GITEA__database__PASSWD",
            ][..],
        ),
        (
            "gitops/woodpecker/compose.yml",
            &[
                "WOODPECKER_DATABASE_DRIVER",
                "WOODPECKER_DATABASE_DATASOURCE",
            ][..],
        ),
        (
            "apps/metabase/compose.yml",
            &[
                "MB_DB_TYPE",
                "MB_DB_HOST",
                "MB_DB_PORT",
                "MB_DB_DBNAME",
                "MB_DB_USER",
                "MB_DB_PASS",
            ][..],
        ),
        ("apps/jupyterhub/compose.yml", &["JUPYTERHUB_DB_URL"][..]),
    ];
    let root = xtask::workspace_root().join("examples/compose");
    for (file, variables) in expect {
        let parsed = parse(&root.join(file));
        let environment: BTreeSet<String> = parsed["services"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|s| {
                s["environment"]
                    .as_object()
                    .map(|e| e.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        for variable in variables {
            assert!(
                environment.contains(*variable),
                "{file} does not set {variable}"
            );
        }
    }
    // JupyterHub's config takes db_url from exactly what compose sets.
    let config = fs::read_to_string(root.join("apps/jupyterhub/jupyterhub_config.py")).unwrap();
    assert!(config.contains("c.JupyterHub.db_url = os.environ[\"JUPYTERHUB_DB_URL\"]"));
}
