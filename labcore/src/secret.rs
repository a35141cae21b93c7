//! Secrets: tokens, passwords and keys that must never reach a log, an error message or argv.
//!
//! [`Secret`] prints as `[redacted]` in `Debug`, `Display` and serde output, compares in
//! constant time and wipes its memory when dropped. Secrets reach a tool inline in its config,
//! from a file (`*_file` keys) or from a systemd credential (`$CREDENTIALS_DIRECTORY/NAME`);
//! [`read_file`] and [`credential`] read the latter two and warn about files others can read.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::env::Env;

const REDACTED: &str = "[redacted]";

/// A secret string. Its value is reachable only through [`Secret::expose`].
#[derive(Clone, Default)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value; the caller's copy is moved in, not duplicated.
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// The secret itself: only for the place that sends or hashes it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison with raw bytes (the time depends on lengths only).
    pub fn ct_eq_bytes(&self, other: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(other).into()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret::new(value.to_owned())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.ct_eq_bytes(other.as_bytes())
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Reads a secret from a file, dropping one trailing newline; warns when group or others can
/// read the file.
pub fn read_file(path: &Path) -> io::Result<Secret> {
    let meta = fs::metadata(path)?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:04o}", mode & 0o7777),
            "secret file is readable by group or others; chmod 600 it"
        );
    }
    let mut text = Zeroizing::new(fs::read_to_string(path)?);
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(Secret::new(std::mem::take(&mut *text)))
}

/// The ID labkit's units load their credentials folder under: systemd names each file `F` of a
/// folder loaded with `LoadCredential=labkit:/etc/labkit/credentials/UNIT` credential `labkit_F`.
pub const UNIT_CREDENTIALS: &str = "labkit";

/// The path of systemd credential `name` (or, when only that exists, of `labkit_NAME`: a file
/// `NAME` in the folder a unit loads as [`UNIT_CREDENTIALS`]), when the process runs with
/// `$CREDENTIALS_DIRECTORY`.
pub fn credential_path(env: &Env, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    let dir = env.path("CREDENTIALS_DIRECTORY")?;
    let plain = dir.join(name);
    let in_folder = dir.join(format!("{UNIT_CREDENTIALS}_{name}"));
    Some(if !plain.exists() && in_folder.exists() {
        in_folder
    } else {
        plain
    })
}

/// Reads systemd credential `name` (see [`credential_path`]) if the service was given it.
pub fn credential(env: &Env, name: &str) -> io::Result<Option<Secret>> {
    match credential_path(env, name) {
        Some(path) if path.exists() => read_file(&path).map(Some),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_everywhere_it_could_be_printed() {
        let secret = Secret::from("s3cr3t-token");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{:#?}", Some(&secret)), "Some(\n    [redacted],\n)");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"[redacted]\"");
        assert_eq!(secret.expose(), "s3cr3t-token");
    }

    #[test]
    fn secrets_compare_by_value() {
        assert_eq!(Secret::from("abc"), Secret::from("abc"));
        assert_ne!(Secret::from("abc"), Secret::from("abd"));
        assert_ne!(Secret::from("abc"), Secret::from("abcd"));
        assert!(Secret::from("abc").ct_eq_bytes(b"abc"));
    }

    #[test]
    fn secret_file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "tok\n\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_file(&path).unwrap().expose(), "tok\n");
        fs::write(&path, "tok\r\n").unwrap();
        assert_eq!(read_file(&path).unwrap().expose(), "tok");
    }

    #[test]
    fn credentials_come_from_the_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("web.token"), "from-systemd").unwrap();
        let env = Env::from_pairs([("CREDENTIALS_DIRECTORY", dir.path())]);
        let found = credential(&env, "web.token").unwrap().unwrap();
        assert_eq!(found.expose(), "from-systemd");
        assert!(credential(&env, "absent").unwrap().is_none());
        assert!(credential(&env, "../etc/passwd").unwrap().is_none());
        assert!(credential(&Env::default(), "web.token").unwrap().is_none());
    }

    #[test]
    fn a_units_credentials_folder_is_found_under_the_labkit_prefix() {
        // LoadCredential=labkit:/etc/labkit/credentials/tunnel-server with a file
        // server.services.ssh.token in that folder gives labkit_server.services.ssh.token.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("labkit_server.services.ssh.token");
        fs::write(&file, "from-a-folder").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let env = Env::from_pairs([("CREDENTIALS_DIRECTORY", dir.path())]);
        let found = credential(&env, "server.services.ssh.token")
            .unwrap()
            .unwrap();
        assert_eq!(found.expose(), "from-a-folder");
        // A credential loaded by its own name wins over the folder's.
        fs::write(dir.path().join("server.services.ssh.token"), "by-name").unwrap();
        let found = credential(&env, "server.services.ssh.token")
            .unwrap()
            .unwrap();
        assert_eq!(found.expose(), "by-name");
        assert!(
            credential(&env, "server.services.web.token")
                .unwrap()
                .is_none()
        );
    }
}
