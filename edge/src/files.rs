//! Static files (`root`, `file_server`, `try_files` and the `file` matcher), with Caddy 2.6's
//! semantics: index files, canonical-slash redirects, `hide`, `browse` listings (HTML, or JSON
//! when asked), precompressed sidecars, ETag/Last-Modified, conditional and range requests
//! (several ranges as multipart/byteranges).
//!
//! Invariants:
//! - The request path reaching [`FileServer::serve`] is already decoded and cleaned (no `.`/`..`
//!   segments), so joining it under the root never leaves the root by name. Symlinks inside the
//!   root are followed, as Caddy follows them: the root is the operator's, not a sandbox.
//! - A hidden file (the `hide` globs) is answered exactly like a missing one, and never listed.
//! - File bodies are streamed from an open descriptor, never read whole: memory per response is
//!   one read buffer, whatever the file's size. Listings stop at [`MAX_LISTING`] entries.
//! - ETag, Last-Modified, the preconditions and ranges follow Go's `http.ServeContent`, which
//!   Caddy uses, so a cache or download manager sees the same answers from edge as from Caddy.

// The chain calls what the `file_server` and `try_files` directives need; the rest serves
// the `file` matcher, not wired yet.

use std::cmp::Ordering;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::http::request::Parts;
use hyper::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::body::Body;

/// At most this many directory entries are listed (Caddy's limit too).
const MAX_LISTING: usize = 10_000;
/// Read size for file bodies.
const CHUNK: usize = 64 * 1024;

/// The request's URI before any rewrite. The handler chain puts it in the request's extensions
/// when it rewrites, so canonical redirects and `REQUEST_URI` use what the client asked for.
#[derive(Clone, Debug)]
pub(crate) struct OriginalUri(pub(crate) Uri);

/// A precompressed sidecar format (`precompressed gzip zstd br`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Precompressed {
    /// `FILE.gz`.
    Gzip,
    /// `FILE.zst`.
    Zstd,
    /// `FILE.br`.
    Br,
}

impl Precompressed {
    /// The `Accept-Encoding`/`Content-Encoding` token.
    pub(crate) fn token(self) -> &'static str {
        match self {
            Precompressed::Gzip => "gzip",
            Precompressed::Zstd => "zstd",
            Precompressed::Br => "br",
        }
    }

    /// The sidecar file's suffix.
    fn suffix(self) -> &'static str {
        match self {
            Precompressed::Gzip => ".gz",
            Precompressed::Zstd => ".zst",
            Precompressed::Br => ".br",
        }
    }

    /// The format a Caddyfile names (`gzip`, `zstd`, `br`).
    pub(crate) fn parse(name: &str) -> Option<Precompressed> {
        [Precompressed::Gzip, Precompressed::Zstd, Precompressed::Br]
            .into_iter()
            .find(|p| p.token() == name)
    }
}

/// A `file_server`'s settings, as the Caddyfile gives them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FileServerConfig {
    /// The site root; relative roots are taken from the working directory, as Caddy does.
    pub(crate) root: PathBuf,
    /// Index file names tried in a directory, in order.
    pub(crate) index: Vec<String>,
    /// List directories without an index file.
    pub(crate) browse: bool,
    /// Globs of files and folders to pretend do not exist (Caddy's `hide`): a pattern without a
    /// `/` matches any path component; one with a `/` matches the absolute path or a prefix of it.
    pub(crate) hide: Vec<String>,
    /// Sidecar formats, in the server's order of preference.
    pub(crate) precompressed: Vec<Precompressed>,
    /// Redirect directories to a trailing slash and files away from one.
    pub(crate) canonical_uris: bool,
    /// A missing file goes to the next handler instead of a 404.
    pub(crate) pass_thru: bool,
    /// The status of every answer served from a file (`status`), e.g. for an error page.
    pub(crate) status: Option<StatusCode>,
}

impl FileServerConfig {
    /// Caddy's defaults for a root: `index.html index.txt`, canonical URIs, nothing else.
    pub(crate) fn new(root: impl Into<PathBuf>) -> FileServerConfig {
        FileServerConfig {
            root: root.into(),
            index: vec!["index.html".to_owned(), "index.txt".to_owned()],
            browse: false,
            hide: Vec::new(),
            precompressed: Vec::new(),
            canonical_uris: true,
            pass_thru: false,
            status: None,
        }
    }
}

/// A static file server for one root.
#[derive(Debug)]
pub(crate) struct FileServer {
    config: FileServerConfig,
    /// `config.root`, absolute.
    root: PathBuf,
    /// `config.hide`, the patterns with a `/` made absolute.
    hide: Vec<String>,
}

/// What a file lookup found.
struct Found {
    path: PathBuf,
    meta: std::fs::Metadata,
}

impl FileServer {
    /// The server for `config`.
    pub(crate) fn new(config: FileServerConfig) -> FileServer {
        let root = absolute(&config.root);
        let hide = config
            .hide
            .iter()
            .map(|h| {
                if h.contains('/') {
                    absolute(Path::new(h)).to_string_lossy().into_owned()
                } else {
                    h.clone()
                }
            })
            .collect();
        FileServer { config, root, hide }
    }

    /// Serves the file for `path` (decoded and cleaned, as `site::match_path` makes it); a
    /// missing or hidden file is a 404.
    pub(crate) async fn serve(&self, parts: &Parts, path: &str) -> Response<Body> {
        match self.serve_or_next(parts, path).await {
            Some(response) => response,
            None => empty(StatusCode::NOT_FOUND),
        }
    }

    /// As [`FileServer::serve`], but `None` where `pass_thru` sends the request on to the
    /// next handler.
    pub(crate) async fn serve_or_next(&self, parts: &Parts, path: &str) -> Option<Response<Body>> {
        if path.contains('\0') {
            return self.not_found();
        }
        let mut filename = join(&self.root, path);
        let mut meta = match tokio::fs::metadata(&filename).await {
            Ok(meta) => meta,
            Err(err) => return self.fs_error(&err, StatusCode::INTERNAL_SERVER_ERROR),
        };

        let mut implicit_index = false;
        if meta.is_dir() {
            for name in &self.config.index {
                let candidate = join(&filename, name);
                if self.hidden(&candidate) {
                    continue;
                }
                if let Ok(index_meta) = tokio::fs::metadata(&candidate).await {
                    filename = candidate;
                    meta = index_meta;
                    implicit_index = true;
                    break;
                }
            }
        }

        if meta.is_dir() {
            if self.config.browse && !self.hidden(&filename) {
                return self.browse(parts, path, filename).await;
            }
            return self.not_found();
        }
        if self.hidden(&filename) {
            return self.not_found();
        }

        if self.config.canonical_uris {
            let original = original_path(parts);
            // A rewrite that changed the file name decides on its own: redirecting from it
            // could loop (Caddy issue 4205).
            if base(&original) == base(path) {
                if implicit_index && !original.ends_with('/') {
                    return Some(redirect(parts, &format!("{original}/")));
                }
                if !implicit_index && original.ends_with('/') {
                    return Some(redirect(parts, original.trim_end_matches('/')));
                }
            }
        }

        let mut headers = HeaderMap::new();
        let mut opened = None;
        for token in accepted_encodings(&parts.headers, &self.config.precompressed) {
            let Some(format) = self
                .config
                .precompressed
                .iter()
                .find(|p| p.token() == token)
            else {
                continue;
            };
            let mut sidecar = filename.clone().into_os_string();
            sidecar.push(format.suffix());
            let sidecar = PathBuf::from(sidecar);
            let Ok(file) = tokio::fs::File::open(&sidecar).await else {
                continue;
            };
            let Ok(sidecar_meta) = file.metadata().await else {
                continue;
            };
            if sidecar_meta.is_dir() {
                continue;
            }
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(format.token()),
            );
            headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
            // The sidecar's own ETag: its bytes differ from the plain file's.
            opened = Some((
                file,
                Found {
                    path: sidecar,
                    meta: sidecar_meta,
                },
            ));
            break;
        }
        let (file, content) = match opened {
            Some(opened) => opened,
            None => match tokio::fs::File::open(&filename).await {
                Ok(file) => (
                    file,
                    Found {
                        path: filename.clone(),
                        meta: meta.clone(),
                    },
                ),
                Err(err) => return self.fs_error(&err, StatusCode::SERVICE_UNAVAILABLE),
            },
        };
        tracing::debug!(file = %content.path.display(), "serving file");

