//! Where data comes from and goes to: a local path, `-` for stdin/stdout, or `s3://bucket/key`,
//! or `s3://STORE/bucket/key` on a named store of the config (see the `store` module).
//!
//! A URL's first segment names a store when a store of that name is configured; otherwise it
//! is a bucket of the default store (flags, `[s3]`, `AWS_*`), so invocations written before
//! stores existed mean what they meant. A configured store name wins over a bucket of the
//! same name; that bucket is still reached as `s3://_/bucket/key` (`_` is the default store,
//! and no bucket can be called `_`).
//!
//! Keys are taken literally (no percent-decoding: `s3://b/a%20b` names the key `a%20b`, as the
//! AWS CLI and rclone read it). Bucket names follow S3's rules for new buckets, so a typo is
//! caught here rather than by a puzzling store error. Any other `scheme://` is refused instead
//! of being taken for a local folder.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::error::Error;

/// The store name that means the default store, for a bucket named like a configured store.
pub(crate) const DEFAULT_STORE: &str = "_";

/// The longest key S3 accepts, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 1024;

/// A source or destination as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Location {
    /// `-`: standard input or output.
    Stdio,
    /// A local file or folder.
    Local(PathBuf),
    /// An object or prefix in a bucket.
    S3(S3Url),
}

/// `s3://bucket/key`; the key may be empty (the whole bucket) or end in `/` (a folder).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct S3Url {
    /// The named store, or `None` for the default one.
    pub(crate) store: Option<String>,
    /// The bucket.
    pub(crate) bucket: String,
    /// The key or prefix, exactly as given after the bucket's `/`.
    pub(crate) key: String,
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.store {
            Some(store) => write!(f, "s3://{store}/{}/{}", self.bucket, self.key),
            None => write!(f, "s3://{}/{}", self.bucket, self.key),
        }
    }
}

impl S3Url {
    /// The URL of `key` in the same bucket.
    pub(crate) fn with_key(&self, key: impl Into<String>) -> S3Url {
        S3Url {
            store: self.store.clone(),
            bucket: self.bucket.clone(),
            key: key.into(),
        }
    }

    /// Whether both URLs are on the same store (a server-side copy can join them).
    pub(crate) fn same_store(&self, other: &S3Url) -> bool {
        self.store == other.store
    }

    /// The key as a folder prefix: empty, or ending in `/`.
    pub(crate) fn as_prefix(&self) -> String {
        if self.key.is_empty() || self.key.ends_with('/') {
            self.key.clone()
        } else {
            format!("{}/", self.key)
        }
    }

    /// Whether the key names a folder rather than one object.
    pub(crate) fn is_folder(&self) -> bool {
        self.key.is_empty() || self.key.ends_with('/')
    }

    /// The last path segment of the key (what a downloaded file is named).
    pub(crate) fn file_name(&self) -> Option<&str> {
        self.key.rsplit('/').next().filter(|n| !n.is_empty())
    }
}

impl Location {
    /// Parses a command-line argument with no named stores configured.
    #[cfg(test)]
    pub(crate) fn parse(arg: &str) -> Result<Location, Error> {
        Location::parse_with(arg, &|_| false)
    }

    /// Parses a command-line argument; `is_store` tells the configured store names.
    pub(crate) fn parse_with(
        arg: &str,
        is_store: &dyn Fn(&str) -> bool,
    ) -> Result<Location, Error> {
        let bad = |reason: &str| Error::Location {
            arg: arg.to_owned(),
            reason: reason.to_owned(),
        };
        if arg == "-" {
            return Ok(Location::Stdio);
        }
        if arg.is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(rest) = strip_prefix_ignore_case(arg, "s3://") {
            if !arg.starts_with("s3://") {
                return Err(bad("write the scheme in lower case: s3://"));
            }
            let (first, after) = rest.split_once('/').unwrap_or((rest, ""));
            let (store, rest) = if first == DEFAULT_STORE {
                (None, after)
            } else if is_store(first) {
                (Some(first.to_owned()), after)
            } else {
                (None, rest)
            };
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            check_bucket(bucket).map_err(bad)?;
            check_key(key).map_err(bad)?;
            return Ok(Location::S3(S3Url {
                store,
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            }));
        }
        if let Some((scheme, _)) = arg.split_once("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(bad("only s3:// URLs, local paths and - are understood"));
        }
        if arg.starts_with("s3:") {
            return Err(bad("an S3 location is written s3://bucket/key"));
        }
        Ok(Location::Local(PathBuf::from(arg)))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Stdio => f.write_str("-"),
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::S3(url) => url.fmt(f),
        }
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// S3's naming rules for buckets: 3 to 63 lower-case letters, digits, `-` and `.`, starting
/// and ending with a letter or digit, no `..`, and not shaped like an IP address.
pub(crate) fn check_bucket(bucket: &str) -> Result<(), &'static str> {
    if bucket.is_empty() {
        return Err("no bucket named (write s3://bucket/key)");
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err("a bucket name has 3 to 63 characters");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err("a bucket name holds only lower-case letters, digits, '-' and '.'");
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(bucket.as_bytes()[0]) || !edge_ok(bucket.as_bytes()[bucket.len() - 1]) {
        return Err("a bucket name starts and ends with a letter or digit");
    }
    if bucket.contains("..") {
        return Err("a bucket name has no '..'");
    }
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("a bucket name is not an IP address");
    }
    Ok(())
}

/// What S3 accepts as a key: at most 1,024 bytes of UTF-8, without control characters that
/// the XML of listings cannot carry.
pub(crate) fn check_key(key: &str) -> Result<(), &'static str> {
    if key.len() > MAX_KEY_LEN {
        return Err("a key is at most 1024 bytes long");
    }
    if key
        .chars()
        .any(|c| c == '\0' || (c.is_control() && c != '\t'))
    {
        return Err("a key holds no control characters");
    }
    Ok(())
}

