//! Folder sources: a tar stream of a folder, extracting one safely, and checking an extracted
//! copy against the manifest.
//!
//! Entries are written in sorted order with their permission bits, owners and modification
//! times, so a restore gives back the same tree; sockets, FIFOs and devices are skipped with a
//! warning. Each file's SHA-256 is computed as it streams into the archive and recorded in the
//! manifest, which is what `verify` compares an extracted copy with. A file that shrinks while
//! it is read is padded to the size in its header (and reported), so the archive stays valid.
//!
//! Extraction runs as root on bytes from a store, so it trusts no path in them: everything is
//! created below a descriptor of the target, never through a symlink, and nothing outside the
//! target is ever opened for writing or has its mode, owner or time changed (see [`extract`]).

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use labcore::{Exit, ExitStatus};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, UtimensatFlags, fchmod, futimens, mkdirat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, symlinkat};

use crate::catalog::FileEntry;
use crate::pipeline::Hashing;

/// Paths left out of a folder backup.
pub struct Excludes {
    /// Patterns matched against the path relative to the folder (they contain a `/`).
    paths: Vec<(GlobMatcher, bool)>,
    /// Patterns matched against the entry's name at any depth.
    names: Vec<(GlobMatcher, bool)>,
}

impl Excludes {
    /// Compiles patterns: `*.tmp` matches names at any depth, `cache/tmp` a relative path, and
    /// a trailing `/` matches folders only.
    pub fn new(patterns: &[String]) -> Result<Excludes, globset::Error> {
        let mut excludes = Excludes {
            paths: Vec::new(),
            names: Vec::new(),
        };
        for pattern in patterns {
            let dirs_only = pattern.ends_with('/');
            let trimmed = pattern.trim_end_matches('/').trim_start_matches("./");
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .build()?
                .compile_matcher();
            if trimmed.contains('/') {
                excludes.paths.push((glob, dirs_only));
            } else {
                excludes.names.push((glob, dirs_only));
            }
        }
        Ok(excludes)
    }

    fn excluded(&self, relative: &Path, is_dir: bool) -> bool {
        let name = relative.file_name().map(Path::new).unwrap_or(relative);
        let hit = |list: &[(GlobMatcher, bool)], path: &Path| {
            list.iter()
                .any(|(glob, dirs_only)| (!dirs_only || is_dir) && glob.is_match(path))
        };
        hit(&self.paths, relative) || hit(&self.names, name)
    }
}

/// Why a folder could not be archived or checked.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct ArchiveError {
    /// What was being done.
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What the OS said.
    pub source: io::Error,
}