        let etag = etag(&content.meta);
        headers.insert(
            header::ETAG,
            HeaderValue::from_str(&etag).expect("an ETag is quoted base-36 digits"),
        );
        if let Some(mime) = content_type(&filename) {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
        }
        // Sidecars are transparent: Last-Modified is the plain file's.
        let modified = meta.modified().ok().map(unix_seconds);
        let response =
            serve_content(parts, headers, &etag, modified, content.meta.len(), file).await;
        Some(self.override_status(response))
    }

    /// Applies `status`: Caddy's override replaces whatever status the file answer had.
    fn override_status(&self, mut response: Response<Body>) -> Response<Body> {
        if let Some(status) = self.config.status {
            *response.status_mut() = status;
        }
        response
    }

    fn not_found(&self) -> Option<Response<Body>> {
        if self.config.pass_thru {
            None
        } else {
            Some(empty(StatusCode::NOT_FOUND))
        }
    }

    /// The answer to a failed stat or open: missing is a 404, forbidden a 403, anything else
    /// (out of descriptors, I/O) `other`.
    fn fs_error(&self, err: &io::Error, other: StatusCode) -> Option<Response<Body>> {
        match err.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => self.not_found(),
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => self.not_found(),
            io::ErrorKind::PermissionDenied => Some(empty(StatusCode::FORBIDDEN)),
            _ => {
                tracing::warn!(error = %err, "file server");
                let mut response = empty(other);
                if other == StatusCode::SERVICE_UNAVAILABLE {
                    // Perhaps out of descriptors: spread the clients' retries (2 to 4 s).
                    let after = rand::random_range(2..5u16);
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(after));
                }
                Some(response)
            }
        }
    }

    fn hidden(&self, filename: &Path) -> bool {
        is_hidden(&self.hide, filename)
    }

    /// A directory listing, HTML or (when the client accepts it) JSON.
    async fn browse(&self, parts: &Parts, path: &str, dir: PathBuf) -> Option<Response<Body>> {
        let original = original_path(parts);
        // Relative links in the listing need the slash form of the URL.
        if (path.is_empty() || base(&original) == base(path)) && !original.ends_with('/') {
            return Some(redirect(parts, &format!("{original}/")));
        }
        let hide = self.hide.clone();
        let listing =
            tokio::task::spawn_blocking(move || list_directory(&dir, &|p| is_hidden(&hide, p)))
                .await;
        let mut items = match listing {
            Ok(Ok(items)) => items,
            Ok(Err(err)) => return self.fs_error(&err, StatusCode::INTERNAL_SERVER_ERROR),
            Err(_) => return Some(empty(StatusCode::INTERNAL_SERVER_ERROR)),
        };

        let query = Query(parts.uri.query().unwrap_or(""));
        let cookies = Cookies(&parts.headers);
        let mut set_cookies = Vec::new();
        let sort = match query.get("sort").filter(|s| !s.is_empty()) {
            None => cookies
                .get("sort")
                .unwrap_or(SORT_NAME_DIR_FIRST.to_owned()),
            Some(s) => {
                if [SORT_NAME, SORT_NAME_DIR_FIRST, SORT_SIZE, SORT_TIME].contains(&s.as_str()) {
                    set_cookies.push(format!("sort={s}"));
                }
                s
            }
        };
        let order = match query.get("order").filter(|o| !o.is_empty()) {
            None => cookies.get("order").unwrap_or("asc".to_owned()),
            Some(o) => {
                if o == "asc" || o == "desc" {
                    set_cookies.push(format!("order={o}"));
                }
                o
            }
        };
        sort_items(&mut items, &sort, order == "desc");
        if let Some(offset) = query.get("offset").and_then(|o| o.parse::<usize>().ok())
            && offset > 0
            && offset <= items.len()
        {
            items.drain(..offset);
        }
        if let Some(limit) = query.get("limit").and_then(|l| l.parse::<usize>().ok())
            && limit > 0
            && limit <= items.len()
        {
            items.truncate(limit);
        }

        let wants_json = parts.headers.get_all(header::ACCEPT).iter().any(|v| {
            v.as_bytes()
                .to_ascii_lowercase()
                .windows(16)
                .any(|w| w == b"application/json")
        });
        let (body, mime) = if wants_json {
            (listing_json(&items), "application/json; charset=utf-8")
        } else {
            (listing_html(path, &items), "text/html; charset=utf-8")
        };
        let mut response = full(StatusCode::OK, body);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
        for cookie in set_cookies {
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                headers.append(header::SET_COOKIE, value);
            }
        }
        if parts.method == Method::HEAD {
            *response.body_mut() = Empty::new().map_err(|e| match e {}).boxed_unsync();
        }
        Some(response)
    }
}

/// Whether `filename` is hidden by `hide` (Caddy's `fileHidden`): a pattern without `/` hides
/// any path with a component it matches; one with `/` (absolute) hides itself and what is
/// under it, or any path its glob matches.
fn is_hidden(hide: &[String], filename: &Path) -> bool {
    if hide.is_empty() {
        return false;
    }
    let full = absolute(filename);
    let full = full.to_string_lossy();
    hide.iter().any(|pattern| {
        if !pattern.contains('/') {
            if full.split('/').any(|c| glob_match(pattern, c)) {
                return true;
            }
        } else if let Some(rest) = full.strip_prefix(pattern.as_str())
            && rest.starts_with('/')
        {
            return true;
        }
        glob_match(pattern, &full)
    })
}

/// The result of Caddy's `file` matcher (`try_files`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TryFiles {
    /// A candidate exists: the path relative to the root (what `try_files` rewrites to, Caddy's
    /// `{http.matchers.file.relative}`), and what followed a split extension
    /// (`{http.matchers.file.remainder}`, the script's PATH_INFO).
    Found {
        /// The matched file's path under the root, starting with `/`.
        relative: String,
        /// What came after the split extension, or "".
        remainder: String,
    },
    /// A `=CODE` candidate was reached before any file existed: answer with that status.
    Status(StatusCode),
    /// Nothing matched.
    None,
}

/// Caddy's `file` matcher with the `first_exist` policy: the first of `patterns` that exists
/// under `root`, for the request path `path` (decoded and cleaned). In a pattern, `{path}`
/// (`{http.request.uri.path}`), `{dir}` and `{file}` stand for the request's path, its folder
/// (with a trailing slash) and its last segment, with glob characters escaped; any other
/// placeholder must be expanded by the caller. A pattern written with a trailing `/` matches only
/// a directory, any other only a file (whatever the request path ends with). Each is cut after the
/// first of `split_path` (`.php`) that ends a path segment, the rest becoming the remainder. Globs
/// in patterns are expanded against the file system, as Caddy does; `=CODE` answers with a status.
pub(crate) fn try_files(
    root: &Path,
    patterns: &[String],
    path: &str,
    split_path: &[String],
) -> TryFiles {
    let root = absolute(root);
    let (dir, file) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    for pattern in patterns {
        if let Some(code) = pattern.strip_prefix('=')
            && let Ok(code) = code.parse::<u16>()
            && (100..=999).contains(&code)
            && let Ok(status) = StatusCode::from_u16(code)
        {
            return TryFiles::Status(status);
        }
        let candidate = pattern
            .replace("{http.request.uri.path}", "{path}")
            .replace("{http.request.uri.path.dir}", "{dir}")
            .replace("{http.request.uri.path.file}", "{file}")
            .replace("{path}", &glob_escape(path))
            .replace("{dir}", &glob_escape(dir))
            .replace("{file}", &glob_escape(file));
        let candidate = candidate.as_str();
        let cleaned = clean(candidate);
        let (mut before, remainder) = first_split(&cleaned, split_path);
        // The pattern as written decides, not what `{path}` brought (Caddy checks the same).
        if pattern.ends_with('/') && !before.ends_with('/') {
            before.push('/');
        }
        let full = join(&root, &before);
        for found in glob(&full) {
            let Ok(meta) = std::fs::metadata(&found) else {
                continue;
            };
            let wants_dir = found.to_string_lossy().ends_with('/');
            if meta.is_dir() != wants_dir {
                continue;
            }
            let text = found.to_string_lossy();
            let root_text = root.to_string_lossy();
            let relative = text.strip_prefix(root_text.as_ref()).unwrap_or(&text);
            let relative = if relative.starts_with('/') {
                relative.to_owned()
            } else {
                format!("/{relative}")
            };
            return TryFiles::Found {
                relative,
                remainder: remainder.clone(),
            };
        }
    }
    TryFiles::None
}

