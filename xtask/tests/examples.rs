//! Every example config parses with the tool that reads it.

use std::path::Path;

use labcore::Env;

#[test]
fn the_backupd_example_is_valid() {
    let path = xtask::workspace_root().join("examples/backupd/backupd.toml");
    let config = backupd::config::Config::load(&path, &Env::default()).unwrap();
    let names: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["lab", "globals", "gitea-data"]);
    assert!(config.retention.prunes());
    assert!(Path::new(&path).exists());
}

#[test]
fn the_pgprov_example_declares_the_labs_five_databases() {
    let path = xtask::workspace_root().join("examples/pgprov/lab.toml");
    let lab = pgprov::apply::load(&path).unwrap();
    let names: Vec<&str> = lab.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["ci", "dw", "gitea", "jupyterhub", "metabase"]);
    let dw = &lab.databases[1];
    let readers: Vec<&str> = dw.read.iter().map(|n| n.as_str()).collect();
    assert_eq!(readers, ["metabase"]);
    assert_eq!(lab.host.as_deref(), Some("172.17.0.1"));
}
