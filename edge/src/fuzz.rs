//! Fuzz entry points (feature `fuzzing`, off by default): the two config front ends, for the
//! `fuzz` crate's harness and afl.
//!
//! Invariants: every function takes arbitrary bytes and returns normally; a panic is a bug in
//! the parser. Configs resolve against an empty environment as files in a folder that does not
//! exist (and the harness runs inside an empty root), so no path the input names is read.
//! These functions are not an API: they exist so the parsers can stay private.

use std::path::Path;

use labcore::Env;
use labcore::config::ConfigFile;

use crate::config::{EdgeToml, resolve};

fn empty_env() -> Env {
    Env::from_pairs(std::iter::empty::<(&str, &str)>())
}

/// A Caddyfile, parsed and resolved as `edge check` does.
pub fn caddyfile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/Caddyfile");
    let env = empty_env();
    if let Ok(parsed) = crate::caddyfile::parse(path, text, &env) {
        same_after_toml(&parsed.toml);
        // load's second half: resolving, with errors located on a Caddyfile line.
        if let Ok(config) = resolve(parsed.toml.clone(), &ConfigFile::new(path), &env) {
            let _ = config.listeners();
        }
    }
}

/// An edge TOML config, parsed and resolved as `edge check` does.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/edge.toml");
    let Ok(raw) = labcore::config::parse_str::<EdgeToml>(path, text) else {
        return;
    };
    same_after_toml(&raw);
    if let Ok(config) = resolve(raw, &ConfigFile::new(path), &empty_env()) {
        let _ = config.listeners();
    }
}

/// The two front ends meet in [`EdgeToml`]: written out as TOML, a parsed config reads back the
/// same.
fn same_after_toml(raw: &EdgeToml) {
    let text = toml::to_string(raw).expect("a parsed config serializes");
    let again: EdgeToml = labcore::config::parse_str(Path::new("again.toml"), &text)
        .unwrap_or_else(|err| panic!("written-out config does not parse: {err}\n{text}"));
    assert_eq!(&again, raw, "config changed through TOML:\n{text}");
}