/// Escapes glob characters in a request's value before it goes into a pattern, as Caddy does.
pub(crate) fn glob_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '*' | '?' | '[') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Caddy's `firstSplit`: the path up to and including the first split extension that ends a
/// segment, and the rest. Caddy's search never looks at the path's very end (an off-by-one in
/// its `indexFold`); that changes nothing, since a split at the end leaves no remainder.
pub(crate) fn first_split(path: &str, split_path: &[String]) -> (String, String) {
    let lower = path.to_ascii_lowercase();
    for split in split_path {
        let needle = split.to_ascii_lowercase();
        if let Some(idx) = lower.find(&needle) {
            let pos = idx + needle.len();
            if pos != path.len() && !path[pos..].starts_with('/') {
                continue;
            }
            return (path[..pos].to_owned(), path[pos..].to_owned());
        }
    }
    (path.to_owned(), String::new())
}

/// `root` joined with the request path as Caddy's `SanitizedPathJoin` does: the path is cleaned
/// as if rooted, so it stays under `root`, and a trailing slash is kept (a file named with one
/// then fails to open, as on Caddy).
pub(crate) fn join(root: &Path, path: &str) -> PathBuf {
    let cleaned = clean(&format!("/{path}"));
    let mut joined = root.as_os_str().to_owned();
    if cleaned != "/" {
        joined.push(cleaned.trim_end_matches('/'));
    }
    if path.ends_with('/') && path.len() > 1 {
        joined.push("/");
    }
    PathBuf::from(joined)
}

/// Go's `path.Clean`, dropping any trailing slash.
pub(crate) fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.last().is_some_and(|s| *s != "..") {
                    segments.pop();
                } else if !rooted {
                    segments.push(segment);
                }
            }
            _ => segments.push(segment),
        }
    }
    let joined = segments.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Go's `path.Base`.
fn base(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return if path.is_empty() { "." } else { "/" };
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed)
}

/// `path` made absolute against the working directory, without touching the file system.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The path the client asked for, decoded and cleaned (the trailing slash kept).
fn original_path(parts: &Parts) -> String {
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |o| &o.0);
    match crate::site::match_path(uri.path()) {
        Some(path) => String::from_utf8_lossy(&path).into_owned(),
        None => uri.path().to_owned(),
    }
}

/// A 308 to `to`, as Go's `http.Redirect` writes it (with a short HTML body for GET). The query
/// is dropped, as on Caddy 2.6.
fn redirect(parts: &Parts, to: &str) -> Response<Body> {
    let mut location = clean(to);
    if to.ends_with('/') && !location.ends_with('/') {
        location.push('/');
    }
    // No `//host` open redirect from a path.
    while location.starts_with("//") {
        location.remove(0);
    }
    let location = escape_location(&location);
    let body = if parts.method == Method::GET {
        format!(
            "<a href=\"{}\">Permanent Redirect</a>.\n\n",
            html_escape(&location)
        )
    } else {
        String::new()
    };
    let mut response = full(StatusCode::PERMANENT_REDIRECT, body);
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("an escaped location is visible ASCII"),
    );
    if parts.method == Method::GET || parts.method == Method::HEAD {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
    }
    response
}

/// Percent-escapes what cannot stand in a Location path as decoded: non-ASCII bytes (as Go
/// does), and also controls, space, `"`, `#`, `%`, `?` and `\` (Go writes those raw, which
/// changes the path the client follows).
fn escape_location(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b > 0x20 && b < 0x7f && !matches!(b, b'"' | b'#' | b'%' | b'?' | b'\\') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Go's `html.EscapeString`.
pub(crate) fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    out
}

/// A response with no body.
fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *response.status_mut() = status;
    response
}

/// A response with a small body held in memory.
fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

/// Seconds since the epoch (negative before it).
fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => {
            let secs = before.duration().as_secs();
            let whole = i64::try_from(secs).map_or(i64::MIN, |s| -s);
            // Go truncates toward the past: -0.5 s is second -1.
            if before.duration().subsec_nanos() > 0 {
                whole - 1
            } else {
                whole
            }
        }
    }
}

/// Caddy's ETag: modification second and size, each in base 36, quoted. Not a hash: the file
/// is not read to make it.
fn etag(meta: &std::fs::Metadata) -> String {
    let modified = meta.modified().map(unix_seconds).unwrap_or(0);
    let size = i64::try_from(meta.len()).unwrap_or(i64::MAX);
    format!("\"{}{}\"", base36(modified), base36(size))
}

fn base36(n: i64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut magnitude = n.unsigned_abs();
    let mut digits = Vec::new();
    loop {
        digits.push(DIGITS[(magnitude % 36) as usize]);
        magnitude /= 36;
        if magnitude == 0 {
            break;
        }
    }
    if n < 0 {
        digits.push(b'-');
    }
    digits.reverse();
    String::from_utf8(digits).expect("base-36 digits are ASCII")
}

/// The Content-Type for a file name, by extension, as Go's `mime.TypeByExtension` answers on
/// Debian (its built-in table, then the system's shared-mime-info). `None` for an unknown
/// extension: Caddy then sends no Content-Type rather than sniffing.
fn content_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    let mime = match ext.as_str() {
        "avif" => "image/avif",
        "css" => "text/css; charset=utf-8",
        "gif" => "image/gif",
        "htm" | "html" => "text/html; charset=utf-8",
        "jpeg" | "jpg" => "image/jpeg",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "wasm" => "application/wasm",
        "webp" => "image/webp",
        "xml" => "text/xml; charset=utf-8",
        "txt" => "text/plain; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "ics" => "text/calendar; charset=utf-8",
        "ico" => "image/vnd.microsoft.icon",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "ogg" | "opus" => "audio/ogg",
        "flac" => "audio/flac",
        "wav" => "audio/x-wav",
        "gz" => "application/gzip",
        "zst" => "application/zstd",
        "zip" => "application/zip",
        "tar" => "application/x-tar",
        "xz" => "application/x-xz",
        "7z" => "application/x-7z-compressed",
        "rss" => "application/rss+xml",
        "atom" => "application/atom+xml",
        "xhtml" => "application/xhtml+xml",
        "jsonld" => "application/ld+json",
        "epub" => "application/epub+zip",
        "yaml" | "yml" => "application/x-yaml",
        "toml" => "application/toml",
        "sh" => "application/x-shellscript",
        "php" => "application/x-php",
        "deb" => "application/vnd.debian.binary-package",
        "iso" => "application/x-cd-image",
        _ => return None,
    };
    Some(mime)
}

/// The client's encodings in its order of preference (q first, then the server's order among
/// equal q), as Caddy's `AcceptedEncodings`; q=0 excluded.
fn accepted_encodings(headers: &HeaderMap, ours: &[Precompressed]) -> Vec<String> {
    let Some(accept) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return Vec::new();
    };
    let websocket = headers.contains_key(header::SEC_WEBSOCKET_KEY);
    let mut prefs: Vec<(String, f64, isize)> = Vec::new();
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0;
        if let Some(param) = parts.next() {
            let param = param.trim().to_ascii_lowercase();
            if let Some(value) = param.strip_prefix("q=")
                && let Ok(value) = value.parse::<f64>()
                && (0.0..=1.0).contains(&value)
            {
                q = value;
            }
        }
        if q < 0.00001 || (websocket && name != "identity") {
            continue;
        }
        let order = ours
            .iter()
            .position(|p| p.token() == name)
            .map_or(-1, |i| (ours.len() - i) as isize);
        prefs.push((name, q, order));
    }
    prefs.sort_by(|a, b| {
        if (a.1 - b.1).abs() < 0.00001 {
            b.2.cmp(&a.2)
        } else {
            b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal)
        }
    });
    prefs.into_iter().map(|p| p.0).collect()
}

