//! Every crate's modules form layers: no module reaches, through `crate::` paths, a module
//! that reaches it back (`cargo xtask layers` prints the same).

#[test]
fn no_crate_has_a_module_cycle() {
    let root = xtask::workspace_root();
    let mut found = String::new();
    for krate in xtask::CRATES {
        let graph = xtask::layers::graph(&root.join(krate).join("src")).unwrap();
        for cycle in xtask::layers::cycles(&graph) {
            found.push_str(&format!("{krate}: {}\n", cycle.join(", ")));
            found.push_str(&xtask::layers::describe(&graph, &cycle));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{found}");
}

#[test]
fn the_workspace_lists_every_crate() {
    let manifest = std::fs::read_to_string(xtask::workspace_root().join("Cargo.toml")).unwrap();
    for krate in xtask::CRATES {
        assert!(manifest.contains(&format!("\"{krate}\"")), "{krate}");
    }
    let members = manifest.lines().find(|l| l.starts_with("members")).unwrap();
    assert_eq!(
        members.matches('"').count() / 2,
        xtask::CRATES.len(),
        "{members}"
    );
}