impl ExitStatus for ArchiveError {
    fn exit(&self) -> Exit {
        match self.source.kind() {
            // A refused entry, or a tar stream that does not parse: the backup is bad.
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => Exit::DataErr,
            _ => Exit::from_io(&self.source),
        }
    }
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + use<> {
    let path = path.to_owned();
    move |source| ArchiveError { what, path, source }
}

/// Writes `root` as a tar stream into `out`; returns the entries written.
pub fn write_tar<W: Write>(
    root: &Path,
    excludes: &Excludes,
    out: W,
) -> Result<(Vec<FileEntry>, W), ArchiveError> {
    let meta = fs::metadata(root).map_err(err("reading folder", root))?;
    if !meta.is_dir() {
        return Err(ArchiveError {
            what: "backing up",
            path: root.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a folder"),
        });
    }
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut entries = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let full_dir = root.join(&dir);
        let mut children: Vec<_> = fs::read_dir(&full_dir)
            .map_err(err("listing", &full_dir))?
            .collect::<Result<_, _>>()
            .map_err(err("listing", &full_dir))?;
        children.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for child in children {
            let relative = dir.join(child.file_name());
            let full = root.join(&relative);
            let meta = fs::symlink_metadata(&full).map_err(err("reading", &full))?;
            let kind = meta.file_type();
            if excludes.excluded(&relative, kind.is_dir()) {
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let mut entry = FileEntry {
                path: relative.to_string_lossy().into_owned(),
                kind: String::new(),
                mode: meta.permissions().mode() & 0o7777,
                mtime: meta.mtime(),
                size: 0,
                sha256: None,
                link: None,
            };
            if kind.is_dir() {
                entry.kind = "dir".into();
                header.set_size(0);
                builder
                    .append_data(&mut header, &relative, io::empty())
                    .map_err(err("archiving", &full))?;
                subdirs.push(relative);
            } else if kind.is_symlink() {
                let target = fs::read_link(&full).map_err(err("reading link", &full))?;
                entry.kind = "symlink".into();
                entry.link = Some(target.to_string_lossy().into_owned());
                builder
                    .append_link(&mut header, &relative, &target)
                    .map_err(err("archiving", &full))?;
            } else if kind.is_file() {
                let file = File::open(&full).map_err(err("opening", &full))?;
                let size = meta.len();
                let mut reader = Hashing::new(Exact::new(file, size, &full));
                builder
                    .append_data(&mut header, &relative, &mut reader)
                    .map_err(err("archiving", &full))?;
                let (_, sha256) = reader.finish();
                entry.kind = "file".into();
                entry.size = size;
                entry.sha256 = Some(sha256);
            } else {
                tracing::warn!(path = %full.display(), "skipping a socket, FIFO or device file");
                continue;
            }
            entries.push(entry);
        }
        // Depth first in sorted order: push in reverse so the first sorts pops first.
        pending.extend(subdirs.into_iter().rev());
    }
    let out = builder
        .into_inner()
        .map_err(err("finishing the archive of", root))?;
    Ok((entries, out))
}

/// Reads exactly `size` bytes: stops early at `size` and pads with zeros if the file shrank.
struct Exact<R> {
    inner: R,
    left: u64,
    shrank: bool,
    path: PathBuf,
}

impl<R> Exact<R> {
    fn new(inner: R, size: u64, path: &Path) -> Exact<R> {
        Exact {
            inner,
            left: size,
            shrank: false,
            path: path.to_owned(),
        }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = if self.shrank {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            if !self.shrank {
                tracing::warn!(path = %self.path.display(), "file shrank while it was archived; padded with zeros");
                self.shrank = true;
            }
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// A folder whose owner, mode and time are applied after everything inside it was extracted.
struct DeferredDir {
    parts: Vec<OsString>,
    mode: u32,
    mtime: u64,
    owner: Option<(u32, u32)>,
}

/// Refuses an entry of the archive: the restore fails as bad data.
fn refuse(path: &Path, why: impl Into<String>) -> ArchiveError {
    ArchiveError {
        what: "refusing the archive entry",
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, why.into()),
    }
}

fn nix_err(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> ArchiveError + use<> {
    let path = path.to_owned();
    move |e| ArchiveError {
        what,
        path,
        source: e.into(),
    }
}

/// The parts of an entry's path: only plain names; `.` is skipped, and absolute paths, `..`
/// and empty paths are refused, so every entry stays inside the target by construction.
fn parts(path: &Path) -> Result<Vec<OsString>, ArchiveError> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse(path, "the path has a .. component")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(path, "the path is absolute"));
            }
        }
    }
    if parts.is_empty() {
        return Err(refuse(path, "the path is empty"));
    }
    Ok(parts)
}

/// Opens the folder at `parts` below `root`, one component at a time with `O_NOFOLLOW`, so a
/// symlink anywhere on the way (one the archive itself made, say) is an error, never a way
/// out. With `create`, missing folders are made (private until their own entry's mode is
/// applied).
fn open_dir(
    root: &OwnedFd,
    parts: &[OsString],
    create: bool,
    entry: &Path,
) -> Result<OwnedFd, ArchiveError> {
    let mut current = root
        .try_clone()
        .map_err(err("opening the target of", entry))?;
    for part in parts {
        if create {
            match mkdirat(&current, part.as_os_str(), Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(nix_err("creating a folder for", entry)(e)),
            }
        }
        current = openat(
            &current,
            part.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => refuse(
                entry,
                format!(
                    "{} is a symlink or a file, not a folder",
                    Path::new(part).display()
                ),
            ),
            other => nix_err("opening a folder for", entry)(other),
        })?;
    }
    Ok(current)
}

fn timespec(mtime: u64) -> TimeSpec {
    TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0)
}

