//! The libpq password file (`~/.pgpass`, `PGPASSFILE`): `host:port:database:user:password`
//! lines, `*` matching anything, `\` escaping `:` and `\`. Like libpq, a file that group or
//! others can read is ignored (with a warning).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::secret::Secret;

/// The password for the first line matching host, port, database and user, if any.
pub fn lookup(
    path: &Path,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> io::Result<Option<Secret>> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "password file has group or world access and is ignored; chmod 600 it"
        );
        return Ok(None);
    }
    let text = Zeroizing::new(fs::read_to_string(path)?);
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some(fields) = split_fields(line) else {
            continue;
        };
        let wanted = [host, port.as_str(), db, user];
        let matches = fields[..4]
            .iter()
            .zip(wanted)
            .all(|(field, want)| field.as_str() == "*" || field.as_str() == want);
        if matches {
            return Ok(Some(Secret::new(fields[4].to_string())));
        }
    }
    Ok(None)
}

/// Splits a line into its five fields, unescaping; `None` for a malformed line.
fn split_fields(line: &str) -> Option<Vec<Zeroizing<String>>> {
    let mut fields = vec![Zeroizing::new(String::new())];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 5 => fields.push(Zeroizing::new(String::new())),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str, mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn first_matching_line_wins_with_wildcards_and_escapes() {
        let (_dir, path) = write(
            "# comment\nother:5432:*:admin:no\nlocalhost:*:*:admin:p\\:w\\\\d\n*:*:*:*:fallback\n",
            0o600,
        );
        let found = lookup(&path, "localhost", 5432, "x", "admin")
            .unwrap()
            .unwrap();
        assert_eq!(found.expose(), "p:w\\d");
        let any = lookup(&path, "db", 1, "x", "y").unwrap().unwrap();
        assert_eq!(any.expose(), "fallback");
    }

    #[test]
    fn password_may_contain_colons_after_the_fifth_field() {
        let (_dir, path) = write("h:1:d:u:a:b\n", 0o600);
        assert_eq!(
            lookup(&path, "h", 1, "d", "u").unwrap().unwrap().expose(),
            "a:b"
        );
    }

    #[test]
    fn a_world_readable_file_is_ignored() {
        let (_dir, path) = write("*:*:*:*:pw\n", 0o644);
        assert!(lookup(&path, "h", 1, "d", "u").unwrap().is_none());
    }

    #[test]
    fn a_missing_file_is_no_password() {
        assert!(
            lookup(Path::new("/nonexistent/pgpass"), "h", 1, "d", "u")
                .unwrap()
                .is_none()
        );
    }
}
