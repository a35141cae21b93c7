//! A snapshot of environment variables, passed explicitly instead of read from the process.
//!
//! Settings that come from the environment (`PG*`, `AWS_*`, `CREDENTIALS_DIRECTORY`,
//! `NOTIFY_SOCKET`, `LABKIT_LOG`) are resolved from an [`Env`], so tests hand each tool exactly
//! the variables they mean to and nothing ambient leaks in. `Debug` shows names, never values:
//! the environment holds passwords.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;

/// Environment variables, captured once.
#[derive(Clone, Default)]
pub struct Env {
    vars: BTreeMap<OsString, OsString>,
}

impl Env {
    /// The current process's environment.
    pub fn from_process() -> Env {
        Env {
            vars: std::env::vars_os().collect(),
        }
    }

    /// An environment holding exactly these variables.
    pub fn from_pairs<I, K, V>(pairs: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A variable's value if it is set, non-empty and valid UTF-8.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_os(key)
            .and_then(OsStr::to_str)
            .filter(|v| !v.is_empty())
    }

    /// A variable's raw value if it is set.
    pub fn get_os(&self, key: &str) -> Option<&OsStr> {
        self.vars.get(OsStr::new(key)).map(OsString::as_os_str)
    }

    /// A variable's value as a path, if set and non-empty.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        self.get_os(key)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }

    /// Sets a variable (for building environments in tests and for child processes).
    pub fn set(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) {
        self.vars.insert(key.into(), value.into());
    }

    /// Removes a variable.
    pub fn remove(&mut self, key: &str) {
        self.vars.remove(OsStr::new(key));
    }

    /// The home folder from `HOME`.
    pub fn home(&self) -> Option<PathBuf> {
        self.path("HOME")
    }

    /// Every variable, for handing to a child process.
    pub fn iter(&self) -> impl Iterator<Item = (&OsStr, &OsStr)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.as_os_str(), v.as_os_str()))
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_names_not_values() {
        let env = Env::from_pairs([("PGPASSWORD", "hunter2-secret")]);
        let shown = format!("{env:?}");
        assert!(shown.contains("PGPASSWORD"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let env = Env::from_pairs([("A", ""), ("B", "x")]);
        assert_eq!(env.get("A"), None);
        assert_eq!(env.get("B"), Some("x"));
        assert_eq!(env.path("A"), None);
    }
}