/// The outcome of a precondition header.
#[derive(PartialEq)]
enum Cond {
    None,
    True,
    False,
}

/// Go's `http.ServeContent` for an open file: preconditions, ranges, HEAD. `headers` already
/// holds ETag, Content-Type and Content-Encoding.
async fn serve_content(
    parts: &Parts,
    mut headers: HeaderMap,
    etag: &str,
    modified: Option<i64>,
    size: u64,
    mut file: tokio::fs::File,
) -> Response<Body> {
    if let Some(secs) = modified.filter(|s| *s > 0)
        && let Some(text) = http_date(secs)
    {
        headers.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_str(&text).expect("an HTTP date is ASCII"),
        );
    }
    let get_or_head = parts.method == Method::GET || parts.method == Method::HEAD;
    let req = &parts.headers;

    let mut cond = if_match(req, etag);
    if cond == Cond::None {
        cond = if_unmodified_since(req, modified);
    }
    if cond == Cond::False {
        return with_headers(empty(StatusCode::PRECONDITION_FAILED), headers);
    }
    match if_none_match(req, etag) {
        Cond::False if get_or_head => return not_modified(headers),
        Cond::False => return with_headers(empty(StatusCode::PRECONDITION_FAILED), headers),
        Cond::None if if_modified_since(parts, modified) == Cond::False => {
            return not_modified(headers);
        }
        _ => {}
    }

    let mut range_header = req.get(header::RANGE).and_then(|v| v.to_str().ok());
    if range_header.is_some() && if_range(parts, etag, modified) == Cond::False {
        range_header = None;
    }

    let mut status = StatusCode::OK;
    let mut start = 0;
    let mut length = size;
    match parse_range(range_header.unwrap_or(""), size) {
        Err(RangeError::NoOverlap) => {
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("digits"),
            );
            return range_error(headers, "invalid range: failed to overlap\n");
        }
        Err(RangeError::Invalid) => return range_error(headers, "invalid range\n"),
        Ok(ranges) => {
            let total: u64 = ranges.iter().map(|r| r.1).sum();
            // Ranges adding up to more than the file are ignored, as Go does.
            if ranges.len() == 1 && total <= size {
                let (s, l) = ranges[0];
                start = s;
                length = l;
                status = StatusCode::PARTIAL_CONTENT;
                let last = (s + l).saturating_sub(1);
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes {s}-{last}/{size}")).expect("digits"),
                );
            } else if ranges.len() > 1 && total <= size {
                return multipart_ranges(parts, headers, &ranges, size, file);
            }
        }
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));

    let body = if parts.method == Method::HEAD || length == 0 {
        Empty::new().map_err(|e| match e {}).boxed_unsync()
    } else {
        if start > 0
            && let Err(err) = file.seek(io::SeekFrom::Start(start)).await
        {
            tracing::warn!(error = %err, "seeking in a served file");
            return empty(StatusCode::INTERNAL_SERVER_ERROR);
        }
        let stream = ReaderStream::with_capacity(file.take(length), CHUNK)
            .map(|chunk| chunk.map(Frame::data).map_err(Into::into));
        BodyExt::boxed_unsync(StreamBody::new(stream))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A piece of a multipart/byteranges body: text of its own, or a range of the file.
enum Segment {
    Text(Bytes),
    Range(u64, u64),
}

/// Several ranges as one `multipart/byteranges` 206, laid out as Go's `ServeContent` does
/// (each part with its Content-Range and Content-Type), the file sections streamed.
fn multipart_ranges(
    parts: &Parts,
    mut headers: HeaderMap,
    ranges: &[(u64, u64)],
    size: u64,
    file: tokio::fs::File,
) -> Response<Body> {
    let boundary: String = (0..30)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let part_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let mut segments = Vec::with_capacity(ranges.len() * 2 + 1);
    let mut length = 0u64;
    for (i, &(start, len)) in ranges.iter().enumerate() {
        let last = (start + len).saturating_sub(1);
        let lead = if i == 0 { "" } else { "\r\n" };
        let head = format!(
            "{lead}--{boundary}\r\nContent-Range: bytes {start}-{last}/{size}\r\n\
             Content-Type: {part_type}\r\n\r\n"
        );
        length += head.len() as u64 + len;
        segments.push(Segment::Text(Bytes::from(head)));
        segments.push(Segment::Range(start, len));
    }
    let tail = format!("\r\n--{boundary}--\r\n");
    length += tail.len() as u64;
    segments.push(Segment::Text(Bytes::from(tail)));

    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}"))
            .expect("a hex boundary"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let body = if parts.method == Method::HEAD {
        Empty::new().map_err(|e| match e {}).boxed_unsync()
    } else {
        segments_body(file, segments)
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    *response.headers_mut() = headers;
    response
}

/// Streams `segments`, reading file ranges a chunk at a time.
fn segments_body(file: tokio::fs::File, segments: Vec<Segment>) -> Body {
    struct State {
        file: tokio::fs::File,
        segments: std::vec::IntoIter<Segment>,
        /// The file range being sent: next offset and bytes left.
        current: Option<(u64, u64)>,
        failed: bool,
    }
    let state = State {
        file,
        segments: segments.into_iter(),
        current: None,
        failed: false,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        if state.failed {
            return None;
        }
        loop {
            match state.current {
                Some((_, 0)) => state.current = None,
                Some((offset, left)) => {
                    let want = left.min(CHUNK as u64) as usize;
                    let mut buf = BytesMut::zeroed(want);
                    let read = async {
                        state.file.seek(io::SeekFrom::Start(offset)).await?;
                        state.file.read_exact(&mut buf).await
                    };
                    if let Err(err) = read.await {
                        state.failed = true;
                        return Some((Err(err.into()), state));
                    }
                    state.current = Some((offset + want as u64, left - want as u64));
                    return Some((Ok(Frame::data(buf.freeze())), state));
                }
                None => match state.segments.next()? {
                    Segment::Text(text) => return Some((Ok(Frame::data(text)), state)),
                    Segment::Range(start, len) => state.current = Some((start, len)),
                },
            }
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

fn with_headers(mut response: Response<Body>, headers: HeaderMap) -> Response<Body> {
    *response.headers_mut() = headers;
    response
}

/// Go's `writeNotModified`: no representation headers, and no Last-Modified beside an ETag.
fn not_modified(mut headers: HeaderMap) -> Response<Body> {
    headers.remove(header::CONTENT_TYPE);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::CONTENT_ENCODING);
    if headers.contains_key(header::ETAG) {
        headers.remove(header::LAST_MODIFIED);
    }
    with_headers(empty(StatusCode::NOT_MODIFIED), headers)
}

/// A 416 as Go's `http.Error` writes it.
fn range_error(mut headers: HeaderMap, text: &'static str) -> Response<Body> {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.remove(header::CONTENT_ENCODING);
    with_headers(full(StatusCode::RANGE_NOT_SATISFIABLE, text), headers)
}

fn http_date(secs: i64) -> Option<String> {
    let ts = jiff::Timestamp::from_second(secs).ok()?;
    jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&ts)
        .ok()
}

fn parse_http_date(text: &str) -> Option<i64> {
    jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(text.trim())
        .ok()
        .map(|ts| ts.as_second())
}

/// The entity tags of an `If-Match`/`If-None-Match` list, Go's `scanETag` way: parsing stops at
/// the first malformed one. `*` comes back as itself.
fn etag_list(value: &str) -> Vec<(&str, bool)> {
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            break;
        }
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
            continue;
        }
        if let Some(r) = rest.strip_prefix('*') {
            tags.push(("*", false));
            rest = r;
            continue;
        }
        let (weak, body) = match rest.strip_prefix("W/") {
            Some(b) => (true, b),
            None => (false, rest),
        };
        if !body.starts_with('"') {
            break;
        }
        let Some(end) = body[1..].find('"') else {
            break;
        };
        let tag = &body[..end + 2];
        if !tag[1..tag.len() - 1]
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
        {
            break;
        }
        tags.push((tag, weak));
        rest = &body[end + 2..];
    }
    tags
}