/// Extracts a tar stream into the folder `dest`, keeping modes, times and, as root, owners.
///
/// Every path is resolved below a descriptor of `dest`, one component at a time with
/// `O_NOFOLLOW`: entries with absolute paths or `..` are refused, and so is any entry whose way
/// passes through a symlink, so a symlink the archive contains is restored as a symlink and
/// never followed by a later entry. Files are created with `O_EXCL`, owners, modes and times
/// are applied through the descriptor of what was created (or, for symlinks, with
/// `AT_SYMLINK_NOFOLLOW`). Folders get theirs last, deepest first, so files written into them
/// (or a read-only mode) do not undo that. Only folders, regular files and symlinks are
/// accepted: backupd writes nothing else.
pub fn extract<R: Read>(input: R, dest: &Path) -> Result<(), ArchiveError> {
    let as_root = nix::unistd::Uid::effective().is_root();
    let root = nix::fcntl::open(
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_err("opening", dest))?;
    let mut archive = tar::Archive::new(input);
    let mut dirs: Vec<DeferredDir> = Vec::new();
    for entry in archive
        .entries()
        .map_err(err("reading the archive for", dest))?
    {
        let mut entry = entry.map_err(err("reading the archive for", dest))?;
        let relative = entry
            .path()
            .map_err(err("reading an entry path in", dest))?
            .into_owned();
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header
            .mode()
            .map_err(err("reading the mode of", &relative))?
            & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let owner = match (as_root, header.uid(), header.gid()) {
            (true, Ok(uid), Ok(gid)) => Some((
                u32::try_from(uid).map_err(|_| refuse(&relative, "the owner is out of range"))?,
                u32::try_from(gid).map_err(|_| refuse(&relative, "the group is out of range"))?,
            )),
            _ => None,
        };
        let parts = parts(&relative)?;
        let (name, parents) = parts.split_last().expect("parts() is never empty");
        let parent = open_dir(&root, parents, true, &relative)?;
        let time = timespec(mtime);
        if kind.is_dir() {
            // Opening it checks that what is there (made by an earlier entry) is a folder.
            drop(open_dir(
                &parent,
                std::slice::from_ref(name),
                true,
                &relative,
            )?);
            dirs.push(DeferredDir {
                parts,
                mode,
                mtime,
                owner,
            });
        } else if kind.is_file() || kind.is_contiguous() {
            let fd = openat(
                &parent,
                name.as_os_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| match e {
                Errno::EEXIST => refuse(&relative, "the archive holds this path twice"),
                other => nix_err("creating", &relative)(other),
            })?;
            let mut file = File::from(fd);
            io::copy(&mut entry, &mut file).map_err(err("extracting", &relative))?;
            if let Some((uid, gid)) = owner {
                fchown(&file, Some(uid.into()), Some(gid.into()))
                    .map_err(nix_err("setting the owner of", &relative))?;
            }
            // After the owner: chown clears set-user-ID and set-group-ID bits.
            fchmod(&file, Mode::from_bits_truncate(mode))
                .map_err(nix_err("setting the mode of", &relative))?;
            futimens(&file, &time, &time).map_err(nix_err("setting the time of", &relative))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(err("reading the link of", &relative))?
                .ok_or_else(|| refuse(&relative, "a symlink without a target"))?;
            symlinkat(&*target, &parent, name.as_os_str()).map_err(|e| match e {
                Errno::EEXIST => refuse(&relative, "the archive holds this path twice"),
                other => nix_err("creating the symlink", &relative)(other),
            })?;
            if let Some((uid, gid)) = owner {
                fchownat(
                    &parent,
                    name.as_os_str(),
                    Some(uid.into()),
                    Some(gid.into()),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(nix_err("setting the owner of", &relative))?;
            }
            utimensat(
                &parent,
                name.as_os_str(),
                &time,
                &time,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(nix_err("setting the time of", &relative))?;
        } else {
            return Err(refuse(
                &relative,
                format!(
                    "unsupported entry type {kind:?} (backupd archives hold only folders, files and symlinks)"
                ),
            ));
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.parts.len()));
    for DeferredDir {
        parts,
        mode,
        mtime,
        owner,
    } in dirs
    {
        let path: PathBuf = parts.iter().collect();
        let dir = open_dir(&root, &parts, false, &path)?;
        if let Some((uid, gid)) = owner {
            fchown(&dir, Some(uid.into()), Some(gid.into()))
                .map_err(nix_err("setting the owner of", &path))?;
        }
        fchmod(&dir, Mode::from_bits_truncate(mode))
            .map_err(nix_err("setting the mode of", &path))?;
        let time = timespec(mtime);
        futimens(&dir, &time, &time).map_err(nix_err("setting the time of", &path))?;
    }
    Ok(())
}

/// Compares an extracted tree with the manifest's entries; returns the first differences.
pub fn compare(root: &Path, entries: &[FileEntry]) -> Vec<String> {
    let mut problems = Vec::new();
    for entry in entries {
        if problems.len() >= 10 {
            problems.push("...".into());
            break;
        }
        let path = root.join(&entry.path);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) => {
                problems.push(format!("{}: {e}", entry.path));
                continue;
            }
        };
        let kind = match meta.file_type() {
            t if t.is_dir() => "dir",
            t if t.is_symlink() => "symlink",
            t if t.is_file() => "file",
            _ => "other",
        };
        if kind != entry.kind {
            problems.push(format!("{}: is a {kind}, was a {}", entry.path, entry.kind));
            continue;
        }
        if kind != "symlink" && meta.permissions().mode() & 0o7777 != entry.mode {
            problems.push(format!(
                "{}: mode {:o}, was {:o}",
                entry.path,
                meta.permissions().mode() & 0o7777,
                entry.mode
            ));
        }
        if kind != "symlink" && meta.mtime() != entry.mtime {
            problems.push(format!(
                "{}: mtime {}, was {}",
                entry.path,
                meta.mtime(),
                entry.mtime
            ));
        }
        if kind == "file" {
            match File::open(&path).map(Hashing::new) {
                Ok(mut reader) => {
                    let copied = io::copy(&mut reader, &mut io::sink());
                    let (size, sha256) = reader.finish();
                    if copied.is_err()
                        || size != entry.size
                        || Some(&sha256) != entry.sha256.as_ref()
                    {
                        problems.push(format!(
                            "{}: content differs ({size} bytes, sha256 {sha256})",
                            entry.path
                        ));
                    }
                }
                Err(e) => problems.push(format!("{}: {e}", entry.path)),
            }
        }
        if kind == "symlink" {
            let target = fs::read_link(&path)
                .map(|t| t.to_string_lossy().into_owned())
                .ok();
            if target != entry.link {
                problems.push(format!(
                    "{}: links to {target:?}, was {:?}",
                    entry.path, entry.link
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn a_folder_round_trips_with_modes_times_and_links() {
        let src = tempfile::tempdir().unwrap();
        let root = src.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/data.bin"), vec![9u8; 70_000]).unwrap();
        fs::write(root.join("top.txt"), "hello").unwrap();
        fs::write(root.join("skip.tmp"), "x").unwrap();
        fs::create_dir(root.join("cache")).unwrap();
        fs::write(root.join("cache/big"), "x").unwrap();
        fs::set_permissions(root.join("top.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("top.txt", root.join("link")).unwrap();
        let old = filetime(1_600_000_000);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &root.join("a/b/data.bin"),
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let excludes = Excludes::new(&["*.tmp".into(), "cache/".into()]).unwrap();
        let (entries, tar) = write_tar(root, &excludes, Vec::new()).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "link", "top.txt", "a/b", "a/b/data.bin"]);

        let dest = tempfile::tempdir().unwrap();
        extract(&tar[..], dest.path()).unwrap();
        assert!(
            compare(dest.path(), &entries).is_empty(),
            "{:?}",
            compare(dest.path(), &entries)
        );
        let data = fs::metadata(dest.path().join("a/b/data.bin")).unwrap();
        assert_eq!(data.mtime(), 1_600_000_000);

        fs::write(dest.path().join("top.txt"), "changed").unwrap();
        let problems = compare(dest.path(), &entries);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("top.txt: content differs")),
            "{problems:?}"
        );
    }

    /// A tar written header by header, paths and link targets raw (the tar crate's setters
    /// refuse `..` and absolute paths, which are what these tests send).
    fn raw_tar(entries: &[(String, tar::EntryType, String)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut header = tar::Header::new_gnu();
            let name = &mut header.as_old_mut().name;
            let n = path.len().min(name.len());
            name[..n].copy_from_slice(&path.as_bytes()[..n]);
            header.set_entry_type(*kind);
            header.set_mode(0o777);
            header.set_mtime(1_700_000_000);
            let data: &[u8] = if kind.is_file() { b"owned" } else { b"" };
            header.set_size(data.len() as u64);
            header.set_link_name_literal(link).unwrap();
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// Everything under `root` with its mode and content, for before/after comparisons.
    fn snapshot(root: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pending = vec![root.to_owned()];
        while let Some(path) = pending.pop() {
            let meta = fs::symlink_metadata(&path).unwrap();
            let content = if meta.is_dir() {
                let mut children: Vec<_> = fs::read_dir(&path)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                children.sort();
                pending.extend(children);
                Vec::new()
            } else if meta.is_file() {
                fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            out.push((path, meta.mode(), content));
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Whatever the entries (`..`, absolute paths, symlinks out and paths through them),
        /// nothing outside the target changes.
        #[test]
        fn no_archive_changes_anything_outside_the_target(
            entries in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        proptest::sample::select(vec!["a", "b", "..", ".", "x", "OUT"]),
                        1..4,
                    ),
                    proptest::sample::select(vec![
                        tar::EntryType::Directory,
                        tar::EntryType::Regular,
                        tar::EntryType::Symlink,
                    ]),
                    proptest::sample::select(vec!["OUT", "..", "a", "../outside"]),
                ),
                1..8,
            )
        ) {
            let scratch = tempfile::tempdir().unwrap();
            let outside = scratch.path().join("outside");
            fs::create_dir(&outside).unwrap();
            fs::set_permissions(&outside, fs::Permissions::from_mode(0o750)).unwrap();
            fs::write(outside.join("keep"), "kept").unwrap();
            let dest = scratch.path().join("dest");
            fs::create_dir(&dest).unwrap();
            let out = outside.to_str().unwrap();
            let entries: Vec<(String, tar::EntryType, String)> = entries
                .into_iter()
                .map(|(parts, kind, link)| {
                    let path = parts.join("/").replace("OUT", out);
                    let link = if kind.is_symlink() { link.replace("OUT", out) } else { String::new() };
                    (path, kind, link)
                })
                .collect();
            let before = snapshot(scratch.path());
            let _ = extract(&raw_tar(&entries)[..], &dest);
            let after: Vec<_> = snapshot(scratch.path())
                .into_iter()
                .filter(|(p, _, _)| p == &dest || !p.starts_with(&dest))
                .collect();
            let before: Vec<_> = before
                .into_iter()
                .filter(|(p, _, _)| p == &dest || !p.starts_with(&dest))
                .collect();
            proptest::prop_assert_eq!(after, before, "{:?}", entries);
        }
    }

    #[test]
    fn a_symlink_in_the_archive_is_restored_but_never_followed() {
        let scratch = tempfile::tempdir().unwrap();
        let outside = scratch.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = scratch.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let out = outside.to_str().unwrap().to_owned();
        let link = [("x".to_owned(), tar::EntryType::Symlink, out.clone())];
        extract(&raw_tar(&link)[..], &dest).unwrap();
        assert_eq!(fs::read_link(dest.join("x")).unwrap(), outside);
        for through in [
            ("x/".to_owned(), tar::EntryType::Directory),
            ("x/planted".to_owned(), tar::EntryType::Regular),
        ] {
            let dest = scratch.path().join(format!("dest-{}", through.0.len()));
            fs::create_dir(&dest).unwrap();
            let entries = [link[0].clone(), (through.0, through.1, String::new())];
            let err = extract(&raw_tar(&entries)[..], &dest).unwrap_err();
            assert_eq!(err.exit(), Exit::DataErr, "{err}");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    fn filetime(secs: i64) -> nix::sys::time::TimeSpec {
        nix::sys::time::TimeSpec::new(secs, 0)
    }

    #[test]
    fn path_patterns_match_paths_and_name_patterns_match_anywhere() {
        let excludes = Excludes::new(&["*.log".into(), "var/cache".into(), "tmp/".into()]).unwrap();
        assert!(excludes.excluded(Path::new("deep/down/x.log"), false));
        assert!(excludes.excluded(Path::new("var/cache"), true));
        assert!(!excludes.excluded(Path::new("other/var/cache"), true));
        assert!(excludes.excluded(Path::new("a/tmp"), true));
        assert!(
            !excludes.excluded(Path::new("a/tmp"), false),
            "tmp/ matches folders only"
        );
    }
}