/// Turns a key's path below a prefix into a relative local path, refusing anything that
/// would land outside the destination folder or cannot be a file name.
pub(crate) fn key_to_path(rel: &str) -> Result<PathBuf, &'static str> {
    if rel.is_empty() {
        return Err("the key names the folder itself");
    }
    if rel.starts_with('/') {
        return Err("the key starts with '/' (an absolute path)");
    }
    let mut path = PathBuf::new();
    for part in rel.split('/') {
        match part {
            "" => return Err("the key has an empty path segment ('//' or a trailing '/')"),
            "." | ".." => return Err("the key has a '.' or '..' segment"),
            _ if part.contains('\0') => return Err("the key holds a NUL byte"),
            _ if part.len() > 255 => return Err("a path segment is longer than 255 bytes"),
            _ => path.push(part),
        }
    }
    debug_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(path)
}

/// Turns a relative local path into the `/`-separated form keys use.
pub(crate) fn path_to_rel(path: &Path) -> Result<String, &'static str> {
    let mut out = String::new();
    for component in path.components() {
        let Component::Normal(part) = component else {
            return Err("the path is not plainly relative");
        };
        let part = part.to_str().ok_or("the file name is not valid UTF-8")?;
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(part);
    }
    check_key(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s3(bucket: &str, key: &str) -> Location {
        Location::S3(S3Url {
            store: None,
            bucket: bucket.into(),
            key: key.into(),
        })
    }

    #[test]
    fn urls_paths_and_stdio_are_told_apart() {
        assert_eq!(Location::parse("-").unwrap(), Location::Stdio);
        assert_eq!(Location::parse("s3://lab").unwrap(), s3("lab", ""));
        assert_eq!(Location::parse("s3://lab/").unwrap(), s3("lab", ""));
        assert_eq!(
            Location::parse("s3://lab/a b/+%#/ü").unwrap(),
            s3("lab", "a b/+%#/ü")
        );
        assert_eq!(
            Location::parse("./backups").unwrap(),
            Location::Local("./backups".into())
        );
        assert_eq!(
            Location::parse("dir:with:colons").unwrap(),
            Location::Local("dir:with:colons".into())
        );
    }

    #[test]
    fn malformed_urls_say_what_is_wrong() {
        for (arg, needle) in [
            ("s3://", "no bucket"),
            ("s3:///key", "no bucket"),
            ("s3://ab/k", "3 to 63"),
            ("s3://Lab/k", "lower-case"),
            ("s3://lab_1/k", "lower-case"),
            ("s3://-lab/k", "starts and ends"),
            ("s3://a..b/k", "'..'"),
            ("s3://10.0.0.1/k", "IP address"),
            ("S3://lab/k", "lower case"),
            ("s3:/lab/k", "s3://bucket/key"),
            ("gs://lab/k", "only s3://"),
            ("", "empty"),
            ("s3://lab/a\nb", "control"),
        ] {
            let err = Location::parse(arg).unwrap_err().to_string();
            assert!(err.contains(needle), "{arg:?}: {err}");
        }
        let long = format!("s3://lab/{}", "k".repeat(1025));
        assert!(Location::parse(&long).is_err());
    }

    #[test]
    fn keys_never_map_outside_the_destination() {
        assert_eq!(key_to_path("a/b c/ü").unwrap(), PathBuf::from("a/b c/ü"));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/",
            "./a",
            "a/.",
        ] {
            assert!(key_to_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prefixes_and_file_names() {
        let url = S3Url {
            store: None,
            bucket: "lab".into(),
            key: "dumps".into(),
        };
        assert_eq!(url.as_prefix(), "dumps/");
        assert_eq!(url.with_key("").as_prefix(), "");
        assert_eq!(url.file_name(), Some("dumps"));
        assert_eq!(url.with_key("a/").file_name(), None);
        assert_eq!(url.to_string(), "s3://lab/dumps");
    }

    #[test]
    fn a_configured_store_name_wins_and_underscore_names_the_default_store() {
        let stores = |name: &str| name == "home";
        let parse = |arg: &str| Location::parse_with(arg, &stores).unwrap();
        let Location::S3(url) = parse("s3://home/media/a/b.jpg") else {
            panic!("not an S3 location")
        };
        assert_eq!(url.store.as_deref(), Some("home"));
        assert_eq!(
            (url.bucket.as_str(), url.key.as_str()),
            ("media", "a/b.jpg")
        );
        assert_eq!(url.to_string(), "s3://home/media/a/b.jpg");
        assert_eq!(parse(&url.to_string()), Location::S3(url));
        // The bucket "home" of the default store.
        assert_eq!(parse("s3://_/home/k"), s3("home", "k"));
        // Not a store: a bucket, as before stores existed.
        assert_eq!(parse("s3://offsite/k"), s3("offsite", "k"));
        assert!(Location::parse_with("s3://home", &stores).is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_s3_urls_round_trip(arg in "\\PC{0,80}") {
            if let Ok(Location::S3(url)) = Location::parse(&arg) {
                prop_assert_eq!(Location::parse(&url.to_string()).unwrap(), Location::S3(url));
            }
        }

        #[test]
        fn accepted_keys_map_to_plain_relative_paths(rel in "[a-z./ %+#ü]{0,40}") {
            if let Ok(path) = key_to_path(&rel) {
                prop_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
                prop_assert_eq!(path_to_rel(&path).unwrap(), rel);
            }
        }

        #[test]
        fn valid_buckets_are_accepted(bucket in "[a-z0-9][a-z0-9-]{1,61}[a-z0-9]") {
            prop_assert!(check_bucket(&bucket).is_ok());
        }
    }
}
