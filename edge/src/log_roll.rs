//! A log file that rolls by size, as Caddy's `output file` does (lumberjack's rules): when
//! the next write would take the file past `size`, it is renamed to
//! `NAME-YYYY-MM-DDTHH-MM-SS.mmm.EXT` (UTC, or local time with `roll_local_time`) and a new
//! file is opened; then rolled files beyond `keep`, or older than `keep_for`, are removed.
//!
//! Invariant: a roll happens only between two writes, and a write is whole lines (the access
//! log writer hands over whole lines only), so a line is never split across two files and
//! none is lost at a roll. Unlike Caddy, rolled files are not gzipped.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How a file rolls (Caddy's `roll_*` options, resolved).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Roll {
    /// Roll before the file would pass this many bytes. Caddy's default: 100 MiB.
    pub(crate) size: u64,
    /// Rolled files kept. Default 10.
    pub(crate) keep: usize,
    /// Rolled files older than this are removed. Default 90 days.
    pub(crate) keep_for: Duration,
    /// Name rolled files by local time, not UTC.
    pub(crate) local_time: bool,
}

impl Default for Roll {
    fn default() -> Roll {
        Roll {
            size: 100 << 20,
            keep: 10,
            keep_for: Duration::from_secs(90 * 24 * 3600),
            local_time: false,
        }
    }
}

/// Parses a size as Caddy's `roll_size` reads it ("10MB", "1GiB", "500KB", "1048576"),
/// rounded up to whole MiB as Caddy does.
pub(crate) fn parse_roll_size(text: &str) -> Option<u64> {
    let digits = text
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, unit) = text.split_at(digits);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "kib" | "ki" => 1024.0,
        "mb" | "m" => 1e6,
        "mib" | "mi" => 1024.0 * 1024.0,
        "gb" | "g" => 1e9,
        "gib" | "gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes <= 0.0 {
        return None;
    }
    let mib = (bytes / (1024.0 * 1024.0)).ceil() as u64;
    Some(mib.max(1) << 20)
}

/// An open log file that rolls.
#[derive(Debug)]
pub(crate) struct RollingFile {
    path: PathBuf,
    roll: Roll,
    file: File,
    size: u64,
    /// The name of the last file rolled, which the next must sort after.
    last: Option<String>,
}

impl RollingFile {
    /// Opens (appends to) `path`, making its folder if needed.
    pub(crate) fn open(path: &Path, roll: Roll) -> io::Result<RollingFile> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RollingFile {
            path: path.to_owned(),
            roll,
            file,
            size,
            last: None,
        })
    }

    /// Writes `lines` (whole lines), rolling first if they would not fit.
    pub(crate) fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + lines.len() as u64 > self.roll.size {
            self.roll_now()?;
        }
        self.file.write_all(lines)?;
        self.size += lines.len() as u64;
        Ok(())
    }

    fn roll_now(&mut self) -> io::Result<()> {
        let rolled = self.rolled_name(SystemTime::now());
        std::fs::rename(&self.path, &rolled)?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        if let Err(err) = self.prune() {
            tracing::warn!(path = %self.path.display(), error = %err, "removing old rolled log files failed");
        }
        Ok(())
    }

    /// `NAME-TIME.EXT` next to the file; a name taken already, or sorting before the last
    /// one rolled (several rolls in one millisecond), moves on by a millisecond, so names
    /// sort in the order the files rolled.
    fn rolled_name(&mut self, at: SystemTime) -> PathBuf {
        let (stem, ext) = stem_ext(&self.path);
        let mut at = at;
        loop {
            let stamp = timestamp(at, self.roll.local_time);
            let name = format!("{stem}-{stamp}{ext}");
            let candidate = self.path.with_file_name(&name);
            if !candidate.exists() && self.last.as_ref().is_none_or(|last| name > *last) {
                self.last = Some(name);
                return candidate;
            }
            at += Duration::from_millis(1);
        }
    }

    /// Removes rolled files beyond `keep` (oldest first) and older than `keep_for`.
    fn prune(&self) -> io::Result<()> {
        let (stem, ext) = stem_ext(&self.path);
        let prefix = format!("{stem}-");
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut rolled: Vec<(String, SystemTime, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(&ext) && entry.path() != self.path {
                let modified = entry.metadata()?.modified()?;
                rolled.push((name.into_owned(), modified, entry.path()));
            }
        }
        // Newest first: the names hold the time of the roll.
        rolled.sort_by(|a, b| b.0.cmp(&a.0));
        let now = SystemTime::now();
        for (i, (_, modified, path)) in rolled.iter().enumerate() {
            let too_old = now
                .duration_since(*modified)
                .is_ok_and(|age| age > self.roll.keep_for);
            if i >= self.roll.keep || too_old {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The file name without its extension, and the extension with its dot ("" if none).
fn stem_ext(path: &Path) -> (String, String) {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (stem, ext)
}

/// `2006-01-02T15-04-05.000` for `at`, in UTC or the system's time zone.
fn timestamp(at: SystemTime, local: bool) -> String {
    let Ok(ts) = jiff::Timestamp::try_from(at) else {
        return "0000-00-00T00-00-00.000".into();
    };
    let zone = if local {
        jiff::tz::TimeZone::system()
    } else {
        jiff::tz::TimeZone::UTC
    };
    ts.to_zoned(zone)
        .strftime("%Y-%m-%dT%H-%M-%S.%3f")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roll_sizes_read_like_caddys_in_whole_mebibytes() {
        assert_eq!(parse_roll_size("10MB"), Some(10 << 20));
        assert_eq!(parse_roll_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_roll_size("1.5GiB"), Some(1536 << 20));
        assert_eq!(parse_roll_size("1"), Some(1 << 20));
        assert_eq!(parse_roll_size("lots"), None);
        assert_eq!(parse_roll_size("0MB"), None);
    }

    #[test]
    fn a_file_rolls_between_lines_and_keeps_only_roll_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/access.log");
        let roll = Roll {
            size: 100,
            keep: 2,
            ..Roll::default()
        };
        let mut file = RollingFile::open(&path, roll).unwrap();
        let mut written = Vec::new();
        for i in 0..40 {
            let line = format!("line {i:04} of the access log\n");
            file.write_lines(line.as_bytes()).unwrap();
            written.push(line);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 3, "the live file and two rolled: {files:?}");
        let mut kept = String::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.len() <= 100, "{f:?} is {} bytes", text.len());
            assert!(text.ends_with('\n'), "{f:?} ends mid-line");
            if f != &path {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    name.starts_with("access-") && name.ends_with(".log"),
                    "{name}"
                );
                kept.push_str(&text);
            }
        }
        kept.push_str(&std::fs::read_to_string(&path).unwrap());
        // The newest lines, whole and in order, with nothing lost between the files kept.
        let tail: String = written[written.len() - kept.lines().count()..].concat();
        assert_eq!(kept, tail);
    }
}
