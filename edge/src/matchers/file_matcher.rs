//! The `file` matcher: `file [FILES...] { root PATH; try_files FILES...; try_policy POLICY;
//! split_path EXT... }`, matching when a candidate exists under the root, as Caddy 2.6's.
//!
//! Each candidate is rendered (placeholders' values with glob characters escaped, so only the
//! operator's own globs expand), cleaned, cut after the first `split_path` extension, joined
//! under the root as Caddy's `SanitizedPathJoin` does, then globbed. `first_exist` takes the
//! first that exists (a candidate ending in `/` must be a folder, any other a file);
//! `smallest_size`, `largest_size` and `most_recently_modified` look at all of them. The one
//! chosen fills `{file_match.relative}`, `.absolute`, `.type` and `.remainder` in the
//! request's [`Cx`].
//!
//! Invariants: no candidate leaves the root by name, whatever the request or a placeholder
//! holds (`..` is resolved as if at the root before the join; `%2e%2e` is decoded first);
//! `{path}`, `{dir}` and `{file}` are the decoded, cleaned request path. Symlinks inside the
//! root are followed, as in Caddy. `=CODE` candidates are `try_files`' own and refused here.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::context::{Cx, FileMatched, Req};
use crate::files::{clean, first_split, glob, glob_escape, join};
use crate::placeholders::Template;

/// `file` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileToml {
    /// The folder; default the site's `root`, or the working folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) root: Option<String>,
    /// Candidates; default `{path}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) try_files: Vec<String>,
    /// first_exist (default), smallest_size, largest_size, most_recently_modified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) try_policy: Option<String>,
    /// Extensions after which a path is cut (".php").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) split_path: Vec<String>,
}

