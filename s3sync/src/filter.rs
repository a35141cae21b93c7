//! `--include`, `--exclude` and `--exclude-from` glob rules over relative paths.
//!
//! Paths are the `/`-separated names below the transfer's root (for S3, the key below the
//! prefix). `*` and `?` stay within one path segment, `**` crosses segments, `[abc]` and `{a,b}`
//! work as in a shell. A pattern starting with `/` is anchored at the root; any other matches
//! the end of the path (`*.log` matches `a/b/c.log`). A pattern ending in `/` names folders
//! and removes everything below them. An `--include` match wins over an `--exclude` match;
//! with only `--include` patterns, everything else is left out. Rules apply to both sides of a
//! sync, so an excluded destination file is never deleted.

use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::error::Error;

/// Which paths take part.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    include: GlobSet,
    exclude: GlobSet,
    exclude_dirs: GlobSet,
    only_included: bool,
}

impl Default for Filter {
    fn default() -> Filter {
        Filter {
            include: GlobSet::empty(),
            exclude: GlobSet::empty(),
            exclude_dirs: GlobSet::empty(),
            only_included: false,
        }
    }
}

impl Filter {
    /// Builds the rules; patterns from `exclude_from` files join the `exclude` ones.
    pub(crate) fn new(
        include: &[String],
        exclude: &[String],
        exclude_from: &[impl AsRef<Path>],
    ) -> Result<Filter, Error> {
        let mut excludes: Vec<String> = exclude.to_vec();
        for file in exclude_from {
            let file = file.as_ref();
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::local("reading exclude patterns from", file, e))?;
            excludes.extend(
                text.lines()
                    .map(str::trim_end)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let mut include_set = GlobSetBuilder::new();
        for pattern in include {
            if pattern.ends_with('/') {
                return Err(Error::Pattern {
                    pattern: pattern.clone(),
                    reason: "--include takes file patterns; a folder pattern (ending in /) \
                             only works with --exclude"
                        .into(),
                });
            }
            include_set.add(compile(pattern)?);
        }
        let mut exclude_set = GlobSetBuilder::new();
        let mut dir_set = GlobSetBuilder::new();
        for pattern in &excludes {
            match pattern.strip_suffix('/') {
                Some(dir) => dir_set.add(compile_with_original(dir, pattern)?),
                None => exclude_set.add(compile(pattern)?),
            };
        }
        let built = |set: GlobSetBuilder, what: &str| {
            set.build().map_err(|e| Error::Pattern {
                pattern: what.to_owned(),
                reason: e.to_string(),
            })
        };
        Ok(Filter {
            include: built(include_set, "--include")?,
            exclude: built(exclude_set, "--exclude")?,
            exclude_dirs: built(dir_set, "--exclude")?,
            only_included: !include.is_empty() && excludes.is_empty(),
        })
    }

    /// Whether the file at relative path `rel` takes part.
    pub(crate) fn includes(&self, rel: &str) -> bool {
        // Every folder above the file must be allowed too.
        let mut at = 0;
        while let Some(slash) = rel[at..].find('/') {
            if !self.includes_dir(&rel[..at + slash]) {
                return false;
            }
            at += slash + 1;
        }
        if self.include.is_match(rel) {
            return true;
        }
        if self.exclude.is_match(rel) {
            return false;
        }
        !self.only_included
    }

    /// Whether the folder at relative path `rel` may hold files that take part.
    pub(crate) fn includes_dir(&self, rel: &str) -> bool {
        !self.exclude_dirs.is_match(rel)
    }
}

fn compile(pattern: &str) -> Result<Glob, Error> {
    compile_with_original(pattern, pattern)
}

fn compile_with_original(pattern: &str, original: &str) -> Result<Glob, Error> {
    let glob = match pattern.strip_prefix('/') {
        Some(anchored) => anchored.to_owned(),
        None => format!("{{{pattern},**/{pattern}}}"),
    };
    if pattern.is_empty() || pattern == "/" {
        return Err(Error::Pattern {
            pattern: original.to_owned(),
            reason: "the pattern is empty".into(),
        });
    }
    GlobBuilder::new(&glob)
        .literal_separator(true)
        .backslash_escape(true)
        .empty_alternates(false)
        .build()
        .map_err(|e| Error::Pattern {
            pattern: original.to_owned(),
            reason: e.kind().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(include: &[&str], exclude: &[&str]) -> Filter {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Filter::new(&own(include), &own(exclude), &[] as &[&Path]).unwrap()
    }

    #[test]
    fn unanchored_patterns_match_at_any_depth() {
        let f = filter(&[], &["*.log"]);
        assert!(!f.includes("a.log"));
        assert!(!f.includes("x/y/a.log"));
        assert!(f.includes("a.txt"));
        assert!(f.includes("x/a.log.txt"));
    }

    #[test]
    fn anchored_patterns_match_only_at_the_root() {
        let f = filter(&[], &["/cache/*"]);
        assert!(!f.includes("cache/a"));
        assert!(f.includes("x/cache/a"));
        assert!(f.includes("cache/a/b"), "* stays in one segment");
    }

    #[test]
    fn folder_patterns_remove_whole_subtrees() {
        let f = filter(&["keep.txt"], &["node_modules/"]);
        assert!(!f.includes("node_modules/keep.txt"));
        assert!(!f.includes("app/node_modules/x/y.js"));
        assert!(f.includes("app/src/y.js"));
        assert!(!f.includes_dir("app/node_modules"));
    }

    #[test]
    fn includes_win_and_alone_select_only_their_files() {
        let f = filter(&["important.log"], &["*.log"]);
        assert!(f.includes("important.log"));
        assert!(!f.includes("other.log"));
        assert!(f.includes("readme"));
        let only = filter(&["*.jpg"], &[]);
        assert!(only.includes("a/b.jpg"));
        assert!(!only.includes("a/b.png"));
    }

    #[test]
    fn bad_patterns_are_named() {
        let err = Filter::new(&[], &["a[".to_owned()], &[] as &[&Path]).unwrap_err();
        assert!(err.to_string().contains("\"a[\""), "{err}");
    }
}