fn if_match(req: &HeaderMap, etag: &str) -> Cond {
    let Some(value) = req.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) else {
        return Cond::None;
    };
    if value.is_empty() {
        return Cond::None;
    }
    // Strong comparison: a weak tag never matches, and ours are strong.
    if etag_list(value)
        .iter()
        .any(|(tag, weak)| *tag == "*" || (!weak && *tag == etag))
    {
        Cond::True
    } else {
        Cond::False
    }
}

fn if_none_match(req: &HeaderMap, etag: &str) -> Cond {
    let Some(value) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) else {
        return Cond::None;
    };
    if value.is_empty() {
        return Cond::None;
    }
    // Weak comparison: `W/"x"` matches `"x"`.
    if etag_list(value)
        .iter()
        .any(|(tag, _)| *tag == "*" || *tag == etag)
    {
        Cond::False
    } else {
        Cond::True
    }
}

fn if_unmodified_since(req: &HeaderMap, modified: Option<i64>) -> Cond {
    let Some(value) = req
        .get(header::IF_UNMODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    else {
        return Cond::None;
    };
    let (Some(since), Some(modified)) = (parse_http_date(value), modified) else {
        return Cond::None;
    };
    if modified <= since {
        Cond::True
    } else {
        Cond::False
    }
}

fn if_modified_since(parts: &Parts, modified: Option<i64>) -> Cond {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Cond::None;
    }
    let Some(value) = parts
        .headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    else {
        return Cond::None;
    };
    let (Some(since), Some(modified)) = (parse_http_date(value), modified.filter(|m| *m > 0))
    else {
        return Cond::None;
    };
    if modified <= since {
        Cond::False
    } else {
        Cond::True
    }
}

fn if_range(parts: &Parts, etag: &str, modified: Option<i64>) -> Cond {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Cond::None;
    }
    let Some(value) = parts
        .headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
    else {
        return Cond::None;
    };
    if value.starts_with('"') || value.starts_with("W/") {
        return match etag_list(value).first() {
            Some((tag, false)) if *tag == etag => Cond::True,
            _ => Cond::False,
        };
    }
    match (parse_http_date(value), modified) {
        (Some(date), Some(modified)) if date == modified => Cond::True,
        (Some(_), _) => Cond::False,
        (None, _) => Cond::False,
    }
}

enum RangeError {
    Invalid,
    NoOverlap,
}

/// Go's `parseRange`: `(start, length)` pairs for a `bytes=` header against `size`.
fn parse_range(value: &str, size: u64) -> Result<Vec<(u64, u64)>, RangeError> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let spec = value.strip_prefix("bytes=").ok_or(RangeError::Invalid)?;
    let mut ranges = Vec::new();
    let mut no_overlap = false;
    for item in spec.split(',') {
        let item = item.trim_matches([' ', '\t']);
        if item.is_empty() {
            continue;
        }
        let (start, end) = item.split_once('-').ok_or(RangeError::Invalid)?;
        let (start, end) = (
            start.trim_matches([' ', '\t']),
            end.trim_matches([' ', '\t']),
        );
        if start.is_empty() {
            // A suffix: the last `end` bytes.
            if end.is_empty() || end.starts_with('-') {
                return Err(RangeError::Invalid);
            }
            let n: u64 = parse_digits(end)?;
            let n = n.min(size);
            ranges.push((size - n, n));
        } else {
            let first: u64 = parse_digits(start)?;
            if first >= size {
                no_overlap = true;
                continue;
            }
            let length = if end.is_empty() {
                size - first
            } else {
                let last: u64 = parse_digits(end)?;
                if first > last {
                    return Err(RangeError::Invalid);
                }
                last.min(size - 1) - first + 1
            };
            ranges.push((first, length));
        }
    }
    if no_overlap && ranges.is_empty() {
        return Err(RangeError::NoOverlap);
    }
    Ok(ranges)
}

/// Go's `ParseInt` for a non-negative number: an optional `+`, then ASCII digits.
fn parse_digits(text: &str) -> Result<u64, RangeError> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Invalid);
    }
    digits.parse().map_err(|_| RangeError::Invalid)
}

/// Go's `filepath.Match` on Unix: `*` and `?` never match `/`, `[...]` classes with `^`
/// negation and ranges, `\` escapes. A malformed pattern matches nothing.
fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    matches_from(&p, &n) == Some(true)
}

/// `Some(matched)`, or `None` for a malformed pattern.
fn matches_from(p: &[char], n: &[char]) -> Option<bool> {
    let Some(&first) = p.first() else {
        return Some(n.is_empty());
    };
    match first {
        '*' => {
            let rest = &p[1..];
            for i in 0..=n.len() {
                if matches_from(rest, &n[i..])? {
                    return Some(true);
                }
                if i < n.len() && n[i] == '/' {
                    break;
                }
            }
            // A malformed tail must still be reported as such.
            matches_from(rest, &[]).map(|_| false)
        }
        '?' => match n.first() {
            Some(&c) if c != '/' => matches_from(&p[1..], &n[1..]),
            _ => Some(false),
        },
        '[' => {
            let (matched, used) = class(&p[1..], n.first().copied())?;
            if matched {
                matches_from(&p[1 + used..], &n[1..])
            } else {
                Some(false)
            }
        }
        '\\' => {
            let &c = p.get(1)?;
            if n.first() == Some(&c) {
                matches_from(&p[2..], &n[1..])
            } else {
                Some(false)
            }
        }
        c => {
            if n.first() == Some(&c) {
                matches_from(&p[1..], &n[1..])
            } else {
                Some(false)
            }
        }
    }
}

/// A `[...]` class after its `[`: whether `c` is in it, and how many pattern chars it took
/// (the closing `]` included).
fn class(p: &[char], c: Option<char>) -> Option<(bool, usize)> {
    let mut i = 0;
    let negated = p.first() == Some(&'^');
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut ranges = 0;
    loop {
        if p.get(i) == Some(&']') && ranges > 0 {
            i += 1;
            break;
        }
        let (lo, used) = class_char(&p[i..])?;
        i += used;
        let mut hi = lo;
        if p.get(i) == Some(&'-') {
            let (h, used) = class_char(&p[i + 1..])?;
            hi = h;
            i += 1 + used;
        }
        if let Some(c) = c
            && lo <= c
            && c <= hi
        {
            matched = true;
        }
        ranges += 1;
    }
    let c = c?;
    if c == '/' {
        return Some((false, i));
    }
    Some((matched != negated, i))
}

fn class_char(p: &[char]) -> Option<(char, usize)> {
    match p.first()? {
        '-' | ']' => None,
        '\\' => Some((*p.get(1)?, 2)),
        &c => Some((c, 1)),
    }
}

/// The paths a pattern names, expanded as Go's `filepath.Glob` does; a pattern without glob
/// characters names itself (whether or not it exists).
pub(crate) fn glob(pattern: &Path) -> Vec<PathBuf> {
    let text = pattern.to_string_lossy();
    if !text.contains(['*', '?', '[']) {
        return vec![pattern.to_owned()];
    }
    let trailing = text.ends_with('/');
    let mut found = vec![PathBuf::from("/")];
    for component in text.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for dir in &found {
            if !component.contains(['*', '?', '[', '\\']) {
                next.push(dir.join(component));
                continue;
            }
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| glob_match(component, name))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|name| dir.join(name)));
        }
        found = next;
    }
    found
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| {
            if trailing {
                let mut s = p.into_os_string();
                s.push("/");
                PathBuf::from(s)
            } else {
                p
            }
        })
        .collect()
}

/// One entry of a directory listing: Caddy's `fileInfo`.
#[derive(Debug, Clone)]
struct Item {
    /// The name, with a trailing `/` for a directory.
    name: String,
    size: u64,
    /// `./NAME`, escaped as Go's `url.URL` escapes a path.
    url: String,
    /// Nanoseconds since the epoch.
    modified: i128,
    /// Go's `fs.FileMode` bits.
    mode: u32,
    is_dir: bool,
    is_symlink: bool,
}