impl FileToml {
    /// Adds a Caddyfile `file` line: its arguments are candidates, its block the options.
    pub(crate) fn add_line(
        &mut self,
        args: &[String],
        block: Option<&[Vec<String>]>,
    ) -> Result<(), String> {
        self.try_files.extend(args.iter().cloned());
        for line in block.unwrap_or_default() {
            let Some((option, values)) = line.split_first() else {
                continue;
            };
            match (option.as_str(), values) {
                ("root", [root]) => self.root = Some(root.clone()),
                ("try_files", [_, ..]) => self.try_files.extend(values.iter().cloned()),
                ("try_policy", [policy]) => self.try_policy = Some(policy.clone()),
                ("split_path", [_, ..]) => self.split_path = values.to_vec(),
                ("root" | "try_files" | "try_policy" | "split_path", _) => {
                    return Err(format!("file: {option} needs an argument"));
                }
                (other, _) => return Err(format!("file: option {other:?} is not supported")),
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Policy {
    FirstExist,
    Smallest,
    Largest,
    Newest,
}

/// Marks for the request path's parts in a candidate, filled in after rendering.
const PATH: &str = "\u{1}p\u{1}";
const DIR: &str = "\u{1}d\u{1}";
const FILE: &str = "\u{1}f\u{1}";

/// A compiled `file` matcher.
#[derive(Debug, Clone)]
pub(crate) struct FileMatcher {
    root: Option<Template>,
    candidates: Vec<(Template, bool)>,
    policy: Policy,
    split: Vec<String>,
}

impl FileMatcher {
    /// Compiles `toml`.
    pub(crate) fn build(toml: &FileToml, env: &labcore::Env) -> Result<FileMatcher, String> {
        let policy = match toml.try_policy.as_deref() {
            None | Some("first_exist") => Policy::FirstExist,
            Some("smallest_size") => Policy::Smallest,
            Some("largest_size") => Policy::Largest,
            Some("most_recently_modified") => Policy::Newest,
            Some(other) => return Err(format!("file: try_policy {other:?} is not known")),
        };
        let patterns = if toml.try_files.is_empty() {
            vec!["{path}".to_owned()]
        } else {
            toml.try_files.clone()
        };
        let mut candidates = Vec::with_capacity(patterns.len());
        for pattern in &patterns {
            if pattern.starts_with('=') && pattern[1..].parse::<u16>().is_ok() {
                return Err(format!(
                    "file: {pattern:?}: a status in the file matcher is not supported (write it in try_files)"
                ));
            }
            let marked = pattern
                .replace("{http.request.uri.path.dir}", DIR)
                .replace("{http.request.uri.path.file}", FILE)
                .replace("{http.request.uri.path}", PATH)
                .replace("{dir}", DIR)
                .replace("{file}", FILE)
                .replace("{path}", PATH);
            candidates.push((Template::parse(&marked, env)?, pattern.ends_with('/')));
        }
        let root = match &toml.root {
            Some(r) => Some(Template::parse(r, env)?),
            None => None,
        };
        Ok(FileMatcher {
            root,
            candidates,
            policy,
            split: toml.split_path.clone(),
        })
    }

    /// Whether a candidate exists; records what was found in `cx`.
    pub(crate) fn matches(&self, req: Req<'_>, cx: &mut Cx) -> bool {
        let root = match &self.root {
            Some(t) => t.render(req, cx),
            None => cx.var("root").unwrap_or("").to_owned(),
        };
        let root = if root.is_empty() {
            ".".to_owned()
        } else {
            root
        };
        let root = PathBuf::from(clean(&root));
        let path = String::from_utf8_lossy(cx.match_path()).into_owned();
        let (dir, file) = match path.rfind('/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => ("", path.as_str()),
        };
        let mut best: Option<(Found, std::fs::Metadata)> = None;
        for (template, wants_dir) in &self.candidates {
            let rendered = template
                .render_with(req, cx, glob_escape)
                .replace(PATH, &glob_escape(&path))
                .replace(DIR, &glob_escape(dir))
                .replace(FILE, &glob_escape(file));
            for found in self.expand(&root, &rendered, *wants_dir) {
                let Ok(meta) = std::fs::metadata(&found.full) else {
                    continue;
                };
                match self.policy {
                    Policy::FirstExist => {
                        let is_dir_path = found.full.to_string_lossy().ends_with('/');
                        if meta.is_dir() == is_dir_path {
                            cx.file_match = Some(found.record(&meta));
                            return true;
                        }
                    }
                    policy => {
                        // As Caddy compares: its smallest size starts at 0, meaning "none
                        // yet", so an empty file gives way to the next; its largest at 0.
                        let better = match (&best, policy) {
                            (None, Policy::Largest) => meta.len() > 0,
                            (None, _) => true,
                            (Some((_, b)), Policy::Smallest) => {
                                b.len() == 0 || meta.len() < b.len()
                            }
                            (Some((_, b)), Policy::Largest) => meta.len() > b.len(),
                            (Some((_, b)), _) => modified(&meta) > modified(b),
                        };
                        if better {
                            best = Some((found, meta));
                        }
                    }
                }
            }
        }
        match best {
            Some((found, meta)) => {
                cx.file_match = Some(found.record(&meta));
                true
            }
            None => false,
        }
    }

    /// The paths one rendered candidate names under `root`.
    fn expand(&self, root: &Path, rendered: &str, wants_dir: bool) -> Vec<Found> {
        let cleaned = clean(rendered);
        let (mut before, remainder) = first_split(&cleaned, &self.split);
        if wants_dir && !before.ends_with('/') {
            before.push('/');
        }
        let root_text = root.to_string_lossy().into_owned();
        glob(&join(root, &before))
            .into_iter()
            .map(|full| {
                let text = full.to_string_lossy().into_owned();
                let relative = text.strip_prefix(&root_text).unwrap_or(&text);
                let relative = if relative.starts_with('/') {
                    relative.to_owned()
                } else {
                    format!("/{relative}")
                };
                Found {
                    full,
                    relative,
                    remainder: remainder.clone(),
                }
            })
            .collect()
    }
}

fn modified(meta: &std::fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

struct Found {
    full: PathBuf,
    relative: String,
    remainder: String,
}

impl Found {
    fn record(self, meta: &std::fs::Metadata) -> FileMatched {
        FileMatched {
            absolute: self.full.to_string_lossy().into_owned(),
            relative: self.relative,
            kind: if meta.is_dir() { "directory" } else { "file" },
            remainder: self.remainder,
        }
    }
}
