//! The module graph of a crate, built from the `crate::` paths in its sources, and the cycles
//! in it.
//!
//! Each top-level module of `src/` is a node (a folder module and its children are one node:
//! `transport/tls.rs` belongs to `transport`); `lib` stands for items defined in `lib.rs`
//! itself. An edge `a -> b` means some file of `a` names `crate::b` (in a `use` or inline,
//! `use crate::{b, c::d}` groups included). Unit tests (`#[cfg(test)] mod tests`, at the end of
//! a file by the project's style) are left out: a test may reach anywhere. A cycle is a set of
//! modules that reach each other; STYLE's rule is that modules form layers, so there are none.
//! This reads text rather than parsing Rust: paths spelled through `super::` from a top-level
//! module, or through a re-export, are not seen.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

/// Module name -> the modules it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Builds the graph of the crate whose sources are in `src`.
pub fn graph(src: &Path) -> io::Result<Graph> {
    let mut modules = BTreeSet::new();
    for entry in fs::read_dir(src)? {
        let path = entry?.path();
        let name = module_name(&path);
        if !matches!(name.as_str(), "lib" | "main" | "") {
            modules.insert(name);
        }
    }
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for path in rust_files(src)? {
        let top = path
            .strip_prefix(src)
            .ok()
            .and_then(|rel| rel.components().next())
            .map(|c| module_name(Path::new(c.as_os_str())))
            .unwrap_or_default();
        if !modules.contains(&top) {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        for name in crate_paths(without_unit_tests(&text)) {
            let target = if modules.contains(&name) {
                name
            } else {
                "lib".to_owned()
            };
            if target != top {
                graph.entry(top.clone()).or_default().insert(target);
            }
        }
    }
    Ok(graph)
}

/// The strongly connected sets of more than one module, each sorted, in name order.
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Kosaraju: finish order on the graph, then components on the reversed graph.
    fn visit<'a>(g: &'a Graph, n: &'a str, seen: &mut BTreeSet<&'a str>, out: &mut Vec<&'a str>) {
        if !seen.insert(n) {
            return;
        }
        for next in g.get(n).into_iter().flatten() {
            visit(g, next, seen, out);
        }
        out.push(n);
    }
    let mut reversed = Graph::new();
    for (from, tos) in graph {
        for to in tos {
            reversed.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for node in graph.keys() {
        visit(graph, node, &mut seen, &mut order);
    }
    let mut assigned = BTreeSet::new();
    let mut found = Vec::new();
    for node in order.into_iter().rev() {
        let mut component = Vec::new();
        visit(&reversed, node, &mut assigned, &mut component);
        if component.len() > 1 {
            let mut names: Vec<String> = component.into_iter().map(str::to_owned).collect();
            names.sort();
            found.push(names);
        }
    }
    found.sort();
    found
}

/// The edges inside `cycle`, one `a -> b` per line, for a report.
pub fn describe(graph: &Graph, cycle: &[String]) -> String {
    let mut text = String::new();
    for from in cycle {
        for to in graph.get(from).into_iter().flatten() {
            if cycle.contains(to) {
                text.push_str(&format!("  {from} -> {to}\n"));
            }
        }
    }
    text
}

fn module_name(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_suffix(".rs").unwrap_or(name).to_owned()
}

fn rust_files(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(files)
}

fn without_unit_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// The first segment of every `crate::` path in `text`, groups included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` or `my_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let mut depth = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.extend(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            names.extend(first_segment(rest));
        }
    }
    names
}

fn first_segment(path: &str) -> Option<String> {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty() && name != "self").then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_paths_reads_plain_paths_groups_and_nested_groups() {
        let text = "use crate::a::B;\nuse crate::{c, d::{E, F}, g::h};\nlet x = crate::i::j();\n\
                    $crate::k::l; my_crate::m;";
        let names: Vec<String> = crate_paths(text).into_iter().collect();
        assert_eq!(names, ["a", "c", "d", "g", "i"]);
    }

    #[test]
    fn a_three_module_loop_is_one_cycle_and_a_chain_is_none() {
        let edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")];
        let mut graph = Graph::new();
        for (from, to) in edges {
            graph.entry(from.into()).or_default().insert(to.into());
        }
        assert_eq!(cycles(&graph), [["a", "b", "c"]]);
        graph.get_mut("c").unwrap().remove("a");
        assert!(cycles(&graph).is_empty());
    }
}