/// The entries of `dir`, hidden ones left out, at most [`MAX_LISTING`]. Symlinks are reported
/// as links, with their target's size and kind when the target exists.
fn list_directory(dir: &Path, hidden: &dyn Fn(&Path) -> bool) -> io::Result<Vec<Item>> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mut items = Vec::new();
    for entry in std::fs::read_dir(dir)?.take(MAX_LISTING) {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if hidden(&path) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let file_type = meta.file_type();
        let is_symlink = file_type.is_symlink();
        let target = if is_symlink {
            std::fs::metadata(&path).ok()
        } else {
            None
        };
        let is_dir = file_type.is_dir() || target.as_ref().is_some_and(|t| t.is_dir());
        let size = target.as_ref().map_or(meta.len(), |t| t.len());
        let mut name = entry.file_name().to_string_lossy().into_owned();
        if is_dir {
            name.push('/');
        }
        let perm = meta.permissions().mode();
        let mut mode = perm & 0o777;
        if perm & 0o4000 != 0 {
            mode |= 1 << 23;
        }
        if perm & 0o2000 != 0 {
            mode |= 1 << 22;
        }
        if perm & 0o1000 != 0 {
            mode |= 1 << 20;
        }
        if file_type.is_dir() {
            mode |= 1 << 31;
        } else if is_symlink {
            mode |= 1 << 27;
        } else if file_type.is_fifo() {
            mode |= 1 << 25;
        } else if file_type.is_socket() {
            mode |= 1 << 24;
        } else if file_type.is_block_device() {
            mode |= 1 << 26;
        } else if file_type.is_char_device() {
            mode |= (1 << 26) | (1 << 21);
        }
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| jiff::Timestamp::try_from(t).ok())
            .map_or(0, |t| t.as_nanosecond());
        items.push(Item {
            url: format!("./{}", escape_url_path(&name)),
            name,
            size,
            modified,
            mode,
            is_dir,
            is_symlink,
        });
    }
    Ok(items)
}

/// Go's path escaping (`url.URL.String()` of a relative path): all but letters, digits,
/// `-_.~$&+,/:;=@` as `%XX`.
fn escape_url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~$&+,/:;=@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const SORT_NAME: &str = "name";
const SORT_NAME_DIR_FIRST: &str = "namedirfirst";
const SORT_SIZE: &str = "size";
const SORT_TIME: &str = "time";

fn sort_items(items: &mut [Item], sort: &str, descending: bool) {
    fn by_name(a: &Item, b: &Item) -> Ordering {
        a.name.to_lowercase().cmp(&b.name.to_lowercase())
    }
    fn name_dir_first(a: &Item, b: &Item) -> Ordering {
        b.is_dir.cmp(&a.is_dir).then(by_name(a, b))
    }
    fn by_size(a: &Item, b: &Item) -> Ordering {
        // Directories first, by name: their sizes mean nothing to a reader.
        match (a.is_dir, b.is_dir) {
            (true, true) => by_name(a, b),
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => a.size.cmp(&b.size),
        }
    }
    fn by_time(a: &Item, b: &Item) -> Ordering {
        a.modified.cmp(&b.modified)
    }
    let compare: fn(&Item, &Item) -> Ordering = match sort {
        SORT_NAME => by_name,
        SORT_NAME_DIR_FIRST => name_dir_first,
        SORT_SIZE => by_size,
        SORT_TIME => by_time,
        _ => return,
    };
    items.sort_by(|a, b| {
        let order = compare(a, b);
        if descending { order.reverse() } else { order }
    });
}

/// The JSON listing, as Caddy's encoder writes it (HTML characters escaped, a final newline).
fn listing_json(items: &[Item]) -> String {
    // A struct, not `json!`: its fields keep Caddy's order (a map would sort them).
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        name: &'a str,
        size: u64,
        url: &'a str,
        mod_time: String,
        mode: u32,
        is_dir: bool,
        is_symlink: bool,
    }
    let values: Vec<Entry<'_>> = items
        .iter()
        .map(|item| Entry {
            name: &item.name,
            size: item.size,
            url: &item.url,
            mod_time: jiff::Timestamp::from_nanosecond(item.modified)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            mode: item.mode,
            is_dir: item.is_dir,
            is_symlink: item.is_symlink,
        })
        .collect();
    let text = serde_json::to_string(&values).expect("a listing serializes");
    // Go's encoder escapes these inside strings; they can appear nowhere else in JSON.
    let mut out = text
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029");
    out.push('\n');
    out
}

/// The HTML listing: breadcrumbs and a table of names, sizes and times.
fn listing_html(path: &str, items: &[Item]) -> String {
    let title = html_escape(path);
    let mut page = format!(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>body{{font-family:sans-serif;margin:2em}}\
         td,th{{padding:.2em 1em;text-align:left}}td.size{{text-align:right}}</style>\n\
         </head>\n<body>\n<h1>"
    );
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let text = if i == 0 { "/" } else { segment };
        let up = "../".repeat(segments.len() - i - 1);
        let link = if up.is_empty() { "./".to_owned() } else { up };
        page.push_str(&format!(
            "<a href=\"{}\">{}</a>{}",
            html_escape(&link),
            html_escape(text),
            if i == 0 || i + 1 == segments.len() {
                ""
            } else {
                "/"
            }
        ));
    }
    let dirs = items.iter().filter(|i| i.is_dir).count();
    page.push_str(&format!(
        "</h1>\n<p>{dirs} directories, {} files</p>\n<table>\n\
         <tr><th>Name</th><th>Size</th><th>Modified</th></tr>\n",
        items.len() - dirs
    ));
    if path.len() > 1 {
        page.push_str("<tr><td><a href=\"..\">Up</a></td><td></td><td></td></tr>\n");
    }
    for item in items {
        let size = if item.is_dir {
            "&mdash;".to_owned()
        } else {
            human_size(item.size)
        };
        let modified = jiff::Timestamp::from_nanosecond(item.modified)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        page.push_str(&format!(
            "<tr><td><a href=\"{}\">{}</a></td><td class=\"size\">{size}</td><td>{modified}</td></tr>\n",
            html_escape(&item.url),
            html_escape(&item.name),
        ));
    }
    page.push_str("</table>\n</body>\n</html>\n");
    page
}

/// A size in IEC units, as go-humanize's `IBytes` writes it (`512 B`, `1.5 KiB`, `20 MiB`).
fn human_size(size: u64) -> String {
    if size < 10 {
        return format!("{size} B");
    }
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = size as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let value = (value * 10.0 + 0.5).floor() / 10.0;
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// The value of one query parameter (the first), percent-decoded.
struct Query<'a>(&'a str);

impl Query<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.0.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_query(k) == key).then(|| decode_query(v))
        })
    }
}

fn decode_query(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The request's cookies, for the listing's remembered sort order.
struct Cookies<'a>(&'a HeaderMap);

impl Cookies<'_> {
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| v.to_owned())
            })
    }
}

#[cfg(test)]
mod tests {
    //! Differential tests: the same folder served by Debian's Caddy (`file_server browse`) and by
    //! [`FileServer`] behind a bare hyper server, the same requests to both.

    use std::net::SocketAddr;
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper::Request;
    use hyper_util::rt::TokioIo;
    use testkit::{Proc, ProcBuilder, Scratch};

    use super::*;

    /// Headers whose values must agree between edge and Caddy.
    const COMPARED: [&str; 9] = [
        "etag",
        "last-modified",
        "content-range",
        "content-encoding",
        "content-type",
        "location",
        "vary",
        "accept-ranges",
        "x-content-type-options",
    ];

    /// A request: method, path, headers.
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

    struct Answer {
        status: u16,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    /// Caddy serving `caddyfile` (with `PORT` replaced) on a free port, and that port.
    fn start_caddy(dir: &Scratch, caddyfile: &str) -> (Proc, u16) {
        testkit::ports::retry_on_port_clash(|_| {
            let port = testkit::ports::free_port().map_err(testkit::Error::Io)?;
            let path = dir.join("Caddyfile");
            std::fs::write(&path, caddyfile.replace("PORT", &port.to_string()))
                .map_err(testkit::Error::Io)?;
            let caddy = ProcBuilder::new("/usr/bin/caddy")
                .args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&path)
                .env("HOME", dir.path())
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config"))
                .spawn()?;
            caddy.wait_stderr("serving initial configuration", Duration::from_secs(20))?;
            Ok((caddy, port))
        })
        .expect("caddy starts")
    }

