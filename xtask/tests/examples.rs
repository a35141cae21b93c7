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
