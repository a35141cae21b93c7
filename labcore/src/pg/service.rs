//! The libpq connection service file: `[name]` sections of `key=value` parameters, looked up
//! in `PGSERVICEFILE` (default `~/.pg_service.conf`) and then `$PGSYSCONFDIR/pg_service.conf`
//! (default `/etc/postgresql-common`, Debian's libpq).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;

use super::PgSettingsError;
use crate::env::Env;

/// One service's parameters and the file they came from.
#[derive(Debug, Default)]
pub struct Params {
    values: BTreeMap<String, String>,
    origin: String,
}

impl Params {
    /// A parameter's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Where the values came from, for error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// The parameters of service `name`.
pub fn find(env: &Env, name: &str) -> Result<Params, PgSettingsError> {
    let user_file = env
        .path("PGSERVICEFILE")
        .or_else(|| env.home().map(|h| h.join(".pg_service.conf")));
    let system_file = env
        .path("PGSYSCONFDIR")
        .unwrap_or_else(|| PathBuf::from("/etc/postgresql-common"))
        .join("pg_service.conf");
    for path in user_file.into_iter().chain([system_file]) {
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(PgSettingsError::ServiceFile { path, source }),
        };
        if let Some(values) = section(&text, name) {
            return Ok(Params {
                values,
                origin: format!("service {name:?} in {}", path.display()),
            });
        }
    }
    Err(PgSettingsError::UnknownService(name.to_owned()))
}

fn section(text: &str, name: &str) -> Option<BTreeMap<String, String>> {
    let mut values = None::<BTreeMap<String, String>>;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if values.is_some() {
                break;
            }
            if header.trim() == name {
                values = Some(BTreeMap::new());
            }
            continue;
        }
        if let (Some(values), Some((key, value))) = (values.as_mut(), line.split_once('=')) {
            values.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    values
}