    /// `server` behind a bare HTTP/1.1 server on port 0, as the handler chain will call it.
    async fn start_edge(server: FileServer) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::sync::Arc::new(server);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let server = server.clone();
                            async move {
                                let (parts, _body) = req.into_parts();
                                let path = crate::site::match_path(parts.uri.path())
                                    .map(|p| String::from_utf8_lossy(&p).into_owned())
                                    .unwrap_or_default();
                                Ok::<_, std::convert::Infallible>(server.serve(&parts, &path).await)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    async fn fetch(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("127.0.0.1:{}", addr.port()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A folder with what the cases below ask for.
    fn site(dir: &Scratch) -> PathBuf {
        let root = dir.join("site");
        let write = |name: &str, body: &[u8]| {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        };
        write("index.html", b"<h1>home</h1>\n");
        write("docs/index.html", b"<h1>docs</h1>\n");
        write("docs/guide.md", b"# guide\n");
        let notes: String = (0..200).map(|i| format!("line {i:04}\n")).collect();
        write("notes.txt", notes.as_bytes());
        write("app.js", b"console.log('plain');\n");
        write("app.js.gz", b"pretend gzip bytes");
        write("app.js.zst", b"pretend zstd bytes, longer");
        write("app.js.br", b"pretend brotli");
        write("secret.txt", b"hidden\n");
        write(".git/config", b"[core]\n");
        write("files/a.txt", b"a");
        write("files/B.txt", b"bb");
        write("files/sub/c.txt", b"ccc");
        write("files/data.bin", b"\x00\x01");
        write("files/secret.txt", b"also hidden");
        std::os::unix::fs::symlink("a.txt", root.join("files/link.txt")).unwrap();
        root
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_server_answers_as_caddy_does() {
        let dir = Scratch::new("edge-files").unwrap();
        let root = site(&dir);
        let caddyfile = format!(
            "{{\n\tadmin off\n}}\nhttp://127.0.0.1:PORT {{\n\troot * {}\n\tfile_server browse {{\n\t\thide .git secret.txt\n\t\tprecompressed zstd gzip br\n\t}}\n}}\n",
            root.display()
        );
        let (_caddy, caddy_port) = start_caddy(&dir, &caddyfile);
        let caddy: SocketAddr = ([127, 0, 0, 1], caddy_port).into();

        let mut config = FileServerConfig::new(&root);
        config.browse = true;
        config.hide = vec![".git".into(), "secret.txt".into()];
        config.precompressed = ["zstd", "gzip", "br"]
            .into_iter()
            .map(|name| Precompressed::parse(name).unwrap())
            .collect();
        let edge = start_edge(FileServer::new(config)).await;

        let notes_tag = fetch(caddy, "GET", "/notes.txt", &[]).await;
        let etag = notes_tag.headers["etag"].to_str().unwrap().to_owned();
        let modified = notes_tag.headers["last-modified"]
            .to_str()
            .unwrap()
            .to_owned();
        let stale = "Mon, 02 Jan 2006 15:04:05 GMT";
        let cases: Vec<Case<'_>> = vec![
            ("GET", "/", vec![]),
            ("HEAD", "/", vec![]),
            ("GET", "/index.html", vec![]),
            ("GET", "/docs", vec![]),
            ("HEAD", "/docs", vec![]),
            ("POST", "/docs", vec![]),
            ("GET", "/docs/", vec![]),
            ("GET", "/docs/guide.md", vec![]),
            ("GET", "/docs/guide.md/", vec![]),
            ("GET", "/d%6fcs/guide.md", vec![]),
            ("GET", "/missing.txt", vec![]),
            ("GET", "/missing/", vec![]),
            ("GET", "/secret.txt", vec![]),
            ("GET", "/files/secret.txt", vec![]),
            ("GET", "/.git/config", vec![]),
            ("GET", "/.git/", vec![]),
            ("GET", "/files", vec![]),
            ("GET", "/files/link.txt", vec![]),
            ("GET", "/files/data.bin", vec![]),
            ("GET", "/notes.txt", vec![]),
            ("HEAD", "/notes.txt", vec![]),
            ("GET", "/notes.txt", vec![("range", "bytes=10-19")]),
            ("GET", "/notes.txt", vec![("range", "bytes=-5")]),
            ("GET", "/notes.txt", vec![("range", "bytes=1990-")]),
            ("GET", "/notes.txt", vec![("range", "bytes=1995-5000")]),
            ("GET", "/notes.txt", vec![("range", "bytes=5000-")]),
            ("GET", "/notes.txt", vec![("range", "bytes=abc")]),
            ("GET", "/notes.txt", vec![("range", "bytes=9-3")]),
            ("GET", "/notes.txt", vec![("range", "items=1-2")]),
            (
                "GET",
                "/notes.txt",
                vec![("range", "bytes=0-1"), ("if-range", &etag)],
            ),
            (
                "GET",
                "/notes.txt",
                vec![("range", "bytes=0-1"), ("if-range", "\"other\"")],
            ),
            (
                "GET",
                "/notes.txt",
                vec![("range", "bytes=0-1"), ("if-range", &modified)],
            ),
            ("GET", "/notes.txt", vec![("if-none-match", &etag)]),
            ("HEAD", "/notes.txt", vec![("if-none-match", &etag)]),
            (
                "GET",
                "/notes.txt",
                vec![("if-none-match", "\"x\", W/\"y\"")],
            ),
            ("GET", "/notes.txt", vec![("if-none-match", "*")]),
            ("POST", "/notes.txt", vec![("if-none-match", &etag)]),
            ("GET", "/notes.txt", vec![("if-modified-since", &modified)]),
            ("GET", "/notes.txt", vec![("if-modified-since", stale)]),
            (
                "GET",
                "/notes.txt",
                vec![("if-none-match", "\"x\""), ("if-modified-since", &modified)],
            ),
            ("GET", "/notes.txt", vec![("if-match", "\"x\"")]),
            ("GET", "/notes.txt", vec![("if-match", &etag)]),
            ("GET", "/notes.txt", vec![("if-unmodified-since", stale)]),
            ("GET", "/app.js", vec![]),
            ("GET", "/app.js", vec![("accept-encoding", "gzip")]),
            ("GET", "/app.js", vec![("accept-encoding", "zstd")]),
            ("GET", "/app.js", vec![("accept-encoding", "gzip, zstd")]),
            (
                "GET",
                "/app.js",
                vec![("accept-encoding", "gzip;q=1, zstd;q=0.5")],
            ),
            (
                "GET",
                "/app.js",
                vec![("accept-encoding", "zstd;q=0, gzip")],
            ),
            ("GET", "/app.js", vec![("accept-encoding", "br")]),
            (
                "GET",
                "/app.js",
                vec![("accept-encoding", "br;q=0.9, gzip;q=0.8")],
            ),
            ("GET", "/app.js", vec![("accept-encoding", "identity")]),
            (
                "GET",
                "/app.js",
                vec![("accept-encoding", "gzip"), ("range", "bytes=0-3")],
            ),
            (
                "GET",
                "/app.js",
                vec![("accept-encoding", "gzip"), ("if-none-match", "\"nope\"")],
            ),
        ];
        let mut differences = Vec::new();
        for (method, path, headers) in &cases {
            let want = fetch(caddy, method, path, headers).await;
            let got = fetch(edge, method, path, headers).await;
            let case = format!("{method} {path} {headers:?}");
            if want.status != got.status {
                differences.push(format!(
                    "{case}: status {} from caddy, {} from edge",
                    want.status, got.status
                ));
            }
            if want.body != got.body {
                differences.push(format!(
                    "{case}: body {:?} from caddy, {:?} from edge",
                    String::from_utf8_lossy(&want.body),
                    String::from_utf8_lossy(&got.body)
                ));
            }
            for name in COMPARED {
                let a: Vec<_> = want.headers.get_all(name).iter().collect();
                let b: Vec<_> = got.headers.get_all(name).iter().collect();
                if a != b {
                    differences.push(format!("{case}: {name} {a:?} from caddy, {b:?} from edge"));
                }
            }
        }
        assert!(
            differences.is_empty(),
            "edge differs from caddy:\n{}",
            differences.join("\n")
        );

        // Several ranges: multipart/byteranges, alike but for the random boundary.
        for ranges in ["bytes=0-4,10-14", "bytes=-3,0-0,100-", "bytes=0-1999,5-9"] {
            let headers = [("range", ranges)];
            let want = fetch(caddy, "GET", "/notes.txt", &headers).await;
            let got = fetch(edge, "GET", "/notes.txt", &headers).await;
            let same_shape = |answer: &Answer| {
                let content_type = answer.headers["content-type"].to_str().unwrap().to_owned();
                let body = String::from_utf8_lossy(&answer.body).into_owned();
                match content_type.split_once("boundary=") {
                    Some((kind, boundary)) => {
                        (answer.status, kind.to_owned(), body.replace(boundary, "B"))
                    }
                    None => (answer.status, content_type, body),
                }
            };
            assert_eq!(same_shape(&got), same_shape(&want), "{ranges}");
            assert_eq!(got.body.len(), want.body.len(), "{ranges}");
            let length = |a: &Answer| a.headers.get("content-length").cloned();
            if let Some(want_length) = length(&want) {
                assert_eq!(length(&got), Some(want_length), "{ranges}");
            }
        }

        // Listings: the HTML is edge's own, the JSON is Caddy's format.
        for query in [
            "",
            "?sort=size&order=desc",
            "?sort=time",
            "?sort=name&limit=2&offset=1",
        ] {
            let path = format!("/files/{query}");
            let accept = [("accept", "application/json")];
            let want = fetch(caddy, "GET", &path, &accept).await;
            let got = fetch(edge, "GET", &path, &accept).await;
            assert_eq!(want.status, 200, "{path}");
            assert_eq!(got.status, 200, "{path}");
            let want: serde_json::Value = serde_json::from_slice(&want.body).unwrap();
            let got: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
            assert_eq!(got, want, "JSON listing of {path}");
        }
        let html = fetch(edge, "GET", "/files/", &[]).await;
        let html = String::from_utf8(html.body).unwrap();
        assert!(html.contains("<a href=\"./sub/\">sub/</a>"), "{html}");
        assert!(
            html.contains("<a href=\"./link.txt\">link.txt</a>"),
            "{html}"
        );
        assert!(!html.contains("secret"), "a hidden file is listed: {html}");
    }

    #[test]
    fn try_files_finds_the_first_candidate_as_caddy_does() {
        let dir = Scratch::new("edge-try-files").unwrap();
        let root = site(&dir);
        std::fs::write(root.join("index.php"), b"<?php").unwrap();
        std::fs::write(root.join("docs/remote.php"), b"<?php").unwrap();
        let php = [".php".to_owned()];
        let found = |relative: &str, remainder: &str| TryFiles::Found {
            relative: relative.into(),
            remainder: remainder.into(),
        };
        let php_patterns = ["{path}", "{path}/index.php", "index.php"];
        let cases: Vec<(Vec<&str>, &str, &[String], TryFiles)> = vec![
            (
                vec!["/notes.txt", "/index.html"],
                "/",
                &[],
                found("/notes.txt", ""),
            ),
            (
                vec!["/nope", "/index.html"],
                "/",
                &[],
                found("/index.html", ""),
            ),
            (
                vec!["{path}", "/index.html"],
                "/notes.txt",
                &[],
                found("/notes.txt", ""),
            ),
            (vec!["{path}.txt"], "/notes", &[], found("/notes.txt", "")),
            (
                vec!["{dir}index.html"],
                "/docs/guide.md",
                &[],
                found("/docs/index.html", ""),
            ),
            (vec!["/x/{file}"], "/y/notes.txt", &[], TryFiles::None),
            // A directory only matches a pattern written with a trailing slash, a file only one
            // without, whatever the request path ends with.
            (vec!["{path}", "{path}/"], "/docs", &[], found("/docs/", "")),
            (vec!["{path}"], "/docs/", &[], TryFiles::None),
            (
                vec!["{path}/", "/app.js"],
                "/notes.txt",
                &[],
                found("/app.js", ""),
            ),
            (
                vec!["/nope", "=404", "/index.html"],
                "/",
                &[],
                TryFiles::Status(StatusCode::NOT_FOUND),
            ),
            (vec!["/nope"], "/", &[], TryFiles::None),
            // php_fastcgi's patterns, split at .php.
            (
                php_patterns.to_vec(),
                "/docs/remote.php/dav/files",
                &php,
                found("/docs/remote.php", "/dav/files"),
            ),
            (
                php_patterns.to_vec(),
                "/wp-admin/",
                &php,
                found("/index.php", ""),
            ),
            (
                php_patterns.to_vec(),
                "/docs/",
                &php,
                found("/index.php", ""),
            ),
            (vec!["{path}"], "/docs/REMOTE.PHP", &php, TryFiles::None),
            // Globs expand against the folder; glob characters from the request are literal.
            (vec!["/docs/*.md"], "/", &[], found("/docs/guide.md", "")),
            (vec!["{path}"], "/docs/*.md", &[], TryFiles::None),
            (vec!["/docs/\\*.md"], "/", &[], TryFiles::None),
            // The candidate is cleaned: it cannot climb out of the root.
            (vec!["/../../etc/passwd"], "/", &[], TryFiles::None),
            (vec!["/../notes.txt"], "/", &[], found("/notes.txt", "")),
        ];
        for (patterns, path, split, want) in cases {
            let patterns: Vec<String> = patterns.into_iter().map(String::from).collect();
            assert_eq!(
                try_files(&root, &patterns, path, split),
                want,
                "{patterns:?} for {path}"
            );
        }
    }

    #[tokio::test]
    async fn pass_thru_hands_on_a_missing_file_and_status_marks_an_error_page() {
        let dir = Scratch::new("edge-files-pass").unwrap();
        let root = site(&dir);
        let parts = |path: &str| Request::get(path).body(()).unwrap().into_parts().0;

        let mut config = FileServerConfig::new(&root);
        config.pass_thru = true;
        let server = FileServer::new(config);
        assert!(
            server
                .serve_or_next(&parts("/missing"), "/missing")
                .await
                .is_none()
        );
        let found = server
            .serve_or_next(&parts("/notes.txt"), "/notes.txt")
            .await;
        assert_eq!(found.map(|r| r.status()), Some(StatusCode::OK));

        // `status 404` with a rewrite to the page, as `handle_errors` setups serve one.
        let mut config = FileServerConfig::new(&root);
        config.status = Some(StatusCode::NOT_FOUND);
        let server = FileServer::new(config);
        let response = server.serve(&parts("/index.html"), "/index.html").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"<h1>home</h1>\n");
    }

    #[test]
    fn hide_patterns_match_as_caddys_file_hidden_does() {
        let hide = |patterns: &[&str], path: &str| {
            let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
            is_hidden(&patterns, Path::new(path))
        };
        assert!(hide(&[".git"], "/srv/site/.git/config"));
        assert!(hide(&["*.bak"], "/srv/site/a/b.bak"));
        assert!(!hide(&["*.bak"], "/srv/site/a/b.bak.txt"));
        assert!(hide(&["/srv/site/private"], "/srv/site/private/x"));
        assert!(hide(&["/srv/site/private"], "/srv/site/private"));
        assert!(!hide(&["/srv/site/private"], "/srv/site/privateer"));
        assert!(hide(&["/srv/*/x"], "/srv/site/x"));
        assert!(!hide(&["/srv/*/x"], "/srv/a/b/x"));
        assert!(hide(&["[a-c]?.txt"], "/b1.txt"));
        assert!(!hide(&["[^a-c]?.txt"], "/b1.txt"));
        assert!(!hide(&["[]"], "/x"), "a malformed pattern hides nothing");
    }

    #[test]
    fn listing_sizes_read_as_go_humanize_writes_them() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(500), "500 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(82_854_982), "79 MiB");
    }
}
