//! Loading a tool's TOML config into serde types, with errors that point at the culprit.
//!
//! Every labkit config is read the same way: the file is parsed into the tool's serde types
//! (which use `deny_unknown_fields`), and any error names the file, line, column and the dotted
//! key (`server.services.ssh.tokn`). The returned [`ConfigFile`] then helps the tool's
//! `resolve()` step: relative paths resolve against the config's folder, and secrets come from
//! the config, a `*_file` key, or a systemd credential, in that order.

use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::env::Env;
use crate::exit::{Exit, ExitStatus};
use crate::secret::{self, Secret};

/// A config file that was read: where it is, for resolving what it refers to.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    path: PathBuf,
    dir: PathBuf,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is not valid TOML, or does not match the tool's schema.
    #[error("{}:{line}:{column}: {}{message}", path.display(), key_prefix(key))]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// The dotted key the error is about, when known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value parsed but makes no sense (found by the tool's `resolve()` step).
    #[error("{}: key \"{key}\": {message}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The dotted key at fault.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A secret named by the config could not be read.
    #[error("{}: key \"{key}\": reading secret file {}", path.display(), file.display())]
    SecretFile {
        /// The config file.
        path: PathBuf,
        /// The dotted key naming the secret.
        key: String,
        /// The secret file.
        file: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

impl ConfigError {
    /// A [`ConfigError::Parse`] about the bytes `span` of `text` (read from `path`), for errors
    /// a tool finds after parsing in a value it kept as `toml::Spanned`.
    pub fn at(
        path: &Path,
        text: &str,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: &str,
    ) -> ConfigError {
        let (line, column) = span.map_or((1, 1), |s| line_column(text, s.start));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            key,
            message: message.trim().to_owned(),
        }
    }
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(key) if !key.is_empty() => format!("key \"{key}\": "),
        _ => String::new(),
    }
}

impl ExitStatus for ConfigError {
    fn exit(&self) -> Exit {
        match self {
            ConfigError::Read { source, .. } => Exit::from_io(source),
            ConfigError::SecretFile { source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                Exit::NoPerm
            }
            _ => Exit::Config,
        }
    }
}

/// Reads and parses the config file at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<(T, ConfigFile), ConfigError> {
    // The text may hold inline secrets: wipe it once parsed.
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?,
    );
    let value = parse_str(path, &text)?;
    Ok((value, ConfigFile::new(path)))
}

/// Parses config text that came from `path` (used in error messages only).
pub fn parse_str<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let parse_error = |span: Option<Range<usize>>, key: Option<String>, message: &str| {
        ConfigError::at(path, text, span, key, message)
    };
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| parse_error(e.span(), None, e.message()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let key = (key != ".").then_some(key);
        let inner = e.into_inner();
        parse_error(inner.span(), key, inner.message())
    })
}

/// 1-based line and character column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

impl ConfigFile {
    /// A config file at `path` (its folder anchors relative paths).
    pub fn new(path: &Path) -> ConfigFile {
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        ConfigFile {
            path: path.to_owned(),
            dir,
        }
    }

    /// The config file's path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder relative paths in the config resolve against.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resolves a path written in the config: absolute paths stay, relative ones join the
    /// config's folder.
    pub fn resolve_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.dir.join(path)
        }
    }

    /// An error about `key` found while resolving the config.
    pub fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Resolves the secret at dotted `key` from, in order: its inline value, the file named by
    /// `KEY_file` (relative to the config), or the systemd credential named `key`.
    /// Giving both an inline value and a file is an error.
    pub fn secret(
        &self,
        env: &Env,
        key: &str,
        inline: Option<Secret>,
        file: Option<&Path>,
    ) -> Result<Option<Secret>, ConfigError> {
        match (inline, file) {
            (Some(_), Some(_)) => Err(self.invalid(
                key,
                format!("give either {} or {}_file, not both", leaf(key), leaf(key)),
            )),
            (Some(value), None) => Ok(Some(value)),
            (None, Some(file)) => {
                let file = self.resolve_path(file);
                secret::read_file(&file)
                    .map(Some)
                    .map_err(|source| ConfigError::SecretFile {
                        path: self.path.clone(),
                        key: format!("{key}_file"),
                        file,
                        source,
                    })
            }
            (None, None) => {
                secret::credential(env, key).map_err(|source| ConfigError::SecretFile {
                    path: self.path.clone(),
                    key: key.to_owned(),
                    file: secret::credential_path(env, key).unwrap_or_default(),
                    source,
                })
            }
        }
    }
}

fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Root {
        server: Server,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Server {
        bind_addr: String,
        #[serde(default)]
        services: BTreeMap<String, Service>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Service {
        token: Option<Secret>,
        token_file: Option<PathBuf>,
        #[serde(default)]
        nodelay: bool,
    }

    fn parse(text: &str) -> Result<Root, ConfigError> {
        parse_str(Path::new("/etc/labkit/server.toml"), text)
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let text =
            "[server]\nbind_addr = \"0.0.0.0:7000\"\n\n[server.services.ssh]\ntokn = \"x\"\n";
        let err = parse(text).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with("/etc/labkit/server.toml:5:1: key \"server.services.ssh.tokn\": "),
            "{shown}"
        );
        assert!(shown.contains("unknown field `tokn`"), "{shown}");
        assert_eq!(err.exit(), Exit::Config);
    }

    #[test]
    fn wrong_type_names_the_key_and_points_at_the_value() {
        let text = "[server]\nbind_addr = \"a\"\n[server.services.web]\nnodelay = \"yes\"\n";
        let shown = parse(text).unwrap_err().to_string();
        assert!(
            shown
                .starts_with("/etc/labkit/server.toml:4:11: key \"server.services.web.nodelay\": "),
            "{shown}"
        );
        assert!(shown.contains("invalid type"), "{shown}");
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let shown = parse("[server]\nbind_addr = \n").unwrap_err().to_string();
        assert!(shown.starts_with("/etc/labkit/server.toml:2:"), "{shown}");
    }

    #[test]
    fn missing_key_is_reported() {
        let shown = parse("[server]\n").unwrap_err().to_string();
        assert!(shown.contains("missing field `bind_addr`"), "{shown}");
    }

    #[test]
    fn parse_errors_never_echo_secret_values() {
        let text = "[server]\nbind_addr = \"a\"\n[server.services.ssh]\ntoken = \"hunter2-token\"\nnodelay = 3\n";
        let err = parse(text).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        assert!(!format!("{err:?}").contains("hunter2"));
        let ok = parse(
            "[server]\nbind_addr = \"a\"\n[server.services.ssh]\ntoken = \"hunter2-token\"\n",
        )
        .unwrap();
        assert!(!format!("{ok:?}").contains("hunter2"));
    }

    #[test]
    fn a_valid_config_parses_into_its_types() {
        let text = "[server]\nbind_addr = \"0.0.0.0:7000\"\n[server.services.ssh]\ntoken = \"t\"\nnodelay = true\n[server.services.web]\ntoken_file = \"web.token\"\n";
        let root = parse(text).unwrap();
        assert_eq!(root.server.bind_addr, "0.0.0.0:7000");
        let ssh = &root.server.services["ssh"];
        assert_eq!(ssh.token.as_ref().unwrap().expose(), "t");
        assert!(ssh.nodelay);
        let web = &root.server.services["web"];
        assert_eq!(web.token_file.as_deref(), Some(Path::new("web.token")));
        assert!(web.token.is_none() && !web.nodelay);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let file = ConfigFile::new(Path::new("/etc/labkit/server.toml"));
        assert_eq!(
            file.resolve_path(Path::new("tok")),
            Path::new("/etc/labkit/tok")
        );
        assert_eq!(file.resolve_path(Path::new("/abs")), Path::new("/abs"));
        let bare = ConfigFile::new(Path::new("server.toml"));
        assert_eq!(bare.resolve_path(Path::new("tok")), Path::new("./tok"));
    }

    #[test]
    fn secrets_come_inline_from_a_file_or_a_credential() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("ssh.token");
        fs::write(&token, "from-file\n").unwrap();
        fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
        let creds = dir.path().join("creds");
        fs::create_dir(&creds).unwrap();
        fs::write(creds.join("services.web.token"), "from-cred").unwrap();
        let env = Env::from_pairs([("CREDENTIALS_DIRECTORY", &creds)]);
        let file = ConfigFile::new(&dir.path().join("server.toml"));

        let inline = file.secret(&env, "services.ssh.token", Some("inline".into()), None);
        assert_eq!(inline.unwrap().unwrap().expose(), "inline");
        let from_file = file.secret(
            &env,
            "services.ssh.token",
            None,
            Some(Path::new("ssh.token")),
        );
        assert_eq!(from_file.unwrap().unwrap().expose(), "from-file");
        let from_cred = file.secret(&env, "services.web.token", None, None);
        assert_eq!(from_cred.unwrap().unwrap().expose(), "from-cred");
        assert!(
            file.secret(&env, "services.git.token", None, None)
                .unwrap()
                .is_none()
        );

        let both = file.secret(
            &env,
            "services.ssh.token",
            Some("x".into()),
            Some(Path::new("t")),
        );
        assert!(
            both.unwrap_err()
                .to_string()
                .contains("either token or token_file")
        );
        let missing = file
            .secret(&env, "services.ssh.token", None, Some(Path::new("absent")))
            .unwrap_err();
        assert!(
            missing.to_string().contains("services.ssh.token_file"),
            "{missing}"
        );
        assert!(missing.to_string().contains("absent"));
    }

    #[test]
    fn errors_found_after_parsing_point_at_their_span() {
        let text = "[[database]]\nname = \"Bad\"\n";
        let start = text.find("\"Bad").unwrap();
        let err = ConfigError::at(
            Path::new("lab.toml"),
            text,
            Some(start..start + 5),
            Some("database[0].name".into()),
            "invalid name",
        );
        assert_eq!(
            err.to_string(),
            "lab.toml:2:8: key \"database[0].name\": invalid name"
        );
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncdé f", 8), (2, 5));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
